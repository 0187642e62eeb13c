//! A backup's writes, in the order that never leaves a host writing an unrecorded backup: the
//! finalizer first; the record on the Desktop (guarded by the version the pass decided on)
//! before the backup shows Running; the host's report copied into the backup's status before
//! the record is cleared; and the finalizer dropped only once no record of it is left. A
//! deleted backup with a file waits while a backup or a restore reads the file, then hands the
//! file to the host that wrote it (reason `RemovingFile`), whose finalizer goes with the file.

use std::time::Duration;

use deskvirt_core::backup::pass::{Decision, decide as plan};
use deskvirt_core::backup::{Backup, CREATION_CHECKPOINT, Kind, Since, State};
use deskvirt_core::reasons::BackupReason;
use deskvirt_crds::backup::{BackingUp, Consistency, location};
use deskvirt_crds::conditions::Status;
use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, READY};
use deskvirt_crds::constants::{
    FINALIZER_BACKUP_FILE, FINALIZER_OPERATOR, MANAGER_OPERATOR_BACKUP,
};
use deskvirt_crds::{Desktop, DesktopBackup, DesktopBackupStatus, DesktopStatus, DomainNode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{
    Error, Pass, RUNNING_RECHECK, WAIT_RECHECK, as_backup, desktop_of, facts, has_finalizer, kube,
    pinned, siblings,
};
use crate::controllers::action::{Conditioned, clear_desktop_record, record_on_desktop};
use crate::controllers::{apply_meta, remove_finalizer, remove_finalizers};
use crate::fence;

/// A pass over a backup that is not being deleted.
pub(super) async fn apply(pass: &Pass<'_>) -> Result<Action, Error> {
    let b = pass.b.as_ref();
    if !has_finalizer(b) && !b.phase().is_terminal() {
        fence::check()?;
        let body = json!({
            "apiVersion": "deskvirt.io/v1alpha1",
            "kind": "DesktopBackup",
            "metadata": {
                "name": b.name_any(),
                "finalizers": [FINALIZER_OPERATOR, FINALIZER_BACKUP_FILE],
            },
        });
        let fresh = apply_meta(&pass.api, &b.name_any(), &body)
            .await
            .map_err(kube("add the operator finalizer"))?;
        return decide(pass, &fresh).await;
    }
    decide(pass, b).await
}

/// How often a deleted backup whose file is still read looks again.
const IN_USE_RECHECK: Duration = Duration::from_secs(5);

/// How often a deleted backup whose file was handed to its host looks again (whether the file
/// is read after all, whether the host is gone).
const HANDED_RECHECK: Duration = Duration::from_secs(60);

/// A deleted backup. One deleted before it ended: its record is cleared (the host stops the
/// job and removes the unfinished file) and it ends Failed, so that it holds its desktop no
/// more, and it goes. One with a file: it waits while another backup or a restore reads the
/// file (reason `InUse`, confirmed by a live read), then the file is handed to the host that
/// wrote it (reason `RemovingFile`; that host's finalizer goes with the file), or, that host
/// gone for good (no DomainNode), left on the storage with a Warning. A backup without a file
/// lets go at once.
pub(super) async fn deleted(pass: &Pass<'_>) -> Result<Action, Error> {
    let b = pass.b.as_ref();
    let file_finalizer = b.finalizers().iter().any(|f| f == FINALIZER_BACKUP_FILE);
    if !has_finalizer(b) && !file_finalizer {
        return Ok(Action::await_change());
    }
    if !b.phase().is_terminal() {
        tracing::info!("backup deleted before it ended");
        clear_record(pass, b).await?;
        let message =
            "deleted before it ended: the host stops the job and removes the unfinished file";
        let written = mark_failed(pass, b, BackupReason::BackupFailed, message).await?;
        return let_go(pass, &written).await;
    }
    if has_finalizer(b) {
        clear_record(pass, b).await?;
    }
    let st = b.status.as_ref();
    let (Some(file), Some(node), true) = (
        st.and_then(|s| s.location.clone()),
        st.and_then(|s| s.node.clone()),
        file_finalizer,
    ) else {
        // No file (or a backup made before hosts removed files): nothing to wait for.
        return let_go(pass, b).await;
    };
    if let Some(why) = in_use(pass, b).await? {
        let mut want = want_status(b, b.phase());
        let was = ready_reason(b);
        let message = format!("deleted; waits while {why}");
        set(
            &mut want,
            b,
            pass,
            Status::False,
            BackupReason::InUse,
            &message,
        );
        write_status(pass, b, &want).await?;
        if was.as_deref() != Some(BackupReason::InUse.as_str()) {
            tracing::info!(%why, "deleted backup waits while its file is read");
        }
        return Ok(Action::requeue(IN_USE_RECHECK));
    }
    if host_gone(pass, &node).await? {
        let message = format!(
            "host {node}, which wrote {file}, is gone (no DomainNode): the file is left on the backup storage"
        );
        tracing::warn!(%node, %file, "deleted backup's host is gone; its file is left");
        pass.ctx
            .event(b, EventType::Warning, "BackupFileLeft", "Delete", message)
            .await;
        return let_go(pass, b).await;
    }
    let mut want = want_status(b, b.phase());
    let message = format!("deleted; host {node} removes {file}");
    let reason = BackupReason::RemovingFile;
    set(&mut want, b, pass, Status::False, reason, &message);
    let written = write_status(pass, b, &want).await?;
    if has_finalizer(&written) {
        tracing::info!(%node, %file, "deleted backup's file handed to its host");
        fence::check()?;
        remove_finalizer(&pass.api, &written, FINALIZER_OPERATOR)
            .await
            .map_err(kube("remove the operator finalizer"))?;
    }
    Ok(Action::requeue(HANDED_RECHECK))
}

/// What still reads a deleted backup's file, from the caches and, when they show nothing, from
/// a live read (a child started a moment ago may not be in the cache yet).
async fn in_use(pass: &Pass<'_>, b: &DesktopBackup) -> Result<Option<String>, Error> {
    let stores = &pass.ctx.stores;
    let ns = b.namespace();
    let in_ns = |o: &&std::sync::Arc<DesktopBackup>| o.namespace() == ns;
    let cached_backups = stores.backups.state();
    let cached_desktops = stores.desktops.state();
    let cached = reader(
        &pass.uid,
        b,
        cached_backups.iter().filter(in_ns).map(AsRef::as_ref),
        cached_desktops
            .iter()
            .filter(|d| d.namespace() == ns)
            .map(AsRef::as_ref),
    );
    if cached.is_some() {
        return Ok(cached);
    }
    let lp = ListParams::default();
    let backups = pass
        .api
        .list(&lp)
        .await
        .map_err(kube("list the namespace's backups"))?;
    let desktops = pass
        .desktops
        .list(&lp)
        .await
        .map_err(kube("list the namespace's desktops"))?;
    Ok(reader(
        &pass.uid,
        b,
        backups.items.iter(),
        desktops.items.iter(),
    ))
}

/// Who reads the file of backup `b` (UID `uid`) among a namespace's `backups` and `desktops`:
/// a backup that holds the changes since it and did not fail (whether or not being deleted
/// itself), a desktop whose host is starting such a backup (its record's checkpoint is `b`),
/// or a desktop whose disk is being restored from the file and is not made yet.
fn reader<'a>(
    uid: &str,
    b: &DesktopBackup,
    backups: impl Iterator<Item = &'a DesktopBackup>,
    desktops: impl Iterator<Item = &'a Desktop>,
) -> Option<String> {
    let file = b.status.as_ref().and_then(|s| s.location.as_deref());
    for o in backups {
        let child = o.status.as_ref().and_then(|s| s.parent_uid.as_deref()) == Some(uid);
        if child && o.phase() != State::Failed {
            return Some(format!(
                "backup {} holds the changes since it",
                o.name_any()
            ));
        }
    }
    for d in desktops {
        let Some(st) = d.status.as_ref() else {
            continue;
        };
        if st.backup.as_ref().and_then(|r| r.since.as_deref()) == Some(uid) {
            return Some(format!(
                "desktop {}'s host starts a backup on it",
                d.name_any()
            ));
        }
        let restoring = d.metadata.deletion_timestamp.is_none()
            && st
                .restore
                .as_ref()
                .is_some_and(|r| r.layers.iter().any(|l| Some(l.location.as_str()) == file))
            && !deskvirt_crds::conditions::is_true(&st.conditions, DOMAIN_DEFINED);
        if restoring {
            return Some(format!("desktop {} is restored from it", d.name_any()));
        }
    }
    None
}

