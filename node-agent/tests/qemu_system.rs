//! The real tier: our [`LibvirtHypervisor`] on `qemu:///system` and our domain XML converter,
//! booting a tiny Debian guest under TCG (`<domain type='qemu'>`, 1 vCPU, 256 MiB) from a
//! qcow2 linked clone, with SPICE on an explicit loopback port.
//!
//! Needs root, the packages of `scripts/install-deps.sh` and the network for the first guest
//! build; it runs `scripts/libvirt.sh start` and `scripts/build-guest.sh` itself and fails with
//! their output when they fail. The NIC is plugged into a plain Linux bridge made here
//! ([`BRIDGE`]), because a libvirt nat/isolated network needs dnsmasq.
//!
//! Also: a managed save (idle suspend) restored with a new SPICE port and password written
//! into its image, a refused ABI change, and images removed with their domain.
//!
//! Run: `cargo test -p deskvirt-node-agent --test qemu_system -- --nocapture`.
//! The tests hold one lock so only one guest runs at a time, and a [`DomainGuard`] destroys and
//! undefines every domain and removes its overlay even when an assertion fails.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{desktop, free_port, prepare_host, run, unique};
use deskvirt_node_agent::domain::{
    Binding, DomainInputs, DomainType, HostContext, NetworkAttachment, Secret, domain_xml,
    graphics_xml,
};
use deskvirt_node_agent::hypervisor::{
    BackupJob, BackupProgress, Change, Checkpoint, DomainState, Hold, Hypervisor, HypervisorError,
    LibvirtHypervisor, MoveLimits, Outbound,
};
use deskvirt_tests::spice::{self, LINK_ERR_PERMISSION_DENIED, LinkOutcome};

const URI: &str = "qemu:///system";
/// Linux bridge the test guests' NICs are plugged into (no IP, no uplink).
const BRIDGE: &str = "dvqemutest0";
/// What the guest's /init prints on the serial console once userspace runs.
const MARKER: &str = "DESKVIRT-GUEST-READY";
const NODE: &str = "node-1";
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// One guest at a time on this 2-core machine.
static ONE_GUEST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Everything one test run needs from the machine.
struct Env {
    hv: LibvirtHypervisor,
    guest_dir: String,
    disk_dir: PathBuf,
}

async fn setup() -> Env {
    let guest_dir = prepare_host();
    ensure_bridge();
    let disk_dir = std::env::temp_dir().join(format!("deskvirt-qemu-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&disk_dir) {
        panic!("cannot create {}: {e}", disk_dir.display());
    }
    let hv = match LibvirtHypervisor::connect(URI).await {
        Ok(hv) => hv,
        Err(e) => panic!("cannot open {URI}: {e}"),
    };
    Env {
        hv,
        guest_dir,
        disk_dir,
    }
}

fn ensure_bridge() {
    let exists = Command::new("ip")
        .args(["link", "show", BRIDGE])
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        let added = Command::new("ip")
            .args(["link", "add", BRIDGE, "type", "bridge"])
            .output();
        // Another test process may have made it meanwhile; the check below decides.
        drop(added);
    }
    run(
        "ip link set up",
        Command::new("ip").args(["link", "set", BRIDGE, "up"]),
    );
}

/// Inputs of a test desktop, made by our converter's own input path.
fn inputs(env: &Env, usb: serde_json::Value, port: u16, password: &str) -> DomainInputs {
    let id = unique();
    let uid = format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        id >> 32,
        id & 0xffff,
        id & 0xffff_ffff_ffff
    );
    let spec = serde_json::json!({
        "pool": "qemu-test",
        "cpu": 1,
        "memory": "256Mi",
        "disk": { "image": "base.qcow2", "clone": "Linked" },
        "boot": { "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0" },
        "display": { "usb": usb },
    });
    let desk = desktop("qemu-test", &format!("d{:x}", id & 0xffff_ffff), &uid, spec);
    let host = HostContext {
        node_name: NODE.into(),
        domain_type: DomainType::Qemu,
        image_dir: env.guest_dir.clone(),
        disk_dir: env.disk_dir.display().to_string(),
        network: NetworkAttachment::Bridge {
            bridge: BRIDGE.into(),
        },
        spice_listen: "127.0.0.1".into(),
        spice_tls: false,
    };
    let mac = format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (id >> 16) & 0xff,
        (id >> 8) & 0xff,
        id & 0xff
    );
    let binding = Binding {
        node: NODE.into(),
        spice_port: port,
        mac,
        spice_password: Secret::new(password),
        pinned_cpus: Vec::new(),
    };
    match DomainInputs::from_desktop(&desk, &common::valid(&desk), &binding, &host) {
        Ok(inputs) => inputs,
        Err(e) => panic!("test desktop does not convert: {e}"),
    }
}

