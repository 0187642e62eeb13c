//! A bound desktop's idle reclamation, around the core's pure decisions
//! ([`deskvirt_core::idle`]): acts on a
//! new wake token (records it, cancels a reclaim the host has not done yet, or finds room and a
//! port on the desktop's host again, or on another host of the pool when its own is full and
//! the pool's storage is shared), applies the policy (reclaim, delete, the `Idle` condition,
//! the requeue at the countdown's end), and keeps the ledger's port in step with released
//! resources. It decides in the pass's ledger transaction; the commit deletes, writes and
//! records the Events.

use std::time::Duration;

use deskvirt_core::idle::{
    self, Facts, IdleCondition, Running, Step, WakeStep, WakeTarget, to_second, wake_target,
};
use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::{IDLE, RUNNING};
use deskvirt_crds::constants::idle_reason;
use deskvirt_crds::desktop::{IdleAction, Move, Reclaimed, Wake};
use deskvirt_crds::read::FromPoolSpec;
use deskvirt_crds::validation::ValidDesktop;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{DeleteParams, Preconditions};
use kube::runtime::events::EventType;

use super::bound::{Due, Seen};
use super::status::Owned;
use super::txn::{Closed, Txn};
use super::{Error, Pass, kube};
use crate::context::Context;
use crate::controllers::image::PinnedHosts;
use crate::idle::{released, wake_step, wake_token};
use crate::scheduler::PoolPolicy;
use crate::world::host_views_counted;

/// How often a woken desktop waiting for room looks again.
const WAKE_RETRY: Duration = Duration::from_secs(15);

/// Reason of the Warning Event of a wake that waits for room.
pub const WAKE_WAITING: &str = "WakeWaiting";

/// Reason of the Event of a woken desktop that moves to another host.
pub const MOVED: &str = "Moved";

/// What the idle part of a pass leaves for the commit.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Look again then (the countdown's end, or a wake waiting for room).
    pub requeue: Option<Duration>,
    /// Events due once the status write went through (or had nothing to write).
    pub events: Vec<Due>,
    /// The write drops the port of a released desktop: the ledger lets it go once written.
    pub drop_port: bool,
}

/// The outcome of the idle part of a pass.
pub(super) enum Settled {
    /// The policy deletes the Desktop (the Warning's note).
    Delete(String),
    /// Carry on with the status write.
    Write(Plan),
}

/// What restoring a released desktop found.
enum Restore {
    /// A port on `host` again; `fresh` when this pass reserved it. `away` says why its own
    /// host could not take it, when `host` is another one.
    Back {
        host: String,
        port: u16,
        fresh: bool,
        away: Option<String>,
    },
    /// No room (or no port) now.
    Wait(String),
    /// The ledgers are not rebuilt yet.
    Later,
}

