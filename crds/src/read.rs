//! Reads the API's objects into the core's values, once, at the edge: a pool's placement policy
//! and ledger configuration, a desktop's request, a host's report, a pool's capacity into its
//! status. The decisions themselves live in `deskvirt_core`.

use deskvirt_core::allocators::{Ledger, LedgerConfig, LedgerError, NetworkSpec};
use deskvirt_core::idle::{self, Reclaim};
use deskvirt_core::phase::Cond;
use deskvirt_core::scheduler::{
    HostFacts, HostReport, PolicyError, PolicySpec, PoolCapacity, PoolPolicy, Request, RequestError,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::constants::condition::{DOMAIN_DEFINED, LIBVIRT_CONNECTED, RUNNING};
use crate::desktop::{DesktopStatus, Reclaimed};
use crate::{DesktopSpec, DomainNode, ResourcePoolSpec, ResourcePoolStatus};

/// A core value read from a pool's spec.
pub trait FromPoolSpec: Sized {
    /// Why the spec cannot be read.
    type Error;
    /// Reads it.
    fn from_spec(spec: &ResourcePoolSpec) -> Result<Self, Self::Error>;
}

fn policy_spec(spec: &ResourcePoolSpec) -> PolicySpec<'_> {
    PolicySpec {
        reserved_cpu: spec.reserved.cpu,
        reserved_memory: &spec.reserved.memory,
        cpu_ratio: spec.overcommit.cpu,
        memory_ratio: spec.overcommit.memory,
        reference_cpu: spec.reference_size.cpu,
        reference_memory: &spec.reference_size.memory,
        placement: spec.placement,
        ports: spec.display.spice_ports,
        cpu_model: spec.cpu.model.as_deref(),
    }
}

fn network_spec(spec: &ResourcePoolSpec) -> NetworkSpec<'_> {
    NetworkSpec {
        mode: spec.network.mode,
        cidr: &spec.network.cidr,
        node_prefix_length: spec.network.node_prefix_length,
        mac_prefix: &spec.network.mac_prefix,
        ports: spec.display.spice_ports,
    }
}

impl FromPoolSpec for PoolPolicy {
    type Error = PolicyError;
    fn from_spec(spec: &ResourcePoolSpec) -> Result<Self, PolicyError> {
        PoolPolicy::read(&policy_spec(spec))
    }
}

impl FromPoolSpec for LedgerConfig {
    type Error = LedgerError;
    fn from_spec(spec: &ResourcePoolSpec) -> Result<Self, LedgerError> {
        LedgerConfig::read(&network_spec(spec))
    }
}

impl FromPoolSpec for Ledger {
    type Error = LedgerError;
    fn from_spec(spec: &ResourcePoolSpec) -> Result<Self, LedgerError> {
        Ledger::read(&network_spec(spec))
    }
}

/// A core value read from a desktop's spec.
pub trait FromDesktopSpec: Sized {
    /// Why the spec cannot be read.
    type Error;
    /// Reads it.
    fn from_spec(spec: &DesktopSpec) -> Result<Self, Self::Error>;
}

impl FromDesktopSpec for Request {
    type Error = RequestError;
    fn from_spec(spec: &DesktopSpec) -> Result<Self, RequestError> {
        admitted_size(spec, None)
    }
}

/// The vCPUs a desktop's host gives its domain: what the operator admitted
/// (`status.allocation`), else what its spec asks (bound by a release that recorded none).
pub fn admitted_cpu(spec: &DesktopSpec, status: Option<&DesktopStatus>) -> u32 {
    status
        .and_then(|s| s.allocation.as_ref())
        .map_or(spec.cpu, |a| a.cpu)
}

/// What the operator admitted for a desktop (`status.allocation`): vCPUs and memory, as
/// [`deskvirt_core::valid::ValidDesktop::admitted`] takes it.
pub fn allocation(status: Option<&DesktopStatus>) -> Option<(u32, &str)> {
    status
        .and_then(|s| s.allocation.as_ref())
        .map(|a| (a.cpu, a.memory.as_str()))
}

