//! The real `deskvirt-node-agent` binary with the real API server and real libvirt
//! (`qemu:///system`, TCG): the test plays the operator (binding, node label, console password
//! mirror, host subnet) exactly as the operator writes them, and checks what the agent does on
//! the host and reports:
//! - a bound Desktop becomes a running domain on a linked clone, with a pinned address on the
//!   pool's nat network, USB redirection channels, and SPICE on its port with its password;
//! - the guest boots to userspace (serial log), a wrong SPICE password is refused;
//! - a quiet desktop reports `idleSince`, and a connected SPICE client makes it active;
//! - a rotated password reaches the running domain;
//! - `kill -9` of the agent and a restart keep the same QEMU PID, and so does a libvirtd
//!   restart, after which the agent reconnects;
//! - power Off stops the domain and keeps the disk, power On starts it again;
//! - a missing base image is a clear condition, not a crash loop;
//! - a domain with deskvirt metadata and no Desktop is reported as an orphan, not deleted;
//! - deleting the Desktop removes the domain, the overlay and the lease, and keeps the base.
//!
//! Run: `cargo test -p deskvirt-node-agent --test agent_desktops -- --nocapture`.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::world::{MARKER, World, cleanup, cond_is, link};
use common::{eventually, finish, unique};
use deskvirt_crds::DomainNode;
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::MANAGER_AGENT;
use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, RUNNING};
use deskvirt_node_agent::domain::{
    Binding, DomainInputs, DomainType, HostContext, NetworkAttachment, Secret, domain_name,
    network_name, serial_log_path,
};
use deskvirt_node_agent::hypervisor::{DomainState, Hypervisor};
use deskvirt_tests::cluster::{TestNamespace, client, ensure_crds};
use deskvirt_tests::spice::{self, LinkOutcome};
use futures::FutureExt;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

