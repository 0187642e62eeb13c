//! Decides how a desktop's disk comes to exist and goes away on the host: a qcow2 overlay on
//! the pool's base image (linked clone) or an independent qcow2 copy (full clone), made with
//! `qemu-img` under a temporary name and renamed into place, so a crash never leaves a
//! half-written disk under the real name. Removal refuses anything in the image directory and
//! any file a domain still uses. Every disk has its owner, the Desktop UID, recorded beside it
//! (`<disk>.owner`, written before the disk is renamed into place); a disk recorded for another
//! Desktop is never booted, cloned over or deleted. Every `qemu-img` run has a deadline
//! ([`QemuImgDeadlines`]); one that misses it is killed and reported as `DiskToolTimeout`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use deskvirt_core::backup::CREATION_CHECKPOINT;
use deskvirt_crds::desktop::CloneMode;
use tokio::process::Command;

/// Why a disk could not be prepared or removed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The base image named by the Desktop is not in the pool's image directory.
    #[error("base image {path} does not exist on this host")]
    BaseMissing { path: String },
    /// The DesktopImage version the desktop is pinned to has no verified copy on this host.
    #[error("base image {path} is not a verified copy on this host: {why}")]
    BaseUnverified { path: String, why: String },
    /// `qemu-img` refused or failed.
    #[error("qemu-img {op} failed for {path}: {message}")]
    Tool {
        op: &'static str,
        path: String,
        message: String,
    },
    /// `qemu-img` did not finish within its deadline; it was killed.
    #[error("qemu-img {op} for {path} did not finish within {}s; killed", after.as_secs_f32())]
    Timeout {
        op: &'static str,
        path: String,
        after: Duration,
    },
    /// A file-system call failed.
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// The disk is still used by a defined or running domain.
    #[error("disk {path} is still used by a domain; kept")]
    InUse { path: String },
    /// A backup the disk is to be restored from fails its checks; nothing is made.
    #[error("refusing to restore from {path}: {message}")]
    RestoreRefused { path: String, message: String },
    /// The directory the disk lives in is not visible to the agent: a pool `diskDir` the
    /// agent's mounts do not hold. Nothing is made or deleted until it is.
    #[error(
        "the disk directory {dir} is not visible to the node-agent (the chart mounts \
         nodeAgent.diskDir, which must be the pool's storage.diskDir); nothing is made or \
         deleted there until it is. If the directory is gone for good, undefining the \
         desktop's domain by hand (virsh undefine) lets its deletion finish, leaving any disk \
         there behind"
    )]
    DirMissing { dir: String },
    /// The path is a base image (or inside the image directory); never deleted.
    #[error("{path} is a base image or inside the image directory; never deleted")]
    Protected { path: String },
    /// A file is where a disk would be made for a copy: nothing is written over it.
    #[error("a file is at {path} already; nothing is written over it")]
    Exists { path: String },
    /// The disk belongs to another Desktop (or to nobody this agent can prove): untouched.
    #[error("disk {path} belongs to {owner}, not to this desktop; it is left untouched")]
    NotOurs { path: String, owner: String },
    /// A path breaks the rules of `deskvirt_crds::paths`; nothing is touched.
    #[error(
        "refusing to touch {path}: it breaks the path rules (absolute, clean, apart from the image directory)"
    )]
    UnsafePath {
        path: String,
        source: deskvirt_crds::paths::PathError,
    },
}

impl DiskError {
    /// Short category for metrics, conditions and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BaseMissing { .. } | Self::BaseUnverified { .. } => "BaseImageMissing",
            Self::Tool { .. } => "DiskPreparationFailed",
            Self::Timeout { .. } => "DiskToolTimeout",
            Self::Io { .. } => "DiskIoFailed",
            Self::InUse { .. } => "DiskInUse",
            Self::DirMissing { .. } => "DiskDirMissing",
            Self::Protected { .. } => "DiskProtected",
            Self::NotOurs { .. } => "DiskNotOurs",
            Self::Exists { .. } => "DiskExists",
            Self::UnsafePath { .. } => "UnsafePath",
            Self::RestoreRefused { .. } => "RestoreRefused",
        }
    }

    /// Whether retrying soon may help (a missing image needs an admin first; a DesktopImage
    /// copy that is not verified yet, after an agent restart say, is verified by the image loop
    /// within a round or two).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Io { .. }
                | Self::InUse { .. }
                | Self::Timeout { .. }
                | Self::BaseUnverified { .. }
        )
    }
}

