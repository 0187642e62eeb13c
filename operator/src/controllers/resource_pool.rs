//! The ResourcePool controller: pure aggregation of the pool's hosts and desktops into its
//! status (an invalid spec: `Ready=False` naming every bad field, and no capacity; else capacity, allocated, available, ports, desktops by phase, Ready and Degraded; a
//! desktop whose resources idle reclamation released counts in none of them). The
//! patch is skipped when nothing but timestamps changed, and coalesced during bursts: at most
//! one write per pool per `--pool-status-interval`, the last value written when it ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::{DEGRADED, READY};
use deskvirt_crds::constants::pool_reason::INVALID_SPEC;
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::names::fnv1a64;
use deskvirt_crds::read::{FromPoolSpec, write_capacity};
use deskvirt_crds::resource_pool::{ResourcePool, ResourcePoolStatus};
use deskvirt_crds::validation;
use deskvirt_crds::{Desktop, DesktopMigration, DomainNode};
use deskvirt_runtime::throttle::throttled;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::desktop::triggers;
use super::{
    Categorized, StatusApply, apply_status, drive, kube_transient, on_leadership, watch_config,
};
use crate::context::{Context, stopped};
use crate::idle::PoolIdle;
use crate::scheduler::{PoolCapacity, PoolPolicy};
use crate::world::{host_views_counted, pool_of};

const NAME: &str = "resourcepool";

/// Why a ResourcePool reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot apply pool status")]
    Apply(#[source] kube::Error),
}

impl Categorized for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Apply(_) => "KubeApi",
        }
    }
    fn is_transient(&self) -> bool {
        match self {
            Error::Apply(e) => kube_transient(e),
        }
    }
}

pub async fn run(ctx: Arc<Context>, selector: String, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let cfg = watch_config(&selector);
    let stores = ctx.stores.clone();
    let by_migration = ctx.stores.clone();
    let moved_pools = PoolOfDesktop::default();
    let keyed = moved_pools.clone();
    let controller =
        deskvirt_runtime::cache::controller(Api::<ResourcePool>::all(client.clone()), cfg.clone())
            // Hosts and desktops wake pools from the operator's caches once those show the
            // change: the pass counts from them.
            .watches_stream(ctx.stores.node_changes.stream_by_key(host_key), move |n| {
                let mut pools: Vec<String> = n
                    .status
                    .as_ref()
                    .and_then(|s| s.pool.clone())
                    .into_iter()
                    .collect();
                pools.extend(pool_of(&n, &stores.pools.state()));
                pools.iter().map(|p| ObjectRef::new(p)).collect::<Vec<_>>()
            })
            .watches_stream(
                throttled(
                    ctx.stores.desktop_changes.stream_by_key(desktop_key),
                    DESKTOP_WAKES,
                    move |d: &Desktop| keyed.key(d),
                ),
                move |d| moved_pools.wake(&d),
            )
            // A migration's target is charged and holds a port: its pool counts again when the
            // migration's status or finalizer changes, which the operator writes after each
            // reservation and each release.
            .watches(
                Api::<DesktopMigration>::all(client.clone()),
                watch_config(&selector),
                move |m| {
                    let st = m.status.as_ref();
                    let uid = st.and_then(|s| s.desktop_uid.as_deref());
                    let own = uid
                        .and_then(|u| by_migration.desktop_by_uid(u))
                        .map(|d| ObjectRef::new(d.pool()));
                    // A move into another pool is charged there from its reservation on.
                    let into = st
                        .and_then(|s| s.target_pool.as_deref())
                        .map(ObjectRef::new);
                    own.into_iter().chain(into)
                },
            )
            .reconcile_all_on(on_leadership(ctx.leader.clone()))
            .graceful_shutdown_on(stopped(stop.clone()))
            .run(
                reconcile,
                |p, e, c| super::error_policy(NAME, &p, e, &c),
                ctx,
            );
    drive(NAME, controller, stop).await;
}

