//! Idle reclamation end to end: the chart's operator and a node-agent against real QEMU (TCG)
//! and the real apiserver, three desktops of a pool whose default idle policy is "suspend after
//! 20 s, a connected SPICE client counts as activity":
//! - `quiet`, nobody connected: suspended after the timeout (libvirt managed save), phase
//!   Suspended, a Warning Event, its CPU, memory and SPICE port back in the pool;
//! - `held`, a SPICE client linked and kept open: never reclaimed;
//! - `countdown`, its own policy "shut down after 30 s": the agent is killed and restarted in
//!   the middle of the countdown, which is neither restarted nor cut short;
//! - waking `quiet` with the documented annotation brings it back Running on the same disk file
//!   with the same MAC, without a spec edit.
//!
//! It prints how far detection lags behind the configured timeout.
//!
//! Run: `cargo test -p deskvirt-tests --test idle -- --nocapture`.

use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::running_reason::{IDLE_SHUTDOWN, SUSPENDED};
use deskvirt_crds::constants::{ANNOTATION_WAKE, condition};
use deskvirt_crds::desktop::{IdleAction, Phase};
use deskvirt_crds::quantity::parse_bytes;
use deskvirt_crds::{Desktop, ResourcePool};
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::eventually;
use deskvirt_tests::spice::hold;
use deskvirt_tests::world::{
    World, console_password, create_pool, domain_of, guest_desktop, patch_pool, setup, spice_addr,
    virsh_system,
};
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

/// The pool's default idle timeout, and `countdown`'s own.
const POOL_TIMEOUT_S: i64 = 20;
const OWN_TIMEOUT_S: i64 = 30;

fn desktop(w: &World, name: &str, idle: Option<serde_json::Value>) -> anyhow::Result<Desktop> {
    let extra = idle.map_or_else(|| json!({}), |idle| json!({ "idle": idle }));
    guest_desktop(w, name, "128Mi", extra)
}

/// Seconds from `a` to `b`.
fn secs(a: &Timestamp, b: &Timestamp) -> f64 {
    b.duration_since(*a).as_secs_f64()
}

/// The pool's allocated CPU and memory bytes.
async fn allocated(pools: &Api<ResourcePool>, pool: &str) -> anyhow::Result<(u32, u64)> {
    let p = pools.get(pool).await?;
    let a = p
        .status
        .and_then(|s| s.allocated)
        .context("pool has no status.allocated")?;
    Ok((a.cpu, parse_bytes(&a.memory)?))
}

