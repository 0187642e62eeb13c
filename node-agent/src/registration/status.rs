//! Decides the agent's part of a DomainNode status from what libvirt reported: host facts,
//! domain counts and the `LibvirtConnected` condition. Pure; also decides whether a new report
//! differs from the last one in anything but timestamps.

use deskvirt_crds::conditions::{self, Status};
use deskvirt_crds::constants::condition::LIBVIRT_CONNECTED;
use deskvirt_crds::domain_node::{CpuFacts, DomainCounts, DomainNodeStatus, Hypervisor};
use deskvirt_crds::quantity::format_bytes;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::hypervisor::{DomainSummary, HostFacts};

/// Version reported in `status.agentVersion`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Reasons of the `LibvirtConnected` condition (a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibvirtReason {
    /// libvirt answers and reported the host facts.
    Connected,
    /// libvirt does not answer; the agent reconnects with backoff.
    Unreachable,
    /// libvirt answers but a query failed.
    QueryFailed,
}

impl LibvirtReason {
    /// CamelCase reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "Connected",
            Self::Unreachable => "Unreachable",
            Self::QueryFailed => "QueryFailed",
        }
    }
}

/// libvirt as the agent last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtHealth {
    /// Why the condition has its status.
    pub reason: LibvirtReason,
    /// Human-readable detail.
    pub message: String,
}

impl LibvirtHealth {
    /// libvirt answers.
    pub fn connected(uri: &str) -> Self {
        Self {
            reason: LibvirtReason::Connected,
            message: format!("libvirt at {uri} answers"),
        }
    }
}

/// Everything a report is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The last host facts read (kept while libvirt is down, so SSA does not drop them).
    pub facts: Option<HostFacts>,
    /// The last domain counts.
    pub domains: Option<DomainCounts>,
    /// Connection health.
    pub libvirt: LibvirtHealth,
    /// The hypervisor type domains are defined with.
    pub hypervisor: Hypervisor,
    /// Address SPICE clients use.
    pub address: String,
    /// Swap, hugepages and KSM, read with the host facts.
    pub memory: Option<crate::host_memory::HostMemory>,
    /// Where this host takes in migrations.
    pub migration: Option<deskvirt_crds::MigrationEndpoint>,
}

/// Counts defined (persistent) and running (active) domains.
pub fn count_domains(domains: &[DomainSummary]) -> DomainCounts {
    let count = |f: &dyn Fn(&DomainSummary) -> bool| {
        u32::try_from(domains.iter().filter(|d| f(d)).count()).unwrap_or(u32::MAX)
    };
    DomainCounts {
        defined: count(&|d| d.persistent),
        running: count(&|d| d.state.is_active()),
    }
}

/// The CPU facts of the status.
pub fn cpu_facts(facts: &HostFacts) -> CpuFacts {
    CpuFacts {
        model: Some(facts.cpu_model.clone()).filter(|m| !m.is_empty()),
        sockets: facts.sockets,
        cores: facts.cores_per_socket,
        threads: facts.cpus,
        mhz: facts.mhz,
        models: facts.cpu_models.clone(),
    }
}

/// The agent-owned fields of the status. `previous` are the conditions currently on the
/// object (to keep `lastTransitionTime` while the status is unchanged).
pub fn agent_status(
    observation: &Observation,
    previous: &[Condition],
    now: Timestamp,
) -> DomainNodeStatus {
    let facts = observation.facts.as_ref();
    let up = observation.libvirt.reason == LibvirtReason::Connected;
    let condition = conditions::condition(
        previous,
        LIBVIRT_CONNECTED,
        Status::from_bool(up),
        observation.libvirt.reason.as_str(),
        observation.libvirt.message.clone(),
        None,
        now,
    );
    DomainNodeStatus {
        address: Some(observation.address.clone()),
        migration: observation.migration.clone(),
        cpu: facts.map(cpu_facts),
        memory: facts.map(|f| format_bytes(f.memory_bytes)),
        swap: observation.memory.as_ref().and_then(|m| m.swap.clone()),
        hugepages: observation
            .memory
            .as_ref()
            .and_then(|m| m.hugepages.clone()),
        ksm: observation.memory.as_ref().and_then(|m| m.ksm.clone()),
        max_vcpus: facts.map(|f| f.max_vcpus),
        hypervisor: Some(observation.hypervisor),
        libvirt_version: facts.map(|f| f.libvirt_version.clone()),
        hypervisor_version: facts.map(|f| f.hypervisor_version.clone()),
        domains: observation.domains,
        agent_version: Some(AGENT_VERSION.to_string()),
        last_report_time: Some(Time(now)),
        conditions: vec![condition],
        ..DomainNodeStatus::default()
    }
}

/// The agent-owned part of a status read from the server (to notice fields changed or removed
/// by someone else).
pub fn agent_part(status: &DomainNodeStatus) -> DomainNodeStatus {
    DomainNodeStatus {
        address: status.address.clone(),
        migration: status.migration.clone(),
        cpu: status.cpu.clone(),
        memory: status.memory.clone(),
        swap: status.swap.clone(),
        hugepages: status.hugepages.clone(),
        ksm: status.ksm.clone(),
        max_vcpus: status.max_vcpus,
        hypervisor: status.hypervisor,
        libvirt_version: status.libvirt_version.clone(),
        hypervisor_version: status.hypervisor_version.clone(),
        domains: status.domains,
        agent_version: status.agent_version.clone(),
        last_report_time: status.last_report_time.clone(),
        conditions: status
            .conditions
            .iter()
            .filter(|c| c.type_ == LIBVIRT_CONNECTED)
            .cloned()
            .collect(),
        ..DomainNodeStatus::default()
    }
}

