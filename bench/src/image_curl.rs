//! The plain side of the image benchmark: what an administrator without deskvirt runs on each
//! host, the same work the agent does for a copy — `curl` of the URL into a file, its SHA-256
//! (`sha256sum`, or `openssl dgst -sha256`, which uses the CPU's SHA instructions as the
//! agent's `ring` does), `qemu-img info -f qcow2` and `sync` of the file (the agent fsyncs its
//! copy) — on N hosts at once (N pipelines side by side, each into its own file), timed from
//! the spawn to the last exit.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::Command;

/// The program that hashes the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hasher {
    /// coreutils' `sha256sum`.
    Sha256sum,
    /// `openssl dgst -sha256 -r`.
    Openssl,
}

impl Hasher {
    /// The shell line of one host's copy: `$1` the file, `$2` the URL.
    pub fn pipeline(self) -> &'static str {
        match self {
            Hasher::Sha256sum => {
                "curl -sS --fail -o \"$1\" \"$2\" && sha256sum \"$1\" \
                 && qemu-img info -f qcow2 --output=json \"$1\" >/dev/null && sync \"$1\""
            }
            Hasher::Openssl => {
                "curl -sS --fail -o \"$1\" \"$2\" && openssl dgst -sha256 -r \"$1\" \
                 && qemu-img info -f qcow2 --output=json \"$1\" >/dev/null && sync \"$1\""
            }
        }
    }

    /// How the report names the pipeline.
    pub fn describe(self) -> &'static str {
        match self {
            Hasher::Sha256sum => "curl + sha256sum + qemu-img info + sync",
            Hasher::Openssl => "curl + openssl dgst -sha256 + qemu-img info + sync",
        }
    }
}

/// Runs `hosts` pipelines hashing with `hasher` at once into `<dir>/copy-<i>.qcow2`, for at most `limit`; how long
/// until the last one exited. Each must print `sha256`; the copies are removed afterwards.
pub async fn run(
    hasher: Hasher,
    url: &str,
    dir: &Path,
    hosts: usize,
    sha256: &str,
    limit: Duration,
) -> anyhow::Result<Duration> {
    std::fs::create_dir_all(dir)?;
    let files: Vec<_> = (0..hosts)
        .map(|i| dir.join(format!("copy-{i}.qcow2")))
        .collect();
    for f in &files {
        remove(f)?;
    }
    let t0 = Instant::now();
    let mut children = Vec::with_capacity(hosts);
    for f in &files {
        let child = Command::new("sh")
            .args(["-c", hasher.pipeline(), "sh"])
            .arg(f)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the curl pipeline")?;
        children.push(child);
    }
    let waits = children.into_iter().map(|c| async move {
        let out = c.wait_with_output().await;
        (Instant::now(), out)
    });
    let done = tokio::time::timeout(limit, futures::future::join_all(waits))
        .await
        .map_err(|_| anyhow::anyhow!("the curl pipelines took longer than {limit:?}"))?;
    let mut last = t0;
    for (at, out) in done {
        let out = out.context("waiting for the curl pipeline")?;
        anyhow::ensure!(
            out.status.success(),
            "the curl pipeline failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let printed = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            printed.split_whitespace().next() == Some(sha256),
            "the curl copy has another SHA-256: {printed}"
        );
        last = last.max(at);
    }
    for f in &files {
        remove(f)?;
    }
    Ok(last.duration_since(t0))
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
