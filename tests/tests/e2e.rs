//! End to end, the way a user meets deskvirt: `helm install` of the chart into the local
//! control plane, the operator and the node-agent as local processes authenticated with the
//! chart's own ServiceAccount tokens (so the chart's RBAC is what is tested), libvirt with
//! QEMU (TCG) on this machine, the demo image imported as a DesktopImage from an HTTP origin,
//! and `kubectl apply -f examples/desktop.yaml`. Then:
//! - `kubectl wait --for=condition=Ready`, a SPICE link with the Secret's password (a wrong
//!   one is refused), `kubectl get desktops` showing phase, node and SPICE endpoint;
//! - GitOps: a second apply changes nothing and `kubectl diff` is empty;
//! - `kill -9` of the agent: the host and the desktop go Unknown, and come back with the same
//!   QEMU process when the agent restarts;
//! - a libvirtd restart under the running desktop: it keeps running, the agent reconnects;
//! - a burst of 20 Desktops with the operator killed in the middle, one of them given a SPICE
//!   port another process on the host listens on: all Running (that one moved to another
//!   port, with a `SpicePortBusy` Event), no port or MAC twice;
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
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::constants::{CONSOLE_NAMESPACE_DEFAULT, IMAGES_NAMESPACE_DEFAULT};
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use deskvirt_tests::cluster::repo_root;
use deskvirt_tests::host::{demo_image, eventually, qemu_pid, screen_text};
use deskvirt_tests::images::{create_image, sha256};
use deskvirt_tests::kubectl::kubectl;
use deskvirt_tests::origin::Origin;
use deskvirt_tests::spice::{LinkOutcome, link};
use deskvirt_tests::world::{
    LEASE, RUN_LABEL, console_password, create_pool, domain_of, setup, spice_addr,
};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

/// Desktops of the burst.
const BURST: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_apply_connect_survive_and_delete() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut w = setup("lab").await?;
    anyhow::ensure!(w.console_ns != CONSOLE_NAMESPACE_DEFAULT);
    create_pool(&w).await?;
    w.start_agent()?;
    w.start_operator()?;
    let desktops = w.desktops();

    // kubectl apply of the example, as a user does; the run label keeps other tests' operators
    // (and this one) apart. Its image is the DesktopImage demo-desktop of the images namespace,
    // imported from an HTTP origin as scripts/demo.sh does, and this release's images namespace
    // stands for the one the example names.
    let demo = demo_image()?;
    let origin = Origin::start(demo.parent().context("the demo image's directory")?.into()).await?;
    let demo_url = origin.url("demo-desktop.qcow2");
    create_image(&w, &w.images_ns, "demo-desktop", &demo_url, &sha256(&demo)?).await?;
    let text = std::fs::read_to_string(repo_root().join("examples/desktop.yaml"))?;
    let named = format!("namespace: {IMAGES_NAMESPACE_DEFAULT}");
    anyhow::ensure!(text.contains(&named), "examples/desktop.yaml lacks {named}");
    let example = std::env::temp_dir().join(format!("deskvirt-e2e-{}-desktop.yaml", w.run));
    std::fs::write(
        &example,
        text.replace(&named, &format!("namespace: {}", w.images_ns)),
    )?;
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

    // The example boots from its disk to a login: on the serial console, and on the screen a
    // SPICE client shows (read back by OCR), not SeaBIOS's "No bootable device".
    let domain = domain_of(&w.desktops(), &w.user_ns.name, "alice").await?;
    let serial = deskvirt_tests::world::serial_log(&domain);
    eventually(
        Duration::from_secs(180),
        "login: on alice's serial console",
        || async {
            let log = std::fs::read_to_string(&serial).unwrap_or_default();
            Ok(log.contains("login:").then_some(()))
        },
    )
    .await?;
    // OCR may misread a character of the prompt: "login" in any case is enough.
    let screen = eventually(
        Duration::from_secs(60),
        "a login on alice's screen",
        || async {
            let text = screen_text(&domain)?;
            Ok(text.to_ascii_lowercase().contains("login").then_some(text))
        },
    )
    .await?;
    anyhow::ensure!(
        !screen.contains("Boot failed") && !screen.contains("bootable"),
        "alice's screen shows a boot failure:\n{screen}"
    );
    eprintln!(
        "[e2e] the example desktop shows a login: {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // kill -9 the agent: host and desktop go Unknown; a restart brings them back, same QEMU.
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

    // Another process on the host listens on a port the burst is given (the lowest free one
    // after alice's): the desktop that gets it cannot start there, the host says so, and the
    // operator moves it to another port, where it runs. No desktop gets the taken port.
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    let range = pools.get(&w.pool).await?.spec.display.spice_ports;
    let alice_port = spice_addr(&desktops.get("alice").await?)?.port();
    let taken_port = (range.first..=range.last)
        .find(|p| *p != alice_port)
        .context("a pool range of one port")?;
    let taker = std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, taken_port))
        .with_context(|| format!("taking port {taken_port}"))?;

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
    anyhow::ensure!(
        !ports.contains(&taken_port),
        "a desktop holds port {taken_port}, which another process listens on"
    );
    let moved = w.kubectl_ns(&[
        "get",
        "events",
        "--field-selector=reason=SpicePortBusy",
        "-o",
        "jsonpath={.items[*].message}",
    ])?;
    anyhow::ensure!(
        moved
            .stdout
            .contains(&format!("SPICE port {taken_port} is taken")),
        "no SpicePortBusy Event names port {taken_port}: {} {}",
        moved.stdout,
        moved.stderr
    );
    eprintln!("[e2e] the desktop given taken port {taken_port} moved off it and runs");
    drop(taker);
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
    // Port and MAC are free again: the pool counts no port in use (the taken one, kept from
    // desktops while this operator runs, is counted apart).
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
    let bad = "apiVersion: deskvirt.io/v1alpha1\nkind: Desktop\nmetadata:\n  name: bad\nspec:\n  pool: lab\n  cpu: 0\n  disk:\n    image: demo-desktop.qcow2\n";
    let rejected = kubectl(&["apply", "-n", &w.user_ns.name, "-f", "-"], Some(bad))?;
    anyhow::ensure!(
        !rejected.success && rejected.stderr.contains("spec.cpu"),
        "invalid manifest not rejected by field: {}",
        rejected.stderr
    );
    eprintln!("[e2e] total: {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
