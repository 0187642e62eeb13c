//! One deskvirt installation for the end-to-end tiers, the way a user meets it: `helm install`
//! of the chart into the local control plane, the operator and the node-agent as local
//! processes authenticated with the chart's own ServiceAccount tokens (so the chart's RBAC is
//! what is tested), libvirt with QEMU (TCG) on this machine, and a pool made from
//! `examples/pool.yaml`. Dropping the [`World`] stops the processes, deletes what the run made
//! and uninstalls the release.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::backup::BackupPhase;
use deskvirt_crds::constants::{SECRET_KEY_PASSWORD, SECRET_KEY_VV};
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::{Desktop, DesktopBackup, ResourcePool};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

use crate::cluster::{client, ensure_crds, kubeconfig_path, repo_root, unique_suffix};
use crate::helm::{Release, ScratchNamespace, chart_dir};
use crate::host::{
    Process, eventually, free_port, free_port_range, prepare_host, workspace_binary,
};
use crate::kubectl::kubectl;

/// Label on everything a run creates; the operator of the run is restricted to it.
pub const RUN_LABEL: &str = "deskvirt.io/test-run";
/// How long the agent's heartbeat Lease stays valid without renewal.
pub const LEASE: &str = "4s";

/// Everything one end-to-end run holds; dropping it stops the processes, uninstalls the
/// release and removes the host's leftovers.
pub struct World {
    pub client: Client,
    pub run: String,
    pub release: Release,
    pub _release_ns: ScratchNamespace,
    pub user_ns: ScratchNamespace,
    pub console_ns: String,
    /// The images namespace of the release (only DesktopImages there import from a URL).
    pub images_ns: String,
    pub node: String,
    pub pool: String,
    pub image_dir: PathBuf,
    pub disk_dir: PathBuf,
    pub operator_kubeconfig: PathBuf,
    pub agent_kubeconfig: PathBuf,
    pub agent: Option<Process>,
    /// Agents of further hosts; stopped with the World, after its desktops are gone.
    pub more_agents: Vec<Process>,
    pub operator: Option<Process>,
    pub guest_dir: PathBuf,
    /// `/metrics` address of the agent [`World::start_agent`] started last.
    pub agent_metrics: Option<String>,
}