/// The pool each desktop was last seen in, so that a desktop moved into another pool (by a
/// migration) wakes the pool it left as well as the one it joined.
#[derive(Clone, Default)]
struct PoolOfDesktop(Arc<std::sync::Mutex<Moves>>);

#[derive(Default)]
struct Moves {
    /// Each desktop's pool as last seen, by UID.
    last: std::collections::HashMap<String, String>,
    /// The pool a desktop left, until the change that showed it wakes that pool.
    left: std::collections::HashMap<String, String>,
}

impl PoolOfDesktop {
    fn moves(&self) -> std::sync::MutexGuard<'_, Moves> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The throttle's key of a change of `d`, on its arrival: its pool, or for a desktop that
    /// changed pools both (so that no change of another desktop in its new pool stands for it).
    fn key(&self, d: &Desktop) -> String {
        let now = d.pool().to_string();
        let Some(uid) = d.uid() else {
            return now;
        };
        let mut m = self.moves();
        if d.metadata.deletion_timestamp.is_some() {
            m.last.remove(&uid);
            return now;
        }
        match m.last.insert(uid.clone(), now.clone()) {
            Some(before) if before != now => {
                let key = format!("{now}\n{before}");
                m.left.insert(uid, before);
                key
            }
            _ => now,
        }
    }

    /// The pools a change of `d` wakes: its own, and the one it left, if it just moved.
    fn wake(&self, d: &Desktop) -> Vec<ObjectRef<ResourcePool>> {
        let mut pools = vec![ObjectRef::new(d.pool())];
        if let Some(left) = d.uid().and_then(|uid| self.moves().left.remove(&uid)) {
            pools.push(ObjectRef::new(&left));
        }
        pools
    }
}

/// At most one pass per pool per this long is woken by its desktops' changes: the first change
/// of a burst wakes it at once, the last at the window's end. A burst of 1,000 desktops on
/// their way to Running changes what a pool counts some 2,000 times; the status is written at
/// most once per `POOL_STATUS_INTERVAL` anyway.
const DESKTOP_WAKES: Duration = Duration::from_secs(1);

/// What the pool's status reads of a host, hashed: what placement reads
/// ([`triggers::host_key`]: not the allocatable the operator writes itself, nor the agent's
/// periodic report) and its labels (membership).
fn host_key(n: &DomainNode) -> u64 {
    let labels = format!("{:?}", n.metadata.labels);
    triggers::host_key(n) ^ fnv1a64(labels.as_bytes()).rotate_left(1)
}

/// What the pool's status reads of a desktop, hashed: its pool, spec and deletion, and its
/// status but for when activity was last seen and the conditions' times, reasons and messages
/// (the pool counts phases, bindings, sizes, sessions, and `Running` and `Idle` by their
/// status). The agent's activity reports and the operator's condition messages then wake no
/// pool pass.
fn desktop_key(d: &Desktop) -> u64 {
    let mut st = serde_json::to_value(&d.status).unwrap_or_default();
    if let Some(o) = st.as_object_mut() {
        for f in ["observedGeneration", "lastActivityTime", "idleSince"] {
            o.remove(f);
        }
        if let Some(conds) = o.get_mut("conditions").and_then(|c| c.as_array_mut()) {
            for c in conds.iter_mut() {
                *c = serde_json::json!([c.get("type"), c.get("status")]);
            }
        }
    }
    let text = format!(
        "{}|{:?}|{}|{st}",
        d.pool(),
        d.metadata.generation,
        d.metadata.deletion_timestamp.is_some()
    );
    fnv1a64(text.as_bytes())
}

/// Every phase, counted even at zero: the map then never loses its last key, which a server-side
/// apply on Kubernetes 1.20 turns into a null the schema refuses.
const PHASES: [Phase; 8] = [
    Phase::Pending,
    Phase::Scheduled,
    Phase::Starting,
    Phase::Running,
    Phase::Stopped,
    Phase::Suspended,
    Phase::Failed,
    Phase::Unknown,
];

