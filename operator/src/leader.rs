//! Leader election on a `coordination.k8s.io/v1` Lease: acquire it when free or expired, renew
//! it three times within the part of its duration the fence leaves, step down at the first failed renewal, release it on
//! shutdown. Only the leader binds, allocates and writes statuses.
//!
//! Leadership gates writes through [`crate::fence`]: each successful renewal moves the fence to
//! the local instant the Lease cannot yet have expired for anyone else; a fence that lapses (a
//! renewal hung, the process was paused) makes the replica step down at once, before any other
//! write, and campaign again as a newcomer (rebuilding its ledgers from what is recorded).
//!
//! Why not `kube-lease-manager` (0.13.1, checked against its source): it reports leadership
//! only as a `bool` (`watch()` gives a `Receiver<bool>`, `changed()` a `bool`); the instant its
//! renewal was sent and the expiry it computes are private, and that expiry is wall-clock time
//! from the Lease's `renewTime`, not a local monotonic deadline, so no fence can be derived
//! from it. It also renews inside `changed()`, with no hook between renewal and use.
//!
//! A Lease naming this replica's identity is taken over like anyone else's (only once expired)
//! unless this very process holds it: a restarted process reusing its pod name must not lead
//! while writes of its previous life may still be landing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

use crate::context::{Context, Ledgers, stopped};

/// Whether `me` may take a Lease held by `current` (renewed at `renewed` for `secs`);
/// `leading` says whether this process holds it now (a renewal).
pub fn may_take(
    me: &str,
    leading: bool,
    current: Option<&str>,
    renewed: Option<Timestamp>,
    secs: Option<i32>,
    now: Timestamp,
) -> bool {
    match current {
        None | Some("") => true,
        Some(h) if h == me && leading => true,
        Some(_) => match (renewed, secs) {
            (Some(r), Some(s)) => r
                .checked_add(SignedDuration::from_secs(i64::from(s)))
                .is_ok_and(|until| until < now),
            _ => true,
        },
    }
}

/// The elector of one replica.
pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

impl Elector {
    /// One attempt to acquire or renew. `Ok(true)`: this replica holds the Lease now.
    async fn attempt(&self, leading: bool) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = self.lease_seconds();
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let holder = spec.holder_identity.as_deref();
                // A leader whose Lease no longer names it lost it (another replica led, or
                // released it, meanwhile): it steps down and campaigns afresh, ledgers rebuilt.
                if leading && holder != Some(self.identity.as_str()) {
                    return Ok(false);
                }
                if !may_take(
                    &self.identity,
                    leading,
                    holder,
                    spec.renew_time.as_ref().map(|t| t.0),
                    spec.lease_duration_seconds,
                    now,
                ) {
                    return Ok(false);
                }
                let mine = leading && holder == Some(self.identity.as_str());
                let mut new = spec.clone();
                if !mine {
                    new.acquire_time = Some(MicroTime(now));
                    new.lease_transitions =
                        Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
                }
                new.holder_identity = Some(self.identity.clone());
                new.lease_duration_seconds = Some(secs);
                new.renew_time = Some(MicroTime(now));
                lease.spec = Some(new);
                // The resourceVersion from the read makes this a compare-and-swap.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// The duration written into the Lease, in whole seconds (what other replicas go by).
    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs())
            .unwrap_or(i32::MAX)
            .max(1)
    }

    /// The duration the Lease says, as other replicas read it.
    fn lease(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.lease_seconds()).unwrap_or(1))
    }

    /// Gives the Lease up so another replica takes over at once.
    async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            if let Err(e) = self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
            {
                tracing::warn!(error = %e, "cannot release the leader Lease");
            }
        }
    }
}

/// Runs the election until `stop`, publishing leadership on `tx`. On gaining leadership the
/// ledgers are reset (each pool's is rebuilt from recorded bindings on first use) before the
/// flag flips, so no reconcile binds against an empty ledger. `stop` should flip only once the
/// controllers have stopped, so nothing writes after the Lease is released.
pub async fn run(
    elector: Elector,
    ctx: Arc<Context>,
    tx: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
) {
    let renew = ctx.fence.renew_every(elector.lease());
    // Campaign only with full caches: a Lease won while they fill would go unrenewed.
    let filled = tokio::select! {
        ready = ctx.stores.ready() => ready,
        () = stopped(stop.clone()) => false,
    };
    if !filled {
        tracing::warn!("watch caches never filled; not campaigning");
        return;
    }
    let mut leading = false;
    let fence = ctx.fence.clone();
    loop {
        // A lapsed fence: whatever the Lease says now, another replica may have led meanwhile.
        if leading && !fence.holds(Instant::now()) {
            leading = false;
            step_down(
                &ctx,
                &tx,
                &elector.identity,
                "the leader Lease may have expired",
            )
            .await;
        }
        let sent = Instant::now();
        let attempt = tokio::time::timeout(elector.duration, elector.attempt(leading)).await;
        let held = match attempt {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leader Lease renewal failed");
                false
            }
            Err(_) => {
                tracing::warn!("leader Lease renewal timed out");
                false
            }
        };
        if held {
            fence.renewed(sent, elector.lease());
        }
        if held && !leading {
            *ctx.ledgers.lock().await = Ledgers::fresh();
            leading = true;
            ctx.metrics.leader.set(1);
            tracing::info!(identity = %elector.identity, "became leader");
            let _ = tx.send(true);
        } else if !held && leading {
            leading = false;
            step_down(&ctx, &tx, &elector.identity, "the leader Lease was lost").await;
        }
        tokio::select! {
            () = tokio::time::sleep(renew) => {}
            // A pass found the fence lapsed: step down now, not at the next renewal.
            () = fence.refused_write() => {}
            () = stopped(stop.clone()) => break,
        }
    }
    fence.revoke();
    if leading {
        let _ = tx.send(false);
        ctx.metrics.leader.set(0);
        elector.release().await;
        tracing::info!("leader Lease released");
    }
}

/// Stops leading: no write passes the fence any more, then the flag and the ledgers go.
async fn step_down(ctx: &Context, tx: &watch::Sender<bool>, identity: &str, why: &str) {
    ctx.fence.revoke();
    let _ = tx.send(false);
    ctx.metrics.leader.set(0);
    ctx.metrics.step_downs.inc();
    *ctx.ledgers.lock().await = Ledgers::default();
    tracing::warn!(%identity, why, "stepped down");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    /// Whether "a" may take a Lease renewed at 0 s for 15 s, at `now`.
    fn take(leading: bool, holder: Option<&str>, now: i64) -> bool {
        may_take("a", leading, holder, Some(at(0)), Some(15), at(now))
    }

    #[test]
    fn takes_free_own_or_expired_leases_only() {
        assert!(may_take("a", false, None, None, None, at(0)));
        assert!(take(true, Some("a"), 1));
        assert!(!take(false, Some("b"), 10));
        assert!(take(false, Some("b"), 16));
    }

    #[test]
    fn a_restarted_process_waits_for_its_own_lease_to_expire() {
        assert!(!take(false, Some("a"), 1));
        assert!(take(false, Some("a"), 16));
    }
}
