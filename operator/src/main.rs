//! The `deskvirt-operator` binary: flags, logging, the health and metrics endpoint, the
//! connection to the API server, then the controllers until SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use deskvirt_operator::config::Config;
use deskvirt_operator::metrics::Metrics;
use deskvirt_operator::operator;
use deskvirt_runtime::health::Health;
use deskvirt_runtime::{http, logging, shutdown};
use prometheus_client::registry::Registry;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    logging::init(config.log_format, "info,kube=warn,kube_runtime=warn");
    match run(config).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "operator failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let health = Health::new();
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let server = http::Server::bind(config.metrics_addr, health.clone(), Arc::new(registry))
        .await
        .context("starting the metrics endpoint")?;
    tracing::info!(addr = ?server.local_addr(), "serving /healthz, /readyz and /metrics");
    let server = tokio::spawn(server.run());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown::signal_received().await;
        let _ = stop_tx.send(true);
    });

    let client = tokio::select! {
        c = operator::connect(&config.api) => c?,
        () = operator::stopped(stop_rx.clone()) => { server.abort(); return Ok(()) }
    };
    let result = operator::run(config, client, health.clone(), metrics, stop_rx).await;
    health.set_ready(false);
    server.abort();
    result
}
