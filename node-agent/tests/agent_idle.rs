//! Idle reclamation on the host: the real `deskvirt-node-agent` binary with the real API server
//! and real libvirt (`qemu:///system`, TCG). The test plays the operator: it writes
//! `status.reclaimed`, releases and gives back `status.spice.port` by server-side apply as
//! `deskvirt-operator`, and checks what the agent does to the domain and reports, on one
//! non-persistent desktop:
//! 1. an idle desktop's `idleSince` is kept over an agent kill and restart;
//! 2. reclaimed Suspend: memory saved (libvirt managed save), `Running=False/Suspended`, the disk
//!    kept as it is; a restarted agent keeps it suspended;
//! 3. its SPICE port released: no error, no redefinition, no SPICE URI;
//! 4. woken on another port: restored from the saved memory (no new boot), SPICE on the new
//!    port with the same disk and MAC, idle countdown cleared; a connected client is reported;
//! 5. reclaimed Shutdown: off, `Running=False/IdleShutdown`; woken, it boots on a fresh clone;
//! 6. woken with more memory than it was saved with: a Warning, and it boots from its disk;
//!    woken after it ran on another host since the save (`status.lastMove`): the same;
//! 7. deleted while suspended: domain, saved memory and disk are gone.
//!
//! Run: `cargo test -p deskvirt-node-agent --test agent_idle -- --nocapture`.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::world::{MARKER, URI, World, cleanup, cond_is, link};
use common::{AgentProcess, eventually, finish, unique};
use deskvirt_crds::Desktop;
use deskvirt_crds::constants::MANAGER_OPERATOR;
use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, RUNNING};
use deskvirt_crds::constants::running_reason::{IDLE_SHUTDOWN, SUSPENDED};
use deskvirt_node_agent::domain::{domain_name, serial_log_path};
use deskvirt_node_agent::hypervisor::Hypervisor;
use deskvirt_tests::cluster::{TestNamespace, client, ensure_crds};
use deskvirt_tests::spice::{self, LinkOutcome};
use futures::FutureExt;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;

/// Where libvirt's QEMU driver keeps managed save images.
const SAVE_DIR: &str = "/var/lib/libvirt/qemu/save";

fn virsh(args: &[&str]) -> String {
    common::run("virsh", Command::new("virsh").args(["-c", URI]).args(args))
        .trim()
        .to_string()
}

/// Whether `virsh dominfo` says the domain has a managed save image.
fn has_managed_save(domain: &str) -> bool {
    virsh(&["dominfo", domain])
        .lines()
        .any(|l| l.starts_with("Managed save:") && l.trim_end().ends_with("yes"))
}

/// How many times the guest kernel booted, from the serial log (appended across starts).
fn boots(log: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("Linux version")
        .count()
}

