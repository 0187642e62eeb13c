//! Seals a raw disk image captured from a template VM so that the desktops cloned from it do
//! not share per-machine state: decides which files of the image's ext2/3/4 file systems are
//! emptied or removed, and overwrites their old contents inside the image.
//!
//! # What is reset
//!
//! In every ext2/3/4 file system of the disk (each partition of its MBR or GPT table, or the
//! whole disk when it has no table):
//!
//! - `/etc/machine-id`, if it is a regular file, is emptied and made mode 0444, owned by root
//!   (uid and gid 0): systemd writes a fresh ID at the first boot of each clone. The file keeps
//!   its inode, and so its SELinux label; only a file kept inline in its inode (the ext4
//!   `inline_data` feature) is replaced by a new empty file.
//! - These regular files are removed:
//!   - `/var/lib/dbus/machine-id`, `/var/lib/systemd/random-seed` and
//!     `/var/lib/systemd/credential.secret`;
//!   - every `/etc/ssh/ssh_host_*` (the SSH host keys and their `.pub`). The guest must make
//!     new keys when they are missing (Fedora's and RHEL's `sshd-keygen`, cloud-init, or a unit
//!     of your own on Debian and Ubuntu); otherwise sshd does not start;
//!   - every file ending in `.leases` or `.lease` in `/var/lib/dhcp/` and `/var/lib/dhclient/`,
//!     and every file ending in `.lease` in `/var/lib/NetworkManager/`.
//! - The data blocks these files held are overwritten with zeros in the image, so that a clone
//!   cannot read the template's private keys back from its free space. A block is zeroed only
//!   once the file system has freed it; blocks another name still uses (a hard link) are kept
//!   and reported.
//!
//! # What is left alone (and reported)
//!
//! - Symlinks and other files that are not regular files under these names (Debian's
//!   `/var/lib/dbus/machine-id` is a symlink to `/etc/machine-id`, which is emptied).
//! - A directory on the way that is not a plain directory: a symlinked `/etc/ssh` is never
//!   followed.
//! - Names with characters other than ASCII letters, digits and `._-+@:,=%~` (so no
//!   whitespace, quotes or control characters): they would be put into debugfs requests.
//! - Partitions that are not ext2/3/4 (XFS, btrfs, LVM, swap, FAT boot partitions).
//!
//! Not covered: older copies of these files already in free blocks of the template, what the
//! ext3/4 journal holds, contents kept inline in the inodes of removed files, and a `/var` on a
//! file system of its own.
//!
//! # How
//!
//! `sfdisk --json` finds the partitions; the superblock is read from the image itself; `debugfs`
//! reads and changes each file system at its byte offset (`<image>?offset=<bytes>`): one run
//! per look, one run for all the changes, one to see which blocks were freed, each within
//! [`Tools::timeout`]. Nothing outside the image is written (an inline machine ID's new empty
//! file is made from `/dev/null`). A file system whose journal still needs recovery is refused
//! before anything is changed: the guest would replay the journal over these changes at its
//! next mount. A seal that fails part-way leaves the image half sealed (possibly with freed
//! blocks not yet zeroed): capture the template again rather than cloning it.
//!
//! # Where
//!
//! This module runs a seal and holds its public types and the lists of what is reset;
//! `table` finds the file systems (the partition table, the superblocks), `fs` looks into one
//! file system and changes it, `parse` reads debugfs's answers and filters names, and `run`
//! runs the tools within their deadlines.

mod fs;
mod parse;
mod run;
mod table;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fs::Fs;
use parse::{is_dhcp_lease, is_host_key, is_nm_lease};
use table::{Candidate, partitions, read_superblock};

/// The file emptied rather than removed.
const MACHINE_ID: &str = "/etc/machine-id";
/// Regular files removed where they are.
const FIXED: [&str; 3] = [
    "/var/lib/dbus/machine-id",
    "/var/lib/systemd/random-seed",
    "/var/lib/systemd/credential.secret",
];
/// Which names of a directory are removed.
type Wanted = fn(&str) -> bool;
/// Directories whose matching regular files are removed.
const LISTED: [(&str, Wanted); 4] = [
    ("/etc/ssh", is_host_key),
    ("/var/lib/dhcp", is_dhcp_lease),
    ("/var/lib/dhclient", is_dhcp_lease),
    ("/var/lib/NetworkManager", is_nm_lease),
];
/// Most files removed from one directory; more means a hostile or broken image.
pub const MAX_FILES: usize = 256;
/// Longest [`Sealed::summary`].
pub const SUMMARY_CHARS: usize = 900;

