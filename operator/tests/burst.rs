//! A burst against the real API server: 200 Desktops created at once over 10 fake hosts, with
//! the operator killed and restarted (same identity, as a restarted container) in the middle.
//! Every Desktop ends bound exactly once (a watch records the first binding seen and any
//! change), no (host, port) and no MAC is held twice, and no host's capacity is exceeded.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Run, wait_leader};
use deskvirt_crds::Desktop;
use deskvirt_crds::quantity::parse_bytes;
use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

const DESKTOPS: usize = 200;
const HOSTS: usize = 10;
/// Bound desktops at which the operator is killed.
const KILL_AT: usize = 60;
const GIB: u64 = 1 << 30;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Binding {
    node: String,
    port: Option<u16>,
    mac: Option<String>,
}

fn binding(d: &Desktop) -> Option<Binding> {
    let st = d.status.as_ref()?;
    Some(Binding {
        node: st.node.clone()?,
        port: st.spice.as_ref().and_then(|s| s.port),
        mac: st.mac.clone(),
    })
}

/// What the watch saw: the first binding of each Desktop, and every later different one.
#[derive(Default)]
struct Seen {
    listed: bool,
    first: HashMap<String, Binding>,
    changed: Vec<(String, Binding, Binding)>,
}

impl Seen {
    fn record(&mut self, d: &Desktop) {
        let Some(b) = binding(d) else { return };
        match self.first.get(&d.name_any()) {
            None => {
                self.first.insert(d.name_any(), b);
            }
            Some(first) if *first != b => self.changed.push((d.name_any(), first.clone(), b)),
            Some(_) => {}
        }
    }
}

