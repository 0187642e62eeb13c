//! The drain controller: while a DomainNode's `spec.drain` is set, it makes one live
//! DesktopMigration per running desktop of the host (connected ones first, within the host's
//! migration limit), clears failed ones for another try, and reports what is left in
//! `status.drain` and the `Drained` condition. Stopped desktops are re-bound by the Desktop
//! pass (`desktop/drain.rs`). When `spec.drain` is cleared, its migrations are deleted (cancelled) and
//! its status fields removed.

mod commit;

use std::sync::Arc;
use std::time::Duration;

use deskvirt_core::drain::{self, Outcome, Power};
use deskvirt_core::types::Power as SpecPower;
use deskvirt_crds::conditions;
use deskvirt_crds::constants::condition::{READY, RUNNING};
use deskvirt_crds::constants::{ANNOTATION_DRAIN_NODE, LABEL_DRAIN};
use deskvirt_crds::desktop::IdleAction;
use deskvirt_crds::read::released;
use deskvirt_crds::{Desktop, DesktopMigration, DomainNode};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::{drive, on_leadership, watch_config};
use crate::context::{Context, Stores, stopped};
use crate::fence;

const NAME: &str = "drain";

/// How long a failed drain migration is shown before the drain makes a new one.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// How often a drain that is not done looks again, whatever the watches say.
const RECHECK: Duration = Duration::from_secs(15);

pub use super::action::PassError as Error;
use super::action::kube;

