//! Cold move with the disk copied, side by side, between this machine's libvirt and a second
//! host whose disk directory is its own (`SECOND_HOST_PRIVATE`): a running desktop in a pool
//! without shared storage moved by a Cold `DesktopMigration` (API create → the desktop
//! `Running` on host B) against the same job done by hand on a plain domain made from the same
//! definition: `virsh shutdown` (destroyed after the same 3 s grace the agent gets), `virsh
//! start --paused`, the empty overlay made on host B, `virsh migrate --copy-storage-inc`, then
//! `virsh destroy` and `virsh start` on host B. Both guests wrote the same data into their
//! disk first; rounds are interleaved so both share the noise.

use std::process::Command;
use std::time::{Duration, Instant};

use deskvirt_crds::DesktopMigration;
use deskvirt_crds::desktop::Phase;
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::{eventually, run};
use deskvirt_tests::second_host::SecondHost;
use deskvirt_tests::world::{
    RUN_LABEL, boot_writing, create_pool, guest_writes, pin_cpu_model, setup, virsh_system,
    wait_ready_hosts,
};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use crate::migrate::{booted, end_round, running_guest, start_plain};
use crate::stats::{Samples, secs};

/// The model the pool pins, as the migration benchmark's.
const CPU_MODEL: &str = "Westmere";

/// The shutdown grace both sides get (the tests' agents run with `--shutdown-grace 3s`).
const GRACE: Duration = Duration::from_secs(3);

/// Both series, and what deskvirt's moves sent.
pub struct ColdResult {
    pub deskvirt: Samples,
    pub virsh: Samples,
    /// MiB each guest wrote into its disk before the move.
    pub mib: u64,
    /// Bytes deskvirt's moves report sent (`bytesMoved`).
    pub sent: Vec<u64>,
}

/// Runs `n` interleaved rounds, each guest writing `mib` MiB at boot.
pub async fn run_bench(n: usize, mib: u64) -> anyhow::Result<ColdResult> {
    let host_b: SecondHost;
    let mut w = setup(&format!("cpb-{}", unique_suffix())).await?;
    host_b = SecondHost::start_with_private(
        &format!("dvp{}", unique_suffix()),
        std::slice::from_ref(&w.disk_dir),
    )?;
    // The base image as a file (host B's confined agent does not see the guest's cache).
    let base = w.image_dir.join("base.qcow2");
    let cached = std::fs::canonicalize(&base)?;
    std::fs::remove_file(&base)?;
    std::fs::copy(&cached, &base)?;
    create_pool(&w).await?;
    w.agent = Some(w.spawn_agent(&w.node, &[])?);
    pin_cpu_model(&w, CPU_MODEL).await?;
    w.start_operator()?;
    let node_b = w.add_migration_target(&host_b)?;
    wait_ready_hosts(&w, 2).await?;
    let desktops = w.desktops();
    let migrations: Api<DesktopMigration> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let (mut ours, mut plain, mut sent) = (vec![], vec![], vec![]);
    let octal = "252";
    for i in 0..n {
        let name = format!("cold-{i}");
        let mut extra = boot_writing(mib, octal);
        extra["disk"] = json!({ "image": "base.qcow2", "persistent": true });
        let domain = running_guest(&w, &name, extra).await?;
        let serial = std::path::PathBuf::from(format!("/var/log/libvirt/qemu/{domain}-serial.log"));
        eventually(Duration::from_secs(240), "the guest's write", || async {
            Ok((!guest_writes(&serial)?.is_empty()).then_some(()))
        })
        .await?;
        let xml = virsh_system(&["dumpxml", "--migratable", &domain])?;

        // deskvirt: API create → the desktop Running on host B.
        let m: DesktopMigration = serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopMigration",
            "metadata": { "name": name, "labels": { RUN_LABEL: w.run } },
            "spec": { "desktop": name, "mode": "Cold" },
        }))?;
        let t0 = Instant::now();
        migrations.create(&PostParams::default(), &m).await?;
        eventually(Duration::from_secs(600), "running on host B", || async {
            let d = desktops.get(&name).await?;
            let on_b = d.status.as_ref().is_some_and(|s| {
                s.node.as_deref() == Some(node_b.as_str()) && s.phase == Some(Phase::Running)
            });
            Ok(on_b.then_some(()))
        })
        .await?;
        let took = t0.elapsed();
        ours.push(took);
        let done = migrations.get(&name).await?;
        sent.push(done.status.and_then(|s| s.bytes_moved).unwrap_or(0));

        // By hand: the same definition as a plain domain, booted and written, then moved.
        let plain_name = format!("plain-{}-{i}", w.run);
        // The definition boots with the same write on its command line.
        let (disk, file) = start_plain(&w, &xml, &domain, &plain_name)?;
        let plain_serial = format!("/var/log/libvirt/qemu/{plain_name}-serial.log");
        booted(&plain_serial).await?;
        let plain_log = std::path::PathBuf::from(&plain_serial);
        eventually(
            Duration::from_secs(240),
            "the plain guest's write",
            || async { Ok((!guest_writes(&plain_log)?.is_empty()).then_some(())) },
        )
        .await?;
        let t0 = Instant::now();
        by_hand(&host_b, &plain_name, &disk, &base).await?;
        let by = t0.elapsed();
        plain.push(by);
        eprintln!(
            "[bench] cold copy {i}: deskvirt {}, virsh {}",
            secs(took),
            secs(by)
        );
        let there = host_b
            .private_dir(0)
            .join(disk.file_name().unwrap_or_default());
        end_round(&w, &host_b, &plain_name, &[&there, &disk, &file], &name).await?;
    }
    drop(w);
    drop(host_b);
    Ok(ColdResult {
        deskvirt: Samples::new(ours),
        virsh: Samples::new(plain),
        mib,
        sent,
    })
}

