//! What the idle policy decides for one desktop: which policy applies (its own or its pool's
//! default), when its countdown ends, whether it is reclaimed now (Suspend, Shutdown, Delete or
//! Delete's fallback), what its `Idle` condition says, what a wake annotation asks for, where a
//! woken desktop runs again (its own host, or another one when its storage is shared), and
//! whether a desktop holds CPU, memory and a SPICE port at all (the one rule placement, the
//! ledger and pool accounting share). Pure.

use std::collections::BTreeMap;
use std::time::Duration;

use deskvirt_crds::conditions::{Status, find};
use deskvirt_crds::constants::condition::{IDLE, RUNNING};
use deskvirt_crds::constants::{ANNOTATION_WAKE, idle_reason, running_reason};
use deskvirt_crds::desktop::{
    Desktop, DesktopSpec, DesktopStatus, IdleAction, IdlePolicy, Reclaimed, Wake,
};
use deskvirt_crds::quantity::{QuantityError, format_bytes, format_duration, parse_duration};
use deskvirt_crds::read::FromDesktopSpec;
use deskvirt_crds::resource_pool::{PoolDefaults, PortRange};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::allocators::fnv::fnv1a64;
use crate::context::holds_binding;
use crate::scheduler::{HostView, PoolPolicy, Request, place_in_pool};

/// How long after the countdown's end the reconcile is requeued: the deadline is a whole second,
/// so a little past it the pass surely sees it passed.
const REQUEUE_MARGIN: Duration = Duration::from_millis(100);

/// The idle policy in force, read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Idle time before `action` runs.
    pub timeout: Duration,
    pub action: IdleAction,
}

impl Policy {
    /// Reads `p`; its timeout is a duration such as 30m.
    pub fn of(p: &IdlePolicy) -> Result<Self, QuantityError> {
        Ok(Self {
            timeout: parse_duration(&p.timeout)?,
            action: p.action,
        })
    }
}

/// The policy of a desktop: its own `spec.idle`, else its pool's `spec.defaults.idle`.
pub fn effective<'a>(
    spec: &'a DesktopSpec,
    defaults: Option<&'a PoolDefaults>,
) -> Option<&'a IdlePolicy> {
    spec.idle.as_ref().or_else(|| defaults?.idle.as_ref())
}

/// Whether the idle policy's action is done and the host confirmed it: `reclaimed` is set and
/// the agent's `Running` is False with reason Suspended or IdleShutdown. From then on the
/// desktop's CPU, memory and SPICE port are back with the pool (node and MAC stay).
pub fn released(st: &DesktopStatus) -> bool {
    st.reclaimed.is_some()
        && find(&st.conditions, RUNNING).is_some_and(|c| {
            c.status == Status::False.as_str()
                && (c.reason == running_reason::SUSPENDED
                    || c.reason == running_reason::IDLE_SHUTDOWN)
        })
}

/// Whether a desktop holds CPU and memory on its host and a SPICE port: it holds its binding
/// (see [`holds_binding`]) and its resources were not released by the idle policy. The scheduler's
/// host views, the pool's status, the hosts' allocatable and the port ledger all count by this.
pub fn holds_resources(d: &Desktop) -> bool {
    holds_binding(d) && !d.status.as_ref().is_some_and(released)
}

/// Longest token `status.wake.token` holds as is; a longer annotation value is recorded by its
/// hash.
const TOKEN_MAX: usize = 253;

/// A new value of the wake annotation, as `status.wake.token` records it: set, not empty, and
/// not the one last acted on.
pub fn wake_token(
    annotations: &BTreeMap<String, String>,
    st: Option<&DesktopStatus>,
) -> Option<String> {
    let value = annotations.get(ANNOTATION_WAKE)?.trim();
    if value.is_empty() {
        return None;
    }
    let token = if value.chars().count() <= TOKEN_MAX {
        value.to_string()
    } else {
        format!("fnv1a64:{:016x}", fnv1a64(value.as_bytes()))
    };
    let last = st.and_then(|s| s.wake.as_ref()).map(|w| w.token.as_str());
    (Some(token.as_str()) != last).then_some(token)
}

