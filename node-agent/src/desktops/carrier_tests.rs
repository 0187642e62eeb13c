//! A Cold move into another pool ([`super::carrier`]) on the fake hypervisor: the source
//! copies the disk with a carrier into the target pool's directory, a failed copy leaves the
//! desktop defined here and boots it only if it should run, and the target destroys the
//! carrier that arrived and defines the desktop afresh.

use deskvirt_crds::Desktop;
use deskvirt_crds::desktop::Power;

use super::apply::apply;
use super::testkit::{Kit, desktop};
use crate::domain::{Carrier, DesktopIdentity, DomainType, carrier_xml};
use crate::hypervisor::{DomainState, Hypervisor, HypervisorError};

/// Runs one pass of `d`, which must succeed.
async fn passes(kit: &Kit, d: &Desktop) {
    let pass = apply(d, &kit.ctx).await;
    assert!(pass.is_ok(), "{pass:?}");
}

fn reports(kit: &Kit) -> Vec<String> {
    kit.api
        .statuses()
        .iter()
        .filter_map(|s| s["migrationReport"]["state"].as_str().map(str::to_string))
        .collect()
}

/// [`desktop`] with power `power` and the operator's record of a Cold move `m1` to host `h2`
/// into pool `pool`.
fn moving(power: Power, mode: &str, pool: &str) -> Desktop {
    let mut d = desktop();
    d.spec.power = power;
    if let Some(st) = d.status.as_mut() {
        st.migration = serde_json::from_value(serde_json::json!({
            "name": "m", "uid": "m1", "mode": mode, "target": "h2", "port": 5902,
            "since": "2026-01-01T00:00:00Z", "uri": "qemu+tls://h2/system",
            "spiceAddress": "192.0.2.20", "pool": pool
        }))
        .unwrap_or_else(|e| panic!("{e}"));
    }
    d
}

/// A host of pool `p` without shared storage holding the desktop's domain in `state`, pool `q`
/// known, and the mirror stamped for `m1`; returns `q`'s disk directory.
async fn source(state: DomainState) -> (Kit, std::path::PathBuf) {
    let mut kit = Kit::new();
    kit.make_domain(state, false).await;
    // After the domain: its disk is made a real overlay of a real base image.
    kit.local_storage();
    let q = kit.other_pool("q");
    kit.stamp_mirror("m1/h2/5902");
    (kit, q)
}

#[tokio::test]
async fn a_move_into_another_pool_copies_the_disk_with_a_carrier_into_that_pools_directory() {
    let (kit, q) = source(DomainState::Running).await;
    let name = kit.domain();
    let from = kit.hv.journal().len();
    passes(&kit, &moving(Power::On, "Cold", "q")).await;
    let calls = kit.calls_since(from);
    let at = |want: &str| calls.iter().position(|c| c == want);
    let (down, carried, moved) = (
        at(&format!("shutdown {name}")),
        at(&format!("start carrier {name}")),
        at(&format!(
            "migrate to qemu+tls://h2/system copying its disk in a carrier {name}"
        )),
    );
    assert!(
        down.is_some() && down < carried && carried < moved,
        "shut down, carrier started, moved: {calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("start paused")),
        "{calls:?}"
    );
    let out = kit.hv.last_outbound();
    let xml = out
        .as_ref()
        .and_then(|o| o.carrier_xml.clone())
        .unwrap_or_default();
    let there = q.join(format!("{name}.qcow2")).display().to_string();
    let sources = crate::domain::parse_disk_sources(&xml).unwrap_or_default();
    assert_eq!(sources.into_iter().collect::<Vec<_>>(), [there], "{xml}");
    assert!(
        !xml.contains("<interface") && !xml.contains("<graphics"),
        "{xml}"
    );
    assert!(xml.contains(&format!("<name>{name}</name>")), "{xml}");
    assert!(
        out.is_some_and(|o| o.copy_disks && o.graphics_uri.is_none() && !o.declared_shared),
        "a copy, with no SPICE client to send anywhere"
    );
    assert_eq!(reports(&kit), ["Started", "Completed"]);
    assert!(kit.hv.domain(&name).is_none(), "still defined here");
    assert!(!kit.disk().exists(), "the disk copied away is kept here");
}

