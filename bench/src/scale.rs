//! Scale and footprint on simulated hosts: for each step a fresh operator and `hosts` agents on
//! the test driver, their memory before any desktop, then `desktops` created at once (32 POSTs
//! in flight) and watched until every one is Running, the mutating API calls that cost, the
//! memory and CPU of every process once settled, and the deletion of them all.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deskvirt_crds::desktop::Phase;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};

use crate::env::RUN_LABEL;
use crate::fleet::{self, Fleet};
use crate::footprint::{self, ProcMem};
use crate::stats::Samples;
use deskvirt_tests::apimetrics::{self, Counts};

/// How long all desktops of a step may take to be Running, and to be deleted.
const LIMIT: Duration = Duration::from_secs(1800);
/// Pause after the last Running before memory is read (late status writes, caches settle).
const SETTLE: Duration = Duration::from_secs(10);
/// Window for the apiserver's background rate before the desktops are created.
const BACKGROUND: Duration = Duration::from_secs(10);

/// One step's parameters.
#[derive(Clone, Debug)]
pub struct StepSpec {
    pub label: String,
    pub hosts: usize,
    pub desktops: usize,
    pub memory: String,
    /// Quiet window for idle CPU once everything runs.
    pub idle: Duration,
    /// Whether to size the agent's caches (Desktops and mirrors, with managedFields).
    pub caches: bool,
}

/// The memory of every fleet process at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub operator: ProcMem,
    pub agents: Vec<ProcMem>,
}

impl Snapshot {
    pub fn agent_mean(&self) -> ProcMem {
        ProcMem::mean(&self.agents)
    }
    pub fn agent_max_rss(&self) -> u64 {
        self.agents.iter().map(|a| a.rss).max().unwrap_or(0)
    }
}

/// Serialized sizes of what one agent caches (what the API sends it).
#[derive(Clone, Debug, Default)]
pub struct CacheSizes {
    pub desktops: usize,
    pub desktop_bytes: usize,
    pub managed_fields_bytes: usize,
    pub mirrors: usize,
    pub mirror_bytes: usize,
    pub mirror_managed_fields_bytes: usize,
}

/// One step's figures.
#[derive(Clone, Debug)]
pub struct Step {
    pub spec: StepSpec,
    /// Processes started → every host Ready and Schedulable.
    pub hosts_ready: Duration,
    /// First create → last Running.
    pub all_running: Duration,
    /// Per desktop: its POST → first seen Running.
    pub running: Samples,
    /// Per desktop: its POST → first seen bound (`status.node` set by the operator).
    pub bound: Samples,
    /// First create → last bound.
    pub all_bound: Duration,
    /// (seconds since the first create, desktops Running).
    pub curve: Vec<(f64, usize)>,
    pub deleted: Option<Duration>,
    /// Before any desktop.
    pub idle_before: Snapshot,
    /// All desktops Running, settled.
    pub loaded: Snapshot,
    /// CPU time from the first create to the last Running.
    pub operator_cpu_busy: Duration,
    pub agents_cpu_busy: Duration,
    /// CPU time over `spec.idle` once settled.
    pub operator_cpu_idle: Duration,
    pub agents_cpu_idle: Duration,
    /// Mutating calls from the first create to 2 s after the last Running.
    pub calls: Counts,
    /// Background estimate (without Leases) over that window.
    pub background: f64,
    pub load_before: String,
    pub load_after: String,
    pub caches: Option<CacheSizes>,
    /// Reconciles from the first POST to the last Running (the binaries' own counters).
    pub operator_reconciles: f64,
    /// Of them, the Desktop controller's, the DomainNode controller's and the ResourcePool
    /// controller's.
    pub desktop_reconciles: f64,
    pub domainnode_reconciles: f64,
    pub resourcepool_reconciles: f64,
    pub agent_reconciles: f64,
    /// The agents' own status writes over the same window (their `status` step count).
    pub agent_status_writes: f64,
    /// Events about the step's desktops once all were Running, by reporting component and
    /// reason.
    pub events: BTreeMap<(String, String), f64>,
}

impl Step {
    /// Mutating calls per desktop, Leases (heartbeats) left out, background subtracted.
    pub fn calls_per_desktop(&self) -> f64 {
        let ours: f64 = self
            .calls
            .iter()
            .filter(|((_, r), _)| r != "leases")
            .map(|(_, v)| v)
            .sum();
        (ours - self.background).max(0.0) / self.spec.desktops.max(1) as f64
    }
}

