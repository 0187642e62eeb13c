//! The host's part of a desktop backup: decides from the operator's record (`status.backup`)
//! and this host's last report (`status.backupReport`) whether to start the job, read how it
//! goes, or stop one whose record is gone; starts it from the recorded checkpoint (redefined in
//! libvirt first, or a full backup when the disk cannot give an incremental), and once libvirt
//! finished, sets the file's backing to its chain, verifies it and reports its checksum. A
//! backup that fails anywhere is reported Failed and its file removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deskvirt_core::backup::{CREATION_CHECKPOINT, Kind};
use deskvirt_crds::backup::{
    BackingUp, BackupReport, BackupState, BackupType, Consistency, Quiesce,
};
use deskvirt_crds::conditions;
use deskvirt_crds::constants::condition::DELETING;
use deskvirt_crds::constants::{MANAGER_AGENT_BACKUP, MANAGER_AGENT_TEARDOWN};
use deskvirt_crds::desktop::{DesktopStatus, Power};
use deskvirt_crds::{Desktop, ResourcePool};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::Error;
use super::apply::now;
use super::context::DesktopContext;
use crate::backup_files::{self, Verified};
use crate::hypervisor::{BackupJob, BackupProgress, Checkpoint, Hold, Hypervisor};

/// How often a desktop whose backup is being written is looked at again.
pub const BACKUP_RESYNC: Duration = Duration::from_secs(1);

/// The disk every desktop domain has (`<target dev='vda'/>`).
pub(super) const DISK: &str = "vda";

/// What the host does about the desktop's backup this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing recorded, or the recorded backup ended already.
    Idle,
    /// Start the recorded backup.
    Start,
    /// The recorded backup's job runs: read where it is.
    Poll,
    /// A job this host started has no record any more (its DesktopBackup was deleted, or its
    /// host was judged lost): stop it and remove its file.
    Cancel,
}

/// Decides the step from the record and the last report.
pub(super) fn step(record: Option<&BackingUp>, report: Option<&BackupReport>) -> Step {
    let started = report.filter(|r| r.state == BackupState::Started);
    match (record, started) {
        (Some(r), Some(p)) if p.uid == r.uid => Step::Poll,
        (_, Some(_)) => Step::Cancel,
        (Some(r), None) if report.is_none_or(|p| p.uid != r.uid) => Step::Start,
        _ => Step::Idle,
    }
}

/// Where the desktop's backup is written from: its pool and its domain here.
#[derive(Clone, Copy)]
pub(super) struct Here<'a> {
    pub pool: &'a ResourcePool,
    pub domain: &'a str,
    /// The desktop's disk (known where a backup may start).
    pub disk: Option<&'a Path>,
    /// `spec.power` is Off and the domain is defined, shut off with no saved memory (a
    /// backup starts it paused for the copy: no guest code runs), or already paused so.
    pub stopped: bool,
}

/// What driving the backup asks of the rest of the pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Driven {
    /// When to look again.
    pub again: Duration,
    /// The pass ends here: the domain runs paused for the copy of a stopped desktop's backup
    /// (its power is left alone until the copy ends), or this step just stopped or resumed it
    /// (what the pass observed of it is stale).
    pub ends_pass: bool,
}

/// Drives the desktop's backup; returns when to look again while one is written. `active`:
/// whether the domain runs.
pub(super) async fn drive<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    status: &DesktopStatus,
    inputs: Here<'_>,
    active: bool,
) -> Result<Option<Driven>, Error> {
    let (record, report) = (status.backup.as_ref(), status.backup_report.as_ref());
    let again = |again| Driven {
        again,
        ends_pass: false,
    };
    match step(record, report) {
        Step::Idle => Ok(None),
        Step::Cancel => {
            if let Some(p) = report {
                cancel(ctx, d, inputs, p).await?;
            }
            Ok(Some(again(BACKUP_RESYNC)))
        }
        Step::Start => match record {
            Some(r) => {
                let after = start(ctx, d, inputs, r, active).await?;
                offline_settled(ctx, d, inputs.domain, inputs.stopped, after).await
            }
            None => Ok(None),
        },
        Step::Poll => match (record, report) {
            (Some(r), Some(p)) => {
                let after = poll(ctx, d, inputs, r, p).await?;
                offline_settled(ctx, d, inputs.domain, p.offline, after).await
            }
            _ => Ok(None),
        },
    }
}

