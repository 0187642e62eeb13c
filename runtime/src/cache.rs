//! Decides how both binaries keep a watched cache: a reflector store and the future that fills
//! it (restarting the watch with backoff, logging its errors); the caller decides whether to
//! spawn that future or drive it alongside others; and the trimmed stream a controller runs on.
//! Cached objects carry no managedFields and no `kubectl apply` copy of themselves.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, PredicateConfig, WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

/// What a cached object must be: a static Kubernetes type a watch can decode and share.
pub trait Cached:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Cached for K where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// The annotation `kubectl apply` keeps a copy of the whole last applied object in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what neither binary reads from a cached object: `metadata.managedFields`, about half
/// of a Desktop's JSON and, as `serde_json::Value` trees, most of its memory, and the copy of
/// the object that `kubectl apply` keeps in an annotation.
pub fn trim<K: Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// A store of `api` filtered by `config`, filled by the returned stream of trimmed objects,
/// for `Controller::for_stream`: what `Controller::new` builds, without the fields [`trim`]
/// drops (`Controller::new` caches every object whole).
pub fn controlled<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (Store<K>, BoxStream<'static, Result<K, watcher::Error>>)
where
    K: Cached,
{
    let (reader, writer) = reflector::store();
    let objects = watcher(api, config)
        .modify(trim)
        .reflect(writer)
        .applied_objects();
    (reader, objects.boxed())
}

/// A store of `api` filtered by `config`, and the future that keeps it filled until dropped.
pub fn reflect<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Cached,
{
    reflect_touching(api, config, |_, _| {})
}

/// [`reflect`], calling `touched` with each object the watch adds, changes or deletes (and
/// which of these), once the store holds the change: one watch both fills a cache and wakes
/// what depends on it.
pub fn reflect_touching<K, F>(
    api: Api<K>,
    config: watcher::Config,
    touched: F,
) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Cached,
    F: Fn(&K, Touch) + Send + 'static,
{
    reflect_relisting(api, config, touched, || {})
}

/// [`reflect_touching`], also calling `relisted` once the store holds a new full list (after
/// a watch restarted): an object deleted while the watch was down leaves the store then,
/// without a call of `touched`.
pub fn reflect_relisting<K, F, R>(
    api: Api<K>,
    config: watcher::Config,
    touched: F,
    relisted: R,
) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Cached,
    F: Fn(&K, Touch) + Send + 'static,
    R: Fn() + Send + 'static,
{
    let (reader, writer) = reflector::store();
    let events = watcher(api, config).default_backoff().modify(trim);
    let fill = reflector::reflector(writer, events).for_each(move |event| {
        match &event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                touched(o, Touch::Applied)
            }
            Ok(watcher::Event::Delete(o)) => touched(o, Touch::Deleted),
            Ok(watcher::Event::InitDone) => relisted(),
            Ok(watcher::Event::Init) => {}
            Err(e) => {
                tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying");
            }
        }
        futures::future::ready(())
    });
    (reader, fill.boxed())
}

/// Whether a watch event changed an object or deleted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touch {
    Applied,
    Deleted,
}

/// The objects a store's watch changed (or deleted), handed on to each subscriber only once
/// the store holds the change: a controller woken by it reads a cache that already shows what
/// woke it (a watch of its own may run ahead of the cache its pass reads). Each subscriber
/// gets the latest version of each object since it last took them, so it holds at most one per
/// object. Subscribe before the store's watch is driven: a subscriber sees only what changes
/// after it subscribed.
pub struct Changes<K> {
    sinks: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<Sink<K>>>>>,
}

/// One subscriber's changes not taken yet.
struct Sink<K> {
    latest: std::sync::Mutex<std::collections::BTreeMap<String, (K, Touch)>>,
    changed: tokio::sync::Notify,
}

impl<K> Clone for Changes<K> {
    fn clone(&self) -> Self {
        Self {
            sinks: self.sinks.clone(),
        }
    }
}

impl<K> Default for Changes<K> {
    fn default() -> Self {
        Self {
            sinks: std::sync::Arc::default(),
        }
    }
}

/// `m`, recovered if a panic poisoned it: what it guards is whole at every point.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An object's key among others of its kind: its UID, else its name.
fn id_of<K: Resource>(o: &K) -> String {
    let m = o.meta();
    m.uid.clone().or_else(|| m.name.clone()).unwrap_or_default()
}

impl<K: Cached> Changes<K> {
    /// Records `o`'s latest version, or its deletion (call it once the store holds it).
    pub fn record(&self, o: &K, touch: Touch) {
        let id = id_of(o);
        for sink in lock(&self.sinks).iter() {
            lock(&sink.latest).insert(id.clone(), (o.clone(), touch));
            sink.changed.notify_one();
        }
    }

