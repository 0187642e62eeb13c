//! Keeps the record beside each verified image file (`v<N>.qcow2.verified`): which image and
//! version it is, its SHA-256, its size and the disk size it holds, and the file's inode and
//! modification time when it was checked. A file whose record names the same image, version,
//! sum and size, on the same inode with the same modification time, is taken as verified
//! without reading it again (a write into it, even one that keeps its size, changes the time);
//! a record is written atomically (temporary file, fsync, rename) and only after the file
//! checked.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::error::{CopyError, io};

/// Longest record read: anything longer is not one of ours.
const MAX_LEN: u64 = 4096;

/// The record of a verified image file.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Sidecar {
    /// UID of the DesktopImage.
    pub uid: String,
    /// Its version.
    pub version: u32,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    /// Bytes of the file.
    pub bytes: u64,
    /// The disk size the image holds.
    pub virtual_bytes: u64,
    /// The file's inode and modification time (nanoseconds since the epoch) when it was
    /// checked; unset in records of earlier agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<Stamp>,
}

/// What a write into a file or a replacement of it changes: its inode and modification time.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub inode: u64,
    pub modified_ns: i128,
}

impl Stamp {
    /// The stamp of a file's metadata.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            inode: meta.ino(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// This machine's host name as a file-name suffix (letters, digits, `.` and `-` only).
pub(super) fn host_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let tag: String = name
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
            .take(64)
            .collect();
        if tag.is_empty() { "host".into() } else { tag }
    })
}

/// The record of image file `file`.
pub fn path(file: &Path) -> PathBuf {
    with_suffix(file, ".verified")
}

/// `file` with `suffix` appended to its name.
pub(super) fn with_suffix(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    file.with_file_name(name)
}

/// The record at `path`; `None` when it is missing, too long or not a record.
pub async fn read(path: &Path) -> Option<Sidecar> {
    let file = tokio::fs::File::open(path).await.ok()?;
    let mut text = Vec::new();
    file.take(MAX_LEN + 1).read_to_end(&mut text).await.ok()?;
    if text.len() as u64 > MAX_LEN {
        return None;
    }
    serde_json::from_slice(&text).ok()
}

/// Writes `record` at `path`: into a temporary file, synced, then renamed over (the caller
/// syncs the directory).
pub async fn write(path: &Path, record: &Sidecar) -> Result<(), CopyError> {
    use tokio::io::AsyncWriteExt;
    // Named after this host: hosts sharing an image directory never write one temporary file.
    let temp = with_suffix(path, &format!(".tmp.{}", host_tag()));
    let text = serde_json::to_vec(record).map_err(|e| CopyError::Io {
        op: "encode the record of",
        path: path.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&temp)
        .await
        .map_err(io("create", &temp))?;
    file.write_all(&text).await.map_err(io("write", &temp))?;
    file.sync_all().await.map_err(io("sync", &temp))?;
    drop(file);
    tokio::fs::rename(&temp, path)
        .await
        .map_err(io("rename the record into", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_record_round_trips_and_junk_is_no_record() {
        let dir = super::super::testkit::Scratch::new("sidecar");
        let file = dir.0.join("v1.qcow2");
        let record = Sidecar {
            uid: "u".into(),
            version: 1,
            sha256: "ab".repeat(32),
            bytes: 10,
            virtual_bytes: 20,
            stamp: Some(Stamp {
                inode: 7,
                modified_ns: 1,
            }),
        };
        let at = path(&file);
        assert_eq!(at, dir.0.join("v1.qcow2.verified"));
        assert!(write(&at, &record).await.is_ok());
        assert_eq!(read(&at).await, Some(record));
        assert!(!with_suffix(&at, &format!(".tmp.{}", host_tag())).exists());
        std::fs::write(&at, b"{").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read(&at).await, None);
        std::fs::write(&at, vec![b' '; 5000]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read(&at).await, None);
        assert_eq!(read(&dir.0.join("none")).await, None);
    }
}