/// After a pass over a stopped desktop's backup (`offline`): while its job runs the domain's
/// power is held; once it ended, the domain started paused for it is stopped, or resumed when
/// the desktop was started meanwhile (spec.power On).
async fn offline_settled<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    domain: &str,
    offline: bool,
    again: Duration,
) -> Result<Option<Driven>, Error> {
    if !offline {
        return Ok(Some(Driven {
            again,
            ends_pass: false,
        }));
    }
    let hv = &ctx.hypervisor;
    if let BackupProgress::Running { .. } = hv.backup_progress(domain).await? {
        return Ok(Some(Driven {
            again,
            ends_pass: true,
        }));
    }
    if d.spec.power == Power::On {
        hv.resume_domain(domain).await?;
        tracing::info!(%domain, "stopped desktop's backup ended; started meanwhile, its domain resumes");
    } else {
        hv.destroy_domain(domain).await?;
        tracing::info!(%domain, "stopped desktop's backup ended; its paused domain is stopped");
    }
    Ok(Some(Driven {
        again: BACKUP_RESYNC,
        ends_pass: true,
    }))
}

/// Before a deleted desktop's domain and disk go: a backup being written is waited for (the
/// `Deleting` condition says so) and reported when it ends, one recorded but not started is
/// reported Failed, and a job without a record is stopped. The teardown goes on only once no
/// backup is recorded on the desktop any more: the operator has then copied the host's report
/// into the DesktopBackup (a verified backup is never lost with its desktop). Returns when to
/// look again while the teardown waits.
pub(super) async fn before_teardown<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    status: &DesktopStatus,
    here: Here<'_>,
) -> Result<Option<Duration>, Error> {
    let (record, report) = (status.backup.as_ref(), status.backup_report.as_ref());
    match (step(record, report), record, report) {
        (Step::Poll, Some(r), Some(p)) => {
            let progress = ctx.hypervisor.backup_progress(here.domain).await?;
            if let BackupProgress::Running { processed, total } = progress {
                let message = format!(
                    "the domain and its disk are kept until backup {} is written ({} of {} MiB)",
                    r.name,
                    processed >> 20,
                    total >> 20
                );
                deleting(ctx, d, status, &message).await?;
                return Ok(Some(BACKUP_RESYNC));
            }
            poll(ctx, d, here, r, p).await?;
        }
        (Step::Start, Some(r), _) => {
            let mut report = report_of(ctx, r, BackupState::Failed, r.kind);
            report.message = Some("the desktop is being deleted".into());
            finish(ctx, d, report).await?;
        }
        (Step::Cancel, _, Some(p)) => cancel(ctx, d, here, p).await?,
        _ => {}
    }
    match record {
        Some(r) => {
            let message = format!(
                "the domain and its disk are kept until the operator records how backup {} ended",
                r.name
            );
            deleting(ctx, d, status, &message).await?;
            Ok(Some(BACKUP_RESYNC))
        }
        None => Ok(None),
    }
}

