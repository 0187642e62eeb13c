//! What the operator's cluster tests share: a per-test run (namespace, label, and a guard that
//! removes everything the test created even when it fails), the operator in-process, a fake
//! node-agent that writes DomainNodes, heartbeat Leases, its finalizer and its Desktop
//! conditions exactly as the agent does (server-side apply as `deskvirt-node-agent`, finalizer by
//! a resourceVersion-guarded merge patch), and waiting helpers. `RUST_LOG=deskvirt_operator=debug`
//! shows the operators' logs.
#![allow(dead_code)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use deskvirt_crds::constants::{FINALIZER_AGENT, MANAGER_AGENT};
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use deskvirt_operator::config::Config;
use deskvirt_operator::metrics::Metrics;
use deskvirt_operator::operator;
use deskvirt_runtime::health::Health;
use deskvirt_tests::cluster::{client, ensure_crds, unique_suffix};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// Label every object of a test run carries; the operator under test manages only those.
pub const RUN_LABEL: &str = "deskvirt.io/test-run";

/// How long a wait may take before the test fails. Generous: the machine is small and shared.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// One test's slice of the shared API server: a namespace (the operator's system namespace and
/// the desktops' namespace at once) and a run label. Dropping it (also while a failed test
/// unwinds) stops the test's tasks and deletes its namespace and cluster-scoped objects.
pub struct Run {
    pub client: Client,
    /// Namespace of the operator's Leases and mirrors, and of the test's Desktops.
    pub ns: String,
    /// Value of [`RUN_LABEL`] on every object of this run.
    pub id: String,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Run {
    pub async fn new(prefix: &str) -> Self {
        deskvirt_runtime::logging::init(deskvirt_runtime::logging::LogFormat::Text, "off");
        let client = client().await.unwrap_or_else(|e| panic!("{e:#}"));
        ensure_crds(&client)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let id = unique_suffix();
        let ns = format!("{prefix}-{id}");
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": { "name": ns, "labels": { "deskvirt.io/test": "true", RUN_LABEL: id } }
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {ns}: {e}"));
        Self {
            client,
            ns,
            id,
            tasks: Arc::default(),
        }
    }

    /// The label selector of this run.
    pub fn selector(&self) -> String {
        format!("{RUN_LABEL}={}", self.id)
    }

    /// A task that ends with the run.
    pub fn spawn<F>(&self, f: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = tokio::spawn(f);
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task.abort_handle());
        task
    }

    /// Starts an operator replica in-process, restricted to this run, with a short leader
    /// Lease (3 s unless `extra` names one); `extra` flags come last.
    pub fn operator(&self, identity: &str, extra: &[&str]) -> Operator {
        self.operator_with(self.client.clone(), identity, extra)
    }

    /// As [`Run::operator`], talking to the API server through `client` (one that counts its
    /// requests, say).
    pub fn operator_with(&self, client: Client, identity: &str, extra: &[&str]) -> Operator {
        let selector = self.selector();
        let mut args = vec![
            "deskvirt-operator",
            "--namespace",
            &self.ns,
            "--console-namespace",
            &self.ns,
            "--label-selector",
            &selector,
            "--identity",
            identity,
        ];
        // The run's namespace gets console Secrets unless the test says which do.
        if !extra.contains(&"--console-user-namespaces") {
            args.extend(["--console-user-namespaces", &self.ns]);
        }
        if !extra.contains(&"--leader-lease-duration") {
            args.extend(["--leader-lease-duration", "3s"]);
        }
        args.extend_from_slice(extra);
        let config = Config::parse_from(args);
        let metrics = Metrics::default();
        let (stop, stop_rx) = watch::channel(false);
        let task = self.spawn(operator::run(
            config,
            client,
            Health::new(),
            metrics.clone(),
            stop_rx,
        ));
        Operator {
            metrics,
            stop,
            task: Some(task),
        }
    }

