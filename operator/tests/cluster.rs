//! The operator in-process against the real API server, with a fake node-agent that writes
//! DomainNodes, heartbeat Leases and host facts exactly as the agent does (SSA as
//! `deskvirt-node-agent`). Objects carry a per-test label the operator is restricted to, so
//! concurrent test runs on the shared API server never see each other's objects.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use deskvirt_crds::constants::MANAGER_AGENT;
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use deskvirt_operator::config::Config;
use deskvirt_operator::metrics::Metrics;
use deskvirt_operator::operator;
use deskvirt_runtime::health::Health;
use deskvirt_tests::cluster::{TestNamespace, client, ensure_crds, unique_suffix};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const RUN_LABEL: &str = "deskvirt.io/test-run";

async fn wait_for<K, F>(api: &Api<K>, name: &str, what: &str, f: F) -> K
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    F: Fn(&K) -> bool,
{
    let mut last = None;
    for _ in 0..300 {
        if let Ok(o) = api.get(name).await {
            if f(&o) {
                return o;
            }
            last = Some(o);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what} on {name}: {last:#?}")
}

fn cond<'a>(
    c: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    c.iter().find(|c| c.type_ == t)
}

/// Writes a DomainNode and its facts as the agent would.
async fn agent_registers(client: &Client, node: &str, run: &str) {
    let api: Api<DomainNode> = Api::all(client.clone());
    let dn = json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
        "metadata": { "name": node, "labels": { RUN_LABEL: run } },
        "spec": {}
    });
    let pp = PatchParams::apply(MANAGER_AGENT).force();
    api.patch(node, &pp, &Patch::Apply(&dn))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let st = json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
        "metadata": { "name": node },
        "status": {
            "address": "192.0.2.10",
            "cpu": { "sockets": 1, "cores": 4, "threads": 8, "mhz": 2000 },
            "memory": "16Gi",
            "hypervisor": "kvm",
            "conditions": [{ "type": "LibvirtConnected", "status": "True", "reason": "Connected",
                             "message": "connected to libvirt", "lastTransitionTime": "2024-01-01T00:00:00Z" }]
        }
    });
    api.patch_status(node, &pp, &Patch::Apply(&st))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Renews the host's heartbeat Lease (3 s) every second while `alive` is set.
