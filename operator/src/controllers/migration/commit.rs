//! A migration's writes, in the order that keeps every reservation findable: the finalizer
//! before a target is reserved; the migration's status (which the ledger is rebuilt from)
//! before the record on the Desktop (which hosts act on); and at the end the record cleared
//! before the target is freed and the finalizer dropped.

use std::time::Duration;

use deskvirt_core::migration::{MigrationPhase, allowed};
use deskvirt_core::reasons::MigrationReason;
use deskvirt_crds::conditions::Status;
use deskvirt_crds::constants::condition::{READY, SCHEDULED};
use deskvirt_crds::constants::{
    ANNOTATION_MIGRATION, FINALIZER_OPERATOR, MANAGER_OPERATOR_MIGRATION, console_mirror_name,
};
use deskvirt_crds::{Desktop, DesktopMigration, DesktopMigrationStatus, DesktopStatus, Migrating};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use serde_json::json;

use super::incoming::{self, Answer};
use super::plan::{self, Decision, Reserved};
use super::{Error, Pass, has_finalizer, kube, pinned};
use crate::controllers::action::{Conditioned, clear_desktop_record, record_on_desktop};
use crate::controllers::{apply_meta, remove_finalizer};
use crate::fence;

/// A pass over a migration that is not being deleted.
pub(super) async fn apply(pass: &Pass<'_>) -> Result<Action, Error> {
    let m = pass.m.as_ref();
    if m.phase().is_terminal() {
        settle(pass, m).await?;
        return Ok(Action::await_change());
    }
    if !has_finalizer(m) {
        fence::check()?;
        let body = json!({
            "apiVersion": "deskvirt.io/v1alpha1",
            "kind": "DesktopMigration",
            "metadata": { "name": m.name_any(), "finalizers": [FINALIZER_OPERATOR] },
        });
        let fresh = apply_meta(&pass.api, &m.name_any(), &body)
            .await
            .map_err(kube("add the operator finalizer"))?;
        // Decide on the version that carries it: its status is the same.
        return decide(pass, &fresh).await;
    }
    decide(pass, m).await
}

async fn decide(pass: &Pass<'_>, m: &DesktopMigration) -> Result<Action, Error> {
    let ctx = pass.ctx;
    let phase = m.phase();
    let decision = {
        let mut ledgers = ctx.ledgers.lock().await;
        if fence::check().is_err() {
            Decision::Later(Duration::from_secs(1))
        } else if phase.holds_target() {
            plan::held(&ctx.stores, &ctx.migrations, &ledgers, m, pass.now)
        } else {
            plan::pending(
                &ctx.stores,
                &ctx.migrations,
                &mut ledgers,
                m,
                pass.now,
                |n| ctx.heartbeat(n, pass.now),
            )
        }
    };
    match decision {
        Decision::Later(delay) => Ok(Action::requeue(delay)),
        Decision::Wait {
            reason,
            message,
            retry,
        } => {
            let mut want = want_status(m, MigrationPhase::Pending);
            pin_desktop(&mut want, m, pass);
            set(
                &mut want,
                m,
                pass,
                SCHEDULED,
                Status::False,
                reason,
                &message,
            );
            set(&mut want, m, pass, READY, Status::False, reason, &message);
            let was = ready_reason(m);
            write_status(pass, m, &want).await?;
            if was.as_deref() != Some(reason.as_str()) {
                tracing::info!(reason = reason.as_str(), %message, "migration waits");
            }
            Ok(Action::requeue(retry))
        }
        Decision::Fail { reason, message } => fail(pass, m, reason, &message).await,
        Decision::Reserved(r) => scheduled(pass, m, &r).await,
        Decision::Keep(left) => match ensure_record(pass, m).await? {
            Prep::Recorded => Ok(Action::requeue(left)),
            Prep::Waiting => Ok(Action::requeue(left.min(PREPARE_RECHECK))),
            Prep::Refused(why) => fail(pass, m, MigrationReason::TargetNotPrepared, &why).await,
        },
        Decision::Moving => {
            moving(pass, m).await?;
            Ok(Action::requeue(MOVING_RECHECK))
        }
        Decision::Arrived => succeeded(pass, m).await,
    }
}

/// How often a moving migration looks again at most; the Desktop's report wakes it sooner.
const MOVING_RECHECK: Duration = Duration::from_secs(30);

