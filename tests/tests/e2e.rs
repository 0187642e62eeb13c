//! End to end, the way a user meets deskvirt: `helm install` of the chart into the local
//! control plane, the operator and the node-agent as local processes authenticated with the
//! chart's own ServiceAccount tokens (so the chart's RBAC is what is tested), libvirt with
//! QEMU (TCG) on this machine, and `kubectl apply -f examples/desktop.yaml`. Then:
//! - `kubectl wait --for=condition=Ready`, a SPICE link with the Secret's password (a wrong
//!   one is refused), `kubectl get desktops` showing phase, node and SPICE endpoint;
//! - GitOps: a second apply changes nothing and `kubectl diff` is empty;
//! - `kill -9` of the agent: the host and the desktop go Unknown, and come back with the same
//!   QEMU process when the agent restarts;
//! - a libvirtd restart under the running desktop: it keeps running, the agent reconnects;
//! - a burst of 20 Desktops with the operator killed in the middle: all Running, no port or
//!   MAC twice;
//! - deleting a Desktop while its host is down waits with a clear condition and completes when
//!   the host returns; the domain, its overlay, its port and its MAC are gone;
//! - an invalid manifest is rejected by the apiserver.
//!
//! The operator is restricted to objects labelled with this run (`--label-selector`), so it
//! never touches what other tests left in the shared control plane; the test labels the
//! example Desktop after applying it, and the agent labels its DomainNode (`--node-labels`).
//!
//! Run: `cargo test -p deskvirt-tests --test e2e -- --nocapture`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::constants::{CONSOLE_NAMESPACE_DEFAULT, SECRET_KEY_PASSWORD, SECRET_KEY_VV};
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use deskvirt_tests::cluster::{client, ensure_crds, kubeconfig_path, repo_root, unique_suffix};
use deskvirt_tests::helm::{Release, ScratchNamespace, chart_dir};
use deskvirt_tests::host::{
    Process, eventually, free_port, free_port_range, prepare_host, qemu_pid, workspace_binary,
};
use deskvirt_tests::kubectl::kubectl;
use deskvirt_tests::spice::{LinkOutcome, link};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const RUN_LABEL: &str = "deskvirt.io/test-run";
/// How long the agent's heartbeat Lease stays valid without renewal.
const LEASE: &str = "4s";
/// Desktops of the burst.
const BURST: usize = 20;

/// Everything one end-to-end run holds; dropping it stops the processes, uninstalls the
/// release and removes the host's leftovers.
struct World {
    client: Client,
    run: String,
    release: Release,
    _release_ns: ScratchNamespace,
    user_ns: ScratchNamespace,
    console_ns: String,
    node: String,
    pool: String,
    image_dir: PathBuf,
    disk_dir: PathBuf,
    operator_kubeconfig: PathBuf,
    agent_kubeconfig: PathBuf,
    agent: Option<Process>,
    operator: Option<Process>,
    guest_dir: PathBuf,
}

impl World {
    fn start_agent(&mut self) -> anyhow::Result<()> {
        let bin = workspace_binary("deskvirt-node-agent")?;
        let labels = format!("deskvirt.io/pool={},{RUN_LABEL}={}", self.pool, self.run);
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(bin);
        cmd.env("KUBECONFIG", &self.agent_kubeconfig)
            .env("RUST_LOG", log_level())
            .args(["--node-name", &self.node, "--hypervisor", "qemu"])
            .args(["--lease-namespace", &self.release.namespace])
            .args(["--console-namespace", &self.console_ns])
            .args(["--node-address", "127.0.0.1", "--node-labels", &labels])
            .args(["--heartbeat-interval", "1s", "--lease-duration", LEASE])
            .args(["--shutdown-grace", "3s", "--metrics-addr", &metrics]);
        self.agent = Some(Process::spawn("node-agent", &mut cmd)?);
        Ok(())
    }

