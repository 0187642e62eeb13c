//! The idle policy's decisions, built from plain facts.

use super::*;

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn running(runs: bool, since: i64) -> Running {
    Running {
        runs,
        since: at(since),
    }
}

fn policy(secs: u64, action: IdleAction) -> Policy {
    Policy {
        timeout: Duration::from_secs(secs),
        action,
    }
}

/// A desktop `ns/d` on a live host, persistent, holding port 5901, running since `since`.
fn facts(p: Option<Policy>, run: Running, now: i64) -> Facts<'static> {
    Facts {
        namespace: "ns",
        name: "d",
        policy: p,
        persistent: true,
        host_alive: true,
        running: Some(run),
        idle_since: None,
        woken_at: None,
        reclaimed: None,
        port: Some(5901),
        now: at(now),
    }
}

fn verdict(d: &Decision) -> &Verdict {
    match &d.condition {
        IdleCondition::Set(v) => v,
        other => panic!("no verdict: {other:?}"),
    }
}

#[test]
fn a_policy_reads_its_timeout_with_the_duration_parser() {
    assert_eq!(
        Policy::read("5m", IdleAction::Suspend),
        Ok(policy(300, IdleAction::Suspend))
    );
    assert!(Policy::read("5x", IdleAction::Suspend).is_err());
}

#[test]
fn the_countdown_runs_from_the_later_of_idle_since_and_the_last_wake() {
    let t = Duration::from_secs(60);
    assert_eq!(deadline(at(0), None, t), at(60));
    assert_eq!(deadline(at(0), Some(at(-30)), t), at(60));
    assert_eq!(deadline(at(0), Some(at(45)), t), at(105));

    // The pass requeues itself at the deadline.
    let mut f = facts(Some(policy(60, IdleAction::Suspend)), running(true, 0), 10);
    f.idle_since = Some(at(0));
    let d = decide(&f);
    assert_eq!(d.step, Step::Nothing);
    assert_eq!(d.requeue, Some(Duration::from_secs(50) + REQUEUE_MARGIN));
    let v = verdict(&d);
    assert_eq!((v.idle, v.reason), (false, IdleReason::CountingDown));
    assert!(v.message.contains(&at(60).to_string()), "{}", v.message);
    // A wake after idleSince moves it, and says so.
    f.woken_at = Some(at(45));
    let d = decide(&f);
    assert_eq!(d.requeue, Some(Duration::from_secs(95) + REQUEUE_MARGIN));
    let v = verdict(&d);
    assert_eq!(v.reason, IdleReason::Woken);
    assert!(v.message.contains(&at(105).to_string()), "{}", v.message);
}

#[test]
fn the_condition_does_not_move_while_counting_down() {
    let run = running(true, 0);
    let mut f = facts(Some(policy(600, IdleAction::Shutdown)), run, 1);
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
    let stopped = running(false, 0);
    let reclaimed = Reclaim {
        action: IdleAction::Shutdown,
        at: at(600),
        port: None,
    };
    for (since, now, run, r) in [
        (None, 10, run, None),
        (Some(at(0)), 700, run, None),
        (Some(at(0)), 700, stopped, None),
        (Some(at(0)), 700, stopped, Some(reclaimed)),
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
    let run = running(true, 0);
    for action in [IdleAction::Suspend, IdleAction::Shutdown] {
        let mut f = facts(Some(policy(60, action)), run, 61);
        f.idle_since = Some(at(0));
        let d = decide(&f);
        let Step::Reclaim { reclaimed, event } = &d.step else {
            panic!("not reclaimed: {d:?}");
        };
        assert_eq!(reclaimed.action, action);
        assert_eq!(reclaimed.port, Some(5901));
        assert_eq!(reclaimed.at, at(61));
        assert!(
            event.contains("deskvirt.io/wake=$(date +%s) --overwrite"),
            "{event}"
        );
        assert!(event.contains("1m"), "{event}");
        let v = verdict(&d);
        assert_eq!((v.idle, v.reason), (true, IdleReason::IdleTimeout));
        // Once recorded, the next pass does nothing more and says the same.
        f.reclaimed = Some(*reclaimed);
        let again = decide(&f);
        assert_eq!(again.step, Step::Nothing);
        assert_eq!(again.condition, d.condition);
    }
    // None only reports.
    let mut f = facts(Some(policy(60, IdleAction::None)), run, 61);
    f.idle_since = Some(at(0));
    let d = decide(&f);
    assert_eq!(d.step, Step::Nothing);
    assert_eq!(verdict(&d).reason, IdleReason::IdleReported);
}

#[test]
fn the_reclaim_is_decided_to_the_second() {
    let mut f = facts(Some(policy(60, IdleAction::Suspend)), running(true, 0), 61);
    f.idle_since = Some(at(0));
    f.now = Timestamp::from_millisecond(at(61).as_millisecond() + 999).unwrap_or(f.now);
    let Step::Reclaim { reclaimed, .. } = decide(&f).step else {
        panic!("not reclaimed");
    };
    assert_eq!(reclaimed.at, at(61), "as the API stores it");
}

#[test]
fn delete_only_without_a_persistent_disk_else_shutdown() {
    let mut f = facts(Some(policy(60, IdleAction::Delete)), running(true, 0), 100);
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
    let mut f = facts(
        Some(policy(60, IdleAction::Suspend)),
        running(false, 0),
        1000,
    );
    f.idle_since = Some(at(0));
    let d = decide(&f);
    assert_eq!(d.step, Step::Nothing);
    assert_eq!(verdict(&d).reason, IdleReason::Active);
    let mut f = facts(
        Some(policy(60, IdleAction::Suspend)),
        running(true, 0),
        1000,
    );
    f.idle_since = Some(at(0));
    f.host_alive = false;
    assert_eq!(decide(&f).step, Step::Nothing);
    assert_eq!(decide(&f).condition, IdleCondition::Keep);
    // No policy: no condition.
    let f = facts(None, running(true, 0), 1000);
    assert_eq!(decide(&f).condition, IdleCondition::Remove);
    // Woken and not started yet; once the host changed the state since, no longer.
    let mut f = facts(
        Some(policy(60, IdleAction::Suspend)),
        running(false, 10),
        21,
    );
    f.woken_at = Some(at(20));
    assert_eq!(verdict(&decide(&f)).reason, IdleReason::Woken);
    f.running = Some(running(false, 30));
    assert_eq!(verdict(&decide(&f)).reason, IdleReason::Active);
}

#[test]
fn resources_are_released_only_once_the_host_confirms_the_reclaim() {
    let cond = |status, reason| Cond {
        status,
        reason,
        message: "m",
    };
    assert!(!released(false, None));
    assert!(!released(true, None), "the host has said nothing");
    assert!(!released(true, Some(cond("False", "Reclaiming"))));
    assert!(released(true, Some(cond("False", "Suspended"))));
    assert!(released(true, Some(cond("False", "IdleShutdown"))));
    assert!(!released(true, Some(cond("True", "Suspended"))));
    assert!(
        !released(true, Some(cond("False", "suspended"))),
        "a closed set, matched exactly"
    );
    // The agent's Suspended alone (a wake cleared `reclaimed`) holds again.
    assert!(!released(false, Some(cond("False", "Suspended"))));
}
