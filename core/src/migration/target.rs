//! Which host a migrating desktop goes to: the host the user named when it can take the
//! desktop, else the one the pool's scheduler picks among the others, by the same filters and
//! weights as a binding. The source is never a candidate, and a refusal says why in the words
//! of a binding's.

use crate::reasons::MigrationReason;
use crate::scheduler::filter::{Verdict, judge};
use crate::scheduler::{FitReport, HostView, PoolPolicy, Request, place_in_pool_where};

/// Why no target is chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: MigrationReason,
    /// What to tell the user, naming the hosts and what they lack.
    pub message: String,
}

/// Chooses the target of a desktop of `pool` asking `request`, running on `source`, among
/// `hosts` (built without the desktop's own charge on its source); `wanted` is the host the
/// user named. Hosts `excluded` says no to (at their limit of migrations) are left out.
pub fn choose_target<'a>(
    pool: &str,
    policy: &PoolPolicy,
    request: &Request,
    source: &str,
    wanted: Option<&str>,
    hosts: &'a [HostView],
    excluded: impl Fn(&str) -> bool,
) -> Result<&'a HostView, Refusal> {
    let refuse = |reason, message| Err(Refusal { reason, message });
    let Some(wanted) = wanted else {
        let keep = |h: &HostView| &*h.name != source && !excluded(&h.name);
        return match place_in_pool_where(pool, policy, request, hosts, keep) {
            Ok(d) => Ok(d.host),
            Err(e) => refuse(
                MigrationReason::NoTarget,
                format!("no other host of pool {pool} can take it now: {e}"),
            ),
        };
    };
    if wanted == source {
        return refuse(
            MigrationReason::TargetIsSource,
            format!("the desktop already runs on {wanted}"),
        );
    }
    let Some(host) = hosts.iter().find(|h| &*h.name == wanted && h.in_pool(pool)) else {
        return refuse(
            MigrationReason::TargetNotInPool,
            format!("{wanted} is not a host of pool {pool}"),
        );
    };
    if excluded(wanted) {
        return refuse(
            MigrationReason::Queued,
            format!("{wanted} is moving as many desktops as it may at once"),
        );
    }
    match judge(host, request, policy.ports) {
        Verdict::Fits => Ok(host),
        verdict => {
            let mut report =
                FitReport::new(pool, *request, policy.ports).with_cpu_model(policy.cpu_model);
            report.record(&verdict);
            refuse(
                MigrationReason::NoTarget,
                format!(
                    "{wanted} cannot take it now: {}",
                    report.into_unschedulable()
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::capacity::{HostCapacity, Usage};
    use crate::scheduler::policy::Ratio;
    use crate::types::Placement;

    const GI: u64 = 1 << 30;

    fn host(name: &str, free_gi: u64) -> HostView {
        let capacity = HostCapacity {
            physical_cpus: 8,
            cpu_ratio: Ratio::ONE,
            memory: 16 * GI,
            hugepages: 0,
        };
        HostView::new(name, "lab", capacity).with_allocated(Usage {
            memory: (16 - free_gi) * GI,
            ..Usage::default()
        })
    }

    fn choose<'a>(
        wanted: Option<&str>,
        hosts: &'a [HostView],
        excluded: &[&str],
    ) -> Result<&'a str, (MigrationReason, String)> {
        let policy = PoolPolicy::test(Placement::Spread);
        let request = Request::new(2, 4 * GI);
        choose_target("lab", &policy, &request, "h1", wanted, hosts, |h| {
            excluded.contains(&h)
        })
        .map(|h| &*h.name)
        .map_err(|r| (r.reason, r.message))
    }

    #[test]
    fn the_source_is_never_chosen_even_when_it_has_the_most_room() {
        let hosts = [host("h1", 16), host("h2", 6), host("h3", 8)];
        assert_eq!(choose(None, &hosts, &[]), Ok("h3"), "spread: most room");
        let full = choose(None, &hosts[..1], &[]).map_err(|e| e.0);
        assert_eq!(full, Err(MigrationReason::NoTarget), "alone in its pool");
    }

    #[test]
    fn a_host_at_its_limit_is_left_out() {
        let hosts = [host("h1", 16), host("h2", 6), host("h3", 8)];
        assert_eq!(choose(None, &hosts, &["h3"]), Ok("h2"));
        let named = choose(Some("h3"), &hosts, &["h3"]).map_err(|e| e.0);
        assert_eq!(named, Err(MigrationReason::Queued));
    }

    #[test]
    fn a_named_target_is_judged_and_explained() {
        let hosts = [
            host("h1", 16),
            host("h2", 2),
            host("h3", 8),
            host("h4", 8).not_ready(),
        ];
        assert_eq!(
            choose(Some("h3"), &hosts, &[]),
            Ok("h3"),
            "not the best, but asked"
        );
        let Err((reason, message)) = choose(Some("h2"), &hosts, &[]) else {
            panic!("h2 has 2 GiB free for a 4 GiB desktop");
        };
        assert_eq!(reason, MigrationReason::NoTarget);
        assert!(
            message.contains("h2") && message.contains("memory"),
            "{message}"
        );
        let not_ready = choose(Some("h4"), &hosts, &[]).map_err(|e| e.0);
        assert_eq!(not_ready, Err(MigrationReason::NoTarget));
        let same = choose(Some("h1"), &hosts, &[]).map_err(|e| e.0);
        assert_eq!(same, Err(MigrationReason::TargetIsSource));
        let other = choose(Some("elsewhere"), &hosts, &[]).map_err(|e| e.0);
        assert_eq!(other, Err(MigrationReason::TargetNotInPool));
    }
}
