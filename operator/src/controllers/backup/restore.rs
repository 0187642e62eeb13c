//! Decides whether a Desktop's `spec.disk.restoreFrom` can be served, from the operator's
//! caches: the backup is of the desktop's namespace and Succeeded, its whole chain of parents
//! Succeeded (`core::backup::chain`), its files in the pool's backup directory, and its root on
//! the base image the desktop names; and records the chain on the Desktop (`status.restore`,
//! pinned once written) for its host to build the disk from.

use std::sync::Arc;

use deskvirt_core::backup::{Backup, Broken, Kind, State, chain};
use deskvirt_crds::constants::MANAGER_OPERATOR_RESTORE;
use deskvirt_crds::{BackupLayer, Desktop, DesktopBackup, DesktopStatus, ResourcePool, Restoring};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::{Error, Pass, as_backup, pinned};
use crate::context::Stores;
use crate::controllers::action::record_on_desktop;

/// The chain `d` restores from, or why it cannot be restored now.
pub fn resolve(stores: &Stores, d: &Desktop, pool: &ResourcePool) -> Result<Restoring, String> {
    let Some(from) = d.spec.disk.restore_from.as_ref() else {
        return Err("the desktop restores from no backup".into());
    };
    chain_for(stores, d, pool, &from.backup)
}

/// The chain of backup `name` of `d`'s namespace, restorable onto `d`'s base image in its pool
/// `pool`, or why it is not.
pub fn chain_for(
    stores: &Stores,
    d: &Desktop,
    pool: &ResourcePool,
    name: &str,
) -> Result<Restoring, String> {
    let ns = d.namespace().unwrap_or_default();
    let b = stores
        .backups
        .get(&ObjectRef::new(name).within(&ns))
        .ok_or_else(|| format!("no DesktopBackup {name} in namespace {ns}"))?;
    if b.metadata.deletion_timestamp.is_some() {
        return Err(format!("backup {name} is being deleted"));
    }
    if b.phase() != State::Succeeded {
        return Err(format!(
            "backup {name} is {}, not Succeeded",
            b.phase().as_str()
        ));
    }
    let of = pinned(&b).unwrap_or_default().to_string();
    let all: Vec<Arc<DesktopBackup>> = stores
        .backups
        .state()
        .into_iter()
        .filter(|o| o.namespace().as_deref() == Some(ns.as_str()) && pinned(o) == Some(&of))
        .collect();
    let list: Vec<Backup<'_>> = all.iter().map(|o| as_backup(o)).collect();
    let target = b.uid().unwrap_or_default();
    let name_of = |uid: &str| {
        all.iter()
            .find(|o| o.uid().as_deref() == Some(uid))
            .map_or_else(|| uid.to_string(), |o| o.name_any())
    };
    let uids = chain(&list, &target).map_err(|e| {
        let why = match e {
            Broken::Missing(u) => format!("its parent {u} is gone"),
            Broken::NotSucceeded(u) => {
                format!("backup {} of its chain did not succeed", name_of(&u))
            }
            Broken::Loop(_) => "its chain loops".to_string(),
        };
        format!("backup {name} cannot be restored: {why}")
    })?;
    let dir = pool
        .spec
        .backup
        .as_ref()
        .map(|p| p.dir.trim_end_matches('/').to_string())
        .ok_or_else(|| format!("pool {} sets no spec.backup.dir", d.spec.pool))?;
    let mut layers = Vec::with_capacity(uids.len());
    for (i, uid) in uids.iter().enumerate() {
        let Some(o) = all.iter().find(|o| o.uid().as_deref() == Some(*uid)) else {
            return Err(format!("backup {uid} of the chain is gone"));
        };
        let layer = o.name_any();
        let st = o.status.clone().unwrap_or_default();
        let (Some(location), Some(checksum)) = (st.location, st.checksum) else {
            return Err(format!("backup {layer} records no file or checksum"));
        };
        if !location.starts_with(&format!("{dir}/")) {
            return Err(format!(
                "backup {layer}'s file {location} is outside pool {}'s spec.backup.dir {dir}",
                d.spec.pool
            ));
        }
        if i == 0 && st.kind != Some(Kind::Full) {
            let base = st.base_image.unwrap_or_default();
            let image = d.base_image().unwrap_or_default();
            let expected = std::path::Path::new(&pool.spec.storage.image_dir).join(&image);
            if image.is_empty() || std::path::Path::new(&base) != expected {
                return Err(format!(
                    "backup {layer} holds changes to base image {base}, and the desktop's \
                     base image is {image:?} (spec.disk.image, or the pinned DesktopImage \
                     version)"
                ));
            }
        }
        layers.push(BackupLayer {
            name: layer,
            location,
            checksum,
        });
    }
    Ok(Restoring {
        backup: name.to_string(),
        uid: target.clone(),
        layers,
    })
}

/// Records its chain on every Desktop of the namespace that restores from backup `b` and has
/// none yet, each guarded by the version the cache shows.
pub(super) async fn serve(pass: &Pass<'_>, b: &DesktopBackup) -> Result<(), Error> {
    let stores = &pass.ctx.stores;
    let name = b.name_any();
    let waiting: Vec<Arc<Desktop>> = stores
        .desktops
        .state()
        .into_iter()
        .filter(|d| d.namespace().as_deref() == Some(pass.ns.as_str()))
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .filter(|d| {
            d.spec
                .disk
                .restore_from
                .as_ref()
                .is_some_and(|r| r.backup == name)
        })
        .filter(|d| d.status.as_ref().is_none_or(|s| s.restore.is_none()))
        .collect();
    for d in waiting {
        let Some(pool) = stores.pool(&d.spec.pool) else {
            continue;
        };
        let Ok(restoring) = resolve(stores, &d, &pool) else {
            continue;
        };
        let status = DesktopStatus {
            restore: Some(restoring),
            ..DesktopStatus::default()
        };
        let action = "record the restore chain on the desktop";
        record_on_desktop(&pass.desktops, &d, status, MANAGER_OPERATOR_RESTORE, action).await?;
        tracing::info!(desktop = %d.name_any(), backup = %name, "restore chain recorded");
    }
    Ok(())
}
