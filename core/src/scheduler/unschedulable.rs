//! Why a desktop cannot be placed: a closed set of reasons, each with a CamelCase `reason()` for
//! the `Scheduled` condition and a message that counts the hosts and what stopped them. When hosts
//! fail for different reasons, the most telling one is named.

use std::fmt;

use crate::quantity::format_bytes_approx;
use crate::types::PortRange;

use super::cpu_model::CpuModel;
use super::filter::Verdict;
use super::request::Request;

/// Why the hosts of a pool did not take a request, host by host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FitReport {
    /// The pool.
    pub pool: String,
    /// The request.
    pub request: Request,
    /// The pool's SPICE port range.
    pub ports: PortRange,
    /// Hosts in the pool.
    pub hosts: u32,
    /// Hosts not ready.
    pub not_ready: u32,
    /// Hosts in maintenance.
    pub maintenance: u32,
    /// Hosts cordoned.
    pub cordoned: u32,
    /// Hosts that cannot run the pool's pinned CPU model.
    pub lack_cpu_model: u32,
    /// Healthy hosts short of shared vCPUs.
    pub lack_cpu: u32,
    /// Healthy hosts short of threads to pin.
    pub lack_dedicated_cpus: u32,
    /// Healthy hosts short of memory.
    pub lack_memory: u32,
    /// Healthy hosts short of hugepages.
    pub lack_hugepages: u32,
    /// Healthy hosts with every SPICE port taken.
    pub no_port: u32,
    /// The pool's pinned CPU model, named when hosts cannot run it.
    pub cpu_model: Option<String>,
}

impl FitReport {
    /// An empty report for `request` in `pool`.
    pub fn new(pool: &str, request: Request, ports: PortRange) -> Self {
        Self {
            pool: pool.to_owned(),
            request,
            ports,
            hosts: 0,
            not_ready: 0,
            maintenance: 0,
            cordoned: 0,
            lack_cpu_model: 0,
            lack_cpu: 0,
            lack_dedicated_cpus: 0,
            lack_memory: 0,
            lack_hugepages: 0,
            no_port: 0,
            cpu_model: None,
        }
    }

    /// The same report for a pool that pins `model`.
    pub fn with_cpu_model(mut self, model: Option<CpuModel>) -> Self {
        self.cpu_model = model.map(|m| m.as_str().to_owned());
        self
    }

    /// Counts one host's verdict.
    pub fn record(&mut self, verdict: &Verdict) {
        self.hosts += 1;
        match verdict {
            Verdict::Fits => {}
            Verdict::NotReady => self.not_ready += 1,
            Verdict::Maintenance => self.maintenance += 1,
            Verdict::Cordoned => self.cordoned += 1,
            Verdict::CpuModel => self.lack_cpu_model += 1,
            Verdict::Short {
                shortfalls,
                no_port,
            } => {
                self.lack_cpu += u32::from(shortfalls.cpu);
                self.lack_dedicated_cpus += u32::from(shortfalls.dedicated_cpus);
                self.lack_memory += u32::from(shortfalls.memory);
                self.lack_hugepages += u32::from(shortfalls.hugepages);
                self.no_port += u32::from(*no_port);
            }
        }
    }

    /// Hosts that are ready, not cordoned, not in maintenance and able to run the pool's CPU
    /// model.
    pub fn healthy(&self) -> u32 {
        self.hosts
            .saturating_sub(self.not_ready)
            .saturating_sub(self.maintenance)
            .saturating_sub(self.cordoned)
            .saturating_sub(self.lack_cpu_model)
    }

    /// The verdict for a request no host took: no healthy host, else the shortage shared by the
    /// most healthy hosts; ties go to the more specific shortage (dedicated CPUs, hugepages, CPU,
    /// memory, ports).
    pub fn into_unschedulable(self) -> Unschedulable {
        if self.healthy() == 0 {
            // Ready, schedulable hosts exist but none runs the model: say so, not "not ready".
            if self.lack_cpu_model > 0 {
                return Unschedulable::CpuModelUnsupported(self);
            }
            return Unschedulable::NoReadyHosts(self);
        }
        // Most specific first, so a tie keeps the earlier entry.
        let counts = [
            self.lack_dedicated_cpus,
            self.lack_hugepages,
            self.lack_cpu,
            self.lack_memory,
            self.no_port,
        ];
        let mut best = 0;
        for (i, n) in counts.iter().enumerate() {
            if *n > counts[best] {
                best = i;
            }
        }
        match best {
            0 => Unschedulable::InsufficientDedicatedCpus(self),
            1 => Unschedulable::InsufficientHugepages(self),
            2 => Unschedulable::InsufficientCpu(self),
            3 => Unschedulable::InsufficientMemory(self),
            _ => Unschedulable::PortsExhausted(self),
        }
    }

