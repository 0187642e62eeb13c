//! Decides which backup records on Desktops are orphans: a `status.backup` whose DesktopBackup
//! is gone (its finalizer removed by hand before the operator cleared the record). Such a
//! record would keep the desktop Busy for backups, hold its migrations and keep its teardown
//! waiting; it is cleared once a live read confirms the backup is gone.

use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::constants::MANAGER_OPERATOR_BACKUP;
use deskvirt_crds::{Desktop, DesktopBackup, DesktopStatus};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use crate::context::Context;
use crate::controllers::action::clear_desktop_record;

/// How often the records are looked over while this operator leads.
const EVERY: Duration = Duration::from_secs(60);

/// Runs the sweep while this operator leads, until `stop`.
pub async fn run(ctx: Arc<Context>, stop: watch::Receiver<bool>) {
    crate::sweep::while_leading(&ctx, EVERY, stop, || sweep(&ctx)).await;
}

/// Clears every record whose backup the cache does not hold and the API confirms gone (or
/// made again under its name with another UID); returns how many.
pub async fn sweep(ctx: &Context) -> usize {
    let mut cleared = 0;
    for d in ctx.stores.desktops.state() {
        let Some(r) = d.status.as_ref().and_then(|s| s.backup.clone()) else {
            continue;
        };
        let ns = d.namespace().unwrap_or_default();
        let cached = ctx
            .stores
            .backups
            .get(&ObjectRef::new(&r.name).within(&ns))
            .is_some_and(|b| b.uid().as_deref() == Some(r.uid.as_str()));
        if cached || !ctx.is_leader() {
            continue;
        }
        let backups: Api<DesktopBackup> = Api::namespaced(ctx.client.clone(), &ns);
        let live = match backups.get_opt(&r.name).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(desktop = %d.name_any(), error = %e, "cannot read a recorded backup");
                continue;
            }
        };
        if live.is_some_and(|b| b.uid().as_deref() == Some(r.uid.as_str())) {
            continue;
        }
        let desktops: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
        let uid = r.uid.clone();
        let ours = move |s: &DesktopStatus| s.backup.as_ref().is_some_and(|b| b.uid == uid);
        let action = "clear an orphaned backup record";
        let done = crate::fence::scope(ctx.fence.clone(), async {
            clear_desktop_record(
                &desktops,
                &d,
                "backup",
                ours,
                MANAGER_OPERATOR_BACKUP,
                action,
            )
            .await
        })
        .await;
        match done {
            Ok(()) => {
                cleared += 1;
                tracing::info!(desktop = %d.name_any(), backup = %r.name, "orphaned backup record cleared");
            }
            Err(e) => {
                tracing::warn!(desktop = %d.name_any(), error = %e, "cannot clear an orphaned backup record")
            }
        }
    }
    cleared
}
