//! What every reconciler shares: the client, the Event reporter, metrics, the watched objects
//! (reflector stores), the leader flag, and the pools' allocation ledgers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deskvirt_crds::constants::{LABEL_NODE, console_mirror_name};
use deskvirt_crds::domain_node::OrphanDomain;
use deskvirt_crds::names::label_value;
use deskvirt_crds::read::FromPoolSpec;
use deskvirt_crds::{
    Desktop, DesktopBackup, DesktopImage, DesktopMigration, DomainNode, ResourcePool,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;

use crate::allocators::{
    Conflict, DesktopBinding, Ledger, LedgerConfig, LedgerError, Seniority, SubnetBinding, Target,
};
use crate::charges::{Charges, Counted};
use crate::coalesce::Coalescer;
use crate::console::mirror;
use crate::fence::Fence;
use crate::heartbeat::Heartbeat;
use crate::metrics::Metrics;
use crate::world::ViewMemo;
use deskvirt_runtime::cache::{Changes, reflect, reflect_relisting, reflect_touching};
use deskvirt_runtime::health::Work;

/// The objects the operator watches, as local caches.
#[derive(Clone)]
pub struct Stores {
    pub pools: Store<ResourcePool>,
    pub nodes: Store<DomainNode>,
    pub desktops: Store<Desktop>,
    /// DesktopMigrations in every namespace.
    pub migrations: Store<DesktopMigration>,
    /// DesktopBackups in every namespace.
    pub backups: Store<DesktopBackup>,
    /// DesktopImages in every namespace.
    pub images: Store<DesktopImage>,
    pub leases: Store<Lease>,
    /// Console password mirrors in the operator's namespace.
    pub mirrors: Store<Secret>,
    /// The console namespace, where the mirrors are.
    console: String,
    /// Namespaces, for the labels a pool's `namespaceSelector` matches.
    pub namespaces: Store<Namespace>,
    /// ResourceQuotas, for the `deskvirt.io/cpu` and `deskvirt.io/memory` limits of a namespace.
    pub quotas: Store<ResourceQuota>,
    /// What each host is charged, kept up to date by the desktop and mirror watches.
    pub charges: Charges,
    /// Each host's view as its object last read, for placing desktops.
    pub views: ViewMemo,
    /// The hosts, pools, desktops, migrations, console mirrors, namespaces and quotas that
    /// changed, once their caches show it: the
    /// controllers' wake-ups by other kinds, so a pass reads the version that woke it.
    pub node_changes: Changes<DomainNode>,
    pub pool_changes: Changes<ResourcePool>,
    pub desktop_changes: Changes<Desktop>,
    pub migration_changes: Changes<DesktopMigration>,
    pub backup_changes: Changes<DesktopBackup>,
    pub mirror_changes: Changes<Secret>,
    pub namespace_changes: Changes<Namespace>,
    pub quota_changes: Changes<ResourceQuota>,
    pub image_changes: Changes<DesktopImage>,
}

impl Stores {
    /// The caches, and the future that fills them until `stop` flips. The caller drives that
    /// future, so dropping the operator's future stops every watch with it.
    pub fn start(
        client: &Client,
        namespace: &str,
        console_namespace: &str,
        selector: &str,
        stop: watch::Receiver<bool>,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let cfg = || crate::controllers::watch_config(selector);
        let (node_changes, pool_changes) = (Changes::default(), Changes::default());
        let touched = pool_changes.clone();
        let (pools, a) = reflect_touching(Api::all(client.clone()), cfg(), move |p, t| {
            touched.record(p, t);
        });
        let touched = node_changes.clone();
        let (nodes, b) = reflect_touching(Api::all(client.clone()), cfg(), move |n, t| {
            touched.record(n, t);
        });
        let charges = Charges::default();
        let (on_desktop, on_relist) = (charges.clone(), charges.clone());
        let desktop_changes = Changes::default();
        let touched = desktop_changes.clone();
        let (desktops, c) = reflect_relisting(
            Api::all(client.clone()),
            cfg(),
            move |d: &Desktop, t| {
                on_desktop.desktop_touched(d);
                touched.record(d, t);
            },
            move || on_relist.relisted(),
        );
        let migration_changes = Changes::default();
        let touched = migration_changes.clone();
        let (migrations, h) = reflect_touching(Api::all(client.clone()), cfg(), move |m, t| {
            touched.record(m, t);
        });
        let backup_changes = Changes::default();
        let touched = backup_changes.clone();
        let (backups, i) = reflect_touching(Api::all(client.clone()), cfg(), move |b, t| {
            touched.record(b, t);
        });
        let image_changes = Changes::default();
        let touched = image_changes.clone();
        let (images, j) = reflect_touching(Api::all(client.clone()), cfg(), move |m, t| {
            touched.record(m, t);
        });
        let (leases, d) = reflect(
            Api::namespaced(client.clone(), namespace),
            watcher::Config::default(),
        );
        let (on_mirror, on_relist) = (charges.clone(), charges.clone());
        let mirror_changes = Changes::default();
        let touched = mirror_changes.clone();
        let (mirrors, e) = reflect_relisting(
            Api::namespaced(client.clone(), console_namespace),
            watcher::Config::default().labels(&mirror::selector()),
            move |m: &Secret, t| {
                on_mirror.mirror_touched(m);
                touched.record(m, t);
            },
            move || on_relist.relisted(),
        );
        // Context, not objects deskvirt manages: never restricted by the label selector (a
        // Desktop's namespace and quotas carry no deskvirt label).
        let (namespace_changes, quota_changes) = (Changes::default(), Changes::default());
        let touched = namespace_changes.clone();
        let (namespaces, f) = reflect_touching(
            Api::all(client.clone()),
            watcher::Config::default(),
            move |n, t| touched.record(n, t),
        );
        let touched = quota_changes.clone();
        let (quotas, g) = reflect_touching(
            Api::all(client.clone()),
            watcher::Config::default(),
            move |q, t| touched.record(q, t),
        );
        let drive = async move {
            tokio::select! {
                _ = futures::future::join5(futures::future::join5(a, b, c, d, e), f, g, h, futures::future::join(i, j)) => {}
                () = stopped(stop) => {}
            }
        };
        let stores = Self {
            pools,
            nodes,
            desktops,
            migrations,
            backups,
            images,
            leases,
            mirrors,
            console: console_namespace.to_string(),
            namespaces,
            quotas,
            charges,
            views: ViewMemo::default(),
            node_changes,
            pool_changes,
            desktop_changes,
            migration_changes,
            backup_changes,
            mirror_changes,
            namespace_changes,
            quota_changes,
            image_changes,
        };
        (stores, drive)
    }

    /// Caches that hold exactly these objects, and nothing else (for tests of the passes'
    /// decisions, with no API server).
    #[cfg(test)]
    pub(crate) fn holding(
        pools: Vec<ResourcePool>,
        nodes: Vec<DomainNode>,
        desktops: Vec<Desktop>,
        console_namespace: &str,
    ) -> Self {
        let charges = Charges::default();
        for d in &desktops {
            charges.desktop_touched(d);
        }
        Self {
            pools: store(pools),
            nodes: store(nodes),
            desktops: store(desktops),
            migrations: store(vec![]),
            backups: store(vec![]),
            images: store(vec![]),
            leases: store(vec![]),
            mirrors: store(vec![]),
            console: console_namespace.to_string(),
            namespaces: store(vec![]),
            quotas: store(vec![]),
            charges,
            views: ViewMemo::default(),
            node_changes: Changes::default(),
            pool_changes: Changes::default(),
            desktop_changes: Changes::default(),
            migration_changes: Changes::default(),
            backup_changes: Changes::default(),
            mirror_changes: Changes::default(),
            namespace_changes: Changes::default(),
            quota_changes: Changes::default(),
            image_changes: Changes::default(),
        }
    }

    /// These caches with `migrations` and the console `mirrors` too (for tests).
    #[cfg(test)]
    pub(crate) fn with(mut self, migrations: Vec<DesktopMigration>, mirrors: Vec<Secret>) -> Self {
        for m in &mirrors {
            self.charges.mirror_touched(m);
        }
        self.migrations = store(migrations);
        self.mirrors = store(mirrors);
        self
    }

    /// These caches with `namespaces` too (for tests).
    #[cfg(test)]
    pub(crate) fn with_namespaces(mut self, namespaces: Vec<Namespace>) -> Self {
        self.namespaces = store(namespaces);
        self
    }

    /// Waits until every store has its first full list.
    pub async fn ready(&self) -> bool {
        self.pools.wait_until_ready().await.is_ok()
            && self.nodes.wait_until_ready().await.is_ok()
            && self.desktops.wait_until_ready().await.is_ok()
            && self.migrations.wait_until_ready().await.is_ok()
            && self.leases.wait_until_ready().await.is_ok()
            && self.mirrors.wait_until_ready().await.is_ok()
            && self.namespaces.wait_until_ready().await.is_ok()
            && self.quotas.wait_until_ready().await.is_ok()
            && self.images.wait_until_ready().await.is_ok()
    }

    pub fn pool(&self, name: &str) -> Option<Arc<ResourcePool>> {
        self.pools.get(&ObjectRef::new(name))
    }

    pub fn node(&self, name: &str) -> Option<Arc<DomainNode>> {
        self.nodes.get(&ObjectRef::new(name))
    }

    /// The `spec.hard` limits of namespace `ns`'s ResourceQuotas, each with its quota's name.
    pub fn quota_limits(
        &self,
        ns: &str,
    ) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
        self.quotas
            .state()
            .iter()
            .filter(|q| q.namespace().as_deref() == Some(ns))
            .map(|q| {
                let hard = q.spec.as_ref().and_then(|s| s.hard.as_ref());
                let hard = hard
                    .iter()
                    .flat_map(|h| h.iter())
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect();
                (q.name_any(), hard)
            })
            .collect()
    }

    pub fn lease(&self, namespace: &str, name: &str) -> Option<Arc<Lease>> {
        self.leases.get(&ObjectRef::new(name).within(namespace))
    }

    /// Whether the host `d`'s status names was bound by the operator: its console mirror (which
    /// only the operator writes, before it binds) is labelled with that host. A status someone
    /// else wrote is never charged to a host, nor replayed into a ledger. An unbound desktop
    /// is trivially confirmed.
    pub fn binding_confirmed(&self, d: &Desktop) -> bool {
        let Some(node) = d.status.as_ref().and_then(|s| s.node.as_deref()) else {
            return true;
        };
        let Some(uid) = d.metadata.uid.as_deref() else {
            return false;
        };
        self.mirror(&self.console, uid)
            .is_some_and(|m| m.labels().get(LABEL_NODE) == Some(&label_value(node)))
    }

    /// The cached mirror of the desktop with UID `uid`.
    pub fn mirror(&self, namespace: &str, uid: &str) -> Option<Arc<Secret>> {
        self.mirrors
            .get(&ObjectRef::new(&console_mirror_name(uid)).within(namespace))
    }

    /// What each host is charged now: the desktops and ledger bindings that changed since the
    /// last count are counted again (under the ledgers' lock, which `ledgers` proves).
    pub fn charges(&self, ledgers: &mut Ledgers) -> Counted<'_> {
        self.charges.count(
            ledgers,
            |r| self.desktops.get(r),
            |d, ledgers| {
                crate::world::charge_of(d, ledgers.get(d.pool()), &|d| self.binding_confirmed(d))
            },
        )
    }

    /// The cached desktop with UID `uid`: where the desktop watch last showed it, else (a
    /// desktop the watch has not shown, or one gone) by walking the cache.
    pub fn desktop_by_uid(&self, uid: &str) -> Option<Arc<Desktop>> {
        let is = |d: &Desktop| d.metadata.uid.as_deref() == Some(uid);
        self.charges
            .desktop_ref(uid)
            .and_then(|r| self.desktops.get(&r))
            .filter(|d| is(d))
            .or_else(|| self.desktops.find(is))
    }
}

