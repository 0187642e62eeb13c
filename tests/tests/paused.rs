//! A desktop whose host disk fills up, end to end: the chart's operator, a node-agent on this
//! machine's libvirt, real QEMU (TCG) and the real apiserver. The pool's disk directory is a
//! small tmpfs, nearly filled by a file of the test's.
//! - `writer`'s guest writes 24 MiB over its disk at boot; its overlay cannot grow, so QEMU
//!   pauses it (`IOERROR`, QEMU's default `werror=enospc`);
//! - the Desktop says so: `Running=False` reason `Paused` with a message that names the I/O
//!   error and the agent's resumes, `Ready=False` reason `Paused`;
//! - the test's file is deleted: within the agent's resume interval (30 s) plus a resync, the
//!   guest runs on, the write finishes (the guest prints `DESKVIRT-GUEST-WROTE`), the Desktop
//!   says `Running=True`, and the guest was never restarted (its uptime goes on, same QEMU PID).
//!
//! Run: `cargo test -p deskvirt-tests --test paused -- --nocapture`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::Desktop;
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::condition::{READY, RUNNING};
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::eventually;
use deskvirt_tests::world::{
    create_pool, domain_of, guest_desktop, guest_uptimes, guest_writes, setup, virsh_system,
};
use kube::api::PostParams;
use serde_json::json;

/// The tmpfs the pool's disks live on.
const FS_MIB: u64 = 32;
/// What the guest writes over its disk.
const WRITE_MIB: u64 = 24;
/// Room left beside the filler file: the overlay's metadata and the first MiBs of the write.
const ROOM_MIB: u64 = 3;

/// A tmpfs mounted at `path` for the test's life; unmounted (lazily, should QEMU still hold a
/// file) and removed when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: PathBuf, mib: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&path)?;
        deskvirt_tests::host::run(
            "mount tmpfs",
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0755")])
                .arg("tmpfs")
                .arg(&path),
        )?;
        Ok(Self { path })
    }

    /// Free bytes on it.
    fn free(&self) -> anyhow::Result<u64> {
        let out = deskvirt_tests::host::run(
            "df",
            Command::new("df")
                .args(["--output=avail", "-B1"])
                .arg(&self.path),
        )?;
        out.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .context("df printed no free size")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Fills `dir` with one file of `bytes` zeroes (written, not sparse: tmpfs counts it).
fn fill(file: &Path, bytes: u64) -> anyhow::Result<()> {
    deskvirt_tests::host::run(
        "fill the disk directory",
        Command::new("dd")
            .args(["if=/dev/zero", "bs=64K", "status=none"])
            .arg(format!("of={}", file.display()))
            .arg(format!("count={}", bytes / (64 << 10))),
    )?;
    Ok(())
}

/// `(status, reason, message)` of condition `type_`.
fn condition_of(d: &Desktop, type_: &str) -> Option<(String, String, String)> {
    let st = d.status.as_ref()?;
    find(&st.conditions, type_).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// QEMU's PID of `domain` on this machine's libvirt.
fn qemu_pid(domain: &str) -> anyhow::Result<u32> {
    let file = format!("/run/libvirt/qemu/{domain}.pid");
    std::fs::read_to_string(&file)
        .with_context(|| file.clone())?
        .trim()
        .parse()
        .with_context(|| file.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_host_disk_pauses_a_desktop_and_it_runs_on_once_there_is_room() -> anyhow::Result<()>
{
    let started = Instant::now();
    // Mounted first, so that it goes last: the World's desktops and disks go while it is there.
    let suffix = unique_suffix();
    let fs = Tmpfs::mount(
        std::env::temp_dir().join(format!("deskvirt-paused-{suffix}")),
        FS_MIB,
    )?;
    let mut w = setup(&format!("paused-{suffix}")).await?;
    w.disk_dir = fs.path.join("disks");
    std::fs::create_dir_all(&w.disk_dir)?;
    create_pool(&w).await?;
    w.start_agent()?;
    w.start_operator()?;
    let filler = fs.path.join("filler");
    fill(&filler, fs.free()?.saturating_sub(ROOM_MIB << 20))?;
    eprintln!(
        "[paused] world up, {} KiB free on the disk directory: {:.1}s",
        fs.free()? >> 10,
        started.elapsed().as_secs_f64()
    );

    let desktops = w.desktops();
    let writer = guest_desktop(
        &w,
        "writer",
        "128Mi",
        json!({ "boot": { "kernel": "vmlinuz", "initrd": "initrd.img",
                          "cmdline": format!("console=ttyS0 deskvirt.write={WRITE_MIB}") } }),
    )?;
    desktops.create(&PostParams::default(), &writer).await?;
    let created = Instant::now();

    // The write fills the directory: QEMU pauses the guest and the Desktop says why.
    let (_, _, message) = eventually(
        Duration::from_secs(240),
        "writer: Running=False Paused",
        || async {
            let d = desktops.get("writer").await?;
            Ok(condition_of(&d, RUNNING).filter(|(s, r, _)| s == "False" && r == "Paused"))
        },
    )
    .await?;
    eprintln!(
        "[paused] writer paused and reported {:.1}s after it was created: {message}",
        created.elapsed().as_secs_f64()
    );
    anyhow::ensure!(message.contains("I/O error"), "{message}");
    let domain = domain_of(&desktops, &w.user_ns.name, "writer").await?;
    let state = virsh_system(&["domstate", "--reason", &domain])?;
    anyhow::ensure!(state.contains("paused (I/O error)"), "{state}");
    let ready = eventually(Duration::from_secs(30), "writer: Ready=False", || async {
        let d = desktops.get("writer").await?;
        Ok(condition_of(&d, READY).filter(|(s, _, _)| s == "False"))
    })
    .await?;
    anyhow::ensure!(ready.1 == "Paused", "Ready: {ready:?}");
    let pid = qemu_pid(&domain)?;
    let serial = PathBuf::from(format!("/var/log/libvirt/qemu/{domain}-serial.log"));
    let before = guest_uptimes(&serial)?.last().copied().unwrap_or_default();
    anyhow::ensure!(
        guest_writes(&serial)?.is_empty(),
        "the write finished on a full disk"
    );

    // Room again: the agent's next resume lets the guest run on and finish its write.
    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    eventually(
        Duration::from_secs(60),
        "the guest's write to finish",
        || async { Ok((!guest_writes(&serial)?.is_empty()).then_some(())) },
    )
    .await?;
    let wrote = freed.elapsed();
    eventually(Duration::from_secs(30), "writer: Running=True", || async {
        let d = desktops.get("writer").await?;
        Ok(condition_of(&d, RUNNING).filter(|(s, _, _)| s == "True"))
    })
    .await?;
    let after = eventually(
        Duration::from_secs(30),
        "a guest uptime after the resume",
        || async { Ok(guest_uptimes(&serial)?.into_iter().find(|u| *u > before)) },
    )
    .await?;
    anyhow::ensure!(qemu_pid(&domain)? == pid, "QEMU was restarted");
    eprintln!(
        "[paused] room made: the write finished {:.1}s later, Running=True {:.1}s later; guest \
         uptime {before:.1}s → {after:.1}s (same QEMU PID {pid}); whole test {:.1}s",
        wrote.as_secs_f64(),
        freed.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