    pub fn desktops(&self) -> Api<Desktop> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn nodes(&self) -> Api<DomainNode> {
        Api::all(self.client.clone())
    }

    pub fn pools(&self) -> Api<ResourcePool> {
        Api::all(self.client.clone())
    }

    /// Creates the run's pool: it selects the run's hosts; `spec` adds to that.
    pub async fn pool(&self, name: &str, spec: serde_json::Value) -> ResourcePool {
        let mut full = json!({ "nodeSelector": { RUN_LABEL: self.id } });
        if let (Some(full), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
            full.extend(extra.clone());
        }
        let pool: ResourcePool = serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "ResourcePool",
            "metadata": { "name": name, "labels": { RUN_LABEL: self.id } },
            "spec": full
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        self.pools()
            .create(&PostParams::default(), &pool)
            .await
            .unwrap_or_else(|e| panic!("creating pool {name}: {e}"))
    }

    /// Registers a host as the agent does: its DomainNode, then its facts.
    pub async fn host(&self, node: &str, threads: u32, memory: &str) {
        self.host_with_cpu_models(node, threads, memory, None).await;
    }

    /// [`Run::host`], the host listing `models` as the CPU models it runs (`None`: no list).
    pub async fn host_with_cpu_models(
        &self,
        node: &str,
        threads: u32,
        memory: &str,
        models: Option<&[&str]>,
    ) {
        let dn = json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
            "metadata": { "name": node, "labels": { RUN_LABEL: self.id } },
            "spec": {}
        });
        let pp = PatchParams::apply(MANAGER_AGENT).force();
        self.nodes()
            .patch(node, &pp, &Patch::Apply(&dn))
            .await
            .unwrap_or_else(|e| panic!("registering {node}: {e}"));
        let mut cpu =
            json!({ "sockets": 1, "cores": threads / 2, "threads": threads, "mhz": 2000 });
        if let (Some(cpu), Some(models)) = (cpu.as_object_mut(), models) {
            cpu.insert("models".into(), json!(models));
        }
        let st = json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
            "metadata": { "name": node },
            "status": {
                "address": "192.0.2.10",
                "migration": { "uri": format!("qemu+tls://{node}/system") },
                "cpu": cpu,
                "memory": memory,
                "hypervisor": "kvm",
                "conditions": [{ "type": "LibvirtConnected", "status": "True", "reason": "Connected",
                                 "message": "connected to libvirt", "lastTransitionTime": "2024-01-01T00:00:00Z" }]
            }
        });
        self.nodes()
            .patch_status(node, &pp, &Patch::Apply(&st))
            .await
            .unwrap_or_else(|e| panic!("reporting {node}: {e}"));
    }

    /// The usual setup: a pool (`spec` added to its selector), one host of 8 threads and
    /// 16Gi in it, heartbeating with a Lease of `lease_secs`.
    pub async fn one_host(&self, spec: serde_json::Value, lease_secs: u32) -> Host {
        let pool = format!("op-pool-{}", self.id);
        let node = format!("op-node-{}", self.id);
        self.pool(&pool, spec).await;
        self.host(&node, 8, "16Gi").await;
        let heartbeat = self.heartbeat(&node, lease_secs);
        Host {
            pool,
            node,
            heartbeat,
        }
    }

    /// Renews the host's heartbeat Lease (valid `lease_secs`) every third of that while the
    /// returned handle says alive.
    pub fn heartbeat(&self, node: &str, lease_secs: u32) -> Heartbeat {
        let api = self.leases();
        let node = node.to_string();
        let (alive, mut alive_rx) = watch::channel(true);
        let every =
            Duration::from_millis(u64::from(lease_secs) * 1000 / 3).max(Duration::from_secs(1));
        let task = self.spawn(async move {
            loop {
                if *alive_rx.borrow_and_update() {
                    let lease = json!({
                        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": { "name": node },
                        "spec": { "holderIdentity": node, "leaseDurationSeconds": lease_secs,
                                  "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now()) }
                    });
                    let pp = PatchParams::apply(MANAGER_AGENT).force();
                    let _ = api.patch(&node, &pp, &Patch::Apply(&lease)).await;
                }
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    r = alive_rx.changed() => if r.is_err() { return },
                }
            }
        });
        Heartbeat { alive, task }
    }

    /// A Desktop of this run asking for `cpu` vCPUs and `memory`.
    pub fn desktop(&self, name: &str, pool: &str, cpu: u32, memory: &str) -> Desktop {
        serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": { "name": name, "labels": { RUN_LABEL: self.id } },
            "spec": { "pool": pool, "cpu": cpu, "memory": memory, "disk": { "image": "base.qcow2" } }
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn create_desktop(&self, name: &str, pool: &str) -> Desktop {
        self.desktops()
            .create(&PostParams::default(), &self.desktop(name, pool, 2, "2Gi"))
            .await
            .unwrap_or_else(|e| panic!("creating desktop {name}: {e}"))
    }

    /// Events about the object named `name` with `reason`: in this run's namespace, or in
    /// `default` for cluster-scoped objects.
    pub async fn events(&self, name: &str, reason: &str) -> Vec<Event> {
        let api: Api<Event> = Api::all(self.client.clone());
        api.list(&ListParams::default())
            .await
            .unwrap_or_else(|e| panic!("listing events: {e}"))
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.reason.as_deref() == Some(reason)
            })
            .collect()
    }

    /// Waits until an Event with `reason` is recorded about `name`.
    pub async fn event(&self, name: &str, reason: &str) -> Event {
        eventually(&format!("Event {reason} on {name}"), || async {
            self.events(name, reason).await.into_iter().next()
        })
        .await
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        // The test's runtime may be unwinding or about to shut down: clean up on a runtime of
        // our own, with a client of our own, and wait for it.
        let (ns, selector) = (self.ns.clone(), self.selector());
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = client().await?;
                tokio::time::timeout(Duration::from_secs(60), clean_up(client, &ns, &selector))
                    .await
                    .map_err(|_| anyhow::anyhow!("clean-up of {ns} timed out"))?
            })
        })
        .join();
        match cleaned {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("clean-up failed: {e:#}"),
            Err(_) => eprintln!("clean-up panicked"),
        }
    }
}

