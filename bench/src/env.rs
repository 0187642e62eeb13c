//! The live bench world: a pool, namespaces, the real operator and node-agent binaries as local
//! processes on this host's libvirt, all labelled with one run id; and its teardown, which
//! removes every Desktop, domain, disk, network, pool, namespace and process it created.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use deskvirt_tests::cluster::{kubeconfig_path, repo_root, unique_suffix};
use deskvirt_tests::host::{Process, eventually, free_port, free_port_range, run};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// Label carrying the run id on every object of the run (the operator's label selector).
pub const RUN_LABEL: &str = "deskvirt.io/bench-run";
/// SPICE ports of the pool; raw libvirt runs take the ports right after it.
pub const POOL_PORTS: u16 = 80;
pub const RAW_PORTS: u16 = 20;
pub const LIBVIRT: &str = "qemu:///system";

/// One run's objects and processes.
pub struct Env {
    pub client: Client,
    pub run: String,
    pub pool: String,
    pub node: String,
    pub user_ns: String,
    pub sys_ns: String,
    pub console_ns: String,
    pub work: PathBuf,
    pub image_dir: PathBuf,
    pub disk_dir: PathBuf,
    pub first_port: u16,
    pub operator: Option<Process>,
    pub agent: Option<Process>,
    /// Where the agent serves `/metrics`, once started.
    pub agent_metrics: Option<u16>,
}

/// Release (default) or debug builds of the operator and the agent.
pub fn build_binaries(release: bool) -> anyhow::Result<PathBuf> {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .args(["build", "--locked", "--bins"])
        .args(["-p", "deskvirt-operator", "-p", "deskvirt-node-agent"])
        .env("CARGO_TARGET_DIR", &target);
    if release {
        cmd.arg("--release");
    }
    run("cargo build of the operator and the node-agent", &mut cmd)?;
    Ok(target.join(if release { "release" } else { "debug" }))
}

impl Env {
    /// Creates namespaces, the image directory and the pool; starts nothing yet.
    pub async fn create(client: Client, guest_dir: &Path) -> anyhow::Result<Self> {
        let run = unique_suffix();
        let work = std::env::temp_dir().join(format!("deskvirt-bench-{run}"));
        let image_dir = work.join("images");
        let env = Self {
            client,
            pool: format!("bench-{run}"),
            node: format!("bench-host-{run}"),
            user_ns: format!("bench-{run}"),
            sys_ns: format!("bench-sys-{run}"),
            console_ns: format!("bench-con-{run}"),
            disk_dir: work.join("disks"),
            image_dir,
            work,
            first_port: free_port_range(POOL_PORTS + RAW_PORTS)?,
            run,
            operator: None,
            agent: None,
            agent_metrics: None,
        };
        std::fs::create_dir_all(&env.image_dir)?;
        std::fs::create_dir_all(env.work.join("raw"))?;
        // The example's image is the tiny guest's empty disk here, on both sides of the
        // comparison: the time to a console that answers does not wait for a boot.
        for (from, to) in [
            ("base.qcow2", "demo-desktop.qcow2"),
            ("base.qcow2", "base.qcow2"),
            ("vmlinuz", "vmlinuz"),
            ("initrd.img", "initrd.img"),
        ] {
            std::os::unix::fs::symlink(guest_dir.join(from), env.image_dir.join(to))?;
        }
        let namespaces: Api<Namespace> = Api::all(env.client.clone());
        for ns in [&env.user_ns, &env.sys_ns, &env.console_ns] {
            let obj: Namespace = serde_json::from_value(json!({
                "metadata": { "name": ns, "labels": { RUN_LABEL: env.run } }
            }))?;
            namespaces.create(&PostParams::default(), &obj).await?;
        }
        env.create_pool().await?;
        Ok(env)
    }

