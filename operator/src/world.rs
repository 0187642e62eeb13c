//! Pure readings of the watched objects the controllers share: which pool a host belongs to,
//! what each host's bound desktops hold, and the scheduler's view of a pool's hosts.

use std::collections::HashMap;
use std::sync::Arc;

use deskvirt_crds::{Desktop, DomainNode, ResourcePool};

use crate::allocators::Ledger;
use crate::heartbeat::Heartbeat;
use crate::scheduler::{HostView, PoolPolicy, Request, Usage};

/// The pool a host belongs to: among pools whose `nodeSelector` its labels satisfy, the oldest
/// (by creation time, then name).
pub fn pool_of(node: &DomainNode, pools: &[Arc<ResourcePool>]) -> Option<String> {
    let empty = Default::default();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    pools
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.spec
                .node_selector
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        })
        .min_by_key(|p| {
            (
                p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                p.metadata.name.clone(),
            )
        })
        .and_then(|p| p.metadata.name.clone())
}

/// The host a desktop is bound to: its status, else a binding the ledger holds but the cache
/// does not show yet.
pub fn bound_host(d: &Desktop, ledger: Option<&Ledger>) -> Option<String> {
    if let Some(n) = d.status.as_ref().and_then(|s| s.node.clone()) {
        return Some(n);
    }
    let uid = d.metadata.uid.as_deref()?;
    ledger?.port_of(uid).map(|(h, _)| h.to_string())
}

/// What the desktops bound to each host hold (those whose resources the idle policy released
/// hold nothing: [`crate::idle::holds_resources`]).
pub fn usage_by_host(desktops: &[Arc<Desktop>], ledger: Option<&Ledger>) -> HashMap<String, Usage> {
    let mut requests: HashMap<String, Vec<Request>> = HashMap::new();
    for d in desktops.iter().filter(|d| crate::idle::holds_resources(d)) {
        let (Some(host), Ok(req)) = (bound_host(d, ledger), Request::from_spec(&d.spec)) else {
            continue;
        };
        requests.entry(host).or_default().push(req);
    }
    requests
        .into_iter()
        .map(|(h, r)| (h, Usage::of(r.iter())))
        .collect()
}

/// The scheduler's view of every host `pool` owns by membership.
pub fn host_views(
    pool: &str,
    policy: &PoolPolicy,
    nodes: &[Arc<DomainNode>],
    pools: &[Arc<ResourcePool>],
    desktops: &[Arc<Desktop>],
    ledger: Option<&Ledger>,
    heartbeat: impl Fn(&str) -> Heartbeat,
) -> Vec<HostView> {
    let usage = usage_by_host(desktops, ledger);
    nodes
        .iter()
        .filter(|n| pool_of(n, pools).as_deref() == Some(pool))
        .map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            let mut v = HostView::from_domain_node(
                n,
                policy,
                heartbeat(&name).is_fresh(),
                usage.get(&name).copied().unwrap_or_default(),
                ledger.map(|l| l.ports_in_use(&name)).unwrap_or(0),
            );
            v.pool = Some(pool.to_string());
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, created: i64, sel: &[(&str, &str)]) -> Arc<ResourcePool> {
        let v = serde_json::json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
            "metadata": {"name": name, "creationTimestamp": format!("2024-01-01T00:00:{created:02}Z")},
            "spec": {"nodeSelector": sel.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>()}
        });
        Arc::new(serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}")))
    }

    fn node(labels: &[(&str, &str)]) -> DomainNode {
        let v = serde_json::json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
            "metadata": {"name": "h1", "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>()},
            "spec": {}
        });
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn oldest_matching_pool_wins() {
        let pools = vec![
            pool("young", 30, &[("zone", "a")]),
            pool("old", 10, &[("zone", "a")]),
            pool("other", 1, &[("zone", "b")]),
        ];
        assert_eq!(
            pool_of(&node(&[("zone", "a")]), &pools).as_deref(),
            Some("old")
        );
        assert_eq!(pool_of(&node(&[("zone", "c")]), &pools), None);
        let all = vec![pool("everything", 50, &[])];
        assert_eq!(pool_of(&node(&[]), &all).as_deref(), Some("everything"));
    }
}