/// The source host started: Running, from when it said so. Returns the migration as written.
async fn moving(pass: &Pass<'_>, m: &DesktopMigration) -> Result<DesktopMigration, Error> {
    let mut want = want_status(m, MigrationPhase::Running);
    let report = report_of(pass, m);
    if want.start_time.is_none() {
        want.start_time = Some(report.as_ref().map_or(Time(pass.now), |r| r.at.clone()));
    }
    let (source, target) = (
        want.source.clone().unwrap_or_default(),
        want.target.clone().unwrap_or_default(),
    );
    let msg = format!("{source} is moving the desktop to {target}");
    set(
        &mut want,
        m,
        pass,
        READY,
        Status::False,
        MigrationReason::Moving,
        &msg,
    );
    let was = m.phase();
    let written = write_status(pass, m, &want).await?;
    if was != MigrationPhase::Running {
        tracing::info!(%source, %target, "migration running");
        pass.ctx
            .event(m, EventType::Normal, "MigrationRunning", "Migrate", msg)
            .await;
    }
    Ok(written)
}

/// The desktop runs on the target and is bound there: Succeeded, with the source's figures;
/// then the record is cleared and the finalizer dropped (the target's port is the desktop's
/// own now, so nothing is freed).
async fn succeeded(pass: &Pass<'_>, m: &DesktopMigration) -> Result<Action, Error> {
    // A move faster than this controller: Running first, as phases go one at a time.
    let running;
    let m = if m.phase() == MigrationPhase::Scheduling {
        running = moving(pass, m).await?;
        &running
    } else {
        m
    };
    let mut want = want_status(m, MigrationPhase::Succeeded);
    want.completion_time = Some(Time(pass.now));
    if let Some(r) = report_of(pass, m) {
        want.total_millis = r.total_millis;
        want.downtime_millis = r.downtime_millis;
        want.bytes_moved = r.bytes;
    }
    let (source, target) = (
        want.source.clone().unwrap_or_default(),
        want.target.clone().unwrap_or_default(),
    );
    let msg = format!(
        "the desktop runs on {target} (from {source}); paused {} ms, {} MiB moved in {} ms",
        want.downtime_millis.unwrap_or(0),
        want.bytes_moved.unwrap_or(0) >> 20,
        want.total_millis.unwrap_or(0),
    );
    let reason = MigrationReason::Succeeded;
    set(&mut want, m, pass, READY, Status::True, reason, &msg);
    let written = write_status(pass, m, &want).await?;
    tracing::info!(%source, %target, downtime_ms = want.downtime_millis, "migration succeeded");
    pass.ctx.metrics.migration_ended("Succeeded");
    pass.ctx
        .event(m, EventType::Normal, "MigrationSucceeded", "Migrate", msg)
        .await;
    settle(pass, &written).await?;
    Ok(Action::await_change())
}

/// The source host's report of this migration, from its Desktop.
fn report_of(pass: &Pass<'_>, m: &DesktopMigration) -> Option<deskvirt_crds::MigrationReport> {
    let d = plan::desktop_of(&pass.ctx.stores, m)?;
    d.status
        .as_ref()?
        .migration_report
        .clone()
        .filter(|r| Some(r.uid.as_str()) == m.metadata.uid.as_deref())
}

/// Writes the reservation: the migration's status, then the record on the Desktop.
async fn scheduled(pass: &Pass<'_>, m: &DesktopMigration, r: &Reserved) -> Result<Action, Error> {
    let ctx = pass.ctx;
    let mut want = want_status(m, MigrationPhase::Scheduling);
    want.desktop_uid = Some(r.desktop_uid.clone());
    want.source = Some(r.source.clone());
    want.target = Some(r.target.clone());
    want.target_port = Some(r.port);
    want.scheduled_time = Some(Time(pass.now));
    let msg = match &r.mac {
        Some(mac) => {
            want.target_pool = Some(r.pool.clone());
            want.target_mac = Some(mac.clone());
            format!(
                "{} of pool {} reserved SPICE port {} and MAC {mac} for the desktop, which runs \
                 on {}",
                r.target, r.pool, r.port, r.source
            )
        }
        None => format!(
            "{} reserved SPICE port {} for the desktop, which runs on {}",
            r.target, r.port, r.source
        ),
    };
    let reason = MigrationReason::TargetReserved;
    set(&mut want, m, pass, SCHEDULED, Status::True, reason, &msg);
    let waiting = format!("waiting for {} to start moving the desktop", r.source);
    set(&mut want, m, pass, READY, Status::False, reason, &waiting);
    let written = match write_status(pass, m, &want).await {
        Ok(written) => written,
        Err(e) => {
            // Not recorded anywhere a rebuild reads: the reservation goes back.
            let mut ledgers = ctx.ledgers.lock().await;
            if let Some(l) = ledgers.get_mut(&r.pool) {
                l.release_target(&r.desktop_uid);
            }
            return Err(e);
        }
    };
    tracing::info!(source = %r.source, target = %r.target, port = r.port, "migration target reserved");
    ctx.event(m, EventType::Normal, "MigrationScheduled", "Schedule", msg)
        .await;
    match ensure_record(pass, &written).await? {
        Prep::Recorded => Ok(Action::requeue(ctx.migrations.start_timeout)),
        Prep::Waiting => Ok(Action::requeue(PREPARE_RECHECK)),
        Prep::Refused(why) => fail(pass, &written, MigrationReason::TargetNotPrepared, &why).await,
    }
}