/// Whether host `node` is gone for good: no DomainNode of that name, by the cache and a live
/// read. A host that is only down may come back and remove the file.
async fn host_gone(pass: &Pass<'_>, node: &str) -> Result<bool, Error> {
    if pass.ctx.stores.node(node).is_some() {
        return Ok(false);
    }
    let nodes: Api<DomainNode> = Api::all(pass.ctx.client.clone());
    let live = nodes
        .get_opt(node)
        .await
        .map_err(kube("read the backup's host"))?;
    Ok(live.is_none())
}

async fn decide(pass: &Pass<'_>, b: &DesktopBackup) -> Result<Action, Error> {
    let stores = &pass.ctx.stores;
    let d = desktop_of(stores, b);
    let others = d
        .as_ref()
        .and_then(|d| d.metadata.uid.as_deref())
        .map(|uid| siblings(stores, b, uid))
        .unwrap_or_default();
    // A deleted backup is no parent for a new one (it is about to go), but one being written
    // still holds the desktop.
    let chain: Vec<Backup<'_>> = others
        .iter()
        .filter(|o| o.metadata.deletion_timestamp.is_none() || o.phase() == State::Running)
        .map(|o| as_backup(o))
        .collect();
    let mut decision = plan(&facts(pass, b, d.as_deref(), &chain));
    let mut d = d;
    if b.phase() == State::Running && matches!(decision, Decision::Fail { .. }) {
        // The cache may not show yet the record this operator wrote a moment ago (the
        // backup's own status change can overtake the Desktop's): a running backup fails
        // only on what the API says now.
        let live = live_desktop(pass, b, d.as_deref()).await?;
        decision = plan(&facts(pass, b, live.as_ref(), &chain));
        d = live.map(std::sync::Arc::new);
    }
    match decision {
        Decision::Wait { reason, message } => {
            let mut want = want_status(b, State::Pending);
            if want.desktop_uid.is_none() {
                want.desktop_uid = d.as_ref().and_then(|d| d.uid());
            }
            let was = ready_reason(b);
            set(&mut want, b, pass, Status::False, reason, &message);
            write_status(pass, b, &want).await?;
            if was.as_deref() != Some(reason.as_str()) {
                tracing::info!(reason = reason.as_str(), %message, "backup waits");
            }
            Ok(Action::requeue(WAIT_RECHECK))
        }
        Decision::Fail { reason, message } => fail(pass, b, reason, &message).await,
        Decision::Start { kind, since } => {
            let Some(d) = d else {
                return Ok(Action::requeue(Duration::from_secs(1)));
            };
            if pinned(b).is_none() {
                // The desktop's UID first: a record is never left on a desktop the backup
                // could lose track of (its spec.desktop edited meanwhile).
                let mut want = want_status(b, State::Pending);
                want.desktop_uid = d.uid();
                let fresh = write_status(pass, b, &want).await?;
                return Box::pin(decide(pass, &fresh)).await;
            }
            start(pass, b, &d, kind, &since, &others).await
        }
        Decision::Keep => {
            running(pass, b, d.as_deref()).await?;
            Ok(Action::requeue(RUNNING_RECHECK))
        }
        Decision::Conclude { state } => conclude(pass, b, d.as_deref(), state).await,
        Decision::ClearRecord | Decision::Nothing => {
            settle(pass, b).await?;
            if b.phase() == State::Succeeded {
                super::restore::serve(pass, b).await?;
            }
            Ok(Action::await_change())
        }
    }
}