/// In `phase` and the host confirmed the idle action (`Running` False with `reason`).
fn confirmed(d: &Desktop, phase: Phase, reason: &str) -> bool {
    d.status.as_ref().is_some_and(|s| {
        s.phase == Some(phase)
            && find(&s.conditions, condition::RUNNING)
                .is_some_and(|c| c.status == "False" && c.reason == reason)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_desktops_are_reclaimed_held_ones_are_not_and_wake_keeps_disk_and_mac()
-> anyhow::Result<()> {
    let mut w = setup(&format!("idle-{}", unique_suffix())).await?;
    create_pool(&w).await?;
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    let idle = json!({
        "timeout": format!("{POOL_TIMEOUT_S}s"), "action": "Suspend", "connectedIsActive": true
    });
    patch_pool(&w, json!({ "defaults": { "idle": idle } })).await?;
    w.start_agent()?;
    w.start_operator()?;
    let desktops = w.desktops();
    let own = json!({ "timeout": format!("{OWN_TIMEOUT_S}s"), "action": "Shutdown" });
    for (name, idle) in [("quiet", None), ("held", None), ("countdown", Some(own))] {
        desktops
            .create(&PostParams::default(), &desktop(&w, name, idle)?)
            .await?;
    }
    for name in ["quiet", "held", "countdown"] {
        eventually(Duration::from_secs(240), "desktops Running", || async {
            Ok((w.phase(name).await? == Some(Phase::Running)).then_some(()))
        })
        .await
        .with_context(|| format!("{name} never ran"))?;
    }
    // The pool's status is coalesced (every 2 s): a desktop that started a moment ago may not be
    // counted yet. `before` is read once the pool counts all three (1 CPU / 128Mi each).
    let before = eventually(
        Duration::from_secs(30),
        "pool counts 3 desktops",
        || async {
            let a = allocated(&pools, &w.pool).await?;
            Ok((a == (3, 3 * 128 * 1024 * 1024)).then_some(a))
        },
    )
    .await?;

    // A client linked to `held` and kept open, as remote-viewer left connected.
    let held = desktops.get("held").await?;
    let (password, _) = console_password(&w, "held").await?;
    let _client = hold(spice_addr(&held)?, &password)
        .await?
        .context("the SPICE link of `held` was refused")?;

    // `countdown`: once its countdown runs, the agent dies and comes back in the middle of it.
    let idle_since = |name: &'static str| {
        let desktops = desktops.clone();
        async move {
            Ok::<_, anyhow::Error>(
                desktops
                    .get(name)
                    .await?
                    .status
                    .and_then(|s| s.idle_since)
                    .map(|t| t.0),
            )
        }
    };
    // A guest still booting on a busy 2-core host can look idle for one sample (its vCPU gets
    // no time) and busy again at the next; the agent is killed once the countdown held over
    // more than one sample.
    let countdown_since = eventually(Duration::from_secs(180), "countdown idle", || async {
        Ok(idle_since("countdown")
            .await?
            .filter(|t| Timestamp::now().duration_since(*t).as_secs_f64() >= 12.0))
    })
    .await?;
    if let Some(mut a) = w.agent.take() {
        a.kill()?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.start_agent()?;

    // `quiet` is suspended after its timeout.
    let quiet_domain = domain_of(&w.desktops(), &w.user_ns.name, "quiet").await?;
    let quiet_disk = virsh_system(&["domblklist", &quiet_domain])?;
    let quiet_before = desktops.get("quiet").await?;
    let quiet_mac = quiet_before
        .status
        .as_ref()
        .and_then(|s| s.mac.clone())
        .context("quiet has no MAC")?;
    let quiet = eventually(Duration::from_secs(180), "quiet Suspended", || async {
        let d = desktops.get("quiet").await?;
        Ok(confirmed(&d, Phase::Suspended, SUSPENDED).then_some(d))
    })
    .await?;
    let qs = quiet.status.clone().unwrap_or_default();
    let reclaimed = qs.reclaimed.clone().context("quiet: no status.reclaimed")?;
    anyhow::ensure!(reclaimed.action == IdleAction::Suspend, "{reclaimed:?}");
    let since = qs.idle_since.clone().context("quiet: no idleSince")?.0;
    let waited = secs(&since, &reclaimed.at.0);
    anyhow::ensure!(
        waited >= POOL_TIMEOUT_S as f64 - 1.0,
        "quiet reclaimed after {waited:.1}s of idleness, before its {POOL_TIMEOUT_S}s timeout"
    );
    eprintln!(
        "[idle] quiet: reclaimed {:.1}s after idleSince (timeout {POOL_TIMEOUT_S}s): detection lag {:.1}s",
        waited,
        waited - POOL_TIMEOUT_S as f64
    );
    let dominfo = virsh_system(&["dominfo", &quiet_domain])?;
    anyhow::ensure!(
        dominfo.contains("shut off")
            && dominfo
                .lines()
                .any(|l| l.starts_with("Managed save:") && l.contains("yes")),
        "quiet is not managed-saved:\n{dominfo}"
    );
    let idle = find(&qs.conditions, condition::IDLE).context("quiet: no Idle condition")?;
    anyhow::ensure!(idle.status == "True", "quiet Idle: {idle:?}");
    // The operator gives the port back once the host confirmed.
    eventually(
        Duration::from_secs(30),
        "quiet's SPICE port released",
        || async {
            let d = desktops.get("quiet").await?;
            let port = d.status.and_then(|s| s.spice).and_then(|s| s.port);
            Ok(port.is_none().then_some(()))
        },
    )
    .await?;
    let events: Api<Event> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let warned = events
        .list(&ListParams::default().fields("involvedObject.name=quiet"))
        .await?
        .items
        .into_iter()
        .any(|e| {
            e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some("IdleTimeout")
        });
    anyhow::ensure!(warned, "no Warning IdleTimeout Event on quiet");

    // `countdown` is shut down: not before its timeout counted from the idleSince the first
    // agent saw, and not a whole new countdown later either.
    let countdown = eventually(Duration::from_secs(180), "countdown Stopped", || async {
        let d = desktops.get("countdown").await?;
        Ok(confirmed(&d, Phase::Stopped, IDLE_SHUTDOWN).then_some(d))
    })
    .await?;
    let cs = countdown.status.clone().unwrap_or_default();
    anyhow::ensure!(
        cs.idle_since.as_ref().map(|t| t.0) == Some(countdown_since),
        "the agent restart moved idleSince from {countdown_since} to {:?}",
        cs.idle_since
    );
    let reclaimed = cs
        .reclaimed
        .clone()
        .context("countdown: no status.reclaimed")?;
    anyhow::ensure!(reclaimed.action == IdleAction::Shutdown, "{reclaimed:?}");
    let waited = secs(&countdown_since, &reclaimed.at.0);
    anyhow::ensure!(
        (OWN_TIMEOUT_S as f64 - 1.0..OWN_TIMEOUT_S as f64 + 25.0).contains(&waited),
        "countdown reclaimed {waited:.1}s after idleSince; timeout {OWN_TIMEOUT_S}s"
    );
    eprintln!(
        "[idle] countdown (agent restarted mid-way): reclaimed {waited:.1}s after idleSince (timeout {OWN_TIMEOUT_S}s)"
    );

    // Both reclaimed desktops gave their CPU and memory back to the pool.
    let after = eventually(Duration::from_secs(60), "pool allocation down", || async {
        let a = allocated(&pools, &w.pool).await?;
        Ok((a.0 + 2 == before.0).then_some(a))
    })
    .await?;
    anyhow::ensure!(
        before.1 - after.1 == 2 * 128 * 1024 * 1024,
        "pool memory went from {} to {} bytes, not down by 2 × 128Mi",
        before.1,
        after.1
    );
    eprintln!(
        "[idle] pool allocated: {} CPU / {} MiB → {} CPU / {} MiB",
        before.0,
        before.1 >> 20,
        after.0,
        after.1 >> 20
    );

    // `held` outlived both timeouts with its client connected.
    let held = desktops.get("held").await?;
    let hs = held.status.clone().unwrap_or_default();
    anyhow::ensure!(
        hs.phase == Some(Phase::Running) && hs.reclaimed.is_none(),
        "held was reclaimed with a client connected: {hs:#?}"
    );
    anyhow::ensure!(
        hs.session
            .as_ref()
            .is_some_and(|s| s.connected && s.client_address.is_some()),
        "held's session is not reported: {:?}",
        hs.session
    );
    anyhow::ensure!(
        find(&hs.conditions, condition::IDLE).is_none_or(|c| c.status != "True"),
        "held is marked Idle"
    );

    // Waking `quiet`: one annotation, no spec edit; back Running on the same disk, same MAC.
    let generation = quiet.metadata.generation;
    let woken = Instant::now();
    let annotated = w.kubectl_ns(&[
        "annotate",
        "desktop",
        "quiet",
        &format!("{ANNOTATION_WAKE}=1"),
        "--overwrite",
    ])?;
    anyhow::ensure!(annotated.success, "kubectl annotate: {}", annotated.stderr);
    let waited = w.kubectl_ns(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=120s",
        "desktop/quiet",
    ])?;
    anyhow::ensure!(
        waited.success,
        "quiet did not wake: {}\n{:#?}",
        waited.stderr,
        desktops.get("quiet").await?.status
    );
    eprintln!(
        "[idle] wake annotation → quiet Ready: {:.1}s",
        woken.elapsed().as_secs_f64()
    );
    let quiet = desktops.get("quiet").await?;
    let qs = quiet.status.clone().unwrap_or_default();
    anyhow::ensure!(quiet.metadata.generation == generation, "spec was edited");
    anyhow::ensure!(
        qs.reclaimed.is_none(),
        "still reclaimed: {:?}",
        qs.reclaimed
    );
    anyhow::ensure!(
        qs.wake.as_ref().is_some_and(|k| k.token == "1"),
        "status.wake: {:?}",
        qs.wake
    );
    anyhow::ensure!(qs.mac.as_deref() == Some(quiet_mac.as_str()), "MAC changed");
    let domain = quiet_domain;
    anyhow::ensure!(
        virsh_system(&["domblklist", &domain])? == quiet_disk,
        "the disk changed"
    );
    let xml = virsh_system(&["dumpxml", &domain])?;
    anyhow::ensure!(
        xml.contains(&format!("<mac address='{quiet_mac}'/>")),
        "the domain's MAC is not {quiet_mac}"
    );
    Ok(())
}
