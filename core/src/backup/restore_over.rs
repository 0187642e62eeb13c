//! Decides one operator pass over a DesktopRestore, which restores an existing desktop's disk
//! from a backup of its namespace: whether it waits (and why: the desktop must be stopped,
//! settled on a ready host, with no backup, move or other restore under way, and the backup's
//! chain whole), records the chain on the desktop for its host, follows the host's report
//! (the disk swapped with the old one kept, then the desktop ran on it and the old one went),
//! or fails; and whether its record on the desktop is to be cleared. Nothing here calls a host
//! or the API.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::reasons::RestoreReason;

/// Where a DesktopRestore is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Waiting for the desktop to be stopped and settled, or for the backup.
    #[default]
    Pending,
    /// Recorded on the desktop: its host builds the new disk.
    Restoring,
    /// The desktop's disk is the backup's; the old disk is kept until the desktop has run.
    Restored,
    /// The desktop ran on the restored disk, and the old disk is gone.
    Succeeded,
    /// Nothing was changed (the message says why), or the desktop went.
    Failed,
}

impl Phase {
    /// The phase as the API writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Restoring => "Restoring",
            Self::Restored => "Restored",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    /// Whether the restore has ended.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// What the host reported of a restore (the Desktop's `status.restoreReport`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Said {
    /// The disk is the backup's; the old one is kept.
    Swapped,
    /// The desktop ran on the restored disk; the old one is removed.
    Ran,
    /// The host refused or failed; the old disk is the desktop's disk as before.
    Failed,
}

/// The desktop restored over, as the operator's caches show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Target<'a> {
    pub uid: &'a str,
    /// The host it is bound to.
    pub node: Option<&'a str>,
    /// Whether that host heartbeats.
    pub host_ready: bool,
    /// Whether its spec asks for it to be off.
    pub power_off: bool,
    /// Whether its domain runs (the host's `Running` condition).
    pub running: bool,
    /// Whether the idle policy holds it (suspended with its memory saved, which belongs to the
    /// old disk, or shut down; its host keeps it as the policy left it).
    pub suspended: bool,
    /// Whether a move of it is under way.
    pub migrating: bool,
    /// Whether it is being deleted.
    pub deleting: bool,
    /// Whether a backup of it is recorded (being written).
    pub backing_up: bool,
    /// The UID of the restore recorded on it (`status.restoreOver`), if any.
    pub record: Option<&'a str>,
    /// Whether that record's restore is still open (its object exists and has not ended).
    pub record_open: bool,
    /// The host's report: the restore's UID and what it said.
    pub report: Option<(&'a str, Said)>,
}

/// What one pass knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts<'a> {
    /// The DesktopRestore's UID.
    pub uid: &'a str,
    pub phase: Phase,
    /// Whether it is being deleted.
    pub deleting: bool,
    /// The Desktop UID it pinned on its first record.
    pub pinned: Option<&'a str>,
    /// Its desktop: by the pinned UID, else by name.
    pub desktop: Option<Target<'a>>,
    /// Whether the backup's chain can be restored onto the desktop, or why not.
    pub chain: Result<(), String>,
}

/// What the pass does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: ended, and nothing of it is left on the desktop.
    Nothing,
    /// Ended or deleted: its record on the desktop goes.
    Clear,
    /// Waits (Pending, or still Restoring/Restored), with a reason.
    Wait(RestoreReason, String),
    /// Record the chain on the desktop (pinning its UID): Restoring.
    Record,
    /// The host reached `phase` (Restored, or Succeeded, after which the record goes).
    Advance(Phase),
    /// Ends Failed; its record on the desktop goes.
    Fail(RestoreReason, String),
}

