//! Decides when this host removes a deleted backup's file: the DesktopBackup is being deleted,
//! this host wrote it (`status.node`), the operator let go (its finalizer is off and the reason
//! is `RemovingFile`: no backup and no restore reads the file any more), and the file is where
//! a backup of that namespace, desktop and UID may be, inside a pool's backup directory. Then
//! the file goes, and with it the host's finalizer. A path that is not such a file is left
//! alone, said in a Warning, and the finalizer goes: a forged or stale status deletes nothing.
//! The host that runs the backup's desktop deletes the backup's checkpoint (its bitmap in the
//! disk, merged into its parent's) at the same hand-over: every backup leaves one, and a
//! schedule would otherwise pile them up in the disk, each costing every guest write.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deskvirt_core::reasons::BackupReason;
use deskvirt_crds::DesktopBackup;
use deskvirt_crds::backup::BackupPhase;
use deskvirt_crds::constants::condition::READY;
use deskvirt_crds::constants::{FINALIZER_BACKUP_FILE, FINALIZER_OPERATOR, MANAGER_AGENT};
use futures::StreamExt;
use kube::api::ListParams;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use super::context::DesktopContext;
use crate::agent::error_chain;
use crate::backup_files;
use crate::hypervisor::{Checkpoint, Hypervisor};

use super::backup::DISK;

/// How long removing one file may take (the backup storage is a network file system).
const REMOVE_DEADLINE: Duration = Duration::from_secs(30);

