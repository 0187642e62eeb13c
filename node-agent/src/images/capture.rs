//! Makes an image version from a template Desktop's disk on this host: the disk (a qcow2
//! overlay on its base, or a full copy) is flattened into one raw file, sealed ([`super::seal`]:
//! per-machine state reset), converted into a standalone qcow2 under the version's temporary
//! name, hashed, checked, and put in place as every copy is ([`super::fetch::finish`]). The
//! desktop's disk lock is held throughout, so the agent does not start the desktop meanwhile,
//! and `qemu-img`'s own image locking refuses a disk a running QEMU writes. The disk must be
//! recorded as the template's (its owner record names the Desktop's UID).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::error::{CopyError, io};
use super::fetch::{self, CopySpec, Progress, Settings, Verified};
use super::seal;
use crate::disks::{self, Owner};

/// The template whose disk a version is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureFrom {
    /// The Desktop's UID.
    pub desktop_uid: String,
    /// Its disk on this host.
    pub disk: PathBuf,
}

/// How the capture runs.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    /// Deadline of each `qemu-img convert` (each copies the whole disk).
    pub convert_timeout: Duration,
    /// Deadline of the whole capture (the template's disk lock is held throughout).
    pub total_timeout: Duration,
    /// The sealing tools and their deadline.
    pub seal: seal::Tools,
}

impl Default for CaptureSettings {
    fn default() -> Self {
        Self {
            convert_timeout: Duration::from_secs(1800),
            total_timeout: Duration::from_secs(7200),
            seal: seal::Tools::default(),
        }
    }
}

/// What a capture made: the verified file, and what sealing reset (for the report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub verified: Verified,
    pub sealed: String,
}

/// Captures `from` into the version `spec` names, holding `lock` (the desktop's disk lock).
pub async fn capture(
    spec: &CopySpec,
    from: &CaptureFrom,
    settings: &Settings,
    capture: &CaptureSettings,
    lock: Arc<tokio::sync::Mutex<()>>,
    progress: &Progress,
) -> Result<Captured, CopyError> {
    let _held = lock.lock().await;
    match disks::owner_of(&from.disk, &from.desktop_uid).await {
        Ok(Owner::Us) => {}
        Ok(other) => {
            return Err(CopyError::Capture(format!(
                "{} is not recorded as the template's disk ({other:?})",
                from.disk.display()
            )));
        }
        Err(e) => return Err(CopyError::Capture(crate::agent::error_chain(&e))),
    }
    if fetch::exists(&spec.final_path()).await? {
        return Err(CopyError::Exists {
            path: spec.final_path().display().to_string(),
        });
    }
    let dir = spec.dir();
    fetch::make_dir(&dir).await?;
    fetch::room(&dir, 0, settings.reserve_bytes)?;
    let raw = sealing_path(spec);
    let partial = spec.partial_path();
    // Removed however the capture ends: failed, timed out, or dropped (its image's source
    // changed, or the image was deleted, while it ran). A placed version is linked, not moved,
    // so removing the temporary name leaves it whole.
    let _cleanup = Cleanup(vec![raw.clone(), partial.clone()]);
    let run = make(spec, from, settings, capture, &raw, &partial, progress);
    tokio::time::timeout(capture.total_timeout, run)
        .await
        .map_err(|_| {
            CopyError::Capture(format!(
                "the capture did not end within {:?}",
                capture.total_timeout
            ))
        })?
}

/// Removes its files when dropped (a missing one is fine).
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for f in &self.0 {
            if let Err(e) = std::fs::remove_file(f)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %f.display(), error = %e, "cannot remove a capture's temporary file");
            }
        }
    }
}

/// The flattened raw file being sealed, beside the version's file (same file system).
fn sealing_path(spec: &CopySpec) -> PathBuf {
    let mut name = spec.final_path().into_os_string();
    name.push(format!(".sealing.{}", super::sidecar::host_tag()));
    PathBuf::from(name)
}

/// `qemu-img convert -f <from> -O <to> src dst` within the convert deadline; a source another
/// process holds open (qemu-img's image locking) is [`CopyError::DiskBusy`].
async fn convert(
    settings: &Settings,
    capture: &CaptureSettings,
    from_format: &str,
    src: &Path,
    to_format: &str,
    dst: &Path,
) -> Result<(), CopyError> {
    let (src_arg, dst_arg) = (src.display().to_string(), dst.display().to_string());
    let args = [
        "convert",
        "-f",
        from_format,
        "-O",
        to_format,
        &src_arg,
        &dst_arg,
    ];
    disks::run_within(
        &settings.qemu_img,
        "convert",
        src,
        &args,
        capture.convert_timeout,
    )
    .await
    .map(drop)
    .map_err(|e| {
        let text = crate::agent::error_chain(&e);
        if text.contains("Failed to get shared \"write\" lock") {
            CopyError::DiskBusy(text)
        } else {
            CopyError::Capture(text)
        }
    })
}