#[tokio::test]
async fn a_move_into_another_pool_from_shared_storage_copies_the_disk_too() {
    let (mut kit, _) = source(DomainState::ShutOff).await;
    kit.shared(true);
    let name = kit.domain();
    let from = kit.hv.journal().len();
    passes(&kit, &moving(Power::Off, "Cold", "q")).await;
    let calls = kit.calls_since(from);
    assert!(
        calls.iter().any(|c| c
            == &format!("migrate to qemu+tls://h2/system copying its disk in a carrier {name}")),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("undefine")),
        "{calls:?}"
    );
    assert_eq!(reports(&kit), ["Started", "Completed"]);
}

#[tokio::test]
async fn a_copy_into_another_pool_that_ended_while_the_agent_was_away_deletes_the_disk_here() {
    let (mut kit, _) = source(DomainState::ShutOff).await;
    kit.shared(true);
    let name = kit.domain();
    let gone = kit.hv.undefine_domain(&name).await;
    assert!(gone.is_ok(), "{gone:?}");
    let mut d = moving(Power::Off, "Cold", "q");
    if let Some(st) = d.status.as_mut() {
        st.migration_report = serde_json::from_value(serde_json::json!({
            "uid": "m1", "source": "h1", "state": "Started",
            "at": k8s_openapi::jiff::Timestamp::now().to_string()
        }))
        .unwrap_or_else(|e| panic!("{e}"));
    }
    passes(&kit, &d).await;
    assert_eq!(reports(&kit), ["Completed"]);
    assert!(!kit.disk().exists(), "the disk copied away is kept here");
}

/// A failed copy of the desktop (power `power`, its domain in `state`) into pool `q`: the
/// carrier is destroyed and the desktop's own definition is here as it was; returns the
/// calls of the pass.
async fn failed_copy(state: DomainState, power: Power) -> (Kit, Vec<String>) {
    let (kit, _) = source(state).await;
    let name = kit.domain();
    let defined = kit.hv.domain(&name).map(|x| x.xml).unwrap_or_default();
    kit.hv.migration_ends(
        Some(DomainState::Paused),
        HypervisorError::Rejected {
            op: "migrate",
            target: name.clone(),
            message: "the target refused the disk".into(),
        },
    );
    let from = kit.hv.journal().len();
    passes(&kit, &moving(power, "Cold", "q")).await;
    let calls = kit.calls_since(from);
    assert!(
        calls.iter().any(|c| c == &format!("start carrier {name}")),
        "{calls:?}"
    );
    assert_eq!(reports(&kit), ["Started", "Failed"]);
    let Some(here) = kit.hv.domain(&name) else {
        panic!("the desktop's domain is gone: {calls:?}")
    };
    assert!(here.persistent && here.live.is_none(), "{here:?}");
    assert_eq!(here.xml, defined, "the definition changed");
    assert!(kit.disk().exists(), "the disk is kept");
    (kit, calls)
}

#[tokio::test]
async fn a_failed_carrier_copy_boots_a_desktop_that_should_run_here_again() {
    let (kit, calls) = failed_copy(DomainState::Running, Power::On).await;
    let name = kit.domain();
    let destroyed = calls.iter().position(|c| c == &format!("destroy {name}"));
    let booted = calls.iter().rposition(|c| c == &format!("start {name}"));
    assert!(
        destroyed.is_some() && booted > destroyed,
        "the carrier is destroyed, then the desktop booted: {calls:?}"
    );
    let running = kit.hv.domain(&name).map(|x| x.state);
    assert_eq!(running, Some(DomainState::Running));
}

#[tokio::test]
async fn a_failed_carrier_copy_of_a_stopped_desktop_leaves_it_stopped() {
    let (kit, calls) = failed_copy(DomainState::ShutOff, Power::Off).await;
    let name = kit.domain();
    assert!(
        !calls.iter().any(|c| c.starts_with("shutdown")),
        "{calls:?}"
    );
    assert!(
        calls.iter().any(|c| c == &format!("destroy {name}"))
            && !calls.iter().any(|c| c == &format!("start {name}")),
        "the carrier is destroyed, nothing booted: {calls:?}"
    );
    let stopped = kit.hv.domain(&name).map(|x| x.state);
    assert_eq!(stopped, Some(DomainState::ShutOff));
}

