//! Decides whether a desktop is in use, from two samples of its counters (guest CPU, disk and
//! network bytes) and its SPICE session, and what the agent reports about it:
//! `status.session`, `status.lastActivityTime` (minute-coarse, so an active desktop is not
//! patched at every poll) and `status.idleSince` (kept across agent restarts, so a countdown
//! is neither restarted nor cut short). Pure.

use std::time::Duration;

use deskvirt_crds::desktop::{DesktopStatus, Session};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

/// Guest CPU above this share of one host CPU counts as activity. libvirt's domain CPU time
/// includes QEMU's own work: an idle Linux guest measured 3.3–4.1% under TCG on a busy host
/// (well under 1% with KVM), and at 5% it flapped between idle and busy; a person at the
/// desktop keeps it well above 10%.
pub const CPU_ACTIVE_SHARE: f64 = 0.10;
/// Disk traffic above this rate counts as activity.
pub const BLOCK_ACTIVE_BYTES_PER_SEC: f64 = 4096.0;
/// Network traffic above this rate counts as activity.
pub const NET_ACTIVE_BYTES_PER_SEC: f64 = 2048.0;
/// `lastActivityTime` is refreshed at most this often while a desktop stays active.
pub const ACTIVITY_GRANULARITY: Duration = Duration::from_secs(60);
/// Samples closer than this are not compared (rates would be noise).
const MIN_WINDOW: Duration = Duration::from_secs(2);

/// Counters of a running domain at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: Instant,
    pub cpu_time_ns: u64,
    pub block_bytes: u64,
    pub net_bytes: u64,
}

/// Whether the guest did something between `prev` and `cur`; `None` when the window is too
/// short or the counters went backwards (the domain restarted).
pub fn guest_active(prev: &Sample, cur: &Sample) -> Option<bool> {
    let window = cur.at.checked_duration_since(prev.at)?;
    if window < MIN_WINDOW {
        return None;
    }
    let secs = window.as_secs_f64();
    let cpu = cur.cpu_time_ns.checked_sub(prev.cpu_time_ns)? as f64 / 1e9;
    let block = cur.block_bytes.checked_sub(prev.block_bytes)? as f64;
    let net = cur.net_bytes.checked_sub(prev.net_bytes)? as f64;
    Some(
        cpu / secs > CPU_ACTIVE_SHARE
            || block / secs > BLOCK_ACTIVE_BYTES_PER_SEC
            || net / secs > NET_ACTIVE_BYTES_PER_SEC,
    )
}

/// The activity fields of the status after one observation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActivityStatus {
    pub session: Option<Session>,
    pub last_activity_time: Option<Time>,
    pub idle_since: Option<Time>,
}

/// The activity fields given the previous status, whether the desktop is in use (`None`:
/// not known from this observation), and the SPICE client (`None`: nobody connected).
pub fn next(
    prev: &DesktopStatus,
    active: Option<bool>,
    client: Option<&str>,
    now: Timestamp,
) -> ActivityStatus {
    let connected = client.is_some();
    let session = match &prev.session {
        Some(s) if s.connected == connected && s.client_address.as_deref() == client => s.clone(),
        _ => Session {
            connected,
            since: Some(Time(now)),
            client_address: client.map(str::to_string),
        },
    };
    let stale = |t: &Option<Time>| {
        t.as_ref().is_none_or(|t| {
            now.duration_since(t.0).as_secs_f64() >= ACTIVITY_GRANULARITY.as_secs_f64()
        })
    };
    let (last_activity_time, idle_since) = match active {
        None => (prev.last_activity_time.clone(), prev.idle_since.clone()),
        Some(true) if stale(&prev.last_activity_time) || prev.idle_since.is_some() => {
            (Some(Time(now)), None)
        }
        Some(true) => (prev.last_activity_time.clone(), None),
        Some(false) => (
            prev.last_activity_time.clone(),
            Some(prev.idle_since.clone().unwrap_or(Time(now))),
        ),
    };
    ActivityStatus {
        session: Some(session),
        last_activity_time,
        idle_since,
    }
}

/// The activity fields right after the agent started the domain, or restored it from its saved
/// memory after a wake: the idle countdown is cleared and activity stamped now, so the desktop
/// gets its whole timeout again. A fresh QEMU has no SPICE client yet.
pub fn started(prev: &DesktopStatus, now: Timestamp) -> ActivityStatus {
    ActivityStatus {
        last_activity_time: Some(Time(now)),
        idle_since: None,
        ..next(prev, None, None, now)
    }
}

/// The activity fields as the status already has them (nothing could be observed).
pub fn unchanged(prev: &DesktopStatus) -> ActivityStatus {
    ActivityStatus {
        session: prev.session.clone(),
        last_activity_time: prev.last_activity_time.clone(),
        idle_since: prev.idle_since.clone(),
    }
}