/// The backup's Desktop as the API has it now (by the UID it pinned), else `None`.
async fn live_desktop(
    pass: &Pass<'_>,
    b: &DesktopBackup,
    cached: Option<&Desktop>,
) -> Result<Option<Desktop>, Error> {
    let name = cached.map_or_else(|| b.spec.desktop.clone(), ResourceExt::name_any);
    let live = pass
        .desktops
        .get_opt(&name)
        .await
        .map_err(kube("read the desktop"))?;
    Ok(live.filter(|l| pinned(b).is_none_or(|p| l.uid().as_deref() == Some(p))))
}

/// Records the backup on its Desktop for the host, then shows it Running there.
async fn start(
    pass: &Pass<'_>,
    b: &DesktopBackup,
    d: &Desktop,
    kind: Kind,
    since: &Since,
    others: &[std::sync::Arc<DesktopBackup>],
) -> Result<Action, Error> {
    let st = d.status.as_ref();
    let desktop_uid = d.uid().ok_or(Error::MissingField("desktop uid"))?;
    let node = st
        .and_then(|s| s.node.clone())
        .ok_or(Error::MissingField("desktop node"))?;
    let Some(dir) = pass
        .ctx
        .stores
        .pool(d.pool())
        .and_then(|p| p.spec.backup.as_ref().map(|b| b.dir.clone()))
    else {
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let (since_checkpoint, since_time, parent, parent_location) = match since {
        Since::Nothing => (None, None, None, None),
        Since::Creation => (
            Some(CREATION_CHECKPOINT.to_string()),
            d.metadata.creation_timestamp.clone(),
            None,
            None,
        ),
        Since::Backup(uid) => {
            let Some(p) = others
                .iter()
                .find(|o| o.uid().as_deref() == Some(uid.as_str()))
            else {
                return Ok(Action::requeue(Duration::from_secs(1)));
            };
            let ps = p.status.as_ref();
            (
                Some(uid.clone()),
                ps.and_then(|s| s.start_time.clone()),
                Some(p.name_any()),
                ps.and_then(|s| s.location.clone()),
            )
        }
    };
    let file = location(&dir, &pass.ns, &desktop_uid, &pass.uid);
    let decided = BackingUp {
        name: b.name_any(),
        uid: pass.uid.clone(),
        kind,
        since: since_checkpoint,
        parent,
        since_time,
        parent_location,
        location: file.clone(),
        at: Time(pass.now),
    };
    // Recorded by an earlier pass whose status write did not land: what the host acts on is
    // that record, whatever this pass would decide now (a spec.type edited meanwhile).
    let recorded = st
        .and_then(|s| s.backup.clone())
        .filter(|r| r.uid == pass.uid);
    let record = match recorded {
        Some(r) => r,
        None => {
            let status = DesktopStatus {
                backup: Some(decided.clone()),
                ..DesktopStatus::default()
            };
            let action = "record the backup on the desktop";
            record_on_desktop(&pass.desktops, d, status, MANAGER_OPERATOR_BACKUP, action).await?;
            decided
        }
    };
    let kind = record.kind;
    let mut want = want_status(b, State::Running);
    want.desktop_uid = Some(desktop_uid);
    want.kind = Some(kind);
    want.parent = record.parent.clone();
    want.parent_uid = record
        .since
        .clone()
        .filter(|s| s != CREATION_CHECKPOINT && record.parent.is_some());
    want.node = Some(node.clone());
    want.location = Some(file);
    let msg = format!("host {node} writes the backup");
    set(
        &mut want,
        b,
        pass,
        Status::False,
        BackupReason::Started,
        &msg,
    );
    write_status(pass, b, &want).await?;
    tracing::info!(%node, ?kind, ?since, "backup started");
    pass.ctx
        .event(b, EventType::Normal, "BackupStarted", "Backup", msg)
        .await;
    Ok(Action::requeue(RUNNING_RECHECK))
}

/// Running: the host's Started report's figures (its start time) shown on the backup.
async fn running(pass: &Pass<'_>, b: &DesktopBackup, d: Option<&Desktop>) -> Result<(), Error> {
    let report = d
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.backup_report.as_ref())
        .filter(|r| r.uid == pass.uid);
    let Some(r) = report else {
        return Ok(());
    };
    let mut want = want_status(b, State::Running);
    want.start_time = r.started.clone().or(want.start_time);
    want.start_millis = r.start_millis.or(want.start_millis);
    want.quiesce = r.quiesce.clone().or(want.quiesce);
    want.kind = Some(r.kind);
    write_status(pass, b, &want).await?;
    Ok(())
}

