//! Capacity truth on the real API server, with a fake agent that reports the running domain's
//! size as the agent does: a resize that fits waits for a restart and is charged at the larger
//! of old and new, one that does not fit is refused naming what is missing (the old size keeps
//! running and counting), a shrink is charged the old size until the restart, and a
//! `spec.pool` edit never moves the binding.

mod common;

use common::{Run, cond, desktop_conditions, eventually, node_of, wait_for};
use deskvirt_crds::constants::MANAGER_AGENT;
use deskvirt_crds::{Desktop, ResourcePool};
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

/// The fake agent: the domain runs with `cpu` vCPUs and `memory`.
async fn runs_with(run: &Run, name: &str, cpu: u32, memory: &str) {
    let c = |t: &str| {
        json!({ "type": t, "status": "True", "reason": t, "message": "reported by the fake agent",
                "lastTransitionTime": "2024-01-01T00:00:00Z" })
    };
    let body = json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": name },
        "status": {
            "conditions": [c("DomainDefined"), c("Running")],
            "runningSize": { "cpu": cpu, "memory": memory },
        }
    });
    let pp = PatchParams::apply(MANAGER_AGENT).force();
    run.desktops()
        .patch_status(name, &pp, &Patch::Apply(&body))
        .await
        .unwrap_or_else(|e| panic!("agent status of {name}: {e}"));
}

async fn edit(run: &Run, name: &str, spec: serde_json::Value) {
    run.desktops()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": spec })),
        )
        .await
        .unwrap_or_else(|e| panic!("editing {name}: {e}"));
}

/// Waits for `type_` to say `status` with `reason` at the desktop's current generation.
async fn wait_condition(run: &Run, name: &str, type_: &str, status: &str, reason: &str) -> Desktop {
    wait_for(
        &run.desktops(),
        name,
        &format!("{type_}={status} {reason}"),
        |d: &Desktop| {
            cond(desktop_conditions(d), type_).is_some_and(|c| {
                c.status == status
                    && c.reason == reason
                    && c.observed_generation == d.metadata.generation
            })
        },
    )
    .await
}

fn allocation(d: &Desktop) -> (String, u32, String) {
    let a = d
        .status
        .as_ref()
        .and_then(|s| s.allocation.clone())
        .unwrap_or_else(|| panic!("no allocation: {d:?}"));
    (a.pool, a.cpu, a.memory)
}

/// Waits until the pool's status says `cpu` vCPUs and `memory` are allocated.
async fn wait_allocated(run: &Run, pool: &str, cpu: u32, memory: &str) {
    let pools = run.pools();
    eventually(
        &format!("pool {pool} allocated {cpu} CPU / {memory}"),
        || {
            let pools = pools.clone();
            async move {
                let p: ResourcePool = pools.get(pool).await.ok()?;
                let a = p.status?.allocated?;
                (a.cpu == cpu && a.memory == memory).then_some(())
            }
        },
    )
    .await
}