/// Whether the desktop counts as in use: the guest works, or a client is connected and the
/// policy counts a connected session as activity.
pub fn in_use(guest: Option<bool>, connected: bool, connected_is_active: bool) -> Option<bool> {
    if connected && connected_is_active {
        return Some(true);
    }
    guest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, secs: u64, cpu_ms: u64, block: u64, net: u64) -> Sample {
        Sample {
            at: base + Duration::from_secs(secs),
            cpu_time_ns: cpu_ms * 1_000_000,
            block_bytes: block,
            net_bytes: net,
        }
    }

    #[test]
    fn quiet_guest_is_idle_busy_guest_is_active() {
        let t = Instant::now();
        let a = at(t, 0, 0, 0, 0);
        // 100 ms of CPU in 10 s: 1%, idle; 410 ms (an idle guest under TCG): idle.
        assert_eq!(guest_active(&a, &at(t, 10, 100, 0, 0)), Some(false));
        assert_eq!(guest_active(&a, &at(t, 10, 410, 0, 0)), Some(false));
        // 2 s of CPU in 10 s: busy.
        assert_eq!(guest_active(&a, &at(t, 10, 2000, 0, 0)), Some(true));
        // Disk or network traffic.
        assert_eq!(guest_active(&a, &at(t, 10, 0, 1 << 20, 0)), Some(true));
        assert_eq!(guest_active(&a, &at(t, 10, 0, 0, 1 << 20)), Some(true));
        // Too short a window, or a restarted domain: unknown.
        assert_eq!(guest_active(&a, &at(t, 1, 0, 0, 0)), None);
        assert_eq!(
            guest_active(&at(t, 0, 500, 0, 0), &at(t, 10, 0, 0, 0)),
            None
        );
    }

    #[test]
    fn idle_since_is_kept_and_cleared() {
        let t0 = Timestamp::UNIX_EPOCH;
        let later = |s: i64| Timestamp::from_second(s).unwrap_or(t0);
        let idle = next(&DesktopStatus::default(), Some(false), None, t0);
        assert_eq!(idle.idle_since, Some(Time(t0)));
        let prev = DesktopStatus {
            idle_since: idle.idle_since.clone(),
            session: idle.session.clone(),
            ..DesktopStatus::default()
        };
        // Still idle: the countdown keeps its start; unknown keeps it too (agent restart).
        assert_eq!(
            next(&prev, Some(false), None, later(30)).idle_since,
            Some(Time(t0))
        );
        assert_eq!(
            next(&prev, None, None, later(30)).idle_since,
            Some(Time(t0))
        );
        // Active again: cleared, activity stamped.
        let active = next(&prev, Some(true), None, later(40));
        assert_eq!(active.idle_since, None);
        assert_eq!(active.last_activity_time, Some(Time(later(40))));
    }

    #[test]
    fn activity_time_is_coarse_and_sessions_change_once() {
        let t0 = Timestamp::UNIX_EPOCH;
        let later = |s: i64| Timestamp::from_second(s).unwrap_or(t0);
        let first = next(&DesktopStatus::default(), Some(true), Some("10.0.0.9"), t0);
        let prev = DesktopStatus {
            session: first.session.clone(),
            last_activity_time: first.last_activity_time.clone(),
            ..DesktopStatus::default()
        };
        let soon = next(&prev, Some(true), Some("10.0.0.9"), later(30));
        assert_eq!(soon, first, "nothing meaningful changed within a minute");
        let minute = next(&prev, Some(true), Some("10.0.0.9"), later(61));
        assert_eq!(minute.last_activity_time, Some(Time(later(61))));
        let gone = next(&prev, Some(false), None, later(30));
        let session = gone.session.unwrap_or_default();
        assert!(!session.connected);
        assert_eq!(session.since, Some(Time(later(30))));
    }

    #[test]
    fn a_start_clears_the_countdown_and_an_unknown_changes_nothing() {
        let t0 = Timestamp::UNIX_EPOCH;
        let later = Timestamp::from_second(600).unwrap_or(t0);
        let prev = DesktopStatus {
            idle_since: Some(Time(t0)),
            last_activity_time: Some(Time(t0)),
            session: Some(Session {
                connected: false,
                since: Some(Time(t0)),
                client_address: None,
            }),
            ..DesktopStatus::default()
        };
        let started = started(&prev, later);
        assert_eq!(started.idle_since, None);
        assert_eq!(started.last_activity_time, Some(Time(later)));
        assert_eq!(
            started.session, prev.session,
            "no client: the session is kept"
        );
        let same = unchanged(&prev);
        assert_eq!(same.idle_since, prev.idle_since);
        assert_eq!(same.session, prev.session);
    }

    #[test]
    fn a_connected_client_counts_when_the_policy_says_so() {
        assert_eq!(in_use(Some(false), true, true), Some(true));
        assert_eq!(in_use(Some(false), true, false), Some(false));
        assert_eq!(in_use(None, false, true), None);
    }
}