/// The commands used, and the deadline of each run of them.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `debugfs` of e2fsprogs (1.43 or later, for `?offset=`).
    pub debugfs: String,
    /// `sfdisk` of util-linux.
    pub sfdisk: String,
    /// Deadline of one run of either.
    pub timeout: Duration,
}

impl Default for Tools {
    fn default() -> Self {
        Self {
            debugfs: "debugfs".into(),
            sfdisk: "sfdisk".into(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// What [`seal`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sealed {
    /// The ext2/3/4 file systems sealed.
    pub filesystems: u32,
    /// The paths reset (`/etc/machine-id` emptied, the others removed), in the order done;
    /// each starts with `partition N: ` when the disk has more than one ext2/3/4 file system.
    pub reset: Vec<String>,
    /// What was left alone, and why, one line each.
    pub skipped: Vec<String>,
}

impl Sealed {
    /// One line for a status message, at most [`SUMMARY_CHARS`] characters.
    pub fn summary(&self) -> String {
        let mut text = match self.filesystems {
            0 => "no ext2/3/4 file system found".to_string(),
            1 => "sealed 1 ext2/3/4 file system".to_string(),
            n => format!("sealed {n} ext2/3/4 file systems"),
        };
        let (emptied, removed): (Vec<&String>, Vec<&String>) =
            self.reset.iter().partition(|r| r.ends_with(MACHINE_ID));
        let mut parts = Vec::new();
        if !emptied.is_empty() {
            parts.push(format!("emptied {}", listed(&emptied, 150)));
        }
        if !removed.is_empty() {
            parts.push(format!("removed {}", listed(&removed, 400)));
        }
        if self.filesystems > 0 && parts.is_empty() {
            parts.push("nothing to reset".into());
        }
        if !parts.is_empty() {
            text.push_str(": ");
            text.push_str(&parts.join("; "));
        }
        if !self.skipped.is_empty() {
            let skipped: Vec<&String> = self.skipped.iter().collect();
            text.push_str("; left alone: ");
            text.push_str(&listed(&skipped, 250));
        }
        bounded(&text, SUMMARY_CHARS)
    }
}

/// `items` joined by ", " within about `budget` characters, then "and N more".
fn listed(items: &[&String], budget: usize) -> String {
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let used = out.chars().count();
        if i > 0 && used + sep.len() + item.chars().count() > budget {
            out.push_str(&format!(" and {} more", items.len() - i));
            return out;
        }
        out.push_str(sep);
        out.push_str(&bounded(item, budget));
    }
    out
}

/// `text` cut to at most `limit` characters, ending with "..." when cut.
fn bounded(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text.to_string();
    }
    let mut out: String = text.chars().take(limit.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

/// Why an image could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The path is not a file this can work on.
    #[error("{path} cannot be sealed: {why}")]
    BadImage { path: PathBuf, why: &'static str },
    /// Reading or writing the image failed.
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tool could not be started, or its output not read.
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A tool did not finish within the deadline (it was killed).
    #[error("{command} did not finish within {secs}s{}", on_fs(.offset))]
    Timeout {
        command: String,
        offset: Option<u64>,
        secs: u64,
    },
    /// A tool said it failed.
    #[error("{command} failed{}: {stderr}", on_fs(.offset))]
    Failed {
        command: String,
        offset: Option<u64>,
        stderr: String,
    },
    /// A tool printed something this does not understand.
    #[error("{command} printed what this cannot read{}: {detail}", on_fs(.offset))]
    Unexpected {
        command: String,
        offset: Option<u64>,
        detail: String,
    },
    /// The file system was not shut down cleanly; changing it now would be undone.
    #[error(
        "the file system at byte {offset} needs its journal replayed (the template was not shut down cleanly); shut it down and capture it again"
    )]
    NeedsRecovery { offset: u64 },
    /// A file names a block outside its file system (a damaged or hostile image).
    #[error(
        "{path} in the file system at byte {offset} names block {block}, outside the file system"
    )]
    BlockOutside {
        offset: u64,
        path: String,
        block: u64,
    },
    /// A directory holds more matching files than any real system has.
    #[error("{dir} in the file system at byte {offset} holds more than {limit} files to remove")]
    TooManyFiles {
        offset: u64,
        dir: String,
        limit: usize,
    },
}

