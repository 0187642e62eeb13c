//! The plain values the API and the decisions share: port ranges, placement and network modes,
//! and the typed status fragments the operator writes (a host's allocatable amounts, a pool's
//! counts). They carry their schema so the CRDs and the core cannot disagree.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How desktops reach the network.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A libvirt NAT network per host holding the host's subnet; MAC→IP pinned by DHCP.
    #[default]
    Nat,
    /// Desktops join an existing Linux bridge (`bridge`) on every host.
    Bridge,
    /// A host-only network without outside access.
    Isolated,
}

/// An inclusive port range of unprivileged ports. `first` must not exceed `last` (checked by the
/// operator).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    /// First port of the range.
    #[schemars(range(min = 1024, max = 65535))]
    pub first: u16,
    /// Last port of the range (inclusive).
    #[schemars(range(min = 1024, max = 65535))]
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        Self {
            first: 5900,
            last: 6899,
        }
    }
}

impl PortRange {
    /// Number of ports in the range; zero when reversed.
    pub fn len(&self) -> u32 {
        if self.last < self.first {
            0
        } else {
            u32::from(self.last - self.first) + 1
        }
    }

    /// Whether the range holds no port (reversed).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Placement strategy inside a pool.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Placement {
    /// Pick the host with the most free capacity (balanced load).
    #[default]
    Spread,
    /// Pick the fullest host that still fits (saves power).
    Pack,
}

/// Host counts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    /// Hosts selected by the pool.
    pub total: u32,
    /// Hosts with a fresh heartbeat, connected to libvirt and schedulable.
    pub ready: u32,
}

/// An amount of CPU, memory and desktop slots.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Amounts {
    /// vCPUs.
    pub cpu: u32,
    /// Memory as a quantity.
    pub memory: String,
    /// Desktops of the pool's reference size.
    pub desktops: u32,
}

/// SPICE port usage.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortUsage {
    /// Ports in the pool's range times ready hosts.
    pub total: u32,
    /// Ports held by desktops.
    pub used: u32,
    /// Ports another process on a host listens on: kept from desktops while the operator runs
    /// (a desktop that was given one moved to another port: `SpicePortBusy`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub taken: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Schedulable resources.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Allocatable {
    /// vCPUs after reserve and overcommit.
    pub cpu: u32,
    /// Memory after reserve and overcommit, as a quantity.
    pub memory: String,
    /// Physical CPU threads available for dedicated pinning.
    pub dedicated_cpus: u32,
}

/// Declared power state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Power {
    /// The desktop runs.
    #[default]
    On,
    /// The desktop is shut down; its disk, MAC and binding are kept.
    Off,
}

/// What the idle policy does to an idle desktop.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum IdleAction {
    /// Only report idleness.
    #[default]
    None,
    /// Save the desktop's memory to disk and free its CPU and memory.
    Suspend,
    /// ACPI shutdown, forced after a grace period.
    Shutdown,
    /// Delete the desktop; only for non-persistent desktops.
    Delete,
}

/// Lifecycle phase.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    JsonSchema,
)]
pub enum Phase {
    /// Accepted, not yet placed.
    #[default]
    Pending,
    /// Bound to a host; the host has not created the domain yet.
    Scheduled,
    /// The domain is defined and starting.
    Starting,
    /// The domain runs.
    Running,
    /// Shut down, by spec.power or by the idle policy.
    Stopped,
    /// Saved to disk by the idle policy.
    Suspended,
    /// Could not be created or started; see conditions.
    Failed,
    /// Its host stopped heartbeating; the real state is not known.
    Unknown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Scheduled => "Scheduled",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Stopped => "Stopped",
            Phase::Suspended => "Suspended",
            Phase::Failed => "Failed",
            Phase::Unknown => "Unknown",
        }
    }
}
