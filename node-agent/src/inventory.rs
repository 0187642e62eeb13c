//! Keeps the DomainNode up to date: polls libvirt (connection and domain counts) every few
//! seconds, re-reads host facts periodically and whenever the connection changes, and applies
//! the agent's status only when it differs in more than timestamps (or has gone stale; a change
//! of the domain counts alone at once after a quiet period, then at most every 30 s). Never
//! changes any domain. Every libvirt and API call of a round has a deadline, so a round always
//! ends and ticks the loop's liveness beat, even while libvirt hangs.

use std::time::Duration;

use deskvirt_crds::domain_node::{DomainCounts, Hypervisor as DomainType};
use deskvirt_crds::{DomainNode, DomainNodeStatus};
use deskvirt_runtime::health::Beat;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use tokio::time::{Instant, MissedTickBehavior};

use crate::agent::error_chain;
use crate::hypervisor::Hypervisor;
use crate::metrics::Metrics;
use crate::registration::status::{
    LibvirtHealth, LibvirtReason, Observation, agent_part, agent_status, count_domains, differs,
};
use crate::registration::{Owner, Registrar};

/// How often libvirt is polled for its connection state and domain counts.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// A report is re-applied at least this often, even when nothing changed.
pub const MAX_REPORT_AGE: Duration = Duration::from_secs(600);
/// A change of the domain counts alone is applied at most once per this period (the first one
/// after a quiet period at once, so the first desktop on a host shows): they change with every
/// domain started or stopped (40 in a minute when a class begins), nothing decides on them, and
/// each write of the host's status is one more API call and one more watch event for every
/// watcher of hosts.
pub const COUNTS_EVERY: Duration = Duration::from_secs(30);

/// What the inventory loop reports.
#[derive(Debug, Clone)]
pub struct InventoryConfig {
    /// libvirt URI (for messages).
    pub libvirt_uri: String,
    /// Hypervisor type of the domains.
    pub domain_type: DomainType,
    /// Address SPICE clients use.
    pub address: String,
    /// Where this host takes in migrations (`--migration-uri`); published once `inbound`
    /// says the host is ready for them.
    pub migration: Option<deskvirt_crds::MigrationEndpoint>,
    /// Whether the host is ready to take in migrations (its pool's network is defined).
    pub inbound: tokio::sync::watch::Receiver<bool>,
    /// Period of the full facts refresh.
    pub refresh_interval: Duration,
    /// Period of the libvirt poll.
    pub poll_interval: Duration,
}

/// State of the loop between ticks.
#[derive(Debug)]
struct State {
    facts_due: Instant,
    last_connected: Option<bool>,
    observation: Observation,
    /// The owner applied on the object last; `None` until the object was applied once.
    applied_owner: Option<Option<Owner>>,
    owner_checked: Option<Instant>,
    /// Conditions on the server (read at each check, then what was applied).
    conditions: Vec<Condition>,
    published: Option<(DomainNodeStatus, Instant)>,
    /// When a change of the domain counts alone was last written.
    counts_written: Option<Instant>,
}

/// Runs until the future is dropped. `on_libvirt` is told the connection state after each
/// poll; `beat` ticks after each round.
pub async fn run<H: Hypervisor>(
    hypervisor: &H,
    registrar: &Registrar,
    config: InventoryConfig,
    metrics: &Metrics,
    on_libvirt: impl Fn(bool),
    beat: Beat,
) {
    let mut state = State {
        facts_due: Instant::now(),
        last_connected: None,
        observation: Observation {
            facts: None,
            domains: None,
            libvirt: LibvirtHealth {
                reason: LibvirtReason::Unreachable,
                message: format!("not yet connected to {}", config.libvirt_uri),
            },
            hypervisor: config.domain_type,
            address: config.address.clone(),
            memory: None,
            migration: None,
        },
        applied_owner: None,
        owner_checked: None,
        conditions: Vec::new(),
        published: None,
        counts_written: None,
    };
    let mut ticker = tokio::time::interval(config.poll_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        observe(hypervisor, &config, metrics, &mut state).await;
        state.observation.migration = config
            .migration
            .clone()
            .filter(|_| *config.inbound.borrow());
        on_libvirt(state.last_connected == Some(true));
        if let Err(e) = publish(registrar, &config, &mut state).await {
            tracing::warn!(error = %error_chain(&e), category = e.category(), "cannot report host status; retrying");
        }
        beat.tick();
    }
}

