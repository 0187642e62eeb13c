//! A host drain, end to end: the operator (with the chart's token, which must let it make and
//! delete DesktopMigrations), two node-agents on two independent libvirt hosts (host A is this
//! machine's qemu:///system, host B a `scripts/second-host.sh` libvirtd taking in migrations),
//! real QEMU (TCG) and a pool with shared storage. Host A holds four desktops: `alpha` and
//! `beta` run (a SPICE client is connected to `beta`), `parked` is powered off, `napper` was
//! suspended by its idle policy (memory saved on host A). Setting `spec.drain` on host A:
//! - moves `beta` live first (it is connected), then `alpha` (the operator allows one
//!   migration per host at once here); neither guest is rebooted;
//! - moves `napper` with its saved memory (restored on A, moved live, saved again on B): it is
//!   Suspended on B, and once woken there its guest goes on counting (not rebooted);
//! - binds `parked` to host B, where it is defined and stays shut off, on the same disk;
//! - leaves host A with no domain of them, and says `Drained=True` with no desktop left;
//! - never has a domain running on both hosts: both libvirtds are polled throughout;
//! - survives host A's agent killed and started again while beta moves.
//!
//! Clearing the drain removes its status and makes host A schedulable again.
//!
//! Run: `cargo test -p deskvirt-tests --test drain -- --nocapture`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::conditions::find;
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::{DesktopMigration, DomainNode};
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::eventually;
use deskvirt_tests::second_host::{BothWatch, SecondHost};
use deskvirt_tests::spice;
use deskvirt_tests::world::{
    console_password, create_pool, disk_of, domain_of, guest_desktop, guest_uptimes, patch_pool,
    setup, spice_addr, virsh_system, wait_ready_hosts,
};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

