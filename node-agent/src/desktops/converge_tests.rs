//! Branches of converging a live Desktop ([`super::apply`], [`super::held`],
//! [`super::lifecycle`]) on the fake hypervisor: what each one defines, starts, saves, stops or
//! discards on the host, and what it reports. Each test is named after the branch it covers.

use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, RUNNING};
use deskvirt_crds::desktop::{IdleAction, Move, Power, Reclaimed};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use kube::runtime::controller::Action;

use super::apply::apply;
use super::lifecycle::ADMIN_RESYNC;
use super::testkit::{
    Kit, NODE, OTHER_UID, deleted, desktop, last_condition, with_all_statuses, with_last_status,
};
use super::{Error, failure, show_failure};
use crate::hypervisor::fake::Op;
use crate::hypervisor::{DomainState, HypervisorError};

fn rejected() -> HypervisorError {
    HypervisorError::Rejected {
        op: "op",
        target: "t".into(),
        message: "unsupported configuration: no".into(),
    }
}

fn failed() -> HypervisorError {
    HypervisorError::Failed {
        op: "op",
        target: "t".into(),
        message: "internal error: something unclassified".into(),
    }
}

fn cond(kit: &Kit, type_: &str) -> (String, String) {
    let Some((s, r, _)) = last_condition(&kit.api, type_) else {
        panic!("no {type_} written: {:?}", kit.api.statuses())
    };
    (s, r)
}

fn pair(s: &str, r: &str) -> (String, String) {
    (s.to_string(), r.to_string())
}

/// Runs one pass of `d`, which must succeed.
async fn passes(kit: &Kit, d: &deskvirt_crds::Desktop) {
    let pass = apply(d, &kit.ctx).await;
    assert!(pass.is_ok(), "{pass:?}");
}

/// Changes only: the journal without lookups.
fn changes(kit: &Kit, from: usize) -> Vec<String> {
    kit.calls_since(from)
}

/// Runs [`failure::SHOW_AFTER`] passes of `d` that must each fail transiently, as the
/// controller would (each failure counted and shown once it keeps coming back): `condition`
/// is not written anew before the last. Returns the last failure.
async fn retried_until_shown(kit: &Kit, d: &deskvirt_crds::Desktop, condition: &str) -> Error {
    let mut last = None;
    let before = last_condition(&kit.api, condition);
    for attempt in 1..=failure::SHOW_AFTER {
        let pass = apply(d, &kit.ctx).await;
        let Err(err) = pass else {
            panic!("pass {attempt} of a failing desktop passed: {pass:?}")
        };
        assert!(err.is_transient(), "{err}");
        show_failure(d, &kit.ctx, &err).await;
        if attempt < failure::SHOW_AFTER {
            let shown = last_condition(&kit.api, condition);
            assert_eq!(shown, before, "shown after {attempt} failures");
        }
        last = Some(err);
    }
    let Some(err) = last else {
        panic!("no pass ran")
    };
    err
}

#[tokio::test]
async fn a_nat_desktop_gets_its_lease_then_starts() {
    let mut kit = Kit::new();
    kit.nat();
    kit.make_disk();
    passes(&kit, &desktop()).await;
    let dom = kit.domain();
    let calls = changes(&kit, 0);
    let at = |want: &str| calls.iter().position(|c| c.starts_with(want));
    let (lease, start) = (at("leases "), at(&format!("start {dom}")));
    assert!(
        lease.is_some() && start.is_some() && lease < start,
        "the lease is written before the start: {calls:?}"
    );
    assert_eq!(cond(&kit, RUNNING), pair("True", "Running"));
    let ip = kit.api.statuses().last().map(|s| s["ip"].clone());
    assert_eq!(
        ip,
        Some(serde_json::json!("10.233.1.2")),
        "{:?}",
        kit.api.statuses()
    );

    // The next pass finds the lease and writes none.
    let from = kit.hv.journal().len();
    passes(&kit, &with_last_status(desktop(), &kit.api)).await;
    assert!(changes(&kit, from).is_empty(), "{:?}", changes(&kit, from));
}

#[tokio::test]
async fn a_guest_moved_in_with_another_hosts_address_has_its_link_cycled_once() {
    let mut kit = Kit::new();
    kit.nat();
    kit.make_disk();
    kit.make_domain(DomainState::Running, false).await;
    // Moved live from a host whose subnet is 10.233.2.0/24.
    let mut d = desktop();
    if let Some(st) = d.status.as_mut() {
        st.ip = Some("10.233.2.7".into());
    }
    let from = kit.hv.journal().len();
    passes(&kit, &d).await;
    let dom = kit.domain();
    let calls = changes(&kit, from);
    let at = |want: &str| calls.iter().position(|c| c == want);
    let (down, up) = (
        at(&format!("link-down {dom}")),
        at(&format!("link-up {dom}")),
    );
    assert!(
        down.is_some() && up.is_some() && down < up,
        "the link down, then up: {calls:?}"
    );
    assert_eq!(
        kit.api.statuses().last().map(|s| s["ip"].clone()),
        Some(serde_json::json!("10.233.1.2"))
    );
    assert!(
        kit.api
            .event_reasons()
            .contains(&"AddressChanged".to_string()),
        "{:?}",
        kit.api.event_reasons()
    );
    // The address the desktop now shows is the one pinned here: no second cycle.
    let from = kit.hv.journal().len();
    passes(&kit, &with_last_status(d, &kit.api)).await;
    let again = changes(&kit, from);
    assert!(!again.iter().any(|c| c.starts_with("link-")), "{again:?}");
}

#[tokio::test]
async fn a_domain_paused_on_an_io_error_is_resumed_and_not_again_within_the_interval() {
    let kit = Kit::new();
    kit.make_disk();
    kit.make_domain(DomainState::Running, false).await;
    let dom = kit.domain();
    kit.hv.pause(&dom, crate::hypervisor::PauseCause::IoError);
    let from = kit.hv.journal().len();
    passes(&kit, &desktop()).await;
    assert!(changes(&kit, from).contains(&format!("resume {dom}")));
    assert_eq!(
        kit.hv.domain(&dom).map(|d| d.state),
        Some(DomainState::Running)
    );
    assert_eq!(cond(&kit, RUNNING), pair("True", "Running"));
    // The disk is still full: it pauses again, and is left paused (said so) until the interval.
    kit.hv.pause(&dom, crate::hypervisor::PauseCause::IoError);
    let from = kit.hv.journal().len();
    passes(&kit, &with_last_status(desktop(), &kit.api)).await;
    assert!(!changes(&kit, from).iter().any(|c| c.starts_with("resume")));
    assert_eq!(cond(&kit, RUNNING), pair("False", "Paused"));
}

#[tokio::test]
async fn a_domain_paused_by_a_broken_post_copy_or_a_user_is_left_paused() {
    for cause in [
        crate::hypervisor::PauseCause::PostCopyFailed,
        crate::hypervisor::PauseCause::Other,
    ] {
        let kit = Kit::new();
        kit.make_disk();
        kit.make_domain(DomainState::Running, false).await;
        let dom = kit.domain();
        kit.hv.pause(&dom, cause);
        passes(&kit, &desktop()).await;
        assert!(!changes(&kit, 0).iter().any(|c| c.starts_with("resume")));
        assert_eq!(cond(&kit, RUNNING), pair("False", "Paused"), "{cause:?}");
    }
}