/// A cache that holds exactly `objects` (for tests).
#[cfg(test)]
fn store<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, mut writer) = kube::runtime::reflector::store::<K>();
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(o));
    }
    store
}

/// Completes once `stop` is true (or its sender is gone).
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// The ledgers of the pools, valid only while this replica leads and after the rebuild.
#[derive(Debug, Default)]
pub struct Ledgers {
    /// Rebuilt since leadership was gained.
    pub ready: bool,
    pools: BTreeMap<String, Ledger>,
    /// Desktops whose recorded port or MAC a rebuild refused; they get new ones.
    pub rebind: BTreeSet<String>,
    /// What each of those lost, and to whom (for the Warning that names both).
    pub rebind_why: BTreeMap<String, Conflict>,
    /// UIDs of the orphan domains whose port and MAC the ledger holds, by (pool, host).
    orphans: BTreeMap<(String, String), BTreeSet<String>>,
    /// UIDs of the orphan domains whose port or MAC a desktop holds, by (pool, host): said once.
    orphans_refused: BTreeMap<(String, String), BTreeSet<String>>,
    /// Which ledgers these are: new for every term and every rebuild, never reused.
    epoch: u64,
}

/// The last [`Ledgers::epoch`] handed out.
static EPOCHS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn next_epoch() -> u64 {
    EPOCHS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
}

