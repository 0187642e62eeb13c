//! A bound desktop's pass, as observe → plan → commit. Observe reads once what the caches hold
//! ([`Seen`]). Plan decides everything in one hold of the ledger lock, the pass's ledger
//! transaction ([`Txn`]): the ledger kept in step with the recorded binding, a port moved off a
//! busy one, idle reclamation and wakes, the phase, the size and the conditions ([`Plan`]).
//! Commit sends the writes in order, each fenced and guarded (the console password, the node
//! label of a move, the status); when one fails, what the transaction reserved goes back in one
//! step. Then a port the status released goes back to the pool, and the Events are recorded.

use std::time::Duration;

use deskvirt_core::phase::{self, Facts};
use deskvirt_crds::conditions::Status;
use deskvirt_crds::constants::scheduled_reason::INVALID_SPEC;
use deskvirt_crds::desktop::{Desktop, DesktopStatus, Phase};
use deskvirt_crds::read::agent_conditions;
use deskvirt_crds::validation;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::apply::console_event;
use super::console::{ensure_mirror, write_user_secret};
use super::idle::{self, Settled};
use super::status::{Owned, bound_message, relabel, write_bound};
use super::txn::{Txn, Undo};
use super::{Error, Pass, arrive, busy_port, drain, keep, size};
use crate::console::user::Outcome;
use crate::context::Context;
use crate::fence::Fenced;
use crate::idle::holds_resources;

/// An Event a plan makes due: type, reason, action, note.
pub(super) type Due = (EventType, &'static str, &'static str, String);

/// A change of the ledger the plan made, to be told whatever the writes do: the Warning, and
/// the recorded binding it is about when it is to be told once per binding.
#[derive(Debug)]
pub(super) struct Told {
    pub once: Option<(String, u16, String)>,
    pub due: Option<Due>,
}

/// What a bound desktop's pass decides on, read once.
pub(super) struct Seen<'p> {
    pub d: &'p Desktop,
    pub uid: &'p str,
    /// The host it is bound to.
    pub node: String,
    pub now: Timestamp,
    pub status: DesktopStatus,
    /// The operator's part of that status.
    pub current: Owned,
    /// Whether it holds its port (not released by the idle policy).
    pub holds: bool,
}

impl<'p> Seen<'p> {
    fn observe(pass: &'p Pass<'_>, node: &str) -> Self {
        Self::of(&pass.d, &pass.uid, node, pass.now)
    }

    /// What a pass at `now` over `d` (UID `uid`), bound to `node`, decides on.
    pub(super) fn of(d: &'p Desktop, uid: &'p str, node: &str, now: Timestamp) -> Self {
        let status = d.status.clone().unwrap_or_default();
        Self {
            d,
            uid,
            node: node.to_string(),
            now,
            current: Owned::from_status(&status),
            status,
            holds: holds_resources(d),
        }
    }
}

/// Everything a bound desktop's pass will do, decided at once.
pub(super) struct Plan {
    /// The operator's part of the status, but for what becomes of the console Secret.
    pub want: Owned,
    /// The host the writes are about: the bound one, or the one a woken desktop moves to.
    pub host: String,
    /// The host a woken desktop moves to (its node label changes before the status).
    pub moved_to: Option<String>,
    /// The idle policy deletes the Desktop (the Warning's note); nothing else is written.
    pub delete: Option<String>,
    /// A change of the ledger to tell.
    pub told: Option<Told>,
    pub idle: idle::Plan,
    /// The SPICE port the host found taken, and the one the desktop moves to.
    pub moved_port: Option<(u16, u16)>,
    /// Warnings about the size or the pool, due when the status is written.
    pub warnings: Vec<size::Warning>,
    /// Why the phase is what it is (the phase Event's note).
    pub phase_note: String,
    /// The migration target the desktop's binding moved to.
    pub migrated_to: Option<String>,
    /// Look again this soon: a completed migration the caches do not confirm yet.
    pub recheck: Option<Duration>,
    /// A stopped desktop bound to another host because its own drains.
    pub rebound: Option<drain::Rebound>,
}

/// Longest wait between two passes over a bound desktop.
const RECHECK: Duration = Duration::from_secs(300);

/// How long after writing a status a copy without it is taken for an older one.
const STATUS_SETTLE: Duration = Duration::from_secs(5);

