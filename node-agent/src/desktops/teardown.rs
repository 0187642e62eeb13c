//! Decides how a deleted Desktop leaves this host, in this order: power off, undefine, delete
//! the desktop's own disk (never a base image, never a file any remaining domain uses), drop
//! its address lease and serial log, and only then remove the agent's finalizer. Only a Desktop
//! the operator bound here is torn down ([`super::bound`]); its domain is found by its UID
//! ([`super::place`]) and its disk deleted only when the record beside it names this Desktop.
//! A domain or disk of another Desktop is left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use deskvirt_crds::Desktop;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::context::DesktopContext;
use super::patch::{has_finalizer, remove_finalizer};
use super::place::{self, Place};
use super::{Error, backup, bound, ip, migrate};
use crate::disks::{self, DiskError};
use crate::domain::{disk_path, domain_name, parse_disk_paths, serial_log_path};
use crate::hypervisor::Hypervisor;

/// Where nothing lives: the image directory to protect when the pool is gone.
const NO_DIR: &str = "/nonexistent-deskvirt-image-dir";

/// Tears the desktop's domain and disk down, then releases the Desktop.
pub async fn teardown<H: Hypervisor>(
    d: &Desktop,
    ctx: &DesktopContext<H>,
) -> Result<Action, Error> {
    if !has_finalizer(d) {
        return Ok(Action::await_change());
    }
    let ns = d
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let uid = d.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let name = d.name_any();
    if let Err(why) = bound::here(ctx, d, &uid) {
        // A finalizer or label set by hand, or a desktop that moved away: not this host's.
        tracing::debug!(desktop = %format!("{ns}/{name}"), %why, "deleted desktop not bound here; left alone");
        return Ok(Action::await_change());
    }
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
    let hv = &ctx.hypervisor;
    let pool = ctx.pool(d.pool());
    let wanted = domain_name(&ns, &name, &uid);
    let place = place::locate(hv, &uid, &wanted).await?;

    // The desktop's own disk: by the pool's layout (deleted only when its owner record names
    // this Desktop), and as its own domain's definition names it (adopted when unrecorded).
    let mut candidates: BTreeMap<PathBuf, bool> = BTreeMap::new();
    let layout_name = place.usable().unwrap_or(&wanted).to_string();
    if let Some(p) = &pool {
        candidates.insert(
            PathBuf::from(disk_path(&p.spec.storage.disk_dir, &layout_name)),
            false,
        );
    }
    match &place {
        Place::Taken { name: held, owner } => {
            ctx.event(
                d,
                EventType::Warning,
                "DomainNotOurs",
                "Delete",
                format!("domain {held} belongs to {owner}, not to this Desktop; left untouched"),
            )
            .await;
        }
        Place::Free { .. } => {}
        Place::Ours { name: domain } => {
            // A backup being written reads the disk through the domain: both wait for it.
            if let Some(p) = &pool {
                let here = backup::Here {
                    pool: p,
                    domain,
                    disk: None,
                    stopped: false,
                };
                let status = d.status.clone().unwrap_or_default();
                if let Some(again) = backup::before_teardown(ctx, d, &status, here).await? {
                    return Ok(Action::requeue(again));
                }
            }
            let file_name = format!("{domain}.qcow2");
            let xml = match hv.domain_xml(domain, true).await {
                Ok(x) => x,
                Err(e) if e.is_not_found() => String::new(),
                Err(e) => return Err(e.into()),
            };
            for path in parse_disk_paths(&xml).unwrap_or_default() {
                let path = PathBuf::from(path);
                if path
                    .file_name()
                    .is_some_and(|f| f.to_string_lossy() == file_name)
                {
                    candidates.insert(path, true);
                }
            }
            hv.destroy_domain(domain).await?;
            // A disk its definition names in a directory the agent cannot see (a pool
            // `diskDir` not mounted into it): the definition, the only record of that disk,
            // stays until the directory is visible, and the failure shows on the Desktop.
            for (path, _) in candidates.iter().filter(|(_, named)| **named) {
                disks::dir_visible(path).await?;
            }
            hv.undefine_domain(domain).await?;
            tracing::info!(domain = %domain, "domain destroyed and undefined");
        }
    }

    // Moved live to another host whose binding the operator had not made yet: the domain
    // runs there on this same (shared) disk.
    let status = d.status.clone().unwrap_or_default();
    if matches!(place, Place::Free { .. }) && migrate::moved_away(ctx, &status, &uid) {
        // While the migration is recorded, the operator moves the binding to the target,
        // whose host then tears the domain down: this host keeps its finalizer until then.
        if status.migration.is_some() {
            tracing::info!("deleted after moving live; waiting for the binding to follow");
            return Ok(Action::requeue(std::time::Duration::from_secs(2)));
        }
        let there = status
            .migration
            .as_ref()
            .map_or("another host", |m| m.target.as_str());
        let note = format!(
            "the desktop's domain runs on {there} after a live migration; its disk is left to that host"
        );
        tracing::warn!(%note, "disk kept");
        ctx.event(d, EventType::Warning, "DiskKept", "Delete", note)
            .await;
        candidates.clear();
    }
    let in_use = hv.domain_disk_paths().await?;
    let image_dir = pool
        .as_ref()
        .map(|p| PathBuf::from(&p.spec.storage.image_dir))
        .unwrap_or_else(|| PathBuf::from(NO_DIR));
    // A disk kept by a restore over the desktop's disk goes with it.
    let kept: Vec<(PathBuf, bool)> = candidates
        .keys()
        .map(|p| (disks::kept_path(p), false))
        .collect();
    for (path, adopt) in candidates.into_iter().chain(kept) {
        match disks::remove(&path, &image_dir, &in_use, &uid, adopt).await {
            Ok(true) => tracing::info!(disk = %path.display(), "disk deleted"),
            Ok(false) => {}
            Err(
                e @ (DiskError::InUse { .. }
                | DiskError::Protected { .. }
                | DiskError::NotOurs { .. }
                | DiskError::UnsafePath { .. }),
            ) => {
                tracing::warn!(disk = %path.display(), error = %e, "disk kept");
                ctx.event(d, EventType::Warning, "DiskKept", "Delete", e.to_string())
                    .await;
            }
            Err(e) => {
                return Err(Error::Hypervisor(
                    crate::hypervisor::HypervisorError::Failed {
                        op: "delete disk",
                        target: path.display().to_string(),
                        message: crate::agent::error_chain(&e),
                    },
                ));
            }
        }
    }
    if place.usable().is_some() {
        let _ = tokio::fs::remove_file(Path::new(&serial_log_path(&layout_name))).await;
    }
    if let (Some(p), Some(mac)) = (&pool, d.status.as_ref().and_then(|s| s.mac.as_deref())) {
        ip::release(ctx, p, mac).await?;
    }
    remove_finalizer(&api, d).await?;
    ctx.forget(&uid);
    tracing::info!(desktop = %format!("{ns}/{name}"), "desktop removed from this host");
    Ok(Action::await_change())
}
