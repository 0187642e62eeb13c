//! Whether one host can take one desktop, and if not, why: health and admin flags first, the
//! pool's CPU model, then CPU, dedicated CPUs, memory, hugepages and a free SPICE port.

use crate::types::PortRange;

use super::capacity::Shortfalls;
use super::host::HostView;
use super::request::Request;

/// The verdict on one host for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The host takes the desktop.
    Fits,
    /// Heartbeat lost, libvirt unreachable or facts unknown.
    NotReady,
    /// In maintenance.
    Maintenance,
    /// Cordoned (`spec.unschedulable`).
    Cordoned,
    /// Cannot run the pool's pinned CPU model.
    CpuModel,
    /// Healthy, but short of something.
    Short {
        /// Resource dimensions that do not fit.
        shortfalls: Shortfalls,
        /// Every SPICE port of the range is taken.
        no_port: bool,
    },
}

/// Judges `host` for `request` with the pool's SPICE port `range`.
pub fn judge(host: &HostView, request: &Request, range: PortRange) -> Verdict {
    if !host.ready {
        return Verdict::NotReady;
    }
    if host.maintenance {
        return Verdict::Maintenance;
    }
    if host.unschedulable {
        return Verdict::Cordoned;
    }
    if host.lacks_cpu_model {
        return Verdict::CpuModel;
    }
    let shortfalls = host.capacity.shortfalls(&host.allocated, request);
    let no_port = host.ports_in_use >= range.len();
    if shortfalls.none() && !no_port {
        Verdict::Fits
    } else {
        Verdict::Short {
            shortfalls,
            no_port,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::capacity::{HostCapacity, Usage};
    use crate::scheduler::policy::Ratio;

    const GI: u64 = 1 << 30;
    const RANGE: PortRange = PortRange {
        first: 5900,
        last: 5903,
    };

    fn host() -> HostView {
        let capacity = HostCapacity {
            physical_cpus: 4,
            cpu_ratio: Ratio::ONE,
            memory: 8 * GI,
            hugepages: 0,
        };
        HostView::new("h", "p", capacity)
    }

    #[test]
    fn health_comes_before_resources() {
        let req = Request::new(100, 100 * GI);
        assert_eq!(
            judge(&host().not_ready().in_maintenance(), &req, RANGE),
            Verdict::NotReady
        );
        assert_eq!(
            judge(&host().in_maintenance().cordoned(), &req, RANGE),
            Verdict::Maintenance
        );
        assert_eq!(judge(&host().cordoned(), &req, RANGE), Verdict::Cordoned);
        assert_eq!(
            judge(&host().without_cpu_model(), &req, RANGE),
            Verdict::CpuModel
        );
    }

    #[test]
    fn reports_every_short_dimension() {
        let v = judge(
            &host().with_ports_in_use(4),
            &Request::new(5, 9 * GI),
            RANGE,
        );
        assert_eq!(
            v,
            Verdict::Short {
                shortfalls: Shortfalls {
                    cpu: true,
                    memory: true,
                    ..Shortfalls::default()
                },
                no_port: true
            }
        );
    }

    #[test]
    fn fits_exactly_at_the_limit() {
        let h = host()
            .with_allocated(Usage::of(&[Request::new(2, 4 * GI)]))
            .with_ports_in_use(3);
        assert_eq!(judge(&h, &Request::new(2, 4 * GI), RANGE), Verdict::Fits);
        assert_eq!(
            judge(
                &h,
                &Request::new(2, 4 * GI),
                PortRange {
                    first: 5900,
                    last: 5902
                }
            ),
            Verdict::Short {
                shortfalls: Shortfalls::default(),
                no_port: true
            }
        );
    }
}
