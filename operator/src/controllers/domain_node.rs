//! The DomainNode controller: pool membership, the host's subnet from the pool's ledger,
//! allocatable after reserve and overcommit, and the `Ready` (heartbeat) and `Schedulable`
//! conditions. Writes only the operator's fields of the status; the agent's facts stay its own.

use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::{READY, SCHEDULABLE};
use deskvirt_crds::domain_node::{Allocatable, DomainNode, DomainNodeStatus};
use deskvirt_crds::read::{FromPoolSpec, host_report};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::desktop::triggers::key_without;
use super::{
    Categorized, StatusApply, apply_status, drive, kube_transient, on_leadership, watch_config,
};
use crate::allocators::LedgerError;
use crate::context::{Context, stopped};
use crate::heartbeat::Heartbeat;
use crate::scheduler::{HostCapacity, PoolPolicy};
use crate::world::{orphans_by_host, pool_of};

const NAME: &str = "domainnode";

/// Why a DomainNode reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot apply host status")]
    Apply(#[source] kube::Error),
}

impl Categorized for Error {
    fn category(&self) -> &'static str {
        "KubeApi"
    }
    fn is_transient(&self) -> bool {
        match self {
            Error::Apply(e) => kube_transient(e),
        }
    }
}

pub async fn run(ctx: Arc<Context>, selector: String, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let cfg = watch_config(&selector);
    let stores = ctx.stores.clone();
    let pool_stores = ctx.stores.clone();
    let controller = deskvirt_runtime::cache::controller_keyed_throttled(
        Api::<DomainNode>::all(client.clone()),
        cfg.clone(),
        node_key,
        HOST_WAKES,
    )
    .watches(
        Api::<Lease>::namespaced(client.clone(), &ctx.namespace),
        watcher::Config::default(),
        move |lease| {
            // A renewal of a Ready host's heartbeat changes nothing the pass decides: its pass
            // is already due when the Lease it read expires. A host shown not Ready is woken
            // at once, so its recovery shows without waiting for that.
            stores
                .node(&lease.name_any())
                .filter(|n| !shown_ready(n))
                .map(|n| ObjectRef::from_obj(n.as_ref()))
        },
    )
    .watches_stream(
        // A host reads a pool's spec (membership, reserve, overcommit, network) and
        // whether it is going away, never its status: the pool's status writes, one
        // per desktop phase change, wake no host.
        // From the pools' cache once it shows the change: the pass reads the pool there.
        ctx.stores.pool_changes.stream_by_key(|p| {
            let m = &p.metadata;
            (
                m.generation,
                m.deletion_timestamp.is_some(),
                m.creation_timestamp.clone(),
            )
        }),
        move |_pool| {
            // Membership may move: every host is looked at again (pools change rarely).
            pool_stores
                .nodes
                .state()
                .iter()
                .map(|n| ObjectRef::from_obj(n.as_ref()))
                .collect::<Vec<_>>()
        },
    )
    .reconcile_on(pinned_wakes(&ctx))
    .reconcile_all_on(on_leadership(ctx.leader.clone()))
    .graceful_shutdown_on(stopped(stop.clone()))
    .run(
        reconcile,
        |n, e, c| super::error_policy(NAME, &n, e, &c),
        ctx,
    );
    drive(NAME, controller, stop).await;
}

/// At most one pass per host per this window for changes of the host itself (the agent's
/// facts and orphans, the admin's spec) and of its pinned CPUs: the first change of a burst
/// passes at once, the latest at the window's end. Placement never reads what this pass writes (it counts the
/// charge index), so only the shown allocatable lags, by at most this.
const HOST_WAKES: Duration = Duration::from_secs(2);

/// The hosts whose free threads for pinning may have changed (a desktop with dedicated CPUs
/// bound, moved, resized or gone: [`crate::charges::Charges::pinned_changes`]), paced as the
/// host's own changes are. The host's object does not change with them, so without this its
/// `allocatable.dedicatedCpus` would wait for the next pass.
fn pinned_wakes(
    ctx: &Context,
) -> impl futures::Stream<Item = ObjectRef<DomainNode>> + Send + 'static {
    use futures::StreamExt;
    let hosts = futures::stream::unfold(ctx.stores.charges.pinned_changes(), |mut rx| async {
        rx.recv()
            .await
            .map(|h| (Ok::<_, std::convert::Infallible>(h), rx))
    });
    deskvirt_runtime::throttle::throttled(hosts, HOST_WAKES, String::clone)
        .filter_map(|h| futures::future::ready(h.ok()))
        .map(|h| ObjectRef::new(&h))
}

/// Whether the host's status shows `Ready=True`.
fn shown_ready(n: &DomainNode) -> bool {
    n.status
        .as_ref()
        .is_some_and(|s| deskvirt_crds::conditions::is_true(&s.conditions, READY))
}

