//! The Desktop controller: validates, binds a desktop once to a host (port, MAC) with the pure
//! scheduler and the pool's ledger, hands its console password over, reclaims it when idle past
//! its policy's timeout and brings it back on a wake, derives its phase from the agent's
//! conditions and the host's heartbeat, and releases the ledger when it is deleted.

mod admit;
mod apply;
mod arrive;
mod bind;
mod bound;
#[cfg(test)]
mod bound_tests;
mod busy_port;
mod cleanup;
mod console;
mod drain;
mod duplicate;
mod idle;
mod image;
mod keep;
mod size;
mod status;
pub(crate) mod triggers;
mod txn;

use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::desktop::Desktop;
use deskvirt_runtime::cache::Touch;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{self, Action};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::{Categorized, chain, drive, is_conflict, kube_transient, on_leadership, watch_config};
use crate::console::mirror;
use crate::context::{Context, Stores, stopped};
use crate::fence;
use crate::world::pool_of;

const NAME: &str = "desktop";

/// Why a Desktop reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action}")]
    Kube {
        action: &'static str,
        source: kube::Error,
    },
    #[error("cannot draw a console password")]
    Random(#[source] getrandom::Error),
    #[error("desktop has no {0}")]
    MissingField(&'static str),
    #[error("the console password mirror keeps changing under the operator")]
    MirrorContended,
    #[error("write not sent")]
    Fenced(#[from] crate::fence::Fenced),
}

impl Error {
    /// Whether the write lost a race with another writer: read again, nothing is wrong.
    fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube { source, .. } if is_conflict(source))
    }

    /// Whether the object written is gone.
    fn is_gone(&self) -> bool {
        matches!(self, Error::Kube { source: kube::Error::Api(s), .. } if s.code == 404)
    }

    /// Whether the write came after the desktop was deleted, which the cached copy did not show
    /// yet: gone, or refused for adding a finalizer to an object being deleted. The API's 422
    /// says so only in its message; the whole sentence is matched, so a value a tenant wrote
    /// that the message quotes cannot pass for it.
    fn is_after_deletion(&self) -> bool {
        const FINALIZER_REFUSED: &str = "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted";
        self.is_gone()
            || matches!(self, Error::Kube { source: kube::Error::Api(s), .. }
                if s.code == 422 && s.message.contains(FINALIZER_REFUSED))
    }
}

impl Categorized for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "KubeApi",
            Error::Random(_) => "Random",
            Error::MissingField(_) => "InvalidObject",
            Error::MirrorContended => "Conflict",
            Error::Fenced(_) => "Fenced",
        }
    }
    fn is_transient(&self) -> bool {
        match self {
            Error::Kube { source, .. } => kube_transient(source),
            Error::Random(_) | Error::MirrorContended | Error::Fenced(_) => true,
            Error::MissingField(_) => false,
        }
    }
}

fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

/// What one pass over a Desktop works with.
struct Pass<'a> {
    /// The version of the Desktop the pass decides on.
    d: Arc<Desktop>,
    ctx: &'a Context,
    /// Desktops of its namespace.
    api: Api<Desktop>,
    uid: String,
    now: Timestamp,
}

/// Desktops reconciled at once. Unbounded, every reconcile in flight held its own apiserver
/// connection (hundreds during a burst of 1,000, about 10 KiB of buffers each); binding is
/// serialized by the ledger anyway.
const CONCURRENCY: u16 = 16;

