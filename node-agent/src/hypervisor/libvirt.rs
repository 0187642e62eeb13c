//! The libvirt implementation of [`Hypervisor`], and the only module tree of the workspace
//! that imports `virt`. Every call runs in `tokio::task::spawn_blocking` under a deadline
//! ([`Deadlines`]); the blocking operations live in [`domains`], [`networks`] and [`host`];
//! libvirt errors are mapped in [`errors`]; the connection is kept (and re-opened with
//! backoff, and marked stalled when a call misses its deadline) by [`connection`].
//! `virt::sys` is used for flag constants only, never for raw calls.

mod backups;
mod connection;
mod cpu_models;
mod domains;
mod errors;
mod host;
mod networks;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use virt::connect::Connect;

use self::connection::Connection;
use super::{
    Activity, Backoff, BackupJob, BackupProgress, Change, Checkpoint, DomainStatus, DomainSummary,
    Hold, HostFacts, Hypervisor, HypervisorError, Migrated, Outbound, Result,
};
use crate::domain::{DhcpHost, DomainType};

/// How long a libvirt call may take before the agent stops waiting for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Every call but the slow ones below (lookups, define, list, status, networks).
    pub call: Duration,
    /// Calls that move guest memory or wait for QEMU: managed save, start (which may restore
    /// a save image) and destroy.
    pub slow: Duration,
}

/// How long past a migration's completion timeout its call may run: the abort needs to land.
const ABORT_GRACE: Duration = Duration::from_secs(120);

/// How long one abort (or post-copy switch) of a move may take: libvirt waits up to 30 s for
/// the domain's job lock before it answers, longer than an ordinary call's deadline on a
/// loaded host (a CI run saw an abort miss 10 s, and the capped move ran its 108 s).
const ABORT_CALL: Duration = Duration::from_secs(40);

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            call: Duration::from_secs(10),
            slow: Duration::from_secs(600),
        }
    }
}

/// Where a blocking call is, between its thread and the task waiting for it.
const RUNNING: u8 = 0;
const RETURNED: u8 = 1;
const ABANDONED: u8 = 2;

/// A [`Hypervisor`] backed by libvirt at one URI (`qemu:///system`, or `test:///default` in
/// tests). Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct LibvirtHypervisor {
    connection: Arc<Connection>,
    deadlines: Deadlines,
}

impl std::fmt::Debug for LibvirtHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtHypervisor")
            .field("uri", &self.connection.uri())
            .field("connected", &self.connection.is_connected())
            .field("deadlines", &self.deadlines)
            .finish()
    }
}

impl LibvirtHypervisor {
    /// A handle for `uri` that connects on first use (so the agent can start while libvirt is
    /// down and report `LibvirtConnected=False`).
    pub fn new(uri: &str) -> Self {
        Self::with_backoff(uri, Backoff::default())
    }

    /// Like [`Self::new`] with a chosen reconnect backoff.
    pub fn with_backoff(uri: &str, backoff: Backoff) -> Self {
        Self::with_deadlines(uri, backoff, Deadlines::default())
    }

    /// Like [`Self::with_backoff`] with chosen call deadlines.
    pub fn with_deadlines(uri: &str, backoff: Backoff, deadlines: Deadlines) -> Self {
        Self {
            connection: Arc::new(Connection::new(uri, backoff)),
            deadlines,
        }
    }

    /// A handle for `uri`, connected now.
    pub async fn connect(uri: &str) -> Result<Self> {
        let hypervisor = Self::new(uri);
        hypervisor.run("connect", |_| Ok(())).await?;
        Ok(hypervisor)
    }

    /// The libvirt URI.
    pub fn uri(&self) -> &str {
        self.connection.uri()
    }

    /// Calls that missed their deadline and still wait for libvirt in a blocking thread.
    pub fn abandoned_calls(&self) -> usize {
        self.connection.abandoned()
    }

