//! The controllers (Desktop, DesktopMigration, DesktopBackup, DomainNode, ResourcePool) and what they share: server-side
//! apply under the operator's field manager, the leadership trigger, the error policy, and a
//! shutdown that cannot hang.

pub mod action;
pub mod backup;
pub mod desktop;
pub mod domain_node;
pub mod drain;
pub mod image;
pub mod migration;
pub mod resource_pool;

use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::constants::MANAGER_OPERATOR;
use futures::{Stream, StreamExt};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::context::{Context, stopped};

/// How long a controller may finish its reconciles in flight after the stop signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Errors that know how to be counted and retried.
pub trait Categorized: std::error::Error {
    /// Short category for metrics and Events.
    fn category(&self) -> &'static str;
    /// Whether retrying soon may help.
    fn is_transient(&self) -> bool;
}

/// Whether a Kubernetes API error may go away by itself.
pub fn kube_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 409 || s.code == 429 || s.code >= 500,
        _ => true,
    }
}

/// Whether the API refused a write because the object changed since it was read.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Watch settings restricted to `selector` (empty: everything).
pub fn watch_config(selector: &str) -> watcher::Config {
    if selector.is_empty() {
        watcher::Config::default()
    } else {
        watcher::Config::default().labels(selector)
    }
}

/// Drives a controller until its stream ends. Once `stop` flips the controller gets
/// [`SHUTDOWN_GRACE`] to finish, then is dropped: kube's graceful shutdown waits for a first
/// list that never comes when a watch cannot list (CRDs missing, RBAC), and SIGTERM must still
/// end the process.
pub async fn drive<S: Stream>(name: &'static str, controller: S, stop: watch::Receiver<bool>) {
    let run = controller.for_each(|_| async {});
    tokio::pin!(run);
    tokio::select! {
        () = &mut run => return,
        () = stopped(stop) => {}
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, run).await.is_err() {
        tracing::warn!(
            controller = name,
            grace = ?SHUTDOWN_GRACE,
            "controller did not stop in time; dropped"
        );
    }
}

/// A server-side apply of an object's status: its identity, an optional resourceVersion
/// precondition, and the owner's typed status fragment (the fields it owns, and only those).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusApply<'a, S> {
    api_version: String,
    kind: String,
    metadata: ApplyMeta<'a>,
    status: S,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ApplyMeta<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_version: Option<&'a str>,
}

impl<'a, S: Serialize> StatusApply<'a, S> {
    /// `status` for the `K` named `name` (in `namespace`, for a namespaced kind).
    pub fn new<K: Resource<DynamicType = ()>>(
        name: &'a str,
        namespace: Option<&'a str>,
        status: S,
    ) -> Self {
        Self {
            api_version: K::api_version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            metadata: ApplyMeta {
                name,
                namespace,
                resource_version: None,
            },
            status,
        }
    }

    /// The API refuses it (409) when the object changed since `resource_version`.
    pub fn guarded(mut self, resource_version: Option<&'a str>) -> Self {
        self.metadata.resource_version = resource_version;
        self
    }
}

/// Server-side apply of a status on the status subresource, as the operator.
pub async fn apply_status<K, S>(api: &Api<K>, body: &StatusApply<'_, S>) -> Result<K, kube::Error>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + std::fmt::Debug,
{
    apply_status_as(api, body, MANAGER_OPERATOR).await
}

/// Server-side apply of an object's status under `manager`: an owner of a part of the status
/// (a migration record, a drain's progress) keeps its fields apart from the pass's.
pub async fn apply_status_as<K, S>(
    api: &Api<K>,
    body: &StatusApply<'_, S>,
    manager: &str,
) -> Result<K, kube::Error>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + std::fmt::Debug,
{
    let pp = PatchParams::apply(manager).force();
    api.patch_status(body.metadata.name, &pp, &Patch::Apply(body))
        .await
}

/// Server-side apply of metadata (labels, finalizers), as the operator.
pub async fn apply_meta<K>(
    api: &Api<K>,
    name: &str,
    body: &serde_json::Value,
) -> Result<K, kube::Error>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    let pp = PatchParams::apply(MANAGER_OPERATOR).force();
    api.patch(name, &pp, &Patch::Apply(body)).await
}

/// Removes `finalizer` from `obj` (`deskvirt_runtime::finalizers::remove`).
pub async fn remove_finalizer<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    remove_finalizers(api, obj, &[finalizer]).await
}

/// Removes `finalizers` from `obj` in one write, guarded by the version read.
pub async fn remove_finalizers<K>(
    api: &Api<K>,
    obj: &K,
    finalizers: &[&str],
) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    deskvirt_runtime::finalizers::remove(api, obj, finalizers, MANAGER_OPERATOR).await
}

/// A stream that yields once each time this replica becomes leader.
pub fn on_leadership(rx: watch::Receiver<bool>) -> impl Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            if rx.changed().await.is_err() {
                return None;
            }
            if *rx.borrow_and_update() {
                return Some(((), rx));
            }
        }
    })
}

/// An error with its sources, for logs (messages do not repeat their source, so the log must).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The shared error policy: log, count, and requeue with a per-object backoff.
pub fn error_policy<K, E>(controller: &'static str, obj: &Arc<K>, err: &E, ctx: &Context) -> Action
where
    K: Resource,
    E: Categorized,
{
    ctx.metrics.failed(controller, err.category());
    let key = format!("{controller}/{}", obj.uid().unwrap_or_default());
    let delay = ctx.backoff(key, err.is_transient());
    tracing::warn!(
        controller,
        object = %obj.name_any(),
        category = err.category(),
        error = %chain(err),
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}