/// Shows on the deleted desktop why its teardown waits (condition `Deleting`), once.
async fn deleting<H>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    status: &DesktopStatus,
    message: &str,
) -> Result<(), Error> {
    let reason = "WaitingForBackup";
    let shown = conditions::find(&status.conditions, DELETING)
        .is_some_and(|c| c.reason == reason && c.message == message);
    if shown {
        return Ok(());
    }
    let c = conditions::condition(
        &status.conditions,
        DELETING,
        conditions::Status::True,
        reason,
        message,
        d.metadata.generation,
        now(),
    );
    // Under its own field manager: an apply of the report's manager without the report
    // would drop it.
    let ns = d
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
    let action = "show that deletion waits for a backup";
    let body = json!({ "conditions": [c] });
    super::patch::apply_status_as(&api, &d.name_any(), body, MANAGER_AGENT_TEARDOWN, action)
        .await?;
    if conditions::find(&status.conditions, DELETING).is_none() {
        ctx.event(d, EventType::Normal, reason, "Delete", message.to_string())
            .await;
    }
    Ok(())
}

/// The record's file, checked against the pool's backup directory.
fn file_of(d: &Desktop, inputs: Here<'_>, uid: &str, location: &str) -> Result<PathBuf, String> {
    let dir = inputs
        .pool
        .spec
        .backup
        .as_ref()
        .map(|b| b.dir.as_str())
        .ok_or("the pool sets no spec.backup.dir")?;
    let ns = d.namespace().unwrap_or_default();
    let desktop_uid = d.uid().unwrap_or_default();
    backup_files::checked_location(dir, location, &ns, &desktop_uid, uid).map_err(|e| e.to_string())
}