fn drained(n: &DomainNode) -> Option<(String, String)> {
    let st = n.status.as_ref()?;
    find(&st.conditions, "Drained").map(|c| (c.status.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_empties_a_host_of_running_and_stopped_desktops() -> anyhow::Result<()> {
    let started = Instant::now();
    let host_b = Arc::new(SecondHost::start(&format!("dvd{}", unique_suffix()))?);
    let mut w = setup(&format!("drain-{}", unique_suffix())).await?;
    create_pool(&w).await?;
    patch_pool(&w, json!({ "storage": { "shared": true } })).await?;
    w.agent = Some(w.spawn_agent(&w.node, &[])?);
    w.start_operator_with(&["--migrations-per-host", "1"])?;
    let desktops = w.desktops();
    let nodes: Api<DomainNode> = Api::all(w.client.clone());
    let migrations: Api<DesktopMigration> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let host_a = w.node.clone();

    // Three desktops on host A, before host B joins.
    let persistent = json!({ "disk": { "image": "base.qcow2", "persistent": true } });
    for name in ["alpha", "beta"] {
        desktops
            .create(
                &PostParams::default(),
                &guest_desktop(&w, name, "128Mi", persistent.clone())?,
            )
            .await?;
    }
    let mut off = persistent.clone();
    off["power"] = json!("Off");
    desktops
        .create(
            &PostParams::default(),
            &guest_desktop(&w, "parked", "128Mi", off)?,
        )
        .await?;
    let mut napping = persistent.clone();
    napping["idle"] = json!({ "timeout": "20s", "action": "Suspend" });
    desktops
        .create(
            &PostParams::default(),
            &guest_desktop(&w, "napper", "128Mi", napping)?,
        )
        .await?;
    for (name, phase) in [
        ("alpha", Phase::Running),
        ("beta", Phase::Running),
        ("parked", Phase::Stopped),
        ("napper", Phase::Suspended),
    ] {
        eventually(
            Duration::from_secs(240),
            &format!("{name} {phase:?} on A"),
            || async { Ok((w.phase(name).await? == Some(phase)).then_some(())) },
        )
        .await?;
    }
    let node_b = w.add_migration_target(&host_b)?;
    wait_ready_hosts(&w, 2).await?;
    eprintln!(
        "[drain] four desktops on A (napper suspended), B up: {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let mut domains = BTreeMap::new();
    let mut disks = BTreeMap::new();
    let mut uptimes = BTreeMap::new();
    for name in ["alpha", "beta", "parked", "napper"] {
        let domain = domain_of(&desktops, &w.user_ns.name, name).await?;
        disks.insert(name, disk_of(&virsh_system(&["domblklist", &domain])?)?);
        domains.insert(name, domain);
    }
    anyhow::ensure!(
        virsh_system(&["dominfo", &domains["napper"]])?.contains("Managed save:   yes"),
        "napper's memory is not saved on A"
    );
    for name in ["alpha", "beta", "napper"] {
        let serial = PathBuf::from(format!(
            "/var/log/libvirt/qemu/{}-serial.log",
            domains[name]
        ));
        let up = eventually(
            Duration::from_secs(120),
            "a guest's uptime on A",
            || async { Ok(guest_uptimes(&serial)?.last().copied()) },
        )
        .await?;
        uptimes.insert(name, up);
    }

    // A SPICE client on beta: the agent reports it connected, so beta moves first.
    let (password, _) = console_password(&w, "beta").await?;
    let beta = desktops.get("beta").await?;
    let _client = spice::hold(spice_addr(&beta)?, &password)
        .await?
        .context("beta's console refused the password")?;
    eventually(
        Duration::from_secs(60),
        "beta's session reported",
        || async {
            let d = desktops.get("beta").await?;
            let connected = d
                .status
                .and_then(|s| s.session)
                .is_some_and(|s| s.connected);
            Ok(connected.then_some(()))
        },
    )
    .await?;

    // Both libvirtds polled throughout: no domain ever runs on both.
    let watch = BothWatch::start(host_b.clone(), domains.values().cloned().collect());

    let t0 = Instant::now();
    nodes
        .patch(
            &host_a,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "drain": true } })),
        )
        .await?;
    // Host A's agent is killed (SIGKILL) while beta moves (QEMU waits for beta's SPICE client
    // to follow), and started again: the move is libvirt's, and the new agent finds how it
    // ended.
    eventually(Duration::from_secs(60), "beta moving", || async {
        let moving = desktops
            .get("beta")
            .await?
            .status
            .and_then(|s| s.migration_report)
            .is_some_and(|r| r.state == deskvirt_crds::migration::MigrationState::Started);
        Ok(moving.then_some(()))
    })
    .await?;
    if let Some(mut agent) = w.agent.take() {
        agent.kill()?;
    }
    eprintln!(
        "[drain] host A's agent killed while beta moves, {:.1}s into the drain",
        t0.elapsed().as_secs_f64()
    );
    w.agent = Some(w.spawn_agent(&w.node, &[])?);
    let done = eventually(Duration::from_secs(300), "host A Drained", || async {
        let n = nodes.get(&host_a).await?;
        let all_moved = n
            .status
            .as_ref()
            .and_then(|s| s.drain.as_ref())
            .is_some_and(|d| d.migrated == 3);
        Ok(drained(&n)
            .filter(|(s, _)| s == "True" && all_moved)
            .map(|_| n))
    })
    .await;
    let done = match done {
        Ok(n) => n,
        Err(e) => {
            let n = nodes.get(&host_a).await?;
            let ms = migrations.list(&ListParams::default()).await?;
            let states: Vec<_> = ms
                .items
                .iter()
                .map(|m| (m.name_any(), m.status.clone()))
                .collect();
            return Err(e.context(format!(
                "drain: {:#?}\nmigrations: {states:#?}",
                n.status.and_then(|s| s.drain)
            )));
        }
    };
    let took = t0.elapsed();
    let polls = watch.finish()?;
    eprintln!(
        "[drain] host A drained in {:.1}s (4 desktops: 2 live, 1 suspended, 1 stopped); {polls} polls of both hosts",
        took.as_secs_f64()
    );
    let st = done.status.clone().unwrap_or_default();
    let drain = st.drain.clone().context("no status.drain")?;
    anyhow::ensure!(drain.remaining == 0 && drain.migrated == 3, "{drain:?}");

    // Every desktop is bound to B; the running ones run there, the stopped one is defined.
    for (name, phase) in [
        ("alpha", Phase::Running),
        ("beta", Phase::Running),
        ("parked", Phase::Stopped),
        ("napper", Phase::Suspended),
    ] {
        eventually(
            Duration::from_secs(60),
            &format!("{name} {phase:?} on B"),
            || async {
                let d = desktops.get(name).await?;
                let s = d.status.unwrap_or_default();
                Ok(
                    (s.node.as_deref() == Some(node_b.as_str()) && s.phase == Some(phase))
                        .then_some(()),
                )
            },
        )
        .await?;
    }
    let names_a = virsh_system(&["list", "--all", "--name"])?;
    for (name, domain) in &domains {
        anyhow::ensure!(
            !names_a.lines().any(|n| n.trim() == domain),
            "host A still has {name}"
        );
        let disk_b = disk_of(&host_b.virsh(&["domblklist", domain])?)?;
        anyhow::ensure!(disk_b == disks[name], "{name} runs {disk_b:?} on B");
    }
    anyhow::ensure!(
        host_b.virsh(&["domstate", &domains["parked"]])?.trim() == "shut off",
        "parked is not shut off on B"
    );
    // napper arrives running (restored to move), and host B's agent saves it again.
    let saved_b = eventually(Duration::from_secs(120), "napper saved on B", || async {
        let info = host_b.virsh(&["dominfo", &domains["napper"]])?;
        Ok(
            (info.contains("Managed save:   yes") && info.contains("State:          shut off"))
                .then_some(()),
        )
    })
    .await;
    if let Err(e) = saved_b {
        let info = host_b.virsh(&["dominfo", &domains["napper"]])?;
        let st = desktops.get("napper").await?.status;
        return Err(e.context(format!(
            "napper on B: {info}
status: {st:#?}"
        )));
    }
    // Neither running guest was rebooted.
    for name in ["alpha", "beta"] {
        let serial = host_b
            .qemu_log_dir()
            .join(format!("{}-serial.log", domains[name]));
        let before = uptimes[name];
        eventually(Duration::from_secs(60), "a guest's uptime on B", || async {
            Ok(guest_uptimes(&serial)?.into_iter().find(|u| *u > before))
        })
        .await
        .with_context(|| format!("{name} did not go on counting on B (rebooted?)"))?;
    }
    // Woken on B, napper resumes from the memory saved there: its guest goes on counting. What
    // B's log shows before the wake is from the arrival (it ran there until saved again).
    let serial = host_b
        .qemu_log_dir()
        .join(format!("{}-serial.log", domains["napper"]));
    let before = uptimes["napper"];
    let arrived = guest_uptimes(&serial)?;
    anyhow::ensure!(
        arrived.iter().all(|u| *u > before),
        "napper counted {arrived:?} on B after {before:.1}s on A: rebooted, its memory lost"
    );
    let woken = Instant::now();
    let annotated = w.kubectl_ns(&[
        "annotate",
        "desktop",
        "napper",
        &format!("{}=1", deskvirt_crds::constants::ANNOTATION_WAKE),
        "--overwrite",
    ])?;
    anyhow::ensure!(annotated.success, "kubectl annotate: {}", annotated.stderr);
    let after = eventually(Duration::from_secs(120), "napper counting on B", || async {
        Ok(guest_uptimes(&serial)?.get(arrived.len()).copied())
    })
    .await?;
    let last = arrived.last().copied().unwrap_or(before);
    anyhow::ensure!(
        after > last,
        "napper counts {after:.1}s on B after its wake, {last:.1}s before: rebooted, its memory lost"
    );
    eprintln!(
        "[drain] napper woken on B in {:.1}s: guest uptime {before:.1}s on A before the drain, {last:.1}s on B when saved again, {after:.1}s after the wake",
        woken.elapsed().as_secs_f64()
    );

    // The connected desktop went first, and the host's limit kept them one at a time.
    let ms = migrations
        .list(&ListParams::default().labels("deskvirt.io/drain"))
        .await?;
    let by_desktop: BTreeMap<String, DesktopMigration> = ms
        .items
        .into_iter()
        .map(|m| (m.spec.desktop.clone(), m))
        .collect();
    let (a, b) = (
        by_desktop.get("alpha").context("no migration of alpha")?,
        by_desktop.get("beta").context("no migration of beta")?,
    );
    // One at a time: the later of the two was made after the earlier ended. A move the
    // drain had to make again (its first attempt failed, and was deleted to try again) is the
    // later one; the Events of the desktop say why its first attempt failed.
    let times = |m: &DesktopMigration| {
        let made = m.metadata.creation_timestamp.clone().map(|t| t.0);
        let ended = m
            .status
            .as_ref()
            .and_then(|s| s.completion_time.clone())
            .map(|t| t.0);
        (made, ended)
    };
    let ((made_a, ended_a), (made_b, ended_b)) = (times(a), times(b));
    let (first, second) = if made_b <= made_a {
        (("beta", ended_b), ("alpha", made_a))
    } else {
        for e in deskvirt_tests::world::events(&w, "beta").await? {
            eprintln!(
                "[drain] beta was moved again; event {:?}: {:?}",
                e.reason, e.message
            );
        }
        (("alpha", ended_a), ("beta", made_b))
    };
    anyhow::ensure!(
        first.1.is_some() && second.1.is_some() && second.1 >= first.1,
        "{}'s migration was made at {:?} before {}'s ended at {:?}",
        second.0,
        second.1,
        first.0,
        first.1
    );
    for m in [a, b] {
        let s = m.status.clone().unwrap_or_default();
        // A move the restarted agent found ended has no figures: only the agent that ran it
        // read them.
        eprintln!(
            "[drain] {}: total {:?} ms, paused {:?} ms",
            m.spec.desktop, s.total_millis, s.downtime_millis
        );
    }

    // Clearing the drain: its status goes, and host A takes desktops again.
    nodes
        .patch(
            &host_a,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "drain": false } })),
        )
        .await?;
    eventually(
        Duration::from_secs(60),
        "host A schedulable again",
        || async {
            let n = nodes.get(&host_a).await?;
            let st = n.status.unwrap_or_default();
            let ok = st.drain.is_none()
                && find(&st.conditions, "Drained").is_none()
                && find(&st.conditions, "Schedulable").is_some_and(|c| c.status == "True");
            Ok(ok.then_some(()))
        },
    )
    .await?;
    eprintln!("[drain] whole test {:.1}s", started.elapsed().as_secs_f64());
    // The World deletes the desktops (through host B) before host B stops.
    drop(w);
    Ok(())
}
