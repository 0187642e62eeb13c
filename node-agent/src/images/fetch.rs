//! One copy of one image version onto this host, and the look at a file already in place.
//! A fetch streams the source into `v<N>.qcow2.partial` through SHA-256, refuses other sums
//! and files that are not standalone qcow2 images (deleting what it fetched), makes the file
//! read-only, records it (`v<N>.qcow2.verified`) and hard-links it to `v<N>.qcow2`, which fails
//! when that exists: a version's file is never overwritten. A file in place is taken on its
//! record alone when that matches; without one it is read again, never trusted.
//! Nothing here knows of Kubernetes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;

use super::error::{CopyError, io};
use super::http::HttpClient;
use super::sidecar::{self, Sidecar};

/// One image version to copy, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// UID of the DesktopImage (checked to be a plain name).
    pub uid: String,
    /// The version.
    pub version: u32,
    /// Where its bytes come from.
    pub url: String,
    /// The SHA-256 they must have, lowercase hex.
    pub sha256: String,
    /// The pool's `storage.imageDir`.
    pub image_dir: PathBuf,
}

impl CopySpec {
    /// `<imageDir>/managed/<uid>`.
    pub fn dir(&self) -> PathBuf {
        self.image_dir.join("managed").join(&self.uid)
    }

    /// `<imageDir>/managed/<uid>/v<N>.qcow2`.
    pub fn final_path(&self) -> PathBuf {
        self.image_dir
            .join(deskvirt_crds::image::image_file(&self.uid, self.version))
    }

    /// The file being fetched: named after this host, so hosts sharing an image directory
    /// (a pool with shared storage) never write, check or link each other's unfinished file;
    /// the first to link wins and the others find its file in place.
    pub fn partial_path(&self) -> PathBuf {
        sidecar::with_suffix(
            &self.final_path(),
            &format!(".partial.{}", sidecar::host_tag()),
        )
    }

    /// The record of the verified file.
    pub fn sidecar_path(&self) -> PathBuf {
        sidecar::path(&self.final_path())
    }
}

/// How long each step may take, and the tool that checks images.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `qemu-img` program.
    pub qemu_img: String,
    /// Deadline of one `qemu-img info`.
    pub qemu_img_timeout: Duration,
    /// Deadline of each response head.
    pub head_timeout: Duration,
    /// Longest wait for more bytes of the body: a server silent that long is given up.
    pub read_timeout: Duration,
    /// Deadline of a whole download (a server that sends a byte now and then never ends it).
    pub fetch_timeout: Duration,
    /// Largest file taken, in bytes: a longer body (or `Content-Length`) fails the copy.
    pub max_bytes: u64,
    /// Bytes the image directory's file system keeps free: a file that would eat into them is
    /// not fetched (desktops' disks live there too, or beside it).
    pub reserve_bytes: u64,
}

/// A verified copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    /// Bytes of the file.
    pub bytes: u64,
    /// The disk size the image holds.
    pub virtual_bytes: u64,
}

/// How far a copy (or a check of a file in place) is, shared with the loop that reports it.
#[derive(Debug, Default)]
pub struct Progress {
    started: AtomicBool,
    done: AtomicU64,
    total: AtomicU64,
    fetched: Option<Counter>,
}

impl Progress {
    /// Progress of a fetch whose bytes count into `fetched`.
    pub fn fetching(fetched: Counter) -> Self {
        Self {
            fetched: Some(fetched),
            ..Self::default()
        }
    }