#[tokio::test]
async fn a_lease_that_cannot_be_written_stops_the_start_until_it_is() {
    let mut kit = Kit::new();
    kit.nat();
    kit.make_disk();
    kit.hv.fail_once(Op::Leases, failed());
    let first = apply(&desktop(), &kit.ctx).await;
    assert!(first.is_err(), "the lease failure is the pass's: {first:?}");
    let dom = kit.domain();
    assert!(
        !changes(&kit, 0).iter().any(|c| c.ends_with(&dom)),
        "nothing is defined or started without the lease: {:?}",
        changes(&kit, 0)
    );
    let from = kit.hv.journal().len();
    passes(&kit, &with_last_status(desktop(), &kit.api)).await;
    let calls = changes(&kit, from);
    assert!(
        calls.iter().any(|c| c.starts_with("leases ")) && calls.contains(&format!("start {dom}")),
        "the next pass writes it and starts: {calls:?}"
    );
    assert_eq!(
        kit.api.statuses().last().map(|s| s["ip"].clone()),
        Some(serde_json::json!("10.233.1.2"))
    );
}

#[tokio::test]
async fn new_desktop_disk_there_is_defined_and_started() {
    let kit = Kit::new();
    kit.make_disk();
    passes(&kit, &desktop()).await;
    let dom = kit.domain();
    assert_eq!(
        changes(&kit, 0),
        [format!("define {dom}"), format!("start {dom}")]
    );
    assert_eq!(cond(&kit, DOMAIN_DEFINED), pair("True", "Defined"));
    assert_eq!(cond(&kit, RUNNING), pair("True", "Running"));
    let statuses = kit.api.statuses();
    assert_eq!(
        statuses.last().map(|s| s["spice"]["uri"].clone()),
        Some(serde_json::json!("spice://192.0.2.10:5901"))
    );
    assert!(
        kit.api.finalizer_writes().is_empty(),
        "finalizer already there"
    );
}

