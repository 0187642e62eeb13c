//! Desktop backups end to end: the chart's operator and a node-agent (with the chart's tokens),
//! this machine's libvirt, real QEMU (TCG) and the real apiserver. The pool sets
//! `spec.backup.dir`; desktop `work`'s guest writes 4 MiB of byte 0xaa at boot.
//! - `b1` (no type): an incremental since the disk was made, holding exactly the 4 MiB written,
//!   its backing file the base image, its recorded checksum the file's SHA-256; quiesced: the
//!   guest's qemu-ga froze its file systems for the start (its fsfreeze hook ran for the freeze
//!   and then the thaw);
//! - `b2` right after: nothing changed, so it holds 0 bytes, its parent `b1`;
//! - the guest writes 2 MiB of 0x55 16 MiB in (a command on its serial console), then `b3`:
//!   exactly those 2 MiB, its parent `b2`; the chain `b3 → b2 → b1 → base` reads the same as
//!   the live disk (`qemu-img compare`);
//! - `b4` (`type: Full`): the whole 64 MiB disk in one file without a backing file, the same
//!   content again;
//! - the base image's checksum never changes;
//! - a new desktop restored from `b3` boots with its disk reading as `b3` (a linked clone of the
//!   base image); one restoring from a backup that does not exist is not placed
//!   (RestoreUnavailable, naming `spec.disk.restoreFrom.backup`), and one restoring over a
//!   stored backup with one changed byte is refused (RestoreRefused, naming the checksum); the
//!   restored desktop's first backup is a full one, and says why; its guest runs no agent, so
//!   that backup is crash-consistent, and says why;
//! - a DesktopRestore of `back` from `b1` waits while `back` runs (DesktopRunning, naming
//!   spec.power) and one from a backup the namespace lacks waits (RestoreUnavailable, naming
//!   spec.backup); stopped, `back`'s disk reads as `b1` and the old one (reading as `b3`) is
//!   kept beside it; started, it runs on `b1`'s content, the kept disk goes, the restore
//!   Succeeds and its record leaves the desktop; `back`'s next backup is a Full one;
//! - a tenant's backup naming `work` from another namespace finds no such desktop (it waits,
//!   reason DesktopNotFound); a backup of a stopped desktop is taken with its domain started
//!   paused (consistency Stopped, the chain reading as the disk), which is shut off again and
//!   the desktop never reported running;
//! - a backup taken as its desktop is deleted succeeds, and outlives the desktop;
//! - a deleted backup that others restore through waits (reason InUse, naming the child) and
//!   keeps its file; once nothing reads them, deleted backups go with their files;
//! - the agent of a desktop's host is killed (SIGKILL) while a Full backup of 1 GiB is written:
//!   the guest runs on, and the agent started again finishes it (Succeeded, verified, the disk's
//!   content); the next incremental extends it; a backup deleted while written goes with its
//!   unfinished file, and the next extends the last that succeeded;
//! - two backups of one desktop asked for at once are written one after the other (the second
//!   chains on the first);
//! - a ResourceQuota's `deskvirt.io/backup-storage` that the namespace's backups fill holds a
//!   new backup (QuotaExceeded, naming the quota) until it is lifted;
//! - the pool's schedule (every 3 s, keep 2, chains of at most 2) backs up a running desktop:
//!   two chains, the second started anew (what the desktop wrote since its disk was made, not
//!   the whole disk), the first deleted with its files once the second is kept, never a kept
//!   backup's parent, never the user's own backup of that desktop; the deleted backups'
//!   bitmaps leave the desktop's disk, the kept ones' stay; desktop `big`, annotated
//!   `deskvirt.io/backup-schedule: skip`, gets none.
//!
//! Run: `cargo test -p deskvirt-tests --test backup -- --nocapture`.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::backup::{BackupPhase, BackupState, BackupType, Consistency};
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::ANNOTATION_BACKUP_SCHEDULE;
use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, READY, RUNNING, SCHEDULED};
use deskvirt_crds::restore::RestorePhase;
use deskvirt_crds::{Desktop, DesktopBackup, DesktopRestore, ResourcePool};
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::helm::ScratchNamespace;
use deskvirt_tests::host::{eventually, qemu_pid, run};
use deskvirt_tests::world::{
    RUN_LABEL, World, backup_of as backup, boot_writing, create_pool, disk_of, domain_of,
    guest_command, guest_desktop, guest_writes, serial_values, setup, take_backup as take,
    virsh_system,
};
use k8s_openapi::api::core::v1::ResourceQuota;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn sha256(file: &Path) -> anyhow::Result<String> {
    let out = run("sha256sum", Command::new("sha256sum").arg(file))?;
    let hex = out
        .split_whitespace()
        .next()
        .context("no sha256sum output")?;
    Ok(format!("sha256:{hex}"))
}

/// `qemu-img info`'s backing file of `file` (none: `None`).
fn backing_of(file: &Path) -> anyhow::Result<Option<String>> {
    let out = run(
        "qemu-img info",
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(file),
    )?;
    let info: serde_json::Value = serde_json::from_str(&out)?;
    Ok(info["backing-filename"].as_str().map(str::to_string))
}