    /// Runs `f` on the connection under the ordinary deadline.
    async fn run<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        self.guarded(op, self.deadlines.call, f).await
    }

    /// Runs `f` on the connection under the slow deadline.
    async fn run_slow<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        self.guarded(op, self.deadlines.slow, f).await
    }

    /// Fails fast while libvirt is stalled (so a hung daemon does not pile up threads), else
    /// runs the call.
    async fn guarded<T, F>(&self, op: &'static str, limit: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        if self.connection.is_stalled() {
            return Err(HypervisorError::Disconnected {
                op,
                message: format!(
                    "libvirt stopped answering (a call missed its {}s deadline); waiting for it to answer a probe",
                    self.deadlines.call.as_secs_f32()
                ),
            });
        }
        self.blocking(op, limit, false, f).await
    }

    /// Runs `f` on the connection in a blocking thread and waits for it at most `limit`. A
    /// disconnect drops the connection so the next call reopens it; a missed deadline marks
    /// libvirt stalled and leaves the thread to finish on its own. A probe (`probe`) releases
    /// the probe slot when its thread ends, however late.
    async fn blocking<T, F>(
        &self,
        op: &'static str,
        limit: Duration,
        probe: bool,
        f: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        let connection = Arc::clone(&self.connection);
        let outcome = Arc::new(AtomicU8::new(RUNNING));
        let seen = Arc::clone(&outcome);
        let deadline = Instant::now() + limit;
        let mut task = tokio::task::spawn_blocking(move || {
            let result = call(&connection, op, deadline, f);
            if probe {
                connection.end_probe(result.is_ok());
            }
            if seen
                .compare_exchange(RUNNING, RETURNED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                connection.count_abandoned(false);
                tracing::info!(
                    op,
                    ok = result.is_ok(),
                    "a libvirt call returned after its deadline"
                );
            }
            result
        });
        let joined = match tokio::time::timeout(limit, &mut task).await {
            Ok(joined) => joined,
            Err(_) => {
                self.connection.count_abandoned(true);
                if outcome
                    .compare_exchange(RUNNING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.connection.missed_deadline(op, limit);
                    return Err(HypervisorError::Timeout { op, after: limit });
                }
                // It returned just now: take its answer.
                self.connection.count_abandoned(false);
                task.await
            }
        };
        joined.unwrap_or_else(|join| {
            Err(HypervisorError::Task {
                op,
                message: join.to_string(),
            })
        })
    }
}

/// The blocking part of a call: the connection, then `f` on it.
fn call<T>(
    connection: &Connection,
    op: &'static str,
    deadline: Instant,
    f: impl FnOnce(&Connect) -> Result<T>,
) -> Result<T> {
    let conn = connection.get(op, deadline)?;
    let result = match conn.get() {
        Some(c) => f(c),
        None => Err(HypervisorError::Disconnected {
            op,
            message: "connection is closing".into(),
        }),
    };
    if matches!(result, Err(HypervisorError::Disconnected { .. })) {
        connection.invalidate(&conn);
    }
    result
}

impl Hypervisor for LibvirtHypervisor {
    fn is_connected(&self) -> bool {
        self.connection.is_connected()
    }

    async fn probe(&self) -> bool {
        // One probe at a time: a probe stuck in a hung daemon blocks no one, and the next
        // probe answers "not connected" at once until it returns.
        if !self.connection.start_probe() {
            return false;
        }
        self.blocking("probe", self.deadlines.call, true, host::probe)
            .await
            .is_ok()
            && self.is_connected()
    }

    async fn host_facts(&self, domain_type: DomainType) -> Result<HostFacts> {
        self.run("read host facts", move |c| host::facts(c, domain_type))
            .await
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
        self.run("list domains", domains::list).await
    }

    async fn domain_by_uuid(&self, uuid: &str) -> Result<Option<DomainSummary>> {
        let uuid = uuid.to_string();
        self.run("look up domain", move |c| domains::by_uuid(c, &uuid))
            .await
    }

    async fn domain_by_name(&self, name: &str) -> Result<Option<DomainSummary>> {
        let name = name.to_string();
        self.run("look up domain", move |c| domains::by_name(c, &name))
            .await
    }

