//! `ResourcePool`: a group of hosts sharing storage and a network, inside which placement is
//! free. Holds the pool's allocation ranges (SPICE ports, MACs, subnets) and capacity policy.

// kube-derive expands each `printcolumn(...)` into attributes clippy sees as duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::desktop::{IdlePolicy, UsbPolicy};
use crate::quantity::QUANTITY_PATTERN;
use crate::schema::{ABS_PATH, IFNAME, IPV4_CIDR, MAC_PREFIX};

pub use deskvirt_core::types::{Amounts, NetworkMode, NodeCounts, Placement, PortRange, PortUsage};

/// A pool of KVM hosts (the papers' "domain node"): hosts selected by labels that share storage
/// and a network, so that a desktop may be placed on any of them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "deskvirt.io",
    version = "v1alpha1",
    kind = "ResourcePool",
    plural = "resourcepools",
    shortname = "pool",
    category = "deskvirt",
    doc = "A pool of KVM hosts that share storage and a network; desktops are placed on its hosts.",
    status = "ResourcePoolStatus",
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".status.nodes.ready",
        description = "Ready hosts"
    ),
    printcolumn(
        name = "Total",
        type_ = "integer",
        json_path = ".status.nodes.total",
        description = "All hosts",
        priority = 1
    ),
    printcolumn(
        name = "Capacity",
        type_ = "integer",
        json_path = ".status.capacity.desktops",
        description = "Desktops of the reference size the ready hosts can hold"
    ),
    printcolumn(
        name = "Allocated",
        type_ = "integer",
        json_path = ".status.allocated.desktops",
        description = "Desktops placed in the pool"
    ),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.available.desktops",
        description = "Further desktops of the reference size that fit"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ResourcePoolSpec {
    /// Labels a DomainNode must carry to belong to this pool. Empty selects every host.
    /// A host belongs to at most one pool; when several match, the oldest pool wins.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Namespaces whose Desktops may be placed in this pool, selected by the namespaces' labels.
    /// Unset lets every namespace use the pool (so does an empty selector `{}`). A Desktop in
    /// a namespace the selector does not match stays unbound with `Scheduled=False`, reason
    /// PoolNotAllowed; nothing is allocated for it. Changing the selector does not unbind
    /// desktops already placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Where base images and per-desktop disks live on the hosts.
    #[serde(default)]
    pub storage: PoolStorage,
    /// How desktops are networked: mode, address range and MAC prefix.
    #[serde(default)]
    pub network: PoolNetwork,
    /// SPICE console settings shared by the pool's desktops.
    #[serde(default)]
    pub display: PoolDisplay,
    /// How far CPU and memory may be overcommitted on each host.
    #[serde(default)]
    pub overcommit: Overcommit,
    /// Host resources kept back for the hypervisor and the host itself.
    #[serde(default)]
    pub reserved: Reserved,
    /// Enable kernel samepage merging on the pool's hosts, so identical guest pages are shared.
    #[serde(default)]
    pub ksm: bool,
    /// How hosts are chosen: Spread picks the host with most free capacity, Pack fills hosts one
    /// after another so idle hosts can be powered down.
    #[serde(default)]
    pub placement: Placement,
    /// The desktop size used to express capacity as a number of desktops (the Capacity value).
    #[serde(default)]
    pub reference_size: ReferenceSize,
    /// What happens to desktops of a host whose heartbeat is lost.
    #[serde(default)]
    pub failover: Failover,
    /// What happens to a domain of the pool left on a host without its Desktop (the Desktop
    /// deleted with its finalizers removed by hand, say). Until it is gone it is charged to
    /// its host: CPU and memory while it runs, its SPICE port and MAC always.
    #[serde(default)]
    pub orphans: OrphanPolicy,
    /// Settings inherited by every desktop of the pool unless the desktop overrides them.
    #[serde(default)]
    pub defaults: PoolDefaults,
    /// How live migrations of the pool's desktops run (DesktopMigration, host drain).
    #[serde(default)]
    pub migration: PoolMigration,
    /// The virtual CPU every desktop of the pool is given.
    #[serde(default)]
    pub cpu: PoolCpu,
    /// Where backups of the pool's desktops (DesktopBackup) are written. Unset: the pool's
    /// desktops cannot be backed up (a DesktopBackup waits with reason NoBackupDir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<PoolBackup>,
}