/// The names of the dirty bitmaps QEMU keeps for running domain `domain`'s disks (the disk
/// file holds them only once QEMU closes it), from QMP `query-named-block-nodes`.
fn bitmaps_of(domain: &str) -> anyhow::Result<Vec<String>> {
    let out = virsh_system(&[
        "qemu-monitor-command",
        domain,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ])?;
    let reply: serde_json::Value = serde_json::from_str(&out)?;
    let mut names: Vec<String> = reply["return"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|node| {
            node["dirty-bitmaps"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|b| b["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Whether `a` and `b` (with their backing chains) read the same, by `qemu-img compare`.
fn same_content(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let out = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()?;
    Ok(out.status.success())
}

fn ready_reason(b: &DesktopBackup) -> Option<String> {
    let st = b.status.as_ref()?;
    find(&st.conditions, READY).map(|c| c.reason.clone())
}

fn summary(name: &str, b: &DesktopBackup, took: Duration) -> String {
    let st = b.status.clone().unwrap_or_default();
    format!(
        "{name}: {:?} parent {:?}, {} KiB copied, file {} KiB, start {} ms, {:.1}s from create to Succeeded",
        st.kind,
        st.parent,
        st.data_bytes.unwrap_or(0) >> 10,
        st.size_bytes.unwrap_or(0) >> 10,
        st.start_millis.unwrap_or(0),
        took.as_secs_f64()
    )
}

/// Waits (up to 2 minutes) until libvirt says the guest agent of running domain `domain` is
/// connected (the guest's qemu-ga opened its port).
async fn agent_connected(domain: &str) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(120),
        "the guest agent's channel connected",
        || async {
            let xml = virsh_system(&["dumpxml", domain])?;
            Ok(xml
                .contains("name='org.qemu.guest_agent.0' state='connected'")
                .then_some(()))
        },
    )
    .await
}

/// Sets desktop `name`'s `spec.power` and, for Off, waits (up to 2 minutes) until its host
/// says its domain is off (`Running=False`, reason Stopped, not Stopping).
async fn power(desktops: &Api<Desktop>, name: &str, on: bool) -> anyhow::Result<()> {
    let word = if on { "On" } else { "Off" };
    desktops
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "power": word } })),
        )
        .await?;
    if on {
        return Ok(());
    }
    eventually(Duration::from_secs(120), "the desktop to stop", || async {
        let d: Option<Desktop> = desktops.get_opt(name).await?;
        let stopped = d
            .as_ref()
            .and_then(|d| d.status.as_ref())
            .and_then(|s| find(&s.conditions, RUNNING))
            .is_some_and(|c| c.status == "False" && c.reason == "Stopped");
        Ok(stopped.then_some(()))
    })
    .await
}

/// A DesktopRestore `name` of desktop `desktop` from backup `backup`.
fn restore_of(
    w: &World,
    name: &str,
    desktop: &str,
    backup: &str,
) -> anyhow::Result<DesktopRestore> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopRestore",
        "metadata": { "name": name, "labels": { RUN_LABEL: w.run } },
        "spec": { "desktop": desktop, "backup": backup },
    }))?)
}

/// Waits (up to `within`) until restore `name` satisfies `done`; returns it.
async fn restore_until(
    api: &Api<DesktopRestore>,
    name: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&DesktopRestore) -> bool,
) -> anyhow::Result<DesktopRestore> {
    eventually(within, what, || async {
        Ok(api.get_opt(name).await?.filter(|r| done(r)))
    })
    .await
}

/// The first reason restore `name` gives (up to 30 s), and its message.
async fn first_reason(api: &Api<DesktopRestore>, name: &str) -> anyhow::Result<(String, String)> {
    let within = Duration::from_secs(30);
    let r = restore_until(api, name, "the restore to say why it waits", within, |r| {
        !restore_reason(r).0.is_empty()
    })
    .await?;
    Ok(restore_reason(&r))
}

fn restore_reason(r: &DesktopRestore) -> (String, String) {
    r.status
        .as_ref()
        .and_then(|s| find(&s.conditions, READY))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// Desktop `back` (restored from b3, running, its disk `disk`) is restored over from b1 (file
/// `f1`): the restore waits while it runs (DesktopRunning, naming spec.power); stopped, its disk
/// becomes b1's while the old one (reading as b3, file `f3`) is kept beside it; started again,
/// it runs on b1's content, the kept disk goes and the restore Succeeds; its next backup is a
/// Full one. A restore naming a backup the namespace does not have waits, naming spec.backup.
async fn restore_over_a_stopped_desktop(
    w: &World,
    disk: &Path,
    f1: &Path,
    f3: &Path,
) -> anyhow::Result<()> {
    let desktops = w.desktops();
    let api: Api<DesktopRestore> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let pp = PostParams::default();
    api.create(&pp, &restore_of(w, "back-to-b1", "back", "b1")?)
        .await?;
    let (reason, message) = first_reason(&api, "back-to-b1").await?;
    anyhow::ensure!(
        reason == "DesktopRunning" && message.contains("spec.power"),
        "a restore of a running desktop: {reason}: {message}"
    );
    api.create(&pp, &restore_of(w, "back-to-nothing", "back", "nope")?)
        .await?;
    let (reason, message) = first_reason(&api, "back-to-nothing").await?;
    anyhow::ensure!(
        reason == "RestoreUnavailable" && message.contains("spec.backup"),
        "a restore of a backup that is not there: {reason}: {message}"
    );

    let t = Instant::now();
    power(&desktops, "back", false).await?;
    let stopped_in = t.elapsed();
    let t = Instant::now();
    let r = restore_until(
        &api,
        "back-to-b1",
        "the disk to be restored",
        Duration::from_secs(120),
        |r| {
            r.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(|p| p != RestorePhase::Pending && p != RestorePhase::Restoring)
        },
    )
    .await?;
    let swapped_in = t.elapsed();
    let st = r.status.clone().unwrap_or_default();
    anyhow::ensure!(
        st.phase == Some(RestorePhase::Restored),
        "back-to-b1: {st:?}"
    );
    let kept = PathBuf::from(st.kept_disk.clone().context("no kept disk")?);
    anyhow::ensure!(
        same_content(disk, f1)?,
        "the restored disk does not read as b1"
    );
    anyhow::ensure!(
        same_content(&kept, f3)?,
        "the kept disk does not read as before (b3)"
    );
    api.delete("back-to-nothing", &DeleteParams::default())
        .await?;
    // One more restore of the desktop waits for this one to end.
    api.create(&pp, &restore_of(w, "back-again", "back", "b2")?)
        .await?;
    let (reason, message) = first_reason(&api, "back-again").await?;
    anyhow::ensure!(
        reason == "Busy",
        "a second restore at once: {reason}: {message}"
    );
    api.delete("back-again", &DeleteParams::default()).await?;
    eprintln!(
        "[backup] back stopped in {:.1}s; its disk restored from b1 {:.1}s later, the old one kept as {}",
        stopped_in.as_secs_f64(),
        swapped_in.as_secs_f64(),
        kept.display()
    );

    // Started, it runs on b1's content; the kept disk goes and the restore ends.
    power(&desktops, "back", true).await?;
    runs(&desktops, "back").await?;
    let r = restore_until(
        &api,
        "back-to-b1",
        "the restore to end",
        Duration::from_secs(120),
        |r| r.phase() == RestorePhase::Succeeded || r.phase() == RestorePhase::Failed,
    )
    .await?;
    anyhow::ensure!(
        r.phase() == RestorePhase::Succeeded,
        "back-to-b1: {:?}",
        r.status
    );
    anyhow::ensure!(
        !kept.exists(),
        "the kept disk {} is still there",
        kept.display()
    );
    anyhow::ensure!(
        same_content(disk, f1)?,
        "the running disk does not read as b1"
    );
    // Succeeded is written first, then the record leaves the desktop (so a failed status write
    // never loses the host's report): wait for that second write.
    eventually(
        Duration::from_secs(30),
        "the restore's record to leave the desktop",
        || async {
            let d = desktops.get_opt("back").await?;
            let gone = d
                .as_ref()
                .and_then(|d| d.status.as_ref())
                .is_some_and(|s| s.restore_over.is_none());
            Ok(gone.then_some(()))
        },
    )
    .await?;
    // The restored disk has no history: its next backup is a full one, and says why.
    let (next, took) = take(w, "back-2", "back", None).await?;
    eprintln!("[backup] {}", summary("back-2", &next, took));
    let st = next.status.clone().unwrap_or_default();
    anyhow::ensure!(st.kind == Some(BackupType::Full), "back-2: {st:?}");
    anyhow::ensure!(
        api.get_opt("back-to-b1").await?.is_some(),
        "an ended restore stays until deleted"
    );
    api.delete("back-to-b1", &DeleteParams::default()).await?;
    Ok(())
}

/// Waits (up to 4 minutes) for desktop `name` to run.
async fn runs(desktops: &Api<Desktop>, name: &str) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(240),
        &format!("{name} to run"),
        || async {
            let d = desktops.get_opt(name).await?;
            let running = d
                .as_ref()
                .and_then(|d| d.status.as_ref())
                .is_some_and(|s| deskvirt_crds::conditions::is_true(&s.conditions, RUNNING));
            Ok(running.then_some(()))
        },
    )
    .await
}

