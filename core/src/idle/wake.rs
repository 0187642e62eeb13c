//! What a `deskvirt.io/wake` annotation asks for: whether its value is new, what waking takes
//! (record it, cancel a reclaim the host has not done, or find room again), and where a
//! released desktop runs again (its own host, or another one when its storage is shared).

use crate::names::fnv1a64;
use crate::quantity::format_bytes;
use crate::scheduler::{HostView, PoolPolicy, Request, place_in_pool};
use crate::types::PortRange;

/// Longest token `status.wake.token` holds as is; a longer annotation value is recorded by its
/// hash.
pub const TOKEN_MAX: usize = 253;

/// A new wake token, as `status.wake.token` records it, from the annotation's `value`: set, not
/// blank, and not `last`, the one last acted on.
pub fn wake_token(value: Option<&str>, last: Option<&str>) -> Option<String> {
    let value = value?.trim();
    if value.is_empty() {
        return None;
    }
    let token = if value.chars().count() <= TOKEN_MAX {
        value.to_string()
    } else {
        format!("fnv1a64:{:016x}", fnv1a64(value.as_bytes()))
    };
    (Some(token.as_str()) != last).then_some(token)
}

/// What a new wake token asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeStep {
    /// Not reclaimed: record it; the countdown starts again from now.
    Record,
    /// Reclaimed, but the host has not confirmed: clear `reclaimed` (it still holds its port).
    Cancel,
    /// Reclaimed and released: it needs room and a port on a host again.
    Restore,
}

impl WakeStep {
    /// What waking takes for a desktop whose action is `reclaimed` (recorded) and `released`
    /// (confirmed by the host, [`super::released`]).
    pub fn of(reclaimed: bool, released: bool) -> Self {
        match (reclaimed, released) {
            (false, _) => WakeStep::Record,
            (true, true) => WakeStep::Restore,
            (true, false) => WakeStep::Cancel,
        }
    }
}

/// Where a woken desktop can run again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WakeTarget {
    /// Back on the host it ran on.
    Host(String),
    /// To another host of the pool (its disk is on shared storage): `why` its own host cannot
    /// take it.
    Move { to: String, why: String },
    /// Not now; the `Idle` message says why.
    Wait(String),
}

/// Where a released desktop bound to `node` can run again, judged on `hosts` built without the
/// desktop itself: back on its own host when that has room and a port; else, when the pool's
/// storage is `shared`, on the host the scheduler picks among the others (its disk is reachable
/// there, and its domain on the old host is confirmed stopped); else it waits.
pub fn wake_target(
    pool: &str,
    node: &str,
    hosts: &[HostView],
    request: &Request,
    policy: &PoolPolicy,
    shared: bool,
) -> WakeTarget {
    let Some(why) = home_problem(node, hosts, request, policy.ports) else {
        return WakeTarget::Host(node.to_string());
    };
    if !shared {
        return WakeTarget::Wait(format!(
            "woken, waiting for room on host {node} where its disk lives: {why} (the pool's \
             storage is not shared, so it cannot move to another host)"
        ));
    }
    match place_in_pool(pool, policy, request, hosts) {
        Ok(d) => WakeTarget::Move {
            to: d.host.name.to_string(),
            why,
        },
        Err(e) => WakeTarget::Wait(format!(
            "woken, waiting for room: host {node} where it ran {why}, and no other host of the \
             pool takes it: {e}"
        )),
    }
}

