//! `Desktop`: one VM desktop. The spec is the user's declaration (size, image, power, console,
//! idle policy); the status is the operator's binding and the node-agent's observations.

// kube-derive expands each `printcolumn(...)` into attributes clippy sees as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::{DURATION_PATTERN, QUANTITY_PATTERN};
pub use deskvirt_core::types::{IdleAction, Phase, Power};

use crate::schema::{DNS_LABEL, DNS_SUBDOMAIN, FILE_NAME, IFNAME, MAC};
pub use deskvirt_core::usb::{UsbFilter, UsbPolicy};

/// A VM desktop on a KVM host of a ResourcePool, reachable over SPICE.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "deskvirt.io",
    version = "v1alpha1",
    kind = "Desktop",
    plural = "desktops",
    shortname = "desk",
    category = "deskvirt",
    doc = "A VM desktop on a KVM host of a ResourcePool, reachable over SPICE.",
    namespaced,
    status = "DesktopStatus",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Lifecycle phase"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".status.node",
        description = "Host the desktop is bound to"
    ),
    printcolumn(
        name = "SPICE",
        type_ = "string",
        json_path = ".status.spice.uri",
        description = "SPICE endpoint"
    ),
    printcolumn(
        name = "User",
        type_ = "string",
        json_path = ".spec.user",
        description = "Owner of the desktop"
    ),
    printcolumn(
        name = "Idle",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Idle\")].status",
        description = "Idle past its timeout",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DesktopSpec {
    /// Name of the ResourcePool the desktop is placed in.
    #[schemars(regex(pattern = DNS_LABEL), length(min = 1, max = 63))]
    pub pool: String,
    /// The person the desktop belongs to (free text, shown in `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub user: Option<String>,
    /// Number of virtual CPUs, 1 to 256.
    #[serde(default = "default_cpu")]
    #[schemars(range(min = 1, max = 256))]
    pub cpu: u32,
    /// Guest memory as a Kubernetes quantity, such as 4Gi; more than zero.
    #[serde(default = "default_memory")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub memory: String,
    /// The desktop's system disk.
    pub disk: DiskSpec,
    /// Boot a kernel and initrd from the pool's `storage.imageDir` directly instead of the disk's
    /// bootloader (appliances, thin-client images). Unset boots from the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<DirectBoot>,
    /// Declared power state, On or Off. Off shuts the desktop down and keeps its disk. Quote the
    /// value in YAML (`power: "Off"`): unquoted, YAML 1.1 reads On and Off as booleans.
    #[serde(default)]
    pub power: Power,
    /// Console settings.
    #[serde(default)]
    pub display: DisplaySpec,
    /// Network settings.
    #[serde(default)]
    pub network: NetworkSpec,
    /// What to do when the desktop has been idle for a while; the pool's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdlePolicy>,
    /// Performance tuning for demanding desktops.
    #[serde(default)]
    pub performance: Performance,
}

fn default_cpu() -> u32 {
    2
}
fn default_memory() -> String {
    "2Gi".into()
}

/// How a desktop disk is made from its base image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CloneMode {
    /// A qcow2 overlay whose backing file is the base image: instant and small.
    #[default]
    Linked,
    /// An independent copy of the base image.
    Full,
}

/// The system disk.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskSpec {
    /// File name of a base image placed by hand inside the pool's `storage.imageDir` on every
    /// host (no checksum, no placement filter). Exactly one of `image` and `imageRef`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(regex(pattern = FILE_NAME), length(min = 1, max = 255))]
    pub image: String,
    /// A DesktopImage to clone from: the desktop is placed only on a host holding a verified
    /// copy of it, and its disk is a clone of that copy. Exactly one of `image` and `imageRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<crate::image::ImageRef>,
    /// Virtual size of the desktop's disk; at least the base image's size. Unset keeps the
    /// image's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub size: Option<String>,
    /// Linked (qcow2 overlay on the base image) or Full (independent copy).
    #[serde(default)]
    pub clone: CloneMode,
    /// Keep the disk when the desktop is stopped or reclaimed. A non-persistent desktop starts
    /// from a fresh clone each time and may be deleted by the idle policy.
    #[serde(default = "default_true")]
    pub persistent: bool,
    /// Make the disk from a backup instead of an empty clone: the desktop boots with its disk
    /// as it was at that point. The DesktopBackup must be of this namespace, Succeeded, with
    /// its whole chain of parents Succeeded, on the base image `image` names, and in a pool
    /// whose `spec.backup.dir` holds it; until then the desktop is not placed (Scheduled=False,
    /// reason RestoreUnavailable). Read once, when the disk is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<RestoreFrom>,
}