/// Whether two reports differ in anything but `lastReportTime` and condition timestamps.
pub fn differs(a: &DomainNodeStatus, b: &DomainNodeStatus) -> bool {
    let strip = |s: &DomainNodeStatus| DomainNodeStatus {
        last_report_time: None,
        conditions: Vec::new(),
        ..s.clone()
    };
    strip(a) != strip(b) || conditions::differ_ignoring_time(&a.conditions, &b.conditions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::DomainState;

    fn facts() -> HostFacts {
        HostFacts {
            hostname: "h".into(),
            cpu_model: "i686".into(),
            cpu_models: Some(vec!["qemu64".into()]),
            numa_nodes: 2,
            sockets: 4,
            cores_per_socket: 2,
            threads_per_core: 2,
            cpus: 16,
            mhz: 1400,
            memory_bytes: 3 << 30,
            max_vcpus: 32,
            driver: "TEST".into(),
            hypervisor_version: "0.0.2".into(),
            libvirt_version: "9.0.0".into(),
        }
    }

    fn observation(up: bool) -> Observation {
        Observation {
            migration: None,
            facts: Some(facts()),
            domains: Some(DomainCounts {
                defined: 1,
                running: 1,
            }),
            libvirt: if up {
                LibvirtHealth::connected("test:///default")
            } else {
                LibvirtHealth {
                    reason: LibvirtReason::Unreachable,
                    message: "down".into(),
                }
            },
            hypervisor: Hypervisor::Qemu,
            address: "10.0.0.1".into(),
            memory: Some(crate::host_memory::HostMemory {
                swap: Some("0".into()),
                hugepages: None,
                ksm: None,
            }),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn facts_become_status_fields() {
        let s = agent_status(&observation(true), &[], at(10));
        let cpu = s.cpu.clone().unwrap_or_default();
        assert_eq!(cpu.model.as_deref(), Some("i686"));
        assert_eq!(
            (cpu.sockets, cpu.cores, cpu.threads, cpu.mhz),
            (4, 2, 16, 1400)
        );
        assert_eq!(s.memory.as_deref(), Some("3Gi"));
        assert_eq!(s.max_vcpus, Some(32));
        assert_eq!(s.hypervisor, Some(Hypervisor::Qemu));
        assert_eq!(s.libvirt_version.as_deref(), Some("9.0.0"));
        assert_eq!(s.agent_version.as_deref(), Some(AGENT_VERSION));
        assert!(conditions::is_true(&s.conditions, LIBVIRT_CONNECTED));
        assert!(
            s.pool.is_none() && s.allocatable.is_none(),
            "operator fields untouched"
        );
    }

    #[test]
    fn only_timestamps_changed_is_not_a_difference() {
        let a = agent_status(&observation(true), &[], at(10));
        let b = agent_status(&observation(true), &[], at(20));
        assert!(!differs(&a, &b));
        let down = agent_status(&observation(false), &a.conditions, at(30));
        assert!(differs(&a, &down));
        assert_eq!(
            conditions::find(&down.conditions, LIBVIRT_CONNECTED).map(|c| c.reason.as_str()),
            Some("Unreachable")
        );
        let mut more = observation(true);
        more.domains = Some(DomainCounts {
            defined: 2,
            running: 1,
        });
        assert!(differs(&a, &agent_status(&more, &[], at(10))));
    }

    #[test]
    fn operator_fields_are_not_part_of_the_report() {
        let ours = agent_status(&observation(true), &[], at(10));
        let mut server = ours.clone();
        server.pool = Some("p".into());
        server.subnet = Some("10.0.0.0/24".into());
        server.conditions.push(conditions::condition(
            &[],
            "Ready",
            Status::True,
            "HeartbeatFresh",
            "",
            None,
            at(11),
        ));
        assert!(!differs(&ours, &agent_part(&server)));
        server.memory = None;
        assert!(differs(&ours, &agent_part(&server)));
    }

    #[test]
    fn transition_time_kept_while_connected() {
        let a = agent_status(&observation(true), &[], at(10));
        let b = agent_status(&observation(true), &a.conditions, at(20));
        assert_eq!(
            a.conditions[0].last_transition_time,
            b.conditions[0].last_transition_time
        );
    }

    #[test]
    fn counts_defined_and_running() {
        let d = |state, persistent| DomainSummary {
            name: "x".into(),
            uuid: "u".into(),
            state,
            persistent,
            has_managed_save: false,
            identity: None,
        };
        let counts = count_domains(&[
            d(DomainState::Running, true),
            d(DomainState::ShutOff, true),
            d(DomainState::Paused, false),
        ]);
        assert_eq!(
            counts,
            DomainCounts {
                defined: 2,
                running: 2
            }
        );
    }
}
