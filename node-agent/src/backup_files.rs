//! Decides what the agent does to backup files on the backup storage: which path a recorded
//! backup may be written to (inside the pool's backup directory, named by the backup's UID,
//! nowhere else), how a written file is made to stand on its own chain (its backing file set
//! to the parent backup or the base image), how it is verified (`qemu-img check`, then its
//! SHA-256), and how an unfinished one is removed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::disks::{DiskError, deadline, io, run_within, tool};

/// A verified backup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Bytes of the file.
    pub size: u64,
    /// `sha256:<hex>`.
    pub checksum: String,
}

/// The file a record names, checked: a clean path inside `dir` whose last three parts are
/// `<namespace>/<desktop uid>/<backup uid>.qcow2`. A record that names anything else (a
/// forged or corrupted status) touches nothing.
pub fn checked_location(
    dir: &str,
    location: &str,
    ns: &str,
    desktop_uid: &str,
    backup_uid: &str,
) -> Result<PathBuf, DiskError> {
    let want = deskvirt_crds::backup::location(dir, ns, desktop_uid, backup_uid);
    let path = PathBuf::from(location);
    let unsafe_path = |source| DiskError::UnsafePath {
        path: location.to_string(),
        source,
    };
    deskvirt_crds::paths::check_dir(dir).map_err(unsafe_path)?;
    deskvirt_crds::paths::check_joined(&path).map_err(unsafe_path)?;
    if location != want || !path.starts_with(dir) {
        return Err(DiskError::Protected {
            path: location.to_string(),
        });
    }
    Ok(path)
}

/// Makes the file's directory and removes a file an earlier, unfinished attempt left.
pub async fn prepare(file: &Path) -> Result<(), DiskError> {
    if let Some(parent) = file.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io("create the backup directory", parent))?;
    }
    remove(file).await
}

/// Removes `file`; gone already is done.
pub async fn remove(file: &Path) -> Result<(), DiskError> {
    match tokio::fs::remove_file(file).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove the backup file", file)(e)),
    }
}

/// Sets the backing file of `file` (libvirt wrote the live disk there) to `backing`, checks
/// the chain with `qemu-img check`, and takes the file's SHA-256. A full backup (`backing`
/// `None`) stands alone and keeps none.
pub async fn finish(
    qemu_img: &str,
    file: &Path,
    backing: Option<&Path>,
) -> Result<Verified, DiskError> {
    let name = file.to_string_lossy();
    let quick = deadline("rebase");
    match backing {
        Some(b) => {
            let b = b.to_string_lossy();
            run_within(
                qemu_img,
                "rebase",
                file,
                &[
                    "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", &b, &name,
                ],
                quick,
            )
            .await?;
        }
        None => {
            run_within(
                qemu_img,
                "rebase",
                file,
                &["rebase", "-u", "-f", "qcow2", "-b", "", &name],
                quick,
            )
            .await?;
        }
    }
    // The whole chain is read: a copy's deadline.
    run_within(
        qemu_img,
        "check",
        file,
        &["check", "-U", "-q", "-f", "qcow2", &name],
        deadline("convert"),
    )
    .await?;
    let size = tokio::fs::metadata(file)
        .await
        .map_err(io("read the backup file's size", file))?
        .len();
    let checksum = sha256(file, deadline("convert")).await?;
    Ok(Verified { size, checksum })
}

/// The backing file `file` names (`None`: it stands alone), from `qemu-img info`.
pub async fn backing_of(qemu_img: &str, file: &Path) -> Result<Option<PathBuf>, DiskError> {
    let info = crate::disks::info(qemu_img, file).await?;
    Ok(info
        .get("full-backing-filename")
        .or_else(|| info.get("backing-filename"))
        .and_then(|b| b.as_str())
        .filter(|b| !b.is_empty())
        .map(PathBuf::from))
}

/// `sha256:<hex>` of `file`, read in a blocking thread within `limit`.
pub async fn sha256(file: &Path, limit: Duration) -> Result<String, DiskError> {
    let path = file.to_path_buf();
    let reading = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut f = std::fs::File::open(&path)?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            ctx.update(buf.get(..n).unwrap_or_default());
        }
        let hex = crate::images::fetch::hex(ctx.finish().as_ref());
        Ok(format!("sha256:{hex}"))
    });
    match tokio::time::timeout(limit, reading).await {
        Err(_) => Err(DiskError::Timeout {
            op: "checksum",
            path: file.display().to_string(),
            after: limit,
        }),
        Ok(Err(join)) => Err(tool("checksum", file, join.to_string())),
        Ok(Ok(result)) => result.map_err(io("read the backup file", file)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_backups_own_file_under_the_pools_dir_is_accepted() {
        let ok = checked_location(
            "/srv/backups",
            "/srv/backups/lab/d-1/b-1.qcow2",
            "lab",
            "d-1",
            "b-1",
        );
        assert_eq!(
            ok.ok(),
            Some(PathBuf::from("/srv/backups/lab/d-1/b-1.qcow2"))
        );
        for forged in [
            "/var/lib/deskvirt/disks/victim.qcow2",
            "/srv/backups/lab/d-1/../../other/d-2/b-1.qcow2",
            "/srv/backups/other/d-2/b-1.qcow2",
            "/srv/backups/lab/d-1/b-2.qcow2",
            "relative/b-1.qcow2",
        ] {
            assert!(
                checked_location("/srv/backups", forged, "lab", "d-1", "b-1").is_err(),
                "{forged}"
            );
        }
    }

    #[tokio::test]
    async fn a_files_checksum_is_its_sha256() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("deskvirt-sha-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let f = dir.join("x");
        std::fs::write(&f, b"abc")?;
        let sum = sha256(&f, Duration::from_secs(10)).await?;
        std::fs::remove_dir_all(&dir)?;
        assert_eq!(
            sum,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        Ok(())
    }
}
