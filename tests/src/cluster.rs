//! The real control plane under test: `KUBECONFIG` when set (the test command sets it), else the
//! local plane started by `scripts/control-plane.sh start`. Never a mock.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::sync::OnceCell;

/// The repository root (for scripts, examples and the chart).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Path of the kubeconfig of the cluster under test, starting the local plane if needed.
pub fn kubeconfig_path() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("KUBECONFIG")
        && !p.is_empty()
    {
        return Ok(PathBuf::from(p));
    }
    let out = Command::new(repo_root().join("scripts/control-plane.sh"))
        .arg("start")
        .output()
        .context("running scripts/control-plane.sh start")?;
    if !out.status.success() {
        bail!(
            "control plane did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(path))
}

/// A client for the cluster under test (admin credentials).
pub async fn client() -> anyhow::Result<Client> {
    let path = kubeconfig_path()?;
    let kc = Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

static CRDS: OnceCell<()> = OnceCell::const_new();

/// Installs the CRDs with server-side apply (once per test process) and waits until every one
/// is Established.
pub async fn ensure_crds(client: &Client) -> anyhow::Result<()> {
    CRDS.get_or_try_init(|| async {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        let pp = PatchParams::apply("deskvirt-tests").force();
        for crd in deskvirt_crds::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &pp, &Patch::Apply(&crd))
                .await
                .with_context(|| format!("applying CRD {name}"))?;
        }
        for crd in deskvirt_crds::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            wait_established(&api, &name).await?;
        }
        Ok::<(), anyhow::Error>(())
    })
    .await?;
    Ok(())
}

async fn wait_established(api: &Api<CustomResourceDefinition>, name: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        let crd = api.get(name).await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("CRD {name} did not become Established within 30s")
}

/// A fresh namespace named `<prefix>-<random>`, deleted when the guard drops (best effort,
/// synchronously with kubectl, so it happens even when the test's async runtime is gone).
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> anyhow::Result<Self> {
        let name = format!("{prefix}-{}", unique_suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "deskvirt.io/test": "true" } }
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(Self { name })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = crate::kubectl::kubectl(
            &[
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ],
            None,
        );
    }
}

/// A short random-enough suffix for names (time and process id; no rand dependency).
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:x}",
        (nanos ^ (std::process::id() << 8)).wrapping_add(n.wrapping_mul(0x9e37_79b9)) & 0x00ff_ffff
    )
}