async fn start<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    inputs: Here<'_>,
    r: &BackingUp,
    active: bool,
) -> Result<Duration, Error> {
    let hv = &ctx.hypervisor;
    let domain = inputs.domain;
    let mut report = report_of(ctx, r, BackupState::Started, r.kind);
    let fail = |mut report: BackupReport, why: String| {
        report.state = BackupState::Failed;
        report.message = Some(truncate(why));
        report
    };
    let offline = inputs.stopped;
    if !active && !offline {
        let why = "the desktop's domain neither runs here nor is stopped (spec.power: Off, \
                   shut off, no saved memory)"
            .to_string();
        return finish(ctx, d, fail(report, why)).await;
    }
    let file = match file_of(d, inputs, &r.uid, &r.location) {
        Ok(f) => f,
        Err(why) => return finish(ctx, d, fail(report, why)).await,
    };
    // A job found running writing this record's file is this record's: the host began it
    // and stopped before reporting. What it holds is read from the file (an incremental's has
    // the disk as its backing file); any other job is stopped.
    if let Ok(BackupProgress::Running { .. }) = hv.backup_progress(domain).await {
        let exists = tokio::fs::try_exists(&file).await.unwrap_or(false);
        let backing = match exists {
            true => backup_files::backing_of(&ctx.config.qemu_img, &file)
                .await
                .ok(),
            false => None,
        };
        let Some(backing) = backing else {
            tracing::warn!(%domain, backup = %r.name, "a backup job of no record runs; stopping it");
            hv.abort_backup(domain).await?;
            return Ok(BACKUP_RESYNC);
        };
        tracing::info!(%domain, backup = %r.name, "backup job found running; adopting it");
        report.kind = if backing.is_some() {
            Kind::Incremental
        } else {
            Kind::Full
        };
        report.base_image = base_of(ctx, inputs).await;
        report.started = Some(r.at.clone());
        report.offline = offline;
        return finish(ctx, d, report).await;
    }
    if let Err(e) = backup_files::prepare(&file).await {
        return finish(ctx, d, fail(report, e.to_string())).await;
    }
    // A stopped desktop: QEMU opens the disk with no guest code running, for the copy only.
    if offline {
        if let Err(e) = hv.start_paused(domain).await {
            let why = format!("cannot start the stopped desktop's domain paused for the copy: {e}");
            return finish(ctx, d, fail(report, why)).await;
        }
        report.offline = true;
    }
    // A checkpoint of this backup's name left by an attempt that never reported.
    hv.delete_checkpoint(domain, &r.uid).await?;
    let mut kind = r.kind;
    let mut since = r.since.clone().filter(|_| kind == Kind::Incremental);
    // The changes since the disk was made rest on the image it was made from: its backing
    // file, as the disk names it (not as the spec names an image today). A disk without one
    // (a full clone) has no image its changes can rest on: a Full backup.
    if since.as_deref() == Some(CREATION_CHECKPOINT) {
        report.base_image = base_of(ctx, inputs).await;
        if report.base_image.is_none() {
            report.message = Some(
                "taken full: the disk stands alone (a full clone, or restored), so its first \
                 backup holds all of it"
                    .into(),
            );
            (kind, since) = (Kind::Full, None);
        }
    }
    if let Some(cp) = &since {
        let c = Checkpoint {
            name: cp.clone(),
            disk: DISK.into(),
            created: r.since_time.as_ref().map_or(0, |t| t.0.as_second()),
        };
        if let Err(e) = hv.ensure_checkpoint(domain, &c).await {
            report.message = Some(truncate(format!(
                "taken full: the disk cannot give the changes since checkpoint {cp} ({e})"
            )));
            (kind, since) = (Kind::Full, None);
        }
    }
    let job = |since: Option<String>| BackupJob {
        disk: DISK.into(),
        target: file.clone(),
        since,
        checkpoint: r.uid.clone(),
    };
    let t = Instant::now();
    let mut begun = hv.begin_backup(domain, &job(since.clone())).await;
    if let (Err(e), Some(cp)) = (&begun, &since) {
        // An incremental the disk refuses (a bitmap lost or left inconsistent by a crash):
        // the whole disk instead, which needs no history.
        report.message = Some(truncate(format!(
            "taken full: libvirt refused the incremental since {cp} ({e})"
        )));
        hv.delete_checkpoint(domain, &r.uid).await?;
        backup_files::remove(&file).await.ok();
        kind = Kind::Full;
        begun = hv.begin_backup(domain, &job(None)).await;
    }
    let hold = match begun {
        Ok(hold) => hold,
        Err(e) => {
            backup_files::remove(&file).await.ok();
            return finish(
                ctx,
                d,
                fail(report, format!("cannot start the backup: {e}")),
            )
            .await;
        }
    };
    report.quiesce = Some(if offline {
        Quiesce {
            consistency: Consistency::Stopped,
            filesystems: None,
            frozen_millis: None,
            message: Some(
                "the desktop was stopped: its domain was started paused for the copy, and the \
                 disk is as the guest left it"
                    .into(),
            ),
        }
    } else {
        quiesce_of(&hold)
    });
    if let Hold::Frozen {
        thaw_error: Some(e),
        ..
    } = &hold
    {
        tracing::error!(%domain, backup = %r.name, error = %e,
            "the guest agent did not thaw the guest's file systems; its writes may wait until \
             someone thaws them (virsh domfsthaw)");
        ctx.event(
            d,
            EventType::Warning,
            "GuestNotThawed",
            "Backup",
            format!(
                "backup {}: the guest agent froze the file systems and did not thaw them ({e}); \
                 writes in the guest may hang until they are thawed",
                r.name
            ),
        )
        .await;
    }
    report.kind = kind;
    report.started = Some(Time(now()));
    report.start_millis = Some(u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
    tracing::info!(%domain, backup = %r.name, ?kind, ?since, "backup started");
    finish(ctx, d, report).await
}

async fn poll<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    inputs: Here<'_>,
    r: &BackingUp,
    started: &BackupReport,
) -> Result<Duration, Error> {
    let domain = inputs.domain;
    let mut report = BackupReport {
        at: Time(now()),
        ..started.clone()
    };
    let file = match file_of(d, inputs, &r.uid, &r.location) {
        Ok(f) => f,
        Err(why) => {
            report.state = BackupState::Failed;
            report.message = Some(truncate(why));
            return finish(ctx, d, report).await;
        }
    };
    let bytes = match ctx.hypervisor.backup_progress(domain).await? {
        BackupProgress::Running { .. } => return Ok(BACKUP_RESYNC),
        BackupProgress::Completed { bytes } => bytes,
        BackupProgress::Failed { message } => {
            return failed(
                ctx,
                d,
                report,
                &file,
                format!("the backup job failed: {message}"),
            )
            .await;
        }
        BackupProgress::Idle => {
            let why = "the backup job is gone: the domain stopped or libvirt restarted while \
                       it ran"
                .to_string();
            return failed(ctx, d, report, &file, why).await;
        }
    };
    let backing: Option<PathBuf> = match started.kind {
        Kind::Full => None,
        Kind::Incremental => match (&r.parent_location, &started.base_image) {
            (Some(p), _) => Some(PathBuf::from(p)),
            (None, Some(b)) => Some(PathBuf::from(b)),
            (None, None) => {
                let why = "no base image was recorded for the changes since the disk was made";
                return failed(ctx, d, report, &file, why.into()).await;
            }
        },
    };
    match backup_files::finish(&ctx.config.qemu_img, &file, backing.as_deref()).await {
        Ok(Verified { size, checksum }) => {
            report.state = BackupState::Completed;
            report.size_bytes = Some(size);
            report.data_bytes = Some(bytes);
            report.checksum = Some(checksum);
            if started.kind == Kind::Full {
                report.base_image = None;
            }
            tracing::info!(%domain, backup = %r.name, size, bytes, "backup written and verified");
            finish(ctx, d, report).await
        }
        Err(e) => failed(ctx, d, report, &file, format!("verification failed: {e}")).await,
    }
}