/// Why host `node` cannot take the woken desktop back now, if it cannot.
fn home_problem(
    node: &str,
    hosts: &[HostView],
    request: &Request,
    ports: PortRange,
) -> Option<String> {
    let Some(host) = hosts.iter().find(|h| &*h.name == node) else {
        return Some("is not in the desktop's pool".into());
    };
    if !host.ready {
        return Some("is not ready".into());
    }
    if host.maintenance {
        return Some("is in maintenance".into());
    }
    if host.lacks_cpu_model {
        return Some("cannot run the pool's CPU model".into());
    }
    let short = host.capacity.shortfalls(&host.allocated, request);
    let no_port = host.ports_in_use >= ports.len();
    if short.none() && !no_port {
        return None;
    }
    let free = host.free();
    let cpus = if request.dedicated_cpus {
        free.pinnable_cpus
    } else {
        free.vcpus
    };
    let mut why = format!(
        "is full: needs {} CPU / {}, free {cpus} CPU / {}",
        request.vcpus,
        format_bytes(request.memory),
        format_bytes(free.memory)
    );
    if request.hugepages {
        why.push_str(&format!(", {} of hugepages", format_bytes(free.hugepages)));
    }
    if no_port {
        why.push_str(&format!(
            "; every SPICE port {}-{} is taken",
            ports.first, ports.last
        ));
    }
    Some(why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{HostCapacity, Ratio, Usage};
    use crate::types::Placement;

    const GI: u64 = 1 << 30;

    #[test]
    fn a_wake_token_counts_once() {
        assert_eq!(wake_token(None, None), None);
        assert_eq!(wake_token(Some(" "), None), None);
        assert_eq!(wake_token(Some("17"), None).as_deref(), Some("17"));
        assert_eq!(wake_token(Some(" 17 "), Some("17")), None);
        assert_eq!(wake_token(Some("18"), Some("17")).as_deref(), Some("18"));
        // Longer than the status field takes: recorded by its hash, still once.
        let value = "x".repeat(300);
        let long = wake_token(Some(&value), Some("17")).unwrap_or_default();
        assert!(
            long.starts_with("fnv1a64:") && long.len() < TOKEN_MAX,
            "{long}"
        );
        assert_eq!(wake_token(Some(&value), Some(&long)), None);
        // At the limit, as is.
        let edge = "y".repeat(TOKEN_MAX);
        assert_eq!(
            wake_token(Some(&edge), None).as_deref(),
            Some(edge.as_str())
        );
    }

    #[test]
    fn waking_records_cancels_or_restores() {
        assert_eq!(WakeStep::of(false, false), WakeStep::Record);
        assert_eq!(WakeStep::of(false, true), WakeStep::Record);
        assert_eq!(WakeStep::of(true, false), WakeStep::Cancel);
        assert_eq!(WakeStep::of(true, true), WakeStep::Restore);
    }

    #[test]
    fn a_woken_desktop_goes_home_else_moves_only_with_shared_storage() {
        let cap = HostCapacity {
            physical_cpus: 4,
            cpu_ratio: Ratio::ONE,
            memory: 4 * GI,
            hugepages: 0,
        };
        let mut policy = crate::scheduler::bench::policy(Placement::Spread);
        policy.ports = PortRange {
            first: 5900,
            last: 5901,
        };
        let req = Request::new(2, 2 * GI);
        let target = |node: &str, hosts: &[HostView], shared: bool| {
            wake_target("p", node, hosts, &req, &policy, shared)
        };
        let roomy = HostView::new("h", "p", cap).with_ports_in_use(1);
        assert_eq!(
            target("h", std::slice::from_ref(&roomy), true),
            WakeTarget::Host("h".into())
        );
        let full = roomy
            .clone()
            .with_allocated(Usage::of(&[Request::new(4, 3584 << 20)]));
        let WakeTarget::Wait(msg) = target("h", std::slice::from_ref(&full), false) else {
            panic!("fits on a full host");
        };
        assert_eq!(
            msg,
            "woken, waiting for room on host h where its disk lives: is full: needs 2 CPU / 2Gi, \
             free 0 CPU / 512Mi (the pool's storage is not shared, so it cannot move to another host)"
        );
        let no_port = roomy.clone().with_ports_in_use(2);
        let WakeTarget::Wait(msg) = target("h", &[no_port], false) else {
            panic!("fits without a port");
        };
        assert!(msg.contains("SPICE port"), "{msg}");

        // Shared storage: to the other host when it has room, else still waiting.
        let other = HostView::new("g", "p", cap);
        let hosts = [full.clone(), other.clone()];
        assert_eq!(
            target("h", &hosts, true),
            WakeTarget::Move {
                to: "g".into(),
                why: "is full: needs 2 CPU / 2Gi, free 0 CPU / 512Mi".into()
            }
        );
        assert_eq!(
            target("h", &hosts, false),
            target("h", std::slice::from_ref(&full), false)
        );
        let WakeTarget::Wait(msg) = target("h", std::slice::from_ref(&full), true) else {
            panic!("moved without another host");
        };
        assert!(msg.contains("no other host of the pool takes it"), "{msg}");
        // A host that is gone or not ready is left too (its domain was confirmed stopped).
        let mut lost = roomy.clone();
        lost.ready = false;
        assert!(matches!(
            target("h", &[lost, other.clone()], true),
            WakeTarget::Move { to, why } if to == "g" && why == "is not ready"
        ));
        assert!(matches!(
            target("gone", std::slice::from_ref(&other), true),
            WakeTarget::Move { to, .. } if to == "g"
        ));
        assert!(matches!(target("gone", &[], false), WakeTarget::Wait(_)));
    }
}
