//! The real `deskvirt-node-agent` binary against the real API server and libvirt's in-process
//! `test:///default` driver: the host joins as a DomainNode with the driver's facts, owned by
//! the Node of the same name, heartbeats a Lease, serves its endpoints and stops on SIGTERM
//! without touching domains. Every test uses its own node name and removes what it created.

mod common;

use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::time::Duration;

use common::{AGENT, AgentProcess, TEST_URI as URI, eventually, finish};
use deskvirt_crds::DomainNode;
use deskvirt_crds::conditions;
use deskvirt_crds::constants::condition::LIBVIRT_CONNECTED;
use deskvirt_crds::constants::{LEASE_NAMESPACE_DEFAULT, MANAGER_AGENT};
use deskvirt_crds::domain_node::Hypervisor as DomainType;
use deskvirt_crds::quantity::format_bytes;
use deskvirt_node_agent::hypervisor::{Hypervisor, LibvirtHypervisor};
use deskvirt_tests::cluster::{client, ensure_crds, unique_suffix};
use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

type TestResult = anyhow::Result<()>;

async fn setup() -> anyhow::Result<Client> {
    let client = client().await?;
    ensure_crds(&client).await?;
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": { "name": LEASE_NAMESPACE_DEFAULT }
    }))?;
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_already_exists() => {}
        Err(e) => return Err(e.into()),
    }
    Ok(client)
}

/// Deletes the DomainNode and Lease of `node` (created by the agent under test).
async fn cleanup(client: &Client, node: &str) {
    let _ = Api::<DomainNode>::all(client.clone())
        .delete(node, &DeleteParams::default())
        .await;
    let _ = Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE_DEFAULT)
        .delete(node, &DeleteParams::default())
        .await;
}

async fn reported(api: &Api<DomainNode>, node: &str) -> anyhow::Result<DomainNode> {
    eventually(Duration::from_secs(30), "the DomainNode status", || async {
        Ok(api
            .get_opt(node)
            .await?
            .filter(|dn| dn.status.as_ref().is_some_and(|s| s.cpu.is_some())))
    })
    .await
}

