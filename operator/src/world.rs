//! Pure readings of the watched objects the controllers share: which pool a host belongs to,
//! what each host's bound desktops and orphan domains hold, and the scheduler's view of a
//! pool's hosts.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Arc, Mutex, PoisonError};

use deskvirt_crds::domain_node::OrphanDomain;
use deskvirt_crds::quantity::parse_bytes;
use deskvirt_crds::read::{admitted_size, host_report};
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};

use crate::allocators::Ledger;
use crate::heartbeat::Heartbeat;
use crate::scheduler::charges::Fnv;
use crate::scheduler::{HostCapacity, HostView, PoolPolicy, Request, Usage};
use deskvirt_core::resize::charge;
use deskvirt_crds::constants::condition::RUNNING;

/// The pool a host belongs to: among pools whose `nodeSelector` its labels satisfy, the oldest
/// (by creation time, then name).
pub fn pool_of(node: &DomainNode, pools: &[Arc<ResourcePool>]) -> Option<String> {
    owning_pool(node, pools).map(str::to_string)
}

/// [`pool_of`], borrowed.
fn owning_pool<'a>(node: &DomainNode, pools: &'a [Arc<ResourcePool>]) -> Option<&'a str> {
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
                p.metadata.name.as_deref(),
            )
        })
        .and_then(|p| p.metadata.name.as_deref())
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

/// The orphan domains each host reports whose Desktop is gone: a domain of a Desktop that
/// still exists (bound elsewhere, a leftover of a move) is that Desktop's, and counted there.
pub fn orphans_by_host<'a>(
    nodes: &'a [Arc<DomainNode>],
    desktops: &[Arc<Desktop>],
) -> Vec<(String, &'a OrphanDomain)> {
    let live: std::collections::HashSet<&str> = desktops
        .iter()
        .filter_map(|d| d.metadata.uid.as_deref())
        .collect();
    nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, n.status.as_ref()?)))
        .flat_map(|(host, st)| st.orphans.iter().map(move |o| (host.clone(), o)))
        .filter(|(_, o)| !live.contains(o.uid.as_str()))
        .collect()
}

/// How the operator knows which bindings it made: the pool's ledger (when this replica holds
/// it) and a check of the operator's own record of a binding a status names.
#[derive(Clone, Copy)]
pub struct Bindings<'a> {
    pub ledger: Option<&'a Ledger>,
    pub confirmed: &'a dyn Fn(&Desktop) -> bool,
}

impl<'a> Bindings<'a> {
    /// Every recorded binding counts (for tools and tests that hold no mirrors).
    pub fn trusting(ledger: Option<&'a Ledger>) -> Self {
        Self {
            ledger,
            confirmed: &|_| true,
        }
    }
}

/// What a desktop holds on its host: its admitted size (`status.allocation`, else its spec),
/// or while its domain still runs with another size, the larger of the two
/// ([`deskvirt_core::resize::charge`]). `None` when neither can be read.
pub fn charged(d: &Desktop) -> Option<Request> {
    let admitted = admitted_size(&d.spec, d.status.as_ref()).ok()?;
    Some(charge(admitted, running_size(d)))
}

/// The size the desktop's domain runs with, as its host reports it; `None` unless the host
/// says the domain runs.
pub fn running_size(d: &Desktop) -> Option<Request> {
    let st = d.status.as_ref()?;
    if !deskvirt_crds::conditions::is_true(&st.conditions, RUNNING) {
        return None;
    }
    let r = st.running_size.as_ref()?;
    Request::read(r.cpu, &r.memory).ok()
}

/// What the desktops `charges` counts hold on `host` (read [`crate::charges::Counted::without`]
/// the desktop being resized), and what the host can hold under `pool`'s policy: the room a
/// resize is judged against. `None` when the host is unknown.
pub fn host_room(
    host: &str,
    policy: &PoolPolicy,
    nodes: &[Arc<DomainNode>],
    charges: crate::charges::Counted<'_>,
) -> Option<(HostCapacity, Usage)> {
    let node = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(host))?;
    let orphans = node.status.as_ref().map_or(&[][..], |s| &s.orphans[..]);
    let usage = charges.on(host, orphans);
    let view = HostView::from_report(&host_report(node), policy, true, usage, 0);
    Some((view.capacity, usage))
}