    async fn define_domain(&self, xml: &str) -> Result<String> {
        let xml = xml.to_string();
        self.run("define domain", move |c| domains::define(c, &xml))
            .await
    }

    async fn start_domain(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run_slow("start domain", move |c| domains::start(c, &name, false))
            .await
    }

    async fn start_paused(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run_slow("start domain paused", move |c| {
            domains::start(c, &name, true)
        })
        .await
    }

    async fn start_carrier(&self, name: &str, xml: &str) -> Result<()> {
        let (name, xml) = (name.to_string(), xml.to_string());
        self.run_slow("start carrier domain", move |c| {
            domains::start_carrier(c, &name, &xml)
        })
        .await
    }

    async fn shutdown_domain(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("shut down domain", move |c| domains::shutdown(c, &name))
            .await
    }

    async fn resume_domain(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("resume domain", move |c| domains::resume(c, &name))
            .await
    }

    async fn destroy_domain(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run_slow("destroy domain", move |c| domains::destroy(c, &name))
            .await
    }

    async fn undefine_domain(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("undefine domain", move |c| domains::undefine(c, &name))
            .await
    }

    async fn managed_save(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run_slow("managed save", move |c| domains::managed_save(c, &name))
            .await
    }

    async fn sync_managed_save(&self, name: &str, image: &Path) -> Result<Change> {
        let name = name.to_string();
        let image = image.to_string_lossy().into_owned();
        self.run("update saved memory image", move |c| {
            domains::sync_managed_save(c, &name, &image)
        })
        .await
    }

    async fn remove_managed_save(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("remove saved memory image", move |c| {
            domains::remove_managed_save(c, &name)
        })
        .await
    }

    async fn domain_status(&self, name: &str) -> Result<DomainStatus> {
        let name = name.to_string();
        self.run("read domain status", move |c| domains::status(c, &name))
            .await
    }

    async fn domain_xml(&self, name: &str, inactive: bool) -> Result<String> {
        let name = name.to_string();
        self.run("read domain xml", move |c| domains::xml(c, &name, inactive))
            .await
    }

    async fn qemu_pid(&self, name: &str) -> Result<Option<u32>> {
        let name = name.to_string();
        self.run("read qemu pid", move |c| domains::qemu_pid(c, &name))
            .await
    }

    async fn ensure_network(&self, xml: &str) -> Result<String> {
        let xml = xml.to_string();
        self.run("ensure network", move |c| networks::ensure(c, &xml))
            .await
    }

    async fn sync_dhcp_hosts(&self, network: &str, hosts: &[DhcpHost]) -> Result<Change> {
        let network = network.to_string();
        let desired: BTreeSet<DhcpHost> = hosts
            .iter()
            .map(|h| DhcpHost {
                mac: h.mac.to_ascii_lowercase(),
                ip: h.ip,
            })
            .collect();
        self.run("update dhcp hosts", move |c| {
            networks::sync_dhcp_hosts(c, &network, &desired)
        })
        .await
    }

    async fn remove_network(&self, name: &str) -> Result<Change> {
        let name = name.to_string();
        self.run("remove network", move |c| networks::remove(c, &name))
            .await
    }

    async fn domain_disk_paths(&self) -> Result<BTreeSet<String>> {
        self.run("list disk paths", domains::disk_paths).await
    }

    async fn update_live_device(&self, name: &str, device_xml: &str) -> Result<Change> {
        let name = name.to_string();
        let xml = device_xml.to_string();
        self.run("update live device", move |c| {
            domains::update_live_device(c, &name, &xml)
        })
        .await
    }

    async fn activity(&self, name: &str) -> Result<Activity> {
        let name = name.to_string();
        self.run("read activity", move |c| domains::activity(c, &name))
            .await
    }

    async fn dhcp_hosts(&self, network: &str) -> Result<Vec<DhcpHost>> {
        let network = network.to_string();
        self.run("read dhcp hosts", move |c| {
            networks::dhcp_hosts(c, &network)
        })
        .await
    }

    async fn leased_addresses(&self, network: &str) -> Result<Vec<DhcpHost>> {
        let network = network.to_string();
        self.run("read dhcp leases", move |c| networks::leased(c, &network))
            .await
    }

