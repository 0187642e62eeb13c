//! Deleting Desktops against the real API server (Kubernetes 1.20, where a status apply takes
//! over the managedFields entry of the same manager's metadata apply): the operator's finalizer
//! comes off after the agent's, the console mirror goes with the Desktop, and a Desktop of a
//! host lost past `failover.after` finishes deleting only when annotated `force-delete`.

mod common;

use std::time::Duration;

use common::{
    Setup, agent_adds_finalizer, agent_removes_finalizer, agent_reports, cond, delete, node_of,
    secret_value, wait_for, wait_gone, wait_phase,
};
use deskvirt_crds::Desktop;
use deskvirt_crds::constants::{
    ANNOTATION_DESKTOP, ANNOTATION_FORCE_DELETE, FINALIZER_AGENT, FINALIZER_OPERATOR,
    LABEL_DESKTOP_UID, LABEL_MANAGED_BY, LABEL_NODE, console_mirror_name,
};
use deskvirt_crds::desktop::Phase;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use serde_json::json;

fn ready_reason(d: &Desktop) -> Option<(String, String)> {
    let c = cond(&d.status.as_ref()?.conditions, "Ready")?;
    Some((c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn deleting_a_bound_desktop_removes_both_finalizers_and_its_mirror() {
    let t = Setup::new("op-delete", json!({}), 10).await;
    let (run, pool, node) = (&t.run, &t.host.pool, &t.host.node);
    let desks = run.desktops();
    let created = run.create_desktop("d1", pool).await;
    let uid = created.uid().unwrap_or_default();

    // Bound; the mirror is there with the binding's host and the user's password.
    let d = wait_for(&desks, "d1", "binding", |d: &Desktop| node_of(d).is_some()).await;
    assert_eq!(node_of(&d), Some(node.as_str()));
    let mirror = wait_for(
        &run.secrets(),
        &console_mirror_name(&uid),
        "console mirror",
        |_| true,
    )
    .await;
    let labels = mirror.labels();
    assert_eq!(labels.get(LABEL_NODE), Some(node), "{labels:?}");
    assert_eq!(labels.get(LABEL_DESKTOP_UID), Some(&uid), "{labels:?}");
    assert_eq!(
        labels.get(LABEL_MANAGED_BY).map(String::as_str),
        Some("deskvirt-operator")
    );
    assert_eq!(
        mirror.annotations().get(ANNOTATION_DESKTOP),
        Some(&format!("{}/d1", run.ns))
    );
    let password = secret_value(&mirror, "password").unwrap_or_default();
    assert!(password.len() >= 32, "a password of 128 bits or more");
    let user = wait_for(&run.secrets(), "d1-console", "user secret", |_| true).await;
    assert_eq!(secret_value(&user, "password"), Some(password));

    // The agent takes the desktop on; the operator then writes status again, as it does all
    // the time, after its metadata apply.
    agent_adds_finalizer(&desks, "d1").await;
    agent_reports(&desks, "d1", true, true).await;
    wait_phase(&desks, "d1", Phase::Running).await;

    // Delete: the operator waits for the host, saying so, and keeps its finalizer.
    delete(&desks, "d1").await;
    let d = wait_for(&desks, "d1", "WaitingForHostCleanup", |d: &Desktop| {
        ready_reason(d).is_some_and(|(r, _)| r == "WaitingForHostCleanup")
    })
    .await;
    let (_, message) = ready_reason(&d).unwrap_or_default();
    assert!(
        message.contains(&format!("waiting for host {node}")),
        "{message}"
    );
    assert!(d.finalizers().iter().any(|f| f == FINALIZER_OPERATOR));

    // The host is clean: both finalizers come off and the Desktop is gone, mirror with it.
    agent_removes_finalizer(&desks, "d1").await;
    wait_gone(&desks, "d1", "the desktop to be deleted").await;
    wait_gone(
        &run.secrets(),
        &console_mirror_name(&uid),
        "the mirror to be deleted",
    )
    .await;
    // The user's Secret is owned by the Desktop: the garbage collector takes it.
    wait_gone(
        &run.secrets(),
        "d1-console",
        "the user secret to be collected",
    )
    .await;
}

#[tokio::test]
async fn force_delete_finishes_a_desktop_of_a_host_lost_past_failover_after() {
    let t = Setup::new("op-force", json!({ "failover": { "after": "3s" } }), 2).await;
    let (run, pool, node) = (&t.run, &t.host.pool, &t.host.node);
    let desks = run.desktops();
    let uid = run
        .create_desktop("lost", pool)
        .await
        .uid()
        .unwrap_or_default();
    wait_for(&desks, "lost", "binding", |d: &Desktop| {
        node_of(d).is_some()
    })
    .await;
    wait_for(
        &run.secrets(),
        &console_mirror_name(&uid),
        "console mirror",
        |_| true,
    )
    .await;
    agent_adds_finalizer(&desks, "lost").await;

    // The host dies with the domain on it; the Desktop is deleted.
    t.host.heartbeat.set_alive(false);
    wait_phase(&desks, "lost", Phase::Unknown).await;
    delete(&desks, "lost").await;

    // Past failover.after without the annotation it stays, and says what would end the wait.
    let d = wait_for(&desks, "lost", "the force-delete hint", |d: &Desktop| {
        ready_reason(d).is_some_and(|(r, m)| {
            r == "WaitingForHostCleanup"
                && m.contains("longer than")
                && m.contains(ANNOTATION_FORCE_DELETE)
        })
    })
    .await;
    assert!(d.metadata.deletion_timestamp.is_some());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = desks
        .get("lost")
        .await
        .unwrap_or_else(|e| panic!("the desktop must stay without the annotation: {e}"));
    assert!(d.finalizers().iter().any(|f| f == FINALIZER_AGENT));
    assert!(d.finalizers().iter().any(|f| f == FINALIZER_OPERATOR));

    // With the annotation it finishes, with a Warning Event saying the host was not cleaned.
    let patch = json!({ "metadata": { "annotations": { ANNOTATION_FORCE_DELETE: "true" } } });
    desks
        .patch("lost", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_gone(&desks, "lost", "the forced deletion").await;
    let ev = run.event("lost", "ForceDeleted").await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    let note = ev.note.unwrap_or_default();
    assert!(
        note.contains(node.as_str()) && note.contains("without host cleanup"),
        "{note}"
    );
    wait_gone(
        &run.secrets(),
        &console_mirror_name(&uid),
        "the mirror to be deleted",
    )
    .await;
}
