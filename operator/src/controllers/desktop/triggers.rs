//! Decides which host and pool watch events wake which desktops. A host whose placement facts
//! change (admin flags, CPU, memory, hugepages, pool, libvirt and heartbeat verdicts, orphan
//! domains) wakes the desktops bound to it and its pool's pending ones; a pool whose spec
//! changes wakes all of its desktops; a pool whose available capacity grows wakes its pending
//! ones. What the operator writes for itself (a host's allocatable, a pool's counts) and the
//! agent's periodic report (times, domain counts, KSM) wake nobody: with hundreds of desktops
//! pending, each such wake-up was a pass per pending desktop. A Desktop's own change wakes it
//! unless all that changed is the phase and the conditions the operator derives itself.

use std::collections::HashMap;
use std::sync::Mutex;

use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::FINALIZER_AGENT;
use deskvirt_crds::constants::condition::{
    CONSOLE_SECRET, IDLE, LIBVIRT_CONNECTED, POOL_APPLIED, READY, SCHEDULED, SIZE_APPLIED,
};
use deskvirt_crds::names::fnv1a64;
use deskvirt_crds::quantity::parse_bytes;
use deskvirt_crds::resource_pool::Amounts;
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use serde_json::Value;

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
    // A Ready copy of an image lets the desktops waiting for it go there.
    let images: Vec<_> = st
        .iter()
        .flat_map(|s| s.images.iter())
        .filter(|i| i.phase == deskvirt_crds::image::CopyPhase::Ready)
        .map(|i| (&i.uid, i.version))
        .collect();
    let text = format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{orphans:?}|{images:?}",
        n.spec.unschedulable,
        n.spec.maintenance,
        n.spec.drain,
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

/// The status fields the operator derives on every pass (the chart's admission policy keeps the
/// agent from them). The binding's values (host, port, MAC, allocation, idle record) are not
/// among them: a late write of a fenced-out leader changes them, and the pass repairs it.
const DERIVED_FIELDS: [&str; 2] = ["phase", "observedGeneration"];

/// The conditions only the operator writes.
const OPERATOR_CONDITIONS: [&str; 6] = [
    READY,
    SCHEDULED,
    IDLE,
    CONSOLE_SECRET,
    SIZE_APPLIED,
    POOL_APPLIED,
];

/// A Desktop as its own pass cares, hashed: all of it but its resourceVersion and the status
/// the operator derives (phase and its own conditions: a pass that wrote them has acted on what
/// it knew, and the next pass would find nothing to do). Anyone else's change (spec, labels,
/// annotations, finalizers, deletion, the agent's report) and any change of the binding wake
/// it.
pub fn desktop_key(d: &Desktop) -> Option<u64> {
    let mut v = serde_json::to_value(d).ok()?;
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        // The agent's finalizer matters to the operator only once the desktop is deleted
        // (cleanup waits for the host to let go); its arrival on a live desktop is the agent's
        // first write, and needs no pass.
        if !meta.contains_key("deletionTimestamp")
            && let Some(f) = meta.get_mut("finalizers").and_then(Value::as_array_mut)
        {
            f.retain(|f| f.as_str() != Some(FINALIZER_AGENT));
            if f.is_empty() {
                meta.remove("finalizers");
            }
        }
    }
    Some(key_without(v, &DERIVED_FIELDS, &OPERATOR_CONDITIONS))
}

/// An object's JSON `v` hashed without its resourceVersion and managedFields, the status
/// fields `fields` and the conditions of the types `conditions` (what the operator writes
/// itself); what is left empty counts as absent.
pub fn key_without(mut v: Value, fields: &[&str], conditions: &[&str]) -> u64 {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    if let Some(status) = v.get_mut("status").and_then(Value::as_object_mut) {
        for f in fields {
            status.remove(*f);
        }
        if let Some(conds) = status.get_mut("conditions").and_then(Value::as_array_mut) {
            conds.retain(|c| {
                c.get("type")
                    .and_then(Value::as_str)
                    .is_none_or(|t| !conditions.contains(&t))
            });
        }
        status.retain(|_, v| match v {
            Value::Null => false,
            Value::Object(o) => !o.is_empty(),
            Value::Array(a) => !a.is_empty(),
            _ => true,
        });
    }
    fnv1a64(v.to_string().as_bytes())
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
    use deskvirt_crds::constants::condition::{DOMAIN_DEFINED as DOMAIN, RUNNING as RUNNING_};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
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

    fn desktop(status: serde_json::Value) -> Desktop {
        serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": { "name": "d", "namespace": "t", "uid": "u1", "generation": 1,
                          "resourceVersion": "7" },
            "spec": { "pool": "p", "cpu": 1, "memory": "1Gi",
                      "disk": { "image": "/var/lib/deskvirt/images/base.qcow2" } },
            "status": status
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn cond(type_: &str, status: &str) -> serde_json::Value {
        json!({ "type": type_, "status": status, "reason": "R", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z" })
    }

    #[test]
    fn a_desktop_wakes_for_what_others_write_not_for_the_operators_own_status() {
        let bound = json!({ "node": "h", "conditions": [cond(DOMAIN, "True")] });
        let key = |status: &serde_json::Value| desktop_key(&desktop(status.clone()));
        let base = key(&bound);
        assert!(base.is_some());

        let mut own = bound.clone();
        own["phase"] = json!("Running");
        own["observedGeneration"] = json!(1);
        own["conditions"] = json!([
            cond(DOMAIN, "True"),
            cond(READY, "True"),
            cond(SCHEDULED, "True"),
            cond(SIZE_APPLIED, "True")
        ]);
        assert_eq!(key(&own), base, "the operator's own status");
        let mut other_version = desktop(own.clone());
        other_version.metadata.resource_version = Some("8".into());
        assert_eq!(
            desktop_key(&other_version),
            base,
            "a new resourceVersion alone"
        );

        let mut agent = own.clone();
        agent["conditions"] = json!([
            cond(DOMAIN, "True"),
            cond(RUNNING_, "True"),
            cond(READY, "True")
        ]);
        assert_ne!(key(&agent), base, "the agent's Running");
        let mut addressed = own.clone();
        addressed["ip"] = json!("10.0.0.2");
        addressed["spice"]["host"] = json!("h.example");
        assert_ne!(key(&addressed), base, "the agent's address");
        assert_ne!(
            key(&json!({ "conditions": [cond(DOMAIN, "True")] })),
            base,
            "the binding"
        );

        let mut edited = desktop(bound.clone());
        edited.metadata.annotations = Some([("deskvirt.io/wake".into(), "1".into())].into());
        assert_ne!(desktop_key(&edited), base, "an annotation");
        let mut deleted = desktop(bound.clone());
        deleted.metadata.finalizers = Some(vec![]);
        deleted.metadata.generation = Some(2);
        assert_ne!(desktop_key(&deleted), base, "a spec edit");
        let mut other = desktop(bound.clone());
        other.metadata.uid = Some("u2".into());
        assert_ne!(desktop_key(&other), base, "another object of the same name");

        let mut held = desktop(bound.clone());
        held.metadata.finalizers = Some(vec![FINALIZER_AGENT.into()]);
        assert_eq!(
            desktop_key(&held),
            base,
            "the agent's finalizer on a live desktop"
        );
        let mut deleting = held.clone();
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let mut let_go = deleting.clone();
        let_go.metadata.finalizers = Some(vec![]);
        assert_ne!(
            desktop_key(&deleting),
            desktop_key(&let_go),
            "the agent letting go of a deleted desktop"
        );
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