/// Even hosts: 6 threads, 10Gi (20 vCPUs, 9Gi: 18 desktops); odd: 8 threads, 13Gi (28 vCPUs,
/// 12Gi: 24 desktops). 210 places for 200 desktops of 1 vCPU and 512Mi.
fn host_shape(i: usize) -> (u32, &'static str) {
    if i.is_multiple_of(2) {
        (6, "10Gi")
    } else {
        (8, "13Gi")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_desktops_bind_once_across_an_operator_restart() {
    let run = Run::new("op-burst").await;
    let pool = format!("op-pool-{}", run.id);
    run.pool(&pool, json!({})).await;
    let mut hosts = BTreeMap::new();
    let mut heartbeats = Vec::new();
    for i in 0..HOSTS {
        let name = format!("op-burst-{}-h{i}", run.id);
        let (threads, memory) = host_shape(i);
        run.host(&name, threads, memory).await;
        heartbeats.push(run.heartbeat(&name, 30));
        let memory = parse_bytes(memory).unwrap_or_else(|e| panic!("{e}"));
        // The pool's defaults: 1 thread and 1Gi reserved, vCPUs overcommitted 4:1.
        hosts.insert(name, (u64::from(threads - 1) * 4, memory - GIB));
    }
    let identity = format!("burst-{}", run.id);
    let lease = ["--leader-lease-duration", "2s"];
    let first_operator = run.operator(&identity, &lease);
    wait_leader(&run, &identity).await;

    // Record every binding as the API publishes it.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let wc = watcher::Config::default().labels(&run.selector());
    let stream = watcher(run.desktops(), wc);
    let recorder = seen.clone();
    run.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Ok(Some(ev)) = stream.try_next().await {
            let mut seen = recorder.lock().unwrap_or_else(|p| p.into_inner());
            match ev {
                watcher::Event::Apply(d) | watcher::Event::InitApply(d) => seen.record(&d),
                watcher::Event::InitDone => seen.listed = true,
                watcher::Event::Init | watcher::Event::Delete(_) => {}
            }
        }
    });
    let bound =
        |seen: &Arc<Mutex<Seen>>| seen.lock().unwrap_or_else(|p| p.into_inner()).first.len();
    common::eventually("the watch", || async {
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .listed
            .then_some(())
    })
    .await;

    // The burst.
    let started = Instant::now();
    let desks = run.desktops();
    let specs: Vec<Desktop> = (0..DESKTOPS)
        .map(|i| run.desktop(&format!("b{i:03}"), &pool, 1, "512Mi"))
        .collect();
    let creating = run.spawn(async move {
        futures::stream::iter(specs)
            .map(|d| {
                let desks = desks.clone();
                async move { desks.create(&PostParams::default(), &d).await.map(|_| ()) }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await
    });

    // Kill the operator in the middle and start it again, as a restarted container would.
    common::eventually("the first bindings", || async {
        (bound(&seen) >= KILL_AT).then_some(())
    })
    .await;
    let before_kill = first_operator.bindings();
    let first_fenced = first_operator.metrics.fenced_writes.get();
    first_operator.kill();
    let killed_at = bound(&seen);
    let second_operator = run.operator(&identity, &lease);

    let deadline = Instant::now() + Duration::from_secs(300);
    while bound(&seen) < DESKTOPS {
        assert!(
            Instant::now() < deadline,
            "only {} of {DESKTOPS} desktops bound after 300s",
            bound(&seen)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    eprintln!(
        "bound {DESKTOPS} desktops over {HOSTS} hosts in {:.1}s (operator killed at {killed_at} \
         bound and restarted; bindings by the first replica {before_kill}, by the second {})",
        took.as_secs_f64(),
        second_operator.bindings()
    );
    // With a 2 s Lease, a renewal slowed by the burst lets the fence lapse now and then: the
    // writes refused then are passed again a second later (said here, not asserted).
    eprintln!(
        "writes refused by the fence: {first_fenced} by the first replica, {} by the second; \
         step-downs of the second: {}",
        second_operator.metrics.fenced_writes.get(),
        second_operator.metrics.step_downs.get()
    );
    creating
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("creating desktops: {e}"));

    // Once bound, never moved: neither in the watch nor in a fresh list.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed = run
        .desktops()
        .list(&ListParams::default().labels(&run.selector()))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .items;
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    assert!(
        seen.changed.is_empty(),
        "bindings changed: {:#?}",
        seen.changed
    );
    assert_eq!(listed.len(), DESKTOPS);
    for d in &listed {
        assert_eq!(
            binding(d).as_ref(),
            seen.first.get(&d.name_any()),
            "{} moved",
            d.name_any()
        );
    }
    assert!(before_kill + second_operator.bindings() <= DESKTOPS as u64);

    // Unique ports per host and MACs across the pool; capacity respected.
    let mut ports = HashSet::new();
    let mut macs = HashSet::new();
    let mut used: HashMap<String, (u64, u64)> = HashMap::new();
    for d in &listed {
        let b = binding(d).unwrap_or_else(|| panic!("{} unbound", d.name_any()));
        let port = b
            .port
            .unwrap_or_else(|| panic!("{} has no port", d.name_any()));
        let mac = b
            .mac
            .clone()
            .unwrap_or_else(|| panic!("{} has no MAC", d.name_any()));
        assert!(
            ports.insert((b.node.clone(), port)),
            "port {port} twice on {}",
            b.node
        );
        assert!(macs.insert(mac.clone()), "MAC {mac} twice");
        let memory = parse_bytes(&d.spec.memory).unwrap_or_else(|e| panic!("{e}"));
        let u = used.entry(b.node.clone()).or_default();
        u.0 += u64::from(d.spec.cpu);
        u.1 += memory;
    }
    for (host, (cpu, memory)) in &used {
        let (cap_cpu, cap_memory) = hosts
            .get(host)
            .unwrap_or_else(|| panic!("bound to a foreign host {host}"));
        assert!(cpu <= cap_cpu, "{host}: {cpu} vCPUs over {cap_cpu}");
        assert!(
            memory <= cap_memory,
            "{host}: {memory} bytes over {cap_memory}"
        );
    }
    drop(heartbeats);
}