    /// "0 of 3 hosts fit: 2 lack CPU (need 4 vCPU), 1 not ready".
    pub fn message(&self) -> String {
        if self.hosts == 0 {
            return format!("pool {} has no hosts", self.pool);
        }
        let r = &self.request;
        let memory = format_bytes_approx(r.memory);
        let verb = |n: u32, one: &str, many: &str| {
            if n == 1 {
                one.to_owned()
            } else {
                many.to_owned()
            }
        };
        let parts = [
            (
                self.lack_dedicated_cpus,
                format!(
                    "{} dedicated CPUs (need {})",
                    verb(self.lack_dedicated_cpus, "lacks", "lack"),
                    r.vcpus
                ),
            ),
            (
                self.lack_cpu,
                format!(
                    "{} CPU (need {} vCPU)",
                    verb(self.lack_cpu, "lacks", "lack"),
                    r.vcpus
                ),
            ),
            (
                self.lack_memory,
                format!(
                    "{} memory (need {memory})",
                    verb(self.lack_memory, "lacks", "lack")
                ),
            ),
            (
                self.lack_hugepages,
                format!(
                    "{} hugepages (need {memory})",
                    verb(self.lack_hugepages, "lacks", "lack")
                ),
            ),
            (
                self.no_port,
                format!(
                    "{} no free SPICE port in {}-{}",
                    verb(self.no_port, "has", "have"),
                    self.ports.first,
                    self.ports.last
                ),
            ),
            (
                self.lack_cpu_model,
                format!(
                    "cannot run CPU model {} (spec.cpu.model of the pool)",
                    self.cpu_model.as_deref().unwrap_or_default()
                ),
            ),
            (self.not_ready, "not ready".to_owned()),
            (self.maintenance, "in maintenance".to_owned()),
            (self.cordoned, "cordoned".to_owned()),
        ];
        let reasons: Vec<String> = parts
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
        let noun = if self.hosts == 1 { "host" } else { "hosts" };
        format!("0 of {} {noun} fit: {}", self.hosts, reasons.join(", "))
    }
}

/// Why a desktop cannot be placed. A closed set: every variant has a CamelCase [`reason`].
///
/// [`reason`]: Unschedulable::reason
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unschedulable {
    /// `spec.pool` names no ResourcePool.
    #[error("pool {pool} does not exist")]
    PoolNotFound {
        /// The pool named.
        pool: String,
    },
    /// The pool's spec cannot be read (bad quantity, ratio or reference size).
    #[error("pool {pool} is invalid: {problem}")]
    InvalidPool {
        /// The pool.
        pool: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The pool's SPICE port range is reversed.
    #[error("pool {pool} has SPICE port range {first}-{last}, whose first port is after its last")]
    InvalidPortRange {
        /// The pool.
        pool: String,
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// No host of the pool is ready, schedulable and out of maintenance.
    #[error("{}", .0.message())]
    NoReadyHosts(FitReport),
    /// The pool's ready, schedulable hosts cannot run its pinned CPU model.
    #[error("{}", .0.message())]
    CpuModelUnsupported(FitReport),
    /// Healthy hosts lack shared vCPUs.
    #[error("{}", .0.message())]
    InsufficientCpu(FitReport),
    /// Healthy hosts lack memory.
    #[error("{}", .0.message())]
    InsufficientMemory(FitReport),
    /// Healthy hosts lack physical threads to pin.
    #[error("{}", .0.message())]
    InsufficientDedicatedCpus(FitReport),
    /// Healthy hosts lack hugepages.
    #[error("{}", .0.message())]
    InsufficientHugepages(FitReport),
    /// Healthy hosts have every SPICE port of the range taken.
    #[error("{}", .0.message())]
    PortsExhausted(FitReport),
}

impl Unschedulable {
    /// The CamelCase reason of the `Scheduled=False` condition and of the Event.
    pub fn reason(&self) -> &'static str {
        match self {
            Unschedulable::PoolNotFound { .. } => "PoolNotFound",
            Unschedulable::InvalidPool { .. } => "InvalidPool",
            Unschedulable::InvalidPortRange { .. } => "InvalidPortRange",
            Unschedulable::NoReadyHosts(_) => "NoReadyHosts",
            Unschedulable::CpuModelUnsupported(_) => "CpuModelUnsupported",
            Unschedulable::InsufficientCpu(_) => "InsufficientCPU",
            Unschedulable::InsufficientMemory(_) => "InsufficientMemory",
            Unschedulable::InsufficientDedicatedCpus(_) => "InsufficientDedicatedCPUs",
            Unschedulable::InsufficientHugepages(_) => "InsufficientHugepages",
            Unschedulable::PortsExhausted(_) => "PortsExhausted",
        }
    }

    /// The per-host report, when hosts were judged.
    pub fn report(&self) -> Option<&FitReport> {
        match self {
            Unschedulable::PoolNotFound { .. }
            | Unschedulable::InvalidPool { .. }
            | Unschedulable::InvalidPortRange { .. } => None,
            Unschedulable::NoReadyHosts(r)
            | Unschedulable::CpuModelUnsupported(r)
            | Unschedulable::InsufficientCpu(r)
            | Unschedulable::InsufficientMemory(r)
            | Unschedulable::InsufficientDedicatedCpus(r)
            | Unschedulable::InsufficientHugepages(r)
            | Unschedulable::PortsExhausted(r) => Some(r),
        }
    }

    /// Whether fixing the pool's spec (not waiting for capacity) is what unblocks the desktop.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Unschedulable::PoolNotFound { .. }
                | Unschedulable::InvalidPool { .. }
                | Unschedulable::InvalidPortRange { .. }
        )
    }
}

