//! The bound pass's plan ([`super::bound`]) decided from plain caches, without an API server:
//! what it allocates in the ledger transaction, what the status will say, and what a failed
//! commit gives back. Each test is named after the branch it covers.

use std::time::{Duration, Instant};

use deskvirt_crds::ResourcePool;
use deskvirt_crds::desktop::Desktop;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio::sync::watch;

use super::bound::{Seen, decide};
use super::txn::Txn;
use crate::context::{Context, Ledgers, Namespaces, Stores};
use crate::fence::{self, Fence, Fenced};
use crate::metrics::Metrics;

const UID: &str = "0000-a";

/// A client that answers nothing: the plan must not call the API.
fn no_api() -> kube::Client {
    let service = tower::service_fn(|_req: http::Request<kube::client::Body>| async {
        Err::<http::Response<kube::client::Body>, _>(std::io::Error::other(
            "the plan called the API",
        ))
    });
    kube::Client::new(service, "default")
}

fn pool() -> ResourcePool {
    serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
        "metadata": {"name": "p", "uid": "pool-uid", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeSelector": {}}
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Desktop `ns/a` bound to `h1` with SPICE port `port`, its size recorded.
fn bound(port: u16) -> Desktop {
    serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": {"name": "a", "namespace": "ns", "uid": UID, "resourceVersion": "7",
                     "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"pool": "p", "cpu": 1, "memory": "1Gi", "disk": {"image": "i.qcow2"}},
        "status": {
            "node": "h1", "mac": "52:54:00:00:00:07",
            "spice": {"port": port},
            "allocation": {"pool": "p", "cpu": 1, "memory": "1Gi"}
        }
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The host says another process listens on `port`.
fn port_busy(mut d: Desktop, port: u16) -> Desktop {
    let c = deskvirt_crds::conditions::condition(
        &[],
        deskvirt_crds::constants::condition::RUNNING,
        deskvirt_crds::conditions::Status::False,
        "SpicePortBusy",
        deskvirt_core::spice::busy_message(port, "qemu"),
        Some(1),
        Timestamp::UNIX_EPOCH,
    );
    if let Some(st) = d.status.as_mut() {
        st.conditions.push(c);
    }
    d
}

/// An operator context over these caches, with no API server behind it.
fn context(desktops: Vec<Desktop>) -> Context {
    context_of(Stores::holding(vec![pool()], vec![], desktops, "consoles"))
}

/// An operator context over `stores`, with no API server behind it.
fn context_of(stores: Stores) -> Context {
    let (_tx, leader) = watch::channel(true);
    Context::new(
        no_api(),
        "test",
        Metrics::register(&mut Default::default()),
        Namespaces {
            system: "system".into(),
            console: "consoles".into(),
            users: Default::default(),
        },
        Duration::from_secs(30),
        leader,
        stores,
    )
}

/// A fence that holds for a minute.
fn holding() -> Fence {
    let f = Fence::default();
    f.renewed(Instant::now(), Duration::from_secs(60));
    f
}

#[tokio::test]
async fn port_reported_busy_moves_in_the_transaction_and_is_kept_from_everyone() {
    let d = port_busy(bound(5900), 5900);
    let ctx = context(vec![d.clone()]);
    *ctx.ledgers.lock().await = Ledgers::fresh();
    let seen = Seen::of(&d, UID, "h1", Timestamp::now());
    let (p, undo) = fence::scope(holding(), decide(&seen, &ctx))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let moved = p.moved_port.unwrap_or_else(|| panic!("no move planned"));
    assert_eq!(moved.0, 5900);
    assert_ne!(moved.1, 5900);
    assert_eq!(p.want.port, Some(moved.1), "the status names the new port");
    assert_eq!(p.want.node.as_deref(), Some("h1"), "the host is kept");
    let ledgers = ctx.ledgers.lock().await;
    let Some(l) = ledgers.get("p") else {
        panic!("no ledger")
    };
    assert_eq!(l.port_of(UID), Some(("h1", moved.1)));
    assert_eq!(
        l.ports_taken("h1"),
        1,
        "the busy port is held from every desktop"
    );
    drop(ledgers);
    // Nothing was reserved that a failed commit must give back: the move stays.
    undo.rollback(&ctx, UID).await;
    let ledgers = ctx.ledgers.lock().await;
    assert_eq!(
        ledgers
            .get("p")
            .and_then(|l| l.port_of(UID))
            .map(|(_, p)| p),
        Some(moved.1)
    );
}

#[tokio::test]
async fn a_binding_the_ledger_lost_is_adopted_and_the_status_unchanged() {
    let d = bound(5905);
    let ctx = context(vec![d.clone()]);
    *ctx.ledgers.lock().await = Ledgers::fresh();
    let seen = Seen::of(&d, UID, "h1", Timestamp::now());
    let (p, _) = fence::scope(holding(), decide(&seen, &ctx))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (p.want.port, p.want.mac.as_deref()),
        (Some(5905), Some("52:54:00:00:00:07"))
    );
    assert!(p.moved_port.is_none() && p.delete.is_none() && p.moved_to.is_none());
    let ledgers = ctx.ledgers.lock().await;
    assert!(
        ledgers
            .get("p")
            .is_some_and(|l| l.holds(UID, "h1", 5905, "52:54:00:00:00:07"))
    );
}

#[tokio::test]
async fn a_lapsed_fence_opens_no_transaction() {
    let d = port_busy(bound(5900), 5900);
    let ctx = context(vec![d.clone()]);
    *ctx.ledgers.lock().await = Ledgers::fresh();
    let opened = fence::scope(Fence::default(), async {
        let mut ledgers = ctx.ledgers.lock().await;
        Txn::begin(&mut ledgers, &ctx.stores, "p").map(|_| ())
    })
    .await;
    assert_eq!(opened, Err(Fenced::Lapsed));
    assert!(
        ctx.ledgers.lock().await.get("p").is_none(),
        "nothing was built or allocated"
    );
}

/// `d` with the record of a live migration `m1` to `h2`, port 5910, that its source host
/// reported `state`.
fn migrating(mut d: Desktop, state: &str) -> Desktop {
    if let Some(st) = d.status.as_mut() {
        st.migration = serde_json::from_value(json!({
            "name": "m", "uid": "m1", "mode": "Live", "target": "h2", "port": 5910,
            "since": "2026-01-01T00:00:00Z"
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        st.migration_report = serde_json::from_value(json!({
            "uid": "m1", "source": "h1", "state": state, "at": "2026-01-01T00:00:05Z"
        }))
        .unwrap_or_else(|e| panic!("{e}"));
    }
    d
}

/// The desktop's console mirror, labelled for host `node`.
fn mirror_on(node: &str) -> k8s_openapi::api::core::v1::Secret {
    let mut mirror = k8s_openapi::api::core::v1::Secret::default();
    mirror.metadata.name = Some(deskvirt_crds::constants::console_mirror_name(UID));
    mirror.metadata.namespace = Some("consoles".into());
    mirror.metadata.labels = Some(
        [(
            deskvirt_crds::constants::LABEL_NODE.to_string(),
            node.to_string(),
        )]
        .into(),
    );
    mirror
}

/// An operator context whose caches hold the migration `m1` as the operator wrote it (holding
/// `h2`:5910 for the desktop) and the desktop's mirror on `h1`.
fn context_migrating(d: &Desktop) -> Context {
    let m: deskvirt_crds::DesktopMigration = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopMigration",
        "metadata": {"name": "m", "namespace": "ns", "uid": "m1", "resourceVersion": "3",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"desktop": "a"},
        "status": {"phase": "Running", "desktopUid": UID, "source": "h1", "target": "h2",
                   "targetPort": 5910, "scheduledTime": "2026-01-01T00:00:01Z"}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let mirror = mirror_on("h1");
    context_of(
        Stores::holding(vec![pool()], vec![], vec![d.clone()], "consoles")
            .with(vec![m], vec![mirror]),
    )
}

#[tokio::test]
async fn a_completed_migration_moves_the_binding_and_the_ledger_to_the_target() {
    let d = migrating(bound(5900), "Completed");
    let ctx = context_migrating(&d);
    *ctx.ledgers.lock().await = Ledgers::fresh();
    let seen = Seen::of(&d, UID, "h1", Timestamp::now());
    let (p, _) = fence::scope(holding(), decide(&seen, &ctx))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.migrated_to.as_deref(), Some("h2"));
    assert_eq!(
        p.moved_to.as_deref(),
        Some("h2"),
        "relabelled for the target"
    );
    assert_eq!(p.want.port, Some(5910));
    let last = p
        .want
        .last_move
        .clone()
        .unwrap_or_else(|| panic!("no lastMove"));
    assert_eq!((last.from.as_str(), last.to.as_str()), ("h1", "h2"));
    let ledgers = ctx.ledgers.lock().await;
    let l = ledgers.get("p").unwrap_or_else(|| panic!("no ledger"));
    assert_eq!(
        l.port_of(UID),
        Some(("h2", 5910)),
        "the target's port is its own"
    );
    assert!(l.target_of(UID).is_none(), "and no longer a reservation");
    assert_eq!(l.ports_taken("h1"), 0, "the source's port is free");
}

#[tokio::test]
async fn a_migration_still_moving_leaves_the_binding_where_it_is() {
    let d = migrating(bound(5900), "Started");
    let ctx = context_migrating(&d);
    *ctx.ledgers.lock().await = Ledgers::fresh();
    let seen = Seen::of(&d, UID, "h1", Timestamp::now());
    let (p, _) = fence::scope(holding(), decide(&seen, &ctx))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(p.migrated_to.is_none() && p.moved_to.is_none());
    assert_eq!(p.want.port, Some(5900));
    let ledgers = ctx.ledgers.lock().await;
    let l = ledgers.get("p").unwrap_or_else(|| panic!("no ledger"));
    assert_eq!(l.port_of(UID), Some(("h1", 5900)));
    assert_eq!(
        l.target_of(UID).map(|t| (t.host, t.port)),
        Some(("h2", 5910))
    );
}

/// Desktop `a` stopped by its user on `h1`, as the host reported it.
fn stopped_by_user() -> Desktop {
    let mut d = bound(5900);
    d.spec.power = deskvirt_core::types::Power::Off;
    let c = deskvirt_crds::conditions::condition(
        &[],
        deskvirt_crds::constants::condition::RUNNING,
        deskvirt_crds::conditions::Status::False,
        "Shutdown",
        "shut off",
        Some(1),
        Timestamp::UNIX_EPOCH,
    );
    if let Some(st) = d.status.as_mut() {
        st.conditions.push(c);
    }
    d
}

#[tokio::test]
async fn a_stopped_desktop_that_cannot_leave_a_draining_host_yet_is_looked_at_again_soon() {
    let d = stopped_by_user();
    let mut p = pool();
    p.spec.storage.shared = true;
    let host: deskvirt_crds::DomainNode = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
        "metadata": {"name": "h1", "uid": "h1-uid"},
        "spec": {"drain": true}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    // No heartbeat of h1 is cached: what it said of the domain may be stale, so the desktop
    // stays for now, and no other host's change would wake it.
    let ctx = context_of(Stores::holding(vec![p], vec![host], vec![d.clone()], "c"));
    *ctx.ledgers.lock().await = Ledgers::fresh();
    let seen = Seen::of(&d, UID, "h1", Timestamp::now());
    let (plan, _) = fence::scope(holding(), decide(&seen, &ctx))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(plan.rebound.is_none() && plan.moved_to.is_none());
    assert_eq!(plan.recheck, Some(Duration::from_secs(15)));
}

#[tokio::test]
async fn a_desktop_moved_into_another_pool_takes_the_place_reserved_there_and_leaves_its_own() {
    let mut d = migrating(bound(5900), "Completed");
    if let Some(m) = d.status.as_mut().and_then(|s| s.migration.as_mut()) {
        m.mode = deskvirt_crds::migration::MigrationMode::Cold;
        m.pool = Some("q".into());
    }
    let mut m: deskvirt_crds::DesktopMigration = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopMigration",
        "metadata": {"name": "m", "namespace": "ns", "uid": "m1", "resourceVersion": "3",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"desktop": "a", "mode": "Cold", "targetPool": "q"},
        "status": {"phase": "Running", "desktopUid": UID, "source": "h1", "target": "h2",
                   "targetPort": 5910, "targetPool": "q", "targetMac": "52:54:01:00:00:09",
                   "scheduledTime": "2026-01-01T00:00:01Z"}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let mut q = pool();
    q.metadata.name = Some("q".into());
    q.spec.node_selector = [("pool".to_string(), "q".to_string())].into();
    q.spec.network.mac_prefix = "52:54:01".into();
    let mirror = mirror_on("h1");
    let ctx = context_of(
        Stores::holding(vec![pool(), q], vec![], vec![d.clone()], "consoles")
            .with(vec![m.clone()], vec![mirror]),
    );
    *ctx.ledgers.lock().await = Ledgers::fresh();
    let seen = Seen::of(&d, UID, "h1", Timestamp::now());
    let (p, _) = fence::scope(holding(), decide(&seen, &ctx))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.migrated_to.as_deref(), Some("h2"));
    assert_eq!(p.moved_to.as_deref(), Some("h2"));
    assert_eq!(p.want.port, Some(5910));
    assert_eq!(p.want.mac.as_deref(), Some("52:54:01:00:00:09"));
    assert_eq!(
        p.want.allocation.as_ref().map(|a| a.pool.as_str()),
        Some("q")
    );
    assert!(p.recheck.is_some(), "the next pass plans in q's ledger");
    {
        let ledgers = ctx.ledgers.lock().await;
        let lq = ledgers.get("q").unwrap_or_else(|| panic!("no ledger q"));
        assert_eq!(lq.port_of(UID), Some(("h2", 5910)));
        assert_eq!(
            lq.mac_of(UID).map(|m| m.to_string()).as_deref(),
            Some("52:54:01:00:00:09")
        );
        assert!(lq.target_of(UID).is_none() && lq.entry_mac(UID).is_none());
        let lp = ledgers.get("p").unwrap_or_else(|| panic!("no ledger p"));
        assert_eq!((lp.port_of(UID), lp.mac_of(UID)), (None, None), "p lets go");
    }
    // Its status write did not land: the next pass finds the ledgers moved and moves the
    // binding again, the same way.
    let (again, _) = fence::scope(holding(), decide(&seen, &ctx))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (again.want.port, again.want.mac.clone()),
        (p.want.port, p.want.mac.clone())
    );
    // A record naming another pool than the migration pinned is not followed.
    if let Some(s) = m.status.as_mut() {
        s.target_pool = Some("r".into());
    }
    let ctx = context_of(
        Stores::holding(vec![pool()], vec![], vec![d.clone()], "consoles").with(vec![m], vec![]),
    );
    *ctx.ledgers.lock().await = Ledgers::fresh();
    let (none, _) = fence::scope(holding(), decide(&seen, &ctx))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(none.migrated_to.is_none());
}
