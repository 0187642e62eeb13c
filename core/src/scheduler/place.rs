//! Two-level placement: the pool a desktop names, then the best host of that pool that passes
//! every filter, by the pool's Spread or Pack strategy. Same input, same answer, whatever the
//! order of the hosts.

use std::cmp::Ordering;

use super::filter::{Verdict, judge};
use super::host::HostView;
use super::policy::PoolPolicy;
use super::pools::PoolIndex;
use super::request::Request;
use super::unschedulable::{FitReport, Unschedulable};
use super::weigh::{compare, free_score};

/// Where a desktop goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'a> {
    /// Index of the chosen host in the slice given to the scheduler.
    pub index: usize,
    /// The chosen host.
    pub host: &'a HostView,
    /// Its free-capacity score after placement (see [`free_score`]).
    pub score: u64,
}

/// Places `request` in the pool named `pool`: looks the pool up in `pools`, then picks a host of
/// it among `hosts` (hosts of other pools are ignored).
pub fn schedule<'a>(
    pool: &str,
    pools: &PoolIndex,
    request: &Request,
    hosts: &'a [HostView],
) -> Result<Decision<'a>, Unschedulable> {
    match pools.get(pool) {
        None => Err(Unschedulable::PoolNotFound {
            pool: pool.to_owned(),
        }),
        Some(Err(e)) => Err(Unschedulable::InvalidPool {
            pool: pool.to_owned(),
            problem: e.to_string(),
        }),
        Some(Ok(policy)) => place_in_pool(pool, policy, request, hosts),
    }
}

/// Picks the host of `pool` among `hosts` for `request` under `policy`. Allocation-free on
/// success, and linear in the number of hosts: this is the function to time.
pub fn place_in_pool<'a>(
    pool: &str,
    policy: &PoolPolicy,
    request: &Request,
    hosts: &'a [HostView],
) -> Result<Decision<'a>, Unschedulable> {
    place_in_pool_where(pool, policy, request, hosts, |_| true)
}

/// [`place_in_pool`] among the hosts of the pool that `keep` keeps (a migration leaves its
/// source out): a host left out is not a candidate, and not counted in the failure's report.
pub fn place_in_pool_where<'a>(
    pool: &str,
    policy: &PoolPolicy,
    request: &Request,
    hosts: &'a [HostView],
    keep: impl Fn(&HostView) -> bool,
) -> Result<Decision<'a>, Unschedulable> {
    let range = policy.ports;
    if range.is_empty() {
        return Err(Unschedulable::InvalidPortRange {
            pool: pool.to_owned(),
            first: range.first,
            last: range.last,
        });
    }
    let mut best: Option<Decision<'a>> = None;
    for (index, host) in hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| h.in_pool(pool) && keep(h))
    {
        if judge(host, request, range) != Verdict::Fits {
            continue;
        }
        let score = free_score(host, request);
        let better = match &best {
            None => true,
            Some(b) => {
                compare(
                    policy.placement,
                    (score, &host.name),
                    (b.score, &b.host.name),
                ) == Ordering::Less
            }
        };
        if better {
            best = Some(Decision { index, host, score });
        }
    }
    match best {
        Some(decision) => Ok(decision),
        None => Err(report(pool, policy, request, hosts, keep).into_unschedulable()),
    }
}

/// Judges every kept host of the pool again to explain a failure; only runs when nothing fits.
fn report(
    pool: &str,
    policy: &PoolPolicy,
    request: &Request,
    hosts: &[HostView],
    keep: impl Fn(&HostView) -> bool,
) -> FitReport {
    let mut report = FitReport::new(pool, *request, policy.ports).with_cpu_model(policy.cpu_model);
    for host in hosts.iter().filter(|h| h.in_pool(pool) && keep(h)) {
        report.record(&judge(host, request, policy.ports));
    }
    report
}

#[cfg(test)]
mod tests {
    use crate::types::{Placement, PortRange};

    use super::*;
    use crate::scheduler::capacity::{HostCapacity, Usage};
    use crate::scheduler::policy::Ratio;

    const GI: u64 = 1 << 30;

    fn policy(placement: Placement) -> PoolPolicy {
        PoolPolicy::test(placement)
    }

    /// A ready host of pool "lab" with `cpus` threads (no overcommit) and `memory_gi` GiB.
    fn host(name: &str, cpus: u32, memory_gi: u64) -> HostView {
        HostView::new(
            name,
            "lab",
            HostCapacity {
                physical_cpus: cpus,
                cpu_ratio: Ratio::ONE,
                memory: memory_gi * GI,
                hugepages: 0,
            },
        )
    }

    fn pick(
        placement: Placement,
        request: Request,
        hosts: &[HostView],
    ) -> Result<&str, Unschedulable> {
        place_in_pool("lab", &policy(placement), &request, hosts).map(|d| &*d.host.name)
    }

