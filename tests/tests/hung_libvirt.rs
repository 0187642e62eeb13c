//! A hung host, end to end: the chart's operator, a node-agent on a second libvirt host
//! (`scripts/second-host.sh`, so other tests keep theirs), real QEMU (TCG) and the real
//! apiserver. The agent runs with its default libvirt deadline (10 s) and with a `qemu-img`
//! that hangs for one base image (a shell wrapper around the real one, 5 s deadline).
//! - `steady` runs; `stuck`, whose base image makes `qemu-img` hang, reports
//!   `DomainDefined` not True with reason `DiskToolTimeout` and does not hold `steady` up;
//! - libvirtd is stopped with SIGSTOP: within 30 s the DomainNode says `LibvirtConnected=False`
//!   and `Schedulable=False`, `/readyz` fails while `/healthz` stays OK, a new desktop is not
//!   placed there, and `steady`'s QEMU keeps its PID;
//! - SIGCONT: `LibvirtConnected=True`, ready and schedulable again, the new desktop is placed.
//!
//! Run: `cargo test -p deskvirt-tests --test hung_libvirt -- --nocapture`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::condition::{
    DOMAIN_DEFINED, LIBVIRT_CONNECTED, SCHEDULABLE, SCHEDULED,
};
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::{Desktop, DomainNode};
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::{eventually, free_port, http_response};
use deskvirt_tests::second_host::SecondHost;
use deskvirt_tests::world::{World, create_pool, domain_of, guest_desktop, setup};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

/// How fast a stalled libvirt must make the host unschedulable (the bound).
const STALL_BOUND: Duration = Duration::from_secs(30);

/// Sends SIGCONT to a process stopped with SIGSTOP when dropped, so a failing test never
/// leaves libvirtd stopped.
struct Stopped(u32);

