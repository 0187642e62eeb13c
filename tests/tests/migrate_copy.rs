//! A running desktop moves Cold to a host that does not share its storage, end to end: the
//! operator, two node-agents on two independent libvirt hosts (host A is this machine's
//! qemu:///system; host B a second libvirtd in its own namespaces whose view of the pool's
//! diskDir is its own empty directory, `SECOND_HOST_PRIVATE`, and whose agent is confined to
//! what the chart's DaemonSet mounts, that directory included), real QEMU (TCG), the real
//! apiserver, and a pool without `storage.shared`.
//! - a Live move is refused at once (Failed, `StorageNotShared`, naming the field);
//! - a Cold move to a host where a file of the disk's name is already there is refused before
//!   the desktop is stopped (Failed, `TargetNotPrepared`, naming the file); the file is not
//!   touched, the desktop runs on at A;
//! - a Cold move after the guest wrote 2 MiB of 0x55 at 24 MiB: host B makes the empty overlay
//!   first, host A shuts the guest down, copies the disk's own layer (not the base image) with
//!   libvirt's incremental storage copy and deletes its disk; the desktop is bound to host B and
//!   boots there from the copied disk, which reads the guest's bytes and is an overlay of the
//!   base image; host B keeps no marker;
//! - `parked`, powered off on host A with 1 MiB of 0x66 written into its disk, is moved by a
//!   drain of host A: the drain makes a Cold migration for it (a stopped desktop moves with its
//!   disk when the hosts share no storage), the disk arrives on host B with the bytes, the
//!   domain is defined there and stays off, and host A says `Drained=True`;
//! - deleting the desktops removes their disks on host B.
//!
//! Both libvirtds are polled every 100 ms from the first move to the last: the desktop never
//! runs on both hosts at once.
//!
//! Run: `cargo test -p deskvirt-tests --test migrate_copy -- --nocapture`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deskvirt_crds::conditions::find;
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::migration::MigrationPhase;
use deskvirt_crds::{Desktop, DesktopMigration, DomainNode};
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::eventually;
use deskvirt_tests::moves::{ended, ensure_succeeded, guest_wrote_into, holds, ready_reason};
use deskvirt_tests::second_host::{BothWatch, SecondHost};
use deskvirt_tests::world::{
    World, create_pool, domain_of, guest_in_phase, migration_request, pin_cpu_model, setup,
    virsh_system, wait_ready_hosts,
};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

/// The model the pool pins: one of QEMU's named models that TCG emulates on any host.
const CPU_MODEL: &str = "Westmere";

/// Requests a move of `desktop` in `mode` and waits until it ended.
async fn moved(
    w: &World,
    migrations: &Api<DesktopMigration>,
    name: &str,
    mode: &str,
) -> anyhow::Result<DesktopMigration> {
    let mut m = migration_request(w, name, "roamer", None)?;
    m.spec.mode = serde_json::from_value(json!(mode))?;
    migrations.create(&PostParams::default(), &m).await?;
    ended(migrations, name).await
}

fn backing_of(disk: &Path) -> anyhow::Result<Option<String>> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(disk)
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.get("backing-filename")
        .and_then(|b| b.as_str())
        .map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_moves_cold_with_its_disk_to_a_host_that_does_not_share_storage()
