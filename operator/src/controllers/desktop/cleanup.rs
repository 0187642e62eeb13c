//! A deleted Desktop: wait for the agent's teardown, saying so in `Ready`; let a desktop of a
//! host lost past the pool's `failover.after` finish without it when the user annotates
//! `deskvirt.io/force-delete`; then delete the console mirror, drop the operator's finalizer and
//! release the ledger.

use std::time::Duration;

use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::READY;
use deskvirt_crds::constants::{ANNOTATION_FORCE_DELETE, FINALIZER_AGENT, FINALIZER_OPERATOR};
use deskvirt_crds::quantity::{format_duration, parse_duration};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::console::{delete_mirror, delete_user_secret, ever_bound};
use super::status::{Owned, write};
use super::{Error, Pass, kube};
use crate::controllers::Categorized as _;
use crate::controllers::remove_finalizer;
use crate::fence;

/// Reason of `Ready=False` while deletion waits for the host.
pub const WAITING_FOR_HOST_CLEANUP: &str = "WaitingForHostCleanup";

/// What deletion does while the agent's finalizer is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostCleanup {
    /// Wait for the host; look again after `recheck` (or on the next change).
    Wait {
        message: String,
        recheck: Option<Duration>,
    },
    /// Remove the agent's finalizer: the host is lost past `failover.after` and the user asked.
    Force,
}

/// Decides from how long the host has been lost (zero while alive), the pool's
/// `failover.after`, and whether the Desktop carries `deskvirt.io/force-delete`.
pub fn host_cleanup(node: &str, lost_for: Duration, after: Duration, forced: bool) -> HostCleanup {
    let after_text = format_duration(after);
    if lost_for.is_zero() {
        return HostCleanup::Wait {
            message: format!("deleting: waiting for host {node} to remove the domain and disk"),
            recheck: None,
        };
    }
    if lost_for <= after {
        return HostCleanup::Wait {
            message: format!(
                "deleting: host {node} is lost; it may come back and clean up until the pool's \
                 failover.after ({after_text}) has passed, then the annotation \
                 {ANNOTATION_FORCE_DELETE} lets the deletion finish without it"
            ),
            recheck: Some(after - lost_for + Duration::from_secs(1)),
        };
    }
    if forced {
        return HostCleanup::Force;
    }
    HostCleanup::Wait {
        message: format!(
            "deleting: host {node} is lost for longer than the pool's failover.after \
             ({after_text}); annotate {ANNOTATION_FORCE_DELETE} to finish without host cleanup \
             (whatever is left on the host stays there)"
        ),
        recheck: None,
    }
}

