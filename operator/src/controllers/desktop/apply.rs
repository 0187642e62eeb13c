//! A live Desktop's pass: labels and finalizer, then binding when unbound; once bound, keep the
//! ledger in step with the recorded binding, run idle reclamation and wakes, hand the console
//! password over, and derive the phase and `Ready` from the agent's conditions, what the idle
//! policy reclaimed and the host's heartbeat (`Ready=False InvalidSpec` once the spec is
//! edited into an invalid one).

use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::SCHEDULED;
use deskvirt_crds::constants::scheduled_reason::INVALID_SPEC;
use deskvirt_crds::desktop::{Desktop, Phase};
use deskvirt_crds::validation;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::bind::bind;
use super::busy_port;
use super::console::{ensure_mirror, ever_bound, write_user_secret};
use super::duplicate;
use super::idle::{self, Settled};
use super::size;
use super::status::{Owned, bound_message, ensure_meta, relabel, write, write_bound};
use super::{Error, Pass};
use crate::allocators::{Claim, Conflict};
use crate::console::user::Outcome;
use crate::context::Context;
use crate::idle::holds_resources;
use crate::repair;
use deskvirt_core::phase::{self, Facts};
use deskvirt_crds::read::agent_conditions;

/// One pass over a Desktop that is not being deleted. An unbound desktop gets the operator's
/// labels and finalizer with its binding, in one write (or, when it cannot be placed, with its
/// Pending status).
pub(super) async fn apply(mut pass: Pass<'_>) -> Result<Action, Error> {
    let Some(node) = pass.d.status.as_ref().and_then(|s| s.node.clone()) else {
        return bind(&pass).await;
    };
    if !ever_bound(pass.ctx, &pass.uid).await? {
        return forged(&pass, &node).await;
    }
    if let Some(fresh) = ensure_meta(&pass.d, &pass.api, Some(&node)).await? {
        pass.ctx.steps.record(&fresh);
        pass.d = Arc::new(fresh);
    }
    bound(&pass, &node).await
}

/// Reason of `Scheduled=False` for a binding the operator did not make.
pub const BINDING_NOT_OURS: &str = "BindingNotOurs";

/// A `status.node` the operator never wrote (no console mirror was ever made for the
/// desktop): nothing is bound, charged or handed to a host; `Scheduled=False` says why.
async fn forged(pass: &Pass<'_>, node: &str) -> Result<Action, Error> {
    let (d, api) = (&pass.d, &pass.api);
    let status = d.status.clone().unwrap_or_default();
    let current = Owned::from_status(&status);
    let mut want = current.clone();
    let scheduled = condition(
        &status.conditions,
        SCHEDULED,
        Status::False,
        BINDING_NOT_OURS,
        format!(
            "status.node names host {node}, but the operator never bound this desktop: the status \
             was written by someone else and is ignored (no host acts on it, nothing is charged)"
        ),
        d.metadata.generation,
        pass.now,
    );
    conditions::upsert(&mut want.conditions, scheduled);
    write(d, api, &current, &want).await?;
    Ok(Action::await_change())
}

/// Longest wait between two passes over a bound desktop.
const RECHECK: Duration = Duration::from_secs(300);

/// How long after writing a status a copy without it is taken for an older one.
const STATUS_SETTLE: Duration = Duration::from_secs(5);

