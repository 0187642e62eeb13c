//! A desktop moves into another pool, end to end: the operator, two node-agents on two
//! independent libvirt hosts (host A, this machine's qemu:///system, in the run's pool `p`;
//! host B, a second libvirtd, in pool `q`, whose `diskDir` is another path and host B's own,
//! `SECOND_HOST_PRIVATE`, its agent confined to what the chart's DaemonSet mounts), real QEMU
//! (TCG), the real apiserver. Pool `q` admits only namespaces labelled for it.
//! - a Live move to another pool is refused at once (Failed, `ModeNotSupported`);
//! - a Cold move to `q` waits, `PoolNotAllowed`, naming the namespace selector, while the
//!   tenant's namespace is not selected, and nothing is held in `q`;
//! - once the namespace is labelled, it goes: host B makes the empty overlay in `q`'s diskDir,
//!   host A shuts the guest down and copies the disk's own layer with a carrier domain (the
//!   desktop's MAC changes, which libvirt refuses in a migrated domain); the desktop is bound
//!   to host B in pool `q` (its allocation, a SPICE port of `q`'s range, a MAC of `q`'s prefix)
//!   and boots there from the copied disk, which holds what the guest wrote; host A keeps no
//!   domain and no disk, and pool `p` counts neither the desktop nor its port;
//! - the Desktop's `spec.pool` still says `p`: `PoolApplied=False`, `PoolChangeRefused`, naming
//!   `q`; once the manifest says `q`, `PoolApplied=True`;
//! - deleting the desktop removes its disk on host B.
//!
//! Both libvirtds are polled every 100 ms from the first move to the last: the desktop never
//! runs on both hosts at once.
//!
//! Run: `cargo test -p deskvirt-tests --test migrate_pool -- --nocapture`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deskvirt_crds::conditions::find;
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::migration::MigrationPhase;
use deskvirt_crds::{Desktop, DesktopMigration, ResourcePool};
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::eventually;
use deskvirt_tests::moves::{ended, ensure_succeeded, guest_wrote_into, holds, ready_reason};
use deskvirt_tests::second_host::{BothWatch, SecondHost};
use deskvirt_tests::world::{
    World, create_other_pool, create_pool, domain_of, guest_in_phase, migration_request, setup,
    virsh_system, wait_ready_hosts, wait_ready_hosts_in,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// The label pool `q` selects namespaces by.
const TENANT_LABEL: &str = "deskvirt.io/test-tenant";

/// A request to move `desktop` into pool `pool` in `mode`.
fn to_pool(w: &World, name: &str, pool: &str, mode: &str) -> anyhow::Result<DesktopMigration> {
    let mut m = migration_request(w, name, "mover", None)?;
    m.spec.mode = serde_json::from_value(json!(mode))?;
    m.spec.target_pool = Some(pool.to_string());
    Ok(m)
}

fn pool_applied(d: &Desktop) -> (String, String, String) {
    d.status
        .as_ref()
        .and_then(|s| find(&s.conditions, "PoolApplied"))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_moves_into_another_pool_with_its_disk_and_new_allocations() -> anyhow::Result<()>
{
    let started = Instant::now();
    // Declared first, dropped last: the World's desktops are deleted while host B runs.
    let host_b: Arc<SecondHost>;
    let mut w = setup(&format!("mpl-{}", unique_suffix())).await?;
    let disk_dir_q = PathBuf::from(format!("{}-q", w.disk_dir.display()));
    std::fs::create_dir_all(&disk_dir_q)?;
    host_b = Arc::new(SecondHost::start_with_private(
        &format!("dvp{}", unique_suffix()),
        std::slice::from_ref(&disk_dir_q),
    )?);
    // The base image as a file of the pools' imageDir (the World links it from the guest's
    // cache, which host B's confined agent does not see), as on a real host.
    let base_file = w.image_dir.join("base.qcow2");
    let cached = std::fs::canonicalize(&base_file)?;
    std::fs::remove_file(&base_file)?;
    std::fs::copy(&cached, &base_file)?;
    create_pool(&w).await?;
    let q = create_other_pool(
        &w,
        &disk_dir_q,
        json!({ "matchLabels": { TENANT_LABEL: w.run } }),
    )
    .await?;
    w.agent = Some(w.spawn_agent(&w.node, &[])?);
    w.start_operator()?;
    let desktops = w.desktops();
    let migrations: Api<DesktopMigration> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let host_a = w.node.clone();
    guest_in_phase(&w, "mover", json!({}), Phase::Running).await?;
    let node_b = w.add_migration_target_in(&host_b, &q, &disk_dir_q)?;
    wait_ready_hosts(&w, 1).await?;
    wait_ready_hosts_in(&w, &q, 1).await?;
    let before = desktops.get("mover").await?;
    let old = before.status.clone().unwrap_or_default();
    eprintln!(
        "[migrate_pool] both hosts up, mover running in {} with MAC {:?}: {:.1}s",
        w.pool,
        old.mac,
        started.elapsed().as_secs_f64()
    );
    let domain = domain_of(&desktops, &w.user_ns.name, "mover").await?;
    let disk_a = w.disk_dir.join(format!("{domain}.qcow2"));
    let disk_b = host_b.private_dir(0).join(format!("{domain}.qcow2"));
    anyhow::ensure!(disk_a.exists(), "no disk at {}", disk_a.display());
    let watch = BothWatch::start(host_b.clone(), vec![domain.clone()]);

    guest_wrote_into(&domain, &disk_a).await?;

    // Live into another pool: refused at once.
    migrations
        .create(&PostParams::default(), &to_pool(&w, "live", &q, "Live")?)
        .await?;
    let live = ended(&migrations, "live").await?;
    let (reason, message) = ready_reason(&live);
    anyhow::ensure!(
        live.phase() == MigrationPhase::Failed && reason == "ModeNotSupported",
        "live ended {:?}: {reason}: {message}",
        live.phase()
    );

    // Cold into q, whose namespace selector does not select the tenant yet: it waits.
    migrations
        .create(&PostParams::default(), &to_pool(&w, "to-q", &q, "Cold")?)
        .await?;
    let waiting = eventually(
        Duration::from_secs(60),
        "to-q waiting for the pool",
        || async {
            let m = migrations.get("to-q").await?;
            Ok((ready_reason(&m).0 == "PoolNotAllowed").then_some(m))
        },
    )
    .await?;
    let (_, message) = ready_reason(&waiting);
    anyhow::ensure!(
        waiting.phase() == MigrationPhase::Pending
            && message.contains("spec.targetPool")
            && message.contains("namespaceSelector"),
        "to-q: {:?}: {message}",
        waiting.phase()
    );
    anyhow::ensure!(
        waiting
            .status
            .as_ref()
            .is_none_or(|s| s.target.is_none() && s.target_pool.is_none()),
        "a refused move holds a target: {:?}",
        waiting.status
    );
    eprintln!("[migrate_pool] waits for the tenant's right to the pool: {message}");
    let namespaces: Api<Namespace> = Api::all(w.client.clone());
    let t0 = Instant::now();
    namespaces
        .patch(
            &w.user_ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { TENANT_LABEL: w.run } } })),
        )
        .await?;
    let done = ended(&migrations, "to-q").await?;
    let took = t0.elapsed();
    ensure_succeeded(&done, &desktops, "mover").await?;
    let (_, message) = ready_reason(&done);
    let st = done.status.clone().unwrap_or_default();
    anyhow::ensure!(
        st.source.as_deref() == Some(host_a.as_str())
            && st.target.as_deref() == Some(node_b.as_str())
            && st.target_pool.as_deref() == Some(q.as_str()),
        "{st:?}"
    );
    eprintln!(
        "[migrate_pool] into pool {q}: Succeeded {:.1}s after the namespace was labelled ({} KiB sent): {message}",
        took.as_secs_f64(),
        st.bytes_moved.unwrap_or(0) >> 10
    );
    let d: Desktop = eventually(Duration::from_secs(180), "mover running on B", || async {
        let d = desktops.get("mover").await?;
        let on_b = d.status.as_ref().is_some_and(|s| {
            s.node.as_deref() == Some(node_b.as_str()) && s.phase == Some(Phase::Running)
        });
        Ok(on_b.then_some(d))
    })
    .await?;
    let now = d.status.clone().unwrap_or_default();
    let mac = now.mac.clone().unwrap_or_default();
    anyhow::ensure!(
        now.allocation.as_ref().map(|a| a.pool.as_str()) == Some(q.as_str()),
        "the allocation names {:?}",
        now.allocation
    );
    anyhow::ensure!(
        mac.starts_with("52:54:01:") && Some(&mac) == st.target_mac.as_ref(),
        "MAC {mac}, reserved {:?}",
        st.target_mac
    );
    anyhow::ensure!(
        now.spice.as_ref().and_then(|s| s.port) == st.target_port,
        "port {:?}, reserved {:?}",
        now.spice,
        st.target_port
    );
    let xml = host_b.virsh(&["dumpxml", &domain])?;
    anyhow::ensure!(
        xml.contains(&mac) && xml.contains(&disk_b_path_in(&disk_dir_q, &domain)),
        "the domain on B lacks its new MAC {mac} or its disk in {}",
        disk_dir_q.display()
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
    // Pool p holds nothing of it any more (no desktop, no port); pool q holds it.
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    let held = |p: &ResourcePool| {
        let st = p.status.clone().unwrap_or_default();
        (
            st.allocated.map_or(0, |a| a.desktops),
            st.ports.map_or(0, |u| u.used),
        )
    };
    let accounts = eventually(
        Duration::from_secs(30),
        "the pools' accounts follow",
        || async {
            let (p, pq) = (pools.get(&w.pool).await?, pools.get(&q).await?);
            Ok((held(&p) == (0, 0) && held(&pq) == (1, 1)).then_some(()))
        },
    )
    .await;
    if let Err(e) = accounts {
        let (p, pq) = (pools.get(&w.pool).await?, pools.get(&q).await?);
        anyhow::bail!("{e}: {} {:?}; {q} {:?}", w.pool, p.status, pq.status);
    }
    eprintln!(
        "[migrate_pool] bound in {q} on {node_b}: MAC {} -> {mac}, port {:?} -> {:?}",
        old.mac.unwrap_or_default(),
        old.spice.and_then(|s| s.port),
        now.spice.and_then(|s| s.port)
    );

    // GitOps: the spec still names the old pool until the manifest follows.
    let (status, reason, message) = pool_applied(&d);
    anyhow::ensure!(
        status == "False" && reason == "PoolChangeRefused" && message.contains(&q),
        "PoolApplied {status} {reason}: {message}"
    );
    desktops
        .patch(
            "mover",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "pool": q } })),
        )
        .await?;
    eventually(Duration::from_secs(60), "PoolApplied True", || async {
        let d = desktops.get("mover").await?;
        Ok((pool_applied(&d).0 == "True").then_some(()))
    })
    .await?;

    // Deleting the desktop removes its disk on B.
    desktops.delete("mover", &DeleteParams::default()).await?;
    eventually(Duration::from_secs(120), "mover gone", || async {
        Ok(desktops.get_opt("mover").await?.is_none().then_some(()))
    })
    .await?;
    anyhow::ensure!(!disk_b.exists(), "host B kept mover's disk");
    let polls = watch.finish()?;
    eprintln!(
        "[migrate_pool] never running on both hosts ({polls} polls); total {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&disk_dir_q);
    Ok(())
}

/// The path of `domain`'s disk in pool q's diskDir, as host B's domain names it.
fn disk_b_path_in(disk_dir_q: &Path, domain: &str) -> String {
    disk_dir_q
        .join(format!("{domain}.qcow2"))
        .display()
        .to_string()
}
