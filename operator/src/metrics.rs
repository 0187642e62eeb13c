//! The operator's Prometheus metrics: reconciles and failures per controller and error
//! category, whether this replica leads, and each pool's capacity, allocation, SPICE ports,
//! hosts, desktops by phase, idle desktops, what idle reclamation gave back and SPICE sessions
//! (what the chart's alerts read). Labels are low-cardinality:
//! a pool name at most, never a desktop or host name.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

/// How a migration ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub category: &'static str,
}

/// A pool and one of its resources (`cpu`, `memory` in bytes, `desktops` of the reference size).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolResource {
    pub pool: String,
    pub resource: &'static str,
}

/// A pool and a SPICE port state (`allocated`, `total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolState {
    pub pool: String,
    pub state: String,
}

/// A pool and host readiness.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolReady {
    pub pool: String,
    pub ready: &'static str,
}

/// A pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

/// A pool and a desktop phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolPhase {
    pub pool: String,
    pub phase: String,
}

/// Handles to the metrics; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub reconciles: Family<ControllerLabels, Counter>,
    pub failures: Family<ErrorLabels, Counter>,
    pub leader: Gauge,
    /// Times this replica stopped leading while running (renewal lost or fence lapsed).
    pub step_downs: Counter,
    /// Writes not sent because the leader Lease might have expired.
    pub fenced_writes: Counter,
    /// Duplicate ports or MACs repaired (the junior desktop got new ones).
    pub binding_repairs: Counter,
    /// Desktops moved off a SPICE port another process took on their host.
    pub busy_ports_moved: Counter,
    /// Live migrations made by host drains.
    pub drain_migrations: Counter,
    /// Stopped desktops bound to another host because theirs drains.
    pub drain_rebinds: Counter,
    pub bindings: Counter,
    /// DesktopMigrations ended, by outcome (Succeeded, Failed, Cancelled).
    pub migrations: Family<OutcomeLabels, Counter>,
    pub pool_capacity: Family<PoolResource, Gauge>,
    pub pool_allocated: Family<PoolResource, Gauge>,
    pub spice_ports: Family<PoolState, Gauge>,
    pub domain_nodes: Family<PoolReady, Gauge>,
    pub desktops: Family<PoolPhase, Gauge>,
    /// Desktops whose `Idle` condition is True.
    pub idle_desktops: Family<PoolLabel, Gauge>,
    /// What reclaimed desktops gave back (`cpu`, `memory_bytes`, `spice_ports`).
    pub reclaimed: Family<PoolResource, Gauge>,
    /// Desktops with a SPICE client connected.
    pub sessions: Family<PoolLabel, Gauge>,
}