/// What a new wake token asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeStep {
    /// Not reclaimed: record it; the countdown starts again from now.
    Record,
    /// Reclaimed, but the host has not confirmed: clear `reclaimed` (it still holds its port).
    Cancel,
    /// Reclaimed and released: it needs room and a port on a host again.
    Restore,
}

/// What waking a desktop with status `st` takes.
pub fn wake_step(st: &DesktopStatus) -> WakeStep {
    match &st.reclaimed {
        None => WakeStep::Record,
        Some(_) if released(st) => WakeStep::Restore,
        Some(_) => WakeStep::Cancel,
    }
}

/// Where a woken desktop can run again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WakeTarget {
    /// Back on the host it ran on.
    Host(String),
    /// To another host of the pool (its disk is on shared storage): `why` its own host cannot
    /// take it.
    Move { to: String, why: String },
    /// Not now; the `Idle` message says why.
    Wait(String),
}

/// Where a released desktop bound to `node` can run again, judged on `hosts` built without the
/// desktop itself: back on its own host when that has room and a port; else, when the pool's
/// storage is `shared`, on the host the scheduler picks among the others (its disk is reachable
/// there, and its domain on the old host is confirmed stopped); else it waits.
pub fn wake_target(
    pool: &str,
    node: &str,
    hosts: &[HostView],
    request: &Request,
    policy: &PoolPolicy,
    shared: bool,
) -> WakeTarget {
    let Some(why) = home_problem(node, hosts, request, policy.ports) else {
        return WakeTarget::Host(node.to_string());
    };
    if !shared {
        return WakeTarget::Wait(format!(
            "woken, waiting for room on host {node} where its disk lives: {why} (the pool's \
             storage is not shared, so it cannot move to another host)"
        ));
    }
    match place_in_pool(pool, policy, request, hosts) {
        Ok(d) => WakeTarget::Move {
            to: d.host.name.clone(),
            why,
        },
        Err(e) => WakeTarget::Wait(format!(
            "woken, waiting for room: host {node} where it ran {why}, and no other host of the \
             pool takes it: {e}"
        )),
    }
}

/// Why host `node` cannot take the woken desktop back now, if it cannot.
fn home_problem(
    node: &str,
    hosts: &[HostView],
    request: &Request,
    ports: PortRange,
) -> Option<String> {
    let Some(host) = hosts.iter().find(|h| h.name == node) else {
        return Some("is not in the desktop's pool".into());
    };
    if !host.ready {
        return Some("is not ready".into());
    }
    if host.maintenance {
        return Some("is in maintenance".into());
    }
    let short = host.capacity.shortfalls(&host.allocated, request);
    let no_port = host.ports_in_use >= ports.len();
    if short.none() && !no_port {
        return None;
    }
    let free = host.free();
    let cpus = if request.dedicated_cpus {
        free.pinnable_cpus
    } else {
        free.vcpus
    };
    let mut why = format!(
        "is full: needs {} CPU / {}, free {cpus} CPU / {}",
        request.vcpus,
        format_bytes(request.memory),
        format_bytes(free.memory)
    );
    if request.hugepages {
        why.push_str(&format!(", {} of hugepages", format_bytes(free.hugepages)));
    }
    if no_port {
        why.push_str(&format!(
            "; every SPICE port {}-{} is taken",
            ports.first, ports.last
        ));
    }
    Some(why)
}

/// Status, reason and message of the `Idle` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub status: Status,
    pub reason: &'static str,
    pub message: String,
}

