//! Decides which host and pool watch events wake which desktops. A host whose placement facts
//! change (admin flags, CPU, memory, hugepages, pool, libvirt and heartbeat verdicts, orphan
//! domains) wakes the desktops bound to it and its pool's pending ones; a pool whose spec
//! changes wakes all of its desktops; a pool whose available capacity grows wakes its pending
//! ones. What the operator writes for itself (a host's allocatable, a pool's counts) and the
//! agent's periodic report (times, domain counts, KSM) wake nobody: with hundreds of desktops
//! pending, each such wake-up was a pass per pending desktop.

use std::collections::HashMap;
use std::sync::Mutex;

use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::condition::{LIBVIRT_CONNECTED, READY};
use deskvirt_crds::names::fnv1a64;
use deskvirt_crds::quantity::parse_bytes;
use deskvirt_crds::resource_pool::Amounts;
use deskvirt_crds::{DomainNode, ResourcePool};

/// What a host says that placement and a bound desktop's phase depend on, hashed.
pub fn host_key(n: &DomainNode) -> u64 {
    let st = n.status.as_ref();
    let cond = |t| {
        st.and_then(|s| find(&s.conditions, t))
            .map(|c| c.status.clone())
    };
    let orphans: Vec<_> = st
        .iter()
        .flat_map(|s| s.orphans.iter())
        .map(|o| (&o.uid, o.running, o.cpu, &o.memory, o.spice_port, &o.mac))
        .collect();
    let text = format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{orphans:?}",
        n.spec.unschedulable,
        n.spec.maintenance,
        n.metadata.deletion_timestamp.is_some(),
        st.and_then(|s| s.cpu.as_ref()).map(|c| c.threads),
        st.and_then(|s| s.memory.as_ref()),
        st.and_then(|s| s.hugepages.as_ref())
            .map(|h| (&h.size, h.total)),
        st.and_then(|s| s.pool.as_ref()),
        cond(LIBVIRT_CONNECTED),
        cond(READY),
    );
    fnv1a64(text.as_bytes())
}

/// A pool as its desktops care: its spec (by generation) and whether it is going away.
type PoolKey = (Option<i64>, bool);

fn pool_key(p: &ResourcePool) -> PoolKey {
    (
        p.metadata.generation,
        p.metadata.deletion_timestamp.is_some(),
    )
}

/// Whether `new` offers more than `old` in any dimension: a desktop refused for capacity may
/// fit now.
fn grew(old: Option<&Amounts>, new: Option<&Amounts>) -> bool {
    let (Some(old), Some(new)) = (old, new) else {
        return new.is_some();
    };
    let bytes = |a: &Amounts| parse_bytes(&a.memory).unwrap_or(0);
    new.cpu > old.cpu || new.desktops > old.desktops || bytes(new) > bytes(old)
}

/// Which desktops an event wakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wake {
    /// The desktops bound to the host, or all desktops of the pool.
    pub bound: bool,
    /// The pool's pending desktops.
    pub pending: bool,
}

impl Wake {
    const NONE: Wake = Wake {
        bound: false,
        pending: false,
    };
    const ALL: Wake = Wake {
        bound: true,
        pending: true,
    };
}

/// The last version of each host and pool the desktop controller saw.
#[derive(Default)]
pub struct Seen {
    hosts: Mutex<HashMap<String, u64>>,
    pools: Mutex<HashMap<String, (PoolKey, Option<Amounts>)>>,
}

impl Seen {
    /// What a host event wakes: everything at first sight or when its key changed.
    pub fn host(&self, n: &DomainNode) -> Wake {
        let name = n.metadata.name.clone().unwrap_or_default();
        let key = host_key(n);
        let Ok(mut hosts) = self.hosts.lock() else {
            return Wake::ALL;
        };
        if hosts.insert(name, key) == Some(key) {
            Wake::NONE
        } else {
            Wake::ALL
        }
    }

    /// What a pool event wakes: all of its desktops at first sight or on a spec change, its
    /// pending ones when its available capacity grew.
    pub fn pool(&self, p: &ResourcePool) -> Wake {
        let name = p.metadata.name.clone().unwrap_or_default();
        let key = pool_key(p);
        let available = p.status.as_ref().and_then(|s| s.available.clone());
        let Ok(mut pools) = self.pools.lock() else {
            return Wake::ALL;
        };
        let wake = match pools.get(&name) {
            Some((k, _)) if *k != key => Wake::ALL,
            Some((_, old)) => Wake {
                bound: false,
                pending: grew(old.as_ref(), available.as_ref()),
            },
            None => Wake::ALL,
        };
        pools.insert(name, (key, available));
        wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(status: serde_json::Value) -> DomainNode {
        serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
            "metadata": { "name": "h" }, "spec": {}, "status": status
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn pool(generation: i64, available_cpu: u32) -> ResourcePool {
        serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
            "metadata": { "name": "p", "generation": generation }, "spec": {},
            "status": { "available": { "cpu": available_cpu, "memory": "1Gi", "desktops": 1 } }
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn reports_and_the_operators_own_writes_wake_nobody() {
        let seen = Seen::default();
        let base = json!({ "cpu": { "threads": 8, "sockets": 1, "cores": 4, "mhz": 1 },
                           "memory": "16Gi", "pool": "p" });
        assert_eq!(seen.host(&node(base.clone())), Wake::ALL, "first sight");
        let mut report = base.clone();
        report["lastReportTime"] = json!("2026-01-01T00:00:00Z");
        report["allocatable"] = json!({ "cpu": 28, "memory": "15Gi", "dedicatedCpus": 7 });
        report["domains"] = json!({ "defined": 3, "running": 2 });
        assert_eq!(seen.host(&node(report.clone())), Wake::NONE);
        let mut grown = report.clone();
        grown["memory"] = json!("32Gi");
        assert_eq!(seen.host(&node(grown)), Wake::ALL, "more memory");
    }

    #[test]
    fn pools_wake_pending_desktops_only_when_capacity_grows() {
        let seen = Seen::default();
        assert_eq!(seen.pool(&pool(1, 4)), Wake::ALL);
        assert_eq!(seen.pool(&pool(1, 3)), Wake::NONE, "less available");
        assert_eq!(
            seen.pool(&pool(1, 5)),
            Wake {
                bound: false,
                pending: true
            }
        );
        assert_eq!(seen.pool(&pool(2, 5)), Wake::ALL, "spec edited");
    }
}
