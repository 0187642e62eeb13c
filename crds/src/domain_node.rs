//! `DomainNode`: one KVM host as the cluster sees it. The node-agent creates it to join and
//! reports host facts; the operator adds pool membership, subnet, allocatable and health.

// kube-derive expands each `printcolumn(...)` into attributes clippy sees as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use deskvirt_core::types::Allocatable;

/// A KVM host running a deskvirt node-agent, named after its Kubernetes Node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "deskvirt.io",
    version = "v1alpha1",
    kind = "DomainNode",
    plural = "domainnodes",
    shortname = "dn",
    category = "deskvirt",
    doc = "A KVM host running a deskvirt node-agent, named after its Kubernetes Node.",
    status = "DomainNodeStatus",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Heartbeat fresh"
    ),
    printcolumn(
        name = "Pool",
        type_ = "string",
        json_path = ".status.pool",
        description = "ResourcePool of the host"
    ),
    printcolumn(
        name = "CPUs",
        type_ = "integer",
        json_path = ".status.cpu.threads",
        description = "Logical CPUs"
    ),
    printcolumn(
        name = "Memory",
        type_ = "string",
        json_path = ".status.memory",
        description = "Physical memory"
    ),
    printcolumn(
        name = "Desktops",
        type_ = "integer",
        json_path = ".status.domains.running",
        description = "Running domains"
    ),
    printcolumn(
        name = "Drained",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Drained\")].status",
        description = "While spec.drain is set: True once no desktop is left",
        priority = 1
    ),
    printcolumn(
        name = "Hypervisor",
        type_ = "string",
        json_path = ".status.hypervisor",
        description = "kvm or qemu (TCG)"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DomainNodeSpec {
    /// Keep new desktops off this host; desktops already on it keep running.
    #[serde(default)]
    pub unschedulable: bool,
    /// The host is under maintenance: unschedulable, and excluded from pool capacity. Desktops
    /// on it stay where they are; set `drain` to move them off first.
    #[serde(default)]
    pub maintenance: bool,
    /// Move every desktop off the host, and keep new ones off it (as `unschedulable`). Running
    /// desktops migrate live to other hosts of the pool, connected ones first, within the
    /// pool's migration limits; stopped ones are bound to another host. `status.drain` and
    /// the `Drained` condition show the progress and what blocks it (`kubectl wait
    /// --for=condition=Drained`). Set it to false to make the host schedulable again; unfinished
    /// drain migrations are then cancelled.
    #[serde(default)]
    pub drain: bool,
}

/// The hypervisor a host runs domains with.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    /// Hardware virtualization.
    #[default]
    Kvm,
    /// QEMU's software emulator (TCG), for hosts without usable KVM.
    Qemu,
}

/// Observed state of a host.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainNodeStatus {
    /// Address SPICE clients use to reach the host (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// CPU facts (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuFacts>,
    /// Physical memory as a quantity (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Swap as a quantity (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<String>,
    /// Hugepages (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<Hugepages>,
    /// Largest vCPU count one domain may have (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// kvm or qemu (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<Hypervisor>,
    /// libvirt version, such as 9.0.0 (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_version: Option<String>,
    /// QEMU version, such as 7.2.0 (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_version: Option<String>,
    /// Domains on the host (agent; a change of the counts alone is reported within 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domains: Option<DomainCounts>,
    /// Kernel samepage merging savings (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ksm: Option<KsmStats>,
    /// Version of the node-agent (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Last time the agent refreshed the host facts (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_time: Option<Time>,
    /// Pool the host belongs to (operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The host's subnet carved from the pool CIDR (operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// What desktops may use after reserve and overcommit (operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<Allocatable>,
    /// deskvirt domains on the host whose Desktop is gone or not bound here (its finalizers
    /// removed by hand, say): still charged to the host's capacity, ports and MACs until they
    /// are gone; the pool's `orphans` policy says what happens to them (agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["uid"]))]
    pub orphans: Vec<OrphanDomain>,
    /// Where other hosts send desktops that move here live (agent; `--migration-uri`). A host
    /// without it is never chosen as a migration target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migration::MigrationEndpoint>,
    /// Progress of a drain (operator, field manager `deskvirt-operator-drain`), while
    /// `spec.drain` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainStatus>,
    /// Disks that Cold migrations will copy to this host, in pools whose storage the hosts do
    /// not share (operator, field manager `deskvirt-operator-incoming`): the host makes each
    /// one empty, in the layout of the desktop's disk, before the source host copies into it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["migration"]))]
    #[schemars(length(max = 64))]
    pub incoming: Vec<IncomingDisk>,
    /// The host's answer to each of `incoming` (agent, field manager
    /// `deskvirt-node-agent-incoming`): ready, or why it cannot take the disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["migration"]))]
    #[schemars(length(max = 64))]
    pub prepared: Vec<PreparedDisk>,
    /// The host's copies of DesktopImages of its pool (agent, field manager
    /// `deskvirt-node-agent-image`), one per image UID and version: each image's current
    /// version, and older versions Desktops bound here are pinned to. The operator copies each
    /// into the image's status and places Desktops only where their version is Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["uid", "version"]))]
    #[schemars(length(max = 256))]
    pub images: Vec<crate::image::HostImage>,
    /// LibvirtConnected (agent), Ready and Schedulable (operator), Drained (operator, while
    /// `spec.drain` is set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,
}