/// Runs one step on `fleet` (which must be stopped) and leaves it stopped again.
pub async fn run_step(fleet: &mut Fleet, spec: &StepSpec) -> anyhow::Result<Step> {
    let result = step_inner(fleet, spec).await;
    if let Err(e) = &result {
        eprintln!("[bench] step {} failed: {e:#}", spec.label);
        for name in fleet.dead() {
            eprintln!(
                "[bench] {name} exited; its log ends with:\n{}",
                fleet.log_tail(&name, 20)
            );
        }
        eprintln!(
            "[bench] operator log ends with:\n{}",
            fleet.log_tail("operator", 20)
        );
    }
    fleet.stop().await;
    result
}

async fn step_inner(fleet: &mut Fleet, spec: &StepSpec) -> anyhow::Result<Step> {
    eprintln!(
        "[bench] step {}: {} hosts, {} desktops of {}",
        spec.label, spec.hosts, spec.desktops, spec.memory
    );
    let load_before = loadavg();
    let hosts_ready = fleet.start(spec.hosts).await?;
    eprintln!(
        "[bench]   {} hosts Ready in {:.1} s",
        spec.hosts,
        hosts_ready.as_secs_f64()
    );
    tokio::time::sleep(SETTLE).await;
    let idle_before = snapshot(fleet)?;
    let background = background_rate(fleet).await?;

    let (op, agents) = fleet.pids();
    let op = op.ok_or_else(|| anyhow::anyhow!("no operator"))?;
    let cpu0 = (footprint::cpu_time(op)?, cpu_sum(&agents)?);
    let events_before = desktop_events(fleet).await?;
    let before = apimetrics::scrape(&fleet.client).await?;
    let rec0 = reconciles(fleet).await;
    let w = create_and_wait(fleet, spec).await?;
    let rec1 = reconciles(fleet).await;
    let all_running = w.all_running;
    let cpu1 = (footprint::cpu_time(op)?, cpu_sum(&agents)?);
    eprintln!(
        "[bench]   {} desktops Running in {:.1} s",
        spec.desktops,
        all_running.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = apimetrics::scrape(&fleet.client).await?;
    let window = all_running + Duration::from_secs(2);
    let events = new_events(&events_before, &desktop_events(fleet).await?);
    tokio::time::sleep(SETTLE).await;
    let loaded = snapshot(fleet)?;
    let caches = if spec.caches {
        Some(cache_sizes(fleet).await?)
    } else {
        None
    };
    let idle0 = (footprint::cpu_time(op)?, cpu_sum(&agents)?);
    tokio::time::sleep(spec.idle).await;
    let idle1 = (footprint::cpu_time(op)?, cpu_sum(&agents)?);
    let dead = fleet.dead();
    anyhow::ensure!(dead.is_empty(), "processes exited: {dead:?}");
    let load_after = loadavg();
    let deleted = match fleet.delete_desktops(LIMIT).await {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("[bench]   deletion incomplete: {e:#}");
            None
        }
    };
    Ok(Step {
        spec: spec.clone(),
        hosts_ready,
        all_running,
        running: w.running,
        bound: w.bound,
        all_bound: w.all_bound,
        curve: w.curve,
        deleted,
        idle_before,
        loaded,
        operator_cpu_busy: cpu1.0.saturating_sub(cpu0.0),
        agents_cpu_busy: cpu1.1.saturating_sub(cpu0.1),
        operator_cpu_idle: idle1.0.saturating_sub(idle0.0),
        agents_cpu_idle: idle1.1.saturating_sub(idle0.1),
        calls: apimetrics::delta(&before, &after),
        background: background * window.as_secs_f64(),
        load_before,
        load_after,
        caches,
        operator_reconciles: rec1.operator - rec0.operator,
        desktop_reconciles: rec1.desktop - rec0.desktop,
        domainnode_reconciles: rec1.domainnode - rec0.domainnode,
        resourcepool_reconciles: rec1.resourcepool - rec0.resourcepool,
        agent_reconciles: rec1.agents - rec0.agents,
        agent_status_writes: rec1.agent_status_writes - rec0.agent_status_writes,
        events,
    })
}

/// The Events about the fleet's Desktops: each one's count by its UID, and its reporting
/// component and reason.
type Events = HashMap<String, (i32, (String, String))>;

