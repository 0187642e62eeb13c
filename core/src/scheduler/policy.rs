//! What a pool's spec says about capacity and placement, read once into numbers: reserve,
//! overcommit ratios, the reference desktop size, the placement strategy, the SPICE port range
//! and the pinned CPU model.

use super::cpu_model::CpuModel;
use crate::quantity::{QuantityError, parse_bytes};
use crate::types::{Placement, PortRange};

/// Why a pool's spec cannot be used for placement.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// `reserved.memory` is not a quantity.
    #[error("reserved.memory: {0}")]
    ReservedMemory(QuantityError),
    /// `referenceSize.memory` is not a quantity.
    #[error("referenceSize.memory: {0}")]
    ReferenceMemory(QuantityError),
    /// An overcommit ratio is not a positive finite number.
    #[error("overcommit.{resource} must be a positive number, not {value}")]
    Overcommit {
        /// `cpu` or `memory`.
        resource: &'static str,
        /// The ratio as given.
        value: f64,
    },
    /// The reference desktop has neither CPU nor memory, so capacity cannot be counted in desktops.
    #[error("referenceSize must ask for some CPU or memory")]
    EmptyReferenceSize,
    /// The pinned CPU model is empty or too long.
    #[error("cpu.model {0:?} is not a CPU model name (1 to 64 characters)")]
    CpuModel(String),
}

impl PolicyError {
    /// Short category for metrics, Events and the pool's Ready condition.
    pub fn category(&self) -> &'static str {
        match self {
            PolicyError::ReservedMemory(_) | PolicyError::ReferenceMemory(_) => "InvalidQuantity",
            PolicyError::Overcommit { .. } => "InvalidOvercommit",
            PolicyError::EmptyReferenceSize => "InvalidReferenceSize",
            PolicyError::CpuModel(_) => "InvalidCpuModel",
        }
    }
}

/// A non-negative ratio held as millionths, so scaling is exact integer arithmetic and gives the
/// same answer on every machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ratio(u64);

impl Ratio {
    /// One: no overcommit.
    pub const ONE: Ratio = Ratio(1_000_000);
    const DENOMINATOR: u128 = 1_000_000;
    /// Largest ratio accepted; far above what the CRD schema allows.
    const MAX: f64 = 1_000_000.0;

    /// The ratio nearest to `value` in millionths; `None` unless `value` is finite and above 0.
    pub fn from_f64(value: f64) -> Option<Self> {
        if !value.is_finite() || value <= 0.0 || value > Self::MAX {
            return None;
        }
        // In range by the check above, so the cast neither saturates nor truncates sign.
        let millionths = (value * 1_000_000.0).round() as u64;
        (millionths > 0).then_some(Self(millionths))
    }

    /// A ratio of `millionths` / 1 000 000.
    pub const fn from_millionths(millionths: u64) -> Self {
        Self(millionths)
    }

    /// `floor(amount × ratio)`, saturating at `u64::MAX`.
    pub fn scale(self, amount: u64) -> u64 {
        let scaled = u128::from(amount) * u128::from(self.0) / Self::DENOMINATOR;
        u64::try_from(scaled).unwrap_or(u64::MAX)
    }
}

/// The size of the pool's reference desktop, used to count capacity in desktops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReferenceDesktop {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in bytes.
    pub memory: u64,
}

/// A pool's capacity and placement policy, as numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolPolicy {
    /// Physical CPU threads kept back on each host.
    pub reserved_cpus: u32,
    /// Bytes of memory kept back on each host.
    pub reserved_memory: u64,
    /// vCPUs per physical thread.
    pub cpu_ratio: Ratio,
    /// Guest memory per byte of host memory.
    pub memory_ratio: Ratio,
    /// The reference desktop of the Capacity value.
    pub reference: ReferenceDesktop,
    /// Spread or Pack.
    pub placement: Placement,
    /// SPICE ports each host hands out.
    pub ports: PortRange,
    /// The CPU model pinned for the pool's desktops; only hosts that run it take them.
    pub cpu_model: Option<CpuModel>,
}

impl PoolPolicy {
    /// Reads a pool's policy from its spec's values (quantities as the API writes them).
    pub fn read(spec: &PolicySpec<'_>) -> Result<Self, PolicyError> {
        let ratio = |resource, value| {
            Ratio::from_f64(value).ok_or(PolicyError::Overcommit { resource, value })
        };
        let reference = ReferenceDesktop {
            vcpus: spec.reference_cpu,
            memory: parse_bytes(spec.reference_memory).map_err(PolicyError::ReferenceMemory)?,
        };
        if reference.vcpus == 0 && reference.memory == 0 {
            return Err(PolicyError::EmptyReferenceSize);
        }
        Ok(Self {
            reserved_cpus: spec.reserved_cpu,
            reserved_memory: parse_bytes(spec.reserved_memory)
                .map_err(PolicyError::ReservedMemory)?,
            cpu_ratio: ratio("cpu", spec.cpu_ratio)?,
            memory_ratio: ratio("memory", spec.memory_ratio)?,
            reference,
            placement: spec.placement,
            ports: spec.ports,
            cpu_model: spec
                .cpu_model
                .map(|m| CpuModel::new(m).ok_or_else(|| PolicyError::CpuModel(m.to_owned())))
                .transpose()?,
        })
    }
}