/// Runs the controller until `stop`.
pub async fn run(ctx: Arc<Context>, selector: String, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let cfg = watch_config(&selector);
    let by_node = ctx.stores.clone();
    let by_pool = ctx.stores.clone();
    let by_mirror = ctx.stores.clone();
    let (by_namespace, by_quota) = (ctx.stores.clone(), ctx.stores.clone());
    let by_image = ctx.stores.clone();
    let seen = Arc::new(triggers::Seen::default());
    let stepped = ctx.clone();
    let (seen_hosts, seen_pools) = (seen.clone(), seen);
    let controller = deskvirt_runtime::cache::controller_keyed(
        Api::<Desktop>::all(client.clone()),
        cfg.clone(),
        triggers::desktop_key,
        // A version a pass wrote and went on from: its event brings that pass's own write.
        move |d| stepped.steps.is_own(d),
    )
    .watches_stream(mirror_changes(&ctx), move |m| {
        desktop_of_mirror(&m, &by_mirror)
    })
    // Hosts and pools wake desktops from the operator's own caches, once those show the
    // change: a watch of its own could run ahead of what the pass then reads.
    .watches_stream(ctx.stores.node_changes.stream(), move |node| {
        // Desktops on the host (health) and pending desktops of its pool (capacity),
        // only when what they depend on changed.
        let wake = seen_hosts.host(&node);
        if !wake.bound && !wake.pending {
            return vec![];
        }
        let name = node.name_any();
        let pool = pool_of(&node, &by_node.pools.state());
        by_node
            .desktops
            .state()
            .iter()
            .filter(|d| {
                let bound = d.status.as_ref().and_then(|s| s.node.as_deref());
                bound == Some(name.as_str())
                    || (bound.is_none() && pool.as_deref() == Some(d.pool()))
            })
            .map(|d| ObjectRef::from_obj(d.as_ref()))
            .collect::<Vec<_>>()
    })
    .watches_stream(ctx.stores.pool_changes.stream(), move |pool| {
        let wake = seen_pools.pool(&pool);
        let name = pool.name_any();
        by_pool
            .desktops
            .state()
            .iter()
            .filter(|d| d.pool() == name)
            .filter(|d| {
                let bound = d.status.as_ref().is_some_and(|s| s.node.is_some());
                if bound { wake.bound } else { wake.pending }
            })
            .map(|d| ObjectRef::from_obj(d.as_ref()))
            .collect::<Vec<_>>()
    })
    // A namespace's labels (a pool's namespaceSelector) and its quotas decide whether its
    // unbound desktops may be placed: a change wakes them.
    .watches_stream(
        ctx.stores
            .namespace_changes
            .stream_by_key(|n| n.metadata.labels.clone()),
        move |n| unbound_in(&by_namespace, &n.name_any()),
    )
    .watches_stream(
        ctx.stores
            .quota_changes
            .stream_by_key(|q| q.spec.as_ref().and_then(|s| s.hard.clone())),
        move |q| unbound_in(&by_quota, &q.namespace().unwrap_or_default()),
    )
    // An image's version, pools or deletion decide whether the unbound desktops naming it may
    // be placed: a change wakes them.
    .watches_stream(
        ctx.stores.image_changes.stream_by_key(|i| {
            let st = i.status.as_ref();
            (
                i.spec.pools.clone(),
                st.and_then(|s| s.version),
                i.metadata.deletion_timestamp.is_some(),
            )
        }),
        move |i| unbound_naming(&by_image, &i),
    )
    .reconcile_all_on(on_leadership(ctx.leader.clone()))
    .graceful_shutdown_on(stopped(stop.clone()))
    .with_config(controller::Config::default().concurrency(CONCURRENCY))
    .run(
        reconcile,
        |d, e, c| super::error_policy(NAME, &d, e, &c),
        ctx,
    );
    drive(NAME, controller, stop).await;
}

/// The unbound desktops whose `spec.disk.imageRef` names `image`.
fn unbound_naming(stores: &Stores, image: &deskvirt_crds::DesktopImage) -> Vec<ObjectRef<Desktop>> {
    let (name, ns) = (image.name_any(), image.namespace().unwrap_or_default());
    stores
        .desktops
        .state()
        .iter()
        .filter(|d| d.status.as_ref().is_none_or(|s| s.node.is_none()))
        .filter(|d| {
            d.spec.disk.image_ref.as_ref().is_some_and(|r| {
                r.name == name
                    && r.namespace.clone().or_else(|| d.namespace()).as_deref() == Some(&ns)
            })
        })
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}

/// The desktops of `namespace` not bound to a host.
fn unbound_in(stores: &Stores, namespace: &str) -> Vec<ObjectRef<Desktop>> {
    stores
        .desktops
        .state()
        .iter()
        .filter(|d| d.namespace().as_deref() == Some(namespace))
        .filter(|d| d.status.as_ref().is_none_or(|s| s.node.is_none()))
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}

