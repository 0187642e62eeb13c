//! What draining a host does next: which of its desktops get a migration now (connected ones
//! first, never more at once than the host's migration limit), which failed drain migrations
//! are cleared for another try, and what still keeps the host from being empty, desktop by
//! desktop, with the reason. On shared storage, running and suspended desktops move live and
//! stopped ones are re-bound by the Desktop pass ([`rebind_target_wanted`]). Without it,
//! stopped and suspended desktops move Cold with their disk copied, and running ones are left
//! to an admin (a Cold move reboots them).

use crate::reasons::DrainReason;

/// Where a desktop's domain is, as its host reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    /// The domain runs (the host's `Running` condition is True).
    Running,
    /// The domain is shut off or not defined, and the desktop does not want it running now
    /// (`power: Off`, or reclaimed by the idle policy and released).
    Stopped,
    /// Anything between: starting, stopping, or failing to start.
    Settling,
}

/// A desktop bound to the draining host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desktop<'a> {
    /// `namespace/name`.
    pub key: &'a str,
    pub power: Power,
    /// A SPICE client is connected: it moves first.
    pub connected: bool,
    /// Suspended by the idle policy with its memory saved on this host.
    pub memory_saved: bool,
    /// Dedicated CPUs or passed-through devices tie it to this host.
    pub pinned_to_host: bool,
    /// A migration (the drain's or a user's) is recorded on it (`status.migration`).
    pub migrating: bool,
}

impl Desktop<'_> {
    /// Whether a drain's migration moves it. On shared storage: its domain runs, or its memory
    /// is saved on the host (the move restores it, moves it, and saves it again at the target).
    /// Without: it is stopped or its memory is saved, and its disk is copied along.
    fn movable(&self, shared_storage: bool) -> bool {
        if shared_storage {
            self.power == Power::Running || self.memory_saved
        } else {
            self.power == Power::Stopped || self.memory_saved
        }
    }
}

/// Where a migration the drain made stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Not ended yet.
    Open,
    Succeeded,
    /// Ended Failed, `age_secs` ago, with its condition's reason and message.
    Failed {
        reason: &'a str,
        message: &'a str,
        age_secs: i64,
    },
}

/// A DesktopMigration the drain made for this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migration<'a> {
    pub name: &'a str,
    /// The `namespace/name` of the Desktop it moves.
    pub desktop: &'a str,
    pub outcome: Outcome<'a>,
}

/// Everything [`plan`] decides on.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub desktops: &'a [Desktop<'a>],
    pub migrations: &'a [Migration<'a>],
    /// The pool declares its storage reachable from every host.
    pub shared_storage: bool,
    /// Migrations one host may be in at once (leaving and arriving together).
    pub per_host: u32,
    /// How long a failed drain migration is shown before the drain tries again.
    pub retry_after_secs: i64,
}

/// A desktop that keeps the host from being empty, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Left {
    pub desktop: String,
    pub reason: DrainReason,
    pub message: String,
}

/// What a drain pass does, and what it reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Desktops (`namespace/name`) to make a live migration for now, in order.
    pub create: Vec<String>,
    /// Failed drain migrations to delete, so that the next pass makes a new one.
    pub delete: Vec<String>,
    /// Every desktop still bound to the host, with why (in the order of `Facts::desktops`).
    pub left: Vec<Left>,
}

impl Plan {
    /// The host holds no desktop any more.
    pub fn drained(&self) -> bool {
        self.left.is_empty()
    }

    /// How many desktops are left for `reason`.
    pub fn count(&self, reason: DrainReason) -> usize {
        self.left.iter().filter(|l| l.reason == reason).count()
    }

    /// One line for the status: how many are left, by reason.
    pub fn summary(&self) -> String {
        if self.drained() {
            return "no desktop is bound to the host".into();
        }
        let parts: Vec<String> = DrainReason::ALL
            .iter()
            .filter_map(|r| {
                let n = self.count(*r);
                (n > 0).then(|| format!("{n} {r}"))
            })
            .collect();
        let n = self.left.len();
        let noun = if n == 1 { "desktop" } else { "desktops" };
        format!("{n} {noun} left: {}", parts.join(", "))
    }
}

