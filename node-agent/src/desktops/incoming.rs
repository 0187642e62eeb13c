//! Cold moves between hosts that do not share storage, on both ends.
//! - Target: for each disk the operator asks of this host (`DomainNode.status.incoming`), make
//!   it empty in the desktop's layout (an overlay of the base image this host holds, or a disk
//!   standing alone), with its owner record and a marker naming the migration, and answer in
//!   `status.prepared`. Never over an existing file. A marked disk whose request is gone and
//!   that no domain here uses (the move failed or was cancelled) is deleted. A domain moved in
//!   arrives paused, its guest never run: once the desktop is bound here it is powered off, so
//!   that it boots (or stays off) like any other.
//! - Source: check the disk is the one the target made room for, then move the stopped domain
//!   (started paused) with its disk's own layer copied, and delete the disk here. A move into
//!   another pool moves a carrier holding the disk instead ([`super::carrier`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::constants::MANAGER_AGENT_INCOMING;
use deskvirt_crds::desktop::CloneMode;
use deskvirt_crds::domain_node::{IncomingDisk, PreparedDisk};
use deskvirt_crds::names::domain_name;
use deskvirt_crds::{Desktop, DomainNode, Migrating};
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::time::MissedTickBehavior;

use super::Error;
use super::context::DesktopContext;
use super::inputs::Inputs;
use crate::agent::error_chain;
use crate::disks;
use crate::hypervisor::{DomainState, Hypervisor, HypervisorError, Outbound};

/// Looks every `every` until the future is dropped; returns at once on a host that takes in
/// no migrations (a copy needs this host's libvirt endpoint).
pub async fn run<H: Hypervisor>(ctx: Arc<DesktopContext<H>>, every: Duration) {
    if !ctx.config.takes_migrations {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = pass(&ctx).await {
            tracing::warn!(error = %error_chain(&e), "cannot answer the disks asked of this host for cold moves");
        }
    }
}

/// The pool's directories of this host, when it has a pool.
struct Dirs {
    images: PathBuf,
    disks: PathBuf,
}

fn dirs<H>(ctx: &DesktopContext<H>, node: &DomainNode) -> Option<Dirs> {
    let pool = node.status.as_ref()?.pool.clone()?;
    let pool = ctx.pool(&pool)?;
    Some(Dirs {
        images: PathBuf::from(&pool.spec.storage.image_dir),
        disks: PathBuf::from(&pool.spec.storage.disk_dir),
    })
}

/// One look: answers the disks asked for, then deletes those no longer asked for and unused.
pub(super) async fn pass<H: Hypervisor>(ctx: &DesktopContext<H>) -> Result<(), Error> {
    let Some(node) = ctx.domain_node() else {
        return Ok(());
    };
    let Some(dirs) = dirs(ctx, &node) else {
        return Ok(());
    };
    let status = node.status.clone().unwrap_or_default();
    let mut answers = Vec::new();
    for want in &status.incoming {
        let known = status
            .prepared
            .iter()
            .find(|p| p.migration == want.migration);
        let answer = match known {
            Some(p) => p.clone(),
            None => prepare(ctx, &dirs, want).await,
        };
        answers.push(answer);
    }
    let written = if answers != status.prepared {
        write(ctx, &node, &answers).await
    } else {
        Ok(())
    };
    let asked: BTreeSet<&str> = status
        .incoming
        .iter()
        .map(|i| i.migration.as_str())
        .collect();
    sweep(ctx, &dirs, &asked).await;
    written
}

