//! The host's part of a DesktopRestore: decides from the operator's record
//! (`status.restoreOver`) and this host's last report (`status.restoreReport`) whether to
//! replace the stopped desktop's disk with one built from the recorded backup chain (the old
//! disk kept beside it, libvirt's checkpoints of the old disk dropped with the domain's
//! definition, which the pass after defines again), to refuse because the domain runs or holds
//! saved memory, or, once the desktop has run on the restored disk, to remove the kept one.

use std::path::PathBuf;
use std::time::Duration;

use deskvirt_crds::constants::MANAGER_AGENT_RESTORE;
use deskvirt_crds::desktop::{DesktopStatus, Power};
use deskvirt_crds::restore::RestoreState;
use deskvirt_crds::{Desktop, ResourcePool, RestoreOver, RestoreReport};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::Error;
use super::apply::now;
use super::context::DesktopContext;
use crate::disks::{self, DiskPlan, RestorePlan};
use crate::hypervisor::Hypervisor;

/// How soon the desktop is looked at again after its disk was swapped (its domain is defined
/// anew by that pass).
const AFTER_SWAP: Duration = Duration::from_secs(1);

/// What the host does this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Nothing recorded or left to do.
    Idle,
    /// Build the recorded restore's disk and swap it in.
    Swap,
    /// The desktop runs on the restored disk: remove the kept one.
    Release,
}

/// `running`: the guest runs (not paused: a domain started paused for a backup ran no guest
/// code). `kept`: a kept disk is there (looked at only while it runs).
fn step(
    record: Option<&RestoreOver>,
    report: Option<&RestoreReport>,
    running: bool,
    kept: bool,
) -> Step {
    match (record, report) {
        (Some(rec), rep) if rep.is_none_or(|r| r.uid != rec.uid) => Step::Swap,
        _ if running && kept => Step::Release,
        _ => Step::Idle,
    }
}

/// The domain as the pass observed it.
pub(super) struct Here<'a> {
    pub pool: &'a ResourcePool,
    pub domain: &'a str,
    pub disk: &'a DiskPlan,
    pub image_dir: PathBuf,
    /// Whether the domain runs.
    pub active: bool,
    /// Whether its guest runs (active and not paused).
    pub running: bool,
    /// Whether it holds saved memory (a managed save).
    pub saved: bool,
}

/// Drives the desktop's restore; `Some` when the pass is to end here and look again after it.
pub(super) async fn drive<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    status: &DesktopStatus,
    here: Here<'_>,
) -> Result<Option<Duration>, Error> {
    let (record, report) = (status.restore_over.as_ref(), status.restore_report.as_ref());
    // Only a desktop some restore reported on can have a kept disk: no look at the disk
    // directory on every pass of every other desktop.
    let kept = here.running
        && report.is_some()
        && tokio::fs::try_exists(disks::kept_path(&here.disk.target))
            .await
            .unwrap_or(false);
    match step(record, report, here.running, kept) {
        Step::Idle => Ok(None),
        Step::Release => {
            release(ctx, d, &here, report).await?;
            Ok(None)
        }
        Step::Swap => {
            let Some(rec) = record else {
                return Ok(None);
            };
            // Its shutdown is under way: the pass goes on to carry it out.
            if here.active && d.spec.power == Power::Off {
                return Ok(None);
            }
            swap(ctx, d, &here, rec).await.map(Some)
        }
    }
}

async fn swap<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    here: &Here<'_>,
    rec: &RestoreOver,
) -> Result<Duration, Error> {
    let refuse = |why: String| report(ctx, &rec.uid, RestoreState::Failed, None, Some(why));
    if here.active {
        let why = "the desktop was started (spec.power: On) before its disk was restored: a \
                   disk is restored only while it is stopped";
        write(ctx, d, &refuse(why.into())).await?;
        return Ok(AFTER_SWAP);
    }
    if here.saved {
        let why = "the desktop's domain holds saved memory, which belongs to its current disk";
        write(ctx, d, &refuse(why.into())).await?;
        return Ok(AFTER_SWAP);
    }
    let plan = DiskPlan {
        restore: Some(RestorePlan {
            dir: here
                .pool
                .spec
                .backup
                .as_ref()
                .map(|b| PathBuf::from(&b.dir)),
            layers: rec
                .chain
                .layers
                .iter()
                .map(|l| (PathBuf::from(&l.location), l.checksum.clone()))
                .collect(),
        }),
        ..here.disk.clone()
    };
    // The record as the API has it now: a restore deleted since the cache saw it is not
    // carried out.
    if !recorded_still(ctx, d, &rec.uid).await? {
        return Ok(AFTER_SWAP);
    }
    // A kept disk is the one the desktop last ran on only while the last report says an
    // earlier restore swapped (the desktop has not run since: running, it would say Ran).
    let ran_since = !report_of_desktop(d).is_some_and(|r| r.state == RestoreState::Swapped);
    let kept = match disks::restore_over(&ctx.config.qemu_img, &plan, ran_since).await {
        Ok(kept) => kept,
        Err(e) => {
            let why = crate::agent::error_chain(&e);
            tracing::warn!(restore = %rec.name, error = %why, "restore over the disk refused");
            write(ctx, d, &refuse(why)).await?;
            return Ok(AFTER_SWAP);
        }
    };
    // libvirt's checkpoints are the old disk's bitmaps: they go with the definition, which
    // the next pass makes again on the restored disk.
    ctx.hypervisor.undefine_domain(here.domain).await?;
    let kept = kept.display().to_string();
    tracing::info!(restore = %rec.name, backup = %rec.chain.backup, %kept, "disk restored");
    let note = format!(
        "restore {}: the disk is backup {}'s; the old disk is kept as {kept} until the desktop \
         has run",
        rec.name, rec.chain.backup
    );
    ctx.event(d, EventType::Normal, "DiskRestored", "Restore", note)
        .await;
    let done = report(ctx, &rec.uid, RestoreState::Swapped, Some(kept), None);
    write(ctx, d, &done).await?;
    Ok(AFTER_SWAP)
}