/// A disk a Cold migration copies to a host (operator).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IncomingDisk {
    /// UID of the DesktopMigration.
    #[schemars(length(max = 64))]
    pub migration: String,
    /// The Desktop, as `namespace/name`.
    #[schemars(length(max = 317))]
    pub desktop: String,
    /// The Desktop's UID: the owner recorded beside the disk.
    #[schemars(length(max = 64))]
    pub desktop_uid: String,
    /// The disk's file name in the pool's `storage.diskDir` (`<domain>.qcow2`).
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.qcow2$"))]
    pub file: String,
    /// The Desktop's base image: a file name in the pool's `storage.imageDir`.
    #[schemars(length(min = 1, max = 255))]
    pub image: String,
    /// Linked: the disk is an overlay of the base image, which the host must hold already, and
    /// only what the desktop wrote is copied. Full: the disk stands alone, and all of it is
    /// copied.
    pub clone: crate::desktop::CloneMode,
    /// The disk's virtual size in bytes, when the Desktop asks for one (else the image's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// A host's answer to an [`IncomingDisk`] (agent).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDisk {
    /// UID of the DesktopMigration.
    #[schemars(length(max = 64))]
    pub migration: String,
    /// The empty disk is made and waits for the copy.
    pub ready: bool,
    /// Why it cannot be made, when not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
    /// The length in bytes of the base image the host holds under that name: the source
    /// refuses to copy an overlay onto an image that differs from its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_bytes: Option<u64>,
}

/// How far the drain of a host has come.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainStatus {
    /// When the operator first saw `spec.drain` set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// Desktops still bound to the host.
    pub remaining: u32,
    /// Of those, the ones a live migration moves or is about to.
    pub migrating: u32,
    /// Desktops the drain's live migrations moved off the host (its migrations that
    /// Succeeded).
    pub migrated: u32,
    /// The desktops still bound to the host, each with why (the first 50).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub desktops: Vec<DrainLeft>,
}

/// A desktop that keeps a draining host from being empty.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainLeft {
    /// `<namespace>/<name>` of the Desktop.
    pub desktop: String,
    /// Migrating, Rebinding, PinnedToHost, StorageNotShared, MigrationFailed or
    /// Settling.
    pub reason: String,
    /// What happens next, or what an admin can do.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// A deskvirt domain on a host with no Desktop bound there, and what it holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrphanDomain {
    /// UID of the Desktop the domain was made for (its `<uuid>`).
    pub uid: String,
    /// The libvirt domain name.
    pub domain: String,
    /// `<namespace>/<name>` of the Desktop the domain was made for.
    pub desktop: String,
    /// Pool recorded in the domain.
    pub pool: String,
    /// Whether it runs (only a running domain uses CPU and memory).
    pub running: bool,
    /// vCPUs.
    pub cpu: u32,
    /// Memory as a quantity.
    pub memory: String,
    /// SPICE port it listens on (or will, when started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spice_port: Option<u16>,
    /// MAC of its NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// When the agent first found it an orphan.
    pub since: Time,
    /// What the pool's policy did to it (`Stopped`, `Undefined`), once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

/// CPU topology and speed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CpuFacts {
    /// CPU model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Sockets.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Logical CPUs in total (sockets × cores × threads per core).
    pub threads: u32,
    /// Nominal speed in MHz.
    pub mhz: u32,
    /// The named CPU models the hypervisor can give a domain here (libvirt's domain
    /// capabilities, custom mode, usable ones): what a pool's `spec.cpu.model` may name.
    /// Unset when the agent could not read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub models: Option<Vec<String>>,
}

/// Hugepage pool of the host.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hugepages {
    /// Page size as a quantity, such as 2Mi.
    pub size: String,
    /// Pages in total.
    pub total: u64,
    /// Pages free.
    pub free: u64,
}

/// Domain counts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainCounts {
    /// Domains defined in libvirt.
    pub defined: u32,
    /// Domains running.
    pub running: u32,
}

/// KSM statistics.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KsmStats {
    /// Whether KSM runs.
    pub enabled: bool,
    /// Memory saved by page sharing, as a quantity.
    pub saved: String,
}
