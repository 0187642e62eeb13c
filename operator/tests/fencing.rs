//! Fenced leadership against the real API server. A leader paused (SIGSTOP) in the middle of a
//! bind, past its Lease, sends nothing when it resumes (SIGCONT) and steps down, while the other
//! replica took over: no port or MAC is ever held twice. And two leaders forced (a duplicate
//! port and MAC written as a fenced-out leader's late binding would land): the younger desktop
//! gets new ones, with a Warning naming both, and keeps running. And the API client's call
//! deadline leaves watches alone.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Host, Run, agent_reports, binding, eventually, free_port, node_of, wait_for, wait_leader,
    wait_phase,
};
use deskvirt_crds::Desktop;
use deskvirt_crds::constants::MANAGER_OPERATOR;
use deskvirt_crds::desktop::Phase;
use deskvirt_tests::cluster::kubeconfig_path;
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_deskvirt-operator");

type Binding = (Option<String>, Option<u16>, Option<String>);

/// Watches the run's Desktops and records every moment two of them held one port on one host
/// or one MAC.
fn watch_duplicates(run: &Run) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let found = seen.clone();
    let api = run.desktops();
    run.spawn(async move {
        let mut now: BTreeMap<String, Binding> = BTreeMap::new();
        let stream = watcher(api, watcher::Config::default()).touched_objects();
        futures::pin_mut!(stream);
        while let Some(Ok(d)) = stream.next().await {
            now.insert(d.metadata.name.clone().unwrap_or_default(), binding(&d));
            let mut ports = BTreeMap::new();
            let mut macs = BTreeMap::new();
            for (name, (node, port, mac)) in &now {
                if let (Some(n), Some(p)) = (node, port)
                    && let Some(other) = ports.insert((n.clone(), *p), name.clone())
                {
                    found
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("port {p} on {n}: {other} and {name}"));
                }
                if let Some(m) = mac
                    && let Some(other) = macs.insert(m.clone(), name.clone())
                {
                    found
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("MAC {m}: {other} and {name}"));
                }
            }
        }
    });
    seen
}

/// The operator binary as a child process, its log lines collected.
struct Replica {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Replica {
    fn start(run: &Run, identity: &str, extra: &[&str]) -> Self {
        let kubeconfig = kubeconfig_path().unwrap_or_else(|e| panic!("{e:#}"));
        let port = free_port();
        let mut child = Command::new(BIN)
            .env("KUBECONFIG", &kubeconfig)
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--namespace", &run.ns, "--console-namespace", &run.ns])
            .args(["--console-user-namespaces", &run.ns])
            .args(["--label-selector", &run.selector(), "--identity", identity])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let lines = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        Self { child, port, log }
    }

    fn logged(&self, what: &str) -> bool {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| l.contains(what))
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig}");
    }

    /// A metric's value from /metrics (`None` while it does not answer).
    fn metric(&self, name: &str) -> Option<f64> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_leader_paused_mid_bind_sends_nothing_when_it_resumes() {
    let run = Run::new("op-fence").await;
    let Host {
        pool,
        heartbeat: _heartbeat,
        ..
    } = run.one_host(json!({}), 30).await;
    let duplicates = watch_duplicates(&run);

    // A leads, and pauses between deciding a binding and writing it.
    let (a_id, b_id) = (format!("a-{}", run.id), format!("b-{}", run.id));
    let a = Replica::start(
        &run,
        &a_id,
        &["--leader-lease-duration", "2s", "--test-bind-delay", "3s"],
    );
    wait_leader(&run, &a_id).await;
    run.create_desktop("first", &pool).await;
    eventually("A in the middle of a bind", || async {
        a.logged("pausing before the binding is written")
            .then_some(())
    })
    .await;
    // Frozen there, past its Lease: B takes over and binds.
    a.signal("-STOP");
    let stopped = Instant::now();
    let b = run.operator(&b_id, &["--leader-lease-duration", "2s"]);
    wait_leader(&run, &b_id).await;
    let desks = run.desktops();
    let first = wait_for(&desks, "first", "binding by B", |d: &Desktop| {
        node_of(d).is_some()
    })
    .await;
    run.create_desktop("second", &pool).await;
    let second = wait_for(&desks, "second", "binding by B", |d: &Desktop| {
        node_of(d).is_some()
    })
    .await;
    // B leads and bound both while A was frozen: A's Lease ran out during the pause (how long
    // that took depends on when A last renewed, anywhere up to the 2 s duration before it).
    eprintln!(
        "A frozen for {:.1}s while B took over and bound both",
        stopped.elapsed().as_secs_f64()
    );

    // A resumes where it stood: its write is refused by the fence, and it steps down.
    a.signal("-CONT");
    eventually("A's fenced write", || async {
        a.metric("deskvirt_operator_fenced_writes_total")
            .filter(|n| *n >= 1.0)
    })
    .await;
    eventually("A stepping down", || async {
        let down = a.metric("deskvirt_operator_leader_step_downs_total")? >= 1.0;
        (down && a.metric("deskvirt_operator_leader")? == 0.0).then_some(())
    })
    .await;
    assert_eq!(a.metric("deskvirt_operator_bindings_total"), Some(0.0));
    eventually("B's two bindings", || async {
        (b.bindings() == 2).then_some(())
    })
    .await;
    wait_leader(&run, &b_id).await;
    let now = |name: &'static str| {
        let desks = desks.clone();
        async move { desks.get(name).await.unwrap_or_else(|e| panic!("{e}")) }
    };
    assert_eq!(
        binding(&now("first").await),
        binding(&first),
        "B's binding stays"
    );
    assert_eq!(binding(&now("second").await), binding(&second));
    assert_ne!(binding(&first).1, binding(&second).1);
    assert_ne!(binding(&first).2, binding(&second).2);
    let seen = duplicates.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(seen.is_empty(), "duplicates seen: {seen:?}");
}

