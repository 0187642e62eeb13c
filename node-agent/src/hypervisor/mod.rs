//! The one door to libvirt: the [`Hypervisor`] trait the agent's controllers call, with plain
//! value types and our own [`HypervisorError`]. [`libvirt`] implements it and is the only
//! module of the workspace that imports `virt`; every call there runs in `spawn_blocking`.
//!
//! Teardown is idempotent: stopping or removing something that is already gone returns
//! [`Change::AlreadyDone`] rather than an error.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;

use crate::domain::{DesktopIdentity, DhcpHost, DomainType};

pub mod backoff;
pub mod backup;
pub mod error;
#[cfg(test)]
pub mod fake;
pub mod libvirt;

pub use backoff::Backoff;
pub use backup::{BackupJob, BackupProgress, Checkpoint, Hold};
pub use error::{HypervisorError, ObjectKind};
pub use libvirt::LibvirtHypervisor;

/// Result of a hypervisor call.
pub type Result<T, E = HypervisorError> = std::result::Result<T, E>;

/// Whether a state-changing call changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The call did what was asked.
    Done,
    /// The object was already in the requested state (or already gone).
    AlreadyDone,
}

/// A domain's state as libvirt reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainState {
    /// No state.
    NoState,
    /// Running.
    Running,
    /// Blocked on a resource.
    Blocked,
    /// Paused.
    Paused,
    /// Shutting down.
    ShuttingDown,
    /// Off.
    ShutOff,
    /// Crashed.
    Crashed,
    /// Suspended by guest power management.
    PmSuspended,
    /// A state this agent does not know.
    Unknown,
}

impl DomainState {
    /// Whether a QEMU process exists for the domain.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Running | Self::Blocked | Self::Paused | Self::ShuttingDown | Self::PmSuspended
        )
    }
}

/// One domain on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSummary {
    /// Domain name.
    pub name: String,
    /// Domain UUID (the Desktop UID for deskvirt's domains).
    pub uuid: String,
    /// Current state.
    pub state: DomainState,
    /// Whether the domain is defined (not only running).
    pub persistent: bool,
    /// Whether a managed save image exists (the desktop is suspended to disk).
    pub has_managed_save: bool,
    /// The Desktop it belongs to, from its metadata; `None` for domains deskvirt did not make.
    pub identity: Option<DesktopIdentity>,
}

/// Runtime status of one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainStatus {
    /// Current state.
    pub state: DomainState,
    /// CPU time used, in nanoseconds (for idle detection).
    pub cpu_time_ns: u64,
    /// Current memory in KiB.
    pub memory_kib: u64,
    /// Maximum memory in KiB.
    pub max_memory_kib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Whether a managed save image exists.
    pub has_managed_save: bool,
    /// Why libvirt paused it, while `state` is `Paused`.
    pub paused: Option<PauseCause>,
}

/// Why libvirt paused a domain, as far as the agent acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseCause {
    /// A disk write or read failed (a full disk, a lost NFS server): resuming is safe and
    /// works once the cause is gone.
    IoError,
    /// A post-copy migration broke: its memory is split between two hosts; resuming it here
    /// would run a guest without all of it.
    PostCopyFailed,
    /// Anything else (a user's `virsh suspend`, a migration or save under way, unknown).
    Other,
}

/// Activity counters of a running domain and its SPICE client, for idle detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    /// CPU time used, in nanoseconds.
    pub cpu_time_ns: u64,
    /// Bytes read and written on all disks.
    pub block_bytes: u64,
    /// Bytes received and sent on all NICs.
    pub net_bytes: u64,
    /// Address of the connected SPICE client; `None` when nobody is connected.
    pub spice_client: Option<String>,
}