impl Ledgers {
    /// Fresh ledgers for a new term; each pool's is rebuilt from the stores on first use.
    pub fn fresh() -> Self {
        Self {
            ready: true,
            epoch: next_epoch(),
            ..Default::default()
        }
    }

    /// Which ledgers these are: a reader that keeps its own sums over them (the charges per
    /// host, [`crate::charges::Charges`]) counts everything again when it changes.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Puts `ledger` in as `pool`'s, as a rebuild would (for tests that hold no stores).
    #[cfg(test)]
    pub(crate) fn put(&mut self, pool: &str, ledger: Ledger) {
        self.pools.insert(pool.to_string(), ledger);
        self.epoch = next_epoch();
    }

    /// The desktops whose port or admitted size changed in any pool's ledger since the last
    /// call.
    pub fn take_changed(&mut self) -> BTreeSet<String> {
        let mut all = BTreeSet::new();
        for l in self.pools.values_mut() {
            all.append(&mut l.take_changed());
        }
        all
    }

    /// The ledger of `pool`, rebuilt from recorded bindings when missing or when the pool's
    /// allocation settings changed.
    pub fn of(&mut self, pool: &ResourcePool, stores: &Stores) -> Result<&mut Ledger, LedgerError> {
        let name = pool.metadata.name.clone().unwrap_or_default();
        let config = LedgerConfig::from_spec(&pool.spec)?;
        if self.pools.get(&name).is_none_or(|l| l.config() != config) {
            self.rebuild(&name, config, stores);
        }
        self.pools.get_mut(&name).ok_or(LedgerError::NoSubnets)
    }

