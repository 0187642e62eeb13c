//! Whether a host is alive, decided from its heartbeat Lease: `renewTime + leaseDurationSeconds`
//! against now. Pure, so the controllers and tests agree on the same verdict.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// The verdict on a host's heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// Renewed in time; valid until `until`.
    Fresh { until: Timestamp },
    /// Expired at `since`.
    Lost { since: Timestamp },
    /// No Lease, or one never renewed.
    Missing,
}

impl Heartbeat {
    /// Judges `lease` at `now`; `default_duration` applies when the Lease names no duration.
    pub fn of(lease: Option<&Lease>, now: Timestamp, default_duration: Duration) -> Self {
        let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
            return Heartbeat::Missing;
        };
        let Some(renewed) = spec.renew_time.as_ref().map(|t| t.0) else {
            return Heartbeat::Missing;
        };
        let duration = spec
            .lease_duration_seconds
            .filter(|s| *s > 0)
            .map(|s| SignedDuration::from_secs(i64::from(s)))
            .unwrap_or_else(|| {
                SignedDuration::try_from(default_duration).unwrap_or(SignedDuration::MAX)
            });
        let until = renewed.checked_add(duration).unwrap_or(Timestamp::MAX);
        if now <= until {
            Heartbeat::Fresh { until }
        } else {
            Heartbeat::Lost { since: until }
        }
    }

    pub fn is_fresh(&self) -> bool {
        matches!(self, Heartbeat::Fresh { .. })
    }

    /// How long the host has been lost at `now` (zero while fresh; forever when never seen).
    pub fn lost_for(&self, now: Timestamp) -> Duration {
        match self {
            Heartbeat::Fresh { .. } => Duration::ZERO,
            Heartbeat::Missing => Duration::MAX,
            Heartbeat::Lost { since } => {
                Duration::try_from(now.duration_since(*since)).unwrap_or(Duration::ZERO)
            }
        }
    }

    /// How long until a fresh heartbeat expires (for the requeue); `None` otherwise.
    pub fn expires_in(&self, now: Timestamp) -> Option<Duration> {
        match self {
            Heartbeat::Fresh { until } => {
                Some(Duration::try_from(until.duration_since(now)).unwrap_or(Duration::ZERO))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn lease(renew: Option<i64>, secs: Option<i32>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                renew_time: renew.map(|r| MicroTime(at(r))),
                lease_duration_seconds: secs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn fresh_lost_and_missing() {
        let d = Duration::from_secs(40);
        let l = lease(Some(1000), Some(10));
        assert_eq!(
            Heartbeat::of(Some(&l), at(1010), d),
            Heartbeat::Fresh { until: at(1010) }
        );
        let lost = Heartbeat::of(Some(&l), at(1011), d);
        assert_eq!(lost, Heartbeat::Lost { since: at(1010) });
        assert_eq!(lost.lost_for(at(1070)), Duration::from_secs(60));
        // The default applies when the Lease names no duration.
        let l = lease(Some(1000), None);
        assert!(Heartbeat::of(Some(&l), at(1039), d).is_fresh());
        assert!(!Heartbeat::of(Some(&l), at(1041), d).is_fresh());
        assert_eq!(Heartbeat::of(None, at(0), d), Heartbeat::Missing);
        assert_eq!(
            Heartbeat::of(Some(&lease(None, Some(5))), at(0), d),
            Heartbeat::Missing
        );
        assert_eq!(
            Heartbeat::of(Some(&lease(Some(0), Some(5))), at(2), d).expires_in(at(2)),
            Some(Duration::from_secs(3))
        );
    }
}