impl World {
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        let metrics = format!("127.0.0.1:{}", free_port()?);
        self.agent = Some(self.spawn_agent_at(&self.node, &metrics, &[])?);
        self.agent_metrics = Some(metrics);
        Ok(())
    }

    /// A node-agent for host `node` of the run's pool, with the tests' settings and `extra`
    /// arguments (another libvirt, say).
    pub fn spawn_agent(&self, node: &str, extra: &[&str]) -> anyhow::Result<Process> {
        self.spawn_agent_at(node, &format!("127.0.0.1:{}", free_port()?), extra)
    }

    /// [`Self::spawn_agent`] serving `/metrics` on `metrics`.
    pub fn spawn_agent_at(
        &self,
        node: &str,
        metrics: &str,
        extra: &[&str],
    ) -> anyhow::Result<Process> {
        let mut cmd = Command::new(workspace_binary("deskvirt-node-agent")?);
        self.agent_args(&mut cmd, node, metrics, extra);
        Process::spawn(&format!("node-agent {node}"), &mut cmd)
    }

    /// [`Self::spawn_agent`] confined to the files the chart's DaemonSet gives the agent
    /// (`volumes`, see [`crate::confined`]) and its API credentials.
    pub fn spawn_agent_confined(
        &self,
        node: &str,
        extra: &[&str],
        volumes: &[crate::confined::Volume],
    ) -> anyhow::Result<Process> {
        let bin = workspace_binary("deskvirt-node-agent")?;
        let root = std::env::temp_dir().join(format!("deskvirt-confined-{node}"));
        let mut cmd =
            crate::confined::command(&bin, volumes, &[self.agent_kubeconfig.as_path()], &root)?;
        self.agent_args(
            &mut cmd,
            node,
            &format!("127.0.0.1:{}", free_port()?),
            extra,
        );
        Process::spawn(&format!("confined node-agent {node}"), &mut cmd)
    }

    /// A node-agent for `host` (a second libvirt host), named `node`, confined to what the
    /// chart's DaemonSet mounts: its libvirt socket directory, the pool's directories, the QEMU
    /// logs and (read-only) its managed save directory; its SPICE consoles listen on its veth
    /// address. `extra` comes last.
    pub fn spawn_second_agent(
        &self,
        host: &crate::second_host::SecondHost,
        node: &str,
        extra: &[&str],
    ) -> anyhow::Result<Process> {
        self.spawn_second_agent_with(host, node, &self.disk_dir, extra)
    }

    /// [`Self::spawn_second_agent`] for a pool whose `diskDir` is `disk_dir`.
    fn spawn_second_agent_with(
        &self,
        host: &crate::second_host::SecondHost,
        node: &str,
        disk_dir: &std::path::Path,
        extra: &[&str],
    ) -> anyhow::Result<Process> {
        let save_dir = host.managed_save_dir().display().to_string();
        let mut volumes = crate::confined::agent_volumes(json!({
            "libvirtSocketDir": host.dir.join("run"),
            "imageDir": self.image_dir,
            "diskDir": disk_dir,
            "managedSaveDir": save_dir,
        }))?;
        // A directory host B has its own of: the agent mounts host B's, as a pod would.
        for v in &mut volumes {
            if let crate::confined::Volume::Host { path, .. } = v
                && let Some(i) = host
                    .private
                    .iter()
                    .position(|p| p.as_os_str() == path.as_str())
            {
                *path = host.private_dir(i).display().to_string();
            }
        }
        let mut args = vec![
            "--libvirt-uri",
            &host.uri,
            "--managed-save-dir",
            &save_dir,
            "--node-address",
            &host.address,
        ];
        args.extend_from_slice(extra);
        self.spawn_agent_confined(node, &args, &volumes)
    }

    /// Host B (`host`) joins as `<this host>-b`, taking in migrations on its libvirt as this
    /// machine's libvirtd reaches it; its agent is kept with the World's. Returns its name.
    pub fn add_migration_target(
        &mut self,
        host: &crate::second_host::SecondHost,
    ) -> anyhow::Result<String> {
        let node = format!("{}-b", self.node);
        let extra = [
            "--migration-uri",
            &host.uri,
            "--migration-address",
            &host.address,
        ];
        let agent = self.spawn_second_agent(host, &node, &extra)?;
        self.more_agents.push(agent);
        Ok(node)
    }

    /// Host B (`host`) joins pool `pool` (made by [`create_other_pool`], its `diskDir`
    /// `disk_dir`) as `<this host>-b`, taking in migrations like [`Self::add_migration_target`].
    pub fn add_migration_target_in(
        &mut self,
        host: &crate::second_host::SecondHost,
        pool: &str,
        disk_dir: &std::path::Path,
    ) -> anyhow::Result<String> {
        let node = format!("{}-b", self.node);
        let labels = format!("deskvirt.io/pool={pool},{RUN_LABEL}={}", self.run);
        let extra = [
            "--migration-uri",
            &host.uri,
            "--migration-address",
            &host.address,
            "--node-labels",
            &labels,
        ];
        let agent = self.spawn_second_agent_with(host, &node, disk_dir, &extra)?;
        self.more_agents.push(agent);
        Ok(node)
    }

    /// The tests' settings of a node-agent for host `node` (in the run's pool, unless `extra`
    /// gives `--node-labels`), then `extra`.
    fn agent_args(&self, cmd: &mut Command, node: &str, metrics: &str, extra: &[&str]) {
        let labels = format!("deskvirt.io/pool={},{RUN_LABEL}={}", self.pool, self.run);
        cmd.env("KUBECONFIG", &self.agent_kubeconfig)
            .env("RUST_LOG", log_level())
            .args(["--node-name", node, "--hypervisor", "qemu"])
            .args(["--lease-namespace", &self.release.namespace])
            .args(["--console-namespace", &self.console_ns])
            .args(["--images-namespace", &self.images_ns]);
        if !extra.contains(&"--node-labels") {
            cmd.args(["--node-labels", &labels]);
        }
        cmd.args(["--heartbeat-interval", "1s", "--lease-duration", LEASE])
            .args(["--shutdown-grace", "3s", "--metrics-addr", metrics])
            .args(extra);
        if !extra.contains(&"--node-address") {
            cmd.args(["--node-address", "127.0.0.1"]);
        }
    }

    pub fn start_operator(&mut self) -> anyhow::Result<()> {
        self.start_operator_with(&[])
    }

    /// Starts the operator with the chart's token and the tests' settings, then `extra`.
    pub fn start_operator_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let bin = workspace_binary("deskvirt-operator")?;
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let selector = format!("{RUN_LABEL}={}", self.run);
        let mut cmd = Command::new(bin);
        cmd.env("KUBECONFIG", &self.operator_kubeconfig)
            .env("RUST_LOG", log_level())
            .env("POD_NAMESPACE", &self.release.namespace)
            .env("POD_NAME", format!("operator-{}", unique_suffix()))
            .args(["--console-namespace", &self.console_ns])
            .args(["--images-namespace", &self.images_ns])
            .args(["--console-user-namespaces", &self.user_ns.name])
            .args(["--label-selector", &selector, "--metrics-addr", &metrics])
            .args(extra);
        self.operator = Some(Process::spawn("operator", &mut cmd)?);
        Ok(())
    }

    pub fn desktops(&self) -> Api<Desktop> {
        Api::namespaced(self.client.clone(), &self.user_ns.name)
    }

    pub fn kubectl_ns(&self, args: &[&str]) -> anyhow::Result<crate::kubectl::Run> {
        let mut all = vec!["-n", self.user_ns.name.as_str()];
        all.extend_from_slice(args);
        kubectl(&all, None)
    }

    /// The value of `metric` (a counter or gauge without labels) on the agent's `/metrics`.
    pub async fn agent_metric(&self, metric: &str) -> anyhow::Result<f64> {
        let addr = self
            .agent_metrics
            .clone()
            .context("no agent started with start_agent")?;
        let text = crate::host::http_get(&addr, "/metrics").await?;
        text.lines()
            .find_map(|l| {
                let (name, value) = l.split_once(' ')?;
                (name == metric).then(|| value.trim().parse::<f64>().ok())?
            })
            .with_context(|| format!("no {metric} in the agent's /metrics"))
    }

    pub async fn phase(&self, name: &str) -> anyhow::Result<Option<Phase>> {
        Ok(self
            .desktops()
            .get_opt(name)
            .await?
            .and_then(|d| d.status.and_then(|s| s.phase)))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Backups go while the operator still runs (its finalizer needs it), desktops while
        // the agent still runs (theirs need it); then the host.
        let _ = kubectl(
            &[
                "delete",
                "desktopbackups",
                "--all",
                "-n",
                &self.user_ns.name,
                "--wait=true",
                "--timeout=60s",
            ],
            None,
        );
        delete_desktops(&self.user_ns.name);
        // Images go while the operator still runs (its finalizer waits for their desktops,
        // gone now); any left lose the finalizer, so their namespaces can go.
        for ns in [&self.user_ns.name, &self.images_ns] {
            let _ = kubectl(
                &[
                    "delete",
                    "desktopimages",
                    "--all",
                    "-n",
                    ns,
                    "--wait=true",
                    "--timeout=30s",
                ],
                None,
            );
            let _ = kubectl(
                &[
                    "patch",
                    "desktopimages",
                    "--all",
                    "-n",
                    ns,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ],
                None,
            );
        }
        if let Some(mut p) = self.agent.take() {
            let _ = p.kill();
        }
        for mut p in self.more_agents.drain(..) {
            let _ = p.kill();
        }
        if let Some(mut p) = self.operator.take() {
            let _ = p.kill();
        }
        remove_domains(&format!("{}--", self.user_ns.name));
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

pub fn log_level() -> String {
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

/// Installs the chart into a scratch namespace and prepares the host for a pool named `pool`.
pub async fn setup(pool: &str) -> anyhow::Result<World> {
    let guest_dir = prepare_host()?;
    let client = client().await?;
    ensure_crds(&client).await?;
    let run = unique_suffix();
    let release_ns = ScratchNamespace::create("e2e")?;
    let console_ns = format!("{}-consoles", release_ns.name);
    let name = format!("deskvirt-{run}");
    // The tenant namespace exists before the install: the chart puts the operator's console
    // Secret Role there, the only namespace whose Secrets the operator may write.
    let user_ns = ScratchNamespace::create("e2e-user")?;
    let values = json!({
        "serviceAccountTokens": { "enabled": true },
        "nodeAgent": { "hypervisor": "qemu" },
        "consoles": { "userNamespaces": [user_ns.name] },
        "images": { "namespace": format!("{}-images", release_ns.name) },
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
    // The pool's images: the tiny guest's (a test that boots the example's demo image links
    // it in itself, see `host::demo_image`).
    let image_dir = work.join("images");
    std::fs::create_dir_all(&image_dir)?;
    for (from, to) in [
        ("base.qcow2", "base.qcow2"),
        ("vmlinuz", "vmlinuz"),
        ("initrd.img", "initrd.img"),
    ] {
        std::os::unix::fs::symlink(guest_dir.join(from), image_dir.join(to))?;
    }
    Ok(World {
        client,
        pool: pool.into(),
        node: format!("e2e-host-{run}"),
        run,
        release,
        images_ns: format!("{}-images", release_ns.name),
        _release_ns: release_ns,
        user_ns,
        console_ns,
        disk_dir: work.join("disks"),
        image_dir,
        operator_kubeconfig,
        agent_kubeconfig,
        agent: None,
        more_agents: Vec::new(),
        operator: None,
        guest_dir,
        agent_metrics: None,
    })
}

/// Sets the fields of `spec` on the run's pool (a merge patch).
pub async fn patch_pool(w: &World, spec: serde_json::Value) -> anyhow::Result<()> {
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    pools
        .patch(
            &w.pool,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "spec": spec })),
        )
        .await?;
    Ok(())
}

/// A Desktop of the run's pool that boots the tiny test guest: 1 vCPU, `memory`, no USB
/// redirection, with the fields of `extra` set over that spec (`idle`, `power`, ...).
/// Deletes the Desktops of `namespace` (waiting up to 2 minutes for their finalizers, which
/// need the agent), then strips the finalizers of any left.
pub fn delete_desktops(namespace: &str) {
    let _ = kubectl(
        &[
            "delete",
            "desktops",
            "--all",
            "-n",
            namespace,
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
            namespace,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
        None,
    );
}

/// Destroys and undefines every domain of this machine's libvirt whose name starts with `prefix`.
pub fn remove_domains(prefix: &str) {
    if let Ok(names) = crate::host::run(
        "virsh list",
        Command::new("virsh").args(["-c", "qemu:///system", "list", "--all", "--name"]),
    ) {
        for d in names.lines().filter(|n| n.starts_with(prefix)) {
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", "destroy", d])
                .output();
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", "undefine", d, "--managed-save"])
                .output();
        }
    }
}

/// The libvirt domain name of `desktop` in `namespace` (it carries the Desktop's UID).
pub async fn domain_of(
    desktops: &Api<Desktop>,
    namespace: &str,
    desktop: &str,
) -> anyhow::Result<String> {
    let d = desktops.get(desktop).await?;
    let uid = d.metadata.uid.unwrap_or_default();
    Ok(deskvirt_crds::names::domain_name(namespace, desktop, &uid))
}

pub fn guest_desktop(
    w: &World,
    name: &str,
    memory: &str,
    extra: serde_json::Value,
) -> anyhow::Result<Desktop> {
    let mut spec = json!({
        "pool": w.pool, "user": format!("{name}@example.org"), "cpu": 1, "memory": memory,
        "disk": { "image": "base.qcow2" },
        "boot": { "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0" },
        "display": { "usb": { "redirect": false } }
    });
    if let (Some(spec), serde_json::Value::Object(extra)) = (spec.as_object_mut(), extra) {
        spec.extend(extra);
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": name, "labels": { RUN_LABEL: w.run } },
        "spec": spec,
    }))?)
}

