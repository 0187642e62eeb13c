//! Whether a migration may go ahead now, before any host is looked at: its desktop is the one
//! it was made for, bound, running (or suspended with its memory saved) and movable, in a pool
//! whose storage every host reaches (Live) or by copying its disk (Cold), and no older migration
//! of it is under way. A refusal says whether waiting can help
//! ([`MigrationReason::ends`]).

use super::MigrationMode;
use crate::reasons::MigrationReason;

/// What a migration's pass knows of its desktop, read from the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desktop<'a> {
    /// The Desktop's UID now.
    pub uid: &'a str,
    /// The host it is bound to, once bound.
    pub node: Option<&'a str>,
    /// Its domain runs (the host's `Running` condition is True).
    pub running: bool,
    /// Suspended by the idle policy with its memory saved on its host (and confirmed): it
    /// moves with that memory (restored paused at the source, moved, saved again at the
    /// target).
    pub suspended: bool,
    /// Powered off (`spec.power: Off`, confirmed stopped by its host, no idle hold).
    pub stopped: bool,
    /// It is being deleted.
    pub deleting: bool,
    /// Its vCPUs are pinned to the host's threads, or devices are passed through to it.
    pub pinned_to_host: bool,
    /// A backup of it is being written (`status.backup`), or a restore over its disk is
    /// recorded (`status.restoreOver`): the host's job on its disk and a move cannot run at
    /// once.
    pub backing_up: bool,
    /// It is the template of a DesktopImage version not captured yet (its host reads its disk).
    pub capturing: bool,
}

/// Everything [`admit`] decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts<'a> {
    pub mode: MigrationMode,
    /// The Desktop named, when it exists.
    pub desktop: Option<Desktop<'a>>,
    /// The Desktop UID the migration recorded on its first pass, if any.
    pub pinned_uid: Option<&'a str>,
    /// The pool declares its storage reachable from every host (`storage.shared`).
    pub shared_storage: bool,
    /// An older migration of the same desktop has not ended.
    pub older_active: bool,
    /// A move into another pool (`spec.targetPool`): whether that pool exists, admits the
    /// desktop's namespace and accepts its spec. `None` for a move within its pool.
    pub other_pool: Option<bool>,
}