/// Creates desktop `name` restoring from backup `from`, then waits for its condition `type_`
/// to turn False; returns that condition's reason and message.
async fn refused_restore(
    w: &World,
    name: &str,
    from: &str,
    type_: &str,
    wait: Duration,
) -> anyhow::Result<(String, String)> {
    let desktops = w.desktops();
    let d = guest_desktop(
        w,
        name,
        "128Mi",
        json!({ "disk": { "image": "base.qcow2", "restoreFrom": { "backup": from } } }),
    )?;
    desktops.create(&PostParams::default(), &d).await?;
    let got = eventually(wait, &format!("{name} refused"), || async {
        let d = desktops.get_opt(name).await?;
        Ok(d.as_ref()
            .and_then(|d| d.status.as_ref())
            .and_then(|s| find(&s.conditions, type_))
            .filter(|c| c.status == "False")
            .map(|c| (c.reason.clone(), c.message.clone())))
    })
    .await?;
    desktops.delete(name, &DeleteParams::default()).await?;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_hold_only_what_changed_and_chain_to_the_disk_as_it_was() -> anyhow::Result<()> {
    let started = Instant::now();
    let suffix = unique_suffix();
    let mut w = setup(&format!("backup-{suffix}")).await?;
    let backups_dir = std::env::temp_dir().join(format!("deskvirt-backups-{suffix}"));
    create_pool(&w).await?;
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    pools
        .patch(
            &w.pool,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "backup": { "dir": backups_dir } } })),
        )
        .await?;
    w.start_agent()?;
    w.start_operator()?;
    let desktops = w.desktops();
    let work = guest_desktop(&w, "work", "128Mi", boot_writing(4, "252"))?;
    desktops.create(&PostParams::default(), &work).await?;
    runs(&desktops, "work").await?;
    let domain = domain_of(&desktops, &w.user_ns.name, "work").await?;
    let serial = PathBuf::from(format!("/var/log/libvirt/qemu/{domain}-serial.log"));
    eventually(
        Duration::from_secs(120),
        "the guest's boot write",
        || async { Ok((!guest_writes(&serial)?.is_empty()).then_some(())) },
    )
    .await?;
    let base = w.image_dir.join("base.qcow2");
    let base_sum = sha256(&base)?;
    let live = disk_of(&virsh_system(&["domblklist", &domain])?)?;
    eprintln!(
        "[backup] world up, work runs and wrote 4 MiB: {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // b1: what changed since the disk was made, on the base image; the guest's qemu-ga froze
    // its file systems for the start (its fsfreeze hook ran for the freeze, then the thaw).
    agent_connected(&domain).await?;
    let (b1, took) = take(&w, "b1", "work", None).await?;
    eprintln!("[backup] {}", summary("b1", &b1, took));
    let st1 = b1.status.clone().unwrap_or_default();
    let q1 = st1
        .quiesce
        .clone()
        .context("b1 says nothing of quiescing")?;
    anyhow::ensure!(
        q1.consistency == Consistency::Quiesced && q1.frozen_millis.is_some(),
        "b1: {q1:?}"
    );
    let hooks = serial_values(&serial, "DESKVIRT-GUEST-FSFREEZE ")?;
    anyhow::ensure!(
        hooks == ["freeze", "thaw"],
        "the guest's fsfreeze hook ran {hooks:?}"
    );
    let said = find(&st1.conditions, READY)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    anyhow::ensure!(said.contains("quiesced"), "b1's Ready says {said}");
    anyhow::ensure!(st1.kind == Some(BackupType::Incremental), "{st1:?}");
    anyhow::ensure!(st1.parent.is_none(), "{st1:?}");
    anyhow::ensure!(
        st1.data_bytes == Some(4 * MIB),
        "b1 copied {:?}",
        st1.data_bytes
    );
    let f1 = PathBuf::from(st1.location.clone().context("b1 has no location")?);
    anyhow::ensure!(f1.starts_with(&backups_dir), "{}", f1.display());
    let size1 = std::fs::metadata(&f1)?.len();
    anyhow::ensure!(
        st1.size_bytes == Some(size1) && size1 <= 4 * MIB + MIB,
        "b1's file is {size1} bytes (status {:?}): more than the 4 MiB written plus 1 MiB",
        st1.size_bytes
    );
    anyhow::ensure!(st1.checksum == Some(sha256(&f1)?), "b1's checksum");
    anyhow::ensure!(
        same_content(&live, &f1)?,
        "the chain b1 → base does not read as the live disk"
    );
    anyhow::ensure!(
        backing_of(&f1)?.as_deref() == Some(&*base.to_string_lossy()),
        "b1's backing file: {:?}",
        backing_of(&f1)?
    );

    // b2: nothing changed since b1.
    let (b2, took) = take(&w, "b2", "work", None).await?;
    eprintln!("[backup] {}", summary("b2", &b2, took));
    let st2 = b2.status.clone().unwrap_or_default();
    anyhow::ensure!(st2.parent.as_deref() == Some("b1"), "{st2:?}");
    anyhow::ensure!(st2.data_bytes == Some(0), "b2 copied {:?}", st2.data_bytes);
    let f2 = PathBuf::from(st2.location.clone().context("b2 has no location")?);
    anyhow::ensure!(
        backing_of(&f2)?.as_deref() == Some(&*f1.to_string_lossy()),
        "b2's backing file: {:?}",
        backing_of(&f2)?
    );
    anyhow::ensure!(
        same_content(&live, &f2)?,
        "the chain b2 → b1 → base does not read as the live disk"
    );

    // The guest changes 2 MiB, then b3 holds exactly them.
    guest_command(&domain, "deskvirt-write 2 16 125").await?;
    eventually(
        Duration::from_secs(60),
        "the guest's second write",
        || async { Ok((guest_writes(&serial)?.len() >= 2).then_some(())) },
    )
    .await?;
    let (b3, took) = take(&w, "b3", "work", None).await?;
    eprintln!("[backup] {}", summary("b3", &b3, took));
    let st3 = b3.status.clone().unwrap_or_default();
    anyhow::ensure!(st3.parent.as_deref() == Some("b2"), "{st3:?}");
    anyhow::ensure!(
        st3.data_bytes == Some(2 * MIB),
        "b3 copied {:?}",
        st3.data_bytes
    );
    let f3 = PathBuf::from(st3.location.clone().context("b3 has no location")?);
    anyhow::ensure!(
        same_content(&live, &f3)?,
        "the chain b3 → b2 → b1 → base does not read as the live disk"
    );

    // A new desktop restored from b3 boots with the disk as it was then.
    let back = guest_desktop(
        &w,
        "back",
        "128Mi",
        json!({ "disk": { "image": "base.qcow2", "restoreFrom": { "backup": "b3" } },
                "boot": { "kernel": "vmlinuz", "initrd": "initrd.img",
                          "cmdline": "console=ttyS0 deskvirt.noagent" } }),
    )?;
    desktops.create(&PostParams::default(), &back).await?;
    let t = Instant::now();
    runs(&desktops, "back").await?;
    let restored_in = t.elapsed();
    let back_domain = domain_of(&desktops, &w.user_ns.name, "back").await?;
    let back_disk = disk_of(&virsh_system(&["domblklist", &back_domain])?)?;
    anyhow::ensure!(
        same_content(&back_disk, &f3)?,
        "the restored disk does not read as backup b3"
    );
    anyhow::ensure!(
        backing_of(&back_disk)?.as_deref() == Some(&*base.to_string_lossy()),
        "the restored disk is not a linked clone of the base image"
    );
    eprintln!(
        "[backup] back restored from b3 and running {:.1}s after it was created; its disk reads as b3",
        restored_in.as_secs_f64()
    );
    // Its disk stands alone (no creation bitmap): its first backup is a full one, and says so.
    let (first, took) = take(&w, "back-1", "back", None).await?;
    eprintln!("[backup] {}", summary("back-1", &first, took));
    let st = first.status.clone().unwrap_or_default();
    let said = find(&st.conditions, READY)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    anyhow::ensure!(
        st.kind == Some(BackupType::Full) && said.contains("taken full"),
        "back-1: {:?}: {said}",
        st.kind
    );
    // Its guest runs no agent: crash-consistent, and the backup says why.
    let q = st
        .quiesce
        .clone()
        .context("back-1 says nothing of quiescing")?;
    anyhow::ensure!(
        q.consistency == Consistency::CrashConsistent
            && q.message.as_deref().is_some_and(|m| m.contains("agent"))
            && said.contains("crash-consistent"),
        "back-1: {q:?}; {said}"
    );
    restore_over_a_stopped_desktop(&w, &back_disk, &f1, &f3).await?;
    anyhow::ensure!(sha256(&base)? == base_sum, "the base image changed");

    // A backup that does not exist is named, and the desktop is not placed.
    let (reason, message) =
        refused_restore(&w, "nothing", "nope", SCHEDULED, Duration::from_secs(30)).await?;
    anyhow::ensure!(
        reason == "RestoreUnavailable" && message.contains("spec.disk.restoreFrom.backup"),
        "{reason}: {message}"
    );

    // b4: the whole disk, standing alone.
    let (b4, took) = take(&w, "b4", "work", Some("Full")).await?;
    eprintln!("[backup] {}", summary("b4", &b4, took));
    let st4 = b4.status.clone().unwrap_or_default();
    anyhow::ensure!(
        st4.kind == Some(BackupType::Full) && st4.parent.is_none(),
        "{st4:?}"
    );
    anyhow::ensure!(
        st4.data_bytes == Some(64 * MIB),
        "b4 copied {:?}",
        st4.data_bytes
    );
    let f4 = PathBuf::from(st4.location.clone().context("b4 has no location")?);
    anyhow::ensure!(backing_of(&f4)?.is_none(), "b4 has a backing file");
    anyhow::ensure!(
        same_content(&live, &f4)?,
        "b4 does not read as the live disk"
    );
    anyhow::ensure!(sha256(&base)? == base_sum, "the base image changed");

    // Another tenant names `work`: there is no such desktop in its namespace.
    let other = ScratchNamespace::create("backup-other")?;
    let theirs: Api<DesktopBackup> = Api::namespaced(w.client.clone(), &other.name);
    theirs
        .create(&PostParams::default(), &backup(&w, "steal", "work", None)?)
        .await?;
    let reason = eventually(Duration::from_secs(30), "steal to wait", || async {
        Ok(theirs
            .get_opt("steal")
            .await?
            .and_then(|b| ready_reason(&b)))
    })
    .await?;
    anyhow::ensure!(reason == "DesktopNotFound", "steal: {reason}");
    theirs.delete("steal", &DeleteParams::default()).await?;

    // A stopped desktop is backed up too: its host starts the domain paused for the copy (no
    // guest code runs) and stops it again.
    power(&desktops, "work", false).await?;
    let api: Api<DesktopBackup> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let (b5, took) = take(&w, "b5", "work", None).await?;
    eprintln!(
        "[backup] {}",
        summary("b5 (of the stopped desktop)", &b5, took)
    );
    let st5 = b5.status.clone().unwrap_or_default();
    anyhow::ensure!(
        st5.parent.as_deref() == Some("b4") && st5.data_bytes == Some(0),
        "b5: {st5:?}"
    );
    let q5 = st5
        .quiesce
        .clone()
        .context("b5 says nothing of how it was held")?;
    anyhow::ensure!(q5.consistency == Consistency::Stopped, "b5: {q5:?}");
    let f5 = PathBuf::from(st5.location.clone().context("b5 has no location")?);
    anyhow::ensure!(
        same_content(&live, &f5)?,
        "the chain b5 → b4 does not read as the stopped disk"
    );
    eventually(
        Duration::from_secs(60),
        "work's domain to be off again",
        || async {
            let state = virsh_system(&["domstate", &domain])?;
            Ok((state.trim() == "shut off").then_some(()))
        },
    )
    .await?;
    let d = desktops.get("work").await?;
    let running = d
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, RUNNING))
        .map(|c| (c.status.clone(), c.reason.clone()));
    anyhow::ensure!(
        running.as_ref().is_some_and(|(s, _)| s == "False"),
        "work's Running after a backup while stopped: {running:?}"
    );
    power(&desktops, "work", true).await?;
    runs(&desktops, "work").await?;

    // A backup taken as its desktop is deleted is never lost with it: the host keeps the
    // domain and disk until the backup is written and its end recorded.
    api.create(&PostParams::default(), &backup(&w, "b6", "work", None)?)
        .await?;
    eventually(Duration::from_secs(30), "b6 to start", || async {
        Ok(api
            .get_opt("b6")
            .await?
            .filter(|b| b.phase() != BackupPhase::Pending))
    })
    .await?;
    desktops.delete("work", &DeleteParams::default()).await?;
    let b6 = eventually(Duration::from_secs(60), "b6 to end", || async {
        Ok(api.get_opt("b6").await?.filter(|b| b.phase().is_terminal()))
    })
    .await?;
    anyhow::ensure!(b6.phase() == BackupPhase::Succeeded, "b6: {:?}", b6.status);
    eventually(Duration::from_secs(120), "work to go", || async {
        Ok(desktops.get_opt("work").await?.is_none().then_some(()))
    })
    .await?;
    let f6 = PathBuf::from(
        b6.status
            .and_then(|s| s.location)
            .context("b6 has no location")?,
    );
    anyhow::ensure!(f6.exists(), "b6's file went with its desktop");

    // One changed byte in a stored backup: a restore that reads it refuses, and says why.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&f2)?;
        f.seek(SeekFrom::Start(100))?;
        f.write_all(&[0x5a])?;
    }
    let (reason, message) =
        refused_restore(&w, "broken", "b3", DOMAIN_DEFINED, Duration::from_secs(120)).await?;
    anyhow::ensure!(
        reason == "RestoreRefused" && message.contains("checksum"),
        "{reason}: {message}"
    );
    eprintln!("[backup] a restore over a changed byte is refused: {message}");

    // A desktop for the schedule, booting while the deletions below run.
    let sched = guest_desktop(&w, "sched", "128Mi", boot_writing(1, "017"))?;
    desktops.create(&PostParams::default(), &sched).await?;
    // And one with 1 GiB written, whose backup takes long enough to kill its host's agent
    // while it is written.
    let mut extra = boot_writing(1024, "146");
    extra["disk"] = json!({ "image": "base.qcow2", "size": "2Gi" });
    // It is left out of the pool's schedule (its owner's annotation).
    let mut big = guest_desktop(&w, "big", "128Mi", extra)?;
    big.metadata.annotations = Some(
        [(ANNOTATION_BACKUP_SCHEDULE.to_string(), "skip".to_string())]
            .into_iter()
            .collect(),
    );
    desktops.create(&PostParams::default(), &big).await?;

    // A deleted backup that others restore through waits, and its file stays.
    let file_of = |b: &DesktopBackup| -> anyhow::Result<PathBuf> {
        Ok(PathBuf::from(
            b.status
                .as_ref()
                .and_then(|s| s.location.clone())
                .context("no location")?,
        ))
    };
    let f5 = file_of(&b5)?;
    api.delete("b1", &DeleteParams::default()).await?;
    let (reason, message) = eventually(Duration::from_secs(30), "b1 to wait", || async {
        let b = api
            .get_opt("b1")
            .await?
            .context("b1 went while b2 needs it")?;
        Ok(b.status
            .as_ref()
            .and_then(|s| find(&s.conditions, READY))
            .filter(|c| c.reason == "InUse")
            .map(|c| (c.reason.clone(), c.message.clone())))
    })
    .await?;
    anyhow::ensure!(message.contains("b2"), "{reason}: {message}");
    anyhow::ensure!(f1.exists(), "b1's file went while b2 restores through it");
    eprintln!("[backup] b1 deleted waits: {message}");
    // Once nothing reads them, deleted backups go, and so do their files (the host that
    // wrote each removes it).
    let t = Instant::now();
    let names = ["b2", "b3", "b4", "b5", "b6"];
    for name in names {
        api.delete(name, &DeleteParams::default()).await?;
    }
    eventually(Duration::from_secs(60), "b1 to b6 to go", || async {
        let mut left = 0;
        for name in ["b1"].iter().chain(names.iter()) {
            left += usize::from(api.get_opt(name).await?.is_some());
        }
        Ok((left == 0).then_some(()))
    })
    .await?;
    for f in [&f1, &f2, &f3, &f4, &f5, &f6] {
        anyhow::ensure!(!f.exists(), "{} is left after its backup went", f.display());
    }
    eprintln!(
        "[backup] b1..b6 deleted with their files in {:.1}s (b1 last: the chain's root)",
        t.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        api.get_opt("back-1").await?.is_some(),
        "a backup nobody deleted went"
    );

    schedule_keeps_what_restores_and_lets_the_rest_go(&w, &backups_dir).await?;
    an_agent_killed_mid_backup_finishes_it_when_it_comes_back(&mut w).await?;
    a_full_quota_holds_new_backups_until_it_has_room(&w).await?;
    anyhow::ensure!(sha256(&base)? == base_sum, "the base image changed");
    eprintln!(
        "[backup] whole test {:.1}s",
        started.elapsed().as_secs_f64()
    );
    drop(w);
    let _ = std::fs::remove_dir_all(&backups_dir);
    Ok(())
}