    /// Replaces the ledger of `name` with one rebuilt from the recorded bindings, keeping the
    /// old ledger's bindings the cache does not show yet.
    fn rebuild(&mut self, name: &str, config: LedgerConfig, stores: &Stores) {
        let old = self.pools.remove(name);
        let mut ledger = Ledger::new(config);
        let orphans = orphan_bindings(name, stores);
        self.orphans.retain(|(pool, _), _| pool != name);
        for (host, b) in &orphans {
            self.orphans
                .entry((name.to_string(), host.clone()))
                .or_default()
                .insert(b.desktop.clone());
        }
        let conflicts = ledger.rebuild(
            desktop_bindings(name, stores, old.as_ref())
                .into_iter()
                .chain(orphans.into_iter().map(|(_, b)| b)),
            host_bindings(name, stores),
        );
        for c in &conflicts {
            tracing::warn!(pool = %name, conflict = %c, "ledger rebuild refused a recorded value");
            self.rebind.insert(c.loser().to_string());
            self.rebind_why.insert(c.loser().to_string(), c.clone());
        }
        if let Some(old) = &old {
            ledger.keep_admitted_sizes(old);
        }
        for t in target_bindings(name, stores) {
            let held = match &t.mac {
                Some(mac) => ledger.adopt_entry(&t.desktop, &t.host, t.port, mac, t.size),
                None => ledger.adopt_target(&t.desktop, &t.host, t.port, t.size),
            };
            if !held {
                tracing::warn!(pool = %name, desktop = %t.desktop, host = %t.host, port = t.port,
                    "ledger rebuild: a migration's target port is held by another; it will fail");
            }
        }
        tracing::info!(pool = %name, conflicts = conflicts.len(), "ledger rebuilt");
        self.pools.insert(name.to_string(), ledger);
        self.epoch = next_epoch();
    }

    /// Makes the ledger of `pool` hold the SPICE port and MAC of every orphan domain `host`
    /// reports (a domain whose Desktop is gone still listens on its port and owns its MAC), and
    /// frees those of orphans no longer reported. Returns the orphans whose port or MAC another
    /// desktop holds, in words, each once (not again on every pass while the clash lasts).
    pub fn sync_orphans(
        &mut self,
        pool: &str,
        host: &str,
        orphans: &[&OrphanDomain],
    ) -> Vec<String> {
        let Some(ledger) = self.pools.get_mut(pool) else {
            return Vec::new();
        };
        let key = (pool.to_string(), host.to_string());
        let before = self.orphans.remove(&key).unwrap_or_default();
        let mut held = BTreeSet::new();
        let mut refused = Vec::new();
        let told = self.orphans_refused.remove(&key).unwrap_or_default();
        let mut clashing = BTreeSet::new();
        for o in orphans {
            let (Some(port), Some(mac)) = (o.spice_port, o.mac.as_deref()) else {
                continue;
            };
            if ledger.holds(&o.uid, host, port, mac) || ledger.adopt(&o.uid, host, port, mac) {
                held.insert(o.uid.clone());
            } else if clashing.insert(o.uid.clone()) && !told.contains(&o.uid) {
                refused.push(format!(
                    "orphan domain {} (Desktop {} is gone) uses SPICE port {port} and MAC {mac}, which another desktop holds",
                    o.domain, o.desktop
                ));
            }
        }
        for gone in before.difference(&held) {
            let freed = ledger.release(gone);
            tracing::info!(pool, host, orphan = %gone, ?freed, "orphan domain gone: its port and MAC are free");
        }
        if !clashing.is_empty() {
            self.orphans_refused.insert(key.clone(), clashing);
        }
        if !held.is_empty() {
            self.orphans.insert(key, held);
        }
        refused
    }

    /// The ledger of `pool` if already built.
    pub fn get(&self, pool: &str) -> Option<&Ledger> {
        self.pools.get(pool)
    }

    pub fn get_mut(&mut self, pool: &str) -> Option<&mut Ledger> {
        self.pools.get_mut(pool)
    }

    /// Every migration target the pools' ledgers hold: desktop UID and what it holds.
    pub fn targets(&self) -> impl Iterator<Item = (&str, Target<'_>)> {
        self.pools.values().flat_map(|l| l.targets())
    }

