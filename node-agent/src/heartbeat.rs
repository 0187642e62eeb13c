//! The host's heartbeat: a `coordination.k8s.io/v1` Lease named after the host, held by it and
//! renewed every interval with server-side apply (which also creates it). The operator declares
//! the host lost when `renewTime + leaseDurationSeconds` passes. Failures are logged, counted
//! and retried at the next tick; the loop never ends on its own.

use std::time::Duration;

use deskvirt_crds::constants::{LABEL_MANAGED_BY, MANAGER_AGENT};
use deskvirt_runtime::health::Beat;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::time::MissedTickBehavior;

use crate::metrics::Metrics;

/// Why one renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The API server refused or failed the apply.
    #[error("cannot renew Lease {namespace}/{name}")]
    Renew {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    /// The API server did not answer in time.
    #[error("renewing Lease {namespace}/{name} timed out after {after:?}")]
    Timeout {
        namespace: String,
        name: String,
        after: Duration,
    },
}

/// What the heartbeat writes.
#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    /// Host name: the Lease name and its holder.
    pub node_name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// Renewal period.
    pub interval: Duration,
    /// `leaseDurationSeconds`.
    pub lease_duration: Duration,
}

/// The Lease as the agent applies it at `now` (acquired at `acquired`).
pub fn lease(config: &HeartbeatConfig, acquired: Timestamp, now: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(config.node_name.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some([(LABEL_MANAGED_BY.to_string(), MANAGER_AGENT.to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(config.node_name.clone()),
            lease_duration_seconds: Some(
                i32::try_from(config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            ..LeaseSpec::default()
        }),
    }
}

/// The deadline of one renewal.
pub fn call_timeout(config: &HeartbeatConfig) -> Duration {
    config.interval.max(Duration::from_secs(5))
}

/// Renews the Lease every interval until the future is dropped; `beat` ticks after each try.
pub async fn run(client: Client, config: HeartbeatConfig, metrics: Metrics, beat: Beat) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let acquired = Timestamp::now();
    let call_timeout = call_timeout(&config);
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = 0u64;
    loop {
        ticker.tick().await;
        match renew(&api, &config, acquired, call_timeout).await {
            Ok(()) => {
                metrics.heartbeats.inc();
                if failing > 0 {
                    tracing::info!(after_failures = failing, "heartbeat renewed again");
                }
                failing = 0;
            }
            Err(e) => {
                metrics.heartbeat_failures.inc();
                failing += 1;
                tracing::warn!(error = %crate::agent::error_chain(&e), failures = failing, "heartbeat failed; retrying at the next interval");
            }
        }
        beat.tick();
    }
}

async fn renew(
    api: &Api<Lease>,
    config: &HeartbeatConfig,
    acquired: Timestamp,
    call_timeout: Duration,
) -> Result<(), HeartbeatError> {
    let body = lease(config, acquired, Timestamp::now());
    let pp = PatchParams::apply(MANAGER_AGENT).force();
    match tokio::time::timeout(
        call_timeout,
        api.patch(&config.node_name, &pp, &Patch::Apply(&body)),
    )
    .await
    {
        Ok(Ok(_)) => {
            tracing::trace!(lease = %config.node_name, "heartbeat renewed");
            Ok(())
        }
        Ok(Err(source)) => Err(HeartbeatError::Renew {
            namespace: config.namespace.clone(),
            name: config.node_name.clone(),
            source,
        }),
        Err(_) => Err(HeartbeatError::Timeout {
            namespace: config.namespace.clone(),
            name: config.node_name.clone(),
            after: call_timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_is_held_by_the_host() -> Result<(), serde_json::Error> {
        let config = HeartbeatConfig {
            node_name: "h1".into(),
            namespace: "deskvirt-system".into(),
            interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(40),
        };
        let now = Timestamp::UNIX_EPOCH;
        let value = serde_json::to_value(lease(&config, now, now))?;
        assert_eq!(value["apiVersion"], "coordination.k8s.io/v1");
        assert_eq!(value["kind"], "Lease");
        assert_eq!(value["spec"]["holderIdentity"], "h1");
        assert_eq!(value["spec"]["leaseDurationSeconds"], 40);
        assert!(value["spec"]["renewTime"].is_string());
        Ok(())
    }
}
