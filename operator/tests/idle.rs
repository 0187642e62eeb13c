//! Idle reclamation against the real API server, with a fake node-agent that reports `Running`
//! and `idleSince` as the agent does: a desktop idle past its timeout is reclaimed (Event, `Idle`,
//! `status.reclaimed`), its CPU, memory and SPICE port go back to the pool once the host
//! confirms, a wake brings it back on its host (its old port when free) or waits for room, and
//! the Delete action deletes only a desktop whose disk is not persistent.

mod common;

use common::{Setup, agent_power, cond, delete, node_of, wait_for, wait_gone, wait_phase};
use deskvirt_crds::constants::ANNOTATION_WAKE;
use deskvirt_crds::desktop::{IdleAction, IdlePolicy, Phase};
use deskvirt_crds::{Desktop, ResourcePool};
use deskvirt_operator::metrics::{PoolLabel, PoolResource};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

fn idle_cond(d: &Desktop) -> Option<(String, String, String)> {
    let c = cond(&d.status.as_ref()?.conditions, "Idle")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn port_of(d: &Desktop) -> Option<u16> {
    d.status.as_ref()?.spice.as_ref()?.port
}

fn now_s() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

async fn create(api: &Api<Desktop>, d: &Desktop) {
    api.create(&PostParams::default(), d)
        .await
        .unwrap_or_else(|e| panic!("creating {:?}: {e}", d.metadata.name));
}

async fn wake(api: &Api<Desktop>, name: &str, token: &str) {
    let patch = json!({ "metadata": { "annotations": { ANNOTATION_WAKE: token } } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("waking {name}: {e}"));
}

/// Waits for the pool's allocated and available CPU.
async fn pool_cpu(pools: &Api<ResourcePool>, pool: &str, allocated: u32, available: u32) {
    wait_for(
        pools,
        pool,
        &format!("allocated {allocated} / available {available} CPU"),
        |p: &ResourcePool| {
            p.status.as_ref().is_some_and(|s| {
                s.allocated.as_ref().is_some_and(|a| a.cpu == allocated)
                    && s.available.as_ref().is_some_and(|a| a.cpu == available)
            })
        },
    )
    .await;
}

#[tokio::test]
async fn idle_desktop_is_reclaimed_gives_back_resources_and_wakes_on_its_host() {
    // 8 threads, no reserve, no overcommit: 8 CPU and 16Gi for desktops.
    let spec = json!({ "overcommit": { "cpu": 1 }, "reserved": { "cpu": 0, "memory": "0" } });
    let t = Setup::new("op-idle", spec, 3).await;
    let (run, pool, node) = (&t.run, &t.host.pool, &t.host.node);
    let desks = run.desktops();
    let pools = run.pools();

    // A filler holds the lowest port, so the idle desktop's own port is not the lowest.
    create(&desks, &run.desktop("filler", pool, 1, "1Gi")).await;
    wait_for(&desks, "filler", "port 5900", |d: &Desktop| {
        port_of(d) == Some(5900)
    })
    .await;
    let mut sleepy = run.desktop("sleepy", pool, 4, "2Gi");
    sleepy.spec.idle = Some(IdlePolicy {
        timeout: "4s".into(),
        action: IdleAction::Suspend,
        connected_is_active: true,
    });
    create(&desks, &sleepy).await;
    let d = wait_for(&desks, "sleepy", "port 5901", |d: &Desktop| {
        port_of(d) == Some(5901)
    })
    .await;
    let mac = d.status.as_ref().and_then(|s| s.mac.clone());
    pool_cpu(&pools, pool, 5, 3).await;

    // Running and active, then idle: the countdown names its deadline, then the action runs.
    agent_power(&desks, "sleepy", true, "Running", None).await;
    wait_for(&desks, "sleepy", "Idle Active", |d: &Desktop| {
        idle_cond(d).is_some_and(|(s, r, _)| s == "False" && r == "Active")
    })
    .await;
    let since = now_s();
    agent_power(&desks, "sleepy", true, "Running", Some(since)).await;
    let d = wait_for(&desks, "sleepy", "reclaimed", |d: &Desktop| {
        d.status.as_ref().is_some_and(|s| s.reclaimed.is_some())
    })
    .await;
    let st = d.status.clone().unwrap_or_default();
    let r = st
        .reclaimed
        .clone()
        .unwrap_or_else(|| panic!("no reclaimed"));
    assert_eq!((r.action, r.port), (IdleAction::Suspend, Some(5901)));
    let deadline = since.as_second() + 4;
    let lag = r.at.0.as_second() - deadline;
    assert!(
        (0..=2).contains(&lag),
        "reclaimed {lag}s after the deadline"
    );
    let (s, reason, msg) = idle_cond(&d).unwrap_or_default();
    assert_eq!(
        (s.as_str(), reason.as_str()),
        ("True", "IdleTimeout"),
        "{msg}"
    );
    assert_eq!(
        port_of(&d),
        Some(5901),
        "the port stays until the host confirms"
    );
    let ev = run.event("sleepy", "IdleTimeout").await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    let note = ev.note.unwrap_or_default();
    assert!(
        note.contains("deskvirt.io/wake=$(date +%s) --overwrite") && note.contains("4s"),
        "{note}"
    );
    assert_eq!(run.events("sleepy", "IdleTimeout").await.len(), 1);

    // The host confirms: CPU, memory and port go back; node and MAC stay.
    agent_power(&desks, "sleepy", false, "Suspended", Some(since)).await;
    let d = wait_for(&desks, "sleepy", "port released", |d: &Desktop| {
        port_of(d).is_none()
    })
    .await;
    assert_eq!(node_of(&d), Some(node.as_str()));
    assert_eq!(d.status.as_ref().and_then(|s| s.mac.clone()), mac);
    let d = wait_phase(&desks, "sleepy", Phase::Suspended).await;
    let ready = d
        .status
        .as_ref()
        .and_then(|s| cond(&s.conditions, "Ready"))
        .map(|c| (c.status.clone(), c.reason.clone()));
    assert_eq!(ready, Some(("False".into(), "IdleTimeout".into())));
    pool_cpu(&pools, pool, 1, 7).await;
    wait_for(&pools, pool, "15Gi available", |p: &ResourcePool| {
        p.status
            .as_ref()
            .and_then(|s| s.available.as_ref())
            .is_some_and(|a| a.memory == "15Gi")
    })
    .await;
    let m = &t.operator.metrics;
    let reclaimed = |resource| {
        m.reclaimed
            .get_or_create(&PoolResource {
                pool: pool.clone(),
                resource,
            })
            .get()
    };
    assert_eq!(
        (
            reclaimed("cpu"),
            reclaimed("memory_bytes"),
            reclaimed("spice_ports")
        ),
        (4, 2 << 30, 1)
    );
    let label = PoolLabel { pool: pool.clone() };
    assert_eq!(m.idle_desktops.get_or_create(&label).get(), 1);
    assert_eq!(m.sessions.get_or_create(&label).get(), 0);

    // Another desktop takes the freed port and most of the room.
    create(&desks, &run.desktop("hog", pool, 5, "2Gi")).await;
    wait_for(&desks, "hog", "the freed port", |d: &Desktop| {
        port_of(d) == Some(5901)
    })
    .await;

    // A wake without room waits, says why, and keeps trying.
    wake(&desks, "sleepy", "1").await;
    let d = wait_for(&desks, "sleepy", "waiting for room", |d: &Desktop| {
        idle_cond(d).is_some_and(|(s, r, _)| s == "True" && r == "Woken")
    })
    .await;
    let (_, _, msg) = idle_cond(&d).unwrap_or_default();
    assert!(
        msg.contains(&format!(
            "waiting for room on host {node} where its disk lives"
        )) && msg.contains("needs 4 CPU / 2Gi, free 2 CPU"),
        "{msg}"
    );
    let st = d.status.clone().unwrap_or_default();
    assert!(st.wake.is_none() && st.reclaimed.is_some(), "{st:#?}");
    let ev = run.event("sleepy", "WakeWaiting").await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));

    // Room appears: it is back on its host with its old port, though a lower one is free.
    delete(&desks, "hog").await;
    delete(&desks, "filler").await;
    wait_gone(&desks, "hog", "hog deleted").await;
    wait_gone(&desks, "filler", "filler deleted").await;
    let d = wait_for(&desks, "sleepy", "woken", |d: &Desktop| {
        d.status
            .as_ref()
            .is_some_and(|s| s.reclaimed.is_none() && s.wake.is_some())
    })
    .await;
    let st = d.status.clone().unwrap_or_default();
    assert_eq!(port_of(&d), Some(5901));
    assert_eq!(st.wake.map(|w| w.token), Some("1".into()));
    assert_eq!(node_of(&d), Some(node.as_str()));
    let (s, reason, _) = idle_cond(&d).unwrap_or_default();
    assert_eq!((s.as_str(), reason.as_str()), ("False", "Woken"));
    let ev = run.event("sleepy", "Woken").await;
    assert_eq!(ev.type_.as_deref(), Some("Normal"));
    pool_cpu(&pools, pool, 4, 4).await;

    // The host starts it: active again, the countdown waits for the next idle spell.
    agent_power(&desks, "sleepy", true, "Running", None).await;
    wait_phase(&desks, "sleepy", Phase::Running).await;
    wait_for(&desks, "sleepy", "Idle Active", |d: &Desktop| {
        idle_cond(d).is_some_and(|(s, r, _)| s == "False" && r == "Active")
    })
    .await;

    // A second idle spell: the countdown runs from the wake or idleSince, whichever is later,
    // and the same token is not a new wake.
    let since = now_s();
    agent_power(&desks, "sleepy", true, "Running", Some(since)).await;
    let d = wait_for(&desks, "sleepy", "reclaimed again", |d: &Desktop| {
        d.status.as_ref().is_some_and(|s| s.reclaimed.is_some())
    })
    .await;
    let r = d.status.as_ref().and_then(|s| s.reclaimed.clone());
    assert!(
        r.is_some_and(|r| r.at.0.as_second() >= since.as_second() + 4),
        "{d:#?}"
    );
    agent_power(&desks, "sleepy", false, "Suspended", Some(since)).await;
    wait_for(&desks, "sleepy", "port released again", |d: &Desktop| {
        port_of(d).is_none()
    })
    .await;
    pool_cpu(&pools, pool, 0, 8).await;
    assert_eq!(run.events("sleepy", "Woken").await.len(), 1);
    assert_eq!(
        d.status.and_then(|s| s.wake).map(|w| w.token),
        Some("1".into())
    );
}