    /// Whether any pool's ledger holds a reservation for the desktop with UID `uid` (a binding
    /// decided whose write the cache may not show yet).
    pub fn reserved(&self, uid: &str) -> bool {
        self.pools.values().any(|l| l.port_of(uid).is_some())
    }
}

pub fn seniority<K: Resource>(o: &K) -> Seniority {
    let m = o.meta();
    Seniority::new(
        m.creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(i64::MAX),
        m.uid.clone().unwrap_or_default(),
    )
}

fn desktop_bindings(pool: &str, stores: &Stores, old: Option<&Ledger>) -> Vec<DesktopBinding> {
    stores
        .desktops
        .state()
        .iter()
        .filter(|d| d.pool() == pool && holds_binding(d) && stores.binding_confirmed(d))
        .map(|d| {
            let uid = d.metadata.uid.clone().unwrap_or_default();
            let st = d.status.clone().unwrap_or_default();
            // A desktop whose resources the idle policy released holds no port, whatever its
            // status still says; its host and MAC stay.
            let port = st.spice.as_ref().and_then(|s| s.port);
            let mut b = DesktopBinding {
                desktop: uid.clone(),
                seniority: seniority(d.as_ref()),
                host: st.node.clone(),
                port: port.filter(|_| crate::idle::holds_resources(d)),
                mac: st.mac.clone(),
            };
            // A binding made just now may not be in the cache yet: keep the old ledger's.
            if b.host.is_none()
                && let Some(old) = old
                && let Some((host, port)) = old.port_of(&uid)
            {
                b.host = Some(host.to_string());
                b.port = Some(port);
                b.mac = old.mac_of(&uid).map(|m| m.to_string());
            }
            b
        })
        .collect()
}

/// A migration target recorded in a DesktopMigration's status (only the operator writes it).
struct TargetBinding {
    desktop: String,
    host: String,
    port: u16,
    /// A move from another pool: the MAC reserved in this one.
    mac: Option<String>,
    size: crate::scheduler::Request,
}

/// The targets held in `pool` by migrations (Scheduling or Running), as their status records
/// them, with the size their desktop is charged: those of `pool`'s desktops, and those moving
/// desktops into `pool` from another (`status.targetPool`).
fn target_bindings(pool: &str, stores: &Stores) -> Vec<TargetBinding> {
    stores
        .migrations
        .state()
        .iter()
        .filter(|m| m.phase().holds_target())
        .filter_map(|m| {
            let st = m.status.as_ref()?;
            let d = stores.desktop_by_uid(st.desktop_uid.as_deref()?)?;
            let into = st.target_pool.as_deref().unwrap_or(d.pool());
            (into == pool && holds_binding(&d)).then_some(())?;
            Some(TargetBinding {
                desktop: st.desktop_uid.clone()?,
                host: st.target.clone()?,
                port: st.target_port?,
                // Arrived already (the binding is this pool's): its own MAC is the desktop's.
                mac: st.target_mac.clone().filter(|_| d.pool() != pool),
                size: crate::world::charged(&d)?,
            })
        })
        .collect()
}

/// The ports and MACs of the orphan domains the hosts of `pool` report, with their hosts.
fn orphan_bindings(pool: &str, stores: &Stores) -> Vec<(String, DesktopBinding)> {
    let nodes: Vec<_> = stores
        .nodes
        .state()
        .into_iter()
        .filter(|n| n.status.as_ref().and_then(|s| s.pool.as_deref()) == Some(pool))
        .collect();
    crate::world::orphans_by_host(&nodes, &stores.desktops.state())
        .into_iter()
        .map(|(host, o)| {
            let b = DesktopBinding {
                desktop: o.uid.clone(),
                seniority: Seniority::new(o.since.0.as_second(), o.uid.clone()),
                host: Some(host.clone()),
                port: o.spice_port,
                mac: o.mac.clone(),
            };
            (host, b)
        })
        .collect()
}

fn host_bindings(pool: &str, stores: &Stores) -> Vec<SubnetBinding> {
    stores
        .nodes
        .state()
        .iter()
        .filter_map(|n| {
            let st = n.status.as_ref()?;
            (st.pool.as_deref() == Some(pool)).then_some(())?;
            Some(SubnetBinding {
                host: n.metadata.name.clone()?,
                seniority: seniority(n.as_ref()),
                subnet: st.subnet.clone()?,
            })
        })
        .collect()
}

/// Whether a desktop still holds its allocations: not deleted, or deleted but not yet released.
pub fn holds_binding(d: &Desktop) -> bool {
    d.metadata.deletion_timestamp.is_none()
        || d.finalizers()
            .iter()
            .any(|f| f == deskvirt_crds::constants::FINALIZER_OPERATOR)
}

