//! A second, independent libvirt host on this machine for tests that need two hypervisors:
//! `scripts/second-host.sh` runs it in its own network and mount namespaces, and this module
//! decides where its state lives (a fresh directory per call) and stops it on drop.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

use crate::cluster::repo_root;

/// A running second host. Its libvirt directories are under `dir`: `/etc/libvirt` is
/// `dir/etc`, `/run/libvirt` is `dir/run`, `/var/lib/libvirt` is `dir/lib`, `/var/log/libvirt`
/// is `dir/log`; every other path means the same file on both hosts.
#[derive(Debug)]
pub struct SecondHost {
    /// The network namespace (also the prefix of the host end of its veth, `<name>-h`).
    pub name: String,
    /// Its state directory; removed by `stop`.
    pub dir: PathBuf,
    /// The libvirt URI that reaches it from here: `qemu+unix:///system?socket=<dir>/run/libvirt-sock`.
    pub uri: String,
    /// Its IPv4 address on the veth link to this machine: a SPICE port it opens on this address
    /// (or on 0.0.0.0) is reachable from here; its 127.0.0.1 is not this machine's loopback.
    pub address: String,
    /// Directories of this machine that host B sees as its own empty ones instead
    /// ([`Self::private_dir`]): storage the two hosts do not share.
    pub private: Vec<PathBuf>,
}

impl SecondHost {
    /// Starts a second host in network namespace `name` (1-13 characters `[A-Za-z0-9_.-]`,
    /// unique among the second hosts running at once) with a fresh state directory.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_with_private(name, &[])
    }

    /// [`Self::start`], with each directory of `private` replaced, for host B, by one of its
    /// own (`SECOND_HOST_PRIVATE`): a pool's diskDir there is local storage, not shared.
    pub fn start_with_private(name: &str, private: &[PathBuf]) -> anyhow::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "deskvirt-{name}.{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let private_env = private
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let stdout = match script_with("start", name, &dir, &private_env) {
            Ok(out) => out,
            Err(e) => {
                // Whatever the failed start left behind (the script never touches another
                // running second host's namespace).
                let _ = script("stop", name, &dir);
                return Err(e);
            }
        };
        let mut host = SecondHost {
            name: name.to_string(),
            dir,
            uri: String::new(),
            address: String::new(),
            private: private.to_vec(),
        };
        // From here on, `host` going out of scope stops it.
        host.uri = stdout
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .context("scripts/second-host.sh start printed no URI")?
            .to_string();
        host.address = std::fs::read_to_string(host.dir.join("address"))
            .with_context(|| format!("reading {}/address", host.dir.display()))?
            .trim()
            .to_string();
        Ok(host)
    }

    /// What host B sees at `self.private[i]`, as seen from here.
    pub fn private_dir(&self, i: usize) -> PathBuf {
        self.dir.join("private").join(i.to_string())
    }

    /// Where its libvirt keeps managed save images, as seen from here.
    pub fn managed_save_dir(&self) -> PathBuf {
        self.dir.join("lib/qemu/save")
    }

    /// Its QEMU log directory (domain logs and serial logs), as seen from here.
    pub fn qemu_log_dir(&self) -> PathBuf {
        self.dir.join("log/qemu")
    }

    /// `virsh -c <uri> args...`: its stdout, or an error carrying its stderr.
    pub fn virsh(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .context("cannot run virsh")?;
        anyhow::ensure!(
            out.status.success(),
            "virsh -c {} {} failed ({}): {}",
            self.uri,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether a domain named `name` is defined on this host (running or not).
    pub fn has_domain(&self, name: &str) -> anyhow::Result<bool> {
        Ok(self
            .virsh(&["list", "--all", "--name"])?
            .lines()
            .any(|n| n.trim() == name))
    }
}

impl Drop for SecondHost {
    fn drop(&mut self) {
        if let Err(e) = script("stop", &self.name, &self.dir) {
            eprintln!("second host {}: {e:#}", self.name);
        }
    }
}

/// `scripts/second-host.sh <cmd> <name> <dir>`: its stdout, or an error carrying its output.
fn script(cmd: &str, name: &str, dir: &std::path::Path) -> anyhow::Result<String> {
    script_with(cmd, name, dir, "")
}

/// [`script`] with `SECOND_HOST_PRIVATE=private`.
fn script_with(
    cmd: &str,
    name: &str,
    dir: &std::path::Path,
    private: &str,
) -> anyhow::Result<String> {
    let out = Command::new(repo_root().join("scripts/second-host.sh"))
        .env("SECOND_HOST_PRIVATE", private)
        .arg(cmd)
        .arg(name)
        .arg(dir)
        .output()
        .with_context(|| format!("cannot run scripts/second-host.sh {cmd}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "scripts/second-host.sh {cmd} {name} {} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Polls both hosts' libvirtds every 100 ms in a thread, from [`BothWatch::start`] until
/// [`BothWatch::finish`], for watched domains running on both at once. Running, not paused: a
/// live migration's incoming domain is active on the target, paused, until the source pauses
/// for the last copy.
pub struct BothWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<(u32, Vec<String>)>>,
}

impl BothWatch {
    /// Starts watching `domains` on host A (`qemu:///system`) and `host_b`.
    pub fn start(host_b: std::sync::Arc<SecondHost>, domains: Vec<String>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        // Not kept alive by the poller: a test that fails before `finish` still stops host B
        // when it drops its own handle.
        let host_b = std::sync::Arc::downgrade(&host_b);
        let thread = std::thread::spawn(move || {
            let (mut polls, mut both) = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                let a = names(&crate::world::virsh_system(&[
                    "list",
                    "--state-running",
                    "--name",
                ])?);
                let Some(host) = host_b.upgrade() else { break };
                let b = names(&host.virsh(&["list", "--state-running", "--name"])?);
                drop(host);
                for d in &domains {
                    if a.contains(d) && b.contains(d) {
                        both.push(d.clone());
                    }
                }
                polls += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Ok((polls, both))
        });
        Self { stop, thread }
    }

    /// Stops polling: how many polls were made; fails if a watched domain ever ran on both
    /// hosts (or a poll failed).
    pub fn finish(self) -> anyhow::Result<u32> {
        self.stop.store(true, Ordering::Relaxed);
        let (polls, mut both) = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the poller of both hosts panicked"))??;
        both.dedup();
        anyhow::ensure!(both.is_empty(), "running on both hosts at once: {both:?}");
        Ok(polls)
    }
}

/// Names of the domains a `virsh list --name` printed.
pub fn names(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}
