//! Decides a desktop's backup chain (docs/design/backup.md): what a new backup starts from
//! (the checkpoint of the chain's newest good backup, the disk's creation bitmap, or nothing
//! for a flattened full copy), that one backup of a desktop runs at a time, which backups a
//! restore needs (root first), and which backups a pool's retention deletes: only the ones a
//! schedule made, never one that a kept backup depends on. An incremental chain therefore only
//! shrinks from its root once a newer root exists (a full backup, or the oldest kept backup
//! rebased onto the base image, which is not decided here yet).

pub mod pass;
pub mod restore_over;
pub mod schedule;

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The bitmap the agent adds to every new overlay: what changed since the disk was made.
pub const CREATION_CHECKPOINT: &str = "c0";

/// What a backup holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Kind {
    /// The whole disk, base image included, flattened: a file of its own that needs no other.
    Full,
    /// Only the blocks written since its parent backup (or, for the first, since the disk was
    /// made from its base image).
    Incremental,
}

/// Who asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A user's object: kept until the user deletes it.
    User,
    /// The pool's schedule: retention may delete it.
    Schedule,
}

/// Where a backup is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum State {
    /// Not started.
    #[default]
    Pending,
    /// Being written.
    Running,
    /// Written and verified.
    Succeeded,
    /// Incomplete or unverified: nothing may chain on it.
    Failed,
}

impl State {
    /// The phase as the API writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    /// Whether the backup has ended (nothing changes it any more).
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// One backup of the desktop, as its object says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backup<'a> {
    /// Its identity: the object's UID (a name can be deleted and made again).
    pub name: &'a str,
    /// Creation time, seconds since the epoch (orders the chain).
    pub created: i64,
    pub kind: Kind,
    pub origin: Origin,
    pub state: State,
    /// The identity of the backup it holds the changes since; `None` for a full one, or for
    /// an incremental since the disk was made.
    pub parent: Option<&'a str>,
}

/// What a new backup starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Since {
    /// Nothing: the whole disk, flattened.
    Nothing,
    /// The disk's creation: the overlay's own blocks, on top of the base image.
    Creation,
    /// The backup of that name (its checkpoint).
    Backup(String),
}

/// Why a backup does not start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Another backup of the desktop is being written.
    Busy { running: String },
}

/// What a backup asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask {
    /// `None`: incremental when there is a chain to extend.
    pub kind: Option<Kind>,
    /// An incremental that starts a new chain: everything since the disk was made.
    pub new_chain: bool,
    /// A scheduled backup extends only the schedule's chain, so that a user's backup never
    /// waits for retention to let go of a scheduled child.
    pub origin: Origin,
}

/// What the next backup of the desktop is. An incremental extends the newest succeeded backup
/// (a scheduled one: the newest scheduled one); with none, or asked for a new chain, it holds
/// what changed since the disk was made.
pub fn next(backups: &[Backup<'_>], ask: Ask) -> Result<Since, Wait> {
    if let Some(b) = backups.iter().find(|b| b.state == State::Running) {
        return Err(Wait::Busy {
            running: b.name.to_string(),
        });
    }
    if ask.kind == Some(Kind::Full) {
        return Ok(Since::Nothing);
    }
    if ask.new_chain {
        return Ok(Since::Creation);
    }
    // Newest first; backups made in the same second are told apart by how far down their
    // chain they are (a child is newer than its parent), then by identity.
    let chains = Chains::of(backups);
    Ok(backups
        .iter()
        .filter(|b| b.state == State::Succeeded)
        .filter(|b| ask.origin == Origin::User || b.origin == Origin::Schedule)
        .max_by_key(|b| (b.created, chains.depth(b.name), b.name))
        .map_or(Since::Creation, |tip| Since::Backup(tip.name.to_string())))
}

/// Why a backup cannot be restored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("backup {0} does not exist")]
    Missing(String),
    #[error("backup {0} has not succeeded")]
    NotSucceeded(String),
    #[error("the chain of backup {0} loops")]
    Loop(String),
}

/// The backups that restoring `target` reads, root first: `target` and its parents.
pub fn chain<'a>(backups: &[Backup<'a>], target: &str) -> Result<Vec<&'a str>, Broken> {
    let by_name: BTreeMap<&str, &Backup<'a>> = backups.iter().map(|b| (b.name, b)).collect();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut at = Some(target);
    while let Some(name) = at {
        let b = by_name
            .get(name)
            .ok_or_else(|| Broken::Missing(name.to_string()))?;
        if b.state != State::Succeeded {
            return Err(Broken::NotSucceeded(name.to_string()));
        }
        if !seen.insert(b.name) {
            return Err(Broken::Loop(target.to_string()));
        }
        out.push(b.name);
        at = b.parent;
    }
    out.reverse();
    Ok(out)
}