/// The base image the desktop's disk rests on, as the disk names it (`None`: it stands alone,
/// or it cannot be read).
async fn base_of<H>(ctx: &DesktopContext<H>, here: Here<'_>) -> Option<String> {
    let disk = here.disk?;
    match backup_files::backing_of(&ctx.config.qemu_img, disk).await {
        Ok(b) => b.map(|b| b.display().to_string()),
        Err(e) => {
            tracing::warn!(disk = %disk.display(), error = %e, "cannot read the disk's backing file");
            None
        }
    }
}

/// Stops a job whose record is gone, removes its file, and reports it Failed.
async fn cancel<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    inputs: Here<'_>,
    p: &BackupReport,
) -> Result<(), Error> {
    let domain = inputs.domain;
    if let Ok(BackupProgress::Running { .. }) = ctx.hypervisor.backup_progress(domain).await {
        ctx.hypervisor.abort_backup(domain).await?;
    }
    // Only a file of this desktop's, under the pool's backup directory.
    if let Ok(file) = file_of(d, inputs, &p.uid, &p.location) {
        backup_files::remove(&file).await.ok();
    }
    let report = BackupReport {
        state: BackupState::Failed,
        at: Time(now()),
        message: Some(
            "stopped: the backup's record was cleared (the DesktopBackup was deleted, or this \
             host was judged lost while it wrote it)"
                .into(),
        ),
        ..p.clone()
    };
    tracing::info!(%domain, uid = %p.uid, "backup job without a record stopped");
    write(ctx, d, &report).await
}

async fn failed<H>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    mut report: BackupReport,
    file: &Path,
    why: String,
) -> Result<Duration, Error> {
    backup_files::remove(file).await.ok();
    report.state = BackupState::Failed;
    report.message = Some(truncate(why));
    finish(ctx, d, report).await
}

/// Writes `report`, with an Event when it ends the backup.
async fn finish<H>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    report: BackupReport,
) -> Result<Duration, Error> {
    match report.state {
        BackupState::Started => {}
        BackupState::Completed => {
            let note = format!(
                "backup {} written: {} bytes, {}",
                report.uid,
                report.size_bytes.unwrap_or(0),
                report.checksum.as_deref().unwrap_or_default()
            );
            ctx.event(d, EventType::Normal, "BackupWritten", "Backup", note)
                .await;
        }
        BackupState::Failed => {
            let note = format!(
                "backup {} failed: {}",
                report.uid,
                report.message.as_deref().unwrap_or_default()
            );
            ctx.event(d, EventType::Warning, "BackupFailed", "Backup", note)
                .await;
        }
    }
    write(ctx, d, &report).await?;
    Ok(BACKUP_RESYNC)
}

