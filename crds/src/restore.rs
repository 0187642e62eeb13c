//! `DesktopRestore`: an action that restores an existing, stopped Desktop's disk from a backup
//! of its namespace, keeping the old disk until the desktop has run on the restored one. The
//! record the operator leaves on the Desktop for its host, and the host's report, live here
//! too.

// kube-derive expands each `printcolumn(...)` into attributes clippy sees as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use deskvirt_core::backup::restore_over::{Phase as RestorePhase, Said as RestoreState};

use crate::backup::Restoring;
use crate::schema::{ABS_PATH, DNS_SUBDOMAIN};

/// Restores a Desktop of this namespace from one of its backups.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "deskvirt.io",
    version = "v1alpha1",
    kind = "DesktopRestore",
    plural = "desktoprestores",
    shortname = "drst",
    category = "deskvirt",
    doc = "Restores an existing Desktop's disk from a DesktopBackup of this namespace, while the Desktop is stopped; its old disk is kept until it has run on the restored one.",
    namespaced,
    status = "DesktopRestoreStatus",
    printcolumn(
        name = "Desktop",
        type_ = "string",
        json_path = ".spec.desktop",
        description = "The Desktop restored"
    ),
    printcolumn(
        name = "Backup",
        type_ = "string",
        json_path = ".spec.backup",
        description = "The backup it is restored from"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Restoring, Restored, Succeeded or Failed"
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
pub struct DesktopRestoreSpec {
    /// Name of the Desktop whose disk is restored, in this namespace. It must be stopped
    /// (`spec.power: Off`, its domain shut off, not suspended); the restore waits until it is.
    /// Read once: the restore is of the Desktop (by UID) it recorded first.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(min = 1, max = 253))]
    pub desktop: String,
    /// Name of the DesktopBackup to restore, in this namespace: Succeeded, its whole chain of
    /// parents too, and its chain resting on the base image the Desktop's `spec.disk.image`
    /// names (or a Full backup). Any backup of the namespace may be restored onto the
    /// Desktop, not only the Desktop's own.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(min = 1, max = 253))]
    pub backup: String,
}

/// What the operator decided and the host reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesktopRestoreStatus {
    /// Pending (waiting for the desktop to be stopped, or for the backup), Restoring (its host
    /// builds the new disk), Restored (the disk is the backup's; the old disk is kept until the
    /// desktop has run), Succeeded (it ran; the old disk is gone) or Failed (the desktop's disk
    /// is as it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// UID of the Desktop restored, pinned when the restore is recorded on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub desktop_uid: Option<String>,
    /// UID of the backup restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub backup_uid: Option<String>,
    /// The host that restored the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub node: Option<String>,
    /// Where the old disk is kept until the desktop has run (Restored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = ABS_PATH), length(max = 4096))]
    pub kept_disk: Option<String>,
    /// When the disk was restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_time: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The summary `Ready` (True once Succeeded; its reason says why it waits or failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,
    /// The spec generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A restore for the Desktop's host to carry out, recorded on the Desktop's status by the
/// operator (field manager `deskvirt-operator-restore-over`) while the desktop is stopped.
/// Cleared when the restore ends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreOver {
    /// The DesktopRestore's name, in the Desktop's namespace.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub name: String,
    /// The DesktopRestore's UID.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// The chain the new disk is built from, as for `spec.disk.restoreFrom`.
    pub chain: Restoring,
    /// When the operator recorded it.
    pub at: Time,
}

/// What the host reports of a restore over the desktop's disk (agent, field manager
/// `deskvirt-node-agent-restore`). Kept until the next restore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    /// The DesktopRestore's UID the report is about.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// The host that restored it.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub node: String,
    /// Swapped (the disk is the backup's, the old one kept), Ran (the desktop ran on it and
    /// the old one is removed) or Failed (the disk is as it was).
    pub state: RestoreState,
    /// When the host reached that state.
    pub at: Time,
    /// Where the old disk is kept (Swapped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = ABS_PATH), length(max = 4096))]
    pub kept_disk: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

impl DesktopRestore {
    /// The phase, Pending until the operator wrote one.
    pub fn phase(&self) -> RestorePhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default()
    }
}