/// Destroys and undefines the domain and removes its overlay when dropped (also on panic).
struct DomainGuard {
    hv: LibvirtHypervisor,
    name: String,
    overlay: PathBuf,
    done: bool,
}

impl DomainGuard {
    async fn delete(&mut self) {
        if let Err(e) = self.hv.destroy_domain(&self.name).await {
            panic!("destroy {}: {e}", self.name);
        }
        if let Err(e) = self.hv.undefine_domain(&self.name).await {
            panic!("undefine {}: {e}", self.name);
        }
        match std::fs::remove_file(&self.overlay) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove {}: {e}", self.overlay.display()),
        }
        self.done = true;
    }
}

impl Drop for DomainGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (hv, name) = (self.hv.clone(), self.name.clone());
        let cleanup = async move {
            let destroyed = hv.destroy_domain(&name).await;
            let undefined = hv.undefine_domain(&name).await;
            (destroyed, undefined)
        };
        let result = match tokio::runtime::Handle::try_current() {
            Ok(handle) => tokio::task::block_in_place(|| handle.block_on(cleanup)),
            Err(_) => match tokio::runtime::Runtime::new() {
                Ok(rt) => rt.block_on(cleanup),
                Err(e) => {
                    eprintln!("cleanup of {}: no runtime: {e}", self.name);
                    return;
                }
            },
        };
        if let (Err(e), _) | (_, Err(e)) = &result {
            eprintln!("cleanup of {} failed: {e}", self.name);
        }
        let _ = std::fs::remove_file(&self.overlay);
    }
}

/// Makes the linked clone and defines the domain; the guard exists before anything is made.
async fn define(env: &Env, inputs: &DomainInputs) -> (DomainGuard, String) {
    let guard = DomainGuard {
        hv: env.hv.clone(),
        name: inputs.domain_name(),
        overlay: PathBuf::from(&inputs.disk_path),
        done: false,
    };
    let base = Path::new(&env.guest_dir).join("base.qcow2");
    run(
        "qemu-img create overlay",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&inputs.disk_path),
    );
    let xml = match domain_xml(inputs) {
        Ok(xml) => xml,
        Err(e) => panic!("domain XML: {e}"),
    };
    assert!(xml.contains("type=\"qemu\"") || xml.contains("type='qemu'"));
    let name = match env.hv.define_domain(&xml).await {
        Ok(name) => name,
        Err(e) => panic!("define {}: {e}\n{xml}", guard.name),
    };
    assert_eq!(name, guard.name);
    (guard, xml)
}

/// The `<source path>` of the domain's pty serial port in its live XML.
fn serial_pty(live_xml: &str) -> Option<String> {
    let serial = &live_xml[live_xml.find("<serial type='pty'>")?..];
    let serial = &serial[..serial.find("</serial>")?];
    let path = &serial[serial.find("path='")? + 6..];
    Some(path[..path.find('\'')?].to_string())
}

/// Reads the serial console from the pty, line by line, in a thread (the read blocks until
/// QEMU closes the pty when the domain goes).
fn console_lines(pty: &str) -> mpsc::Receiver<String> {
    // Raw and without echo: an echo would bounce the guest's output back into its input.
    run(
        "stty on the console pty",
        Command::new("stty").args(["-F", pty, "raw", "-echo"]),
    );
    let file = match std::fs::File::open(pty) {
        Ok(f) => f,
        Err(e) => panic!("open {pty}: {e}"),
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(file).split(b'\n') {
            let Ok(line) = line else { break };
            if tx
                .send(String::from_utf8_lossy(&line).trim().to_string())
                .is_err()
            {
                break;
            }
        }
    });
    rx
}