/// Makes the disk `want` asks for and says how it went.
async fn prepare<H>(ctx: &DesktopContext<H>, dirs: &Dirs, want: &IncomingDisk) -> PreparedDisk {
    let answer = |ready: bool, message: Option<String>| PreparedDisk {
        migration: want.migration.clone(),
        ready,
        message,
        image_bytes: None,
    };
    let image_ok = deskvirt_crds::paths::check_file_name(&want.image).is_ok()
        || deskvirt_crds::image::is_managed_file(&want.image);
    let (Ok(()), true) = (deskvirt_crds::paths::check_file_name(&want.file), image_ok) else {
        return answer(
            false,
            Some("the disk or image name is not a plain file name".into()),
        );
    };
    let target = dirs.disks.join(&want.file);
    let base = dirs.images.join(&want.image);
    // A DesktopImage version: only onto a copy this host verified against its sum.
    if let Some((uid, version)) = deskvirt_crds::image::managed_file(&want.image)
        && ctx
            .images
            .ready_copy(uid, version)
            .is_none_or(|c| c.path != base)
    {
        return answer(
            false,
            Some(format!(
                "this host holds no verified copy of image version {} (it may still be \
                 copying; see its DomainNode status.images)",
                want.image
            )),
        );
    }
    // Made by an earlier pass whose answer was not written: the marker comes last, and the
    // disk must still be there, recorded for that desktop.
    let marked = disks::incoming_of(&target).await.ok().flatten();
    if marked.is_some_and(|m| m.migration == want.migration)
        && matches!(
            disks::owner_of(&target, &want.desktop_uid).await,
            Ok(disks::Owner::Us)
        )
    {
        return answer(true, None);
    }
    let linked = want.clone == CloneMode::Linked;
    match disks::make_incoming(
        &ctx.config.qemu_img,
        &base,
        &target,
        linked,
        want.size_bytes,
        &want.desktop_uid,
        &want.migration,
    )
    .await
    {
        Ok(()) => {
            tracing::info!(desktop = %want.desktop, disk = %target.display(), "made the empty disk a cold move copies into");
            PreparedDisk {
                image_bytes: file_len(&base).await,
                ..answer(true, None)
            }
        }
        Err(e) => {
            tracing::warn!(desktop = %want.desktop, disk = %target.display(), error = %e, "cannot make the disk a cold move copies into");
            let host = &ctx.config.node_name;
            answer(false, Some(format!("on host {host}: {e}")))
        }
    }
}

/// Replaces this host's `status.prepared` with `list`.
async fn write<H>(
    ctx: &DesktopContext<H>,
    node: &DomainNode,
    list: &[PreparedDisk],
) -> Result<(), Error> {
    let api: Api<DomainNode> = Api::all(ctx.client.clone());
    let value = if list.is_empty() {
        serde_json::Value::Null
    } else {
        json!(list)
    };
    let body = json!({ "status": { "prepared": value } });
    let pp = PatchParams {
        field_manager: Some(MANAGER_AGENT_INCOMING.to_string()),
        ..PatchParams::default()
    };
    api.patch_status(&node.name_any(), &pp, &Patch::Merge(&body))
        .await
        .map_err(super::kube("answer the disks asked for cold moves"))?;
    Ok(())
}