/// Desktops of `pool` by phase (an unset phase counts as Pending), every phase present.
pub fn count_phases<'a>(
    pool: &str,
    desktops: impl IntoIterator<Item = &'a Desktop>,
) -> BTreeMap<String, u32> {
    let mut out: BTreeMap<String, u32> =
        PHASES.iter().map(|p| (p.as_str().to_string(), 0)).collect();
    for d in desktops.into_iter().filter(|d| d.pool() == pool) {
        let phase = d
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or(Phase::Pending);
        *out.entry(phase.as_str().to_string()).or_insert(0) += 1;
    }
    out
}

/// Whether `new` says anything `old` does not, transition times aside (a condition whose status
/// did not change keeps its time anyway, see [`condition`]).
pub fn differs(old: &ResourcePoolStatus, new: &ResourcePoolStatus) -> bool {
    let strip = |s: &ResourcePoolStatus| ResourcePoolStatus {
        conditions: vec![],
        ..s.clone()
    };
    strip(old) != strip(new) || conditions::differ_ignoring_time(&old.conditions, &new.conditions)
}

#[tracing::instrument(skip_all, fields(pool = %pool.name_any()))]
pub async fn reconcile(pool: Arc<ResourcePool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _busy = ctx.reconciles.pools.begin();
    ctx.metrics.reconciled(NAME);
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();
    let name = pool.name_any();
    let old = pool.status.clone().unwrap_or_default();
    let prev = &old.conditions;
    let gen_ = pool.metadata.generation;
    let desktops = ctx.stores.desktops.state();
    let mut st = ResourcePoolStatus {
        desktops: count_phases(&name, desktops.iter().map(|d| d.as_ref())),
        observed_generation: gen_,
        ..Default::default()
    };
    let failed = st
        .desktops
        .get(Phase::Failed.as_str())
        .copied()
        .unwrap_or(0);
    // Nothing is placed into an invalid pool (the Desktop controller checks the same).
    let invalid = validation::pool(&pool.spec);
    let policy = if invalid.is_empty() {
        PoolPolicy::from_spec(&pool.spec).map_err(|e| ("InvalidPool", e.to_string()))
    } else {
        let summary = validation::summary(&invalid);
        Err((INVALID_SPEC, format!("invalid spec: {summary}")))
    };
    let (ready, degraded) = match policy {
        Err((reason, message)) => (
            condition(
                prev,
                READY,
                Status::False,
                reason,
                message.clone(),
                gen_,
                now,
            ),
            condition(prev, DEGRADED, Status::True, reason, message, gen_, now),
        ),
        Ok(policy) => {
            let mut ledgers = ctx.ledgers.lock().await;
            if !ledgers.ready {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            // The pool's ledger is made here if it is not yet; the charges read every pool's.
            let ledger_ok = ledgers.of(&pool, &ctx.stores).is_ok();
            let charges = ctx.stores.charges(&mut ledgers);
            let hosts = host_views_counted(
                &name,
                &policy,
                &ctx.stores.nodes.state(),
                &ctx.stores.pools.state(),
                &charges,
                ledgers.get(&name).filter(|_| ledger_ok),
                |n| ctx.heartbeat(n, now),
                &ctx.stores.views,
            );
            drop(charges);
            drop(ledgers);
            let cap = PoolCapacity::of(&name, &policy, &hosts);
            write_capacity(&cap, &mut st);
            let ready = if policy.ports.is_empty() {
                condition(
                    prev,
                    READY,
                    Status::False,
                    "InvalidPortRange",
                    format!(
                        "SPICE port range {}-{} is reversed",
                        policy.ports.first, policy.ports.last
                    ),
                    gen_,
                    now,
                )
            } else if cap.nodes.ready > 0 {
                condition(
                    prev,
                    READY,
                    Status::True,
                    "HostsReady",
                    format!(
                        "{} of {} hosts can take desktops",
                        cap.nodes.ready, cap.nodes.total
                    ),
                    gen_,
                    now,
                )
            } else {
                condition(
                    prev,
                    READY,
                    Status::False,
                    "NoReadyHosts",
                    format!("none of {} hosts can take desktops", cap.nodes.total),
                    gen_,
                    now,
                )
            };
            let degraded = if cap.nodes.ready < cap.nodes.total {
                condition(
                    prev,
                    DEGRADED,
                    Status::True,
                    "HostsNotReady",
                    format!(
                        "{} of {} hosts cannot take desktops",
                        cap.nodes.total - cap.nodes.ready,
                        cap.nodes.total
                    ),
                    gen_,
                    now,
                )
            } else if failed > 0 {
                condition(
                    prev,
                    DEGRADED,
                    Status::True,
                    "DesktopsFailed",
                    format!("{failed} desktops failed"),
                    gen_,
                    now,
                )
            } else {
                condition(
                    prev,
                    DEGRADED,
                    Status::False,
                    "AsExpected",
                    "every host is ready",
                    gen_,
                    now,
                )
            };
            (ready, degraded)
        }
    };
    st.conditions = vec![ready, degraded];
    ctx.metrics.pool(&name, &st);
    ctx.metrics.idle(
        &name,
        &PoolIdle::of(&name, desktops.iter().map(|d| d.as_ref())),
    );
    if differs(&old, &st) {
        // Coalesced: during a burst at most one write per interval, the last one at its end.
        let clock = Instant::now();
        if let Some(wait) = ctx.pool_status.wait(&name, clock) {
            return Ok(Action::requeue(wait));
        }
        let body = StatusApply::new::<ResourcePool>(&name, None, &st);
        if ctx.fence.check().is_err() {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        apply_status(&Api::<ResourcePool>::all(ctx.client.clone()), &body)
            .await
            .map_err(Error::Apply)?;
        ctx.pool_status.wrote(&name, clock);
    }
    ctx.succeeded(&format!("{NAME}/{}", pool.uid().unwrap_or_default()));
    Ok(Action::requeue(Duration::from_secs(300)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desktop(pool: &str, phase: Option<&str>) -> Desktop {
        let mut v = serde_json::json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": { "name": "d", "namespace": "ns" },
            "spec": { "pool": pool, "cpu": 1, "memory": "1Gi", "disk": { "image": "b.qcow2" } }
        });
        if let Some(p) = phase {
            v["status"] = serde_json::json!({ "phase": p });
        }
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A change to a Desktop's JSON.
    type Edit = dyn Fn(&mut serde_json::Value);

    #[test]
    fn a_desktop_wakes_its_pool_only_for_what_the_pool_counts() {
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = serde_json::to_value(desktop("a", Some("Running")))
                .unwrap_or_else(|e| panic!("{e}"));
            v["status"]["conditions"] = serde_json::json!([{
                "type": "Running", "status": "True", "reason": "Started", "message": "m",
                "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]);
            v["status"]["lastActivityTime"] = serde_json::json!("2026-01-01T00:00:00Z");
            f(&mut v);
            desktop_key(&serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}")))
        };
        let base = with(&|_| {});
        let quiet: [(&str, &Edit); 3] = [
            ("activity", &|v| {
                v["status"]["lastActivityTime"] = "2026-01-01T00:01:00Z".into()
            }),
            ("a message", &|v| {
                v["status"]["conditions"][0]["message"] = "n".into()
            }),
            ("a reason", &|v| {
                v["status"]["conditions"][0]["reason"] = "Resumed".into()
            }),
        ];
        for (what, f) in quiet {
            assert_eq!(with(f), base, "{what}");
        }
        let loud: [(&str, &Edit); 5] = [
            ("the phase", &|v| v["status"]["phase"] = "Suspended".into()),
            ("Running", &|v| {
                v["status"]["conditions"][0]["status"] = "False".into()
            }),
            ("the host", &|v| v["status"]["node"] = "h2".into()),
            ("the pool", &|v| v["spec"]["pool"] = "b".into()),
            ("deletion", &|v| {
                v["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into()
            }),
        ];
        for (what, f) in loud {
            assert_ne!(with(f), base, "{what}");
        }
    }

    /// What a pass computes reads back from the API as the same: the next pass writes nothing,
    /// whatever the transition times and however memory is spelled.
    #[test]
    fn a_status_read_back_does_not_differ() {
        use deskvirt_crds::resource_pool::{Amounts, NodeCounts, PortUsage};
        let now = Timestamp::now();
        let amounts = |m: &str| {
            Some(Amounts {
                cpu: 28,
                memory: m.into(),
                desktops: 7,
            })
        };
        let st = ResourcePoolStatus {
            nodes: Some(NodeCounts { total: 1, ready: 1 }),
            capacity: amounts("15Gi"),
            allocated: amounts("1536Mi"),
            available: amounts("13824Mi"),
            ports: Some(PortUsage {
                total: 1000,
                used: 3,
                taken: 0,
            }),
            desktops: count_phases("a", [desktop("a", Some("Running"))].iter()),
            conditions: vec![condition(
                &[],
                READY,
                Status::True,
                "HostsReady",
                "1 of 1 hosts can take desktops",
                Some(1),
                now,
            )],
            observed_generation: Some(1),
        };
        // As the API server stores it: JSON, transition times to the second.
        let mut stored = serde_json::to_value(&st).unwrap_or_else(|e| panic!("{e}"));
        stored["conditions"][0]["lastTransitionTime"] = serde_json::json!("2024-01-01T00:00:00Z");
        let back: ResourcePoolStatus =
            serde_json::from_value(stored).unwrap_or_else(|e| panic!("{e}"));
        assert!(!differs(&back, &st), "{back:?}");
        // The next pass keeps the stored transition time.
        let again = condition(
            &back.conditions,
            READY,
            Status::True,
            "HostsReady",
            "1 of 1 hosts can take desktops",
            Some(1),
            Timestamp::now(),
        );
        assert_eq!(
            again.last_transition_time,
            back.conditions[0].last_transition_time
        );
        let mut moved = st.clone();
        moved.allocated = amounts("2Gi");
        assert!(differs(&back, &moved));
        let mut counted = st.clone();
        counted.desktops.insert("Pending".into(), 1);
        assert!(differs(&back, &counted));
    }

    #[test]
    fn counts_every_phase_even_at_zero() {
        let ds = [
            desktop("a", None),
            desktop("a", Some("Running")),
            desktop("a", Some("Running")),
            desktop("b", Some("Failed")),
        ];
        let counts = count_phases("a", ds.iter());
        assert_eq!(counts.len(), PHASES.len());
        assert_eq!(counts.get("Pending"), Some(&1));
        assert_eq!(counts.get("Running"), Some(&2));
        assert_eq!(counts.get("Failed"), Some(&0));
        let none = count_phases("empty", ds.iter());
        assert!(none.values().all(|n| *n == 0) && !none.is_empty());
    }

    #[test]
    fn a_desktop_that_changed_pools_wakes_the_one_it_left_once() {
        let moves = PoolOfDesktop::default();
        let mut d = desktop("p", Some("Running"));
        d.metadata.uid = Some("u".into());
        let names = |v: Vec<ObjectRef<ResourcePool>>| -> Vec<String> {
            v.into_iter().map(|r| r.name).collect()
        };
        assert_eq!(moves.key(&d), "p");
        assert_eq!(names(moves.wake(&d)), ["p"]);
        // Moved into q by a migration: its binding's pool is q now.
        d.spec.pool = "q".into();
        let key = moves.key(&d);
        assert_ne!(key, "q", "no change of another desktop of q stands for it");
        assert_eq!(names(moves.wake(&d)), ["q", "p"]);
        assert_eq!(moves.key(&d), "q");
        assert_eq!(names(moves.wake(&d)), ["q"], "once");
    }
}