#[tokio::test]
async fn registers_reports_heartbeats_and_stops_on_sigterm() -> TestResult {
    let client = setup().await?;
    let node = format!("agent-reg-{}", unique_suffix());
    let mut agent = AgentProcess::start(&node, &[])?;
    let result = AssertUnwindSafe(async {
        let domain_nodes: Api<DomainNode> = Api::all(client.clone());
        let dn = reported(&domain_nodes, &node).await?;
        let status = dn.status.clone().unwrap_or_default();

        // Facts match what the same driver tells this process.
        let hv = LibvirtHypervisor::connect(URI).await?;
        let facts = hv.host_facts(DomainType::Qemu).await?;
        let cpu = status.cpu.clone().unwrap_or_default();
        assert_eq!(cpu.model.as_deref(), Some(facts.cpu_model.as_str()));
        assert_eq!(cpu.sockets, facts.sockets);
        assert_eq!(cpu.cores, facts.cores_per_socket);
        assert_eq!(cpu.threads, facts.cpus);
        assert_eq!(cpu.mhz, facts.mhz);
        assert_eq!(status.memory, Some(format_bytes(facts.memory_bytes)));
        assert_eq!(status.max_vcpus, Some(facts.max_vcpus));
        assert_eq!(status.libvirt_version, Some(facts.libvirt_version.clone()));
        assert_eq!(
            status.hypervisor_version,
            Some(facts.hypervisor_version.clone())
        );
        assert_eq!(status.hypervisor, Some(DomainType::Qemu));
        // Swap and KSM come from this host's /proc and /sys.
        assert!(status.swap.is_some(), "no swap fact");
        assert_eq!(
            status.ksm.is_some(),
            std::path::Path::new("/sys/kernel/mm/ksm/run").exists()
        );
        assert_eq!(status.address.as_deref(), Some("10.11.12.13"));
        assert_eq!(
            status.agent_version.as_deref(),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert!(status.last_report_time.is_some());
        let running = hv
            .list_domains()
            .await?
            .iter()
            .filter(|d| d.state.is_active())
            .count();
        let domains = status.domains.unwrap_or_default();
        assert_eq!(domains.running as usize, running, "{domains:?}");
        assert!(conditions::is_true(&status.conditions, LIBVIRT_CONNECTED));
        assert!(
            dn.metadata.owner_references.unwrap_or_default().is_empty(),
            "no Node of that name, so no owner"
        );

        // The agent owns its status fields and no spec field.
        let managed = dn.metadata.managed_fields.unwrap_or_default();
        let ours: Vec<_> = managed
            .iter()
            .filter(|m| m.manager.as_deref() == Some(MANAGER_AGENT))
            .collect();
        anyhow::ensure!(!ours.is_empty(), "no managedFields of {MANAGER_AGENT}");
        let fields: Vec<String> = ours
            .iter()
            .map(|m| serde_json::to_string(&m.fields_v1).unwrap_or_default())
            .collect();
        let owns = |path: &str| fields.iter().any(|f| f.contains(path));
        for f in [
            "f:cpu",
            "f:memory",
            "f:maxVcpus",
            "f:domains",
            "f:address",
            "f:agentVersion",
        ] {
            assert!(
                owns(f),
                "{MANAGER_AGENT} does not own status {f}: {fields:?}"
            );
        }
        assert!(owns("LibvirtConnected"), "{fields:?}");
        assert!(owns("f:status"), "{fields:?}");
        assert!(!owns("f:unschedulable") && !owns("f:maintenance"));
        assert!(ours.iter().all(|m| m.operation.as_deref() == Some("Apply")));

        // The Lease is held by the host and renewed every interval.
        let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE_DEFAULT);
        let first = eventually(Duration::from_secs(20), "the Lease", || async {
            Ok(leases.get_opt(&node).await?.and_then(|l| l.spec))
        })
        .await?;
        assert_eq!(first.holder_identity.as_deref(), Some(node.as_str()));
        assert_eq!(first.lease_duration_seconds, Some(40));
        let t0 = first
            .renew_time
            .ok_or_else(|| anyhow::anyhow!("no renewTime"))?
            .0;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let later = leases
            .get(&node)
            .await?
            .spec
            .and_then(|s| s.renew_time)
            .ok_or_else(|| anyhow::anyhow!("no renewTime"))?
            .0;
        let advanced = later.duration_since(t0).as_secs_f64();
        assert!(
            advanced >= 1.5,
            "renewTime advanced by {advanced}s over two intervals"
        );

        // Endpoints.
        assert!(
            agent
                .http_get("/healthz")
                .await?
                .starts_with("HTTP/1.1 200")
        );
        let ready = eventually(Duration::from_secs(10), "/readyz", || async {
            let r = agent.http_get("/readyz").await?;
            Ok(r.starts_with("HTTP/1.1 200").then_some(r))
        })
        .await?;
        assert!(ready.contains("ok"));
        let metrics = agent.http_get("/metrics").await?;
        for m in [
            "deskvirt_agent_heartbeat_total",
            "deskvirt_agent_heartbeat_failures_total",
            "deskvirt_agent_libvirt_connected 1",
            "deskvirt_agent_domains{state=\"running\"}",
        ] {
            assert!(metrics.contains(m), "{m} missing from {metrics}");
        }

        // SIGTERM: exit 0 within 10 s.
        let exit = agent.terminate(Duration::from_secs(10))?;
        let exit = exit.ok_or_else(|| anyhow::anyhow!("agent still running 10s after SIGTERM"))?;
        assert!(exit.success(), "agent exited with {exit}");
        Ok(())
    })
    .catch_unwind()
    .await;
    // Stopped first, so it cannot register again after the cleanup.
    drop(agent);
    cleanup(&client, &node).await;
    finish(result)
}