/// Settles the marked disks whose request is gone: one a domain uses was moved in (a domain
/// that arrived paused, its guest never run, is powered off, and the marker goes); one no
/// domain uses was made for a move that did not happen, and is deleted, if the owner record
/// beside it still names the desktop the marker names.
async fn sweep<H: Hypervisor>(ctx: &DesktopContext<H>, dirs: &Dirs, asked: &BTreeSet<&str>) {
    let Ok(mut entries) = tokio::fs::read_dir(&dirs.disks).await else {
        return;
    };
    let mut left = Vec::new();
    while let Ok(Some(e)) = entries.next_entry().await {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(disk) = name.strip_suffix(".incoming") {
            left.push(dirs.disks.join(disk));
        }
    }
    let mut in_use = None;
    for disk in left {
        let Ok(Some(marker)) = disks::incoming_of(&disk).await else {
            continue;
        };
        if asked.contains(marker.migration.as_str()) {
            continue;
        }
        if in_use.is_none() {
            match ctx.hypervisor.domain_disk_paths().await {
                Ok(paths) => in_use = Some(paths),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the disks domains use; no disk is removed");
                    return;
                }
            }
        }
        let Some(used) = in_use.as_ref() else { return };
        if used.contains(&disk.display().to_string()) {
            let name = disk
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            if let Err(e) = settle(ctx, &name, &disk).await {
                tracing::warn!(disk = %disk.display(), error = %error_chain(&e), "cannot settle a desktop moved in cold");
            }
            continue;
        }
        // The move landed and the desktop is bound here: between its arrival going (a
        // carrier, destroyed) and its domain being defined, no domain uses the disk, which is
        // the desktop's own now. The desktop's pass, or its teardown, decides about it.
        if bound_here(ctx, &marker.desktop) {
            drop_marker(&disk).await;
            continue;
        }
        let migration = &marker.migration;
        match disks::remove(&disk, &dirs.images, used, &marker.desktop, false).await {
            Ok(_) => {
                let _ = tokio::fs::remove_file(disks::incoming_marker(&disk)).await;
                tracing::info!(disk = %disk.display(), %migration, "removed the disk made for a cold move that did not happen");
            }
            Err(e) => {
                tracing::warn!(disk = %disk.display(), error = %e, "cannot remove the disk made for a cold move that did not happen");
            }
        }
    }
}

/// Whether the Desktop with UID `uid` is bound to this host, as the cache shows it.
fn bound_here<H>(ctx: &DesktopContext<H>, uid: &str) -> bool {
    let me = ctx.config.node_name.as_str();
    ctx.desktops().is_some_and(|store| {
        store.state().iter().any(|d| {
            d.meta().uid.as_deref() == Some(uid)
                && d.status.as_ref().and_then(|s| s.node.as_deref()) == Some(me)
        })
    })
}

/// Settles a desktop moved in cold by a copy whose disk is `disk`, on the pass of its desktop
/// bound here (or the sweep's): a domain `name` that arrived paused, its guest never run, is
/// powered off, so that the pass boots it or leaves it off; then the marker goes.
pub(super) async fn settle<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    name: &str,
    disk: &Path,
) -> Result<(), Error> {
    if !tokio::fs::try_exists(disks::incoming_marker(disk))
        .await
        .unwrap_or(false)
    {
        return Ok(());
    }
    let state = match ctx.hypervisor.domain_status(name).await {
        Ok(s) => s.state,
        // Not moved in (yet): the sweep decides about the disk.
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if state == DomainState::Paused {
        tracing::info!(domain = %name, "a desktop moved in cold arrived paused; powering it off so that it boots here");
        ctx.hypervisor.destroy_domain(name).await?;
    }
    drop_marker(disk).await;
    Ok(())
}

/// Removes the incoming marker beside `disk`; one already gone (the sweep and the desktop's
/// pass both settle an arrival) is no failure.
async fn drop_marker(disk: &Path) {
    match tokio::fs::remove_file(disks::incoming_marker(disk)).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(disk = %disk.display(), error = %e, "cannot remove the incoming marker");
        }
    }
}

/// [`settle`] for the desktop of `inputs`.
pub(super) async fn settle_arrival<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    inputs: &Inputs,
) -> Result<(), Error> {
    let name = inputs.domain.domain_name();
    settle(ctx, &name, Path::new(&inputs.domain.disk_path)).await
}

/// The length of file `path`, if it can be read.
async fn file_len(path: &Path) -> Option<u64> {
    tokio::fs::metadata(path).await.ok().map(|m| m.len())
}

/// How long a copy may take: the guest is stopped (or saved), so nothing converges; a copy
/// is bounded by its bandwidth, and a delete of the migration cancels it.
pub const COPY_TIMEOUT: Duration = Duration::from_secs(12 * 3600);