#[tokio::test]
async fn each_step_of_a_pass_is_timed() {
    let kit = Kit::new();
    kit.make_disk();
    passes(&kit, &desktop()).await;
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("step", "steps", kit.ctx.metrics.steps.0.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .unwrap_or_else(|e| panic!("{e}"));
    for step in crate::metrics::STEPS {
        // The desktop has the agent's finalizer already: that step is not taken.
        let want = if step == "finalizer" { None } else { Some("1") };
        let count = text
            .lines()
            .find(|l| l.starts_with(&format!("step_count{{step=\"{step}\"}}")))
            .and_then(|l| l.split_whitespace().last());
        assert_eq!(count, want, "{step}:\n{text}");
    }
}

#[tokio::test]
async fn not_bound_here_nothing_is_done() {
    let kit = Kit::new();
    kit.make_disk();
    let mut d = desktop();
    if let Some(s) = d.status.as_mut() {
        s.node = Some("elsewhere".into());
    }
    passes(&kit, &d).await;
    assert!(kit.hv.journal().is_empty(), "{:?}", kit.hv.journal());
    assert!(kit.api.statuses().is_empty());
}

#[tokio::test]
async fn input_missing_pool_waits_and_defines_nothing() {
    let mut kit = Kit::new();
    kit.forget_pool();
    passes(&kit, &desktop()).await;
    assert!(kit.hv.journal().is_empty(), "{:?}", kit.hv.journal());
    assert_eq!(
        cond(&kit, DOMAIN_DEFINED),
        pair("Unknown", "WaitingForPool")
    );
}

#[tokio::test]
async fn disk_base_image_missing_defines_nothing() {
    let kit = Kit::new();
    let _ = std::fs::remove_file(kit.dir.0.join("images/base.qcow2"));
    passes(&kit, &desktop()).await;
    assert!(kit.hv.journal().is_empty(), "{:?}", kit.hv.journal());
    assert_eq!(
        cond(&kit, DOMAIN_DEFINED),
        pair("False", "BaseImageMissing")
    );
}

#[tokio::test]
async fn disk_io_failure_is_retried_with_backoff_then_shown_as_unknown() {
    // A disk directory that cannot be used now (here: a file where the directory should be)
    // may come back by itself: the pass fails transiently, so the controller's backoff and the
    // failure count apply, and the Desktop shows it as Unknown (not a Failed desktop) once it
    // keeps coming back. Nothing is defined meanwhile.
    let kit = Kit::new();
    let disks = kit.dir.0.join("disks");
    let _ = std::fs::remove_dir_all(&disks);
    std::fs::write(&disks, b"not a directory").unwrap_or_else(|e| panic!("{e}"));
    let d = desktop();
    let err = retried_until_shown(&kit, &d, DOMAIN_DEFINED).await;
    assert_eq!(err.category(), "Disk");
    let Some((s, r, _)) = last_condition(&kit.api, DOMAIN_DEFINED) else {
        panic!("a disk failure that keeps coming back is not on the Desktop")
    };
    assert_eq!((s.as_str(), r.as_str()), ("Unknown", "DiskIoFailed"));
    assert!(kit.hv.journal().is_empty(), "{:?}", kit.hv.journal());
}

#[tokio::test]
async fn domain_of_another_uid_is_neither_defined_over_nor_touched() {
    let kit = Kit::new();
    kit.make_disk();
    kit.put_foreign(&kit.domain(), OTHER_UID);
    passes(&kit, &desktop()).await;
    assert!(kit.hv.journal().is_empty(), "{:?}", kit.hv.journal());
    assert_eq!(cond(&kit, DOMAIN_DEFINED), pair("False", "DomainNotOurs"));
    let Some(theirs) = kit.hv.domain(&kit.domain()) else {
        panic!("the other domain is gone")
    };
    assert_eq!(theirs.state, DomainState::Running);
}

#[tokio::test]
async fn define_refused_is_define_failed_and_nothing_starts() {
    let kit = Kit::new();
    kit.make_disk();
    kit.hv.fail(Op::Define, rejected());
    passes(&kit, &desktop()).await;
    assert_eq!(changes(&kit, 0), [format!("define {}", kit.domain())]);
    let Some((s, r, m)) = last_condition(&kit.api, DOMAIN_DEFINED) else {
        panic!("no DomainDefined")
    };
    assert_eq!((s.as_str(), r.as_str()), ("False", "DefineFailed"));
    assert!(m.contains("unsupported configuration"), "{m}");
}

#[tokio::test]
async fn define_fails_unclassified_is_retried_then_shown() {
    let kit = Kit::new();
    kit.make_disk();
    kit.hv.fail(Op::Define, failed());
    let d = desktop();
    retried_until_shown(&kit, &d, DOMAIN_DEFINED).await;
    let Some((s, r, m)) = last_condition(&kit.api, DOMAIN_DEFINED) else {
        panic!("a failure that keeps coming back is not on the Desktop")
    };
    assert_eq!((s.as_str(), r.as_str()), ("Unknown", "LibvirtFailed"));
    assert!(m.contains("something unclassified"), "{m}");
    assert!(!kit.hv.journal().iter().any(|c| c.starts_with("start")));
}

#[tokio::test]
async fn the_same_failure_at_another_time_writes_no_new_status() {
    // QEMU stamps its errors; a retry that wrote a new status each time would wake the
    // desktop's watch at once and never wait its backoff.
    let kit = Kit::new();
    kit.make_disk();
    let mut d = desktop();
    for second in 10..20 {
        kit.hv.fail_once(
            Op::Define,
            HypervisorError::Failed {
                op: "op",
                target: "t".into(),
                message: format!(
                    "internal error: 2026-12-03T20:01:{second}.000123Z qemu-system-x86_64: boom"
                ),
            },
        );
        let Err(err) = apply(&d, &kit.ctx).await else {
            panic!(
                "a failing define passed at {second}: {:?}",
                kit.hv.journal()
            )
        };
        show_failure(&d, &kit.ctx, &err).await;
        // The object as the API server now holds it, for the next pass.
        if let Some(written) = kit.api.statuses().last() {
            let mut status = serde_json::to_value(&d.status).unwrap_or_else(|e| panic!("{e}"));
            if let (Some(held), Some(fields)) = (status.as_object_mut(), written.as_object()) {
                held.extend(fields.clone());
            }
            d.status = serde_json::from_value(status).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    assert_eq!(
        kit.api.statuses().len(),
        1,
        "one write when the failure is first shown, none for its repeats: {:?}",
        kit.api.statuses()
    );
}

#[tokio::test]
async fn permanent_failure_of_a_pass_is_shown_at_once() {
    let kit = Kit::new();
    let d = desktop();
    let err = Error::MissingField("metadata.namespace");
    assert!(!err.is_transient());
    show_failure(&d, &kit.ctx, &err).await;
    assert_eq!(cond(&kit, DOMAIN_DEFINED), pair("False", "InvalidObject"));
}

#[tokio::test]
async fn start_refused_is_start_failed_and_the_domain_stays_defined() {
    let kit = Kit::new();
    kit.make_disk();
    kit.hv.fail(Op::Start, rejected());
    passes(&kit, &desktop()).await;
    let dom = kit.domain();
    assert_eq!(
        changes(&kit, 0),
        [format!("define {dom}"), format!("start {dom}")]
    );
    assert_eq!(cond(&kit, DOMAIN_DEFINED), pair("True", "Defined"));
    assert_eq!(cond(&kit, RUNNING), pair("False", "StartFailed"));
    assert!(kit.hv.domain(&dom).is_some());
}

#[tokio::test]
async fn a_spice_port_taken_on_the_host_is_reported_with_the_port() {
    let kit = Kit::new();
    kit.make_disk();
    kit.hv.fail(
        Op::Start,
        HypervisorError::Failed {
            op: "start domain",
            target: "t".into(),
            message: "internal error: qemu unexpectedly closed the monitor: qemu-system-x86_64: \
                      warning: Spice: ../server/reds.cpp:2585:reds_init_socket: binding socket \
                      to 0.0.0.0:5901 failed\nqemu-system-x86_64: failed to initialize spice \
                      server"
                .into(),
        },
    );
    passes(&kit, &desktop()).await;
    let Some((s, r, m)) = last_condition(&kit.api, RUNNING) else {
        panic!("no Running written")
    };
    assert_eq!((s.as_str(), r.as_str()), ("False", "SpicePortBusy"));
    assert_eq!(deskvirt_core::spice::busy_port(&m), Some(5901), "{m}");
    assert_eq!(cond(&kit, DOMAIN_DEFINED), pair("True", "Defined"));
}

#[tokio::test]
async fn start_fails_transiently_is_an_error_to_retry() {
    let kit = Kit::new();
    kit.make_disk();
    kit.hv.fail(Op::Start, failed());
    let pass = apply(&desktop(), &kit.ctx).await;
    assert!(matches!(&pass, Err(e) if e.is_transient()), "{pass:?}");
    let Some(dom) = kit.hv.domain(&kit.domain()) else {
        panic!("not defined")
    };
    assert_eq!(dom.state, DomainState::ShutOff);
}

#[tokio::test]
async fn a_pass_from_a_copy_older_than_its_own_write_writes_and_announces_nothing_again() {
    // Under load the watch shows the agent's own status write seconds late, and another
    // change (the operator's write, a console mirror) wakes a pass on the copy without it.
    let kit = Kit::new();
    kit.make_disk();
    let d = desktop();
    passes(&kit, &d).await;
    assert_eq!(kit.api.statuses().len(), 1, "{:?}", kit.api.statuses());
    let events = kit.api.event_reasons();
    assert_eq!(events.len(), 1, "{events:?}");
    passes(&kit, &d).await;
    assert_eq!(
        kit.api.statuses().len(),
        1,
        "written again: {:?}",
        kit.api.statuses()
    );
    assert_eq!(kit.api.event_reasons(), events, "announced again");
    // The copy that holds the write: nothing to write either.
    passes(&kit, &with_last_status(desktop(), &kit.api)).await;
    assert_eq!(kit.api.statuses().len(), 1);
    // Something else to report (a new generation observed) is written at once.
    let mut edited = d.clone();
    edited.metadata.generation = Some(d.metadata.generation.unwrap_or(1) + 1);
    passes(&kit, &edited).await;
    assert_eq!(kit.api.statuses().len(), 2, "{:?}", kit.api.statuses());
}

#[tokio::test]
async fn running_and_unchanged_is_left_alone() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    let before = kit.hv.journal().len();
    let d = with_last_status(desktop(), &kit.api);
    passes(&kit, &d).await;
    assert!(
        changes(&kit, before).is_empty(),
        "{:?}",
        changes(&kit, before)
    );
}

#[tokio::test]
async fn power_off_shuts_the_running_domain_down() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    let before = kit.hv.journal().len();
    let mut d = with_last_status(desktop(), &kit.api);
    d.spec.power = Power::Off;
    passes(&kit, &d).await;
    assert_eq!(
        changes(&kit, before),
        [format!("shutdown {}", kit.domain())],
        "{:?}",
        kit.api.statuses()
    );
    assert_eq!(cond(&kit, RUNNING), pair("False", "Stopping"));
}

#[tokio::test]
async fn saved_memory_is_restored_at_start() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    let before = kit.hv.journal().len();
    passes(&kit, &desktop()).await;
    let dom = kit.domain();
    assert_eq!(
        changes(&kit, before),
        [format!("sync-save {dom}"), format!("start {dom}")]
    );
}