/// How often a move whose target makes the disk it copies into looks for the answer, besides
/// the DomainNode's change waking it.
const PREPARE_RECHECK: Duration = Duration::from_secs(1);

/// Whether the record is on the Desktop.
enum Prep {
    Recorded,
    /// The target host is making the disk a Cold move copies into.
    Waiting,
    /// The target host cannot make it, and says why.
    Refused(String),
}

/// Ends a migration (Failed), then lets go of what it holds.
async fn fail(
    pass: &Pass<'_>,
    m: &DesktopMigration,
    reason: MigrationReason,
    message: &str,
) -> Result<Action, Error> {
    let mut want = want_status(m, MigrationPhase::Failed);
    pin_desktop(&mut want, m, pass);
    want.completion_time = Some(Time(pass.now));
    if !m.phase().holds_target() {
        set(
            &mut want,
            m,
            pass,
            SCHEDULED,
            Status::False,
            reason,
            message,
        );
    }
    set(&mut want, m, pass, READY, Status::False, reason, message);
    let written = write_status(pass, m, &want).await?;
    tracing::info!(reason = reason.as_str(), %message, "migration failed");
    pass.ctx.metrics.migration_ended("Failed");
    pass.ctx
        .event(
            m,
            EventType::Warning,
            "MigrationFailed",
            "Migrate",
            format!("{reason}: {message}"),
        )
        .await;
    settle(pass, &written).await?;
    Ok(Action::await_change())
}