/// A scheduled backup as the schedule test follows it.
#[derive(Clone, Debug)]
struct Seen {
    uid: String,
    phase: Option<BackupPhase>,
    said: Option<String>,
    parent: Option<String>,
    new_chain: bool,
    data: Option<u64>,
    file: Option<PathBuf>,
    /// How the guest was held, as its status says.
    held: Option<String>,
}

/// The pool's schedule every 3 seconds, keeping 2 backups of a desktop with chains of at most
/// 2: `s1` (what `sched` wrote since its disk was made), `s2` on it, then `s3` a new chain and
/// `s4` on it. While `s2` is kept, `s1` stays (s2 restores through it); once `s3` and `s4` are
/// the two kept, `s1` and `s2` go with their files. At no moment does a kept scheduled backup
/// lack its parent, and the user's backup `mine` of the same desktop is never touched.
async fn schedule_keeps_what_restores_and_lets_the_rest_go(
    w: &World,
    backups_dir: &Path,
) -> anyhow::Result<()> {
    let desktops = w.desktops();
    runs(&desktops, "sched").await?;
    let domain = domain_of(&desktops, &w.user_ns.name, "sched").await?;
    let serial = PathBuf::from(format!("/var/log/libvirt/qemu/{domain}-serial.log"));
    eventually(Duration::from_secs(120), "sched's boot write", || async {
        Ok((!guest_writes(&serial)?.is_empty()).then_some(()))
    })
    .await?;
    // Two backups of one desktop asked for at once are written one after the other: the
    // second holds the changes since the first.
    let api: Api<DesktopBackup> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    for name in ["mine", "mine-too"] {
        api.create(&PostParams::default(), &backup(w, name, "sched", None)?)
            .await?;
    }
    let both = eventually(
        Duration::from_secs(60),
        "mine and mine-too to end",
        || async {
            let (a, b) = (api.get("mine").await?, api.get("mine-too").await?);
            Ok((a.phase().is_terminal() && b.phase().is_terminal()).then_some((a, b)))
        },
    )
    .await?;
    let parent = |b: &DesktopBackup| b.status.as_ref().and_then(|s| s.parent.clone());
    let (mine, too) = both;
    anyhow::ensure!(
        mine.phase() == BackupPhase::Succeeded && too.phase() == BackupPhase::Succeeded,
        "{:?} / {:?}",
        mine.status,
        too.status
    );
    anyhow::ensure!(
        parent(&too).as_deref() == Some("mine") || parent(&mine).as_deref() == Some("mine-too"),
        "two backups at once did not chain one on the other: {:?} / {:?}",
        parent(&mine),
        parent(&too)
    );
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    let t = Instant::now();
    pools
        .patch(
            &w.pool,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "backup": {
                "dir": backups_dir, "schedule": "*/3 * * * * *", "keep": 2, "maxChain": 2,
            } } })),
        )
        .await?;
    let lp = kube::api::ListParams::default().labels("deskvirt.io/scheduled=true");
    // Every scheduled backup seen, in the order they were made, and the most kept at once.
    let seen: RefCell<Vec<(String, Seen)>> = RefCell::new(Vec::new());
    let most_kept = Cell::new(0);
    let outcome = eventually(
        Duration::from_secs(120),
        "two scheduled chains, the first one gone",
        || async {
            let list = api.list(&lp).await?;
            let live: Vec<&DesktopBackup> = list
                .items
                .iter()
                .filter(|b| b.spec.desktop == "sched")
                .collect();
            let live_names: Vec<String> = live.iter().map(|b| b.name_any()).collect();
            let mut seen = seen.borrow_mut();
            let mut kept = 0;
            for b in &live {
                let name = b.name_any();
                let st = b.status.clone().unwrap_or_default();
                let s = Seen {
                    uid: b.metadata.uid.clone().unwrap_or_default(),
                    phase: st.phase,
                    said: find(&st.conditions, READY)
                        .map(|c| format!("{}: {}", c.reason, c.message)),
                    parent: st.parent.clone(),
                    new_chain: b.spec.new_chain,
                    data: st.data_bytes,
                    file: st.location.clone().map(PathBuf::from),
                    held: st.quiesce.as_ref().map(|q| {
                        format!("{:?} {}", q.consistency, q.message.as_deref().unwrap_or(""))
                    }),
                };
                match seen.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, old)) => *old = s,
                    None => seen.push((name.clone(), s)),
                }
                if b.metadata.deletion_timestamp.is_none() {
                    kept += 1;
                    // Retention keeps what a kept backup restores through.
                    if let Some(p) = &st.parent {
                        anyhow::ensure!(
                            live_names.contains(p),
                            "{name} is kept but its parent {p} is gone"
                        );
                    }
                }
            }
            most_kept.set(most_kept.get().max(kept));
            let succeeded = live
                .iter()
                .filter(|b| b.phase() == BackupPhase::Succeeded)
                .count();
            let first_gone =
                seen.len() >= 4 && seen[..2].iter().all(|(n, _)| !live_names.contains(n));
            Ok((first_gone && succeeded >= 2).then_some(()))
        },
    )
    .await;
    // The schedule stops before anything is asserted, so that nothing more is made.
    pools
        .patch(
            &w.pool,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "backup": { "schedule": null } } })),
        )
        .await?;
    let (seen, most_kept) = (seen.into_inner(), most_kept.get());
    outcome.with_context(|| format!("seen {seen:?}"))?;
    let skipped: Vec<String> = api
        .list(&lp)
        .await?
        .items
        .iter()
        .filter(|b| b.spec.desktop == "big")
        .map(|b| b.name_any())
        .collect();
    anyhow::ensure!(
        skipped.is_empty(),
        "the schedule backed up big, annotated to skip it: {skipped:?}"
    );
    for (n, s) in &seen {
        eprintln!(
            "[backup] scheduled {n}: {:?}, parent {:?}, new chain {}, {} KiB copied, held {} ({})",
            s.phase,
            s.parent,
            s.new_chain,
            s.data.unwrap_or(0) >> 10,
            s.held.as_deref().unwrap_or("-"),
            s.said.as_deref().unwrap_or("")
        );
    }
    let (s1, s2, s3, s4) = (&seen[0].1, &seen[1].1, &seen[2].1, &seen[3].1);
    anyhow::ensure!(s1.parent.is_none() && !s1.new_chain, "s1: {s1:?}");
    anyhow::ensure!(
        s2.parent.as_deref() == Some(seen[0].0.as_str()),
        "s2: {s2:?}"
    );
    anyhow::ensure!(s3.new_chain && s3.parent.is_none(), "s3: {s3:?}");
    anyhow::ensure!(
        s4.parent.as_deref() == Some(seen[2].0.as_str()),
        "s4: {s4:?}"
    );
    // A new chain holds what the desktop wrote since its disk was made, not the whole disk.
    anyhow::ensure!(
        s1.data == Some(MIB) && s3.data == Some(MIB),
        "s1 copied {:?}, s3 {:?}",
        s1.data,
        s3.data
    );
    for s in [s1, s2] {
        let f = s.file.as_ref().context("no file")?;
        anyhow::ensure!(!f.exists(), "{} is left after retention", f.display());
    }
    // Their checkpoints went from the disk with them: QEMU keeps no bitmap of theirs.
    let domain = domain_of(&desktops, &w.user_ns.name, "sched").await?;
    let gone = [s1.uid.clone(), s2.uid.clone()];
    let left = eventually(
        Duration::from_secs(30),
        "s1's and s2's bitmaps to go",
        || async {
            let bitmaps = bitmaps_of(&domain)?;
            Ok((!bitmaps.iter().any(|b| gone.contains(b))).then_some(bitmaps))
        },
    )
    .await?;
    let kept = [s3.uid.clone(), s4.uid.clone()];
    anyhow::ensure!(
        kept.iter().all(|k| left.contains(k)),
        "the kept backups' bitmaps are missing: {left:?}"
    );
    anyhow::ensure!(
        most_kept <= 2 + 2,
        "{most_kept} scheduled backups of sched were kept at once"
    );
    let mine_now = api
        .get_opt("mine")
        .await?
        .context("retention deleted mine")?;
    anyhow::ensure!(
        mine_now.metadata.uid == mine.metadata.uid,
        "mine was replaced"
    );
    eprintln!(
        "[backup] schedule: 4 scheduled backups, the first chain gone with its files, {:.1}s after the schedule was set; at most {most_kept} kept at once",
        t.elapsed().as_secs_f64()
    );
    // Wait for what the schedule still has open before the world goes.
    eventually(
        Duration::from_secs(60),
        "open scheduled backups to end",
        || async {
            let list = api.list(&lp).await?;
            Ok(list
                .items
                .iter()
                .all(|b| b.phase().is_terminal())
                .then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// Creates Full backup `name` of `desktop` and waits until its host reports the job started;
/// returns the backup's UID and file.
async fn start_full(w: &World, name: &str, desktop: &str) -> anyhow::Result<(String, String)> {
    let api: Api<DesktopBackup> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let desktops = w.desktops();
    api.create(
        &PostParams::default(),
        &backup(w, name, desktop, Some("Full"))?,
    )
    .await?;
    eventually(
        Duration::from_secs(60),
        &format!("{name} to start"),
        || async {
            let b = api.get(name).await?;
            let uid = b.metadata.uid.clone().unwrap_or_default();
            let d = desktops.get(desktop).await?;
            let started = d
                .status
                .and_then(|s| s.backup_report)
                .is_some_and(|r| r.uid == uid && r.state == BackupState::Started);
            let file = b.status.and_then(|s| s.location);
            Ok(started.then_some(()).and(file).map(|f| (uid, f)))
        },
    )
    .await
}

/// A Full backup of `big` (1 GiB of data) is being written when its host's agent is killed
/// (SIGKILL): the guest runs on (the same QEMU process), the job goes on inside libvirt, and
/// the agent started again adopts it: the backup ends Succeeded with a checksum that matches
/// its file, which reads as the disk; the next incremental extends it with nothing to copy.
async fn an_agent_killed_mid_backup_finishes_it_when_it_comes_back(
    w: &mut World,
) -> anyhow::Result<()> {
    let desktops = w.desktops();
    runs(&desktops, "big").await?;
    let domain = domain_of(&desktops, &w.user_ns.name, "big").await?;
    let serial = PathBuf::from(format!("/var/log/libvirt/qemu/{domain}-serial.log"));
    eventually(Duration::from_secs(300), "big's boot write", || async {
        Ok((!guest_writes(&serial)?.is_empty()).then_some(()))
    })
    .await?;
    let pid = qemu_pid(&domain).context("no QEMU pid")?;
    let api: Api<DesktopBackup> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    // The host reported the job started: kill its agent now.
    let (uid, _) = start_full(w, "big-full", "big").await?;
    if let Some(mut a) = w.agent.take() {
        a.kill()?;
    }
    let killed = Instant::now();
    let job = virsh_system(&["domjobinfo", &domain])?;
    anyhow::ensure!(
        job.contains("Backup") || job.contains("Unbounded"),
        "the backup job ended before the agent was killed, the test proves nothing:\n{job}"
    );
    w.start_agent()?;
    let b = eventually(Duration::from_secs(120), "big-full to end", || async {
        Ok(api
            .get_opt("big-full")
            .await?
            .filter(|b| b.phase().is_terminal()))
    })
    .await?;
    anyhow::ensure!(
        b.phase() == BackupPhase::Succeeded && b.metadata.uid.as_deref() == Some(uid.as_str()),
        "big-full: {:?}",
        b.status
    );
    let st = b.status.clone().unwrap_or_default();
    let file = PathBuf::from(st.location.clone().context("no location")?);
    anyhow::ensure!(st.checksum == Some(sha256(&file)?), "big-full's checksum");
    let live = disk_of(&virsh_system(&["domblklist", &domain])?)?;
    anyhow::ensure!(
        same_content(&live, &file)?,
        "big-full does not read as the disk"
    );
    anyhow::ensure!(
        qemu_pid(&domain) == Some(pid),
        "the desktop's QEMU changed while its agent was down"
    );
    eprintln!(
        "[backup] agent killed while big-full ({} MiB of data) was written; started again, it finished the backup {:.1}s after the kill; the guest ran on",
        st.data_bytes.unwrap_or(0) >> 20,
        killed.elapsed().as_secs_f64()
    );
    let (after, _) = take(w, "big-after", "big", None).await?;
    let st = after.status.unwrap_or_default();
    anyhow::ensure!(
        st.parent.as_deref() == Some("big-full") && st.data_bytes == Some(0),
        "the next incremental: {st:?}"
    );

    // A backup deleted while it is written goes, its unfinished file with it, and holds the
    // desktop no more: the next backup extends the last one that succeeded.
    let (_, file) = start_full(w, "big-cancel", "big").await?;
    let t = Instant::now();
    api.delete("big-cancel", &DeleteParams::default()).await?;
    eventually(Duration::from_secs(60), "big-cancel to go", || async {
        Ok(api.get_opt("big-cancel").await?.is_none().then_some(()))
    })
    .await?;
    eventually(
        Duration::from_secs(30),
        "big-cancel's unfinished file to go",
        || async { Ok((!Path::new(&file).exists()).then_some(())) },
    )
    .await?;
    eprintln!(
        "[backup] big-cancel deleted while written: gone with its unfinished file in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let (next, _) = take(w, "big-next", "big", None).await?;
    let st = next.status.unwrap_or_default();
    anyhow::ensure!(
        st.parent.as_deref() == Some("big-after"),
        "the backup after a cancelled one: {st:?}"
    );
    Ok(())
}

/// A ResourceQuota whose `deskvirt.io/backup-storage` the namespace's backups already fill:
/// a new backup waits (QuotaExceeded, naming the quota), and goes ahead once the quota is
/// lifted.
async fn a_full_quota_holds_new_backups_until_it_has_room(w: &World) -> anyhow::Result<()> {
    let quotas: Api<ResourceQuota> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let q: ResourceQuota = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": { "name": "backups" },
        "spec": { "hard": { "deskvirt.io/backup-storage": "1Mi" } },
    }))?;
    quotas.create(&PostParams::default(), &q).await?;
    let api: Api<DesktopBackup> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    api.create(&PostParams::default(), &backup(w, "over", "big", None)?)
        .await?;
    let message = eventually(Duration::from_secs(30), "over to wait", || async {
        Ok(api.get("over").await?.status.and_then(|s| {
            find(&s.conditions, READY)
                .filter(|c| c.reason == "QuotaExceeded")
                .map(|c| c.message.clone())
        }))
    })
    .await?;
    anyhow::ensure!(
        message.contains("backups") && message.contains("deskvirt.io/backup-storage"),
        "{message}"
    );
    quotas.delete("backups", &DeleteParams::default()).await?;
    let t = Instant::now();
    let over = eventually(Duration::from_secs(60), "over to end", || async {
        Ok(api
            .get_opt("over")
            .await?
            .filter(|b| b.phase().is_terminal()))
    })
    .await?;
    anyhow::ensure!(
        over.phase() == BackupPhase::Succeeded,
        "over: {:?}",
        over.status
    );
    eprintln!(
        "[backup] a full backup quota held 'over' ({message}); lifted, it went ahead in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