/// Creates `name`, a desktop of the test guest with 128 MiB on a persistent disk plus the
/// fields of `extra`, and waits (up to 4 minutes) until its phase is `phase`.
pub async fn guest_in_phase(
    w: &World,
    name: &str,
    extra: serde_json::Value,
    phase: Phase,
) -> anyhow::Result<()> {
    let mut spec = json!({ "disk": { "image": "base.qcow2", "persistent": true } });
    if let (Some(spec), serde_json::Value::Object(extra)) = (spec.as_object_mut(), extra) {
        spec.extend(extra);
    }
    w.desktops()
        .create(
            &kube::api::PostParams::default(),
            &guest_desktop(w, name, "128Mi", spec)?,
        )
        .await?;
    crate::host::eventually(
        std::time::Duration::from_secs(240),
        &format!("{name} {phase:?}"),
        || async { Ok((w.phase(name).await? == Some(phase)).then_some(())) },
    )
    .await
}

/// A DesktopMigration request `name` of the run for desktop `desktop`, to `target` if given.
pub fn migration_request(
    w: &World,
    name: &str,
    desktop: &str,
    target: Option<&str>,
) -> anyhow::Result<deskvirt_crds::DesktopMigration> {
    let mut spec = json!({ "desktop": desktop });
    if let Some(t) = target {
        spec["targetNode"] = json!(t);
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopMigration",
        "metadata": { "name": name, "labels": { RUN_LABEL: w.run } },
        "spec": spec,
    }))?)
}

