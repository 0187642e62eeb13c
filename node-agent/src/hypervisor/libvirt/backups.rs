//! Decides how a disk backup and its checkpoints are carried out on a libvirt connection
//! (blocking): the backup job started in one transaction with its checkpoint, inside a freeze of
//! the guest's file systems by its guest agent when one answers, its progress and
//! its end read from the domain's job stats, and checkpoints redefined or deleted by name.

use std::ffi::CString;
use std::time::Instant;

use deskvirt_libvirt_ext::JobFigures;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use super::domains::{is_active, lookup, running};
use super::errors::map;
use crate::hypervisor::backup::{backup_xml, checkpoint_xml, redefine_xml};
use crate::hypervisor::{
    BackupJob, BackupProgress, Change, Checkpoint, Hold, HypervisorError, ObjectKind, Result,
};

/// `text` for a C call; our XML and names never hold a NUL, a tenant's input that did is
/// refused here.
fn c_string(op: &'static str, target: &str, text: String) -> Result<CString> {
    CString::new(text).map_err(|_| HypervisorError::Rejected {
        op,
        target: target.to_string(),
        message: "a NUL byte in the request".into(),
    })
}

/// How many times a failed thaw is tried again: a guest left frozen stops every write in it.
const THAW_TRIES: u32 = 3;

/// Seconds libvirt waits for the guest agent's answer to a freeze or thaw: a guest whose
/// fsfreeze hooks hang is backed up crash-consistent instead, and the whole start (freeze,
/// job, thaws) stays within the call's ordinary deadline.
const AGENT_SECONDS: i32 = 2;

/// Starts `job` on running domain `name`, inside a freeze of the guest's file systems when its
/// guest agent answers. The thaw follows in this same call whatever the start did, so a
/// caller that stops waiting (its deadline) never leaves the guest frozen.
pub(super) fn begin(conn: &Connect, name: &str, job: &BackupJob) -> Result<Hold> {
    let op = "begin backup";
    let dom = running(conn, op, name)?;
    let backup = c_string(op, name, backup_xml(job))?;
    let checkpoint = c_string(op, name, checkpoint_xml(&job.checkpoint, &job.disk))?;
    // Not set (an old libvirt): libvirt's own default applies.
    let _ = deskvirt_libvirt_ext::agent_timeout(&dom, AGENT_SECONDS);
    let frozen = deskvirt_libvirt_ext::fs_freeze(&dom);
    let t = Instant::now();
    let begun = deskvirt_libvirt_ext::backup_begin(&dom, &backup, Some(&checkpoint))
        .map_err(|e| map(op, ObjectKind::Domain, name, &e));
    let hold = match frozen {
        Ok(filesystems) => {
            let mut thawed = deskvirt_libvirt_ext::fs_thaw(&dom);
            for _ in 1..THAW_TRIES {
                if thawed.is_ok() {
                    break;
                }
                thawed = deskvirt_libvirt_ext::fs_thaw(&dom);
            }
            Hold::Frozen {
                filesystems,
                millis: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
                thaw_error: thawed.err().map(|e| e.message().to_string()),
            }
        }
        Err(e) => {
            // An agent that froze and then answered too late reads as a failure here: thaw
            // anyway (a thaw of unfrozen file systems does nothing; with no agent it fails
            // at once).
            deskvirt_libvirt_ext::fs_thaw(&dom).ok();
            Hold::Unfrozen {
                why: e.message().to_string(),
            }
        }
    };
    begun.map(|()| hold)
}

/// Stops the backup job of running domain `name`.
pub(super) fn abort(conn: &Connect, name: &str) -> Result<()> {
    let op = "abort backup";
    let dom = running(conn, op, name)?;
    deskvirt_libvirt_ext::abort_job(&dom).map_err(|e| map(op, ObjectKind::Domain, name, &e))
}

fn is_backup(stats: &JobFigures) -> bool {
    stats.operation == Some(sys::VIR_DOMAIN_JOB_OPERATION_BACKUP as i32)
}

/// The running backup job of domain `name`, else how the last one ended (kept for the next
/// read: the stats of a completed job are not consumed).
pub(super) fn progress(conn: &Connect, name: &str) -> Result<BackupProgress> {
    let op = "read backup job";
    let dom = lookup(conn, op, name)?;
    let err = |e: virt::error::Error| map(op, ObjectKind::Domain, name, &e);
    if is_active(&dom, op, name)? {
        let now = deskvirt_libvirt_ext::job_stats(&dom, false).map_err(err)?;
        if now.job_type != sys::VIR_DOMAIN_JOB_NONE as i32 && is_backup(&now) {
            return Ok(BackupProgress::Running {
                processed: now.disk_processed.unwrap_or(0),
                total: now.disk_total.unwrap_or(0),
            });
        }
    }
    let done = deskvirt_libvirt_ext::job_stats(&dom, true).map_err(err)?;
    if !is_backup(&done) {
        return Ok(BackupProgress::Idle);
    }
    Ok(match done.job_type as u32 {
        sys::VIR_DOMAIN_JOB_COMPLETED => BackupProgress::Completed {
            bytes: done.disk_processed.unwrap_or(0),
        },
        _ => BackupProgress::Failed {
            message: done
                .error_message
                .unwrap_or_else(|| "the backup job failed".into()),
        },
    })
}

fn checkpoint_exists(dom: &Domain, name: &str, checkpoint: &str) -> Result<bool> {
    let op = "read checkpoint";
    let c = c_string(op, name, checkpoint.to_string())?;
    deskvirt_libvirt_ext::checkpoint_exists(dom, &c)
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))
}

/// Redefines checkpoint `c` of domain `name` unless libvirt knows it.
pub(super) fn ensure_checkpoint(conn: &Connect, name: &str, c: &Checkpoint) -> Result<Change> {
    let op = "redefine checkpoint";
    let dom = lookup(conn, op, name)?;
    if checkpoint_exists(&dom, name, &c.name)? {
        return Ok(Change::AlreadyDone);
    }
    let xml = c_string(op, name, redefine_xml(c))?;
    deskvirt_libvirt_ext::checkpoint_create(&dom, &xml, true)
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    Ok(Change::Done)
}

/// Deletes checkpoint `checkpoint` of domain `name`, merging its bitmap; gone already is done.
pub(super) fn delete_checkpoint(conn: &Connect, name: &str, checkpoint: &str) -> Result<Change> {
    let op = "delete checkpoint";
    let dom = lookup(conn, op, name)?;
    if !checkpoint_exists(&dom, name, checkpoint)? {
        return Ok(Change::AlreadyDone);
    }
    let c = c_string(op, name, checkpoint.to_string())?;
    if let Err(e) = deskvirt_libvirt_ext::checkpoint_delete(&dom, &c, false) {
        // Off, libvirt deletes no bitmap: the record stays for a later try while it runs.
        if !is_active(&dom, op, name)? {
            return Err(map(op, ObjectKind::Domain, name, &e));
        }
        // Running, and still refused: the disk lacks the bitmap (restored over, or lost), so
        // nothing is there to merge. libvirt's record goes alone, so that it never names a
        // bitmap the disk does not hold.
        deskvirt_libvirt_ext::checkpoint_delete(&dom, &c, true)
            .map_err(|_| map(op, ObjectKind::Domain, name, &e))?;
        tracing::info!(domain = %name, %checkpoint, error = %e.message(),
            "checkpoint's bitmap not deleted; libvirt's record of it removed");
    }
    Ok(Change::Done)
}
