//! Two operator replicas in-process against the real API server: only the leader binds; when
//! the leader dies without releasing its Lease, the other takes over once the Lease expires and
//! binds new Desktops, leaving the bindings already written alone.

mod common;

use common::{Host, Run, binding, eventually, node_of, wait_for, wait_leader};
use deskvirt_crds::Desktop;
use serde_json::json;

#[tokio::test]
async fn the_standby_replica_takes_over_when_the_leader_dies() {
    let run = Run::new("op-failover").await;
    let Host {
        pool,
        heartbeat: _heartbeat,
        ..
    } = run.one_host(json!({}), 30).await;

    let (a_id, b_id) = (format!("a-{}", run.id), format!("b-{}", run.id));
    let a = run.operator(&a_id, &["--leader-lease-duration", "2s"]);
    wait_leader(&run, &a_id).await;
    let b = run.operator(&b_id, &["--leader-lease-duration", "2s"]);

    let desks = run.desktops();
    run.create_desktop("first", &pool).await;
    let first = wait_for(&desks, "first", "binding", |d: &Desktop| {
        node_of(d).is_some()
    })
    .await;
    // The counter moves just after the write the test saw.
    eventually("the leader's binding count", || async {
        (a.bindings() == 1).then_some(())
    })
    .await;
    assert_eq!(b.bindings(), 0, "the standby never binds");

    // The leader dies where it stands; its Lease stays until it expires.
    a.kill();
    run.create_desktop("second", &pool).await;
    let second = wait_for(
        &desks,
        "second",
        "binding by the new leader",
        |d: &Desktop| node_of(d).is_some(),
    )
    .await;
    wait_leader(&run, &b_id).await;
    eventually("the new leader's binding count", || async {
        (b.bindings() == 1).then_some(())
    })
    .await;
    let first_now = desks.get("first").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        binding(&first_now),
        binding(&first),
        "a binding never moves"
    );
    let (p1, p2) = (binding(&first).1, binding(&second).1);
    assert_eq!(
        (p1, p2),
        (Some(5900), Some(5901)),
        "ports stay unique across leaders"
    );
    assert_ne!(
        binding(&first).2,
        binding(&second).2,
        "MACs stay unique across leaders"
    );
}
