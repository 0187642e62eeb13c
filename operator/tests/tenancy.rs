//! Who may use which pool, and how much of it, on the real API server with the operator
//! in-process: a pool's `namespaceSelector` refuses desktops of other namespaces
//! (`PoolNotAllowed`, nothing allocated) until the namespace is labelled; a namespace's
//! ResourceQuota caps its number of Desktops at admission (Kubernetes' own
//! `count/desktops.deskvirt.io`, counted by the real quota controller) and its desktops' vCPUs
//! and memory at binding (`deskvirt.io/cpu`, `deskvirt.io/memory`: `QuotaExceeded`).

mod common;

use std::process::{Child, Command, Stdio};

use common::{Run, Setup, node_of, wait_for, wait_refused};
use deskvirt_crds::Desktop;
use deskvirt_crds::constants::quota::{COUNT, CPU, MEMORY};
use deskvirt_tests::cluster::{kubeconfig_path, repo_root};
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

/// A run with its operator, and one host in a pool with the spec `pool_spec` makes.
async fn setup(prefix: &str, pool_spec: impl FnOnce(&Run) -> serde_json::Value) -> Setup {
    let run = Run::new(prefix).await;
    let operator = run.operator(&format!("{prefix}-{}", run.id), &[]);
    let host = run.one_host(pool_spec(&run), 10).await;
    Setup {
        operator,
        host,
        run,
    }
}