/// What the desktops bound to each host hold (those whose resources the idle policy released
/// hold nothing: [`crate::idle::holds_resources`]), and what the running orphan domains the
/// hosts report use: a domain whose Desktop is gone still takes its CPU and memory.
/// Only desktops whose binding the operator made count (`confirmed`,
/// [`crate::context::Stores::binding_confirmed`], or held by the ledger): a status written by
/// anyone else charges nothing.
pub fn usage_by_host(
    desktops: &[Arc<Desktop>],
    nodes: &[Arc<DomainNode>],
    bindings: Bindings<'_>,
) -> HashMap<String, Usage> {
    let Bindings { ledger, confirmed } = bindings;
    let mut requests: HashMap<String, Vec<Request>> = HashMap::new();
    for (host, req) in desktops
        .iter()
        .filter_map(|d| charge_of(d, ledger, confirmed))
    {
        requests.entry(host).or_default().push(req);
    }
    // Migration targets, charged the desktop's size until it arrives (as `Counted::on`).
    for (_, t) in ledger.into_iter().flat_map(|l| l.targets()) {
        requests.entry(t.host.to_string()).or_default().push(t.size);
    }
    let live: std::collections::HashSet<&str> = desktops
        .iter()
        .filter_map(|d| d.metadata.uid.as_deref())
        .collect();
    for n in nodes {
        let (Some(host), Some(st)) = (n.metadata.name.as_ref(), n.status.as_ref()) else {
            continue;
        };
        for req in orphan_charges(&st.orphans, |uid| live.contains(uid)) {
            requests.entry(host.clone()).or_default().push(req);
        }
    }
    requests
        .into_iter()
        .map(|(h, r)| (h, Usage::of(r.iter())))
        .collect()
}

/// Where desktop `d` is charged and how much, under `ledger` (its pool's): nothing when the
/// idle policy released its resources ([`crate::idle::holds_resources`]), when it is not bound,
/// or when the operator did not make its binding (a status someone else wrote charges
/// nothing). A binding or a resize the ledger holds counts before the cache shows it.
pub fn charge_of(
    d: &Desktop,
    ledger: Option<&Ledger>,
    confirmed: &dyn Fn(&Desktop) -> bool,
) -> Option<(String, Request)> {
    if !crate::idle::holds_resources(d) {
        return None;
    }
    let (host, req) = (bound_host(d, ledger)?, charged(d)?);
    let uid = d.metadata.uid.as_deref().unwrap_or_default();
    // The ledger's own record counts too: the mirror of a binding made a moment ago may not be
    // in the cache yet.
    let in_ledger = || ledger.is_some_and(|l| l.port_of(uid).is_some_and(|(h, _)| h == host));
    if !(confirmed(d) || in_ledger()) {
        return None;
    }
    // A size the ledger admitted that the cache may not show yet counts as well.
    let req = match ledger.and_then(|l| l.admitted_size(uid)) {
        Some(admitted) => deskvirt_core::resize::larger(admitted, req),
        None => req,
    };
    Some((host, req))
}

/// What the running domains among `orphans` (one host's) use, but those whose Desktop still
/// exists (`live`): a domain of a Desktop bound elsewhere, a leftover of a move, is that
/// Desktop's, and counted there.
pub fn orphan_charges<'a>(
    orphans: &'a [OrphanDomain],
    live: impl Fn(&str) -> bool + 'a,
) -> impl Iterator<Item = Request> + 'a {
    orphans
        .iter()
        .filter(move |o| o.running && !live(&o.uid))
        .filter_map(|o| Some(Request::new(o.cpu, parse_bytes(&o.memory).ok()?)))
}