    /// Marks the copy as running (it holds a copy slot).
    pub fn start(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// Whether the copy runs (or waits for a slot).
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    pub(super) fn expect(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    pub(super) fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        if let Some(c) = &self.fetched {
            c.inc_by(n);
        }
    }

    /// Bytes so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Percent done, below 100 until the copy ends; 0 while the size is unknown.
    pub fn percent(&self) -> u8 {
        let total = self.total.load(Ordering::Relaxed);
        if total == 0 {
            return 0;
        }
        let p = self.done().saturating_mul(100) / total;
        u8::try_from(p.min(99)).unwrap_or(99)
    }
}

/// Fetches the version `spec` names into its place, unless a file is there already
/// ([`CopyError::Exists`]). Whatever fails, nothing is left but the directory.
pub async fn fetch(
    client: &HttpClient,
    spec: &CopySpec,
    settings: &Settings,
    progress: &Progress,
) -> Result<Verified, CopyError> {
    fetch_to(client, spec, settings, progress, false).await
}

/// Fetches the version again over a file in place that [`verify`] found damaged: the one
/// time a file is put over an image file, with the same bytes it should have had (checked
/// against the same sum, for the same image and version). Domains running on the damaged
/// file keep it open; new clones get the repaired one.
pub async fn repair(
    client: &HttpClient,
    spec: &CopySpec,
    settings: &Settings,
    progress: &Progress,
) -> Result<Verified, CopyError> {
    fetch_to(client, spec, settings, progress, true).await
}

async fn fetch_to(
    client: &HttpClient,
    spec: &CopySpec,
    settings: &Settings,
    progress: &Progress,
    over: bool,
) -> Result<Verified, CopyError> {
    let target = spec.final_path();
    if spec.url.is_empty() {
        return Err(CopyError::Fetch(format!(
            "version {} is no longer the image's current one and this host holds no copy of \
             it: its source is gone",
            spec.version
        )));
    }
    if !over && exists(&target).await? {
        return Err(CopyError::Exists {
            path: target.display().to_string(),
        });
    }
    let dir = spec.dir();
    make_dir(&dir).await?;
    let partial = spec.partial_path();
    remove_if_present(&partial).await?;
    let placed = fetch_and_place(client, spec, settings, progress, &partial, over).await;
    if placed.is_err()
        && let Err(e) = remove_if_present(&partial).await
    {
        tracing::warn!(file = %partial.display(), error = %crate::agent::error_chain(&e), "cannot remove an unfinished image file");
    }
    placed
}

/// The body of [`fetch`] once the directory is made; leaves `partial` behind on failure.
async fn fetch_and_place(
    client: &HttpClient,
    spec: &CopySpec,
    settings: &Settings,
    progress: &Progress,
    partial: &Path,
    over: bool,
) -> Result<Verified, CopyError> {
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(partial)
        .await
        .map_err(io("create", partial))?;
    let (sha256, bytes) = tokio::time::timeout(
        settings.fetch_timeout,
        download(client, spec, settings, progress, &mut file, partial),
    )
    .await
    .map_err(|_| CopyError::TimedOut(settings.fetch_timeout, progress.done()))??;
    if sha256 != spec.sha256 {
        return Err(CopyError::ChecksumMismatch {
            expected: spec.sha256.clone(),
            actual: sha256,
        });
    }
    finish(spec, settings, file, partial, sha256, bytes, over).await
}

/// The end of every copy, once `partial` holds the version's bytes (`sha256` and `bytes`
/// counted as they were written): checks that it is a standalone qcow2, makes it read-only,
/// syncs it, records it and puts it in place (a repair, `over`, renames it over the damaged
/// file; otherwise it is linked, never over a file). Leaves `partial` behind on failure.
pub(super) async fn finish(
    spec: &CopySpec,
    settings: &Settings,
    file: tokio::fs::File,
    partial: &Path,
    sha256: String,
    bytes: u64,
    over: bool,
) -> Result<Verified, CopyError> {
    let image = super::check::qcow2(&settings.qemu_img, partial, settings.qemu_img_timeout).await?;
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o444))
        .await
        .map_err(io("make read-only", partial))?;
    file.sync_all().await.map_err(io("sync", partial))?;
    let stamp = sidecar::Stamp::of(&file.metadata().await.map_err(io("look at", partial))?);
    drop(file);
    let verified = Verified {
        sha256,
        bytes,
        virtual_bytes: image.virtual_bytes,
    };
    if over {
        tokio::fs::rename(partial, spec.final_path())
            .await
            .map_err(io("put the repaired image in place of", &spec.final_path()))?;
    } else {
        // A file another attempt (another host sharing the directory) put in place first keeps
        // its record: nothing of it is touched.
        place(partial, &spec.final_path()).await?;
    }
    // Recorded once in place (the same inode, so the same stamp): until then, or if this
    // write fails, the file is simply read again.
    sidecar::write(&spec.sidecar_path(), &record(spec, &verified, stamp)).await?;
    remove_if_present(partial).await?;
    sync_dir(&spec.dir()).await?;
    Ok(verified)
}

