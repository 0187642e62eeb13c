//! Fixtures shared by the node-agent's integration tests: Desktops from inline JSON, a host
//! context, a binding, golden-file comparison, the agent process, and ([`world`]) the agent
//! tests' cluster and host.
#![allow(dead_code)]

pub mod world;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use deskvirt_crds::constants::LEASE_NAMESPACE_DEFAULT;
use deskvirt_tests::cluster::kubeconfig_path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use std::time::{SystemTime, UNIX_EPOCH};

use deskvirt_crds::{Desktop, DesktopSpec};
use deskvirt_node_agent::domain::{Binding, DomainType, HostContext, NetworkAttachment, Secret};
use kube::api::ObjectMeta;

/// A UID that is a valid UUID.
pub const UID: &str = "6f1c2b9e-3d4a-4b5c-8d6e-7f8091a2b3c4";

/// A Desktop with the given spec (inline JSON, as a user would write it in YAML).
pub fn desktop(namespace: &str, name: &str, uid: &str, spec: serde_json::Value) -> Desktop {
    let spec: DesktopSpec = match serde_json::from_value(spec) {
        Ok(spec) => spec,
        Err(e) => panic!("fixture spec does not parse: {e}"),
    };
    let mut desktop = Desktop::new(name, spec);
    desktop.metadata = ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        uid: Some(uid.to_string()),
        ..ObjectMeta::default()
    };
    desktop
}

/// The smallest spec a user can write.
pub fn minimal_spec() -> serde_json::Value {
    serde_json::json!({ "pool": "default", "disk": { "image": "debian-12.qcow2" } })
}

/// A host in a nat pool named `default`.
pub fn host() -> HostContext {
    HostContext {
        node_name: "node-1".into(),
        domain_type: DomainType::Kvm,
        image_dir: "/var/lib/deskvirt/images".into(),
        disk_dir: "/var/lib/deskvirt/disks".into(),
        network: NetworkAttachment::Network {
            name: "deskvirt-default".into(),
        },
        spice_listen: "10.0.0.11".into(),
        spice_tls: false,
    }
}

/// `desktop`'s spec read as the agent reads it, in a pool with the default spec.
pub fn valid(desktop: &Desktop) -> deskvirt_crds::validation::ValidDesktop {
    match deskvirt_crds::validation::read_desktop(&desktop.spec, None) {
        Ok(v) => v,
        Err(e) => panic!("fixture spec does not read: {e:?}"),
    }
}

/// The operator's binding to `node-1`.
pub fn binding() -> Binding {
    Binding {
        node: "node-1".into(),
        spice_port: 5901,
        mac: "52:54:00:12:34:56".into(),
        spice_password: Secret::new("s3cret-pw"),
        pinned_cpus: Vec::new(),
    }
}

fn golden_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(file)
}

/// Compares `actual` with `tests/golden/<file>`; with `UPDATE_GOLDEN=1` rewrites the file.
pub fn assert_golden(file: &str, actual: &str) {
    let path = golden_path(file);
    if std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        if let Err(e) = std::fs::write(&path, actual) {
            panic!("cannot write {}: {e}", path.display());
        }
        return;
    }
    let expected = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => panic!(
            "cannot read {} ({e}); run with UPDATE_GOLDEN=1 to create it",
            path.display()
        ),
    };
    assert!(
        expected == actual,
        "{} differs from the generated XML (run with UPDATE_GOLDEN=1 to accept):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    deskvirt_tests::cluster::repo_root()
}

/// Runs a command; panics with its output when it cannot run or fails. Returns stdout.
pub fn run(what: &str, cmd: &mut Command) -> String {
    deskvirt_tests::host::run(what, cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    deskvirt_tests::host::free_port().unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
}

/// A value unique to this process and call, for names, UIDs, MACs and passwords.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    (u64::from(std::process::id()) << 24)
        ^ u64::from(nanos >> 8)
        ^ (NEXT.fetch_add(1, Ordering::Relaxed) << 40)
}

/// Starts libvirt and builds (or finds) the tiny guest; returns the guest directory.
pub fn prepare_host() -> String {
    deskvirt_tests::host::prepare_host()
        .unwrap_or_else(|e| panic!("{e:#}"))
        .display()
        .to_string()
}

/// The agent binary under test.
pub const AGENT: &str = env!("CARGO_BIN_EXE_deskvirt-node-agent");
/// The in-process libvirt driver.
pub const TEST_URI: &str = "test:///default";

/// The agent process; killed when dropped if it still runs.
pub struct AgentProcess {
    pub child: Child,
    pub metrics_port: u16,
}

impl AgentProcess {
    pub fn start(node: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(node, TEST_URI, LEASE_NAMESPACE_DEFAULT, extra)
    }

    pub fn start_with(
        node: &str,
        uri: &str,
        lease_ns: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_binary(Path::new(AGENT), node, uri, lease_ns, extra)
    }

    /// [`Self::start_with`] for another build of the agent (the previous release's, say).
    pub fn start_binary(
        bin: &Path,
        node: &str,
        uri: &str,
        lease_ns: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let metrics_port = free_port();
        let child = Command::new(bin)
            .env("KUBECONFIG", kubeconfig_path()?)
            .env(
                "RUST_LOG",
                std::env::var("DESKVIRT_TEST_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .args([
                "--node-name",
                node,
                "--libvirt-uri",
                uri,
                "--lease-namespace",
                lease_ns,
                "--hypervisor",
                "qemu",
                "--heartbeat-interval",
                "1s",
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
            ])
            .args(extra)
            .args(if extra.contains(&"--node-address") {
                &[][..]
            } else {
                &["--node-address", "10.11.12.13"][..]
            })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self {
            child,
            metrics_port,
        })
    }

    /// Sends SIGTERM and waits up to `limit` for the exit.
    pub fn terminate(&mut self, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(None)
    }

    pub async fn http_get(&self, path: &str) -> anyhow::Result<String> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: agent\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[allow(unused_imports)]
pub use deskvirt_tests::host::eventually;

/// The test's outcome after cleanup ran: a panic inside the test body is resumed here.
pub fn finish(result: std::thread::Result<anyhow::Result<()>>) -> anyhow::Result<()> {
    match result {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
