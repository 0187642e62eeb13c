//! Decides how both binaries keep a watched cache: a reflector store and the future that fills
//! it (restarting the watch with backoff, logging its errors); the caller decides whether to
//! spawn that future or drive it alongside others. Cached objects carry no managedFields.

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

/// Drops `metadata.managedFields` from a cached object: neither binary reads it, and it is
/// about half of a Desktop's JSON (each entry a `serde_json::Value` tree in memory).
pub fn strip_managed_fields<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// A store of `api` filtered by `config`, and the future that keeps it filled until dropped.
pub fn reflect<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let events = watcher(api, config)
        .default_backoff()
        .modify(strip_managed_fields);
    let fill = reflector::reflector(writer, events).for_each(|event| async move {
        if let Err(e) = event {
            tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying");
        }
    });
    (reader, fill.boxed())
}