/// What a desktop's disk is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// The base image: `<imageDir>/<spec.disk.image>`.
    pub base: PathBuf,
    /// The desktop's disk.
    pub target: PathBuf,
    /// Linked (overlay) or full (copy).
    pub clone: CloneMode,
    /// Virtual size in bytes when the Desktop asks for one.
    pub size: Option<u64>,
    /// Who the disk is for: the Desktop UID recorded beside it.
    pub owner: String,
    /// Whether a disk found without an owner record may be taken as this desktop's: true only
    /// when its own domain (found by its `<uuid>`) uses that very file, as a domain an earlier
    /// release defined does. The record is written then.
    pub adopt: bool,
    /// The backup chain to make the disk from instead of an empty clone.
    pub restore: Option<RestorePlan>,
    /// Why the base may not be cloned now (a DesktopImage version without a verified copy
    /// here); a disk that exists already is kept.
    pub unverified: Option<String>,
}

/// A backup chain a disk is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    /// The pool's backup directory (`None`: the pool sets none); every file must be inside it.
    pub dir: Option<PathBuf>,
    /// Each file, root first, with the checksum it must still have.
    pub layers: Vec<(PathBuf, String)>,
}

/// Who a disk belongs to, by the record beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Recorded for the Desktop asking.
    Us,
    /// Recorded for another Desktop UID.
    Other(String),
    /// No record: a disk of a release before owner records, or a file deskvirt did not make.
    Unrecorded,
}

/// The owner record of `target`: `<target>.owner`.
pub fn owner_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".owner");
    target.with_file_name(name)
}

/// Whom the record beside `target` names, compared with `uid`.
pub async fn owner_of(target: &Path, uid: &str) -> Result<Owner, DiskError> {
    let record = owner_path(target);
    match tokio::fs::read_to_string(&record).await {
        Ok(text) if text.trim().eq_ignore_ascii_case(uid) => Ok(Owner::Us),
        Ok(text) => Ok(Owner::Other(text.trim().chars().take(64).collect())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Owner::Unrecorded),
        Err(e) => Err(io("read the owner record of", target)(e)),
    }
}

/// Writes the owner record of `target` (through a temporary file, so it is whole or absent).
async fn record_owner(target: &Path, uid: &str) -> Result<(), DiskError> {
    let record = owner_path(target);
    let mut tmp = record.as_os_str().to_os_string();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    tokio::fs::write(&tmp, format!("{uid}\n"))
        .await
        .map_err(io("write the owner record of", target))?;
    tokio::fs::rename(&tmp, &record)
        .await
        .map_err(io("write the owner record of", target))
}

/// Whether `uid` may use, replace or delete the disk at `target`; records the owner of an
/// unrecorded disk it may adopt. The refusal names the owner found.
async fn claim(target: &Path, uid: &str, adopt: bool) -> Result<(), DiskError> {
    let refuse = |owner: String| DiskError::NotOurs {
        path: target.display().to_string(),
        owner,
    };
    match owner_of(target, uid).await? {
        Owner::Us => Ok(()),
        Owner::Other(other) => Err(refuse(format!("Desktop UID {other}"))),
        Owner::Unrecorded if adopt => record_owner(target, uid).await,
        Owner::Unrecorded => Err(refuse(
            "no recorded desktop (a file deskvirt did not make, or one whose domain is gone)"
                .into(),
        )),
    }
}

/// What [`prepare`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// The disk was made now.
    Created,
    /// The disk was there already and is kept.
    Existing,
}

/// What `qemu-img info --output=json -U` says of `path`.
pub(crate) async fn info(qemu_img: &str, path: &Path) -> Result<serde_json::Value, DiskError> {
    let name = path.to_string_lossy();
    let out = run(
        qemu_img,
        "info",
        path,
        &["info", "--output=json", "-U", &name],
    )
    .await?;
    serde_json::from_slice(&out).map_err(|e| tool("info", path, e.to_string()))
}

/// The image format `qemu-img info` reports for `path` (`qcow2`, `raw`, ...).
async fn image_format(qemu_img: &str, path: &Path) -> Result<String, DiskError> {
    info(qemu_img, path)
        .await?
        .get("format")
        .and_then(|f| f.as_str())
        .map(str::to_string)
        .ok_or_else(|| tool("info", path, "no format in qemu-img info".into()))
}

pub(crate) fn tool(op: &'static str, path: &Path, message: String) -> DiskError {
    DiskError::Tool {
        op,
        path: path.display().to_string(),
        message,
    }
}