/// Streams the body of the source into `file`; its SHA-256 (hex) and length.
async fn download(
    client: &HttpClient,
    spec: &CopySpec,
    settings: &Settings,
    progress: &Progress,
    file: &mut tokio::fs::File,
    path: &Path,
) -> Result<(String, u64), CopyError> {
    let response = super::http::get(client, &spec.url, settings.head_timeout).await?;
    let length = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = length
        && length > settings.max_bytes
    {
        return Err(CopyError::TooLarge {
            max: settings.max_bytes,
            what: format!("the server offers {length}"),
        });
    }
    room(&spec.dir(), length.unwrap_or(0), settings.reserve_bytes)?;
    progress.expect(length.unwrap_or(0));
    let mut body = response.into_body();
    let mut checked = 0u64;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut bytes = 0u64;
    loop {
        let frame = tokio::time::timeout(settings.read_timeout, body.frame())
            .await
            .map_err(|_| {
                CopyError::Fetch(format!(
                    "no data for {}s after {bytes} bytes",
                    settings.read_timeout.as_secs_f32()
                ))
            })?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| CopyError::Fetch(crate::agent::error_chain(&e)))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        digest.update(&data);
        out.write_all(&data).await.map_err(io("write", path))?;
        let n = data.len() as u64;
        bytes += n;
        progress.add(n);
        if bytes > settings.max_bytes {
            return Err(CopyError::TooLarge {
                max: settings.max_bytes,
                what: format!("{bytes} bytes were sent"),
            });
        }
        // Without a length told up front, the free space is looked at as the file grows.
        if length.is_none() && bytes - checked >= ROOM_EVERY {
            room(&spec.dir(), 0, settings.reserve_bytes)?;
            checked = bytes;
        }
    }
    out.flush().await.map_err(io("write", path))?;
    if let Some(length) = length
        && length != bytes
    {
        return Err(CopyError::Fetch(format!(
            "the server sent {bytes} of {length} bytes"
        )));
    }
    Ok((hex(digest.finish().as_ref()), bytes))
}

/// How many bytes of a body of unknown length pass between two looks at the free space.
const ROOM_EVERY: u64 = 256 << 20;

/// Whether `dir`'s file system has room for `needed` more bytes and still `reserve` free.
pub(super) fn room(dir: &Path, needed: u64, reserve: u64) -> Result<(), CopyError> {
    let fs = rustix::fs::statvfs(dir).map_err(|e| CopyError::Io {
        op: "look at the free space of",
        path: dir.display().to_string(),
        source: e.into(),
    })?;
    let free = fs.f_bavail.saturating_mul(fs.f_frsize);
    if free < needed.saturating_add(reserve) {
        return Err(CopyError::NoRoom {
            path: dir.display().to_string(),
            needed,
            free,
            reserve,
        });
    }
    Ok(())
}

/// Links `partial` to `target`, which must not exist: a file in place is never overwritten.
async fn place(partial: &Path, target: &Path) -> Result<(), CopyError> {
    match tokio::fs::hard_link(partial, target).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(CopyError::Exists {
            path: target.display().to_string(),
        }),
        Err(e) => Err(io("link the image into", target)(e)),
    }
}

/// What is at a version's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InPlace {
    /// No file.
    Missing,
    /// A file whose record names this image, version, sum and size.
    Verified(Verified),
    /// A file without such a record: to be read again.
    Unverified,
}