#[tokio::test]
async fn saved_memory_refused_by_libvirt_is_discarded_and_the_desktop_boots() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    kit.hv.fail_once(Op::SyncManagedSave, rejected());
    let before = kit.hv.journal().len();
    passes(&kit, &desktop()).await;
    let dom = kit.domain();
    assert_eq!(
        changes(&kit, before),
        [
            format!("sync-save {dom}"),
            format!("discard-save {dom}"),
            format!("start {dom}")
        ]
    );
    assert!(
        kit.api
            .event_reasons()
            .contains(&"SavedMemoryDiscarded".to_string())
    );
}

#[tokio::test]
async fn saved_memory_that_cannot_be_read_now_is_kept_and_the_failure_shown() {
    // No positive evidence that the image is stale: the memory stays, nothing starts, and the
    // failure is retried and shown (Unknown, naming the way out) once it keeps coming back.
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    kit.hv.fail(Op::SyncManagedSave, failed());
    let before = kit.hv.journal().len();
    let d = desktop();
    retried_until_shown(&kit, &d, RUNNING).await;
    let dom = kit.domain();
    let changed = changes(&kit, before);
    assert!(
        changed.iter().all(|c| *c == format!("sync-save {dom}")),
        "{changed:?}"
    );
    assert!(
        !kit.api
            .event_reasons()
            .contains(&"SavedMemoryDiscarded".to_string())
    );
    let Some((s, _, m)) =
        last_condition(&kit.api, RUNNING).or_else(|| last_condition(&kit.api, DOMAIN_DEFINED))
    else {
        panic!("the failure is not on the Desktop")
    };
    assert_eq!(s, "Unknown");
    assert!(m.contains("managedsave-remove"), "{m}");
    let Some(still) = kit.hv.domain(&dom) else {
        panic!("the domain is gone")
    };
    assert!(still.managed_save, "the saved memory was dropped");
}

#[tokio::test]
async fn saved_memory_whose_disk_is_gone_is_discarded() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    std::fs::remove_file(kit.disk()).unwrap_or_else(|e| panic!("{e}"));
    let before = kit.hv.journal().len();
    let _ = apply(&desktop(), &kit.ctx).await;
    let dom = kit.domain();
    assert_eq!(
        changes(&kit, before).first(),
        Some(&format!("discard-save {dom}"))
    );
}

#[tokio::test]
async fn saved_memory_with_the_disk_dir_not_visible_is_kept_and_reported() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    std::fs::remove_dir_all(kit.dir.0.join("disks")).unwrap_or_else(|e| panic!("{e}"));
    let before = kit.hv.journal().len();
    passes(&kit, &desktop()).await;
    assert!(
        changes(&kit, before).is_empty(),
        "{:?}",
        changes(&kit, before)
    );
    assert_eq!(cond(&kit, DOMAIN_DEFINED), pair("False", "DiskDirMissing"));
    assert!(kit.hv.domain(&kit.domain()).is_some_and(|d| d.managed_save));
}

fn moved(secs_from_now: i64) -> Move {
    let at = Timestamp::now().as_second() + secs_from_now;
    Move {
        from: "h0".into(),
        to: NODE.into(),
        at: Time(Timestamp::from_second(at).unwrap_or(Timestamp::UNIX_EPOCH)),
    }
}

#[tokio::test]
async fn saved_memory_from_before_a_move_is_discarded_and_the_disk_kept() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    let mut d = desktop();
    d.spec.disk.persistent = false;
    if let Some(s) = d.status.as_mut() {
        s.last_move = Some(moved(3600));
    }
    let before = kit.hv.journal().len();
    passes(&kit, &d).await;
    let dom = kit.domain();
    assert_eq!(
        changes(&kit, before),
        [format!("discard-save {dom}"), format!("start {dom}")]
    );
    assert_eq!(
        kit.disk_content().as_deref(),
        Some(&b"disk"[..]),
        "no fresh clone right after it ran elsewhere"
    );
}

#[tokio::test]
async fn saved_memory_from_after_the_move_is_restored() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    let mut d = desktop();
    if let Some(s) = d.status.as_mut() {
        s.last_move = Some(moved(-3600));
    }
    let before = kit.hv.journal().len();
    passes(&kit, &d).await;
    let dom = kit.domain();
    assert_eq!(
        changes(&kit, before),
        [format!("sync-save {dom}"), format!("start {dom}")]
    );
}

#[tokio::test]
async fn saved_memory_unreadable_after_a_move_is_kept_and_reported() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    std::fs::remove_file(kit.ctx.config.managed_save_image(&kit.domain()))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut d = desktop();
    if let Some(s) = d.status.as_mut() {
        s.last_move = Some(moved(-3600));
    }
    let before = kit.hv.journal().len();
    passes(&kit, &d).await;
    assert!(
        changes(&kit, before).is_empty(),
        "{:?}",
        changes(&kit, before)
    );
    assert_eq!(
        cond(&kit, DOMAIN_DEFINED),
        pair("False", "SavedMemoryUnreadable")
    );
    assert!(kit.hv.domain(&kit.domain()).is_some_and(|d| d.managed_save));
}

fn reclaimed(d: &mut deskvirt_crds::Desktop, action: IdleAction) {
    if let Some(s) = d.status.as_mut() {
        s.reclaimed = Some(Reclaimed {
            action,
            at: Time(Timestamp::now()),
            port: None,
        });
    }
}

#[tokio::test]
async fn held_suspend_announces_then_saves_the_running_domain() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    let before = kit.hv.journal().len();
    let mut d = with_last_status(desktop(), &kit.api);
    reclaimed(&mut d, IdleAction::Suspend);
    passes(&kit, &d).await;
    assert!(changes(&kit, before).is_empty(), "announced first");
    assert_eq!(cond(&kit, RUNNING), pair("False", "Reclaiming"));
    let mut d = with_last_status(d, &kit.api);
    reclaimed(&mut d, IdleAction::Suspend);
    passes(&kit, &d).await;
    assert_eq!(changes(&kit, before), [format!("save {}", kit.domain())]);
    assert_eq!(cond(&kit, RUNNING), pair("False", "Suspended"));
}

#[tokio::test]
async fn held_save_refused_reports_suspend_failed_and_keeps_it_running() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    kit.hv.fail(Op::ManagedSave, rejected());
    let mut d = with_last_status(desktop(), &kit.api);
    reclaimed(&mut d, IdleAction::Suspend);
    let _ = apply(&d, &kit.ctx).await;
    let mut d = with_last_status(d, &kit.api);
    reclaimed(&mut d, IdleAction::Suspend);
    passes(&kit, &d).await;
    assert_eq!(cond(&kit, RUNNING), pair("True", "SuspendFailed"));
    assert!(
        kit.hv
            .domain(&kit.domain())
            .is_some_and(|d| d.state == DomainState::Running)
    );
}

#[tokio::test]
async fn held_never_starts_a_suspended_domain() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    let before = kit.hv.journal().len();
    let mut d = desktop();
    reclaimed(&mut d, IdleAction::Suspend);
    passes(&kit, &d).await;
    assert!(
        changes(&kit, before).is_empty(),
        "{:?}",
        changes(&kit, before)
    );
    assert_eq!(cond(&kit, RUNNING), pair("False", "Suspended"));
}