/// Waits for the marker line; returns it.
async fn wait_for_marker(rx: mpsc::Receiver<String>, timeout: Duration) -> (String, Vec<String>) {
    let (line, seen, _) = wait_for_line(rx, MARKER, timeout).await;
    (line, seen)
}

/// Waits for a console line holding `marker`; returns it, the lines before it, and the
/// console to read on.
async fn wait_for_line(
    rx: mpsc::Receiver<String>,
    marker: &'static str,
    timeout: Duration,
) -> (String, Vec<String>, mpsc::Receiver<String>) {
    let waited = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return (Some(line), seen, rx),
                Ok(line) => seen.push(line),
                Err(_) => return (None, seen, rx),
            }
        }
    })
    .await;
    match waited {
        Ok((Some(line), seen, rx)) => (line, seen, rx),
        Ok((None, seen, _)) => panic!(
            "no {marker} on the serial console within {timeout:?}; last lines:\n{}",
            seen[seen.len().saturating_sub(30)..].join("\n")
        ),
        Err(e) => panic!("console reader: {e}"),
    }
}

/// Waits until libvirt says the guest agent of running domain `name` is connected.
async fn agent_connected(hv: &LibvirtHypervisor, name: &str) {
    let connected = deskvirt_tests::host::eventually(BOOT_TIMEOUT, "the guest agent", || async {
        let xml = live_xml(hv, name).await;
        Ok(xml
            .contains("name='org.qemu.guest_agent.0' state='connected'")
            .then_some(()))
    })
    .await;
    if let Err(e) = connected {
        panic!("the guest agent of {name} never connected: {e}");
    }
}

/// Whether something listens on 127.0.0.1:`port` (and not on the wildcard address).
fn listens_on_loopback_only(port: u16) -> (bool, bool) {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let mut loopback = false;
    let mut wildcard = false;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
            continue;
        };
        if *state != "0A" || !local.ends_with(&format!(":{port:04X}")) {
            continue;
        }
        loopback |= local.starts_with("0100007F:");
        wildcard |= local.starts_with("00000000:");
    }
    (loopback, wildcard)
}

async fn state(hv: &LibvirtHypervisor, name: &str) -> DomainState {
    match hv.domain_status(name).await {
        Ok(s) => s.state,
        Err(e) => panic!("status of {name}: {e}"),
    }
}

async fn live_xml(hv: &LibvirtHypervisor, name: &str) -> String {
    match hv.domain_xml(name, false).await {
        Ok(xml) => xml,
        Err(e) => panic!("live XML of {name}: {e}"),
    }
}

/// `<redirdev>` elements of type spicevmc in a domain XML.
fn spicevmc_redirdevs(xml: &str) -> usize {
    xml.match_indices("<redirdev ")
        .filter(|(at, _)| {
            let tag = &xml[*at..];
            tag[..tag.find('>').unwrap_or(tag.len())].contains("type='spicevmc'")
        })
        .count()
}

