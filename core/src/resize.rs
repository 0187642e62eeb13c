//! Decides what a bound desktop's size change does, and what its host is charged for it. The
//! host pays the larger of the size the domain runs with and the size admitted for its next
//! start. A new size is admitted only when that larger charge fits beside the host's other
//! desktops; otherwise it is refused, naming what is missing, and the old size keeps running
//! and counting.

use crate::quantity::format_bytes_approx;
use crate::reasons::{PoolReason, SizeReason};
use crate::scheduler::{HostCapacity, Request, Usage};

/// The larger of `a` and `b` in vCPUs and memory; pinning and hugepages as `b` asks.
pub fn larger(a: Request, b: Request) -> Request {
    Request {
        vcpus: a.vcpus.max(b.vcpus),
        memory: a.memory.max(b.memory),
        ..b
    }
}

/// What a bound desktop holds on its host: its admitted size, or while its domain runs with
/// another size (until it restarts), the larger of the two.
pub fn charge(admitted: Request, running: Option<Request>) -> Request {
    running.map_or(admitted, |r| larger(r, admitted))
}

/// Whether `a` and `b` are the same size (vCPUs and memory).
fn same_size(a: &Request, b: &Request) -> bool {
    a.vcpus == b.vcpus && a.memory == b.memory
}

/// What became of the size a desktop asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SizeVerdict {
    /// The admitted size is what runs, or what a stopped domain starts with.
    Applied,
    /// Admitted; the running domain keeps `running` until it restarts.
    RestartRequired {
        /// The size the domain runs with.
        running: Request,
    },
    /// Refused: the host cannot hold it. The message names what is missing.
    Refused {
        /// "host h1 has 2 vCPU and 3.0 GiB free, ..." for a human.
        message: String,
    },
}

impl SizeVerdict {
    /// `SizeApplied`: whether it holds, its reason and a message, for a desktop `admitted` at
    /// that size.
    pub fn condition(&self, admitted: &Request) -> (bool, SizeReason, String) {
        let size = |r: &Request| format!("{} vCPU and {}", r.vcpus, format_bytes_approx(r.memory));
        match self {
            SizeVerdict::Applied => (
                true,
                SizeReason::Applied,
                format!("{}, as spec asks", size(admitted)),
            ),
            SizeVerdict::RestartRequired { running } => (
                false,
                SizeReason::RestartRequired,
                format!(
                    "{} admitted; the running domain keeps {} until it restarts, and its host \
                     is charged the larger of both until then",
                    size(admitted),
                    size(running)
                ),
            ),
            SizeVerdict::Refused { message } => {
                (false, SizeReason::InsufficientCapacity, message.clone())
            }
        }
    }
}

/// `PoolApplied` of a desktop bound in pool `bound` whose spec names `asked`: whether it
/// holds, its reason and a message. A spec edit never moves a bound desktop to another pool;
/// a DesktopMigration with `spec.targetPool` does, and then the spec should follow.
pub fn pool_condition(bound: &str, asked: &str) -> (bool, PoolReason, String) {
    if bound == asked {
        return (true, PoolReason::Bound, format!("bound in pool {bound}"));
    }
    (
        false,
        PoolReason::PoolChangeRefused,
        format!(
            "spec.pool names {asked}, but the desktop is bound in pool {bound} and stays there: \
             editing spec.pool never moves a bound desktop. Set spec.pool to {bound} (in the \
             manifest, where GitOps owns the desktop), or move it to {asked} with a \
             DesktopMigration whose spec.targetPool is {asked}"
        ),
    )
}

/// The admitted size after a decision, and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeDecision {
    /// The size the host defines the domain with and is charged for.
    pub admitted: Request,
    /// What became of the size asked for.
    pub verdict: SizeVerdict,
}

/// Decides on `wanted` for a desktop admitted at `admitted` whose domain runs at `running`
/// (`None` when it is off) on host `host` with `capacity`, where `others` is what every other
/// desktop there holds.
pub fn decide(
    host: &str,
    capacity: &HostCapacity,
    others: &Usage,
    admitted: Request,
    wanted: Request,
    running: Option<Request>,
) -> SizeDecision {
    let admitted = if admitted == wanted {
        admitted
    } else {
        let needs = charge(wanted, running);
        let short = capacity.shortfalls(others, &needs);
        if !short.none() {
            let free = capacity.free(others);
            let mut message = format!(
                "host {host} has {} vCPU and {} free beside its other desktops; {} vCPU and {} \
                 do not fit",
                if needs.dedicated_cpus {
                    free.pinnable_cpus
                } else {
                    free.vcpus
                },
                format_bytes_approx(free.memory),
                needs.vcpus,
                format_bytes_approx(needs.memory),
            );
            if let Some(r) = running.filter(|_| !same_size(&wanted, &needs)) {
                message.push_str(&format!(
                    " (the running domain keeps {} vCPU and {} until it restarts, so the host \
                     must hold the larger of both)",
                    r.vcpus,
                    format_bytes_approx(r.memory)
                ));
            }
            message.push_str(&format!(
                "; it keeps running with {} vCPU and {}",
                admitted.vcpus,
                format_bytes_approx(admitted.memory)
            ));
            return SizeDecision {
                admitted,
                verdict: SizeVerdict::Refused { message },
            };
        }
        wanted
    };
    SizeDecision {
        admitted,
        verdict: caught_up(admitted, running),
    }
}

