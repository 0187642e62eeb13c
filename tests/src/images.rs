//! DesktopImages for the tests: the SHA-256 of a file, and an image of the run (labelled so the
//! run's operator sees it) importing a URL into the run's pool.

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use deskvirt_crds::image::DesktopImage;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use std::time::Duration;

use deskvirt_crds::conditions::find;

use crate::cluster::unique_suffix;
use crate::host::{eventually, run};
use crate::world::{RUN_LABEL, World};

/// The SHA-256 of `path`, by `sha256sum`.
pub fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    anyhow::ensure!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .map(str::to_string)
        .context("no sum")
}

/// Creates DesktopImage `ns/name` of the run, importing `url` (whose SHA-256 is `sum`) into the
/// run's pool.
pub async fn create_image(
    w: &World,
    ns: &str,
    name: &str,
    url: &str,
    sum: &str,
) -> anyhow::Result<DesktopImage> {
    let image: DesktopImage = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1",
        "kind": "DesktopImage",
        "metadata": { "name": name, "namespace": ns, "labels": { RUN_LABEL: w.run } },
        "spec": { "source": { "http": { "url": url, "sha256": sum } }, "pools": [w.pool] },
    }))?;
    let api: Api<DesktopImage> = Api::namespaced(w.client.clone(), ns);
    Ok(api.create(&PostParams::default(), &image).await?)
}

/// Waits until image `ns/name` satisfies `f`; the last status in the error.
pub async fn wait_image(
    w: &World,
    ns: &str,
    name: &str,
    what: &str,
    f: impl Fn(&DesktopImage) -> bool,
) -> anyhow::Result<DesktopImage> {
    let api: Api<DesktopImage> = Api::namespaced(w.client.clone(), ns);
    let last = std::sync::Mutex::new(None);
    let found = eventually(Duration::from_secs(120), what, || async {
        let i = api.get(name).await?;
        let done = f(&i);
        if let Ok(mut l) = last.lock() {
            *l = i.status.clone();
        }
        Ok(done.then_some(i))
    })
    .await;
    found.with_context(|| {
        format!(
            "last status of {ns}/{name}: {:#?}",
            last.lock().ok().map(|l| l.clone())
        )
    })
}

/// The status and reason of the image's `Ready` condition.
pub fn ready(i: &DesktopImage) -> Option<(String, String)> {
    let c = find(&i.status.as_ref()?.conditions, "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

/// A marker written into the template's SSH host key: it must not survive sealing anywhere.
pub const KEY_MARKER: &str = "PRIVATE-KEY-MARKER-deskvirt-7f3a";

/// Makes `<dir>/<name>`, a 48 MiB qcow2 whose first partition (1 MiB to 17 MiB, MBR) is an
/// ext4 file system holding a template's per-machine state: `/etc/machine-id`, an SSH host
/// key, a DHCP lease, and a student's `/home/student/notes.txt`.
pub fn sealable_image(dir: &Path, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let work = tempfile_dir("sealable")?;
    let tree = work.join("root");
    for d in ["etc/ssh", "var/lib/dhcp", "home/student"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::write(
        tree.join("etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )?;
    std::fs::write(
        tree.join("etc/ssh/ssh_host_ed25519_key"),
        KEY_MARKER.repeat(100),
    )?;
    std::fs::write(
        tree.join("etc/ssh/ssh_host_ed25519_key.pub"),
        "ssh-ed25519 AAAA\n",
    )?;
    std::fs::write(tree.join("etc/ssh/sshd_config"), "PermitRootLogin no\n")?;
    std::fs::write(tree.join("var/lib/dhcp/dhclient.eth0.leases"), "lease {}\n")?;
    std::fs::write(tree.join("home/student/notes.txt"), "lab 3 setup done\n")?;
    let fs = work.join("fs.ext4");
    run(
        "an image tool",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&fs)
            .arg("16M"),
    )?;
    let raw = work.join("disk.raw");
    let mut bytes = vec![0u8; 1 << 20];
    bytes.extend(std::fs::read(&fs)?);
    bytes.resize(48 << 20, 0);
    std::fs::write(&raw, bytes)?;
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q"])
        .arg(&raw)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    if let Some(stdin) = sfdisk.stdin.as_mut() {
        use std::io::Write;
        stdin.write_all(b"label: dos\nstart=2048, size=32768, type=83\n")?;
    }
    anyhow::ensure!(sfdisk.wait()?.success(), "sfdisk failed");
    let out = dir.join(name);
    run(
        "an image tool",
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&out),
    )?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(out)
}

/// The disk `image` (qcow2, its backing chain read through) as raw bytes.
pub fn disk_bytes(image: &Path) -> anyhow::Result<Vec<u8>> {
    let (work, raw) = flattened(image)?;
    let bytes = std::fs::read(&raw)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(bytes)
}

/// `image` converted to a raw file in a scratch directory: (the directory, the file).
fn flattened(image: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let work = tempfile_dir("flat")?;
    let raw = work.join("flat.raw");
    run(
        "an image tool",
        Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(image)
            .arg(&raw),
    )?;
    Ok((work, raw))
}

/// `debugfs -R "cat <path>"` of the first partition of `image`: the file's text, or `None`
/// when it does not exist.
pub fn file_in_image(image: &Path, path: &str) -> anyhow::Result<Option<String>> {
    let (work, raw) = flattened(image)?;
    let fs = format!("{}?offset=1048576", raw.display());
    let stat = Command::new("debugfs")
        .args(["-R", &format!("stat {path}"), &fs])
        .output()?;
    let found = String::from_utf8_lossy(&stat.stdout).contains("Inode:");
    let text = if found {
        let cat = Command::new("debugfs")
            .args(["-R", &format!("cat {path}"), &fs])
            .output()?;
        Some(String::from_utf8_lossy(&cat.stdout).to_string())
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&work);
    Ok(text)
}

fn tempfile_dir(tag: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("deskvirt-{tag}-{}", unique_suffix()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