/// The virtual CPU of the pool's desktops.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolCpu {
    /// A named CPU model pinned for every desktop of the pool, such as `Westmere`,
    /// `Skylake-Client-IBRS` or `EPYC` (the usable names of a host are in its DomainNode's
    /// `status.cpu.models`, from `virsh domcapabilities`). A desktop then sees the same CPU
    /// on every host, so it live-migrates between hosts of different CPU generations, and the
    /// guest may use the model's instructions. Desktops are placed (and moved) only on hosts
    /// that report the model usable; others count as `CpuModelUnsupported` in `Scheduled`.
    /// Unset: the hypervisor's default model (qemu64), which runs and migrates everywhere but
    /// hides newer instructions. The host's own model (`host-model`, `host-passthrough`) is not
    /// offered: it breaks migration between unlike hosts. A change applies at each desktop's
    /// next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = CPU_MODEL), length(max = 64))]
    pub model: Option<String>,
}

/// A libvirt CPU model name: letters, digits, `-`, `_` and `.`, starting with a letter. The
/// host's own models (`host-model`, `host-passthrough`) match it; the operator refuses them
/// (Ready=False, reason InvalidSpec).
pub const CPU_MODEL: &str = r"^[A-Za-z][A-Za-z0-9._-]{0,63}$";

/// Whether `model` names the host's own CPU rather than a fixed model (`host-model`,
/// `host-passthrough`, any `host-*`): such a desktop cannot move between unlike hosts.
pub fn is_host_cpu(model: &str) -> bool {
    model
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("host-"))
}

/// How a live migration runs between the pool's hosts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolMigration {
    /// Cap on the memory stream, in MiB/s, so that moves leave the hosts' link to the
    /// desktops. Unset: as fast as the link goes.
    #[serde(
        default,
        rename = "bandwidthMiBPerSecond",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 100000))]
    pub bandwidth_mib_per_second: Option<u32>,
    /// How long a move may take before it is ended, such as 5m: a guest that dirties memory
    /// faster than the link would never finish. Then, with `postCopy`, the desktop switches to
    /// the target and fetches the rest from the source; without it the move is aborted and the
    /// desktop runs on at the source (the migration is Failed, reason HostFailed).
    #[serde(default = "default_migration_timeout")]
    #[schemars(regex(pattern = crate::quantity::DURATION_PATTERN))]
    pub completion_timeout: String,
    /// Slow the guest's vCPUs down while it dirties memory faster than the link, so the move
    /// converges (QEMU's auto-converge).
    #[serde(default = "default_true")]
    pub auto_converge: bool,
    /// At the completion timeout, switch to post-copy instead of aborting: the move always
    /// finishes, but a failure of the source host or the link during the post-copy phase
    /// loses the desktop's running state (the disk is kept). Off by default.
    #[serde(default)]
    pub post_copy: bool,
}

fn default_migration_timeout() -> String {
    "5m".into()
}

fn default_true() -> bool {
    true
}

impl Default for PoolMigration {
    fn default() -> Self {
        Self {
            bandwidth_mib_per_second: None,
            completion_timeout: default_migration_timeout(),
            auto_converge: true,
            post_copy: false,
        }
    }
}

/// Storage locations on the pool's hosts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStorage {
    /// Absolute directory holding the base images that `spec.disk.image` of a Desktop names.
    /// Clean (no empty, `.` or `..` segment, not `/`), and neither inside `diskDir` nor holding
    /// it: the operator refuses the pool otherwise (Ready=False, reason InvalidSpec).
    #[serde(default = "default_image_dir")]
    #[schemars(regex(pattern = ABS_PATH), length(max = 4096))]
    pub image_dir: String,
    /// Absolute directory where per-desktop disks (linked clones or full copies) are created.
    /// Clean, and apart from `imageDir` (neither inside the other), as for `imageDir`.
    #[serde(default = "default_disk_dir")]
    #[schemars(regex(pattern = ABS_PATH), length(max = 4096))]
    pub disk_dir: String,
    /// Whether the directories are on storage shared by all hosts of the pool (NFS, Ceph, ...).
    /// Only then may a desktop be restarted on another host.
    #[serde(default)]
    pub shared: bool,
}

fn default_image_dir() -> String {
    "/var/lib/deskvirt/images".into()
}
fn default_disk_dir() -> String {
    "/var/lib/deskvirt/disks".into()
}

impl Default for PoolStorage {
    fn default() -> Self {
        Self {
            image_dir: default_image_dir(),
            disk_dir: default_disk_dir(),
            shared: false,
        }
    }
}