/// Decides the idle part of a pass for a bound desktop, into `want`, in the pass's ledger
/// transaction.
pub(super) fn settle(
    seen: &Seen<'_>,
    valid: Option<&ValidDesktop>,
    ctx: &Context,
    txn: &mut Txn<'_>,
    host_alive: bool,
    want: &mut Owned,
) -> Settled {
    let (d, now, node, status) = (seen.d, seen.now, seen.node.as_str(), &seen.status);
    let mut plan = Plan::default();
    let policy = valid.and_then(|v| v.idle);

    // A wake first: the policy then decides on what it leaves.
    let mut waiting = None;
    if let Some(token) = wake_token(d.annotations(), Some(status)) {
        let wake = Wake {
            token,
            at: Time(to_second(now)),
        };
        match wake_step(status) {
            WakeStep::Record => want.wake = Some(wake),
            WakeStep::Cancel => {
                want.reclaimed = None;
                want.wake = Some(wake);
                plan.events.push((
                    EventType::Normal,
                    idle_reason::WOKEN,
                    "Wake",
                    "woken before the host finished reclaiming it; it keeps running".into(),
                ));
            }
            WakeStep::Restore => match restore(seen, valid, ctx, txn) {
                Restore::Back {
                    host,
                    port,
                    fresh,
                    away,
                } => {
                    let note = match &away {
                        None => format!("woken on host {node} with SPICE port {port}; starting"),
                        Some(why) => {
                            want.node = Some(host.clone());
                            want.last_move = Some(Move {
                                from: node.to_string(),
                                to: host.clone(),
                                at: wake.at.clone(),
                            });
                            let memory = match status.reclaimed.as_ref().map(|r| r.action) {
                                Some(IdleAction::Suspend) => {
                                    "; the memory it saved on the old host is discarded, so it \
                                     boots from its disk"
                                }
                                _ => "",
                            };
                            tracing::info!(from = node, to = %host, port, "woken desktop moves to another host");
                            format!(
                                "woken; host {node} {why}, so it moves to host {host} with SPICE \
                                 port {port}, keeping its disk (shared storage) and MAC{memory}"
                            )
                        }
                    };
                    want.port = Some(port);
                    want.reclaimed = None;
                    want.wake = Some(wake);
                    if fresh {
                        txn.reserved_port();
                    }
                    let reason = if away.is_some() {
                        MOVED
                    } else {
                        idle_reason::WOKEN
                    };
                    plan.events.push((EventType::Normal, reason, "Wake", note));
                }
                Restore::Wait(message) => {
                    let was = conditions::find(&status.conditions, IDLE);
                    if !was.is_some_and(|c| {
                        c.status == Status::True.as_str() && c.reason == idle_reason::WOKEN
                    }) {
                        plan.events.push((
                            EventType::Warning,
                            WAKE_WAITING,
                            "Wake",
                            message.clone(),
                        ));
                    }
                    waiting = Some(message);
                    plan.requeue = Some(WAKE_RETRY);
                }
                Restore::Later => plan.requeue = Some(Duration::from_secs(1)),
            },
        }
    }

    // Resources the host confirmed released: the port goes back (node and MAC stay).
    if released(status) && want.reclaimed.is_some() && want.port.is_some() {
        want.port = None;
        plan.drop_port = true;
    }

    let decision = idle::decide(&Facts {
        namespace: &d.namespace().unwrap_or_default(),
        name: &d.name_any(),
        policy,
        persistent: d.spec.disk.persistent,
        host_alive,
        running: conditions::find(&status.conditions, RUNNING).map(|c| Running {
            runs: c.status == Status::True.as_str(),
            since: c.last_transition_time.0,
        }),
        idle_since: status.idle_since.as_ref().map(|t| t.0),
        woken_at: want.wake.as_ref().map(|w| w.at.0),
        reclaimed: want.reclaimed.as_ref().map(Into::into),
        port: want.port,
        now,
    });
    match decision.step {
        Step::Nothing => {}
        // A migration holds a target: its host is moving the running domain, which neither a
        // suspend nor a shutdown may cut short. The policy decides again once it ended (the
        // record's removal wakes this pass).
        Step::Reclaim { .. } | Step::Delete { .. } if status.migration.is_some() => {
            tracing::info!("idle past the timeout; waits for the migration under way");
        }
        Step::Reclaim { reclaimed, event } => {
            tracing::info!(action = ?reclaimed.action, "idle past the timeout; reclaiming");
            want.reclaimed = Some(Reclaimed::from(reclaimed));
            plan.events.push((
                EventType::Warning,
                idle_reason::IDLE_TIMEOUT,
                "Reclaim",
                event,
            ));
        }
        Step::Delete { event } => return Settled::Delete(event),
    }
    let verdict = match (waiting, decision.condition) {
        (Some(message), _) => Some((Status::True, idle_reason::WOKEN, message)),
        (None, IdleCondition::Set(v)) => {
            Some((Status::from_bool(v.idle), v.reason.as_str(), v.message))
        }
        (None, IdleCondition::Keep) => None,
        (None, IdleCondition::Remove) => {
            want.conditions.retain(|c| c.type_ != IDLE);
            None
        }
    };
    if let Some((s, reason, message)) = verdict {
        let c = condition(
            &status.conditions,
            IDLE,
            s,
            reason,
            message,
            d.metadata.generation,
            now,
        );
        conditions::upsert(&mut want.conditions, c);
    }
    plan.requeue = match (plan.requeue, decision.requeue) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Settled::Write(plan)
}