/// Facts about the host, for the DomainNode status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Host name as libvirt sees it.
    pub hostname: String,
    /// CPU model.
    pub cpu_model: String,
    /// The named CPU models domains may be given; `None` when libvirt could not say.
    pub cpu_models: Option<Vec<String>>,
    /// NUMA nodes.
    pub numa_nodes: u32,
    /// CPU sockets in total.
    pub sockets: u32,
    /// Cores per socket.
    pub cores_per_socket: u32,
    /// Threads per core.
    pub threads_per_core: u32,
    /// Logical CPUs.
    pub cpus: u32,
    /// Nominal CPU speed.
    pub mhz: u32,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// Largest vCPU count of one domain of the requested type.
    pub max_vcpus: u32,
    /// libvirt driver, such as `QEMU` (or `TEST`).
    pub driver: String,
    /// Hypervisor version, such as `7.2.0`.
    pub hypervisor_version: String,
    /// libvirt version, such as `9.0.0`.
    pub libvirt_version: String,
}

/// Formats libvirt's packed version number (major * 1e6 + minor * 1e3 + release).
pub fn format_version(packed: u64) -> String {
    format!(
        "{}.{}.{}",
        packed / 1_000_000,
        (packed / 1_000) % 1_000,
        packed % 1_000
    )
}

/// Everything the node-agent asks of the hypervisor. Implemented by [`LibvirtHypervisor`];
/// controllers are generic over it so tests can substitute a fake.
pub trait Hypervisor: Send + Sync {
    /// Whether the last call found libvirt reachable (for the `LibvirtConnected` condition).
    fn is_connected(&self) -> bool;

    /// Checks the connection, reconnecting when the backoff allows; returns [`Self::is_connected`].
    fn probe(&self) -> impl Future<Output = bool> + Send;

    /// Host facts; `max_vcpus` is asked for domains of `domain_type`.
    fn host_facts(&self, domain_type: DomainType)
    -> impl Future<Output = Result<HostFacts>> + Send;

    /// Every domain, defined or only running.
    fn list_domains(&self) -> impl Future<Output = Result<Vec<DomainSummary>>> + Send;

    /// The domain whose `<uuid>` is `uuid`, if any (a Desktop's domain has its UID).
    fn domain_by_uuid(
        &self,
        uuid: &str,
    ) -> impl Future<Output = Result<Option<DomainSummary>>> + Send;