/// Deletes the run's cluster-scoped objects, lets its Desktops go (no operator runs any more
/// to drop their finalizers) and deletes its namespace with everything in it.
async fn clean_up(client: Client, ns: &str, selector: &str) -> anyhow::Result<()> {
    let lp = ListParams::default().labels(selector);
    let dp = DeleteParams::background();
    Api::<DomainNode>::all(client.clone())
        .delete_collection(&dp, &lp)
        .await?;
    Api::<ResourcePool>::all(client.clone())
        .delete_collection(&dp, &lp)
        .await?;
    let desktops: Api<Desktop> = Api::namespaced(client.clone(), ns);
    for d in desktops.list(&ListParams::default()).await?.items {
        if !d.finalizers().is_empty() {
            let patch = json!({ "metadata": { "finalizers": null } });
            desktops
                .patch(
                    &d.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
        }
    }
    match Api::<Namespace>::all(client).delete(ns, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The usual test: a run with one operator replica and one heartbeating host in one pool.
/// Keep it whole for the test's length: a part dropped stops.
pub struct Setup {
    pub operator: Operator,
    pub host: Host,
    pub run: Run,
}

impl Setup {
    /// The pool gets `pool_spec` beside its selector; the host's Lease is valid `lease_secs`.
    pub async fn new(prefix: &str, pool_spec: serde_json::Value, lease_secs: u32) -> Self {
        let run = Run::new(prefix).await;
        let operator = run.operator(&format!("{prefix}-{}", run.id), &[]);
        let host = run.one_host(pool_spec, lease_secs).await;
        Self {
            operator,
            host,
            run,
        }
    }
}

/// An operator replica running in the test's runtime.
pub struct Operator {
    pub metrics: Metrics,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Operator {
    /// Drops the replica where it stands, as a crash would: its Lease is not released.
    pub fn kill(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Stops the replica as SIGTERM does and waits for it.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            match tokio::time::timeout(Duration::from_secs(30), t).await {
                Ok(Ok(Ok(()))) => {}
                other => panic!("operator did not stop cleanly: {other:?}"),
            }
        }
    }

    /// Desktops this replica bound.
    pub fn bindings(&self) -> u64 {
        self.metrics.bindings.get()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A pool with one host, heartbeating while `heartbeat` lives: bind it to a name (`..` or `_`
/// in a pattern drops it, and the host is lost).
pub struct Host {
    pub pool: String,
    pub node: String,
    pub heartbeat: Heartbeat,
}

/// A fake agent's heartbeat.
pub struct Heartbeat {
    alive: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Heartbeat {
    /// Stops or resumes renewing (the host is lost or back).
    pub fn set_alive(&self, alive: bool) {
        let _ = self.alive.send(alive);
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Adds the agent's finalizer as the agent does (merge patch guarded by resourceVersion).
pub async fn agent_adds_finalizer(api: &Api<Desktop>, name: &str) {
    agent_finalizer(api, name, true).await;
}

/// Removes the agent's finalizer as the agent does once the host is clean.
pub async fn agent_removes_finalizer(api: &Api<Desktop>, name: &str) {
    agent_finalizer(api, name, false).await;
}

async fn agent_finalizer(api: &Api<Desktop>, name: &str, on: bool) {
    eventually("the agent's finalizer change", || async {
        let d = match api.get_opt(name).await {
            Ok(Some(d)) => d,
            // Gone: nothing left to remove.
            Ok(None) if !on => return Some(()),
            _ => return None,
        };
        let mut finalizers: Vec<String> = d
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER_AGENT)
            .cloned()
            .collect();
        if on {
            finalizers.push(FINALIZER_AGENT.to_string());
        }
        if finalizers == d.finalizers() {
            return Some(());
        }
        let patch = json!({
            "metadata": { "resourceVersion": d.resource_version(), "finalizers": finalizers }
        });
        // A conflict means "read again", as for the agent.
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .ok()
            .map(|_| ())
    })
    .await
}

/// Applies the agent's conditions (`DomainDefined`, `Running`) as the agent does.
pub async fn agent_reports(api: &Api<Desktop>, name: &str, defined: bool, running: bool) {
    let cond = |t: &str, ok: bool, reason: &str| {
        json!({ "type": t, "status": if ok { "True" } else { "False" }, "reason": reason,
                "message": format!("{t} reported by the fake agent"),
                "lastTransitionTime": "2024-01-01T00:00:00Z" })
    };
    let body = json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": name },
        "status": { "conditions": [
            cond("DomainDefined", defined, if defined { "Defined" } else { "NotDefined" }),
            cond("Running", running, if running { "Running" } else { "Shutdown" }),
        ] }
    });
    let pp = PatchParams::apply(MANAGER_AGENT).force();
    api.patch_status(name, &pp, &Patch::Apply(&body))
        .await
        .unwrap_or_else(|e| panic!("agent status of {name}: {e}"));
}

/// Applies the agent's view of a running domain as the agent does: `DomainDefined` True,
/// `Running` (`running`, `reason`) and `status.idleSince` when idle. Every apply says all the
/// agent owns, so a field left out is removed, as with the agent.
pub async fn agent_power(
    api: &Api<Desktop>,
    name: &str,
    running: bool,
    reason: &str,
    idle_since: Option<k8s_openapi::jiff::Timestamp>,
) {
    let cond = |t: &str, ok: bool, reason: &str| {
        json!({ "type": t, "status": if ok { "True" } else { "False" }, "reason": reason,
                "message": format!("{t} reported by the fake agent"),
                "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now()) })
    };
    let mut status = json!({ "conditions": [
        cond("DomainDefined", true, "Defined"),
        cond("Running", running, reason),
    ] });
    if let Some(t) = idle_since {
        status["idleSince"] = json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t));
    }
    let body = json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": name },
        "status": status,
    });
    let pp = PatchParams::apply(MANAGER_AGENT).force();
    api.patch_status(name, &pp, &Patch::Apply(&body))
        .await
        .unwrap_or_else(|e| panic!("agent status of {name}: {e}"));
}

/// Polls `f` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the object `name` satisfies `f`; the last version read is in the failure.
pub async fn wait_for<K, F>(api: &Api<K>, name: &str, what: &str, f: F) -> K
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    F: Fn(&K) -> bool,
{
    let deadline = Instant::now() + DEADLINE;
    let mut last = None;
    loop {
        match api.get_opt(name).await {
            Ok(Some(o)) if f(&o) => return o,
            Ok(o) => last = o,
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            panic!("timed out waiting for {what} on {name}: {last:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the object `name` is gone.
pub async fn wait_gone<K>(api: &Api<K>, name: &str, what: &str)
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(what, || async {
        matches!(api.get_opt(name).await, Ok(None)).then_some(())
    })
    .await
}

/// Waits until the Desktop `name` is in `phase`.
pub async fn wait_phase(api: &Api<Desktop>, name: &str, phase: Phase) -> Desktop {
    wait_for(api, name, &format!("phase {phase:?}"), |d: &Desktop| {
        d.status.as_ref().and_then(|s| s.phase) == Some(phase)
    })
    .await
}

/// Deletes the Desktop `name` (it may linger on its finalizers).
pub async fn delete(api: &Api<Desktop>, name: &str) {
    api.delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("deleting {name}: {e}"));
}

/// The condition of `type_` in `conditions`.
pub fn cond<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The host a Desktop is bound to.
pub fn node_of(d: &Desktop) -> Option<&str> {
    d.status.as_ref().and_then(|s| s.node.as_deref())
}

/// A Desktop's binding: host, SPICE port, MAC.
pub fn binding(d: &Desktop) -> (Option<String>, Option<u16>, Option<String>) {
    let st = d.status.clone().unwrap_or_default();
    (st.node, st.spice.and_then(|s| s.port), st.mac)
}

/// A local TCP port free right now (for a child's metrics endpoint).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A Secret's value under `key`, as text.
pub fn secret_value(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

/// Waits until this run's leader Lease names `identity`.
pub async fn wait_leader(run: &Run, identity: &str) {
    wait_for(
        &run.leases(),
        deskvirt_crds::constants::LEADER_LEASE,
        &format!("{identity} to lead"),
        |l: &Lease| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(identity),
    )
    .await;
}

/// A Desktop's conditions (none without a status).
pub fn desktop_conditions(d: &Desktop) -> &[Condition] {
    d.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

/// Waits until the Desktop `name` is refused with `Scheduled=False` (and `Ready=False`) for
/// `reason`, checks that nothing was allocated (no host, MAC or port), and returns the message.
pub async fn wait_refused(api: &Api<Desktop>, name: &str, reason: &str) -> String {
    let d = wait_for(
        api,
        name,
        &format!("Scheduled=False {reason}"),
        |d: &Desktop| {
            let c = desktop_conditions(d);
            cond(c, "Scheduled").is_some_and(|c| c.status == "False" && c.reason == reason)
                && cond(c, "Ready").is_some_and(|c| c.status == "False")
        },
    )
    .await;
    let st = d.status.unwrap_or_default();
    assert!(
        st.node.is_none() && st.mac.is_none() && st.spice.is_none(),
        "{name} was refused but holds an allocation: {st:?}"
    );
    cond(&st.conditions, "Scheduled")
        .map(|c| c.message.clone())
        .unwrap_or_default()
}
