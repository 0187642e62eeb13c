//! The DesktopBackup controller: reads a backup, its Desktop, the Desktop's host and its other
//! backups from the operator's caches into `core::backup::pass`, and commits the decision:
//! the record on the Desktop for its host to write the backup (from the checkpoint the chain
//! needs), the host's report copied into the backup's status, and the record cleared when the
//! backup ends or is deleted.

mod commit;
pub mod orphans;
pub mod restore;
pub mod restore_over;
pub mod schedule;

use std::sync::Arc;
use std::time::Duration;

use deskvirt_core::backup::pass::{Desktop as DesktopFacts, Facts, Reported};
use deskvirt_core::backup::{Ask, Backup, Kind, Origin};
use deskvirt_core::reasons::AgentReason;
use deskvirt_crds::backup::BackupState;
use deskvirt_crds::conditions;
use deskvirt_crds::constants::condition::{READY, RUNNING};
use deskvirt_crds::constants::{FINALIZER_OPERATOR, LABEL_SCHEDULED};
use deskvirt_crds::desktop::Power;
use deskvirt_crds::{Desktop, DesktopBackup};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::{drive, on_leadership, watch_config};
use crate::context::{Context, Stores, stopped};
use crate::fence;
use crate::heartbeat::Heartbeat;

const NAME: &str = "backup";

/// Backups reconciled at once.
const CONCURRENCY: u16 = 4;

/// How long a backup may wait to start before it fails (reason PendingTimeout).
const PENDING_TIMEOUT: Duration = Duration::from_secs(3600);

/// How often a waiting backup looks again at most, besides the watches that wake it.
const WAIT_RECHECK: Duration = Duration::from_secs(30);

/// How often a running backup looks again at most; its Desktop's report wakes it sooner.
const RUNNING_RECHECK: Duration = Duration::from_secs(30);

pub use super::action::PassError as Error;
use super::action::kube;

/// What one pass over a DesktopBackup works with.
struct Pass<'a> {
    b: Arc<DesktopBackup>,
    ctx: &'a Context,
    /// DesktopBackups of its namespace.
    api: Api<DesktopBackup>,
    /// Desktops of its namespace.
    desktops: Api<Desktop>,
    ns: String,
    uid: String,
    now: Timestamp,
}