/// How soon a failed removal is tried again.
const RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read or release the backup")]
    Kube(#[source] kube::Error),
    #[error(transparent)]
    Disk(#[from] crate::disks::DiskError),
    #[error("removing {0} took longer than {REMOVE_DEADLINE:?}")]
    Timeout(String),
}

/// Whether this host is to remove the file of `b` now.
pub fn is_ours(b: &DesktopBackup, node: &str) -> bool {
    handed_over(b)
        && b.finalizers().iter().any(|f| f == FINALIZER_BACKUP_FILE)
        && b.status.as_ref().and_then(|s| s.node.as_deref()) == Some(node)
}

/// Whether the operator handed a deleted backup's file over: nothing reads it any more (its
/// finalizer is off and the reason is `RemovingFile`).
fn handed_over(b: &DesktopBackup) -> bool {
    b.metadata.deletion_timestamp.is_some()
        && !b.finalizers().iter().any(|f| f == FINALIZER_OPERATOR)
        && b.status
            .as_ref()
            .and_then(|s| deskvirt_crds::conditions::find(&s.conditions, READY))
            .is_some_and(|c| c.reason == BackupReason::RemovingFile.as_str())
}

/// The file `b` names, if it is a backup file of `b` inside one of `dirs` (the host's pool's
/// backup directory first).
pub fn file_of<'a>(
    b: &DesktopBackup,
    dirs: impl IntoIterator<Item = &'a str>,
) -> Result<PathBuf, String> {
    let st = b.status.as_ref();
    let location = st
        .and_then(|s| s.location.as_deref())
        .ok_or("no status.location")?;
    let desktop_uid = st
        .and_then(|s| s.desktop_uid.as_deref())
        .ok_or("no status.desktopUid")?;
    let (ns, uid) = (
        b.namespace().unwrap_or_default(),
        b.uid().unwrap_or_default(),
    );
    let mut last = format!("{location} is in no pool's spec.backup.dir");
    for dir in dirs {
        match backup_files::checked_location(dir, location, &ns, desktop_uid, &uid) {
            Ok(p) => return Ok(p),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Runs until the future is dropped.
pub async fn run<H: Hypervisor + Clone + 'static>(ctx: Arc<DesktopContext<H>>) {
    let api: Api<DesktopBackup> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .with_config(controller::Config::default().concurrency(2))
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

async fn reconcile<H: Hypervisor + Clone + 'static>(
    b: Arc<DesktopBackup>,
    ctx: Arc<DesktopContext<H>>,
) -> Result<Action, Error> {
    if let Some(desktop) = desktop_here(&b, &ctx) {
        drop_checkpoint(&ctx, &b, &desktop).await;
    }
    if !is_ours(&b, &ctx.config.node_name) {
        return Ok(Action::await_change());
    }
    let name = b.name_any();
    let ns = b.namespace().unwrap_or_default();
    // The host's pool's directory first, then every pool's: a directory changed since the
    // backup was written is still a directory an admin chose for backups.
    let own = ctx
        .domain_node()
        .and_then(|n| n.status.as_ref().and_then(|s| s.pool.clone()))
        .and_then(|p| ctx.pool(&p));
    let pools = ctx.pools.state();
    let dirs = own
        .iter()
        .chain(pools.iter())
        .filter_map(|p| p.spec.backup.as_ref().map(|b| b.dir.as_str()));
    // A backup that holds the changes since this one and did not fail reads the file: the
    // operator looked, but a child started on a host that was slow to report may show only
    // now. The operator then says InUse again.
    let backups: Api<DesktopBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = b.uid().unwrap_or_default();
    let children = backups
        .list(&ListParams::default())
        .await
        .map_err(Error::Kube)?;
    if let Some(child) = children.items.iter().find(|o| {
        o.status.as_ref().is_some_and(|s| {
            s.parent_uid.as_deref() == Some(uid.as_str()) && s.phase != Some(BackupPhase::Failed)
        })
    }) {
        tracing::warn!(%ns, backup = %name, child = %child.name_any(), "deleted backup's file is still read; left for now");
        return Ok(Action::requeue(RETRY));
    }
    match file_of(&b, dirs) {
        Ok(file) => {
            let shown = file.display().to_string();
            tokio::time::timeout(REMOVE_DEADLINE, backup_files::remove(&file))
                .await
                .map_err(|_| Error::Timeout(shown.clone()))??;
            tracing::info!(%ns, backup = %name, file = %shown, "deleted backup's file removed");
        }
        Err(why) => {
            tracing::warn!(%ns, backup = %name, %why, "deleted backup's file left in place");
            ctx.event(
                b.as_ref(),
                EventType::Warning,
                "BackupFileLeft",
                "Delete",
                format!("not removed: {why}"),
            )
            .await;
        }
    }
    deskvirt_runtime::finalizers::remove(
        &backups,
        b.as_ref(),
        &[FINALIZER_BACKUP_FILE],
        MANAGER_AGENT,
    )
    .await
    .map_err(Error::Kube)?;
    Ok(Action::await_change())
}

/// The UID of the deleted backup's desktop when that desktop is bound to this host and the
/// operator handed the backup's file over (nothing restores through it any more).
fn desktop_here<H>(b: &DesktopBackup, ctx: &DesktopContext<H>) -> Option<String> {
    if !handed_over(b) {
        return None;
    }
    let uid = b.status.as_ref()?.desktop_uid.as_deref()?;
    let here = ctx.desktops()?.state().into_iter().any(|d| {
        d.uid().as_deref() == Some(uid)
            && d.status.as_ref().and_then(|s| s.node.as_deref())
                == Some(ctx.config.node_name.as_str())
    });
    here.then(|| uid.to_string())
}

/// Deletes the checkpoint of backup `b` from the domain of desktop `desktop_uid` on this host
/// (redefined first when libvirt's record of it was lost, by a move or a restart); best effort:
/// a disk without that bitmap has nothing to drop, and a failure is logged.
async fn drop_checkpoint<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    b: &DesktopBackup,
    desktop_uid: &str,
) {
    let hv = &ctx.hypervisor;
    let uid = b.uid().unwrap_or_default();
    let domains = match hv.list_domains().await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "cannot list domains to drop a deleted backup's checkpoint");
            return;
        }
    };
    let Some(domain) = domains
        .iter()
        .find(|d| d.uuid.eq_ignore_ascii_case(desktop_uid))
        .map(|d| d.name.clone())
    else {
        return;
    };
    let created = b
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map_or(0, |t| t.0.as_second());
    let c = Checkpoint {
        name: uid.clone(),
        disk: DISK.into(),
        created,
    };
    if let Err(e) = hv.ensure_checkpoint(&domain, &c).await {
        tracing::debug!(%domain, checkpoint = %uid, error = %error_chain(&e), "no checkpoint of the deleted backup to drop");
        return;
    }
    match hv.delete_checkpoint(&domain, &uid).await {
        Ok(_) => {
            tracing::info!(%domain, checkpoint = %uid, "deleted backup's checkpoint dropped from its disk")
        }
        Err(e) => {
            tracing::warn!(%domain, checkpoint = %uid, error = %error_chain(&e), "cannot drop a deleted backup's checkpoint")
        }
    }
}

