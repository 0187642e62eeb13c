//! The operator's Prometheus metrics: reconciles and failures per controller and error
//! category, and whether this replica leads. Labels are low-cardinality: never an object name.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub category: &'static str,
}

/// Handles to the metrics; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub reconciles: Family<ControllerLabels, Counter>,
    pub failures: Family<ErrorLabels, Counter>,
    pub leader: Gauge,
    pub bindings: Counter,
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
            "bindings",
            "Desktops bound to a host by this replica",
            m.bindings.clone(),
        );
        m
    }

    pub fn reconciled(&self, controller: &'static str) {
        self.reconciles
            .get_or_create(&ControllerLabels { controller })
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
