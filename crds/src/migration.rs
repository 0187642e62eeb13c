//! `DesktopMigration`: an action that moves one Desktop to another host of its pool, or into
//! another pool (`spec.targetPool`). The spec is
//! the user's request; the status is the operator's (the target it chose and reserved, the
//! phase, the reasons). The Desktop's own spec never changes, so GitOps sees no drift.

// kube-derive expands each `printcolumn(...)` into attributes clippy sees as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use deskvirt_core::migration::{MigrationMode, MigrationPhase, MigrationState};

use crate::schema::DNS_SUBDOMAIN;

/// A request to move one Desktop of this namespace to another host of its pool, or into another
/// pool (`spec.targetPool`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "deskvirt.io",
    version = "v1alpha1",
    kind = "DesktopMigration",
    plural = "desktopmigrations",
    shortname = "dmig",
    category = "deskvirt",
    doc = "A request to move one Desktop of this namespace to another host of its pool, or into another pool (spec.targetPool).",
    namespaced,
    status = "DesktopMigrationStatus",
    printcolumn(
        name = "Desktop",
        type_ = "string",
        json_path = ".spec.desktop",
        description = "The Desktop to move"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Scheduling, Running, Succeeded or Failed"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".status.source",
        description = "Host the desktop runs on"
    ),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".status.target",
        description = "Host it moves to"
    ),
    printcolumn(
        name = "Downtime",
        type_ = "integer",
        json_path = ".status.downtimeMillis",
        description = "Milliseconds the desktop was paused, once Succeeded",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why it is in its phase"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DesktopMigrationSpec {
    /// Name of the Desktop to move, in this namespace. Read once: the migration acts on the
    /// Desktop (by UID) it found first, and a later edit of this field is ignored.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(min = 1, max = 253))]
    pub desktop: String,
    /// The host (DomainNode name) to move to. Unset lets the pool's scheduler pick one, by the
    /// same capacity and overcommit rules as a binding. A host that cannot take the desktop
    /// makes the migration wait (Pending, reason NoTarget) until the pending timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(min = 1, max = 253))]
    pub target_node: Option<String>,
    /// Live (the default: the desktop keeps running while its memory is copied; a desktop
    /// suspended by the idle policy moves with its saved memory; needs a pool with
    /// `storage.shared`, else it fails with reason StorageNotShared) or Cold (the guest is shut
    /// down, forced after the source agent's shutdown grace, and boots on the target). On shared
    /// storage a Cold move takes a running desktop and any host of the pool takes it,
    /// `--migration-uri` or not. Without shared storage it copies the disk's own layer to a host
    /// with `--migration-uri` (the base image must be there): it takes running, stopped and
    /// suspended desktops, and fails with reason TargetNotPrepared when the target cannot make
    /// the empty disk (a file of that name there, or no base image).
    #[serde(default)]
    pub mode: MigrationMode,
    /// Another pool to move the desktop into (a ResourcePool whose namespace selection admits
    /// this namespace). Only mode Cold, for a running or stopped desktop (one suspended with
    /// its memory saved is refused, reason MemorySaved): the guest is shut down, its disk's
    /// own layer is copied into that pool's `storage.diskDir` on a host of that pool with
    /// `--migration-uri` (which holds the same base image), and the desktop boots there with
    /// a SPICE port and a MAC of that pool. The Desktop's `spec.pool` is not edited: its
    /// `PoolApplied` condition turns False (PoolChangeRefused) until the manifest says the new
    /// pool. Unset, or the desktop's own pool: a move within its pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(min = 1, max = 253))]
    pub target_pool: Option<String>,
}

