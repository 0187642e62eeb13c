//! The DesktopRestore controller: reads a restore, its Desktop, the Desktop's host and the
//! backup's chain from the operator's caches into `core::backup::restore_over`, and commits the
//! decision: the chain recorded on the stopped Desktop (`status.restoreOver`) for its host to
//! build the new disk from, the host's reports (`status.restoreReport`) shown on the restore,
//! and the record cleared when the restore ends or is deleted (a finalizer holds it until then).

use std::sync::Arc;
use std::time::Duration;

use deskvirt_core::backup::restore_over::{Facts, Phase, Plan, Target, decide};
use deskvirt_core::reasons::RestoreReason;
use deskvirt_crds::conditions::{self, Status};
use deskvirt_crds::constants::condition::{READY, RUNNING};
use deskvirt_crds::constants::{FINALIZER_OPERATOR, MANAGER_OPERATOR_RESTORE_OVER};
use deskvirt_crds::desktop::Power;
use deskvirt_crds::{Desktop, DesktopRestore, DesktopRestoreStatus, DesktopStatus, RestoreOver};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::restore::chain_for;
use super::{Error, kube};
use crate::context::{Context, Stores, stopped};
use crate::controllers::action::{Conditioned, clear_desktop_record, record_on_desktop};
use crate::controllers::{apply_meta, drive, on_leadership, remove_finalizer, watch_config};
use crate::fence;
use crate::heartbeat::Heartbeat;

const NAME: &str = "restore";

/// How often a restore that waits or runs looks again at most, besides the watches that wake
/// it.
const RECHECK: Duration = Duration::from_secs(30);

/// Runs the controller until `stop`.
pub async fn run(ctx: Arc<Context>, selector: String, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<DesktopRestore>::all(client.clone()),
        watch_config(&selector),
    );
    let (by_desktop, by_node, by_backup) =
        (controller.store(), controller.store(), controller.store());
    let controller = controller
        .watches_stream(ctx.stores.desktop_changes.stream(), move |d| {
            // Its desktop stopped, or its host reported.
            let (ns, name, uid) = (d.namespace(), d.name_any(), d.uid());
            open(&by_desktop, move |r| {
                r.namespace() == ns
                    && match pinned(r) {
                        Some(p) => Some(p) == uid.as_deref(),
                        None => r.spec.desktop == name,
                    }
            })
        })
        .watches_stream(ctx.stores.node_changes.stream(), move |_| {
            open(&by_node, |_| true)
        })
        .watches_stream(ctx.stores.backup_changes.stream(), move |b| {
            // The backup it waits for came to be, or succeeded.
            let (ns, name) = (b.namespace(), b.name_any());
            open(&by_backup, move |r| {
                r.namespace() == ns && r.spec.backup == name && r.phase() == Phase::Pending
            })
        })
        .reconcile_all_on(on_leadership(ctx.leader.clone()))
        .graceful_shutdown_on(stopped(stop.clone()))
        .with_config(controller::Config::default().concurrency(2))
        .run(
            reconcile,
            |r, e, c| crate::controllers::error_policy(NAME, &r, e, &c),
            ctx,
        );
    drive(NAME, controller, stop).await;
}

/// The restores of `store` that have not ended and `which` picks.
fn open(
    store: &Store<DesktopRestore>,
    which: impl Fn(&DesktopRestore) -> bool,
) -> Vec<ObjectRef<DesktopRestore>> {
    store
        .state()
        .iter()
        .filter(|r| !r.phase().is_terminal() || has_finalizer(r))
        .filter(|r| which(r))
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

fn pinned(r: &DesktopRestore) -> Option<&str> {
    r.status.as_ref().and_then(|s| s.desktop_uid.as_deref())
}

fn has_finalizer(r: &DesktopRestore) -> bool {
    r.finalizers().iter().any(|f| f == FINALIZER_OPERATOR)
}

/// The Desktop a restore is of: by the UID it pinned, else by the name in its spec.
fn desktop_of(stores: &Stores, r: &DesktopRestore) -> Option<Arc<Desktop>> {
    let ns = r.namespace();
    match pinned(r) {
        Some(uid) => stores.desktop_by_uid(uid).filter(|d| d.namespace() == ns),
        None => {
            let at = ObjectRef::new(&r.spec.desktop).within(ns.as_deref().unwrap_or_default());
            stores.desktops.get(&at)
        }
    }
}

/// What one pass works with.
struct Pass<'a> {
    ctx: &'a Context,
    api: Api<DesktopRestore>,
    desktops: Api<Desktop>,
    uid: String,
    now: Timestamp,
}

