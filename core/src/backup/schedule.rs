//! Decides a pool's backup schedule: when its cron expression (UTC; five fields, or six with
//! seconds first) falls due, which desktops get a scheduled backup for that moment (running
//! ones, one per moment, never while one of the schedule's is still open), what it is named,
//! and whether it starts a new chain so that retention can let the old chain go.

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::{Backup, Chains, Origin, State};

/// A moment missed by more than this (the operator was down) is skipped, not caught up.
pub const MISSED_AFTER_SECS: i64 = 600;

/// Why a cron expression is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error(
        "{0:?} has {1} fields; a schedule has 5 (minute hour day month weekday) or 6 (seconds first)"
    )]
    Fields(String, usize),
    #[error("{field} {value:?}: {why}")]
    Field {
        field: &'static str,
        value: String,
        why: String,
    },
}

/// A parsed cron expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Whether the day-of-month and weekday fields were `*` (cron's rule: when both are
    /// restricted, a day matching either is due).
    any_day: bool,
    any_weekday: bool,
    /// Whether the expression names seconds (else every moment is on a whole minute).
    with_seconds: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Cron {
    /// Parses `@hourly`, `@daily`/`@midnight`, `@weekly`, `@monthly`, `@yearly`/`@annually`,
    /// or five or six fields of numbers, `*`, ranges `a-b`, steps `/n` and lists `a,b`;
    /// months and weekdays may be named (`jan`, `mon`); weekday 7 is Sunday too.
    pub fn parse(expr: &str) -> Result<Self, CronError> {
        let expanded = match expr.trim() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (sec, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => return Err(CronError::Fields(expr.to_string(), n)),
        };
        let weekdays = field("weekday", rest[4], 0, 7, &WEEKDAYS)?;
        // 7 is Sunday as well as 0.
        let weekdays = (weekdays & 0x7f) | ((weekdays >> 7) & 1);
        Ok(Self {
            seconds: field("second", sec, 0, 59, &[])?,
            minutes: field("minute", rest[0], 0, 59, &[])?,
            hours: field("hour", rest[1], 0, 23, &[])?,
            days: field("day of month", rest[2], 1, 31, &[])?,
            months: field("month", rest[3], 1, 12, &MONTHS)?,
            weekdays,
            // `*` and `*/n` both leave the day to the other field (as vixie cron does).
            any_day: rest[2].starts_with('*'),
            any_weekday: rest[4].starts_with('*'),
            with_seconds: fields.len() == 6,
        })
    }

    /// Whether the schedule is due at `t` (seconds since the epoch, UTC).
    pub fn matches(&self, t: i64) -> bool {
        let Ok(ts) = Timestamp::from_second(t) else {
            return false;
        };
        let z = ts.to_zoned(TimeZone::UTC);
        let bit = |set: u64, v: i64| u32::try_from(v).is_ok_and(|v| v < 64 && set & (1 << v) != 0);
        let day = bit(self.days, i64::from(z.day()));
        let weekday = bit(
            self.weekdays,
            i64::from(z.weekday().to_sunday_zero_offset()),
        );
        let day_ok = match (self.any_day, self.any_weekday) {
            (true, true) => true,
            (true, false) => weekday,
            (false, true) => day,
            (false, false) => day || weekday,
        };
        day_ok
            && bit(self.seconds, i64::from(z.second()))
            && bit(self.minutes, i64::from(z.minute()))
            && bit(self.hours, i64::from(z.hour()))
            && bit(self.months, i64::from(z.month()))
    }

    /// The latest moment in `(after, upto]` the schedule is due at.
    pub fn latest(&self, after: i64, upto: i64) -> Option<i64> {
        let step = if self.with_seconds { 1 } else { 60 };
        let mut t = if self.with_seconds {
            upto
        } else {
            upto - upto.rem_euclid(60)
        };
        while t > after {
            if self.matches(t) {
                return Some(t);
            }
            t -= step;
        }
        None
    }
}