    /// The domain named `name`, if any.
    fn domain_by_name(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<DomainSummary>>> + Send;

    /// Defines (or, with the same `<uuid>`, updates in place) a persistent domain; returns its name.
    fn define_domain(&self, xml: &str) -> impl Future<Output = Result<String>> + Send;

    /// Starts a defined domain (resuming from a managed save image if one exists).
    fn start_domain(&self, name: &str) -> impl Future<Output = Result<Change>> + Send;

    /// Starts the stopped domain paused: QEMU opens its disk and no guest code runs (the copy
    /// of a stopped desktop's backup); `AlreadyDone` when it is active.
    fn start_paused(&self, name: &str) -> impl Future<Output = Result<Change>> + Send;

    /// Starts the carrier `xml` of a move into another pool, paused (no guest code runs), as a
    /// transient domain named `name` ([`crate::domain::carrier_xml`]). Over the stopped
    /// desktop domain of that name and UUID it runs in place of its definition, which it
    /// leaves as it was: a destroy ends the carrier and leaves the stopped desktop. Refused
    /// while a domain of that name runs.
    fn start_carrier(&self, name: &str, xml: &str) -> impl Future<Output = Result<()>> + Send;

    /// Asks the guest to shut down (ACPI); `AlreadyDone` when it is off or gone.
    fn shutdown_domain(&self, name: &str) -> impl Future<Output = Result<Change>> + Send;

    /// Resumes a paused domain; `AlreadyDone` when it is not paused.
    fn resume_domain(&self, name: &str) -> impl Future<Output = Result<Change>> + Send;

    /// Powers the domain off at once; `AlreadyDone` when it is off or gone.
    fn destroy_domain(&self, name: &str) -> impl Future<Output = Result<Change>> + Send;

    /// Removes the domain's definition with its managed save image, snapshot metadata and
    /// NVRAM; `AlreadyDone` when it is gone. A running domain keeps running as a transient
    /// one: destroy it first.
    fn undefine_domain(&self, name: &str) -> impl Future<Output = Result<Change>> + Send;

    /// Saves the running domain's memory to disk and stops it; the next start resumes it.
    /// `AlreadyDone` when it is off with a save image already.
    fn managed_save(&self, name: &str) -> impl Future<Output = Result<Change>> + Send;

    /// Replaces the domain XML stored in its managed save image (the file `image`) with the
    /// domain's definition, SPICE password included, so the next start restores the saved
    /// memory with the definition's SPICE port and password. libvirt refuses a definition whose
    /// guest ABI differs (memory, vCPUs, devices: `Rejected`), and so does this call when the
    /// definition's disks are not the ones the saved memory refers to. `AlreadyDone` when the
    /// domain runs or has no managed save image.
    fn sync_managed_save(
        &self,
        name: &str,
        image: &Path,
    ) -> impl Future<Output = Result<Change>> + Send;

    /// Deletes the domain's managed save image, so its next start boots from disk;
    /// `AlreadyDone` when it has none or is gone.
    fn remove_managed_save(&self, name: &str) -> impl Future<Output = Result<Change>> + Send;

    /// State, CPU time and memory of one domain.
    fn domain_status(&self, name: &str) -> impl Future<Output = Result<DomainStatus>> + Send;

    /// The domain's XML: live when running, else the definition; `inactive` forces the
    /// definition. Never includes the SPICE password.
    fn domain_xml(&self, name: &str, inactive: bool)
    -> impl Future<Output = Result<String>> + Send;

    /// PID of the domain's QEMU process, when the driver is a local QEMU one and it runs.
    fn qemu_pid(&self, name: &str) -> impl Future<Output = Result<Option<u32>>> + Send;

    /// Defines a network (idempotent with a stable `<uuid>`), marks it autostart and starts
    /// it when inactive. A changed definition of a running network applies at its next start;
    /// use [`Self::sync_dhcp_hosts`] for leases.
    fn ensure_network(&self, xml: &str) -> impl Future<Output = Result<String>> + Send;

    /// Makes the network's static DHCP leases exactly `hosts`, live and in its definition.
    fn sync_dhcp_hosts(
        &self,
        network: &str,
        hosts: &[DhcpHost],
    ) -> impl Future<Output = Result<Change>> + Send;

    /// Stops and undefines a network; `AlreadyDone` when it is gone.
    fn remove_network(&self, name: &str) -> impl Future<Output = Result<Change>> + Send;

    /// Every file used as a disk (or backing file) by any domain, defined or running, so
    /// that disk cleanup never deletes one in use.
    fn domain_disk_paths(&self) -> impl Future<Output = Result<BTreeSet<String>>> + Send;

    /// Changes a device of the running domain in place (`device_xml` names the device, e.g. its
    /// `<graphics>` with a new password); `AlreadyDone` when the domain is not running. The
    /// definition is not touched: define the domain again for that.
    fn update_live_device(
        &self,
        name: &str,
        device_xml: &str,
    ) -> impl Future<Output = Result<Change>> + Send;

    /// Activity counters and the SPICE client of a running domain.
    fn activity(&self, name: &str) -> impl Future<Output = Result<Activity>> + Send;

    /// The static DHCP leases in the network's definition.
    fn dhcp_hosts(&self, network: &str) -> impl Future<Output = Result<Vec<DhcpHost>>> + Send;

    /// The addresses the network's DHCP server leased and still counts as leased, to whichever
    /// MAC, whether or not that guest still runs (a destroyed guest never releases its lease);
    /// empty where the driver cannot tell.
    fn leased_addresses(&self, network: &str)
    -> impl Future<Output = Result<Vec<DhcpHost>>> + Send;

    /// Moves running domain `name` live to another host ([`Outbound`]): peer to peer, with
    /// the domain's own definition but for its `<graphics>` (the target's), defined there and
    /// undefined here once it runs there. On an error the domain still runs here.
    fn migrate_out(
        &self,
        name: &str,
        out: &Outbound,
    ) -> impl Future<Output = Result<Migrated>> + Send;

    /// Whether a job (a migration, say) runs on domain `name`; `false` when it does not run or
    /// does not exist.
    fn job_running(&self, name: &str) -> impl Future<Output = Result<bool>> + Send;

    /// Aborts the outgoing migration of domain `name` (`virDomainAbortJob`): the move that
    /// `migrate_out` runs ends with an error, and the domain runs on here.
    fn abort_migration(&self, name: &str) -> impl Future<Output = Result<()>> + Send;

    /// Starts a backup of running domain `name`'s disk ([`BackupJob`]); it runs on after the
    /// call, and [`Hypervisor::backup_progress`] tells where it is. The checkpoint it starts
    /// from must be known to libvirt ([`Hypervisor::ensure_checkpoint`]). The guest's file
    /// systems are frozen through its guest agent around the start when one answers, and
    /// always thawed after ([`Hold`]); with none the start is crash-consistent.
    fn begin_backup(
        &self,
        name: &str,
        job: &BackupJob,
    ) -> impl Future<Output = Result<Hold>> + Send;

    /// Stops the backup job of domain `name` (`virDomainAbortJob`): its file is left
    /// incomplete, and the checkpoint it created stays (a later incremental since an older
    /// checkpoint is not changed by it).
    fn abort_backup(&self, name: &str) -> impl Future<Output = Result<()>> + Send;

    /// Where the backup job of domain `name` is: running, or how the last one ended.
    fn backup_progress(&self, name: &str) -> impl Future<Output = Result<BackupProgress>> + Send;

    /// Records checkpoint `c` in libvirt's metadata of domain `name` when it is not there
    /// (its bitmap is in the disk already); done already when it is.
    fn ensure_checkpoint(
        &self,
        name: &str,
        c: &Checkpoint,
    ) -> impl Future<Output = Result<Change>> + Send;

    /// Deletes checkpoint `checkpoint` of domain `name`: its bitmap is merged into the one
    /// before it (an incremental since that one stays exact); done already when it is gone.
    fn delete_checkpoint(
        &self,
        name: &str,
        checkpoint: &str,
    ) -> impl Future<Output = Result<Change>> + Send;
}

/// Where and how a live migration goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The target host's libvirt, as this host's libvirtd reaches it (peer to peer):
    /// `qemu+tls://host/system`, `qemu+ssh://host/system`, or a local socket in tests.
    pub dest_uri: String,
    /// Where QEMU sends the memory: `tcp://<target address>`.
    pub migrate_uri: String,
    /// The domain's `<graphics>` element on the target (its SPICE port, listen address and
    /// ticket there). Everything else is the running domain's own definition, device
    /// addresses included, as libvirt's ABI check wants it.
    pub graphics_xml: String,
    /// Where a connected SPICE client is told to reconnect: `spice://<address>:<port>`.
    pub graphics_uri: Option<String>,
    /// The pool declares its storage reachable from every host although libvirt cannot tell
    /// (not NFS): libvirt refuses such a migration without this.
    pub declared_shared: bool,
    /// Copy the disk's own layer (not its base image, which the target holds) into the empty
    /// disk the target made for it (a Cold move without shared storage).
    pub copy_disks: bool,
    /// A move into another pool: the carrier's XML on the target (its disk in the target
    /// pool's directory), sent as it is. The carrier arrives transient and paused, nothing of
    /// it is defined there, and `graphics_xml` and `graphics_uri` are not used; the domain's
    /// definition here is undefined once it is there.
    pub carrier_xml: Option<String>,
    /// The pool's bandwidth cap, completion timeout and convergence settings.
    pub limits: MoveLimits,
}

/// How a live migration is bounded (the pool's `spec.migration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveLimits {
    /// Cap on the memory stream, MiB/s.
    pub bandwidth_mib: Option<u64>,
    /// Longer than this, the move is switched to post-copy (`post_copy`) or aborted.
    pub completion_timeout: std::time::Duration,
    /// Throttle the guest's vCPUs while it dirties memory faster than the link.
    pub auto_converge: bool,
    /// Switch to post-copy at the timeout instead of aborting.
    pub post_copy: bool,
}

impl Default for MoveLimits {
    fn default() -> Self {
        Self {
            bandwidth_mib: None,
            completion_timeout: std::time::Duration::from_secs(300),
            auto_converge: true,
            post_copy: false,
        }
    }
}

/// What a finished live migration measured (from the target's completed job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Migrated {
    /// From the start of the job to the domain running on the target.
    pub total: std::time::Duration,
    /// How long the guest was paused.
    pub downtime: std::time::Duration,
    /// Memory sent.
    pub bytes: u64,
}
