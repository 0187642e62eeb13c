//! Branches of tearing a deleted Desktop down ([`super::teardown`]) on the fake hypervisor:
//! what is destroyed, undefined and deleted, in which order, and when the agent's finalizer is
//! released. Each test is named after the branch it covers.

use super::teardown::teardown;
use super::testkit::{Kit, OTHER_UID, deleted, desktop};
use crate::hypervisor::fake::Op;
use crate::hypervisor::{DomainState, HypervisorError};

fn failed() -> HypervisorError {
    HypervisorError::Failed {
        op: "op",
        target: "t".into(),
        message: "internal error".into(),
    }
}

/// Runs one teardown pass of `d`, which must succeed.
async fn torn_down(kit: &Kit, d: &deskvirt_crds::Desktop) {
    let pass = teardown(d, &kit.ctx).await;
    assert!(pass.is_ok(), "{pass:?}");
}

/// The finalizer lists written; the release writes one without the agent's finalizer.
fn released(kit: &Kit) -> bool {
    kit.api
        .finalizer_writes()
        .iter()
        .any(|f| f.as_array().is_some_and(|l| l.is_empty()))
}

#[tokio::test]
async fn running_domain_is_destroyed_undefined_its_disk_deleted_then_released() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    let before = kit.hv.journal().len();
    torn_down(&kit, &deleted(desktop())).await;
    let dom = kit.domain();
    assert_eq!(
        kit.calls_since(before),
        [format!("destroy {dom}"), format!("undefine {dom}")]
    );
    assert!(kit.hv.domain(&dom).is_none());
    assert!(!kit.disk().exists(), "disk deleted");
    assert!(released(&kit));
}

#[tokio::test]
async fn half_finished_teardown_domain_gone_disk_left_completes() {
    let kit = Kit::new();
    kit.make_disk();
    torn_down(&kit, &deleted(desktop())).await;
    assert!(kit.hv.journal().is_empty(), "{:?}", kit.hv.journal());
    assert!(!kit.disk().exists(), "the disk left behind is deleted");
    assert!(released(&kit));
}

#[tokio::test]
async fn nothing_left_releases_at_once() {
    let kit = Kit::new();
    torn_down(&kit, &deleted(desktop())).await;
    assert!(released(&kit));
}

#[tokio::test]
async fn undefine_fails_keeps_the_disk_and_the_finalizer() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, false).await;
    kit.hv.fail(Op::Undefine, failed());
    let pass = teardown(&deleted(desktop()), &kit.ctx).await;
    assert!(matches!(&pass, Err(e) if e.is_transient()), "{pass:?}");
    assert!(
        kit.disk().exists(),
        "a disk is deleted only after its domain"
    );
    assert!(!released(&kit));
    // The next pass finishes the job.
    kit.hv.clear_failures();
    torn_down(&kit, &deleted(desktop())).await;
    assert!(kit.hv.domain(&kit.domain()).is_none());
    assert!(!kit.disk().exists());
    assert!(released(&kit));
}

#[tokio::test]
async fn destroy_fails_nothing_is_undefined_or_deleted() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    kit.hv.fail(Op::Destroy, failed());
    let before = kit.hv.journal().len();
    let pass = teardown(&deleted(desktop()), &kit.ctx).await;
    assert!(pass.is_err(), "{pass:?}");
    assert_eq!(
        kit.calls_since(before),
        [format!("destroy {}", kit.domain())]
    );
    assert!(kit.disk().exists());
    assert!(!released(&kit));
}

#[tokio::test]
async fn domain_of_another_uid_is_left_running_and_released() {
    let kit = Kit::new();
    kit.put_foreign(&kit.domain(), OTHER_UID);
    torn_down(&kit, &deleted(desktop())).await;
    assert!(kit.hv.journal().is_empty(), "{:?}", kit.hv.journal());
    assert!(
        kit.hv
            .domain(&kit.domain())
            .is_some_and(|d| d.state == DomainState::Running)
    );
    assert!(
        kit.api
            .event_reasons()
            .contains(&"DomainNotOurs".to_string())
    );
    assert!(released(&kit));
}