/// The size a desktop's host gives its domain, and the operator charges it for (before a
/// running domain's larger size, [`deskvirt_core::resize::charge`]): the vCPUs and memory the
/// operator admitted (`status.allocation`), else its spec's; dedicated CPUs and hugepages are
/// always its spec's. The one reading both binaries use (a desktop whose spec is read already
/// goes through [`crate::validation::ValidDesktop::admitted`], the same rule).
pub fn admitted_size(
    spec: &DesktopSpec,
    status: Option<&DesktopStatus>,
) -> Result<Request, RequestError> {
    let recorded = allocation(status);
    // The spec's memory is read only when nothing is recorded: a recorded size stands even
    // when the spec was edited to one that does not read.
    let mut asked = match recorded {
        Some(_) => Request::new(spec.cpu, 0),
        None => Request::read(spec.cpu, &spec.memory)?,
    };
    asked.dedicated_cpus = spec.performance.dedicated_cpus;
    asked.hugepages = spec.performance.hugepages;
    asked.admitted_as(recorded)
}

impl From<&Reclaimed> for Reclaim {
    fn from(r: &Reclaimed) -> Self {
        Reclaim {
            action: r.action,
            at: r.at.0,
            port: r.port,
        }
    }
}

impl From<Reclaim> for Reclaimed {
    fn from(r: Reclaim) -> Self {
        Reclaimed {
            action: r.action,
            at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(r.at),
            port: r.port,
        }
    }
}

/// The condition of `type_` among `conditions`, as the core reads conditions.
pub fn core_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<Cond<'a>> {
    crate::conditions::find(conditions, type_).map(|c| Cond {
        status: &c.status,
        reason: &c.reason,
        message: &c.message,
    })
}

/// The agent's `DomainDefined` and `Running` among a Desktop's conditions, for its phase
/// ([`deskvirt_core::phase`]).
pub fn agent_conditions(conditions: &[Condition]) -> (Option<Cond<'_>>, Option<Cond<'_>>) {
    (
        core_condition(conditions, DOMAIN_DEFINED),
        core_condition(conditions, RUNNING),
    )
}

/// Whether the idle policy's action is done and the host confirmed it
/// ([`deskvirt_core::idle::released`]).
pub fn released(st: &DesktopStatus) -> bool {
    idle::released(
        st.reclaimed.is_some(),
        core_condition(&st.conditions, RUNNING),
    )
}

/// What a DomainNode says of its host.
pub fn host_report(node: &DomainNode) -> HostReport {
    let status = node.status.as_ref();
    HostReport {
        name: node.metadata.name.clone().unwrap_or_default(),
        pool: status.and_then(|s| s.pool.clone()),
        facts: status.map(|s| {
            HostFacts::read(
                s.cpu.as_ref().map(|c| c.threads),
                s.memory.as_deref(),
                s.hugepages.as_ref().map(|h| (h.size.as_str(), h.total)),
            )
        }),
        unschedulable: node.spec.unschedulable || node.spec.drain,
        maintenance: node.spec.maintenance,
        libvirt_connected: status.is_none_or(|s| {
            crate::conditions::find(&s.conditions, LIBVIRT_CONNECTED)
                .is_none_or(|c| c.status != "False")
        }),
        cpu_models: status
            .and_then(|s| s.cpu.as_ref())
            .and_then(|c| c.models.clone()),
    }
}