/// The console mirrors that changed in a way their desktop's pass has not seen: deleted, or
/// written by anyone but this replica (or not as it last wrote them). A mirror this replica
/// has just written wakes nobody: the pass that wrote it acted on it.
fn mirror_changes(ctx: &Arc<Context>) -> BoxStream<'static, Result<Secret, watcher::Error>> {
    let own = ctx.clone();
    // From the mirrors' cache once it shows the change: the pass reads the mirror there.
    ctx.stores
        .mirror_changes
        .stream_where(move |m, touch| touch == Touch::Deleted || !own.mirror_is_own(m))
}

/// The Desktop a mirror belongs to: by its annotation, else by UID through the cache.
fn desktop_of_mirror(m: &Secret, stores: &Stores) -> Option<ObjectRef<Desktop>> {
    if let Some((ns, name)) = mirror::desktop_of(m) {
        return Some(ObjectRef::new(name).within(ns));
    }
    let d = stores.desktop_by_uid(mirror::uid_of(m)?)?;
    Some(ObjectRef::from_obj(d.as_ref()))
}

/// One pass over a Desktop.
#[tracing::instrument(skip_all, fields(desktop = %d.name_any(), ns = d.namespace().unwrap_or_default()))]
pub async fn reconcile(d: Arc<Desktop>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _busy = ctx.reconciles.desktops.begin();
    ctx.metrics.reconciled(NAME);
    tracing::debug!(
        resource_version = d.resource_version().unwrap_or_default(),
        "desktop pass"
    );
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    let ns = d.namespace().ok_or(Error::MissingField("namespace"))?;
    let uid = d.uid().ok_or(Error::MissingField("uid"))?;
    let pass = Pass {
        d: d.clone(),
        ctx: &ctx,
        api: Api::namespaced(ctx.client.clone(), &ns),
        uid: uid.clone(),
        now: Timestamp::now(),
    };
    // Every write of the pass passes the fence first (see `crate::fence`).
    let result = fence::scope(ctx.fence.clone(), async {
        if d.metadata.deletion_timestamp.is_some() {
            cleanup::cleanup(&pass).await
        } else {
            apply::apply(pass).await
        }
    })
    .await;
    let action = match result {
        Ok(action) => action,
        // The Lease may have expired: nothing was sent; the elector steps down meanwhile.
        Err(Error::Fenced(e)) => {
            tracing::warn!(error = %e, "pass stopped before writing");
            Action::requeue(Duration::from_secs(1))
        }
        // Someone wrote since the cache was filled; its watch event brings the news.
        Err(e) if e.is_conflict() => {
            tracing::debug!(error = %e, "lost a write race; looking again");
            Action::requeue(Duration::from_secs(1))
        }
        // Deleted under the pass: the deletion's watch event brings the cleanup pass.
        Err(e) if e.is_after_deletion() => {
            tracing::debug!(error = %chain(&e), "the desktop was deleted during the pass");
            Action::await_change()
        }
        Err(e) => return Err(e),
    };
    ctx.succeeded(&format!("{NAME}/{uid}"));
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, reason: &str, message: &str) -> Error {
        let status = kube::core::Status::failure(message, reason).with_code(code);
        Error::Kube {
            action: "add finalizer and labels",
            source: kube::Error::Api(Box::new(status)),
        }
    }

    #[test]
    fn a_write_after_the_deletion_is_told_apart() {
        let finalizer = "metadata.finalizers: Forbidden: no new finalizers can be added if the \
                         object is being deleted, found new finalizers []string{\"deskvirt.io/operator\"}";
        assert!(api(422, "Invalid", finalizer).is_after_deletion());
        assert!(api(404, "NotFound", "desktops \"d\" not found").is_after_deletion());
        let invalid = "spec.cpu: Invalid value: 0: spec.cpu in body should be >= 1";
        assert!(!api(422, "Invalid", invalid).is_after_deletion());
        let quoted = "status.message: Invalid value: \"the object is being deleted\": too long";
        assert!(!api(422, "Invalid", quoted).is_after_deletion());
        assert!(!api(409, "Conflict", "the object has been modified").is_after_deletion());
    }
}