/// Where a desktop's disk is restored from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreFrom {
    /// Name of a DesktopBackup in this namespace.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(min = 1, max = 253))]
    pub backup: String,
}

fn default_true() -> bool {
    true
}

/// Direct kernel boot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectBoot {
    /// File name of the kernel inside the pool's `storage.imageDir`.
    #[schemars(regex(pattern = FILE_NAME), length(min = 1, max = 255))]
    pub kernel: String,
    /// File name of the initrd inside the pool's `storage.imageDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = FILE_NAME), length(min = 1, max = 255))]
    pub initrd: Option<String>,
    /// Kernel command line, such as `console=ttyS0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub cmdline: Option<String>,
}

/// Console settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisplaySpec {
    /// USB redirection from the SPICE client; the pool's default when unset. May only narrow
    /// the pool's `defaults.usb` (no redirection the pool forbids, no more channels, the pool's
    /// deny filters kept, allow filters only inside the pool's); a looser policy is refused
    /// with Scheduled=False, reason InvalidSpec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb: Option<UsbPolicy>,
}

/// Network settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// A fixed MAC address. Unset lets the operator allocate one from the pool's prefix. A fixed
    /// one must start with the pool's `network.macPrefix` (one outside is refused with
    /// Scheduled=False, reason InvalidSpec, so pools never collide) and is checked for
    /// collisions in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = MAC))]
    pub mac: Option<String>,
}

/// Idle reclamation policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdlePolicy {
    /// How long a desktop must be idle before `action` runs, such as 30m; more than zero.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub timeout: String,
    /// None, Suspend, Shutdown or Delete.
    #[serde(default)]
    pub action: IdleAction,
    /// Whether a connected SPICE client keeps the desktop active even when the guest is quiet.
    #[serde(default = "default_true")]
    pub connected_is_active: bool,
}

/// Performance tuning.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Performance {
    /// Pin each vCPU to its own physical CPU thread, excluded from overcommit.
    #[serde(default)]
    pub dedicated_cpus: bool,
    /// Back guest memory with the host's hugepages.
    #[serde(default)]
    pub hugepages: bool,
    /// SR-IOV virtual functions passed through to the desktop.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub sriov: Vec<SriovInterface>,
}

/// An SR-IOV virtual function from a physical NIC of the host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SriovInterface {
    /// Name of the physical function's interface on the host, such as ens1f0.
    #[schemars(regex(pattern = IFNAME))]
    pub physical_function: String,
}