#[tokio::test]
async fn owned_by_the_node_of_the_same_name_once_it_exists() -> TestResult {
    let client = setup().await?;
    let node = format!("agent-own-{}", unique_suffix());
    let nodes: Api<Node> = Api::all(client.clone());
    let agent = AgentProcess::start(&node, &["--refresh-interval", "1s"])?;
    let result = AssertUnwindSafe(async {
        let domain_nodes: Api<DomainNode> = Api::all(client.clone());
        let dn = reported(&domain_nodes, &node).await?;
        assert!(dn.metadata.owner_references.unwrap_or_default().is_empty());

        let created = nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({
                    "metadata": { "name": node, "labels": { "deskvirt.io/test": "true" } }
                }))?,
            )
            .await?;
        let uid = created.metadata.uid.unwrap_or_default();
        let owners = eventually(Duration::from_secs(20), "the owner reference", || async {
            Ok(domain_nodes
                .get(&node)
                .await?
                .metadata
                .owner_references
                .filter(|o| !o.is_empty()))
        })
        .await?;
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "Node");
        assert_eq!(owners[0].api_version, "v1");
        assert_eq!(owners[0].name, node);
        assert_eq!(owners[0].uid, uid);

        // Deleted under the agent: it registers again, with the owner and the facts.
        let old_uid = domain_nodes.get(&node).await?.metadata.uid;
        domain_nodes.delete(&node, &DeleteParams::default()).await?;
        let again = eventually(Duration::from_secs(20), "re-registration", || async {
            Ok(domain_nodes.get_opt(&node).await?.filter(|dn| {
                dn.metadata.uid != old_uid && dn.status.as_ref().is_some_and(|s| s.cpu.is_some())
            }))
        })
        .await?;
        let owners = again.metadata.owner_references.unwrap_or_default();
        assert!(owners.iter().any(|o| o.uid == uid), "{owners:?}");
        Ok(())
    })
    .catch_unwind()
    .await;
    // Stopped first, so it cannot register again after the cleanup.
    drop(agent);
    let _ = nodes.delete(&node, &DeleteParams::default()).await;
    cleanup(&client, &node).await;
    finish(result)
}

#[tokio::test]
async fn reports_libvirt_down_and_counts_heartbeat_failures() -> TestResult {
    let client = setup().await?;
    let node = format!("agent-down-{}", unique_suffix());
    let missing_ns = format!("agent-missing-{}", unique_suffix());
    let agent = AgentProcess::start_with(
        &node,
        "test:///nonexistent-deskvirt/agent.xml",
        &missing_ns,
        &[],
    )?;
    let result = AssertUnwindSafe(async {
        let domain_nodes: Api<DomainNode> = Api::all(client.clone());
        let dn = eventually(Duration::from_secs(30), "the DomainNode", || async {
            Ok(domain_nodes
                .get_opt(&node)
                .await?
                .filter(|dn| dn.status.is_some()))
        })
        .await?;
        let status = dn.status.unwrap_or_default();
        let condition = conditions::find(&status.conditions, LIBVIRT_CONNECTED)
            .ok_or_else(|| anyhow::anyhow!("no LibvirtConnected condition"))?;
        assert_eq!(condition.status, "False");
        assert_eq!(condition.reason, "Unreachable");
        assert!(status.cpu.is_none(), "no facts were ever read");
        assert_eq!(status.hypervisor, Some(DomainType::Qemu));
        assert_eq!(status.address.as_deref(), Some("10.11.12.13"));

        assert!(
            agent
                .http_get("/healthz")
                .await?
                .starts_with("HTTP/1.1 200")
        );
        assert!(agent.http_get("/readyz").await?.starts_with("HTTP/1.1 503"));
        let metrics = eventually(Duration::from_secs(10), "a failed heartbeat", || async {
            let m = agent.http_get("/metrics").await?;
            Ok((!m.contains("deskvirt_agent_heartbeat_failures_total 0")).then_some(m))
        })
        .await?;
        assert!(
            metrics.contains("deskvirt_agent_libvirt_connected 0"),
            "{metrics}"
        );
        assert!(
            metrics.contains("deskvirt_agent_heartbeat_total 0"),
            "{metrics}"
        );
        Ok(())
    })
    .catch_unwind()
    .await;
    // Stopped first, so it cannot register again after the cleanup.
    drop(agent);
    cleanup(&client, &node).await;
    finish(result)
}

#[test]
fn help_lists_every_flag() -> TestResult {
    let out = Command::new(AGENT).arg("--help").output()?;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--node-name",
        "NODE_NAME",
        "--libvirt-uri",
        "LIBVIRT_URI",
        "qemu:///system",
        "--hypervisor",
        "DESKVIRT_HYPERVISOR",
        "--heartbeat-interval",
        "--lease-duration",
        "--lease-namespace",
        "deskvirt-system",
        "--metrics-addr",
        "0.0.0.0:8081",
        "--node-address",
        "NODE_ADDRESS",
        "--log-format",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    let missing = Command::new(AGENT).env_remove("NODE_NAME").output()?;
    assert!(!missing.status.success(), "--node-name is required");
    Ok(())
}