async fn desktop_events(fleet: &Fleet) -> anyhow::Result<Events> {
    use k8s_openapi::api::core::v1::Event;
    let api: kube::Api<Event> = kube::Api::namespaced(fleet.client.clone(), &fleet.user_ns);
    let lp = kube::api::ListParams::default().fields("involvedObject.kind=Desktop");
    let list = tokio::time::timeout(Duration::from_secs(30), api.list(&lp))
        .await
        .map_err(|_| anyhow::anyhow!("listing events took over 30 s"))??;
    let mut out = HashMap::new();
    for e in list.items {
        let who = e
            .reporting_component
            .filter(|c| !c.is_empty())
            .or_else(|| e.source.and_then(|s| s.component))
            .unwrap_or_default();
        let uid = e.metadata.uid.unwrap_or_default();
        out.insert(
            uid,
            (
                e.count.unwrap_or(1).max(1),
                (who, e.reason.unwrap_or_default()),
            ),
        );
    }
    Ok(out)
}

/// The Events in `after` that are not in `before`, or were repeated since, by component and
/// reason.
fn new_events(before: &Events, after: &Events) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for (uid, (count, what)) in after {
        let seen = before.get(uid).map_or(0, |(c, _)| *c);
        if *count > seen {
            *out.entry(what.clone()).or_default() += f64::from(count - seen);
        }
    }
    out
}

/// Reconciles so far, from the binaries' own counters.
struct Reconciles {
    /// The operator's, every controller.
    operator: f64,
    /// The operator's Desktop controller alone: its passes per desktop.
    desktop: f64,
    /// The operator's DomainNode and ResourcePool controllers.
    domainnode: f64,
    resourcepool: f64,
    /// The agents', summed.
    agents: f64,
    /// The agents' status writes, summed.
    agent_status_writes: f64,
}

async fn reconciles(fleet: &Fleet) -> Reconciles {
    let mut op = [0.0; 4];
    if let Some(p) = fleet.operator_port {
        const METRIC: &str = "deskvirt_operator_reconciles_total";
        op[0] = fleet::scrape_counter(p, METRIC).await;
        for (i, c) in ["desktop", "domainnode", "resourcepool"].iter().enumerate() {
            op[i + 1] = fleet::scrape_counter(p, &format!("{METRIC}{{controller=\"{c}\"}}")).await;
        }
    }
    let [operator, desktop, domainnode, resourcepool] = op;
    let (mut agents, mut agent_status_writes) = (0.0, 0.0);
    for a in &fleet.agents {
        agents +=
            fleet::scrape_counter(a.metrics_port, "deskvirt_agent_desktop_reconciles_total").await;
        agent_status_writes += fleet::scrape_counter(
            a.metrics_port,
            "deskvirt_agent_pass_step_seconds_count{step=\"status\"}",
        )
        .await;
    }
    Reconciles {
        operator,
        desktop,
        domainnode,
        resourcepool,
        agents,
        agent_status_writes,
    }
}

/// Mutating calls per second other than Leases while the fleet idles.
async fn background_rate(fleet: &Fleet) -> anyhow::Result<f64> {
    let before = apimetrics::scrape(&fleet.client).await?;
    tokio::time::sleep(BACKGROUND).await;
    let after = apimetrics::scrape(&fleet.client).await?;
    let d = apimetrics::delta(&before, &after);
    let non_lease: f64 = d
        .iter()
        .filter(|((_, r), _)| r != "leases")
        .map(|(_, v)| v)
        .sum();
    // A sum of nothing is -0.0: print it as 0.
    Ok((non_lease / BACKGROUND.as_secs_f64()).max(0.0))
}

fn snapshot(fleet: &Fleet) -> anyhow::Result<Snapshot> {
    let (op, agents) = fleet.pids();
    let op = op.ok_or_else(|| anyhow::anyhow!("no operator"))?;
    Ok(Snapshot {
        operator: ProcMem::read(op)?,
        agents: agents
            .iter()
            .map(|p| ProcMem::read(*p))
            .collect::<anyhow::Result<_>>()?,
    })
}

fn cpu_sum(pids: &[u32]) -> anyhow::Result<Duration> {
    pids.iter()
        .map(|p| footprint::cpu_time(*p))
        .sum::<anyhow::Result<Duration>>()
}

/// `/proc/loadavg`'s three averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