impl Verdict {
    fn new(status: Status, reason: &'static str, message: String) -> Self {
        Self {
            status,
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
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Nothing,
    /// Record `reclaimed` (the host then suspends or shuts the desktop down) and a Warning
    /// Event with `event`.
    Reclaim {
        reclaimed: Reclaimed,
        event: String,
    },
    /// A Warning Event with `event`, then delete the Desktop.
    Delete {
        event: String,
    },
}

/// The idle policy's decision for one pass.
#[derive(Clone, Debug, PartialEq)]
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
    pub running: Option<&'a Condition>,
    /// `status.idleSince`.
    pub idle_since: Option<Timestamp>,
    /// `status.wake`, with a wake acted on in this pass.
    pub wake: Option<&'a Wake>,
    /// `status.reclaimed`, as this pass leaves it.
    pub reclaimed: Option<&'a Reclaimed>,
    /// The SPICE port the desktop holds.
    pub port: Option<u16>,
    pub now: Timestamp,
}

/// `t` to the second, as the API stores it.
pub fn to_second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// The end of the countdown: the later of `idleSince` and the last wake, plus the timeout.
pub fn deadline(idle_since: Timestamp, wake: Option<&Wake>, timeout: Duration) -> Timestamp {
    let start = wake.map_or(idle_since, |w| w.at.0.max(idle_since));
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

/// Decides the idle policy's step and the `Idle` condition.
pub fn decide(f: &Facts<'_>) -> Decision {
    let decision = |step, condition, requeue| Decision {
        step,
        condition,
        requeue,
    };
    let set = |status, reason, message| IdleCondition::Set(Verdict::new(status, reason, message));
    if let Some(r) = f.reclaimed {
        return decision(
            Step::Nothing,
            IdleCondition::Set(reclaimed_verdict(f, r)),
            None,
        );
    }
    let Some(policy) = f.policy else {
        return decision(Step::Nothing, IdleCondition::Remove, None);
    };
    if !f.host_alive {
        return decision(Step::Nothing, IdleCondition::Keep, None);
    }
    let runs = f.running.is_some_and(|c| c.status == Status::True.as_str());
    if !runs {
        // Woken, and the host has not changed the domain's state since.
        let woken = f
            .wake
            .filter(|w| f.running.is_none_or(|c| w.at.0 >= c.last_transition_time.0));
        let condition = match woken {
            Some(w) => set(
                Status::False,
                idle_reason::WOKEN,
                format!("woken at {}; waiting for the host to start it", w.at.0),
            ),
            None => set(
                Status::False,
                idle_reason::ACTIVE,
                "not running; idle time counts only while it runs".into(),
            ),
        };
        return decision(Step::Nothing, condition, None);
    }
    let timeout = format_duration(policy.timeout);
    let Some(since) = f.idle_since.map(to_second) else {
        let message = format!(
            "in use; after {timeout} idle the policy will {}",
            doing(policy.action, f.persistent)
        );
        return decision(
            Step::Nothing,
            set(Status::False, idle_reason::ACTIVE, message),
            None,
        );
    };
    let end = deadline(since, f.wake, policy.timeout);
    if f.now < end {
        let what = doing(policy.action, f.persistent);
        let (reason, message) = match f.wake.filter(|w| w.at.0 > since) {
            Some(w) => (
                idle_reason::WOKEN,
                format!(
                    "idle since {since}, woken at {}: the policy will {what} at {end} unless it \
                     becomes active",
                    w.at.0
                ),
            ),
            None => (
                idle_reason::COUNTING_DOWN,
                format!(
                    "idle since {since}: the policy will {what} at {end} unless it becomes active"
                ),
            ),
        };
        let left =
            u64::try_from(end.as_millisecond().saturating_sub(f.now.as_millisecond())).unwrap_or(0);
        let requeue = Duration::from_millis(left) + REQUEUE_MARGIN;
        return decision(
            Step::Nothing,
            set(Status::False, reason, message),
            Some(requeue),
        );
    }
    let past = format!("idle since {since}, past the timeout of {timeout}");
    let wake = wake_command(f.namespace, f.name);
    let reclaim = |action: IdleAction, fallback: bool| {
        let reclaimed = Reclaimed {
            action,
            at: Time(to_second(f.now)),
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
             Get it back with: {wake}"
        );
        let condition = IdleCondition::Set(reclaimed_verdict(f, &reclaimed));
        decision(Step::Reclaim { reclaimed, event }, condition, None)
    };
    match policy.action {
        IdleAction::None => decision(
            Step::Nothing,
            set(
                Status::True,
                idle_reason::IDLE_REPORTED,
                format!("{past} at {end}; the policy's action is None, so it keeps running"),
            ),
            None,
        ),
        IdleAction::Suspend => reclaim(IdleAction::Suspend, false),
        IdleAction::Shutdown => reclaim(IdleAction::Shutdown, false),
        IdleAction::Delete if f.persistent => reclaim(IdleAction::Shutdown, true),
        IdleAction::Delete => {
            let event = format!("{past}: deleting it (its disk is not persistent)");
            let condition = set(Status::True, idle_reason::IDLE_TIMEOUT, event.clone());
            decision(Step::Delete { event }, condition, None)
        }
    }
}

/// `Idle` of a reclaimed desktop. Made only from what is recorded, so it does not move.
fn reclaimed_verdict(f: &Facts<'_>, r: &Reclaimed) -> Verdict {
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
        Status::True,
        idle_reason::IDLE_TIMEOUT,
        format!(
            "idle past its timeout{timeout}: {done} at {}{fallback}; its CPU, memory and SPICE \
             port go back to the pool. Get it back with: {}",
            r.at.0,
            wake_command(f.namespace, f.name)
        ),
    )
}

/// A pool's idle figures, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolIdle {
    /// Desktops whose `Idle` is True.
    pub idle: u64,
    /// Desktops with a SPICE client connected.
    pub sessions: u64,
    /// Desktops whose resources are back with the pool, and those resources.
    pub released: u64,
    pub cpu: u64,
    pub memory_bytes: u64,
}