fn unsafe_path(path: &Path) -> impl FnOnce(deskvirt_crds::paths::PathError) -> DiskError {
    let path = path.display().to_string();
    move |source| DiskError::UnsafePath { path, source }
}

pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DiskError {
    let path = path.display().to_string();
    move |source| DiskError::Io { op, path, source }
}

/// Runs `qemu-img args`; its stdout, or its stderr as the error.
async fn run(
    qemu_img: &str,
    op: &'static str,
    path: &Path,
    args: &[&str],
) -> Result<Vec<u8>, DiskError> {
    run_within(qemu_img, op, path, args, deadline(op)).await
}

/// [`run`] with the deadline `limit`.
pub(crate) async fn run_within(
    qemu_img: &str,
    op: &'static str,
    path: &Path,
    args: &[&str],
    limit: Duration,
) -> Result<Vec<u8>, DiskError> {
    // Dropping the future at the deadline kills the child (`kill_on_drop`).
    let run = Command::new(qemu_img)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, run)
        .await
        .map_err(|_| DiskError::Timeout {
            op,
            path: path.display().to_string(),
            after: limit,
        })?
        .map_err(|e| tool(op, path, format!("cannot run {qemu_img}: {e}")))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(tool(op, path, stderr.trim().to_string()))
    }
}

/// How long a `qemu-img` run may take before it is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuImgDeadlines {
    /// `info`, `create` (a linked clone) and `resize`: metadata only.
    pub quick: Duration,
    /// `convert` (a full clone copies the whole base image).
    pub copy: Duration,
}

impl Default for QemuImgDeadlines {
    fn default() -> Self {
        Self {
            quick: Duration::from_secs(60),
            copy: Duration::from_secs(1800),
        }
    }
}

static DEADLINES: OnceLock<QemuImgDeadlines> = OnceLock::new();

/// Sets the process's `qemu-img` deadlines once, at startup (later calls are ignored: the
/// deadlines are a process setting, like the `qemu-img` path).
pub fn set_deadlines(deadlines: QemuImgDeadlines) {
    let _ = DEADLINES.set(deadlines);
}

pub(crate) fn deadline(op: &str) -> Duration {
    let d = DEADLINES.get().copied().unwrap_or_default();
    if op == "convert" { d.copy } else { d.quick }
}

/// The temporary name a disk is built under before it is renamed into place.
fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    target.with_file_name(name)
}

/// Records `uid` as the owner of the existing, unrecorded disk of its own running domain (one an
/// earlier release made). A disk with a record, or none at all, is left as it is.
pub async fn adopt(target: &Path, uid: &str) -> Result<(), DiskError> {
    let exists = tokio::fs::try_exists(target)
        .await
        .map_err(io("look at", target))?;
    if exists && owner_of(target, uid).await? == Owner::Unrecorded {
        record_owner(target, uid).await?;
    }
    Ok(())
}