#[tokio::test]
async fn held_shutdown_powers_the_running_domain_off() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    let before = kit.hv.journal().len();
    let mut d = with_last_status(desktop(), &kit.api);
    reclaimed(&mut d, IdleAction::Shutdown);
    passes(&kit, &d).await;
    assert_eq!(
        changes(&kit, before),
        [format!("shutdown {}", kit.domain())]
    );
}

#[tokio::test]
async fn held_domain_of_another_uid_is_not_touched() {
    let kit = Kit::new();
    kit.put_foreign(&kit.domain(), OTHER_UID);
    let mut d = desktop();
    reclaimed(&mut d, IdleAction::Suspend);
    passes(&kit, &d).await;
    assert!(kit.hv.journal().is_empty(), "{:?}", kit.hv.journal());
    assert_eq!(cond(&kit, DOMAIN_DEFINED), pair("False", "DomainNotOurs"));
}

/// Starts a non-persistent desktop whose domain is `state`; returns what its disk holds then.
async fn non_persistent_start(state: DomainState) -> Option<Vec<u8>> {
    let kit = Kit::new();
    kit.make_domain(state, false).await;
    let mut d = desktop();
    d.spec.disk.persistent = false;
    let before = kit.hv.journal().len();
    passes(&kit, &d).await;
    assert_eq!(changes(&kit, before), [format!("start {}", kit.domain())]);
    kit.disk_content()
}

#[tokio::test]
async fn non_persistent_desktop_booting_from_off_gets_a_fresh_clone() {
    let disk = non_persistent_start(DomainState::ShutOff).await;
    assert_eq!(disk.as_deref(), Some(&b"fresh\n"[..]));
}

#[tokio::test]
async fn persistent_desktop_booting_from_off_keeps_its_disk() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, false).await;
    passes(&kit, &desktop()).await;
    assert_eq!(kit.disk_content().as_deref(), Some(&b"disk"[..]));
}

#[tokio::test]
async fn moved_desktop_without_saved_memory_boots() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, false).await;
    let mut d = desktop();
    if let Some(s) = d.status.as_mut() {
        s.last_move = Some(moved(-3600));
    }
    let before = kit.hv.journal().len();
    passes(&kit, &d).await;
    assert_eq!(changes(&kit, before), [format!("start {}", kit.domain())]);
}

#[tokio::test]
async fn changed_spec_redefines_the_existing_domain() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, false).await;
    let mut d = with_last_status(desktop(), &kit.api);
    d.spec.power = Power::Off;
    d.spec.cpu = 2;
    let before = kit.hv.journal().len();
    passes(&kit, &d).await;
    assert_eq!(changes(&kit, before), [format!("define {}", kit.domain())]);
    assert_eq!(cond(&kit, RUNNING), pair("False", "Stopped"));
}

#[tokio::test]
async fn guest_that_shut_itself_down_stays_off_until_a_new_generation() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    // The guest powers itself off; the status still says it ran.
    let Some(mut dom) = kit.hv.domain(&kit.domain()) else {
        panic!("no domain")
    };
    dom.state = DomainState::ShutOff;
    kit.hv.put(&kit.domain(), dom);
    let before = kit.hv.journal().len();
    let d = with_last_status(desktop(), &kit.api);
    passes(&kit, &d).await;
    assert!(
        changes(&kit, before).is_empty(),
        "{:?}",
        changes(&kit, before)
    );
    assert_eq!(cond(&kit, RUNNING), pair("False", "Shutdown"));
    // The next pass of the same generation keeps it off too.
    let d = with_last_status(d, &kit.api);
    passes(&kit, &d).await;
    assert!(
        changes(&kit, before).is_empty(),
        "{:?}",
        changes(&kit, before)
    );
    // A new generation (power Off and On again) starts it.
    let mut d = with_last_status(d, &kit.api);
    d.metadata.generation = Some(2);
    passes(&kit, &d).await;
    assert_eq!(changes(&kit, before), [format!("start {}", kit.domain())]);
}

#[tokio::test]
async fn a_mirror_rewritten_with_the_same_password_pushes_nothing() {
    let mut kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    let d = with_last_status(desktop(), &kit.api);
    passes(&kit, &d).await;
    kit.rewrite_mirror("9");
    let before = kit.hv.journal().len();
    passes(&kit, &d).await;
    assert!(
        changes(&kit, before).is_empty(),
        "{:?}",
        changes(&kit, before)
    );
}

#[tokio::test]
async fn rotated_password_reaches_the_running_domain_once() {
    let mut kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    kit.rotate_password("8");
    let before = kit.hv.journal().len();
    let d = with_last_status(desktop(), &kit.api);
    passes(&kit, &d).await;
    let dom = kit.domain();
    // The new password goes into the definition (a restart keeps it) and the running domain.
    assert_eq!(
        changes(&kit, before),
        [format!("define {dom}"), format!("update-device {dom}")]
    );
    let again = kit.hv.journal().len();
    passes(&kit, &d).await;
    assert!(
        changes(&kit, again).is_empty(),
        "{:?}",
        changes(&kit, again)
    );
}

#[tokio::test]
async fn domain_state_unreadable_defines_and_starts_nothing() {
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, false).await;
    kit.hv.fail(Op::Status, failed());
    let before = kit.hv.journal().len();
    let pass = apply(&desktop(), &kit.ctx).await;
    assert!(matches!(&pass, Err(e) if e.is_transient()), "{pass:?}");
    assert!(
        changes(&kit, before).is_empty(),
        "{:?}",
        changes(&kit, before)
    );
}

#[tokio::test]
async fn non_persistent_crashed_domain_restarts_on_its_disk() {
    let disk = non_persistent_start(DomainState::Crashed).await;
    assert_eq!(disk.as_deref(), Some(&b"disk"[..]));
}

#[tokio::test]
async fn held_domain_state_unreadable_is_an_error_and_nothing_is_saved() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    kit.hv.fail(Op::Status, failed());
    let before = kit.hv.journal().len();
    let mut d = with_last_status(desktop(), &kit.api);
    reclaimed(&mut d, IdleAction::Suspend);
    let pass = apply(&d, &kit.ctx).await;
    assert!(matches!(&pass, Err(e) if e.is_transient()), "{pass:?}");
    assert!(
        changes(&kit, before).is_empty(),
        "{:?}",
        changes(&kit, before)
    );
}

#[tokio::test]
async fn held_without_a_domain_is_suspended_with_nothing_saved() {
    let kit = Kit::new();
    let mut d = desktop();
    reclaimed(&mut d, IdleAction::Suspend);
    passes(&kit, &d).await;
    assert!(kit.hv.journal().is_empty(), "{:?}", kit.hv.journal());
    let Some((s, r, m)) = last_condition(&kit.api, RUNNING) else {
        panic!("no Running")
    };
    assert_eq!((s.as_str(), r.as_str()), ("False", "Suspended"));
    assert!(m.contains("no memory to save"), "{m}");
}