impl Stopped {
    fn stop(pid: u32) -> anyhow::Result<Self> {
        signal("STOP", pid)?;
        Ok(Self(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = signal("CONT", self.0);
    }
}

fn signal(sig: &str, pid: u32) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{sig} {pid} failed");
    Ok(())
}

/// The status code of `GET path` on the agent's health endpoint `addr`.
async fn http_status(addr: &str, path: &str) -> anyhow::Result<u16> {
    Ok(http_response(addr, path).await?.0)
}

/// Whether the DomainNode says `LibvirtConnected=True` and `Schedulable=True` and the agent
/// at `metrics` answers `/readyz` with 200.
async fn host_healthy(w: &World, metrics: &str) -> anyhow::Result<Option<()>> {
    let connected = node_condition(w, LIBVIRT_CONNECTED).await?;
    let sched = node_condition(w, SCHEDULABLE).await?;
    let ready = http_status(metrics, "/readyz").await? == 200;
    Ok(
        (connected.is_some_and(|c| c.0 == "True") && sched.is_some_and(|c| c.0 == "True") && ready)
            .then_some(()),
    )
}

/// `(status, reason)` of condition `type_` on the DomainNode.
async fn node_condition(w: &World, type_: &str) -> anyhow::Result<Option<(String, String)>> {
    let nodes: Api<DomainNode> = Api::all(w.client.clone());
    Ok(nodes.get_opt(&w.node).await?.and_then(|n| {
        let st = n.status?;
        find(&st.conditions, type_).map(|c| (c.status.clone(), c.reason.clone()))
    }))
}

fn condition_of(d: &Desktop, type_: &str) -> Option<(String, String, String)> {
    let st = d.status.as_ref()?;
    find(&st.conditions, type_).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// QEMU's PID of `domain` on the second host, from its libvirt's PID file.
fn qemu_pid_on(host: &SecondHost, domain: &str) -> Option<u32> {
    std::fs::read_to_string(host.dir.join(format!("run/qemu/{domain}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_libvirtd_makes_the_host_unready_and_unschedulable_but_not_dead()
-> anyhow::Result<()> {
    // The host first, so that it goes last: the World's desktops are deleted while it runs.
    let host = SecondHost::start(&format!("dvh{}", unique_suffix()))?;
    let mut w = setup(&format!("hung-{}", unique_suffix())).await?;
    create_pool(&w).await?;
    std::os::unix::fs::symlink(
        w.guest_dir.join("base.qcow2"),
        w.image_dir.join("hang.qcow2"),
    )?;
    let wrapper = w.image_dir.with_file_name("qemu-img-hangs");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\ncase \"$*\" in *hang.qcow2*) exec sleep 3600 ;; esac\nexec qemu-img \"$@\"\n",
    )?;
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let save_dir = host.managed_save_dir().display().to_string();
    let wrapper_path = wrapper.display().to_string();
    w.agent = Some(w.spawn_agent_at(
        &w.node,
        &metrics,
        &[
            "--libvirt-uri",
            &host.uri,
            "--managed-save-dir",
            &save_dir,
            "--node-address",
            &host.address,
            "--qemu-img",
            &wrapper_path,
            "--qemu-img-timeout",
            "5s",
        ],
    )?);
    w.start_operator()?;
    let desktops = w.desktops();

    // `stuck`'s disk never gets made (qemu-img hangs, is killed at 5 s, retried with backoff;
    // a transient failure shows as Unknown once it keeps coming back); `steady` boots meanwhile.
    let stuck = guest_desktop(
        &w,
        "stuck",
        "128Mi",
        json!({ "disk": { "image": "hang.qcow2" } }),
    )?;
    desktops.create(&PostParams::default(), &stuck).await?;
    let steady = guest_desktop(&w, "steady", "128Mi", json!({}))?;
    desktops.create(&PostParams::default(), &steady).await?;
    let created = Instant::now();
    let (_, reason, message) = eventually(
        Duration::from_secs(60),
        "stuck: DiskToolTimeout",
        || async {
            let d = desktops.get("stuck").await?;
            Ok(condition_of(&d, DOMAIN_DEFINED)
                .filter(|(s, r, _)| s == "Unknown" && r == "DiskToolTimeout"))
        },
    )
    .await?;
    eprintln!(
        "[hung] stuck: DomainDefined not True ({reason}) after {:.1}s: {message}",
        created.elapsed().as_secs_f64()
    );
    anyhow::ensure!(message.contains("did not finish within 5s"), "{message}");
    eventually(Duration::from_secs(240), "steady Running", || async {
        Ok((w.phase("steady").await? == Some(Phase::Running)).then_some(()))
    })
    .await?;
    eprintln!(
        "[hung] steady Running after {:.1}s",
        created.elapsed().as_secs_f64()
    );
    let domain = domain_of(&desktops, &w.user_ns.name, "steady").await?;
    let pid = qemu_pid_on(&host, &domain).context("steady has no QEMU PID on the host")?;
    eventually(
        Duration::from_secs(30),
        "host ready and schedulable",
        || host_healthy(&w, &metrics),
    )
    .await?;

    // SIGSTOP: libvirtd accepts connections and answers nothing.
    let libvirtd: u32 = std::fs::read_to_string(host.dir.join("libvirtd.pid"))?
        .trim()
        .parse()?;
    let stopped = Stopped::stop(libvirtd)?;
    let t0 = Instant::now();
    let reason = eventually(
        STALL_BOUND,
        "LibvirtConnected=False and Schedulable=False",
        || async {
            let connected = node_condition(&w, LIBVIRT_CONNECTED).await?;
            let sched = node_condition(&w, SCHEDULABLE).await?;
            Ok(match (connected, sched) {
                (Some((c, _)), Some((s, r))) if c == "False" && s == "False" => Some(r),
                _ => None,
            })
        },
    )
    .await?;
    eprintln!(
        "[hung] SIGSTOP → LibvirtConnected=False, Schedulable=False/{reason} in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        reason == "LibvirtDisconnected",
        "Schedulable reason {reason}"
    );
    eventually(Duration::from_secs(10), "/readyz failing", || async {
        Ok((http_status(&metrics, "/readyz").await? == 503).then_some(()))
    })
    .await?;
    anyhow::ensure!(
        http_status(&metrics, "/healthz").await? == 200,
        "/healthz fails on a hung libvirtd"
    );

    // A new desktop is not placed on the hung host.
    let newcomer = guest_desktop(&w, "newcomer", "128Mi", json!({}))?;
    desktops.create(&PostParams::default(), &newcomer).await?;
    let (_, why, _) = eventually(Duration::from_secs(30), "newcomer refused", || async {
        // Liveness holds at every look while libvirtd stays stopped.
        let live = http_status(&metrics, "/healthz").await?;
        anyhow::ensure!(live == 200, "/healthz answered {live} on a hung libvirtd");
        let d = desktops.get("newcomer").await?;
        Ok(condition_of(&d, SCHEDULED).filter(|(s, _, _)| s == "False"))
    })
    .await?;
    eprintln!("[hung] newcomer: Scheduled=False/{why}");
    anyhow::ensure!(
        desktops
            .get("newcomer")
            .await?
            .status
            .and_then(|s| s.node)
            .is_none(),
        "newcomer bound to the hung host"
    );
    let hung_for = t0.elapsed();
    anyhow::ensure!(
        http_status(&metrics, "/healthz").await? == 200,
        "/healthz failed after {hung_for:?}"
    );
    anyhow::ensure!(
        w.agent.as_mut().is_some_and(|a| a.running()),
        "the agent exited on a hung libvirtd"
    );
    anyhow::ensure!(
        std::path::Path::new(&format!("/proc/{pid}")).exists()
            && qemu_pid_on(&host, &domain) == Some(pid),
        "steady's QEMU {pid} did not survive the hung libvirtd"
    );

    // SIGCONT: back to connected, ready and schedulable; the newcomer is placed.
    drop(stopped);
    let t1 = Instant::now();
    eventually(
        Duration::from_secs(60),
        "host connected, ready and schedulable again",
        || host_healthy(&w, &metrics),
    )
    .await?;
    eprintln!(
        "[hung] SIGCONT → connected, ready, schedulable in {:.1}s",
        t1.elapsed().as_secs_f64()
    );
    eventually(
        Duration::from_secs(60),
        "newcomer bound to the host",
        || async {
            let d = desktops.get("newcomer").await?;
            Ok((d.status.and_then(|s| s.node).as_deref() == Some(w.node.as_str())).then_some(()))
        },
    )
    .await?;
    anyhow::ensure!(
        qemu_pid_on(&host, &domain) == Some(pid),
        "steady's QEMU changed"
    );
    anyhow::ensure!(
        w.phase("steady").await? == Some(Phase::Running),
        "steady is no longer Running"
    );
    Ok(())
}
