//! Decides how the source host copies a desktop's disk into another pool (a Cold migration
//! whose record names a pool, `status.migration.pool`, other than the desktop's): the same
//! checks as a copy within the pool, then a carrier domain ([`crate::domain::carrier_xml`])
//! under the desktop domain's name and UUID, holding the disk alone, is started paused here in
//! place of the stopped desktop and moved with the disk's own layer copied into the target
//! pool's `storage.diskDir`. It arrives transient and paused; the target's agent destroys it
//! and defines the desktop afresh in its pool. Here the desktop's definition is undefined once
//! the copy landed; a failed or cancelled copy ends the carrier, and the stopped desktop's
//! definition is here as it was.

use std::path::Path;

use deskvirt_crds::{Desktop, Migrating};

use super::context::DesktopContext;
use super::inputs::Inputs;
use crate::domain::{Carrier, DesktopIdentity, carrier_xml};
use crate::hypervisor::{Hypervisor, Outbound};

/// The pool `m` moves the desktop `d` into, when it is another pool than the desktop's.
pub(super) fn other_pool<'a>(d: &Desktop, m: &'a Migrating) -> Option<&'a str> {
    m.pool.as_deref().filter(|p| *p != d.pool())
}

/// How the desktop `d`, whose stopped domain is `name`, leaves for pool `pool`: the move (its
/// `carrier_xml` the carrier there) and the carrier's XML here. A refusal says why, before
/// anything is stopped.
pub(super) async fn outbound<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    inputs: &Inputs,
    name: &str,
    m: &Migrating,
    pool: &str,
) -> Result<(Outbound, String), String> {
    let target_pool = ctx.pool(pool).ok_or_else(|| {
        format!("ResourcePool {pool}, the pool the desktop moves into, is not known to this host")
    })?;
    let mut out = super::incoming::outbound_copy(ctx, d, inputs, m).await?;
    let disk = Path::new(&inputs.domain.disk_path);
    let file = disk
        .file_name()
        .ok_or_else(|| format!("the disk path {} names no file", disk.display()))?;
    let there = Path::new(&target_pool.spec.storage.disk_dir).join(file);
    let uuid = match ctx.hypervisor.domain_by_name(name).await {
        Ok(Some(s)) => s.uuid,
        Ok(None) => return Err(format!("the domain {name} is not defined on this host")),
        Err(e) => return Err(format!("cannot read the domain {name}: {e}")),
    };
    let identity = DesktopIdentity {
        pool: pool.to_string(),
        ..inputs.domain.identity.clone()
    };
    if !uuid.eq_ignore_ascii_case(&identity.uid) {
        return Err(format!(
            "the domain {name} has the UUID {uuid}, not the desktop's UID {}",
            identity.uid
        ));
    }
    let carrier = Carrier {
        identity: &identity,
        name,
        uuid: &uuid,
        domain_type: ctx.config.domain_type,
    };
    let xml = |path: &str| carrier_xml(&carrier, path).map_err(|e| e.to_string());
    let here = xml(&inputs.domain.disk_path)?;
    out.carrier_xml = Some(xml(&there.to_string_lossy())?);
    out.graphics_uri = None;
    Ok((out, here))
}