/// Ends the backup with the host's report, then clears the record.
async fn conclude(
    pass: &Pass<'_>,
    b: &DesktopBackup,
    d: Option<&Desktop>,
    state: State,
) -> Result<Action, Error> {
    let report = d
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.backup_report.as_ref())
        .filter(|r| r.uid == pass.uid)
        .ok_or(Error::MissingField("report"))?;
    let mut want = want_status(b, state);
    want.kind = Some(report.kind);
    if report.kind == Kind::Full {
        want.parent = None;
        want.parent_uid = None;
    }
    want.start_time = report.started.clone().or(want.start_time);
    want.start_millis = report.start_millis.or(want.start_millis);
    want.quiesce = report.quiesce.clone().or(want.quiesce);
    want.completion_time = Some(report.at.clone());
    want.base_image = report.base_image.clone();
    want.size_bytes = report.size_bytes;
    want.data_bytes = report.data_bytes;
    want.checksum = report.checksum.clone();
    let message = report.message.clone().unwrap_or_default();
    let (status, reason, msg, event) = if state == State::Succeeded {
        let held = match &report.quiesce {
            Some(q) if q.consistency == Consistency::Quiesced => format!(
                ", quiesced ({} file systems frozen for {} ms)",
                q.filesystems.unwrap_or(0),
                q.frozen_millis.unwrap_or(0)
            ),
            Some(_) => ", crash-consistent (no guest agent answered)".to_string(),
            None => String::new(),
        };
        let msg = format!(
            "{} backup of {} bytes ({} of the disk){held}, verified; {}{message}",
            kind_word(report.kind),
            report.size_bytes.unwrap_or(0),
            report.data_bytes.unwrap_or(0),
            report.checksum.as_deref().unwrap_or("no checksum"),
            message = if message.is_empty() {
                String::new()
            } else {
                format!("; {message}")
            }
        );
        (
            Status::True,
            BackupReason::Succeeded,
            msg,
            EventType::Normal,
        )
    } else {
        want.location = None;
        (
            Status::False,
            BackupReason::BackupFailed,
            message,
            EventType::Warning,
        )
    };
    set(&mut want, b, pass, status, reason, &msg);
    let written = write_status(pass, b, &want).await?;
    tracing::info!(phase = state.as_str(), %msg, "backup ended");
    pass.ctx
        .event(b, event, reason.as_str(), "Backup", msg)
        .await;
    settle(pass, &written).await?;
    Ok(Action::await_change())
}