/// Observed state of a desktop.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesktopStatus {
    /// Lifecycle phase, derived by the operator from the conditions and the host's health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Host (DomainNode name) the desktop is bound to; set by the operator at binding, and
    /// changed only when a woken desktop moves to another host (see `lastMove`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub node: Option<String>,
    /// How to reach the desktop's console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spice: Option<SpiceStatus>,
    /// The desktop's MAC address, allocated by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The desktop's IPv4 address on its host's network, reported by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The SPICE session, reported by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
    /// Last time the agent saw activity: a session, guest CPU or I/O.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<Time>,
    /// Since when the desktop has been idle; unset while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<Time>,
    /// What the idle policy did to the desktop (operator). While set, the host keeps the
    /// domain suspended or shut off whatever `spec.power` says, and the desktop's CPU, memory
    /// and SPICE port go back to the pool once the host confirms. A wake clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaimed: Option<Reclaimed>,
    /// The last `deskvirt.io/wake` annotation value the operator acted on (operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake: Option<Wake>,
    /// The last move of the desktop to another host (operator): a woken desktop whose host had
    /// no room, in a pool with `storage.shared`. It boots there from the same disk; memory saved
    /// on the old host is discarded there, never restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_move: Option<Move>,
    /// A migration of the desktop under way (operator, field manager
    /// `deskvirt-operator-migration`): the DesktopMigration, the target host and the SPICE port
    /// reserved there. Written before any host acts; cleared when the migration ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migration::Migrating>,
    /// What the source host did with the migration recorded in `migration` (agent, field
    /// manager `deskvirt-node-agent-migration`): Started, then Completed or Failed, with the
    /// figures of a completed move. Kept after the migration ends, until the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_report: Option<crate::migration::MigrationReport>,
    /// A backup of the desktop being written (operator, field manager
    /// `deskvirt-operator-backup`): the DesktopBackup, the checkpoint it starts from and the
    /// file. Written before the host acts; cleared when the backup ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::backup::BackingUp>,
    /// The backup chain the desktop's disk is made from, `spec.disk.restoreFrom` resolved by
    /// the operator (field manager `deskvirt-operator-backup`) before it is placed. Pinned once
    /// written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<crate::backup::Restoring>,
    /// A DesktopRestore of the stopped desktop's disk for its host to carry out (operator,
    /// field manager `deskvirt-operator-restore-over`). Cleared when the restore ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_over: Option<crate::restore::RestoreOver>,
    /// What the host did with the restore recorded in `restoreOver` (agent, field manager
    /// `deskvirt-node-agent-restore`): Swapped, then Ran, or Failed. Kept until the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_report: Option<crate::restore::RestoreReport>,
    /// What the host did with the backup recorded in `backup` (agent, field manager
    /// `deskvirt-node-agent-backup`): Started, then Completed or Failed, with its figures.
    /// Kept until the next backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_report: Option<crate::backup::BackupReport>,
    /// What the operator bound the desktop with and charges its host for (operator): the pool
    /// of the binding and the admitted size. A resize is admitted here once the host can hold
    /// it; the host defines the domain with this size, never with a larger `spec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Allocation>,
    /// The DesktopImage version the disk is (or will be) a clone of (operator), pinned when the
    /// desktop is bound: the host clones from this file and checks its copy against this sum,
    /// never from the spec, so a later version of the image leaves this disk alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::image::ImagePin>,
    /// The vCPUs and memory the desktop's running domain really has (agent); unset while no
    /// domain runs. Until a restart this may differ from `allocation`, and the host is charged
    /// the larger of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_size: Option<Size>,
    /// Scheduled, DomainDefined, Running, Idle and the summary Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,
    /// The spec generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The idle policy's action on a desktop, recorded instead of editing spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reclaimed {
    /// Suspend (memory saved to disk) or Shutdown (ACPI, forced after a grace period).
    pub action: IdleAction,
    /// When the idle timeout passed and the operator decided the action.
    pub at: Time,
    /// The SPICE port the desktop held; tried first when it wakes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: Option<u16>,
}

/// A wake the operator acted on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Wake {
    /// The `deskvirt.io/wake` annotation value.
    #[schemars(length(max = 253))]
    pub token: String,
    /// When the operator acted on it; the idle countdown starts again from here.
    pub at: Time,
}

/// A move of a desktop from one host to another.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Move {
    /// The host it left.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub from: String,
    /// The host it moved to.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub to: String,
    /// When the operator moved it. Memory the old host saved before this is stale.
    pub at: Time,
}

/// The pool and size a desktop is bound with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// The pool the binding was made in. A later `spec.pool` edit does not move it.
    #[schemars(length(max = 253))]
    pub pool: String,
    /// Admitted vCPUs.
    pub cpu: u32,
    /// Admitted memory, as a quantity.
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub memory: String,
}

/// vCPUs and memory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Size {
    /// vCPUs.
    pub cpu: u32,
    /// Memory, as a quantity.
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub memory: String,
}

impl Desktop {
    /// The base image the disk clones, relative to the pool's `storage.imageDir`: `spec.disk.image`,
    /// or for `spec.disk.imageRef` the version the operator pinned (`status.image`), once pinned
    /// and well formed (the file the pin's UID and version name, nothing else).
    pub fn base_image(&self) -> Option<String> {
        if !self.spec.disk.image.is_empty() {
            return Some(self.spec.disk.image.clone());
        }
        self.spec.disk.image_ref.as_ref()?;
        let pin = self.status.as_ref()?.image.as_ref()?;
        (crate::image::is_managed_file(&pin.file)
            && pin.file == crate::image::image_file(&pin.uid, pin.version))
        .then(|| pin.file.clone())
    }

    /// The pool the desktop belongs to: the one its binding was made in, else `spec.pool`.
    pub fn pool(&self) -> &str {
        self.status
            .as_ref()
            .and_then(|s| s.allocation.as_ref())
            .map_or(self.spec.pool.as_str(), |a| a.pool.as_str())
    }
}

/// SPICE console endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpiceStatus {
    /// Address a client connects to (reported by the agent from the listen policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port on the host, allocated by the operator from the pool's range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: Option<u16>,
    /// `spice://host:port`, for `remote-viewer` and `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Secret in the desktop's namespace holding the password and a `console.vv` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<String>,
}

/// A SPICE session.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// Whether a SPICE client is connected now.
    pub connected: bool,
    /// Since when the client is connected, or since when none is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Address of the connected client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
}