    /// A new subscriber's changes, in batches, for ever.
    fn subscribe(&self) -> BoxStream<'static, (K, Touch)> {
        let sink = std::sync::Arc::new(Sink {
            latest: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            changed: tokio::sync::Notify::new(),
        });
        lock(&self.sinks).push(sink.clone());
        futures::stream::unfold(sink, |sink| async move {
            loop {
                let batch: Vec<(K, Touch)> = std::mem::take(&mut *lock(&sink.latest))
                    .into_values()
                    .collect();
                if !batch.is_empty() {
                    return Some((futures::stream::iter(batch), sink));
                }
                sink.changed.notified().await;
            }
        })
        .flatten()
        .boxed()
    }

    /// Every changed or deleted object, for `Controller::watches_stream`; never ends.
    pub fn stream(&self) -> BoxStream<'static, Result<K, watcher::Error>> {
        self.subscribe().map(|(o, _)| Ok(o)).boxed()
    }

    /// The changed or deleted objects `wanted` keeps.
    pub fn stream_where<W>(&self, mut wanted: W) -> BoxStream<'static, Result<K, watcher::Error>>
    where
        W: FnMut(&K, Touch) -> bool + Send + 'static,
    {
        self.subscribe()
            .filter_map(move |(o, touch)| {
                futures::future::ready(wanted(&o, touch).then_some(Ok(o)))
            })
            .boxed()
    }

    /// The objects whose `key` changed since this stream last handed them on, and every
    /// deleted one.
    pub fn stream_by_key<T, P>(&self, key: P) -> BoxStream<'static, Result<K, watcher::Error>>
    where
        T: PartialEq + Send + 'static,
        P: Fn(&K) -> T + Send + 'static,
    {
        let mut seen = SeenKeys::default();
        self.subscribe()
            .filter_map(move |(o, touch)| {
                let pass = seen.changed(id_of(&o), touch, || key(&o));
                futures::future::ready(pass.then_some(Ok(o)))
            })
            .boxed()
    }
}

/// How long a keyed stream remembers the key of an object that did not change: one deleted
/// while the watch was down (no deletion event) is forgotten then, and one that comes back
/// after as long a quiet wakes its controller once more.
const KEY_MEMORY: std::time::Duration = std::time::Duration::from_secs(3600);

/// The last key a keyed stream handed on for each object, by UID (by name where it has none).
struct SeenKeys<T> {
    keys: std::collections::HashMap<String, (T, std::time::Instant)>,
    /// The size after the last pruning: the next one comes when it has doubled.
    pruned_at: usize,
}

impl<T> Default for SeenKeys<T> {
    fn default() -> Self {
        Self {
            keys: std::collections::HashMap::new(),
            pruned_at: 0,
        }
    }
}

impl<T: PartialEq> SeenKeys<T> {
    /// Whether the object `id` passes: deleted, or its key (computed only then) changed.
    fn changed(&mut self, id: String, touch: Touch, key: impl FnOnce() -> T) -> bool {
        let now = std::time::Instant::now();
        let pass = match touch {
            Touch::Deleted => {
                self.keys.remove(&id);
                true
            }
            Touch::Applied => {
                let k = key();
                let changed = self.keys.get(&id).is_none_or(|(old, _)| *old != k);
                self.keys.insert(id, (k, now));
                changed
            }
        };
        if self.keys.len() > 2 * self.pruned_at.max(512) {
            self.keys
                .retain(|_, (_, at)| now.duration_since(*at) < KEY_MEMORY);
            self.pruned_at = self.keys.len();
        }
        pass
    }
}

/// A controller of `api`'s objects filtered by `config`, over a cache of trimmed objects
/// ([`controlled`]): a drop-in for `Controller::new`.
pub fn controller<K>(api: Api<K>, config: watcher::Config) -> Controller<K>
where
    K: Cached,
{
    let (store, objects) = controlled(api, config);
    Controller::for_stream(objects, store)
}

/// [`controller`], woken only by objects whose `key` changed (or that have none): the cache
/// still holds every version, but a change the controller does not care about, such as a
/// status it wrote itself, runs no reconcile. Keys are kept per object (by UID) for an hour.
/// A version `known` says the controller has seen already (one it wrote and went on from)
/// wakes nobody either; its key still becomes the one the next version is compared with.
pub fn controller_keyed<K, P, S>(
    api: Api<K>,
    config: watcher::Config,
    key: P,
    known: S,
) -> Controller<K>
where
    K: Cached,
    P: Fn(&K) -> Option<u64> + Send + 'static,
    S: Fn(&K) -> bool + Send + 'static,
{
    let (store, objects) = controlled(api, config);
    let keyed = objects
        .predicate_filter(key, PredicateConfig::default())
        .filter(move |o| futures::future::ready(!o.as_ref().is_ok_and(&known)));
    Controller::for_stream(keyed, store)
}