/// One pass over a Desktop being deleted.
pub(super) async fn cleanup(pass: &Pass<'_>) -> Result<Action, Error> {
    let (d, ctx, api, uid) = (&pass.d, pass.ctx, &pass.api, pass.uid.as_str());
    let has = |finalizer: &str| d.finalizers().iter().any(|f| f == finalizer);
    if has(FINALIZER_AGENT) {
        return wait_for_host(pass).await;
    }
    if !has(FINALIZER_OPERATOR) {
        return Ok(Action::await_change());
    }
    if !ctx.ledgers.lock().await.ready {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    // The release is committed by these writes: only while the Lease holds.
    fence::check()?;
    // The user's Secret first: the mirror records which one is ours.
    let ns = d.namespace().unwrap_or_default();
    delete_user_secret(ctx, uid, &ns, &d.name_any()).await;
    delete_mirror(ctx, uid).await?;
    ctx.forget_user_secret(uid);
    ctx.forget_binding(uid);
    ctx.forget_status(uid);
    ctx.forget_mirror(uid);
    ctx.steps.forget(uid);
    fence::check()?;
    remove_finalizer(api, d, FINALIZER_OPERATOR)
        .await
        .map_err(kube("remove the operator finalizer"))?;
    let mut ledgers = ctx.ledgers.lock().await;
    if let Some(pool) = ctx.stores.pool(d.pool())
        && let Ok(ledger) = ledgers.of(&pool, &ctx.stores)
    {
        let freed = ledger.release(uid);
        tracing::info!(?freed, "released ledger entries");
    } else if let Some(l) = ledgers.get_mut(d.pool()) {
        l.release(uid);
    }
    ledgers.rebind.remove(uid);
    ledgers.rebind_why.remove(uid);
    Ok(Action::await_change())
}

/// The agent's finalizer is on: report the wait, or force past a lost host when asked. A
/// finalizer on a desktop the operator never bound was set by hand (no agent acts without a
/// binding, so there is nothing on any host): it is removed, with a Warning Event.
async fn wait_for_host(pass: &Pass<'_>) -> Result<Action, Error> {
    let (d, ctx, api, now) = (&pass.d, pass.ctx, &pass.api, pass.now);
    if !ever_bound(ctx, &pass.uid).await? {
        fence::check()?;
        remove_finalizer(api, d, FINALIZER_AGENT)
            .await
            .map_err(kube("remove the agent finalizer"))?;
        ctx.event(
            d.as_ref(),
            EventType::Warning,
            "FinalizerNotBound",
            "Delete",
            format!(
                "{FINALIZER_AGENT} was set on a desktop no host was ever bound to (by hand, not \
                 by a node-agent); removed: there is nothing on any host to clean up"
            ),
        )
        .await;
        return Ok(Action::await_change());
    }
    let node = d.status.as_ref().and_then(|s| s.node.clone());
    // Moved live before the deletion, the binding not yet moved: it follows the domain to its
    // target first (the Desktop pass's own move), so that the target's host tears it down,
    // disk included.
    if let (Some(n), Some(st)) = (&node, d.status.as_ref())
        && super::arrive::completed(st)
            .is_some_and(|m| m.target != *n && super::arrive::confirmed(&ctx.stores, &pass.uid, m))
    {
        tracing::info!(from = %n, "deleted after a completed live migration; the binding follows it first");
        match super::bound::bound(pass, n).await {
            Ok(action) => return Ok(action),
            // Lost a write race or the fence: the pass looks again soon.
            Err(e) if e.is_conflict() || e.is_transient() => return Err(e),
            // The pass could not move it (its namespace going away refuses the console
            // Secret, say): the deletion waits for the source host as before, and the force
            // annotation still applies to a lost one.
            Err(e) => {
                tracing::warn!(error = %super::chain(&e), "the binding could not follow the moved domain")
            }
        }
    }
    let after = ctx
        .stores
        .pool(d.pool())
        .and_then(|p| parse_duration(&p.spec.failover.after).ok())
        .unwrap_or(Duration::from_secs(300));
    let lost_for = match &node {
        Some(n) if ctx.stores.node(n).is_some() => ctx.heartbeat(n, now).lost_for(now),
        _ => Duration::MAX,
    };
    let forced = d.annotations().contains_key(ANNOTATION_FORCE_DELETE);
    let host = node.as_deref().unwrap_or("(unknown)");
    match host_cleanup(host, lost_for, after, forced) {
        HostCleanup::Force => {
            fence::check()?;
            remove_finalizer(api, d, FINALIZER_AGENT)
                .await
                .map_err(kube("remove the agent finalizer"))?;
            let note = format!(
                "host {host} is gone or lost for longer than {}; deleted without host cleanup",
                format_duration(after)
            );
            tracing::warn!(host, "deleted without host cleanup");
            ctx.event(
                d.as_ref(),
                EventType::Warning,
                "ForceDeleted",
                "Delete",
                note,
            )
            .await;
            Ok(Action::await_change())
        }
        HostCleanup::Wait { message, recheck } => {
            let status = d.status.clone().unwrap_or_default();
            let current = Owned::from_status(&status);
            let mut want = current.clone();
            let gen_ = d.metadata.generation;
            let ready = condition(
                &status.conditions,
                READY,
                Status::False,
                WAITING_FOR_HOST_CLEANUP,
                message,
                gen_,
                now,
            );
            conditions::upsert(&mut want.conditions, ready);
            write(d, api, &current, &want).await?;
            Ok(recheck.map_or_else(Action::await_change, Action::requeue))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(300);

    #[test]
    fn waits_for_a_live_host_whatever_the_annotation() {
        for forced in [false, true] {
            match host_cleanup("h1", Duration::ZERO, AFTER, forced) {
                HostCleanup::Wait { message, recheck } => {
                    assert!(message.contains("waiting for host h1"), "{message}");
                    assert_eq!(recheck, None);
                }
                HostCleanup::Force => panic!("forced past a live host"),
            }
        }
    }

    #[test]
    fn a_lost_host_gets_its_grace_then_the_annotation_decides() {
        let lost = Duration::from_secs(100);
        match host_cleanup("h1", lost, AFTER, true) {
            HostCleanup::Wait { recheck, .. } => {
                assert_eq!(recheck, Some(Duration::from_secs(201)));
            }
            HostCleanup::Force => panic!("forced within failover.after"),
        }
        let long = Duration::from_secs(301);
        assert_eq!(host_cleanup("h1", long, AFTER, true), HostCleanup::Force);
        match host_cleanup("h1", long, AFTER, false) {
            HostCleanup::Wait { message, recheck } => {
                assert!(message.contains(ANNOTATION_FORCE_DELETE), "{message}");
                assert!(message.contains("5m"), "{message}");
                assert_eq!(recheck, None);
            }
            HostCleanup::Force => panic!("forced without the annotation"),
        }
        // A host that is gone counts as lost forever.
        assert_eq!(
            host_cleanup("h1", Duration::MAX, AFTER, true),
            HostCleanup::Force
        );
    }
}
