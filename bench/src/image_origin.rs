//! The image both sides of the image benchmark fetch, and where from: a standalone qcow2 of
//! random (incompressible) data in the run's scratch dir, and one local HTTP origin on
//! loopback (`python3 -m http.server`, a process of its own) that serves it to curl and to
//! the agents alike. Every command here runs under a deadline.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

/// The test image.
pub struct TestImage {
    /// File name, as the origin serves it.
    pub name: String,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    /// Bytes of the file.
    pub bytes: u64,
}

/// Runs `cmd` until it exits, for at most `limit` (then it is killed); its stdout. `what`
/// names it in errors.
pub async fn run_within(what: &str, cmd: &mut Command, limit: Duration) -> anyhow::Result<String> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("{what} took longer than {limit:?}"))?
        .with_context(|| format!("starting {what}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The SHA-256 of `path`, by `sha256sum`.
pub async fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = run_within(
        "sha256sum",
        Command::new("sha256sum").arg(path),
        Duration::from_secs(300),
    )
    .await?;
    out.split_whitespace()
        .next()
        .filter(|s| s.len() == 64)
        .map(str::to_string)
        .context("sha256sum printed no sum")
}

/// Makes `<dir>/image-<mib>m.qcow2`: `mib` MiB from `/dev/urandom` converted to a qcow2 with no
/// backing file (every cluster allocated: the file is about `mib` MiB plus its metadata).
pub async fn make(dir: &Path, mib: u64) -> anyhow::Result<TestImage> {
    std::fs::create_dir_all(dir)?;
    let raw = dir.join("random.raw");
    let name = format!("image-{mib}m.qcow2");
    let path = dir.join(&name);
    let limit = Duration::from_secs(60 + mib);
    run_within(
        "head -c of /dev/urandom",
        Command::new("sh").arg("-c").arg(format!(
            "head -c {}M /dev/urandom > '{}'",
            mib,
            raw.display()
        )),
        limit,
    )
    .await?;
    run_within(
        "qemu-img convert of the test image",
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&path),
        limit,
    )
    .await?;
    std::fs::remove_file(&raw)?;
    let bytes = std::fs::metadata(&path)?.len();
    Ok(TestImage {
        sha256: sha256(&path).await?,
        name,
        bytes,
    })
}

/// `python3 -m http.server` serving one directory on loopback; killed when dropped.
pub struct Origin {
    pub port: u16,
    child: Child,
}

impl Origin {
    /// Serves the files of `dir` at `http://127.0.0.1:<port>/<name>` (a threading server:
    /// concurrent GETs are served at once), logging to `log`; returns once it accepts
    /// connections (within 20 s).
    pub async fn start(dir: &Path, log: &Path) -> anyhow::Result<Self> {
        let port = deskvirt_tests::host::free_port()?;
        let out = std::fs::File::create(log)?;
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .context("starting python3 -m http.server")?;
        let mut origin = Self { port, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
                return Ok(origin);
            }
            if let Ok(Some(status)) = origin.child.try_wait() {
                anyhow::bail!("the origin exited ({status}); see {}", log.display());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the origin does not accept connections on port {port} after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The URL of file `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
