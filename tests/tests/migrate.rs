//! A running desktop moves live to another host, end to end: the operator, two node-agents on
//! two independent libvirt hosts (host A is this machine's qemu:///system, host B a second
//! libvirtd in its own network and mount namespaces, see `scripts/second-host.sh`, its agent
//! confined to what the chart's DaemonSet mounts), real QEMU (TCG), the real apiserver, and a
//! pool whose disk directory is the same directory for both hosts (`storage.shared`).
//! - a move the pool caps at 1 MiB/s with a 5 s completion timeout is aborted: the migration
//!   is Failed (HostFailed, naming the timeout), the desktop runs on at A, B has nothing of it;
//! - a move deleted while the domain moves (capped so that it would take minutes) is aborted:
//!   the migration goes at once, the desktop runs on at A;
//! - host A's agent killed while a capped move runs: the restarted agent ends the move once it
//!   outlived the completion timeout (and a grace), or finds it ended; Failed, the desktop runs
//!   on at A;
//! - host A's agent runs without `--migration-uri`: a migration to it waits with `NoTarget`,
//!   naming the flag;
//! - `mover` runs on host A with a SPICE client connected; a `DesktopMigration` moves it to
//!   host B: Scheduling, Running, Succeeded with its downtime; the Desktop is bound to host B
//!   (node, label, port, `lastMove`) with its MAC and disk file; the guest keeps counting its
//!   uptime (it was not rebooted); the SPICE client was told of host B, and host B's console
//!   takes the password; host A has nothing of it left and never started it again; host B's
//!   subnet being another, the guest's DHCP client takes B's address after B cycles its link;
//! - a second migration back to host A waits (`NoTarget`: A takes in no migrations) and is
//!   cancelled by deleting it, which frees what it held;
//! - a Cold migration back to host A (which takes in no live ones) shuts `mover` down on B and
//!   boots it on A on the same disk;
//! - deleting `mover` removes its disk.
//!
//! Both libvirtds are polled every 100 ms from the first move to the last: `mover` never runs
//! on both hosts at once.
//! The pool pins a CPU model (`spec.cpu.model`) that both agents report usable: `mover` runs
//! with it on host A and, after the move, on host B.
//!
//! Run: `cargo test -p deskvirt-tests --test migrate -- --nocapture`.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::{LABEL_NODE, condition};
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::migration::MigrationPhase;
use deskvirt_crds::{Desktop, DesktopMigration};
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::eventually;
use deskvirt_tests::images::{create_image, ready, sha256, wait_image};
use deskvirt_tests::origin::Origin;
use deskvirt_tests::second_host::{BothWatch, SecondHost};
use deskvirt_tests::spice::{self, LinkOutcome};
use deskvirt_tests::world::{
    World, console_password, create_pool, disk_of, domain_of, events, guest_addresses,
    guest_in_phase, guest_uptimes, migration_request, patch_pool, pin_cpu_model, setup, spice_addr,
    virsh_system, wait_ready_hosts,
};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

/// The model the pool pins: one of QEMU's named models that TCG emulates on any host.
const CPU_MODEL: &str = "Westmere";

fn status_of(d: &Desktop) -> deskvirt_crds::desktop::DesktopStatus {
    d.status.clone().unwrap_or_default()
}

fn ready_reason(m: &DesktopMigration) -> Option<(String, String)> {
    let st = m.status.as_ref()?;
    find(&st.conditions, condition::READY).map(|c| (c.reason.clone(), c.message.clone()))
}

/// Caps the pool's moves at 1 MiB/s, without auto-converge, with this completion timeout: a
/// move of the test's guest then takes far longer than the timeout.
async fn cap_moves(w: &World, completion_timeout: &str) -> anyhow::Result<()> {
    let spec = json!({ "migration": { "bandwidthMiBPerSecond": 1,
                                      "completionTimeout": completion_timeout,
                                      "autoConverge": false } });
    patch_pool(w, spec).await
}