/// Shortest time between two writes of one pool's status unless configured
/// (`--pool-status-interval`).
pub const POOL_STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// The operator's namespaces.
#[derive(Clone, Debug)]
pub struct Namespaces {
    /// Leader and heartbeat Leases.
    pub system: String,
    /// Console password mirrors.
    pub console: String,
    /// Namespaces whose Desktops get a user console Secret (the only ones with Secret rights).
    pub users: std::collections::BTreeSet<String>,
}

/// How many DesktopMigrations run at once and how long they may wait.
#[derive(Clone, Copy, Debug)]
pub struct MigrationSettings {
    pub limits: deskvirt_core::migration::Limits,
    /// How long a migration may wait for its desktop or a target.
    pub pending_timeout: Duration,
    /// How long a reserved target waits for the source host to start.
    pub start_timeout: Duration,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        Self {
            limits: deskvirt_core::migration::Limits {
                per_pool: 4,
                per_host: 2,
            },
            pending_timeout: Duration::from_secs(300),
            start_timeout: Duration::from_secs(60),
        }
    }
}

/// The reconciles of each controller, as on-demand work that liveness watches.
#[derive(Clone, Debug)]
pub struct Reconciles {
    pub desktops: Work,
    pub migrations: Work,
    pub backups: Work,
    pub pools: Work,
    pub nodes: Work,
}

impl Default for Reconciles {
    fn default() -> Self {
        Self {
            desktops: Work::unwatched(),
            migrations: Work::unwatched(),
            backups: Work::unwatched(),
            pools: Work::unwatched(),
            nodes: Work::unwatched(),
        }
    }
}

impl Reconciles {
    /// Work `health` watches: a reconcile makes a few API calls, each with a deadline, and may
    /// wait for the ledger behind others; one that has not finished in `allowed` is stuck.
    pub fn watched(health: &deskvirt_runtime::health::Health, allowed: Duration) -> Self {
        Self {
            desktops: health.watch_work("desktop reconciles", allowed),
            migrations: health.watch_work("migration reconciles", allowed),
            backups: health.watch_work("backup reconciles", allowed),
            pools: health.watch_work("pool reconciles", allowed),
            nodes: health.watch_work("host reconciles", allowed),
        }
    }
}

/// The version of each desktop that a pass wrote (its metadata, before its status) and went on
/// from, until the watch shows it: that watch event holds only the pass's own write, so it
/// wakes nobody.
#[derive(Debug, Default)]
pub struct Steps(Mutex<HashMap<String, String>>);

impl Steps {
    /// Records that a pass wrote `d` and went on from the version the API answered with.
    pub fn record(&self, d: &Desktop) {
        let (Some(uid), Some(rv)) = (d.uid(), d.resource_version()) else {
            return;
        };
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid, rv);
    }

    /// Whether `d` is a version a pass recorded ([`Self::record`]); said once per version.
    pub fn is_own(&self, d: &Desktop) -> bool {
        let (Some(uid), Some(rv)) = (
            d.metadata.uid.as_deref(),
            d.metadata.resource_version.as_deref(),
        ) else {
            return false;
        };
        let mut steps = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if steps.get(uid).is_some_and(|r| r == rv) {
            steps.remove(uid);
            return true;
        }
        false
    }

    /// Forgets the record of `uid` (a deleted desktop).
    pub fn forget(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }
}

pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    pub metrics: Metrics,
    /// Namespace of the leader and heartbeat Leases.
    pub namespace: String,
    /// Namespace of the console password mirrors.
    pub console_namespace: String,
    /// Namespaces whose Desktops get a user console Secret.
    pub console_user_namespaces: std::collections::BTreeSet<String>,
    /// Heartbeat validity when a Lease names none.
    pub host_timeout: Duration,
    pub leader: watch::Receiver<bool>,
    pub stores: Stores,
    pub ledgers: tokio::sync::Mutex<Ledgers>,
    /// When each pool's status may be written next.
    pub pool_status: Coalescer,
    /// Until when this replica may commit (see [`crate::fence`]); set by the elector.
    pub fence: Fence,
    /// The images namespace: only DesktopImages there import from a URL, and a Desktop of any
    /// namespace may use them.
    pub images_namespace: String,
    /// Test only: a pause between deciding a binding and writing it.
    pub test_bind_delay: Option<Duration>,
    /// How many migrations run at once and how long they may wait.
    pub migrations: MigrationSettings,
    /// Each controller's reconciles, for liveness (set by the operator from its health).
    pub reconciles: Reconciles,
    failures: Mutex<HashMap<String, u32>>,
    /// What each desktop's user console Secret was last applied from, and when.
    user_secrets: Mutex<HashMap<String, (u64, std::time::Instant)>>,
    /// The duplicate binding last repaired per desktop (its recorded host, port and MAC), so a
    /// stale copy of it is repaired without a second Event.
    pub repaired: Mutex<HashMap<String, (String, u16, String)>>,
    /// When this replica wrote each desktop's binding, until a pass sees it bound.
    bindings: Mutex<HashMap<String, std::time::Instant>>,
    /// What this replica last wrote of each desktop's status (a fingerprint), and when.
    statuses: Mutex<HashMap<String, (u64, std::time::Instant)>>,
    /// What this replica last wrote of each desktop's console mirror (a fingerprint).
    mirrors: Mutex<HashMap<String, u64>>,
    /// The versions of desktops that passes of this replica wrote (their metadata) and went on
    /// from, until the watch shows them.
    pub steps: Steps,
}

