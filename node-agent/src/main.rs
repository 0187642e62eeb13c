//! The node-agent binary: parses the configuration, serves /healthz /readyz /metrics, connects
//! to the API server and libvirt, and runs registration and heartbeat until SIGTERM. Shutdown
//! stops the loops only: running domains are never touched.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use deskvirt_node_agent::agent::{self, AgentConfig};
use deskvirt_node_agent::config::Config;
use deskvirt_node_agent::desktops::DesktopConfig;
use deskvirt_node_agent::disks::{self, QemuImgDeadlines};
use deskvirt_node_agent::domain::inputs::domain_type_str;
use deskvirt_node_agent::heartbeat::HeartbeatConfig;
use deskvirt_node_agent::hypervisor::libvirt::Deadlines;
use deskvirt_node_agent::hypervisor::{Backoff, LibvirtHypervisor};
use deskvirt_node_agent::images::ImagesConfig;
use deskvirt_node_agent::inventory::{InventoryConfig, POLL_INTERVAL};
use deskvirt_node_agent::metrics::Metrics;
use deskvirt_runtime::health::Health;
use deskvirt_runtime::http::Server;
use deskvirt_runtime::{logging, shutdown};

/// How long shutdown waits for libvirt calls in flight before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Async worker threads: the agent's work is I/O (API server, libvirt in blocking threads), so
/// two suffice on any host; tokio's default, one per core, costs a stack and a malloc arena per
/// core on a 64-core KVM host.
const WORKER_THREADS: usize = 2;
/// Blocking threads (libvirt calls, file system): above the desktop controller's concurrency,
/// and a bound on the threads a hung libvirtd can strand (tokio's default is 512).
const MAX_BLOCKING_THREADS: usize = 16;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    logging::init(config.log_format, "info,kube=warn,tower=warn,hyper=warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run(config));
    // A libvirt call stuck in a blocking thread must not hold the exit up.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

async fn run(config: Config) -> anyhow::Result<()> {
    let domain_type = config.domain_type();
    let address = config.address().to_string();
    tracing::info!(
        node = %config.node_name,
        libvirt = %config.libvirt_uri,
        hypervisor = domain_type_str(domain_type),
        address = %address,
        version = env!("CARGO_PKG_VERSION"),
        "starting deskvirt-node-agent"
    );

    if config.lease_duration < config.heartbeat_interval * 2 {
        tracing::warn!(
            lease_duration = ?config.lease_duration,
            heartbeat_interval = ?config.heartbeat_interval,
            "the lease duration is shorter than two heartbeat intervals; one late renewal will mark the host lost"
        );
    }

    let (metrics, registry) = Metrics::new();
    let health = Health::new();
    let server = Server::bind(config.metrics_addr, health.clone(), Arc::new(registry))
        .await
        .context("starting the health and metrics server")?;
    if let Some(addr) = server.local_addr() {
        tracing::info!(%addr, "serving /healthz /readyz /metrics");
    }
    let serve = tokio::spawn(server.run());

    let client = deskvirt_runtime::api::client(&config.api)
        .await
        .context("configuring the Kubernetes client")?;
    let hypervisor = LibvirtHypervisor::with_deadlines(
        &config.libvirt_uri,
        Backoff::default(),
        Deadlines {
            call: config.libvirt_timeout,
            slow: config.libvirt_slow_timeout,
        },
    );
    disks::set_deadlines(QemuImgDeadlines {
        quick: config.qemu_img_timeout,
        copy: config.disk_copy_timeout,
    });
    // The desktop controller says when the host is ready to take in migrations.
    let (inbound_ready, inbound) = tokio::sync::watch::channel(false);
    let agent_config = AgentConfig {
        heartbeat: HeartbeatConfig {
            node_name: config.node_name.clone(),
            namespace: config.lease_namespace.clone(),
            interval: config.heartbeat_interval,
            lease_duration: config.lease_duration,
        },
        inventory: InventoryConfig {
            libvirt_uri: config.libvirt_uri.clone(),
            domain_type,
            address: address.clone(),
            migration: config.migration(),
            inbound,
            refresh_interval: config.refresh_interval,
            poll_interval: POLL_INTERVAL.min(config.heartbeat_interval),
        },
        desktops: DesktopConfig {
            node_name: config.node_name.clone(),
            node_address: address.clone(),
            domain_type,
            console_namespace: config.console_namespace.clone(),
            qemu_img: config.qemu_img.clone(),
            shutdown_grace: config.shutdown_grace,
            managed_save_dir: config.managed_save_dir.clone(),
            activity_interval: config.activity_interval,
            takes_migrations: config.migration().is_some(),
            inbound_ready,
        },
        images: ImagesConfig {
            namespace: config.images_namespace.clone(),
            copies: usize::from(config.image_copies),
            retry: config.image_retry,
            qemu_img_timeout: config.qemu_img_timeout,
            fetch_timeout: config.image_fetch_timeout,
            max_bytes: u64::from(config.image_max_size_gib) << 30,
            reserve_bytes: u64::from(config.image_reserve_gib) << 30,
            capture: deskvirt_node_agent::images::capture::CaptureSettings {
                convert_timeout: config.disk_copy_timeout,
                total_timeout: config.disk_copy_timeout * 4,
                ..Default::default()
            },
        },
        node_labels: config.node_labels.clone(),
        libvirt_timeout: config.libvirt_timeout,
        reconcile_allowance: config.reconcile_allowance(),
    };

    tokio::select! {
        () = agent::run(client, hypervisor, agent_config, metrics, health.clone()) => {
            tracing::error!("agent loops ended unexpectedly");
        }
        () = shutdown::signal_received() => {}
    }
    health.set_ready(false);
    serve.abort();
    tracing::info!("stopped; domains left as they are");
    Ok(())
}