/// The scheduler's view of every host `pool` owns by membership.
pub fn host_views(
    pool: &str,
    policy: &PoolPolicy,
    nodes: &[Arc<DomainNode>],
    pools: &[Arc<ResourcePool>],
    desktops: &[Arc<Desktop>],
    bindings: Bindings<'_>,
    heartbeat: impl Fn(&str) -> Heartbeat,
) -> Vec<HostView> {
    let ledger = bindings.ledger;
    let usage = usage_by_host(desktops, nodes, bindings);
    let usage = |n: &DomainNode| {
        let name = n.metadata.name.as_deref().unwrap_or_default();
        usage.get(name).copied().unwrap_or_default()
    };
    views_of(pool, policy, nodes, pools, &usage, ledger, heartbeat)
}

/// [`host_views`] with the charges as counted incrementally ([`crate::charges::Charges`]):
/// what placing a desktop reads, without walking every desktop, and each host's report read
/// again only when its object or the pools changed (`memo`).
#[allow(clippy::too_many_arguments)]
pub fn host_views_counted(
    pool: &str,
    policy: &PoolPolicy,
    nodes: &[Arc<DomainNode>],
    pools: &[Arc<ResourcePool>],
    charges: &crate::charges::Counted<'_>,
    ledger: Option<&Ledger>,
    heartbeat: impl Fn(&str) -> Heartbeat,
    memo: &ViewMemo,
) -> Vec<HostView> {
    let usage = |n: &DomainNode| {
        let name = n.metadata.name.as_deref().unwrap_or_default();
        let orphans = n.status.as_ref().map_or(&[][..], |s| &s.orphans[..]);
        charges.on(name, orphans)
    };
    let pools_key = pools_key(pools);
    let mut memo = memo.0.lock().unwrap_or_else(PoisonError::into_inner);
    if memo.len() > nodes.len() * 2 + 16 {
        let names: std::collections::HashSet<&str> = nodes
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect();
        memo.retain(|k, _| names.contains(k.as_str()));
    }
    let mut views = Vec::with_capacity(nodes.len());
    views.extend(nodes.iter().filter_map(|n| {
        let base = kept_view(&mut memo, n, pool, policy, pools, pools_key)?;
        let name = n.metadata.name.as_deref().unwrap_or_default();
        Some(as_now(base, name, &heartbeat, usage(n), ledger))
    }));
    views
}

/// Host `n`'s view in `pool` as kept in `memo` (read again when the host's object, the pools
/// or the pool's policy changed), or `None` when another pool (or none) owns the host. The
/// view is read only for the host's own pool, so two pools never take turns at it.
fn kept_view(
    memo: &mut HashMap<String, Memo, BuildHasherDefault<Fnv>>,
    n: &DomainNode,
    pool: &str,
    policy: &PoolPolicy,
    pools: &[Arc<ResourcePool>],
    pools_key: u64,
) -> Option<HostView> {
    let name = n.metadata.name.as_deref().unwrap_or_default();
    let m = &n.metadata;
    let kept = memo
        .get(name)
        .filter(|e| e.uid == m.uid && e.version == m.resource_version && e.pools == pools_key);
    let owner = match kept {
        Some(e) => e.owner.clone(),
        None => owning_pool(n, pools).map(str::to_string),
    };
    if owner.as_deref() != Some(pool) {
        if kept.is_none() {
            memo.insert(name.to_string(), Memo::of(m, pools_key, owner, None));
        }
        return None;
    }
    if let Some((_, v)) = kept
        .and_then(|e| e.view.as_ref())
        .filter(|(p, _)| p == policy)
    {
        return Some(v.clone());
    }
    let view = view_of(n, pool, policy);
    let entry = Memo::of(m, pools_key, owner, Some((*policy, view.clone())));
    memo.insert(name.to_string(), entry);
    Some(view)
}

impl Memo {
    fn of(
        m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        pools: u64,
        owner: Option<String>,
        view: Option<(PoolPolicy, HostView)>,
    ) -> Self {
        Self {
            uid: m.uid.clone(),
            version: m.resource_version.clone(),
            pools,
            owner,
            view,
        }
    }
}

