//! `DesktopBackup`: one point-in-time backup of a Desktop's disk. The spec is the user's
//! request; the status is the operator's (the chain it extends, the host, the phase) with the
//! figures the host reported. The record the operator leaves on the Desktop for its host to act
//! on, and the host's report back, live here too.

// kube-derive expands each `printcolumn(...)` into attributes clippy sees as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use deskvirt_core::backup::{Kind as BackupType, State as BackupPhase};

use crate::schema::{ABS_PATH, DNS_SUBDOMAIN};

/// A backup of one Desktop of this namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "deskvirt.io",
    version = "v1alpha1",
    kind = "DesktopBackup",
    plural = "desktopbackups",
    shortname = "dbak",
    category = "deskvirt",
    doc = "One point-in-time backup of a Desktop's disk, in this namespace. Deleting the Desktop keeps its backups.",
    namespaced,
    status = "DesktopBackupStatus",
    printcolumn(
        name = "Desktop",
        type_ = "string",
        json_path = ".spec.desktop",
        description = "The Desktop backed up"
    ),
    printcolumn(
        name = "Type",
        type_ = "string",
        json_path = ".status.type",
        description = "Full or Incremental, as taken"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Running, Succeeded or Failed"
    ),
    printcolumn(
        name = "Parent",
        type_ = "string",
        json_path = ".status.parent",
        description = "The backup an incremental holds the changes since"
    ),
    printcolumn(
        name = "Consistency",
        type_ = "string",
        json_path = ".status.quiesce.consistency",
        description = "Quiesced (the guest agent froze its file systems), CrashConsistent, or Stopped (taken while the desktop was stopped)"
    ),
    printcolumn(
        name = "Size",
        type_ = "integer",
        json_path = ".status.sizeBytes",
        description = "Bytes of the backup file"
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
pub struct DesktopBackupSpec {
    /// Name of the Desktop to back up, in this namespace. Read once: the backup is of the
    /// Desktop (by UID) it found first, and a later edit of this field is ignored. The Desktop
    /// must run, or be stopped (`spec.power: Off`, not suspended: its host starts the domain
    /// paused for the copy, and no guest code runs), and its pool must set `spec.backup.dir`.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(min = 1, max = 253))]
    pub desktop: String,
    /// Full (the whole disk, base image included, in one file that needs no other) or
    /// Incremental (only the blocks written since the desktop's newest succeeded backup, or,
    /// with none, since its disk was made from the base image). Unset: Incremental. The
    /// backup that is taken is in `status.type`: a disk without the bitmap an incremental
    /// needs (made before deskvirt kept one, or its history lost) gets a Full one, and the
    /// condition says so.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<BackupType>,
    /// Incremental only: hold every block written since the disk was made from its base
    /// image, not only those since the newest backup, so that the backup needs no older one
    /// and the older chain can be deleted. A pool's schedule sets it to start each new chain
    /// (`spec.backup.maxChain`). A disk without that history gets a Full backup.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new_chain: bool,
}

/// What the operator decided and the host reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesktopBackupStatus {
    /// Pending, Running, Succeeded or Failed. Succeeded and Failed never change; only a
    /// Succeeded backup is complete and verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupPhase>,
    /// UID of the Desktop backed up, pinned on the first pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub desktop_uid: Option<String>,
    /// Full or Incremental, as taken.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<BackupType>,
    /// The backup an incremental holds the changes since (a DesktopBackup of this namespace);
    /// unset for a full backup and for the first incremental of a disk (the changes since it
    /// was made from its base image, `baseImage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub parent: Option<String>,
    /// The parent's UID: the chain is followed by UID, so a parent deleted and made again
    /// under its name is never taken for the one this backup extends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub parent_uid: Option<String>,
    /// The base image the chain of an incremental rests on, as the host's disk named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub base_image: Option<String>,
    /// The host that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub node: Option<String>,
    /// Where it is stored: a qcow2 file under the pool's `spec.backup.dir`. An incremental's
    /// backing file is its parent's file (or the base image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = ABS_PATH), length(max = 4096))]
    pub location: Option<String>,
    /// When the host started writing it: the point in time it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it ended (Succeeded or Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Bytes of the backup file on storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Bytes of the disk the host copied into it (the changed blocks, for an incremental).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_bytes: Option<u64>,
    /// `sha256:<hex>` of the file as written and verified; a restore checks it first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 80))]
    pub checksum: Option<String>,
    /// How long starting the backup job took on the host, in milliseconds: the moment the
    /// guest's disk I/O waits while the checkpoint is taken. The copy itself does not pause it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_millis: Option<u64>,
    /// Whether the guest's file systems were frozen through its guest agent while the point in
    /// time was taken, as the host reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<Quiesce>,
    /// The summary `Ready` (True once Succeeded; its reason says why it waits or failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,
    /// The spec generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A backup for the Desktop's host to write, recorded on the Desktop's status by the operator
/// (field manager `deskvirt-operator-backup`) before the host acts. Cleared when it ends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackingUp {
    /// The DesktopBackup's name, in the Desktop's namespace.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub name: String,
    /// The DesktopBackup's UID: the name of the checkpoint the backup creates, and of its file.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// What it holds.
    #[serde(rename = "type")]
    pub kind: BackupType,
    /// The checkpoint an incremental starts from: `c0` (the disk's creation) or the parent
    /// backup's UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub since: Option<String>,
    /// The parent backup's name (unset for a full backup and for the first incremental).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub parent: Option<String>,
    /// When that checkpoint was made (the parent backup's start), for libvirt's record of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_time: Option<Time>,
    /// The parent backup's file, the new file's backing file (unset: the base image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = ABS_PATH), length(max = 4096))]
    pub parent_location: Option<String>,
    /// The file to write (under the pool's `spec.backup.dir`).
    #[schemars(regex(pattern = ABS_PATH), length(max = 4096))]
    pub location: String,
    /// When the operator recorded it.
    pub at: Time,
}

