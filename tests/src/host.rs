//! This machine as a KVM host for the tests: libvirt started and the tiny guest built by the
//! project's scripts, the workspace binaries built and located, free ports, and child
//! processes that die with the test.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cluster::repo_root;

/// Runs a command; its stdout, or an error carrying its output.
pub fn run(what: &str, cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Starts libvirt and builds (or finds) the tiny guest; the guest directory holding
/// `vmlinuz`, `initrd.img` and `base.qcow2`.
pub fn prepare_host() -> anyhow::Result<PathBuf> {
    run(
        "scripts/libvirt.sh start",
        Command::new(repo_root().join("scripts/libvirt.sh")).arg("start"),
    )?;
    built(
        "scripts/build-guest.sh",
        &["vmlinuz", "initrd.img", "base.qcow2"],
    )
}

/// Builds (or finds) the demo's bootable desktop image (`scripts/build-demo-image.sh`): a disk
/// that boots to a login prompt. Returns the image's path.
pub fn demo_image() -> anyhow::Result<PathBuf> {
    let file = "demo-desktop.qcow2";
    Ok(built("scripts/build-demo-image.sh", &[file])?.join(file))
}

/// Runs build script `script` (a path from the repository's root), which prints its output
/// directory last; that directory, once it holds every one of `files`.
fn built(script: &str, files: &[&str]) -> anyhow::Result<PathBuf> {
    let out = run(script, &mut Command::new(repo_root().join(script)))?;
    let dir = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .with_context(|| format!("{script} printed no directory"))?;
    for f in files {
        anyhow::ensure!(dir.join(f).is_file(), "{}/{f} is missing", dir.display());
    }
    Ok(dir)
}

/// The text on domain `domain`'s screen (of `qemu:///system`), as a SPICE client shows it:
/// libvirt's screenshot, read by tesseract.
pub fn screen_text(domain: &str) -> anyhow::Result<String> {
    let shot = std::env::temp_dir().join(format!("deskvirt-screen-{domain}.ppm"));
    run(
        "virsh screenshot",
        Command::new("virsh")
            .args(["-c", "qemu:///system", "screenshot", domain])
            .arg(&shot),
    )?;
    let text = run("tesseract", Command::new("tesseract").arg(&shot).arg("-"));
    let _ = std::fs::remove_file(&shot);
    text
}

/// A TCP port nobody listens on right now, below the kernel's ephemeral range (see
/// [`free_port_range`]): a SPICE port a test hands to QEMU was once taken meanwhile by the
/// local end of an outgoing connection, and the domain could not start.
pub fn free_port() -> anyhow::Result<u16> {
    free_port_range(1)
}

/// `count` consecutive free ports from a random start (for a pool's SPICE range), below the
/// kernel's ephemeral range: a port in that range may become the local port of any outgoing
/// connection (a watch lives as long as its process), and QEMU then cannot listen on it for
/// the whole test (an e2e burst desktop failed so for 10 minutes).
///
/// A port is handed out once per test process: a port free now is not listened on until the
/// caller starts what uses it, and a later call must not hand it out again (an agent's metrics
/// endpoint once took the port its test had just picked for a SPICE range, and the desktop
/// could not start for the whole test).
pub fn free_port_range(count: u16) -> anyhow::Result<u16> {
    static HANDED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed = HANDED
        .lock()
        .map_err(|_| anyhow::anyhow!("the record of handed-out ports is poisoned"))?;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral.saturating_sub(count));
    anyhow::ensure!(
        high > low,
        "no room below the ephemeral ports ({ephemeral})"
    );
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default()
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let span = u32::from(high - low);
    for i in 0..200u32 {
        let offset = seed.wrapping_add(i.wrapping_mul(7_919)) % span;
        let first = low + u16::try_from(offset).unwrap_or_default();
        let all_free = (first..first + count)
            .all(|p| !handed.contains(&p) && TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).is_ok());
        if all_free {
            handed.extend(first..first + count);
            return Ok(first);
        }
    }
    anyhow::bail!("no {count} consecutive free ports found below {ephemeral}")
}

/// The workspace's binaries (operator and node-agent), built once per test process.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let target = std::env::var("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| repo_root().join("target"));
            run(
                "cargo build of the binaries",
                Command::new(cargo)
                    .current_dir(repo_root())
                    .args(["build", "--locked", "--bins"])
                    .args(["-p", "deskvirt-operator", "-p", "deskvirt-node-agent"])
                    .env("CARGO_TARGET_DIR", &target),
            )
            .map(|_| target.join("debug"))
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))?;
    let path = dir.join(name);
    anyhow::ensure!(path.is_file(), "{} was not built", path.display());
    Ok(path)
}

/// A child process killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    pub what: String,
}

impl Process {
    /// Spawns `cmd` with stdin closed and output inherited.
    pub fn spawn(what: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Self {
            child,
            what: what.to_string(),
        })
    }

    /// `kill -9` and reap.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
            self.child.wait()?;
        }
        Ok(())
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Polls `f` until it yields `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// QEMU's PID of a running domain of `qemu:///system`, from libvirt's PID file.
pub fn qemu_pid(domain: &str) -> Option<u32> {
    let text =
        std::fs::read_to_string(Path::new("/run/libvirt/qemu").join(format!("{domain}.pid")))
            .ok()?;
    text.trim().parse().ok()
}

/// The status code and body of `GET path` from a plain HTTP/1.0 server at `addr` (our
/// `/healthz`, `/readyz` and `/metrics` endpoints), within 5 seconds.
pub async fn http_response(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("GET {addr}{path} timed out"))??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {addr}{path}: no HTTP response"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {addr}{path}: no status in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// The body of `GET path` from a plain HTTP/1.0 server at `addr` (our `/metrics` endpoints),
/// within 5 seconds; an error unless it answers 200.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let (code, body) = http_response(addr, path).await?;
    anyhow::ensure!(code == 200, "GET {addr}{path}: {code}");
    Ok(body)
}