fn on_fs(offset: &Option<u64>) -> String {
    offset
        .map(|o| format!(" on the file system at byte {o}"))
        .unwrap_or_default()
}

impl SealError {
    /// A short CamelCase category for metrics and Events.
    pub fn category(&self) -> &'static str {
        match self {
            Self::BadImage { .. } => "BadImage",
            Self::Io { .. } => "ImageIo",
            Self::Spawn { .. } | Self::Failed { .. } | Self::Unexpected { .. } => "ToolFailed",
            Self::Timeout { .. } => "ToolTimeout",
            Self::NeedsRecovery { .. } => "NotCleanlyShutDown",
            Self::BlockOutside { .. } | Self::TooManyFiles { .. } => "DamagedFileSystem",
        }
    }
}

/// Seals the raw image `raw` in place (see the module's documentation for what that resets).
/// Every ext2/3/4 file system is checked before any is changed.
pub async fn seal(raw: &Path, tools: &Tools) -> Result<Sealed, SealError> {
    let len = image_len(raw).await?;
    let candidates = match partitions(raw, tools, len).await? {
        Some(parts) => parts,
        None => vec![Candidate {
            name: "whole disk".into(),
            offset: 0,
            end: len,
        }],
    };
    let mut sealed = Sealed::default();
    let mut found = Vec::new();
    for c in candidates {
        match read_superblock(raw, &c).await? {
            Some(sb) if sb.journal_dev => sealed.skipped.push(format!(
                "{} at {}: an external ext3/4 journal, no files",
                c.name, c.offset
            )),
            Some(sb) if sb.needs_recovery => {
                return Err(SealError::NeedsRecovery { offset: c.offset });
            }
            Some(sb) => found.push((c, sb)),
            None => sealed
                .skipped
                .push(format!("{} at {}: not ext2/3/4", c.name, c.offset)),
        }
    }
    let several = found.len() > 1;
    for (c, sb) in found {
        let fs = Fs {
            tools,
            raw,
            device: device(raw, c.offset),
            offset: c.offset,
            end: c.end,
            sb,
            prefix: if several {
                format!("{}: ", c.name)
            } else {
                String::new()
            },
        };
        fs.seal(&mut sealed).await?;
        sealed.filesystems += 1;
        tracing::debug!(image = %raw.display(), offset = c.offset, "sealed a file system");
    }
    Ok(sealed)
}

/// The length of the image, once it is known to be a regular file debugfs can name.
async fn image_len(raw: &Path) -> Result<u64, SealError> {
    if raw.as_os_str().as_encoded_bytes().contains(&b'?') {
        return Err(SealError::BadImage {
            path: raw.to_path_buf(),
            why: "its path holds '?', which debugfs reads as the start of options",
        });
    }
    let meta = tokio::fs::metadata(raw)
        .await
        .map_err(|source| SealError::Io {
            action: "read",
            path: raw.to_path_buf(),
            source,
        })?;
    if !meta.is_file() {
        return Err(SealError::BadImage {
            path: raw.to_path_buf(),
            why: "not a regular file",
        });
    }
    Ok(meta.len())
}

/// What debugfs opens for the file system at `offset`; a relative path never looks like an
/// option.
fn device(raw: &Path, offset: u64) -> OsString {
    let mut dev = if raw.is_absolute() {
        raw.as_os_str().to_os_string()
    } else {
        Path::new(".").join(raw).into_os_string()
    };
    dev.push(format!("?offset={offset}"));
    dev
}