/// Finds room and a port for a released desktop on its host (or, with shared storage, on
/// another host of its pool), in the transaction.
fn restore(
    seen: &Seen<'_>,
    valid: Option<&ValidDesktop>,
    ctx: &Context,
    txn: &mut Txn<'_>,
) -> Restore {
    let (d, uid, now, node) = (seen.d, seen.uid, seen.now, seen.node.as_str());
    let pool_name = d.pool();
    let pool = match (txn.closed(), txn.pool()) {
        (Some(Closed::NotReady), _) => return Restore::Later,
        (Some(Closed::Invalid(e)), _) => {
            return Restore::Wait(format!("woken, but pool {pool_name}: {e}"));
        }
        (Some(Closed::NoPool), _) | (_, None) => {
            return Restore::Wait(format!("woken, but its pool {pool_name} does not exist"));
        }
        (None, Some(p)) => p.clone(),
    };
    let (policy, request) = match (PoolPolicy::from_spec(&pool.spec), valid) {
        (Ok(p), Some(v)) => (p, v.asked),
        (Err(e), _) => return Restore::Wait(format!("woken, but pool {pool_name}: {e}")),
        (_, None) => return Restore::Wait("woken, but its spec is invalid".to_string()),
    };
    // The host as it is without this desktop (a port an earlier pass reserved included).
    let mut hosts = {
        let charges = txn.charges_without(uid);
        host_views_counted(
            pool_name,
            &policy,
            &ctx.stores.nodes.state(),
            &ctx.stores.pools.state(),
            &charges,
            txn.ledger().map(|l| &*l),
            |n| ctx.heartbeat(n, now),
            &ctx.stores.views,
        )
    };
    let Some(ledger) = txn.ledger() else {
        return Restore::Later;
    };
    if let Some((h, _)) = ledger.port_of(uid)
        && let Some(v) = hosts.iter_mut().find(|v| &*v.name == h)
    {
        v.ports_in_use = v.ports_in_use.saturating_sub(1);
    }
    // A disk cloned from a DesktopImage moves only to a host holding that version's verified
    // copy (its home host keeps its place: the disk is there).
    if let Some(image) = PinnedHosts::of(d, &ctx.stores.nodes.state()) {
        hosts.retain(|v| &*v.name == node || image.allows(&v.name));
    }
    let shared = pool.spec.storage.shared;
    let (host, away) = match wake_target(pool_name, node, &hosts, &request, &policy, shared) {
        WakeTarget::Wait(message) => return Restore::Wait(message),
        WakeTarget::Host(host) => (host, None),
        WakeTarget::Move { to, why } => (to, Some(why)),
    };
    // A port an earlier pass reserved on another host (its write failed) goes back first.
    if ledger.port_of(uid).is_some_and(|(h, _)| h != host) {
        ledger.release_port(uid);
    }
    let fresh = ledger.port_of(uid).is_none();
    let preferred = seen.status.reclaimed.as_ref().and_then(|r| r.port);
    match ledger.restore_port(uid, &host, preferred) {
        Ok(port) => Restore::Back {
            host,
            port,
            fresh,
            away,
        },
        Err(e) => Restore::Wait(format!(
            "woken, waiting for a SPICE port on host {host}: {e}"
        )),
    }
}

/// The Warning Event, then the deletion, only of the version the decision was made on.
pub(super) async fn delete(pass: &Pass<'_>, event: String) -> Result<(), Error> {
    let d = &pass.d;
    tracing::info!("idle past the timeout; deleting the desktop");
    pass.ctx
        .event(
            d.as_ref(),
            EventType::Warning,
            idle_reason::IDLE_TIMEOUT,
            "Delete",
            event,
        )
        .await;
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(pass.uid.clone()),
            resource_version: d.resource_version(),
        }),
        ..Default::default()
    };
    crate::fence::check()?;
    match pass.api.delete(&d.name_any(), &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(kube("delete the idle desktop")(e)),
    }
}

/// The idle action a desktop's status records, for its phase.
pub(super) fn reclaimed_action(want: &Owned) -> Option<IdleAction> {
    want.reclaimed.as_ref().map(|r| r.action)
}