/// The desktop's report of its last restore.
fn report_of_desktop(d: &Desktop) -> Option<&RestoreReport> {
    d.status.as_ref().and_then(|s| s.restore_report.as_ref())
}

/// Whether the API still records restore `uid` on the desktop.
async fn recorded_still<H>(ctx: &DesktopContext<H>, d: &Desktop, uid: &str) -> Result<bool, Error> {
    let ns = d
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
    let fresh = api
        .get_opt(&d.name_any())
        .await
        .map_err(|source| Error::Kube {
            action: "read the desktop before restoring its disk",
            source,
        })?;
    Ok(fresh.is_some_and(|f| {
        f.uid() == d.uid()
            && f.status
                .as_ref()
                .and_then(|s| s.restore_over.as_ref())
                .is_some_and(|r| r.uid == uid)
    }))
}

/// The guest runs on its restored disk: the kept one goes, and a restore that swapped says it
/// ran. A kept disk that cannot be removed is said once, in a Warning Event and the report.
async fn release<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    here: &Here<'_>,
    rep: Option<&RestoreReport>,
) -> Result<(), Error> {
    let kept = disks::kept_path(&here.disk.target);
    let in_use = ctx.hypervisor.domain_disk_paths().await?;
    let swapped = rep.filter(|r| r.state == RestoreState::Swapped);
    let owner = &here.disk.owner;
    let left = match disks::remove(&kept, &here.image_dir, &in_use, owner, false).await {
        Ok(_) => {
            tracing::info!(kept = %kept.display(), "the guest ran on its restored disk; old disk removed");
            None
        }
        Err(e) => {
            let why = format!("old disk {} kept: {e}", kept.display());
            if swapped.is_some() {
                tracing::warn!(%why, "old disk not removed");
                ctx.event(d, EventType::Warning, "DiskKept", "Restore", why.clone())
                    .await;
            } else {
                tracing::debug!(%why, "old disk still not removed");
            }
            Some(why)
        }
    };
    match swapped {
        Some(r) => write(ctx, d, &report(ctx, &r.uid, RestoreState::Ran, None, left)).await,
        None => Ok(()),
    }
}

fn report<H>(
    ctx: &DesktopContext<H>,
    uid: &str,
    state: RestoreState,
    kept_disk: Option<String>,
    message: Option<String>,
) -> RestoreReport {
    RestoreReport {
        uid: uid.to_string(),
        node: ctx.config.node_name.clone(),
        state,
        at: Time(now()),
        kept_disk,
        message: message.map(super::backup::truncate),
    }
}

/// Writes the report under the agent's restore field manager.
async fn write<H>(ctx: &DesktopContext<H>, d: &Desktop, r: &RestoreReport) -> Result<(), Error> {
    let ns = d
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
    let status = json!({ "restoreReport": r });
    let action = "report the restore";
    super::patch::apply_status_as(&api, &d.name_any(), status, MANAGER_AGENT_RESTORE, action).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskvirt_crds::backup::Restoring;
    use k8s_openapi::jiff::Timestamp;

    fn record(uid: &str) -> RestoreOver {
        RestoreOver {
            name: "r".into(),
            uid: uid.into(),
            chain: Restoring {
                backup: "b".into(),
                uid: "b-1".into(),
                layers: Vec::new(),
            },
            at: Time(Timestamp::UNIX_EPOCH),
        }
    }

    fn said(uid: &str, state: RestoreState) -> RestoreReport {
        RestoreReport {
            uid: uid.into(),
            node: "h".into(),
            state,
            at: Time(Timestamp::UNIX_EPOCH),
            kept_disk: None,
            message: None,
        }
    }

    #[test]
    fn a_record_is_swapped_once_then_a_kept_disk_goes_once_the_guest_runs() {
        let rec = record("r-1");
        assert_eq!(step(Some(&rec), None, false, false), Step::Swap);
        // An older restore's report does not stand for this one.
        let old = said("r-0", RestoreState::Ran);
        assert_eq!(step(Some(&rec), Some(&old), false, false), Step::Swap);
        let swapped = said("r-1", RestoreState::Swapped);
        assert_eq!(step(Some(&rec), Some(&swapped), false, true), Step::Idle);
        assert_eq!(step(Some(&rec), Some(&swapped), true, true), Step::Release);
        // The record cleared (its restore deleted): the kept disk still goes once it ran.
        assert_eq!(step(None, Some(&swapped), true, true), Step::Release);
        // A kept disk left by any restore goes once the guest runs; none, nothing to do.
        let failed = said("r-1", RestoreState::Failed);
        assert_eq!(step(None, Some(&failed), true, true), Step::Release);
        let ran = said("r-1", RestoreState::Ran);
        assert_eq!(step(Some(&rec), Some(&ran), true, false), Step::Idle);
        assert_eq!(step(None, None, true, false), Step::Idle);
    }
}
