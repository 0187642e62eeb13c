//! The DesktopMigration controller: admits a request to move a desktop, picks and reserves its
//! target in the pool's ledger (a port, and the desktop's size charged there), records the
//! target on the Desktop before any host acts, and frees the target when the migration ends or
//! is deleted (cancelled).

mod commit;
pub mod incoming;
mod plan;
#[cfg(test)]
mod plan_tests;
mod to_pool;

use std::sync::Arc;

use deskvirt_crds::migration::MigrationPhase;
use deskvirt_crds::{Desktop, DesktopMigration};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::{drive, on_leadership, watch_config};
use crate::context::{Context, stopped};
use crate::fence;

const NAME: &str = "migration";

/// Migrations reconciled at once: each holds the ledger lock only to plan.
const CONCURRENCY: u16 = 4;

pub use super::action::PassError as Error;
use super::action::kube;

/// What one pass over a DesktopMigration works with.
struct Pass<'a> {
    m: Arc<DesktopMigration>,
    ctx: &'a Context,
    /// DesktopMigrations of its namespace.
    api: Api<DesktopMigration>,
    /// Desktops of its namespace.
    desktops: Api<Desktop>,
    uid: String,
    now: Timestamp,
}

/// Runs the controller until `stop`.
pub async fn run(ctx: Arc<Context>, selector: String, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let cfg = watch_config(&selector);
    let (by_desktop, by_node) = (ctx.stores.clone(), ctx.stores.clone());
    let (by_namespace, by_pool) = (ctx.stores.clone(), ctx.stores.clone());
    // Desktops and hosts wake migrations from the operator's caches once those show the
    // change: the pass reads them there.
    let controller = Controller::new(Api::<DesktopMigration>::all(client.clone()), cfg)
        .watches_stream(ctx.stores.desktop_changes.stream(), move |d| {
            // The migrations of a desktop that have not let go of it yet.
            let (ns, name, uid) = (d.namespace(), d.name_any(), d.uid());
            by_desktop
                .migrations
                .state()
                .iter()
                .filter(|m| m.namespace() == ns && is_open(m))
                .filter(|m| match pinned(m) {
                    Some(p) => Some(p) == uid.as_deref(),
                    None => m.spec.desktop == name,
                })
                .map(|m| ObjectRef::from_obj(m.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(ctx.stores.node_changes.stream(), move |_| {
            // A host's capacity or health changed: the waiting migrations look again.
            by_node
                .migrations
                .state()
                .iter()
                .filter(|m| {
                    m.status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .is_none_or(|p| !p.is_terminal())
                })
                .map(|m| ObjectRef::from_obj(m.as_ref()))
                .collect::<Vec<_>>()
        })
        // A namespace's labels (a pool's namespaceSelector) and a pool's spec decide whether
        // a waiting move into another pool may go: a change wakes those it may concern.
        .watches_stream(
            ctx.stores
                .namespace_changes
                .stream_by_key(|n| n.metadata.labels.clone()),
            move |n| waiting_for_pool(&by_namespace, |m| m.namespace() == Some(n.name_any())),
        )
        .watches_stream(
            ctx.stores
                .pool_changes
                .stream_by_key(|p| p.metadata.generation),
            move |p| {
                let name = p.name_any();
                waiting_for_pool(&by_pool, |m| m.spec.target_pool.as_deref() == Some(&name))
            },
        )
        .reconcile_all_on(on_leadership(ctx.leader.clone()))
        .graceful_shutdown_on(stopped(stop.clone()))
        .with_config(controller::Config::default().concurrency(CONCURRENCY))
        .run(
            reconcile,
            |m, e, c| super::error_policy(NAME, &m, e, &c),
            ctx,
        );
    drive(NAME, controller, stop).await;
}

/// The Pending migrations into another pool that `concerned` keeps.
fn waiting_for_pool(
    stores: &crate::context::Stores,
    concerned: impl Fn(&DesktopMigration) -> bool,
) -> Vec<ObjectRef<DesktopMigration>> {
    stores
        .migrations
        .state()
        .iter()
        .filter(|m| m.spec.target_pool.is_some() && m.phase() == MigrationPhase::Pending)
        .filter(|m| concerned(m))
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

/// The Desktop UID a migration pinned on its first pass.
fn pinned(m: &DesktopMigration) -> Option<&str> {
    m.status.as_ref().and_then(|s| s.desktop_uid.as_deref())
}

/// Whether a migration may still hold something: not ended, or ended but not yet settled (its
/// finalizer is on until its target is freed and its record cleared).
fn is_open(m: &DesktopMigration) -> bool {
    !m.phase().is_terminal() || has_finalizer(m)
}

fn has_finalizer(m: &DesktopMigration) -> bool {
    m.finalizers()
        .iter()
        .any(|f| f == deskvirt_crds::constants::FINALIZER_OPERATOR)
}

/// One pass over a DesktopMigration.
#[tracing::instrument(skip_all, fields(migration = %m.name_any(), ns = m.namespace().unwrap_or_default()))]
pub async fn reconcile(m: Arc<DesktopMigration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _busy = ctx.reconciles.migrations.begin();
    ctx.metrics.reconciled(NAME);
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    let ns = m.namespace().ok_or(Error::MissingField("namespace"))?;
    let uid = m.uid().ok_or(Error::MissingField("uid"))?;
    let pass = Pass {
        m: m.clone(),
        ctx: &ctx,
        api: Api::namespaced(ctx.client.clone(), &ns),
        desktops: Api::namespaced(ctx.client.clone(), &ns),
        uid: uid.clone(),
        now: Timestamp::now(),
    };
    let result = fence::scope(ctx.fence.clone(), async {
        if m.metadata.deletion_timestamp.is_some() {
            commit::cancel(&pass).await
        } else {
            commit::apply(&pass).await
        }
    })
    .await;
    let action = super::action::settle(result)?;
    ctx.succeeded(&format!("{NAME}/{uid}"));
    Ok(action)
}
