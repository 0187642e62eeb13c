//! The idle policy's reading of a Desktop: whether it holds CPU, memory and a SPICE port at all
//! (the one rule placement, the ledger and pool accounting share), what its wake annotation
//! asks for, and a pool's idle figures. The decisions themselves are the core's
//! ([`deskvirt_core::idle`]); this reads the API's objects into them.

use std::collections::BTreeMap;

use deskvirt_core::idle::{WakeStep, wake};
use deskvirt_crds::conditions::{Status, find};
use deskvirt_crds::constants::ANNOTATION_WAKE;
use deskvirt_crds::constants::condition::IDLE;
use deskvirt_crds::desktop::{Desktop, DesktopStatus};
use deskvirt_crds::read::FromDesktopSpec;
pub use deskvirt_crds::read::released;

use crate::context::holds_binding;
use crate::scheduler::Request;

/// Whether a desktop holds CPU and memory on its host and a SPICE port: it holds its binding
/// (see [`holds_binding`]) and its resources were not released by the idle policy. The scheduler's
/// host views, the pool's status, the hosts' allocatable and the port ledger all count by this.
pub fn holds_resources(d: &Desktop) -> bool {
    holds_binding(d) && !d.status.as_ref().is_some_and(released)
}

/// A new value of the wake annotation, as `status.wake.token` records it: set, not empty, and
/// not the one last acted on.
pub fn wake_token(
    annotations: &BTreeMap<String, String>,
    st: Option<&DesktopStatus>,
) -> Option<String> {
    let last = st.and_then(|s| s.wake.as_ref()).map(|w| w.token.as_str());
    wake::wake_token(annotations.get(ANNOTATION_WAKE).map(String::as_str), last)
}

/// What waking a desktop with status `st` takes.
pub fn wake_step(st: &DesktopStatus) -> WakeStep {
    WakeStep::of(st.reclaimed.is_some(), released(st))
}

/// A pool's idle figures, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolIdle {
    /// Desktops whose `Idle` is True.
    pub idle: u64,
    /// Desktops with a SPICE client connected.
    pub sessions: u64,
    /// Desktops whose resources are back with the pool, and those resources.
    pub released: u64,
    pub cpu: u64,
    pub memory_bytes: u64,
}

impl PoolIdle {
    /// Sums the desktops of `pool`.
    pub fn of<'a>(pool: &str, desktops: impl IntoIterator<Item = &'a Desktop>) -> Self {
        let mut sum = Self::default();
        for d in desktops.into_iter().filter(|d| d.pool() == pool) {
            let Some(st) = &d.status else { continue };
            if find(&st.conditions, IDLE).is_some_and(|c| c.status == Status::True.as_str()) {
                sum.idle += 1;
            }
            if st.session.as_ref().is_some_and(|s| s.connected) {
                sum.sessions += 1;
            }
            if holds_binding(d) && !holds_resources(d) {
                sum.released += 1;
                if let Ok(r) = Request::from_spec(&d.spec) {
                    sum.cpu += u64::from(r.vcpus);
                    sum.memory_bytes = sum.memory_bytes.saturating_add(r.memory);
                }
            }
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskvirt_crds::constants::running_reason;
    use deskvirt_crds::desktop::Wake;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    const GI: u64 = 1 << 30;
    const TOKEN_MAX: usize = wake::TOKEN_MAX;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn desktop(json: serde_json::Value) -> Desktop {
        let mut v = serde_json::json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": { "name": "d", "namespace": "ns", "uid": "u1" },
            "spec": { "pool": "p", "cpu": 2, "memory": "2Gi", "disk": { "image": "b.qcow2" } }
        });
        if let (Some(v), Some(extra)) = (v.as_object_mut(), json.as_object()) {
            v.extend(extra.clone());
        }
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn holds_resources_until_the_host_confirms_the_reclaim() {
        let reclaimed =
            serde_json::json!({ "action": "Suspend", "at": "2024-01-01T00:00:00Z", "port": 5900 });
        let cond = |reason: &str, status: &str| {
            serde_json::json!([{ "type": "Running", "status": status, "reason": reason, "message": "m",
                                  "lastTransitionTime": "2024-01-01T00:00:00Z" }])
        };
        let plain = desktop(serde_json::json!({ "status": { "node": "h" } }));
        assert!(holds_resources(&plain));
        let asked = desktop(serde_json::json!({ "status": {
            "node": "h", "reclaimed": reclaimed, "conditions": cond("Reclaiming", "False") } }));
        assert!(holds_resources(&asked), "the host has not confirmed");
        let st = asked.status.clone().unwrap_or_default();
        assert_eq!(wake_step(&st), WakeStep::Cancel);
        for reason in [running_reason::SUSPENDED, running_reason::IDLE_SHUTDOWN] {
            let done = desktop(serde_json::json!({ "status": {
                "node": "h", "reclaimed": reclaimed, "conditions": cond(reason, "False") } }));
            assert!(!holds_resources(&done), "{reason}");
            let st = done.status.clone().unwrap_or_default();
            assert_eq!(wake_step(&st), WakeStep::Restore);
        }
        // The agent's Suspended alone (a wake cleared `reclaimed`) holds again.
        let woken = desktop(serde_json::json!({ "status": {
            "node": "h", "conditions": cond(running_reason::SUSPENDED, "False") } }));
        assert!(holds_resources(&woken));
        assert_eq!(
            wake_step(&woken.status.clone().unwrap_or_default()),
            WakeStep::Record
        );

        let totals = PoolIdle::of("p", [&plain, &asked, &woken]);
        assert_eq!(totals.released, 0);
        let done = desktop(serde_json::json!({ "status": {
            "node": "h", "reclaimed": reclaimed, "conditions": cond("Suspended", "False"),
            "session": { "connected": false } } }));
        let totals = PoolIdle::of("p", [&plain, &done]);
        assert_eq!(
            (totals.released, totals.cpu, totals.memory_bytes),
            (1, 2, 2 * GI)
        );
    }

    #[test]
    fn the_wake_annotation_is_read_against_the_last_token() {
        let mut ann = BTreeMap::new();
        assert_eq!(wake_token(&ann, None), None);
        ann.insert(ANNOTATION_WAKE.to_string(), " ".to_string());
        assert_eq!(wake_token(&ann, None), None);
        ann.insert(ANNOTATION_WAKE.to_string(), "17".to_string());
        assert_eq!(wake_token(&ann, None).as_deref(), Some("17"));
        let st = DesktopStatus {
            wake: Some(Wake {
                token: "17".into(),
                at: Time(at(0)),
            }),
            ..Default::default()
        };
        assert_eq!(wake_token(&ann, Some(&st)), None);
        // Longer than the status field takes: recorded by its hash, still once.
        ann.insert(ANNOTATION_WAKE.to_string(), "x".repeat(300));
        let long = wake_token(&ann, Some(&st)).unwrap_or_default();
        assert!(
            long.starts_with("fnv1a64:") && long.len() < TOKEN_MAX,
            "{long}"
        );
        let st = DesktopStatus {
            wake: Some(Wake {
                token: long,
                at: Time(at(0)),
            }),
            ..Default::default()
        };
        assert_eq!(wake_token(&ann, Some(&st)), None);
    }
}
