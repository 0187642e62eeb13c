//! A migration's plan ([`super::plan`]) decided from plain caches, without an API server: what
//! it refuses, where it reserves, what it keeps and what it frees.

use std::time::Duration;

use deskvirt_core::reasons::MigrationReason as R;
use deskvirt_crds::constants::{LABEL_NODE, console_mirror_name};
use deskvirt_crds::{Desktop, DesktopMigration, DomainNode, ResourcePool};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::plan::{self, Decision};
use crate::context::{Ledgers, MigrationSettings, Stores};
use crate::heartbeat::Heartbeat;

const CONSOLES: &str = "consoles";

fn at(s: &str) -> Timestamp {
    s.parse().unwrap_or_else(|e| panic!("{e}"))
}

fn pool(shared: bool) -> ResourcePool {
    serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
        "metadata": {"name": "p", "uid": "pool-uid", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeSelector": {}, "storage": {"shared": shared}}
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn node(name: &str) -> DomainNode {
    serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
        "metadata": {"name": name, "uid": format!("n-{name}"), "resourceVersion": "1"},
        "spec": {},
        "status": {
            "cpu": {"threads": 8, "sockets": 1, "cores": 4, "mhz": 1},
            "memory": "16Gi", "pool": "p",
            "migration": {"uri": format!("qemu+tls://{name}/system")},
            "allocatable": {"cpu": 8, "memory": "14Gi", "dedicatedCpus": 7},
            "conditions": [
                {"type": "LibvirtConnected", "status": "True", "reason": "R", "message": "m",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}
            ]
        }
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Desktop `ns/a` (UID `u-a`) bound to `h1`, running when `running`.
fn desktop(uid: &str, node: Option<&str>, running: bool) -> Desktop {
    let conditions = if running {
        json!([{"type": "Running", "status": "True", "reason": "Running", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}])
    } else {
        json!([])
    };
    serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": {"name": "a", "namespace": "ns", "uid": uid, "resourceVersion": "7",
                     "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"pool": "p", "cpu": 1, "memory": "1Gi", "disk": {"image": "i.qcow2"}},
        "status": {
            "node": node, "mac": "52:54:00:00:00:07", "spice": {"port": 5900},
            "allocation": {"pool": "p", "cpu": 1, "memory": "1Gi"},
            "conditions": conditions
        }
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The operator's console mirror of desktop `uid`, labelled with the host it bound it to.
fn mirror(uid: &str, node: &str) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(console_mirror_name(uid));
    s.metadata.namespace = Some(CONSOLES.into());
    s.metadata.labels = Some([(LABEL_NODE.to_string(), node.to_string())].into());
    s
}

fn migration(name: &str, created: &str, status: serde_json::Value) -> DesktopMigration {
    serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopMigration",
        "metadata": {"name": name, "namespace": "ns", "uid": format!("m-{name}"),
                     "resourceVersion": "3", "generation": 1, "creationTimestamp": created},
        "spec": {"desktop": "a"},
        "status": status
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

struct World {
    stores: Stores,
    ledgers: Ledgers,
    settings: MigrationSettings,
}

impl World {
    fn new(shared: bool, desktops: Vec<Desktop>, migrations: Vec<DesktopMigration>) -> Self {
        let stores = Stores::holding(
            vec![pool(shared)],
            vec![node("h1"), node("h2")],
            desktops,
            CONSOLES,
        )
        .with(migrations, vec![mirror("u-a", "h1")]);
        Self {
            stores,
            ledgers: Ledgers::fresh(),
            settings: MigrationSettings::default(),
        }
    }

    fn pending(&mut self, m: &DesktopMigration, now: &str) -> Decision {
        let alive = |_: &str| Heartbeat::Fresh {
            until: at("2030-01-01T00:00:00Z"),
        };
        plan::pending(
            &self.stores,
            &self.settings,
            &mut self.ledgers,
            m,
            at(now),
            alive,
        )
    }
}

const T0: &str = "2026-01-01T00:00:10Z";

fn reason(d: &Decision) -> Option<R> {
    match d {
        Decision::Wait { reason, .. } | Decision::Fail { reason, .. } => Some(*reason),
        _ => None,
    }
}

#[test]
fn a_running_desktop_in_a_shared_pool_gets_the_other_host_and_a_port_there() {
    let m = migration("m1", "2026-01-01T00:00:00Z", json!({}));
    let mut w = World::new(
        true,
        vec![desktop("u-a", Some("h1"), true)],
        vec![m.clone()],
    );
    let Decision::Reserved(r) = w.pending(&m, T0) else {
        panic!("not reserved: {:?}", w.pending(&m, T0));
    };
    assert_eq!((r.source.as_str(), r.target.as_str()), ("h1", "h2"));
    assert_eq!(r.desktop_uid, "u-a");
    let held = w
        .ledgers
        .get("p")
        .and_then(|l| l.target_of("u-a"))
        .map(|t| (t.host, t.port));
    assert_eq!(held, Some(("h2", r.port)));
    // Again (its status write did not land): the same reservation.
    assert_eq!(w.pending(&m, T0), Decision::Reserved(r));
}

#[test]
fn what_waiting_cannot_change_fails_at_once_and_the_rest_waits_until_the_timeout() {
    let m = migration("m1", "2026-01-01T00:00:00Z", json!({}));
    let mut w = World::new(
        false,
        vec![desktop("u-a", Some("h1"), true)],
        vec![m.clone()],
    );
    assert!(matches!(
        w.pending(&m, T0),
        Decision::Fail {
            reason: R::StorageNotShared,
            ..
        }
    ));

    let mut w = World::new(
        true,
        vec![desktop("u-a", Some("h1"), false)],
        vec![m.clone()],
    );
    assert_eq!(reason(&w.pending(&m, T0)), Some(R::DesktopNotRunning));
    assert!(matches!(w.pending(&m, T0), Decision::Wait { .. }));
    let late = w.pending(&m, "2026-01-01T00:06:00Z");
    assert!(
        matches!(&late, Decision::Fail { reason: R::DesktopNotRunning, message } if message.contains("gave up")),
        "{late:?}"
    );

    let mut w = World::new(true, vec![], vec![m.clone()]);
    assert_eq!(reason(&w.pending(&m, T0)), Some(R::DesktopNotFound));
}

#[test]
fn a_target_named_must_be_another_host_of_the_pool() {
    let mut m = migration("m1", "2026-01-01T00:00:00Z", json!({}));
    let mut w = World::new(
        true,
        vec![desktop("u-a", Some("h1"), true)],
        vec![m.clone()],
    );
    m.spec.target_node = Some("h1".into());
    assert!(matches!(
        w.pending(&m, T0),
        Decision::Fail {
            reason: R::TargetIsSource,
            ..
        }
    ));
    m.spec.target_node = Some("h9".into());
    assert!(matches!(
        w.pending(&m, T0),
        Decision::Fail {
            reason: R::TargetNotInPool,
            ..
        }
    ));
    assert!(w.ledgers.get("p").is_none_or(|l| l.targets().count() == 0));
}

#[test]
fn a_binding_the_operator_did_not_make_is_not_moved() {
    let m = migration("m1", "2026-01-01T00:00:00Z", json!({}));
    // A status naming h2 that the mirror (labelled h1) does not confirm.
    let mut w = World::new(
        true,
        vec![desktop("u-a", Some("h2"), true)],
        vec![m.clone()],
    );
    assert_eq!(reason(&w.pending(&m, T0)), Some(R::DesktopNotBound));
}

#[test]
fn the_older_migration_of_a_desktop_wins_and_a_newer_one_fails() {
    let older = migration("m0", "2026-01-01T00:00:00Z", json!({"phase": "Pending"}));
    let newer = migration("m1", "2026-01-01T00:00:05Z", json!({}));
    let mut w = World::new(
        true,
        vec![desktop("u-a", Some("h1"), true)],
        vec![older, newer.clone()],
    );
    assert!(matches!(
        w.pending(&newer, T0),
        Decision::Fail {
            reason: R::AlreadyMigrating,
            ..
        }
    ));
}

#[test]
fn the_pool_limit_queues_a_migration_behind_those_holding_a_target() {
    let busy = migration(
        "m0",
        "2026-01-01T00:00:00Z",
        json!({"phase": "Scheduling", "desktopUid": "u-b", "source": "h2", "target": "h1",
               "targetPort": 5901}),
    );
    let m = migration("m1", "2026-01-01T00:00:05Z", json!({}));
    let mut b = desktop("u-b", Some("h2"), true);
    b.metadata.name = Some("b".into());
    let mut w = World::new(
        true,
        vec![desktop("u-a", Some("h1"), true), b],
        vec![busy, m.clone()],
    );
    w.settings.limits.per_host = 1;
    let d = w.pending(&m, T0);
    assert!(
        matches!(&d, Decision::Wait { reason: R::Queued, message, .. } if message.contains("h1")),
        "{d:?}"
    );
}

#[test]
fn a_held_target_is_kept_until_the_start_timeout_then_freed() {
    let m = migration(
        "m1",
        "2026-01-01T00:00:00Z",
        json!({"phase": "Scheduling", "desktopUid": "u-a", "source": "h1", "target": "h2",
               "targetPort": 5900, "scheduledTime": "2026-01-01T00:00:10Z"}),
    );
    let mut w = World::new(
        true,
        vec![desktop("u-a", Some("h1"), true)],
        vec![m.clone()],
    );
    let p = w.stores.pool("p").unwrap_or_else(|| panic!("no pool"));
    let _ = w.ledgers.of(&p, &w.stores);
    // The rebuild took the recorded target back.
    let held = w
        .ledgers
        .get("p")
        .and_then(|l| l.target_of("u-a"))
        .map(|t| (t.host, t.port));
    assert_eq!(held, Some(("h2", 5900)));
    let keep = plan::held(
        &w.stores,
        &w.settings,
        &w.ledgers,
        &m,
        at("2026-01-01T00:00:40Z"),
    );
    assert_eq!(keep, Decision::Keep(Duration::from_secs(30)));
    let late = plan::held(
        &w.stores,
        &w.settings,
        &w.ledgers,
        &m,
        at("2026-01-01T00:01:10Z"),
    );
    assert!(matches!(
        late,
        Decision::Fail {
            reason: R::StartTimeout,
            ..
        }
    ));
    assert_eq!(
        plan::release(&w.stores, &mut w.ledgers, &m),
        Some(("h2".into(), 5900))
    );
    assert_eq!(plan::release(&w.stores, &mut w.ledgers, &m), None, "once");
    let lost = plan::held(
        &w.stores,
        &w.settings,
        &w.ledgers,
        &m,
        at("2026-01-01T00:00:40Z"),
    );
    assert!(matches!(
        lost,
        Decision::Fail {
            reason: R::TargetLost,
            ..
        }
    ));
}

#[test]
fn a_host_whose_agent_publishes_no_migration_endpoint_is_no_target() {
    let m = migration("m1", "2026-01-01T00:00:00Z", json!({}));
    let mut closed = node("h2");
    if let Some(s) = closed.status.as_mut() {
        s.migration = None;
    }
    let stores = Stores::holding(
        vec![pool(true)],
        vec![node("h1"), closed],
        vec![desktop("u-a", Some("h1"), true)],
        CONSOLES,
    )
    .with(vec![m.clone()], vec![mirror("u-a", "h1")]);
    let mut w = World {
        stores,
        ledgers: Ledgers::fresh(),
        settings: MigrationSettings::default(),
    };
    let picked = w.pending(&m, T0);
    assert_eq!(reason(&picked), Some(R::NoTarget));
    assert!(
        matches!(&picked, Decision::Wait { message, .. } if message.contains("--migration-uri"))
    );
    let mut named = m.clone();
    named.spec.target_node = Some("h2".into());
    let named = w.pending(&named, T0);
    assert!(
        matches!(&named, Decision::Wait { message, .. } if message.contains("h2 takes in no migrations"))
    );
    assert!(w.ledgers.get("p").is_none_or(|l| l.targets().count() == 0));
}

#[test]
fn a_cold_move_without_shared_storage_goes_only_to_a_host_that_takes_migrations() {
    let mut m = migration("m1", "2026-01-01T00:00:00Z", json!({}));
    m.spec.mode = deskvirt_core::migration::MigrationMode::Cold;
    let mut closed = node("h2");
    if let Some(s) = closed.status.as_mut() {
        s.migration = None;
    }
    let world = |target: DomainNode| World {
        stores: Stores::holding(
            vec![pool(false)],
            vec![node("h1"), target],
            vec![desktop("u-a", Some("h1"), true)],
            CONSOLES,
        )
        .with(vec![m.clone()], vec![mirror("u-a", "h1")]),
        ledgers: Ledgers::fresh(),
        settings: MigrationSettings::default(),
    };
    // The disk is copied by the source's libvirt into the target's: it needs its endpoint.
    let waits = world(closed).pending(&m, T0);
    assert_eq!(reason(&waits), Some(R::NoTarget));
    let goes = world(node("h2")).pending(&m, T0);
    assert!(
        matches!(&goes, Decision::Reserved(r) if r.target == "h2"),
        "{goes:?}"
    );
    // Live stays refused there.
    let mut live = m.clone();
    live.spec.mode = deskvirt_core::migration::MigrationMode::Live;
    let refused = world(node("h2")).pending(&live, T0);
    assert_eq!(reason(&refused), Some(R::StorageNotShared));
}

#[test]
fn the_source_report_moves_a_held_migration_on_and_the_moved_binding_ends_it() {
    let status = json!({"phase": "Running", "desktopUid": "u-a", "source": "h1", "target": "h2",
                        "targetPort": 5900, "scheduledTime": "2026-01-01T00:00:10Z"});
    let m = migration("m1", "2026-01-01T00:00:00Z", status);
    let report = |state: &str| {
        let mut d = desktop("u-a", Some("h1"), true);
        if let Some(s) = d.status.as_mut() {
            s.migration_report = serde_json::from_value(json!({
                "uid": "m-m1", "source": "h1", "state": state, "at": "2026-01-01T00:00:20Z",
                "message": "boom"
            }))
            .unwrap_or_else(|e| panic!("{e}"));
        }
        d
    };
    let held = |d: Desktop, mirror_on: &str| {
        let mut w = World::new(true, vec![d], vec![m.clone()]);
        w.stores = Stores::holding(
            vec![pool(true)],
            vec![node("h1"), node("h2")],
            w.stores
                .desktops
                .state()
                .iter()
                .map(|d| (**d).clone())
                .collect(),
            CONSOLES,
        )
        .with(vec![m.clone()], vec![mirror("u-a", mirror_on)]);
        let p = w.stores.pool("p").unwrap_or_else(|| panic!("no pool"));
        let _ = w.ledgers.of(&p, &w.stores);
        plan::held(
            &w.stores,
            &w.settings,
            &w.ledgers,
            &m,
            at("2026-01-01T01:00:00Z"),
        )
    };
    // Long past the start timeout: moving is not timed out.
    assert_eq!(held(report("Started"), "h1"), Decision::Moving);
    assert_eq!(held(report("Completed"), "h1"), Decision::Moving);
    assert!(matches!(
        held(report("Failed"), "h1"),
        Decision::Fail { reason: R::HostFailed, message } if message.contains("boom")
    ));
    // The Desktop pass moved the binding (status and mirror) to the target.
    let mut there = report("Completed");
    if let Some(s) = there.status.as_mut() {
        s.node = Some("h2".into());
    }
    assert_eq!(held(there.clone(), "h2"), Decision::Arrived);
    // A status naming the target that the mirror does not confirm is no arrival.
    assert_eq!(held(there, "h1"), Decision::Moving);
}

/// Pool `name` selecting the hosts labelled `pool=<name>`, with its own MAC prefix and, with
/// `tenants`, a namespace selector admitting only namespaces labelled `tenant=yes`.
fn other_pool(name: &str, tenants: bool) -> ResourcePool {
    let mut spec = json!({
        "nodeSelector": {"pool": name},
        "network": {"macPrefix": "52:54:01"},
        "storage": {"shared": false}
    });
    if tenants {
        spec["namespaceSelector"] = json!({"matchLabels": {"tenant": "yes"}});
    }
    serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
        "metadata": {"name": name, "uid": format!("pool-{name}"),
                     "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": spec
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn namespace(labels: serde_json::Value) -> k8s_openapi::api::core::v1::Namespace {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "ns", "labels": labels}
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Desktop `a` of pool `p` on h1 (running when `running`), host h3 in pool `q`, and `m`.
fn two_pools(
    m: &DesktopMigration,
    running: bool,
    tenants: bool,
    ns_labels: serde_json::Value,
) -> World {
    // h3 is pool q's: q selects it, and is older than p, which selects every host.
    let mut h3 = node("h3");
    h3.metadata.labels = Some([("pool".to_string(), "q".to_string())].into());
    if let Some(st) = h3.status.as_mut() {
        st.pool = Some("q".into());
    }
    let stores = Stores::holding(
        vec![pool(true), other_pool("q", tenants)],
        vec![node("h1"), node("h2"), h3],
        vec![desktop("u-a", Some("h1"), running)],
        CONSOLES,
    )
    .with(vec![m.clone()], vec![mirror("u-a", "h1")])
    .with_namespaces(vec![namespace(ns_labels)]);
    World {
        stores,
        ledgers: Ledgers::fresh(),
        settings: MigrationSettings::default(),
    }
}

fn to_pool(name: &str, mode: &str) -> DesktopMigration {
    let mut m = migration("m1", "2026-01-01T00:00:00Z", json!({}));
    m.spec.target_pool = Some(name.into());
    m.spec.mode = serde_json::from_value(json!(mode)).unwrap_or_else(|e| panic!("{e}"));
    m
}

#[test]
fn a_move_to_another_pool_reserves_a_host_port_and_mac_of_that_pool() {
    let m = to_pool("q", "Cold");
    let mut w = two_pools(&m, true, false, json!({}));
    let Decision::Reserved(r) = w.pending(&m, T0) else {
        panic!("not reserved: {:?}", w.pending(&m, T0));
    };
    // Of pool q's hosts, never the source's pool's h2.
    assert_eq!((r.source.as_str(), r.target.as_str()), ("h1", "h3"));
    assert_eq!(r.pool, "q");
    let mac = r.mac.clone().unwrap_or_default();
    assert!(mac.starts_with("52:54:01:"), "a MAC of pool q: {mac}");
    let q = w.ledgers.get("q");
    let held = q.and_then(|l| l.target_of("u-a")).map(|t| (t.host, t.port));
    assert_eq!(held, Some(("h3", r.port)));
    assert_eq!(
        q.and_then(|l| l.entry_mac("u-a")).map(|m| m.to_string()),
        Some(mac)
    );
    assert!(
        w.ledgers
            .get("p")
            .and_then(|l| l.target_of("u-a"))
            .is_none(),
        "nothing is held in the desktop's own pool"
    );
    // Again (its status write did not land): the same reservation.
    assert_eq!(w.pending(&m, T0), Decision::Reserved(r));
    // Its own pool named: a move within it.
    let mut w = two_pools(&to_pool("p", "Cold"), true, false, json!({}));
    let Decision::Reserved(r) = w.pending(&to_pool("p", "Cold"), T0) else {
        panic!("not reserved");
    };
    assert_eq!((r.target.as_str(), r.mac), ("h2", None));
}

#[test]
fn a_move_to_another_pool_is_refused_live_suspended_or_where_the_tenant_may_not_go() {
    let live = to_pool("q", "Live");
    let mut w = two_pools(&live, true, false, json!({}));
    assert_eq!(reason(&w.pending(&live, T0)), Some(R::ModeNotSupported));

    let m = to_pool("q", "Cold");
    let mut w = two_pools(&m, true, true, json!({"tenant": "no"}));
    let d = w.pending(&m, T0);
    assert!(
        matches!(&d, Decision::Wait { reason: R::PoolNotAllowed, message, .. }
            if message.contains("spec.targetPool") && message.contains("namespaceSelector")),
        "{d:?}"
    );
    assert!(
        w.ledgers
            .get("q")
            .is_none_or(|l| l.target_of("u-a").is_none())
    );
    let mut w = two_pools(&m, true, true, json!({"tenant": "yes"}));
    assert!(matches!(w.pending(&m, T0), Decision::Reserved(_)));

    let nowhere = to_pool("gone", "Cold");
    let mut w = two_pools(&nowhere, true, false, json!({}));
    let d = w.pending(&nowhere, T0);
    assert!(
        matches!(&d, Decision::Wait { reason: R::PoolNotAllowed, message, .. } if message.contains("gone does not exist")),
        "{d:?}"
    );
}

#[test]
fn a_rebuilt_ledger_of_the_other_pool_takes_back_the_port_and_mac_a_move_reserved_there() {
    let mut m = to_pool("q", "Cold");
    m.status = serde_json::from_value(json!({
        "phase": "Scheduling", "desktopUid": "u-a", "source": "h1", "target": "h3",
        "targetPort": 5900, "targetPool": "q", "targetMac": "52:54:01:00:00:09",
        "scheduledTime": "2026-01-01T00:00:10Z"
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let mut w = two_pools(&m, true, false, json!({}));
    for name in ["p", "q"] {
        let pool = w
            .stores
            .pool(name)
            .unwrap_or_else(|| panic!("no pool {name}"));
        let _ = w.ledgers.of(&pool, &w.stores);
    }
    let q = w.ledgers.get("q");
    let held = q.and_then(|l| l.target_of("u-a")).map(|t| (t.host, t.port));
    assert_eq!(held, Some(("h3", 5900)));
    let mac = q.and_then(|l| l.entry_mac("u-a")).map(|m| m.to_string());
    assert_eq!(mac.as_deref(), Some("52:54:01:00:00:09"));
    assert!(
        w.ledgers
            .get("p")
            .and_then(|l| l.target_of("u-a"))
            .is_none()
    );
    // The desktop keeps its own port and MAC in p until it arrives.
    assert_eq!(
        w.ledgers.get("p").and_then(|l| l.port_of("u-a")),
        Some(("h1", 5900))
    );
    let keep = plan::held(
        &w.stores,
        &w.settings,
        &w.ledgers,
        &m,
        at("2026-01-01T00:00:40Z"),
    );
    assert_eq!(keep, Decision::Keep(Duration::from_secs(30)));
    // Ended: what it held in q goes, and only that.
    let freed = plan::release(&w.stores, &mut w.ledgers, &m);
    assert_eq!(freed, Some(("h3".into(), 5900)));
    let q = w.ledgers.get("q");
    assert_eq!(q.and_then(|l| l.entry_mac("u-a")), None);
    assert_eq!(
        w.ledgers.get("p").and_then(|l| l.port_of("u-a")),
        Some(("h1", 5900))
    );
}

/// `d` pinned to version 3 of DesktopImage `imgs/debian` (UID `img-uid`).
fn pinned(mut d: Desktop) -> Desktop {
    if let Some(s) = d.status.as_mut() {
        s.image = serde_json::from_value(json!({
            "image": "imgs/debian", "uid": "img-uid", "version": 3,
            "file": "managed/img-uid/v3.qcow2", "sha256": "ab".repeat(32)
        }))
        .ok();
    }
    d
}

/// Host `name` reporting version `version` of `img-uid` Ready.
fn holding(name: &str, version: u32) -> DomainNode {
    let mut n = node(name);
    if let Some(s) = n.status.as_mut() {
        s.images = vec![deskvirt_crds::image::HostImage {
            sha256: Some("ab".repeat(32)),
            ..deskvirt_crds::image::HostImage::new(
                "img-uid",
                "imgs/debian",
                version,
                deskvirt_crds::image::CopyPhase::Ready,
            )
        }];
    }
    n
}

fn world_of(nodes: Vec<DomainNode>, d: Desktop, m: &DesktopMigration) -> World {
    let stores = Stores::holding(vec![pool(true)], nodes, vec![d], CONSOLES)
        .with(vec![m.clone()], vec![mirror("u-a", "h1")]);
    World {
        stores,
        ledgers: Ledgers::fresh(),
        settings: MigrationSettings::default(),
    }
}

#[test]
fn a_disk_cloned_from_an_image_goes_only_where_its_version_is_verified() {
    let m = migration("m1", "2026-01-01T00:00:00Z", json!({}));
    let d = pinned(desktop("u-a", Some("h1"), true));
    // h2 holds another version only; h3 holds the pinned one.
    let nodes = vec![holding("h1", 3), holding("h2", 2), holding("h3", 3)];
    let mut w = world_of(nodes, d.clone(), &m);
    let Decision::Reserved(r) = w.pending(&m, T0) else {
        panic!("not reserved: {:?}", w.pending(&m, T0));
    };
    assert_eq!(r.target, "h3");

    // Named, a host without the copy is refused with the image named.
    let mut named = m.clone();
    named.spec.target_node = Some("h2".into());
    let mut w = world_of(
        vec![holding("h1", 3), holding("h2", 2), holding("h3", 3)],
        d.clone(),
        &named,
    );
    let refused = w.pending(&named, T0);
    assert_eq!(reason(&refused), Some(R::NoTarget));
    assert!(
        matches!(&refused, Decision::Wait { message, .. }
            if message.contains("h2 holds no verified copy of DesktopImage imgs/debian v3")),
        "{refused:?}"
    );

    // No other host holds it: the migration waits and says why.
    let mut w = world_of(vec![holding("h1", 3), holding("h2", 2)], d, &m);
    let none = w.pending(&m, T0);
    assert_eq!(reason(&none), Some(R::NoTarget));
    assert!(
        matches!(&none, Decision::Wait { message, .. }
            if message.contains("without a verified copy of DesktopImage imgs/debian v3")),
        "{none:?}"
    );
    assert!(w.ledgers.get("p").is_none_or(|l| l.targets().count() == 0));
}
