//! What the idle policy decides for one desktop: when its countdown ends, whether it is
//! reclaimed now (Suspend, Shutdown, Delete or Delete's fallback to Shutdown), what its `Idle`
//! condition says, and whether the host has given its resources back. Where a woken desktop
//! runs again is [`wake`]. Plain values in, a [`Decision`] out.

pub mod wake;

use std::time::Duration;

use jiff::Timestamp;

use crate::phase::Cond;
use crate::quantity::{QuantityError, format_duration, parse_duration};
use crate::reasons::{AgentReason, IdleReason};
use crate::types::IdleAction;

pub use wake::{WakeStep, WakeTarget, wake_target, wake_token};

/// The annotation whose new value wakes a desktop.
pub const ANNOTATION_WAKE: &str = "deskvirt.io/wake";

/// How long after the countdown's end the reconcile is requeued: the deadline is a whole second,
/// so a little past it the pass surely sees it passed.
pub const REQUEUE_MARGIN: Duration = Duration::from_millis(100);

/// The idle policy in force, read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Idle time before `action` runs.
    pub timeout: Duration,
    pub action: IdleAction,
}

impl Policy {
    /// Reads a policy whose timeout is a duration such as 30m.
    pub fn read(timeout: &str, action: IdleAction) -> Result<Self, QuantityError> {
        Ok(Self {
            timeout: parse_duration(timeout)?,
            action,
        })
    }
}

/// The idle policy's action as recorded once it is decided (`status.reclaimed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reclaim {
    /// Suspend or Shutdown (Delete deletes, and records nothing).
    pub action: IdleAction,
    /// When the timeout passed and the action was decided, to the second.
    pub at: Timestamp,
    /// The SPICE port the desktop held; tried first when it wakes.
    pub port: Option<u16>,
}

/// The agent's `Running` condition, as the idle policy reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Running {
    /// Its status is True.
    pub runs: bool,
    /// Its last transition.
    pub since: Timestamp,
}

/// Whether the idle policy's action is done and the host confirmed it: an action is recorded
/// and the agent's `Running` is False with reason Suspended or IdleShutdown. From then on the
/// desktop's CPU, memory and SPICE port are back with the pool (node and MAC stay).
pub fn released(reclaimed: bool, running: Option<Cond<'_>>) -> bool {
    reclaimed
        && running.is_some_and(|c| {
            c.status == "False"
                && matches!(
                    AgentReason::parse(c.reason),
                    Some(AgentReason::Suspended | AgentReason::IdleShutdown)
                )
        })
}

/// Status, reason and message of the `Idle` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `Idle` is True.
    pub idle: bool,
    pub reason: IdleReason,
    pub message: String,
}

impl Verdict {
    fn new(idle: bool, reason: IdleReason, message: String) -> Self {
        Self {
            idle,
            reason,
            message,
        }
    }
}

/// What becomes of the `Idle` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdleCondition {
    Set(Verdict),
    /// Left as it is (the host is lost: nothing new is known).
    Keep,
    /// No policy applies and nothing was reclaimed: no condition.
    Remove,
}

/// What the idle policy does now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Record `reclaimed` (the host then suspends or shuts the desktop down) and a Warning
    /// Event with `event`.
    Reclaim {
        reclaimed: Reclaim,
        event: String,
    },
    /// A Warning Event with `event`, then delete the Desktop.
    Delete {
        event: String,
    },
}

/// The idle policy's decision for one pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub step: Step,
    pub condition: IdleCondition,
    /// Look again then: the countdown's end.
    pub requeue: Option<Duration>,
}

/// What the decision is made from.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// The policy in force, if any.
    pub policy: Option<Policy>,
    /// `spec.disk.persistent`.
    pub persistent: bool,
    /// The host's heartbeat is fresh.
    pub host_alive: bool,
    /// The agent's `Running` condition.
    pub running: Option<Running>,
    /// `status.idleSince`.
    pub idle_since: Option<Timestamp>,
    /// When the last wake was acted on (`status.wake.at`), with a wake acted on in this pass.
    pub woken_at: Option<Timestamp>,
    /// `status.reclaimed`, as this pass leaves it.
    pub reclaimed: Option<Reclaim>,
    /// The SPICE port the desktop holds.
    pub port: Option<u16>,
    pub now: Timestamp,
}

/// `t` to the second, as the API stores it.
pub fn to_second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// The end of the countdown: the later of `idleSince` and the last wake, plus the timeout.
pub fn deadline(
    idle_since: Timestamp,
    woken_at: Option<Timestamp>,
    timeout: Duration,
) -> Timestamp {
    let start = woken_at.map_or(idle_since, |w| w.max(idle_since));
    let secs = i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX);
    Timestamp::from_second(start.as_second().saturating_add(secs)).unwrap_or(Timestamp::MAX)
}

/// The command that wakes the desktop.
pub fn wake_command(namespace: &str, name: &str) -> String {
    format!(
        "kubectl -n {namespace} annotate desktop {name} {ANNOTATION_WAKE}=$(date +%s) --overwrite"
    )
}

/// What the policy does on timeout, in words.
fn doing(action: IdleAction, persistent: bool) -> &'static str {
    match action {
        IdleAction::None => "report it",
        IdleAction::Suspend => "suspend it",
        IdleAction::Shutdown => "shut it down",
        IdleAction::Delete if persistent => {
            "shut it down (Delete falls back to Shutdown: the disk is persistent)"
        }
        IdleAction::Delete => "delete it",
    }
}

fn decision(step: Step, condition: IdleCondition, requeue: Option<Duration>) -> Decision {
    Decision {
        step,
        condition,
        requeue,
    }
}