/// One pass over a DesktopRestore.
#[tracing::instrument(skip_all, fields(restore = %r.name_any(), ns = r.namespace().unwrap_or_default()))]
pub async fn reconcile(r: Arc<DesktopRestore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _busy = ctx.reconciles.backups.begin();
    ctx.metrics.reconciled(NAME);
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    let ns = r.namespace().ok_or(Error::MissingField("namespace"))?;
    let uid = r.uid().ok_or(Error::MissingField("uid"))?;
    let pass = Pass {
        ctx: &ctx,
        api: Api::namespaced(ctx.client.clone(), &ns),
        desktops: Api::namespaced(ctx.client.clone(), &ns),
        uid: uid.clone(),
        now: Timestamp::now(),
    };
    let result = fence::scope(ctx.fence.clone(), apply(&pass, &r)).await;
    let action = crate::controllers::action::settle(result)?;
    ctx.succeeded(&format!("{NAME}/{uid}"));
    Ok(action)
}

/// The desktop as the decision reads it.
fn target<'a>(ctx: &Context, d: &'a Desktop, now: Timestamp, record_open: bool) -> Target<'a> {
    let st = d.status.as_ref();
    let node = st.and_then(|s| s.node.as_deref());
    let record = st.and_then(|s| s.restore_over.as_ref());
    Target {
        uid: d.metadata.uid.as_deref().unwrap_or_default(),
        node,
        host_ready: node.is_some_and(|n| matches!(ctx.heartbeat(n, now), Heartbeat::Fresh { .. })),
        power_off: d.spec.power == Power::Off,
        // Until its host says the domain is off: a shutdown under way runs still.
        running: super::stopped_at(d).is_none()
            && st.is_some_and(|s| conditions::find(&s.conditions, RUNNING).is_some()),
        suspended: st.is_some_and(|s| s.reclaimed.is_some()),
        migrating: st.is_some_and(|s| s.migration.is_some()),
        deleting: d.metadata.deletion_timestamp.is_some(),
        backing_up: st.is_some_and(|s| s.backup.is_some()),
        record: record.map(|r| r.uid.as_str()),
        record_open,
        report: st
            .and_then(|s| s.restore_report.as_ref())
            .map(|r| (r.uid.as_str(), r.state)),
    }
}

