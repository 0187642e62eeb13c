//! The agent's Prometheus metrics (`deskvirt_agent_*`), all with low-cardinality labels: the
//! heartbeat counters, the libvirt connection gauge, domains per state, and the idle
//! reclamation gauges (SPICE sessions, suspended desktops), how long each step of a
//! Desktop pass takes, and the DesktopImage copies (bytes fetched, copies running, failures by
//! reason; never by image).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::hypervisor::{DomainState, DomainSummary};

/// Label set of `deskvirt_agent_domains`.
pub type StateLabel = [(&'static str, &'static str); 1];

/// Every value the `state` label takes.
pub const STATES: [&str; 9] = [
    "running",
    "blocked",
    "paused",
    "shutting_down",
    "shut_off",
    "crashed",
    "pm_suspended",
    "no_state",
    "unknown",
];

/// The `state` label of a domain state.
pub fn state_label(state: DomainState) -> &'static str {
    match state {
        DomainState::Running => "running",
        DomainState::Blocked => "blocked",
        DomainState::Paused => "paused",
        DomainState::ShuttingDown => "shutting_down",
        DomainState::ShutOff => "shut_off",
        DomainState::Crashed => "crashed",
        DomainState::PmSuspended => "pm_suspended",
        DomainState::NoState => "no_state",
        DomainState::Unknown => "unknown",
    }
}

/// Label set of `deskvirt_agent_pass_step_seconds`: the step.
pub type StepLabel = [(&'static str, &'static str); 1];

/// The steps of a Desktop pass, in order: the finalizer, the inputs (pool, console password,
/// binding, spec), finding the domain by UID, pinning the address, reading the domain and its
/// saved memory, carrying the plan out (disk, definition, power), and writing the status.
pub const STEPS: [&str; 7] = [
    "finalizer",
    "inputs",
    "locate",
    "address",
    "observe",
    "execute",
    "status",
];

/// How long each step of a pass took: 1 ms to about 16 s in doubling buckets.
#[derive(Clone, Debug)]
pub struct StepTimes(pub Family<StepLabel, Histogram, fn() -> Histogram>);

fn step_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Default for StepTimes {
    fn default() -> Self {
        Self(Family::new_with_constructor(step_histogram))
    }
}

impl StepTimes {
    /// Records that `step` took from `started` until now.
    pub fn record(&self, step: &'static str, started: std::time::Instant) {
        self.0
            .get_or_create(&[("step", step)])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Handles to the agent's metrics; clones share the values.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// How long each step of a Desktop pass took ([`STEPS`]).
    pub steps: StepTimes,
    /// Lease renewals that succeeded.
    pub heartbeats: Counter,
    /// Lease renewals that failed.
    pub heartbeat_failures: Counter,
    /// 1 while libvirt answers, else 0.
    pub libvirt_connected: Gauge,
    /// Domains on the host by state.
    pub domains: Family<StateLabel, Gauge>,
    /// Desktop reconciles by result (`ok`, or the error's reason).
    pub reconciles: Family<ResultLabel, Counter>,
    /// Domain starts that libvirt refused.
    pub start_failures: Counter,
    /// Domains carrying deskvirt metadata whose Desktop is not bound to this host.
    pub orphan_domains: Gauge,
    /// Desktops on this host with a SPICE client connected.
    pub spice_sessions: Gauge,
    /// deskvirt domains on this host that are suspended to disk (off, with a managed save).
    pub suspended_desktops: Gauge,
    /// Saved memory images discarded at a wake because they could not take the desktop's
    /// definition; each such desktop booted from its disk.
    pub saved_memory_discarded: Counter,
    /// Reconciles of Desktops labelled for this host that the operator has not bound here
    /// (not yet, moved away, or a label, finalizer or status set by someone else): left alone.
    pub unbound_desktops: Counter,
    /// Bytes of DesktopImage files fetched over HTTP(S).
    pub image_fetched_bytes: Counter,
    /// DesktopImage copies (fetches or checks of a file in place) running now.
    pub image_copies_active: Gauge,
    /// DesktopImage copies that failed, by reason ([`crate::images::REASONS`]).
    pub image_copy_failures: Family<ReasonLabel, Counter>,
}

/// Label set of `deskvirt_agent_image_copy_failures`: the reason.
pub type ReasonLabel = [(&'static str, &'static str); 1];

/// The `result` label of a reconcile.
pub type ResultLabel = [(&'static str, &'static str); 1];

impl Metrics {
    /// The metrics and a registry (prefix `deskvirt_agent`) holding them.
    pub fn new() -> (Self, Registry) {
        let metrics = Self::default();
        let mut registry = Registry::with_prefix("deskvirt_agent");
        registry.register(
            "heartbeat",
            "Heartbeat Lease renewals that succeeded",
            metrics.heartbeats.clone(),
        );
        registry.register(
            "heartbeat_failures",
            "Heartbeat Lease renewals that failed",
            metrics.heartbeat_failures.clone(),
        );
        registry.register(
            "libvirt_connected",
            "Whether libvirt answers (1) or not (0)",
            metrics.libvirt_connected.clone(),
        );
        registry.register(
            "domains",
            "libvirt domains on this host by state",
            metrics.domains.clone(),
        );
        registry.register(
            "desktop_reconciles",
            "Desktop reconciles by result",
            metrics.reconciles.clone(),
        );
        registry.register(
            "domain_start_failures",
            "Domain starts that libvirt refused",
            metrics.start_failures.clone(),
        );
        registry.register(
            "orphan_domains",
            "Domains with deskvirt metadata and no Desktop bound to this host (left untouched)",
            metrics.orphan_domains.clone(),
        );
        registry.register(
            "spice_sessions",
            "Desktops on this host with a SPICE client connected",
            metrics.spice_sessions.clone(),
        );
        registry.register(
            "suspended_desktops",
            "Desktops on this host suspended to disk (shut off with a managed save image)",
            metrics.suspended_desktops.clone(),
        );
        registry.register(
            "saved_memory_discarded",
            "Saved memory images discarded at a wake because they could not take the desktop's definition (the desktop booted from its disk)",
            metrics.saved_memory_discarded.clone(),
        );
        registry.register(
            "unbound_desktops",
            "Reconciles of Desktops labelled for this host that the operator has not bound here (not yet, moved away, or forged): nothing was done for them",
            metrics.unbound_desktops.clone(),
        );
        registry.register(
            "pass_step_seconds",
            "Time each step of a Desktop pass took, by step (finalizer, inputs, locate, address, observe, execute, status); a step that failed is not counted",
            metrics.steps.0.clone(),
        );
        registry.register(
            "image_fetched_bytes",
            "Bytes of DesktopImage files fetched over HTTP(S)",
            metrics.image_fetched_bytes.clone(),
        );
        registry.register(
            "image_copies_active",
            "DesktopImage copies (fetches, or checks of a file found in place) running now",
            metrics.image_copies_active.clone(),
        );
        registry.register(
            "image_copy_failures",
            "DesktopImage copies that failed, by reason",
            metrics.image_copy_failures.clone(),
        );
        for state in STATES {
            metrics.domains.get_or_create(&[("state", state)]).set(0);
        }
        for reason in crate::images::REASONS {
            let _ = metrics
                .image_copy_failures
                .get_or_create(&[("reason", reason)]);
        }
        (metrics, registry)
    }