/// Where the pool's desktops are backed up.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolBackup {
    /// Absolute directory, on storage apart from the disks and reached by every host of the
    /// pool (NFS or the like), that backups are written under as
    /// `<dir>/<namespace>/<desktop uid>/<backup uid>.qcow2`. Clean, and apart from
    /// `storage.imageDir` and `storage.diskDir` (neither inside the other): the operator refuses
    /// the pool otherwise (Ready=False, reason InvalidSpec).
    #[schemars(regex(pattern = ABS_PATH), length(max = 4096))]
    pub dir: String,
    /// When every running desktop of the pool is backed up, in cron syntax and UTC: five
    /// fields (minute hour day-of-month month weekday; `*`, `a-b`, `*/n`, lists, `jan`, `mon`)
    /// or six with seconds first, or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    /// A desktop that does not run at a moment is not backed up at it; a moment missed by more
    /// than 10 minutes (the operator was down) is skipped. A scheduled backup is a
    /// DesktopBackup named `<desktop>-YYYYMMDD-HHMMSS`, labelled `deskvirt.io/scheduled=true`:
    /// retention (`keep`, `maxAge`) deletes only those. Unset: no schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub schedule: Option<String>,
    /// How many of each desktop's newest succeeded scheduled backups are kept; older ones
    /// are deleted, unless a kept backup restores from them. Unset: no count limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub keep: Option<u32>,
    /// How old a scheduled backup may get before it is deleted, such as 7d or 12h, unless a
    /// kept backup restores from it. Unset: no age limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::quantity::DURATION_PATTERN))]
    pub max_age: Option<String>,
    /// The longest chain of scheduled incrementals: once the newest scheduled backup of a
    /// desktop restores through this many files, the next one starts a new chain (all the
    /// desktop changed since its disk was made, `newChain`), and retention can then delete
    /// the old chain whole. Longer chains store less; shorter ones let retention free space
    /// sooner. Storage holds at most about `keep + maxChain` backups of a desktop.
    #[serde(default = "default_max_chain")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_chain: u32,
}

fn default_max_chain() -> u32 {
    7
}

/// The pool's network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolNetwork {
    /// nat, bridge or isolated.
    #[serde(default)]
    pub mode: NetworkMode,
    /// Name of the Linux bridge on every host; required when mode is bridge (checked by the
    /// operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = IFNAME))]
    pub bridge: Option<String>,
    /// IPv4 range carved into one subnet per host (nat and isolated modes).
    #[serde(default = "default_cidr")]
    #[schemars(regex(pattern = IPV4_CIDR))]
    pub cidr: String,
    /// Prefix length of each host's subnet inside `cidr`; 24 gives 253 desktops per host. At
    /// least the prefix length of `cidr` (checked by the operator).
    #[serde(default = "default_node_prefix")]
    #[schemars(range(min = 8, max = 30))]
    pub node_prefix_length: u8,
    /// First three octets of every desktop MAC in the pool, for example 52:54:00. A Desktop's
    /// fixed `spec.network.mac` must start with it: one outside is refused (InvalidSpec).
    #[serde(default = "default_mac_prefix")]
    #[schemars(regex(pattern = MAC_PREFIX))]
    pub mac_prefix: String,
}

fn default_cidr() -> String {
    "10.200.0.0/16".into()
}
fn default_node_prefix() -> u8 {
    24
}
fn default_mac_prefix() -> String {
    "52:54:00".into()
}

impl Default for PoolNetwork {
    fn default() -> Self {
        Self {
            mode: NetworkMode::Nat,
            bridge: None,
            cidr: default_cidr(),
            node_prefix_length: default_node_prefix(),
            mac_prefix: default_mac_prefix(),
        }
    }
}

/// Where a SPICE server listens on its host.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ListenPolicy {
    /// The host's address as reported in its DomainNode; clients connect directly.
    #[default]
    Node,
    /// 127.0.0.1 only; clients come through a tunnel or a proxy on the host.
    Loopback,
    /// Every address of the host.
    Any,
}

/// SPICE console settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolDisplay {
    /// Range of SPICE ports handed out on each host; each desktop gets one port.
    #[serde(default)]
    pub spice_ports: PortRange,
    /// Which host address the SPICE server listens on: Node, Loopback or Any.
    #[serde(default)]
    pub listen: ListenPolicy,
    /// Require TLS on SPICE connections; the hosts' libvirt must have spice_tls certificates.
    #[serde(default)]
    pub tls: bool,
}

/// Overcommit ratios: schedulable = physical × ratio.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Overcommit {
    /// vCPUs per physical CPU thread, 1 to 32.
    #[serde(default = "default_cpu_ratio")]
    #[schemars(range(min = 1.0, max = 32.0))]
    pub cpu: f64,
    /// Guest memory per byte of host memory, 1 to 4. Above 1 relies on ballooning and KSM.
    #[serde(default = "default_memory_ratio")]
    #[schemars(range(min = 1.0, max = 4.0))]
    pub memory: f64,
}

