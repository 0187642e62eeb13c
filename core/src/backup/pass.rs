//! Decides one operator pass over a DesktopBackup: whether it waits (and why), fails, starts on
//! its desktop's host and from which checkpoint, keeps running, or ends with the host's report;
//! and whether a record of it left on the Desktop is to be cleared. The controller reads the
//! API into [`Facts`] and commits the answer; nothing here calls a host or the API.

use super::{Ask, Backup, Kind, Since, State, Wait, next};
use crate::reasons::BackupReason;

/// What the host last reported of a backup (the Desktop's `status.backupReport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reported {
    /// The job runs.
    Started,
    /// Written and verified.
    Completed,
    /// Not written, or not verified.
    Failed,
}

/// The Desktop a backup is of, as the operator's caches show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desktop<'a> {
    pub uid: &'a str,
    /// The host it is bound to.
    pub node: Option<&'a str>,
    /// Whether that host heartbeats.
    pub host_ready: bool,
    /// Whether its domain runs (the agent's `Running` condition).
    pub running: bool,
    /// Whether it is stopped for good: `spec.power: Off`, its domain not running, not
    /// suspended with saved memory. Its host backs it up by starting the domain paused (no
    /// guest code runs) for the copy.
    pub stopped: bool,
    /// Whether a migration of it is under way.
    pub migrating: bool,
    /// Whether a restore over its disk is recorded (`status.restoreOver`).
    pub restoring: bool,
    /// Whether it is being deleted.
    pub deleting: bool,
    /// Whether its pool names a backup directory.
    pub has_backup_dir: bool,
    /// The UID of the backup recorded on it (`status.backup`), if any.
    pub record: Option<&'a str>,
    /// The host's report (`status.backupReport`): the backup's UID and what it said.
    pub report: Option<(&'a str, Reported)>,
}

/// What one pass knows of a backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts<'a> {
    pub uid: &'a str,
    pub state: State,
    /// The Desktop UID the backup pinned on its first pass.
    pub pinned: Option<&'a str>,
    /// The host the backup was started on.
    pub node: Option<&'a str>,
    /// The Desktop, found by the pinned UID, else by name.
    pub desktop: Option<Desktop<'a>>,
    /// What the spec asks for, and who made it.
    pub ask: Ask,
    /// The desktop's other backups.
    pub siblings: &'a [Backup<'a>],
    /// Why the namespace's backup storage quota holds no more (a ResourceQuota's
    /// `deskvirt.io/backup-storage` reached), if it does not.
    pub over_quota: Option<String>,
    /// Seconds since the backup was made, and how long a backup may wait to start.
    pub waited_secs: i64,
    pub pending_timeout_secs: i64,
}

/// What the pass does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Stay Pending for this reason.
    Wait {
        reason: BackupReason,
        message: String,
    },
    /// Record the backup on its desktop for the host to write, starting from `since`; the
    /// backup becomes Running. `kind` is what it holds.
    Start { kind: Kind, since: Since },
    /// Running: wait for the host's report.
    Keep,
    /// End, Succeeded or Failed, with the host's report (the controller copies its figures).
    Conclude { state: State },
    /// End Failed for this reason, without a report.
    Fail {
        reason: BackupReason,
        message: String,
    },
    /// Ended: clear the record of it still on its desktop (the host stops any job it runs).
    ClearRecord,
    /// Nothing to do.
    Nothing,
}

/// Decides the pass.
pub fn decide(f: &Facts<'_>) -> Decision {
    match f.state {
        State::Pending => pending(f),
        State::Running => running(f),
        State::Succeeded | State::Failed => match f.desktop {
            Some(d) if d.record == Some(f.uid) => Decision::ClearRecord,
            _ => Decision::Nothing,
        },
    }
}