/// A host as its own pass cares, hashed: all of it but what the operator writes itself (the
/// pool, subnet and allocatable, `Ready` and `Schedulable`: the pass that wrote them acted on
/// what it knew) and the agent's domain counts and report time, which the pass never reads
/// (the charges come from the desktops; the agent rewrites its counts after each domain it
/// starts or stops). Anyone else's change of the operator's fields is set right by the host's
/// next pass: at its heartbeat Lease's expiry at the latest, or at once for a host not shown
/// Ready.
fn node_key(n: &DomainNode) -> Option<u64> {
    let v = serde_json::to_value(n).ok()?;
    Some(key_without(
        v,
        &["pool", "subnet", "allocatable", "domains", "lastReportTime"],
        &[READY, SCHEDULABLE],
    ))
}

/// The operator's part of a host status.
#[derive(Clone, Debug, PartialEq)]
struct Owned {
    pool: Option<String>,
    subnet: Option<String>,
    allocatable: Option<Allocatable>,
    conditions: Vec<Condition>,
}

#[tracing::instrument(skip_all, fields(node = %node.name_any()))]
pub async fn reconcile(node: Arc<DomainNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _busy = ctx.reconciles.nodes.begin();
    ctx.metrics.reconciled(NAME);
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();
    let name = node.name_any();
    let status = node.status.clone().unwrap_or_default();
    let pools = ctx.stores.pools.state();
    let pool_name = pool_of(&node, &pools);
    let pool = pool_name.as_deref().and_then(|p| ctx.stores.pool(p));
    let heartbeat = ctx.heartbeat(&name, now);

    let mut ledgers = ctx.ledgers.lock().await;
    // Subnets are allocations: decided and written only while the Lease holds (`crate::fence`).
    if !ledgers.ready || ctx.fence.check().is_err() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if let Some(old) = status.pool.as_deref()
        && Some(old) != pool_name.as_deref()
        && let Some(l) = ledgers.get_mut(old)
    {
        l.release_host(&name);
    }
    let mut subnet = None;
    let mut refused = Vec::new();
    if let (Some(p), Some(pn)) = (&pool, pool_name.as_deref())
        && ledgers.of(p, &ctx.stores).is_ok()
    {
        let desktops = ctx.stores.desktops.state();
        let this = [node.clone()];
        let orphans: Vec<_> = orphans_by_host(&this, &desktops)
            .into_iter()
            .map(|(_, o)| o)
            .collect();
        refused = ledgers.sync_orphans(pn, &name, &orphans);
    }
    if let Some(p) = &pool {
        match ledgers.of(p, &ctx.stores) {
            Ok(l) => match l.assign_subnet(&name) {
                Ok(s) => subnet = Some(s.to_string()),
                Err(LedgerError::NoSubnets) => {}
                Err(e) => tracing::warn!(error = %e, "no subnet for the host"),
            },
            Err(e) => tracing::warn!(error = %e, "pool ledger unusable"),
        }
    }
    let policy = pool
        .as_ref()
        .and_then(|p| PoolPolicy::from_spec(&p.spec).ok());
    let facts = host_report(&node).facts.and_then(Result::ok);
    let allocatable = match (&policy, &facts) {
        (Some(policy), Some(facts)) => {
            let orphans = node.status.as_ref().map_or(&[][..], |s| &s.orphans[..]);
            let usage = ctx.stores.charges(&mut ledgers).on(&name, orphans);
            Some(HostCapacity::new(facts, policy).allocatable(&usage))
        }
        _ => None,
    };
    drop(ledgers);
    for why in refused {
        tracing::warn!(host = %name, %why, "orphan domain's port or MAC is held by a desktop");
        ctx.event(
            node.as_ref(),
            EventType::Warning,
            "OrphanConflict",
            "Account",
            why,
        )
        .await;
    }

    let prev = &status.conditions;
    let gen_ = node.metadata.generation;
    let ready = match heartbeat {
        Heartbeat::Fresh { .. } => condition(
            prev,
            READY,
            Status::True,
            "HeartbeatFresh",
            "the agent renews its Lease",
            gen_,
            now,
        ),
        Heartbeat::Lost { since } => condition(
            prev,
            READY,
            Status::Unknown,
            "HeartbeatLost",
            format!("no heartbeat since {since}"),
            gen_,
            now,
        ),
        Heartbeat::Missing => condition(
            prev,
            READY,
            Status::Unknown,
            "NoHeartbeat",
            format!("no heartbeat Lease {}/{name}", ctx.namespace),
            gen_,
            now,
        ),
    };
    let (sched, reason, msg) = if node.spec.maintenance {
        (false, "Maintenance", "the host is in maintenance")
    } else if node.spec.drain {
        (
            false,
            "Draining",
            "spec.drain is set: the host's desktops move to other hosts",
        )
    } else if node.spec.unschedulable {
        (false, "Cordoned", "spec.unschedulable is set")
    } else if !heartbeat.is_fresh() {
        (false, "NotReady", "the host's heartbeat is not fresh")
    } else if !host_report(&node).libvirt_connected {
        (
            false,
            "LibvirtDisconnected",
            "the agent reports libvirt unreachable or not answering",
        )
    } else if pool.is_none() {
        (false, "NoPool", "no ResourcePool selects the host")
    } else if facts.is_none() {
        (
            false,
            "NoHostFacts",
            "the agent has not reported CPU and memory",
        )
    } else {
        (true, "Schedulable", "desktops may be placed on the host")
    };
    let schedulable = condition(
        prev,
        SCHEDULABLE,
        Status::from_bool(sched),
        reason,
        msg,
        gen_,
        now,
    );
    let want = Owned {
        pool: pool_name,
        subnet,
        allocatable,
        conditions: vec![ready.clone(), schedulable],
    };
    let current = Owned {
        pool: status.pool.clone(),
        subnet: status.subnet.clone(),
        allocatable: status.allocatable.clone(),
        conditions: prev
            .iter()
            .filter(|c| c.type_ == READY || c.type_ == SCHEDULABLE)
            .cloned()
            .collect(),
    };
    let changed = want.pool != current.pool
        || want.subnet != current.subnet
        || want.allocatable != current.allocatable
        || conditions::differ_ignoring_time(&want.conditions, &current.conditions);
    if changed {
        // The operator's fields only; the agent owns the rest.
        let st = DomainNodeStatus {
            pool: want.pool,
            subnet: want.subnet,
            allocatable: want.allocatable,
            conditions: want.conditions,
            ..DomainNodeStatus::default()
        };
        let body = StatusApply::new::<DomainNode>(&name, None, st);
        if ctx.fence.check().is_err() {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        apply_status(&Api::<DomainNode>::all(ctx.client.clone()), &body)
            .await
            .map_err(Error::Apply)?;
    }
    let was = conditions::find(prev, READY).map(|c| c.status.clone());
    if was.as_deref() != Some(ready.status.as_str()) {
        let (t, r) = if heartbeat.is_fresh() {
            (EventType::Normal, "HostReady")
        } else {
            (EventType::Warning, "HostLost")
        };
        ctx.event(node.as_ref(), t, r, "Heartbeat", ready.message.clone())
            .await;
    }
    ctx.succeeded(&format!("{NAME}/{}", node.uid().unwrap_or_default()));
    let next = heartbeat
        .expires_in(now)
        .map(|d| d + Duration::from_secs(1))
        .unwrap_or(Duration::from_secs(60));
    Ok(Action::requeue(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(status: serde_json::Value) -> DomainNode {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
            "metadata": { "name": "h", "resourceVersion": "1" },
            "spec": {}, "status": status
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn cond(type_: &str, status: &str) -> serde_json::Value {
        serde_json::json!({ "type": type_, "status": status, "reason": "R", "message": "m",
                            "lastTransitionTime": "2026-01-01T00:00:00Z" })
    }

    #[test]
    fn a_hosts_own_pass_wakes_on_what_others_write_only() {
        let base = node(serde_json::json!({
            "memory": "8Gi", "conditions": [cond("LibvirtConnected", "True")] }));
        // What the operator writes itself: no pass.
        let own = node(serde_json::json!({
            "memory": "8Gi", "pool": "lab", "subnet": "10.0.1.0/24",
            "allocatable": { "cpu": 4, "memory": "6Gi", "dedicatedCpus": 3 },
            "conditions": [cond("LibvirtConnected", "True"), cond(READY, "True"),
                           cond(SCHEDULABLE, "True")] }));
        assert_eq!(node_key(&base), node_key(&own));
        let mut newer = own.clone();
        newer.metadata.resource_version = Some("2".into());
        assert_eq!(node_key(&own), node_key(&newer), "the version alone");
        // The agent's domain counts and report time: the pass reads neither.
        let counted = node(serde_json::json!({
            "memory": "8Gi", "domains": { "defined": 3, "running": 2 },
            "lastReportTime": "2026-01-01T00:00:05Z",
            "conditions": [cond("LibvirtConnected", "True")] }));
        assert_eq!(node_key(&base), node_key(&counted), "domain counts");
        // The agent's report and the admin's spec: a pass.
        let report = node(serde_json::json!({
            "memory": "16Gi", "conditions": [cond("LibvirtConnected", "True")] }));
        assert_ne!(node_key(&base), node_key(&report));
        let libvirt = node(serde_json::json!({
            "memory": "8Gi", "conditions": [cond("LibvirtConnected", "False")] }));
        assert_ne!(node_key(&base), node_key(&libvirt));
        let mut cordoned = base.clone();
        cordoned.spec.unschedulable = true;
        assert_ne!(node_key(&base), node_key(&cordoned));
    }
}