impl fmt::Display for FitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::capacity::Shortfalls;

    const GI: u64 = 1 << 30;

    fn report(verdicts: &[Verdict], request: Request) -> FitReport {
        let mut r = FitReport::new(
            "lab",
            request,
            PortRange {
                first: 5900,
                last: 5999,
            },
        );
        for v in verdicts {
            r.record(v);
        }
        r
    }

    fn short(cpu: bool, memory: bool, no_port: bool) -> Verdict {
        Verdict::Short {
            shortfalls: Shortfalls {
                cpu,
                memory,
                ..Shortfalls::default()
            },
            no_port,
        }
    }

    #[test]
    fn hosts_that_cannot_run_the_cpu_model_are_named_with_it() {
        let u = report(
            &[Verdict::CpuModel, Verdict::CpuModel, Verdict::NotReady],
            Request::new(1, GI),
        )
        .with_cpu_model(CpuModel::new("Westmere"))
        .into_unschedulable();
        assert_eq!(u.reason(), "CpuModelUnsupported");
        assert_eq!(
            u.to_string(),
            "0 of 3 hosts fit: 2 cannot run CPU model Westmere (spec.cpu.model of the pool), \
             1 not ready"
        );
        let mixed = report(
            &[Verdict::CpuModel, short(true, false, false)],
            Request::new(1, GI),
        )
        .with_cpu_model(CpuModel::new("Westmere"))
        .into_unschedulable();
        assert_eq!(
            mixed.reason(),
            "InsufficientCPU",
            "a healthy host is short of CPU"
        );
    }

    #[test]
    fn names_counts_in_the_message() {
        let u = report(
            &[
                short(true, false, false),
                short(true, false, false),
                Verdict::NotReady,
            ],
            Request::new(4, 8 * GI),
        )
        .into_unschedulable();
        assert_eq!(u.reason(), "InsufficientCPU");
        assert_eq!(
            u.to_string(),
            "0 of 3 hosts fit: 2 lack CPU (need 4 vCPU), 1 not ready"
        );
    }

    #[test]
    fn singular_and_every_kind() {
        let u = report(
            &[
                short(false, true, true),
                Verdict::Maintenance,
                Verdict::Cordoned,
                Verdict::Short {
                    shortfalls: Shortfalls {
                        dedicated_cpus: true,
                        hugepages: true,
                        ..Shortfalls::default()
                    },
                    no_port: false,
                },
            ],
            Request::new(2, 3 * GI / 2),
        )
        .into_unschedulable();
        assert_eq!(
            u.to_string(),
            "0 of 4 hosts fit: 1 lacks dedicated CPUs (need 2), 1 lacks memory (need 1.5Gi), \
             1 lacks hugepages (need 1.5Gi), 1 has no free SPICE port in 5900-5999, \
             1 in maintenance, 1 cordoned"
        );
        assert_eq!(
            u.reason(),
            "InsufficientDedicatedCPUs",
            "ties go to the more specific shortage"
        );
    }

    #[test]
    fn no_healthy_host_means_no_ready_hosts() {
        let u = report(&[Verdict::NotReady, Verdict::Cordoned], Request::new(1, GI))
            .into_unschedulable();
        assert_eq!(u.reason(), "NoReadyHosts");
        assert_eq!(u.to_string(), "0 of 2 hosts fit: 1 not ready, 1 cordoned");
        let empty = report(&[], Request::new(1, GI)).into_unschedulable();
        assert_eq!(empty.reason(), "NoReadyHosts");
        assert_eq!(empty.to_string(), "pool lab has no hosts");
        let one = report(&[Verdict::NotReady], Request::new(1, GI));
        assert_eq!(one.message(), "0 of 1 host fit: 1 not ready");
    }

    #[test]
    fn the_shortage_of_most_hosts_wins() {
        let u = report(
            &[
                short(true, true, false),
                short(false, true, false),
                short(false, true, true),
            ],
            Request::new(1, GI),
        )
        .into_unschedulable();
        assert_eq!(u.reason(), "InsufficientMemory");
        let u = report(
            &[short(false, false, true), Verdict::NotReady],
            Request::new(1, GI),
        )
        .into_unschedulable();
        assert_eq!(u.reason(), "PortsExhausted");
    }

    #[test]
    fn configuration_reasons() {
        let u = Unschedulable::InvalidPortRange {
            pool: "lab".into(),
            first: 6000,
            last: 5900,
        };
        assert_eq!(u.reason(), "InvalidPortRange");
        assert!(u.is_configuration());
        assert_eq!(
            u.to_string(),
            "pool lab has SPICE port range 6000-5900, whose first port is after its last"
        );
        assert_eq!(
            Unschedulable::PoolNotFound { pool: "x".into() }.to_string(),
            "pool x does not exist"
        );
        assert!(u.report().is_none());
    }
}
