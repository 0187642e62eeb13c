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
    /// The sealing tools and their deadline.
    pub seal: seal::Tools,
}

impl Default for CaptureSettings {
    fn default() -> Self {
        Self {
            convert_timeout: Duration::from_secs(1800),
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
    if tokio::fs::try_exists(spec.final_path())
        .await
        .map_err(io("look at", &spec.final_path()))?
    {
        return Err(CopyError::Exists {
            path: spec.final_path().display().to_string(),
        });
    }
    let dir = spec.dir();
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(io("create", &dir))?;
    let raw = sealing_path(spec);
    let partial = spec.partial_path();
    let made = make(spec, from, settings, capture, &raw, &partial, progress).await;
    // The version's file holds what it needs; a failed capture leaves nothing behind.
    let mut leftovers = vec![&raw];
    if made.is_err() {
        leftovers.push(&partial);
    }
    for left in leftovers {
        if let Err(e) = tokio::fs::remove_file(left).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %left.display(), error = %e, "cannot remove a capture's temporary file");
        }
    }
    made
}

/// The flattened raw file being sealed, beside the version's file (same file system).
fn sealing_path(spec: &CopySpec) -> PathBuf {
    let mut name = spec.final_path().into_os_string();
    name.push(format!(".sealing.{}", super::sidecar::host_tag()));
    PathBuf::from(name)
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
    let convert = |op: &'static str, args: Vec<String>, path: PathBuf| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        disks::run_within(
            &settings.qemu_img,
            op,
            &path,
            &args,
            capture.convert_timeout,
        )
        .await
        .map_err(|e| CopyError::Capture(crate::agent::error_chain(&e)))
    };
    let disk = from.disk.display().to_string();
    // Flattened: the overlay and its whole backing chain, read as one disk.
    convert(
        "convert",
        vec![
            "convert".into(),
            "-f".into(),
            "qcow2".into(),
            "-O".into(),
            "raw".into(),
            disk,
            raw.display().to_string(),
        ],
        from.disk.clone(),
    )
    .await?;
    let sealed = seal::seal(raw, &capture.seal).await.map_err(|e| {
        CopyError::Capture(format!("sealing failed: {}", crate::agent::error_chain(&e)))
    })?;
    convert(
        "convert",
        vec![
            "convert".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "qcow2".into(),
            raw.display().to_string(),
            partial.display().to_string(),
        ],
        raw.to_path_buf(),
    )
    .await?;
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
