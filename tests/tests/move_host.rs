//! A woken desktop whose host is full moves to another host, end to end: the chart's operator,
//! two node-agents on two independent libvirt hosts (host A is this machine's qemu:///system,
//! host B a second libvirtd in its own network and mount namespaces, see
//! `scripts/second-host.sh`), real QEMU (TCG) and the real apiserver. The pool's disk directory
//! is the same directory for both hosts, as NFS or Ceph would make it (`storage.shared`).
//! - `roamer` runs on host A and is suspended by the pool's idle policy (20 s);
//! - `filler`, powered off, takes all of host A's memory that `roamer` gave back;
//! - host B joins, its agent confined to what the chart's DaemonSet mounts (rendered from the
//!   chart, see `deskvirt_tests::confined`); waking `roamer` moves it to host B: new node and
//!   label, `lastMove`, a `Moved` Event, Running there from the same disk file (same inode)
//!   with the same MAC;
//! - host A undefines its leftover domain (and the memory saved there), never the disk;
//! - on host B, `roamer` is suspended again and woken: the memory saved there after the move
//!   is restored (suspend → move → run → suspend → wake), by the confined agent;
//! - deleting `roamer` removes its disk through host B.
//!
//! Run: `cargo test -p deskvirt-tests --test move_host -- --nocapture`.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::running_reason::SUSPENDED;
use deskvirt_crds::constants::{ANNOTATION_WAKE, LABEL_NODE, condition};
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::quantity::parse_bytes;
use deskvirt_crds::{Desktop, ResourcePool};
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::eventually;
use deskvirt_tests::second_host::SecondHost;
use deskvirt_tests::world::{
    World, create_pool, disk_of, domain_of, events, guest_desktop, guest_uptimes, patch_pool,
    setup, virsh_system, wait_ready_hosts,
};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const MI: u64 = 1 << 20;

/// A persistent desktop (its disk outlives every boot) with `memory` and `power`.
fn desktop(w: &World, name: &str, memory: &str, power: &str) -> anyhow::Result<Desktop> {
    let extra = json!({ "power": power, "disk": { "image": "base.qcow2", "persistent": true } });
    guest_desktop(w, name, memory, extra)
}