/// Decides the pass.
pub fn decide(f: &Facts<'_>) -> Plan {
    let ours = |d: &Target<'_>| d.record == Some(f.uid);
    if f.phase.is_terminal() || f.deleting {
        return match f.desktop {
            Some(d) if ours(&d) => Plan::Clear,
            _ => Plan::Nothing,
        };
    }
    let Some(d) = f.desktop.filter(|d| f.pinned.is_none_or(|p| p == d.uid)) else {
        return match f.pinned {
            Some(_) => Plan::Fail(
                RestoreReason::DesktopGone,
                "the desktop was deleted (or made again under its name)".into(),
            ),
            None => Plan::Wait(
                RestoreReason::DesktopNotFound,
                "no Desktop named by spec.desktop in this namespace".into(),
            ),
        };
    };
    let report = d.report.filter(|(u, _)| *u == f.uid).map(|(_, s)| s);
    // Recorded by a pass whose status write was lost: it is under way.
    let phase = match f.phase {
        Phase::Pending if ours(&d) => Phase::Restoring,
        p => p,
    };
    if phase != Phase::Pending {
        return match report {
            Some(Said::Failed) => Plan::Fail(RestoreReason::RestoreFailed, String::new()),
            Some(Said::Ran) => Plan::Advance(Phase::Succeeded),
            Some(Said::Swapped) if phase == Phase::Restoring => Plan::Advance(Phase::Restored),
            Some(Said::Swapped) => Plan::Wait(
                RestoreReason::Restored,
                "the desktop's disk is the backup's; the old disk is kept until the desktop \
                 has run (set spec.power: On)"
                    .into(),
            ),
            None if !ours(&d) => Plan::Fail(
                RestoreReason::RecordLost,
                "its record on the desktop is gone before the host acted on it".into(),
            ),
            None if d.deleting => Plan::Fail(
                RestoreReason::DesktopDeleting,
                "the desktop is being deleted".into(),
            ),
            None => Plan::Wait(
                RestoreReason::Restoring,
                "the desktop's host builds the new disk from the backup".into(),
            ),
        };
    }
    if d.deleting {
        return Plan::Fail(
            RestoreReason::DesktopDeleting,
            "the desktop is being deleted".into(),
        );
    }
    // What the restore names comes first: the desktop's state passes, a missing backup may not.
    if let Err(why) = &f.chain {
        return Plan::Wait(RestoreReason::RestoreUnavailable, why.clone());
    }
    settled(&d, f.uid).unwrap_or(Plan::Record)
}

