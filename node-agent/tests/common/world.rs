//! The world of the agent tests on real libvirt: the real agent binary, the real API server,
//! `qemu:///system` (TCG), and the test playing the operator (binding, node label, console
//! password mirror, host subnet, idle reclamation) exactly as the operator writes them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::{
    ANNOTATION_DESKTOP, LABEL_DESKTOP_UID, LABEL_NODE, MANAGER_OPERATOR, console_mirror_name,
};
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use deskvirt_node_agent::domain::{network_name, serial_log_path};
use deskvirt_node_agent::hypervisor::{Hypervisor, LibvirtHypervisor};
use deskvirt_tests::spice::{self, LinkOutcome};
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::{AgentProcess, eventually};

/// The libvirt the agent tests run on.
pub const URI: &str = "qemu:///system";
/// What the tiny guest's /init prints on the serial console once userspace runs.
pub const MARKER: &str = "DESKVIRT-GUEST-READY";

/// One agent test's cluster objects and host: a namespace, a DomainNode and a pool named after
/// the run, the tiny guest, a disk directory, a SPICE port range and a libvirt connection.
pub struct World {
    pub client: Client,
    pub ns: String,
    pub node: String,
    pub pool: String,
    pub guest_dir: String,
    pub disk_dir: PathBuf,
    pub first_port: u16,
    pub hv: LibvirtHypervisor,
}

impl World {
    /// A world for the test `tag` in namespace `ns`: host, pool and disk directory named after
    /// the run, a free SPICE port range, and the tiny guest.
    pub async fn new(client: Client, ns: &str, tag: &str) -> anyhow::Result<Self> {
        let suffix = deskvirt_tests::cluster::unique_suffix();
        Ok(Self {
            client,
            ns: ns.into(),
            node: format!("{tag}-{suffix}"),
            pool: format!("{tag}-{suffix}"),
            guest_dir: super::prepare_host(),
            disk_dir: std::env::temp_dir().join(format!("deskvirt-{tag}-{suffix}")),
            first_port: super::free_port(),
            hv: LibvirtHypervisor::connect(URI).await?,
        })
    }

    /// Deletes the Desktop `name` and waits until it is gone and its domain is undefined.
    pub async fn delete_desktop(&self, name: &str, domain: &str) -> anyhow::Result<()> {
        self.desktops()
            .delete(name, &DeleteParams::default())
            .await?;
        eventually(Duration::from_secs(90), "the Desktop gone", || async {
            Ok(self.desktops().get_opt(name).await?.is_none().then_some(()))
        })
        .await?;
        anyhow::ensure!(
            !self
                .hv
                .list_domains()
                .await?
                .iter()
                .any(|d| d.name == domain),
            "domain still defined"
        );
        Ok(())
    }

    pub fn desktops(&self) -> Api<Desktop> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn start_agent(&self) -> anyhow::Result<AgentProcess> {
        self.start_agent_binary(Path::new(super::AGENT))
    }

    /// [`Self::start_agent`] with another build of the agent.
    pub fn start_agent_binary(&self, bin: &Path) -> anyhow::Result<AgentProcess> {
        AgentProcess::start_binary(
            bin,
            &self.node,
            URI,
            &self.ns,
            &[
                "--node-address",
                "127.0.0.1",
                "--shutdown-grace",
                "3s",
                "--console-namespace",
                &self.ns,
            ],
        )
    }

    /// Creates a Desktop and binds it as the operator does; returns its UID.
    /// The spec of the test desktops: the tiny guest booted from its kernel, on a linked clone
    /// of `image`, power On.
    pub fn spec(&self, image: &str) -> serde_json::Value {
        json!({
            "pool": self.pool, "user": "alice@example.org", "cpu": 1, "memory": "256Mi",
            "disk": { "image": image, "clone": "Linked" },
            "boot": { "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0" },
            "display": { "usb": { "redirect": true, "channels": 2 } },
            "power": "On"
        })
    }

    /// Creates a Desktop and binds it as the operator does; returns its UID.
    pub async fn create_bound(
        &self,
        name: &str,
        image: &str,
        port: u16,
        mac: &str,
        password: &str,
    ) -> anyhow::Result<String> {
        self.create_bound_with(name, self.spec(image), port, mac, password)
            .await
    }