/// How the domain of `d` leaves with its disk copied: checked against what the operator asked
/// the target to make room for (the same file name, an overlay of the pool's base image or a
/// disk standing alone, as the Desktop says). A refusal says why, before anything is stopped.
pub(super) async fn outbound_copy<H>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    inputs: &Inputs,
    m: &Migrating,
) -> Result<Outbound, String> {
    let disk = Path::new(&inputs.domain.disk_path);
    let (ns, uid) = (
        d.namespace().unwrap_or_default(),
        d.meta().uid.clone().unwrap_or_default(),
    );
    let expected = format!("{}.qcow2", domain_name(&ns, &d.name_any(), &uid));
    if disk.file_name().and_then(|f| f.to_str()) != Some(expected.as_str()) {
        return Err(format!(
            "the disk {} is not named {expected}, the name host {} made room for (a disk of an \
             earlier release's layout); it cannot be copied",
            disk.display(),
            m.target
        ));
    }
    let backing = crate::backup_files::backing_of(&ctx.config.qemu_img, disk)
        .await
        .map_err(|e| format!("cannot read the disk's backing file: {e}"))?;
    let base = Path::new(&inputs.host.image_dir).join(d.base_image().unwrap_or_default());
    let linked = d.spec.disk.clone == CloneMode::Linked;
    match (linked, backing) {
        (true, Some(b)) if b == base => {}
        (false, None) => {}
        (_, b) => {
            let has = b.map_or("no backing file".to_string(), |b| {
                format!("backing file {}", b.display())
            });
            return Err(format!(
                "the disk {} has {has}, while spec.disk says {}; it cannot be copied onto the \
                 disk the target made",
                disk.display(),
                if linked {
                    format!("an overlay of {}", base.display())
                } else {
                    "a disk standing alone".to_string()
                }
            ));
        }
    }
    if let (Some(there), Some(here)) = (m.base_image_bytes, file_len(&base).await)
        && there != here
    {
        return Err(format!(
            "the base image {} is {here} bytes here and {there} bytes on host {}: the hosts \
             do not hold the same image, and an overlay copied onto another would read wrong",
            base.display(),
            m.target
        ));
    }
    let mut out = super::migrate::outbound(ctx, inputs, m)?;
    out.copy_disks = true;
    out.declared_shared = false;
    // A stopped guest converges at once: the time is the disk's.
    out.limits.completion_timeout = out.limits.completion_timeout.max(COPY_TIMEOUT);
    out.limits.post_copy = false;
    Ok(out)
}

/// Moves the stopped domain `name` of `d` to the target of `m`, started paused so that no
/// guest code runs, with its disk's own layer copied; then deletes the disk here. With
/// `carrier` (a move into another pool) that XML is started paused in place of the stopped
/// domain and moved instead. `Ok(Ok(bytes sent))` once it is there (the domain's definition
/// is gone from here); `Ok(Err(why))` when the move failed or was cancelled (the domain, or
/// the carrier in its place, is still here, its disk untouched: see
/// [`super::cold::back_here`]).
pub(super) async fn copy_out<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    inputs: &Inputs,
    name: &str,
    m: &Migrating,
    out: &Outbound,
    carrier: Option<&str>,
) -> Result<Result<u64, String>, Error> {
    if super::migrate::marked_cancelled(ctx, d, &m.uid) {
        return Ok(Err("cancelled before the copy began".to_string()));
    }
    let started = match carrier {
        Some(xml) => ctx.hypervisor.start_carrier(name, xml).await.map_err(|e| {
            format!("the carrier of the disk could not be started paused to copy it: {e}")
        }),
        None => ctx
            .hypervisor
            .start_paused(name)
            .await
            .map(|_| ())
            .map_err(|e| format!("the stopped guest could not be started paused to copy it: {e}")),
    };
    if let Err(why) = started {
        return Ok(Err(why));
    }
    tracing::info!(domain = name, target = %m.target, carrier = carrier.is_some(), "copying the stopped domain and its disk to the target");
    let moved = super::migrate::run_move(ctx, d, name, out, &m.uid).await;
    let gone = match &moved {
        Ok(_) => true,
        Err(HypervisorError::Timeout { .. }) => false,
        Err(_) => matches!(
            ctx.hypervisor.domain_status(name).await,
            Err(ref e) if e.is_not_found()
        ),
    };
    if !gone {
        if let Err(e @ HypervisorError::Timeout { .. }) = moved {
            return Err(e.into());
        }
        let why = match moved {
            Err(e) => format!("the copy to host {} failed: {e}", m.target),
            Ok(_) => "the copy ended without the domain leaving".to_string(),
        };
        return Ok(Err(why));
    }
    let bytes = moved.as_ref().map_or(0, |mv| mv.bytes);
    remove_left_disk(ctx, inputs, d).await;
    Ok(Ok(bytes))
}