/// Runs the controller until `stop`. `selector` is the operator's label selector: the
/// migrations a drain makes carry its `key=value` terms so that the operator sees them.
pub async fn run(ctx: Arc<Context>, selector: String, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let cfg = watch_config(&selector);
    let (by_desktop, by_migration) = (ctx.stores.clone(), ctx.stores.clone());
    let labels = Arc::new(commit::selector_labels(&selector));
    // Desktops and migrations wake hosts from the operator's caches once those show the
    // change: the pass reads them there.
    let controller = Controller::new(Api::<DomainNode>::all(client.clone()), cfg)
        .watches_stream(ctx.stores.desktop_changes.stream(), move |d| {
            // The host a desktop is bound to, and the one it last left, when either drains.
            let st = d.status.as_ref();
            let hosts = [
                st.and_then(|s| s.node.clone()),
                st.and_then(|s| s.last_move.as_ref())
                    .map(|m| m.from.clone()),
            ];
            hosts
                .into_iter()
                .flatten()
                .filter_map(|h| by_desktop.node(&h))
                .filter(|n| involved(n))
                .map(|n| ObjectRef::from_obj(n.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(ctx.stores.migration_changes.stream(), move |m| {
            m.annotations()
                .get(ANNOTATION_DRAIN_NODE)
                .and_then(|h| by_migration.node(h))
                .map(|n| ObjectRef::from_obj(n.as_ref()))
        })
        .reconcile_all_on(on_leadership(ctx.leader.clone()))
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(
            move |n, ctx| reconcile(n, ctx, labels.clone()),
            |n, e, c| super::error_policy(NAME, &n, e, &c),
            ctx,
        );
    drive(NAME, controller, stop).await;
}

/// Whether a host is draining or still shows a drain's status to clear.
fn involved(n: &DomainNode) -> bool {
    n.spec.drain || n.status.as_ref().is_some_and(|s| s.drain.is_some())
}

/// One drain pass over a host.
#[tracing::instrument(skip_all, fields(node = %n.name_any()))]
async fn reconcile(
    n: Arc<DomainNode>,
    ctx: Arc<Context>,
    labels: Arc<Vec<(String, String)>>,
) -> Result<Action, Error> {
    ctx.metrics.reconciled(NAME);
    // A migration the drain made may show in the cache only after the drain was cleared and
    // its status removed: the host is still involved until none is left.
    if !ctx.is_leader()
        || !involved(&n) && !has_drained_condition(&n) && made_for(&ctx.stores, &n).is_empty()
    {
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();
    let result = fence::scope(ctx.fence.clone(), async {
        if n.spec.drain {
            commit::drain(&ctx, &n, &labels, now).await
        } else {
            commit::undrain(&ctx, &n).await
        }
    })
    .await;
    super::action::settle(result)
}

fn has_drained_condition(n: &DomainNode) -> bool {
    n.status.as_ref().is_some_and(|s| {
        conditions::find(&s.conditions, deskvirt_crds::constants::condition::DRAINED).is_some()
    })
}

/// `namespace/name` of a Desktop.
pub fn key(d: &Desktop) -> String {
    format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any())
}

/// Whether the idle policy suspended `d` with its memory saved on its host, as the host
/// confirmed (`status.reclaimed` Suspend, released).
pub fn memory_saved(d: &Desktop) -> bool {
    let st = d.status.as_ref();
    st.and_then(|s| s.reclaimed.as_ref())
        .is_some_and(|r| r.action == IdleAction::Suspend)
        && st.is_some_and(released)
}

/// What the drain decides on about one desktop bound to the draining host.
pub fn desktop_facts<'a>(d: &Desktop, key: &'a str) -> drain::Desktop<'a> {
    let st = d.status.as_ref();
    let running = st.and_then(|s| conditions::find(&s.conditions, RUNNING));
    let power = if d.metadata.deletion_timestamp.is_some() {
        Power::Settling
    } else if running.is_some_and(|c| c.status == "True") {
        Power::Running
    // Stopped only as the host reported it: a Running condition that is False.
    } else if running.is_some_and(|c| c.status == "False")
        && (d.spec.power == SpecPower::Off || st.is_some_and(released))
    {
        Power::Stopped
    } else {
        Power::Settling
    };
    drain::Desktop {
        key,
        power,
        connected: st
            .and_then(|s| s.session.as_ref())
            .is_some_and(|s| s.connected),
        memory_saved: memory_saved(d),
        pinned_to_host: d.spec.performance.dedicated_cpus || !d.spec.performance.sriov.is_empty(),
        migrating: st.is_some_and(|s| s.migration.is_some()),
    }
}

/// The desktops bound to `node` (that hold their binding), with their keys.
fn bound_to(stores: &Stores, node: &str) -> Vec<(String, Arc<Desktop>)> {
    let mut out: Vec<_> = stores
        .desktops
        .state()
        .into_iter()
        .filter(|d| d.status.as_ref().and_then(|s| s.node.as_deref()) == Some(node))
        .filter(|d| crate::context::holds_binding(d))
        .map(|d| (key(&d), d))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The migrations the drain of `node` made: labelled and annotated for it, and owned by that
/// DomainNode (its UID). A tenant can forge labels on a migration of its own, never the
/// owner's UID it cannot read, and a migration that is not ours is neither counted nor deleted.
fn made_for(stores: &Stores, node: &DomainNode) -> Vec<Arc<DesktopMigration>> {
    let name = node.name_any();
    let label = deskvirt_core::names::label_value(&name);
    let uid = node.uid();
    stores
        .migrations
        .state()
        .into_iter()
        .filter(|m| m.labels().get(LABEL_DRAIN) == Some(&label))
        .filter(|m| m.annotations().get(ANNOTATION_DRAIN_NODE) == Some(&name))
        .filter(|m| {
            m.owner_references()
                .iter()
                .any(|o| o.kind == "DomainNode" && Some(&o.uid) == uid.as_ref())
        })
        .collect()
}

/// How a drain migration ended, or that it has not, at `now`.
fn outcome(m: &DesktopMigration, now: Timestamp) -> Outcome<'_> {
    use deskvirt_core::migration::MigrationPhase as P;
    match m.phase() {
        P::Succeeded => Outcome::Succeeded,
        P::Failed => {
            let st = m.status.as_ref();
            let ready = st.and_then(|s| conditions::find(&s.conditions, READY));
            let ended = st
                .and_then(|s| s.completion_time.as_ref())
                .map(|t| t.0)
                .unwrap_or(now);
            Outcome::Failed {
                reason: ready.map(|c| c.reason.as_str()).unwrap_or("Failed"),
                message: ready.map(|c| c.message.as_str()).unwrap_or_default(),
                age_secs: now.as_second() - ended.as_second(),
            }
        }
        _ => Outcome::Open,
    }
}
