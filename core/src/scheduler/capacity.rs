//! How much of a host desktops may use, and how much is left: allocatable vCPUs and memory after
//! reserve and overcommit, physical threads for dedicated pinning, hugepages, and the papers'
//! Capacity value (how many reference desktops still fit).

use crate::quantity::{QuantityError, format_bytes, parse_bytes};
use crate::types::Allocatable;

use super::policy::{PoolPolicy, Ratio, ReferenceDesktop};
use super::request::Request;

/// Why a host's reported facts cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FactsError {
    /// The agent has not reported `status.cpu` yet.
    #[error("the host has not reported its CPUs yet")]
    MissingCpu,
    /// The agent has not reported `status.memory` yet.
    #[error("the host has not reported its memory yet")]
    MissingMemory,
    /// `status.memory` is not a quantity.
    #[error("status.memory: {0}")]
    Memory(QuantityError),
    /// `status.hugepages.size` is not a quantity.
    #[error("status.hugepages.size: {0}")]
    HugepageSize(QuantityError),
}

/// What a host physically has, as reported by its agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Logical CPU threads.
    pub threads: u32,
    /// Physical memory in bytes.
    pub memory: u64,
    /// Bytes in the host's hugepage pool (pages × page size).
    pub hugepages: u64,
}

impl HostFacts {
    /// Reads the facts a host reports: its CPU threads, its memory quantity and its hugepage
    /// pool (page size quantity and page count).
    pub fn read(
        threads: Option<u32>,
        memory: Option<&str>,
        hugepages: Option<(&str, u64)>,
    ) -> Result<Self, FactsError> {
        let threads = threads.ok_or(FactsError::MissingCpu)?;
        let memory = memory.ok_or(FactsError::MissingMemory)?;
        let hugepages = match hugepages {
            Some((size, total)) => parse_bytes(size)
                .map_err(FactsError::HugepageSize)?
                .saturating_mul(total),
            None => 0,
        };
        Ok(Self {
            threads,
            memory: parse_bytes(memory).map_err(FactsError::Memory)?,
            hugepages,
        })
    }
}

/// What desktops may use on one host, after the pool's reserve and overcommit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCapacity {
    /// Physical threads after the reserve: the ceiling for dedicated pinning, and what shared
    /// vCPUs are overcommitted from.
    pub physical_cpus: u32,
    /// vCPUs per physical thread for shared (unpinned) vCPUs.
    pub cpu_ratio: Ratio,
    /// Guest memory bytes after reserve and overcommit.
    pub memory: u64,
    /// Bytes of hugepages; not overcommitted.
    pub hugepages: u64,
}

impl HostCapacity {
    /// A host that can hold nothing.
    pub const NONE: HostCapacity = HostCapacity {
        physical_cpus: 0,
        cpu_ratio: Ratio::ONE,
        memory: 0,
        hugepages: 0,
    };

    /// Applies the pool's reserve and overcommit to a host's facts:
    /// vCPUs = floor((threads − reserved) × cpu ratio), memory = (memory − reserved) × memory
    /// ratio, both saturating at zero.
    pub fn new(facts: &HostFacts, policy: &PoolPolicy) -> Self {
        Self {
            physical_cpus: crate::pinning::pinnable(facts.threads, policy.reserved_cpus),
            cpu_ratio: policy.cpu_ratio,
            memory: policy
                .memory_ratio
                .scale(facts.memory.saturating_sub(policy.reserved_memory)),
            hugepages: facts.hugepages,
        }
    }

    /// vCPUs when nothing is pinned: floor(physical × ratio).
    pub fn vcpus(&self) -> u64 {
        self.cpu_ratio.scale(u64::from(self.physical_cpus))
    }

    /// vCPUs for shared desktops when `pinned` threads are dedicated: a pinned thread takes
    /// `ratio` shared vCPUs with it.
    pub fn shared_vcpus(&self, pinned: u64) -> u64 {
        self.cpu_ratio
            .scale(u64::from(self.physical_cpus).saturating_sub(pinned))
    }