impl Context {
    pub fn new(
        client: Client,
        identity: &str,
        metrics: Metrics,
        namespaces: Namespaces,
        host_timeout: Duration,
        leader: watch::Receiver<bool>,
        stores: Stores,
    ) -> Self {
        Self {
            client,
            reporter: Reporter {
                controller: deskvirt_crds::constants::MANAGER_OPERATOR.into(),
                instance: Some(identity.to_string()),
            },
            metrics,
            namespace: namespaces.system,
            console_namespace: namespaces.console,
            console_user_namespaces: namespaces.users,
            host_timeout,
            leader,
            stores,
            ledgers: tokio::sync::Mutex::new(Ledgers::default()),
            pool_status: Coalescer::new(POOL_STATUS_INTERVAL),
            fence: Fence::default(),
            images_namespace: deskvirt_crds::constants::IMAGES_NAMESPACE_DEFAULT.to_string(),
            test_bind_delay: None,
            migrations: MigrationSettings::default(),
            reconciles: Reconciles::default(),
            failures: Mutex::new(HashMap::new()),
            user_secrets: Mutex::new(HashMap::new()),
            repaired: Mutex::new(HashMap::new()),
            bindings: Mutex::new(HashMap::new()),
            statuses: Mutex::new(HashMap::new()),
            mirrors: Mutex::new(HashMap::new()),
            steps: Steps::default(),
        }
    }