/// Makes the desktop's disk unless it exists. With `fresh`, an existing disk is replaced by a
/// new clone (a non-persistent desktop starting again); the caller guarantees no running
/// domain uses it.
pub async fn prepare(qemu_img: &str, plan: &DiskPlan, fresh: bool) -> Result<Prepared, DiskError> {
    crate::paths::check_clone(&plan.base, &plan.target).map_err(unsafe_path(&plan.target))?;
    let exists = tokio::fs::try_exists(&plan.target)
        .await
        .map_err(io("look at", &plan.target))?;
    if exists {
        claim(&plan.target, &plan.owner, plan.adopt).await?;
        if !fresh {
            return Ok(Prepared::Existing);
        }
    } else if let Owner::Other(other) = owner_of(&plan.target, &plan.owner).await? {
        return Err(DiskError::NotOurs {
            path: plan.target.display().to_string(),
            owner: format!("Desktop UID {other}"),
        });
    }
    if let Some(why) = &plan.unverified {
        return Err(DiskError::BaseUnverified {
            path: plan.base.display().to_string(),
            why: why.clone(),
        });
    }
    match tokio::fs::metadata(&plan.base).await {
        Ok(m) if m.is_file() => {}
        Ok(_) | Err(_) => {
            return Err(DiskError::BaseMissing {
                path: plan.base.display().to_string(),
            });
        }
    }
    if let Some(dir) = plan.target.parent() {
        match tokio::fs::create_dir_all(dir).await {
            Ok(()) => {}
            // Not there, and not to be made: outside what is mounted writable for the agent
            // (its root file system is read-only in the chart).
            Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
                return Err(DiskError::DirMissing {
                    dir: dir.display().to_string(),
                });
            }
            Err(e) => return Err(io("create directory", dir)(e)),
        }
    }
    let format = image_format(qemu_img, &plan.base).await?;
    let partial = partial_path(&plan.target);
    let _ = tokio::fs::remove_file(&partial).await;
    let base = plan.base.to_string_lossy();
    let part = partial.to_string_lossy();
    let size = plan.size.map(|s| s.to_string());
    if let Some(chain) = &plan.restore {
        restore(qemu_img, plan, chain, &format, &partial).await?;
        record_owner(&plan.target, &plan.owner).await?;
        tokio::fs::rename(&partial, &plan.target)
            .await
            .map_err(io("rename into place", &plan.target))?;
        return Ok(Prepared::Created);
    }
    match plan.clone {
        CloneMode::Linked => {
            let mut args = vec!["create", "-q", "-f", "qcow2", "-F", &format, "-b", &base];
            args.push(&part);
            if let Some(s) = &size {
                args.push(s);
            }
            run(qemu_img, "create", &plan.target, &args).await?;
        }
        CloneMode::Full => {
            let args = ["convert", "-q", "-f", &format, "-O", "qcow2", &base, &part];
            run(qemu_img, "convert", &plan.target, &args).await?;
            if let Some(s) = &size {
                run(
                    qemu_img,
                    "resize",
                    &plan.target,
                    &["resize", "-q", &part, s],
                )
                .await?;
            }
        }
    }
    // What the desktop writes from now on is tracked from the start: the first backup holds
    // only that, never the base image (docs/design/backup.md).
    let bitmap = ["bitmap", "--add", &part, CREATION_CHECKPOINT];
    run(qemu_img, "bitmap", &plan.target, &bitmap).await?;
    record_owner(&plan.target, &plan.owner).await?;
    tokio::fs::rename(&partial, &plan.target)
        .await
        .map_err(io("rename into place", &plan.target))?;
    Ok(Prepared::Created)
}

/// The marker beside a disk made empty for a Cold move's copy: `<disk>.incoming`, holding the
/// DesktopMigration's UID until the domain moved in is settled here.
pub fn incoming_marker(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".incoming");
    target.with_file_name(name)
}

/// What the marker beside a disk made for a copy says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The DesktopMigration's UID.
    pub migration: String,
    /// The Desktop's UID, which the owner record beside the disk must name too.
    pub desktop: String,
}

/// The marker beside `target`, if there is one.
pub async fn incoming_of(target: &Path) -> Result<Option<Incoming>, DiskError> {
    match tokio::fs::read_to_string(incoming_marker(target)).await {
        Ok(text) => {
            let mut lines = text.lines().map(|l| l.trim().chars().take(64).collect());
            Ok(Some(Incoming {
                migration: lines.next().unwrap_or_default(),
                desktop: lines.next().unwrap_or_default(),
            }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read the incoming marker of", target)(e)),
    }
}

/// Makes the empty disk a Cold move's copy goes into: an overlay of `base` (`linked`), else a
/// disk standing alone of `base`'s size; `size` when the Desktop asks for one. The owner
/// record names `owner`, and the marker `migration`. Refused when any file is at `target`
/// already: nothing is ever written over.
pub async fn make_incoming(
    qemu_img: &str,
    base: &Path,
    target: &Path,
    linked: bool,
    size: Option<u64>,
    owner: &str,
    migration: &str,
) -> Result<(), DiskError> {
    crate::paths::check_clone(base, target).map_err(unsafe_path(target))?;
    if tokio::fs::try_exists(target)
        .await
        .map_err(io("look at", target))?
    {
        return Err(DiskError::Exists {
            path: target.display().to_string(),
        });
    }
    match tokio::fs::metadata(base).await {
        Ok(m) if m.is_file() => {}
        Ok(_) | Err(_) => {
            return Err(DiskError::BaseMissing {
                path: base.display().to_string(),
            });
        }
    }
    let format = image_format(qemu_img, base).await?;
    let partial = partial_path(target);
    let _ = tokio::fs::remove_file(&partial).await;
    let (b, part) = (base.to_string_lossy(), partial.to_string_lossy());
    let size = match (linked, size) {
        (_, Some(s)) => Some(s.to_string()),
        (true, None) => None,
        (false, None) => Some(virtual_size(qemu_img, base).await?.to_string()),
    };
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if linked {
        args.extend(["-F", &format, "-b", &b]);
    }
    args.push(&part);
    if let Some(s) = &size {
        args.push(s);
    }
    run(qemu_img, "create", target, &args).await?;
    record_owner(target, owner).await?;
    tokio::fs::rename(&partial, target)
        .await
        .map_err(io("rename into place", target))?;
    // Last: a marker says the disk is there, whole.
    let marker = incoming_marker(target);
    tokio::fs::write(&marker, format!("{migration}\n{owner}\n"))
        .await
        .map_err(io("write the incoming marker of", target))
}

/// The virtual size of the image at `path`, in bytes.
async fn virtual_size(qemu_img: &str, path: &Path) -> Result<u64, DiskError> {
    info(qemu_img, path)
        .await?
        .get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| tool("info", path, "no virtual-size in qemu-img info".into()))
}

/// Where a disk's previous content is kept while a restore over it waits for its desktop to
/// run on the restored one: `<disk>.pre-restore`, with its own owner record.
pub fn kept_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".pre-restore");
    target.with_file_name(name)
}

