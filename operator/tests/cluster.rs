//! The operator in-process against the real API server, with a fake node-agent that writes
//! DomainNodes, heartbeat Leases and host facts exactly as the agent does: binding and field
//! ownership, unschedulable reasons, host loss and return, pool arithmetic. Objects carry a
//! per-test label the operator is restricted to, so concurrent test runs never see each other's
//! objects, and the run's guard removes them however the test ends.

mod common;

use common::{Setup, cond, node_of, secret_value, wait_for, wait_phase};
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use deskvirt_operator::metrics::{PoolPhase, PoolResource};
use kube::api::PostParams;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::json;

#[tokio::test]
async fn binds_reports_unschedulable_tracks_host_loss_and_pool_status() {
    let t = Setup::new("op-cluster", json!({}), 3).await;
    let (run, pool_name, node) = (&t.run, &t.host.pool, &t.host.node);

    let desks = run.desktops();
    for d in [
        run.desktop("bound", pool_name, 2, "2Gi"),
        run.desktop("nopool", &format!("missing-{}", run.id), 2, "2Gi"),
        run.desktop("huge", pool_name, 200, "2Gi"),
    ] {
        desks
            .create(&PostParams::default(), &d)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    // Binding and field ownership.
    let d = wait_for(&desks, "bound", "binding", |d: &Desktop| {
        node_of(d) == Some(node.as_str())
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
            == Some(node)
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
    let secret = wait_for(&run.secrets(), "bound-console", "console secret", |_| true).await;
    assert!(secret_value(&secret, "password").is_some_and(|p| p.len() >= 32));
    let vv = secret_value(&secret, "console.vv").unwrap_or_default();
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
    let nodes = run.nodes();
    let n = wait_for(&nodes, node, "host Ready", |n: &DomainNode| {
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
    wait_for(
        &run.pools(),
        pool_name,
        "pool status",
        |p: &ResourcePool| {
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
        },
    )
    .await;

    // The same figures as gauges, for the chart's alerts.
    let gauge = |family: &Family<PoolResource, Gauge>, resource| {
        family
            .get_or_create(&PoolResource {
                pool: pool_name.clone(),
                resource,
            })
            .get()
    };
    assert_eq!(gauge(&t.operator.metrics.pool_capacity, "cpu"), 28);
    assert_eq!(gauge(&t.operator.metrics.pool_allocated, "cpu"), 2);
    let phase = PoolPhase {
        pool: pool_name.clone(),
        phase: "Pending".into(),
    };
    assert_eq!(t.operator.metrics.desktops.get_or_create(&phase).get(), 1);

    // Host loss and return.
    t.host.heartbeat.set_alive(false);
    wait_for(&nodes, node, "HeartbeatLost", |n: &DomainNode| {
        n.status
            .as_ref()
            .and_then(|s| cond(&s.conditions, "Ready"))
            .is_some_and(|c| c.status == "Unknown" && c.reason == "HeartbeatLost")
    })
    .await;
    let ev = run.event(node, "HostLost").await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    wait_phase(&desks, "bound", Phase::Unknown).await;
    t.host.heartbeat.set_alive(true);
    wait_phase(&desks, "bound", Phase::Scheduled).await;

    // A desktop with dedicated CPUs takes threads from the host's `dedicatedCpus` though the
    // host's own object does not change; deleting it gives them back.
    let free = |n: &DomainNode| {
        n.status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .map(|a| a.dedicated_cpus)
    };
    let before = free(&nodes.get(node).await.unwrap_or_else(|e| panic!("{e}")));
    let Some(before) = before else {
        panic!("no allocatable.dedicatedCpus on {node}");
    };
    let mut pinned = run.desktop("pinned", pool_name, 2, "1Gi");
    pinned.spec.performance.dedicated_cpus = true;
    desks
        .create(&PostParams::default(), &pinned)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(&nodes, node, "2 threads pinned", |n: &DomainNode| {
        free(n) == Some(before - 2)
    })
    .await;
    desks
        .delete("pinned", &Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(&nodes, node, "the threads given back", |n: &DomainNode| {
        free(n) == Some(before)
    })
    .await;
}

/// A host that cannot start a desktop because another process listens on its SPICE port says
/// so (`Running=False SpicePortBusy`, as the agent writes it): the operator moves the desktop to
/// another port on the same host, with a Warning, and no desktop gets the taken port; a report
/// about the port it has left moves nothing more.
#[tokio::test]
async fn a_spice_port_taken_on_the_host_moves_the_desktop_to_another() {
    use deskvirt_crds::constants::MANAGER_AGENT;
    use kube::api::{Patch, PatchParams};

    let t = Setup::new("op-busy", json!({}), 30).await;
    let (run, pool, node) = (&t.run, &t.host.pool, &t.host.node);
    let desks = run.desktops();
    run.create_desktop("a", pool).await;
    let before = wait_for(&desks, "a", "binding", |d: &Desktop| node_of(d).is_some()).await;
    let (_, Some(busy), mac) = common::binding(&before) else {
        panic!("bound without a port: {before:?}")
    };

    let report = |running: serde_json::Value| {
        let desks = desks.clone();
        async move {
            let body = json!({
                "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
                "metadata": { "name": "a" },
                "status": { "conditions": [
                    { "type": "DomainDefined", "status": "True", "reason": "Defined",
                      "message": "defined", "lastTransitionTime": "2026-01-01T00:00:00Z" },
                    running,
                ] }
            });
            desks
                .patch_status(
                    "a",
                    &PatchParams::apply(MANAGER_AGENT).force(),
                    &Patch::Apply(&body),
                )
                .await
                .unwrap_or_else(|e| panic!("agent status: {e}"));
        }
    };
    let taken = |port: u16| {
        json!({ "type": "Running", "status": "False", "reason": "SpicePortBusy",
                "message": deskvirt_core::spice::busy_message(port, "failed to initialize spice server"),
                "lastTransitionTime": "2026-01-01T00:00:01Z" })
    };
    report(taken(busy)).await;
    let moved = wait_for(&desks, "a", "another port", |d: &Desktop| {
        let (_, p, _) = common::binding(d);
        p.is_some() && p != Some(busy)
    })
    .await;
    let (host, port, mac_now) = common::binding(&moved);
    assert_eq!(host.as_deref(), Some(node.as_str()), "same host");
    assert_eq!(mac_now, mac, "same MAC");
    assert_eq!(
        moved.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Starting),
        "not Failed: the operator is fixing it"
    );
    let event = run.event("a", "SpicePortBusy").await;
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains(&format!("SPICE port {busy} is taken")),
        "{note}"
    );
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(t.operator.metrics.busy_ports_moved.get(), 1);

    // The taken port stays out of use: the next desktop gets neither it nor a's.
    run.create_desktop("b", pool).await;
    let b = wait_for(&desks, "b", "binding", |d: &Desktop| node_of(d).is_some()).await;
    let (_, b_port, _) = common::binding(&b);
    assert!(
        b_port.is_some() && b_port != Some(busy) && b_port != port,
        "{b_port:?}"
    );
    // The pool counts it apart from the ports its desktops hold.
    wait_for(
        &run.pools(),
        pool,
        "the taken port counted",
        |p: &ResourcePool| {
            let ports = p.status.as_ref().and_then(|s| s.ports);
            ports.is_some_and(|u| u.used == 2 && u.taken == 1)
        },
    )
    .await;

    // The host starts it on the new port; the old report is gone and nothing moves again.
    report(
        json!({ "type": "Running", "status": "True", "reason": "Running",
                   "message": "the domain runs", "lastTransitionTime": "2026-01-01T00:00:02Z" }),
    )
    .await;
    let running = wait_phase(&desks, "a", Phase::Running).await;
    assert_eq!(common::binding(&running).1, port);
    assert_eq!(t.operator.metrics.busy_ports_moved.get(), 1);
}

/// A pool that pins a CPU model places its desktops only on hosts that list the model: a host
/// that does not is left out of the pool's capacity and counted by name in `Scheduled`; when no
/// ready host runs it, the desktop is `Scheduled=False CpuModelUnsupported`, naming the model.
#[tokio::test]
async fn a_pinned_cpu_model_places_desktops_only_on_hosts_that_run_it() {
    let t = Setup::new("op-cpu", json!({ "cpu": { "model": "Westmere" } }), 30).await;
    let (run, pool, lacking) = (&t.run, &t.host.pool, &t.host.node);
    run.host_with_cpu_models(lacking, 8, "16Gi", Some(&["qemu64"]))
        .await;
    let able = format!("op-node-able-{}", run.id);
    run.host_with_cpu_models(&able, 8, "16Gi", Some(&["qemu64", "Westmere"]))
        .await;
    let _heartbeat = run.heartbeat(&able, 30);

    let desks = run.desktops();
    for name in ["one", "two"] {
        run.create_desktop(name, pool).await;
        let d = wait_for(&desks, name, "binding", |d: &Desktop| node_of(d).is_some()).await;
        assert_eq!(
            node_of(&d),
            Some(able.as_str()),
            "{name} on a host without Westmere"
        );
    }
    let p = wait_for(&run.pools(), pool, "one node ready", |p: &ResourcePool| {
        p.status
            .as_ref()
            .and_then(|s| s.nodes)
            .is_some_and(|n| n.total == 2 && n.ready == 1)
    })
    .await;
    assert_eq!(p.status.and_then(|s| s.capacity).map(|c| c.cpu), Some(28));

    // The able host stops listing the model: nothing is left that runs it.
    run.host_with_cpu_models(&able, 8, "16Gi", Some(&["qemu64"]))
        .await;
    run.create_desktop("three", pool).await;
    let d = wait_for(&desks, "three", "CpuModelUnsupported", |d: &Desktop| {
        d.status
            .as_ref()
            .and_then(|s| cond(&s.conditions, "Scheduled"))
            .is_some_and(|c| c.status == "False" && c.reason == "CpuModelUnsupported")
    })
    .await;
    let msg = d
        .status
        .as_ref()
        .and_then(|s| cond(&s.conditions, "Scheduled"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains("0 of 2 hosts fit: 2 cannot run CPU model Westmere"),
        "{msg}"
    );
    assert_eq!(node_of(&d), None);
}