/// A pool's retention of scheduled backups, per desktop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// The newest this many scheduled backups that succeeded are kept.
    pub keep: Option<u32>,
    /// Scheduled backups older than this (seconds) go.
    pub max_age_secs: Option<i64>,
}

/// The backups retention deletes at `now`: scheduled ones past `keep` or `max_age_secs`, and
/// scheduled failures once a newer scheduled backup succeeded; never a user's, never one being
/// written, never the newest scheduled one that succeeded (age alone never leaves a desktop
/// without a backup), and never one that a kept backup needs for its restore. A failed backup
/// has no file: it needs no parent.
pub fn expired<'a>(backups: &[Backup<'a>], policy: Retention, now: i64) -> Vec<&'a str> {
    if policy.keep.is_none() && policy.max_age_secs.is_none() {
        return Vec::new();
    }
    let mut scheduled: Vec<&Backup<'a>> = backups
        .iter()
        .filter(|b| b.origin == Origin::Schedule)
        .collect();
    // Newest first.
    scheduled.sort_by_key(|b| std::cmp::Reverse((b.created, b.name)));
    let newest_good = scheduled
        .iter()
        .find(|b| b.state == State::Succeeded)
        .map(|b| b.created);
    let mut unwanted = BTreeSet::new();
    let mut good = 0u32;
    for b in &scheduled {
        let too_old = policy
            .max_age_secs
            .is_some_and(|age| now.saturating_sub(b.created) > age);
        match b.state {
            State::Succeeded => {
                good += 1;
                if (too_old && good > 1) || policy.keep.is_some_and(|k| good > k) {
                    unwanted.insert(b.name);
                }
            }
            State::Failed => {
                if too_old || newest_good.is_some_and(|t| t > b.created) {
                    unwanted.insert(b.name);
                }
            }
            State::Pending | State::Running => {}
        }
    }
    // What a kept backup with a file restores from stays.
    let chains = Chains::of(backups);
    let needed = chains.needed_by(
        backups
            .iter()
            .filter(|b| !unwanted.contains(b.name) && b.state != State::Failed)
            .map(|b| b.name),
    );
    unwanted
        .into_iter()
        .filter(|n| !needed.contains(n))
        .collect()
}

/// The backups' parent links, indexed once: what each restores through, in time linear in
/// the backups however deep their chains (a tenant may make thousands).
pub(crate) struct Chains<'a> {
    parent: BTreeMap<&'a str, Option<&'a str>>,
}

impl<'a> Chains<'a> {
    pub(crate) fn of(backups: &[Backup<'a>]) -> Self {
        Self {
            parent: backups.iter().map(|b| (b.name, b.parent)).collect(),
        }
    }

    /// Every ancestor of `names` (the backups they restore through), each walked once.
    pub(crate) fn needed_by(&self, names: impl Iterator<Item = &'a str>) -> BTreeSet<&'a str> {
        let mut needed = BTreeSet::new();
        for name in names {
            let mut at = self.parent.get(name).copied().flatten();
            while let Some(p) = at {
                // Stops at a missing parent, at one walked already (and its ancestors), and at
                // a loop.
                if !self.parent.contains_key(p) || !needed.insert(p) {
                    break;
                }
                at = self.parent.get(p).copied().flatten();
            }
        }
        needed
    }

    /// How many files restoring `name` reads (1 for a backup without a parent); a loop or a
    /// missing parent ends the count.
    pub(crate) fn depth(&self, name: &str) -> usize {
        let mut seen = BTreeSet::new();
        let mut at = Some(name);
        while let Some(n) = at {
            if !self.parent.contains_key(n) || !seen.insert(n) {
                break;
            }
            at = self.parent.get(n).copied().flatten();
        }
        seen.len()
    }
}

/// `name`'s parents, nearest first (stops at a missing one or a loop).
#[cfg(test)]
fn ancestors<'a>(backups: &[Backup<'a>], name: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut at = backups
        .iter()
        .find(|b| b.name == name)
        .and_then(|b| b.parent);
    while let Some(p) = at {
        let Some(b) = backups.iter().find(|b| b.name == p) else {
            break;
        };
        if out.contains(&b.name) {
            break;
        }
        out.push(b.name);
        at = b.parent;
    }
    out
}

/// Builders for the tests of the chain decisions.
#[cfg(test)]
pub(crate) mod testkit {
    use super::{Backup, Kind, Origin, State};