#[tokio::test]
async fn power_off_ignored_by_the_guest_is_forced_after_the_grace() {
    let mut kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    kit.hv.ignore_acpi();
    kit.ctx.config.shutdown_grace = std::time::Duration::from_millis(200);
    let before = kit.hv.journal().len();
    let mut d = with_last_status(desktop(), &kit.api);
    d.spec.power = Power::Off;
    passes(&kit, &d).await;
    assert_eq!(
        changes(&kit, before),
        [format!("shutdown {}", kit.domain())]
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    passes(&kit, &d).await;
    let dom = kit.domain();
    assert_eq!(
        changes(&kit, before),
        [format!("shutdown {dom}"), format!("destroy {dom}")]
    );
    assert!(kit.api.event_reasons().contains(&"PoweredOff".to_string()));
}

#[tokio::test]
async fn held_save_failing_transiently_is_retried_as_an_error() {
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    kit.hv.fail(Op::ManagedSave, failed());
    let mut d = with_last_status(desktop(), &kit.api);
    reclaimed(&mut d, IdleAction::Suspend);
    let _ = apply(&d, &kit.ctx).await;
    let mut d = with_last_status(d, &kit.api);
    reclaimed(&mut d, IdleAction::Suspend);
    let pass = apply(&d, &kit.ctx).await;
    assert!(matches!(&pass, Err(e) if e.is_transient()), "{pass:?}");
}

#[tokio::test]
async fn requeue_running_at_the_activity_interval_blocked_at_an_admins_pace() {
    let kit = Kit::new();
    kit.make_disk();
    let pass = apply(&desktop(), &kit.ctx).await;
    assert_eq!(
        pass.ok(),
        Some(Action::requeue(kit.ctx.config.activity_interval)),
        "a running desktop is sampled at the activity interval"
    );
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    std::fs::remove_dir_all(kit.dir.0.join("disks")).unwrap_or_else(|e| panic!("{e}"));
    let pass = apply(&desktop(), &kit.ctx).await;
    assert_eq!(
        pass.ok(),
        Some(Action::requeue(ADMIN_RESYNC)),
        "DiskDirMissing needs an admin"
    );
}

/// The `runningSize` each status written since the `from`th reports.
fn running_sizes(kit: &Kit, from: usize) -> Vec<serde_json::Value> {
    kit.api.statuses()[from..]
        .iter()
        .map(|s| s["runningSize"].clone())
        .collect()
}

#[tokio::test]
async fn running_size_is_what_runs_observed_started_or_left_to_a_restore() {
    // What the host is charged follows what runs. The spec now asks 2 vCPUs; domains made
    // before run with 1.
    let mut d = desktop();
    d.spec.cpu = 2;
    let one = serde_json::json!({"cpu": 1, "memory": "1Gi"});
    let two = serde_json::json!({"cpu": 2, "memory": "1Gi"});

    // Running: the size it runs with, observed, not the spec's.
    let kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    let n = kit.api.statuses().len();
    passes(&kit, &d).await;
    assert_eq!(running_sizes(&kit, n), [one]);

    // Started from its definition now: the definition's size.
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, false).await;
    let n = kit.api.statuses().len();
    passes(&kit, &d).await;
    assert_eq!(running_sizes(&kit, n), std::slice::from_ref(&two));

    // Defined and started for the first time: the definition's size.
    let kit = Kit::new();
    kit.make_disk();
    passes(&kit, &d).await;
    assert_eq!(running_sizes(&kit, 0), [two]);

    // Restored from saved memory: the saved size, read from the domain on the next pass.
    let kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    let n = kit.api.statuses().len();
    passes(&kit, &d).await;
    assert_eq!(running_sizes(&kit, n), [serde_json::Value::Null]);

    // Defined but not started (power Off): nothing runs.
    let kit = Kit::new();
    kit.make_disk();
    let mut off = d.clone();
    off.spec.power = Power::Off;
    passes(&kit, &off).await;
    assert_eq!(running_sizes(&kit, 0), [serde_json::Value::Null]);
}

