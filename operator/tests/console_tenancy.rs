//! The user's console Secret against the real API server, with hostile tenants in mind: a
//! `<desktop>-console` Secret the operator did not create is left byte for byte as it was and
//! named in the Desktop's `ConsoleSecret` condition (also when it replaces the operator's own
//! later, and when the Desktop is deleted), and a Desktop in a namespace the administrator did
//! not allow gets no Secret and a condition saying so.

mod common;

use common::{Run, Setup, cond, node_of, secret_value, wait_for, wait_gone};
use deskvirt_crds::Desktop;
use deskvirt_crds::constants::condition::CONSOLE_SECRET;
use deskvirt_crds::constants::{ANNOTATION_CONSOLE_SECRET_UID, console_mirror_name};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// The `ConsoleSecret` condition's status and reason, when set.
fn console(d: &Desktop) -> Option<(String, String, String)> {
    let c = cond(&d.status.as_ref()?.conditions, CONSOLE_SECRET)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn has_console(d: &Desktop, status: &str, reason: &str) -> bool {
    console(d).is_some_and(|(s, r, _)| s == status && r == reason)
}

/// Waits for `ConsoleSecret=False` with `reason` on Desktop `name`; such a desktop names no
/// password Secret in its status. Returns it and the condition's message.
async fn refused(run: &Run, name: &str, reason: &str) -> (Desktop, String) {
    let what = format!("ConsoleSecret {reason}");
    let d = wait_for(&run.desktops(), name, &what, |d: &Desktop| {
        has_console(d, "False", reason)
    })
    .await;
    let spice = d.status.as_ref().and_then(|s| s.spice.as_ref());
    assert_eq!(spice.and_then(|s| s.password_secret.clone()), None);
    let (_, _, message) = console(&d).unwrap_or_default();
    (d, message)
}

/// A tenant's own Secret, named like a desktop's console Secret.
fn foreign(name: &str) -> Secret {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "team": "own" } },
        "stringData": { "password": "the tenant's own", "note": "not deskvirt's" }
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Everything of a Secret that a write would change.
fn fingerprint(s: &Secret) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        s.uid(),
        s.resource_version(),
        s.metadata.labels,
        s.metadata.annotations,
        s.metadata.owner_references,
        s.data
    )
}

/// Asserts that the Secret `theirs` reads back exactly as it was.
async fn unchanged(secrets: &kube::Api<Secret>, theirs: &Secret, what: &str) {
    let now = secrets
        .get(&theirs.name_any())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fingerprint(&now), fingerprint(theirs), "{what}");
}

async fn touch(run: &Run, name: &str, value: &str) {
    let patch = json!({ "metadata": { "annotations": { "example.com/touched": value } } });
    run.desktops()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_console_secret_the_operator_did_not_create_is_never_written() {
    let t = Setup::new("op-foreign", json!({}), 10).await;
    let (run, pool) = (&t.run, &t.host.pool);
    let (desks, secrets) = (run.desktops(), run.secrets());
    let pp = PostParams::default();

    // 1. A tenant's Secret is there first.
    let theirs = secrets
        .create(&pp, &foreign("f1-console"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let uid = run
        .create_desktop("f1", pool)
        .await
        .uid()
        .unwrap_or_default();
    let (d, message) = refused(run, "f1", "SecretNotOurs").await;
    assert!(
        message.contains(&format!("{}/f1-console", run.ns)),
        "{message}"
    );
    assert!(node_of(&d).is_some(), "the desktop is bound all the same");
    unchanged(&secrets, &theirs, "the tenant's Secret changed").await;
    run.event("f1", "SecretNotOurs").await;

    // 2. Gone: the operator writes its own, records its UID and says so.
    secrets
        .delete("f1-console", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    touch(run, "f1", "1").await;
    let d = wait_for(&desks, "f1", "ConsoleSecret Written", |d: &Desktop| {
        has_console(d, "True", "Written")
    })
    .await;
    let spice = d.status.as_ref().and_then(|s| s.spice.as_ref());
    assert_eq!(
        spice.and_then(|s| s.password_secret.clone()),
        Some("f1-console".into())
    );
    let ours = secrets
        .get("f1-console")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mirror = wait_for(
        &secrets,
        &console_mirror_name(&uid),
        "the recorded UID",
        |m| m.annotations().get(ANNOTATION_CONSOLE_SECRET_UID) == ours.uid().as_ref(),
    )
    .await;
    assert_eq!(
        secret_value(&ours, "password"),
        secret_value(&mirror, "password")
    );

    // 3. Replaced by a tenant's Secret of the same name: the recorded UID no longer matches,
    //    the apiserver refuses the write, the replacement stays as it is.
    secrets
        .delete("f1-console", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let theirs = secrets
        .create(&pp, &foreign("f1-console"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    touch(run, "f1", "2").await;
    refused(run, "f1", "SecretNotOurs").await;
    unchanged(&secrets, &theirs, "the swapped-in Secret changed").await;

    // 4. Deleting the Desktop deletes only the operator's own Secret: this one stays.
    common::delete(&desks, "f1").await;
    wait_gone(&desks, "f1", "the desktop to be deleted").await;
    wait_gone(&secrets, &console_mirror_name(&uid), "the mirror").await;
    unchanged(&secrets, &theirs, "deletion touched the tenant's Secret").await;
}

#[tokio::test]
async fn a_desktop_outside_the_allowed_namespaces_gets_no_secret() {
    let run = Run::new("op-notallowed").await;
    let elsewhere = format!("{}-tenants", run.ns);
    let _operator = run.operator(
        &format!("op-notallowed-{}", run.id),
        &["--console-user-namespaces", &elsewhere],
    );
    let host = run.one_host(json!({}), 10).await;
    let uid = run
        .create_desktop("n1", &host.pool)
        .await
        .uid()
        .unwrap_or_default();
    let (_, message) = refused(&run, "n1", "NamespaceNotAllowed").await;
    assert!(
        message.contains(&run.ns) && message.contains("consoles.userNamespaces"),
        "{message}"
    );
    // The condition is written in the pass that decided not to write the Secret.
    let secret = run
        .secrets()
        .get_opt("n1-console")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        secret.is_none(),
        "a console Secret in a namespace not allowed"
    );
    // The password still exists, for the host, in the console namespace.
    wait_for(
        &run.secrets(),
        &console_mirror_name(&uid),
        "the mirror",
        |_| true,
    )
    .await;
    drop(host);
}
