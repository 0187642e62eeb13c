//! Host drains against the real API server, with a fake node-agent: `spec.drain` on a host
//! makes one live DesktopMigration per running desktop, connected ones first and never more at
//! once than the host's migration limit, binds its stopped desktops to another host, and shows
//! its progress in `status.drain` and the `Drained` condition; what cannot move is named with
//! its reason. Clearing the drain deletes its migrations (only its own: a tenant's look-alike is
//! left alone) and removes its status.

mod common;

use common::{RUN_LABEL, Run, cond, node_of, wait_for};
use deskvirt_crds::constants::{MANAGER_AGENT, MANAGER_AGENT_MIGRATION};
use deskvirt_crds::{Desktop, DesktopMigration, DomainNode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

/// Applies what the agent reports of a desktop's domain: defined, running or not, and
/// whether a SPICE client is connected.
async fn agent_says(api: &Api<Desktop>, name: &str, running: bool, connected: bool) {
    let now = Time(Timestamp::now());
    let cond = |t: &str, ok: bool, reason: &str| {
        json!({ "type": t, "status": if ok { "True" } else { "False" }, "reason": reason,
                "message": "reported by the fake agent", "lastTransitionTime": now })
    };
    let body = json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": name },
        "status": {
            "conditions": [
                cond("DomainDefined", true, "Defined"),
                cond("Running", running, if running { "Running" } else { "Shutdown" }),
            ],
            "session": { "connected": connected },
        }
    });
    let pp = PatchParams::apply(MANAGER_AGENT).force();
    api.patch_status(name, &pp, &Patch::Apply(&body))
        .await
        .unwrap_or_else(|e| panic!("agent status of {name}: {e}"));
}

/// The source host's report that the move recorded on desktop `name` completed.
async fn moved(api: &Api<Desktop>, name: &str, source: &str) {
    let d = wait_for(api, name, "a migration recorded", |d: &Desktop| {
        d.status.as_ref().is_some_and(|s| s.migration.is_some())
    })
    .await;
    let uid = d
        .status
        .and_then(|s| s.migration)
        .map(|m| m.uid)
        .unwrap_or_default();
    let body = json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": name },
        "status": { "migrationReport": {
            "uid": uid, "source": source, "state": "Completed",
            "at": Time(Timestamp::now()), "totalMillis": 900, "downtimeMillis": 60, "bytes": 1000,
        } }
    });
    let pp = PatchParams::apply(MANAGER_AGENT_MIGRATION).force();
    api.patch_status(name, &pp, &Patch::Apply(&body))
        .await
        .unwrap_or_else(|e| panic!("migration report of {name}: {e}"));
}

async fn set_spec(nodes: &Api<DomainNode>, node: &str, spec: serde_json::Value) {
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .unwrap_or_else(|e| panic!("spec of {node}: {e}"));
}

/// The drain migrations of the run, by the desktop they move.
async fn drain_migrations(api: &Api<DesktopMigration>) -> Vec<(String, DesktopMigration)> {
    let lp = ListParams::default().labels("deskvirt.io/drain");
    let list = api
        .list(&lp)
        .await
        .unwrap_or_else(|e| panic!("listing migrations: {e}"));
    list.items
        .into_iter()
        .map(|m| (m.spec.desktop.clone(), m))
        .collect()
}

fn drain_of(n: &DomainNode) -> Option<&deskvirt_crds::domain_node::DrainStatus> {
    n.status.as_ref()?.drain.as_ref()
}