fn kind_word(k: Kind) -> &'static str {
    match k {
        Kind::Full => "full",
        Kind::Incremental => "incremental",
    }
}

async fn fail(
    pass: &Pass<'_>,
    b: &DesktopBackup,
    reason: BackupReason,
    message: &str,
) -> Result<Action, Error> {
    let written = mark_failed(pass, b, reason, message).await?;
    settle(pass, &written).await?;
    Ok(Action::await_change())
}

/// Ends the backup Failed (no file) for `reason`, said in its status and an Event; returns it
/// as written.
async fn mark_failed(
    pass: &Pass<'_>,
    b: &DesktopBackup,
    reason: BackupReason,
    message: &str,
) -> Result<DesktopBackup, Error> {
    let mut want = want_status(b, State::Failed);
    want.completion_time = Some(Time(pass.now));
    want.location = None;
    set(&mut want, b, pass, Status::False, reason, message);
    let written = write_status(pass, b, &want).await?;
    tracing::info!(reason = reason.as_str(), %message, "backup failed");
    pass.ctx
        .event(
            b,
            EventType::Warning,
            "BackupFailed",
            "Backup",
            format!("{reason}: {message}"),
        )
        .await;
    Ok(written)
}

/// Removes both of deskvirt's finalizers from a deleted backup: nothing of it is left to do.
async fn let_go(pass: &Pass<'_>, b: &DesktopBackup) -> Result<Action, Error> {
    fence::check()?;
    remove_finalizers(&pass.api, b, &[FINALIZER_OPERATOR, FINALIZER_BACKUP_FILE])
        .await
        .map_err(kube("remove the finalizers"))?;
    Ok(Action::await_change())
}

/// Lets go of an ended or deleted backup: the record on its Desktop if it is this backup's,
/// then the finalizer.
async fn settle(pass: &Pass<'_>, b: &DesktopBackup) -> Result<(), Error> {
    if !has_finalizer(b) {
        return Ok(());
    }
    clear_record(pass, b).await?;
    fence::check()?;
    remove_finalizer(&pass.api, b, FINALIZER_OPERATOR)
        .await
        .map_err(kube("remove the operator finalizer"))
}

/// Removes the Desktop's `status.backup` if it is this backup's, read fresh from the API and
/// guarded by the version read.
async fn clear_record(pass: &Pass<'_>, b: &DesktopBackup) -> Result<(), Error> {
    let Some(d) = desktop_of(&pass.ctx.stores, b) else {
        return Ok(());
    };
    let ours = |s: &DesktopStatus| s.backup.as_ref().is_some_and(|r| r.uid == pass.uid);
    let (manager, action) = (MANAGER_OPERATOR_BACKUP, "clear the desktop's backup record");
    clear_desktop_record(&pass.desktops, &d, "backup", ours, manager, action).await
}

fn want_status(b: &DesktopBackup, phase: State) -> DesktopBackupStatus {
    let mut st = b.status.clone().unwrap_or_default();
    st.phase = Some(phase);
    st.observed_generation = b.metadata.generation;
    st
}

fn set(
    st: &mut DesktopBackupStatus,
    b: &DesktopBackup,
    pass: &Pass<'_>,
    status: Status,
    reason: BackupReason,
    message: &str,
) {
    let (generation, prev) = (b.metadata.generation, b.status.as_ref());
    st.set_condition(
        prev,
        READY,
        status,
        reason.as_str(),
        message,
        generation,
        pass.now,
    );
}

fn ready_reason(b: &DesktopBackup) -> Option<String> {
    crate::controllers::action::ready_reason(b.status.as_ref())
}

/// Applies `want` onto the version decided on, unless nothing but times changed.
async fn write_status(
    pass: &Pass<'_>,
    b: &DesktopBackup,
    want: &DesktopBackupStatus,
) -> Result<DesktopBackup, Error> {
    let action = "write the backup's status";
    crate::controllers::action::write_status(&pass.api, b, b.status.as_ref(), want, action).await
}