/// What an admitted size says while the domain runs at `running` (`None` when it is off):
/// applied, or waiting for a restart.
pub fn caught_up(admitted: Request, running: Option<Request>) -> SizeVerdict {
    match running {
        Some(r) if !same_size(&r, &admitted) => SizeVerdict::RestartRequired { running: r },
        _ => SizeVerdict::Applied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{HostFacts, PolicySpec, PoolPolicy};

    const GI: u64 = 1 << 30;

    /// A host of 4 threads and 8 GiB, no reserve, no overcommit.
    fn capacity() -> HostCapacity {
        let spec = PolicySpec {
            reserved_cpu: 0,
            reserved_memory: "0",
            cpu_ratio: 1.0,
            ..PolicySpec::DEFAULT
        };
        let policy = PoolPolicy::read(&spec).unwrap_or_else(|e| panic!("{e}"));
        let facts = HostFacts {
            threads: 4,
            memory: 8 * GI,
            hugepages: 0,
        };
        HostCapacity::new(&facts, &policy)
    }

    fn r(vcpus: u32, gib: u64) -> Request {
        Request::new(vcpus, gib * GI)
    }

    #[test]
    fn a_growth_that_fits_waits_for_a_restart_and_is_charged_the_larger() {
        let others = Usage::of(&[r(1, 2)]);
        let d = decide("h", &capacity(), &others, r(1, 2), r(2, 4), Some(r(1, 2)));
        assert_eq!(d.admitted, r(2, 4));
        assert_eq!(d.verdict, SizeVerdict::RestartRequired { running: r(1, 2) });
        assert_eq!(charge(d.admitted, Some(r(1, 2))), r(2, 4));
    }

    #[test]
    fn a_growth_that_does_not_fit_is_refused_and_the_old_size_stays() {
        let others = Usage::of(&[r(1, 2)]);
        let d = decide("h", &capacity(), &others, r(2, 2), r(16, 64), Some(r(2, 2)));
        assert_eq!(d.admitted, r(2, 2));
        let SizeVerdict::Refused { message } = d.verdict else {
            panic!("refused expected: {:?}", d.verdict)
        };
        assert!(
            message.contains("host h has 3 vCPU and 6Gi free"),
            "{message}"
        );
        assert!(message.contains("16 vCPU and 64Gi do not fit"), "{message}");
        assert!(!message.contains("larger of both"), "{message}");
        // A shrink of memory with more vCPUs: the running domain's memory still counts.
        let d = decide("h", &capacity(), &others, r(2, 6), r(4, 1), Some(r(2, 6)));
        let SizeVerdict::Refused { message } = d.verdict else {
            panic!("refused expected: {:?}", d.verdict)
        };
        assert!(message.contains("4 vCPU and 6Gi do not fit"), "{message}");
        assert!(message.contains("larger of both"), "{message}");
    }

    #[test]
    fn a_shrink_is_charged_the_old_size_until_the_restart() {
        let d = decide(
            "h",
            &capacity(),
            &Usage::default(),
            r(4, 8),
            r(1, 1),
            Some(r(4, 8)),
        );
        assert_eq!(d.admitted, r(1, 1));
        assert_eq!(charge(d.admitted, Some(r(4, 8))), r(4, 8));
        // Restarted: the domain runs the new size, and that is all it is charged.
        let d = decide(
            "h",
            &capacity(),
            &Usage::default(),
            r(1, 1),
            r(1, 1),
            Some(r(1, 1)),
        );
        assert_eq!(d.verdict, SizeVerdict::Applied);
        assert_eq!(charge(d.admitted, Some(r(1, 1))), r(1, 1));
    }

    #[test]
    fn a_stopped_domain_takes_a_fitting_size_at_once() {
        let d = decide("h", &capacity(), &Usage::default(), r(1, 1), r(4, 8), None);
        assert_eq!((d.admitted, d.verdict), (r(4, 8), SizeVerdict::Applied));
    }

    #[test]
    fn conditions_say_what_happens() {
        let (ok, reason, msg) =
            SizeVerdict::RestartRequired { running: r(1, 2) }.condition(&r(2, 4));
        assert!(!ok);
        assert_eq!(reason, SizeReason::RestartRequired);
        assert!(
            msg.starts_with("2 vCPU and 4Gi admitted; the running domain keeps 1 vCPU and 2Gi"),
            "{msg}"
        );
        assert_eq!(pool_condition("a", "a").1, PoolReason::Bound);
        let (ok, reason, msg) = pool_condition("a", "b");
        assert!(!ok && reason == PoolReason::PoolChangeRefused);
        assert!(msg.contains("bound in pool a and stays there"), "{msg}");
    }

    #[test]
    fn the_charge_is_never_below_what_runs_or_what_is_admitted() {
        for (a, run) in [(r(1, 8), r(4, 1)), (r(4, 1), r(1, 8)), (r(2, 2), r(2, 2))] {
            let c = charge(a, Some(run));
            assert!(c.vcpus >= a.vcpus.max(run.vcpus) && c.memory >= a.memory.max(run.memory));
        }
    }
}