/// A bound desktop: observe, plan in one ledger transaction, commit.
pub(super) async fn bound(pass: &Pass<'_>, node: &str) -> Result<Action, Error> {
    let ctx = pass.ctx;
    ctx.forget_binding(&pass.uid);
    let seen = Seen::observe(pass, node);
    let (plan, undo) = decide(&seen, ctx).await?;
    commit(pass, &seen, plan, undo).await
}

/// Plans the pass in one ledger transaction on the desktop's pool: the plan, and what a failed
/// commit gives back. Refused when the fence lapsed while waiting for the lock.
pub(super) async fn decide(seen: &Seen<'_>, ctx: &Context) -> Result<(Plan, Undo), Fenced> {
    let mut ledgers = ctx.ledgers.lock().await;
    let mut txn = Txn::begin(&mut ledgers, &ctx.stores, seen.d.pool())?;
    let plan = plan(seen, ctx, &mut txn);
    Ok((plan, txn.finish()))
}

/// Decides the whole pass, in the ledger transaction; reads only the caches.
fn plan(seen: &Seen<'_>, ctx: &Context, txn: &mut Txn<'_>) -> Plan {
    let (d, now) = (seen.d, seen.now);
    let gen_ = d.metadata.generation;
    let mut want = seen.current.clone();
    // The spec read once against its pool; an invalid one is reported below.
    let valid = validation::read_desktop(&d.spec, txn.pool().map(|p| &p.spec));
    // A desktop that arrived on a migration's target: its binding follows it, and the ledger
    // agrees with the new binding already.
    let arrived = arrive::arrive(seen, &ctx.stores, txn, &mut want);
    // Moved into another pool: this transaction is the old pool's. The binding is written as
    // it moved, and the next pass plans the rest in the new pool's.
    let new_pool = want.allocation.as_ref().map(|a| a.pool.as_str());
    if let Some(to) = arrived
        .clone()
        .filter(|_| new_pool.is_some_and(|p| p != d.pool()))
    {
        return Plan {
            want,
            host: to.clone(),
            moved_to: Some(to.clone()),
            delete: None,
            told: None,
            idle: idle::Plan::default(),
            moved_port: None,
            warnings: Vec::new(),
            phase_note: String::new(),
            migrated_to: Some(to),
            recheck: Some(Duration::from_millis(200)),
            rebound: None,
        };
    }
    let (told, moved_port) = match arrived {
        Some(_) => (None, None),
        None => (
            keep::keep(seen, ctx, txn, &mut want),
            busy_port::move_off(seen, txn, &mut want),
        ),
    };
    let alive = |n: &str| ctx.heartbeat(n, now).is_fresh() && ctx.stores.node(n).is_some();
    let mut plan = Plan {
        want: Owned::default(),
        host: seen.node.clone(),
        moved_to: None,
        delete: None,
        told,
        idle: idle::Plan::default(),
        moved_port,
        warnings: Vec::new(),
        phase_note: String::new(),
        recheck: (arrived.is_none() && arrive::completed(&seen.status).is_some())
            .then_some(Duration::from_secs(2)),
        migrated_to: arrived,
        rebound: None,
    };
    plan.idle = match idle::settle(
        seen,
        valid.as_ref().ok(),
        ctx,
        txn,
        alive(&seen.node),
        &mut want,
    ) {
        Settled::Delete(note) => {
            plan.delete = Some(note);
            plan.want = want;
            return plan;
        }
        Settled::Write(p) => p,
    };
    // A stopped desktop of a draining host is bound to another one.
    if plan.migrated_to.is_none() && want.node.as_deref().is_none_or(|n| n == seen.node) {
        match drain::rebind(seen, valid.as_ref().ok(), ctx, txn, &mut want) {
            drain::Rebind::Later => {
                plan.recheck = Some(plan.recheck.map_or(drain::RETRY, |r| r.min(drain::RETRY)));
            }
            r => plan.rebound = r.moved(),
        }
    }
    // A woken or re-bound desktop may move to another host: the rest of the pass is about
    // that one.
    plan.moved_to = want.node.clone().filter(|n| *n != seen.node);
    if let Some(to) = &plan.moved_to {
        plan.host = to.clone();
    }
    let host = plan.host.as_str();

    // Phase from the agent's conditions, the idle policy's record and the host's heartbeat.
    let (defined, running) = agent_conditions(&seen.status.conditions);
    let derived = phase::derive(&Facts {
        bound: true,
        host_alive: alive(host),
        power: d.spec.power,
        reclaimed: idle::reclaimed_action(&want),
        defined,
        running,
    });
    want.phase = derived.phase;
    want.generation = gen_;
    let ready = if derived.phase == Phase::Unknown {
        Status::Unknown
    } else {
        Status::from_bool(derived.ready)
    };
    plan.warnings = size::settle(seen, valid.as_ref().ok(), ctx, txn, host, &mut want);
    let scheduled = bound_message(host, want.port, want.mac.as_deref());
    // A spec made invalid after binding: not Ready, naming the fields (the host never applies
    // a USB policy looser than the pool's; nothing bound is taken back).
    let invalid = match &valid {
        Ok(v) => v.refused.as_slice(),
        Err(errors) => errors.as_slice(),
    };
    let summary = if invalid.is_empty() {
        (ready, derived.reason, derived.message.clone())
    } else {
        let message = format!(
            "spec changed since binding: {}",
            validation::summary(invalid)
        );
        (Status::False, INVALID_SPEC, message)
    };
    want.judge(
        &seen.status.conditions,
        now,
        (Status::True, "Bound", scheduled),
        summary,
    );
    plan.want = want;
    plan.phase_note = derived.message;
    plan
}

