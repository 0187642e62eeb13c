//! What the Desktop controller's unit tests stand on: a context over the in-memory
//! [`FakeHypervisor`], a fake API server that answers every request with the Desktop and keeps
//! the requests, a scratch host directory (base image, disks, save images), and builders of a
//! Desktop bound here with its pool and console password mirror.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deskvirt_crds::desktop::DesktopStatus;
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};

use super::context::{DesktopConfig, DesktopContext};
use crate::domain::{DomainType, disk_path, domain_name};
use crate::hypervisor::DomainState;
use crate::hypervisor::fake::{FakeDomain, FakeHypervisor};
use crate::metrics::Metrics;

pub const UID: &str = "0b7e9a4c-1111-4222-8333-444455556666";
pub const OTHER_UID: &str = "9f2c1d3e-aaaa-4bbb-8ccc-ddddeeeeffff";
pub const NODE: &str = "h1";
const CONSOLES: &str = "deskvirt-consoles";

/// One request the fake API server got.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Value,
}

/// Requests the fake API server got, shared with its service.
#[derive(Clone, Default)]
pub struct ApiLog(Arc<Mutex<Vec<Request>>>);

impl ApiLog {
    fn push(&self, r: Request) {
        match self.0.lock() {
            Ok(mut l) => l.push(r),
            Err(p) => p.into_inner().push(r),
        }
    }

    fn all(&self) -> Vec<Request> {
        match self.0.lock() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The lists of answers written to this host's DomainNode (`status.prepared`), in order.
    pub fn prepared(&self) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path.contains("/domainnodes/"))
            .map(|r| r.body["status"]["prepared"].clone())
            .collect()
    }

    /// The status bodies applied to the Desktop, in order.
    pub fn statuses(&self) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/status"))
            .map(|r| r.body["status"].clone())
            .collect()
    }

    /// The reasons of the Events published, in order.
    pub fn event_reasons(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.contains("/events"))
            .map(|r| r.body["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The finalizer lists written with merge patches, in order.
    pub fn finalizer_writes(&self) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|r| r.method == "PATCH" && !r.path.ends_with("/status"))
            .map(|r| r.body["metadata"]["finalizers"].clone())
            .collect()
    }
}

/// A client whose every request is logged and answered with `answer`.
fn fake_client(log: ApiLog, answer: Value) -> kube::Client {
    let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let log = log.clone();
        let answer = answer.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            log.push(Request {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            });
            let out = serde_json::to_vec(&answer).unwrap_or_default();
            Ok::<_, std::convert::Infallible>(http::Response::new(kube::client::Body::from(out)))
        }
    });
    kube::Client::new(service, "default")
}

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("deskvirt-kit-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["images", "disks", "save"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::write(dir.join("images/base.qcow2"), b"base").unwrap_or_else(|e| panic!("{e}"));
        // A qemu-img that says every image is raw and writes "fresh" into the clone it makes.
        let tool = dir.join("qemu-img");
        std::fs::write(
            &tool,
            "#!/bin/sh\ncase \"$1\" in\ninfo) echo '{\"format\":\"raw\"}' ;;\n\
             *) for a; do case \"$a\" in *.partial) echo fresh > \"$a\" ;; esac; done ;;\nesac\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Desktop `team/a` bound to [`NODE`] in pool `p`, with power On and the agent's finalizer.
pub fn desktop() -> Desktop {
    let d: Desktop = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": {"name": "a", "namespace": "team", "uid": UID, "generation": 1,
                     "resourceVersion": "1",
                     "labels": {"deskvirt.io/node": NODE},
                     "finalizers": ["deskvirt.io/node-agent"]},
        "spec": {"pool": "p", "cpu": 1, "memory": "1Gi", "disk": {"image": "base.qcow2"}},
        "status": {"node": NODE, "mac": "52:54:00:00:00:01", "spice": {"port": 5901}}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    d
}

/// `d` with every status the agent wrote merged in, in order, as the next pass sees it.
pub fn with_all_statuses(mut d: Desktop, api: &ApiLog) -> Desktop {
    let mut st = serde_json::to_value(d.status.clone().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}"));
    for s in api.statuses() {
        merge(&mut st, &s);
    }
    d.status = Some(serde_json::from_value::<DesktopStatus>(st).unwrap_or_else(|e| panic!("{e}")));
    d
}

/// `d` being deleted.
pub fn deleted(mut d: Desktop) -> Desktop {
    d.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    ));
    d
}