-> anyhow::Result<()> {
    let started = Instant::now();
    // Declared first, dropped last: the World's desktops are deleted while host B runs.
    let host_b: Arc<SecondHost>;
    let mut w = setup(&format!("mcp-{}", unique_suffix())).await?;
    host_b = Arc::new(SecondHost::start_with_private(
        &format!("dvc{}", unique_suffix()),
        std::slice::from_ref(&w.disk_dir),
    )?);
    // The base image as a file of the pool's imageDir (the World links it from the guest's
    // cache, which host B's confined agent does not see), as on a real host.
    let base_file = w.image_dir.join("base.qcow2");
    let cached = std::fs::canonicalize(&base_file)?;
    std::fs::remove_file(&base_file)?;
    std::fs::copy(&cached, &base_file)?;
    create_pool(&w).await?;
    w.agent = Some(w.spawn_agent(&w.node, &[])?);
    pin_cpu_model(&w, CPU_MODEL).await?;
    let nodes: Api<DomainNode> = Api::all(w.client.clone());
    w.start_operator()?;
    let desktops = w.desktops();
    let migrations: Api<DesktopMigration> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let host_a = w.node.clone();
    guest_in_phase(&w, "roamer", json!({}), Phase::Running).await?;
    guest_in_phase(&w, "parked", json!({ "power": "Off" }), Phase::Stopped).await?;
    let node_b = w.add_migration_target(&host_b)?;
    wait_ready_hosts(&w, 2).await?;
    eprintln!(
        "[migrate_copy] both hosts up, roamer running: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let domain = domain_of(&desktops, &w.user_ns.name, "roamer").await?;
    let disk_a = w.disk_dir.join(format!("{domain}.qcow2"));
    let disk_b = host_b.private_dir(0).join(format!("{domain}.qcow2"));
    anyhow::ensure!(disk_a.exists(), "no disk at {}", disk_a.display());
    anyhow::ensure!(!disk_b.exists(), "host B sees host A's disk: not private");
    let watch = BothWatch::start(host_b.clone(), vec![domain.clone()]);

    // What the guest writes now is in its disk's own layer only.
    guest_wrote_into(&domain, &disk_a).await?;

    // Live needs shared storage: refused at once, naming the field.
    let live = moved(&w, &migrations, "live", "Live").await?;
    let (reason, message) = ready_reason(&live);
    anyhow::ensure!(
        live.phase() == MigrationPhase::Failed
            && reason == "StorageNotShared"
            && message.contains("storage.shared"),
        "live ended {:?}: {reason}: {message}",
        live.phase()
    );
    eprintln!("[migrate_copy] live refused: {message}");

    // A file of the disk's name on host B: refused before anything stops; the file is kept.
    std::fs::write(&disk_b, b"not yours")?;
    let blocked = moved(&w, &migrations, "blocked", "Cold").await?;
    let (reason, message) = ready_reason(&blocked);
    anyhow::ensure!(
        blocked.phase() == MigrationPhase::Failed
            && reason == "TargetNotPrepared"
            && message.contains(&format!("{domain}.qcow2")),
        "blocked ended {:?}: {reason}: {message}",
        blocked.phase()
    );
    eprintln!("[migrate_copy] blocked: {message}");
    anyhow::ensure!(
        std::fs::read(&disk_b)? == b"not yours",
        "host B's file was touched"
    );
    anyhow::ensure!(
        virsh_system(&["domstate", &domain])?.trim() == "running",
        "roamer was stopped by a move that could not happen"
    );
    std::fs::remove_file(&disk_b)?;

    // Cold, with the disk copied.
    let t0 = Instant::now();
    let done = moved(&w, &migrations, "to-b", "Cold").await?;
    let took = t0.elapsed();
    ensure_succeeded(&done, &desktops, "roamer").await?;
    let (_, message) = ready_reason(&done);
    let st = done.status.clone().unwrap_or_default();
    anyhow::ensure!(
        st.source.as_deref() == Some(host_a.as_str())
            && st.target.as_deref() == Some(node_b.as_str()),
        "{st:?}"
    );
    eprintln!(
        "[migrate_copy] cold with copy: Succeeded in {:.1}s (guest down {} ms, {} KiB sent): {message}",
        took.as_secs_f64(),
        st.downtime_millis.unwrap_or(0),
        st.bytes_moved.unwrap_or(0) >> 10
    );
    let d: Desktop = eventually(Duration::from_secs(180), "roamer running on B", || async {
        let d = desktops.get("roamer").await?;
        let on_b = d.status.as_ref().is_some_and(|s| {
            s.node.as_deref() == Some(node_b.as_str()) && s.phase == Some(Phase::Running)
        });
        Ok(on_b.then_some(d))
    })
    .await?;
    anyhow::ensure!(
        host_b.virsh(&["domstate", &domain])?.trim() == "running",
        "roamer does not run on B"
    );
    anyhow::ensure!(
        !virsh_system(&["list", "--all", "--name"])?.contains(&domain),
        "host A kept the domain"
    );
    anyhow::ensure!(!disk_a.exists(), "host A kept the disk it copied away");
    anyhow::ensure!(
        holds(&disk_b, 24, 2, 0x55)?,
        "the disk on B lacks the guest's write"
    );
    let base = w.image_dir.join("base.qcow2").display().to_string();
    anyhow::ensure!(
        backing_of(&disk_b)?.as_deref() == Some(base.as_str()),
        "the disk on B is not an overlay of {base}"
    );
    let size_b = std::fs::metadata(&disk_b)?.len();
    anyhow::ensure!(
        !disk_b.with_extension("qcow2.incoming").exists(),
        "host B kept the incoming marker"
    );
    eprintln!(
        "[migrate_copy] the disk on B: {} KiB, an overlay of {base}, with the guest's write; ip {:?}",
        size_b >> 10,
        d.status.as_ref().and_then(|s| s.ip.clone())
    );
    // The request on host B is withdrawn once the move ended.
    eventually(
        Duration::from_secs(30),
        "host B's request withdrawn",
        || async {
            let n = nodes.get(&node_b).await?;
            let st = n.status.unwrap_or_default();
            Ok((st.incoming.is_empty() && st.prepared.is_empty()).then_some(()))
        },
    )
    .await?;

    // A drain of host A moves the stopped `parked` Cold, with its disk.
    let parked = domain_of(&desktops, &w.user_ns.name, "parked").await?;
    let parked_a = w.disk_dir.join(format!("{parked}.qcow2"));
    let parked_b = host_b.private_dir(0).join(format!("{parked}.qcow2"));
    let wrote = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x66 8M 1M"])
        .arg(&parked_a)
        .output()?;
    anyhow::ensure!(wrote.status.success(), "qemu-io write: {wrote:?}");
    let t_drain = Instant::now();
    nodes
        .patch(
            &host_a,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "spec": { "drain": true } })),
        )
        .await?;
    eventually(Duration::from_secs(240), "host A Drained", || async {
        let n = nodes.get(&host_a).await?;
        let st = n.status.unwrap_or_default();
        Ok(find(&st.conditions, "Drained")
            .is_some_and(|c| c.status == "True")
            .then_some(()))
    })
    .await?;
    let p = desktops.get("parked").await?;
    let pst = p.status.clone().unwrap_or_default();
    anyhow::ensure!(
        pst.node.as_deref() == Some(node_b.as_str()),
        "parked is bound to {:?}",
        pst.node
    );
    eventually(Duration::from_secs(60), "parked Stopped on B", || async {
        let d = desktops.get("parked").await?;
        Ok((d.status.and_then(|s| s.phase) == Some(Phase::Stopped)).then_some(()))
    })
    .await?;
    anyhow::ensure!(
        host_b.virsh(&["domstate", &parked])?.trim() == "shut off",
        "parked is not defined and off on B"
    );
    anyhow::ensure!(!parked_a.exists(), "host A kept parked's disk");
    anyhow::ensure!(
        holds(&parked_b, 8, 1, 0x66)?,
        "parked's disk on B lacks its bytes"
    );
    eprintln!(
        "[migrate_copy] drain of host A moved the stopped desktop with its disk: Drained in {:.1}s",
        t_drain.elapsed().as_secs_f64()
    );

    // Deleting the desktops removes their disks on B.
    for name in ["roamer", "parked"] {
        desktops.delete(name, &DeleteParams::default()).await?;
        eventually(
            Duration::from_secs(120),
            &format!("{name} gone"),
            || async { Ok(desktops.get_opt(name).await?.is_none().then_some(())) },
        )
        .await?;
    }
    anyhow::ensure!(!disk_b.exists(), "host B kept roamer's disk");
    anyhow::ensure!(!parked_b.exists(), "host B kept parked's disk");
    let polls = watch.finish()?;
    eprintln!(
        "[migrate_copy] never running on both hosts ({polls} polls); total {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
