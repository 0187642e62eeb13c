//! Wires the agent together: waits for the API server, then runs the heartbeat, the
//! inventory loop, the Desktop controller and the image copies side by side; readiness
//! follows "API server reached and libvirt answers"; liveness follows the heartbeat and
//! inventory loops' progress (each must complete a round within twice its worst case, every
//! call of it timing out).
//! Dropping the future stops everything without touching any domain; only the Desktop
//! controller changes domains, and only as Desktops ask.

use std::sync::Arc;
use std::time::Duration;

use deskvirt_runtime::health::Health;
use kube::Client;

use crate::desktops::{self, DesktopConfig, DesktopContext};
use crate::heartbeat::{self, HeartbeatConfig};
use crate::hypervisor::{Backoff, Hypervisor};
use crate::images::{self, ImagesConfig};
use crate::inventory::{self, InventoryConfig};
use crate::metrics::Metrics;
use crate::registration::Registrar;

/// How often a host that takes in migrations checks that its pool's network is defined.
const INBOUND_CHECK: Duration = Duration::from_secs(5);
/// How often the agent looks at the disks asked of it for cold moves (a cached read; the
/// move waits for the answer).
const INCOMING_CHECK: Duration = Duration::from_secs(1);

/// Everything the agent's loops need.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Heartbeat settings.
    pub heartbeat: HeartbeatConfig,
    /// Inventory settings.
    pub inventory: InventoryConfig,
    /// Desktop controller settings.
    pub desktops: DesktopConfig,
    /// DesktopImage copy settings.
    pub images: ImagesConfig,
    /// Labels kept on the DomainNode.
    pub node_labels: std::collections::BTreeMap<String, String>,
    /// The deadline of one libvirt call (for the inventory loop's liveness allowance).
    pub libvirt_timeout: Duration,
    /// How long one desktop reconcile may be in flight before liveness fails.
    pub reconcile_allowance: Duration,
}

impl AgentConfig {
    /// How long the heartbeat loop may go without completing a round: twice its worst round.
    pub fn heartbeat_allowance(&self) -> Duration {
        2 * (self.heartbeat.interval + heartbeat::call_timeout(&self.heartbeat))
    }

    /// How long the inventory loop may go without completing a round: twice its worst round
    /// (a poll interval, three libvirt calls and four API calls, each timing out).
    pub fn inventory_allowance(&self) -> Duration {
        2 * (self.inventory.poll_interval
            + 3 * self.libvirt_timeout
            + 4 * crate::registration::CALL_TIMEOUT)
    }
}

/// `error: cause: cause` in one line, for logs; an API error ends the chain as
/// `<code> <reason>: <message>`, and a cause already quoted by its parent is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(kube::Error::Api(status)) = s.downcast_ref::<kube::Error>() {
            out.push_str(&format!(
                ": {} {}: {}",
                status.code, status.reason, status.message
            ));
            break;
        }
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Asks the API server for its version until it answers.
pub async fn wait_for_apiserver(client: &Client) {
    let backoff = Backoff {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(15),
    };
    let mut failures = 0u32;
    loop {
        match tokio::time::timeout(Duration::from_secs(15), client.apiserver_version()).await {
            Ok(Ok(info)) => {
                tracing::info!(version = %info.git_version, "API server reached");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %error_chain(&e), "API server not reachable yet");
            }
            Err(_) => tracing::warn!("API server did not answer within 15s"),
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(backoff.delay(failures)).await;
    }
}

/// Runs the agent until the future is dropped.
pub async fn run<H: Hypervisor + Clone + 'static>(
    client: Client,
    hypervisor: H,
    config: AgentConfig,
    metrics: Metrics,
    health: Health,
) {
    wait_for_apiserver(&client).await;
    let registrar = Registrar::new(client.clone(), &config.heartbeat.node_name)
        .with_labels(config.node_labels.clone());
    let orphan_sweep = config.inventory.refresh_interval;
    let inventory_beat = health.watch("inventory", config.inventory_allowance());
    let heartbeat_beat = health.watch("heartbeat", config.heartbeat_allowance());
    let reconciles = health.watch_work("desktop reconciles", config.reconcile_allowance);
    let ready = health.clone();
    let inventory = inventory::run(
        &hypervisor,
        &registrar,
        config.inventory,
        &metrics,
        move |connected| ready.set_ready(connected),
        inventory_beat,
    );
    let heartbeat = heartbeat::run(
        client.clone(),
        config.heartbeat,
        metrics.clone(),
        heartbeat_beat,
    );
    let desktops = async {
        let ctx = Arc::new(
            DesktopContext::start(
                client,
                hypervisor.clone(),
                config.desktops,
                metrics.clone(),
                reconciles,
            )
            .await,
        );
        tracing::info!("desktop controller started");
        tokio::join!(
            desktops::run(Arc::clone(&ctx)),
            desktops::inbound::run(Arc::clone(&ctx), INBOUND_CHECK),
            desktops::incoming::run(Arc::clone(&ctx), INCOMING_CHECK),
            desktops::backup_removal::run(Arc::clone(&ctx)),
            images::run(Arc::clone(&ctx), config.images),
            desktops::orphans::run(ctx, orphan_sweep)
        );
    };
    tokio::join!(inventory, heartbeat, desktops);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot renew Lease ns/h1")]
    struct Outer {
        source: kube::Error,
    }

    #[test]
    fn api_errors_are_short() {
        let status =
            kube::core::Status::failure("namespaces \"ns\" not found", "NotFound").with_code(404);
        let e = Outer {
            source: kube::Error::Api(Box::new(status)),
        };
        assert_eq!(
            error_chain(&e),
            "cannot renew Lease ns/h1: 404 NotFound: namespaces \"ns\" not found"
        );
    }
}
