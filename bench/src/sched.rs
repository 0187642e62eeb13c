//! Placement latency with 500 hosts and 5,000 bound desktops, through the operator's own code:
//! the bind path as the operator runs it (the charges counted one desktop at a time,
//! `world::host_views_counted`, then `schedule`), the same with every desktop counted again
//! (`world::host_views`, what it ran before), and the pure `place_in_pool` alone over
//! ready-made host views, side by side in one run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use deskvirt_crds::read::FromPoolSpec;
use deskvirt_crds::resource_pool::Placement;
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use deskvirt_operator::charges::Charges;
use deskvirt_operator::context::Ledgers;
use deskvirt_operator::heartbeat::Heartbeat;
use deskvirt_operator::scheduler::{self, PoolIndex, Request, bench};
use deskvirt_operator::world::{Bindings, ViewMemo, charge_of, host_views, host_views_counted};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use crate::stats::Samples;

const POOL: &str = "bench";
const GI: u64 = 1 << 30;

/// What the micro-benchmark measured.
#[derive(Debug)]
pub struct SchedResult {
    pub hosts: usize,
    pub desktops: usize,
    /// Counting the desktop the last bind changed, `host_views_counted` + `schedule`: as
    /// `bind` runs it for each new desktop.
    pub bind_path: Samples,
    /// `host_views` (every desktop counted again) + `schedule`.
    pub full_count: Samples,
    /// `place_in_pool` over prebuilt views.
    pub place_only: Samples,
}

fn pool() -> anyhow::Result<ResourcePool> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
        "metadata": { "name": POOL, "creationTimestamp": "2024-01-01T00:00:00Z" },
        "spec": {
            "nodeSelector": { "deskvirt.io/pool": POOL },
            "storage": { "imageDir": "/var/lib/deskvirt/images", "diskDir": "/var/lib/deskvirt/disks" },
            "display": { "spicePorts": { "first": 5900, "last": 6899 } },
            "overcommit": { "cpu": 4, "memory": 1 },
            "reserved": { "cpu": 1, "memory": "1Gi" },
        }
    }))?)
}

fn node(i: usize) -> anyhow::Result<DomainNode> {
    let threads = 16 + 8 * (i % 7);
    let memory_gi = 64 + 32 * (i % 7);
    Ok(serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
        "metadata": { "name": format!("host-{i:04}"), "labels": { "deskvirt.io/pool": POOL } },
        "spec": {},
        "status": {
            "pool": POOL,
            "cpu": { "sockets": 1, "cores": threads, "threads": threads, "mhz": 2000 },
            "memory": format!("{memory_gi}Gi"),
        }
    }))?)
}

fn desktop(i: usize, hosts: usize) -> anyhow::Result<Desktop> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": format!("d-{i:05}"), "namespace": "bench", "uid": format!("uid-{i:05}") },
        "spec": { "pool": POOL, "cpu": 2, "memory": "4Gi", "disk": { "image": "base.qcow2" } },
        "status": { "node": format!("host-{:04}", i % hosts.max(1)) }
    }))?)
}

/// Times `iterations` placements of a 2 vCPU / 4 GiB desktop among `hosts` hosts holding
/// `desktops` bound desktops.
pub fn run(hosts: usize, desktops: usize, iterations: usize) -> anyhow::Result<SchedResult> {
    let pools = vec![Arc::new(pool()?)];
    let nodes = (0..hosts)
        .map(|i| node(i).map(Arc::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bound = (0..desktops)
        .map(|i| desktop(i, hosts).map(Arc::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut index = PoolIndex::new();
    index.apply(POOL, scheduler::PoolPolicy::from_spec(&pools[0].spec));
    let policy = match index.get(POOL) {
        Some(Ok(p)) => *p,
        Some(Err(e)) => anyhow::bail!("benchmark pool is invalid: {e}"),
        None => anyhow::bail!("benchmark pool missing from the index"),
    };
    let request = Request::new(2, 4 * GI);
    let fresh = Heartbeat::Fresh {
        until: Timestamp::MAX,
    };

    let mut ledgers = Ledgers::fresh();
    let charges = Charges::default();
    let by_ref: HashMap<ObjectRef<Desktop>, Arc<Desktop>> = bound
        .iter()
        .map(|d| (ObjectRef::from_obj(d.as_ref()), d.clone()))
        .collect();
    for d in &bound {
        charges.desktop_touched(d);
    }
    let count = |ledgers: &mut Ledgers| {
        charges.count(
            ledgers,
            |r| by_ref.get(r).cloned(),
            |d, _| charge_of(d, None, &|_| true),
        )
    };
    drop(count(&mut ledgers));
    let memo = ViewMemo::default();
    let mut bind_path = Vec::with_capacity(iterations);
    for i in 0..iterations {
        // The watch event of the desktop the previous bind wrote.
        charges.desktop_touched(&bound[i % bound.len().max(1)]);
        let t = Instant::now();
        let counted = count(&mut ledgers);
        let views = host_views_counted(
            POOL,
            &policy,
            &nodes,
            &pools,
            &counted,
            None,
            |_| fresh,
            &memo,
        );
        drop(counted);
        let chosen = scheduler::schedule(POOL, &index, &request, &views)
            .map(|d| d.host.name.len())
            .map_err(|e| anyhow::anyhow!("no placement: {e}"))?;
        bind_path.push(t.elapsed());
        std::hint::black_box(chosen);
    }

    let mut full_count = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let views = host_views(
            POOL,
            &policy,
            &nodes,
            &pools,
            &bound,
            Bindings::trusting(None),
            |_| fresh,
        );
        let chosen = scheduler::schedule(POOL, &index, &request, &views)
            .map(|d| d.host.name.len())
            .map_err(|e| anyhow::anyhow!("no placement: {e}"))?;
        full_count.push(t.elapsed());
        std::hint::black_box(chosen);
    }

    let views = host_views(
        POOL,
        &policy,
        &nodes,
        &pools,
        &bound,
        Bindings::trusting(None),
        |_| fresh,
    );
    let mut place_only = Vec::with_capacity(iterations * 10);
    for _ in 0..iterations * 10 {
        let t = Instant::now();
        let chosen = scheduler::place_in_pool(POOL, &policy, &request, &views)
            .map(|d| d.index)
            .map_err(|e| anyhow::anyhow!("no placement: {e}"))?;
        place_only.push(t.elapsed());
        std::hint::black_box(chosen);
    }
    // The operator's own synthetic fleet must place too (sanity check of the inputs' shape).
    let mut fleet = bench::fleet(POOL, hosts.min(50));
    let placed = bench::place_all(
        &bench::policy(Placement::Spread),
        POOL,
        &mut fleet,
        &[request; 10],
    );
    anyhow::ensure!(placed == 10, "bench::fleet placed only {placed} of 10");
    Ok(SchedResult {
        hosts,
        desktops,
        bind_path: Samples::new(bind_path),
        full_count: Samples::new(full_count),
        place_only: Samples::new(place_only),
    })
}

/// One line for the progress log.
pub fn describe(r: &SchedResult) -> String {
    format!(
        "scheduler: {} hosts, {} desktops: bind path p50 {:?} p99 {:?}; counting every desktop p50 {:?} p99 {:?}; place only p50 {:?} p99 {:?}",
        r.hosts,
        r.desktops,
        r.bind_path.p50(),
        r.bind_path.p99(),
        r.full_count.p50(),
        r.full_count.p99(),
        r.place_only.p50(),
        r.place_only.p99()
    )
}