/// Pins the pool's CPU model to `model` once host A's agent reports it usable, so that a
/// desktop sees the same CPU on both hosts of a move (under TCG both offer QEMU's emulated
/// models).
pub async fn pin_cpu_model(w: &World, model: &str) -> anyhow::Result<()> {
    let nodes: Api<deskvirt_crds::DomainNode> = Api::all(w.client.clone());
    let models = crate::host::eventually(
        std::time::Duration::from_secs(60),
        "host A's CPU models",
        || async {
            let n = nodes.get_opt(&w.node).await?;
            Ok(n.and_then(|n| n.status)
                .and_then(|s| s.cpu)
                .and_then(|c| c.models))
        },
    )
    .await?;
    anyhow::ensure!(
        models.iter().any(|m| m == model),
        "host A does not offer {model}: {models:?}"
    );
    patch_pool(w, json!({ "cpu": { "model": model } })).await
}

/// `virsh` against this machine's own libvirt (`qemu:///system`).
pub fn virsh_system(args: &[&str]) -> anyhow::Result<String> {
    crate::host::run(
        "virsh",
        Command::new("virsh")
            .args(["-c", "qemu:///system"])
            .args(args),
    )
}

/// examples/pool.yaml with this machine's directories, a free SPICE range on loopback, and
/// the run label.
pub async fn create_pool(w: &World) -> anyhow::Result<()> {
    let pool = pool_manifest(w, &w.pool, &w.disk_dir)?;
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

/// A second pool of the run, `<run's pool>-q`, as [`create_pool`] makes the first but for its
/// name, its hosts (labelled `deskvirt.io/pool=<its name>`), its `diskDir` (`disk_dir`), its
/// SPICE ports and CIDR, MAC prefix `52:54:01`, and `namespace_selector`. Returns its name.
pub async fn create_other_pool(
    w: &World,
    disk_dir: &std::path::Path,
    namespace_selector: serde_json::Value,
) -> anyhow::Result<String> {
    let name = format!("{}-q", w.pool);
    let mut pool = pool_manifest(w, &name, disk_dir)?;
    pool["spec"]["network"]["macPrefix"] = json!("52:54:01");
    pool["spec"]["namespaceSelector"] = namespace_selector;
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    pools
        .create(&PostParams::default(), &serde_json::from_value(pool)?)
        .await?;
    Ok(name)
}

/// The second octets of the 10.0.0.0/8 addresses this machine's interfaces hold.
fn used_ten_octets() -> std::collections::BTreeSet<u16> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.split_whitespace()
        .filter_map(|w| w.strip_prefix("10."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

/// The tests' pool `name` (from `examples/pool.yaml`), its disks in `disk_dir`.
fn pool_manifest(
    w: &World,
    name: &str,
    disk_dir: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(repo_root().join("examples/pool.yaml"))?;
    let mut pool: serde_json::Value = serde_yaml::from_str(&text)?;
    pool["metadata"]["name"] = json!(name);
    pool["spec"]["nodeSelector"] = json!({ "deskvirt.io/pool": name });
    let first = free_port_range(40)?;
    pool["metadata"]["labels"] = json!({ RUN_LABEL: w.run });
    pool["spec"]["storage"] = json!({
        "imageDir": w.image_dir.display().to_string(),
        "diskDir": disk_dir.display().to_string(),
    });
    pool["spec"]["display"]["spicePorts"] = json!({ "first": first, "last": first + 39 });
    pool["spec"]["display"]["listen"] = json!("Node");
    // This 2-core machine must hold the example desktop and the burst of 20.
    pool["spec"]["overcommit"] = json!({ "cpu": 16, "memory": 1 });
    pool["spec"]["reserved"] = json!({ "cpu": 0, "memory": "1Gi" });
    // A unique address range per run, so the host network never collides with another run,
    // and below 10.213/16, where `scripts/second-host.sh` puts its links (a pool network of
    // 10.213.1.0/24 on a second host cut its route: seen as "No route to host" in a migration).
    // An octet no interface of this machine uses yet (a network another run left behind).
    let used = used_ten_octets();
    let octet = (0..197)
        .map(|i| 16 + (first + i) % 197)
        .find(|o| !used.contains(o))
        .unwrap_or(16 + first % 197);
    pool["spec"]["network"]["cidr"] = json!(format!("10.{octet}.0.0/16"));
    Ok(pool)
}

pub fn spice_addr(d: &Desktop) -> anyhow::Result<SocketAddr> {
    let spice = d
        .status
        .as_ref()
        .and_then(|s| s.spice.clone())
        .context("no status.spice")?;
    let host: IpAddr = spice.host.as_deref().context("no spice.host")?.parse()?;
    Ok(SocketAddr::new(host, spice.port.context("no spice.port")?))
}

pub async fn console_password(w: &World, desktop: &str) -> anyhow::Result<(String, String)> {
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

/// The one disk file of a domain (`virsh domblklist` without its header).
pub fn disk_of(listing: &str) -> anyhow::Result<PathBuf> {
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .find(|p| p.ends_with(".qcow2"))
        .map(PathBuf::from)
        .with_context(|| format!("no qcow2 disk in:\n{listing}"))
}

/// DesktopBackup `name` of desktop `desktop` in the run's namespace, of type `kind` (unset:
/// the default).
pub fn backup_of(
    w: &World,
    name: &str,
    desktop: &str,
    kind: Option<&str>,
) -> anyhow::Result<DesktopBackup> {
    let mut spec = json!({ "desktop": desktop });
    if let Some(k) = kind {
        spec["type"] = json!(k);
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopBackup",
        "metadata": { "name": name, "labels": { RUN_LABEL: w.run } },
        "spec": spec,
    }))?)
}

/// Creates backup `name` of `desktop` and waits (up to 2 minutes) for it to succeed; returns
/// it and how long that took from the create.
pub async fn take_backup(
    w: &World,
    name: &str,
    desktop: &str,
    kind: Option<&str>,
) -> anyhow::Result<(DesktopBackup, Duration)> {
    let api: Api<DesktopBackup> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let t = Instant::now();
    api.create(&PostParams::default(), &backup_of(w, name, desktop, kind)?)
        .await?;
    let b = eventually(
        Duration::from_secs(120),
        &format!("{name} to end"),
        || async { Ok(api.get_opt(name).await?.filter(|b| b.phase().is_terminal())) },
    )
    .await?;
    let took = t.elapsed();
    anyhow::ensure!(
        b.phase() == BackupPhase::Succeeded,
        "{name} ended {:?}: {:?}",
        b.phase(),
        b.status
    );
    Ok((b, took))
}

/// A test guest's boot that writes `mib` MiB of byte `octal` (three octal digits) over its
/// disk, for `guest_desktop`'s extra fields.
pub fn boot_writing(mib: u64, octal: &str) -> serde_json::Value {
    json!({ "boot": { "kernel": "vmlinuz", "initrd": "initrd.img",
                      "cmdline": format!("console=ttyS0 deskvirt.write={mib} deskvirt.byte={octal}") } })
}

/// The serial log of domain `domain` of this machine's libvirt (the agent's
/// `domain::serial_log_path`; the tests do not link the agent).
pub fn serial_log(domain: &str) -> PathBuf {
    PathBuf::from(format!("/var/log/libvirt/qemu/{domain}-serial.log"))
}

/// The guest's uptimes in its serial log, in order (its `DESKVIRT-GUEST-READY` lines).
pub fn guest_uptimes(log: &Path) -> anyhow::Result<Vec<f64>> {
    Ok(serial_values(log, "DESKVIRT-GUEST-READY uptime=")?
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect())
}

/// The addresses the test guest took by DHCP (`deskvirt.dhcp` on its command line), in order,
/// from its serial log.
pub fn guest_addresses(log: &Path) -> anyhow::Result<Vec<String>> {
    serial_values(log, "DESKVIRT-GUEST-IP ")
}

/// Sends `line` to the running test guest of `domain` on its serial console (the pty libvirt
/// gave it): the guest's /init reads `deskvirt-write N S OOO` there. QEMU reads a pty only once
/// its once-a-second poll saw a client, so the pty is held open a little before and after the
/// write; then closed, so the guest's console output never waits for a reader.
pub async fn guest_command(domain: &str, line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let xml = virsh_system(&["dumpxml", domain])?;
    let serial = xml
        .split("<serial type='pty'>")
        .nth(1)
        .context("no pty serial in the live XML")?;
    let pty = serial
        .split("<source path='")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .context("no pty path in the live XML")?;
    let mut tty = std::fs::OpenOptions::new()
        .write(true)
        .open(pty)
        .with_context(|| format!("open {pty}"))?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tty.write_all(format!("{line}\n").as_bytes())
        .with_context(|| format!("write to {pty}"))?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Ok(())
}

/// The MiB the test guest wrote over its disk (`deskvirt.write=N` on its command line), once
/// its write finished, from its serial log.
pub fn guest_writes(log: &Path) -> anyhow::Result<Vec<String>> {
    serial_values(log, "DESKVIRT-GUEST-WROTE ")
}

/// The word after each `marker` in serial log `log` (none while it does not exist).
pub fn serial_values(log: &Path, marker: &str) -> anyhow::Result<Vec<String>> {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("{}", log.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.split(marker).nth(1))
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_string))
        .collect())
}

/// The Events about object `name` in the tenant's namespace.
pub async fn events(
    w: &World,
    name: &str,
) -> anyhow::Result<Vec<k8s_openapi::api::core::v1::Event>> {
    let api: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(w.client.clone(), &w.user_ns.name);
    Ok(api
        .list(&kube::api::ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await?
        .items)
}

/// Waits until the pool counts `n` ready hosts.
pub async fn wait_ready_hosts(w: &World, n: u32) -> anyhow::Result<()> {
    wait_ready_hosts_in(w, &w.pool, n).await
}

/// Waits (up to 60 s) until pool `pool` counts `n` ready hosts.
pub async fn wait_ready_hosts_in(w: &World, pool: &str, n: u32) -> anyhow::Result<()> {
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    let what = format!("{n} ready hosts in pool {pool}");
    crate::host::eventually(Duration::from_secs(60), &what, || async {
        let st = pools.get(pool).await?.status.unwrap_or_default();
        Ok(st.nodes.is_some_and(|h| h.ready == n).then_some(()))
    })
    .await
}