/// Decides a drain pass.
pub fn plan(f: &Facts<'_>) -> Plan {
    let mut out = Plan::default();
    // Only migrations of desktops still bound here take a slot: one that names anything else
    // (a look-alike a tenant made, say) holds no move of this host.
    let open = f
        .migrations
        .iter()
        .filter(|m| m.outcome == Outcome::Open)
        .filter(|m| f.desktops.iter().any(|d| d.key == m.desktop))
        .count();
    let mut slots = (f.per_host as usize).saturating_sub(open);
    let mut wanting: Vec<(usize, &Desktop<'_>)> = Vec::new();
    for d in f.desktops {
        let ours = f.migrations.iter().find(|m| m.desktop == d.key);
        let (reason, message) = match (d, ours.map(|m| (m.name, m.outcome))) {
            (d, _) if d.migrating => (DrainReason::Migrating, "a migration is moving it".into()),
            (_, Some((name, Outcome::Open | Outcome::Succeeded))) => (
                DrainReason::Migrating,
                format!("migration {name} is moving it"),
            ),
            (d, _) if d.pinned_to_host => (
                DrainReason::PinnedToHost,
                "dedicated CPUs or passed-through devices tie it to this host; stop or delete it"
                    .into(),
            ),
            (d, _) if !f.shared_storage && d.power == Power::Running && !d.memory_saved => (
                DrainReason::StorageNotShared,
                "it runs, and the pool's storage is not shared, so it cannot move live: stop it \
                 (a stopped desktop moves with its disk), or move it with a Cold \
                 DesktopMigration (it is shut down and boots on the other host)"
                    .into(),
            ),
            (
                d,
                Some((
                    name,
                    Outcome::Failed {
                        reason,
                        message,
                        age_secs,
                    },
                )),
            ) if d.movable(f.shared_storage) => {
                let wait = f.retry_after_secs - age_secs;
                let then = if wait <= 0 {
                    out.delete.push(name.to_string());
                    "tried again now".to_string()
                } else {
                    format!("tried again in {wait} s")
                };
                (
                    DrainReason::MigrationFailed,
                    format!("migration {name} failed ({reason}: {message}); {then}"),
                )
            }
            (d, _) if d.movable(f.shared_storage) => {
                wanting.push((out.left.len(), d));
                (DrainReason::Migrating, String::new())
            }
            (
                Desktop {
                    power: Power::Stopped,
                    ..
                },
                _,
            ) => (
                DrainReason::Rebinding,
                "not running; it is bound to another host of the pool".into(),
            ),
            (_, _) => (
                DrainReason::Settling,
                "its domain is starting or stopping; it moves once that settles".into(),
            ),
        };
        out.left.push(Left {
            desktop: d.key.to_string(),
            reason,
            message,
        });
    }
    // Connected desktops first: their users feel the drain; the rest by name.
    wanting.sort_by_key(|(_, d)| (!d.connected, d.key));
    for (i, d) in wanting {
        let message = if slots > 0 {
            slots -= 1;
            out.create.push(d.key.to_string());
            "a live migration is made for it".to_string()
        } else {
            format!("waits for one of the host's {} migration slots", f.per_host)
        };
        if let Some(l) = out.left.get_mut(i) {
            l.message = message;
        }
    }
    out
}

/// Whether the Desktop pass should bind a desktop of a draining host elsewhere: it is
/// stopped, no migration is recorded on it, no memory is saved for it on the host, nothing ties
/// it to the host, and its disk is reachable from the others.
pub fn rebind_target_wanted(d: &Desktop<'_>, shared_storage: bool) -> bool {
    d.power == Power::Stopped
        && !d.migrating
        && !d.memory_saved
        && !d.pinned_to_host
        && shared_storage
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desktop(key: &'static str) -> Desktop<'static> {
        Desktop {
            key,
            power: Power::Running,
            connected: false,
            memory_saved: false,
            pinned_to_host: false,
            migrating: false,
        }
    }

    fn facts<'a>(desktops: &'a [Desktop<'a>], migrations: &'a [Migration<'a>]) -> Facts<'a> {
        Facts {
            desktops,
            migrations,
            shared_storage: true,
            per_host: 2,
            retry_after_secs: 60,
        }
    }

    #[test]
    fn an_empty_host_is_drained() {
        let p = plan(&facts(&[], &[]));
        assert!(p.drained());
        assert!(p.create.is_empty() && p.delete.is_empty());
        assert_eq!(p.summary(), "no desktop is bound to the host");
    }

    #[test]
    fn connected_desktops_move_first_within_the_hosts_limit() {
        let mut b = desktop("ns/b");
        b.connected = true;
        let ds = [desktop("ns/a"), b, desktop("ns/c")];
        let p = plan(&facts(&ds, &[]));
        assert_eq!(p.create, ["ns/b", "ns/a"]);
        assert_eq!(p.count(DrainReason::Migrating), 3);
        let c = p.left.iter().find(|l| l.desktop == "ns/c");
        assert!(c.is_some_and(|l| l.message.contains("2 migration slots")));
        assert_eq!(p.summary(), "3 desktops left: 3 Migrating");
    }

    #[test]
    fn open_migrations_take_slots_and_are_not_made_twice() {
        let ds = [desktop("ns/a"), desktop("ns/b"), desktop("ns/c")];
        let ms = [Migration {
            name: "m-a",
            desktop: "ns/a",
            outcome: Outcome::Open,
        }];
        let p = plan(&facts(&ds, &ms));
        assert_eq!(p.create, ["ns/b"], "one slot of two is taken");
        let ghosts = [
            Migration {
                name: "g1",
                desktop: "ns/ghost",
                outcome: Outcome::Open,
            },
            Migration {
                name: "g2",
                desktop: "other/ghost",
                outcome: Outcome::Open,
            },
        ];
        let p = plan(&facts(&ds, &ghosts));
        assert_eq!(p.create, ["ns/a", "ns/b"], "look-alikes take no slot");
    }

    #[test]
    fn a_desktop_a_user_migrates_is_left_to_that_migration() {
        let mut a = desktop("ns/a");
        a.migrating = true;
        let p = plan(&facts(&[a], &[]));
        assert!(p.create.is_empty());
        assert_eq!(p.left[0].reason, DrainReason::Migrating);
    }

    #[test]
    fn what_cannot_move_is_named_with_its_reason() {
        let mut pinned = desktop("ns/pinned");
        pinned.pinned_to_host = true;
        let mut stopped = desktop("ns/stopped");
        stopped.power = Power::Stopped;
        let mut settling = desktop("ns/settling");
        settling.power = Power::Settling;
        let ds = [pinned, stopped, settling];
        let p = plan(&facts(&ds, &[]));
        let reasons: Vec<_> = p.left.iter().map(|l| l.reason).collect();
        assert_eq!(
            reasons,
            [
                DrainReason::PinnedToHost,
                DrainReason::Rebinding,
                DrainReason::Settling
            ]
        );
        assert!(p.create.is_empty());
        assert!(rebind_target_wanted(&stopped, true));
        assert!(!rebind_target_wanted(&stopped, false));
        assert!(!rebind_target_wanted(&settling, true));
    }

    #[test]
    fn a_suspended_desktop_moves_with_its_memory_and_is_never_rebound() {
        let mut saved = desktop("ns/saved");
        saved.power = Power::Stopped;
        saved.memory_saved = true;
        let ds = [saved];
        let p = plan(&facts(&ds, &[]));
        assert_eq!(p.create, ["ns/saved"]);
        assert_eq!(p.left[0].reason, DrainReason::Migrating);
        assert!(!rebind_target_wanted(&saved, true));
        let failed = [Migration {
            name: "saved-drain-1",
            desktop: "ns/saved",
            outcome: Outcome::Failed {
                reason: "HostFailed",
                message: "x",
                age_secs: 61,
            },
        }];
        let p = plan(&facts(&ds, &failed));
        assert_eq!(p.delete, ["saved-drain-1"]);
        assert_eq!(p.left[0].reason, DrainReason::MigrationFailed);
    }

    #[test]
    fn without_shared_storage_stopped_and_suspended_desktops_move_and_running_ones_wait() {
        let mut stopped = desktop("ns/s");
        stopped.power = Power::Stopped;
        let mut saved = desktop("ns/z");
        saved.power = Power::Stopped;
        saved.memory_saved = true;
        let ds = [desktop("ns/r"), stopped, saved];
        let mut f = facts(&ds, &[]);
        f.shared_storage = false;
        let p = plan(&f);
        assert_eq!(p.create, ["ns/s", "ns/z"]);
        assert_eq!(p.count(DrainReason::StorageNotShared), 1);
        let r = p.left.iter().find(|l| l.desktop == "ns/r");
        assert!(r.is_some_and(|l| l.message.contains("Cold DesktopMigration")));
        assert!(
            !rebind_target_wanted(&ds[1], false),
            "no re-bind without its disk"
        );
    }

    #[test]
    fn a_failed_migration_is_shown_then_cleared_for_another_try() {
        let ds = [desktop("ns/a")];
        let failed = |age_secs| {
            [Migration {
                name: "m-a",
                desktop: "ns/a",
                outcome: Outcome::Failed {
                    reason: "HostFailed",
                    message: "target refused",
                    age_secs,
                },
            }]
        };
        let young = failed(10);
        let p = plan(&facts(&ds, &young));
        assert!(p.delete.is_empty() && p.create.is_empty());
        assert_eq!(p.left[0].reason, DrainReason::MigrationFailed);
        assert!(
            p.left[0].message.contains("in 50 s"),
            "{}",
            p.left[0].message
        );
        let old = failed(61);
        let p = plan(&facts(&ds, &old));
        assert_eq!(p.delete, ["m-a"]);
        assert!(p.create.is_empty(), "made anew once the failed one is gone");
    }
}
