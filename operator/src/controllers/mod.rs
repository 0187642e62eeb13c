//! The three controllers (Desktop, DomainNode, ResourcePool) and what they share: server-side
//! apply under the operator's field manager, the leadership trigger, and the error policy.

pub mod desktop;
pub mod domain_node;
pub mod resource_pool;

use std::sync::Arc;

use deskvirt_crds::constants::MANAGER_OPERATOR;
use futures::Stream;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::context::Context;

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

/// Server-side apply of `status` on the status subresource, as the operator.
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    body: &serde_json::Value,
) -> Result<K, kube::Error>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    let pp = PatchParams::apply(MANAGER_OPERATOR).force();
    api.patch_status(name, &pp, &Patch::Apply(body)).await
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
        error = %err,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}