    #[test]
    fn spread_picks_the_emptiest_pack_the_fullest() -> Result<(), Unschedulable> {
        let hosts = [
            host("a", 8, 16).with_allocated(Usage::of(&[Request::new(4, 8 * GI)])),
            host("b", 8, 16),
            host("c", 8, 16).with_allocated(Usage::of(&[Request::new(6, 12 * GI)])),
        ];
        assert_eq!(
            pick(Placement::Spread, Request::new(2, 4 * GI), &hosts)?,
            "b"
        );
        assert_eq!(pick(Placement::Pack, Request::new(2, 4 * GI), &hosts)?, "c");
        assert_eq!(
            pick(Placement::Pack, Request::new(3, 4 * GI), &hosts)?,
            "a",
            "the fullest that still fits"
        );
        Ok(())
    }

    #[test]
    fn ties_break_by_name_whatever_the_order() -> Result<(), Unschedulable> {
        let hosts = [host("b", 4, 8), host("a", 4, 8), host("c", 4, 8)];
        for placement in [Placement::Spread, Placement::Pack] {
            assert_eq!(pick(placement, Request::new(1, GI), &hosts)?, "a");
        }
        Ok(())
    }

    #[test]
    fn skips_unhealthy_and_foreign_hosts() -> Result<(), Unschedulable> {
        let mut other = host("z-other-pool", 64, 256);
        other.pool = Some("elsewhere".into());
        let hosts = [
            host("a", 64, 256).not_ready(),
            host("b", 64, 256).cordoned(),
            host("c", 64, 256).in_maintenance(),
            other,
            host("d", 2, 4),
        ];
        let d = place_in_pool(
            "lab",
            &policy(Placement::Spread),
            &Request::new(1, GI),
            &hosts,
        )?;
        assert_eq!((d.index, &*d.host.name), (4, "d"));
        Ok(())
    }

    #[test]
    fn explains_failure_with_counts() {
        let hosts = [
            host("a", 2, 64),
            host("b", 2, 64),
            host("c", 64, 256).not_ready(),
        ];
        let err = pick(Placement::Spread, Request::new(4, GI), &hosts);
        let Err(u) = err else {
            panic!("nothing should fit, got {err:?}")
        };
        assert_eq!(u.reason(), "InsufficientCPU");
        assert_eq!(
            u.to_string(),
            "0 of 3 hosts fit: 2 lack CPU (need 4 vCPU), 1 not ready"
        );
    }

    #[test]
    fn a_full_port_range_blocks_the_host() -> Result<(), Unschedulable> {
        let hosts = [host("a", 64, 256).with_ports_in_use(10), host("b", 1, 2)];
        assert_eq!(pick(Placement::Spread, Request::new(1, GI), &hosts)?, "b");
        let err = pick(Placement::Spread, Request::new(1, GI), &hosts[..1]);
        assert_eq!(err.map_err(|u| u.reason()), Err("PortsExhausted"));
        Ok(())
    }

    #[test]
    fn dedicated_cpus_fit_physical_threads_only() -> Result<(), Unschedulable> {
        let mut overcommitted = host("a", 4, 64);
        // 32 vCPUs on 4 threads
        overcommitted.capacity.cpu_ratio = Ratio::from_millionths(8_000_000);
        let hosts = [overcommitted];
        assert_eq!(pick(Placement::Spread, Request::new(16, GI), &hosts)?, "a");
        let err = pick(Placement::Spread, Request::new(6, GI).dedicated(), &hosts);
        assert_eq!(
            err.map_err(|u| u.reason()),
            Err("InsufficientDedicatedCPUs")
        );
        Ok(())
    }

    #[test]
    fn pool_level_errors() {
        let mut pools = PoolIndex::new();
        let hosts = [host("a", 4, 8)];
        let err = schedule("lab", &pools, &Request::new(1, GI), &hosts);
        assert_eq!(err, Err(Unschedulable::PoolNotFound { pool: "lab".into() }));

        let mut reversed = policy(Placement::Spread);
        reversed.ports = PortRange {
            first: 6000,
            last: 5999,
        };
        pools.insert("lab", reversed);
        let err = schedule("lab", &pools, &Request::new(1, GI), &hosts);
        assert_eq!(err.map_err(|u| u.reason()), Err("InvalidPortRange"));

        pools.insert("lab", policy(Placement::Spread));
        assert_eq!(
            schedule("lab", &pools, &Request::new(1, GI), &hosts).map(|d| d.index),
            Ok(0)
        );
    }

    #[test]
    fn an_empty_pool_has_no_ready_hosts() {
        let err = pick(Placement::Spread, Request::new(1, GI), &[]);
        assert_eq!(
            err.map_err(|u| (u.reason(), u.to_string())),
            Err(("NoReadyHosts", "pool lab has no hosts".to_owned()))
        );
    }
}
