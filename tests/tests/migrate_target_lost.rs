//! A migration whose target host is lost mid-move, end to end: the operator, two node-agents,
//! two libvirt hosts (this machine's qemu:///system and a `scripts/second-host.sh` libvirtd),
//! real QEMU (TCG), a pool with shared storage whose moves are capped at 2 MiB/s (so a 128 MiB
//! guest takes about a minute to move). While `mover` moves to host B, host B's libvirtd is
//! killed (SIGKILL). The move ends with the error libvirt reports, the migration is `Failed`
//! (`HostFailed`), and the desktop runs on at host A, bound there: the domain's QEMU processes
//! are watched on both hosts throughout (by process, since host B's libvirt no longer
//! answers): the source's never goes, and no copy is left on B.
//!
//! Run: `cargo test -p deskvirt-tests --test migrate_target_lost -- --nocapture`.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::DesktopMigration;
use deskvirt_crds::conditions::find;
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::migration::{MigrationPhase, MigrationState};
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::eventually;
use deskvirt_tests::second_host::SecondHost;
use deskvirt_tests::world::{
    create_pool, domain_of, guest_in_phase, migration_request, patch_pool, setup, virsh_system,
    wait_ready_hosts,
};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

/// PIDs of the QEMU processes running domain `domain` (its `-name guest=<domain>` argument),
/// on either host: they share this machine's process table.
fn qemu_pids(domain: &str) -> anyhow::Result<Vec<u32>> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("guest={domain},")])
        .output()
        .context("pgrep")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// The network namespace a process runs in (its `/proc/<pid>/ns/net` link).
fn net_ns(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|p| p.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_lost_mid_move_leaves_the_desktop_running_at_the_source() -> anyhow::Result<()> {
    let started = Instant::now();
    let host_b = SecondHost::start(&format!("dvt{}", unique_suffix()))?;
    let mut w = setup(&format!("miglost-{}", unique_suffix())).await?;
    create_pool(&w).await?;
    patch_pool(
        &w,
        json!({ "storage": { "shared": true },
                "migration": { "bandwidthMiBPerSecond": 2, "completionTimeout": "10m",
                               "autoConverge": false } }),
    )
    .await?;
    w.agent = Some(w.spawn_agent(&w.node, &[])?);
    w.start_operator()?;
    let desktops = w.desktops();
    let migrations: Api<DesktopMigration> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let host_a = w.node.clone();
    guest_in_phase(&w, "mover", json!({}), Phase::Running).await?;
    w.add_migration_target(&host_b)?;
    wait_ready_hosts(&w, 2).await?;
    let domain = domain_of(&desktops, &w.user_ns.name, "mover").await?;
    let here = net_ns(std::process::id()).context("no network namespace")?;

    // The domain's QEMU counted on each host (by network namespace) throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (stop, domain, here) = (stop.clone(), domain.clone(), here.clone());
        std::thread::spawn(move || -> anyhow::Result<(u32, u32, u32)> {
            let (mut polls, mut both, mut gone_from_a) = (0, 0, 0);
            while !stop.load(Ordering::Relaxed) {
                let pids = qemu_pids(&domain)?;
                let on_a = pids.iter().any(|p| net_ns(*p).as_deref() == Some(&here));
                let on_b = pids.iter().any(|p| net_ns(*p).is_some_and(|ns| ns != here));
                // A paused incoming QEMU on B is expected while the move runs (counted); the
                // source's QEMU must never go.
                if on_a && on_b {
                    both += 1;
                }
                if !on_a {
                    gone_from_a += 1;
                }
                polls += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok((polls, both, gone_from_a))
        })
    };

    migrations
        .create(
            &PostParams::default(),
            &migration_request(&w, "lost", "mover", None)?,
        )
        .await?;
    eventually(Duration::from_secs(60), "the move started", || async {
        let started = desktops
            .get("mover")
            .await?
            .status
            .and_then(|s| s.migration_report)
            .is_some_and(|r| r.state == MigrationState::Started);
        Ok(started.then_some(()))
    })
    .await?;
    // A few seconds into the move, host B's libvirtd dies.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = std::fs::read_to_string(host_b.dir.join("libvirtd.pid"))?
        .trim()
        .to_string();
    let t0 = Instant::now();
    deskvirt_tests::host::run(
        "kill host B's libvirtd",
        Command::new("kill").args(["-KILL", &pid]),
    )?;
    let ended = eventually(Duration::from_secs(180), "the migration ended", || async {
        let m = migrations.get("lost").await?;
        Ok(m.phase().is_terminal().then_some(m))
    })
    .await?;
    let took = t0.elapsed();
    let (reason, message) = ended
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, "Ready"))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default();
    eprintln!(
        "[lost] the migration ended {:?} {:.1}s after host B's libvirtd died: {reason}: {message}",
        ended.phase(),
        took.as_secs_f64()
    );
    anyhow::ensure!(
        ended.phase() == MigrationPhase::Failed
            && reason == "HostFailed"
            && message.contains("target host's libvirt"),
        "{:?}: {reason}: {message}",
        ended.phase()
    );
    // The desktop runs on at A, bound there, and B holds no copy of it.
    let d = desktops.get("mover").await?;
    let st = d.status.clone().unwrap_or_default();
    anyhow::ensure!(
        st.node.as_deref() == Some(host_a.as_str()) && st.phase == Some(Phase::Running),
        "{st:?}"
    );
    anyhow::ensure!(
        virsh_system(&["domstate", &domain])?.trim() == "running",
        "mover does not run on A"
    );
    eventually(
        Duration::from_secs(30),
        "no copy of mover left on B",
        || async {
            let pids = qemu_pids(&domain)?;
            let on_b = pids.iter().any(|p| net_ns(*p).is_some_and(|ns| ns != here));
            Ok((!on_b).then_some(()))
        },
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    let (polls, overlaps, gone_from_a) = poller
        .join()
        .map_err(|_| anyhow::anyhow!("the poller panicked"))??;
    anyhow::ensure!(
        gone_from_a == 0,
        "mover's QEMU was gone from A in {gone_from_a} of {polls} polls"
    );
    eprintln!(
        "[lost] {polls} polls; the incoming (paused) copy on B existed in {overlaps} of them; \
         whole test {:.1}s",
        started.elapsed().as_secs_f64()
    );
    drop(w);
    Ok(())
}