/// Replaces the disk of a stopped desktop with one built from `plan.restore`'s chain, checked
/// as [`prepare`] checks a restore, and keeps the old disk at [`kept_path`] (with its owner
/// record); returns that path. A kept disk there already is the last disk the desktop ran on
/// when `ran_since` is false (an earlier restore swapped and the desktop has not run since):
/// it stays, and the current one is replaced. With `ran_since` it is a leftover its removal
/// failed to take, and the restore is refused, naming it, rather than lose the current disk.
/// Nothing changes unless the new disk was built and checked, and the disk's name never
/// misses a disk: the old one is hard-linked to the kept name, then the new one renamed over
/// it. The caller makes sure no domain runs on the disk. Run again after a crash, it ends the
/// same.
pub async fn restore_over(
    qemu_img: &str,
    plan: &DiskPlan,
    ran_since: bool,
) -> Result<PathBuf, DiskError> {
    let shown = plan.target.display().to_string();
    let Some(chain) = &plan.restore else {
        return Err(DiskError::RestoreRefused {
            path: shown,
            message: "no backup chain recorded".into(),
        });
    };
    claim(&plan.target, &plan.owner, false).await?;
    let kept = kept_path(&plan.target);
    let keeping = tokio::fs::try_exists(&kept)
        .await
        .map_err(io("look at", &kept))?;
    if keeping {
        claim(&kept, &plan.owner, false).await?;
        if ran_since {
            return Err(DiskError::RestoreRefused {
                path: kept.display().to_string(),
                message: "a disk kept by an earlier restore is still there although the \
                          desktop ran since (its removal failed); move or delete it first"
                    .into(),
            });
        }
    }
    let format = image_format(qemu_img, &plan.base).await?;
    let partial = partial_path(&plan.target);
    let _ = tokio::fs::remove_file(&partial).await;
    if let Err(e) = restore(qemu_img, plan, chain, &format, &partial).await {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e);
    }
    let there = tokio::fs::try_exists(&plan.target)
        .await
        .map_err(io("look at", &plan.target))?;
    if there && !keeping {
        record_owner(&kept, &plan.owner).await?;
        tokio::fs::hard_link(&plan.target, &kept)
            .await
            .map_err(io("keep the old disk as", &kept))?;
    }
    tokio::fs::rename(&partial, &plan.target)
        .await
        .map_err(io("rename into place", &plan.target))?;
    Ok(kept)
}