fn pending(f: &Facts<'_>) -> Decision {
    let wait = |reason: BackupReason, message: String| {
        if f.waited_secs > f.pending_timeout_secs {
            Decision::Fail {
                reason: BackupReason::PendingTimeout,
                message: format!(
                    "waited more than {}s to start: {message}",
                    f.pending_timeout_secs
                ),
            }
        } else {
            Decision::Wait { reason, message }
        }
    };
    let Some(d) = f.desktop else {
        return match f.pinned {
            Some(uid) => Decision::Fail {
                reason: BackupReason::DesktopGone,
                message: format!("the desktop (uid {uid}) was deleted"),
            },
            None => wait(
                BackupReason::DesktopNotFound,
                "no desktop of that name in this namespace".into(),
            ),
        };
    };
    if f.pinned.is_some_and(|p| p != d.uid) {
        return Decision::Fail {
            reason: BackupReason::DesktopGone,
            message: "the desktop was deleted and made again under its name".into(),
        };
    }
    if d.deleting {
        return Decision::Fail {
            reason: BackupReason::DesktopDeleting,
            message: "the desktop is being deleted".into(),
        };
    }
    if !d.has_backup_dir {
        return wait(
            BackupReason::NoBackupDir,
            "the desktop's pool sets no spec.backup.dir".into(),
        );
    }
    let Some(node) = d.node else {
        return wait(
            BackupReason::NotBound,
            "the desktop is not bound to a host".into(),
        );
    };
    if !d.host_ready {
        return wait(
            BackupReason::HostNotReady,
            format!("host {node} is not heartbeating"),
        );
    }
    if d.migrating {
        return wait(
            BackupReason::Migrating,
            "the desktop is moving to another host".into(),
        );
    }
    if !d.running && !d.stopped {
        return wait(
            BackupReason::NotRunning,
            "the desktop neither runs nor is stopped (it is starting, or suspended with its \
             memory saved); it is backed up once it runs, or once it is stopped \
             (spec.power: Off)"
                .into(),
        );
    }
    if d.restoring {
        return wait(
            BackupReason::Busy,
            "a restore over the desktop's disk is under way (a DesktopRestore)".into(),
        );
    }
    if let Some(other) = d.record.filter(|r| *r != f.uid) {
        return wait(
            BackupReason::Busy,
            format!("the host still writes (or ends) backup {other}"),
        );
    }
    if let Some(why) = &f.over_quota {
        return wait(BackupReason::QuotaExceeded, why.clone());
    }
    match next(f.siblings, f.ask) {
        Err(Wait::Busy { running }) => wait(
            BackupReason::Busy,
            format!("backup {running} of the desktop is being written"),
        ),
        Ok(since) => Decision::Start {
            kind: if since == Since::Nothing {
                Kind::Full
            } else {
                Kind::Incremental
            },
            since,
        },
    }
}