    /// A scheduled incremental that succeeded, made at `created`, on `parent`.
    pub fn scheduled<'a>(name: &'a str, created: i64, parent: Option<&'a str>) -> Backup<'a> {
        Backup {
            name,
            created,
            kind: Kind::Incremental,
            origin: Origin::Schedule,
            state: State::Succeeded,
            parent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use super::testkit::scheduled as b;

    #[test]
    fn the_first_backup_holds_what_changed_since_the_disk_was_made() {
        assert_eq!(next(&[], ask(None)), Ok(Since::Creation));
        assert_eq!(next(&[], ask(Some(Kind::Full))), Ok(Since::Nothing));
    }

    fn ask(kind: Option<Kind>) -> Ask {
        Ask {
            kind,
            new_chain: false,
            origin: Origin::User,
        }
    }

    #[test]
    fn a_new_chain_starts_from_the_disk_and_the_schedule_extends_its_own() {
        let users = Backup {
            origin: Origin::User,
            ..b("mine", 30, Some("s1"))
        };
        let all = [b("s1", 10, None), users];
        let new_chain = Ask {
            new_chain: true,
            ..ask(None)
        };
        assert_eq!(next(&all, new_chain), Ok(Since::Creation));
        assert_eq!(next(&all, ask(None)), Ok(Since::Backup("mine".into())));
        let scheduled = Ask {
            origin: Origin::Schedule,
            ..ask(None)
        };
        assert_eq!(next(&all, scheduled), Ok(Since::Backup("s1".into())));
    }

    #[test]
    fn an_incremental_extends_the_newest_good_backup_and_one_runs_at_a_time() {
        let failed = Backup {
            state: State::Failed,
            ..b("b3", 30, Some("b2"))
        };
        let all = [b("b1", 10, None), b("b2", 20, Some("b1")), failed];
        assert_eq!(next(&all, ask(None)), Ok(Since::Backup("b2".into())));
        let running = Backup {
            state: State::Running,
            ..b("b4", 40, Some("b2"))
        };
        assert_eq!(
            next(&[all[0], all[1], running], ask(Some(Kind::Full))),
            Err(Wait::Busy {
                running: "b4".into()
            })
        );
    }

    #[test]
    fn backups_made_in_the_same_second_extend_the_deepest() {
        // Identities that sort the other way round from the chain.
        let all = [
            Backup {
                state: State::Succeeded,
                ..b("z-first", 100, None)
            },
            Backup {
                state: State::Succeeded,
                ..b("a-second", 100, Some("z-first"))
            },
        ];
        assert_eq!(next(&all, ask(None)), Ok(Since::Backup("a-second".into())));
    }

    #[test]
    fn a_restore_reads_the_chain_root_first_and_refuses_a_broken_one() {
        let all = [
            b("b1", 10, None),
            b("b2", 20, Some("b1")),
            b("b3", 30, Some("b2")),
        ];
        assert_eq!(chain(&all, "b3"), Ok(vec!["b1", "b2", "b3"]));
        assert_eq!(chain(&all[1..], "b3"), Err(Broken::Missing("b1".into())));
        let failed = Backup {
            state: State::Failed,
            ..all[1]
        };
        assert_eq!(
            chain(&[all[0], failed, all[2]], "b3"),
            Err(Broken::NotSucceeded("b2".into()))
        );
        let looped = [b("x", 1, Some("y")), b("y", 2, Some("x"))];
        assert_eq!(chain(&looped, "x"), Err(Broken::Loop("x".into())));
    }

    #[test]
    fn retention_keeps_the_newest_and_what_they_restore_from() {
        // b1 ← b2 ← b3 ← b4, keep 2: b1 and b2 are past it, but b3 restores from both.
        let all = [
            b("b1", 10, None),
            b("b2", 20, Some("b1")),
            b("b3", 30, Some("b2")),
            b("b4", 40, Some("b3")),
        ];
        let keep2 = Retention {
            keep: Some(2),
            max_age_secs: None,
        };
        assert!(expired(&all, keep2, 50).is_empty());
        // A full b5 starts a new chain: keeping only it, the whole old chain goes.
        let mut with_full = all.to_vec();
        with_full.push(Backup {
            kind: Kind::Full,
            ..b("b5", 50, None)
        });
        let keep1 = Retention {
            keep: Some(1),
            max_age_secs: None,
        };
        assert_eq!(expired(&with_full, keep1, 60), vec!["b1", "b2", "b3", "b4"]);
        // Keeping two, b4 restores from all of the old chain: nothing goes.
        assert!(expired(&with_full, keep2, 60).is_empty());
    }

    #[test]
    fn retention_never_deletes_a_users_backup_nor_one_being_written() {
        let user = Backup {
            origin: Origin::User,
            ..b("mine", 1, None)
        };
        let running = Backup {
            state: State::Running,
            ..b("now", 2, None)
        };
        let policy = Retention {
            keep: Some(0),
            max_age_secs: Some(0),
        };
        assert!(expired(&[user, running], policy, 1_000).is_empty());
    }

    #[test]
    fn age_never_takes_the_newest_good_backup_and_a_failure_holds_no_parent() {
        let old = [b("b1", 10, None), b("b2", 20, Some("b1"))];
        let by_age = Retention {
            keep: None,
            max_age_secs: Some(5),
        };
        // Both are too old; b2 is the newest that succeeded and stays, and so does b1 under it.
        assert!(expired(&old, by_age, 1_000).is_empty());
        // A user's failed incremental on b1 does not keep b1 once a new chain is kept.
        let failed = Backup {
            origin: Origin::User,
            state: State::Failed,
            ..b("mine", 15, Some("b1"))
        };
        let keep1 = Retention {
            keep: Some(1),
            max_age_secs: None,
        };
        let all = [old[0], old[1], failed, b("b3", 30, None)];
        assert_eq!(expired(&all, keep1, 40), vec!["b1", "b2"]);
    }

    #[test]
    fn chains_are_walked_once_however_deep() {
        let names: Vec<String> = (0..3000).map(|i| format!("b{i:04}")).collect();
        let deep: Vec<Backup<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                b(
                    n,
                    i64::try_from(i).unwrap_or(0),
                    i.checked_sub(1).map(|p| names[p].as_str()),
                )
            })
            .collect();
        let chains = Chains::of(&deep);
        assert_eq!(chains.depth("b2999"), 3000);
        let keep = Retention {
            keep: Some(1),
            max_age_secs: None,
        };
        // The newest restores through all the others: nothing goes.
        assert!(expired(&deep, keep, 5_000).is_empty());
        assert_eq!(next(&deep, ask(None)), Ok(Since::Backup("b2999".into())));
    }