/// Runs the controller until `stop`.
pub async fn run(ctx: Arc<Context>, selector: String, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let cfg = watch_config(&selector);
    let (by_desktop, by_node, by_child, by_quota) = (
        ctx.stores.clone(),
        ctx.stores.clone(),
        ctx.stores.clone(),
        ctx.stores.clone(),
    );
    let controller = Controller::new(Api::<DesktopBackup>::all(client.clone()), cfg)
        .watches_stream(ctx.stores.desktop_changes.stream(), move |d| {
            // The open backups of the desktop: its report or record changed, or it came to
            // run, or it was made.
            // And the backup a new desktop restores from, until its chain is recorded.
            let (ns, name, uid) = (d.namespace(), d.name_any(), d.uid());
            let restores = d
                .spec
                .disk
                .restore_from
                .as_ref()
                .filter(|_| d.status.as_ref().is_none_or(|s| s.restore.is_none()))
                .map(|r| r.backup.clone());
            by_desktop
                .backups
                .state()
                .iter()
                .filter(|b| b.namespace() == ns)
                .filter(|b| {
                    let of_desktop = is_open(b)
                        && match pinned(b) {
                            Some(p) => Some(p) == uid.as_deref(),
                            None => b.spec.desktop == name,
                        };
                    of_desktop || restores.as_deref() == b.metadata.name.as_deref()
                })
                .map(|b| ObjectRef::from_obj(b.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(ctx.stores.node_changes.stream(), move |_| {
            // A host's health changed: the waiting and running backups look again.
            by_node
                .backups
                .state()
                .iter()
                .filter(|b| !b.phase().is_terminal())
                .map(|b| ObjectRef::from_obj(b.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(ctx.stores.backup_changes.stream(), move |child| {
            // A deleted parent waits for its children: a change of one (its going, above all)
            // wakes the parent that waits. And a backup being deleted (its file about to go)
            // wakes the namespace's backups that wait for room under its quota.
            let ns = child.namespace().unwrap_or_default();
            let parent = child
                .status
                .as_ref()
                .and_then(|s| s.parent.as_deref())
                .map(|p| ObjectRef::<DesktopBackup>::new(p).within(&ns))
                .filter(|r| {
                    by_child
                        .backups
                        .get(r)
                        .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
                });
            let room = if child.metadata.deletion_timestamp.is_some() {
                waiting_for_room(&by_child, &ns)
            } else {
                Vec::new()
            };
            parent.into_iter().chain(room).collect::<Vec<_>>()
        })
        .watches_stream(ctx.stores.quota_changes.stream(), move |q| {
            waiting_for_room(&by_quota, &q.namespace().unwrap_or_default())
        })
        .reconcile_all_on(on_leadership(ctx.leader.clone()))
        .graceful_shutdown_on(stopped(stop.clone()))
        .with_config(controller::Config::default().concurrency(CONCURRENCY))
        .run(
            reconcile,
            |b, e, c| super::error_policy(NAME, &b, e, &c),
            ctx,
        );
    drive(NAME, controller, stop).await;
}

/// The backups of namespace `ns` that wait for room under its backup storage quota.
fn waiting_for_room(stores: &Stores, ns: &str) -> Vec<ObjectRef<DesktopBackup>> {
    let quota = deskvirt_core::reasons::BackupReason::QuotaExceeded.as_str();
    stores
        .backups
        .state()
        .iter()
        .filter(|b| b.namespace().as_deref() == Some(ns) && !b.phase().is_terminal())
        .filter(|b| {
            b.status
                .as_ref()
                .and_then(|s| conditions::find(&s.conditions, READY))
                .is_some_and(|c| c.reason == quota)
        })
        .map(|b| ObjectRef::from_obj(b.as_ref()))
        .collect()
}

/// The Desktop UID a backup pinned on its first pass.
fn pinned(b: &DesktopBackup) -> Option<&str> {
    b.status.as_ref().and_then(|s| s.desktop_uid.as_deref())
}

/// Whether a backup may still hold its Desktop's record: not ended, or ended with its
/// finalizer still on.
fn is_open(b: &DesktopBackup) -> bool {
    !b.phase().is_terminal() || has_finalizer(b)
}

fn has_finalizer(b: &DesktopBackup) -> bool {
    b.finalizers().iter().any(|f| f == FINALIZER_OPERATOR)
}

/// The Desktop a backup is of: by the UID it pinned, else by the name in its spec.
fn desktop_of(stores: &Stores, b: &DesktopBackup) -> Option<Arc<Desktop>> {
    let ns = b.namespace();
    match pinned(b) {
        Some(uid) => stores.desktop_by_uid(uid).filter(|d| d.namespace() == ns),
        None => {
            let r = ObjectRef::new(&b.spec.desktop).within(ns.as_deref().unwrap_or_default());
            stores.desktops.get(&r)
        }
    }
}

/// The desktop's other backups, as the chain decisions read them.
fn siblings(stores: &Stores, b: &DesktopBackup, desktop_uid: &str) -> Vec<Arc<DesktopBackup>> {
    stores
        .backups
        .state()
        .into_iter()
        .filter(|o| o.namespace() == b.namespace() && o.uid() != b.uid())
        .filter(|o| pinned(o) == Some(desktop_uid))
        .collect()
}

/// Who made a backup: the pool's schedule (labelled so; retention may delete it) or a user.
/// A tenant who labels a backup of their own as scheduled lets retention delete it, which they
/// could do themselves.
fn origin(b: &DesktopBackup) -> Origin {
    if b.labels().get(LABEL_SCHEDULED).map(String::as_str) == Some("true") {
        Origin::Schedule
    } else {
        Origin::User
    }
}

fn as_backup(b: &DesktopBackup) -> Backup<'_> {
    let st = b.status.as_ref();
    Backup {
        name: b.metadata.uid.as_deref().unwrap_or_default(),
        created: b
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
        kind: st.and_then(|s| s.kind).unwrap_or(Kind::Incremental),
        origin: origin(b),
        state: b.phase(),
        parent: st.and_then(|s| s.parent_uid.as_deref()),
    }
}

/// The facts of `d` for a pass over backup `b` at `now`.
fn desktop_facts<'a>(ctx: &Context, d: &'a Desktop, now: Timestamp) -> DesktopFacts<'a> {
    let st = d.status.as_ref();
    let node = st.and_then(|s| s.node.as_deref());
    let has_backup_dir = ctx
        .stores
        .pool(d.pool())
        .is_some_and(|p| p.spec.backup.is_some());
    DesktopFacts {
        uid: d.metadata.uid.as_deref().unwrap_or_default(),
        node,
        host_ready: node.is_some_and(|n| matches!(ctx.heartbeat(n, now), Heartbeat::Fresh { .. })),
        running: st.is_some_and(|s| conditions::is_true(&s.conditions, RUNNING)),
        stopped: stopped_at(d).is_some(),
        migrating: st.is_some_and(|s| s.migration.is_some()),
        restoring: st.is_some_and(|s| s.restore_over.is_some()),
        deleting: d.metadata.deletion_timestamp.is_some(),
        has_backup_dir,
        record: st.and_then(|s| s.backup.as_ref()).map(|r| r.uid.as_str()),
        report: st.and_then(|s| s.backup_report.as_ref()).map(|r| {
            let said = match r.state {
                BackupState::Started => Reported::Started,
                BackupState::Completed => Reported::Completed,
                BackupState::Failed => Reported::Failed,
            };
            (r.uid.as_str(), said)
        }),
    }
}

/// When desktop `d`'s domain stopped, if it is stopped for good: `spec.power: Off`, its host
/// says the domain is off (`Running=False`, reason Stopped), and the idle policy holds nothing of it (saved memory a backup must
/// not start). Seconds since the epoch, from its `Running` condition.
pub(crate) fn stopped_at(d: &Desktop) -> Option<i64> {
    let st = d.status.as_ref()?;
    // Held by the idle policy (suspended with saved memory, or shut down): its host keeps the
    // domain as the policy left it and starts nothing for a backup.
    if d.spec.power != Power::Off || st.reclaimed.is_some() {
        return None;
    }
    // Stopped, not Stopping: the host says the domain is off, not that a shutdown was asked.
    conditions::find(&st.conditions, RUNNING)
        .filter(|c| c.status == "False" && c.reason == AgentReason::Stopped.as_str())
        .map(|c| c.last_transition_time.0.as_second())
}

/// One pass over a DesktopBackup.
#[tracing::instrument(skip_all, fields(backup = %b.name_any(), ns = b.namespace().unwrap_or_default()))]
pub async fn reconcile(b: Arc<DesktopBackup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _busy = ctx.reconciles.backups.begin();
    ctx.metrics.reconciled(NAME);
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    let ns = b.namespace().ok_or(Error::MissingField("namespace"))?;
    let uid = b.uid().ok_or(Error::MissingField("uid"))?;
    let pass = Pass {
        b: b.clone(),
        ctx: &ctx,
        api: Api::namespaced(ctx.client.clone(), &ns),
        desktops: Api::namespaced(ctx.client.clone(), &ns),
        ns,
        uid: uid.clone(),
        now: Timestamp::now(),
    };
    let result = fence::scope(ctx.fence.clone(), async {
        if b.metadata.deletion_timestamp.is_some() {
            commit::deleted(&pass).await
        } else {
            commit::apply(&pass).await
        }
    })
    .await;
    let action = super::action::settle(result)?;
    ctx.succeeded(&format!("{NAME}/{uid}"));
    Ok(action)
}

/// Why namespace `ns` may write no more backups now (its backups' files reach a quota's
/// `deskvirt.io/backup-storage`), if so.
fn over_quota(ctx: &Context, ns: &str) -> Option<String> {
    let quotas = ctx.stores.quota_limits(ns);
    if quotas.is_empty() {
        return None;
    }
    let used = ctx
        .stores
        .backups
        .state()
        .iter()
        .filter(|o| o.namespace().as_deref() == Some(ns))
        .filter_map(|o| o.status.as_ref())
        .filter(|s| s.location.is_some())
        .map(|s| s.size_bytes.unwrap_or(0))
        .fold(0u64, u64::saturating_add);
    crate::tenancy::backup_room(ns, quotas.iter().map(|(n, h)| (n.as_str(), h)), used)
        .err()
        .map(|e| e.to_string())
}

/// The pass's facts, read from the caches.
fn facts<'a>(
    pass: &Pass<'_>,
    b: &'a DesktopBackup,
    d: Option<&'a Desktop>,
    siblings: &'a [Backup<'a>],
) -> Facts<'a> {
    let st = b.status.as_ref();
    let waited = b
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| pass.now.as_second().saturating_sub(t.0.as_second()));
    Facts {
        uid: b.metadata.uid.as_deref().unwrap_or_default(),
        state: b.phase(),
        pinned: pinned(b),
        node: st.and_then(|s| s.node.as_deref()),
        desktop: d.map(|d| desktop_facts(pass.ctx, d, pass.now)),
        ask: Ask {
            kind: b.spec.kind,
            new_chain: b.spec.new_chain,
            origin: origin(b),
        },
        siblings,
        over_quota: (b.phase() == deskvirt_core::backup::State::Pending)
            .then(|| over_quota(pass.ctx, &pass.ns))
            .flatten(),
        waited_secs: waited,
        pending_timeout_secs: i64::try_from(PENDING_TIMEOUT.as_secs()).unwrap_or(i64::MAX),
    }
}
