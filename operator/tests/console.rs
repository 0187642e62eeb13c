//! The console password hand-off against the real API server: rotation on the Desktop's
//! annotation replaces the password in the mirror and in the user's Secret (and nowhere keeps
//! the old one), a deleted user Secret comes back when the Desktop is touched, and a new leader sweeps mirrors whose
//! Desktop is gone while leaving those of live Desktops it does not manage.

mod common;

use common::{Run, Setup, node_of, secret_value, wait_for, wait_gone};
use deskvirt_crds::Desktop;
use deskvirt_crds::constants::{
    ANNOTATION_DESKTOP, ANNOTATION_ROTATE_PASSWORD, LABEL_DESKTOP_UID, LABEL_MANAGED_BY,
    LABEL_NODE, console_mirror_name,
};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn password(s: &Secret) -> String {
    secret_value(s, "password").unwrap_or_default()
}

/// At least 128 bits: 32 or more hex digits.
fn strong(p: &str) -> bool {
    p.len() >= 32 && p.chars().all(|c| c.is_ascii_hexdigit())
}

#[tokio::test]
async fn rotation_replaces_the_password_in_mirror_and_user_secret() {
    let t = Setup::new("op-rotate", json!({}), 10).await;
    let (run, pool, node) = (&t.run, &t.host.pool, &t.host.node);
    let desks = run.desktops();
    let uid = run
        .create_desktop("r1", pool)
        .await
        .uid()
        .unwrap_or_default();
    wait_for(&desks, "r1", "binding", |d: &Desktop| node_of(d).is_some()).await;
    let secrets = run.secrets();
    let mirror_name = console_mirror_name(&uid);
    let old = password(&wait_for(&secrets, &mirror_name, "mirror", |_| true).await);
    assert!(strong(&old), "first password too weak");
    wait_for(&secrets, "r1-console", "user secret", |s: &Secret| {
        password(s) == old
    })
    .await;

    // Rotate.
    let patch = json!({ "metadata": { "annotations": { ANNOTATION_ROTATE_PASSWORD: "1" } } });
    desks
        .patch("r1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mirror = wait_for(&secrets, &mirror_name, "a rotated mirror", |s: &Secret| {
        password(s) != old
    })
    .await;
    let new = password(&mirror);
    assert!(strong(&new), "rotated password too weak");
    assert_eq!(
        mirror.annotations().get(ANNOTATION_ROTATE_PASSWORD),
        Some(&"1".to_string())
    );
    assert_eq!(mirror.labels().get(LABEL_NODE), Some(node));
    let user = wait_for(
        &secrets,
        "r1-console",
        "the rotated user secret",
        |s: &Secret| password(s) == new,
    )
    .await;
    let vv = secret_value(&user, "console.vv").unwrap_or_default();
    assert!(
        vv.contains(&format!("password={new}\n")),
        "console.vv not updated"
    );
    assert!(vv.contains("port=5900"), "{vv}");
    // The old password is kept nowhere, and no Event carries a password.
    for s in [&mirror, &user] {
        let all = serde_json::to_string(s).unwrap_or_default();
        let old_b64 = k8s_openapi::ByteString(old.clone().into_bytes());
        let old_b64 = serde_json::to_string(&old_b64).unwrap_or_default();
        assert!(!all.contains(&old) && !all.contains(old_b64.trim_matches('"')));
    }
    let ev = run.event("r1", "PasswordRotated").await;
    let note = ev.note.unwrap_or_default();
    assert!(!note.contains(&new) && !note.contains(&old));

    // A deleted user Secret comes back with the current password once the Desktop is touched
    // (its spec, labels or annotations: not its status, which changes all the time).
    secrets
        .delete("r1-console", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let touch = json!({ "metadata": { "annotations": { "example.com/touched": "1" } } });
    desks
        .patch("r1", &PatchParams::default(), &Patch::Merge(&touch))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        &secrets,
        "r1-console",
        "the user secret back",
        |s: &Secret| password(s) == new,
    )
    .await;
    // The same annotation value again rotates nothing.
    assert_eq!(
        password(
            &secrets
                .get(&mirror_name)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        ),
        new
    );
}

/// A mirror as the operator writes it, for a Desktop `ns/name` with `uid`.
fn mirror(ns: &str, desktop: &str, uid: &str) -> Secret {
    serde_json::from_value(json!({
        "metadata": {
            "name": console_mirror_name(uid),
            "labels": { LABEL_MANAGED_BY: "deskvirt-operator", LABEL_DESKTOP_UID: uid, LABEL_NODE: "h" },
            "annotations": { ANNOTATION_DESKTOP: format!("{ns}/{desktop}") }
        },
        "stringData": { "password": "0123456789abcdef0123456789abcdef" }
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn a_new_leader_sweeps_mirrors_whose_desktop_is_gone() {
    let run = Run::new("op-sweep").await;
    let secrets = run.secrets();
    let pp = PostParams::default();
    // A Desktop this operator does not manage (no run label), with a mirror: not an orphan.
    let foreign: Desktop = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": "foreign" },
        "spec": { "pool": "elsewhere", "cpu": 1, "memory": "1Gi", "disk": { "image": "b.qcow2" } }
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let foreign = run
        .desktops()
        .create(&pp, &foreign)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let foreign_uid = foreign.uid().unwrap_or_default();
    for m in [
        mirror(&run.ns, "foreign", &foreign_uid),
        mirror(&run.ns, "ghost", "0000-gone"),
        mirror(&run.ns, "foreign", "0000-recreated"),
    ] {
        secrets
            .create(&pp, &m)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let _operator = run.operator(&format!("sweep-{}", run.id), &[]);
    common::wait_leader(&run, &format!("sweep-{}", run.id)).await;
    wait_gone(
        &secrets,
        &console_mirror_name("0000-gone"),
        "the orphan's sweep",
    )
    .await;
    // A Desktop of that name with another UID is another Desktop: the mirror is an orphan too.
    wait_gone(
        &secrets,
        &console_mirror_name("0000-recreated"),
        "the recreated desktop's orphan",
    )
    .await;
    // Let the pass that removed them finish before looking at the survivor.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    secrets
        .get(&console_mirror_name(&foreign_uid))
        .await
        .unwrap_or_else(|e| panic!("a live desktop's mirror was swept: {e}"));
}