/// Why the desktop cannot take a restore now, if it cannot.
fn settled(d: &Target<'_>, uid: &str) -> Option<Plan> {
    let wait = |r, m: &str| Some(Plan::Wait(r, m.to_string()));
    if d.record.is_some_and(|r| r != uid) && d.record_open {
        return wait(
            RestoreReason::Busy,
            "another restore of the desktop is under way",
        );
    }
    if !d.power_off {
        return wait(
            RestoreReason::DesktopRunning,
            "the desktop's spec.power is not Off: a disk is restored only while its desktop is \
             stopped",
        );
    }
    if d.running {
        return wait(
            RestoreReason::DesktopRunning,
            "the desktop's domain still runs; waiting for it to stop",
        );
    }
    if d.suspended {
        return wait(
            RestoreReason::Suspended,
            "the idle policy holds the desktop (suspended with its memory saved, which belongs \
             to its current disk, or shut down): wake it (annotation deskvirt.io/wake) and stop \
             it (spec.power: Off) first",
        );
    }
    if d.migrating {
        return wait(
            RestoreReason::Migrating,
            "the desktop is moving to another host",
        );
    }
    if d.backing_up {
        return wait(
            RestoreReason::BackupRunning,
            "a backup of the desktop is being written",
        );
    }
    match d.node {
        None => wait(
            RestoreReason::NotBound,
            "the desktop is not bound to a host",
        ),
        Some(_) if !d.host_ready => wait(
            RestoreReason::HostNotReady,
            "the desktop's host is not heartbeating",
        ),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "r-1";

    fn stopped() -> Target<'static> {
        Target {
            uid: "d-1",
            node: Some("h1"),
            host_ready: true,
            power_off: true,
            ..Target::default()
        }
    }

    fn facts(phase: Phase, d: Option<Target<'static>>) -> Facts<'static> {
        Facts {
            uid: ME,
            phase,
            deleting: false,
            pinned: (phase != Phase::Pending).then_some("d-1"),
            desktop: d,
            chain: Ok(()),
        }
    }

    fn reason(p: &Plan) -> Option<RestoreReason> {
        match p {
            Plan::Wait(r, _) | Plan::Fail(r, _) => Some(*r),
            _ => None,
        }
    }

    #[test]
    fn a_stopped_settled_desktop_is_recorded() {
        assert_eq!(
            decide(&facts(Phase::Pending, Some(stopped()))),
            Plan::Record
        );
    }

    #[test]
    fn a_desktop_that_is_not_stopped_and_settled_waits_with_a_reason() {
        type Change = fn(&mut Target<'static>);
        let cases: [(Change, RestoreReason); 8] = [
            (|d| d.power_off = false, RestoreReason::DesktopRunning),
            (|d| d.running = true, RestoreReason::DesktopRunning),
            (|d| d.suspended = true, RestoreReason::Suspended),
            (|d| d.migrating = true, RestoreReason::Migrating),
            (|d| d.backing_up = true, RestoreReason::BackupRunning),
            (|d| d.node = None, RestoreReason::NotBound),
            (|d| d.host_ready = false, RestoreReason::HostNotReady),
            (
                |d| {
                    d.record = Some("r-0");
                    d.record_open = true;
                },
                RestoreReason::Busy,
            ),
        ];
        for (change, want) in cases {
            let mut d = stopped();
            change(&mut d);
            let plan = decide(&facts(Phase::Pending, Some(d)));
            assert_eq!(reason(&plan), Some(want), "{d:?}: {plan:?}");
            assert!(matches!(plan, Plan::Wait(..)), "{plan:?}");
        }
    }

    #[test]
    fn the_record_of_a_restore_that_ended_or_went_does_not_hold_a_new_one() {
        let mut d = stopped();
        d.record = Some("r-0");
        d.report = Some(("r-0", Said::Ran));
        assert_eq!(decide(&facts(Phase::Pending, Some(d))), Plan::Record);
    }

    #[test]
    fn a_pending_restore_already_recorded_is_under_way() {
        let mut d = stopped();
        d.record = Some(ME);
        d.record_open = true;
        d.report = Some((ME, Said::Swapped));
        assert_eq!(
            decide(&facts(Phase::Pending, Some(d))),
            Plan::Advance(Phase::Restored)
        );
    }

    #[test]
    fn a_chain_that_cannot_be_restored_waits_and_says_why() {
        // Said before the desktop's state, which passes.
        let mut running = stopped();
        running.running = true;
        let mut f = facts(Phase::Pending, Some(running));
        f.chain = Err("no DesktopBackup nope".into());
        assert_eq!(reason(&decide(&f)), Some(RestoreReason::RestoreUnavailable));
        let mut f = facts(Phase::Pending, Some(stopped()));
        f.chain = Err("backup b1 is Running, not Succeeded".into());
        assert_eq!(
            decide(&f),
            Plan::Wait(
                RestoreReason::RestoreUnavailable,
                "backup b1 is Running, not Succeeded".into()
            )
        );
    }

    #[test]
    fn no_desktop_waits_until_pinned_then_fails() {
        assert_eq!(
            reason(&decide(&facts(Phase::Pending, None))),
            Some(RestoreReason::DesktopNotFound)
        );
        let plan = decide(&facts(Phase::Restoring, None));
        assert!(
            matches!(plan, Plan::Fail(RestoreReason::DesktopGone, _)),
            "{plan:?}"
        );
        // Made again under its name: another UID.
        let mut f = facts(Phase::Restoring, Some(stopped()));
        f.pinned = Some("d-0");
        assert!(matches!(
            decide(&f),
            Plan::Fail(RestoreReason::DesktopGone, _)
        ));
    }

    #[test]
    fn the_host_s_reports_move_it_on() {
        let mut d = stopped();
        d.record = Some(ME);
        assert_eq!(
            reason(&decide(&facts(Phase::Restoring, Some(d)))),
            Some(RestoreReason::Restoring)
        );
        d.report = Some((ME, Said::Swapped));
        assert_eq!(
            decide(&facts(Phase::Restoring, Some(d))),
            Plan::Advance(Phase::Restored)
        );
        assert_eq!(
            reason(&decide(&facts(Phase::Restored, Some(d)))),
            Some(RestoreReason::Restored)
        );
        d.report = Some((ME, Said::Ran));
        assert_eq!(
            decide(&facts(Phase::Restored, Some(d))),
            Plan::Advance(Phase::Succeeded)
        );
        d.report = Some((ME, Said::Failed));
        assert!(matches!(
            decide(&facts(Phase::Restoring, Some(d))),
            Plan::Fail(RestoreReason::RestoreFailed, _)
        ));
        // Another restore's report says nothing of this one.
        d.report = Some(("r-0", Said::Ran));
        assert_eq!(
            reason(&decide(&facts(Phase::Restoring, Some(d)))),
            Some(RestoreReason::Restoring)
        );
    }

    #[test]
    fn a_record_lost_before_the_host_acted_fails_and_ended_ones_clear_theirs() {
        let d = stopped();
        assert!(matches!(
            decide(&facts(Phase::Restoring, Some(d))),
            Plan::Fail(RestoreReason::RecordLost, _)
        ));
        let mut d = stopped();
        d.record = Some(ME);
        assert_eq!(decide(&facts(Phase::Succeeded, Some(d))), Plan::Clear);
        let mut f = facts(Phase::Restoring, Some(d));
        f.deleting = true;
        assert_eq!(decide(&f), Plan::Clear);
        assert_eq!(
            decide(&facts(Phase::Failed, Some(stopped()))),
            Plan::Nothing
        );
    }
}
