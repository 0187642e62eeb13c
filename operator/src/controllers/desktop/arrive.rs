//! Decides when a live-migrated desktop's binding follows it to its target: the source host
//! reported the move of the migration recorded on the Desktop Completed, and that migration,
//! as the operator wrote it (its status: the desktop's UID, the target and the port), still
//! holds the target. Then, in the pass's ledger transaction, the target's reserved port
//! becomes the desktop's own and the source's is freed; the binding (host, port, `lastMove`)
//! moves, and the pass relabels the desktop and its console mirror for the target. A pass whose
//! write did not land finds the ledger moved already and moves the binding again.

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
    want.node = Some(m.target.clone());
    want.port = Some(m.port);
    want.last_move = Some(Move {
        from: seen.node.clone(),
        to: m.target.clone(),
        at: Time(seen.now),
    });
    Some(m.target.clone())
}
