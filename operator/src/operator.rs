//! Wiring: connect to the API server, start the watch caches, the leader elector and the three
//! controllers, and stop them all when asked.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use deskvirt_crds::constants::LEADER_LEASE;
use deskvirt_runtime::health::Health;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::config::Config;
use crate::context::{Context, Stores};
use crate::controllers::{desktop, domain_node, resource_pool};
use crate::leader::{self, Elector};
use crate::metrics::Metrics;

pub use crate::context::stopped;

/// A client from the in-cluster config or `KUBECONFIG`, once the API server answers.
pub async fn connect() -> anyhow::Result<Client> {
    let client = Client::try_default()
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
/// leader Lease is released.
pub async fn run(
    config: Config,
    client: Client,
    health: Health,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let identity = config.identity();
    let stores = Stores::start(
        &client,
        &config.namespace,
        &config.label_selector,
        stop.clone(),
    );
    let (leader_tx, leader_rx) = watch::channel(false);
    let ctx = Arc::new(Context::new(
        client.clone(),
        &identity,
        metrics,
        config.namespace.clone(),
        config.host_timeout,
        leader_rx,
        stores,
    ));
    health.set_ready(true);
    tracing::info!(%identity, namespace = %config.namespace, "operator started");
    let elector = Elector {
        api: Api::namespaced(client, &config.namespace),
        name: LEADER_LEASE.to_string(),
        identity,
        duration: config.leader_lease_duration,
    };
    let election = tokio::spawn(leader::run(elector, ctx.clone(), leader_tx, stop.clone()));
    let sel = config.label_selector.clone();
    tokio::join!(
        desktop::run(ctx.clone(), sel.clone(), stop.clone()),
        domain_node::run(ctx.clone(), sel.clone(), stop.clone()),
        resource_pool::run(ctx.clone(), sel, stop.clone()),
    );
    let _ = election.await;
    Ok(())
}