/// Looks at the place of the version `spec` names, without reading the file.
pub async fn in_place(spec: &CopySpec) -> Result<InPlace, CopyError> {
    let target = spec.final_path();
    let meta = match tokio::fs::metadata(&target).await {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(InPlace::Missing),
        Err(e) => return Err(io("look at", &target)(e)),
    };
    let Some(record) = sidecar::read(&spec.sidecar_path()).await else {
        return Ok(InPlace::Unverified);
    };
    // A write into the file (even one that keeps its size) or a file put in its place changes
    // its stamp: it is read again, and a damaged one is fetched again.
    let matches = meta.is_file()
        && record.uid == spec.uid
        && record.version == spec.version
        // A capture's sum is the record's own until the status names it.
        && (spec.sha256.is_empty() || record.sha256 == spec.sha256)
        && record.bytes == meta.len()
        && record.stamp == Some(sidecar::Stamp::of(&meta));
    Ok(if matches {
        InPlace::Verified(Verified {
            sha256: record.sha256,
            bytes: record.bytes,
            virtual_bytes: record.virtual_bytes,
        })
    } else {
        InPlace::Unverified
    })
}

/// Reads the file in place again: with the version's sum and a good image, it is recorded and
/// verified; with another sum it is [`CopyError::Damaged`]. It is never changed nor deleted
/// here (repairing it is for a later change).
pub async fn verify(
    spec: &CopySpec,
    settings: &Settings,
    progress: Arc<Progress>,
) -> Result<Verified, CopyError> {
    let target = spec.final_path();
    let before = tokio::fs::metadata(&target)
        .await
        .map_err(io("look at", &target))?;
    let (sha256, bytes) = hash_file(&target, progress).await?;
    if sha256 != spec.sha256 {
        return Err(CopyError::Damaged {
            expected: spec.sha256.clone(),
            actual: sha256,
        });
    }
    let image = super::check::qcow2(&settings.qemu_img, &target, settings.qemu_img_timeout).await?;
    let verified = Verified {
        sha256,
        bytes,
        virtual_bytes: image.virtual_bytes,
    };
    sidecar::write(
        &spec.sidecar_path(),
        &record(spec, &verified, sidecar::Stamp::of(&before)),
    )
    .await?;
    sync_dir(&spec.dir()).await?;
    Ok(verified)
}

/// SHA-256 (hex) and length of `path`, read in a blocking thread.
pub(super) async fn hash_file(
    path: &Path,
    progress: Arc<Progress>,
) -> Result<(String, u64), CopyError> {
    let owned = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
        use std::io::Read;
        let mut f = std::fs::File::open(&owned)?;
        progress.expect(f.metadata()?.len());
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let chunk = buf.get(..n).unwrap_or_default();
            digest.update(chunk);
            bytes += n as u64;
            progress.add(n as u64);
        }
        Ok((hex(digest.finish().as_ref()), bytes))
    })
    .await
    .map_err(|e| CopyError::Stopped(e.to_string()))?;
    read.map_err(io("read", path))
}

fn record(spec: &CopySpec, v: &Verified, stamp: sidecar::Stamp) -> Sidecar {
    Sidecar {
        uid: spec.uid.clone(),
        version: spec.version,
        sha256: v.sha256.clone(),
        bytes: v.bytes,
        virtual_bytes: v.virtual_bytes,
        stamp: Some(stamp),
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub(super) async fn exists(path: &Path) -> Result<bool, CopyError> {
    tokio::fs::try_exists(path)
        .await
        .map_err(io("look at", path))
}

/// Makes `dir` and its parents, mode 0755.
pub(super) async fn make_dir(dir: &Path) -> Result<(), CopyError> {
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(true).mode(0o755);
    builder
        .create(dir)
        .await
        .map_err(io("create the directory", dir))
}

async fn remove_if_present(path: &Path) -> Result<(), CopyError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", path)(e)),
    }
}

/// Makes the names in `dir` durable.
async fn sync_dir(dir: &Path) -> Result<(), CopyError> {
    let d = tokio::fs::File::open(dir)
        .await
        .map_err(io("open the directory", dir))?;
    d.sync_all().await.map_err(io("sync the directory", dir))
}
