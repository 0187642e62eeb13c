//! What every Desktop reconcile shares: configuration, the API client and libvirt, caches of
//! the pools, this host's DomainNode and the Desktops bound here, the Event recorder, and the
//! small per-desktop memory of what was last applied (so unchanged work is skipped), and the
//! host's DesktopImage copies as the image loop last reported them.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use deskvirt_crds::constants::{LABEL_NODE, MANAGER_AGENT};
use deskvirt_crds::names::label_value;
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use deskvirt_runtime::health::Work;
use futures::channel::mpsc::UnboundedReceiver;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use tokio::time::Instant;

use crate::domain::DomainType;
use crate::metrics::Metrics;

/// The controller's settings.
#[derive(Debug, Clone)]
pub struct DesktopConfig {
    /// This host (DomainNode name).
    pub node_name: String,
    /// Address SPICE clients use to reach this host.
    pub node_address: String,
    /// `kvm` or `qemu`.
    pub domain_type: DomainType,
    /// Namespace of the console password mirrors.
    pub console_namespace: String,
    /// The `qemu-img` program.
    pub qemu_img: String,
    /// How long a guest gets to shut down after ACPI power-off before it is powered off hard.
    pub shutdown_grace: Duration,
    /// libvirt's directory of managed save images (`<domain name>.save`), on the libvirt host.
    pub managed_save_dir: PathBuf,
    /// How often a running desktop's activity is sampled.
    pub activity_interval: Duration,
    /// The host takes in desktops moved live (`--migration-uri` is set): its pool's network
    /// is kept ready before any desktop of the pool runs here.
    pub takes_migrations: bool,
    /// Told `true` once the host is ready to take in migrations (the inventory then publishes
    /// its endpoint).
    pub inbound_ready: tokio::sync::watch::Sender<bool>,
}

impl DesktopConfig {
    /// The managed save image of `domain`.
    pub fn managed_save_image(&self, domain: &str) -> PathBuf {
        self.managed_save_dir.join(format!("{domain}.save"))
    }
}

/// Shared state of the controller.
pub struct DesktopContext<H> {
    pub client: Client,
    pub hypervisor: H,
    pub config: DesktopConfig,
    pub metrics: Metrics,
    pub pools: Store<ResourcePool>,
    pub nodes: Store<DomainNode>,
    /// Console password mirrors of the desktops bound here.
    pub mirrors: Store<Secret>,
    desktops: OnceLock<Store<Desktop>>,
    /// The reconciles in flight, for liveness.
    pub reconciles: Work,
    /// Desktops whose mirror the mirror watch added, changed or deleted.
    mirror_touches: Mutex<Option<UnboundedReceiver<ObjectRef<Desktop>>>>,
    reporter: Reporter,
    memory: Mutex<Memory>,
    /// Serializes changes to the host's libvirt networks (static DHCP leases).
    pub network_lock: tokio::sync::Mutex<()>,
    /// This host's DesktopImage copies, kept by the image loop ([`crate::images`]): a clone
    /// is made only from a copy [`crate::images::Holdings::ready_copy`] finds.
    pub images: crate::images::Holdings,
}

/// How long a status the agent wrote is taken to be on its way to the cache: a pass that
/// would write the same report again within it leaves it (the watch lags under load, and the
/// copy a pass works from may not hold the agent's own last write yet).
pub const REPORT_SETTLE: Duration = Duration::from_secs(5);

/// What was last done per desktop (by UID), in this process.
#[derive(Default)]
struct Memory {
    /// Hash of the domain XML last defined.
    defined: HashMap<String, u64>,
    /// resourceVersion of the password mirror last pushed into the running domain.
    password: HashMap<String, String>,
    /// When an ACPI shutdown was first asked for.
    shutdown_asked: HashMap<String, Instant>,
    /// When a domain paused on an I/O error was last resumed.
    resumed: HashMap<String, Instant>,
    /// libvirt networks defined and started by this process.
    networks: HashSet<String>,
    /// Consecutive failures, for the retry backoff.
    failures: HashMap<String, u32>,
    /// The last migration report written, per desktop: newer than the cache may show.
    moves: HashMap<String, deskvirt_crds::MigrationReport>,
    /// The last activity sample of each running desktop.
    samples: HashMap<String, super::activity::Sample>,
    /// Desktops with a SPICE client connected at their last observation.
    sessions: HashSet<String>,
    /// The report last written into each desktop's status (its fingerprint), and when.
    reported: HashMap<String, (u64, Instant)>,
}