fn status_of(d: &Desktop) -> deskvirt_crds::desktop::DesktopStatus {
    d.status.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_desktop_moves_to_another_host_when_its_own_is_full() -> anyhow::Result<()> {
    // Host B first, so that it goes last: the World's desktops are deleted while its agent runs.
    let started = Instant::now();
    let host_b = SecondHost::start(&format!("dvm{}", unique_suffix()))?;
    eprintln!(
        "[move] host B (second libvirtd) up in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let mut w = setup(&format!("move-{}", unique_suffix())).await?;
    create_pool(&w).await?;
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    let idle = json!({ "timeout": "20s", "action": "Suspend", "connectedIsActive": true });
    patch_pool(
        &w,
        json!({ "storage": { "shared": true }, "defaults": { "idle": idle } }),
    )
    .await?;
    // Host A sweeps for leftover domains every 5 s (the refresh interval), not every minute.
    w.agent = Some(w.spawn_agent(&w.node, &["--refresh-interval", "5s"])?);
    w.start_operator()?;
    let desktops = w.desktops();
    let host_a = w.node.clone();

    // `roamer` runs on host A, then is suspended there by the idle policy.
    desktops
        .create(
            &PostParams::default(),
            &desktop(&w, "roamer", "128Mi", "On")?,
        )
        .await?;
    eventually(Duration::from_secs(240), "roamer Running", || async {
        Ok((w.phase("roamer").await? == Some(Phase::Running)).then_some(()))
    })
    .await?;
    let roamer = desktops.get("roamer").await?;
    let rs = status_of(&roamer);
    anyhow::ensure!(rs.node.as_deref() == Some(host_a.as_str()), "{:?}", rs.node);
    let mac = rs.mac.clone().context("roamer has no MAC")?;
    let domain = domain_of(&w.desktops(), &w.user_ns.name, "roamer").await?;
    let disk = disk_of(&virsh_system(&["domblklist", &domain])?)?;
    let inode = std::fs::metadata(&disk)?.ino();
    eventually(Duration::from_secs(180), "roamer suspended", || async {
        let s = status_of(&desktops.get("roamer").await?);
        let saved = s.phase == Some(Phase::Suspended)
            && s.spice.as_ref().is_none_or(|p| p.port.is_none())
            && find(&s.conditions, condition::RUNNING)
                .is_some_and(|c| c.status == "False" && c.reason == SUSPENDED);
        Ok(saved.then_some(()))
    })
    .await?;
    let dominfo = virsh_system(&["dominfo", &domain])?;
    anyhow::ensure!(
        dominfo
            .lines()
            .any(|l| l.starts_with("Managed save:") && l.contains("yes")),
        "roamer is not managed-saved on host A:\n{dominfo}"
    );

    // `filler` (powered off) takes all of host A's memory but 64 MiB: `roamer` (128 MiB) no
    // longer fits there.
    let available = eventually(Duration::from_secs(30), "pool released roamer", || async {
        let st = pools.get(&w.pool).await?.status.unwrap_or_default();
        let (Some(a), Some(free)) = (st.allocated, st.available) else {
            return Ok(None);
        };
        Ok((a.cpu == 0).then_some(free))
    })
    .await?;
    let free = parse_bytes(&available.memory)?;
    let filler_memory = format!("{}Mi", (free / MI).saturating_sub(64));
    desktops
        .create(
            &PostParams::default(),
            &desktop(&w, "filler", &filler_memory, "Off")?,
        )
        .await?;
    eventually(
        Duration::from_secs(60),
        "filler bound to host A",
        || async {
            let s = status_of(&desktops.get("filler").await?);
            Ok((s.node.as_deref() == Some(host_a.as_str())).then_some(()))
        },
    )
    .await?;

    // Host B's agent joins the pool.
    let node_b = format!("{host_a}-b");
    // Host B's agent sees only what the chart mounts.
    let agent_b = w.spawn_second_agent(&host_b, &node_b, &[])?;
    w.more_agents.push(agent_b);
    wait_ready_hosts(&w, 2).await?;

    // Waking `roamer`: host A is full, the storage is shared, so it moves to host B.
    let woken = Instant::now();
    desktops
        .patch(
            "roamer",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { ANNOTATION_WAKE: "1" } } })),
        )
        .await?;
    let moved = eventually(
        Duration::from_secs(60),
        "roamer bound to host B",
        || async {
            let d = desktops.get("roamer").await?;
            Ok((status_of(&d).node.as_deref() == Some(node_b.as_str())).then_some(d))
        },
    )
    .await?;
    let moved_at = Instant::now();
    eprintln!(
        "[move] wake → bound to host B: {:.1}s",
        woken.elapsed().as_secs_f64()
    );
    let running = eventually(Duration::from_secs(120), "roamer Running on B", || async {
        let d = desktops.get("roamer").await?;
        Ok((status_of(&d).phase == Some(Phase::Running)).then_some(d))
    })
    .await
    .with_context(|| format!("after the move: {:#?}", moved.status))?;
    eprintln!(
        "[move] wake → Running on host B: {:.1}s",
        woken.elapsed().as_secs_f64()
    );
    let st = status_of(&running);
    anyhow::ensure!(
        running.labels().get(LABEL_NODE) == Some(&node_b),
        "node label: {:?}",
        running.labels().get(LABEL_NODE)
    );
    let last = st.last_move.clone().context("no status.lastMove")?;
    anyhow::ensure!(
        last.from == host_a && last.to == node_b,
        "status.lastMove: {last:?}"
    );
    anyhow::ensure!(st.mac.as_deref() == Some(mac.as_str()), "MAC changed");
    anyhow::ensure!(
        st.reclaimed.is_none() && st.spice.as_ref().and_then(|s| s.port).is_some(),
        "{st:#?}"
    );
    let moved_event = eventually(Duration::from_secs(10), "a Moved Event", || async {
        Ok(events(&w, "roamer")
            .await?
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("Moved")))
    })
    .await?;
    eprintln!(
        "[move] Event Moved: {}",
        moved_event.message.unwrap_or_default()
    );

    // On host B: running, from the same disk file, with the same MAC.
    anyhow::ensure!(
        host_b.virsh(&["domstate", &domain])?.trim() == "running",
        "not running on host B"
    );
    let disk_b = disk_of(&host_b.virsh(&["domblklist", &domain])?)?;
    anyhow::ensure!(disk_b == disk, "host B runs {disk_b:?}, not {disk:?}");
    anyhow::ensure!(
        std::fs::metadata(&disk_b)?.ino() == inode,
        "the disk file was replaced"
    );
    let xml = host_b.virsh(&["dumpxml", &domain])?;
    anyhow::ensure!(
        xml.contains(&format!("<mac address='{mac}'/>")),
        "the domain on host B does not have MAC {mac}"
    );

    // Host A undefines its leftover domain and the memory saved there; the disk stays.
    eventually(
        Duration::from_secs(60),
        "host A undefines roamer",
        || async {
            let names = virsh_system(&["list", "--all", "--name"])?;
            Ok((!names.lines().any(|n| n.trim() == domain)).then_some(()))
        },
    )
    .await?;
    eprintln!(
        "[move] host A undefined its leftover domain {:.1}s after the move",
        moved_at.elapsed().as_secs_f64()
    );
    anyhow::ensure!(disk.exists(), "host A deleted the disk");
    anyhow::ensure!(
        host_b.virsh(&["domstate", &domain])?.trim() == "running",
        "roamer stopped on host B when host A cleaned up"
    );
    eventually(Duration::from_secs(10), "a LeftHost Event", || async {
        let left = events(&w, "roamer")
            .await?
            .into_iter()
            .any(|e| e.reason.as_deref() == Some("LeftHost"));
        Ok(left.then_some(()))
    })
    .await?;

    // suspend → move → run → suspend → wake: the idle policy suspends `roamer` on host B,
    // after the move; waking it restores the memory saved there (the move is older than it).
    eventually(
        Duration::from_secs(180),
        "roamer suspended on B",
        || async {
            let s = status_of(&desktops.get("roamer").await?);
            let saved = s.phase == Some(Phase::Suspended)
                && find(&s.conditions, condition::RUNNING)
                    .is_some_and(|c| c.status == "False" && c.reason == SUSPENDED);
            Ok(saved.then_some(()))
        },
    )
    .await?;
    let dominfo = host_b.virsh(&["dominfo", &domain])?;
    anyhow::ensure!(
        dominfo
            .lines()
            .any(|l| l.starts_with("Managed save:") && l.contains("yes")),
        "roamer is not managed-saved on host B:\n{dominfo}"
    );
    // The guest prints its uptime every second: a restored guest goes on counting, a booted
    // one starts again from about 2 s.
    let serial = host_b.qemu_log_dir().join(format!("{domain}-serial.log"));
    let before = guest_uptimes(&serial)?;
    let last = *before
        .last()
        .context("no uptime in the serial log before the suspend")?;
    let woken = Instant::now();
    desktops
        .patch(
            "roamer",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { ANNOTATION_WAKE: "2" } } })),
        )
        .await?;
    let restored = eventually(Duration::from_secs(120), "roamer restored on B", || async {
        let d = desktops.get("roamer").await?;
        let s = status_of(&d);
        let running = find(&s.conditions, condition::RUNNING).filter(|c| c.status == "True");
        Ok(running.map(|c| (s.node.clone(), c.message.clone())))
    })
    .await;
    let restored = match restored {
        Ok(r) => r,
        Err(e) => {
            let conditions = status_of(&desktops.get("roamer").await?).conditions;
            return Err(e.context(format!("conditions: {conditions:#?}")));
        }
    };
    eprintln!(
        "[move] second wake → Running on host B: {:.1}s",
        woken.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        restored.0.as_deref() == Some(node_b.as_str()),
        "roamer moved again: {:?}",
        restored.0
    );
    let after = eventually(
        Duration::from_secs(60),
        "the guest after the wake",
        || async { Ok(guest_uptimes(&serial)?.get(before.len()).copied()) },
    )
    .await?;
    eprintln!("[move] guest uptime {last}s before the suspend on B, {after}s after the wake");
    anyhow::ensure!(
        after >= last,
        "the second wake booted from disk instead of restoring memory: uptime {after}s after, \
         {last}s before ({})",
        restored.1
    );
    let discarded: Vec<String> = events(&w, "roamer")
        .await?
        .into_iter()
        .filter(|e| {
            matches!(
                e.reason.as_deref(),
                Some("SavedMemoryDiscarded" | "SavedMemoryUnreadable")
            )
        })
        .filter_map(|e| e.message)
        .collect();
    anyhow::ensure!(
        discarded.is_empty(),
        "saved memory was discarded or unreadable: {discarded:?}"
    );

    // Deleting `roamer` goes through host B, which removes the disk.
    desktops.delete("roamer", &DeleteParams::default()).await?;
    eventually(Duration::from_secs(90), "roamer deleted", || async {
        Ok(desktops.get_opt("roamer").await?.is_none().then_some(()))
    })
    .await?;
    anyhow::ensure!(!disk.exists(), "the disk outlived the desktop");
    desktops.delete("filler", &DeleteParams::default()).await?;
    eventually(Duration::from_secs(90), "filler deleted", || async {
        Ok(desktops.get_opt("filler").await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}