impl PoolIdle {
    /// Sums the desktops of `pool`.
    pub fn of<'a>(pool: &str, desktops: impl IntoIterator<Item = &'a Desktop>) -> Self {
        let mut sum = Self::default();
        for d in desktops.into_iter().filter(|d| d.pool() == pool) {
            let Some(st) = &d.status else { continue };
            if find(&st.conditions, IDLE).is_some_and(|c| c.status == Status::True.as_str()) {
                sum.idle += 1;
            }
            if st.session.as_ref().is_some_and(|s| s.connected) {
                sum.sessions += 1;
            }
            if holds_binding(d) && !holds_resources(d) {
                sum.released += 1;
                if let Ok(r) = Request::from_spec(&d.spec) {
                    sum.cpu += u64::from(r.vcpus);
                    sum.memory_bytes = sum.memory_bytes.saturating_add(r.memory);
                }
            }
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{HostCapacity, Ratio, Usage};
    use deskvirt_crds::conditions::condition;
    use deskvirt_crds::resource_pool::Placement;

    const GI: u64 = 1 << 30;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn running(ok: bool, reason: &str, since: i64) -> Condition {
        let s = if ok { Status::True } else { Status::False };
        condition(&[], RUNNING, s, reason, "x", None, at(since))
    }

    fn policy(secs: u64, action: IdleAction) -> Policy {
        Policy {
            timeout: Duration::from_secs(secs),
            action,
        }
    }

    fn facts<'a>(p: Option<Policy>, run: &'a Condition, now: i64) -> Facts<'a> {
        Facts {
            namespace: "ns",
            name: "d",
            policy: p,
            persistent: true,
            host_alive: true,
            running: Some(run),
            idle_since: None,
            wake: None,
            reclaimed: None,
            port: Some(5901),
            now: at(now),
        }
    }

    fn desktop(json: serde_json::Value) -> Desktop {
        let mut v = serde_json::json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": { "name": "d", "namespace": "ns", "uid": "u1" },
            "spec": { "pool": "p", "cpu": 2, "memory": "2Gi", "disk": { "image": "b.qcow2" } }
        });
        if let (Some(v), Some(extra)) = (v.as_object_mut(), json.as_object()) {
            v.extend(extra.clone());
        }
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    fn verdict(d: &Decision) -> &Verdict {
        match &d.condition {
            IdleCondition::Set(v) => v,
            other => panic!("no verdict: {other:?}"),
        }
    }

    #[test]
    fn the_desktops_policy_wins_over_the_pools_default() {
        let own = IdlePolicy {
            timeout: "5m".into(),
            action: IdleAction::Suspend,
            connected_is_active: true,
        };
        let pool = PoolDefaults {
            idle: Some(IdlePolicy {
                timeout: "1h".into(),
                action: IdleAction::Shutdown,
                connected_is_active: true,
            }),
            usb: None,
        };
        let mut d = desktop(serde_json::json!({}));
        assert_eq!(effective(&d.spec, None), None);
        assert_eq!(effective(&d.spec, Some(&pool)), pool.idle.as_ref());
        d.spec.idle = Some(own.clone());
        assert_eq!(effective(&d.spec, Some(&pool)), Some(&own));
        assert_eq!(
            Policy::of(&own),
            Ok(policy(300, IdleAction::Suspend)),
            "timeout read with the duration parser"
        );
        assert!(
            Policy::of(&IdlePolicy {
                timeout: "5x".into(),
                ..own
            })
            .is_err()
        );
    }

    #[test]
    fn the_countdown_runs_from_the_later_of_idle_since_and_the_last_wake() {
        let t = Duration::from_secs(60);
        assert_eq!(deadline(at(0), None, t), at(60));
        let earlier = Wake {
            token: "1".into(),
            at: Time(at(-30)),
        };
        assert_eq!(deadline(at(0), Some(&earlier), t), at(60));
        let later = Wake {
            token: "2".into(),
            at: Time(at(45)),
        };
        assert_eq!(deadline(at(0), Some(&later), t), at(105));

        // The pass requeues itself at the deadline.
        let run = running(true, "Running", 0);
        let mut f = facts(Some(policy(60, IdleAction::Suspend)), &run, 10);
        f.idle_since = Some(at(0));
        let d = decide(&f);
        assert_eq!(d.step, Step::Nothing);
        assert_eq!(d.requeue, Some(Duration::from_secs(50) + REQUEUE_MARGIN));
        let v = verdict(&d);
        assert_eq!(
            (v.status, v.reason),
            (Status::False, idle_reason::COUNTING_DOWN)
        );
        assert!(v.message.contains(&at(60).to_string()), "{}", v.message);
        // A wake after idleSince moves it, and says so.
        f.wake = Some(&later);
        let d = decide(&f);
        assert_eq!(d.requeue, Some(Duration::from_secs(95) + REQUEUE_MARGIN));
        let v = verdict(&d);
        assert_eq!(v.reason, idle_reason::WOKEN);
        assert!(v.message.contains(&at(105).to_string()), "{}", v.message);
    }

    #[test]
    fn the_condition_does_not_move_while_counting_down() {
        let run = running(true, "Running", 0);
        let mut f = facts(Some(policy(600, IdleAction::Shutdown)), &run, 1);
        f.idle_since = Some(at(0));
        let first = decide(&f);
        f.now = at(500);
        let later = decide(&f);
        assert_eq!(
            first.condition, later.condition,
            "absolute deadline, not a countdown"
        );
        // Active, reported, not running and reclaimed do not move either.
        f.policy = Some(policy(600, IdleAction::None));
        let stopped = running(false, "Shutdown", 0);
        let reclaimed = Reclaimed {
            action: IdleAction::Shutdown,
            at: Time(at(600)),
            port: None,
        };
        for (since, now, run, r) in [
            (None, 10, &run, None),
            (Some(at(0)), 700, &run, None),
            (Some(at(0)), 700, &stopped, None),
            (Some(at(0)), 700, &stopped, Some(&reclaimed)),
        ] {
            f.idle_since = since;
            f.running = Some(run);
            f.reclaimed = r;
            f.now = at(now);
            let a = decide(&f);
            f.now = at(now + 300);
            let b = decide(&f);
            assert_eq!((a.step, a.condition), (Step::Nothing, b.condition));
        }
    }

    #[test]
    fn timeout_reclaims_with_the_policys_action() {
        let run = running(true, "Running", 0);
        for action in [IdleAction::Suspend, IdleAction::Shutdown] {
            let mut f = facts(Some(policy(60, action)), &run, 61);
            f.idle_since = Some(at(0));
            let d = decide(&f);
            let Step::Reclaim { reclaimed, event } = &d.step else {
                panic!("not reclaimed: {d:?}");
            };
            assert_eq!(reclaimed.action, action);
            assert_eq!(reclaimed.port, Some(5901));
            assert_eq!(reclaimed.at, Time(at(61)));
            assert!(
                event.contains("deskvirt.io/wake=$(date +%s) --overwrite"),
                "{event}"
            );
            assert!(event.contains("1m"), "{event}");
            let v = verdict(&d);
            assert_eq!(
                (v.status, v.reason),
                (Status::True, idle_reason::IDLE_TIMEOUT)
            );
            // Once recorded, the next pass does nothing more and says the same.
            f.reclaimed = Some(reclaimed);
            let again = decide(&f);
            assert_eq!(again.step, Step::Nothing);
            assert_eq!(again.condition, d.condition);
        }
        // None only reports.
        let mut f = facts(Some(policy(60, IdleAction::None)), &run, 61);
        f.idle_since = Some(at(0));
        let d = decide(&f);
        assert_eq!(d.step, Step::Nothing);
        assert_eq!(verdict(&d).reason, idle_reason::IDLE_REPORTED);
    }

    #[test]
    fn delete_only_without_a_persistent_disk_else_shutdown() {
        let run = running(true, "Running", 0);
        let mut f = facts(Some(policy(60, IdleAction::Delete)), &run, 100);
        f.idle_since = Some(at(0));
        f.persistent = false;
        assert!(matches!(decide(&f).step, Step::Delete { .. }));
        f.persistent = true;
        let d = decide(&f);
        let Step::Reclaim { reclaimed, event } = &d.step else {
            panic!("no fallback: {d:?}");
        };
        assert_eq!(reclaimed.action, IdleAction::Shutdown);
        assert!(event.contains("persistent"), "{event}");
        assert!(verdict(&d).message.contains("persistent"));
    }

    #[test]
    fn only_a_running_desktop_on_a_live_host_is_reclaimed() {
        let stopped = running(false, "Shutdown", 0);
        let mut f = facts(Some(policy(60, IdleAction::Suspend)), &stopped, 1000);
        f.idle_since = Some(at(0));
        let d = decide(&f);
        assert_eq!(d.step, Step::Nothing);
        assert_eq!(verdict(&d).reason, idle_reason::ACTIVE);
        let run = running(true, "Running", 0);
        let mut f = facts(Some(policy(60, IdleAction::Suspend)), &run, 1000);
        f.idle_since = Some(at(0));
        f.host_alive = false;
        assert_eq!(decide(&f).step, Step::Nothing);
        assert_eq!(decide(&f).condition, IdleCondition::Keep);
        // No policy: no condition.
        let f = facts(None, &run, 1000);
        assert_eq!(decide(&f).condition, IdleCondition::Remove);
        // Woken and not started yet.
        let suspended = running(false, "Suspended", 10);
        let w = Wake {
            token: "t".into(),
            at: Time(at(20)),
        };
        let mut f = facts(Some(policy(60, IdleAction::Suspend)), &suspended, 21);
        f.wake = Some(&w);
        assert_eq!(verdict(&decide(&f)).reason, idle_reason::WOKEN);
    }

    #[test]
    fn holds_resources_until_the_host_confirms_the_reclaim() {
        let reclaimed =
            serde_json::json!({ "action": "Suspend", "at": "2024-01-01T00:00:00Z", "port": 5900 });
        let cond = |reason: &str, status: &str| {
            serde_json::json!([{ "type": "Running", "status": status, "reason": reason, "message": "m",
                                  "lastTransitionTime": "2024-01-01T00:00:00Z" }])
        };
        let plain = desktop(serde_json::json!({ "status": { "node": "h" } }));
        assert!(holds_resources(&plain));
        let asked = desktop(serde_json::json!({ "status": {
            "node": "h", "reclaimed": reclaimed, "conditions": cond("Reclaiming", "False") } }));
        assert!(holds_resources(&asked), "the host has not confirmed");
        let st = asked.status.clone().unwrap_or_default();
        assert_eq!(wake_step(&st), WakeStep::Cancel);
        for reason in [running_reason::SUSPENDED, running_reason::IDLE_SHUTDOWN] {
            let done = desktop(serde_json::json!({ "status": {
                "node": "h", "reclaimed": reclaimed, "conditions": cond(reason, "False") } }));
            assert!(!holds_resources(&done), "{reason}");
            let st = done.status.clone().unwrap_or_default();
            assert_eq!(wake_step(&st), WakeStep::Restore);
        }
        // The agent's Suspended alone (a wake cleared `reclaimed`) holds again.
        let woken = desktop(serde_json::json!({ "status": {
            "node": "h", "conditions": cond(running_reason::SUSPENDED, "False") } }));
        assert!(holds_resources(&woken));
        assert_eq!(
            wake_step(&woken.status.clone().unwrap_or_default()),
            WakeStep::Record
        );

        let totals = PoolIdle::of("p", [&plain, &asked, &woken]);
        assert_eq!(totals.released, 0);
        let done = desktop(serde_json::json!({ "status": {
            "node": "h", "reclaimed": reclaimed, "conditions": cond("Suspended", "False"),
            "session": { "connected": false } } }));
        let totals = PoolIdle::of("p", [&plain, &done]);
        assert_eq!(
            (totals.released, totals.cpu, totals.memory_bytes),
            (1, 2, 2 * GI)
        );
    }

    #[test]
    fn a_wake_token_counts_once() {
        let mut ann = BTreeMap::new();
        assert_eq!(wake_token(&ann, None), None);
        ann.insert(ANNOTATION_WAKE.to_string(), " ".to_string());
        assert_eq!(wake_token(&ann, None), None);
        ann.insert(ANNOTATION_WAKE.to_string(), "17".to_string());
        assert_eq!(wake_token(&ann, None).as_deref(), Some("17"));
        let st = DesktopStatus {
            wake: Some(Wake {
                token: "17".into(),
                at: Time(at(0)),
            }),
            ..Default::default()
        };
        assert_eq!(wake_token(&ann, Some(&st)), None);
        // Longer than the status field takes: recorded by its hash, still once.
        ann.insert(ANNOTATION_WAKE.to_string(), "x".repeat(300));
        let long = wake_token(&ann, Some(&st)).unwrap_or_default();
        assert!(
            long.starts_with("fnv1a64:") && long.len() < TOKEN_MAX,
            "{long}"
        );
        let st = DesktopStatus {
            wake: Some(Wake {
                token: long,
                at: Time(at(0)),
            }),
            ..Default::default()
        };
        assert_eq!(wake_token(&ann, Some(&st)), None);
    }

    #[test]
    fn a_woken_desktop_goes_home_else_moves_only_with_shared_storage() {
        let cap = HostCapacity {
            physical_cpus: 4,
            cpu_ratio: Ratio::ONE,
            memory: 4 * GI,
            hugepages: 0,
        };
        let mut policy = crate::scheduler::bench::policy(Placement::Spread);
        policy.ports = PortRange {
            first: 5900,
            last: 5901,
        };
        let req = Request::new(2, 2 * GI);
        let target = |node: &str, hosts: &[HostView], shared: bool| {
            wake_target("p", node, hosts, &req, &policy, shared)
        };
        let roomy = HostView::new("h", "p", cap).with_ports_in_use(1);
        assert_eq!(
            target("h", std::slice::from_ref(&roomy), true),
            WakeTarget::Host("h".into())
        );
        let full = roomy
            .clone()
            .with_allocated(Usage::of(&[Request::new(4, 3584 << 20)]));
        let WakeTarget::Wait(msg) = target("h", std::slice::from_ref(&full), false) else {
            panic!("fits on a full host");
        };
        assert_eq!(
            msg,
            "woken, waiting for room on host h where its disk lives: is full: needs 2 CPU / 2Gi, \
             free 0 CPU / 512Mi (the pool's storage is not shared, so it cannot move to another host)"
        );
        let no_port = roomy.clone().with_ports_in_use(2);
        let WakeTarget::Wait(msg) = target("h", &[no_port], false) else {
            panic!("fits without a port");
        };
        assert!(msg.contains("SPICE port"), "{msg}");

        // Shared storage: to the other host when it has room, else still waiting.
        let other = HostView::new("g", "p", cap);
        let hosts = [full.clone(), other.clone()];
        assert_eq!(
            target("h", &hosts, true),
            WakeTarget::Move {
                to: "g".into(),
                why: "is full: needs 2 CPU / 2Gi, free 0 CPU / 512Mi".into()
            }
        );
        assert_eq!(
            target("h", &hosts, false),
            target("h", std::slice::from_ref(&full), false)
        );
        let WakeTarget::Wait(msg) = target("h", std::slice::from_ref(&full), true) else {
            panic!("moved without another host");
        };
        assert!(msg.contains("no other host of the pool takes it"), "{msg}");
        // A host that is gone or not ready is left too (its domain was confirmed stopped).
        let mut lost = roomy.clone();
        lost.ready = false;
        assert!(matches!(
            target("h", &[lost, other.clone()], true),
            WakeTarget::Move { to, why } if to == "g" && why == "is not ready"
        ));
        assert!(matches!(
            target("gone", std::slice::from_ref(&other), true),
            WakeTarget::Move { to, .. } if to == "g"
        ));
        assert!(matches!(target("gone", &[], false), WakeTarget::Wait(_)));
    }
}