/// A deleted migration: cancelled if it had not ended. What it holds is let go of.
pub(super) async fn cancel(pass: &Pass<'_>) -> Result<Action, Error> {
    let m = pass.m.as_ref();
    if !has_finalizer(m) {
        return Ok(Action::await_change());
    }
    // The domain is on its way: the record tells the source host to abort the move, and the
    // target stays held until the source host says how it ended (aborted: the desktop stays;
    // completed before the abort: it arrives).
    // Scheduling too: the source may have reported Started before this status moved on.
    if m.phase().holds_target() {
        let ctx = pass.ctx;
        let decision = {
            let ledgers = ctx.ledgers.lock().await;
            plan::held(&ctx.stores, &ctx.migrations, &ledgers, m, pass.now)
        };
        if decision == Decision::Moving {
            mark_cancelled(pass, m).await?;
            tracing::info!("migration deleted while the domain moves; the source host aborts it");
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
    }
    if !m.phase().is_terminal() {
        tracing::info!("migration cancelled");
        pass.ctx.metrics.migration_ended("Cancelled");
        let msg = "the DesktopMigration was deleted before it ended".to_string();
        pass.ctx
            .event(m, EventType::Normal, "MigrationCancelled", "Cancel", msg)
            .await;
    }
    settle(pass, m).await?;
    Ok(Action::await_change())
}

/// Marks this migration's record on its Desktop `cancelled` (once), under the migration's
/// field manager, guarded by the version read: the source host then aborts the move.
async fn mark_cancelled(pass: &Pass<'_>, m: &DesktopMigration) -> Result<(), Error> {
    let Some(d) = plan::desktop_of(&pass.ctx.stores, m) else {
        return Ok(());
    };
    let Some(record) = d.status.as_ref().and_then(|s| s.migration.clone()) else {
        return Ok(());
    };
    if record.uid != pass.uid || record.cancelled {
        return Ok(());
    }
    let record = Migrating {
        cancelled: true,
        ..record
    };
    apply_record(
        pass,
        &d,
        record,
        "mark the migration cancelled on the desktop",
    )
    .await
}

/// Applies `record` as the Desktop `d`'s `status.migration`, under the migration's field
/// manager, onto the version of `d` the pass saw (a replaced Desktop is never written).
async fn apply_record(
    pass: &Pass<'_>,
    d: &Desktop,
    record: Migrating,
    action: &'static str,
) -> Result<(), Error> {
    let status = DesktopStatus {
        migration: Some(record),
        ..DesktopStatus::default()
    };
    record_on_desktop(
        &pass.desktops,
        d,
        status,
        MANAGER_OPERATOR_MIGRATION,
        action,
    )
    .await
}

/// Lets go of what an ended or deleted migration holds: the record on its Desktop (if it is
/// this migration's), then the target in the ledger, then the finalizer.
async fn settle(pass: &Pass<'_>, m: &DesktopMigration) -> Result<(), Error> {
    if !has_finalizer(m) {
        return Ok(());
    }
    clear_record(pass, m).await?;
    incoming::withdraw(pass, m).await?;
    let freed = {
        let mut ledgers = pass.ctx.ledgers.lock().await;
        plan::release(&pass.ctx.stores, &mut ledgers, m)
    };
    if let Some((host, port)) = freed {
        tracing::info!(%host, port, "migration target freed");
    }
    fence::check()?;
    remove_finalizer(&pass.api, m, FINALIZER_OPERATOR)
        .await
        .map_err(kube("remove the operator finalizer"))
}

/// Records the migration on its Desktop (`status.migration`) unless it is there already; a
/// Cold move that copies the disk is recorded only once its target has made the empty disk.
async fn ensure_record(pass: &Pass<'_>, m: &DesktopMigration) -> Result<Prep, Error> {
    let Some(record) = record_of(m, pass) else {
        return Ok(Prep::Recorded);
    };
    let Some(d) = plan::desktop_of(&pass.ctx.stores, m) else {
        return Ok(Prep::Recorded);
    };
    let current = d.status.as_ref().and_then(|s| s.migration.as_ref());
    if current.is_some_and(|c| same_record(c, &record)) {
        return Ok(Prep::Recorded);
    }
    match incoming::ask(pass, m).await? {
        Answer::NotNeeded | Answer::Ready => {}
        Answer::Waiting => return Ok(Prep::Waiting),
        Answer::Refused(why) => {
            let target = record.target.clone();
            return Ok(Prep::Refused(format!(
                "host {target} cannot make the disk the cold move copies into: {why}"
            )));
        }
    }
    // The mirror first: the source host acts on the record only when the mirror agrees.
    if let Some(uid) = d.uid() {
        stamp_mirror(pass, &uid, &record).await?;
    }
    let record = Migrating {
        since: current
            .filter(|c| c.uid == record.uid)
            .map_or(record.since.clone(), |c| c.since.clone()),
        ..record
    };
    apply_record(pass, &d, record, "record the migration on the desktop").await?;
    Ok(Prep::Recorded)
}

/// Stamps the desktop's console mirror with the migration (`deskvirt.io/migration`), under the
/// migration's own field manager so the Desktop pass's writes of the mirror keep it. Nothing
/// is written when the cached mirror carries the stamp already; no mirror, no stamp (and no
/// host acts).
async fn stamp_mirror(pass: &Pass<'_>, desktop_uid: &str, record: &Migrating) -> Result<(), Error> {
    let ctx = pass.ctx;
    let ns = &ctx.console_namespace;
    let stamp = record.stamp();
    let mirror = ctx.stores.mirror(ns, desktop_uid);
    if mirror
        .as_ref()
        .is_some_and(|s| s.annotations().get(ANNOTATION_MIGRATION) == Some(&stamp))
    {
        return Ok(());
    }
    let name = console_mirror_name(desktop_uid);
    let body = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": ns,
            "annotations": { ANNOTATION_MIGRATION: stamp },
        },
    });
    let api: kube::Api<Secret> = kube::Api::namespaced(ctx.client.clone(), ns);
    fence::check()?;
    // Only onto a mirror that exists: an apply would create a bare one.
    if mirror.is_none()
        && api
            .get_opt(&name)
            .await
            .map_err(kube("read the console mirror"))?
            .is_none()
    {
        return Err(Error::MissingField("console mirror"));
    }
    let pp = PatchParams::apply(MANAGER_OPERATOR_MIGRATION).force();
    api.patch(&name, &pp, &Patch::Apply(&body))
        .await
        .map_err(kube("stamp the console mirror with the migration"))?;
    Ok(())
}