/// Builds `partial` from the backup chain `layers` (root first): every file must still have
/// its recorded checksum and the chain must check clean; a linked clone gets only what the
/// chain holds above the base image, a full clone all of it; the result must read the same as
/// the chain. It carries no creation bitmap: its first backup is a full one.
///
/// `partial` is removed on any failure by the next attempt (`prepare` starts from scratch).
async fn restore(
    qemu_img: &str,
    plan: &DiskPlan,
    chain: &RestorePlan,
    base_format: &str,
    partial: &Path,
) -> Result<(), DiskError> {
    let refuse = |path: &Path, message: String| DiskError::RestoreRefused {
        path: path.display().to_string(),
        message,
    };
    let Some((top, _)) = chain.layers.last() else {
        return Err(refuse(&plan.target, "the backup chain is empty".into()));
    };
    let Some(dir) = &chain.dir else {
        return Err(refuse(top, "the pool sets no spec.backup.dir".into()));
    };
    for (file, _) in &chain.layers {
        deskvirt_crds::paths::check_joined(file).map_err(unsafe_path(file))?;
        if !is_within(file, dir) {
            return Err(refuse(
                file,
                format!("it is outside the pool's backup dir {}", dir.display()),
            ));
        }
    }
    for (file, want) in &chain.layers {
        let got = crate::backup_files::sha256(file, deadline("convert")).await?;
        if &got != want {
            return Err(refuse(
                file,
                format!("its checksum is {got}, the backup recorded {want}: the file changed"),
            ));
        }
    }
    let (top_s, part, base) = (
        top.to_string_lossy(),
        partial.to_string_lossy(),
        plan.base.to_string_lossy(),
    );
    run(
        qemu_img,
        "convert",
        top,
        &["check", "-U", "-q", "-f", "qcow2", &top_s],
    )
    .await
    .map_err(|e| refuse(top, format!("qemu-img check: {e}")))?;
    match plan.clone {
        // The newest file, then rebased (safely: every cluster the chain holds above the
        // base image is copied in) onto the base image. `convert -B` is not used: it copies
        // only the top file's own clusters.
        CloneMode::Linked => {
            let limit = deadline("convert");
            tokio::time::timeout(limit, tokio::fs::copy(top, partial))
                .await
                .map_err(|_| DiskError::Timeout {
                    op: "copy",
                    path: top.display().to_string(),
                    after: limit,
                })?
                .map_err(io("copy the newest backup file", top))?;
            let args = [
                "rebase",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &base,
                "-F",
                base_format,
                &part,
            ];
            run(qemu_img, "convert", &plan.target, &args).await?;
        }
        CloneMode::Full => {
            let args = [
                "convert", "-q", "-U", "-f", "qcow2", "-O", "qcow2", &top_s, &part,
            ];
            run(qemu_img, "convert", &plan.target, &args).await?;
        }
    }
    let compare = [
        "compare", "-U", "-q", "-f", "qcow2", "-F", "qcow2", &part, &top_s,
    ];
    run(qemu_img, "convert", &plan.target, &compare)
        .await
        .map_err(|e| {
            refuse(
                top,
                format!("the restored disk does not read as the backup: {e}"),
            )
        })?;
    Ok(())
}