async fn apply(pass: &Pass<'_>, r: &DesktopRestore) -> Result<Action, Error> {
    let deleting = r.metadata.deletion_timestamp.is_some();
    if !deleting && !has_finalizer(r) && !r.phase().is_terminal() {
        fence::check()?;
        let body = json!({
            "apiVersion": "deskvirt.io/v1alpha1",
            "kind": "DesktopRestore",
            "metadata": { "name": r.name_any(), "finalizers": [FINALIZER_OPERATOR] },
        });
        let fresh = apply_meta(&pass.api, &r.name_any(), &body)
            .await
            .map_err(kube("add the operator finalizer"))?;
        return Box::pin(apply(pass, &fresh)).await;
    }
    let stores = &pass.ctx.stores;
    let d = desktop_of(stores, r);
    let chain = match &d {
        Some(d) => match stores.pool(d.pool()) {
            Some(pool) => chain_for(stores, d, &pool, &r.spec.backup),
            None => Err(format!("the desktop's pool {} is not known", d.pool())),
        },
        None => Err("no desktop".into()),
    };
    let record_open = match d
        .as_deref()
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.restore_over.as_ref())
    {
        Some(rec) if rec.uid != pass.uid => record_open(pass, rec).await?,
        Some(_) => true,
        None => false,
    };
    let facts = Facts {
        uid: &pass.uid,
        phase: r.phase(),
        deleting,
        pinned: pinned(r),
        desktop: d
            .as_deref()
            .map(|d| target(pass.ctx, d, pass.now, record_open)),
        chain: chain
            .as_ref()
            .map(|_| ())
            .map_err(|e| format!("spec.backup: {e}")),
    };
    let mut plan = decide(&facts);
    // The cache may not show the record this restore just wrote: the desktop as the API has
    // it decides again.
    let live = match (&plan, d.as_deref()) {
        (Plan::Fail(RestoreReason::RecordLost, _), Some(d)) => pass
            .desktops
            .get_opt(&d.name_any())
            .await
            .map_err(kube("read the desktop"))?
            .filter(|f| f.uid() == d.uid()),
        _ => None,
    };
    if let Some(live) = &live {
        plan = decide(&Facts {
            desktop: Some(target(pass.ctx, live, pass.now, record_open)),
            ..facts.clone()
        });
    }
    tracing::debug!(?plan, "restore pass");
    let report = d
        .as_deref()
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.restore_report.clone())
        .filter(|rep| rep.uid == pass.uid);
    match plan {
        Plan::Nothing => {
            if deleting || r.phase().is_terminal() {
                let_go(pass, r).await?;
            }
            Ok(Action::await_change())
        }
        Plan::Clear => {
            clear_record(pass, d.as_deref()).await?;
            let_go(pass, r).await?;
            Ok(Action::await_change())
        }
        Plan::Wait(reason, message) => {
            let mut want = want_status(r, r.phase());
            if reason == RestoreReason::Restored && want.phase == Some(Phase::Restoring) {
                want.phase = Some(Phase::Restored);
            }
            set(&mut want, r, pass, Status::False, reason, &message);
            write_status(pass, r, &want).await?;
            Ok(Action::requeue(RECHECK))
        }
        Plan::Record => {
            let (Some(d), Ok(chain)) = (d.as_deref(), chain) else {
                return Err(Error::MissingField("desktop"));
            };
            let record = RestoreOver {
                name: r.name_any(),
                uid: pass.uid.clone(),
                chain: chain.clone(),
                at: Time(pass.now),
            };
            let status = DesktopStatus {
                restore_over: Some(record),
                ..DesktopStatus::default()
            };
            let manager = MANAGER_OPERATOR_RESTORE_OVER;
            let action = "record the restore on the desktop";
            record_on_desktop(&pass.desktops, d, status, manager, action).await?;
            let mut want = want_status(r, Phase::Restoring);
            want.desktop_uid = d.uid();
            want.backup_uid = Some(chain.uid.clone());
            want.node = d.status.as_ref().and_then(|s| s.node.clone());
            let msg = format!(
                "recorded on desktop {}: its host builds the new disk from backup {} ({} files)",
                d.name_any(),
                chain.backup,
                chain.layers.len()
            );
            set(
                &mut want,
                r,
                pass,
                Status::False,
                RestoreReason::Restoring,
                &msg,
            );
            write_status(pass, r, &want).await?;
            tracing::info!(desktop = %d.name_any(), backup = %chain.backup, "restore recorded");
            Ok(Action::requeue(RECHECK))
        }
        Plan::Advance(Phase::Restored) => {
            let mut want = want_status(r, Phase::Restored);
            let kept = report.as_ref().and_then(|rep| rep.kept_disk.clone());
            want.kept_disk.clone_from(&kept);
            want.restore_time = report.as_ref().map(|rep| rep.at.clone());
            let msg = format!(
                "the desktop's disk is backup {}'s; the old disk is kept{} until the desktop \
                 has run on the restored one (set spec.power: On)",
                r.spec.backup,
                kept.map(|k| format!(" as {k}")).unwrap_or_default()
            );
            set(
                &mut want,
                r,
                pass,
                Status::False,
                RestoreReason::Restored,
                &msg,
            );
            write_status(pass, r, &want).await?;
            pass.ctx
                .event(r, EventType::Normal, "DiskRestored", "Restore", msg)
                .await;
            Ok(Action::requeue(RECHECK))
        }
        Plan::Advance(_) => {
            let mut want = want_status(r, Phase::Succeeded);
            want.kept_disk = None;
            want.completion_time = Some(Time(pass.now));
            let msg = match report.as_ref().and_then(|rep| rep.message.as_deref()) {
                Some(left) => format!(
                    "the desktop ran on the disk restored from backup {}; {left}",
                    r.spec.backup
                ),
                None => format!(
                    "the desktop ran on the disk restored from backup {}; its old disk is \
                     removed",
                    r.spec.backup
                ),
            };
            set(
                &mut want,
                r,
                pass,
                Status::True,
                RestoreReason::Succeeded,
                &msg,
            );
            write_status(pass, r, &want).await?;
            clear_record(pass, d.as_deref()).await?;
            let_go(pass, r).await?;
            Ok(Action::await_change())
        }
        Plan::Fail(reason, message) => {
            let message = match (reason, &report) {
                (RestoreReason::RestoreFailed, Some(rep)) => format!(
                    "the host {} did not restore the disk, which is as it was: {}",
                    rep.node,
                    rep.message.as_deref().unwrap_or("no reason given")
                ),
                _ => message,
            };
            let mut want = want_status(r, Phase::Failed);
            want.completion_time = Some(Time(pass.now));
            set(&mut want, r, pass, Status::False, reason, &message);
            write_status(pass, r, &want).await?;
            tracing::info!(reason = reason.as_str(), %message, "restore failed");
            pass.ctx
                .event(
                    r,
                    EventType::Warning,
                    "RestoreFailed",
                    "Restore",
                    format!("{reason}: {message}"),
                )
                .await;
            clear_record(pass, d.as_deref()).await?;
            let_go(pass, r).await?;
            Ok(Action::await_change())
        }
    }
}