/// Removes the Desktop's `status.migration` if this migration wrote it, read fresh from the
/// API (the cache may not show the record yet), guarded by the version read. A merge patch
/// that only removes, as `status.reclaimed` is cleared (an apply leaving it out would leave a
/// null on Kubernetes 1.20).
async fn clear_record(pass: &Pass<'_>, m: &DesktopMigration) -> Result<(), Error> {
    let Some(uid) = pinned(m) else {
        return Ok(());
    };
    let Some(d) = pass.ctx.stores.desktop_by_uid(uid) else {
        return Ok(());
    };
    let ours = |s: &DesktopStatus| {
        s.migration
            .as_ref()
            .is_some_and(|r| Some(r.uid.as_str()) == m.metadata.uid.as_deref())
    };
    let (manager, action) = (
        MANAGER_OPERATOR_MIGRATION,
        "clear the desktop's migration record",
    );
    clear_desktop_record(&pass.desktops, &d, "migration", ours, manager, action).await
}

/// The record a migration holding a target puts on its Desktop.
fn record_of(m: &DesktopMigration, pass: &Pass<'_>) -> Option<Migrating> {
    let st = m.status.as_ref()?;
    let target = st.target.clone()?;
    let node = pass.ctx.stores.node(&target);
    let node_status = node.as_ref().and_then(|n| n.status.as_ref());
    let endpoint = node_status.and_then(|s| s.migration.as_ref());
    Some(Migrating {
        name: m.name_any(),
        uid: pass.uid.clone(),
        mode: m.spec.mode,
        port: st.target_port?,
        since: st.scheduled_time.clone().unwrap_or(Time(pass.now)),
        uri: endpoint.map(|e| e.uri.clone()),
        address: endpoint.and_then(|e| e.address.clone()),
        spice_address: node_status.and_then(|s| s.address.clone()),
        base_image_bytes: node_status.and_then(|s| {
            s.prepared
                .iter()
                .find(|p| p.migration == pass.uid)
                .and_then(|p| p.image_bytes)
        }),
        pool: st.target_pool.clone(),
        cancelled: false,
        target,
    })
}

fn same_record(a: &Migrating, b: &Migrating) -> bool {
    a.stamp() == b.stamp()
        && (&a.name, a.mode, &a.uri, &a.address, &a.spice_address)
            == (&b.name, b.mode, &b.uri, &b.address, &b.spice_address)
}

/// The migration's status as it stands, moved to `phase` (a change `allowed` permits: the
/// plan only asks for those).
fn want_status(m: &DesktopMigration, phase: MigrationPhase) -> DesktopMigrationStatus {
    debug_assert!(allowed(m.phase(), phase), "{:?} -> {phase:?}", m.phase());
    let mut st = m.status.clone().unwrap_or_default();
    st.phase = Some(phase);
    st.observed_generation = m.metadata.generation;
    st
}

/// Pins the UID of the Desktop the migration acts on, unless pinned already: the one its
/// spec names now.
fn pin_desktop(want: &mut DesktopMigrationStatus, m: &DesktopMigration, pass: &Pass<'_>) {
    if want.desktop_uid.is_none() {
        want.desktop_uid = plan::desktop_of(&pass.ctx.stores, m).and_then(|d| d.uid());
    }
}

fn set(
    st: &mut DesktopMigrationStatus,
    m: &DesktopMigration,
    pass: &Pass<'_>,
    type_: &str,
    status: Status,
    reason: MigrationReason,
    message: &str,
) {
    let (generation, prev) = (m.metadata.generation, m.status.as_ref());
    st.set_condition(
        prev,
        type_,
        status,
        reason.as_str(),
        message,
        generation,
        pass.now,
    );
}

fn ready_reason(m: &DesktopMigration) -> Option<String> {
    crate::controllers::action::ready_reason(m.status.as_ref())
}

/// Applies `want` onto the version of the migration decided on, unless nothing but times
/// changed; returns the migration as written (or as it was).
async fn write_status(
    pass: &Pass<'_>,
    m: &DesktopMigration,
    want: &DesktopMigrationStatus,
) -> Result<DesktopMigration, Error> {
    let action = "write the migration's status";
    crate::controllers::action::write_status(&pass.api, m, m.status.as_ref(), want, action).await
}