/// Whether `path` is `dir` or inside it, by plain path components (no file-system access).
fn is_within(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// Fails with [`DiskError::DirMissing`] when the directory of `disk` is not visible to the
/// agent (not mounted into it): the disk may well be there on the host.
pub async fn dir_visible(disk: &Path) -> Result<(), DiskError> {
    let Some(dir) = disk.parent() else {
        return Ok(());
    };
    if tokio::fs::try_exists(dir)
        .await
        .map_err(io("look at", dir))?
    {
        return Ok(());
    }
    Err(DiskError::DirMissing {
        dir: dir.display().to_string(),
    })
}

/// Deletes the disk of the Desktop with UID `uid`, then its owner record. Refused for
/// anything inside `image_dir`, for any file in `in_use` (every disk and backing file of every
/// defined or running domain), and for a disk recorded for another Desktop (or, unless
/// `adopt`, for nobody); `Ok(false)` when it was already gone.
pub async fn remove(
    target: &Path,
    image_dir: &Path,
    in_use: &BTreeSet<String>,
    uid: &str,
    adopt: bool,
) -> Result<bool, DiskError> {
    let shown = target.display().to_string();
    if is_within(target, image_dir) {
        return Err(DiskError::Protected { path: shown });
    }
    crate::paths::check_removal(target, image_dir).map_err(unsafe_path(target))?;
    if in_use.contains(&shown) {
        return Err(DiskError::InUse { path: shown });
    }
    let exists = tokio::fs::try_exists(target)
        .await
        .map_err(io("look at", target))?;
    if !exists {
        if owner_of(target, uid).await? == Owner::Us {
            let _ = tokio::fs::remove_file(owner_path(target)).await;
        }
        return Ok(false);
    }
    claim(target, uid, adopt).await?;
    let _ = tokio::fs::remove_file(partial_path(target)).await;
    let removed = match tokio::fs::remove_file(target).await {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io("delete", target)(e)),
    };
    let _ = tokio::fs::remove_file(owner_path(target)).await;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b7e9a4c-1111-4222-8333-444455556666";
    const OTHER: &str = "9f2c1d3e-aaaa-4bbb-8ccc-ddddeeeeffff";

    use crate::images::testkit::Scratch;

    #[tokio::test]
    async fn a_disk_made_for_a_copy_is_empty_in_the_desktops_layout_and_never_over_a_file() {
        let dir = Scratch::new("incoming");
        std::fs::create_dir_all(dir.0.join("images")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(dir.0.join("disks")).unwrap_or_else(|e| panic!("{e}"));
        let base = dir.0.join("images/base.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("32M")
            .status()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(made.success());
        let linked = dir.0.join("disks/l.qcow2");
        let made = make_incoming("qemu-img", &base, &linked, true, None, UID, "m1").await;
        assert!(made.is_ok(), "{made:?}");
        let backing = crate::backup_files::backing_of("qemu-img", &linked).await;
        assert_eq!(backing.ok().flatten(), Some(base.clone()));
        let marker = incoming_of(&linked).await.ok().flatten();
        assert_eq!(
            marker.map(|m| (m.migration, m.desktop)),
            Some(("m1".to_string(), UID.to_string()))
        );
        assert_eq!(owner_of(&linked, UID).await.ok(), Some(Owner::Us));
        // A disk standing alone, of the image's size.
        let full = dir.0.join("disks/f.qcow2");
        let made = make_incoming("qemu-img", &base, &full, false, None, UID, "m2").await;
        assert!(made.is_ok(), "{made:?}");
        let alone = crate::backup_files::backing_of("qemu-img", &full).await;
        assert_eq!(alone.ok().flatten(), None);
        assert_eq!(virtual_size("qemu-img", &full).await.ok(), Some(32 << 20));
        // Never over a file.
        let taken = dir.0.join("disks/t.qcow2");
        std::fs::write(&taken, b"mine").unwrap_or_else(|e| panic!("{e}"));
        let refused = make_incoming("qemu-img", &base, &taken, true, None, OTHER, "m3").await;
        assert!(
            matches!(refused, Err(DiskError::Exists { .. })),
            "{refused:?}"
        );
        assert_eq!(std::fs::read(&taken).ok().as_deref(), Some(&b"mine"[..]));
        assert_eq!(incoming_of(&taken).await.ok().flatten(), None);
    }

    #[tokio::test]
    async fn a_new_disk_tracks_what_is_written_to_it_from_its_creation() {
        let dir = Scratch::new("bitmap");
        std::fs::create_dir_all(dir.0.join("images")).unwrap_or_else(|e| panic!("{e}"));
        let base = dir.0.join("images/base.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("16M")
            .status();
        assert!(
            made.as_ref().is_ok_and(|s| s.success()),
            "qemu-img create {made:?}"
        );
        for (clone, name) in [(CloneMode::Linked, "l.qcow2"), (CloneMode::Full, "f.qcow2")] {
            let plan = DiskPlan {
                base: base.clone(),
                target: dir.0.join("disks").join(name),
                clone,
                size: None,
                owner: UID.into(),
                adopt: false,
                restore: None,
                unverified: None,
            };
            let got = prepare("qemu-img", &plan, true).await;
            assert!(matches!(got, Ok(Prepared::Created)), "{got:?}");
            let info = std::process::Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(&plan.target)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let info: serde_json::Value = serde_json::from_str(&info).unwrap_or_default();
            let bitmaps = &info["format-specific"]["data"]["bitmaps"];
            assert_eq!(bitmaps[0]["name"], CREATION_CHECKPOINT, "{clone:?}: {info}");
        }
    }

    #[tokio::test]
    async fn a_disk_of_another_desktop_is_never_used_or_deleted() {
        let dir = Scratch::new("owner");
        let images = dir.0.join("images");
        let disk = dir.0.join("disks/d.qcow2");
        std::fs::create_dir_all(dir.0.join("disks")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&disk, b"other tenant's data").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(owner_path(&disk), OTHER).unwrap_or_else(|e| panic!("{e}"));
        let plan = DiskPlan {
            base: images.join("base.qcow2"),
            target: disk.clone(),
            clone: CloneMode::Linked,
            size: None,
            owner: UID.into(),
            adopt: true,
            restore: None,
            unverified: None,
        };
        for fresh in [false, true] {
            let got = prepare("qemu-img", &plan, fresh).await;
            assert!(
                matches!(&got, Err(DiskError::NotOurs { owner, .. }) if owner.contains(OTHER)),
                "{got:?}"
            );
        }
        let got = remove(&disk, &images, &BTreeSet::new(), UID, true).await;
        assert!(matches!(got, Err(DiskError::NotOurs { .. })), "{got:?}");
        assert_eq!(
            std::fs::read(&disk).unwrap_or_default(),
            b"other tenant's data"
        );
    }

    #[tokio::test]
    async fn an_unrecorded_disk_is_adopted_only_by_its_own_domain() {
        let dir = Scratch::new("adopt");
        let images = dir.0.join("images");
        let disk = dir.0.join("disks/legacy.qcow2");
        std::fs::create_dir_all(dir.0.join("disks")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&disk, b"x").unwrap_or_else(|e| panic!("{e}"));
        let mut plan = DiskPlan {
            base: images.join("base.qcow2"),
            target: disk.clone(),
            clone: CloneMode::Linked,
            size: None,
            owner: UID.into(),
            adopt: false,
            restore: None,
            unverified: None,
        };
        let got = prepare("qemu-img", &plan, false).await;
        assert!(matches!(got, Err(DiskError::NotOurs { .. })), "{got:?}");
        plan.adopt = true;
        assert!(matches!(
            prepare("qemu-img", &plan, false).await,
            Ok(Prepared::Existing)
        ));
        assert_eq!(owner_of(&disk, UID).await.ok(), Some(Owner::Us));
        let got = remove(&disk, &images, &BTreeSet::new(), UID, false).await;
        assert!(matches!(got, Ok(true)), "{got:?}");
        assert!(!owner_path(&disk).exists() && !disk.exists());
    }

    #[test]
    fn a_copy_gets_the_long_deadline_and_metadata_calls_the_short_one() {
        // The process's deadlines, set once at startup (longer than the defaults, so no other
        // test's qemu-img run is cut short by them).
        set_deadlines(QemuImgDeadlines {
            quick: Duration::from_secs(61),
            copy: Duration::from_secs(1801),
        });
        assert_eq!(deadline("convert"), Duration::from_secs(1801));
        for op in ["info", "create", "resize", "bitmap"] {
            assert_eq!(deadline(op), Duration::from_secs(61), "{op}");
        }
    }

    #[tokio::test]
    async fn a_hanging_qemu_img_is_killed_at_its_deadline() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = Scratch::new("hang");
        let tool = dir.0.join("qemu-img");
        let pid_file = dir.0.join("pid");
        std::fs::write(
            &tool,
            format!(
                "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
                pid_file.display()
            ),
        )?;
        std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let started = std::time::Instant::now();
        let err = run_within(
            &tool.to_string_lossy(),
            "info",
            Path::new("/x.qcow2"),
            &[],
            Duration::from_millis(500),
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        let Err(e) = err else {
            panic!("a hanging qemu-img succeeded")
        };
        assert_eq!(e.reason(), "DiskToolTimeout");
        assert!(e.is_transient());
        assert!(e.to_string().contains("did not finish within 0.5s"), "{e}");
        // The child is gone (killed and reaped), not left sleeping.
        let pid = std::fs::read_to_string(&pid_file)?.trim().to_string();
        let proc = PathBuf::from(format!("/proc/{pid}"));
        for _ in 0..50 {
            let state = std::fs::read_to_string(proc.join("stat")).unwrap_or_default();
            if state.is_empty() || state.contains(") Z ") {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("qemu-img {pid} still runs after its deadline");
    }

    #[test]
    fn partial_is_beside_the_target() {
        assert_eq!(
            partial_path(Path::new("/d/ns--a.qcow2")),
            PathBuf::from("/d/ns--a.qcow2.partial")
        );
    }

    #[tokio::test]
    async fn base_images_and_disks_in_use_are_never_deleted() {
        let images = Path::new("/var/lib/deskvirt/images");
        let none = BTreeSet::new();
        let base = images.join("debian.qcow2");
        assert!(matches!(
            remove(&base, images, &none, UID, true).await,
            Err(DiskError::Protected { .. })
        ));
        let disk = Path::new("/nonexistent-deskvirt/disks/ns--a.qcow2");
        let used: BTreeSet<String> = [disk.display().to_string()].into();
        assert!(matches!(
            remove(disk, images, &used, UID, true).await,
            Err(DiskError::InUse { .. })
        ));
        assert!(matches!(
            remove(disk, images, &none, UID, true).await,
            Ok(false)
        ));
    }

    #[tokio::test]
    async fn a_missing_base_image_is_a_clear_error() {
        let plan = DiskPlan {
            base: PathBuf::from("/nonexistent-deskvirt/images/none.qcow2"),
            target: PathBuf::from("/nonexistent-deskvirt/disks/x.qcow2"),
            clone: CloneMode::Linked,
            size: None,
            owner: UID.into(),
            adopt: false,
            restore: None,
            unverified: None,
        };
        let err = prepare("qemu-img", &plan, false).await;
        assert!(
            matches!(&err, Err(DiskError::BaseMissing { path }) if path.contains("none.qcow2")),
            "{err:?}"
        );
        assert!(err.is_err_and(|e| !e.is_transient()));
    }
}
