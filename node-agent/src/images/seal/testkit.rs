//! Test disks for sealing, made and read back with the real e2fsprogs and util-linux: a
//! template's tree put into a file system with `mkfs.ext4 -d`, a disk partitioned with
//! `sfdisk`, and `debugfs` and `e2fsck -fn` to see what sealing left.

use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::Tools;

pub(super) const MARKER: &str = "PRIVATE-KEY-MARKER-1234567890";
pub(super) const MIB: u64 = 1 << 20;

/// A scratch directory removed when dropped.
pub(super) use crate::images::testkit::Scratch;

/// The tool's full path in /usr/sbin or /sbin if it is there (not every PATH has them).
pub(super) fn tool(name: &str) -> String {
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .map_or_else(|| name.to_string(), |p| p.display().to_string())
}

pub(super) fn tools() -> Tools {
    Tools {
        debugfs: tool("debugfs"),
        sfdisk: tool("sfdisk"),
        timeout: Duration::from_secs(30),
    }
}

/// Runs `name` and returns its output; it must succeed.
pub(super) fn sh(name: &str, args: &[&str], input: Option<&str>) -> Output {
    let mut child = Command::new(tool(name))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    if let (Some(mut stdin), Some(text)) = (child.stdin.take(), input) {
        stdin
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(super) fn put(root: &Path, rel: &str, bytes: &[u8]) {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{rel}: {e}"));
}

pub(super) fn key() -> Vec<u8> {
    format!("{MARKER}\n").repeat(100).into_bytes()
}

/// A template's root: per-machine files, and files that must stay. The machine ID belongs
/// to uid 1000, so sealing must give it back to root.
pub(super) fn template_tree(root: &Path) {
    put(
        root,
        "etc/machine-id",
        b"0123456789abcdef0123456789abcdef\n",
    );
    std::os::unix::fs::chown(root.join("etc/machine-id"), Some(1000), Some(1000))
        .unwrap_or_else(|e| panic!("chown: {e}"));
    put(root, "etc/ssh/ssh_host_ed25519_key", &key());
    put(
        root,
        "etc/ssh/ssh_host_ed25519_key.pub",
        b"ssh-ed25519 AAAA template\n",
    );
    put(root, "etc/ssh/sshd_config", b"Port 22\n");
    put(root, "etc/hostname", b"template\n");
    put(
        root,
        "var/lib/dhcp/dhclient.eth0.leases",
        b"lease { fixed-address 10.0.0.9; }\n",
    );
    put(root, "var/lib/systemd/random-seed", &[7u8; 512]);
    put(root, "var/lib/systemd/credential.secret", &[9u8; 64]);
    put(root, "home/student/notes.txt", b"my notes\n");
    // As on Debian.
    std::fs::create_dir_all(root.join("var/lib/dbus")).unwrap_or_else(|e| panic!("{e}"));
    symlink("/etc/machine-id", root.join("var/lib/dbus/machine-id"))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// `mkfs.ext4 -q -F -d tree image size` with `extra` options.
pub(super) fn mkfs(tree: &Path, image: &Path, size: &str, extra: &[&str]) {
    let mut args = vec!["-q", "-F"];
    args.extend(extra);
    let (tree, image) = (path_str(tree), path_str(image));
    args.extend(["-d", &tree, &image, size]);
    sh("mkfs.ext4", &args, None);
}

pub(super) fn path_str(p: &Path) -> String {
    p.to_str()
        .unwrap_or_else(|| panic!("{p:?} is not UTF-8"))
        .to_string()
}

/// A 16 MiB disk with an MBR: partition 1 at 1 MiB holds `fs`, partition 2 holds zeros.
pub(super) fn partitioned(dir: &Path, fs: &Path) -> PathBuf {
    let raw = dir.join("disk.raw");
    let file = std::fs::File::create(&raw).unwrap_or_else(|e| panic!("{e}"));
    file.set_len(16 * MIB).unwrap_or_else(|e| panic!("{e}"));
    drop(file);
    sh(
        "sfdisk",
        &["-q", &path_str(&raw)],
        Some("label: dos\nstart=2048, size=16384, type=83\nstart=18432, size=14336, type=83\n"),
    );
    let bytes = std::fs::read(fs).unwrap_or_else(|e| panic!("{e}"));
    assert!(bytes.len() as u64 <= 8 * MIB);
    let mut disk = std::fs::read(&raw).unwrap_or_else(|e| panic!("{e}"));
    disk[MIB as usize..MIB as usize + bytes.len()].copy_from_slice(&bytes);
    std::fs::write(&raw, disk).unwrap_or_else(|e| panic!("{e}"));
    raw
}

fn dev(raw: &Path, offset: u64) -> String {
    format!("{}?offset={offset}", path_str(raw))
}

/// `debugfs -R request` on the file system at `offset`: stdout, stderr.
pub(super) fn debugfs(raw: &Path, offset: u64, request: &str) -> (String, String) {
    let out = sh("debugfs", &["-R", request, &dev(raw, offset)], None);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The contents of `path`, or `None` when there is no such file.
pub(super) fn cat(raw: &Path, offset: u64, path: &str) -> Option<Vec<u8>> {
    let out = sh(
        "debugfs",
        &["-R", &format!("cat {path}"), &dev(raw, offset)],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    (!stderr.contains("File not found")).then_some(out.stdout)
}

/// `e2fsck -fn` finds nothing to fix.
pub(super) fn assert_clean(raw: &Path, offset: u64) {
    let out = Command::new(tool("e2fsck"))
        .args(["-fn", &dev(raw, offset)])
        .output()
        .unwrap_or_else(|e| panic!("e2fsck: {e}"));
    assert!(
        out.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub(super) fn image_holds(raw: &Path, needle: &str) -> bool {
    let bytes = std::fs::read(raw).unwrap_or_else(|e| panic!("{e}"));
    contains(&bytes, needle.as_bytes())
}

/// The words of the first lines of `stat path` (type, mode, owner, size).
pub(super) fn stat_words(raw: &Path, offset: u64, path: &str) -> Vec<String> {
    let (out, _) = debugfs(raw, offset, &format!("stat {path}"));
    out.lines()
        .take(5)
        .flat_map(str::split_whitespace)
        .map(str::to_string)
        .collect()
}

pub(super) fn after(words: &[String], key: &str) -> Option<String> {
    let at = words.iter().position(|w| w == key)?;
    words.get(at + 1).cloned()
}

/// The template of [`template_tree`] is sealed: the machine ID empty, read-only and root's,
/// the per-machine files gone and their bytes too, the rest as it was, the file system clean.
pub(super) fn assert_sealed(raw: &Path, offset: u64) {
    let id = stat_words(raw, offset, "/etc/machine-id");
    assert_eq!(after(&id, "Type:").as_deref(), Some("regular"), "{id:?}");
    assert_eq!(after(&id, "Mode:").as_deref(), Some("0444"), "{id:?}");
    assert_eq!(after(&id, "User:").as_deref(), Some("0"), "{id:?}");
    assert_eq!(after(&id, "Group:").as_deref(), Some("0"), "{id:?}");
    assert_eq!(after(&id, "Size:").as_deref(), Some("0"), "{id:?}");
    assert_eq!(cat(raw, offset, "/etc/machine-id"), Some(Vec::new()));
    for gone in [
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssh/ssh_host_ed25519_key.pub",
        "/var/lib/dhcp/dhclient.eth0.leases",
        "/var/lib/systemd/random-seed",
        "/var/lib/systemd/credential.secret",
    ] {
        assert_eq!(cat(raw, offset, gone), None, "{gone} is still there");
    }
    for (kept, bytes) in [
        ("/etc/ssh/sshd_config", &b"Port 22\n"[..]),
        ("/etc/hostname", b"template\n"),
        ("/home/student/notes.txt", b"my notes\n"),
    ] {
        assert_eq!(cat(raw, offset, kept).as_deref(), Some(bytes), "{kept}");
    }
    let link = stat_words(raw, offset, "/var/lib/dbus/machine-id");
    assert_eq!(after(&link, "Type:").as_deref(), Some("symlink"));
    assert!(
        !image_holds(raw, MARKER),
        "the private key's bytes are still in the image"
    );
    assert!(!image_holds(raw, "0123456789abcdef0123456789abcdef"));
    assert_clean(raw, offset);
}

pub(super) fn reset_of_template() -> Vec<String> {
    [
        "/etc/machine-id",
        "/var/lib/systemd/random-seed",
        "/var/lib/systemd/credential.secret",
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssh/ssh_host_ed25519_key.pub",
        "/var/lib/dhcp/dhclient.eth0.leases",
    ]
    .map(String::from)
    .to_vec()
}