impl Metrics {
    /// Registers every metric under `deskvirt_operator_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let sub = registry.sub_registry_with_prefix("deskvirt_operator");
        sub.register(
            "reconciles",
            "Reconciles run, by controller",
            m.reconciles.clone(),
        );
        sub.register(
            "reconcile_errors",
            "Reconciles that failed, by controller and error category",
            m.failures.clone(),
        );
        sub.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        sub.register(
            "leader_step_downs",
            "Times this replica stopped leading while running",
            m.step_downs.clone(),
        );
        sub.register(
            "fenced_writes",
            "Writes not sent because this replica's leader Lease might have expired",
            m.fenced_writes.clone(),
        );
        sub.register(
            "binding_repairs",
            "Duplicate SPICE ports or MACs repaired by giving the younger desktop new ones",
            m.binding_repairs.clone(),
        );
        sub.register(
            "busy_spice_ports_moved",
            "Desktops given another SPICE port because another process listened on theirs",
            m.busy_ports_moved.clone(),
        );
        sub.register(
            "drain_migrations",
            "Live DesktopMigrations made by host drains",
            m.drain_migrations.clone(),
        );
        sub.register(
            "drain_rebinds",
            "Stopped desktops bound to another host because theirs drains",
            m.drain_rebinds.clone(),
        );
        sub.register(
            "bindings",
            "Desktops bound to a host by this replica",
            m.bindings.clone(),
        );
        sub.register(
            "migrations",
            "DesktopMigrations ended, by outcome (Succeeded, Failed, Cancelled)",
            m.migrations.clone(),
        );
        sub.register(
            "pool_capacity",
            "What a pool's ready hosts offer after reserve and overcommit (cpu, memory bytes, desktops of the reference size)",
            m.pool_capacity.clone(),
        );
        sub.register(
            "pool_allocated",
            "What a pool's desktops hold (cpu, memory bytes, desktops of the reference size)",
            m.pool_allocated.clone(),
        );
        sub.register(
            "spice_ports",
            "SPICE ports of a pool by state (allocated, total)",
            m.spice_ports.clone(),
        );
        sub.register(
            "domain_nodes",
            "Hosts of a pool by readiness",
            m.domain_nodes.clone(),
        );
        sub.register(
            "desktops",
            "Desktops of a pool by phase",
            m.desktops.clone(),
        );
        sub.register(
            "idle_desktops",
            "Desktops of a pool idle past their timeout (Idle condition True)",
            m.idle_desktops.clone(),
        );
        sub.register(
            "reclaimed",
            "What a pool's reclaimed desktops gave back (cpu, memory_bytes, spice_ports)",
            m.reclaimed.clone(),
        );
        sub.register(
            "sessions",
            "Desktops of a pool with a SPICE client connected",
            m.sessions.clone(),
        );
        m
    }

    /// Publishes one pool's idle figures (leader only).
    pub fn idle(&self, pool: &str, idle: &crate::idle::PoolIdle) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let label = PoolLabel {
            pool: pool.to_string(),
        };
        self.idle_desktops
            .get_or_create(&label)
            .set(gauge(idle.idle));
        self.sessions
            .get_or_create(&label)
            .set(gauge(idle.sessions));
        for (resource, value) in [
            ("cpu", idle.cpu),
            ("memory_bytes", idle.memory_bytes),
            ("spice_ports", idle.released),
        ] {
            self.reclaimed
                .get_or_create(&PoolResource {
                    pool: pool.to_string(),
                    resource,
                })
                .set(gauge(value));
        }
    }

    /// Publishes one pool's status as gauges (leader only; a standby leaves them unset).
    pub fn pool(&self, pool: &str, st: &deskvirt_crds::resource_pool::ResourcePoolStatus) {
        let bytes = |q: &str| {
            deskvirt_crds::quantity::parse_bytes(q)
                .map(|b| i64::try_from(b).unwrap_or(i64::MAX))
                .unwrap_or(0)
        };
        for (family, amounts) in [
            (&self.pool_capacity, &st.capacity),
            (&self.pool_allocated, &st.allocated),
        ] {
            let Some(a) = amounts else { continue };
            for (resource, value) in [
                ("cpu", i64::from(a.cpu)),
                ("memory", bytes(&a.memory)),
                ("desktops", i64::from(a.desktops)),
            ] {
                family
                    .get_or_create(&PoolResource {
                        pool: pool.to_string(),
                        resource,
                    })
                    .set(value);
            }
        }
        if let Some(p) = st.ports {
            for (state, value) in [("allocated", p.used), ("total", p.total)] {
                self.spice_ports
                    .get_or_create(&PoolState {
                        pool: pool.to_string(),
                        state: state.to_string(),
                    })
                    .set(i64::from(value));
            }
        }
        if let Some(n) = st.nodes {
            for (ready, value) in [
                ("true", n.ready),
                ("false", n.total.saturating_sub(n.ready)),
            ] {
                self.domain_nodes
                    .get_or_create(&PoolReady {
                        pool: pool.to_string(),
                        ready,
                    })
                    .set(i64::from(value));
            }
        }
        for (phase, count) in &st.desktops {
            self.desktops
                .get_or_create(&PoolPhase {
                    pool: pool.to_string(),
                    phase: phase.clone(),
                })
                .set(i64::from(*count));
        }
    }

    pub fn reconciled(&self, controller: &'static str) {
        self.reconciles
            .get_or_create(&ControllerLabels { controller })
            .inc();
    }

    /// A migration ended with `outcome`.
    pub fn migration_ended(&self, outcome: &'static str) {
        self.migrations
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn failed(&self, controller: &'static str, category: &'static str) {
        self.failures
            .get_or_create(&ErrorLabels {
                controller,
                category,
            })
            .inc();
    }
}