/// Whether the migration may look for a target now.
pub fn admit(f: &Facts<'_>) -> Result<(), MigrationReason> {
    use MigrationReason as R;
    let Some(d) = f.desktop else {
        return Err(match f.pinned_uid {
            Some(_) => R::DesktopDeleted,
            None => R::DesktopNotFound,
        });
    };
    if f.pinned_uid.is_some_and(|uid| uid != d.uid) {
        return Err(R::DesktopReplaced);
    }
    if d.deleting {
        return Err(R::DesktopDeleted);
    }
    if f.older_active {
        return Err(R::AlreadyMigrating);
    }
    if d.pinned_to_host {
        return Err(R::PinnedToHost);
    }
    match f.mode {
        // A move into another pool copies the disk into that pool's storage and changes the
        // desktop's MAC: the guest reboots there.
        MigrationMode::Live if f.other_pool.is_some() => return Err(R::ModeNotSupported),
        MigrationMode::Live if !f.shared_storage => return Err(R::StorageNotShared),
        MigrationMode::Live => {}
        // Without shared storage a Cold move copies the disk to the target.
        MigrationMode::Cold => {}
    }
    if d.node.is_none() {
        return Err(R::DesktopNotBound);
    }
    // A Cold move on shared storage shuts the guest down, which would lose a suspended
    // desktop's saved memory; a stopped one needs no move there (a drain re-binds it). One that
    // copies the disk takes a stopped desktop too, and a suspended one with its saved memory.
    if f.other_pool.is_some() && d.suspended {
        return Err(R::MemorySaved);
    }
    let movable = match f.mode {
        _ if f.other_pool.is_some() => d.running || d.stopped,
        MigrationMode::Live => d.running || d.suspended,
        MigrationMode::Cold if f.shared_storage => d.running,
        MigrationMode::Cold => d.running || d.stopped || d.suspended,
    };
    if !movable {
        return Err(R::DesktopNotRunning);
    }
    if d.backing_up {
        return Err(R::BackupInProgress);
    }
    if d.capturing {
        return Err(R::CaptureInProgress);
    }
    if f.other_pool == Some(false) {
        return Err(R::PoolNotAllowed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> Facts<'static> {
        Facts {
            mode: MigrationMode::Live,
            desktop: Some(Desktop {
                uid: "u1",
                node: Some("h1"),
                running: true,
                suspended: false,
                stopped: false,
                deleting: false,
                pinned_to_host: false,
                backing_up: false,
                capturing: false,
            }),
            pinned_uid: Some("u1"),
            shared_storage: true,
            older_active: false,
            other_pool: None,
        }
    }

    fn with(change: impl FnOnce(&mut Facts<'static>)) -> Result<(), MigrationReason> {
        let mut f = running();
        change(&mut f);
        admit(&f)
    }

    fn desktop(change: impl FnOnce(&mut Desktop<'static>)) -> Result<(), MigrationReason> {
        with(|f| {
            if let Some(d) = f.desktop.as_mut() {
                change(d);
            }
        })
    }

    #[test]
    fn a_running_bound_desktop_in_a_shared_pool_may_move() {
        assert_eq!(admit(&running()), Ok(()));
        assert_eq!(with(|f| f.pinned_uid = None), Ok(()), "first pass");
    }

    #[test]
    fn a_running_desktop_in_a_shared_pool_may_move_cold() {
        assert_eq!(with(|f| f.mode = MigrationMode::Cold), Ok(()));
        // Without shared storage a Cold move copies the disk; Live is refused.
        let copied = with(|f| {
            f.mode = MigrationMode::Cold;
            f.shared_storage = false;
        });
        assert_eq!(copied, Ok(()));
        // Copying the disk, a stopped or suspended desktop moves too.
        for (stopped, suspended) in [(true, false), (false, true)] {
            let copied = with(|f| {
                f.mode = MigrationMode::Cold;
                f.shared_storage = false;
                if let Some(d) = f.desktop.as_mut() {
                    (d.running, d.stopped, d.suspended) = (false, stopped, suspended);
                }
            });
            assert_eq!(copied, Ok(()), "stopped {stopped}, suspended {suspended}");
        }
    }

    #[test]
    fn a_suspended_desktop_moves_with_its_saved_memory() {
        let suspended = desktop(|d| {
            d.running = false;
            d.suspended = true;
        });
        assert_eq!(suspended, Ok(()));
    }

    #[test]
    fn what_waiting_can_fix_waits_and_what_it_cannot_ends_the_migration() {
        let cases = [
            (with(|f| f.desktop = None), MigrationReason::DesktopDeleted),
            (
                with(|f| {
                    f.pinned_uid = None;
                    f.desktop = None;
                }),
                MigrationReason::DesktopNotFound,
            ),
            (desktop(|d| d.uid = "u2"), MigrationReason::DesktopReplaced),
            (
                desktop(|d| d.deleting = true),
                MigrationReason::DesktopDeleted,
            ),
            (
                with(|f| f.older_active = true),
                MigrationReason::AlreadyMigrating,
            ),
            (
                desktop(|d| d.pinned_to_host = true),
                MigrationReason::PinnedToHost,
            ),
            (
                desktop(|d| d.backing_up = true),
                MigrationReason::BackupInProgress,
            ),
            (
                desktop(|d| d.capturing = true),
                MigrationReason::CaptureInProgress,
            ),
            (
                with(|f| f.shared_storage = false),
                MigrationReason::StorageNotShared,
            ),
            (
                with(|f| {
                    f.mode = MigrationMode::Cold;
                    if let Some(d) = f.desktop.as_mut() {
                        d.running = false;
                        d.suspended = true;
                    }
                }),
                MigrationReason::DesktopNotRunning,
            ),
            (desktop(|d| d.node = None), MigrationReason::DesktopNotBound),
            (
                desktop(|d| d.running = false),
                MigrationReason::DesktopNotRunning,
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, Err(want));
        }
        let waits = [
            MigrationReason::DesktopNotFound,
            MigrationReason::DesktopNotBound,
            MigrationReason::DesktopNotRunning,
        ];
        for r in waits {
            assert!(!r.ends(), "{r} waits");
        }
        for r in [
            MigrationReason::DesktopReplaced,
            MigrationReason::StorageNotShared,
        ] {
            assert!(r.ends(), "{r} ends it");
        }
    }

    #[test]
    fn a_move_to_another_pool_is_cold_and_takes_running_or_stopped_desktops_it_may_use() {
        let to_pool = |allowed: bool, change: fn(&mut Desktop<'static>)| {
            with(|f| {
                f.mode = MigrationMode::Cold;
                f.other_pool = Some(allowed);
                if let Some(d) = f.desktop.as_mut() {
                    change(d);
                }
            })
        };
        assert_eq!(to_pool(true, |_| {}), Ok(()), "running");
        let stopped = to_pool(true, |d| (d.running, d.stopped) = (false, true));
        assert_eq!(stopped, Ok(()));
        // Shared storage or not, the disk is copied into the other pool's.
        let not_shared = with(|f| {
            f.mode = MigrationMode::Cold;
            f.other_pool = Some(true);
            f.shared_storage = false;
        });
        assert_eq!(not_shared, Ok(()));
        let saved = to_pool(true, |d| (d.running, d.suspended) = (false, true));
        assert_eq!(saved, Err(MigrationReason::MemorySaved));
        assert!(!MigrationReason::MemorySaved.ends(), "waking it helps");
        let starting = to_pool(true, |d| d.running = false);
        assert_eq!(starting, Err(MigrationReason::DesktopNotRunning));
        assert_eq!(to_pool(false, |_| {}), Err(MigrationReason::PoolNotAllowed));
        assert!(
            !MigrationReason::PoolNotAllowed.ends(),
            "the pool may change"
        );
        let live = with(|f| f.other_pool = Some(true));
        assert_eq!(live, Err(MigrationReason::ModeNotSupported));
    }
}