impl<H> DesktopContext<H> {
    /// A context whose pool and DomainNode caches are filled by background watches; waits
    /// until both have listed once.
    pub async fn start(
        client: Client,
        hypervisor: H,
        config: DesktopConfig,
        metrics: Metrics,
        reconciles: Work,
    ) -> Self {
        let pools = spawn_reflector(
            Api::<ResourcePool>::all(client.clone()),
            watcher::Config::default(),
        );
        let nodes = spawn_reflector(
            Api::<DomainNode>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={}", config.node_name)),
        );
        // One watch of the mirrors fills their cache and wakes their desktops (the
        // controller takes `mirror_touches`).
        let (touch, touches) = futures::channel::mpsc::unbounded();
        let (mirrors, fill) = deskvirt_runtime::cache::reflect_touching(
            Api::<Secret>::namespaced(client.clone(), &config.console_namespace),
            watcher::Config::default()
                .labels(&format!("{LABEL_NODE}={}", label_value(&config.node_name))),
            move |m: &Secret, _| {
                if let Some(d) = super::desktop_of_mirror(m) {
                    let _ = touch.unbounded_send(d);
                }
            },
        );
        tokio::spawn(fill);
        let _ = pools.wait_until_ready().await;
        let _ = nodes.wait_until_ready().await;
        let _ = mirrors.wait_until_ready().await;
        let mut ctx = Self::with_caches(client, hypervisor, config, metrics, pools, nodes, mirrors);
        ctx.reconciles = reconciles;
        if let Ok(mut slot) = ctx.mirror_touches.lock() {
            *slot = Some(touches);
        }
        ctx
    }

    /// The desktops whose console mirror changed, for the controller to reconcile; `None`
    /// after the first call, and for a context over caches the caller fills.
    pub(super) fn take_mirror_touches(&self) -> Option<UnboundedReceiver<ObjectRef<Desktop>>> {
        self.mirror_touches.lock().ok()?.take()
    }

    /// A context over caches the caller keeps filled (by watches, or by a unit test).
    pub(crate) fn with_caches(
        client: Client,
        hypervisor: H,
        config: DesktopConfig,
        metrics: Metrics,
        pools: Store<ResourcePool>,
        nodes: Store<DomainNode>,
        mirrors: Store<Secret>,
    ) -> Self {
        Self {
            reporter: Reporter {
                controller: MANAGER_AGENT.into(),
                instance: Some(config.node_name.clone()),
            },
            client,
            hypervisor,
            config,
            metrics,
            pools,
            nodes,
            mirrors,
            desktops: OnceLock::new(),
            mirror_touches: Mutex::new(None),
            reconciles: Work::unwatched(),
            memory: Mutex::new(Memory::default()),
            network_lock: tokio::sync::Mutex::new(()),
            images: crate::images::Holdings::default(),
        }
    }

    pub(super) fn set_desktop_store(&self, store: Store<Desktop>) {
        let _ = self.desktops.set(store);
    }

    /// The Desktops bound to this host, once the controller runs.
    pub fn desktops(&self) -> Option<&Store<Desktop>> {
        self.desktops.get()
    }