fn error_policy<H: Hypervisor>(
    b: Arc<DesktopBackup>,
    err: &Error,
    _ctx: Arc<DesktopContext<H>>,
) -> Action {
    tracing::warn!(backup = %b.name_any(), error = %error_chain(err), "cannot remove a deleted backup's file");
    Action::requeue(RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskvirt_crds::DesktopBackupStatus;
    use deskvirt_crds::backup::location;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::jiff::Timestamp;

    fn deleted(node: &str, reason: &str, fins: &[&str], file: &str) -> DesktopBackup {
        let mut b = DesktopBackup::new(
            "b1",
            deskvirt_crds::DesktopBackupSpec {
                desktop: "d".into(),
                kind: None,
                new_chain: false,
            },
        );
        b.metadata.namespace = Some("ns".into());
        b.metadata.uid = Some("u1".into());
        b.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        b.metadata.finalizers = Some(fins.iter().map(|f| f.to_string()).collect());
        b.status = Some(DesktopBackupStatus {
            node: Some(node.into()),
            desktop_uid: Some("d1".into()),
            location: Some(file.into()),
            conditions: vec![Condition {
                type_: READY.into(),
                status: "False".into(),
                reason: reason.into(),
                message: String::new(),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            ..DesktopBackupStatus::default()
        });
        b
    }

    #[test]
    fn only_the_writer_removes_and_only_once_the_operator_let_go() {
        let file = location("/srv/b", "ns", "d1", "u1");
        let ready = deleted("h1", "RemovingFile", &[FINALIZER_BACKUP_FILE], &file);
        assert!(is_ours(&ready, "h1"));
        assert!(!is_ours(&ready, "h2"), "another host");
        let held = deleted(
            "h1",
            "RemovingFile",
            &[FINALIZER_OPERATOR, FINALIZER_BACKUP_FILE],
            &file,
        );
        assert!(!is_ours(&held, "h1"), "the operator still holds it");
        let in_use = deleted("h1", "InUse", &[FINALIZER_BACKUP_FILE], &file);
        assert!(!is_ours(&in_use, "h1"), "a backup still reads it");
        let mut alive = ready.clone();
        alive.metadata.deletion_timestamp = None;
        assert!(!is_ours(&alive, "h1"), "not deleted");
    }

    #[test]
    fn only_the_backups_own_file_in_a_backup_dir_is_removed() {
        let own = location("/srv/b", "ns", "d1", "u1");
        let b = deleted("h1", "RemovingFile", &[FINALIZER_BACKUP_FILE], &own);
        assert_eq!(file_of(&b, ["/srv/other", "/srv/b"]), Ok(own.into()));
        assert!(file_of(&b, ["/srv/other"]).is_err(), "outside every dir");
        for forged in [
            location("/srv/b", "other-ns", "d1", "u1"),
            location("/srv/b", "ns", "d1", "someone-elses"),
            "/srv/b/ns/d1/../../../etc/passwd".into(),
            "/var/lib/deskvirt/disks/u1.qcow2".into(),
        ] {
            let b = deleted("h1", "RemovingFile", &[FINALIZER_BACKUP_FILE], &forged);
            assert!(file_of(&b, ["/srv/b"]).is_err(), "{forged} was accepted");
        }
    }
}