/// What the operator decided and observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesktopMigrationStatus {
    /// Pending, Scheduling, Running, Succeeded or Failed. Succeeded and Failed never change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// UID of the Desktop the migration acts on, pinned on its first pass: a Desktop deleted
    /// and made again under the same name is not moved by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub desktop_uid: Option<String>,
    /// Host the desktop ran on when its target was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub source: Option<String>,
    /// Host the desktop moves to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub target: Option<String>,
    /// The pool the desktop moves into, pinned with the target when `spec.targetPool` names
    /// another pool than the desktop's: the target's port, MAC and charge are held there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub target_pool: Option<String>,
    /// The MAC address reserved for the desktop in the target pool (a move between pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 17))]
    pub target_mac: Option<String>,
    /// SPICE port reserved for the desktop on the target, from the pool's range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub target_port: Option<u16>,
    /// When the target was chosen and reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<Time>,
    /// When the source host started moving the desktop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// From the start of the move to the desktop running on the target, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_millis: Option<u64>,
    /// How long the desktop was paused, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_millis: Option<u64>,
    /// Memory sent to the target, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_moved: Option<u64>,
    /// When the migration ended (Succeeded or Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// `Scheduled` (a target is reserved) and the summary `Ready` (True once Succeeded; its
    /// reason says why the migration waits or failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,
    /// The spec generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A migration of a Desktop under way, recorded on the Desktop's status by the operator
/// (field manager `deskvirt-operator-migration`) before any host acts on it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Migrating {
    /// The DesktopMigration's name, in the Desktop's namespace.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub name: String,
    /// The DesktopMigration's UID.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// Live or Cold.
    pub mode: MigrationMode,
    /// The host the desktop moves to.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub target: String,
    /// The SPICE port the desktop listens on there.
    #[schemars(range(min = 1024, max = 65535))]
    pub port: u16,
    /// When the target was reserved.
    pub since: Time,
    /// The target's libvirt, as the source host's libvirt reaches it (the target's
    /// `status.migration.uri`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub uri: Option<String>,
    /// The address the memory is sent to (the target's `status.migration.address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub address: Option<String>,
    /// The address SPICE clients reach the target at (the target's `status.address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub spice_address: Option<String>,
    /// For a Cold move that copies the disk: the length in bytes of the base image the
    /// target holds (its `status.prepared`), which the source compares with its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image_bytes: Option<u64>,
    /// For a move to another pool (the migration's `spec.targetPool`): that pool's name. The
    /// source host then copies the disk into the target pool's `storage.diskDir` with a
    /// carrier domain holding the disk alone (the desktop's MAC and CPU model may differ
    /// there), and the target defines the desktop afresh in its pool once it is bound there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub pool: Option<String>,
    /// The DesktopMigration was deleted while the domain moves: the source host aborts the
    /// move, and the desktop runs on there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelled: bool,
}

impl Migrating {
    /// The value of the console mirror's `deskvirt.io/migration` annotation that confirms
    /// this record: only the operator writes there.
    pub fn stamp(&self) -> String {
        stamp(&self.uid, &self.target, self.port)
    }
}

/// The mirror annotation confirming a migration `uid` to `target`, port `port`.
pub fn stamp(uid: &str, target: &str, port: u16) -> String {
    format!("{uid}/{target}/{port}")
}

/// Where a host takes in desktops moved live (agent).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationEndpoint {
    /// This host's libvirt as other hosts' libvirt reach it, such as
    /// `qemu+tls://host-3.lab/system`.
    #[schemars(length(min = 1, max = 1024))]
    pub uri: String,
    /// The address other hosts send memory to (`tcp://<address>`); the host's address when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub address: Option<String>,
}

/// The source host's report of a migration (agent).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationReport {
    /// The DesktopMigration's UID the report is about.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// The host that moved the desktop away (wrote the report).
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub source: String,
    /// Started, Completed or Failed.
    pub state: MigrationState,
    /// When the host reached that state.
    pub at: Time,
    /// Why it failed, or what it measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
    /// From the start of the move to the domain running on the target, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_millis: Option<u64>,
    /// How long the guest was paused, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_millis: Option<u64>,
    /// Memory sent, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

impl DesktopMigration {
    /// The phase, Pending until the operator wrote one.
    pub fn phase(&self) -> MigrationPhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default()
    }
}