fn default_cpu_ratio() -> f64 {
    4.0
}
fn default_memory_ratio() -> f64 {
    1.0
}

impl Default for Overcommit {
    fn default() -> Self {
        Self {
            cpu: default_cpu_ratio(),
            memory: default_memory_ratio(),
        }
    }
}

/// Host resources that desktops never get.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reserved {
    /// Physical CPU threads kept for the host.
    #[serde(default = "default_reserved_cpu")]
    #[schemars(range(max = 1024))]
    pub cpu: u32,
    /// Memory kept for the host, as a quantity such as 2Gi.
    #[serde(default = "default_reserved_memory")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub memory: String,
}

fn default_reserved_cpu() -> u32 {
    1
}
fn default_reserved_memory() -> String {
    "1Gi".into()
}

impl Default for Reserved {
    fn default() -> Self {
        Self {
            cpu: default_reserved_cpu(),
            memory: default_reserved_memory(),
        }
    }
}

/// A desktop size used to count capacity in desktops.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceSize {
    /// vCPUs of the reference desktop.
    #[serde(default = "default_ref_cpu")]
    #[schemars(range(min = 1, max = 256))]
    pub cpu: u32,
    /// Memory of the reference desktop.
    #[serde(default = "default_ref_memory")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub memory: String,
}

fn default_ref_cpu() -> u32 {
    2
}
fn default_ref_memory() -> String {
    "4Gi".into()
}

impl Default for ReferenceSize {
    fn default() -> Self {
        Self {
            cpu: default_ref_cpu(),
            memory: default_ref_memory(),
        }
    }
}

/// Host-loss policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failover {
    /// Restart desktops of a lost host on another host. Needs `storage.shared` (the operator
    /// refuses the pool otherwise), and assumes the
    /// lost host is fenced (powered off) once `after` has passed: never two QEMUs on one disk.
    #[serde(default)]
    pub restart_elsewhere: bool,
    /// How long (more than zero) a host must be lost before its desktops are restarted elsewhere, or before a
    /// Desktop being deleted may finish without the host's cleanup.
    #[serde(default = "default_failover_after")]
    #[schemars(regex(pattern = crate::quantity::DURATION_PATTERN))]
    pub after: String,
}

fn default_failover_after() -> String {
    "5m".into()
}

impl Default for Failover {
    fn default() -> Self {
        Self {
            restart_elsewhere: false,
            after: default_failover_after(),
        }
    }
}

/// What the host's agent does with an orphan domain once it has been one for `after`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OrphanAction {
    /// Only report it (a Warning Event on the DomainNode and `status.orphans`).
    #[default]
    Report,
    /// Power it off (ACPI shutdown, then hard power-off), keeping its definition and disk.
    Stop,
    /// Power it off and undefine it (with any saved memory); its disk is kept.
    Undefine,
}

/// The orphan-domain policy of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrphanPolicy {
    /// What to do: Report (default), Stop, or Undefine (the disk is always kept).
    #[serde(default)]
    pub action: OrphanAction,
    /// Grace period before the action, counted from when the agent found the orphan.
    #[serde(default = "default_orphan_after")]
    #[schemars(regex(pattern = crate::quantity::DURATION_PATTERN))]
    pub after: String,
}

fn default_orphan_after() -> String {
    "1h".into()
}

impl Default for OrphanPolicy {
    fn default() -> Self {
        Self {
            action: OrphanAction::default(),
            after: default_orphan_after(),
        }
    }
}

/// Defaults inherited by the pool's desktops.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolDefaults {
    /// Idle policy for desktops that do not set `spec.idle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdlePolicy>,
    /// USB redirection policy for desktops that do not set `spec.display.usb`, and the limit
    /// for those that do: a Desktop may only narrow it (no redirection when this forbids it,
    /// no more channels, every deny filter kept, allow filters only inside these). Unset puts
    /// no limit on the desktops' own policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb: Option<UsbPolicy>,
}

/// Observed state of a pool, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourcePoolStatus {
    /// Hosts in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,
    /// What the ready hosts offer after reserve and overcommit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Amounts>,
    /// What the pool's desktops hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Amounts>,
    /// Capacity minus allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<Amounts>,
    /// SPICE port usage summed over the pool's hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortUsage>,
    /// Desktops in the pool by phase.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub desktops: BTreeMap<String, u32>,
    /// Ready (the pool can place desktops) and Degraded (some hosts are lost or not ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,
    /// The spec generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