    fn start_operator(&mut self) -> anyhow::Result<()> {
        let bin = workspace_binary("deskvirt-operator")?;
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let selector = format!("{RUN_LABEL}={}", self.run);
        let mut cmd = Command::new(bin);
        cmd.env("KUBECONFIG", &self.operator_kubeconfig)
            .env("RUST_LOG", log_level())
            .env("POD_NAMESPACE", &self.release.namespace)
            .env("POD_NAME", format!("operator-{}", unique_suffix()))
            .args(["--console-namespace", &self.console_ns])
            .args(["--label-selector", &selector, "--metrics-addr", &metrics]);
        self.operator = Some(Process::spawn("operator", &mut cmd)?);
        Ok(())
    }

    fn desktops(&self) -> Api<Desktop> {
        Api::namespaced(self.client.clone(), &self.user_ns.name)
    }

    fn kubectl_ns(&self, args: &[&str]) -> anyhow::Result<deskvirt_tests::kubectl::Run> {
        let mut all = vec!["-n", self.user_ns.name.as_str()];
        all.extend_from_slice(args);
        kubectl(&all, None)
    }

    async fn phase(&self, name: &str) -> anyhow::Result<Option<Phase>> {
        Ok(self
            .desktops()
            .get_opt(name)
            .await?
            .and_then(|d| d.status.and_then(|s| s.phase)))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Desktops go while the agent still runs (their finalizers need it); then the host.
        let _ = kubectl(
            &[
                "delete",
                "desktops",
                "--all",
                "-n",
                &self.user_ns.name,
                "--wait=true",
                "--timeout=120s",
            ],
            None,
        );
        let _ = kubectl(
            &[
                "patch",
                "desktops",
                "--all",
                "-n",
                &self.user_ns.name,
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ],
            None,
        );
        if let Some(mut p) = self.agent.take() {
            let _ = p.kill();
        }
        if let Some(mut p) = self.operator.take() {
            let _ = p.kill();
        }
        let prefix = format!("{}--", self.user_ns.name);
        if let Ok(names) = deskvirt_tests::host::run(
            "virsh list",
            Command::new("virsh").args(["-c", "qemu:///system", "list", "--all", "--name"]),
        ) {
            for d in names.lines().filter(|n| n.starts_with(&prefix)) {
                let _ = Command::new("virsh")
                    .args(["-c", "qemu:///system", "destroy", d])
                    .output();
                let _ = Command::new("virsh")
                    .args(["-c", "qemu:///system", "undefine", d])
                    .output();
            }
        }
        let net = format!("deskvirt-{}", self.pool);
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", "net-destroy", &net])
            .output();
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", "net-undefine", &net])
            .output();
        let _ = kubectl(
            &[
                "delete",
                "resourcepool,domainnode",
                "-l",
                &format!("{RUN_LABEL}={}", self.run),
                "--wait=false",
            ],
            None,
        );
        let _ = std::fs::remove_dir_all(&self.disk_dir);
        let _ = std::fs::remove_dir_all(&self.image_dir);
    }
}

fn log_level() -> String {
    std::env::var("DESKVIRT_TEST_LOG").unwrap_or_else(|_| "warn".into())
}

/// A kubeconfig for the ServiceAccount whose token Secret is `secret` in `namespace`: the
/// admin kubeconfig's server and CA, the chart's token.
async fn token_kubeconfig(
    client: &Client,
    namespace: &str,
    secret: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let token = eventually(Duration::from_secs(60), "the token controller", || async {
        Ok(secrets
            .get_opt(secret)
            .await?
            .and_then(|s| s.data)
            .and_then(|d| d.get("token").cloned()))
    })
    .await?;
    let admin = std::fs::read_to_string(kubeconfig_path()?)?;
    let admin: serde_yaml::Value = serde_yaml::from_str(&admin)?;
    let cluster = admin["clusters"][0]["cluster"].clone();
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{ "name": "local", "cluster": serde_json::to_value(&cluster)? }],
        "users": [{ "name": secret, "user": { "token": String::from_utf8(token.0)? } }],
        "contexts": [{ "name": "sa", "context": { "cluster": "local", "user": secret } }],
        "current-context": "sa",
    });
    std::fs::write(out, serde_yaml::to_string(&config)?)?;
    Ok(())
}

