//! Decides how a deleted Desktop leaves this host, in this order: power off, undefine, delete
//! the desktop's own disk (never a base image, never a file any remaining domain uses), drop
//! its address lease and serial log, and only then remove the agent's finalizer. A domain of
//! the same name that belongs to another Desktop UID is left alone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use deskvirt_crds::Desktop;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::context::DesktopContext;
use super::patch::{has_finalizer, remove_finalizer};
use super::{Error, ip};
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
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
    let hv = &ctx.hypervisor;
    let domain = domain_name(&ns, &name);
    let pool = ctx.pool(&d.spec.pool);

    let owner = hv
        .list_domains()
        .await?
        .into_iter()
        .find(|s| s.name == domain)
        .map(|s| s.uuid.to_ascii_lowercase());
    if let Some(other) = owner.as_ref().filter(|u| **u != uid.to_ascii_lowercase()) {
        ctx.event(
            d,
            EventType::Warning,
            "DomainNotOurs",
            "Delete",
            format!("domain {domain} belongs to UID {other}, not to this Desktop; left untouched"),
        )
        .await;
        remove_finalizer(&api, d).await?;
        ctx.forget(&uid);
        return Ok(Action::await_change());
    }

    // The desktop's own disk: by the pool's layout, and as its definition names it.
    let mut candidates: BTreeSet<PathBuf> = BTreeSet::new();
    if let Some(p) = &pool {
        candidates.insert(PathBuf::from(disk_path(&p.spec.storage.disk_dir, &domain)));
    }
    if owner.is_some() {
        let file_name = format!("{domain}.qcow2");
        let xml = match hv.domain_xml(&domain, true).await {
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
                candidates.insert(path);
            }
        }
        hv.destroy_domain(&domain).await?;
        hv.undefine_domain(&domain).await?;
        tracing::info!(domain = %domain, "domain destroyed and undefined");
    }

    let in_use = hv.domain_disk_paths().await?;
    let image_dir = pool
        .as_ref()
        .map(|p| PathBuf::from(&p.spec.storage.image_dir))
        .unwrap_or_else(|| PathBuf::from(NO_DIR));
    for path in candidates {
        match disks::remove(&path, &image_dir, &in_use).await {
            Ok(true) => tracing::info!(disk = %path.display(), "disk deleted"),
            Ok(false) => {}
            Err(
                e @ (DiskError::InUse { .. }
                | DiskError::Protected { .. }
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
    let _ = tokio::fs::remove_file(Path::new(&serial_log_path(&domain))).await;
    if let (Some(p), Some(mac)) = (&pool, d.status.as_ref().and_then(|s| s.mac.as_deref())) {
        ip::release(ctx, p, mac).await?;
    }
    remove_finalizer(&api, d).await?;
    ctx.forget(&uid);
    tracing::info!(desktop = %format!("{ns}/{name}"), "desktop removed from this host");
    Ok(Action::await_change())
}