async fn disk_paths(hv: &LibvirtHypervisor) -> BTreeSet<String> {
    match hv.domain_disk_paths().await {
        Ok(p) => p,
        Err(e) => panic!("domain_disk_paths: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desktop_boots_serves_spice_and_is_deleted() {
    let _one = ONE_GUEST.lock().await;
    let env = setup().await;
    let port = free_port();
    let password = format!("pw-{:x}", unique());
    let inputs = inputs(
        &env,
        serde_json::json!({ "redirect": true, "channels": 3 }),
        port,
        &password,
    );
    let base = Path::new(&env.guest_dir).join("base.qcow2");

    // define → running → guest userspace
    let t0 = Instant::now();
    let (mut guard, _xml) = define(&env, &inputs).await;
    let defined = t0.elapsed();
    if let Err(e) = env.hv.start_domain(&guard.name).await {
        panic!("start {}: {e}", guard.name);
    }
    let running = t0.elapsed();
    assert_eq!(state(&env.hv, &guard.name).await, DomainState::Running);
    let live = live_xml(&env.hv, &guard.name).await;
    let Some(pty) = serial_pty(&live) else {
        panic!("no pty serial in the live XML:\n{live}")
    };
    let (marker, _) = wait_for_marker(console_lines(&pty), BOOT_TIMEOUT).await;
    let booted = t0.elapsed();
    println!(
        "[qemu_system] {}: define {:?}, define→running {:?}, define→{MARKER} {:?} (guest says: {marker})",
        guard.name, defined, running, booted
    );
    assert!(marker.contains("vda"), "virtio_blk disk missing: {marker}");

    // domain_disk_paths lists the overlay while the domain is defined
    let paths = disk_paths(&env.hv).await;
    assert!(
        paths.contains(&inputs.disk_path),
        "{} not in {paths:?}",
        inputs.disk_path
    );

    // SPICE listens on 127.0.0.1 at the allocated port
    assert!(
        live.contains(&format!("port='{port}'")),
        "live XML lacks SPICE port {port}"
    );
    let (loopback, wildcard) = listens_on_loopback_only(port);
    assert!(loopback, "nothing listens on 127.0.0.1:{port}");
    assert!(!wildcard, "SPICE listens on 0.0.0.0:{port}");
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

    // a wrong password is refused, the right one gets the main channel's init message
    match spice::link(addr, "not-the-password").await {
        Ok(LinkOutcome::Refused { code }) => assert_eq!(code, LINK_ERR_PERMISSION_DENIED),
        other => panic!("wrong password: {other:?}"),
    }
    match spice::link(addr, &password).await {
        Ok(LinkOutcome::Accepted { main_init }) => {
            assert!(main_init, "no SPICE_MSG_MAIN_INIT after the link")
        }
        other => panic!("right password: {other:?}"),
    }
    assert_eq!(
        state(&env.hv, &guard.name).await,
        DomainState::Running,
        "the domain died after the SPICE links"
    );

    // USB redirection on: 3 spicevmc redirdevs in the live XML; the password never shows
    let live = live_xml(&env.hv, &guard.name).await;
    assert_eq!(spicevmc_redirdevs(&live), 3, "live XML:\n{live}");
    assert!(
        !live.contains(&password),
        "live XML holds the SPICE password"
    );

    // deleting removes the domain and the overlay, and leaves the base image
    let t1 = Instant::now();
    guard.delete().await;
    println!("[qemu_system] destroy+undefine {:?}", t1.elapsed());
    let left = match env.hv.list_domains().await {
        Ok(list) => list,
        Err(e) => panic!("list domains: {e}"),
    };
    assert!(
        left.iter().all(|d| d.name != guard.name),
        "domain still listed"
    );
    assert!(
        !Path::new(&inputs.disk_path).exists(),
        "overlay still there"
    );
    assert!(base.is_file(), "base image was removed");
    assert!(!disk_paths(&env.hv).await.contains(&inputs.disk_path));
    let _ = std::fs::remove_dir(&env.disk_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usb_redirection_off_means_no_redirdev() {
    let _one = ONE_GUEST.lock().await;
    let env = setup().await;
    let inputs = inputs(
        &env,
        serde_json::json!({ "redirect": false }),
        free_port(),
        "usb-off-pw",
    );
    let (mut guard, xml) = define(&env, &inputs).await;
    assert_eq!(spicevmc_redirdevs(&xml.replace('"', "'")), 0);
    if let Err(e) = env.hv.start_domain(&guard.name).await {
        panic!("start {}: {e}", guard.name);
    }
    let live = live_xml(&env.hv, &guard.name).await;
    assert_eq!(spicevmc_redirdevs(&live), 0, "live XML:\n{live}");
    assert!(
        !live.contains("<redirfilter"),
        "redirfilter with redirection off"
    );
    assert!(
        live.contains("com.redhat.spice.0"),
        "the vdagent channel is still there"
    );
    guard.delete().await;
    let _ = std::fs::remove_dir(&env.disk_dir);
}

/// `virsh domstate --reason` of a domain, such as `running (restored)`.
fn state_reason(name: &str) -> String {
    run(
        "virsh domstate --reason",
        Command::new("virsh").args(["-c", URI, "domstate", "--reason", name]),
    )
    .trim()
    .to_string()
}

/// Idle reclamation on the hypervisor tier: a managed save is restored with a new SPICE port
/// and password written into its image; a definition with another guest ABI is refused, and the
/// image can then be removed so the domain boots from its disk; undefine removes an image too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_save_is_restored_with_a_new_spice_port() {
    let _one = ONE_GUEST.lock().await;
    let env = setup().await;
    let (old_port, new_port) = (free_port(), free_port());
    let mut inputs = inputs(
        &env,
        serde_json::json!({ "redirect": true }),
        old_port,
        "before-pw",
    );
    let (mut guard, _xml) = define(&env, &inputs).await;
    let name = guard.name.clone();
    let image = PathBuf::from(format!("/var/lib/libvirt/qemu/save/{name}.save"));
    let expect = |what: &str, r: Result<Change, HypervisorError>| match r {
        Ok(c) => c,
        Err(e) => panic!("{what} {name}: {e}"),
    };
    expect("start", env.hv.start_domain(&name).await);
    let Some(pty) = serial_pty(&live_xml(&env.hv, &name).await) else {
        panic!("no pty serial")
    };
    wait_for_marker(console_lines(&pty), BOOT_TIMEOUT).await;
    // Nothing to update without an image.
    assert_eq!(
        expect("sync", env.hv.sync_managed_save(&name, &image).await),
        Change::AlreadyDone
    );

    let t = Instant::now();
    assert_eq!(
        expect("managed save", env.hv.managed_save(&name).await),
        Change::Done
    );
    let saved_in = t.elapsed();
    let status = env.hv.domain_status(&name).await;
    assert!(
        status.is_ok_and(|s| s.state == DomainState::ShutOff && s.has_managed_save),
        "not off with a managed save"
    );
    assert!(image.is_file(), "no image at {}", image.display());

    // The binding moves to another port and the password rotates while it is suspended.
    inputs.spice.port = new_port;
    inputs.spice.password = Secret::new("after-pw");
    let xml = domain_xml(&inputs).unwrap_or_default();
    if let Err(e) = env.hv.define_domain(&xml).await {
        panic!("redefine {name}: {e}");
    }
    assert_eq!(
        expect("sync", env.hv.sync_managed_save(&name, &image).await),
        Change::Done
    );
    let t = Instant::now();
    expect("restore", env.hv.start_domain(&name).await);
    let restored_in = t.elapsed();
    assert_eq!(state_reason(&name), "running (restored)");
    let live = live_xml(&env.hv, &name).await;
    assert!(live.contains(&format!("port='{new_port}'")), "{live}");
    assert!(
        listens_on_loopback_only(new_port).0,
        "nothing on {new_port}"
    );
    assert!(!listens_on_loopback_only(old_port).0, "still on {old_port}");
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, new_port));
    match spice::link(addr, "after-pw").await {
        Ok(LinkOutcome::Accepted { .. }) => {}
        other => panic!("new password: {other:?}"),
    }
    match spice::link(addr, "before-pw").await {
        Ok(LinkOutcome::Refused { .. }) => {}
        other => panic!("old password: {other:?}"),
    }
    println!("[qemu_system] managed save {saved_in:?}, sync + restore {restored_in:?}");

    // Another guest ABI (more memory) is refused; the image is then removed: a cold boot.
    expect("managed save", env.hv.managed_save(&name).await);
    inputs.memory_bytes *= 2;
    let xml = domain_xml(&inputs).unwrap_or_default();
    if let Err(e) = env.hv.define_domain(&xml).await {
        panic!("redefine {name}: {e}");
    }
    match env.hv.sync_managed_save(&name, &image).await {
        Err(e @ HypervisorError::Rejected { .. }) => {
            println!("[qemu_system] ABI change refused: {e}")
        }
        other => panic!("a new ABI was not refused: {other:?}"),
    }
    assert_eq!(
        expect("remove", env.hv.remove_managed_save(&name).await),
        Change::Done
    );
    assert_eq!(
        expect("remove", env.hv.remove_managed_save(&name).await),
        Change::AlreadyDone
    );
    assert!(!image.exists(), "image kept after removal");
    expect("start", env.hv.start_domain(&name).await);
    assert_eq!(state_reason(&name), "running (booted)");

    // Undefine takes a managed save image with it.
    expect("managed save", env.hv.managed_save(&name).await);
    assert!(image.is_file());
    guard.delete().await;
    assert!(!image.exists(), "undefine left the image");
    let _ = std::fs::remove_dir(&env.disk_dir);
}

/// Live migration to a second libvirt host on this machine (`scripts/second-host.sh`): the
/// booted guest moves peer to peer with its SPICE server on the target's address and the port
/// given there, keeps running there, is gone here, and its console answers on the target; a
/// target that cannot run it refuses it and it runs on here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_moves_live_to_a_second_host_and_its_console_answers_there() {
    let _one = ONE_GUEST.lock().await;
    let env = setup().await;
    let second = match deskvirt_tests::second_host::SecondHost::start("dvmigq") {
        Ok(h) => h,
        Err(e) => panic!("second host: {e:#}"),
    };
    let target = match LibvirtHypervisor::connect(&second.uri).await {
        Ok(hv) => hv,
        Err(e) => panic!("cannot open {}: {e}", second.uri),
    };
    let password = format!("pw-{:x}", unique());
    let source_inputs = inputs(
        &env,
        serde_json::json!({ "redirect": false }),
        free_port(),
        &password,
    );
    let (mut guard, _) = define(&env, &source_inputs).await;
    if let Err(e) = env.hv.start_domain(&guard.name).await {
        panic!("start {}: {e}", guard.name);
    }
    let live = live_xml(&env.hv, &guard.name).await;
    let Some(pty) = serial_pty(&live) else {
        panic!("no pty serial in the live XML:\n{live}")
    };
    wait_for_marker(console_lines(&pty), BOOT_TIMEOUT).await;

    // The domain's graphics on the target: the same converter, the target's SPICE address
    // and port.
    let mut dest = source_inputs.clone();
    dest.spice.listen = second.address.clone();
    dest.spice.port = free_port();
    let graphics_xml = match graphics_xml(&dest) {
        Ok(xml) => xml,
        Err(e) => panic!("target graphics: {e}"),
    };
    let out = Outbound {
        dest_uri: second.uri.clone(),
        migrate_uri: format!("tcp://{}", second.address),
        graphics_xml,
        graphics_uri: Some(format!("spice://{}:{}", second.address, dest.spice.port)),
        declared_shared: true,
        copy_disks: false,
        carrier_xml: None,
        limits: MoveLimits::default(),
    };
    // A target that cannot run it (no bridge there for its NIC yet): refused, and the domain
    // runs on here as before.
    match env.hv.migrate_out(&guard.name, &out).await {
        Err(e) => println!("[qemu_system] a target without the bridge refuses: {e}"),
        Ok(m) => panic!("moved to a host without its bridge: {m:?}"),
    }
    assert_eq!(state(&env.hv, &guard.name).await, DomainState::Running);
    match target.domain_status(&guard.name).await {
        Err(HypervisorError::NotFound { .. }) => {}
        other => panic!("the failed target kept the domain: {other:?}"),
    }

    // Its NIC's bridge, by the same name, on the target's side of the link.
    for args in [
        vec!["link", "add", BRIDGE, "type", "bridge"],
        vec!["link", "set", BRIDGE, "up"],
    ] {
        run(
            "bridge on the second host",
            Command::new("ip")
                .args(["netns", "exec", &second.name, "ip"])
                .args(&args),
        );
    }
    // A move capped at 1 MiB/s cannot send the guest's memory within a 3 s completion
    // timeout: it is aborted, and the domain runs on here, gone from the target.
    let capped = Outbound {
        limits: MoveLimits {
            bandwidth_mib: Some(1),
            completion_timeout: Duration::from_secs(3),
            auto_converge: false,
            post_copy: false,
        },
        ..out.clone()
    };
    let t0 = Instant::now();
    match env.hv.migrate_out(&guard.name, &capped).await {
        Err(HypervisorError::Rejected { message, .. }) => {
            assert!(message.contains("completion timeout (3s)"), "{message}");
            println!(
                "[qemu_system] a capped move is aborted after {:?}: {message}",
                t0.elapsed()
            );
        }
        other => panic!("a capped move past its timeout: {other:?}"),
    }
    assert_eq!(state(&env.hv, &guard.name).await, DomainState::Running);
    match target.domain_status(&guard.name).await {
        Err(HypervisorError::NotFound { .. }) => {}
        other => panic!("the aborted move left the domain on the target: {other:?}"),
    }

    // A SPICE client left connected on the source is told where the desktop went.
    let source_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, source_inputs.spice.port));
    let mut client = match spice::hold(source_addr, &password).await {
        Ok(Some(stream)) => stream,
        other => panic!("the console on the source: {other:?}"),
    };
    let t0 = Instant::now();
    let moved = match env.hv.migrate_out(&guard.name, &out).await {
        Ok(m) => m,
        Err(e) => panic!("migrate {}: {e}", guard.name),
    };
    println!(
        "[qemu_system] {} moved in {:?} (libvirt: {:?}, downtime {:?}, {} MiB)",
        guard.name,
        t0.elapsed(),
        moved.total,
        moved.downtime,
        moved.bytes >> 20
    );
    assert!(
        moved.total > Duration::ZERO && moved.downtime <= moved.total,
        "{moved:?}"
    );
    assert!(
        spice::told_of(&mut client, &second.address).await,
        "the connected SPICE client was not told of {}",
        second.address
    );

    // Running there, persistent there, and nothing of it left here.
    assert_eq!(state(&target, &guard.name).await, DomainState::Running);
    match target.domain_xml(&guard.name, true).await {
        Ok(xml) => assert!(
            xml.contains(&format!("port='{}'", dest.spice.port)),
            "{xml}"
        ),
        Err(e) => panic!("the target has no persistent definition: {e}"),
    }
    match env.hv.domain_status(&guard.name).await {
        Err(HypervisorError::NotFound { .. }) => {}
        other => panic!("the source still has the domain: {other:?}"),
    }
    let addr: SocketAddr = match format!("{}:{}", second.address, dest.spice.port).parse() {
        Ok(a) => a,
        Err(e) => panic!("target SPICE address: {e}"),
    };
    match spice::link(addr, &password).await {
        Ok(LinkOutcome::Accepted { .. }) => {}
        other => panic!("the console on the target: {other:?}"),
    }

    // Migrating a domain that is not here is refused, and nothing runs twice.
    match env.hv.migrate_out(&guard.name, &out).await {
        Err(HypervisorError::NotFound { .. }) => {}
        other => panic!("a second migration of a gone domain: {other:?}"),
    }
    // The target tears it down; the guard's own teardown then finds nothing here.
    guard.hv = target;
    guard.delete().await;
}

