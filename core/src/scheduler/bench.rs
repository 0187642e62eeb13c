//! Inputs of a chosen size for timing placement (for example 500 hosts), deterministic so runs
//! compare. No benchmark harness yet: call [`place_all`] from one when it exists.

use crate::types::{Placement, PortRange};

use super::capacity::{HostCapacity, Usage};
use super::host::HostView;
use super::place::place_in_pool;
use super::policy::{PoolPolicy, Ratio, ReferenceDesktop};
use super::request::Request;

const GI: u64 = 1 << 30;

/// A pool policy with the CRD defaults' shape (4× CPU overcommit, SPICE ports 5900-6899).
pub fn policy(placement: Placement) -> PoolPolicy {
    PoolPolicy {
        reserved_cpus: 1,
        reserved_memory: GI,
        cpu_ratio: Ratio::from_millionths(4_000_000),
        memory_ratio: Ratio::ONE,
        reference: ReferenceDesktop {
            vcpus: 2,
            memory: 4 * GI,
        },
        placement,
        ports: PortRange {
            first: 5900,
            last: 6899,
        },
        cpu_model: None,
    }
}

/// `n` hosts of `pool` with varied sizes and loads; every tenth host is not ready.
pub fn fleet(pool: &str, n: usize) -> Vec<HostView> {
    (0..n)
        .map(|i| {
            let step = u32::try_from(i % 7).unwrap_or(0);
            let capacity = HostCapacity {
                physical_cpus: 16 + 8 * step,
                cpu_ratio: Ratio::from_millionths(4_000_000),
                memory: (64 + 32 * u64::from(step)) * GI,
                hugepages: 0,
            };
            let load = u64::try_from(i % 13).unwrap_or(0);
            let desktops = u32::try_from(load).unwrap_or(0);
            let allocated = Usage {
                shared_vcpus: 2 * load,
                pinned_cpus: 0,
                memory: 4 * load * GI,
                hugepages: 0,
                desktops,
            };
            let host = HostView::new(format!("host-{i:04}"), pool, capacity)
                .with_allocated(allocated)
                .with_ports_in_use(desktops);
            if i % 10 == 9 { host.not_ready() } else { host }
        })
        .collect()
}

/// Places every request in turn, applying each placement to its host; returns how many were
/// placed. The workload to time: `place_all(&policy, &mut fleet("p", 500), &requests)`.
pub fn place_all(
    policy: &PoolPolicy,
    pool: &str,
    hosts: &mut [HostView],
    requests: &[Request],
) -> usize {
    let mut placed = 0;
    for request in requests {
        let index = match place_in_pool(pool, policy, request, hosts) {
            Ok(decision) => decision.index,
            Err(_) => continue,
        };
        if let Some(host) = hosts.get_mut(index) {
            host.apply(request);
            placed += 1;
        }
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_on_five_hundred_hosts() {
        for placement in [Placement::Spread, Placement::Pack] {
            let p = policy(placement);
            let mut hosts = fleet("bench", 500);
            let requests = vec![Request::new(2, 4 * GI); 1000];
            assert_eq!(place_all(&p, "bench", &mut hosts, &requests), 1000);
            assert!(hosts.iter().all(|h| h.capacity.holds(&h.allocated)));
        }
    }
}