#[tokio::test]
async fn resizes_are_admitted_at_restart_refused_when_they_do_not_fit_and_pools_never_change() {
    let run = Run::new("op-resize").await;
    let _op = run.operator(&format!("op-resize-{}", run.id), &[]);
    // A host of 4 threads and 8 GiB, nothing reserved, no overcommit: 4 vCPU and 8 GiB.
    let exact = json!({ "overcommit": { "cpu": 1.0, "memory": 1.0 },
                        "reserved": { "cpu": 0, "memory": "0" } });
    let (pool, other_pool) = (format!("rs-{}", run.id), format!("rs-other-{}", run.id));
    run.pool(&pool, exact.clone()).await;
    let node = format!("rs-node-{}", run.id);
    run.host(&node, 4, "8Gi").await;
    let _hb = run.heartbeat(&node, 30);

    let desks = run.desktops();
    desks
        .create(&PostParams::default(), &run.desktop("d", &pool, 2, "2Gi"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let d = wait_for(&desks, "d", "binding", |d: &Desktop| node_of(d).is_some()).await;
    assert_eq!(allocation(&d), (pool.clone(), 2, "2Gi".into()));
    let bound = d.status.as_ref().and_then(|s| s.spice.clone());
    runs_with(&run, "d", 2, "2Gi").await;
    wait_condition(&run, "d", "SizeApplied", "True", "Applied").await;
    wait_allocated(&run, &pool, 2, "2Gi").await;

    // Too big for the host: refused, naming what is missing; the old size stays admitted.
    edit(&run, "d", json!({ "cpu": 16, "memory": "64Gi" })).await;
    let d = wait_condition(&run, "d", "SizeApplied", "False", "InsufficientCapacity").await;
    let msg = cond(desktop_conditions(&d), "SizeApplied")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains(&format!("host {node} has 4 vCPU and 8Gi free"))
            && msg.contains("16 vCPU and 64Gi do not fit"),
        "{msg}"
    );
    assert_eq!(allocation(&d), (pool.clone(), 2, "2Gi".into()));
    run.event("d", "InsufficientCapacity").await;

    // A growth that fits: admitted, applied at the next restart, charged at the larger size.
    edit(&run, "d", json!({ "cpu": 3, "memory": "4Gi" })).await;
    let d = wait_condition(&run, "d", "SizeApplied", "False", "RestartRequired").await;
    assert_eq!(allocation(&d), (pool.clone(), 3, "4Gi".into()));
    wait_allocated(&run, &pool, 3, "4Gi").await;

    // A shrink: the running domain still has 2 vCPU and 2 GiB, so the host pays the larger
    // (3 vCPU admitted a moment ago never ran: the charge is the old running size per dimension).
    edit(&run, "d", json!({ "cpu": 1, "memory": "1Gi" })).await;
    let d = wait_condition(&run, "d", "SizeApplied", "False", "RestartRequired").await;
    assert_eq!(allocation(&d), (pool.clone(), 1, "1Gi".into()));
    wait_allocated(&run, &pool, 2, "2Gi").await;

    // Restarted with the new size: charged what runs.
    runs_with(&run, "d", 1, "1Gi").await;
    wait_condition(&run, "d", "SizeApplied", "True", "Applied").await;
    wait_allocated(&run, &pool, 1, "1Gi").await;

    // A pool edit after binding: refused; the binding, its port and its pool stay.
    run.pool(&other_pool, exact).await;
    edit(&run, "d", json!({ "pool": other_pool })).await;
    let d = wait_condition(&run, "d", "PoolApplied", "False", "PoolChangeRefused").await;
    assert_eq!(allocation(&d).0, pool);
    assert_eq!(node_of(&d), Some(node.as_str()));
    assert_eq!(d.status.as_ref().and_then(|s| s.spice.clone()), bound);
    assert_eq!(
        d.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("deskvirt.io/pool")),
        Some(&pool)
    );
    run.event("d", "PoolChangeRefused").await;
    wait_allocated(&run, &pool, 1, "1Gi").await;

    // A second desktop still gets a port other than the first's (the ledger kept it in its pool).
    desks
        .create(&PostParams::default(), &run.desktop("e", &pool, 1, "1Gi"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let e = wait_for(&desks, "e", "binding", |d: &Desktop| node_of(d).is_some()).await;
    let port = |d: &Desktop| {
        d.status
            .as_ref()
            .and_then(|s| s.spice.as_ref())
            .and_then(|s| s.port)
    };
    assert_ne!(port(&e), port(&d));

    // Set back: applied again.
    edit(&run, "d", json!({ "pool": pool })).await;
    wait_condition(&run, "d", "PoolApplied", "True", "Bound").await;
}

/// Two resizes on one host decided at the same moment, each fitting alone but not together:
/// exactly one is admitted (the ledger lock and the admitted-but-not-yet-seen growth of the
/// other), and what the pool counts is what was admitted.
#[tokio::test]
async fn concurrent_resizes_never_admit_more_than_the_host_holds() {
    let run = Run::new("op-resize-race").await;
    let _op = run.operator(&format!("op-resize-race-{}", run.id), &[]);
    let exact = json!({ "overcommit": { "cpu": 1.0, "memory": 1.0 },
                        "reserved": { "cpu": 0, "memory": "0" } });
    let pool = format!("rr-{}", run.id);
    run.pool(&pool, exact).await;
    let node = format!("rr-node-{}", run.id);
    run.host(&node, 4, "8Gi").await;
    let _hb = run.heartbeat(&node, 30);
    let desks = run.desktops();
    for name in ["a", "b"] {
        desks
            .create(&PostParams::default(), &run.desktop(name, &pool, 1, "2Gi"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        wait_for(&desks, name, "binding", |d: &Desktop| node_of(d).is_some()).await;
        runs_with(&run, name, 1, "2Gi").await;
        wait_condition(&run, name, "SizeApplied", "True", "Applied").await;
    }
    wait_allocated(&run, &pool, 2, "4Gi").await;

    // Each to 2 vCPU and 5 GiB: one fits (3 vCPU, 7 GiB charged), both do not (4, 10 GiB).
    tokio::join!(
        edit(&run, "a", json!({ "cpu": 2, "memory": "5Gi" })),
        edit(&run, "b", json!({ "cpu": 2, "memory": "5Gi" })),
    );
    let decided = |d: &Desktop| {
        cond(desktop_conditions(d), "SizeApplied")
            .filter(|c| c.observed_generation == d.metadata.generation)
            .map(|c| c.reason.clone())
    };
    let mut reasons = Vec::new();
    for name in ["a", "b"] {
        let d = wait_for(&desks, name, "a size decision", |d: &Desktop| {
            decided(d).is_some()
        })
        .await;
        reasons.push((name, decided(&d).unwrap_or_default(), allocation(&d)));
    }
    let admitted = reasons
        .iter()
        .filter(|(_, r, _)| r == "RestartRequired")
        .count();
    let refused = reasons
        .iter()
        .filter(|(_, r, _)| r == "InsufficientCapacity")
        .count();
    assert_eq!((admitted, refused), (1, 1), "{reasons:?}");
    wait_allocated(&run, &pool, 3, "7Gi").await;
}