/// What the report says of how the guest was held while the job started.
fn quiesce_of(hold: &Hold) -> Quiesce {
    match hold {
        Hold::Frozen {
            filesystems,
            millis,
            thaw_error,
        } => Quiesce {
            consistency: Consistency::Quiesced,
            filesystems: Some(*filesystems),
            frozen_millis: Some(*millis),
            message: thaw_error
                .as_ref()
                .map(|e| truncate(format!("the thaw failed: {e}"))),
        },
        Hold::Unfrozen { why } => Quiesce {
            consistency: Consistency::CrashConsistent,
            filesystems: None,
            frozen_millis: None,
            message: Some(truncate(format!(
                "no guest agent froze the file systems: {why}"
            ))),
        },
    }
}

fn report_of<H>(
    ctx: &DesktopContext<H>,
    r: &BackingUp,
    state: BackupState,
    kind: BackupType,
) -> BackupReport {
    BackupReport {
        uid: r.uid.clone(),
        node: ctx.config.node_name.clone(),
        state,
        at: Time(now()),
        kind,
        location: r.location.clone(),
        message: None,
        started: None,
        start_millis: None,
        base_image: None,
        quiesce: None,
        offline: false,
        size_bytes: None,
        data_bytes: None,
        checksum: None,
    }
}

pub(super) fn truncate(mut s: String) -> String {
    if s.len() > 1000 {
        let mut at = 1000;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

/// Writes the report under the agent's backup field manager.
async fn write<H>(ctx: &DesktopContext<H>, d: &Desktop, r: &BackupReport) -> Result<(), Error> {
    let ns = d
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
    let status = json!({ "backupReport": r });
    let action = "report the backup";
    super::patch::apply_status_as(&api, &d.name_any(), status, MANAGER_AGENT_BACKUP, action).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn record(uid: &str) -> BackingUp {
        BackingUp {
            name: format!("n-{uid}"),
            uid: uid.into(),
            kind: Kind::Incremental,
            since: Some("c0".into()),
            parent: None,
            since_time: None,
            parent_location: None,
            location: format!("/b/ns/d/{uid}.qcow2"),
            at: Time(Timestamp::UNIX_EPOCH),
        }
    }

    fn report(uid: &str, state: BackupState) -> BackupReport {
        BackupReport {
            uid: uid.into(),
            node: "h".into(),
            state,
            at: Time(Timestamp::UNIX_EPOCH),
            kind: Kind::Incremental,
            location: format!("/b/ns/d/{uid}.qcow2"),
            message: None,
            started: None,
            start_millis: None,
            base_image: None,
            quiesce: None,
            offline: false,
            size_bytes: None,
            data_bytes: None,
            checksum: None,
        }
    }

    #[test]
    fn a_record_is_started_once_polled_while_it_runs_and_left_once_reported_done() {
        let r = record("b1");
        assert_eq!(step(Some(&r), None), Step::Start);
        assert_eq!(
            step(Some(&r), Some(&report("b0", BackupState::Completed))),
            Step::Start
        );
        assert_eq!(
            step(Some(&r), Some(&report("b1", BackupState::Started))),
            Step::Poll
        );
        for end in [BackupState::Completed, BackupState::Failed] {
            assert_eq!(step(Some(&r), Some(&report("b1", end))), Step::Idle);
            assert_eq!(step(None, Some(&report("b1", end))), Step::Idle);
        }
        assert_eq!(step(None, None), Step::Idle);
    }

    #[test]
    fn a_started_job_without_its_record_is_stopped_before_another_starts() {
        let started = report("b1", BackupState::Started);
        assert_eq!(step(None, Some(&started)), Step::Cancel);
        assert_eq!(step(Some(&record("b2")), Some(&started)), Step::Cancel);
    }
}
