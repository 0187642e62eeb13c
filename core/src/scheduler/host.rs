//! A host as the scheduler sees it: pool membership, health and admin flags, capacity, what its
//! bound desktops already hold, and how many SPICE ports are taken. Built by the controllers from
//! a DomainNode, its heartbeat and the ledger; the scheduler only reads it.

use std::sync::Arc;

use super::capacity::{FactsError, Free, HostCapacity, HostFacts, Usage};
use super::policy::PoolPolicy;
use super::request::Request;

/// What a host's DomainNode says of it, read once at the edge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostReport {
    /// DomainNode name.
    pub name: String,
    /// `status.pool`.
    pub pool: Option<String>,
    /// The facts of `status`; `None` before the host reported any.
    pub facts: Option<Result<HostFacts, FactsError>>,
    /// `spec.unschedulable`.
    pub unschedulable: bool,
    /// `spec.maintenance`.
    pub maintenance: bool,
    /// `LibvirtConnected` is not False: a host whose libvirt is unreachable or stalled takes
    /// no new desktop.
    pub libvirt_connected: bool,
    /// `status.cpu.models`: the named CPU models the host's hypervisor can run; `None` when
    /// the host does not say.
    pub cpu_models: Option<Vec<String>>,
}

/// One host, flattened for placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    /// DomainNode name (shared: a pool's views are built for every placement, and copying
    /// 500 names was most of it).
    pub name: Arc<str>,
    /// The pool the host belongs to (`status.pool`), if any.
    pub pool: Option<Arc<str>>,
    /// Heartbeat fresh, libvirt connected and host facts known.
    pub ready: bool,
    /// `spec.unschedulable` or `spec.drain`: cordoned or drained by an admin.
    pub unschedulable: bool,
    /// `spec.maintenance`: unschedulable and left out of pool capacity.
    pub maintenance: bool,
    /// The host cannot run the pool's pinned CPU model: it takes none of the pool's desktops
    /// and is left out of the pool's capacity.
    pub lacks_cpu_model: bool,
    /// What desktops may use after reserve and overcommit.
    pub capacity: HostCapacity,
    /// The sum of the desktops bound to the host that hold resources.
    pub allocated: Usage,
    /// SPICE ports of the pool's range held on the host, the taken ones included.
    pub ports_in_use: u32,
    /// Of those, the ports another process on the host listens on (no desktop holds them).
    pub ports_taken: u32,
}

impl HostView {
    /// A ready, schedulable, empty host of `pool`.
    pub fn new(
        name: impl Into<Arc<str>>,
        pool: impl Into<Arc<str>>,
        capacity: HostCapacity,
    ) -> Self {
        Self {
            name: name.into(),
            pool: Some(pool.into()),
            ready: true,
            unschedulable: false,
            maintenance: false,
            lacks_cpu_model: false,
            capacity,
            allocated: Usage::default(),
            ports_in_use: 0,
            ports_taken: 0,
        }
    }

    /// The view of a reported host in a pool with `policy`. `ready` is the heartbeat verdict; a
    /// host whose facts are missing or unreadable, or whose agent reports libvirt not connected,
    /// is not ready (and without facts has no capacity).
    pub fn from_report(
        report: &HostReport,
        policy: &PoolPolicy,
        ready: bool,
        allocated: Usage,
        ports_in_use: u32,
    ) -> Self {
        Self::from_owned_report(report.clone(), policy, ready, allocated, ports_in_use)
    }

    /// [`HostView::from_report`], taking the report's names rather than copying them.
    pub fn from_owned_report(
        report: HostReport,
        policy: &PoolPolicy,
        ready: bool,
        allocated: Usage,
        ports_in_use: u32,
    ) -> Self {
        let capacity = match &report.facts {
            Some(Ok(facts)) => HostCapacity::new(facts, policy),
            _ => HostCapacity::NONE,
        };
        Self {
            name: report.name.into(),
            pool: report.pool.map(Into::into),
            ready: ready && matches!(report.facts, Some(Ok(_))) && report.libvirt_connected,
            unschedulable: report.unschedulable,
            maintenance: report.maintenance,
            lacks_cpu_model: policy
                .cpu_model
                .is_some_and(|m| !m.runs_on(report.cpu_models.as_deref())),
            capacity,
            allocated,
            ports_in_use,
            ports_taken: 0,
        }
    }

    /// The same host with `allocated` held by its desktops.
    pub fn with_allocated(mut self, allocated: Usage) -> Self {
        self.allocated = allocated;
        self
    }

    /// The same host with `n` SPICE ports taken.
    pub fn with_ports_in_use(mut self, n: u32) -> Self {
        self.ports_in_use = n;
        self
    }