/// Polls libvirt and updates the observation.
async fn observe<H: Hypervisor>(
    hypervisor: &H,
    config: &InventoryConfig,
    metrics: &Metrics,
    state: &mut State,
) {
    let connected = hypervisor.probe().await;
    metrics.libvirt_connected.set(i64::from(connected));
    let changed = state.last_connected != Some(connected);
    if changed {
        if connected {
            tracing::info!(uri = %config.libvirt_uri, "libvirt connected");
        } else {
            tracing::warn!(uri = %config.libvirt_uri, "libvirt not connected");
        }
    }
    state.last_connected = Some(connected);
    if !connected {
        state.observation.libvirt = LibvirtHealth {
            reason: LibvirtReason::Unreachable,
            message: format!(
                "libvirt at {} does not answer (not connected, or a call missed its deadline); retrying",
                config.libvirt_uri
            ),
        };
        return;
    }
    let mut failure = None;
    match hypervisor.list_domains().await {
        Ok(domains) => {
            metrics.set_domains(domains.iter().map(|d| d.state));
            metrics
                .suspended_desktops
                .set(crate::metrics::suspended_desktops(&domains));
            let counts: DomainCounts = count_domains(&domains);
            state.observation.domains = Some(counts);
        }
        Err(e) => failure = Some(e),
    }
    if changed || Instant::now() >= state.facts_due {
        match hypervisor.host_facts(config.domain_type).await {
            Ok(facts) => {
                state.observation.facts = Some(facts);
                state.observation.memory = Some(crate::host_memory::read());
                state.facts_due = Instant::now() + config.refresh_interval;
            }
            Err(e) => failure = Some(e),
        }
    }
    state.observation.libvirt = match failure {
        None => LibvirtHealth::connected(&config.libvirt_uri),
        Some(e) if !hypervisor.is_connected() => LibvirtHealth {
            reason: LibvirtReason::Unreachable,
            message: e.to_string(),
        },
        Some(e) => LibvirtHealth {
            reason: LibvirtReason::QueryFailed,
            message: e.to_string(),
        },
    };
}

/// Makes sure the object exists with the right owner, then applies the status if it changed.
async fn publish(
    registrar: &Registrar,
    config: &InventoryConfig,
    state: &mut State,
) -> Result<(), crate::registration::RegistrationError> {
    let now = Instant::now();
    let check_due = state
        .owner_checked
        .is_none_or(|t| now.duration_since(t) >= config.refresh_interval);
    if check_due || state.applied_owner.is_none() {
        let owner = registrar.owner().await?;
        let current = registrar.current().await?;
        state.owner_checked = Some(now);
        let needs_apply = match &current {
            None => {
                if state.applied_owner.is_some() {
                    tracing::warn!("DomainNode is gone; registering again");
                }
                state.published = None;
                true
            }
            Some(dn) => {
                let server = dn.status.clone().unwrap_or_default();
                state.conditions = server.conditions.clone();
                if let Some((last, _)) = &state.published
                    && differs(last, &agent_part(&server))
                {
                    tracing::info!(
                        "host status on the server differs from the last report; re-applying"
                    );
                    state.published = None;
                }
                state.applied_owner.as_ref() != Some(&owner) || !has_owner(dn, owner.as_ref())
            }
        };
        if needs_apply {
            registrar.apply_domain_node(owner.as_ref()).await?;
            tracing::info!(owner = ?owner.as_ref().map(|o| &o.name), "DomainNode registered");
        }
        state.applied_owner = Some(owner);
    }
    let status = agent_status(&state.observation, &state.conditions, Timestamp::now());
    let last = state
        .published
        .as_ref()
        .map(|(last, at)| (last, now.duration_since(*at)));
    let counts_age = state.counts_written.map(|at| now.duration_since(at));
    if !report_due(last, counts_age, &status) {
        return Ok(());
    }
    let counts_only = last.is_some_and(|(last, _)| counts_alone(last, &status));
    match registrar.apply_status(&status).await {
        Err(e) if e.is_not_found() => {
            // Deleted under us: register again at the next tick.
            state.applied_owner = None;
            Err(e)
        }
        Err(e) => Err(e),
        Ok(()) => {
            tracing::debug!(domains = ?status.domains, "host status reported");
            state.conditions = status.conditions.clone();
            if counts_only {
                state.counts_written = Some(now);
            }
            state.published = Some((status, now));
            Ok(())
        }
    }
}