/// A bound desktop: ledger, idle reclamation, console hand-off, phase.
async fn bound(pass: &Pass<'_>, node: &str) -> Result<Action, Error> {
    let (d, ctx, api) = (&pass.d, pass.ctx, &pass.api);
    let (uid, now) = (pass.uid.as_str(), pass.now);
    ctx.forget_binding(uid);
    let status = d.status.clone().unwrap_or_default();
    let current = Owned::from_status(&status);
    let gen_ = d.metadata.generation;
    let mut want = current.clone();
    keep_ledger(d, ctx, uid, node, &mut want).await;
    let moved_port = busy_port::move_off(d, ctx, uid, node, &status, &mut want).await;

    let alive = |n: &str| ctx.heartbeat(n, now).is_fresh() && ctx.stores.node(n).is_some();
    let plan = match idle::settle(pass, node, &status, alive(node), &mut want).await? {
        Settled::Deleted => return Ok(Action::await_change()),
        Settled::Write(plan) => plan,
    };
    // A woken desktop may have moved to another host (its node label follows before the status
    // write): the rest of the pass is about that one.
    let moved_to = want.node.clone().filter(|n| n != node);
    let node = moved_to.as_deref().unwrap_or(node);
    let alive = alive(node);

    let handed = match console(pass, node, &want).await {
        Ok(handed) => handed,
        // A port reserved for a wake goes back with the failed pass.
        Err(e) => {
            idle::abandon(pass, &plan).await;
            return Err(e);
        }
    };
    if let Some(outcome) = &handed {
        want.secret = outcome.secret().map(str::to_string);
        want.console(&status.conditions, now, gen_, outcome);
    }

    // Phase from the agent's conditions, the idle policy's record and the host's heartbeat.
    let (defined, running) = agent_conditions(&status.conditions);
    let derived = phase::derive(&Facts {
        bound: true,
        host_alive: alive,
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
    let warnings = size::settle(ctx, d, uid, node, &mut want, now).await;
    let scheduled = bound_message(node, want.port, want.mac.as_deref());
    // A spec made invalid after binding: not Ready, naming the fields (the host never applies
    // a USB policy looser than the pool's; nothing bound is taken back).
    let pool = ctx.stores.pool(d.pool());
    let invalid = validation::desktop(&d.spec, pool.as_ref().map(|p| &p.spec));
    let summary = if invalid.is_empty() {
        (ready, derived.reason, derived.message.clone())
    } else {
        let message = format!(
            "spec changed since binding: {}",
            validation::summary(&invalid)
        );
        (Status::False, INVALID_SPEC, message)
    };
    want.judge(
        &status.conditions,
        now,
        (Status::True, "Bound", scheduled),
        summary,
    );
    // The same as this replica wrote a moment ago: the copy is older than that write (not for
    // idle reclamation, whose writes are guarded by the version they were decided on anyway).
    let in_flight = if current.same_as(&want) || want.needs_guard(&current) {
        None
    } else {
        ctx.status_in_flight(uid, want.fingerprint(), STATUS_SETTLE)
    };
    // A move relabels the desktop for its new host first; the status write is guarded by the
    // version that wrote.
    let relabelled = match &moved_to {
        Some(to) => match relabel(d, api, to).await {
            Ok(fresh) => {
                ctx.steps.record(&fresh);
                Some(fresh)
            }
            Err(e) => {
                idle::abandon(pass, &plan).await;
                return Err(e);
            }
        },
        None => None,
    };
    let written = match in_flight {
        Some(_) => Ok(false),
        None => write_bound(relabelled.as_ref().unwrap_or(d), api, &current, &want).await,
    };
    let wrote = matches!(written, Ok(true));
    if wrote {
        ctx.status_written(uid, want.fingerprint());
    }
    let requeue = [plan.requeue, in_flight]
        .into_iter()
        .flatten()
        .fold(RECHECK, Duration::min);
    idle::after_write(pass, plan, written).await?;
    if wrote && let Some(t) = phase_event(current.phase, want.phase) {
        ctx.event(d.as_ref(), t, want.phase.as_str(), "Phase", derived.message)
            .await;
    }
    for w in warnings.into_iter().filter(|_| wrote) {
        ctx.event(
            d.as_ref(),
            EventType::Warning,
            w.reason,
            w.action,
            w.message,
        )
        .await;
    }
    if let Some((busy, port)) = moved_port.filter(|_| wrote) {
        ctx.metrics.busy_ports_moved.inc();
        let message = format!(
            "SPICE port {busy} is taken on host {node} by another process; the desktop moves to port {port}"
        );
        ctx.event(
            d.as_ref(),
            EventType::Warning,
            "SpicePortBusy",
            "MovePort",
            message,
        )
        .await;
    }
    if wrote && let Some((reason, message)) = console_event(&current, &want) {
        ctx.event(d.as_ref(), EventType::Warning, &reason, "Console", message)
            .await;
    }
    Ok(Action::requeue(requeue))
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

/// The Warning a `ConsoleSecret` that turned False deserves: its reason and message.
pub(super) fn console_event(current: &Owned, want: &Owned) -> Option<(String, String)> {
    let now = want.console_condition().filter(|c| c.status == "False")?;
    let before = current.console_condition();
    if before.is_some_and(|b| b.status == now.status && b.reason == now.reason) {
        return None;
    }
    Some((now.reason.clone(), now.message.clone()))
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

/// Keeps the pool's ledger in step with the recorded binding: a binding a rebuild refused gets
/// a new port and MAC on the same host (in `want`); one the ledger lost track of (a write given
/// up on that landed after all) is adopted when nobody else holds its values.
async fn keep_ledger(d: &Desktop, ctx: &Context, uid: &str, node: &str, want: &mut Owned) {
    // Released by the idle policy: it holds no port (its MAC stays with the ledger).
    if !holds_resources(d) {
        return;
    }
    let mut ledgers = ctx.ledgers.lock().await;
    // The wait for the lock may have outlasted the Lease: the ledger is no longer ours.
    if !ledgers.ready || crate::fence::check().is_err() {
        return;
    }
    let Some(pool) = ctx.stores.pool(d.pool()) else {
        return;
    };
    // Built here if no pass has yet: a rebuild that refuses this binding says so at once, and
    // no later wake-up is needed to repair it.
    if ledgers.of(&pool, &ctx.stores).is_err() {
        return;
    }
    if ledgers.rebind.contains(uid) {
        let Ok(ledger) = ledgers.of(&pool, &ctx.stores) else {
            return;
        };
        let claim = Claim {
            desktop: uid,
            host: node,
            fixed_mac: d.spec.network.mac.as_deref(),
        };
        if let Ok(b) = ledger.bind(&claim) {
            want.port = Some(b.port);
            want.mac = Some(b.mac.to_string());
            ledgers.rebind.remove(uid);
            let why = ledgers.rebind_why.remove(uid);
            drop(ledgers);
            let message = match why {
                Some(Conflict::Taken {
                    resource, holder, ..
                }) => repair::message(
                    &resource,
                    &duplicate::name(ctx, uid),
                    &duplicate::name(ctx, &holder),
                    b.port,
                    &b.mac.to_string(),
                ),
                _ => format!(
                    "recorded port or MAC was held by an older desktop; now port {} MAC {}",
                    b.port, b.mac
                ),
            };
            ctx.metrics.binding_repairs.inc();
            ctx.event(d, EventType::Warning, "BindingConflict", "Rebind", message)
                .await;
        }
        return;
    }
    // Holds resources but no port: a wake whose write stopped half-way (`reclaimed` cleared,
    // the port not written yet). The ledger's port, else its lowest free one.
    if want.port.is_none()
        && let Some(ledger) = ledgers.get_mut(d.pool())
    {
        match ledger.restore_port(uid, node, None) {
            Ok(port) => want.port = Some(port),
            Err(e) => tracing::warn!(host = node, error = %e, "no SPICE port for a bound desktop"),
        }
        return;
    }
    let (Some(port), Some(mac)) = (want.port, want.mac.as_deref()) else {
        return;
    };
    let Some(ledger) = ledgers.get_mut(d.pool()) else {
        return;
    };
    if ledger.holds(uid, node, port, mac) {
        return;
    }
    let dups = repair::duplicates(ledger, uid, node, port, mac);
    if !dups.is_empty() {
        let mac = mac.to_string();
        drop(ledgers);
        return duplicate::repair(d, ctx, uid, node, (port, &mac), dups, want).await;
    }
    // No port (a woken desktop's reservation given up on, whose write landed after all): adopt.
    if ledger.port_of(uid).is_none() {
        if ledger.adopt(uid, node, port, mac) {
            tracing::info!(host = node, port, mac, "ledger adopted a recorded binding");
        }
    } else {
        // Newer than the cache (a rebind just written), or older: the cache settles it.
        tracing::debug!(host = node, port, mac, "ledger and recorded binding differ");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_secret_refused_anew_is_worth_one_warning() {
        use deskvirt_crds::desktop::DesktopStatus;
        let at = k8s_openapi::jiff::Timestamp::UNIX_EPOCH;
        let with = |outcome: &Outcome| {
            let mut o = Owned::from_status(&DesktopStatus::default());
            o.console(&[], at, Some(1), outcome);
            o
        };
        let none = Owned::from_status(&DesktopStatus::default());
        let written = with(&Outcome::Written {
            namespace: "ns".into(),
            secret: "d-console".into(),
        });
        let foreign = with(&Outcome::NotOurs {
            namespace: "ns".into(),
            secret: "d-console".into(),
        });
        let refused = with(&Outcome::NamespaceNotAllowed {
            namespace: "ns".into(),
        });
        assert_eq!(console_event(&none, &written), None);
        let (reason, message) = console_event(&written, &foreign).unwrap_or_default();
        assert_eq!(reason, "SecretNotOurs");
        assert!(message.contains("ns/d-console"), "{message}");
        assert_eq!(console_event(&foreign, &foreign), None, "said once");
        let (reason, _) = console_event(&none, &refused).unwrap_or_default();
        assert_eq!(reason, "NamespaceNotAllowed");
        assert_eq!(console_event(&foreign, &written), None);
    }

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