    /// Creates a Desktop with `spec` and binds it as the operator does; returns its UID.
    pub async fn create_bound_with(
        &self,
        name: &str,
        spec: serde_json::Value,
        port: u16,
        mac: &str,
        password: &str,
    ) -> anyhow::Result<String> {
        let desktop: Desktop = serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": { "name": name, "namespace": self.ns },
            "spec": spec
        }))?;
        let created = self
            .desktops()
            .create(&PostParams::default(), &desktop)
            .await?;
        let uid = created.uid().unwrap_or_default();
        self.publish_password(name, &uid, password).await?;
        let pp = PatchParams::apply(MANAGER_OPERATOR).force();
        let meta = json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": { "name": name, "labels": { LABEL_NODE: self.node } }
        });
        self.desktops()
            .patch(name, &pp, &Patch::Apply(&meta))
            .await?;
        self.operator_status(name, Some(port), mac, None).await?;
        Ok(uid)
    }

    /// Applies everything the operator owns in the Desktop's status, as the operator does
    /// (server-side apply, forced, as `deskvirt-operator`): what is left out goes away, such as
    /// `spice.port` once a reclaimed desktop's port is released. A wake (`reclaimed` cleared)
    /// applies the rest with `reclaimed` kept, then removes `reclaimed` by a merge patch: an apply
    /// that leaves out an object field of a custom resource whose schema is not `nullable` is
    /// refused with "must be of type object: null" by this API server
    /// (kubernetes/kubernetes#103011).
    pub async fn operator_status(
        &self,
        name: &str,
        port: Option<u16>,
        mac: &str,
        reclaimed: Option<serde_json::Value>,
    ) -> anyhow::Result<()> {
        let current = self
            .desktops()
            .get(name)
            .await?
            .status
            .and_then(|s| s.reclaimed);
        let wake = reclaimed.is_none() && current.is_some();
        let reclaimed = match (reclaimed, current) {
            (Some(r), _) => Some(r),
            (None, Some(kept)) => Some(serde_json::to_value(kept)?),
            (None, None) => None,
        };
        let mut spice = json!({ "passwordSecret": format!("{name}-console") });
        if let Some(p) = port {
            spice["port"] = json!(p);
        }
        let mut status =
            json!({ "phase": "Scheduled", "node": self.node, "mac": mac, "spice": spice });
        if let Some(r) = reclaimed {
            status["reclaimed"] = r;
        }
        let body = json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": { "name": name },
            "status": status
        });
        let pp = PatchParams::apply(MANAGER_OPERATOR).force();
        self.desktops()
            .patch_status(name, &pp, &Patch::Apply(&body))
            .await?;
        if wake {
            let clear = json!({ "status": { "reclaimed": null } });
            let pp = PatchParams {
                field_manager: Some(MANAGER_OPERATOR.into()),
                ..PatchParams::default()
            };
            self.desktops()
                .patch_status(name, &pp, &Patch::Merge(&clear))
                .await?;
        }
        Ok(())
    }

    /// Creates the run's nat pool, with the subnet `10.<octet>.0.0/16` and the SPICE ports
    /// from `first_port`.
    pub async fn create_pool(&self, octet: u8) -> anyhow::Result<()> {
        let pool: ResourcePool = serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
            "metadata": { "name": self.pool },
            "spec": {
                "storage": { "imageDir": self.guest_dir, "diskDir": self.disk_dir.display().to_string() },
                "network": { "mode": "nat", "cidr": format!("10.{octet}.0.0/16"), "nodePrefixLength": 24 },
                "display": { "spicePorts": { "first": self.first_port, "last": self.first_port + 20 }, "listen": "Loopback" }
            }
        }))?;
        Api::<ResourcePool>::all(self.client.clone())
            .create(&PostParams::default(), &pool)
            .await?;
        Ok(())
    }

    /// Waits for the agent to register the DomainNode, then gives it its pool and `subnet` as
    /// the operator does once a host has joined.
    pub async fn assign_subnet(&self, subnet: &str) -> anyhow::Result<()> {
        let nodes: Api<DomainNode> = Api::all(self.client.clone());
        eventually(Duration::from_secs(30), "the DomainNode", || async {
            Ok(nodes.get_opt(&self.node).await?)
        })
        .await?;
        let op = PatchParams::apply(MANAGER_OPERATOR).force();
        let dn_status = json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
            "metadata": { "name": self.node },
            "status": { "pool": self.pool, "subnet": subnet }
        });
        nodes
            .patch_status(&self.node, &op, &Patch::Apply(&dn_status))
            .await?;
        Ok(())
    }

    pub async fn publish_password(
        &self,
        name: &str,
        uid: &str,
        password: &str,
    ) -> anyhow::Result<()> {
        let secrets: Api<KubeSecret> = Api::namespaced(self.client.clone(), &self.ns);
        let mirror = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": console_mirror_name(uid), "namespace": self.ns,
                "labels": { LABEL_NODE: self.node, LABEL_DESKTOP_UID: uid },
                "annotations": { ANNOTATION_DESKTOP: format!("{}/{name}", self.ns) }
            },
            "stringData": { "password": password }
        });
        let pp = PatchParams::apply(MANAGER_OPERATOR).force();
        secrets
            .patch(&console_mirror_name(uid), &pp, &Patch::Apply(&mirror))
            .await?;
        Ok(())
    }

    pub async fn wait_desktop(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        f: impl Fn(&Desktop) -> bool,
    ) -> anyhow::Result<Desktop> {
        let api = self.desktops();
        let mut last = None;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(d) = api.get_opt(name).await? {
                if f(&d) {
                    return Ok(d);
                }
                last = d.status;
            }
            if Instant::now() >= deadline {
                let port = last.as_ref().and_then(|s| s.spice.as_ref()?.port);
                anyhow::bail!(
                    "timed out waiting for {what} on {name}; last status: {last:#?}\n\
                     listeners on its SPICE port:\n{}",
                    port.map(listeners).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn qemu_pid(&self, domain: &str) -> anyhow::Result<u32> {
        self.hv
            .qemu_pid(domain)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{domain} has no QEMU PID"))
    }
}

/// Who listens on `port` on this host (`ss`), for a timeout's message.
fn listeners(port: u16) -> String {
    let filter = format!("sport = :{port}");
    std::process::Command::new("ss")
        .args(["-Htanp", &filter])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("ss: {e}"))
}

pub fn cond_is(d: &Desktop, type_: &str, status: &str, reason: Option<&str>) -> bool {
    let conds = d
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    find(conds, type_).is_some_and(|c| c.status == status && reason.is_none_or(|r| c.reason == r))
}

pub async fn link(port: u16, password: &str) -> anyhow::Result<LinkOutcome> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    Ok(spice::link(addr, password).await?)
}

/// Removes everything the test made on the host and in the cluster.
pub async fn cleanup(w: &World) {
    let prefix = format!("{}--", w.ns);
    if let Ok(domains) = w.hv.list_domains().await {
        for d in domains.iter().filter(|d| d.name.starts_with(&prefix)) {
            let _ = w.hv.destroy_domain(&d.name).await;
            let _ = w.hv.undefine_domain(&d.name).await;
            let _ = std::fs::remove_file(serial_log_path(&d.name));
        }
    }
    let _ = w.hv.remove_network(&network_name(&w.pool)).await;
    let _ = std::fs::remove_dir_all(&w.disk_dir);
    let _ = Api::<DomainNode>::all(w.client.clone())
        .delete(&w.node, &DeleteParams::default())
        .await;
    let _ = Api::<ResourcePool>::all(w.client.clone())
        .delete(&w.pool, &DeleteParams::default())
        .await;
    // Desktops left by a failed run: drop finalizers so the namespace can go.
    if let Ok(list) = w.desktops().list(&ListParams::default()).await {
        for d in list {
            let patch = json!({ "metadata": { "finalizers": null } });
            let _ = w
                .desktops()
                .patch(
                    &d.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await;
        }
    }
}