/// The bytes of `file`'s own clusters (not its backing file's), from `qemu-img map`.
fn own_bytes(file: &Path) -> u64 {
    let out = run(
        "qemu-img map",
        Command::new("qemu-img")
            .args(["map", "--output=json", "-U"])
            .arg(file),
    );
    let extents: Vec<serde_json::Value> = match serde_json::from_str(&out) {
        Ok(v) => v,
        Err(e) => panic!("qemu-img map printed no JSON ({e}): {out}"),
    };
    extents
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .filter_map(|e| e["length"].as_u64())
        .sum()
}

/// Polls the backup job of `name` until it ends; how it ended.
async fn backup_end(hv: &LibvirtHypervisor, name: &str) -> BackupProgress {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match hv.backup_progress(name).await {
            Ok(BackupProgress::Running { .. }) | Ok(BackupProgress::Idle) => {}
            Ok(ended) => return ended,
            Err(e) => panic!("backup progress of {name}: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "the backup of {name} did not end"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_backup_holds_exactly_what_the_guest_wrote_since_its_checkpoint() {
    let _one = ONE_GUEST.lock().await;
    let env = setup().await;
    let mut inputs = inputs(&env, serde_json::json!({}), free_port(), "pw");
    // The guest writes 2 MiB over its disk at boot.
    if let Some(b) = inputs.boot.as_mut() {
        b.cmdline = Some("console=ttyS0 deskvirt.write=2".into());
    }
    let (mut guard, _) = define(&env, &inputs).await;
    let name = guard.name.clone();
    let disk = "vda".to_string();
    // An empty overlay has changed nothing: its first checkpoint is a bitmap added offline.
    run(
        "qemu-img bitmap --add",
        Command::new("qemu-img")
            .args(["bitmap", "--add"])
            .arg(&inputs.disk_path)
            .arg("c0"),
    );
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let c0 = Checkpoint {
        name: "c0".into(),
        disk: disk.clone(),
        created,
    };
    let backup = |n: u32, since: Option<&str>| BackupJob {
        disk: disk.clone(),
        target: env.disk_dir.join(format!("{name}-b{n}.qcow2")),
        since: since.map(str::to_string),
        checkpoint: format!("c{n}"),
    };
    // Not running: refused, and nothing is written.
    match env.hv.begin_backup(&name, &backup(1, Some("c0"))).await {
        Err(HypervisorError::Rejected { .. }) => {}
        other => panic!("a backup of a stopped domain: {other:?}"),
    }
    assert!(!backup(1, None).target.exists());

    if let Err(e) = env.hv.start_domain(&name).await {
        panic!("start {name}: {e}");
    }
    let pty = serial_pty(&live_xml(&env.hv, &name).await).unwrap_or_else(|| panic!("no pty"));
    let (_, _, console) =
        wait_for_line(console_lines(&pty), "DESKVIRT-GUEST-WROTE", BOOT_TIMEOUT).await;
    // The guest's qemu-ga (Debian's) answers once libvirt saw it open its port.
    agent_connected(&env.hv, &name).await;
    // libvirt does not know c0 until it is redefined over the bitmap; once is enough.
    assert_eq!(
        env.hv.ensure_checkpoint(&name, &c0).await.ok(),
        Some(Change::Done)
    );
    assert_eq!(
        env.hv.ensure_checkpoint(&name, &c0).await.ok(),
        Some(Change::AlreadyDone)
    );

    let first = backup(1, Some("c0"));
    let t0 = Instant::now();
    let hold = match env.hv.begin_backup(&name, &first).await {
        Ok(h) => h,
        Err(e) => panic!("backup since c0: {e}"),
    };
    eprintln!("[backup] the guest was held: {hold:?}");
    match hold {
        Hold::Frozen {
            millis,
            thaw_error: None,
            ..
        } => assert!(millis < 5_000, "frozen {millis} ms"),
        other => panic!("the guest agent did not freeze and thaw the guest: {other:?}"),
    }
    // The guest's fsfreeze hook ran for the freeze, then for the thaw.
    let (_, before, _console) =
        wait_for_line(console, "DESKVIRT-GUEST-FSFREEZE thaw", BOOT_TIMEOUT).await;
    assert!(
        before
            .iter()
            .any(|l| l.contains("DESKVIRT-GUEST-FSFREEZE freeze")),
        "no freeze before the thaw: {before:?}"
    );
    let ended = backup_end(&env.hv, &name).await;
    eprintln!(
        "[backup] incremental since c0: {ended:?} in {:?}",
        t0.elapsed()
    );
    assert_eq!(ended, BackupProgress::Completed { bytes: 2 << 20 });
    run(
        "qemu-img check",
        Command::new("qemu-img")
            .args(["check", "-U"])
            .arg(&first.target),
    );
    assert_eq!(
        own_bytes(&first.target),
        2 << 20,
        "the backup holds the 2 MiB"
    );

    // Nothing written since c1: the next one holds nothing.
    let second = backup(2, Some("c1"));
    if let Err(e) = env.hv.begin_backup(&name, &second).await {
        panic!("backup since c1: {e}");
    }
    assert_eq!(
        backup_end(&env.hv, &name).await,
        BackupProgress::Completed { bytes: 0 }
    );
    assert_eq!(own_bytes(&second.target), 0);

    // A checkpoint libvirt does not know is refused, not taken as "since the start".
    match env.hv.begin_backup(&name, &backup(3, Some("c9"))).await {
        Err(HypervisorError::Rejected { .. } | HypervisorError::Failed { .. }) => {}
        other => panic!("a backup since an unknown checkpoint: {other:?}"),
    }
    // Deleting c1 merges it into c0: a backup since c0 still holds the 2 MiB.
    assert_eq!(
        env.hv.delete_checkpoint(&name, "c1").await.ok(),
        Some(Change::Done)
    );
    assert_eq!(
        env.hv.delete_checkpoint(&name, "c1").await.ok(),
        Some(Change::AlreadyDone)
    );
    let again = backup(4, Some("c0"));
    if let Err(e) = env.hv.begin_backup(&name, &again).await {
        panic!("backup since c0 after deleting c1: {e}");
    }
    assert_eq!(
        backup_end(&env.hv, &name).await,
        BackupProgress::Completed { bytes: 2 << 20 }
    );
    guard.delete().await;
    for n in [1, 2, 4] {
        let _ = std::fs::remove_file(backup(n, None).target);
    }
}
