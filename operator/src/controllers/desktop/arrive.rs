//! Decides when a live-migrated desktop's binding follows it to its target: the source host
//! reported the move of the migration recorded on the Desktop Completed, and that migration,
//! as the operator wrote it (its status: the desktop's UID, the target and the port), still
//! holds the target. Then, in the pass's ledger transaction, the target's reserved port
//! becomes the desktop's own and the source's is freed; the binding (host, port, `lastMove`)
//! moves, and the pass relabels the desktop and its console mirror for the target. A pass whose
//! write did not land finds the ledger moved already and moves the binding again. A desktop
//! moved into another pool takes the port and MAC reserved in that pool's ledger as its own,
//! lets its binding in its old pool's ledger go, and its allocation names the new pool.

use deskvirt_core::migration::MigrationState;
use deskvirt_crds::desktop::Move;
use deskvirt_crds::{DesktopStatus, Migrating};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::bound::Seen;
use super::status::Owned;
use super::txn::Txn;
use crate::context::Stores;

/// The migration recorded on the desktop whose move its source host reported Completed.
pub(super) fn completed(status: &DesktopStatus) -> Option<&Migrating> {
    let m = status.migration.as_ref()?;
    let r = status.migration_report.as_ref()?;
    (r.uid == m.uid && r.state == MigrationState::Completed).then_some(m)
}

/// Whether `m` is what the operator's migration with that UID says: for this desktop, to
/// this target and port, and still holding them. Only the operator writes that status.
pub(super) fn confirmed(stores: &Stores, desktop_uid: &str, m: &Migrating) -> bool {
    stores.migrations.state().iter().any(|o| {
        o.uid().as_deref() == Some(m.uid.as_str())
            && o.phase().holds_target()
            && o.status.as_ref().is_some_and(|s| {
                s.desktop_uid.as_deref() == Some(desktop_uid)
                    && s.target.as_deref() == Some(m.target.as_str())
                    && s.target_port == Some(m.port)
                    && s.target_pool == m.pool
            })
    })
}

/// Moves the binding of a desktop that arrived on its target, in the transaction: `want`
/// gets the target, its port and the move. Returns the target, or `None` when nothing moved.
pub(super) fn arrive(
    seen: &Seen<'_>,
    stores: &Stores,
    txn: &mut Txn<'_>,
    want: &mut Owned,
) -> Option<String> {
    let m = completed(&seen.status)?;
    if m.target == seen.node || !confirmed(stores, seen.uid, m) {
        return None;
    }
    if let Some(into) = m.pool.as_deref().filter(|p| *p != seen.d.pool()) {
        return into_pool(seen, stores, txn, want, m, into);
    }
    let ledger = txn.existing()?;
    let moved_already = ledger
        .port_of(seen.uid)
        .is_some_and(|(host, port)| host == m.target && port == m.port);
    if !moved_already {
        let held = ledger
            .target_of(seen.uid)
            .is_some_and(|t| t.host == m.target && t.port == m.port);
        if !held {
            tracing::warn!(target = %m.target, port = m.port, "a completed migration's target is not held; the binding stays");
            return None;
        }
        let freed = ledger.complete_target(seen.uid);
        tracing::info!(from = %seen.node, to = %m.target, port = m.port, ?freed, "migrated desktop bound to its new host");
    }
    bind_to_target(seen, want, m)
}

/// [`arrive`] for a desktop moved into pool `into`: the place reserved there becomes its own,
/// its binding in its old pool goes, and its allocation names `into`.
fn into_pool(
    seen: &Seen<'_>,
    stores: &Stores,
    txn: &mut Txn<'_>,
    want: &mut Owned,
    m: &Migrating,
    into: &str,
) -> Option<String> {
    let from = seen.d.pool().to_string();
    let pool = stores.pool(into)?;
    let ledgers = txn.ledgers();
    let there = ledgers.of(&pool, stores).ok()?;
    let moved_already = there
        .port_of(seen.uid)
        .is_some_and(|(host, port)| host == m.target && port == m.port);
    let mac = if moved_already {
        there.mac_of(seen.uid)?
    } else {
        let held = there
            .target_of(seen.uid)
            .is_some_and(|t| t.host == m.target && t.port == m.port);
        if !held {
            tracing::warn!(target = %m.target, port = m.port, pool = %into, "a completed migration's place in the other pool is not held; the binding stays");
            return None;
        }
        let (_, _, mac) = there.complete_entry(seen.uid)?;
        let freed = ledgers.get_mut(&from).map(|l| l.release(seen.uid));
        tracing::info!(from = %seen.node, to = %m.target, %from, %into, port = m.port, %mac, ?freed, "desktop moved into another pool, bound there");
        mac
    };
    let mut allocation = want
        .allocation
        .clone()
        .unwrap_or_else(|| super::size::recorded(seen.d));
    allocation.pool = into.to_string();
    want.allocation = Some(allocation);
    want.mac = Some(mac.to_string());
    bind_to_target(seen, want, m)
}

/// `want` binds the desktop to the target of `m`, with its port there and the move; returns
/// the target.
fn bind_to_target(seen: &Seen<'_>, want: &mut Owned, m: &Migrating) -> Option<String> {
    want.node = Some(m.target.clone());
    want.port = Some(m.port);
    want.last_move = Some(Move {
        from: seen.node.clone(),
        to: m.target.clone(),
        at: Time(seen.now),
    });
    Some(m.target.clone())
}