/// The cold move of plain domain `name` (disk `disk`, an overlay of `base`) by hand.
async fn by_hand(
    host_b: &SecondHost,
    name: &str,
    disk: &std::path::Path,
    base: &std::path::Path,
) -> anyhow::Result<()> {
    virsh_system(&["shutdown", name])?;
    let deadline = Instant::now() + GRACE;
    while virsh_system(&["domstate", name])?.trim() != "shut off" {
        if Instant::now() >= deadline {
            virsh_system(&["destroy", name])?;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    virsh_system(&["start", "--paused", name])?;
    let there = host_b
        .private_dir(0)
        .join(disk.file_name().unwrap_or_default());
    run(
        "overlay on host B",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(&there),
    )?;
    let migrate_uri = format!("tcp://{}", host_b.address);
    virsh_system(&[
        "migrate",
        "--live",
        "--p2p",
        "--persistent",
        "--undefinesource",
        "--abort-on-error",
        "--copy-storage-inc",
        name,
        &host_b.uri,
        &migrate_uri,
    ])?;
    host_b.virsh(&["destroy", name])?;
    host_b.virsh(&["start", name])?;
    Ok(())
}

/// The comparison as a markdown section.
pub fn markdown(r: &ColdResult) -> String {
    let ratio = r.deskvirt.p50().as_secs_f64() / r.virsh.p50().as_secs_f64().max(1e-9);
    let sent: Vec<String> = r.sent.iter().map(|b| format!("{} KiB", b >> 10)).collect();
    format!(
        "### Cold move with the disk copied, 128 MiB guest that wrote {} MiB, host A → host B \
         (no shared storage; N={} each, interleaved)\n\n\
         | | p50 | max |\n|---|---|---|\n\
         | by hand: `virsh shutdown` (3 s grace), `start --paused`, overlay on B, `virsh migrate \
         --copy-storage-inc`, `destroy` + `start` on B | {} | {} |\n\
         | deskvirt Cold `DesktopMigration` create → desktop `Running` on B | {} | {} |\n\n\
         Ratio of the medians (deskvirt / by hand): **{ratio:.2}×**. deskvirt's `bytesMoved`: {}.\n",
        r.mib,
        r.deskvirt.len(),
        secs(r.virsh.p50()),
        secs(r.virsh.max()),
        secs(r.deskvirt.p50()),
        secs(r.deskvirt.max()),
        sent.join(", ")
    )
}
