//! Decides what becomes of a Desktop pass that failed: when it is tried again (a transient
//! failure with a doubling backoff, a permanent one at an admin's pace) and when and how it is
//! shown on the Desktop (a permanent failure at once, a transient one once it has failed
//! [`SHOW_AFTER`] times in a row), so no failure stays in the log only. Pure.

use std::time::Duration;

use deskvirt_crds::conditions::{self, Status};
use deskvirt_crds::constants::condition::DOMAIN_DEFINED;
use deskvirt_crds::desktop::DesktopStatus;

use super::reason::Reason;
use super::status::{Cond, Report};
use crate::hypervisor::Backoff;

/// Consecutive transient failures after which the failure is shown on the Desktop (about
/// 1 + 2 + 4 = 7 s of retries with [`retry_in`]).
pub const SHOW_AFTER: u32 = 3;

/// How long to wait before a permanent failure is tried again: someone has to change
/// something first, and a change of the Desktop triggers a pass anyway.
pub const PERMANENT_RETRY: Duration = Duration::from_secs(60);

/// The delay before the next pass after `failures` consecutive failures, the last of them
/// `transient` or not: 1 s doubling to 2 min for transient ones.
pub fn retry_in(transient: bool, failures: u32) -> Duration {
    if !transient {
        return PERMANENT_RETRY;
    }
    Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(120),
    }
    .delay(failures.max(1))
}

/// Whether the failure is shown on the Desktop now.
pub fn shown(transient: bool, failures: u32) -> bool {
    !transient || failures >= SHOW_AFTER
}

/// The agent's report for a failed pass: the failure on `Running` once the domain is defined
/// (`DomainDefined` stays as it was), else on `DomainDefined`; `Unknown` while it is retried
/// by itself, `False` when it needs someone. Address and SPICE host stay as reported.
pub fn report(status: &DesktopStatus, reason: Reason, transient: bool, what: &str) -> Report {
    let cond = if transient {
        Cond::new(
            Status::Unknown,
            reason,
            // No count in the message: a status that changed with every retry would wake the
            // desktop's own watch at once, and the retries would never wait their backoff.
            format!("{what}; the agent keeps retrying, waiting up to 2 min between tries"),
        )
    } else {
        Cond::new(
            Status::False,
            reason,
            format!("{what}; retrying will not help until this is fixed"),
        )
    };
    let defined =
        conditions::find(&status.conditions, DOMAIN_DEFINED).is_some_and(|c| c.status == "True");
    let mut out = Report::keeping(status);
    if defined {
        out.running = Some(cond);
    } else {
        out.defined = Some(cond);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskvirt_crds::conditions::condition;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn transient_failures_back_off_and_permanent_ones_wait_for_a_change() {
        assert_eq!(retry_in(true, 1), Duration::from_secs(1));
        assert_eq!(retry_in(true, 2), Duration::from_secs(2));
        assert_eq!(retry_in(true, 0), Duration::from_secs(1));
        assert_eq!(retry_in(true, 30), Duration::from_secs(120));
        assert_eq!(retry_in(false, 1), PERMANENT_RETRY);
        assert_eq!(retry_in(false, 9), PERMANENT_RETRY);
    }

    #[test]
    fn permanent_failures_show_at_once_transient_ones_after_a_bound() {
        assert!(shown(false, 1));
        assert!(!shown(true, 1));
        assert!(!shown(true, SHOW_AFTER - 1));
        assert!(shown(true, SHOW_AFTER));
        assert!(shown(true, SHOW_AFTER + 5));
    }

    #[test]
    fn before_the_domain_is_defined_the_failure_is_on_domain_defined() {
        let st = DesktopStatus {
            ip: Some("10.0.0.2".into()),
            ..DesktopStatus::default()
        };
        let r = report(&st, Reason::LibvirtFailed, false, "define failed");
        let Some(c) = &r.defined else {
            panic!("no DomainDefined: {r:?}")
        };
        assert_eq!(c.status, Status::False);
        assert_eq!(c.reason, Reason::LibvirtFailed);
        assert!(c.message.starts_with("define failed"), "{}", c.message);
        assert_eq!(r.running, None);
        assert_eq!(r.ip.as_deref(), Some("10.0.0.2"), "the address is kept");
    }

    #[test]
    fn once_defined_the_failure_is_on_running_and_transient_is_unknown() {
        let defined = condition(
            &[],
            DOMAIN_DEFINED,
            Status::True,
            "Defined",
            "ok",
            Some(1),
            Timestamp::UNIX_EPOCH,
        );
        let st = DesktopStatus {
            conditions: vec![defined],
            ..DesktopStatus::default()
        };
        let r = report(&st, Reason::LibvirtUnavailable, true, "start failed");
        assert_eq!(r.defined, None, "DomainDefined is left as it is");
        let Some(c) = &r.running else {
            panic!("no Running: {r:?}")
        };
        assert_eq!(c.status, Status::Unknown);
        assert!(c.message.contains("keeps retrying"), "{}", c.message);
    }

    #[test]
    fn a_failure_shown_once_is_not_written_again_on_the_next_retry() {
        let now = Timestamp::UNIX_EPOCH;
        let st = DesktopStatus::default();
        let first = report(&st, Reason::LibvirtFailed, true, "ensure network failed");
        let Some(body) = super::super::status::body(&st, &first, Some(1), now) else {
            panic!("the first failure is written");
        };
        let written: DesktopStatus = serde_json::from_value(body).unwrap_or_else(|e| panic!("{e}"));
        let again = report(
            &written,
            Reason::LibvirtFailed,
            true,
            "ensure network failed",
        );
        let later = Timestamp::from_second(600).unwrap_or(now);
        assert_eq!(
            super::super::status::body(&written, &again, Some(1), later),
            None,
            "a retry that says the same writes nothing, so it cannot wake the desktop's watch"
        );
    }
}