#[tokio::test]
async fn a_duplicate_port_and_mac_are_repaired_and_the_desktop_keeps_running() {
    let run = Run::new("op-dup").await;
    let Host {
        pool,
        heartbeat: _heartbeat,
        ..
    } = run.one_host(json!({}), 30).await;
    let id = format!("op-{}", run.id);
    let op = run.operator(&id, &[]);
    wait_leader(&run, &id).await;
    let desks = run.desktops();
    run.create_desktop("first", &pool).await;
    let first = wait_for(&desks, "first", "binding", |d: &Desktop| {
        node_of(d).is_some()
    })
    .await;
    // Created a second later: the younger one, whatever the UIDs.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    run.create_desktop("second", &pool).await;
    let second = wait_for(&desks, "second", "binding", |d: &Desktop| {
        node_of(d).is_some()
    })
    .await;
    agent_reports(&desks, "second", true, true).await;
    wait_phase(&desks, "second", Phase::Running).await;

    // Two leaders: the late binding of a fenced-out one lands, giving `second` the port and
    // MAC of `first`.
    let (_, p1, m1) = binding(&first);
    let late_binding = || async {
        let late = json!({ "status": { "spice": { "port": p1 }, "mac": m1 } });
        let pp = PatchParams {
            field_manager: Some(MANAGER_OPERATOR.into()),
            ..Default::default()
        };
        desks
            .patch_status("second", &pp, &Patch::Merge(&late))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    };
    late_binding().await;

    // Repaired: `second` (younger) gets new, unique values; `first` keeps its own.
    let repaired = wait_for(&desks, "second", "the repair", |d: &Desktop| {
        let (_, p, m) = binding(d);
        p.is_some() && p != p1 && m.is_some() && m != m1
    })
    .await;
    assert_eq!(binding(&repaired).0, binding(&second).0, "same host");
    let event = run.event("second", "DuplicateBinding").await;
    let note = event.note.unwrap_or_default();
    for word in [
        "first",
        "second",
        &format!("SPICE port {}", p1.unwrap_or(0)),
    ] {
        assert!(note.contains(word), "{word} not in {note}");
    }
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(op.metrics.binding_repairs.get(), 1);
    let first_now = desks.get("first").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        binding(&first_now),
        binding(&first),
        "the older keeps its binding"
    );
    // Nothing is stopped: still Running, still On.
    let second_now = wait_phase(&desks, "second", Phase::Running).await;
    assert_eq!(second_now.spec.power, second.spec.power);
    assert_eq!(run.events("first", "DuplicateBinding").await.len(), 0);

    // The same found by the next leader's ledger rebuild: repaired alike, named alike.
    op.stop().await;
    late_binding().await;
    let next = format!("next-{}", run.id);
    let _op = run.operator(&next, &[]);
    wait_leader(&run, &next).await;
    wait_for(
        &desks,
        "second",
        "the repair by the rebuild",
        |d: &Desktop| {
            let (_, p, m) = binding(d);
            p.is_some() && p != p1 && m.is_some() && m != m1
        },
    )
    .await;
    let note = run
        .event("second", "BindingConflict")
        .await
        .note
        .unwrap_or_default();
    assert!(note.contains("first") && note.contains("second"), "{note}");
    wait_phase(&desks, "second", Phase::Running).await;
}

/// The API client's call deadline bounds a response head, not a watch: a watch silent for
/// longer than the deadline still delivers the next change.
#[tokio::test]
async fn a_watch_outlives_the_call_deadline() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Api;
    use kube::config::{KubeConfigOptions, Kubeconfig};

    let run = Run::new("op-deadline").await;
    let path = kubeconfig_path().unwrap_or_else(|e| panic!("{e:#}"));
    let kc = Kubeconfig::read_from(&path).unwrap_or_else(|e| panic!("{e}"));
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Duration::from_millis(300);
    let client =
        deskvirt_runtime::api::client_from(config, deadline).unwrap_or_else(|e| panic!("{e}"));
    let api: Api<ConfigMap> = Api::namespaced(client, &run.ns);
    let only_late = watcher::Config::default().fields("metadata.name=late");
    let stream = watcher(api, only_late).touched_objects();
    futures::pin_mut!(stream);
    // Silent for several deadlines, then a change.
    let quiet = tokio::time::timeout(deadline * 5, stream.next()).await;
    assert!(quiet.is_err(), "nothing to see yet: {quiet:?}");
    let cm: ConfigMap = serde_json::from_value(json!({ "metadata": { "name": "late" } }))
        .unwrap_or_else(|e| panic!("{e}"));
    Api::<ConfigMap>::namespaced(run.client.clone(), &run.ns)
        .create(&Default::default(), &cm)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap_or_else(|e| panic!("the watch died: {e}"));
    assert!(
        matches!(&seen, Some(Ok(c)) if c.metadata.name.as_deref() == Some("late")),
        "{seen:?}"
    );
}