    /// Whether this replica leads and its Lease cannot have expired yet.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow() && self.fence.holds(std::time::Instant::now())
    }

    /// The heartbeat verdict of host `node` now.
    pub fn heartbeat(&self, node: &str, now: Timestamp) -> Heartbeat {
        let lease = self.stores.lease(&self.namespace, node);
        Heartbeat::of(lease.as_deref(), now, self.host_timeout)
    }

    /// Records an Event on `obj`; failures are logged, never returned. Events about
    /// cluster-scoped objects (DomainNodes, ResourcePools) go to `default`, with the reference
    /// naming it (see `deskvirt_runtime::events`).
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        deskvirt_runtime::events::publish(
            &self.client,
            &self.reporter,
            obj,
            type_,
            reason,
            action,
            note,
        )
        .await;
    }

    /// Whether the user Secret of `uid` must be applied for content `fingerprint`: when it
    /// differs from the last one applied, or that was longer ago than `refresh` (so a deleted
    /// Secret comes back without reading it). Records the fingerprint when it returns true.
    pub fn user_secret_due(&self, uid: &str, fingerprint: u64, refresh: Duration) -> bool {
        let mut applied = self.user_secrets.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let due = applied
            .get(uid)
            .is_none_or(|(f, at)| *f != fingerprint || now.duration_since(*at) >= refresh);
        if due {
            applied.insert(uid.to_string(), (fingerprint, now));
        }
        due
    }

    /// Records that the mirror of the desktop with UID `uid` was written as `written`.
    pub fn mirror_written(&self, uid: &str, written: &Secret) {
        self.mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), mirror::fingerprint(written));
    }

    /// Whether `m` is the mirror as this replica last wrote it: its watch event brings the
    /// desktop's pass nothing new (it made that write).
    pub fn mirror_is_own(&self, m: &Secret) -> bool {
        let Some(uid) = mirror::uid_of(m) else {
            return false;
        };
        self.mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .is_some_and(|f| *f == mirror::fingerprint(m))
    }

    /// Forgets the mirror record of `uid` (a deleted desktop).
    pub fn forget_mirror(&self, uid: &str) {
        self.mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    /// Forgets the user Secret record of `uid` (a failed apply, or a deleted desktop).
    pub fn forget_user_secret(&self, uid: &str) {
        self.user_secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    /// Records that the binding of `uid` was written just now.
    pub fn binding_written(&self, uid: &str) {
        self.bindings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), std::time::Instant::now());
    }

    /// How much longer a pass that finds `uid` unbound should wait for the watch to bring its
    /// binding, written less than `settle` ago by this replica; `None` when none was. A pass
    /// right after the write often runs on the copy from before it, and writing again would
    /// only be refused.
    pub fn binding_in_flight(&self, uid: &str, settle: Duration) -> Option<Duration> {
        let mut written = self.bindings.lock().unwrap_or_else(|p| p.into_inner());
        let since = written.get(uid)?.elapsed();
        if since < settle {
            return Some(settle - since);
        }
        written.remove(uid);
        None
    }

    /// Forgets the binding record of `uid` (seen bound, or deleted).
    pub fn forget_binding(&self, uid: &str) {
        self.bindings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    /// Records that the status of `uid` was written with content `fingerprint` just now.
    pub fn status_written(&self, uid: &str, fingerprint: u64) {
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), (fingerprint, std::time::Instant::now()));
    }

    /// How much longer a pass that would write status `fingerprint` of `uid` should wait: this
    /// replica wrote exactly that less than `settle` ago, so the copy the pass decided on is
    /// older than that write, and its watch event brings the pass that sees it. `None`: write.
    pub fn status_in_flight(
        &self,
        uid: &str,
        fingerprint: u64,
        settle: Duration,
    ) -> Option<Duration> {
        let written = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        let (f, at) = written.get(uid)?;
        let since = at.elapsed();
        (*f == fingerprint && since < settle).then(|| settle - since)
    }

    /// Forgets the status record of `uid` (deleted).
    pub fn forget_status(&self, uid: &str) {
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    /// The next retry delay for `key` after a failure: 1s doubling to 5 minutes.
    pub fn backoff(&self, key: String, transient: bool) -> Duration {
        if !transient {
            return Duration::from_secs(300);
        }
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
    }

    /// Forgets the failures of `key` after a success.
    pub fn succeeded(&self, key: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocators::Claim;
    use deskvirt_crds::resource_pool::ResourcePoolSpec;

    fn orphan(uid: &str, port: u16, mac: &str) -> OrphanDomain {
        serde_json::from_value(serde_json::json!({
            "uid": uid, "domain": format!("ns--d--{uid}"), "desktop": "ns/d", "pool": "p",
            "running": true, "cpu": 1, "memory": "1Gi", "spicePort": port, "mac": mac,
            "since": "2026-01-01T00:00:00Z"
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_recorded_step_is_taken_for_its_own_version_once() {
        let at = |uid: &str, rv: &str| {
            let mut d: Desktop = serde_json::from_value(serde_json::json!({
                "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
                "metadata": { "name": "d", "namespace": "ns" },
                "spec": { "pool": "p", "disk": { "image": "b.qcow2" } }
            }))
            .unwrap_or_else(|e| panic!("{e}"));
            d.metadata.uid = Some(uid.into());
            d.metadata.resource_version = Some(rv.into());
            d
        };
        let steps = Steps::default();
        assert!(!steps.is_own(&at("u1", "7")), "nothing recorded");
        steps.record(&at("u1", "7"));
        assert!(!steps.is_own(&at("u1", "6")), "an older version is news");
        assert!(!steps.is_own(&at("u2", "7")), "another desktop");
        assert!(steps.is_own(&at("u1", "7")));
        assert!(!steps.is_own(&at("u1", "7")), "said once");
        steps.record(&at("u1", "9"));
        steps.forget("u1");
        assert!(!steps.is_own(&at("u1", "9")), "forgotten with the desktop");
    }

    #[test]
    fn orphans_hold_their_port_and_mac_until_gone() {
        let spec: ResourcePoolSpec =
            serde_json::from_value(serde_json::json!({})).unwrap_or_else(|e| panic!("{e}"));
        let mut ledgers = Ledgers::fresh();
        let ledger = Ledger::from_spec(&spec).unwrap_or_else(|e| panic!("{e}"));
        let first = spec.display.spice_ports.first;
        ledgers.pools.insert("p".into(), ledger);
        let mac = "52:54:00:00:00:01";
        let o = orphan("gone", first, mac);
        assert!(ledgers.sync_orphans("p", "h1", &[&o]).is_empty());
        assert!(
            ledgers.sync_orphans("p", "h1", &[&o]).is_empty(),
            "idempotent"
        );
        // A new desktop on that host never gets the orphan's port.
        let l = ledgers.get_mut("p").unwrap_or_else(|| panic!("no ledger"));
        let bound = l
            .bind(&Claim {
                desktop: "new",
                host: "h1",
                fixed_mac: None,
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(bound.port, first);
        assert_ne!(bound.mac.to_string(), mac);
        // Another orphan on the new desktop's port is refused and named.
        let clash = orphan("clash", bound.port, "52:54:00:00:00:09");
        let refused = ledgers.sync_orphans("p", "h1", &[&o, &clash]);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].contains("ns--d--clash"));
        let again = ledgers.sync_orphans("p", "h1", &[&o, &clash]);
        assert!(again.is_empty(), "said once: {again:?}");
        // Gone: its port is free again.
        ledgers.sync_orphans("p", "h1", &[]);
        let l = ledgers.get("p").unwrap_or_else(|| panic!("no ledger"));
        assert_eq!(l.ports().holder("h1", first), None);
    }
}
