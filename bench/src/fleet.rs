//! A fleet of simulated hosts: real `deskvirt-node-agent` processes on libvirt's in-process
//! `test:///default` driver (no daemon, no QEMU), each with its own DomainNode, heartbeat Lease,
//! watches and metrics port, plus one real operator, all in one pool of this run. Disks are real
//! qcow2 overlays of a tiny 64 MiB base in a temp dir; the pool network is isolated (the test
//! driver only keeps its XML) and its SPICE ports are never bound. With
//! [`Fleet::start_private`] each host is alone in a pool of its own, so each has an image
//! directory of its own (DesktopImage copies). Teardown removes every object, process and file
//! the fleet made.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use deskvirt_tests::cluster::{kubeconfig_path, unique_suffix};
use deskvirt_tests::host::{Process, eventually, run};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::env::RUN_LABEL;

/// The default libvirt URI of every simulated host: libvirt's in-process test driver, whose
/// domains then count as the agent's memory (`--fleet-libvirt-uri test+unix:///default?socket=…`
/// keeps them in a libvirtd instead, as on a real host).
pub const TEST_URI: &str = "test:///default";
/// Ports the fleet's /metrics endpoints may use (the operator takes the first free one).
pub const METRICS_PORTS: std::ops::RangeInclusive<u16> = 19000..=19200;
/// The pool's SPICE range on every host (the test driver binds none of them).
pub const SPICE_FIRST: u16 = 41000;
pub const SPICE_LAST: u16 = 41999;
/// The pool's address range: one /24 per host.
pub const CIDR: &str = "10.128.0.0/12";
/// Group label of the fleet's desktops.
pub const GROUP: &str = "scale";

/// One simulated host.
pub struct Agent {
    pub name: String,
    pub process: Process,
    pub metrics_port: u16,
}

/// The fleet's objects and processes.
pub struct Fleet {
    pub client: Client,
    pub run: String,
    pub pool: String,
    pub user_ns: String,
    pub sys_ns: String,
    pub console_ns: String,
    /// The images namespace of the operator and every agent (DesktopImages with a URL).
    pub images_ns: String,
    pub work: PathBuf,
    bin_dir: PathBuf,
    log_level: String,
    /// Extra environment for both binaries (`KEY=VALUE`, for experiments such as
    /// `MALLOC_ARENA_MAX=2` or `TOKIO_WORKER_THREADS=1`).
    proc_env: Vec<(String, String)>,
    /// The libvirt URI every simulated host's agent uses.
    pub libvirt_uri: String,
    pub operator: Option<Process>,
    pub operator_port: Option<u16>,
    pub agents: Vec<Agent>,
}