async fn setup() -> anyhow::Result<World> {
    let guest_dir = prepare_host()?;
    let client = client().await?;
    ensure_crds(&client).await?;
    let run = unique_suffix();
    let release_ns = ScratchNamespace::create("e2e")?;
    let console_ns = format!("{}-consoles", release_ns.name);
    let name = format!("deskvirt-{run}");
    let values = json!({
        "serviceAccountTokens": { "enabled": true },
        "nodeAgent": { "hypervisor": "qemu" },
    });
    let release = Release::install(&release_ns.name, &name, &chart_dir(), &values)?;
    let work = std::env::temp_dir().join(format!("deskvirt-e2e-{run}"));
    std::fs::create_dir_all(&work)?;
    let operator_kubeconfig = work.join("operator.kubeconfig");
    let agent_kubeconfig = work.join("agent.kubeconfig");
    token_kubeconfig(
        &client,
        &release_ns.name,
        &format!("{name}-operator-token"),
        &operator_kubeconfig,
    )
    .await?;
    token_kubeconfig(
        &client,
        &release_ns.name,
        &format!("{name}-node-agent-token"),
        &agent_kubeconfig,
    )
    .await?;
    // The pool's images: the example's debian-12.qcow2 is the tiny guest's disk here.
    let image_dir = work.join("images");
    std::fs::create_dir_all(&image_dir)?;
    for (from, to) in [
        ("base.qcow2", "debian-12.qcow2"),
        ("base.qcow2", "base.qcow2"),
        ("vmlinuz", "vmlinuz"),
        ("initrd.img", "initrd.img"),
    ] {
        std::os::unix::fs::symlink(guest_dir.join(from), image_dir.join(to))?;
    }
    let user_ns = ScratchNamespace::create("e2e-user")?;
    Ok(World {
        client,
        pool: "lab".into(),
        node: format!("e2e-host-{run}"),
        run,
        release,
        _release_ns: release_ns,
        user_ns,
        console_ns,
        disk_dir: work.join("disks"),
        image_dir,
        operator_kubeconfig,
        agent_kubeconfig,
        agent: None,
        operator: None,
        guest_dir,
    })
}

/// examples/pool.yaml with this machine's directories, a free SPICE range on loopback, and
/// the run label.
async fn create_pool(w: &World) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(repo_root().join("examples/pool.yaml"))?;
    let mut pool: serde_json::Value = serde_yaml::from_str(&text)?;
    anyhow::ensure!(
        pool["metadata"]["name"] == w.pool.as_str(),
        "examples/pool.yaml renamed?"
    );
    let first = free_port_range(40)?;
    pool["metadata"]["labels"] = json!({ RUN_LABEL: w.run });
    pool["spec"]["storage"] = json!({
        "imageDir": w.image_dir.display().to_string(),
        "diskDir": w.disk_dir.display().to_string(),
    });
    pool["spec"]["display"]["spicePorts"] = json!({ "first": first, "last": first + 39 });
    pool["spec"]["display"]["listen"] = json!("Node");
    // This 2-core machine must hold the example desktop and the burst of 20.
    pool["spec"]["overcommit"] = json!({ "cpu": 16, "memory": 1 });
    pool["spec"]["reserved"] = json!({ "cpu": 0, "memory": "1Gi" });
    // A unique address range per run, so the host network never collides with another run.
    let octet = 16 + (first % 200);
    pool["spec"]["network"]["cidr"] = json!(format!("10.{octet}.0.0/16"));
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    if pools.get_opt(&w.pool).await?.is_some() {
        anyhow::bail!(
            "ResourcePool {} already exists (left by scripts/demo.sh?); delete it before the end-to-end test",
            w.pool
        );
    }
    pools
        .create(&PostParams::default(), &serde_json::from_value(pool)?)
        .await?;
    Ok(())
}

fn spice_addr(d: &Desktop) -> anyhow::Result<SocketAddr> {
    let spice = d
        .status
        .as_ref()
        .and_then(|s| s.spice.clone())
        .context("no status.spice")?;
    let host: IpAddr = spice.host.as_deref().context("no spice.host")?.parse()?;
    Ok(SocketAddr::new(host, spice.port.context("no spice.port")?))
}