/// [`desktop`] with the operator's record of a live migration `m1` to host `h2`, port 5902.
fn migrating(report: Option<serde_json::Value>) -> deskvirt_crds::Desktop {
    let mut d = desktop();
    if let Some(st) = d.status.as_mut() {
        st.migration = serde_json::from_value(serde_json::json!({
            "name": "m", "uid": "m1", "mode": "Live", "target": "h2", "port": 5902,
            "since": "2026-01-01T00:00:00Z", "uri": "qemu+tls://h2/system",
            "spiceAddress": "192.0.2.20"
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        st.migration_report =
            report.map(|r| serde_json::from_value(r).unwrap_or_else(|e| panic!("{e}")));
    }
    d
}

fn reports(kit: &Kit) -> Vec<String> {
    kit.api
        .statuses()
        .iter()
        .filter_map(|s| s["migrationReport"]["state"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn a_confirmed_migration_moves_the_domain_and_the_host_never_starts_it_again() {
    let mut kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    kit.stamp_mirror("m1/h2/5902");
    let from = kit.hv.journal().len();
    passes(&kit, &migrating(None)).await;
    let calls = changes(&kit, from);
    assert!(
        calls
            .iter()
            .any(|c| c == &format!("migrate to qemu+tls://h2/system {}", kit.domain())),
        "{calls:?}"
    );
    assert_eq!(reports(&kit), ["Started", "Completed"]);
    assert!(kit.hv.domain(&kit.domain()).is_none(), "still defined here");
    // A later pass, on a copy that does not show the Completed report yet: nothing is defined,
    // started or reported again here.
    let from = kit.hv.journal().len();
    let stale = migrating(Some(serde_json::json!({
        "uid": "m1", "source": "h1", "state": "Started", "at": "2026-01-01T00:00:01Z"
    })));
    passes(&kit, &stale).await;
    assert!(changes(&kit, from).is_empty(), "{:?}", changes(&kit, from));
    assert_eq!(reports(&kit), ["Started", "Completed"]);
    // Deleted before the operator bound it to the target: the disk is the target's now.
    let from = kit.hv.journal().len();
    let pass = super::teardown::teardown(&deleted(stale), &kit.ctx).await;
    assert!(pass.is_ok(), "{pass:?}");
    assert!(
        kit.disk().exists(),
        "the disk the target runs on was deleted"
    );
    assert!(changes(&kit, from).is_empty(), "{:?}", changes(&kit, from));
}

#[tokio::test]
async fn a_migration_record_the_mirror_does_not_confirm_is_ignored() {
    let mut kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    // Forged (or stale): the stamp names another port.
    kit.stamp_mirror("m1/h2/5999");
    let from = kit.hv.journal().len();
    passes(&kit, &migrating(None)).await;
    assert!(
        !changes(&kit, from).iter().any(|c| c.starts_with("migrate")),
        "{:?}",
        changes(&kit, from)
    );
    assert!(reports(&kit).is_empty());
    assert!(kit.hv.domain(&kit.domain()).is_some());
}

#[tokio::test]
async fn a_failed_move_is_reported_and_the_domain_runs_here_as_before() {
    let mut kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    kit.stamp_mirror("m1/h2/5902");
    kit.hv.fail_once(Op::Migrate, rejected());
    passes(&kit, &migrating(None)).await;
    assert_eq!(reports(&kit), ["Started", "Failed"]);
    assert_eq!(
        kit.hv.domain(&kit.domain()).map(|d| d.state),
        Some(DomainState::Running)
    );
    assert!(
        kit.api
            .event_reasons()
            .iter()
            .any(|r| r == "MigrationFailed")
    );
}

#[tokio::test]
async fn an_error_after_the_domain_left_is_a_completed_move_and_the_host_never_starts_it() {
    let mut kit = Kit::new();
    kit.make_disk();
    kit.make_domain(DomainState::Running, false).await;
    kit.stamp_mirror("m1/h2/5902");
    kit.hv.migration_ends(None, failed());
    let d = migrating(None);
    passes(&kit, &d).await;
    assert_eq!(reports(&kit), ["Started", "Completed"]);
    // Until the binding follows, nothing is defined or started here again.
    let from = kit.hv.journal().len();
    passes(&kit, &with_all_statuses(d, &kit.api)).await;
    assert!(changes(&kit, from).is_empty(), "{:?}", changes(&kit, from));
    assert!(kit.disk().exists());
}

#[tokio::test]
async fn a_move_that_leaves_the_guest_paused_says_an_admin_must_act() {
    let mut kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    kit.stamp_mirror("m1/h2/5902");
    kit.hv.migration_ends(Some(DomainState::Paused), failed());
    passes(&kit, &migrating(None)).await;
    assert_eq!(reports(&kit), ["Started", "Failed"]);
    let message = kit
        .api
        .statuses()
        .iter()
        .find_map(|s| s["migrationReport"]["message"].as_str().map(str::to_string))
        .unwrap_or_default();
    assert!(message.contains("paused on this host"), "{message}");
}

#[tokio::test]
async fn a_suspended_desktop_moves_with_its_saved_memory() {
    let mut kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    kit.stamp_mirror("m1/h2/5902");
    let mut d = migrating(None);
    reclaimed(&mut d, IdleAction::Suspend);
    // Suspended, it gave its SPICE port back.
    if let Some(st) = d.status.as_mut() {
        st.spice = None;
    }
    let from = kit.hv.journal().len();
    passes(&kit, &d).await;
    let calls = changes(&kit, from);
    let name = kit.domain();
    let start = calls.iter().position(|c| c == &format!("start {name}"));
    let migrate = calls
        .iter()
        .position(|c| c == &format!("migrate to qemu+tls://h2/system {name}"));
    assert!(
        matches!((start, migrate), (Some(s), Some(m)) if s < m),
        "restored, then moved: {calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("save ")),
        "saved again here: {calls:?}"
    );
    assert_eq!(reports(&kit), ["Started", "Completed"]);
    assert!(kit.hv.domain(&name).is_none(), "still defined here");
}

#[tokio::test]
async fn a_suspended_desktop_whose_move_fails_is_saved_again() {
    let mut kit = Kit::new();
    kit.make_domain(DomainState::ShutOff, true).await;
    kit.stamp_mirror("m1/h2/5902");
    kit.hv.fail_once(
        crate::hypervisor::fake::Op::Migrate,
        crate::hypervisor::HypervisorError::Rejected {
            op: "migrate",
            target: kit.domain(),
            message: "the target refused it".into(),
        },
    );
    let mut d = migrating(None);
    reclaimed(&mut d, IdleAction::Suspend);
    passes(&kit, &d).await;
    assert_eq!(reports(&kit), ["Started", "Failed"]);
    // The guest runs here again (restored to move): the hold saves it again.
    let mut d = with_last_status(d, &kit.api);
    reclaimed(&mut d, IdleAction::Suspend);
    let from = kit.hv.journal().len();
    passes(&kit, &d).await;
    let mut d = with_last_status(d, &kit.api);
    reclaimed(&mut d, IdleAction::Suspend);
    passes(&kit, &d).await;
    assert_eq!(changes(&kit, from), [format!("save {}", kit.domain())]);
    assert_eq!(cond(&kit, RUNNING), pair("False", "Suspended"));
}

#[tokio::test]
async fn a_move_found_under_way_past_the_completion_timeout_is_aborted() {
    use crate::hypervisor::Hypervisor;
    let mut kit = Kit::new();
    kit.make_domain(DomainState::Running, false).await;
    kit.stamp_mirror("m1/h2/5902");
    let name = kit.domain();
    kit.hv.set_job(&name, true);
    // Reported Started by the process before this one, within the pool's 5m timeout: held.
    let recent = k8s_openapi::jiff::Timestamp::now().to_string();
    let d = migrating(Some(serde_json::json!({
        "uid": "m1", "source": "h1", "state": "Started", "at": recent
    })));
    passes(&kit, &d).await;
    assert!(kit.hv.job_running(&name).await.unwrap_or(false), "held");
    // Long past it: the move is ended, and the next pass reports it failed.
    let d = migrating(Some(serde_json::json!({
        "uid": "m1", "source": "h1", "state": "Started", "at": "2026-01-01T00:00:00Z"
    })));
    passes(&kit, &d).await;
    assert!(
        !kit.hv.job_running(&name).await.unwrap_or(true),
        "not aborted"
    );
    passes(&kit, &d).await;
    assert_eq!(reports(&kit), ["Failed"]);
}

/// A host running the desktop's domain, with a confirmed Cold migration of it to `h2`.
async fn cold_move() -> (Kit, deskvirt_crds::Desktop) {
    let mut kit = Kit::new();
    kit.make_disk();
    kit.make_domain(DomainState::Running, false).await;
    kit.stamp_mirror("m1/h2/5902");
    let mut d = migrating(None);
    if let Some(m) = d.status.as_mut().and_then(|s| s.migration.as_mut()) {
        m.mode = deskvirt_core::migration::MigrationMode::Cold;
    }
    (kit, d)
}

#[tokio::test]
async fn a_cold_move_without_shared_storage_copies_the_disk_and_deletes_it_here() {
    let (mut kit, d) = cold_move().await;
    kit.local_storage();
    let from = kit.hv.journal().len();
    passes(&kit, &d).await;
    let name = kit.domain();
    let calls = changes(&kit, from);
    let at = |want: &str| calls.iter().position(|c| c == want);
    let (down, paused, moved) = (
        at(&format!("shutdown {name}")),
        at(&format!("start paused {name}")),
        at(&format!(
            "migrate to qemu+tls://h2/system copying its disk {name}"
        )),
    );
    assert!(
        down.is_some() && down < paused && paused < moved,
        "shut down, started paused, moved with its disk: {calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("undefine")),
        "{calls:?}"
    );
    assert_eq!(reports(&kit), ["Started", "Completed"]);
    assert!(!kit.disk().exists(), "the disk copied away is kept here");
}

#[tokio::test]
async fn a_failed_copy_boots_the_desktop_here_again_and_keeps_its_disk() {
    let (mut kit, d) = cold_move().await;
    kit.local_storage();
    let name = kit.domain();
    kit.hv.migration_ends(
        Some(DomainState::Paused),
        crate::hypervisor::HypervisorError::Rejected {
            op: "migrate",
            target: name.clone(),
            message: "the target refused the disk".into(),
        },
    );
    let from = kit.hv.journal().len();
    passes(&kit, &d).await;
    let calls = changes(&kit, from);
    let destroyed = calls.iter().position(|c| c == &format!("destroy {name}"));
    let booted = calls.iter().rposition(|c| c == &format!("start {name}"));
    assert!(
        destroyed.is_some() && booted > destroyed,
        "the paused domain is stopped, then booted again (power On): {calls:?}"
    );
    assert_eq!(reports(&kit), ["Started", "Failed"]);
    assert!(kit.disk().exists(), "the disk is kept");
}

#[tokio::test]
async fn a_cold_copy_refuses_a_disk_that_is_not_the_one_the_target_made_room_for() {
    let (mut kit, d) = cold_move().await;
    kit.local_storage();
    // A disk standing alone, while the Desktop says it is an overlay of the base image.
    let _ = std::fs::remove_file(kit.disk());
    let ok = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(kit.disk())
        .arg("16M")
        .status()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ok.success());
    let from = kit.hv.journal().len();
    passes(&kit, &d).await;
    let calls = changes(&kit, from);
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("shutdown") || c.starts_with("migrate")),
        "refused before anything stopped: {calls:?}"
    );
    assert_eq!(reports(&kit), ["Failed"]);
}

#[tokio::test]
async fn a_cold_move_shuts_the_domain_down_and_undefines_it_keeping_the_disk() {
    let (kit, d) = cold_move().await;
    let from = kit.hv.journal().len();
    passes(&kit, &d).await;
    let name = kit.domain();
    let calls = changes(&kit, from);
    assert!(
        calls.iter().any(|c| c == &format!("shutdown {name}"))
            && calls.iter().any(|c| c == &format!("undefine {name}")),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("migrate")),
        "moved live: {calls:?}"
    );
    assert_eq!(reports(&kit), ["Started", "Completed"]);
    // Shown as moved (never Running) before the move is reported Completed.
    assert_eq!(cond(&kit, RUNNING), pair("False", "MovedCold"));
    assert_eq!(cond(&kit, DOMAIN_DEFINED), pair("Unknown", "MovedCold"));
    let statuses = kit.api.statuses();
    let at = |f: &dyn Fn(&serde_json::Value) -> bool| statuses.iter().position(f);
    let shown = at(&|s| s["conditions"].to_string().contains("MovedCold"));
    let completed = at(&|s| s["migrationReport"]["state"] == "Completed");
    assert!(
        matches!((shown, completed), (Some(a), Some(b)) if a < b),
        "{statuses:?}"
    );
    assert!(kit.hv.domain(&name).is_none(), "still defined here");
    assert!(kit.disk().exists(), "the shared disk was deleted");
    // Until the binding follows, nothing is defined or started here again.
    let from = kit.hv.journal().len();
    let d = with_all_statuses(d, &kit.api);
    passes(&kit, &d).await;
    assert!(changes(&kit, from).is_empty(), "{:?}", changes(&kit, from));
}

#[tokio::test]
async fn a_cold_move_cancelled_while_the_guest_shuts_down_boots_it_here_again() {
    let (kit, d) = cold_move().await;
    // The cache shows what the operator wrote meanwhile: the record marked cancelled.
    let mut seen = d.clone();
    if let Some(m) = seen.status.as_mut().and_then(|s| s.migration.as_mut()) {
        m.cancelled = true;
    }
    let (store, mut writer) = kube::runtime::reflector::store();
    writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(seen));
    kit.ctx.set_desktop_store(store);
    let from = kit.hv.journal().len();
    passes(&kit, &d).await;
    let name = kit.domain();
    let calls = changes(&kit, from);
    assert!(
        calls.iter().any(|c| c == &format!("shutdown {name}"))
            && calls.iter().any(|c| c == &format!("start {name}"))
            && !calls.iter().any(|c| c.starts_with("undefine")),
        "{calls:?}"
    );
    assert_eq!(reports(&kit), ["Started", "Failed"]);
    let running = kit.hv.domain(&name).is_some_and(|x| x.state.is_active());
    assert!(running, "not running here again");
    assert!(kit.disk().exists());
}

fn restore_record() -> deskvirt_crds::RestoreOver {
    deskvirt_crds::RestoreOver {
        name: "r".into(),
        uid: "r-1".into(),
        chain: deskvirt_crds::Restoring {
            backup: "b".into(),
            uid: "b-1".into(),
            layers: vec![deskvirt_crds::BackupLayer {
                name: "b".into(),
                location: "/nowhere/b.qcow2".into(),
                checksum: "sha256:00".into(),
            }],
        },
        at: Time(Timestamp::UNIX_EPOCH),
    }
}

/// The last restore report written.
fn restore_report(kit: &Kit) -> serde_json::Value {
    kit.api
        .statuses()
        .into_iter()
        .rev()
        .find(|s| s.get("restoreReport").is_some())
        .map(|s| s["restoreReport"].clone())
        .unwrap_or_default()
}

/// One pass of a desktop whose domain is in `state`, with a restore recorded that its host
/// must refuse: nothing changes on the host, the disk stays, and the report says Failed.
async fn refused_restore(state: DomainState, power: Power) -> (Kit, deskvirt_crds::Desktop) {
    // The API answers with the record on the desktop (the host reads it live before it acts).
    let mut recorded = desktop();
    recorded.status.get_or_insert_default().restore_over = Some(restore_record());
    let kit = Kit::answering(recorded);
    kit.make_domain(state, false).await;
    let mut d = with_last_status(desktop(), &kit.api);
    d.spec.power = power;
    d.status.get_or_insert_default().restore_over = Some(restore_record());
    let before = kit.hv.journal().len();
    passes(&kit, &d).await;
    assert!(
        changes(&kit, before).is_empty(),
        "{:?}",
        changes(&kit, before)
    );
    let r = restore_report(&kit);
    assert_eq!(
        (&r["state"], &r["uid"]),
        (&"Failed".into(), &"r-1".into()),
        "{r}"
    );
    assert_eq!(kit.disk_content().as_deref(), Some(&b"disk"[..]));
    assert!(!crate::disks::kept_path(&kit.disk()).exists());
    (kit, d)
}

#[tokio::test]
async fn a_restore_recorded_on_a_running_desktop_is_refused_and_nothing_is_touched() {
    refused_restore(DomainState::Running, Power::On).await;
}

#[tokio::test]
async fn a_restore_whose_chain_is_refused_leaves_the_stopped_desktop_s_disk_and_domain() {
    let (kit, d) = refused_restore(DomainState::ShutOff, Power::Off).await;
    // Reported once: the next pass does not try again.
    let d = with_last_status(d, &kit.api);
    let writes = kit.api.statuses().len();
    passes(&kit, &d).await;
    assert!(
        kit.api.statuses()[writes..]
            .iter()
            .all(|s| s.get("restoreReport").is_none()),
        "{:?}",
        kit.api.statuses()
    );
}