/// One cron field as a bit set of the values it allows.
fn field(
    name: &'static str,
    text: &str,
    min: u32,
    max: u32,
    names: &[&str],
) -> Result<u64, CronError> {
    let bad = |why: String| CronError::Field {
        field: name,
        value: text.to_string(),
        why,
    };
    let value = |v: &str| -> Result<u32, CronError> {
        let lower = v.to_ascii_lowercase();
        let n = match names.iter().position(|n| *n == lower) {
            // Months count from 1, weekdays from 0.
            Some(i) => u32::try_from(i).unwrap_or(0) + if min == 1 { 1 } else { 0 },
            None => v
                .parse::<u32>()
                .map_err(|_| bad(format!("{v:?} is not a number")))?,
        };
        if n < min || n > max {
            return Err(bad(format!("{n} is outside {min}-{max}")));
        }
        Ok(n)
    };
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let s: u32 = s
                    .parse()
                    .map_err(|_| bad(format!("step {s:?} is not a number")))?;
                if s == 0 || s > max {
                    return Err(bad(format!("a step of {s} (1-{max})")));
                }
                (r, s)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(bad(format!("range {a}-{b} runs backwards")));
            }
            (a, b)
        } else {
            let a = value(range)?;
            // `a/n` runs from a to the end.
            (a, if step > 1 { max } else { a })
        };
        let mut v = lo;
        while v <= hi {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

/// A pool's schedule, as its spec says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub cron: Cron,
    /// The longest chain of scheduled incrementals: once the newest scheduled backup is this
    /// deep, the next one starts a new chain.
    pub max_chain: u32,
}

/// A desktop of the pool, as the schedule reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject {
    /// Whether its domain runs.
    pub running: bool,
    /// For a desktop stopped for good (`spec.power: Off`, not suspended): when its domain
    /// stopped, seconds since the epoch. It is backed up at a moment only if no backup of it
    /// ended since it stopped (its disk may have changed since its last one; one try per
    /// stop); a desktop that neither runs nor is stopped so (starting, suspended) is not.
    pub stopped_at: Option<i64>,
    /// Left out of the schedule by its owner (`deskvirt.io/backup-schedule: skip`).
    pub skipped: bool,
    pub deleting: bool,
    /// Creation time, seconds since the epoch.
    pub created: i64,
}

/// A scheduled backup to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The moment it is for.
    pub slot: i64,
    /// Whether it starts a new chain (everything written since the disk was made).
    pub new_chain: bool,
}