fn running(f: &Facts<'_>) -> Decision {
    let Some(d) = f.desktop.filter(|d| f.pinned.is_none_or(|p| p == d.uid)) else {
        return Decision::Fail {
            reason: BackupReason::DesktopGone,
            message: "the desktop was deleted while its backup was written".into(),
        };
    };
    match d.report {
        Some((uid, Reported::Completed)) if uid == f.uid => {
            return Decision::Conclude {
                state: State::Succeeded,
            };
        }
        Some((uid, Reported::Failed)) if uid == f.uid => {
            return Decision::Conclude {
                state: State::Failed,
            };
        }
        _ => {}
    }
    if d.record != Some(f.uid) {
        return Decision::Fail {
            reason: BackupReason::HostLost,
            message: "the desktop no longer records this backup, and its host reported no end"
                .into(),
        };
    }
    if d.node != f.node {
        return Decision::Fail {
            reason: BackupReason::HostLost,
            message: format!(
                "the desktop left host {} while its backup was written",
                f.node.unwrap_or("(none)")
            ),
        };
    }
    if !d.host_ready {
        return Decision::Fail {
            reason: BackupReason::HostLost,
            message: format!(
                "host {} stopped heartbeating while it wrote the backup; the next backup starts \
                 from the last one that succeeded",
                f.node.unwrap_or("(none)")
            ),
        };
    }
    Decision::Keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::Origin;

    fn desktop() -> Desktop<'static> {
        Desktop {
            uid: "d1",
            node: Some("host-a"),
            host_ready: true,
            running: true,
            stopped: false,
            migrating: false,
            restoring: false,
            deleting: false,
            has_backup_dir: true,
            record: None,
            report: None,
        }
    }

    #[test]
    fn a_stopped_desktop_is_backed_up_and_one_that_is_neither_waits() {
        let stopped = Desktop {
            running: false,
            stopped: true,
            ..desktop()
        };
        assert!(
            matches!(decide(&facts(Some(stopped), &[])), Decision::Start { .. }),
            "{:?}",
            decide(&facts(Some(stopped), &[]))
        );
    }

    fn facts<'a>(d: Option<Desktop<'a>>, siblings: &'a [Backup<'a>]) -> Facts<'a> {
        Facts {
            uid: "b2",
            state: State::Pending,
            pinned: None,
            node: None,
            desktop: d,
            ask: Ask {
                kind: None,
                new_chain: false,
                origin: Origin::User,
            },
            siblings,
            over_quota: None,
            waited_secs: 5,
            pending_timeout_secs: 600,
        }
    }

    fn backup(name: &str, state: State) -> Backup<'_> {
        Backup {
            name,
            created: 1,
            kind: Kind::Incremental,
            origin: Origin::User,
            state,
            parent: None,
        }
    }

    fn reason(d: &Decision) -> Option<BackupReason> {
        match d {
            Decision::Wait { reason, .. } | Decision::Fail { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    #[test]
    fn a_first_backup_starts_from_the_disks_creation_and_a_later_one_from_the_newest_good() {
        let none: [Backup<'_>; 0] = [];
        assert_eq!(
            decide(&facts(Some(desktop()), &none)),
            Decision::Start {
                kind: Kind::Incremental,
                since: Since::Creation
            }
        );
        let one = [backup("b1", State::Succeeded)];
        assert_eq!(
            decide(&facts(Some(desktop()), &one)),
            Decision::Start {
                kind: Kind::Incremental,
                since: Since::Backup("b1".into())
            }
        );
        let mut full = facts(Some(desktop()), &one);
        full.ask.kind = Some(Kind::Full);
        assert_eq!(
            decide(&full),
            Decision::Start {
                kind: Kind::Full,
                since: Since::Nothing
            }
        );
    }

    #[test]
    fn a_pending_backup_waits_and_says_why_then_fails_past_the_timeout() {
        let none: [Backup<'_>; 0] = [];
        let cases = [
            (None, BackupReason::DesktopNotFound),
            (
                Some(Desktop {
                    has_backup_dir: false,
                    ..desktop()
                }),
                BackupReason::NoBackupDir,
            ),
            (
                Some(Desktop {
                    node: None,
                    ..desktop()
                }),
                BackupReason::NotBound,
            ),
            (
                Some(Desktop {
                    host_ready: false,
                    ..desktop()
                }),
                BackupReason::HostNotReady,
            ),
            (
                Some(Desktop {
                    migrating: true,
                    ..desktop()
                }),
                BackupReason::Migrating,
            ),
            (
                Some(Desktop {
                    running: false,
                    ..desktop()
                }),
                BackupReason::NotRunning,
            ),
            (
                Some(Desktop {
                    record: Some("b1"),
                    ..desktop()
                }),
                BackupReason::Busy,
            ),
            (
                Some(Desktop {
                    restoring: true,
                    ..desktop()
                }),
                BackupReason::Busy,
            ),
        ];
        for (d, want) in cases {
            let f = facts(d, &none);
            let got = decide(&f);
            assert!(matches!(got, Decision::Wait { .. }), "{want}: {got:?}");
            assert_eq!(reason(&got), Some(want));
            let late = Facts {
                waited_secs: 601,
                ..f
            };
            let got = decide(&late);
            assert!(matches!(got, Decision::Fail { .. }), "{want}: {got:?}");
            assert_eq!(reason(&got), Some(BackupReason::PendingTimeout));
        }
        let full = Facts {
            over_quota: Some("ResourceQuota q allows 1 MiB".into()),
            ..facts(Some(desktop()), &none)
        };
        assert_eq!(reason(&decide(&full)), Some(BackupReason::QuotaExceeded));
        let busy = [backup("b1", State::Running)];
        assert_eq!(
            reason(&decide(&facts(Some(desktop()), &busy))),
            Some(BackupReason::Busy)
        );
    }

    #[test]
    fn a_pinned_desktop_deleted_or_made_again_fails_the_backup() {
        let none: [Backup<'_>; 0] = [];
        let gone = Facts {
            pinned: Some("d0"),
            ..facts(None, &none)
        };
        assert_eq!(reason(&decide(&gone)), Some(BackupReason::DesktopGone));
        let again = Facts {
            pinned: Some("d0"),
            ..facts(Some(desktop()), &none)
        };
        assert_eq!(reason(&decide(&again)), Some(BackupReason::DesktopGone));
        let deleting = facts(
            Some(Desktop {
                deleting: true,
                ..desktop()
            }),
            &none,
        );
        assert_eq!(
            reason(&decide(&deleting)),
            Some(BackupReason::DesktopDeleting)
        );
    }

    #[test]
    fn a_running_backup_ends_with_its_own_report_only() {
        let none: [Backup<'_>; 0] = [];
        let run = |d: Desktop<'static>| Facts {
            state: State::Running,
            pinned: Some("d1"),
            node: Some("host-a"),
            ..facts(Some(d), &none)
        };
        let recorded = Desktop {
            record: Some("b2"),
            ..desktop()
        };
        assert_eq!(decide(&run(recorded)), Decision::Keep);
        // Another backup's report is not this one's.
        let other = Desktop {
            report: Some(("b1", Reported::Completed)),
            ..recorded
        };
        assert_eq!(decide(&run(other)), Decision::Keep);
        let done = Desktop {
            report: Some(("b2", Reported::Completed)),
            ..recorded
        };
        assert_eq!(
            decide(&run(done)),
            Decision::Conclude {
                state: State::Succeeded
            }
        );
        let failed = Desktop {
            report: Some(("b2", Reported::Failed)),
            ..recorded
        };
        assert_eq!(
            decide(&run(failed)),
            Decision::Conclude {
                state: State::Failed
            }
        );
    }

    #[test]
    fn a_host_lost_or_left_mid_backup_fails_it() {
        let none: [Backup<'_>; 0] = [];
        let run = |d: Desktop<'static>| Facts {
            state: State::Running,
            pinned: Some("d1"),
            node: Some("host-a"),
            ..facts(Some(d), &none)
        };
        let recorded = Desktop {
            record: Some("b2"),
            ..desktop()
        };
        for d in [
            Desktop {
                host_ready: false,
                ..recorded
            },
            Desktop {
                node: Some("host-b"),
                ..recorded
            },
            Desktop {
                record: None,
                ..recorded
            },
        ] {
            assert_eq!(reason(&decide(&run(d))), Some(BackupReason::HostLost));
        }
        let gone = Facts {
            desktop: None,
            ..run(recorded)
        };
        assert_eq!(reason(&decide(&gone)), Some(BackupReason::DesktopGone));
    }

    #[test]
    fn an_ended_backup_clears_only_its_own_record() {
        let none: [Backup<'_>; 0] = [];
        for state in [State::Succeeded, State::Failed] {
            let mine = Facts {
                state,
                ..facts(
                    Some(Desktop {
                        record: Some("b2"),
                        ..desktop()
                    }),
                    &none,
                )
            };
            assert_eq!(decide(&mine), Decision::ClearRecord);
            let other = Facts {
                state,
                ..facts(
                    Some(Desktop {
                        record: Some("b3"),
                        ..desktop()
                    }),
                    &none,
                )
            };
            assert_eq!(decide(&other), Decision::Nothing);
        }
    }
}