fn set(idle: bool, reason: IdleReason, message: String) -> IdleCondition {
    IdleCondition::Set(Verdict::new(idle, reason, message))
}

/// Decides the idle policy's step and the `Idle` condition.
pub fn decide(f: &Facts<'_>) -> Decision {
    if let Some(r) = &f.reclaimed {
        let condition = IdleCondition::Set(reclaimed_verdict(f, r));
        return decision(Step::Nothing, condition, None);
    }
    let Some(policy) = f.policy else {
        return decision(Step::Nothing, IdleCondition::Remove, None);
    };
    if !f.host_alive {
        return decision(Step::Nothing, IdleCondition::Keep, None);
    }
    if !f.running.is_some_and(|r| r.runs) {
        return decision(Step::Nothing, not_running(f), None);
    }
    let timeout = format_duration(policy.timeout);
    let Some(since) = f.idle_since.map(to_second) else {
        let message = format!(
            "in use; after {timeout} idle the policy will {}",
            doing(policy.action, f.persistent)
        );
        return decision(Step::Nothing, set(false, IdleReason::Active, message), None);
    };
    let end = deadline(since, f.woken_at, policy.timeout);
    if f.now < end {
        return counting_down(f, policy, since, end);
    }
    timed_out(f, policy, since, end)
}

/// `Idle` of a desktop that does not run: woken and not started yet, or simply stopped.
fn not_running(f: &Facts<'_>) -> IdleCondition {
    // Woken, and the host has not changed the domain's state since.
    let woken = f
        .woken_at
        .filter(|w| f.running.is_none_or(|r| *w >= r.since));
    match woken {
        Some(w) => set(
            false,
            IdleReason::Woken,
            format!("woken at {w}; waiting for the host to start it"),
        ),
        None => set(
            false,
            IdleReason::Active,
            "not running; idle time counts only while it runs".into(),
        ),
    }
}

/// Idle and within the timeout: the condition names the deadline, the pass looks again then.
fn counting_down(f: &Facts<'_>, policy: Policy, since: Timestamp, end: Timestamp) -> Decision {
    let what = doing(policy.action, f.persistent);
    let (reason, message) = match f.woken_at.filter(|w| *w > since) {
        Some(w) => (
            IdleReason::Woken,
            format!(
                "idle since {since}, woken at {w}: the policy will {what} at {end} unless it \
                 becomes active"
            ),
        ),
        None => (
            IdleReason::CountingDown,
            format!("idle since {since}: the policy will {what} at {end} unless it becomes active"),
        ),
    };
    let left =
        u64::try_from(end.as_millisecond().saturating_sub(f.now.as_millisecond())).unwrap_or(0);
    let requeue = Duration::from_millis(left) + REQUEUE_MARGIN;
    decision(Step::Nothing, set(false, reason, message), Some(requeue))
}

/// Idle past the timeout: the policy's action.
fn timed_out(f: &Facts<'_>, policy: Policy, since: Timestamp, end: Timestamp) -> Decision {
    let timeout = format_duration(policy.timeout);
    let past = format!("idle since {since}, past the timeout of {timeout}");
    let reclaim = |action: IdleAction, fallback: bool| {
        let reclaimed = Reclaim {
            action,
            at: to_second(f.now),
            port: f.port,
        };
        let why = if fallback {
            " (the policy says Delete, but the disk is persistent: shutting down instead)"
        } else {
            ""
        };
        let verb = match action {
            IdleAction::Suspend => "suspending it (memory saved to disk)",
            _ => "shutting it down",
        };
        let event = format!(
            "{past}: {verb}{why}; its CPU, memory and SPICE port go back to the pool. \
             Get it back with: {}",
            wake_command(f.namespace, f.name)
        );
        let condition = IdleCondition::Set(reclaimed_verdict(f, &reclaimed));
        decision(Step::Reclaim { reclaimed, event }, condition, None)
    };
    match policy.action {
        IdleAction::None => decision(
            Step::Nothing,
            set(
                true,
                IdleReason::IdleReported,
                format!("{past} at {end}; the policy's action is None, so it keeps running"),
            ),
            None,
        ),
        IdleAction::Suspend => reclaim(IdleAction::Suspend, false),
        IdleAction::Shutdown => reclaim(IdleAction::Shutdown, false),
        IdleAction::Delete if f.persistent => reclaim(IdleAction::Shutdown, true),
        IdleAction::Delete => {
            let event = format!("{past}: deleting it (its disk is not persistent)");
            let condition = set(true, IdleReason::IdleTimeout, event.clone());
            decision(Step::Delete { event }, condition, None)
        }
    }
}

/// `Idle` of a reclaimed desktop. Made only from what is recorded, so it does not move.
fn reclaimed_verdict(f: &Facts<'_>, r: &Reclaim) -> Verdict {
    let done = match r.action {
        IdleAction::Suspend => "suspended (memory saved to disk)",
        _ => "shut down",
    };
    let timeout = f
        .policy
        .map(|p| format!(" of {}", format_duration(p.timeout)))
        .unwrap_or_default();
    let fallback = if f.policy.is_some_and(|p| p.action == IdleAction::Delete)
        && r.action == IdleAction::Shutdown
    {
        " (the policy says Delete, but the disk is persistent)"
    } else {
        ""
    };
    Verdict::new(
        true,
        IdleReason::IdleTimeout,
        format!(
            "idle past its timeout{timeout}: {done} at {}{fallback}; its CPU, memory and SPICE \
             port go back to the pool. Get it back with: {}",
            r.at,
            wake_command(f.namespace, f.name)
        ),
    )
}

#[cfg(test)]
mod tests;