/// The backup the schedule makes of a desktop for the moment `slot` (the latest due moment,
/// from [`Cron::latest`]), given the desktop's backups and the last moment this operator made
/// one for (a backup deleted since, or made under a clock ahead of the API server's, is not
/// made again); `None` when there is none to make.
pub fn due(
    policy: &Policy,
    desktop: Subject,
    backups: &[Backup<'_>],
    slot: Option<i64>,
    last_made: Option<i64>,
) -> Option<Planned> {
    let slot = slot?;
    // One backup of a stop: one that failed is not tried again at every moment (a host that
    // refuses it, say because the domain holds saved memory, would refuse each).
    let ran_since_backup = |stopped: i64| {
        !backups
            .iter()
            .any(|b| b.state.is_terminal() && b.created >= stopped)
    };
    let eligible = desktop.running || desktop.stopped_at.is_some_and(ran_since_backup);
    if !eligible
        || desktop.skipped
        || desktop.deleting
        || desktop.created > slot
        || last_made.is_some_and(|m| m >= slot)
    {
        return None;
    }
    let scheduled = || backups.iter().filter(|b| b.origin == Origin::Schedule);
    // Made for this moment already (or later), or one of the schedule's still open.
    if scheduled().any(|b| b.created >= slot || !b.state.is_terminal()) {
        return None;
    }
    let chains = Chains::of(backups);
    let tip = scheduled()
        .filter(|b| b.state == State::Succeeded)
        .max_by_key(|b| (b.created, chains.depth(b.name), b.name));
    let depth = tip.map_or(0, |t| chains.depth(t.name));
    Some(Planned {
        slot,
        new_chain: depth >= usize::try_from(policy.max_chain).unwrap_or(usize::MAX),
    })
}

/// The name of the scheduled backup of `desktop` for `slot`: the desktop's name (cut to fit)
/// and the moment in UTC, `<desktop>-YYYYMMDD-HHMMSS`. The same moment gives the same name, so
/// a moment is never backed up twice (the second create is refused).
pub fn name(desktop: &str, slot: i64) -> String {
    let stamp = Timestamp::from_second(slot)
        .map(|t| t.strftime("%Y%m%d-%H%M%S").to_string())
        .unwrap_or_else(|_| slot.to_string());
    let room = 253 - stamp.len() - 1;
    let mut head: String = desktop.chars().take(room).collect();
    while head.ends_with(['-', '.']) {
        head.pop();
    }
    format!("{head}-{stamp}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::testkit::scheduled;

    /// 2026-12-07 00:00:00 UTC, a Monday.
    const MONDAY: i64 = 1_796_601_600;

    fn cron(s: &str) -> Cron {
        Cron::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_epoch_constant_is_a_monday_midnight() {
        let z = Timestamp::from_second(MONDAY)
            .map(|t| t.to_zoned(TimeZone::UTC))
            .ok();
        assert_eq!(
            z.map(|z| (z.hour(), z.weekday().to_sunday_zero_offset())),
            Some((0, 1))
        );
    }

    #[test]
    fn five_fields_fall_on_whole_minutes_and_six_name_seconds() {
        let every_5_min = cron("*/5 * * * *");
        assert!(every_5_min.matches(MONDAY));
        assert!(every_5_min.matches(MONDAY + 300));
        assert!(!every_5_min.matches(MONDAY + 301));
        assert!(!every_5_min.matches(MONDAY + 60));
        let every_10_s = cron("*/10 * * * * *");
        assert!(every_10_s.matches(MONDAY + 10));
        assert!(!every_10_s.matches(MONDAY + 11));
        assert_eq!(every_10_s.latest(MONDAY, MONDAY + 25), Some(MONDAY + 20));
        assert_eq!(every_10_s.latest(MONDAY + 20, MONDAY + 25), None);
    }

    #[test]
    fn names_ranges_lists_and_macros() {
        let weekdays_at_2 = cron("0 2 * * mon-fri");
        assert!(weekdays_at_2.matches(MONDAY + 2 * 3600));
        // Sunday 2026-12-06.
        assert!(!weekdays_at_2.matches(MONDAY - 86_400 + 2 * 3600));
        assert!(cron("0 0 * * 7").matches(MONDAY - 86_400), "7 is Sunday");
        assert!(cron("@daily").matches(MONDAY));
        assert!(cron("@weekly").matches(MONDAY - 86_400));
        assert!(cron("0 0 7 dec *").matches(MONDAY));
        assert!(cron("0 0,12 * * *").matches(MONDAY + 12 * 3600));
        assert!(!cron("0 0,12 * * *").matches(MONDAY + 6 * 3600));
        // Day of month and weekday both restricted: either day is due.
        let first_or_monday = cron("0 0 1 * mon");
        assert!(first_or_monday.matches(MONDAY));
        assert!(!first_or_monday.matches(MONDAY + 86_400));
        // A `*/n` day is no restriction: Mondays only.
        let mondays = cron("0 0 */1 * mon");
        assert!(mondays.matches(MONDAY));
        assert!(!mondays.matches(MONDAY + 86_400));
    }

    #[test]
    fn a_bad_expression_names_its_field() {
        for (bad, field) in [
            ("61 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day of month"),
            ("* * * 13 *", "month"),
            ("* * * * 8", "weekday"),
            ("*/0 * * * *", "minute"),
            ("5/4294967295 * * * *", "minute"),
            ("5-1 * * * *", "minute"),
            ("x * * * *", "minute"),
            ("60 * * * * *", "second"),
        ] {
            match Cron::parse(bad) {
                Err(CronError::Field { field: f, .. }) => assert_eq!(f, field, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(Cron::parse("* * *"), Err(CronError::Fields(_, 3))));
        assert!(Cron::parse("").is_err());
    }

    const RUNNING: Subject = Subject {
        running: true,
        stopped_at: None,
        skipped: false,
        deleting: false,
        created: 0,
    };

    fn policy(max_chain: u32) -> Policy {
        Policy {
            cron: cron("*/10 * * * * *"),
            max_chain,
        }
    }

    #[test]
    fn a_running_desktop_gets_one_backup_per_moment() {
        let p = policy(3);
        let slot = Some(100);
        assert_eq!(
            due(&p, RUNNING, &[], slot, None),
            Some(Planned {
                slot: 100,
                new_chain: false
            })
        );
        // Made for this moment already, or made and deleted since.
        assert_eq!(
            due(&p, RUNNING, &[scheduled("a", 101, None)], slot, None),
            None
        );
        assert_eq!(due(&p, RUNNING, &[], slot, Some(100)), None);
        assert!(due(&p, RUNNING, &[], slot, Some(90)).is_some());
        // No moment due.
        assert_eq!(due(&p, RUNNING, &[], None, None), None);
        // Stopped, being deleted, or made after the moment.
        let stopped = Subject {
            running: false,
            ..RUNNING
        };
        assert_eq!(due(&p, stopped, &[], slot, None), None);
        let deleting = Subject {
            deleting: true,
            ..RUNNING
        };
        assert_eq!(due(&p, deleting, &[], slot, None), None);
        let skipped = Subject {
            skipped: true,
            ..RUNNING
        };
        assert_eq!(due(&p, skipped, &[], slot, None), None);
        let young = Subject {
            created: 150,
            ..RUNNING
        };
        assert_eq!(due(&p, young, &[], slot, None), None);
    }

    #[test]
    fn a_stopped_desktop_is_backed_up_only_when_it_ran_since_its_last_backup() {
        let p = policy(3);
        let slot = Some(100);
        let stopped_at = |t| Subject {
            running: false,
            stopped_at: Some(t),
            ..RUNNING
        };
        // Never backed up: its disk is backed up once.
        assert!(due(&p, stopped_at(50), &[], slot, None).is_some());
        // Stopped after its newest backup (a user's counts too): it ran since.
        let user = Backup {
            origin: Origin::User,
            ..scheduled("u", 40, None)
        };
        assert!(due(&p, stopped_at(50), &[user], slot, None).is_some());
        // Backed up after it stopped: nothing changed since.
        assert_eq!(
            due(&p, stopped_at(50), &[scheduled("a", 60, None)], slot, None),
            None
        );
        // One that failed after it stopped is not tried again until it ran again.
        let failed = Backup {
            state: State::Failed,
            ..scheduled("f", 60, None)
        };
        assert_eq!(due(&p, stopped_at(50), &[failed], slot, None), None);
    }

    #[test]
    fn an_open_scheduled_backup_holds_the_next_but_a_users_does_not() {
        let p = policy(3);
        let open = Backup {
            state: State::Running,
            ..scheduled("a", 90, None)
        };
        assert_eq!(due(&p, RUNNING, &[open], Some(100), None), None);
        let users = Backup {
            origin: Origin::User,
            ..open
        };
        assert!(due(&p, RUNNING, &[users], Some(100), None).is_some());
    }

    #[test]
    fn a_chain_as_deep_as_the_policy_allows_is_followed_by_a_new_one() {
        let p = policy(2);
        let one = [scheduled("a", 10, None)];
        assert_eq!(
            due(&p, RUNNING, &one, Some(100), None).map(|d| d.new_chain),
            Some(false)
        );
        let two = [scheduled("a", 10, None), scheduled("b", 20, Some("a"))];
        assert_eq!(
            due(&p, RUNNING, &two, Some(100), None).map(|d| d.new_chain),
            Some(true)
        );
        // The new chain's first backup is one deep again.
        let three = [
            two[0],
            two[1],
            Backup {
                parent: None,
                ..scheduled("c", 30, None)
            },
        ];
        assert_eq!(
            due(&p, RUNNING, &three, Some(100), None).map(|d| d.new_chain),
            Some(false)
        );
    }

    #[test]
    fn names_are_the_desktop_and_the_moment_and_fit() {
        assert_eq!(name("lab-7", MONDAY + 3723), "lab-7-20261207-010203");
        let long = format!("{}-x", "a".repeat(250));
        let n = name(&long, MONDAY);
        assert_eq!(n.len(), 253);
        assert!(n.ends_with("-20261207-000000"));
        let dashy = format!("{}-b", "a".repeat(236));
        assert!(!name(&dashy, MONDAY).contains("--"));
    }
}