/// A pool spec's values a [`PoolPolicy`] is read from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicySpec<'a> {
    /// `spec.reserved.cpu`.
    pub reserved_cpu: u32,
    /// `spec.reserved.memory`.
    pub reserved_memory: &'a str,
    /// `spec.overcommit.cpu`.
    pub cpu_ratio: f64,
    /// `spec.overcommit.memory`.
    pub memory_ratio: f64,
    /// `spec.referenceSize.cpu`.
    pub reference_cpu: u32,
    /// `spec.referenceSize.memory`.
    pub reference_memory: &'a str,
    /// `spec.placement`.
    pub placement: Placement,
    /// `spec.display.spicePorts`.
    pub ports: PortRange,
    /// `spec.cpu.model`.
    pub cpu_model: Option<&'a str>,
}

impl PolicySpec<'_> {
    /// The API's defaults: one thread and 1 GiB reserved, 4× CPU overcommit, a 2 vCPU / 4 GiB
    /// reference desktop, Spread, ports 5900-6899.
    pub const DEFAULT: PolicySpec<'static> = PolicySpec {
        reserved_cpu: 1,
        reserved_memory: "1Gi",
        cpu_ratio: 4.0,
        memory_ratio: 1.0,
        reference_cpu: 2,
        reference_memory: "4Gi",
        placement: Placement::Spread,
        ports: PortRange {
            first: 5900,
            last: 6899,
        },
        cpu_model: None,
    };
}

#[cfg(test)]
impl PoolPolicy {
    /// Test fixture: no reserve, no overcommit, a 2 vCPU / 4 GiB reference desktop and ten
    /// SPICE ports (5900-5909).
    pub(crate) fn test(placement: Placement) -> Self {
        const GI: u64 = 1 << 30;
        PoolPolicy {
            reserved_cpus: 0,
            reserved_memory: 0,
            cpu_ratio: Ratio::ONE,
            memory_ratio: Ratio::ONE,
            reference: ReferenceDesktop {
                vcpus: 2,
                memory: 4 * GI,
            },
            placement,
            ports: PortRange {
                first: 5900,
                last: 5909,
            },
            cpu_model: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PolicySpec<'static> {
        PolicySpec::DEFAULT
    }

    #[test]
    fn reads_the_defaults() -> Result<(), PolicyError> {
        let p = PoolPolicy::read(&spec())?;
        assert_eq!(p.reserved_cpus, 1);
        assert_eq!(p.reserved_memory, 1 << 30);
        assert_eq!(p.cpu_ratio, Ratio::from_millionths(4_000_000));
        assert_eq!(p.memory_ratio, Ratio::ONE);
        assert_eq!(
            p.reference,
            ReferenceDesktop {
                vcpus: 2,
                memory: 4 << 30
            }
        );
        assert_eq!(p.placement, Placement::Spread);
        assert_eq!(
            p.ports,
            PortRange {
                first: 5900,
                last: 6899
            }
        );
        Ok(())
    }

    #[test]
    fn refuses_bad_numbers() {
        let mut s = spec();
        s.cpu_ratio = f64::NAN;
        assert!(matches!(
            PoolPolicy::read(&s),
            Err(PolicyError::Overcommit {
                resource: "cpu",
                ..
            })
        ));
        s = spec();
        s.memory_ratio = 0.0;
        assert!(matches!(
            PoolPolicy::read(&s),
            Err(PolicyError::Overcommit {
                resource: "memory",
                ..
            })
        ));
        s = spec();
        s.reserved_memory = "lots";
        assert_eq!(
            PoolPolicy::read(&s).map_err(|e| e.category()),
            Err("InvalidQuantity")
        );
        s = spec();
        s.reference_cpu = 0;
        s.reference_memory = "0";
        assert_eq!(PoolPolicy::read(&s), Err(PolicyError::EmptyReferenceSize));
    }

    #[test]
    fn ratios_scale_exactly() {
        let r = |v| Ratio::from_f64(v).unwrap_or(Ratio::ONE);
        assert_eq!(r(1.5).scale(3), 4, "floor(4.5)");
        assert_eq!(r(1.1).scale(10), 11, "no 10.999999 surprises");
        assert_eq!(r(0.7).scale(10), 7);
        assert_eq!(r(4.0).scale(u64::MAX), u64::MAX, "saturates");
        assert_eq!(Ratio::from_f64(-1.0), None);
        assert_eq!(Ratio::from_f64(f64::INFINITY), None);
        assert_eq!(Ratio::from_f64(1e-9), None, "rounds to zero millionths");
    }
}