/// The backup chain a desktop's disk is restored from (operator).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Restoring {
    /// The DesktopBackup named in `spec.disk.restoreFrom`.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub backup: String,
    /// Its UID.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// The files of the chain, root first, each with the checksum it was verified with: the
    /// host refuses to restore from a file that no longer matches it.
    #[schemars(length(min = 1, max = 256))]
    pub layers: Vec<BackupLayer>,
}

/// One file of a backup chain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupLayer {
    /// The DesktopBackup's name.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub name: String,
    #[schemars(regex(pattern = ABS_PATH), length(max = 4096))]
    pub location: String,
    /// `sha256:<hex>`.
    #[schemars(length(max = 80))]
    pub checksum: String,
}

/// What the host reports of a backup it writes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BackupState {
    /// The job runs.
    Started,
    /// Written, checked with `qemu-img check`, and its checksum taken.
    Completed,
    /// Not written or not verified; the file is removed.
    Failed,
}

/// The host's report of the backup recorded in `status.backup` (agent, field manager
/// `deskvirt-node-agent-backup`). Kept until the next backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupReport {
    /// The DesktopBackup's UID the report is about.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// The host that wrote it.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(max = 253))]
    pub node: String,
    pub state: BackupState,
    /// When the host reached that state.
    pub at: Time,
    /// What it holds, as taken (a Full one when the disk lacked the incremental's bitmap).
    #[serde(rename = "type")]
    pub kind: BackupType,
    /// The file it is written to (the record's `location`), so that a host finding the record
    /// gone can remove an unfinished file.
    #[schemars(regex(pattern = ABS_PATH), length(max = 4096))]
    pub location: String,
    /// Why it failed, or why it was taken Full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
    /// When the job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<Time>,
    /// Milliseconds the start of the job took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_millis: Option<u64>,
    /// The base image the disk rests on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub base_image: Option<String>,
    /// Whether the guest agent froze the guest's file systems for the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<Quiesce>,
    /// The desktop was stopped: the host started its domain paused for the copy and stops it
    /// once the backup ends (unless the desktop was started meanwhile).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub offline: bool,
    /// Bytes of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Bytes of the disk copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_bytes: Option<u64>,
    /// `sha256:<hex>` of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 80))]
    pub checksum: Option<String>,
}

/// How consistent the point in time a backup holds is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Consistency {
    /// The guest agent flushed and froze the guest's file systems (running its fsfreeze hooks,
    /// where applications flush their own state) while the backup's point in time was taken,
    /// and thawed them right after: what a clean shutdown would leave on the disk.
    Quiesced,
    /// No guest agent answered (none installed in the guest, not started yet, or the domain
    /// was defined without its channel and has not been restarted since): the backup holds
    /// the disk as a power cut at that moment would have left it. Journaling file systems
    /// recover from it; an application's unflushed data may be missing.
    CrashConsistent,
    /// The desktop was stopped: its host started the domain paused for the copy (no guest
    /// code ran) and the disk is as the guest left it when it stopped.
    Stopped,
}

/// How the guest was held while a backup's point in time was taken.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Quiesce {
    pub consistency: Consistency,
    /// How many file systems the guest agent froze (Quiesced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystems: Option<u32>,
    /// Milliseconds the guest's file systems stayed frozen: from the freeze until the thaw,
    /// around the start of the backup job (Quiesced). Writes in the guest wait that long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_millis: Option<u64>,
    /// Why the backup is crash-consistent (what libvirt said of the guest agent), or what went
    /// wrong thawing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

impl DesktopBackup {
    /// The phase, Pending until the operator wrote one.
    pub fn phase(&self) -> BackupPhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default()
    }
}

/// The file of backup `backup_uid` of desktop `desktop_uid` in namespace `ns`, under `dir`:
/// only UIDs and the namespace's name, none of which a tenant chooses freely.
pub fn location(dir: &str, ns: &str, desktop_uid: &str, backup_uid: &str) -> String {
    format!(
        "{}/{ns}/{desktop_uid}/{backup_uid}.qcow2",
        dir.trim_end_matches('/')
    )
}