#[tokio::test]
async fn a_move_into_an_unknown_pool_or_a_live_one_is_refused_before_anything_stops() {
    for (mode, pool) in [("Cold", "nowhere"), ("Live", "q")] {
        let (kit, _) = source(DomainState::Running).await;
        let from = kit.hv.journal().len();
        passes(&kit, &moving(Power::On, mode, pool)).await;
        let calls = kit.calls_since(from);
        assert!(
            !calls
                .iter()
                .any(|c| c.starts_with("shutdown") || c.starts_with("migrate")),
            "{mode} into {pool}: {calls:?}"
        );
        assert_eq!(reports(&kit), ["Failed"], "{mode} into {pool}");
        let why = kit
            .api
            .statuses()
            .iter()
            .find_map(|s| s["migrationReport"]["message"].as_str().map(str::to_string))
            .unwrap_or_default();
        let expected = if pool == "nowhere" {
            "ResourcePool nowhere"
        } else {
            "Cold only"
        };
        assert!(why.contains(expected), "{why}");
    }
}

/// A target host where a carrier of the test desktop arrived: transient and paused, nothing of
/// it defined here, its disk made and marked for migration `m1`. Returns the kit, the domain's
/// name and the disk.
async fn carrier_arrived() -> (Kit, String, std::path::PathBuf) {
    let kit = Kit::new();
    kit.make_disk();
    let name = kit.domain();
    let disk = kit.disk();
    std::fs::write(crate::disks::incoming_marker(&disk), "m1\nu\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let identity = DesktopIdentity {
        namespace: "team".into(),
        name: "a".into(),
        uid: desktop().metadata.uid.unwrap_or_default(),
        user: None,
        pool: "p".into(),
    };
    let carrier = Carrier {
        identity: &identity,
        name: &name,
        uuid: &identity.uid,
        domain_type: DomainType::Qemu,
    };
    let xml = carrier_xml(&carrier, &disk.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
    let arrived = kit.hv.start_carrier(&name, &xml).await;
    assert!(arrived.is_ok(), "{arrived:?}");
    (kit, name, disk)
}

#[tokio::test]
async fn the_target_destroys_the_carrier_that_arrived_and_defines_the_desktop_afresh() {
    let (mut kit, name, disk) = carrier_arrived().await;
    let d = desktop();
    let uid = d.metadata.uid.clone().unwrap_or_default();
    // While the request is still asked for, the sweep leaves it alone.
    let ask = serde_json::json!([{"migration": "m1", "desktop": "team/a", "desktopUid": uid,
        "file": format!("{name}.qcow2"), "image": "base.qcow2", "clone": "Linked"}]);
    kit.node_status(serde_json::json!({ "incoming": ask }));
    let from = kit.hv.journal().len();
    let _ = super::incoming::pass(&kit.ctx).await;
    assert!(
        !kit.calls_since(from)
            .iter()
            .any(|c| c.starts_with("destroy")),
        "{:?}",
        kit.calls_since(from)
    );
    // Bound here in its new pool: the carrier goes, the desktop is defined and boots.
    passes(&kit, &d).await;
    let calls = kit.calls_since(from);
    let at = |want: &str| calls.iter().position(|c| c == want);
    let (gone, defined, booted) = (
        at(&format!("destroy {name}")),
        at(&format!("define {name}")),
        at(&format!("start {name}")),
    );
    assert!(
        gone.is_some() && gone < defined && defined < booted,
        "carrier destroyed, desktop defined, booted: {calls:?}"
    );
    let Some(here) = kit.hv.domain(&name) else {
        panic!("not defined: {calls:?}")
    };
    assert!(
        here.persistent && here.xml.contains("<interface"),
        "{here:?}"
    );
    assert!(!crate::disks::incoming_marker(&disk).exists());
    assert!(disk.exists(), "the copied disk is kept");
}

#[tokio::test]
async fn a_carrier_the_sweep_settles_before_the_binding_leaves_the_disk_for_the_desktop() {
    let (mut kit, name, disk) = carrier_arrived().await;
    // The request is withdrawn (the move completed) before the desktop is bound here.
    kit.node_status(serde_json::json!({}));
    let _ = super::incoming::pass(&kit.ctx).await;
    assert!(kit.hv.domain(&name).is_none(), "the carrier is left");
    assert!(!crate::disks::incoming_marker(&disk).exists());
    let _ = super::incoming::pass(&kit.ctx).await;
    assert!(disk.exists(), "the copied disk was removed");
}