type Created = Arc<Mutex<HashMap<String, Instant>>>;

/// What the watch saw.
struct Watched {
    all_running: Duration,
    running: Samples,
    all_bound: Duration,
    bound: Samples,
    curve: Vec<(f64, usize)>,
}

/// Creates the step's desktops (32 POSTs in flight) while a watch records when each is first
/// seen bound and Running.
async fn create_and_wait(fleet: &Fleet, spec: &StepSpec) -> anyhow::Result<Watched> {
    let api = fleet.desktops();
    let selector = format!("{RUN_LABEL}={}", fleet.run);
    let created: Created = Arc::default();
    let start = Instant::now();
    // The watch starts (and lists) before the first POST so no transition is missed.
    let mut stream = watcher(api.clone(), watcher::Config::default().labels(&selector))
        .default_backoff()
        .applied_objects()
        .boxed();
    let names: Vec<String> = (0..spec.desktops).map(|i| format!("s-{i:04}")).collect();
    let creator = {
        let api = api.clone();
        let created = created.clone();
        let objects = names
            .iter()
            .map(|n| fleet::desktop(fleet, n, &spec.memory).map(|d| (n.clone(), d)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        async move {
            let results: Vec<anyhow::Result<()>> = futures::stream::iter(objects)
                .map(|(name, d)| {
                    let api = api.clone();
                    let created = created.clone();
                    async move {
                        let t = Instant::now();
                        api.create(&PostParams::default(), &d).await?;
                        if let Ok(mut m) = created.lock() {
                            m.insert(name, t);
                        }
                        Ok(())
                    }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            results.into_iter().collect::<anyhow::Result<()>>()
        }
    };
    let watch = async {
        let mut running: HashMap<String, Instant> = HashMap::new();
        let mut bound: HashMap<String, Instant> = HashMap::new();
        let mut curve = vec![(0.0, 0)];
        let mut last_report = Instant::now();
        while running.len() < spec.desktops {
            let next = tokio::time::timeout_at((start + LIMIT).into(), stream.next()).await;
            let d = match next {
                Err(_) => anyhow::bail!(
                    "only {} of {} desktops Running after {LIMIT:?}",
                    running.len(),
                    spec.desktops
                ),
                Ok(None) => anyhow::bail!("the desktop watch ended"),
                Ok(Some(Err(e))) => {
                    eprintln!("[bench]   watch error (retrying): {e}");
                    continue;
                }
                Ok(Some(Ok(d))) => d,
            };
            let is_running = d
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(|p| p == Phase::Running);
            let name = d.name_any();
            let is_bound = d.status.as_ref().is_some_and(|s| s.node.is_some());
            if is_bound && !bound.contains_key(&name) {
                bound.insert(name.clone(), Instant::now());
            }
            if is_running && !running.contains_key(&name) {
                let now = Instant::now();
                running.insert(name, now);
                curve.push((now.duration_since(start).as_secs_f64(), running.len()));
                if last_report.elapsed() > Duration::from_secs(15) {
                    eprintln!(
                        "[bench]   {} / {} Running after {:.0} s",
                        running.len(),
                        spec.desktops,
                        start.elapsed().as_secs_f64()
                    );
                    last_report = Instant::now();
                }
            }
        }
        Ok::<_, anyhow::Error>((running, bound, curve))
    };
    let (created_ok, watched) = tokio::join!(creator, watch);
    created_ok?;
    let (running, bound, curve) = watched?;
    let times = created.lock().map(|m| m.clone()).unwrap_or_default();
    let last = |m: &HashMap<String, Instant>| {
        m.values()
            .max()
            .map(|t| t.duration_since(start))
            .unwrap_or_default()
    };
    let since_post = |m: &HashMap<String, Instant>| {
        Samples::new(
            m.iter()
                .filter_map(|(n, t)| times.get(n).map(|c| t.saturating_duration_since(*c)))
                .collect(),
        )
    };
    Ok(Watched {
        all_running: last(&running),
        running: since_post(&running),
        all_bound: last(&bound),
        bound: since_post(&bound),
        curve,
    })
}

/// What one agent is sent for its desktops: the Desktops bound to host 0 and their mirrors.
async fn cache_sizes(fleet: &Fleet) -> anyhow::Result<CacheSizes> {
    let host = fleet.host_name(0);
    let selector = format!(
        "{}={}",
        deskvirt_crds::constants::LABEL_NODE,
        deskvirt_crds::names::label_value(&host)
    );
    let lp = ListParams::default().labels(&selector);
    let mut c = CacheSizes::default();
    for d in fleet.desktops().list(&lp).await?.items {
        c.desktops += 1;
        c.desktop_bytes += serde_json::to_vec(&d)?.len();
        c.managed_fields_bytes += serde_json::to_vec(&d.metadata.managed_fields)?.len();
    }
    let secrets: Api<Secret> = Api::namespaced(fleet.client.clone(), &fleet.console_ns);
    for s in secrets.list(&lp).await?.items {
        c.mirrors += 1;
        c.mirror_bytes += serde_json::to_vec(&s)?.len();
        c.mirror_managed_fields_bytes += serde_json::to_vec(&s.metadata.managed_fields)?.len();
    }
    Ok(c)
}

/// The scale steps for `hosts` and `desktops`: a tenth of both, all hosts with a tenth of the
/// desktops, then both in full (duplicates dropped).
pub fn steps(hosts: usize, desktops: usize, memory: &str) -> Vec<StepSpec> {
    let tenth = |n: usize| (n / 10).max(1);
    let mut out: Vec<StepSpec> = Vec::new();
    for (h, d) in [
        (tenth(hosts), tenth(desktops)),
        (hosts, tenth(desktops)),
        (hosts, desktops),
    ] {
        if out.iter().any(|s| s.hosts == h && s.desktops == d) {
            continue;
        }
        out.push(StepSpec {
            label: format!("{h} hosts / {d} desktops"),
            hosts: h,
            desktops: d,
            memory: memory.to_string(),
            idle: Duration::from_secs(10),
            caches: false,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_of_a_step_are_the_new_ones_and_the_repeats() {
        let what = |r: &str| ("deskvirt-operator".to_string(), r.to_string());
        let before: Events = [("a".to_string(), (1, what("Scheduled")))].into();
        let after: Events = [
            ("a".to_string(), (1, what("Scheduled"))),
            ("b".to_string(), (1, what("Scheduled"))),
            ("c".to_string(), (3, what("Running"))),
        ]
        .into();
        let got = new_events(&before, &after);
        assert_eq!(got.get(&what("Scheduled")), Some(&1.0));
        assert_eq!(got.get(&what("Running")), Some(&3.0));
    }

    #[test]
    fn steps_grow_hosts_then_desktops() {
        let s = steps(100, 1000, "256Mi");
        let shape: Vec<_> = s.iter().map(|s| (s.hosts, s.desktops)).collect();
        assert_eq!(shape, vec![(10, 100), (100, 100), (100, 1000)]);
        // A tenth of 1 host is still 1 host: the duplicate step is dropped.
        let shape: Vec<_> = steps(1, 5, "256Mi")
            .iter()
            .map(|s| (s.hosts, s.desktops))
            .collect();
        assert_eq!(shape, vec![(1, 1), (1, 5)]);
    }

    #[test]
    fn calls_leave_leases_and_background_out() {
        let mut calls = Counts::new();
        calls.insert(("PUT".into(), "leases".into()), 500.0);
        calls.insert(("APPLY".into(), "desktops/status".into()), 40.0);
        let step = Step {
            spec: StepSpec {
                label: String::new(),
                hosts: 1,
                desktops: 10,
                memory: String::new(),
                idle: Duration::ZERO,
                caches: false,
            },
            hosts_ready: Duration::ZERO,
            all_running: Duration::ZERO,
            running: Samples::default(),
            bound: Samples::default(),
            all_bound: Duration::ZERO,
            curve: Vec::new(),
            deleted: None,
            idle_before: Snapshot::default(),
            loaded: Snapshot::default(),
            operator_cpu_busy: Duration::ZERO,
            agents_cpu_busy: Duration::ZERO,
            operator_cpu_idle: Duration::ZERO,
            agents_cpu_idle: Duration::ZERO,
            calls,
            background: 10.0,
            load_before: String::new(),
            load_after: String::new(),
            caches: None,
            operator_reconciles: 0.0,
            desktop_reconciles: 0.0,
            domainnode_reconciles: 0.0,
            resourcepool_reconciles: 0.0,
            agent_reconciles: 0.0,
            agent_status_writes: 0.0,
            events: BTreeMap::new(),
        };
        assert!((step.calls_per_desktop() - 3.0).abs() < 1e-9);
    }
}