    /// Whether `used` is within this capacity in every dimension.
    pub fn holds(&self, used: &Usage) -> bool {
        used.pinned_cpus <= u64::from(self.physical_cpus)
            && used.shared_vcpus <= self.shared_vcpus(used.pinned_cpus)
            && used.memory <= self.memory
            && used.hugepages <= self.hugepages
    }

    /// Which dimensions `request` would overflow on top of `used`. Only the dimensions the
    /// request adds to are checked, so a request never fails for a shortage it does not touch.
    pub fn shortfalls(&self, used: &Usage, request: &Request) -> Shortfalls {
        let after = used.plus(request);
        let cpus_fit = after.pinned_cpus <= u64::from(self.physical_cpus)
            && after.shared_vcpus <= self.shared_vcpus(after.pinned_cpus);
        Shortfalls {
            cpu: !request.dedicated_cpus && !cpus_fit,
            dedicated_cpus: request.dedicated_cpus && !cpus_fit,
            memory: after.memory > self.memory,
            hugepages: request.hugepages && after.hugepages > self.hugepages,
        }
    }

    /// What is left on top of `used`.
    pub fn free(&self, used: &Usage) -> Free {
        Free {
            vcpus: self
                .shared_vcpus(used.pinned_cpus)
                .saturating_sub(used.shared_vcpus),
            pinnable_cpus: u64::from(self.physical_cpus).saturating_sub(used.pinned_cpus),
            memory: self.memory.saturating_sub(used.memory),
            hugepages: self.hugepages.saturating_sub(used.hugepages),
        }
    }

    /// The DomainNode's `status.allocatable`: total vCPUs and memory after reserve and overcommit,
    /// and the threads still free for pinning.
    pub fn allocatable(&self, used: &Usage) -> Allocatable {
        Allocatable {
            cpu: saturate_u32(self.vcpus()),
            memory: format_bytes(self.memory),
            dedicated_cpus: saturate_u32(self.free(used).pinnable_cpus),
        }
    }
}

/// Dimensions a request does not fit in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shortfalls {
    /// Not enough shared vCPUs.
    pub cpu: bool,
    /// Not enough physical threads to pin, or pinning them would squeeze the shared desktops.
    pub dedicated_cpus: bool,
    /// Not enough memory.
    pub memory: bool,
    /// Not enough hugepages.
    pub hugepages: bool,
}

impl Shortfalls {
    /// Whether the request fits.
    pub fn none(&self) -> bool {
        !(self.cpu || self.dedicated_cpus || self.memory || self.hugepages)
    }
}

/// What the desktops bound to a host hold there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Overcommitted vCPUs of desktops without dedicated CPUs.
    pub shared_vcpus: u64,
    /// Physical threads pinned by desktops with dedicated CPUs.
    pub pinned_cpus: u64,
    /// Guest memory bytes.
    pub memory: u64,
    /// Hugepage bytes (also counted in `memory`).
    pub hugepages: u64,
    /// Desktops.
    pub desktops: u32,
}

impl Usage {
    /// The sum of `requests`.
    pub fn of<'a>(requests: impl IntoIterator<Item = &'a Request>) -> Self {
        requests
            .into_iter()
            .fold(Self::default(), |sum, r| sum.plus(r))
    }

    /// This usage with `request` added.
    pub fn plus(&self, request: &Request) -> Self {
        let vcpus = u64::from(request.vcpus);
        let (shared, pinned) = if request.dedicated_cpus {
            (0, vcpus)
        } else {
            (vcpus, 0)
        };
        Self {
            shared_vcpus: self.shared_vcpus.saturating_add(shared),
            pinned_cpus: self.pinned_cpus.saturating_add(pinned),
            memory: self.memory.saturating_add(request.memory),
            hugepages: self.hugepages.saturating_add(if request.hugepages {
                request.memory
            } else {
                0
            }),
            desktops: self.desktops.saturating_add(1),
        }
    }

    /// All vCPUs held, shared and dedicated.
    pub fn vcpus(&self) -> u64 {
        self.shared_vcpus.saturating_add(self.pinned_cpus)
    }
}