fn agent_heartbeats(
    client: &Client,
    ns: &str,
    node: &str,
    alive: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
) {
    let api: Api<Lease> = Api::namespaced(client.clone(), ns);
    let node = node.to_string();
    tokio::spawn(async move {
        while !done.load(Ordering::Relaxed) {
            if alive.load(Ordering::Relaxed) {
                let now = k8s_openapi::jiff::Timestamp::now();
                let lease = json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": { "name": node },
                    "spec": { "holderIdentity": node, "leaseDurationSeconds": 3,
                              "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now) }
                });
                let pp = PatchParams::apply(MANAGER_AGENT).force();
                let _ = api.patch(&node, &pp, &Patch::Apply(&lease)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

fn desktop(name: &str, pool: &str, cpu: u32, run: &str) -> Desktop {
    serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": name, "labels": { RUN_LABEL: run } },
        "spec": { "pool": pool, "cpu": cpu, "memory": "2Gi", "disk": { "image": "base.qcow2" } }
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn binds_reports_unschedulable_tracks_host_loss_and_pool_status() {
    let client = client().await.unwrap_or_else(|e| panic!("{e:#}"));
    ensure_crds(&client)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ns = TestNamespace::new(&client, "op-cluster")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let run = unique_suffix();
    let pool_name = format!("op-pool-{run}");
    let node = format!("op-node-{run}");

    // The operator, in-process, scoped to this run.
    let config = Config::parse_from([
        "deskvirt-operator",
        "--namespace",
        &ns.name,
        "--label-selector",
        &format!("{RUN_LABEL}={run}"),
        "--identity",
        &format!("test-{run}"),
    ]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let op = tokio::spawn(operator::run(
        config,
        client.clone(),
        Health::new(),
        Metrics::default(),
        stop_rx,
    ));

    let pools: Api<ResourcePool> = Api::all(client.clone());
    let pool: ResourcePool = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
        "metadata": { "name": pool_name, "labels": { RUN_LABEL: run } },
        "spec": { "nodeSelector": { RUN_LABEL: run } }
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    pools
        .create(&PostParams::default(), &pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    agent_registers(&client, &node, &run).await;
    let alive = Arc::new(AtomicBool::new(true));
    let done = Arc::new(AtomicBool::new(false));
    agent_heartbeats(&client, &ns.name, &node, alive.clone(), done.clone());

    let desks: Api<Desktop> = Api::namespaced(client.clone(), &ns.name);
    for d in [
        desktop("bound", &pool_name, 2, &run),
        desktop("nopool", &format!("missing-{run}"), 2, &run),
        desktop("huge", &pool_name, 200, &run),
    ] {
        desks
            .create(&PostParams::default(), &d)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    // Binding and field ownership.
    let d = wait_for(&desks, "bound", "binding", |d: &Desktop| {
        d.status.as_ref().and_then(|s| s.node.as_deref()) == Some(node.as_str())
    })
    .await;
    let st = d.status.clone().unwrap_or_default();
    assert_eq!(st.spice.as_ref().and_then(|s| s.port), Some(5900));
    assert!(
        st.mac
            .as_deref()
            .is_some_and(|m| m.starts_with("52:54:00:"))
    );
    assert_eq!(
        st.spice.as_ref().and_then(|s| s.password_secret.clone()),
        Some("bound-console".into())
    );
    let d = wait_for(&desks, "bound", "node label", |d: &Desktop| {
        d.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("deskvirt.io/node"))
            == Some(&node)
    })
    .await;
    assert!(
        d.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"deskvirt.io/operator".to_string())
    );
    let owners = d.metadata.managed_fields.unwrap_or_default();
    let op_status = owners.iter().any(|m| {
        m.manager.as_deref() == Some("deskvirt-operator")
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("\"f:node\""))
    });
    assert!(
        op_status,
        "deskvirt-operator does not own status.node: {owners:#?}"
    );
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns.name);
    let secret = wait_for(&secrets, "bound-console", "console secret", |_| true).await;
    let data = secret.data.unwrap_or_default();
    assert!(data.get("password").is_some_and(|p| p.0.len() >= 32));
    let vv = data
        .get("console.vv")
        .map(|v| String::from_utf8_lossy(&v.0).to_string())
        .unwrap_or_default();
    assert!(
        vv.contains("type=spice") && vv.contains("port=5900"),
        "{vv}"
    );

    // Unschedulable reasons.
    for (name, reason) in [("nopool", "PoolNotFound"), ("huge", "InsufficientCPU")] {
        wait_for(&desks, name, reason, |d: &Desktop| {
            d.status
                .as_ref()
                .and_then(|s| cond(&s.conditions, "Scheduled"))
                .is_some_and(|c| c.status == "False" && c.reason == reason)
        })
        .await;
    }

    // Host status and pool arithmetic: 8 threads - 1 reserved, x4 = 28 vCPUs; 2 allocated.
    let nodes: Api<DomainNode> = Api::all(client.clone());
    let n = wait_for(&nodes, &node, "host Ready", |n: &DomainNode| {
        n.status.as_ref().is_some_and(|s| {
            s.pool.as_deref() == Some(pool_name.as_str())
                && s.subnet.is_some()
                && cond(&s.conditions, "Ready").is_some_and(|c| c.status == "True")
        })
    })
    .await;
    assert_eq!(
        n.status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .map(|a| a.cpu),
        Some(28)
    );
    wait_for(&pools, &pool_name, "pool status", |p: &ResourcePool| {
        p.status.as_ref().is_some_and(|s| {
            s.nodes.is_some_and(|n| n.total == 1 && n.ready == 1)
                && s.capacity.as_ref().is_some_and(|c| c.cpu == 28)
                && s.allocated
                    .as_ref()
                    .is_some_and(|a| a.cpu == 2 && a.desktops == 1)
                && s.available.as_ref().is_some_and(|a| a.cpu == 26)
                && s.desktops.get("Scheduled") == Some(&1)
                && s.desktops.get("Pending") == Some(&1)
                && cond(&s.conditions, "Ready").is_some_and(|c| c.status == "True")
        })
    })
    .await;

    // Host loss and return.
    alive.store(false, Ordering::Relaxed);
    wait_for(&nodes, &node, "HeartbeatLost", |n: &DomainNode| {
        n.status
            .as_ref()
            .and_then(|s| cond(&s.conditions, "Ready"))
            .is_some_and(|c| c.status == "Unknown" && c.reason == "HeartbeatLost")
    })
    .await;
    wait_for(&desks, "bound", "phase Unknown", |d: &Desktop| {
        d.status.as_ref().and_then(|s| s.phase) == Some(deskvirt_crds::desktop::Phase::Unknown)
    })
    .await;
    alive.store(true, Ordering::Relaxed);
    wait_for(&desks, "bound", "phase back", |d: &Desktop| {
        d.status.as_ref().and_then(|s| s.phase) == Some(deskvirt_crds::desktop::Phase::Scheduled)
    })
    .await;

    // Clean up what this test created (the namespace goes with the guard).
    done.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), op).await;
    let _ = nodes.delete(&node, &DeleteParams::default()).await;
    let _ = pools.delete(&pool_name, &DeleteParams::default()).await;
}