/// Sends the plan's writes; a failed one gives back what the transaction reserved. Then lets
/// a released port go and records the Events.
async fn commit(
    pass: &Pass<'_>,
    seen: &Seen<'_>,
    mut plan: Plan,
    undo: Undo,
) -> Result<Action, Error> {
    let (d, ctx, uid) = (seen.d, pass.ctx, seen.uid);
    if let Some(told) = plan.told.take() {
        tell(ctx, d, uid, told).await;
    }
    if let Some(note) = plan.delete.take() {
        idle::delete(pass, note).await?;
        return Ok(Action::await_change());
    }
    let (wrote, in_flight) = match send(pass, seen, &mut plan).await {
        Ok(sent) => sent,
        Err(e) => {
            undo.rollback(ctx, uid).await;
            return Err(e);
        }
    };
    let want = &plan.want;
    if wrote {
        ctx.status_written(uid, want.fingerprint());
    }
    if plan.idle.drop_port
        && let Some(l) = ctx.ledgers.lock().await.get_mut(d.pool())
        && let Some((host, port)) = l.release_port(uid)
    {
        tracing::info!(%host, port, "released the SPICE port of a reclaimed desktop");
    }
    let requeue = [plan.idle.requeue, in_flight, plan.recheck]
        .into_iter()
        .flatten()
        .fold(RECHECK, Duration::min);
    for (type_, reason, action, note) in plan.idle.events {
        ctx.event(d, type_, reason, action, note).await;
    }
    if !wrote {
        return Ok(Action::requeue(requeue));
    }
    if let Some(t) = phase_event(seen.current.phase, want.phase) {
        ctx.event(d, t, want.phase.as_str(), "Phase", plan.phase_note)
            .await;
    }
    for w in plan.warnings {
        ctx.event(d, EventType::Warning, w.reason, w.action, w.message)
            .await;
    }
    if let Some(to) = &plan.migrated_to {
        let note = format!(
            "moved live from host {} to host {to}; SPICE port {}",
            seen.node,
            want.port.unwrap_or_default()
        );
        ctx.event(d, EventType::Normal, "Migrated", "Migrate", note)
            .await;
    }
    if let Some(r) = &plan.rebound {
        ctx.metrics.drain_rebinds.inc();
        let port = r
            .port
            .map(|p| format!(" with SPICE port {p}"))
            .unwrap_or_default();
        let note = format!(
            "host {} drains; the stopped desktop is bound to host {}{port}, keeping its disk \
             (shared storage) and MAC",
            seen.node, r.to
        );
        ctx.event(d, EventType::Normal, "Rebound", "Drain", note)
            .await;
    }
    if let Some((busy, port)) = plan.moved_port {
        ctx.metrics.busy_ports_moved.inc();
        let note = format!(
            "SPICE port {busy} is taken on host {} by another process; the desktop moves to port {port}",
            plan.host
        );
        ctx.event(d, EventType::Warning, "SpicePortBusy", "MovePort", note)
            .await;
    }
    if let Some((reason, message)) = console_event(&seen.current, want) {
        ctx.event(d, EventType::Warning, &reason, "Console", message)
            .await;
    }
    Ok(Action::requeue(requeue))
}