#[tokio::test]
async fn disk_of_another_uid_is_kept() {
    let kit = Kit::new();
    kit.make_disk();
    std::fs::write(crate::disks::owner_path(&kit.disk()), OTHER_UID)
        .unwrap_or_else(|e| panic!("{e}"));
    torn_down(&kit, &deleted(desktop())).await;
    assert!(kit.disk().exists());
    assert!(kit.api.event_reasons().contains(&"DiskKept".to_string()));
    assert!(released(&kit));
}

#[tokio::test]
async fn not_bound_here_nothing_is_touched_nor_released() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    let before = kit.hv.journal().len();
    let mut d = deleted(desktop());
    if let Some(s) = d.status.as_mut() {
        s.node = Some("elsewhere".into());
    }
    torn_down(&kit, &d).await;
    assert!(kit.calls_since(before).is_empty());
    assert!(kit.disk().exists());
    assert!(!released(&kit));
}

#[tokio::test]
async fn without_the_agents_finalizer_nothing_is_touched() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    let before = kit.hv.journal().len();
    let mut d = deleted(desktop());
    d.metadata.finalizers = None;
    torn_down(&kit, &d).await;
    assert!(kit.calls_since(before).is_empty());
    assert!(kit.disk().exists());
}

#[tokio::test]
async fn domain_definition_unreadable_nothing_is_destroyed_or_deleted() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    kit.hv.fail(Op::Xml, failed());
    let before = kit.hv.journal().len();
    let pass = teardown(&deleted(desktop()), &kit.ctx).await;
    assert!(matches!(&pass, Err(e) if e.is_transient()), "{pass:?}");
    assert!(
        kit.calls_since(before).is_empty(),
        "{:?}",
        kit.calls_since(before)
    );
    assert!(kit.disk().exists());
    assert!(!released(&kit));
}

#[tokio::test]
async fn domain_gone_while_its_definition_is_read_teardown_goes_on() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, false).await;
    kit.hv.fail_once(
        Op::Xml,
        HypervisorError::NotFound {
            kind: crate::hypervisor::ObjectKind::Domain,
            name: kit.domain(),
        },
    );
    torn_down(&kit, &deleted(desktop())).await;
    assert!(kit.hv.domain(&kit.domain()).is_none());
    assert!(
        !kit.disk().exists(),
        "the disk with our owner record is deleted"
    );
    assert!(released(&kit));
}

#[tokio::test]
async fn unrecorded_disk_of_its_own_domain_is_adopted_and_deleted() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, false).await;
    // A disk an earlier release made: no owner record, named after the domain that uses it.
    std::fs::remove_file(crate::disks::owner_path(&kit.disk())).unwrap_or_else(|e| panic!("{e}"));
    torn_down(&kit, &deleted(desktop())).await;
    assert!(!kit.disk().exists(), "its own domain's disk is deleted");
    assert!(released(&kit));
}

#[tokio::test]
async fn unrecorded_disk_without_its_domain_is_kept() {
    let kit = Kit::new();
    kit.make_disk();
    std::fs::remove_file(crate::disks::owner_path(&kit.disk())).unwrap_or_else(|e| panic!("{e}"));
    torn_down(&kit, &deleted(desktop())).await;
    assert!(kit.disk().exists(), "nobody can prove it is this desktop's");
    assert!(kit.api.event_reasons().contains(&"DiskKept".to_string()));
}