#[tokio::test]
async fn delete_action_deletes_only_a_desktop_without_a_persistent_disk() {
    // The policy comes from the pool's defaults.
    let spec = json!({ "defaults": { "idle": { "timeout": "3s", "action": "Delete" } } });
    let t = Setup::new("op-idle-del", spec, 3).await;
    let (run, pool) = (&t.run, &t.host.pool);
    let desks = run.desktops();
    let mut scratch = run.desktop("scratch", pool, 1, "1Gi");
    scratch.spec.disk.persistent = false;
    create(&desks, &scratch).await;
    create(&desks, &run.desktop("keeper", pool, 1, "1Gi")).await;
    for name in ["scratch", "keeper"] {
        wait_for(&desks, name, "binding", |d: &Desktop| node_of(d).is_some()).await;
        agent_power(&desks, name, true, "Running", Some(now_s())).await;
    }

    wait_gone(&desks, "scratch", "the idle desktop deleted").await;
    let ev = run.event("scratch", "IdleTimeout").await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert!(
        ev.note.as_deref().is_some_and(|n| n.contains("deleting")),
        "{ev:?}"
    );

    // A persistent disk: Delete falls back to Shutdown, and says so.
    let d = wait_for(&desks, "keeper", "reclaimed", |d: &Desktop| {
        d.status.as_ref().is_some_and(|s| s.reclaimed.is_some())
    })
    .await;
    let r = d.status.as_ref().and_then(|s| s.reclaimed.clone());
    assert_eq!(r.map(|r| r.action), Some(IdleAction::Shutdown));
    let (s, reason, msg) = idle_cond(&d).unwrap_or_default();
    assert_eq!((s.as_str(), reason.as_str()), ("True", "IdleTimeout"));
    assert!(msg.contains("persistent"), "{msg}");
    let ev = run.event("keeper", "IdleTimeout").await;
    assert!(
        ev.note.as_deref().is_some_and(|n| n.contains("persistent")),
        "{ev:?}"
    );
    assert!(desks.get_opt("keeper").await.ok().flatten().is_some());
    agent_power(&desks, "keeper", false, "IdleShutdown", None).await;
    // Stopped already while the host works on it (Ready says Reclaiming), then done.
    wait_for(&desks, "keeper", "Stopped, IdleTimeout", |d: &Desktop| {
        d.status.as_ref().is_some_and(|s| {
            s.phase == Some(Phase::Stopped)
                && cond(&s.conditions, "Ready")
                    .is_some_and(|c| c.status == "False" && c.reason == "IdleTimeout")
        })
    })
    .await;
    wait_for(&desks, "keeper", "port released", |d: &Desktop| {
        port_of(d).is_none()
    })
    .await;
}