    #[test]
    fn a_scheduled_failure_goes_once_a_newer_one_succeeded() {
        let failed = Backup {
            state: State::Failed,
            ..b("f", 10, None)
        };
        let policy = Retention {
            keep: Some(5),
            max_age_secs: None,
        };
        assert!(expired(&[failed], policy, 20).is_empty());
        assert_eq!(expired(&[failed, b("ok", 20, None)], policy, 30), vec!["f"]);
    }

    fn arb_backups() -> impl Strategy<Value = Vec<(i64, bool, u8, Option<usize>)>> {
        // (created, scheduled, state 0..4, parent index among the earlier ones)
        prop::collection::vec(
            (
                0i64..1000,
                any::<bool>(),
                0u8..4,
                prop::option::of(0usize..16),
            ),
            0..16,
        )
    }

    proptest! {
        /// Whatever the backups and the policy: no user backup, nothing being written, and no
        /// ancestor of a kept backup is deleted.
        #[test]
        fn retention_leaves_every_kept_backup_restorable(
            spec in arb_backups(),
            keep in prop::option::of(0u32..5),
            age in prop::option::of(0i64..1000),
        ) {
            let names: Vec<String> = (0..spec.len()).map(|i| format!("b{i}")).collect();
            let backups: Vec<Backup<'_>> = spec
                .iter()
                .enumerate()
                .map(|(i, (created, scheduled, state, parent))| Backup {
                    name: &names[i],
                    created: *created,
                    kind: Kind::Incremental,
                    origin: if *scheduled { Origin::Schedule } else { Origin::User },
                    state: [State::Pending, State::Running, State::Succeeded, State::Failed]
                        [usize::from(*state)],
                    parent: parent.filter(|p| *p < i).map(|p| names[p].as_str()),
                })
                .collect();
            let policy = Retention { keep, max_age_secs: age };
            let gone: BTreeSet<&str> = expired(&backups, policy, 1000).into_iter().collect();
            for b in &backups {
                if gone.contains(b.name) {
                    prop_assert_eq!(b.origin, Origin::Schedule);
                    prop_assert!(matches!(b.state, State::Succeeded | State::Failed));
                } else if b.state != State::Failed {
                    for a in ancestors(&backups, b.name) {
                        prop_assert!(!gone.contains(a), "{} needs {}", b.name, a);
                    }
                }
            }
        }
    }
}