#[tokio::test]
async fn disk_dir_not_visible_keeps_the_definition_and_the_finalizer() {
    // The pool's diskDir is not mounted into the agent: the disk its domain names may well be
    // on the host. The domain is stopped, but its definition (the only record of that disk)
    // and the finalizer stay, and the failure is permanent (shown at once), until the
    // directory is visible; then the next pass finishes the job.
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    let disks = kit.dir.0.join("disks");
    let hidden = kit.dir.0.join("disks-hidden");
    std::fs::rename(&disks, &hidden).unwrap_or_else(|e| panic!("{e}"));
    let before = kit.hv.journal().len();
    let pass = teardown(&deleted(desktop()), &kit.ctx).await;
    let Err(err) = pass else {
        panic!("a teardown that cannot see the disk passed: {pass:?}")
    };
    assert!(!err.is_transient(), "{err}");
    assert_eq!(err.reason().as_str(), "DiskDirMissing");
    let dom = kit.domain();
    assert_eq!(kit.calls_since(before), [format!("destroy {dom}")]);
    assert!(kit.hv.domain(&dom).is_some(), "the definition is kept");
    assert!(!released(&kit));
    std::fs::rename(&hidden, &disks).unwrap_or_else(|e| panic!("{e}"));
    torn_down(&kit, &deleted(desktop())).await;
    assert!(kit.hv.domain(&dom).is_none());
    assert!(!kit.disk().exists(), "disk deleted");
    assert!(released(&kit));
}

/// `d` with backup `b1` recorded by the operator and reported Started by this host.
fn backing_up(mut d: deskvirt_crds::Desktop) -> deskvirt_crds::Desktop {
    let st = d.status.get_or_insert_with(Default::default);
    let record: deskvirt_crds::BackingUp = serde_json::from_value(serde_json::json!({
        "name": "b1", "uid": "bu-1", "type": "Incremental", "since": "c0",
        "location": "/srv/backups/team/d/bu-1.qcow2", "at": "2026-12-06T10:00:00Z"
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let report: deskvirt_crds::BackupReport = serde_json::from_value(serde_json::json!({
        "uid": "bu-1", "node": super::testkit::NODE, "state": "Started", "type": "Incremental",
        "location": "/srv/backups/team/d/bu-1.qcow2", "at": "2026-12-06T10:00:01Z"
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    st.backup = Some(record);
    st.backup_report = Some(report);
    d
}

#[tokio::test]
async fn a_backup_being_written_keeps_the_domain_and_disk_until_its_end_is_recorded() {
    use crate::hypervisor::BackupProgress;
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    let dom = kit.domain();
    kit.hv.set_backup(
        &dom,
        BackupProgress::Running {
            processed: 1 << 20,
            total: 4 << 20,
        },
    );
    let before = kit.hv.journal().len();
    let d = deleted(backing_up(desktop()));
    torn_down(&kit, &d).await;
    assert!(kit.calls_since(before).is_empty(), "{:?}", kit.hv.journal());
    assert!(kit.disk().exists() && !released(&kit));
    let shown = super::testkit::last_condition(&kit.api, "Deleting");
    assert!(
        shown.as_ref().is_some_and(|(s, r, m)| s == "True"
            && r == "WaitingForBackup"
            && m.contains("1 of 4 MiB")),
        "{shown:?}"
    );
    // The job ends: the host reports it, and still waits for the operator to record the end.
    kit.hv
        .set_backup(&dom, BackupProgress::Completed { bytes: 4 << 20 });
    torn_down(&kit, &d).await;
    let reported = kit
        .api
        .statuses()
        .iter()
        .any(|s| s["backupReport"]["uid"] == "bu-1" && s["backupReport"]["state"] != "Started");
    assert!(reported, "{:?}", kit.api.statuses());
    assert!(kit.hv.domain(&dom).is_some() && kit.disk().exists() && !released(&kit));
    // The operator cleared the record: the teardown goes on.
    let mut cleared = d.clone();
    if let Some(st) = cleared.status.as_mut() {
        st.backup = None;
        if let Some(r) = st.backup_report.as_mut() {
            r.state = deskvirt_crds::backup::BackupState::Completed;
        }
    }
    torn_down(&kit, &cleared).await;
    assert!(kit.hv.domain(&dom).is_none());
    assert!(!kit.disk().exists() && released(&kit));
}