/// Deletes the disk this host kept of a desktop copied away (its domain is gone from here).
pub(super) async fn remove_left_disk<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    inputs: &Inputs,
    d: &Desktop,
) {
    let disk = PathBuf::from(&inputs.domain.disk_path);
    let uid = d.meta().uid.clone().unwrap_or_default();
    let in_use = match ctx.hypervisor.domain_disk_paths().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(disk = %disk.display(), error = %e, "cannot list the disks domains use; the copied-away disk is kept");
            return;
        }
    };
    let images = PathBuf::from(&inputs.host.image_dir);
    match disks::remove(&disk, &images, &in_use, &uid, false).await {
        Ok(_) => tracing::info!(disk = %disk.display(), "deleted the disk copied away"),
        Err(e) => {
            tracing::warn!(disk = %disk.display(), error = %e, "cannot delete the disk copied away; it is left here")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desktops::testkit::Kit;

    #[tokio::test]
    async fn a_disk_asked_for_is_made_answered_and_removed_once_no_longer_asked_for() {
        let mut kit = Kit::new();
        kit.local_storage();
        let ask = serde_json::json!([{"migration": "m1", "desktop": "team/b", "desktopUid": "u-b",
            "file": "b.qcow2", "image": "base.qcow2", "clone": "Linked"}]);
        kit.node_status(serde_json::json!({ "incoming": ask }));
        let _ = pass(&kit.ctx).await;
        let disk = kit.dir.0.join("disks/b.qcow2");
        assert!(disk.exists(), "made");
        let marker = disks::incoming_of(&disk).await.ok().flatten();
        assert_eq!(marker.map(|m| m.migration).as_deref(), Some("m1"));
        let answers = kit.api.prepared();
        assert_eq!(
            answers.first().map(|a| a[0]["ready"].clone()),
            Some(json!(true))
        );
        // Asked for a disk of a name that is taken: refused, the file untouched.
        let taken = kit.dir.0.join("disks/c.qcow2");
        std::fs::write(&taken, b"mine").unwrap_or_else(|e| panic!("{e}"));
        let ask = serde_json::json!([{"migration": "m2", "desktop": "team/c", "desktopUid": "u-c",
            "file": "c.qcow2", "image": "base.qcow2", "clone": "Linked"}]);
        kit.node_status(serde_json::json!({ "incoming": ask }));
        let _ = pass(&kit.ctx).await;
        assert_eq!(std::fs::read(&taken).ok().as_deref(), Some(&b"mine"[..]));
        let answers = kit.api.prepared();
        let refused = answers.last().map(|a| a[0].clone()).unwrap_or_default();
        assert_eq!(
            (refused["migration"].clone(), refused["ready"].clone()),
            (json!("m2"), json!(false))
        );
        // m1 is no longer asked for and no domain uses its disk (the move did not happen).
        assert!(!disk.exists(), "the disk made for m1 is removed");
        assert!(!disks::incoming_marker(&disk).exists());
        assert!(taken.exists(), "a file without a marker is never removed");
    }
}
