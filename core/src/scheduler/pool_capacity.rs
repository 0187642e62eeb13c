//! What a pool's status reports: per host and summed over the pool, the capacity, allocated and
//! available CPU, memory and desktop slots (the papers' Capacity value), host counts and SPICE
//! port usage. Capacity and availability count only hosts that can take desktops.

use crate::quantity::format_bytes;
use crate::types::{Amounts, NodeCounts, PortUsage};

use super::capacity::{Usage, saturate_u32};
use super::host::HostView;
use super::policy::PoolPolicy;

/// An amount of CPU, memory and desktops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory bytes.
    pub memory: u64,
    /// Desktops (slots of the reference size, or desktops placed for `allocated`).
    pub desktops: u64,
}

impl Totals {
    /// The API's `Amounts`, saturating counts at `u32::MAX`.
    pub fn to_amounts(&self) -> Amounts {
        Amounts {
            cpu: saturate_u32(self.vcpus),
            memory: format_bytes(self.memory),
            desktops: saturate_u32(self.desktops),
        }
    }

    fn add(&mut self, other: &Totals) {
        self.vcpus = self.vcpus.saturating_add(other.vcpus);
        self.memory = self.memory.saturating_add(other.memory);
        self.desktops = self.desktops.saturating_add(other.desktops);
    }
}

/// One host's share of the pool status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostTotals {
    /// What the host offers after reserve and overcommit, and how many reference desktops fit
    /// on it empty.
    pub capacity: Totals,
    /// What its desktops hold: all their vCPUs, memory, and how many there are.
    pub allocated: Totals,
    /// Shared vCPUs and memory still free, and how many more reference desktops fit (bounded by
    /// free SPICE ports too). Pinned threads take their overcommitted vCPUs with them, so this
    /// can be less than capacity − allocated.
    pub available: Totals,
}

impl HostTotals {
    /// The totals of `host` under `policy`.
    pub fn of(host: &HostView, policy: &PoolPolicy) -> Self {
        let ports = policy.ports.len();
        let cap = &host.capacity;
        let empty = cap.free(&Usage::default());
        let free = host.free();
        Self {
            capacity: Totals {
                vcpus: cap.vcpus(),
                memory: cap.memory,
                desktops: u64::from(empty.slots(&policy.reference, ports)),
            },
            allocated: Totals {
                vcpus: host.allocated.vcpus(),
                memory: host.allocated.memory,
                desktops: u64::from(host.allocated.desktops),
            },
            available: Totals {
                vcpus: free.vcpus,
                memory: free.memory,
                desktops: u64::from(
                    free.slots(&policy.reference, ports.saturating_sub(host.ports_in_use)),
                ),
            },
        }
    }
}

/// The pool's accounting, ready for its status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCapacity {
    /// Hosts in the pool, and how many can take desktops.
    pub nodes: NodeCounts,
    /// Summed over hosts that can take desktops.
    pub capacity: Totals,
    /// Summed over every host of the pool, lost ones included.
    pub allocated: Totals,
    /// Summed over hosts that can take desktops.
    pub available: Totals,
    /// Ports in the range × hosts that can take desktops, and ports held on every host.
    pub ports: PortUsage,
}

impl PoolCapacity {
    /// Sums the hosts of `pool` among `hosts`.
    pub fn of(pool: &str, policy: &PoolPolicy, hosts: &[HostView]) -> Self {
        let mut sum = Self::default();
        for host in hosts.iter().filter(|h| h.in_pool(pool)) {
            let t = HostTotals::of(host, policy);
            sum.nodes.total = sum.nodes.total.saturating_add(1);
            sum.allocated.add(&t.allocated);
            let held = host.ports_in_use.saturating_sub(host.ports_taken);
            sum.ports.used = sum.ports.used.saturating_add(held);
            sum.ports.taken = sum.ports.taken.saturating_add(host.ports_taken);
            if host.eligible() {
                sum.nodes.ready = sum.nodes.ready.saturating_add(1);
                sum.capacity.add(&t.capacity);
                sum.available.add(&t.available);
                sum.ports.total = sum.ports.total.saturating_add(policy.ports.len());
            }
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use crate::types::Placement;

    use super::*;
    use crate::scheduler::capacity::HostCapacity;
    use crate::scheduler::policy::Ratio;
    use crate::scheduler::request::Request;

    const GI: u64 = 1 << 30;

    fn policy() -> PoolPolicy {
        PoolPolicy::test(Placement::Spread)
    }

    fn host(name: &str) -> HostView {
        HostView::new(
            name,
            "lab",
            HostCapacity {
                physical_cpus: 16,
                cpu_ratio: Ratio::ONE,
                memory: 32 * GI,
                hugepages: 0,
            },
        )
    }

    #[test]
    fn per_host_capacity_value() {
        let h = host("a")
            .with_allocated(Usage::of(&[
                Request::new(4, 8 * GI),
                Request::new(2, 4 * GI),
            ]))
            .with_ports_in_use(2);
        let t = HostTotals::of(&h, &policy());
        assert_eq!(
            t.capacity,
            Totals {
                vcpus: 16,
                memory: 32 * GI,
                desktops: 8
            }
        );
        assert_eq!(
            t.allocated,
            Totals {
                vcpus: 6,
                memory: 12 * GI,
                desktops: 2
            }
        );
        assert_eq!(
            t.available,
            Totals {
                vcpus: 10,
                memory: 20 * GI,
                desktops: 5
            }
        );
        let ports_bound = HostTotals::of(&h.with_ports_in_use(8), &policy());
        assert_eq!(ports_bound.available.desktops, 2, "two free ports left");
    }

    #[test]
    fn sums_eligible_hosts_and_counts_all_allocations() {
        let busy = Usage::of(&[Request::new(2, 4 * GI)]);
        let mut foreign = host("z");
        foreign.pool = None;
        let hosts = [
            host("a").with_allocated(busy).with_ports_in_use(1),
            host("b"),
            host("c")
                .with_allocated(busy)
                .with_ports_in_use(1)
                .not_ready(),
            foreign,
        ];
        let p = PoolCapacity::of("lab", &policy(), &hosts);
        assert_eq!(p.nodes, NodeCounts { total: 3, ready: 2 });
        assert_eq!(
            p.capacity,
            Totals {
                vcpus: 32,
                memory: 64 * GI,
                desktops: 16
            }
        );
        assert_eq!(
            p.allocated,
            Totals {
                vcpus: 4,
                memory: 8 * GI,
                desktops: 2
            }
        );
        assert_eq!(
            p.available,
            Totals {
                vcpus: 30,
                memory: 60 * GI,
                desktops: 15
            }
        );
        assert_eq!(
            p.ports,
            PortUsage {
                total: 20,
                used: 2,
                taken: 0
            }
        );

        assert_eq!(
            p.capacity.to_amounts(),
            Amounts {
                cpu: 32,
                memory: "64Gi".into(),
                desktops: 16
            }
        );
        assert_eq!(p.available.to_amounts().memory, "60Gi");
    }
}