/// What [`host_views_counted`] keeps of each host between calls: the part of its view that
/// only the host's object, the pools and the pool's policy decide (its pool, capacity,
/// readiness as reported, cordon). Reading a host's report (quantities, conditions, names) was
/// most of building a pool's 500 views. Clones share it.
#[derive(Clone, Default)]
pub struct ViewMemo(Arc<Mutex<HashMap<String, Memo, BuildHasherDefault<Fnv>>>>);

/// One host's kept view, and what it was read from.
struct Memo {
    uid: Option<String>,
    version: Option<String>,
    pools: u64,
    /// The pool owning the host.
    owner: Option<String>,
    /// Its view in that pool, once asked for, and the pool's policy it was read with.
    view: Option<(PoolPolicy, HostView)>,
}

/// What decides which pool owns a host, hashed: each pool's name, generation (its spec),
/// creation time and whether it is going away.
fn pools_key(pools: &[Arc<ResourcePool>]) -> u64 {
    use std::fmt::Write;
    let mut text = String::new();
    for p in pools {
        let m = &p.metadata;
        let _ = write!(
            text,
            "{:?}/{:?}/{:?}/{:?}/{};",
            m.name,
            m.uid,
            m.generation,
            m.creation_timestamp.as_ref().map(|t| t.0),
            m.deletion_timestamp.is_some()
        );
    }
    crate::allocators::fnv::fnv1a64(text.as_bytes())
}

/// A host's view in `pool` as its object reports it: ready as far as the report goes, nothing
/// charged, no ports held.
fn view_of(n: &DomainNode, pool: &str, policy: &PoolPolicy) -> HostView {
    let mut report = host_report(n);
    report.pool = Some(pool.to_string());
    HostView::from_owned_report(report, policy, true, Usage::default(), 0)
}

/// `base` with the host's heartbeat verdict, what it is charged, and its ports in `ledger`.
fn as_now(
    mut v: HostView,
    name: &str,
    heartbeat: &impl Fn(&str) -> Heartbeat,
    usage: Usage,
    ledger: Option<&Ledger>,
) -> HostView {
    v.ready = v.ready && heartbeat(name).is_fresh();
    v.allocated = usage;
    v.ports_in_use = ledger.map(|l| l.ports_in_use(name)).unwrap_or(0);
    v.ports_taken = ledger.map(|l| l.ports_taken(name)).unwrap_or(0);
    v
}