/// [`controller_keyed`] with each object's wake-ups throttled to one per `window`
/// ([`crate::throttle::throttled`]): the first change of a burst wakes the controller at once,
/// the latest of the rest at the window's end. For objects another party rewrites in bursts
/// (a host's report after each domain it starts) whose reconcile need not follow every one.
pub fn controller_keyed_throttled<K, P>(
    api: Api<K>,
    config: watcher::Config,
    key: P,
    window: std::time::Duration,
) -> Controller<K>
where
    K: Cached,
    P: Fn(&K) -> Option<u64> + Send + 'static,
{
    let (store, objects) = controlled(api, config);
    let keyed = objects.predicate_filter(key, PredicateConfig::default());
    let paced = crate::throttle::throttled(keyed, window, |o: &K| {
        o.meta().uid.clone().or_else(|| o.meta().name.clone())
    });
    Controller::for_stream(paced, store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    #[tokio::test]
    async fn changes_hand_on_the_latest_version_of_each_object_once() {
        let secret = |name: &str, v: &str| {
            let mut s = Secret::default();
            s.metadata.name = Some(name.into());
            s.metadata.resource_version = Some(v.into());
            s
        };
        let changes = Changes::<Secret>::default();
        let mut stream = changes.stream();
        changes.record(&secret("a", "1"), Touch::Applied);
        changes.record(&secret("b", "2"), Touch::Applied);
        changes.record(&secret("a", "3"), Touch::Applied);
        let mut got = vec![];
        for _ in 0..2 {
            let s = stream.next().await.and_then(Result::ok).unwrap_or_default();
            got.push((s.metadata.name, s.metadata.resource_version));
        }
        got.sort();
        let v = |n: &str, r: &str| (Some(n.to_string()), Some(r.to_string()));
        assert_eq!(got, [v("a", "3"), v("b", "2")]);
        // Nothing else is pending until the next change, which is handed on.
        assert!(stream.next().now_or_never().is_none());
        changes.record(&secret("b", "4"), Touch::Applied);
        let s = stream.next().await.and_then(Result::ok).unwrap_or_default();
        assert_eq!(s.metadata.resource_version.as_deref(), Some("4"));
    }

    #[tokio::test]
    async fn each_subscriber_gets_every_change_and_a_keyed_one_only_new_keys_and_deletions() {
        let secret = |name: &str, label: &str, v: &str| {
            let mut s = Secret::default();
            s.metadata.name = Some(name.into());
            s.metadata.resource_version = Some(v.into());
            s.metadata.labels = Some([("k".to_string(), label.to_string())].into());
            s
        };
        let label = |s: &Secret| s.metadata.labels.clone().unwrap_or_default();
        let changes = Changes::<Secret>::default();
        let mut all = changes.stream();
        let mut keyed = changes.stream_by_key(label);
        changes.record(&secret("a", "x", "1"), Touch::Applied);
        let next = |s: Option<Result<Secret, watcher::Error>>| {
            s.and_then(Result::ok)
                .and_then(|s| s.metadata.resource_version)
                .unwrap_or_default()
        };
        assert_eq!(next(all.next().await), "1");
        assert_eq!(next(keyed.next().await), "1");
        // The same key again: the keyed stream lets it by, the other does not.
        changes.record(&secret("a", "x", "2"), Touch::Applied);
        assert_eq!(next(all.next().await), "2");
        assert!(keyed.next().now_or_never().is_none());
        // A deletion passes whatever its key.
        changes.record(&secret("a", "x", "3"), Touch::Deleted);
        assert_eq!(next(keyed.next().await), "3");
        assert_eq!(next(all.next().await), "3");
    }

    #[test]
    fn trimming_keeps_every_annotation_but_kubectls_copy() {
        let mut s = Secret::default();
        s.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        s.metadata.annotations = Some(
            [
                (LAST_APPLIED.to_string(), "{}".to_string()),
                ("deskvirt.io/wake".to_string(), "1".to_string()),
            ]
            .into(),
        );
        trim(&mut s);
        assert_eq!(s.metadata.managed_fields, None);
        let kept: Vec<&String> = s
            .metadata
            .annotations
            .iter()
            .flatten()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kept, ["deskvirt.io/wake"]);
    }
}