/// The body of [`capture`]; leaves its temporary files to the caller.
async fn make(
    spec: &CopySpec,
    from: &CaptureFrom,
    settings: &Settings,
    capture: &CaptureSettings,
    raw: &Path,
    partial: &Path,
    progress: &Progress,
) -> Result<Captured, CopyError> {
    // Flattened: the overlay and its whole backing chain, read as one disk.
    convert(settings, capture, "qcow2", &from.disk, "raw", raw).await?;
    let sealed = seal::seal(raw, &capture.seal).await.map_err(|e| {
        CopyError::Capture(format!("sealing failed: {}", crate::agent::error_chain(&e)))
    })?;
    convert(settings, capture, "raw", raw, "qcow2", partial).await?;
    let (sha256, bytes) = fetch::hash_file(partial, Arc::new(Progress::default())).await?;
    progress.expect(bytes);
    progress.add(bytes);
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .open(partial)
        .await
        .map_err(io("open", partial))?;
    let spec = CopySpec {
        sha256: sha256.clone(),
        ..spec.clone()
    };
    let verified = fetch::finish(&spec, settings, file, partial, sha256, bytes, false).await?;
    Ok(Captured {
        verified,
        sealed: sealed.summary(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::testkit::{Scratch, settings, spec};

    /// A 1 MiB qcow2 disk of Desktop `owner` in `dir`, with its owner record.
    fn disk(dir: &Path, owner: &str) -> PathBuf {
        let disk = dir.join("desk.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("1M")
            .output()
            .unwrap_or_else(|e| panic!("qemu-img: {e}"));
        assert!(out.status.success(), "{out:?}");
        std::fs::write(disks::owner_path(&disk), format!("{owner}\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        disk
    }

    async fn run(dir: &Scratch, from: &CaptureFrom) -> Result<Captured, CopyError> {
        let want = spec(&dir.0.join("images"), "", "");
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        capture(
            &want,
            from,
            &settings(),
            &CaptureSettings::default(),
            lock,
            &Progress::default(),
        )
        .await
    }

    #[tokio::test]
    async fn a_template_disk_becomes_a_standalone_read_only_version() {
        let dir = Scratch::new("capture");
        let from = CaptureFrom {
            desktop_uid: "t-uid".into(),
            disk: disk(&dir.0, "t-uid"),
        };
        let made = run(&dir, &from).await.unwrap_or_else(|e| panic!("{e}"));
        let file = spec(&dir.0.join("images"), "", "").final_path();
        let meta = std::fs::metadata(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(made.verified.bytes, meta.len());
        assert_eq!(made.verified.virtual_bytes, 1 << 20);
        assert!(made.sealed.contains("0"), "{}", made.sealed);
        // Only the version's file and its record are left.
        let left: Vec<String> = std::fs::read_dir(file.parent().unwrap_or(&dir.0))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    #[tokio::test]
    async fn a_disk_of_another_desktop_or_held_open_is_not_captured() {
        let dir = Scratch::new("capture-refused");
        let theirs = CaptureFrom {
            desktop_uid: "t-uid".into(),
            disk: disk(&dir.0, "someone-else"),
        };
        let e = run(&dir, &theirs).await.err();
        assert!(
            matches!(&e, Some(CopyError::Capture(m)) if m.contains("not recorded")),
            "{e:?}"
        );
        // A process with the disk open for writing (as a QEMU shutting down): busy, retried soon.
        let mine = CaptureFrom {
            desktop_uid: "someone-else".into(),
            disk: theirs.disk.clone(),
        };
        // Waits until qemu-io holds its lock on the disk, read from /proc/locks (a probe that
        // opened the disk would take a lock itself, and could make qemu-io fail to get its own).
        let inode = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&mine.disk)
                .map(|m| m.ino())
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let locked = || {
            std::fs::read_to_string("/proc/locks")
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("OFDLCK") && l.contains(&format!(":{inode} ")))
        };
        let mut holder = None;
        for _ in 0..400 {
            let running = holder
                .as_mut()
                .is_some_and(|h: &mut tokio::process::Child| matches!(h.try_wait(), Ok(None)));
            if !running {
                holder = Some(
                    tokio::process::Command::new("qemu-io")
                        .args(["-f", "qcow2", "-c", "sleep 20000"])
                        .arg(&mine.disk)
                        .kill_on_drop(true)
                        .spawn()
                        .unwrap_or_else(|e| panic!("qemu-io: {e}")),
                );
            }
            if running && locked() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(locked(), "qemu-io never held the disk");
        let e = run(&dir, &mine).await.err();
        if let Some(mut h) = holder {
            let _ = h.kill().await;
        }
        assert!(matches!(e, Some(CopyError::DiskBusy(_))), "{e:?}");
        let partial = spec(&dir.0.join("images"), "", "").partial_path();
        assert!(!partial.exists() && !sealing_path(&spec(&dir.0.join("images"), "", "")).exists());
    }
}