#[tokio::test]
async fn a_drain_moves_running_desktops_live_connected_first_and_rebinds_stopped_ones() {
    let run = Run::new("op-drain").await;
    let pool = format!("drain-pool-{}", run.id);
    run.pool(
        &pool,
        json!({ "overcommit": { "cpu": 1 }, "reserved": { "cpu": 0, "memory": "0" },
                "storage": { "shared": true } }),
    )
    .await;
    let (a, b) = (format!("drain-a-{}", run.id), format!("drain-b-{}", run.id));
    let nodes = run.nodes();
    let mut beats = vec![];
    for h in [&a, &b] {
        run.host(h, 8, "16Gi").await;
        beats.push(run.heartbeat(h, 10));
    }
    // Everything lands on host a while b is cordoned.
    set_spec(&nodes, &b, json!({ "unschedulable": true })).await;
    let _op = run.operator(
        &format!("op-drain-{}", run.id),
        &["--migrations-per-host", "1"],
    );
    let desks = run.desktops();
    let migrations: Api<DesktopMigration> = Api::namespaced(run.client.clone(), &run.ns);
    for (name, running, connected) in [
        ("quiet", true, false),
        ("busy", true, true),
        ("off", false, false),
    ] {
        let mut d = run.desktop(name, &pool, 2, "2Gi");
        if !running {
            d.spec.power = deskvirt_core::types::Power::Off;
        }
        desks
            .create(&PostParams::default(), &d)
            .await
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
        let d = wait_for(&desks, name, "bound", |d: &Desktop| node_of(d).is_some()).await;
        assert_eq!(node_of(&d), Some(a.as_str()), "{name} on a");
        agent_says(&desks, name, running, connected).await;
    }
    // A tenant's look-alike of a drain migration, for a desktop that does not exist: labelled
    // and annotated as the drain's, but not owned by the host.
    let forged: DesktopMigration = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopMigration",
        "metadata": { "name": "forged", "labels": { RUN_LABEL: run.id, "deskvirt.io/drain": a },
                      "annotations": { "deskvirt.io/drain-node": a } },
        "spec": { "desktop": "ghost" }
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    migrations
        .create(&PostParams::default(), &forged)
        .await
        .unwrap_or_else(|e| panic!("forged migration: {e}"));
    set_spec(&nodes, &b, json!({ "unschedulable": false })).await;

    set_spec(&nodes, &a, json!({ "drain": true })).await;
    // The stopped desktop is bound to b at once, keeping its disk; its old port is freed.
    let off = wait_for(&desks, "off", "re-bound to b", |d: &Desktop| {
        node_of(d) == Some(b.as_str())
    })
    .await;
    let st = off.status.clone().unwrap_or_default();
    assert_eq!(
        st.last_move
            .as_ref()
            .map(|m| (m.from.as_str(), m.to.as_str())),
        Some((a.as_str(), b.as_str()))
    );
    assert!(st.spice.as_ref().and_then(|s| s.port).is_some());
    run.event("off", "Rebound").await;
    assert!(
        off.labels().get("deskvirt.io/node") == Some(&b),
        "relabelled for b"
    );

    // One live migration at a time (the host's limit), the connected desktop first. The
    // forged look-alike takes no slot.
    let first = wait_for(&nodes, &a, "one desktop migrating", |n: &DomainNode| {
        drain_of(n).is_some_and(|d| d.migrating == 2 && d.remaining == 2)
    })
    .await;
    let made = common::eventually("the first drain migration", || async {
        let made = drain_migrations(&migrations).await;
        (made.len() == 2).then_some(made)
    })
    .await;
    let ours: Vec<_> = made
        .iter()
        .filter(|(_, m)| m.name_any() != "forged")
        .collect();
    assert_eq!(ours.len(), 1, "{made:?}");
    assert_eq!(ours[0].0, "busy", "the connected desktop moves first");
    let owner = &ours[0].1.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("DomainNode", a.as_str())
    );
    let st = first.status.clone().unwrap_or_default();
    let drained = cond(&st.conditions, "Drained").cloned();
    assert_eq!(
        drained.map(|c| (c.status, c.reason)),
        Some(("False".into(), "Draining".into()))
    );
    wait_for(
        &nodes,
        &a,
        "Schedulable False, Draining",
        |n: &DomainNode| {
            n.status.as_ref().is_some_and(|s| {
                cond(&s.conditions, "Schedulable")
                    .is_some_and(|c| c.status == "False" && c.reason == "Draining")
            })
        },
    )
    .await;

    moved(&desks, "busy", &a).await;
    wait_for(&desks, "busy", "moved to b", |d: &Desktop| {
        node_of(d) == Some(b.as_str())
    })
    .await;
    // Then the next one.
    moved(&desks, "quiet", &a).await;
    wait_for(&desks, "quiet", "moved to b", |d: &Desktop| {
        node_of(d) == Some(b.as_str())
    })
    .await;
    let done = wait_for(&nodes, &a, "Drained", |n: &DomainNode| {
        n.status.as_ref().is_some_and(|s| {
            cond(&s.conditions, "Drained").is_some_and(|c| c.status == "True")
                && s.drain
                    .as_ref()
                    .is_some_and(|d| d.remaining == 0 && d.migrated == 2)
        })
    })
    .await;
    assert!(drain_of(&done).is_some_and(|d| d.desktops.is_empty()));
    run.event(&a, "Drained").await;

    // Clearing the drain deletes its migrations, not the tenant's, and its status.
    set_spec(&nodes, &a, json!({ "drain": false })).await;
    let cleared = wait_for(&nodes, &a, "drain status removed", |n: &DomainNode| {
        n.status.as_ref().is_some_and(|s| {
            s.drain.is_none()
                && cond(&s.conditions, "Drained").is_none()
                && cond(&s.conditions, "Schedulable").is_some_and(|c| c.status == "True")
        })
    })
    .await;
    assert!(!cleared.spec.drain);
    common::eventually("the drain's migrations deleted", || async {
        let left = drain_migrations(&migrations).await;
        let names: Vec<_> = left.iter().map(|(_, m)| m.name_any()).collect();
        (names == ["forged"]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn what_a_drain_cannot_move_is_named_with_its_reason() {
    let run = Run::new("op-drain-left").await;
    let host = run
        .one_host(json!({ "storage": { "shared": false } }), 10)
        .await;
    let _op = run.operator(&format!("op-drain-left-{}", run.id), &[]);
    let desks = run.desktops();
    desks
        .create(
            &PostParams::default(),
            &run.desktop("d", &host.pool, 1, "1Gi"),
        )
        .await
        .unwrap_or_else(|e| panic!("creating d: {e}"));
    wait_for(&desks, "d", "bound", |d: &Desktop| node_of(d).is_some()).await;
    agent_says(&desks, "d", true, false).await;
    set_spec(&run.nodes(), &host.node, json!({ "drain": true })).await;
    let n = wait_for(
        &run.nodes(),
        &host.node,
        "the drain's status",
        |n: &DomainNode| drain_of(n).is_some_and(|d| d.remaining == 1),
    )
    .await;
    let left = drain_of(&n).map(|d| d.desktops.clone()).unwrap_or_default();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].desktop, format!("{}/d", run.ns));
    assert_eq!(left[0].reason, "StorageNotShared");
    assert!(
        left[0].message.contains("not shared"),
        "{}",
        left[0].message
    );
    let st = n.status.clone().unwrap_or_default();
    let c = cond(&st.conditions, "Drained").cloned();
    assert!(
        c.is_some_and(|c| c.status == "False" && c.message.contains("1 StorageNotShared")),
        "{:?}",
        st.conditions
    );
    let migrations: Api<DesktopMigration> = Api::namespaced(run.client.clone(), &run.ns);
    assert!(drain_migrations(&migrations).await.is_empty());
}