    async fn job_running(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.run("read job", move |c| domains::job_running(c, &name))
            .await
    }

    async fn abort_migration(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.run("abort migration", move |c| {
            domains::end_migration(c, &name, false)
        })
        .await
    }

    async fn begin_backup(&self, name: &str, job: &BackupJob) -> Result<Hold> {
        let (name, job) = (name.to_string(), job.clone());
        // Slow: the guest agent's freeze and thaws come with the job's start.
        self.run_slow("begin backup", move |c| backups::begin(c, &name, &job))
            .await
    }

    async fn abort_backup(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.guarded("abort backup", ABORT_CALL, move |c| {
            backups::abort(c, &name)
        })
        .await
    }

    async fn backup_progress(&self, name: &str) -> Result<BackupProgress> {
        let name = name.to_string();
        self.run("read backup job", move |c| backups::progress(c, &name))
            .await
    }

    async fn ensure_checkpoint(&self, name: &str, cp: &Checkpoint) -> Result<Change> {
        let (name, cp) = (name.to_string(), cp.clone());
        self.run("redefine checkpoint", move |c| {
            backups::ensure_checkpoint(c, &name, &cp)
        })
        .await
    }

    async fn delete_checkpoint(&self, name: &str, checkpoint: &str) -> Result<Change> {
        let (name, checkpoint) = (name.to_string(), checkpoint.to_string());
        // Merging a bitmap into its parent's writes the disk: the slow deadline.
        self.run_slow("delete checkpoint", move |c| {
            backups::delete_checkpoint(c, &name, &checkpoint)
        })
        .await
    }

    async fn migrate_out(&self, name: &str, out: &Outbound) -> Result<Migrated> {
        let limits = out.limits;
        let (n, o) = (name.to_string(), out.clone());
        // The call's own deadline leaves the abort at the completion timeout time to land: a
        // move whose call gave up while libvirt still moves it would be taken for a failure.
        let limit = self
            .deadlines
            .slow
            .max(limits.completion_timeout + ABORT_GRACE);
        let moving = self.guarded("migrate", limit, move |c| domains::migrate_out(c, &n, &o));
        tokio::pin!(moving);
        tokio::select! {
            done = &mut moving => return done,
            () = tokio::time::sleep(limits.completion_timeout) => {}
        }
        // Past the pool's completion timeout: post-copy if the pool allows it, else abort.
        let n = name.to_string();
        let post = limits.post_copy;
        let op = if post {
            "start post-copy"
        } else {
            "abort migration"
        };
        let secs = limits.completion_timeout.as_secs();
        // Tried again every 5 s until the move ends: an abort that lands while the job is still
        // setting up (the target's QEMU starting, on a loaded host) can succeed without
        // stopping the transfer that follows. A post-copy switch is asked for once.
        let result = loop {
            // A slow abort (the earlier one) marked libvirt stalled: ask it again once it
            // answers a probe, or the move would run on to its end unchecked.
            if self.connection.is_stalled() {
                self.probe().await;
            }
            let n = n.clone();
            let ended = self
                .guarded(op, ABORT_CALL, move |c| domains::end_migration(c, &n, post))
                .await;
            tracing::warn!(domain = name, timeout_secs = secs, post_copy = post, ended = ?ended.as_ref().err(), "live migration past its completion timeout");
            if post && ended.is_ok() {
                break moving.await;
            }
            tokio::select! {
                done = &mut moving => break done,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        };
        match result {
            // The call's deadline passed with libvirt still moving: not a failure to report;
            // the next pass judges the job and the domain.
            Err(e @ HypervisorError::Timeout { .. }) => Err(e),
            Err(e) if !post => Err(HypervisorError::Rejected {
                op: "migrate",
                target: name.to_string(),
                message: format!(
                    "the move did not complete within the pool's completion timeout ({secs}s): \
                     the guest changes memory faster than the link (or the pool's bandwidth \
                     cap) moves it; aborted, and the desktop runs on here as before ({e})"
                ),
            }),
            other => other,
        }
    }
}
