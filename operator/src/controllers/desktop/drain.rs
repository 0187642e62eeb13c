//! Decides when a stopped desktop of a draining host is bound to another host of its pool: its
//! host's `spec.drain` is set, its domain is confirmed shut off, nothing is moving it, no
//! memory is saved for it there, and the pool's storage is shared
//! ([`deskvirt_core::drain::rebind_target_wanted`]). The scheduler picks the host as at
//! binding; in the pass's ledger transaction a desktop that holds its port gets one on the new
//! host and frees the old. The old host's agent then undefines its shut-off domain, never the
//! disk; the new one defines it there, still stopped. One that should move but cannot yet (no
//! host takes it, the heartbeat is stale) is looked at again after [`RETRY`]: no watch event
//! of another host wakes a desktop bound to this one.

use std::time::Duration;

use deskvirt_core::drain::rebind_target_wanted;
use deskvirt_core::scheduler::place_in_pool;
use deskvirt_crds::desktop::Move;
use deskvirt_crds::read::FromPoolSpec;
use deskvirt_crds::validation::ValidDesktop;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::bound::Seen;
use super::status::Owned;
use super::txn::Txn;
use crate::context::Context;
use crate::controllers::drain::{desktop_facts, key};
use crate::scheduler::PoolPolicy;
use crate::world::host_views_counted;

/// How soon a stopped desktop that should leave a draining host but could not is looked at
/// again (the drain controller's own recheck).
pub(super) const RETRY: Duration = Duration::from_secs(15);

/// A stopped desktop bound elsewhere because its host drains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rebound {
    pub to: String,
    pub port: Option<u16>,
}

/// What the drain asks of a desktop's pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Rebind {
    /// Its host does not drain, or it does not move this way (running, migrating, pinned).
    Stay,
    /// It should move but cannot now: look again after [`RETRY`].
    Later,
    /// Bound to another host in `want`.
    Moved(Rebound),
}

impl Rebind {
    /// The rebinding, when there is one.
    pub fn moved(self) -> Option<Rebound> {
        match self {
            Rebind::Moved(r) => Some(r),
            Rebind::Stay | Rebind::Later => None,
        }
    }
}

/// Binds a stopped desktop of a draining host to another host, into `want`. [`Rebind::Later`]
/// when it should move but its host's heartbeat is stale or no host takes it now (the drain's
/// status says what is left).
pub(super) fn rebind(
    seen: &Seen<'_>,
    valid: Option<&ValidDesktop>,
    ctx: &Context,
    txn: &mut Txn<'_>,
    want: &mut Owned,
) -> Rebind {
    let (d, node) = (seen.d, seen.node.as_str());
    if !ctx.stores.node(node).is_some_and(|n| n.spec.drain) {
        return Rebind::Stay;
    }
    let Some(pool) = txn.pool().cloned() else {
        return Rebind::Later;
    };
    let k = key(d);
    if !rebind_target_wanted(&desktop_facts(d, &k), pool.spec.storage.shared) {
        return Rebind::Stay;
    }
    // What the host last said of the domain must be current: its heartbeat is fresh.
    if !ctx.heartbeat(node, seen.now).is_fresh() {
        return Rebind::Later;
    }
    // A pool policy or a spec that no longer validates is said by the pass's conditions.
    let (Ok(policy), Some(valid)) = (PoolPolicy::from_spec(&pool.spec), valid) else {
        return Rebind::Stay;
    };
    place(seen, &policy, valid, ctx, txn, want).map_or(Rebind::Later, Rebind::Moved)
}

/// Picks the other host and moves the binding (and a held port) there, into `want`.
fn place(
    seen: &Seen<'_>,
    policy: &PoolPolicy,
    valid: &ValidDesktop,
    ctx: &Context,
    txn: &mut Txn<'_>,
    want: &mut Owned,
) -> Option<Rebound> {
    let (d, uid, node) = (seen.d, seen.uid, seen.node.as_str());
    let request = valid.asked;
    let hosts = {
        let charges = txn.charges_without(uid);
        host_views_counted(
            d.pool(),
            policy,
            &ctx.stores.nodes.state(),
            &ctx.stores.pools.state(),
            &charges,
            txn.ledger().map(|l| &*l),
            |n| ctx.heartbeat(n, seen.now),
            &ctx.stores.views,
        )
    };
    let to = match place_in_pool(d.pool(), policy, &request, &hosts) {
        Ok(p) => p.host.name.to_string(),
        Err(e) => {
            tracing::info!(error = %e, "drain: no other host takes the stopped desktop now");
            return None;
        }
    };
    if to == node {
        return None;
    }
    let port = if seen.holds {
        let ledger = txn.ledger()?;
        let old = ledger.release_port(uid);
        match ledger.restore_port(uid, &to, None) {
            Ok(p) => Some(p),
            Err(e) => {
                // The old port goes back to the desktop: nothing moved.
                if let Some((host, p)) = old {
                    let _ = ledger.restore_port(uid, &host, Some(p));
                }
                tracing::info!(error = %e, host = %to, "drain: no SPICE port on the new host now");
                return None;
            }
        }
    } else {
        None
    };
    if port.is_some() {
        txn.reserved_port();
    }
    want.node = Some(to.clone());
    if port.is_some() {
        want.port = port;
    }
    want.last_move = Some(Move {
        from: node.to_string(),
        to: to.clone(),
        at: Time(seen.now),
    });
    tracing::info!(from = node, to = %to, ?port, "drain: stopped desktop bound to another host");
    Some(Rebound { to, port })
}