/// Writes node counts, capacity, allocated, available and ports into a pool status, leaving its
/// other fields alone.
pub fn write_capacity(capacity: &PoolCapacity, status: &mut ResourcePoolStatus) {
    status.nodes = Some(capacity.nodes);
    status.capacity = Some(capacity.capacity.to_amounts());
    status.allocated = Some(capacity.allocated.to_amounts());
    status.available = Some(capacity.available.to_amounts());
    status.ports = Some(capacity.ports);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain_node::{CpuFacts, DomainNodeSpec, DomainNodeStatus, Hugepages};

    fn pool_spec() -> ResourcePoolSpec {
        serde_json::from_str("{}").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_cores_defaults_are_the_apis() {
        let spec = pool_spec();
        assert_eq!(policy_spec(&spec), PolicySpec::DEFAULT);
        assert_eq!(network_spec(&spec), NetworkSpec::DEFAULT);
    }

    #[test]
    fn reads_a_desktop_spec() -> Result<(), RequestError> {
        let spec = |j: serde_json::Value| -> DesktopSpec {
            serde_json::from_value(j).unwrap_or_else(|e| panic!("{e}"))
        };
        let r = Request::from_spec(&spec(
            serde_json::json!({"pool": "a", "disk": {"image": "x.qcow2"}}),
        ))?;
        assert_eq!(r, Request::new(2, 2 << 30), "defaults");
        let r = Request::from_spec(&spec(serde_json::json!({
            "pool": "a", "cpu": 8, "memory": "16Gi", "disk": {"image": "x.qcow2"},
            "performance": {"dedicatedCpus": true, "hugepages": true}
        })))?;
        assert_eq!(r, Request::new(8, 16 << 30).dedicated().with_hugepages());
        Ok(())
    }

    #[test]
    fn the_admitted_size_is_the_allocation_with_the_specs_placement_needs() {
        use crate::desktop::{Allocation, DesktopStatus};
        let spec: DesktopSpec = serde_json::from_value(serde_json::json!({
            "pool": "a", "cpu": 8, "memory": "16Gi", "disk": {"image": "x.qcow2"},
            "performance": {"dedicatedCpus": true}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let wanted = Request::new(8, 16 << 30).dedicated();
        assert_eq!(admitted_size(&spec, None), Ok(wanted));
        let mut st = DesktopStatus::default();
        assert_eq!(admitted_size(&spec, Some(&st)), Ok(wanted), "none recorded");
        st.allocation = Some(Allocation {
            pool: "a".into(),
            cpu: 2,
            memory: "4Gi".into(),
        });
        assert_eq!(
            admitted_size(&spec, Some(&st)),
            Ok(Request::new(2, 4 << 30).dedicated())
        );
        assert_eq!(admitted_cpu(&spec, Some(&st)), 2);
        if let Some(a) = st.allocation.as_mut() {
            a.memory = "4GB".into();
        }
        assert!(
            matches!(
                admitted_size(&spec, Some(&st)),
                Err(RequestError::Memory(_))
            ),
            "an unreadable allocation is not taken for the spec"
        );
    }

    #[test]
    fn reads_a_domain_node() {
        let mut node = DomainNode::new(
            "host-1",
            DomainNodeSpec {
                unschedulable: true,
                maintenance: false,
                drain: false,
            },
        );
        assert_eq!(host_report(&node).facts, None);
        node.status = Some(DomainNodeStatus {
            cpu: Some(CpuFacts {
                threads: 16,
                ..CpuFacts::default()
            }),
            memory: Some("64Gi".into()),
            hugepages: Some(Hugepages {
                size: "2Mi".into(),
                total: 1024,
                free: 512,
            }),
            pool: Some("lab".into()),
            ..DomainNodeStatus::default()
        });
        let r = host_report(&node);
        assert_eq!(r.name, "host-1");
        assert_eq!(r.pool.as_deref(), Some("lab"));
        assert!(r.unschedulable && !r.maintenance);
        node.spec.unschedulable = false;
        node.spec.drain = true;
        assert!(
            host_report(&node).unschedulable,
            "a draining host takes no new desktops"
        );
        assert_eq!(
            r.facts,
            Some(Ok(HostFacts {
                threads: 16,
                memory: 64 << 30,
                hugepages: 2 << 30
            }))
        );
    }
}