/// Whether the restore another record on the desktop names is still open: its object exists
/// (read live: the operator caches no restores) and has not ended. A record left by a restore
/// that went does not hold the desktop.
async fn record_open(pass: &Pass<'_>, rec: &RestoreOver) -> Result<bool, Error> {
    let other = pass
        .api
        .get_opt(&rec.name)
        .await
        .map_err(kube("read the restore recorded on the desktop"))?;
    Ok(other
        .is_some_and(|o| o.uid().as_deref() == Some(rec.uid.as_str()) && !o.phase().is_terminal()))
}

/// Removes the Desktop's `status.restoreOver` if it is this restore's.
async fn clear_record(pass: &Pass<'_>, d: Option<&Desktop>) -> Result<(), Error> {
    let Some(d) = d else {
        return Ok(());
    };
    let ours = |s: &DesktopStatus| s.restore_over.as_ref().is_some_and(|r| r.uid == pass.uid);
    let manager = MANAGER_OPERATOR_RESTORE_OVER;
    let action = "clear the desktop's restore record";
    clear_desktop_record(&pass.desktops, d, "restoreOver", ours, manager, action).await
}

/// Removes the operator's finalizer: nothing of the restore is left on its desktop.
async fn let_go(pass: &Pass<'_>, r: &DesktopRestore) -> Result<(), Error> {
    if !has_finalizer(r) {
        return Ok(());
    }
    fence::check()?;
    remove_finalizer(&pass.api, r, FINALIZER_OPERATOR)
        .await
        .map_err(kube("remove the operator finalizer"))
}

fn want_status(r: &DesktopRestore, phase: Phase) -> DesktopRestoreStatus {
    let mut st = r.status.clone().unwrap_or_default();
    st.phase = Some(phase);
    st.observed_generation = r.metadata.generation;
    st
}

/// Sets the restore's `Ready` condition in `st`.
fn set(
    st: &mut DesktopRestoreStatus,
    r: &DesktopRestore,
    pass: &Pass<'_>,
    status: Status,
    reason: RestoreReason,
    message: &str,
) {
    let prev = r.status.as_ref();
    let (generation, now) = (r.metadata.generation, pass.now);
    st.set_condition(
        prev,
        READY,
        status,
        reason.as_str(),
        message,
        generation,
        now,
    );
}

async fn write_status(
    pass: &Pass<'_>,
    r: &DesktopRestore,
    want: &DesktopRestoreStatus,
) -> Result<DesktopRestore, Error> {
    let action = "write the restore's status";
    crate::controllers::action::write_status(&pass.api, r, r.status.as_ref(), want, action).await
}