/// The writes, in order: the console password, the node label of a move, the status (unless
/// the same status was written a moment ago and the copy is older than that write). Returns
/// whether the status was written, and how long that earlier write may take to show.
async fn send(
    pass: &Pass<'_>,
    seen: &Seen<'_>,
    plan: &mut Plan,
) -> Result<(bool, Option<Duration>), Error> {
    let (d, ctx, uid) = (seen.d, pass.ctx, seen.uid);
    if let Some(outcome) = console(pass, &plan.host, &plan.want).await? {
        plan.want.secret = outcome.secret().map(str::to_string);
        plan.want.console(
            &seen.status.conditions,
            seen.now,
            d.metadata.generation,
            &outcome,
        );
    }
    let (current, want) = (&seen.current, &plan.want);
    // Not for idle reclamation or the charge: those writes are guarded by the version they
    // were decided on anyway.
    let in_flight = if current.same_as(want) || want.needs_guard(current) {
        None
    } else {
        ctx.status_in_flight(uid, want.fingerprint(), STATUS_SETTLE)
    };
    // A move relabels the desktop for its new host first; the status write is guarded by the
    // version that wrote.
    let relabelled = match &plan.moved_to {
        Some(to) => {
            let fresh = relabel(d, &pass.api, to).await?;
            ctx.steps.record(&fresh);
            Some(fresh)
        }
        None => None,
    };
    let wrote = match in_flight {
        Some(_) => false,
        None => write_bound(relabelled.as_ref().unwrap_or(d), &pass.api, current, want).await?,
    };
    Ok((wrote, in_flight))
}

/// Tells a change of the ledger: counted, with its Warning; a repair of the same recorded
/// binding is told once.
async fn tell(ctx: &Context, d: &Desktop, uid: &str, told: Told) {
    if let Some(recorded) = told.once {
        let said = ctx
            .repaired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), recorded.clone());
        if said.as_ref() == Some(&recorded) {
            return;
        }
    }
    ctx.metrics.binding_repairs.inc();
    if let Some((type_, reason, action, note)) = told.due {
        tracing::warn!(%note, reason, "binding repaired");
        ctx.event(d, type_, reason, action, note).await;
    }
}

/// The Event a phase change deserves: into trouble (`Unknown`, `Failed`: a Warning) or out of
/// it. Routine progress (Scheduled, Starting, Running, and power and idle changes) has its
/// `Scheduled` Event, the agent's Events and the idle policy's, and shows in the conditions.
fn phase_event(from: Phase, to: Phase) -> Option<EventType> {
    let trouble = |p| matches!(p, Phase::Unknown | Phase::Failed);
    if from == to {
        None
    } else if trouble(to) {
        Some(EventType::Warning)
    } else if trouble(from) {
        Some(EventType::Normal)
    } else {
        None
    }
}

/// The console password: the mirror is canonical, the user's Secret is written from it; returns
/// what became of that Secret, `None` when nothing was due. A desktop whose port went back to
/// the pool keeps its last console file until it is woken.
async fn console(pass: &Pass<'_>, node: &str, want: &Owned) -> Result<Option<Outcome>, Error> {
    let (d, ctx, uid) = (&pass.d, pass.ctx, pass.uid.as_str());
    let held = ensure_mirror(d, ctx, uid, node).await?;
    if want.port.is_none() && want.reclaimed.is_some() {
        return Ok(None);
    }
    // A status without the condition (a write that did not land): say it again now.
    if want.console_condition().is_none() {
        ctx.forget_user_secret(uid);
    }
    write_user_secret(d, ctx, uid, node, want.port, &held).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_for_trouble_and_recovery_only() {
        use Phase::*;
        assert_eq!(phase_event(Scheduled, Running), None);
        assert_eq!(phase_event(Starting, Running), None);
        assert_eq!(phase_event(Running, Stopped), None);
        assert_eq!(phase_event(Running, Unknown), Some(EventType::Warning));
        assert_eq!(phase_event(Starting, Failed), Some(EventType::Warning));
        assert_eq!(phase_event(Unknown, Running), Some(EventType::Normal));
        assert_eq!(phase_event(Failed, Failed), None);
    }
}
