//! Decides how both binaries keep a watched cache: a reflector store and the future that fills
//! it (restarting the watch with backoff, logging its errors); the caller decides whether to
//! spawn that future or drive it alongside others.

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

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
    let fill = reflector::reflector(writer, watcher(api, config).default_backoff()).for_each(
        |event| async move {
            if let Err(e) = event {
                tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying");
            }
        },
    );
    (reader, fill.boxed())
}