fn spicevmc_channels(xml: &str) -> usize {
    xml.match_indices("<redirdev ")
        .filter(|(at, _)| {
            let tag = &xml[*at..];
            tag[..tag.find('>').unwrap_or(tag.len())].contains("type='spicevmc'")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_desktops_on_real_libvirt() -> anyhow::Result<()> {
    let client = client().await?;
    ensure_crds(&client).await?;
    let ns = TestNamespace::new(&client, "agent-desk").await?;
    let id = unique();
    let w = World::new(client.clone(), &ns.name, "agent-desk").await?;
    let result = AssertUnwindSafe(scenario(&w, id)).catch_unwind().await;
    cleanup(&w).await;
    drop(ns);
    finish(result)
}

async fn scenario(w: &World, id: u64) -> anyhow::Result<()> {
    // A nat pool whose subnet for this host is unlikely to collide with another run.
    let octet = 100 + (id % 100) as u8;
    let subnet = format!("10.{octet}.7.0/24");
    w.create_pool(octet).await?;
    let mut agent = w.start_agent()?;
    // The operator assigns the host its subnet once the host has joined.
    w.assign_subnet(&subnet).await?;
    let nodes: Api<DomainNode> = Api::all(w.client.clone());

    // Bound Desktop → running domain.
    let name = "alice";
    let port = w.first_port;
    let mac = format!("52:54:00:{:02x}:{:02x}:01", (id >> 8) & 0xff, id & 0xff);
    let password = format!("pw-{:x}", unique());
    let bound_at = Instant::now();
    let uid = w
        .create_bound(name, "base.qcow2", port, &mac, &password)
        .await?;
    let running = w
        .wait_desktop(
            name,
            "DomainDefined and Running",
            Duration::from_secs(120),
            |d| cond_is(d, DOMAIN_DEFINED, "True", None) && cond_is(d, RUNNING, "True", None),
        )
        .await?;
    let bound_to_running = bound_at.elapsed();
    let domain = domain_name(&w.ns, name, &uid);
    let status = running.status.clone().unwrap_or_default();
    let ip: Ipv4Addr = status.ip.as_deref().unwrap_or_default().parse()?;
    assert_eq!(
        ip.octets()[..3],
        [10, octet, 7],
        "address outside the host subnet"
    );
    let spice_status = status.spice.clone().unwrap_or_default();
    assert_eq!(spice_status.host.as_deref(), Some("127.0.0.1"));
    assert_eq!(
        spice_status.uri.as_deref(),
        Some(format!("spice://127.0.0.1:{port}").as_str())
    );
    assert!(
        running
            .finalizers()
            .iter()
            .any(|f| f == "deskvirt.io/node-agent")
    );
    // The agent's status fields are owned by its field manager.
    let agent_fields = running
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some(MANAGER_AGENT))
        .filter_map(|m| m.fields_v1.as_ref().map(|f| f.0.to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    for field in [
        "f:ip",
        "f:uri",
        "f:host",
        "k:{\\\"type\\\":\\\"Running\\\"}",
    ] {
        assert!(
            agent_fields.contains(field),
            "{field} not owned by {MANAGER_AGENT}: {agent_fields}"
        );
    }
    // Linked clone on the base image; the lease pinned in the network.
    let overlay = w.disk_dir.join(format!("{domain}.qcow2"));
    let base = Path::new(&w.guest_dir).join("base.qcow2");
    assert!(overlay.is_file(), "overlay {} missing", overlay.display());
    let info = Command::new("qemu-img")
        .args(["info", "-U", &overlay.display().to_string()])
        .output()?;
    assert!(
        String::from_utf8_lossy(&info.stdout).contains(&base.display().to_string()),
        "overlay is not backed by the base image"
    );
    let leases = w.hv.dhcp_hosts(&network_name(&w.pool)).await?;
    assert!(
        leases.iter().any(|l| l.mac == mac && l.ip == ip),
        "{leases:?}"
    );
    let live = w.hv.domain_xml(&domain, false).await?;
    assert_eq!(spicevmc_channels(&live), 2, "USB redirection channels");
    assert!(!live.contains(&password), "live XML shows the password");

    // The guest boots to userspace.
    let log = serial_log_path(&domain);
    let booted = eventually(Duration::from_secs(180), "the guest marker", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text.contains(MARKER).then_some(()))
    })
    .await;
    booted?;
    let bound_to_userspace = bound_at.elapsed();
    eprintln!(
        "[agent_desktops] bound → Running condition: {:.2}s; bound → guest userspace: {:.2}s",
        bound_to_running.as_secs_f64(),
        bound_to_userspace.as_secs_f64()
    );

    // SPICE: the right password links, a wrong one is refused.
    assert!(
        matches!(
            link(port, &password).await?,
            LinkOutcome::Accepted { main_init: true }
        ),
        "right password refused"
    );
    assert!(
        matches!(link(port, "wrong").await?, LinkOutcome::Refused { .. }),
        "wrong password accepted"
    );

    // Activity: a quiet guest with no client becomes idle (idleSince set, no session); a
    // client left connected makes it active again (connected sessions count by default).
    let idle = w
        .wait_desktop(
            name,
            "idleSince on a quiet desktop",
            Duration::from_secs(150),
            |d| {
                d.status.as_ref().is_some_and(|s| {
                    s.idle_since.is_some() && s.session.as_ref().is_some_and(|x| !x.connected)
                })
            },
        )
        .await?;
    let idle_since = idle.status.and_then(|s| s.idle_since);
    let held = spice::hold(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), &password)
        .await?
        .ok_or_else(|| anyhow::anyhow!("held session refused"))?;
    let connected = w
        .wait_desktop(name, "a connected session", Duration::from_secs(90), |d| {
            d.status.as_ref().is_some_and(|s| {
                s.idle_since.is_none()
                    && s.session.as_ref().is_some_and(|x| {
                        x.connected && x.client_address.as_deref() == Some("127.0.0.1")
                    })
            })
        })
        .await?;
    assert!(
        connected
            .status
            .and_then(|s| s.last_activity_time)
            .is_some()
    );
    drop(held);
    eprintln!(
        "[agent_desktops] idle since {idle_since:?}, then active while a client was connected"
    );

    // Rotation: a new mirror password reaches the running domain.
    let rotated = format!("pw-{:x}", unique());
    w.publish_password(name, &uid, &rotated).await?;
    eventually(Duration::from_secs(30), "the rotated password", || async {
        Ok(matches!(link(port, &rotated).await?, LinkOutcome::Accepted { .. }).then_some(()))
    })
    .await?;
    assert!(
        matches!(link(port, &password).await?, LinkOutcome::Refused { .. }),
        "old password still accepted after rotation"
    );

    // kill -9 and restart: same QEMU process.
    let pid = w.qemu_pid(&domain).await?;
    agent.child.kill()?;
    agent.child.wait()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        w.qemu_pid(&domain).await?,
        pid,
        "QEMU changed while the agent was down"
    );
    let agent = w.start_agent()?;
    eventually(
        Duration::from_secs(60),
        "a reconcile after restart",
        || async {
            let metrics = agent.http_get("/metrics").await.unwrap_or_default();
            Ok(metrics
                .lines()
                .any(|l| l.starts_with("deskvirt_agent_desktop_reconciles_total{result=\"ok\"}"))
                .then_some(()))
        },
    )
    .await?;
    assert_eq!(
        w.qemu_pid(&domain).await?,
        pid,
        "the restarted agent replaced QEMU"
    );
    assert!(cond_is(
        &w.desktops().get(name).await?,
        RUNNING,
        "True",
        None
    ));
    assert!(
        matches!(link(port, &rotated).await?, LinkOutcome::Accepted { .. }),
        "password lost over the restart"
    );

    // libvirtd restarts under the running desktop: QEMU stays, the agent reconnects.
    common::run(
        "scripts/libvirt.sh restart",
        Command::new(common::repo_root().join("scripts/libvirt.sh")).arg("restart"),
    );
    // This test's own connection broke too; it reconnects with backoff.
    let after = eventually(Duration::from_secs(30), "libvirt again", || async {
        Ok(w.hv.qemu_pid(&domain).await.ok().flatten())
    })
    .await?;
    assert_eq!(after, pid, "QEMU changed over a libvirtd restart");
    eventually(
        Duration::from_secs(60),
        "LibvirtConnected after the restart",
        || async {
            let dn = nodes.get(&w.node).await?;
            let conds = dn.status.map(|s| s.conditions).unwrap_or_default();
            Ok(find(&conds, "LibvirtConnected")
                .is_some_and(|c| c.status == "True")
                .then_some(()))
        },
    )
    .await?;

    // Power Off keeps the disk; On starts again (the agent works over the new connection).
    let power = |p: &str| json!({ "spec": { "power": p } });
    w.desktops()
        .patch(name, &PatchParams::default(), &Patch::Merge(&power("Off")))
        .await?;
    w.wait_desktop(
        name,
        "Running=False Stopped",
        Duration::from_secs(60),
        |d| cond_is(d, RUNNING, "False", Some("Stopped")),
    )
    .await?;
    assert_eq!(
        w.hv.domain_status(&domain).await?.state,
        DomainState::ShutOff
    );
    assert!(
        overlay.is_file(),
        "a stopped persistent desktop lost its disk"
    );
    w.desktops()
        .patch(name, &PatchParams::default(), &Patch::Merge(&power("On")))
        .await?;
    w.wait_desktop(name, "Running again", Duration::from_secs(60), |d| {
        cond_is(d, RUNNING, "True", None)
    })
    .await?;

    // A missing base image is a condition, and such a Desktop still deletes cleanly.
    let broken = "broken";
    let broken_mac = format!("52:54:00:{:02x}:{:02x}:02", (id >> 8) & 0xff, id & 0xff);
    w.create_bound(broken, "missing.qcow2", port + 1, &broken_mac, "pw-broken")
        .await?;
    let failed = w
        .wait_desktop(broken, "BaseImageMissing", Duration::from_secs(60), |d| {
            cond_is(d, DOMAIN_DEFINED, "False", Some("BaseImageMissing"))
        })
        .await?;
    let message = failed
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, DOMAIN_DEFINED))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("missing.qcow2"),
        "unclear message: {message}"
    );
    w.desktops()
        .delete(broken, &DeleteParams::default())
        .await?;
    eventually(
        Duration::from_secs(60),
        "the broken Desktop gone",
        || async { Ok(w.desktops().get_opt(broken).await?.is_none().then_some(())) },
    )
    .await?;

    // An orphan: deskvirt metadata, no Desktop. Reported, never deleted.
    let orphan = orphan_domain(w, id).await?;
    eventually(
        Duration::from_secs(90),
        "the OrphanDomain event",
        || async {
            let events: Api<Event> = Api::all(w.client.clone());
            let list = events.list(&ListParams::default()).await?;
            Ok(list
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("OrphanDomain")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some(w.node.as_str())
                        && e.note.as_deref().unwrap_or_default().contains(&orphan)
                })
                .then_some(()))
        },
    )
    .await?;
    let metrics = agent.http_get("/metrics").await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("deskvirt_agent_orphan_domains ") && !l.ends_with(" 0")),
        "orphan gauge is 0"
    );
    assert!(
        w.hv.list_domains().await?.iter().any(|d| d.name == orphan),
        "the orphan was deleted"
    );
    w.hv.undefine_domain(&orphan).await?;

    // Delete: domain, overlay and lease go; the base image stays.
    w.delete_desktop(name, &domain).await?;
    assert!(!overlay.exists(), "overlay still there");
    assert!(base.is_file(), "the base image was deleted");
    let leases = w.hv.dhcp_hosts(&network_name(&w.pool)).await?;
    assert!(
        !leases.iter().any(|l| l.mac == mac),
        "lease kept: {leases:?}"
    );
    drop(agent);
    Ok(())
}

