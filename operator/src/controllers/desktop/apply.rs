//! A live Desktop's pass: labels and finalizer, then binding when unbound; once bound, keep the
//! ledger in step with the recorded binding, run idle reclamation and wakes, hand the console
//! password over, and derive the phase and `Ready` from the agent's conditions, what the idle
//! policy reclaimed and the host's heartbeat.

use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::conditions::Status;
use deskvirt_crds::desktop::{Desktop, Phase};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::bind::bind;
use super::console::{apply_user_secret, ensure_mirror};
use super::idle::{self, Settled};
use super::status::{Owned, ensure_meta, write_bound};
use super::{Error, Pass};
use crate::allocators::Claim;
use crate::context::Context;
use crate::idle::holds_resources;
use crate::phase::{self, Facts};

/// One pass over a Desktop that is not being deleted.
pub(super) async fn apply(mut pass: Pass<'_>) -> Result<Action, Error> {
    let node = pass.d.status.as_ref().and_then(|s| s.node.clone());
    // Continue from the API's answer when metadata was written: its version is the fresh one
    // a binding must be written onto.
    if let Some(fresh) = ensure_meta(&pass.d, &pass.api, node.as_deref()).await? {
        pass.d = Arc::new(fresh);
    }
    match pass.d.status.as_ref().and_then(|s| s.node.clone()) {
        None => bind(&pass).await,
        Some(node) => bound(&pass, &node).await,
    }
}

/// Longest wait between two passes over a bound desktop.
const RECHECK: Duration = Duration::from_secs(300);

/// A bound desktop: ledger, idle reclamation, console hand-off, phase.
async fn bound(pass: &Pass<'_>, node: &str) -> Result<Action, Error> {
    let (d, ctx, api) = (&pass.d, pass.ctx, &pass.api);
    let (uid, now) = (pass.uid.as_str(), pass.now);
    let status = d.status.clone().unwrap_or_default();
    let current = Owned::from_status(&status);
    let gen_ = d.metadata.generation;
    let mut want = current.clone();
    keep_ledger(d, ctx, uid, node, &mut want).await;

    let heartbeat = ctx.heartbeat(node, now);
    let alive = heartbeat.is_fresh() && ctx.stores.node(node).is_some();
    let plan = match idle::settle(pass, node, &status, alive, &mut want).await? {
        Settled::Deleted => return Ok(Action::await_change()),
        Settled::Write(plan) => plan,
    };

    match console(pass, node, &want).await {
        Ok(Some(secret)) => want.secret = Some(secret),
        Ok(None) => {}
        // A port reserved for a wake goes back with the failed pass.
        Err(e) => {
            idle::abandon(pass, &plan).await;
            return Err(e);
        }
    }

    // Phase from the agent's conditions, the idle policy's record and the host's heartbeat.
    let derived = phase::derive(&Facts {
        bound: true,
        host_alive: alive,
        power: d.spec.power,
        reclaimed: idle::reclaimed_action(&want),
        conditions: &status.conditions,
    });
    want.phase = derived.phase;
    want.generation = gen_;
    let ready = if derived.phase == Phase::Unknown {
        Status::Unknown
    } else {
        Status::from_bool(derived.ready)
    };
    want.judge(
        &status.conditions,
        now,
        (Status::True, "Bound", format!("bound to host {node}")),
        (ready, derived.reason, derived.message.clone()),
    );
    let written = write_bound(d, api, &current, &want).await;
    let requeue = plan.requeue.map_or(RECHECK, |r| r.min(RECHECK));
    idle::after_write(pass, plan, written).await?;
    if current.phase != want.phase {
        let t = if matches!(want.phase, Phase::Unknown | Phase::Failed) {
            EventType::Warning
        } else {
            EventType::Normal
        };
        ctx.event(d.as_ref(), t, want.phase.as_str(), "Phase", derived.message)
            .await;
    }
    Ok(Action::requeue(requeue))
}

/// The console password: the mirror is canonical, the user's Secret is written from it; returns
/// the Secret's name when written. A desktop whose port went back to the pool keeps its last
/// console file until it is woken.
async fn console(pass: &Pass<'_>, node: &str, want: &Owned) -> Result<Option<String>, Error> {
    let (d, ctx, uid) = (&pass.d, pass.ctx, pass.uid.as_str());
    let password = ensure_mirror(d, ctx, uid, node).await?;
    if want.port.is_none() && want.reclaimed.is_some() {
        return Ok(None);
    }
    apply_user_secret(d, ctx, uid, node, want.port, &password)
        .await
        .map(Some)
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
    if !ledgers.ready {
        return;
    }
    let Some(pool) = ctx.stores.pool(&d.spec.pool) else {
        return;
    };
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
            drop(ledgers);
            ctx.event(
                d,
                EventType::Warning,
                "BindingConflict",
                "Rebind",
                format!(
                    "recorded port or MAC was held by an older desktop; now port {} MAC {}",
                    b.port, b.mac
                ),
            )
            .await;
        }
        return;
    }
    // Holds resources but no port: a wake whose write stopped half-way (`reclaimed` cleared,
    // the port not written yet). The ledger's port, else its lowest free one.
    if want.port.is_none()
        && let Some(ledger) = ledgers.get_mut(&d.spec.pool)
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
    let Some(ledger) = ledgers.get_mut(&d.spec.pool) else {
        // Not built yet: the build reads this binding from the cache.
        return;
    };
    // No port (a woken desktop's reservation given up on, whose write landed after all): adopt.
    if ledger.port_of(uid).is_none() {
        if ledger.adopt(uid, node, port, mac) {
            tracing::info!(host = node, port, mac, "ledger adopted a recorded binding");
        } else {
            tracing::warn!(
                host = node,
                port,
                mac,
                "recorded binding held by another desktop"
            );
        }
    } else if !ledger.holds(uid, node, port, mac) {
        // Newer than the cache (a rebind just written), or older: the cache settles it.
        tracing::debug!(host = node, port, mac, "ledger and recorded binding differ");
    }
}
