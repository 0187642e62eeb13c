//! What happens to a migration that holds a target: it keeps the target while its desktop is
//! the one it was made for, still there, and the ledger still holds the reservation; it waits
//! for the source host until the start timeout, then follows the source host's report (moving,
//! failed) until the desktop's binding moved to the target. Otherwise it ends and the target
//! is freed.

use std::time::Duration;

use super::MigrationState;
use crate::reasons::MigrationReason;

/// What a held migration's pass knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts<'a> {
    /// The UID of the Desktop named now, if it exists and is not being deleted.
    pub desktop_uid: Option<&'a str>,
    /// The Desktop with the pinned UID exists and is being deleted.
    pub deleting: bool,
    /// The UID pinned when the target was reserved.
    pub pinned_uid: &'a str,
    /// The pool's ledger still holds the target and port recorded.
    pub target_held: bool,
    /// Since the target was reserved.
    pub waited: Duration,
    pub start_timeout: Duration,
    /// The source host's report of this migration (by its UID), and its message.
    pub report: Option<(MigrationState, &'a str)>,
    /// The desktop's binding moved to the target (the Desktop pass did it on a completed
    /// report).
    pub arrived: bool,
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// Keep the target; look again after this long at the latest.
    Keep(Duration),
    /// End it (Failed) for this reason, with this message; the target is freed.
    End(MigrationReason, String),
    /// The source host is moving it (phase Running): wait for its report.
    Moving,
    /// The desktop runs on the target and is bound there: Succeeded.
    Arrived,
}

/// Decides a held migration's pass.
pub fn decide(f: &Facts<'_>) -> Held {
    use MigrationReason as R;
    if f.arrived {
        return Held::Arrived;
    }
    match f.report {
        Some((MigrationState::Failed, why)) => {
            return Held::End(R::HostFailed, format!("the source host failed: {why}"));
        }
        // The domain is on its way: whatever happened meanwhile (the desktop deleted, say),
        // the target is held until the source host says how the move ended.
        Some((MigrationState::Started, _)) => return Held::Moving,
        // The domain runs on the target: a desktop being deleted is bound there first, so
        // that the target's host tears it down (its disk included).
        Some((MigrationState::Completed, _)) if f.deleting => return Held::Moving,
        _ => {}
    }
    match f.desktop_uid {
        None => return Held::End(R::DesktopDeleted, "the desktop was deleted".into()),
        Some(uid) if uid != f.pinned_uid => {
            return Held::End(
                R::DesktopReplaced,
                "the desktop was deleted and made again under its name".into(),
            );
        }
        Some(_) => {}
    }
    // Moved: the target's port became the desktop's own as its binding follows.
    if let Some((MigrationState::Completed, _)) = f.report {
        return Held::Moving;
    }
    if !f.target_held {
        return Held::End(
            R::TargetLost,
            "the port reserved on the target is no longer held for this migration".into(),
        );
    }
    match f.start_timeout.checked_sub(f.waited) {
        Some(left) if !left.is_zero() => Held::Keep(left),
        _ => Held::End(
            R::StartTimeout,
            format!(
                "the source host did not start moving the desktop within {}s",
                f.start_timeout.as_secs()
            ),
        ),
    }
}

/// Whether a Pending migration waiting for `reason` has waited too long: then it ends with that
/// reason, and the message says how long it waited. Else how long until it has.
pub fn pending(
    reason: MigrationReason,
    message: &str,
    waited: Duration,
    timeout: Duration,
) -> Result<Duration, String> {
    match timeout.checked_sub(waited) {
        Some(left) if !left.is_zero() && !reason.ends() => Ok(left),
        _ if reason.ends() => Err(message.to_string()),
        _ => Err(format!("gave up after {}s: {message}", timeout.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn facts() -> Facts<'static> {
        Facts {
            desktop_uid: Some("u1"),
            deleting: false,
            pinned_uid: "u1",
            target_held: true,
            waited: Duration::from_secs(10),
            start_timeout: MIN,
            report: None,
            arrived: false,
        }
    }

    #[test]
    fn a_held_target_is_kept_until_the_start_timeout() {
        assert_eq!(decide(&facts()), Held::Keep(Duration::from_secs(50)));
        let late = Facts {
            waited: MIN,
            ..facts()
        };
        assert!(matches!(
            decide(&late),
            Held::End(MigrationReason::StartTimeout, _)
        ));
    }

    #[test]
    fn a_gone_or_replaced_desktop_or_a_lost_port_ends_it() {
        let gone = Facts {
            desktop_uid: None,
            ..facts()
        };
        assert!(matches!(
            decide(&gone),
            Held::End(MigrationReason::DesktopDeleted, _)
        ));
        let replaced = Facts {
            desktop_uid: Some("u2"),
            ..facts()
        };
        assert!(matches!(
            decide(&replaced),
            Held::End(MigrationReason::DesktopReplaced, _)
        ));
        let lost = Facts {
            target_held: false,
            ..facts()
        };
        assert!(matches!(
            decide(&lost),
            Held::End(MigrationReason::TargetLost, _)
        ));
    }

    #[test]
    fn the_source_report_moves_it_on_and_only_the_binding_ends_it() {
        let started = Facts {
            report: Some((MigrationState::Started, "")),
            waited: MIN * 10,
            ..facts()
        };
        assert_eq!(
            decide(&started),
            Held::Moving,
            "no start timeout once moving"
        );
        let done = Facts {
            report: Some((MigrationState::Completed, "")),
            ..facts()
        };
        assert_eq!(decide(&done), Held::Moving, "until the binding moved");
        let arrived = Facts {
            arrived: true,
            ..done
        };
        assert_eq!(decide(&arrived), Held::Arrived);
        let failed = Facts {
            report: Some((MigrationState::Failed, "no route")),
            ..facts()
        };
        assert!(
            matches!(decide(&failed), Held::End(MigrationReason::HostFailed, m) if m.contains("no route"))
        );
        let deleted = Facts {
            desktop_uid: None,
            ..started
        };
        assert_eq!(decide(&deleted), Held::Moving, "held until the move ends");
        let moved_then_gone = Facts {
            desktop_uid: None,
            ..done
        };
        assert!(matches!(
            decide(&moved_then_gone),
            Held::End(MigrationReason::DesktopDeleted, _)
        ));
        let moved_then_deleting = Facts {
            desktop_uid: None,
            deleting: true,
            ..done
        };
        assert_eq!(
            decide(&moved_then_deleting),
            Held::Moving,
            "held until the binding follows, so the target's host tears it down"
        );
    }

    #[test]
    fn a_pending_migration_waits_until_its_timeout_and_a_final_reason_ends_it_at_once() {
        let r = MigrationReason::NoTarget;
        assert_eq!(
            pending(r, "full", Duration::from_secs(20), MIN),
            Ok(Duration::from_secs(40))
        );
        let over = pending(r, "full", MIN, MIN);
        assert!(over.is_err_and(|m| m.contains("gave up after 60s: full")));
        let fin = pending(
            MigrationReason::StorageNotShared,
            "not shared",
            Duration::ZERO,
            MIN,
        );
        assert_eq!(fin, Err("not shared".into()));
    }
}