impl Fleet {
    /// Namespaces, the image directory with its base image, and the pool; starts nothing.
    pub async fn create(
        client: Client,
        bin_dir: &Path,
        log_level: &str,
        proc_env: Vec<(String, String)>,
        libvirt_uri: &str,
    ) -> anyhow::Result<Self> {
        let id = unique_suffix();
        let work = std::env::temp_dir().join(format!("deskvirt-scale-{id}"));
        let fleet = Self {
            client,
            pool: format!("scale-{id}"),
            user_ns: format!("scale-{id}"),
            sys_ns: format!("scale-sys-{id}"),
            console_ns: format!("scale-con-{id}"),
            images_ns: format!("scale-img-{id}"),
            work,
            bin_dir: bin_dir.to_path_buf(),
            log_level: log_level.to_string(),
            proc_env,
            libvirt_uri: libvirt_uri.to_string(),
            run: id,
            operator: None,
            operator_port: None,
            agents: Vec::new(),
        };
        for d in ["images", "disks", "logs"] {
            std::fs::create_dir_all(fleet.work.join(d))?;
        }
        run(
            "qemu-img create of the base image",
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(fleet.work.join("images/base.qcow2"))
                .arg("64M"),
        )?;
        let namespaces: Api<Namespace> = Api::all(fleet.client.clone());
        for ns in fleet.namespaces() {
            let obj: Namespace = serde_json::from_value(json!({
                "metadata": { "name": ns, "labels": { RUN_LABEL: fleet.run } }
            }))?;
            namespaces.create(&PostParams::default(), &obj).await?;
        }
        let pool: ResourcePool = serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
            "metadata": { "name": fleet.pool, "labels": { RUN_LABEL: fleet.run } },
            "spec": {
                "nodeSelector": { "deskvirt.io/pool": fleet.pool },
                "storage": {
                    "imageDir": fleet.work.join("images").display().to_string(),
                    "diskDir": fleet.work.join("disks").display().to_string(),
                },
                "network": {
                    "mode": "isolated", "cidr": CIDR, "nodePrefixLength": 24,
                    "macPrefix": "52:54:00"
                },
                "display": { "spicePorts": { "first": SPICE_FIRST, "last": SPICE_LAST }, "listen": "Node" },
                // The test driver's host: 16 threads, 3 GiB. 4× memory holds 200 small desktops.
                "overcommit": { "cpu": 32, "memory": 4 },
                "reserved": { "cpu": 0, "memory": "0" },
                "placement": "Spread",
                "referenceSize": { "cpu": 1, "memory": "256Mi" }
            }
        }))?;
        Api::<ResourcePool>::all(fleet.client.clone())
            .create(&PostParams::default(), &pool)
            .await?;
        Ok(fleet)
    }

    /// The name of host `i` of this fleet.
    pub fn host_name(&self, i: usize) -> String {
        format!("scale-{}-h{i:03}", self.run)
    }

    /// The namespaces of the fleet.
    fn namespaces(&self) -> [&String; 4] {
        [
            &self.user_ns,
            &self.sys_ns,
            &self.console_ns,
            &self.images_ns,
        ]
    }

    /// The pool of host `i` when each host has a pool of its own ([`Fleet::start_private`]).
    pub fn private_pool(&self, i: usize) -> String {
        format!("{}-h{i:03}", self.pool)
    }

    /// The image directory of host `i` when each host has a pool of its own.
    pub fn private_image_dir(&self, i: usize) -> PathBuf {
        self.work
            .join("hosts")
            .join(format!("h{i:03}"))
            .join("images")
    }

    /// Pools `private_pool(0..hosts)`, each like the fleet's pool but selecting only its own
    /// host and with an image directory of its own; those that exist already are kept.
    async fn create_private_pools(&self, hosts: usize) -> anyhow::Result<()> {
        let api: Api<ResourcePool> = Api::all(self.client.clone());
        let base = api.get(&self.pool).await?;
        for i in 0..hosts {
            let (name, dir) = (self.private_pool(i), self.private_image_dir(i));
            std::fs::create_dir_all(&dir)?;
            let mut spec = serde_json::to_value(&base.spec)?;
            spec["nodeSelector"] = json!({ "deskvirt.io/pool": name });
            spec["storage"]["imageDir"] = json!(dir.display().to_string());
            let pool: ResourcePool = serde_json::from_value(json!({
                "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
                "metadata": { "name": name, "labels": { RUN_LABEL: self.run } },
                "spec": spec,
            }))?;
            match api.create(&PostParams::default(), &pool).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn log_file(&self, name: &str) -> anyhow::Result<(Stdio, Stdio)> {
        let f = File::create(self.work.join("logs").join(format!("{name}.log")))?;
        Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
    }

    /// Starts the operator and `hosts` agents, and waits until every host is Ready and
    /// Schedulable; returns how long that took.
    pub async fn start(&mut self, hosts: usize) -> anyhow::Result<Duration> {
        self.start_in(hosts, false, Duration::ZERO).await
    }

    /// As [`Fleet::start`], with host `i` alone in pool [`Fleet::private_pool`]`(i)`, whose
    /// image directory no other host shares (as on real hosts, each with its own disk), and
    /// agent `i` spawned `i × stagger` after the first (so that their periodic loops do not
    /// tick together, as on hosts started independently).
    pub async fn start_private(
        &mut self,
        hosts: usize,
        stagger: Duration,
    ) -> anyhow::Result<Duration> {
        self.create_private_pools(hosts).await?;
        self.start_in(hosts, true, stagger).await
    }

    async fn start_in(
        &mut self,
        hosts: usize,
        private: bool,
        stagger: Duration,
    ) -> anyhow::Result<Duration> {
        anyhow::ensure!(
            self.operator.is_none() && self.agents.is_empty(),
            "fleet already started"
        );
        let mut ports = free_metrics_ports(hosts + 1).into_iter();
        let mut port = || {
            ports
                .next()
                .ok_or_else(|| anyhow::anyhow!("not enough free ports in {METRICS_PORTS:?}"))
        };
        let kubeconfig = kubeconfig_path()?;
        let started = std::time::Instant::now();
        let operator_port = port()?;
        let mut operator = Command::new(self.bin_dir.join("deskvirt-operator"));
        let (out, err) = self.log_file("operator")?;
        operator
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", &self.log_level)
            .env("POD_NAMESPACE", &self.sys_ns)
            .env("POD_NAME", format!("scale-operator-{}", self.run))
            .envs(self.proc_env.iter().map(|(k, v)| (k, v)))
            .args(["--console-namespace", &self.console_ns])
            .args(["--console-user-namespaces", &self.user_ns])
            .args(["--images-namespace", &self.images_ns])
            .args(["--label-selector", &format!("{RUN_LABEL}={}", self.run)])
            .args(["--metrics-addr", &format!("127.0.0.1:{operator_port}")])
            .stdout(out)
            .stderr(err);
        self.operator = Some(Process::spawn("operator", &mut operator)?);
        self.operator_port = Some(operator_port);
        for i in 0..hosts {
            if i > 0 && !stagger.is_zero() {
                tokio::time::sleep(stagger).await;
            }
            let pool = if private {
                self.private_pool(i)
            } else {
                self.pool.clone()
            };
            let labels = format!("deskvirt.io/pool={pool},{RUN_LABEL}={}", self.run);
            let name = self.host_name(i);
            let (out, err) = self.log_file(&name)?;
            let metrics_port = port()?;
            let mut agent = Command::new(self.bin_dir.join("deskvirt-node-agent"));
            agent
                .env("KUBECONFIG", &kubeconfig)
                .env("RUST_LOG", &self.log_level)
                .envs(self.proc_env.iter().map(|(k, v)| (k, v)))
                .args(["--node-name", &name, "--libvirt-uri", &self.libvirt_uri])
                .args(["--hypervisor", "qemu"])
                .args(["--lease-namespace", &self.sys_ns])
                .args(["--console-namespace", &self.console_ns])
                .args(["--images-namespace", &self.images_ns])
                .args(["--node-address", "127.0.0.1", "--node-labels", &labels])
                .args(["--shutdown-grace", "3s"])
                .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
                .stdout(out)
                .stderr(err);
            let process = Process::spawn(&name, &mut agent)?;
            self.agents.push(Agent {
                name,
                process,
                metrics_port,
            });
        }
        let nodes: Api<DomainNode> = Api::all(self.client.clone());
        let lp = ListParams::default().labels(&format!("{RUN_LABEL}={}", self.run));
        eventually(
            Duration::from_secs(600),
            "every simulated host Ready and Schedulable",
            || async {
                let ready = nodes
                    .list(&lp)
                    .await?
                    .items
                    .iter()
                    .filter(|dn| {
                        let conds = dn
                            .status
                            .as_ref()
                            .map(|s| s.conditions.as_slice())
                            .unwrap_or_default();
                        ["Ready", "Schedulable"].iter().all(|t| {
                            deskvirt_crds::conditions::find(conds, t)
                                .is_some_and(|c| c.status == "True")
                        })
                    })
                    .count();
                Ok((ready >= hosts).then_some(()))
            },
        )
        .await?;
        Ok(started.elapsed())
    }

    /// PIDs of the operator and of every agent.
    pub fn pids(&self) -> (Option<u32>, Vec<u32>) {
        (
            self.operator.as_ref().map(|p| p.child.id()),
            self.agents.iter().map(|a| a.process.child.id()).collect(),
        )
    }

    /// Names of fleet processes that exited.
    pub fn dead(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(op) = self.operator.as_mut()
            && !op.running()
        {
            out.push("operator".to_string());
        }
        for a in &mut self.agents {
            if !a.process.running() {
                out.push(a.name.clone());
            }
        }
        out
    }

    pub fn desktops(&self) -> Api<Desktop> {
        Api::namespaced(self.client.clone(), &self.user_ns)
    }

    /// Deletes every desktop of the fleet and waits until they are gone (the agents tear down
    /// domains and disks, so they must run); returns how long it took.
    pub async fn delete_desktops(&self, limit: Duration) -> anyhow::Result<Duration> {
        let started = std::time::Instant::now();
        let api = self.desktops();
        let lp = ListParams::default().labels(&format!("{RUN_LABEL}={}", self.run));
        let names: Vec<String> = api
            .list(&lp)
            .await?
            .items
            .iter()
            .map(|d| d.name_any())
            .collect();
        futures::stream::iter(names)
            .for_each_concurrent(32, |n| {
                let api = api.clone();
                async move {
                    let _ = api.delete(&n, &DeleteParams::default()).await;
                }
            })
            .await;
        eventually(limit, "fleet desktops deleted", || async {
            Ok(api.list(&lp).await?.items.is_empty().then_some(()))
        })
        .await?;
        Ok(started.elapsed())
    }

    /// Stops every process and removes the hosts' DomainNodes and Leases, so the next start
    /// is a fresh fleet in the same pool.
    pub async fn stop(&mut self) {
        for mut a in self.agents.drain(..) {
            let _ = a.process.kill();
        }
        if let Some(mut op) = self.operator.take() {
            let _ = op.kill();
        }
        self.operator_port = None;
        let sel = format!("{RUN_LABEL}={}", self.run);
        let nodes: Api<DomainNode> = Api::all(self.client.clone());
        if let Ok(list) = nodes.list(&ListParams::default().labels(&sel)).await {
            for dn in list.items {
                let _ = nodes.delete(&dn.name_any(), &DeleteParams::default()).await;
            }
        }
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.sys_ns);
        let _ = leases
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await;
    }

    /// The last lines of a process's log (for error reports).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.work.join("logs").join(format!("{name}.log")))
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Removes everything: desktops (finalizers stripped when the agents cannot finish),
    /// processes, DomainNodes, Leases, the pools, the namespaces (with the DesktopImages of the
    /// images namespace) and the temp dir. Best effort.
    pub async fn teardown(&mut self) {
        let sel = format!("{RUN_LABEL}={}", self.run);
        let api = self.desktops();
        let any = api
            .list(&ListParams::default().labels(&sel))
            .await
            .map(|l| !l.items.is_empty())
            .unwrap_or(false);
        let alive = self.operator.is_some() && !self.agents.is_empty() && self.dead().is_empty();
        let deleted = any && alive && self.delete_desktops(Duration::from_secs(600)).await.is_ok();
        if any && !deleted {
            eprintln!("[bench] fleet teardown: removing finalizers");
            crate::env::clear_finalizers(&api, true).await;
        }
        self.stop().await;
        let _ = Api::<ResourcePool>::all(self.client.clone())
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&sel),
            )
            .await;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        for ns in self.namespaces() {
            let _ = namespaces.delete(ns, &DeleteParams::background()).await;
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// The sum of every sample of the counters named `prefix…` on a local `/metrics` endpoint
/// (plain HTTP/1.0 over loopback; zero when unreachable).
pub async fn scrape_counter(port: u16, prefix: &str) -> f64 {
    scrape(port)
        .await
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        })
        .sum()
}

/// The text `/metrics` on `port` of this machine answers, empty when it does not answer in 5 s.
pub async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    match tokio::time::timeout(Duration::from_secs(5), get).await {
        Ok(Ok(text)) => text,
        _ => String::new(),
    }
}

/// `count` ports of [`METRICS_PORTS`] that nothing listens on now.
fn free_metrics_ports(count: usize) -> Vec<u16> {
    METRICS_PORTS
        .filter(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).is_ok())
        .take(count)
        .collect()
}

/// A small desktop of the fleet: 1 vCPU, `memory`, linked clone of the base, no USB redirect.
pub fn desktop(fleet: &Fleet, name: &str, memory: &str) -> anyhow::Result<Desktop> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": name, "labels": { RUN_LABEL: fleet.run, "deskvirt.io/bench": GROUP } },
        "spec": {
            "pool": fleet.pool, "user": format!("{name}@example.org"), "cpu": 1, "memory": memory,
            "disk": { "image": "base.qcow2" },
            "display": { "usb": { "redirect": false } }
        }
    }))?)
}