    /// Sets the per-state gauges from a list of states (states not listed go to zero).
    pub fn set_domains(&self, states: impl IntoIterator<Item = DomainState>) {
        let mut counts = [0i64; STATES.len()];
        for state in states {
            if let Some(i) = STATES.iter().position(|s| *s == state_label(state)) {
                counts[i] += 1;
            }
        }
        for (state, count) in STATES.iter().zip(counts) {
            self.domains.get_or_create(&[("state", state)]).set(count);
        }
    }
}

/// deskvirt domains (with desktop metadata) that are off with a managed save image.
pub fn suspended_desktops(domains: &[DomainSummary]) -> i64 {
    let n = domains
        .iter()
        .filter(|d| d.identity.is_some() && !d.state.is_active() && d.has_managed_save)
        .count();
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_domain_states() -> Result<(), std::fmt::Error> {
        let (metrics, registry) = Metrics::new();
        metrics.heartbeats.inc();
        metrics.libvirt_connected.set(1);
        metrics.set_domains([
            DomainState::Running,
            DomainState::Running,
            DomainState::ShutOff,
        ]);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        assert!(out.contains("deskvirt_agent_heartbeat_total 1"), "{out}");
        assert!(out.contains("deskvirt_agent_heartbeat_failures_total 0"));
        assert!(out.contains("deskvirt_agent_libvirt_connected 1"));
        assert!(out.contains("deskvirt_agent_domains{state=\"running\"} 2"));
        assert!(out.contains("deskvirt_agent_domains{state=\"shut_off\"} 1"));
        assert!(out.contains("deskvirt_agent_domains{state=\"crashed\"} 0"));
        metrics.spice_sessions.set(2);
        metrics.suspended_desktops.set(1);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        assert!(out.contains("deskvirt_agent_spice_sessions 2"), "{out}");
        assert!(out.contains("deskvirt_agent_suspended_desktops 1"));
        assert!(out.contains("deskvirt_agent_saved_memory_discarded_total 0"));
        metrics.set_domains([]);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        assert!(out.contains("deskvirt_agent_domains{state=\"running\"} 0"));
        assert!(
            out.contains("deskvirt_agent_image_fetched_bytes_total 0"),
            "{out}"
        );
        assert!(out.contains("deskvirt_agent_image_copies_active 0"));
        assert!(
            out.contains("deskvirt_agent_image_copy_failures_total{reason=\"ChecksumMismatch\"} 0")
        );
        Ok(())
    }

    #[test]
    fn suspended_desktops_are_deskvirt_domains_off_with_a_save() {
        let domain = |name: &str, state, saved, ours: bool| DomainSummary {
            name: name.into(),
            uuid: String::new(),
            state,
            persistent: true,
            has_managed_save: saved,
            identity: ours.then(|| crate::domain::DesktopIdentity {
                namespace: "ns".into(),
                name: name.into(),
                uid: "u".into(),
                user: None,
                pool: "p".into(),
            }),
        };
        let domains = [
            domain("a", DomainState::ShutOff, true, true),
            domain("b", DomainState::ShutOff, false, true),
            domain("c", DomainState::Running, false, true),
            domain("d", DomainState::ShutOff, true, false),
        ];
        assert_eq!(suspended_desktops(&domains), 1);
    }
}