    /// This host's DomainNode, from the cache.
    pub fn domain_node(&self) -> Option<std::sync::Arc<DomainNode>> {
        self.nodes
            .state()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.config.node_name.as_str()))
    }

    /// A pool from the cache.
    pub fn pool(&self, name: &str) -> Option<std::sync::Arc<ResourcePool>> {
        self.pools.get(&ObjectRef::new(name))
    }

    fn with_memory<T>(&self, f: impl FnOnce(&mut Memory) -> T) -> T {
        match self.memory.lock() {
            Ok(mut m) => f(&mut m),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Whether `xml_hash` is what was defined last for `uid`.
    pub fn defined_already(&self, uid: &str, xml_hash: u64) -> bool {
        self.with_memory(|m| m.defined.get(uid) == Some(&xml_hash))
    }

    /// Records the XML defined for `uid`.
    pub fn record_defined(&self, uid: &str, xml_hash: u64) {
        self.with_memory(|m| m.defined.insert(uid.to_string(), xml_hash));
    }

    /// Whether the mirror at `version` was pushed into the running domain of `uid`.
    pub fn password_pushed(&self, uid: &str, version: &str) -> bool {
        self.with_memory(|m| m.password.get(uid).map(String::as_str) == Some(version))
    }

    /// Records the mirror version pushed into the running domain of `uid`.
    pub fn record_password(&self, uid: &str, version: &str) {
        self.with_memory(|m| m.password.insert(uid.to_string(), version.to_string()));
    }

    /// When the ACPI shutdown of `uid` was first asked for (now, if not before).
    pub fn shutdown_asked_at(&self, uid: &str) -> Instant {
        self.with_memory(|m| {
            *m.shutdown_asked
                .entry(uid.to_string())
                .or_insert_with(Instant::now)
        })
    }

    /// Whether `uid`'s domain, paused on an I/O error, may be resumed now: never tried by this
    /// process, or not for [`super::power::RESUME_EVERY`].
    pub fn resume_due(&self, uid: &str) -> bool {
        self.with_memory(|m| {
            m.resumed
                .get(uid)
                .is_none_or(|t| t.elapsed() >= super::power::RESUME_EVERY)
        })
    }

    /// Records a resume of `uid`'s domain now.
    pub fn record_resume(&self, uid: &str) {
        self.with_memory(|m| m.resumed.insert(uid.to_string(), Instant::now()));
    }

    /// Forgets a pending shutdown of `uid`.
    pub fn clear_shutdown(&self, uid: &str) {
        self.with_memory(|m| m.shutdown_asked.remove(uid));
    }

    /// Whether this process already defined and started `network`.
    pub fn network_ready(&self, network: &str) -> bool {
        self.with_memory(|m| m.networks.contains(network))
    }

    /// Records that `network` is defined and started.
    pub fn record_network(&self, network: &str) {
        self.with_memory(|m| m.networks.insert(network.to_string()));
    }

    /// Records `sample` for `uid`; returns the one before it.
    pub fn swap_sample(
        &self,
        uid: &str,
        sample: super::activity::Sample,
    ) -> Option<super::activity::Sample> {
        self.with_memory(|m| m.samples.insert(uid.to_string(), sample))
    }

    /// Forgets the activity sample of `uid` (its domain starts anew: counters restart).
    pub fn forget_sample(&self, uid: &str) {
        self.with_memory(|m| m.samples.remove(uid));
    }

    /// Records whether a SPICE client is connected to `uid`, and updates the sessions gauge.
    pub fn record_session(&self, uid: &str, connected: bool) {
        let count = self.with_memory(|m| {
            if connected {
                m.sessions.insert(uid.to_string());
            } else {
                m.sessions.remove(uid);
            }
            m.sessions.len()
        });
        self.metrics
            .spice_sessions
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Forgets everything about `uid` (after teardown).
    pub fn forget(&self, uid: &str) {
        self.with_memory(|m| {
            m.defined.remove(uid);
            m.password.remove(uid);
            m.shutdown_asked.remove(uid);
            m.resumed.remove(uid);
            m.failures.remove(uid);
            m.samples.remove(uid);
            m.reported.remove(uid);
        });
        self.record_session(uid, false);
    }

    /// Records the migration report written for desktop `uid`.
    pub fn record_move(&self, uid: &str, report: &deskvirt_crds::MigrationReport) {
        self.with_memory(|m| m.moves.insert(uid.to_string(), report.clone()));
    }

    /// The migration report this process last wrote for desktop `uid`.
    pub fn last_move(&self, uid: &str) -> Option<deskvirt_crds::MigrationReport> {
        self.with_memory(|m| m.moves.get(uid).cloned())
    }

    /// Records that the status of `uid` was written with the report `fingerprint` just now.
    pub fn record_report(&self, uid: &str, fingerprint: u64) {
        self.with_memory(|m| {
            let now = Instant::now();
            if m.reported.len() > 64 {
                m.reported
                    .retain(|_, (_, at)| now.duration_since(*at) < REPORT_SETTLE);
            }
            m.reported.insert(uid.to_string(), (fingerprint, now));
        });
    }

    /// Forgets the report last written for `uid` (tests: a domain made as by an earlier
    /// process).
    #[cfg(test)]
    pub fn forget_report(&self, uid: &str) {
        self.with_memory(|m| m.reported.remove(uid));
    }

    /// How much longer a pass about to write the report `fingerprint` of `uid` should leave it:
    /// this process wrote exactly that less than [`REPORT_SETTLE`] ago, so the copy the pass
    /// worked from is older than that write, whose watch event brings the pass that sees it.
    /// `None`: write.
    pub fn report_in_flight(&self, uid: &str, fingerprint: u64) -> Option<Duration> {
        self.with_memory(|m| {
            let (f, at) = m.reported.get(uid)?;
            let since = at.elapsed();
            (*f == fingerprint && since < REPORT_SETTLE).then(|| REPORT_SETTLE - since)
        })
    }

    /// Resets the failure count of `uid` after a good reconcile.
    pub fn succeeded(&self, uid: &str) {
        self.with_memory(|m| m.failures.remove(uid));
    }

    /// Counts one more consecutive failure of `uid`; returns the count.
    pub fn record_failure(&self, uid: &str) -> u32 {
        self.with_memory(|m| {
            let n = m.failures.entry(uid.to_string()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
    }

    /// Consecutive failures of `uid` so far.
    pub fn failures(&self, uid: &str) -> u32 {
        self.with_memory(|m| m.failures.get(uid).copied().unwrap_or(0))
    }

    /// Publishes an Event about `obj`; failures are logged, never fatal.
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
}

/// A store kept by a background watch (restarted with backoff on errors).
fn spawn_reflector<K: deskvirt_runtime::cache::Cached>(
    api: Api<K>,
    config: watcher::Config,
) -> Store<K> {
    let (store, fill) = deskvirt_runtime::cache::reflect(api, config);
    tokio::spawn(fill);
    store
}