    /// The same host with its heartbeat lost.
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self
    }

    /// The same host cordoned.
    pub fn cordoned(mut self) -> Self {
        self.unschedulable = true;
        self
    }

    /// The same host in maintenance.
    pub fn in_maintenance(mut self) -> Self {
        self.maintenance = true;
        self
    }

    /// The same host unable to run the pool's CPU model.
    pub fn without_cpu_model(mut self) -> Self {
        self.lacks_cpu_model = true;
        self
    }

    /// Whether the host belongs to `pool`.
    pub fn in_pool(&self, pool: &str) -> bool {
        self.pool.as_deref() == Some(pool)
    }

    /// Whether new desktops may go here at all: ready, not cordoned, not in maintenance, and
    /// able to run the pool's CPU model.
    pub fn eligible(&self) -> bool {
        self.ready && !self.unschedulable && !self.maintenance && !self.lacks_cpu_model
    }

    /// What is left on the host.
    pub fn free(&self) -> Free {
        self.capacity.free(&self.allocated)
    }

    /// Records a desktop placed here with `request` and one SPICE port, so later placements in
    /// the same pass see it.
    pub fn apply(&mut self, request: &Request) {
        self.allocated = self.allocated.plus(request);
        self.ports_in_use = self.ports_in_use.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::cpu_model::CpuModel;
    use crate::scheduler::policy::PolicySpec;

    fn policy() -> PoolPolicy {
        match PoolPolicy::read(&PolicySpec::DEFAULT) {
            Ok(p) => p,
            Err(e) => panic!("default pool policy must be valid: {e}"),
        }
    }

    fn report(facts: Option<Result<HostFacts, FactsError>>) -> HostReport {
        HostReport {
            name: "host-1".into(),
            pool: Some("lab".into()),
            facts,
            unschedulable: true,
            maintenance: false,
            libvirt_connected: true,
            cpu_models: None,
        }
    }

    #[test]
    fn a_host_that_cannot_run_the_pools_cpu_model_is_not_eligible() {
        let facts = HostFacts::read(Some(9), Some("17Gi"), None);
        let mut pinned = policy();
        pinned.cpu_model = CpuModel::new("Westmere");
        let listing = |models: &[&str]| HostReport {
            unschedulable: false,
            cpu_models: Some(models.iter().map(|m| (*m).to_string()).collect()),
            ..report(Some(facts.clone()))
        };
        let view =
            |r: &HostReport, p: &PoolPolicy| HostView::from_report(r, p, true, Usage::default(), 0);
        let lacking = view(&listing(&["qemu64"]), &pinned);
        assert!(lacking.lacks_cpu_model && !lacking.eligible());
        assert!(view(&listing(&["qemu64", "Westmere"]), &pinned).eligible());
        assert!(
            view(&listing(&["qemu64"]), &policy()).eligible(),
            "no model pinned"
        );
        let silent = HostReport {
            unschedulable: false,
            ..report(Some(facts.clone()))
        };
        assert!(
            view(&silent, &pinned).eligible(),
            "a host that does not say is trusted"
        );
    }

    #[test]
    fn reads_a_report() {
        let facts = HostFacts::read(Some(9), Some("17Gi"), None);
        let h = HostView::from_report(&report(Some(facts)), &policy(), true, Usage::default(), 3);
        assert_eq!(&*h.name, "host-1");
        assert!(h.in_pool("lab"));
        assert!(h.ready);
        assert!(h.unschedulable);
        assert!(!h.eligible());
        assert_eq!(h.capacity.vcpus(), 32);
        assert_eq!(h.capacity.memory, 16 << 30);
        assert_eq!(h.ports_in_use, 3);
    }

    #[test]
    fn a_host_whose_libvirt_is_down_is_not_ready_but_keeps_its_capacity() {
        let facts = HostFacts::read(Some(9), Some("17Gi"), None);
        let up = HostView::from_report(
            &report(Some(facts.clone())),
            &policy(),
            true,
            Usage::default(),
            0,
        );
        assert!(up.ready);
        let down = HostReport {
            libvirt_connected: false,
            ..report(Some(facts))
        };
        let down = HostView::from_report(&down, &policy(), true, Usage::default(), 0);
        assert!(!down.ready);
        assert_eq!(down.capacity, up.capacity);
    }

    #[test]
    fn a_host_without_facts_is_not_ready() {
        let h = HostView::from_report(&report(None), &policy(), true, Usage::default(), 0);
        assert!(!h.ready);
        assert_eq!(h.capacity, HostCapacity::NONE);
        let bad = Some(Err(FactsError::MissingCpu));
        let empty = HostView::from_report(&report(bad), &policy(), true, Usage::default(), 0);
        assert!(!empty.ready);
    }

    #[test]
    fn apply_adds_the_request_and_a_port() {
        let mut h = HostView::new("h", "p", HostCapacity::NONE);
        h.apply(&Request::new(2, 1 << 30));
        assert_eq!(h.allocated.shared_vcpus, 2);
        assert_eq!(h.allocated.desktops, 1);
        assert_eq!(h.ports_in_use, 1);
    }
}