    /// examples/pool.yaml renamed, with this run's directories, ports, address range, and
    /// overcommit and reserve that let a 2-core host hold the 50-desktop burst.
    async fn create_pool(&self) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(repo_root().join("examples/pool.yaml"))?;
        let mut pool: serde_json::Value = serde_yaml::from_str(&text)?;
        pool["metadata"] = json!({ "name": self.pool, "labels": { RUN_LABEL: self.run } });
        pool["spec"]["nodeSelector"] = json!({ "deskvirt.io/pool": self.pool });
        pool["spec"]["storage"] = json!({
            "imageDir": self.image_dir.display().to_string(),
            "diskDir": self.disk_dir.display().to_string(),
        });
        pool["spec"]["display"]["spicePorts"] =
            json!({ "first": self.first_port, "last": self.first_port + POOL_PORTS - 1 });
        pool["spec"]["display"]["listen"] = json!("Node");
        pool["spec"]["overcommit"] = json!({ "cpu": 32, "memory": 1 });
        pool["spec"]["reserved"] = json!({ "cpu": 0, "memory": "1Gi" });
        let octet = 16 + (self.first_port % 200);
        pool["spec"]["network"]["cidr"] = json!(format!("10.{octet}.0.0/16"));
        Api::<ResourcePool>::all(self.client.clone())
            .create(&PostParams::default(), &serde_json::from_value(pool)?)
            .await?;
        Ok(())
    }

    /// Starts the agent and the operator (admin kubeconfig) and waits until the host is Ready.
    pub async fn start(&mut self, bin_dir: &Path, log_level: &str) -> anyhow::Result<()> {
        let kubeconfig = kubeconfig_path()?;
        let labels = format!("deskvirt.io/pool={},{RUN_LABEL}={}", self.pool, self.run);
        let mut agent = Command::new(bin_dir.join("deskvirt-node-agent"));
        agent
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", log_level)
            .args(["--node-name", &self.node, "--hypervisor", "qemu"])
            .args(["--lease-namespace", &self.sys_ns])
            .args(["--console-namespace", &self.console_ns])
            .args(["--node-address", "127.0.0.1", "--node-labels", &labels])
            .args(["--shutdown-grace", "3s"]);
        let agent_metrics = free_port()?;
        agent.args(["--metrics-addr", &format!("127.0.0.1:{agent_metrics}")]);
        self.agent = Some(Process::spawn("node-agent", &mut agent)?);
        self.agent_metrics = Some(agent_metrics);
        let mut operator = Command::new(bin_dir.join("deskvirt-operator"));
        operator
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", log_level)
            .env("POD_NAMESPACE", &self.sys_ns)
            .env("POD_NAME", format!("bench-operator-{}", self.run))
            .args(["--console-namespace", &self.console_ns])
            .args(["--console-user-namespaces", &self.user_ns])
            .args(["--label-selector", &format!("{RUN_LABEL}={}", self.run)])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port()?)]);
        self.operator = Some(Process::spawn("operator", &mut operator)?);
        let nodes: Api<DomainNode> = Api::all(self.client.clone());
        eventually(Duration::from_secs(120), "DomainNode Ready", || async {
            let Some(dn) = nodes.get_opt(&self.node).await? else {
                return Ok(None);
            };
            let conds = dn.status.map(|s| s.conditions).unwrap_or_default();
            let ok = |t: &str| {
                deskvirt_crds::conditions::find(&conds, t).is_some_and(|c| c.status == "True")
            };
            Ok((ok("Ready") && ok("Schedulable")).then_some(()))
        })
        .await?;
        Ok(())
    }

    pub fn desktops(&self) -> Api<Desktop> {
        Api::namespaced(self.client.clone(), &self.user_ns)
    }

    /// The libvirt domain name of a desktop of this run (it carries the Desktop's UID).
    pub async fn domain_of(&self, desktop: &str) -> anyhow::Result<String> {
        let d = self.desktops().get(desktop).await?;
        let uid = d.metadata.uid.unwrap_or_default();
        Ok(deskvirt_crds::names::domain_name(
            &self.user_ns,
            desktop,
            &uid,
        ))
    }

    /// The console password of `desktop`, once its Secret exists.
    pub async fn password(&self, desktop: &str) -> anyhow::Result<Option<String>> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.user_ns);
        Ok(secrets
            .get_opt(&format!("{desktop}-console"))
            .await?
            .and_then(|s| s.data)
            .and_then(|d| {
                d.get(deskvirt_crds::constants::SECRET_KEY_PASSWORD)
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            }))
    }

    /// Deletes the given desktops (all of the run when `selector` is None) and waits until gone.
    pub async fn delete_desktops(&self, selector: &str, limit: Duration) -> anyhow::Result<()> {
        let api = self.desktops();
        let lp = ListParams::default().labels(selector);
        for d in api.list(&lp).await?.items {
            let _ = api.delete(&d.name_any(), &DeleteParams::default()).await;
        }
        eventually(limit, "desktops deleted", || async {
            Ok(api.list(&lp).await?.items.is_empty().then_some(()))
        })
        .await
    }

    /// PIDs of the operator and the agent.
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (
            self.operator.as_ref().map(|p| p.child.id()),
            self.agent.as_ref().map(|p| p.child.id()),
        )
    }

    /// Removes everything the run created; every step is best effort and runs even when an
    /// earlier one failed.
    pub async fn teardown(&mut self) {
        let run_sel = format!("{RUN_LABEL}={}", self.run);
        if let Err(e) = self
            .delete_desktops(&run_sel, Duration::from_secs(180))
            .await
        {
            eprintln!("[bench] teardown: {e:#}; removing finalizers");
            clear_finalizers(&self.desktops(), false).await;
        }
        for p in [self.agent.take(), self.operator.take()]
            .into_iter()
            .flatten()
        {
            let mut p = p;
            let _ = p.kill();
        }
        let prefixes = [format!("{}--", self.user_ns), raw_prefix(&self.run)];
        if let Ok(names) = run(
            "virsh list",
            Command::new("virsh").args(["-c", LIBVIRT, "list", "--all", "--name"]),
        ) {
            for d in names
                .lines()
                .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
            {
                virsh(&["destroy", d]);
                virsh(&["undefine", d]);
            }
        }
        let net = format!("deskvirt-{}", self.pool);
        virsh(&["net-destroy", &net]);
        virsh(&["net-undefine", &net]);
        let _ = Api::<ResourcePool>::all(self.client.clone())
            .delete(&self.pool, &DeleteParams::default())
            .await;
        let _ = Api::<DomainNode>::all(self.client.clone())
            .delete(&self.node, &DeleteParams::default())
            .await;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        for ns in [&self.user_ns, &self.sys_ns, &self.console_ns] {
            let _ = namespaces.delete(ns, &DeleteParams::background()).await;
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Name prefix of this run's raw libvirt domains.
pub fn raw_prefix(run: &str) -> String {
    format!("bench-raw-{run}-")
}

fn virsh(args: &[&str]) {
    let _ = Command::new("virsh")
        .args(["-c", LIBVIRT])
        .args(args)
        .output();
}

/// The desktop of examples/desktop.yaml, renamed into this run.
pub fn example_desktop(env: &Env, name: &str) -> anyhow::Result<Desktop> {
    let text = std::fs::read_to_string(repo_root().join("examples/desktop.yaml"))
        .context("reading examples/desktop.yaml")?;
    let mut d: serde_json::Value = serde_yaml::from_str(&text)?;
    d["metadata"] =
        json!({ "name": name, "labels": { RUN_LABEL: env.run, "deskvirt.io/bench": "ttd" } });
    d["spec"]["pool"] = json!(env.pool);
    // The image already on the host, as a file in the pool's image directory: the bench times
    // a desktop's start, not the image's import (done once per image, before any desktop).
    d["spec"]["disk"] = json!({ "image": "demo-desktop.qcow2" });
    Ok(serde_json::from_value(d)?)
}

/// A small desktop (1 vCPU, 128 MiB, direct kernel boot of the tiny guest, no USB redirect).
pub fn small_desktop(env: &Env, name: &str, group: &str) -> anyhow::Result<Desktop> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": name, "labels": { RUN_LABEL: env.run, "deskvirt.io/bench": group } },
        "spec": {
            "pool": env.pool, "user": format!("{name}@example.org"), "cpu": 1, "memory": "128Mi",
            "disk": { "image": "base.qcow2" },
            "boot": { "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0" },
            "display": { "usb": { "redirect": false } }
        }
    }))?)
}

/// Last resort of a teardown: every Desktop of `api` loses its finalizers (deleted first when
/// `delete`), so a namespace can go even when the processes that own them are gone.
pub async fn clear_finalizers(api: &Api<Desktop>, delete: bool) {
    let Ok(list) = api.list(&ListParams::default()).await else {
        return;
    };
    for d in list.items {
        if delete {
            let _ = api.delete(&d.name_any(), &DeleteParams::default()).await;
        }
        let patch = json!({ "metadata": { "finalizers": null } });
        let _ = api
            .patch(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await;
    }
}