/// Defines (without starting) a domain with deskvirt metadata for a Desktop that does not exist.
async fn orphan_domain(w: &World, id: u64) -> anyhow::Result<String> {
    let uid = format!(
        "{:08x}-0000-4000-8000-{:012x}",
        id >> 32,
        id & 0xffff_ffff_ffff
    );
    let desk = common::desktop(
        &w.ns,
        "ghost",
        &uid,
        json!({ "pool": w.pool, "cpu": 1, "memory": "128Mi", "disk": { "image": "base.qcow2" } }),
    );
    let host = HostContext {
        node_name: w.node.clone(),
        domain_type: DomainType::Qemu,
        image_dir: w.guest_dir.clone(),
        disk_dir: w.disk_dir.display().to_string(),
        network: NetworkAttachment::Network {
            name: network_name(&w.pool),
        },
        spice_listen: "127.0.0.1".into(),
        spice_tls: false,
    };
    let binding = Binding {
        node: w.node.clone(),
        spice_port: w.first_port + 2,
        mac: format!("52:54:00:{:02x}:{:02x}:03", (id >> 8) & 0xff, id & 0xff),
        spice_password: Secret::new("orphan"),
        pinned_cpus: Vec::new(),
    };
    let inputs = DomainInputs::from_desktop(&desk, &common::valid(&desk), &binding, &host)?;
    Ok(w.hv.define_domain(&inputs.to_xml()?).await?)
}