fn pool(dir: &Path) -> ResourcePool {
    serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
        "metadata": {"name": "p"},
        "spec": {
            // Shared: the migration tests move domains live, as the operator admits them only
            // on shared storage.
            "storage": {"imageDir": dir.join("images"), "diskDir": dir.join("disks"),
                        "shared": true},
            "network": {"mode": "bridge", "bridge": "br0"}
        }
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The console mirror of [`desktop`] at `version`, holding `password`.
fn mirror(version: &str, password: &str) -> Secret {
    let mut m: Secret = serde_json::from_value(json!({
        "metadata": {"name": format!("console-{UID}"), "namespace": CONSOLES,
                     "resourceVersion": version,
                     "labels": {"deskvirt.io/desktop-uid": UID, "deskvirt.io/node": NODE},
                     "annotations": {"deskvirt.io/desktop": "team/a"}},
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    m.data = Some(
        [(
            "password".to_string(),
            k8s_openapi::ByteString(password.as_bytes().to_vec()),
        )]
        .into(),
    );
    m
}

/// A host with the fake hypervisor and API, the pool `p` and the mirror of [`desktop`].
pub struct Kit {
    pub ctx: DesktopContext<FakeHypervisor>,
    pub hv: FakeHypervisor,
    pub api: ApiLog,
    pub dir: Scratch,
    pools: Writer<ResourcePool>,
    nodes: Writer<DomainNode>,
    mirrors: Writer<Secret>,
}

impl Kit {
    pub fn new() -> Self {
        Self::answering(desktop())
    }

    /// A kit whose API answers with `d`.
    pub fn answering(d: Desktop) -> Self {
        let dir = Scratch::new();
        let hv = FakeHypervisor::default();
        let api = ApiLog::default();
        let client = fake_client(api.clone(), serde_json::to_value(&d).unwrap_or_default());
        let (pools_store, mut pools) = reflector::store::<ResourcePool>();
        pools.apply_watcher_event(&watcher::Event::Apply(pool(&dir.0)));
        let (nodes, nodes_writer) = reflector::store::<DomainNode>();
        let (mirrors, mut mirror_writer) = reflector::store::<Secret>();
        mirror_writer.apply_watcher_event(&watcher::Event::Apply(mirror("7", "secret")));
        let config = DesktopConfig {
            node_name: NODE.into(),
            node_address: "192.0.2.10".into(),
            domain_type: DomainType::Qemu,
            console_namespace: CONSOLES.into(),
            qemu_img: dir.0.join("qemu-img").display().to_string(),
            shutdown_grace: Duration::from_secs(60),
            managed_save_dir: dir.0.join("save"),
            activity_interval: Duration::from_secs(10),
            takes_migrations: false,
            inbound_ready: tokio::sync::watch::channel(false).0,
        };
        let ctx = DesktopContext::with_caches(
            client,
            hv.clone(),
            config,
            Metrics::new().0,
            pools_store,
            nodes,
            mirrors,
        );
        Self {
            ctx,
            hv,
            api,
            dir,
            pools,
            nodes: nodes_writer,
            mirrors: mirror_writer,
        }
    }

    /// Pool `p` in nat mode, and this host given the subnet 10.233.1.0/24 of it: desktops get
    /// an address on the pool's network.
    pub fn nat(&mut self) {
        let mut p = pool(&self.dir.0);
        p.spec.network = serde_json::from_value(
            json!({"mode": "nat", "cidr": "10.233.0.0/16", "nodePrefixLength": 24}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        self.pools.apply_watcher_event(&watcher::Event::Apply(p));
        let node: DomainNode = serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
            "metadata": {"name": NODE},
            "spec": {},
            "status": {"pool": "p", "subnet": "10.233.1.0/24"}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        self.nodes.apply_watcher_event(&watcher::Event::Apply(node));
    }

    /// Pool `p` without shared storage, and [`desktop`]'s disk a real overlay of a real base
    /// image (`images/base.qcow2`), read by the real qemu-img: a Cold move copies it.
    pub fn local_storage(&mut self) {
        // The real qemu-img reads these disks.
        let tool = self.dir.0.join("qemu-img");
        std::fs::write(&tool, "#!/bin/sh\nexec qemu-img \"$@\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let mut p = pool(&self.dir.0);
        p.spec.storage.shared = false;
        self.pools.apply_watcher_event(&watcher::Event::Apply(p));
        let base = self.dir.0.join("images/base.qcow2");
        let _ = std::fs::create_dir_all(self.dir.0.join("images"));
        let _ = std::fs::remove_file(self.disk());
        for args in [
            vec![
                "create",
                "-q",
                "-f",
                "qcow2",
                &*base.to_string_lossy(),
                "16M",
            ],
            vec![
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                &*base.to_string_lossy(),
                &*self.disk().to_string_lossy(),
            ],
        ] {
            let ok = std::process::Command::new("qemu-img")
                .args(args.iter().map(|a| a.to_string()))
                .status()
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(ok.success(), "qemu-img {args:?}");
        }
    }

    /// Pool `p` declares its storage shared (or not), its directories as they are.
    pub fn shared(&mut self, shared: bool) {
        let mut p = pool(&self.dir.0);
        p.spec.storage.shared = shared;
        self.pools.apply_watcher_event(&watcher::Event::Apply(p));
    }

    /// Another pool, `name`, its disks in a directory of its own (returned), as a host of it
    /// has them.
    pub fn other_pool(&mut self, name: &str) -> PathBuf {
        let disks = self.dir.0.join(format!("{name}-disks"));
        std::fs::create_dir_all(&disks).unwrap_or_else(|e| panic!("{e}"));
        let mut p = pool(&self.dir.0);
        p.metadata.name = Some(name.to_string());
        p.spec.storage.disk_dir = disks.display().to_string();
        p.spec.storage.shared = false;
        self.pools.apply_watcher_event(&watcher::Event::Apply(p));
        disks
    }

    /// This host's DomainNode, in pool `p`, with `status` besides.
    pub fn node_status(&mut self, mut status: Value) {
        status["pool"] = json!("p");
        let node: DomainNode = serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
            "metadata": {"name": NODE},
            "spec": {},
            "status": status
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        self.nodes.apply_watcher_event(&watcher::Event::Apply(node));
    }

    /// The operator rotates the console password: the mirror gets a new version and password.
    pub fn rotate_password(&mut self, version: &str) {
        self.mirrors
            .apply_watcher_event(&watcher::Event::Apply(mirror(
                version,
                &format!("secret-{version}"),
            )));
    }

    /// The operator rewrites the mirror (labels, annotations) without changing the password.
    pub fn rewrite_mirror(&mut self, version: &str) {
        self.mirrors
            .apply_watcher_event(&watcher::Event::Apply(mirror(version, "secret")));
    }

    /// The operator stamps the mirror with a migration (`deskvirt.io/migration`).
    pub fn stamp_mirror(&mut self, stamp: &str) {
        let mut m = mirror("8", "secret");
        m.metadata
            .annotations
            .get_or_insert_default()
            .insert("deskvirt.io/migration".into(), stamp.into());
        self.mirrors.apply_watcher_event(&watcher::Event::Apply(m));
    }

    /// The pool leaves the cache.
    pub fn forget_pool(&mut self) {
        self.pools
            .apply_watcher_event(&watcher::Event::Delete(pool(&self.dir.0)));
    }

    /// The name of [`desktop`]'s domain.
    pub fn domain(&self) -> String {
        domain_name("team", "a", UID)
    }

    /// The path of [`desktop`]'s disk.
    pub fn disk(&self) -> PathBuf {
        PathBuf::from(disk_path(
            &self.dir.0.join("disks").display().to_string(),
            &self.domain(),
        ))
    }

    /// What [`desktop`]'s disk holds now.
    pub fn disk_content(&self) -> Option<Vec<u8>> {
        std::fs::read(self.disk()).ok()
    }

    /// Makes [`desktop`]'s disk, recorded as its own.
    pub fn make_disk(&self) {
        let disk = self.disk();
        std::fs::write(&disk, b"disk").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(crate::disks::owner_path(&disk), UID).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Puts a domain for [`desktop`] on the host, defined by a first pass and then set to
    /// `state` with or without a managed save image.
    pub async fn make_domain(&self, state: DomainState, managed_save: bool) {
        self.make_disk();
        let pass = super::apply::apply(&desktop(), &self.ctx).await;
        assert!(pass.is_ok(), "first pass: {pass:?}");
        // As an earlier process would have left it: what this one wrote is not on its way.
        if let Some(uid) = desktop().metadata.uid {
            self.ctx.forget_report(&uid);
        }
        let name = self.domain();
        let Some(mut dom) = self.hv.domain(&name) else {
            panic!("the first pass defined no domain: {:?}", self.hv.journal())
        };
        dom.state = state;
        dom.managed_save = managed_save;
        self.hv.put(&name, dom);
        if managed_save {
            std::fs::write(self.ctx.config.managed_save_image(&name), b"memory")
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// A domain of another Desktop under `name`.
    pub fn put_foreign(&self, name: &str, uuid: &str) {
        self.hv.put(
            name,
            FakeDomain {
                uuid: uuid.into(),
                xml: String::new(),
                state: DomainState::Running,
                managed_save: false,
                identity: None,
                persistent: true,
                live: None,
            },
        );
    }

    /// The journal of the fake hypervisor from call `from` on.
    pub fn calls_since(&self, from: usize) -> Vec<String> {
        self.hv.journal().into_iter().skip(from).collect()
    }
}

/// The condition `type_` of the last status written, as (status, reason).
pub fn last_condition(api: &ApiLog, type_: &str) -> Option<(String, String, String)> {
    let statuses = api.statuses();
    let last = statuses.last()?;
    last["conditions"].as_array()?.iter().find_map(|c| {
        (c["type"] == type_).then(|| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
    })
}

/// Merges `from` into `into` object by object, as server-side apply merges the agent's fields
/// with the operator's.
fn merge(into: &mut Value, from: &Value) {
    match (into.as_object_mut(), from.as_object()) {
        (Some(i), Some(f)) => {
            for (k, v) in f {
                merge(i.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        _ => *into = from.clone(),
    }
}

/// `d` with `status` merged in from the last status the agent wrote, as the next pass sees it.
pub fn with_last_status(mut d: Desktop, api: &ApiLog) -> Desktop {
    if let Some(last) = api.statuses().last() {
        let mut st = serde_json::to_value(d.status.clone().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        merge(&mut st, last);
        d.status =
            Some(serde_json::from_value::<DesktopStatus>(st).unwrap_or_else(|e| panic!("{e}")));
    }
    d
}