#[tokio::test]
async fn a_pool_refuses_namespaces_its_selector_does_not_select() {
    let key = "deskvirt.io/test-tenant";
    let t = setup(
        "op-access",
        |run| json!({ "namespaceSelector": { "matchLabels": { key: run.id } } }),
    )
    .await;
    let (run, pool) = (&t.run, &t.host.pool);
    // Another engineer's CRD without the field would prune it: say so rather than time out.
    let stored = run
        .pools()
        .get(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        stored.spec.namespace_selector.is_some(),
        "the installed CRD pruned spec.namespaceSelector: {stored:?}"
    );

    run.create_desktop("outsider", pool).await;
    let msg = wait_refused(&run.desktops(), "outsider", "PoolNotAllowed").await;
    assert!(msg.contains(pool) && msg.contains(&run.ns), "{msg}");

    // The namespace gets the label the pool asks for: the desktop is placed.
    let label = json!({ "metadata": { "labels": { key: run.id } } });
    Api::<Namespace>::all(run.client.clone())
        .patch(&run.ns, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap_or_else(|e| panic!("labelling {}: {e}", run.ns));
    wait_for(&run.desktops(), "outsider", "binding", |d: &Desktop| {
        node_of(d) == Some(t.host.node.as_str())
    })
    .await;
}

/// Kubernetes' ResourceQuota controller, alone, for as long as the test runs: the shared
/// local control plane may run without it, and without it no quota has a status, so none is
/// enforced at admission. `None` when the cluster is not the local plane (it has its own).
/// Its output goes to a file, shown when the test fails waiting for it.
struct QuotaController(Option<(Child, std::path::PathBuf)>);

impl QuotaController {
    fn start() -> Self {
        let bin = Command::new(repo_root().join("scripts/build-control-plane.sh"))
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        let (Some(bin), Ok(kubeconfig)) = (bin, kubeconfig_path()) else {
            return Self(None);
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        let log = std::env::temp_dir().join(format!(
            "deskvirt-quota-controller-{}.log",
            std::process::id()
        ));
        let out = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let child = Command::new(format!("{bin}/kube-controller-manager"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["--controllers=resourcequota", "--leader-elect=false"])
            .args(["--bind-address=127.0.0.1", "--port=0"])
            .arg(format!("--secure-port={port}"))
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting the quota controller: {e}"));
        Self(Some((child, log)))
    }

    /// Whether it still runs, and the end of what it printed: for a failure message.
    fn report(&mut self) -> String {
        let Some((child, log)) = self.0.as_mut() else {
            return "no quota controller of the test's own".into();
        };
        let state = match child.try_wait() {
            Ok(Some(status)) => format!("exited with {status}"),
            Ok(None) => "still running".into(),
            Err(e) => format!("state unknown: {e}"),
        };
        let text = std::fs::read_to_string(&*log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "quota controller {state}; its last lines:\n{}",
            tail.join("\n")
        )
    }
}

impl Drop for QuotaController {
    fn drop(&mut self) {
        if let Some((c, log)) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_file(&*log);
        }
    }
}

/// The quota's `used` value of `key`, as the API server holds it.
fn used(q: &ResourceQuota, key: &str) -> Option<String> {
    q.status
        .as_ref()
        .and_then(|s| s.used.as_ref())
        .and_then(|u| u.get(key))
        .map(|v| v.0.clone())
}

/// Waits until `f` holds for the quota `name`; the failure shows the controller's state.
async fn wait_quota(
    quotas: &Api<ResourceQuota>,
    controller: &mut QuotaController,
    what: &str,
    f: impl Fn(&ResourceQuota) -> bool,
) -> ResourceQuota {
    let deadline = std::time::Instant::now() + common::DEADLINE;
    let mut last = None;
    loop {
        match quotas.get_opt("desktops").await {
            Ok(Some(q)) if f(&q) => return q,
            Ok(q) => last = q,
            Err(_) => {}
        }
        if std::time::Instant::now() >= deadline {
            panic!(
                "timed out waiting for {what}: {last:#?}\n{}",
                controller.report()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn namespace_quotas_cap_desktops_cpu_and_memory() {
    let mut controller = QuotaController::start();
    let t = setup("op-quota", |_| json!({})).await;
    let (run, pool) = (&t.run, &t.host.pool);
    let quotas: Api<ResourceQuota> = Api::namespaced(run.client.clone(), &run.ns);
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": { "name": "desktops" },
        "spec": { "hard": { COUNT: "3", CPU: "3", MEMORY: "3Gi" } }
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    quotas
        .create(&PostParams::default(), &quota)
        .await
        .unwrap_or_else(|e| panic!("creating the quota: {e}"));
    // Admission enforces a quota only once the controller has written its status.
    wait_quota(
        &quotas,
        &mut controller,
        "the quota controller's status",
        |q| used(q, COUNT).is_some(),
    )
    .await;

    let desks = run.desktops();
    let create = |name: &str, cpu: u32, memory: &str| {
        let d = run.desktop(name, pool, cpu, memory);
        let desks = desks.clone();
        async move { desks.create(&PostParams::default(), &d).await }
    };
    create("first", 2, "1Gi")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(&desks, "first", "binding", |d: &Desktop| {
        node_of(d).is_some()
    })
    .await;

    // Two more vCPUs would make 4 of 3.
    create("more-cpu", 2, "1Gi")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let msg = wait_refused(&desks, "more-cpu", "QuotaExceeded").await;
    assert!(msg.contains(CPU) && msg.contains("desktops"), "{msg}");

    // Three more GiB would make 4Gi of 3Gi.
    create("more-memory", 1, "3Gi")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let msg = wait_refused(&desks, "more-memory", "QuotaExceeded").await;
    assert!(msg.contains(MEMORY), "{msg}");

    // A fourth Desktop is refused by Kubernetes itself, at admission, once admission has
    // counted the three (a recount of the controller's own could lag behind it).
    wait_quota(&quotas, &mut controller, "3 desktops counted", |q| {
        used(q, COUNT).as_deref() == Some("3")
    })
    .await;
    let err = create("fourth", 1, "1Gi")
        .await
        .err()
        .map(|e| e.to_string());
    let err = err.unwrap_or_else(|| panic!("a fourth Desktop was admitted"));
    assert!(
        err.contains("exceeded quota") && err.contains(COUNT),
        "{err}"
    );

    // More vCPUs for the namespace: the refused desktop is placed.
    let raise = json!({ "spec": { "hard": { CPU: "4" } } });
    quotas
        .patch("desktops", &PatchParams::default(), &Patch::Merge(&raise))
        .await
        .unwrap_or_else(|e| panic!("raising the quota: {e}"));
    wait_for(&desks, "more-cpu", "binding", |d: &Desktop| {
        node_of(d).is_some()
    })
    .await;
}