/// What is left on a host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Free {
    /// Shared vCPUs.
    pub vcpus: u64,
    /// Physical threads that could still be pinned.
    pub pinnable_cpus: u64,
    /// Memory bytes.
    pub memory: u64,
    /// Hugepage bytes.
    pub hugepages: u64,
}

impl Free {
    /// The Capacity value: how many reference desktops fit, the minimum over CPU, memory and
    /// `ports` free SPICE ports. A reference dimension of zero does not limit.
    pub fn slots(&self, reference: &ReferenceDesktop, ports: u32) -> u32 {
        let per = |free: u64, each: u64| free.checked_div(each).unwrap_or(u64::MAX);
        let fit =
            per(self.vcpus, u64::from(reference.vcpus)).min(per(self.memory, reference.memory));
        saturate_u32(fit).min(ports)
    }
}

pub(crate) fn saturate_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use crate::types::{Placement, PortRange};

    use super::*;

    const GI: u64 = 1 << 30;

    fn policy(reserved_cpus: u32, reserved_memory: u64, cpu: u64, memory: u64) -> PoolPolicy {
        PoolPolicy {
            reserved_cpus,
            reserved_memory,
            cpu_ratio: Ratio::from_millionths(cpu * 1_000_000),
            memory_ratio: Ratio::from_millionths(memory * 1_000_000),
            reference: ReferenceDesktop {
                vcpus: 2,
                memory: 4 * GI,
            },
            placement: Placement::Spread,
            ports: PortRange {
                first: 5900,
                last: 6899,
            },
            cpu_model: None,
        }
    }

    fn facts(threads: u32, memory: u64) -> HostFacts {
        HostFacts {
            threads,
            memory,
            hugepages: 0,
        }
    }

    #[test]
    fn reads_what_a_host_reports() -> Result<(), FactsError> {
        assert_eq!(
            HostFacts::read(Some(16), Some("64Gi"), Some(("2Mi", 1024)))?,
            HostFacts {
                threads: 16,
                memory: 64 * GI,
                hugepages: 2 * GI
            }
        );
        assert_eq!(
            HostFacts::read(None, Some("64Gi"), None),
            Err(FactsError::MissingCpu)
        );
        assert_eq!(
            HostFacts::read(Some(16), None, None),
            Err(FactsError::MissingMemory)
        );
        assert!(matches!(
            HostFacts::read(Some(16), Some("64GB"), None),
            Err(FactsError::Memory(_))
        ));
        Ok(())
    }

    #[test]
    fn applies_reserve_then_overcommit() {
        let c = HostCapacity::new(&facts(16, 64 * GI), &policy(2, 4 * GI, 4, 1));
        assert_eq!(c.physical_cpus, 14);
        assert_eq!(c.vcpus(), 56);
        assert_eq!(c.memory, 60 * GI);
        let c = HostCapacity::new(&facts(16, 64 * GI), &policy(0, 0, 1, 2));
        assert_eq!(c.memory, 128 * GI);
    }

    #[test]
    fn fractional_ratios_floor() {
        let mut p = policy(1, 0, 1, 1);
        p.cpu_ratio = Ratio::from_millionths(1_500_000);
        let c = HostCapacity::new(&facts(4, GI), &p);
        assert_eq!(c.vcpus(), 4, "floor(3 × 1.5)");
    }

    #[test]
    fn a_reserve_larger_than_the_host_leaves_zero_not_a_wrap() {
        let c = HostCapacity::new(&facts(2, GI), &policy(4, 2 * GI, 4, 1));
        assert_eq!(
            c,
            HostCapacity {
                physical_cpus: 0,
                cpu_ratio: c.cpu_ratio,
                memory: 0,
                hugepages: 0
            }
        );
        assert_eq!(
            c.free(&Usage::default()).slots(
                &ReferenceDesktop {
                    vcpus: 2,
                    memory: GI
                },
                10
            ),
            0
        );
    }

    #[test]
    fn pinned_threads_take_their_overcommit_with_them() {
        let c = HostCapacity::new(&facts(9, 64 * GI), &policy(1, 0, 4, 1)); // 8 threads, 32 vCPUs
        let used = Usage::of(&[Request::new(2, GI).dedicated()]);
        assert_eq!(
            c.free(&used),
            Free {
                vcpus: 24,
                pinnable_cpus: 6,
                memory: 63 * GI,
                hugepages: 0
            }
        );
        assert_eq!(
            c.allocatable(&used),
            Allocatable {
                cpu: 32,
                memory: "64Gi".into(),
                dedicated_cpus: 6
            }
        );
    }

    #[test]
    fn shortfalls_name_the_dimension() {
        // 4 threads, 8 vCPUs, 8Gi
        let c = HostCapacity::new(&facts(5, 9 * GI), &policy(1, GI, 2, 1));
        let used = Usage::of(&[Request::new(6, 4 * GI)]);
        assert!(c.shortfalls(&used, &Request::new(2, 4 * GI)).none());
        assert_eq!(
            c.shortfalls(&used, &Request::new(3, GI)),
            Shortfalls {
                cpu: true,
                ..Shortfalls::default()
            }
        );
        assert_eq!(
            c.shortfalls(&used, &Request::new(1, 5 * GI)),
            Shortfalls {
                memory: true,
                ..Shortfalls::default()
            }
        );
        // Pinning 2 of 4 threads leaves 4 shared vCPUs, fewer than the 6 in use.
        assert_eq!(
            c.shortfalls(&used, &Request::new(2, GI).dedicated()),
            Shortfalls {
                dedicated_cpus: true,
                ..Shortfalls::default()
            }
        );
        assert!(c.shortfalls(&used, &Request::new(1, GI).dedicated()).none());
        assert_eq!(
            c.shortfalls(&Usage::default(), &Request::new(5, GI).dedicated()),
            Shortfalls {
                dedicated_cpus: true,
                ..Shortfalls::default()
            }
        );
    }

    #[test]
    fn hugepages_are_a_separate_pool() {
        let c = HostCapacity {
            hugepages: 4 * GI,
            ..HostCapacity::new(&facts(8, 64 * GI), &policy(0, 0, 1, 1))
        };
        assert!(
            c.shortfalls(&Usage::default(), &Request::new(1, 4 * GI).with_hugepages())
                .none()
        );
        assert_eq!(
            c.shortfalls(&Usage::default(), &Request::new(1, 5 * GI).with_hugepages()),
            Shortfalls {
                hugepages: true,
                ..Shortfalls::default()
            }
        );
        assert!(
            c.shortfalls(&Usage::default(), &Request::new(1, 5 * GI))
                .none(),
            "plain memory is not limited"
        );
    }

    #[test]
    fn capacity_value_is_the_tightest_dimension() {
        let reference = ReferenceDesktop {
            vcpus: 2,
            memory: 4 * GI,
        };
        let free = Free {
            vcpus: 20,
            pinnable_cpus: 0,
            memory: 16 * GI,
            hugepages: 0,
        };
        assert_eq!(free.slots(&reference, 100), 4, "memory-bound");
        assert_eq!(free.slots(&reference, 3), 3, "port-bound");
        assert_eq!(
            free.slots(
                &ReferenceDesktop {
                    vcpus: 8,
                    memory: GI
                },
                100
            ),
            2,
            "cpu-bound"
        );
        assert_eq!(
            free.slots(
                &ReferenceDesktop {
                    vcpus: 0,
                    memory: GI
                },
                100
            ),
            16,
            "cpu does not limit"
        );
    }

    #[test]
    fn holds_matches_shortfalls() {
        let c = HostCapacity::new(&facts(4, 8 * GI), &policy(0, 0, 1, 1));
        let full = Usage::of(&[Request::new(4, 8 * GI)]);
        assert!(c.holds(&full));
        assert!(!c.holds(&full.plus(&Request::new(1, 0))));
    }
}
