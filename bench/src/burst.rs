//! Bursts of small desktops: creation → Ready per desktop, the mutating API calls they cost
//! (apiserver counters before and after, less the background rate measured just before), and
//! the operator's and agent's footprint once the largest burst is Ready.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use kube::api::{ListParams, PostParams};
use kube::{Client, ResourceExt};

use crate::env::{Env, small_desktop};
use crate::footprint;
use crate::stats::Samples;
use deskvirt_tests::apimetrics::{self, Counts};

/// How long a burst may take to be Ready.
const LIMIT: Duration = Duration::from_secs(600);

/// One burst's figures.
#[derive(Debug)]
pub struct BurstResult {
    pub label: String,
    pub count: usize,
    pub ready: Samples,
    /// From the first create to the last Ready.
    pub all_ready: Duration,
    /// Mutating calls during the burst window, minus the background estimate.
    pub calls: Counts,
    pub calls_total: f64,
    pub background: f64,
}

/// Apiserver background: mutating calls per second over `window` while the run is idle.
pub async fn background_rate(client: &Client, window: Duration) -> anyhow::Result<(f64, Counts)> {
    let before = apimetrics::scrape(client).await?;
    tokio::time::sleep(window).await;
    let after = apimetrics::scrape(client).await?;
    let d = apimetrics::delta(&before, &after);
    Ok((apimetrics::total(&d) / window.as_secs_f64(), d))
}

/// Creates `count` desktops named `burst-<tag>-NN` (`label` is for the report), at `rate` per second or all at once, and waits until all are Ready.
pub async fn run(
    env: &Env,
    tag: &str,
    label: &str,
    count: usize,
    rate: Option<f64>,
    background_per_s: f64,
) -> anyhow::Result<BurstResult> {
    let group = format!("burst-{tag}");
    let api = env.desktops();
    let before = apimetrics::scrape(&env.client).await?;
    let window = Instant::now();
    let created: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let creations = (0..count).map(|i| {
        let api = api.clone();
        let created = created.clone();
        let name = format!("{group}-{i:02}");
        let desktop = small_desktop(env, &name, &group);
        async move {
            if let Some(r) = rate {
                tokio::time::sleep_until((window + Duration::from_secs_f64(i as f64 / r)).into())
                    .await;
            }
            let desktop = desktop?;
            let t = Instant::now();
            api.create(&PostParams::default(), &desktop).await?;
            if let Ok(mut m) = created.lock() {
                m.insert(name, t);
            }
            Ok::<(), anyhow::Error>(())
        }
    });
    let waiter = wait_ready(env, &group, count, created.clone());
    let (creates, ready) = tokio::join!(join_all(creations), waiter);
    for c in creates {
        c?;
    }
    let ready = ready?;
    let all_ready = window.elapsed();
    // Let the last status writes land before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = apimetrics::scrape(&env.client).await?;
    let elapsed = window.elapsed().as_secs_f64();
    let calls = apimetrics::delta(&before, &after);
    let background = background_per_s * elapsed;
    Ok(BurstResult {
        label: label.to_string(),
        count,
        ready,
        all_ready,
        calls_total: apimetrics::total(&calls) - background,
        calls,
        background,
    })
}

/// Polls the burst's desktops every 100 ms; each one's creation → first seen Ready.
async fn wait_ready(
    env: &Env,
    group: &str,
    count: usize,
    created: Arc<std::sync::Mutex<HashMap<String, Instant>>>,
) -> anyhow::Result<Samples> {
    let api = env.desktops();
    let lp = ListParams::default().labels(&format!("deskvirt.io/bench={group}"));
    let started = Instant::now();
    let mut ready: HashMap<String, Duration> = HashMap::new();
    while ready.len() < count {
        anyhow::ensure!(
            started.elapsed() < LIMIT,
            "{group}: only {} of {count} Ready after {LIMIT:?}",
            ready.len()
        );
        let now = Instant::now();
        for d in api.list(&lp).await?.items {
            let name = d.name_any();
            if ready.contains_key(&name) {
                continue;
            }
            let is_ready = d.status.as_ref().is_some_and(|s| {
                deskvirt_crds::conditions::find(&s.conditions, "Ready")
                    .is_some_and(|c| c.status == "True")
            });
            let t0 = created.lock().ok().and_then(|m| m.get(&name).copied());
            if let (true, Some(t0)) = (is_ready, t0) {
                ready.insert(name, now.saturating_duration_since(t0));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Samples::new(ready.into_values().collect()))
}

/// Operator and agent resident memory now, and their CPU time over `window` of idleness.
#[derive(Debug, Default)]
pub struct Footprint {
    pub desktops: usize,
    pub operator_rss: u64,
    pub agent_rss: u64,
    pub window: Duration,
    pub operator_cpu: Duration,
    pub agent_cpu: Duration,
}

pub async fn footprint(env: &Env, desktops: usize, window: Duration) -> anyhow::Result<Footprint> {
    let (Some(op), Some(ag)) = env.pids() else {
        anyhow::bail!("operator or agent not running");
    };
    let (op0, ag0) = (footprint::cpu_time(op)?, footprint::cpu_time(ag)?);
    tokio::time::sleep(window).await;
    Ok(Footprint {
        desktops,
        operator_rss: footprint::rss_bytes(op)?,
        agent_rss: footprint::rss_bytes(ag)?,
        window,
        operator_cpu: footprint::cpu_time(op)?.saturating_sub(op0),
        agent_cpu: footprint::cpu_time(ag)?.saturating_sub(ag0),
    })
}