/// Requests migration `name` of `mover` to any host, and waits until its domain moves.
async fn start_moving(
    w: &World,
    migrations: &Api<DesktopMigration>,
    name: &str,
) -> anyhow::Result<()> {
    migrations
        .create(
            &PostParams::default(),
            &migration_request(w, name, "mover", None)?,
        )
        .await?;
    eventually(
        Duration::from_secs(60),
        &format!("{name} moving"),
        || async {
            let m = migrations.get(name).await?;
            Ok((m.phase() == MigrationPhase::Running).then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_desktop_moves_live_to_another_host() -> anyhow::Result<()> {
    // Host B first, so that it goes last: the World's desktops are deleted while its agent runs.
    let started = Instant::now();
    let host_b = Arc::new(SecondHost::start(&format!("dvl{}", unique_suffix()))?);
    let mut w = setup(&format!("mig-{}", unique_suffix())).await?;
    create_pool(&w).await?;
    patch_pool(&w, json!({ "storage": { "shared": true } })).await?;
    w.agent = Some(w.spawn_agent(&w.node, &[])?);
    // The pool pins a CPU model host A's agent reports usable, so the desktop sees the same
    // CPU on both hosts (under TCG both offer QEMU's emulated models).
    pin_cpu_model(&w, CPU_MODEL).await?;
    w.start_operator()?;
    let desktops = w.desktops();
    let migrations: Api<DesktopMigration> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let host_a = w.node.clone();

    // The guest takes its address by DHCP, and again when its carrier comes back.
    let dhcp = json!({ "boot": { "kernel": "vmlinuz", "initrd": "initrd.img",
                                 "cmdline": "console=ttyS0 deskvirt.dhcp" } });
    guest_in_phase(&w, "mover", dhcp, Phase::Running).await?;
    // Host B joins, taking in migrations on its libvirt as host A's libvirtd reaches it.
    let node_b = w.add_migration_target(&host_b)?;
    wait_ready_hosts(&w, 2).await?;
    eprintln!(
        "[migrate] both hosts up, mover running: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // A DesktopImage of this pool, whose hosts share their image directory: one host (the
    // pool's writer) downloads it, the other checks the file it put there.
    let origin = Origin::start(w.guest_dir.clone()).await?;
    let sum = sha256(&w.guest_dir.join("base.qcow2"))?;
    create_image(&w, &w.images_ns, "shared", &origin.url("base.qcow2"), &sum).await?;
    let image = wait_image(&w, &w.images_ns, "shared", "shared Ready on 2/2", |i| {
        ready(i) == Some(("True".into(), "Distributed".into()))
            && i.status.as_ref().and_then(|s| s.hosts.as_deref()) == Some("2/2")
    })
    .await?;
    let writers = image.status.map(|s| s.writers).unwrap_or_default();
    anyhow::ensure!(
        writers.len() == 1 && [&host_a, &node_b].contains(&&writers[0].node),
        "one writer of the shared pool: {writers:?}"
    );
    anyhow::ensure!(
        origin.requests("base.qcow2") == 1,
        "the shared copy is fetched once: {} requests",
        origin.requests("base.qcow2")
    );
    eprintln!(
        "[migrate] shared image Ready on 2/2 with one download (by {}): {:.1}s",
        writers[0].node,
        started.elapsed().as_secs_f64()
    );
    let before = status_of(&desktops.get("mover").await?);
    anyhow::ensure!(
        before.node.as_deref() == Some(host_a.as_str()),
        "{:?}",
        before.node
    );
    let mac = before.mac.clone().context("no MAC")?;
    let port_a = before
        .spice
        .as_ref()
        .and_then(|s| s.port)
        .context("no port")?;
    let domain = domain_of(&desktops, &w.user_ns.name, "mover").await?;
    // Both libvirtds polled throughout every step: the domain never runs on both.
    let watch = BothWatch::start(host_b.clone(), vec![domain.clone()]);
    let pinned = format!("<model fallback='forbid'>{CPU_MODEL}</model>");
    anyhow::ensure!(
        virsh_system(&["dumpxml", &domain])?.contains(&pinned),
        "mover on host A does not run the pool's CPU model"
    );
    let disk = disk_of(&virsh_system(&["domblklist", &domain])?)?;
    let inode = std::fs::metadata(&disk)?.ino();
    let serial_a = PathBuf::from(format!("/var/log/libvirt/qemu/{domain}-serial.log"));
    let ip_a = before.ip.clone().context("no address on A")?;
    eventually(
        Duration::from_secs(120),
        "the guest's address on A",
        || async { Ok(guest_addresses(&serial_a)?.contains(&ip_a).then_some(())) },
    )
    .await?;
    let uptime_before = eventually(
        Duration::from_secs(120),
        "the guest's uptime on A",
        || async { Ok(guest_uptimes(&serial_a)?.last().copied()) },
    )
    .await?;

    // A move the pool caps at 1 MiB/s cannot finish within a 5 s completion timeout: it is
    // aborted and fails with the host's reason; the desktop runs on at A, and host B never
    // runs it.
    cap_moves(&w, "5s").await?;
    migrations
        .create(
            &PostParams::default(),
            &migration_request(&w, "capped", "mover", None)?,
        )
        .await?;
    let capped = eventually(Duration::from_secs(120), "capped ended", || async {
        let m = migrations.get("capped").await?;
        Ok(m.phase().is_terminal().then_some(m))
    })
    .await?;
    let (reason, message) = ready_reason(&capped).unwrap_or_default();
    anyhow::ensure!(
        capped.phase() == MigrationPhase::Failed
            && reason == "HostFailed"
            && message.contains("completion timeout (5s)"),
        "capped ended {:?}: {reason}: {message}",
        capped.phase()
    );
    eprintln!("[migrate] capped: {reason}: {message}");
    let still = status_of(&desktops.get("mover").await?);
    anyhow::ensure!(
        still.node.as_deref() == Some(host_a.as_str()) && still.phase == Some(Phase::Running),
        "{still:?}"
    );
    anyhow::ensure!(
        virsh_system(&["domstate", &domain])?.trim() == "running",
        "mover does not run on A after the aborted move"
    );
    anyhow::ensure!(
        !host_b.has_domain(&domain)?,
        "host B kept the aborted move's domain"
    );
    // Deleting a migration while the domain moves aborts the move: a move capped so that it
    // would take minutes is cancelled, and the desktop runs on at A.
    cap_moves(&w, "10m").await?;
    start_moving(&w, &migrations, "cancelled").await?;
    let t_cancel = Instant::now();
    migrations
        .delete("cancelled", &DeleteParams::default())
        .await?;
    eventually(Duration::from_secs(60), "cancelled gone", || async {
        Ok(migrations
            .get_opt("cancelled")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    eprintln!(
        "[migrate] a running move cancelled in {:.1}s",
        t_cancel.elapsed().as_secs_f64()
    );
    let still = status_of(&desktops.get("mover").await?);
    anyhow::ensure!(
        still.node.as_deref() == Some(host_a.as_str()) && still.migration.is_none(),
        "{still:?}"
    );
    anyhow::ensure!(
        virsh_system(&["domstate", &domain])?.trim() == "running",
        "mover does not run on A after the cancelled move"
    );
    anyhow::ensure!(
        !host_b.has_domain(&domain)?,
        "host B kept the cancelled move's domain"
    );
    // Host A's agent is killed while a capped move runs, and started again: the new agent finds
    // the move under way and, once it outlived the pool's completion timeout (20 s: long
    // enough that the move is seen moving before it times out) by the grace (30 s), ends it,
    // or finds it ended with the old agent's connection; either way the migration is Failed
    // and the desktop runs on at A.
    cap_moves(&w, "20s").await?;
    start_moving(&w, &migrations, "orphaned").await?;
    if let Some(mut agent) = w.agent.take() {
        agent.kill()?;
    }
    w.agent = Some(w.spawn_agent(&w.node, &[])?);
    let t_orphan = Instant::now();
    let orphaned = eventually(Duration::from_secs(120), "orphaned ended", || async {
        let m = migrations.get("orphaned").await?;
        Ok(m.phase().is_terminal().then_some(m))
    })
    .await?;
    let (reason, message) = ready_reason(&orphaned).unwrap_or_default();
    anyhow::ensure!(
        orphaned.phase() == MigrationPhase::Failed && reason == "HostFailed",
        "orphaned ended {:?}: {reason}: {message}",
        orphaned.phase()
    );
    eprintln!(
        "[migrate] a move the restarted agent found past its timeout ended {:.1}s after the restart: {message}",
        t_orphan.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        virsh_system(&["domstate", &domain])?.trim() == "running",
        "mover does not run on A after the orphaned move"
    );
    anyhow::ensure!(
        !host_b.has_domain(&domain)?,
        "host B kept the orphaned move's domain"
    );
    patch_pool(&w, json!({ "migration": null })).await?;

    // A SPICE client stays connected on host A through the move.
    let (password, _) = console_password(&w, "mover").await?;
    let mover = desktops.get("mover").await?;
    let mut client = spice::hold(spice_addr(&mover)?, &password)
        .await?
        .context("the console on host A refused the password")?;

    // Live: Scheduling → Running → Succeeded.
    let t0 = Instant::now();
    migrations
        .create(
            &PostParams::default(),
            &migration_request(&w, "to-b", "mover", None)?,
        )
        .await?;
    let done = eventually(Duration::from_secs(180), "to-b ended", || async {
        let m = migrations.get("to-b").await?;
        Ok(m.phase().is_terminal().then_some(m))
    })
    .await;
    let done = match done {
        Ok(m) => m,
        Err(e) => {
            let m = migrations.get("to-b").await?;
            let d = desktops.get("mover").await?;
            return Err(e.context(format!(
                "migration: {:#?}\ndesktop status: {:#?}",
                m.status, d.status
            )));
        }
    };
    let took = t0.elapsed();
    let st = done.status.clone().unwrap_or_default();
    anyhow::ensure!(
        done.phase() == MigrationPhase::Succeeded,
        "to-b ended {:?}: {:?}",
        done.phase(),
        ready_reason(&done)
    );
    anyhow::ensure!(
        st.source.as_deref() == Some(host_a.as_str())
            && st.target.as_deref() == Some(node_b.as_str()),
        "{st:?}"
    );
    let report = status_of(&desktops.get("mover").await?).migration_report;
    let downtime = st
        .downtime_millis
        .with_context(|| format!("no downtime figure: {st:#?}\nreport: {report:#?}"))?;
    eprintln!(
        "[migrate] to-b Succeeded in {:.1}s (host: {} ms total, {downtime} ms paused, {} MiB): {:?}",
        took.as_secs_f64(),
        st.total_millis.unwrap_or(0),
        st.bytes_moved.unwrap_or(0) >> 20,
        ready_reason(&done).map(|r| r.1)
    );
    anyhow::ensure!(downtime < 10_000, "paused {downtime} ms");

    // The Desktop is bound to host B: node, label, port, lastMove; MAC and disk unchanged.
    let moved = eventually(Duration::from_secs(30), "mover Running on B", || async {
        let d = desktops.get("mover").await?;
        let s = status_of(&d);
        let ok = s.node.as_deref() == Some(node_b.as_str())
            && s.phase == Some(Phase::Running)
            && s.migration.is_none()
            && s.spice.as_ref().and_then(|p| p.host.as_deref()) == Some(host_b.address.as_str());
        Ok(ok.then_some(d))
    })
    .await?;
    let ms = status_of(&moved);
    anyhow::ensure!(moved.labels().get(LABEL_NODE) == Some(&node_b), "label");
    let last = ms.last_move.clone().context("no lastMove")?;
    anyhow::ensure!(last.from == host_a && last.to == node_b, "{last:?}");
    anyhow::ensure!(ms.mac.as_deref() == Some(mac.as_str()), "MAC changed");
    let port_b = ms
        .spice
        .as_ref()
        .and_then(|s| s.port)
        .context("no port on B")?;
    anyhow::ensure!(st.target_port == Some(port_b), "port {port_b} vs {st:?}");
    eprintln!("[migrate] SPICE port {port_a} on A, {port_b} on B");
    anyhow::ensure!(
        host_b.virsh(&["domstate", &domain])?.trim() == "running",
        "not running on host B"
    );
    let disk_b = disk_of(&host_b.virsh(&["domblklist", &domain])?)?;
    anyhow::ensure!(
        disk_b == disk && std::fs::metadata(&disk_b)?.ino() == inode,
        "host B runs {disk_b:?}"
    );
    anyhow::ensure!(
        host_b
            .virsh(&["dominfo", &domain])?
            .contains("Persistent:     yes"),
        "not persistent on host B"
    );
    anyhow::ensure!(
        host_b.virsh(&["dumpxml", &domain])?.contains(&pinned),
        "mover on host B does not run the pool's CPU model"
    );
    let names = virsh_system(&["list", "--all", "--name"])?;
    anyhow::ensure!(
        !names.lines().any(|n| n.trim() == domain),
        "host A still has {domain}"
    );

    // The guest was not rebooted: its uptime goes on on B's serial log.
    let serial_b = host_b.qemu_log_dir().join(format!("{domain}-serial.log"));
    let after = eventually(
        Duration::from_secs(60),
        "the guest's uptime on B",
        || async {
            Ok(guest_uptimes(&serial_b)?
                .into_iter()
                .find(|u| *u > uptime_before))
        },
    )
    .await
    .context("the guest on B did not go on counting (rebooted?)")?;
    eprintln!("[migrate] guest uptime {uptime_before}s on A, then {after}s on B");

    // Host B's subnet of the nat network is not A's: B pins the guest another address and
    // cycles its link, and the guest's DHCP client takes that address.
    let ip_b = eventually(Duration::from_secs(60), "mover's address on B", || async {
        let ip = status_of(&desktops.get("mover").await?).ip;
        Ok(ip.filter(|ip| *ip != ip_a))
    })
    .await?;
    eventually(
        Duration::from_secs(60),
        "the guest's address on B",
        || async { Ok(guest_addresses(&serial_b)?.contains(&ip_b).then_some(())) },
    )
    .await
    .context("the guest did not take host B's address")?;
    eprintln!("[migrate] guest address {ip_a} on A, then {ip_b} on B");

    // The SPICE client on A was told of host B; B's console takes the password.
    anyhow::ensure!(
        spice::told_of(&mut client, &host_b.address).await,
        "the SPICE client was not told of host B"
    );
    match spice::link(spice_addr(&moved)?, &password).await {
        Ok(LinkOutcome::Accepted { .. }) => {}
        other => anyhow::bail!("the console on host B: {other:?}"),
    }
    let reasons: Vec<String> = events(&w, "mover")
        .await?
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    anyhow::ensure!(
        reasons.iter().any(|r| r == "Migrated") && reasons.iter().any(|r| r == "AddressChanged"),
        "no Migrated or AddressChanged Event: {reasons:?}"
    );
    // Three failures only: the capped move's, the cancelled one's and the orphaned one's.
    anyhow::ensure!(
        reasons.iter().filter(|r| *r == "MigrationFailed").count() == 3,
        "{reasons:?}"
    );

    // Back to A: A takes in no migrations, so it waits and says why; deleting it cancels it.
    migrations
        .create(
            &PostParams::default(),
            &migration_request(&w, "to-a", "mover", Some(&host_a))?,
        )
        .await?;
    let waiting = eventually(Duration::from_secs(30), "to-a waits", || async {
        let m = migrations.get("to-a").await?;
        Ok(ready_reason(&m).filter(|(r, _)| r == "NoTarget"))
    })
    .await?;
    anyhow::ensure!(waiting.1.contains("--migration-uri"), "{waiting:?}");
    migrations.delete("to-a", &DeleteParams::default()).await?;
    eventually(Duration::from_secs(30), "to-a gone", || async {
        Ok(migrations.get_opt("to-a").await?.is_none().then_some(()))
    })
    .await?;
    anyhow::ensure!(
        host_b.virsh(&["domstate", &domain])?.trim() == "running",
        "mover stopped on host B"
    );

    // Cold back to A: shut down on B, booted on A (a Cold move needs no --migration-uri on
    // the target), on the same disk; B keeps nothing of it.
    let mut cold = migration_request(&w, "cold-a", "mover", Some(&host_a))?;
    cold.spec.mode = deskvirt_crds::migration::MigrationMode::Cold;
    let t_cold = Instant::now();
    migrations.create(&PostParams::default(), &cold).await?;
    let cold = eventually(Duration::from_secs(120), "cold-a ended", || async {
        let m = migrations.get("cold-a").await?;
        Ok(m.phase().is_terminal().then_some(m))
    })
    .await?;
    anyhow::ensure!(
        cold.phase() == MigrationPhase::Succeeded,
        "cold-a ended {:?}: {:?}",
        cold.phase(),
        ready_reason(&cold)
    );
    eventually(Duration::from_secs(120), "mover Running on A", || async {
        let s = status_of(&desktops.get("mover").await?);
        Ok(
            (s.node.as_deref() == Some(host_a.as_str()) && s.phase == Some(Phase::Running))
                .then_some(()),
        )
    })
    .await?;
    let cs = cold.status.clone().unwrap_or_default();
    eprintln!(
        "[migrate] cold back to A: Running there {:.1}s after the request (stopped on B in {:?} ms)",
        t_cold.elapsed().as_secs_f64(),
        cs.total_millis
    );
    anyhow::ensure!(
        virsh_system(&["domstate", &domain])?.trim() == "running",
        "mover does not run on A after the cold move"
    );
    let disk_a = disk_of(&virsh_system(&["domblklist", &domain])?)?;
    anyhow::ensure!(
        disk_a == disk && std::fs::metadata(&disk_a)?.ino() == inode,
        "host A runs {disk_a:?} after the cold move"
    );
    anyhow::ensure!(
        !host_b.has_domain(&domain)?,
        "host B kept the domain after the cold move"
    );

    let polls = watch.finish()?;
    eprintln!("[migrate] never running on both hosts: {polls} polls of both");

    // Deleting `mover` goes through host A, which removes the disk.
    migrations.delete("to-b", &DeleteParams::default()).await?;
    migrations
        .delete("cold-a", &DeleteParams::default())
        .await?;
    desktops.delete("mover", &DeleteParams::default()).await?;
    eventually(Duration::from_secs(90), "mover deleted", || async {
        Ok(desktops.get_opt("mover").await?.is_none().then_some(()))
    })
    .await?;
    anyhow::ensure!(!disk.exists(), "the disk outlived the desktop");
    anyhow::ensure!(!host_b.has_domain(&domain)?, "host B kept the domain");
    eprintln!(
        "[migrate] whole test {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