fn inode(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// Plays the operator's reclaim (Suspend, holding `port`) and waits for the host to confirm.
async fn suspend(w: &World, name: &str, port: u16, mac: &str) -> anyhow::Result<()> {
    w.operator_status(name, Some(port), mac, Some(reclaimed("Suspend", port)))
        .await?;
    w.wait_desktop(name, "Suspended", Duration::from_secs(60), |d| {
        cond_is(d, RUNNING, "False", Some(SUSPENDED))
    })
    .await?;
    Ok(())
}

/// Plays the operator's wake (port `port`, `reclaimed` cleared) and waits until the host runs
/// the desktop again (`what` names the wait).
async fn wake(w: &World, name: &str, port: u16, mac: &str, what: &str) -> anyhow::Result<Desktop> {
    w.operator_status(name, Some(port), mac, None).await?;
    w.wait_desktop(name, what, Duration::from_secs(60), |d| {
        cond_is(d, RUNNING, "True", None)
    })
    .await
}

/// `status.reclaimed` as the operator writes it.
fn reclaimed(action: &str, port: u16) -> serde_json::Value {
    json!({ "action": action, "at": Time(Timestamp::now()), "port": port })
}

fn idle_since(d: &Desktop) -> Option<Time> {
    d.status.as_ref().and_then(|s| s.idle_since.clone())
}

fn spice_uri(d: &Desktop) -> Option<String> {
    d.status
        .as_ref()
        .and_then(|s| s.spice.as_ref())
        .and_then(|s| s.uri.clone())
}

/// The value of the first sample of `metric` (`name` or `name{labels}`) the agent exposes.
async fn metric(agent: &AgentProcess, metric: &str) -> Option<f64> {
    let text = agent.http_get("/metrics").await.ok()?;
    text.lines()
        .find(|l| l.starts_with(metric) && l[metric.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn wait_metric(agent: &AgentProcess, name: &str, value: f64) -> anyhow::Result<()> {
    eventually(Duration::from_secs(30), name, || async {
        Ok((metric(agent, name).await == Some(value)).then_some(()))
    })
    .await
}

/// Whether an Event with `reason` about the Desktop `name` exists.
async fn has_event(w: &World, name: &str, reason: &str) -> anyhow::Result<bool> {
    let events: Api<Event> = Api::namespaced(w.client.clone(), &w.ns);
    Ok(events
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .any(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        }))
}

/// Kills the agent (-9), starts a new one and waits for its first good reconcile.
async fn restart_agent(w: &World, agent: &mut AgentProcess) -> anyhow::Result<AgentProcess> {
    agent.child.kill()?;
    agent.child.wait()?;
    let fresh = w.start_agent()?;
    wait_reconciles(&fresh, 1.0).await?;
    Ok(fresh)
}

async fn wait_reconciles(agent: &AgentProcess, at_least: f64) -> anyhow::Result<()> {
    let name = "deskvirt_agent_desktop_reconciles_total{result=\"ok\"}";
    eventually(Duration::from_secs(60), "good reconciles", || async {
        Ok(metric(agent, name)
            .await
            .is_some_and(|v| v >= at_least)
            .then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_suspends_restores_and_shuts_down_idle_desktops() -> anyhow::Result<()> {
    let client = client().await?;
    ensure_crds(&client).await?;
    let ns = TestNamespace::new(&client, "agent-idle").await?;
    let w = World::new(client.clone(), &ns.name, "agent-idle").await?;
    let result = AssertUnwindSafe(scenario(&w, unique()))
        .catch_unwind()
        .await;
    cleanup(&w).await;
    drop(ns);
    finish(result)
}

async fn scenario(w: &World, id: u64) -> anyhow::Result<()> {
    let octet = 100 + (id % 100) as u8;
    w.create_pool(octet).await?;
    let mut agent = w.start_agent()?;
    w.assign_subnet(&format!("10.{octet}.9.0/24")).await?;

    let name = "idler";
    let mac = format!("52:54:00:{:02x}:{:02x}:21", (id >> 8) & 0xff, id & 0xff);
    let password = format!("pw-{:x}", unique());
    let port = w.first_port;
    let mut spec = w.spec("base.qcow2");
    spec["disk"]["persistent"] = json!(false);
    let uid = w
        .create_bound_with(name, spec, port, &mac, &password)
        .await?;
    let domain = domain_name(&w.ns, name, &uid);
    let disk = w.disk_dir.join(format!("{domain}.qcow2"));
    let image = PathBuf::from(SAVE_DIR).join(format!("{domain}.save"));
    let log = serial_log_path(&domain);
    w.wait_desktop(name, "Running", Duration::from_secs(120), |d| {
        cond_is(d, RUNNING, "True", None)
    })
    .await?;
    eventually(Duration::from_secs(180), "the guest marker", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text.contains(MARKER).then_some(()))
    })
    .await?;
    assert_eq!(boots(&log), 1);

    // 1. An idle desktop's countdown survives an agent restart.
    let idle = w
        .wait_desktop(name, "idleSince", Duration::from_secs(180), |d| {
            idle_since(d).is_some()
        })
        .await?;
    let since = idle_since(&idle);
    let pid = w.qemu_pid(&domain).await?;
    let mut agent = restart_agent(w, &mut agent).await?;
    // Over a steady resync, so the new agent compares two samples of its own.
    let restarted = Instant::now();
    while restarted.elapsed() < Duration::from_secs(40) {
        let d = w.desktops().get(name).await?;
        assert_eq!(
            idle_since(&d),
            since,
            "idleSince changed over an agent restart"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_reconciles(&agent, 2.0).await?;
    assert_eq!(w.qemu_pid(&domain).await?, pid, "QEMU replaced");

    // 2. Suspend: the memory goes to a managed save image, the disk stays as it is.
    let disk_inode = inode(&disk)?;
    let t = Instant::now();
    suspend(w, name, port, &mac).await?;
    let suspend_took = t.elapsed();
    assert_eq!(virsh(&["domstate", &domain]), "shut off");
    assert!(has_managed_save(&domain), "no managed save");
    assert!(image.is_file(), "no image at {}", image.display());
    assert_eq!(inode(&disk)?, disk_inode, "the disk was replaced");
    assert!(
        has_event(w, name, "Reclaiming").await?,
        "no Reclaiming event"
    );
    wait_metric(&agent, "deskvirt_agent_suspended_desktops", 1.0).await?;
    let definition = w.hv.domain_xml(&domain, true).await?;
    // A restarted agent finds it suspended and leaves it so.
    let agent = restart_agent(w, &mut agent).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(virsh(&["domstate", &domain]), "shut off");
    assert!(has_managed_save(&domain));
    assert!(cond_is(
        &w.desktops().get(name).await?,
        RUNNING,
        "False",
        Some(SUSPENDED)
    ));

    // 3. Its SPICE port released: kept as it is, no URI, no error.
    w.operator_status(name, None, &mac, Some(reclaimed("Suspend", port)))
        .await?;
    let released = w
        .wait_desktop(name, "no SPICE URI", Duration::from_secs(30), |d| {
            spice_uri(d).is_none()
        })
        .await?;
    assert!(cond_is(&released, DOMAIN_DEFINED, "True", None));
    assert!(cond_is(&released, RUNNING, "False", Some(SUSPENDED)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        w.hv.domain_xml(&domain, true).await?,
        definition,
        "redefined"
    );
    assert!(has_managed_save(&domain));

    // 4. Woken on another port: restored, not booted.
    let new_port = w.first_port + 5;
    // Status times are whole seconds: the wake's second counts as after it.
    let woke_at = Timestamp::from_second(Timestamp::now().as_second())?;
    let t = Instant::now();
    let woken = wake(w, name, new_port, &mac, "Running after the wake").await?;
    let wake_took = t.elapsed();
    assert_eq!(
        virsh(&["domstate", "--reason", &domain]),
        "running (restored)"
    );
    assert!(!has_managed_save(&domain));
    assert_eq!(boots(&log), 1, "the guest booted again instead of resuming");
    assert!(
        matches!(
            link(new_port, &password).await?,
            LinkOutcome::Accepted { .. }
        ),
        "SPICE refused on the new port"
    );
    let live = w.hv.domain_xml(&domain, false).await?;
    assert!(live.contains(&format!("port='{new_port}'")), "{live}");
    assert!(
        live.contains(&format!("file='{}'", disk.display())),
        "{live}"
    );
    assert!(live.contains(&format!("address='{mac}'")), "{live}");
    assert_eq!(inode(&disk)?, disk_inode, "the disk was replaced");
    let status = woken.status.clone().unwrap_or_default();
    assert_eq!(status.idle_since, None, "idle countdown kept over a wake");
    assert!(status.last_activity_time.is_some_and(|t| t.0 >= woke_at));
    assert_eq!(
        spice_uri(&woken).as_deref(),
        Some(format!("spice://127.0.0.1:{new_port}").as_str())
    );
    eprintln!(
        "[agent_idle] reclaimed → Suspended {:.2}s; wake → Running (restored) {:.2}s",
        suspend_took.as_secs_f64(),
        wake_took.as_secs_f64()
    );
    // A client's session: its address and since when, and the sessions gauge.
    let held = spice::hold(SocketAddr::from((Ipv4Addr::LOCALHOST, new_port)), &password)
        .await?
        .ok_or_else(|| anyhow::anyhow!("held session refused"))?;
    w.wait_desktop(name, "a connected session", Duration::from_secs(60), |d| {
        d.status
            .as_ref()
            .and_then(|s| s.session.as_ref())
            .is_some_and(|s| {
                s.connected && s.client_address.as_deref() == Some("127.0.0.1") && s.since.is_some()
            })
    })
    .await?;
    wait_metric(&agent, "deskvirt_agent_spice_sessions", 1.0).await?;
    drop(held);

    // 5. Shutdown; woken, it boots (on a fresh clone: it is not persistent).
    let t = Instant::now();
    w.operator_status(
        name,
        Some(new_port),
        &mac,
        Some(reclaimed("Shutdown", new_port)),
    )
    .await?;
    w.wait_desktop(name, "IdleShutdown", Duration::from_secs(60), |d| {
        cond_is(d, RUNNING, "False", Some(IDLE_SHUTDOWN))
    })
    .await?;
    let shutdown_took = t.elapsed();
    assert_eq!(virsh(&["domstate", &domain]), "shut off");
    assert!(!has_managed_save(&domain));
    wake(w, name, new_port, &mac, "Running after the wake").await?;
    assert_eq!(
        virsh(&["domstate", "--reason", &domain]),
        "running (booted)"
    );
    eventually(Duration::from_secs(60), "a second boot", || async {
        Ok((boots(&log) == 2).then_some(()))
    })
    .await?;
    assert_ne!(inode(&disk)?, disk_inode, "no fresh clone for a cold boot");
    eprintln!(
        "[agent_idle] reclaimed → IdleShutdown {:.2}s",
        shutdown_took.as_secs_f64()
    );

    // 6. Woken with another memory size: the saved memory cannot take it; it boots from disk.
    suspend(w, name, new_port, &mac).await?;
    let disk_inode = inode(&disk)?;
    let memory = json!({ "spec": { "memory": "384Mi" } });
    w.desktops()
        .patch(name, &PatchParams::default(), &Patch::Merge(&memory))
        .await?;
    wake(w, name, new_port, &mac, "Running after the wake").await?;
    assert_eq!(
        virsh(&["domstate", "--reason", &domain]),
        "running (booted)"
    );
    assert!(
        has_event(w, name, "SavedMemoryDiscarded").await?,
        "no SavedMemoryDiscarded event"
    );
    wait_metric(&agent, "deskvirt_agent_saved_memory_discarded_total", 1.0).await?;
    assert_eq!(inode(&disk)?, disk_inode, "the disk was replaced");
    assert!(
        w.hv.domain_xml(&domain, false)
            .await?
            .contains("<memory unit='KiB'>393216</memory>")
    );

    // 6b. Woken after it ran on another host since its memory was saved here (the operator
    // moved it away and back: `status.lastMove` is newer than the image): the stale memory
    // would not match the disk, so it is discarded and the desktop boots from its disk.
    suspend(w, name, new_port, &mac).await?;
    assert!(has_managed_save(&domain));
    // The image's time is compared at whole seconds: the move is a later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let at = Timestamp::from_second(Timestamp::now().as_second())?;
    let moved = json!({ "status": { "lastMove": {
        "from": "elsewhere", "to": w.node, "at": at.to_string()
    } } });
    let pp = PatchParams {
        field_manager: Some(MANAGER_OPERATOR.into()),
        ..Default::default()
    };
    w.desktops()
        .patch_status(name, &pp, &Patch::Merge(&moved))
        .await?;
    let disk_inode = inode(&disk)?;
    wake(w, name, new_port, &mac, "Running after the move back").await?;
    assert_eq!(
        virsh(&["domstate", "--reason", &domain]),
        "running (booted)",
        "stale saved memory restored over a disk that ran elsewhere"
    );
    wait_metric(&agent, "deskvirt_agent_saved_memory_discarded_total", 2.0).await?;
    assert_eq!(inode(&disk)?, disk_inode, "the disk was replaced");

    // 7. Deleted while suspended: domain, saved memory and disk go; the base image stays.
    suspend(w, name, new_port, &mac).await?;
    assert!(image.is_file());
    w.delete_desktop(name, &domain).await?;
    assert!(!image.exists(), "saved memory kept");
    assert!(!disk.exists(), "disk kept");
    assert!(Path::new(&w.guest_dir).join("base.qcow2").is_file());
    wait_metric(&agent, "deskvirt_agent_suspended_desktops", 0.0).await?;
    drop(agent);
    Ok(())
}