/// The scheduler's view of every host `pool` owns by membership, each charged `usage`.
fn views_of(
    pool: &str,
    policy: &PoolPolicy,
    nodes: &[Arc<DomainNode>],
    pools: &[Arc<ResourcePool>],
    usage: &dyn Fn(&DomainNode) -> Usage,
    ledger: Option<&Ledger>,
    heartbeat: impl Fn(&str) -> Heartbeat,
) -> Vec<HostView> {
    nodes
        .iter()
        .filter(|n| owning_pool(n, pools) == Some(pool))
        .map(|n| {
            let name = n.metadata.name.as_deref().unwrap_or_default();
            as_now(view_of(n, pool, policy), name, &heartbeat, usage(n), ledger)
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
    fn kept_views_are_what_reading_every_host_again_gives() {
        use deskvirt_crds::read::FromPoolSpec;
        let host = |version: &str, zone: &str, memory: &str| {
            let mut n = node(&[("zone", zone)]);
            n.metadata.resource_version = Some(version.into());
            n.metadata.uid = Some("u-h1".into());
            n.status = serde_json::from_value(serde_json::json!({
                "memory": memory, "maxVcpus": 64,
                "cpu": { "model": "m", "sockets": 1, "cores": 4, "threads": 8, "mhz": 1000 },
                "conditions": [{ "type": "LibvirtConnected", "status": "True", "reason": "R",
                                 "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z" }]
            }))
            .unwrap_or_else(|e| panic!("{e}"));
            Arc::new(n)
        };
        let mut ledgers = crate::context::Ledgers::fresh();
        let charges = crate::charges::Charges::default();
        let kept = ViewMemo::default();
        let fresh = Heartbeat::Fresh {
            until: k8s_openapi::jiff::Timestamp::MAX,
        };
        let mut views = |asked: &str,
                         nodes: &[Arc<DomainNode>],
                         pools: &[Arc<ResourcePool>],
                         memo: &ViewMemo| {
            let policy = PoolPolicy::from_spec(&pools[0].spec).unwrap_or_else(|e| panic!("{e}"));
            let counted = charges.count(&mut ledgers, |_| None, |_, _| None);
            host_views_counted(
                asked,
                &policy,
                nodes,
                pools,
                &counted,
                None,
                |_| fresh,
                memo,
            )
        };
        let mut zone_b = pool("p", 1, &[("zone", "b")]);
        Arc::make_mut(&mut zone_b).metadata.generation = Some(2);
        let steps = [
            (host("1", "a", "8Gi"), pool("p", 1, &[("zone", "a")])),
            // The host's facts change: its capacity with them.
            (host("2", "a", "16Gi"), pool("p", 1, &[("zone", "a")])),
            // Relabelled out of the pool, then the pool follows it.
            (host("3", "b", "16Gi"), pool("p", 1, &[("zone", "a")])),
            (host("3", "b", "16Gi"), zone_b),
        ];
        let mut shown = Vec::new();
        for (n, p) in steps {
            let (nodes, pools) = ([n], [p]);
            let with_kept = views("p", &nodes, &pools, &kept);
            assert_eq!(with_kept, views("p", &nodes, &pools, &ViewMemo::default()));
            shown.push(with_kept.first().map(|v| v.capacity));
        }
        assert!(
            shown[0].is_some() && shown[1].is_some() && shown[0] != shown[1],
            "{shown:?}"
        );
        assert_eq!(shown[2], None, "not in the pool");
        assert_eq!(shown[3], shown[1], "in it again");

        // Two pools of one policy: asking for the one that does not own the host first leaves
        // the host in its own.
        let kept = ViewMemo::default();
        let nodes = [host("1", "a", "8Gi")];
        let pools = [
            pool("p", 1, &[("zone", "a")]),
            pool("q", 2, &[("zone", "a")]),
        ];
        for (asked, hosts) in [("q", 0), ("p", 1), ("q", 0), ("p", 1)] {
            let got = views(asked, &nodes, &pools, &kept);
            assert_eq!(got.len(), hosts, "asked for {asked}");
        }
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

    fn with_orphans(orphans: &[(&str, bool)]) -> Arc<DomainNode> {
        let mut n = node(&[]);
        let list: Vec<serde_json::Value> = orphans
            .iter()
            .map(|(uid, running)| {
                serde_json::json!({
                    "uid": uid, "domain": format!("ns--d--{uid}"), "desktop": "ns/d", "pool": "p",
                    "running": running, "cpu": 2, "memory": "1Gi", "spicePort": 5900,
                    "mac": "52:54:00:00:00:01", "since": "2026-01-01T00:00:00Z"
                })
            })
            .collect();
        n.status = serde_json::from_value(serde_json::json!({ "orphans": list }))
            .unwrap_or_else(|e| panic!("{e}"));
        Arc::new(n)
    }

    fn desktop(uid: &str) -> Arc<Desktop> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
                "metadata": {"name": "d", "namespace": "ns", "uid": uid},
                "spec": {"pool": "p", "cpu": 1, "memory": "1Gi", "disk": {"image": "i.qcow2"}}
            }))
            .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    #[test]
    fn running_orphans_of_gone_desktops_are_charged_to_their_host() {
        let nodes = vec![with_orphans(&[
            ("gone", true),
            ("stopped", false),
            ("moved", true),
        ])];
        // `moved` is the domain of a Desktop that still exists (bound elsewhere): it is
        // counted as that Desktop's, not twice.
        let desktops = vec![desktop("moved")];
        let usage = usage_by_host(&desktops, &nodes, Bindings::trusting(None));
        let h1 = usage.get("h1").copied().unwrap_or_default();
        assert_eq!((h1.shared_vcpus, h1.memory), (2, 1 << 30));
        let orphans = orphans_by_host(&nodes, &desktops);
        let uids: Vec<&str> = orphans.iter().map(|(_, o)| o.uid.as_str()).collect();
        assert_eq!(uids, ["gone", "stopped"]);
    }
}