/// Whether `status` is to be applied, over `last` applied that long ago (`None`: nothing applied
/// yet): when anything but the timestamps changed, except a change of the domain counts alone,
/// which goes at once only when no such change was written in the last [`COUNTS_EVERY`]
/// (`counts_age`: since the last one; `None`: never) and waits for that otherwise; and every
/// [`MAX_REPORT_AGE`] in any case. So the first desktop to start on a quiet host shows in
/// `kubectl get domainnodes` at once, and a burst costs one write per period.
fn report_due(
    last: Option<(&DomainNodeStatus, Duration)>,
    counts_age: Option<Duration>,
    status: &DomainNodeStatus,
) -> bool {
    let Some((last, age)) = last else {
        return true;
    };
    if age >= MAX_REPORT_AGE {
        return true;
    }
    if !differs(last, status) {
        return false;
    }
    !counts_alone(last, status) || counts_age.is_none_or(|a| a >= COUNTS_EVERY)
}

/// Whether `status` differs from `last` in the domain counts and in nothing else.
fn counts_alone(last: &DomainNodeStatus, status: &DomainNodeStatus) -> bool {
    let counts_as_before = DomainNodeStatus {
        domains: last.domains,
        ..status.clone()
    };
    differs(last, status) && !differs(last, &counts_as_before)
}

/// Whether the object carries the owner reference to `owner` (trivially true without one).
fn has_owner(dn: &DomainNode, owner: Option<&Owner>) -> bool {
    owner.is_none_or(|o| {
        dn.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.uid == o.uid && r.kind == "Node")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(running: u32) -> DomainNodeStatus {
        DomainNodeStatus {
            memory: Some("8Gi".into()),
            domains: Some(DomainCounts {
                defined: running,
                running,
            }),
            ..DomainNodeStatus::default()
        }
    }

    #[test]
    fn a_change_of_the_domain_counts_alone_waits_for_its_period() {
        let s = Duration::from_secs;
        assert!(report_due(None, None, &counted(0)), "the first report");
        let last = counted(1);
        assert!(
            !report_due(Some((&last, s(1))), None, &counted(1)),
            "nothing new"
        );
        // The first change of the counts alone on a quiet host goes at once.
        assert!(
            report_due(Some((&last, s(5))), None, &counted(2)),
            "counts alone, the first"
        );
        assert!(
            report_due(Some((&last, s(5))), Some(COUNTS_EVERY), &counted(2)),
            "counts alone, the last such write a period ago"
        );
        assert!(
            !report_due(Some((&last, s(5))), Some(s(5)), &counted(2)),
            "counts alone, soon after another"
        );
        // Anything else goes at once, with the counts it has.
        let mut facts = counted(2);
        facts.memory = Some("16Gi".into());
        assert!(report_due(Some((&last, s(1))), Some(s(1)), &facts));
        assert!(!counts_alone(&last, &facts));
        assert!(counts_alone(&last, &counted(2)));
        let mut stamped = counted(1);
        stamped.last_report_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::UNIX_EPOCH,
        ));
        assert!(
            !report_due(Some((&last, s(1))), None, &stamped),
            "a timestamp alone"
        );
        assert!(
            report_due(Some((&last, MAX_REPORT_AGE)), Some(s(1)), &counted(1)),
            "too old"
        );
    }
}
