//! Wiring: connect to the API server, start the watch caches, the leader elector, the
//! controllers and the mirror sweep, and stop them all when asked. Ready once every watch
//! cache has synced; live while the async runtime turns (a beat every few seconds).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use deskvirt_crds::constants::LEADER_LEASE;
use deskvirt_runtime::api::{self, ApiTimeouts};
use deskvirt_runtime::health::Health;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::coalesce::Coalescer;
use crate::config::Config;
use crate::context::{Context, Namespaces, Reconciles, Stores};
use crate::controllers::{backup, desktop, domain_node, drain, image, migration, resource_pool};
use crate::fence::Fence;
use crate::leader::{self, Elector};
use crate::metrics::Metrics;
use crate::sweep;

pub use crate::context::stopped;

/// How often the operator's runtime beat ticks; liveness fails after six missed beats.
const RUNTIME_BEAT: Duration = Duration::from_secs(5);

/// How long one reconcile may be in flight before liveness fails: a pass makes a handful of
/// API calls of at most 10 s each (`runtime::api`) and may wait for the ledger behind the
/// others in flight, so five minutes is a stuck pass, not a slow one.
const RECONCILE_ALLOWANCE: Duration = Duration::from_secs(300);

/// A client from the in-cluster config or `KUBECONFIG` with the deadlines of `timeouts`, once
/// the API server answers.
pub async fn connect(timeouts: &ApiTimeouts) -> anyhow::Result<Client> {
    let client = api::client(timeouts)
        .await
        .context("no Kubernetes client configuration")?;
    let mut delay = Duration::from_millis(500);
    loop {
        match client.apiserver_version().await {
            Ok(v) => {
                tracing::info!(version = %v.git_version, "connected to the API server");
                return Ok(client);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "API server not reachable");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Runs the operator until `stop` flips; returns once every controller has stopped and the
/// leader Lease is released. Everything runs inside the returned future (nothing is spawned
/// that outlives it), so dropping it stops the replica at once, as a crash would.
pub async fn run(
    config: Config,
    client: Client,
    health: Health,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let identity = config.identity();
    // Caches and the Lease outlive the controllers: they stop once the controllers are done.
    let (drained_tx, drained) = watch::channel(false);
    let (stores, caches) = Stores::start(
        &client,
        &config.namespace,
        &config.console_namespace,
        &config.label_selector,
        drained.clone(),
    );
    let (leader_tx, leader_rx) = watch::channel(false);
    let mut ctx = Context::new(
        client.clone(),
        &identity,
        metrics,
        Namespaces {
            system: config.namespace.clone(),
            console: config.console_namespace.clone(),
            users: config.console_user_namespaces(),
        },
        config.host_timeout,
        leader_rx,
        stores,
    );
    ctx.pool_status = Coalescer::new(config.pool_status_interval);
    ctx.fence = Fence::new(config.leader_clock_skew, ctx.metrics.fenced_writes.clone());
    ctx.test_bind_delay = config.test_bind_delay;
    ctx.images_namespace = config.images_namespace.clone();
    ctx.migrations = crate::context::MigrationSettings {
        limits: deskvirt_core::migration::Limits {
            per_pool: config.migrations_per_pool,
            per_host: config.migrations_per_host,
        },
        pending_timeout: config.migration_pending_timeout,
        start_timeout: config.migration_start_timeout,
    };
    ctx.reconciles = Reconciles::watched(&health, RECONCILE_ALLOWANCE);
    let ctx = Arc::new(ctx);
    tracing::info!(%identity, namespace = %config.namespace, "operator started");
    let synced = async {
        if ctx.stores.ready().await {
            health.set_ready(true);
            tracing::info!("watch caches synced; ready");
        }
    };
    let beat = health.watch("runtime", 6 * RUNTIME_BEAT);
    let turning = async {
        let mut ticker = tokio::time::interval(RUNTIME_BEAT);
        loop {
            tokio::select! {
                _ = ticker.tick() => beat.tick(),
                () = stopped(stop.clone()) => return,
            }
        }
    };
    let elector = Elector {
        api: Api::namespaced(client, &config.namespace),
        name: LEADER_LEASE.to_string(),
        identity,
        duration: config.leader_lease_duration,
    };
    let sel = config.label_selector.clone();
    let controllers = async {
        tokio::join!(
            desktop::run(ctx.clone(), sel.clone(), stop.clone()),
            migration::run(ctx.clone(), sel.clone(), stop.clone()),
            migration::incoming::run(ctx.clone(), stop.clone()),
            backup::run(ctx.clone(), sel.clone(), stop.clone()),
            backup::restore_over::run(ctx.clone(), sel.clone(), stop.clone()),
            backup::orphans::run(ctx.clone(), stop.clone()),
            backup::schedule::run(ctx.clone(), stop.clone()),
            domain_node::run(ctx.clone(), sel.clone(), stop.clone()),
            drain::run(ctx.clone(), sel.clone(), stop.clone()),
            image::run(ctx.clone(), sel.clone(), stop.clone()),
            resource_pool::run(ctx.clone(), sel, stop.clone()),
            sweep::run(ctx.clone(), config.mirror_sweep_interval, stop.clone()),
        );
        let _ = drained_tx.send(true);
    };
    tokio::join!(
        caches,
        leader::run(elector, ctx.clone(), leader_tx, drained),
        controllers,
        synced,
        turning,
    );
    Ok(())
}