async fn console_password(w: &World, desktop: &str) -> anyhow::Result<(String, String)> {
    let secret = Api::<Secret>::namespaced(w.client.clone(), &w.user_ns.name)
        .get(&format!("{desktop}-console"))
        .await?;
    let data = secret.data.unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    Ok((text(SECRET_KEY_PASSWORD), text(SECRET_KEY_VV)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_apply_connect_survive_and_delete() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut w = setup().await?;
    anyhow::ensure!(w.console_ns != CONSOLE_NAMESPACE_DEFAULT);
    create_pool(&w).await?;
    w.start_agent()?;
    w.start_operator()?;
    let desktops = w.desktops();

    // kubectl apply of the example, as a user does; the run label keeps other tests' operators
    // (and this one) apart.
    let example = repo_root().join("examples/desktop.yaml");
    let example = example.display().to_string();
    let applied = w.kubectl_ns(&["apply", "-f", &example])?;
    anyhow::ensure!(applied.success, "kubectl apply: {}", applied.stderr);
    let label = format!("{RUN_LABEL}={}", w.run);
    let labelled = w.kubectl_ns(&["label", "desktop", "alice", &label])?;
    anyhow::ensure!(labelled.success, "kubectl label: {}", labelled.stderr);
    let waited = w.kubectl_ns(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=240s",
        "desktop/alice",
    ])?;
    let alice = desktops.get("alice").await?;
    anyhow::ensure!(
        waited.success,
        "kubectl wait: {} {}\nstatus: {:#?}",
        waited.stdout,
        waited.stderr,
        alice.status
    );
    eprintln!(
        "[e2e] helm install → desktop Ready: {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // SPICE with the Secret's password; a wrong one is refused.
    let addr = spice_addr(&alice)?;
    let (password, vv) = console_password(&w, "alice").await?;
    anyhow::ensure!(password.len() >= 32, "password too short for 128 bits");
    anyhow::ensure!(
        vv.contains(&format!("port={}", addr.port())) && vv.contains(&password),
        "console.vv does not connect: {vv}"
    );
    anyhow::ensure!(
        matches!(
            link(addr, &password).await?,
            LinkOutcome::Accepted { main_init: true }
        ),
        "the console password was refused"
    );
    anyhow::ensure!(
        matches!(
            link(addr, "not-the-password").await?,
            LinkOutcome::Refused { .. }
        ),
        "a wrong password was accepted"
    );

    // kubectl get shows phase, node and the SPICE endpoint.
    let got = w.kubectl_ns(&["get", "desktops"])?;
    for want in ["Running", w.node.as_str(), &addr.port().to_string()] {
        anyhow::ensure!(
            got.stdout.contains(want),
            "`kubectl get desktops` lacks {want}:\n{}",
            got.stdout
        );
    }

    // GitOps: the same manifest again changes nothing.
    let generation = alice.metadata.generation;
    let again = w.kubectl_ns(&["apply", "-f", &example])?;
    anyhow::ensure!(
        again.success && again.stdout.contains("unchanged"),
        "second apply: {} {}",
        again.stdout,
        again.stderr
    );
    let diff = w.kubectl_ns(&["diff", "-f", &example])?;
    anyhow::ensure!(
        diff.success && diff.stdout.trim().is_empty(),
        "kubectl diff is not empty: {}{}",
        diff.stdout,
        diff.stderr
    );
    let alice = desktops.get("alice").await?;
    anyhow::ensure!(alice.metadata.generation == generation, "spec changed");
    for m in alice.metadata.managed_fields.iter().flatten() {
        let manager = m.manager.clone().unwrap_or_default();
        let fields = m
            .fields_v1
            .as_ref()
            .map(|f| f.0.to_string())
            .unwrap_or_default();
        if manager.starts_with("deskvirt") {
            anyhow::ensure!(
                !fields.contains("\"f:spec\""),
                "{manager} owns spec fields: {fields}"
            );
        }
    }

    // kill -9 the agent: host and desktop go Unknown; a restart brings them back, same QEMU.
    let domain = format!("{}--alice", w.user_ns.name);
    let pid = qemu_pid(&domain).context("no QEMU PID")?;
    if let Some(mut a) = w.agent.take() {
        a.kill()?;
    }
    let killed = Instant::now();
    let nodes: Api<DomainNode> = Api::all(w.client.clone());
    let node_name = w.node.clone();
    let node_ready = |status: &'static str| {
        let nodes = nodes.clone();
        let node = node_name.clone();
        async move {
            let dn = nodes.get(&node).await?;
            let conds = dn.status.map(|s| s.conditions).unwrap_or_default();
            Ok::<_, anyhow::Error>(
                deskvirt_crds::conditions::find(&conds, "Ready")
                    .is_some_and(|c| c.status == status),
            )
        }
    };
    eventually(
        Duration::from_secs(60),
        "DomainNode Ready=Unknown",
        || async { Ok(node_ready("Unknown").await?.then_some(())) },
    )
    .await?;
    eventually(Duration::from_secs(60), "Desktop phase Unknown", || async {
        Ok((w.phase("alice").await? == Some(Phase::Unknown)).then_some(()))
    })
    .await?;
    eprintln!(
        "[e2e] agent killed → host and desktop Unknown: {:.1}s (lease {LEASE})",
        killed.elapsed().as_secs_f64()
    );
    anyhow::ensure!(qemu_pid(&domain) == Some(pid), "QEMU died with the agent");
    w.start_agent()?;
    eventually(
        Duration::from_secs(60),
        "DomainNode Ready again",
        || async { Ok(node_ready("True").await?.then_some(())) },
    )
    .await?;
    eventually(Duration::from_secs(60), "Desktop Running again", || async {
        Ok((w.phase("alice").await? == Some(Phase::Running)).then_some(()))
    })
    .await?;
    anyhow::ensure!(
        qemu_pid(&domain) == Some(pid),
        "the agent restart replaced QEMU"
    );

    // libvirtd restarts under the running desktop: it keeps running, the agent reconnects.
    deskvirt_tests::host::run(
        "scripts/libvirt.sh restart",
        Command::new(repo_root().join("scripts/libvirt.sh")).arg("restart"),
    )?;
    anyhow::ensure!(qemu_pid(&domain) == Some(pid), "QEMU died with libvirtd");
    eventually(
        Duration::from_secs(60),
        "LibvirtConnected again",
        || async {
            let dn = nodes.get(&w.node).await?;
            let conds = dn.status.map(|s| s.conditions).unwrap_or_default();
            Ok(deskvirt_crds::conditions::find(&conds, "LibvirtConnected")
                .is_some_and(|c| c.status == "True")
                .then_some(()))
        },
    )
    .await?;
    anyhow::ensure!(
        w.phase("alice").await? == Some(Phase::Running),
        "desktop not Running"
    );

    // A burst of 20 with the operator killed in the middle.
    let burst_started = Instant::now();
    for i in 0..BURST {
        let d: Desktop = serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": { "name": format!("burst-{i:02}"), "labels": { RUN_LABEL: w.run } },
            "spec": {
                "pool": w.pool, "user": format!("student{i}@example.org"), "cpu": 1, "memory": "128Mi",
                "disk": { "image": "base.qcow2" },
                "boot": { "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0" },
                "display": { "usb": { "redirect": false } }
            }
        }))?;
        desktops.create(&PostParams::default(), &d).await?;
        if i == BURST / 2 {
            if let Some(mut o) = w.operator.take() {
                o.kill()?;
            }
            w.start_operator()?;
        }
    }
    let selector = ListParams::default().labels(&label);
    let all = eventually(
        Duration::from_secs(600),
        "20 burst desktops Running",
        || async {
            let list = desktops.list(&selector).await?;
            let burst: Vec<Desktop> = list
                .items
                .into_iter()
                .filter(|d| d.name_any().starts_with("burst-"))
                .collect();
            let running = burst
                .iter()
                .filter(|d| d.status.as_ref().and_then(|s| s.phase) == Some(Phase::Running))
                .count();
            Ok((running == BURST).then_some(burst))
        },
    )
    .await?;
    eprintln!(
        "[e2e] burst of {BURST} with an operator kill → all Running: {:.1}s",
        burst_started.elapsed().as_secs_f64()
    );
    let mut ports = BTreeSet::new();
    let mut macs = BTreeSet::new();
    for d in all
        .iter()
        .chain(std::iter::once(&desktops.get("alice").await?))
    {
        let s = d.status.clone().unwrap_or_default();
        let port = s.spice.and_then(|p| p.port).context("no port")?;
        anyhow::ensure!(ports.insert(port), "port {port} handed out twice");
        let mac = s.mac.context("no mac")?;
        anyhow::ensure!(macs.insert(mac.clone()), "MAC {mac} handed out twice");
    }
    for d in &all {
        desktops
            .delete(&d.name_any(), &DeleteParams::default())
            .await?;
    }
    eventually(
        Duration::from_secs(300),
        "burst desktops deleted",
        || async {
            let left = desktops
                .list(&selector)
                .await?
                .items
                .iter()
                .filter(|d| d.name_any().starts_with("burst-"))
                .count();
            Ok((left == 0).then_some(()))
        },
    )
    .await?;

    // Delete while the host is down: waits with a clear condition, completes when it returns.
    let alice = desktops.get("alice").await?;
    let port = alice
        .status
        .as_ref()
        .and_then(|s| s.spice.as_ref())
        .and_then(|s| s.port);
    let overlay = w.disk_dir.join(format!("{domain}.qcow2"));
    anyhow::ensure!(overlay.is_file(), "no overlay at {}", overlay.display());
    if let Some(mut a) = w.agent.take() {
        a.kill()?;
    }
    eventually(
        Duration::from_secs(60),
        "host Unknown before the delete",
        || async { Ok(node_ready("Unknown").await?.then_some(())) },
    )
    .await?;
    desktops.delete("alice", &DeleteParams::default()).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let waiting = desktops
        .get_opt("alice")
        .await?
        .context("deleted although its host is down")?;
    let ready = waiting
        .status
        .as_ref()
        .and_then(|s| deskvirt_crds::conditions::find(&s.conditions, "Ready").cloned())
        .context("no Ready condition while waiting")?;
    anyhow::ensure!(
        ready.status != "True" && ready.message.to_lowercase().contains("host"),
        "unclear condition while waiting for the host: {ready:?}"
    );
    w.start_agent()?;
    eventually(
        Duration::from_secs(120),
        "alice deleted after the host returned",
        || async { Ok(desktops.get_opt("alice").await?.is_none().then_some(())) },
    )
    .await?;
    let defined = deskvirt_tests::host::run(
        "virsh list",
        Command::new("virsh").args(["-c", "qemu:///system", "list", "--all", "--name"]),
    )?;
    anyhow::ensure!(
        !defined.lines().any(|l| l == domain),
        "domain still defined"
    );
    anyhow::ensure!(!overlay.exists(), "overlay still there");
    anyhow::ensure!(
        w.guest_dir.join("base.qcow2").is_file(),
        "base image deleted"
    );
    // Port and MAC are free again: the pool counts no port in use.
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    eventually(Duration::from_secs(60), "ports released", || async {
        let used = pools
            .get(&w.pool)
            .await?
            .status
            .and_then(|s| s.ports)
            .map(|p| p.used);
        Ok((used == Some(0)).then_some(()))
    })
    .await?;
    anyhow::ensure!(port.is_some());

    // An invalid manifest is rejected by the apiserver, naming the field.
    let bad = "apiVersion: deskvirt.io/v1alpha1\nkind: Desktop\nmetadata:\n  name: bad\nspec:\n  pool: lab\n  cpu: 0\n  disk:\n    image: debian-12.qcow2\n";
    let rejected = kubectl(&["apply", "-n", &w.user_ns.name, "-f", "-"], Some(bad))?;
    anyhow::ensure!(
        !rejected.success && rejected.stderr.contains("spec.cpu"),
        "invalid manifest not rejected by field: {}",
        rejected.stderr
    );
    eprintln!("[e2e] total: {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
