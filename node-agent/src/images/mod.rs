//! The host's copies of DesktopImages: which versions this host holds, and where each stands.
//! Each round (every 2 s, and at once when a DesktopImage changes or a copy task ends) reads the DesktopImages (a cluster-wide watch), this host's
//! DomainNode and its pool from the caches, picks the versions to hold ([`targets`]), moves
//! each copy on ([`copies`]: a fetch over HTTP(S) checked against the SHA-256 and by
//! `qemu-img`, [`fetch`]), and reports them in `DomainNode.status.images` ([`report`]).
//! Files of images no longer targeted stay where they are (removing them is a later change).
//!
//! Other code asks [`Holdings`] (kept in `DesktopContext::images`, updated every round)
//! whether this host holds a verified copy of a version before it clones from it:
//! [`Holdings::ready_copy`], or [`ready_copy`] over a [`HostReport`]. A copy that is not
//! Ready (still copying, failed, damaged) is never a base for a clone.

pub mod capture;
mod check;
mod copies;
mod error;
pub mod fetch;
#[cfg(test)]
mod fetch_tests;
mod http;
mod report;
pub mod seal;
mod sidecar;
pub mod targets;
#[cfg(test)]
pub(crate) mod testkit;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deskvirt_crds::DesktopImage;
use deskvirt_crds::image::{CopyPhase, HostImage, image_file};
use kube::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use tokio::sync::{Mutex, Notify, watch};
use tokio::time::{Instant, MissedTickBehavior};

pub use error::{CopyError, REASONS, Reason};

use crate::agent::error_chain;
use crate::desktops::DesktopContext;

/// How often the copies are looked at and reported.
pub const ROUND: Duration = Duration::from_secs(2);
/// Deadline of a connection (TCP and TLS) to an image's server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of a response head from an image's server.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest silence of an image's server in the middle of a body before the fetch fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the image copies.
#[derive(Debug, Clone)]
pub struct ImagesConfig {
    /// The images namespace: only its images may be fetched over HTTP.
    pub namespace: String,
    /// Copies (fetches or checks) at once.
    pub copies: usize,
    /// Wait before a failed copy is tried again, doubling up to 10 minutes.
    pub retry: Duration,
    /// Deadline of one `qemu-img info`.
    pub qemu_img_timeout: Duration,
    /// Deadline of one whole download.
    pub fetch_timeout: Duration,
    /// Largest image file taken, in bytes.
    pub max_bytes: u64,
    /// Free bytes the image directory's file system keeps.
    pub reserve_bytes: u64,
    /// How captures of template desktops run.
    pub capture: capture::CaptureSettings,
}

/// What this host holds, as last reported: the pool's image directory and the report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostReport {
    /// The pool's `storage.imageDir` (`None`: no pool, nothing held).
    pub image_dir: Option<PathBuf>,
    /// Every copy, as in `DomainNode.status.images`.
    pub images: Vec<HostImage>,
}

/// A verified copy a desktop may be cloned from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyCopy {
    /// Its absolute path (`<imageDir>/managed/<uid>/v<version>.qcow2`).
    pub path: PathBuf,
    /// Its SHA-256 as this host computed it.
    pub sha256: String,
    /// Bytes of the file.
    pub bytes: Option<u64>,
    /// The disk size it holds.
    pub virtual_bytes: Option<u64>,
}

/// The verified copy of version `version` of the image with UID `uid` in `report`, if this
/// host holds one (Ready, with its sum); `None` otherwise.
pub fn ready_copy(report: &HostReport, uid: &str, version: u32) -> Option<ReadyCopy> {
    let dir = report.image_dir.as_ref()?;
    let held = report
        .images
        .iter()
        .find(|h| h.uid == uid && h.version == version && h.phase == CopyPhase::Ready)?;
    Some(ReadyCopy {
        path: dir.join(image_file(&held.uid, held.version)),
        sha256: held.sha256.clone()?,
        bytes: held.bytes,
        virtual_bytes: held.virtual_bytes,
    })
}

/// One lock per desktop disk (by Desktop UID), shared by the copies and the desktops: a
/// capture holds its template's for its whole run, and a desktop is started only while its
/// own is free, so a template never starts under a capture.
#[derive(Clone, Default)]
pub struct DiskLocks(Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<Mutex<()>>>>>);

impl DiskLocks {
    /// The lock of the disk of Desktop `uid`.
    pub fn lock(&self, uid: &str) -> Arc<Mutex<()>> {
        // A poisoned map (a panic while it was held) is still the map: never a lock of its own.
        let mut all = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|_, l| Arc::strong_count(l) > 1 || l.try_lock().is_err());
        all.entry(uid.to_string()).or_default().clone()
    }
}

/// A shared handle to this host's latest [`HostReport`] (and to the DesktopImage cache, once
/// the image loop runs); clones share it.
#[derive(Clone)]
pub struct Holdings(Arc<Shared>);

struct Shared {
    report: watch::Sender<HostReport>,
    images: OnceLock<Store<DesktopImage>>,
    locks: DiskLocks,
}

impl Default for Holdings {
    fn default() -> Self {
        Self(Arc::new(Shared {
            report: watch::Sender::new(HostReport::default()),
            images: OnceLock::new(),
            locks: DiskLocks::default(),
        }))
    }
}

impl Holdings {
    /// The desktops' disk locks.
    pub fn disk_locks(&self) -> DiskLocks {
        self.0.locks.clone()
    }

    /// The latest report.
    pub fn current(&self) -> HostReport {
        self.0.report.borrow().clone()
    }

    /// [`ready_copy`] over the latest report.
    pub fn ready_copy(&self, uid: &str, version: u32) -> Option<ReadyCopy> {
        ready_copy(&self.0.report.borrow(), uid, version)
    }

    /// A receiver told of every new report (to wait for a copy to become Ready).
    pub fn subscribe(&self) -> watch::Receiver<HostReport> {
        self.0.report.subscribe()
    }

    /// The DesktopImages of the cluster, once the image loop watches them.
    pub fn desktop_images(&self) -> Option<Store<DesktopImage>> {
        self.0.images.get().cloned()
    }

    /// Publishes `report` (receivers are told only of a change).
    pub fn publish(&self, report: HostReport) {
        self.0.report.send_if_modified(|current| {
            let changed = *current != report;
            if changed {
                *current = report;
            }
            changed
        });
    }

    fn set_images(&self, store: Store<DesktopImage>) {
        let _ = self.0.images.set(store);
    }
}

/// Watches the DesktopImages and keeps this host's copies and their report until the future
/// is dropped (which stops the copies running; their unfinished files are removed or
/// replaced by the next attempt).
pub async fn run<H>(ctx: Arc<DesktopContext<H>>, config: ImagesConfig) {
    let api: Api<DesktopImage> = Api::all(ctx.client.clone());
    // A change of any DesktopImage (a new version cut, a pool added) starts a round at once.
    let changed = Arc::new(Notify::new());
    let touched = changed.clone();
    let (store, fill) =
        deskvirt_runtime::cache::reflect_touching(api, watcher::Config::default(), move |_, _| {
            touched.notify_one()
        });
    ctx.images.set_images(store.clone());
    let http = match http::client(CONNECT_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot configure TLS; no DesktopImage is copied onto this host");
            return;
        }
    };
    let settings = fetch::Settings {
        qemu_img: ctx.config.qemu_img.clone(),
        qemu_img_timeout: config.qemu_img_timeout,
        head_timeout: HEAD_TIMEOUT,
        read_timeout: READ_TIMEOUT,
        fetch_timeout: config.fetch_timeout,
        max_bytes: config.max_bytes,
        reserve_bytes: config.reserve_bytes,
    };
    let mut copies = copies::Copies::new(
        http,
        settings,
        config.copies,
        config.retry,
        ctx.metrics.clone(),
    );
    copies.set_capture(ctx.images.disk_locks(), config.capture.clone());
    let rounds = async move {
        if store.wait_until_ready().await.is_err() {
            return;
        }
        tracing::info!("image copies started");
        let mut state = Rounds {
            copies,
            warned: HashSet::new(),
            written: None,
        };
        let ended = state.copies.ended();
        let mut tick = tokio::time::interval(ROUND);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = changed.notified() => {}
                _ = ended.notified() => {}
            }
            state.round(&ctx, &store, &config).await;
            tick.reset();
        }
    };
    tokio::join!(fill, rounds);
}

/// The disk of Desktop `uid` when it is bound to this host: `<diskDir>/<domain name>.qcow2`.
fn template_disk<H>(ctx: &DesktopContext<H>, uid: &str, disk_dir: Option<&str>) -> Option<PathBuf> {
    let dir = disk_dir?;
    let desktops = ctx.desktops()?;
    let all = desktops.state();
    let d = all
        .iter()
        .find(|d| d.metadata.uid.as_deref() == Some(uid))?;
    let here = d.status.as_ref()?.node.as_deref() == Some(ctx.config.node_name.as_str());
    if !here {
        return None;
    }
    let ns = d.metadata.namespace.as_deref()?;
    let name = d.metadata.name.as_deref()?;
    let domain = crate::domain::names::domain_name(ns, name, uid);
    Some(PathBuf::from(crate::domain::names::disk_path(dir, &domain)))
}

/// What the loop keeps between rounds.
struct Rounds {
    copies: copies::Copies,
    /// UIDs of the images already warned about (http source outside the images namespace),
    /// and pools whose image directory is unusable.
    warned: HashSet<String>,
    written: Option<report::Written>,
}

impl Rounds {
    async fn round<H>(
        &mut self,
        ctx: &DesktopContext<H>,
        store: &Store<DesktopImage>,
        config: &ImagesConfig,
    ) {
        let Some(node) = ctx.domain_node() else {
            return;
        };
        let status = node.status.clone().unwrap_or_default();
        let pool = status
            .pool
            .as_deref()
            .and_then(|name| Some((name, ctx.pool(name)?)));
        let disk_dir = pool.as_ref().map(|(_, p)| p.spec.storage.disk_dir.clone());
        let (dir, selection) = match pool {
            Some((name, pool)) => {
                let dir = &pool.spec.storage.image_dir;
                match deskvirt_crds::paths::check_dir(dir) {
                    Ok(()) => {
                        let all = store.state();
                        let chosen = targets::select(
                            all.iter().map(|a| a.as_ref()),
                            name,
                            &config.namespace,
                            &ctx.config.node_name,
                            pool.spec.storage.shared,
                        );
                        (Some(PathBuf::from(dir)), chosen)
                    }
                    Err(e) => {
                        if self.warned.insert(format!("pool/{name}")) {
                            tracing::warn!(pool = name, error = %e, "the pool's image directory is unusable; no image is copied");
                        }
                        (None, targets::Selection::default())
                    }
                }
            }
            None => (None, targets::Selection::default()),
        };
        for (image, uid) in &selection.elsewhere {
            if self.warned.insert(uid.clone()) {
                tracing::warn!(%image, namespace = %config.namespace, "ignoring a DesktopImage with an http source outside the images namespace");
            }
        }
        let mut targets = selection.targets;
        for t in targets.iter_mut() {
            let Some(c) = t.capture.as_mut() else {
                continue;
            };
            match template_disk(ctx, &c.desktop_uid, disk_dir.as_deref()) {
                Some(disk) => c.disk = disk,
                None => {
                    t.capture = None;
                    t.unavailable =
                        Some("the template Desktop is not bound to this host".to_string());
                }
            }
        }
        if dir.is_some()
            && let Some(desktops) = ctx.desktops()
        {
            let bound = desktops.state();
            let node = &ctx.config.node_name;
            let kept = targets::pinned(bound.iter().map(|d| d.as_ref()), node, &targets);
            targets.extend(kept);
        }
        self.copies
            .step(dir.as_deref(), &targets, &status.images)
            .await;
        let images = self.copies.report();
        ctx.images.publish(HostReport {
            image_dir: dir,
            images: images.clone(),
        });
        let now = Instant::now();
        if !report::due(self.written.as_ref(), &images, &status.images, now) {
            if self.written.is_none() {
                self.written = Some(report::Written {
                    report: images,
                    at: now,
                });
            }
            return;
        }
        match report::write(&ctx.client, &ctx.config.node_name, &images).await {
            Ok(()) => {
                self.written = Some(report::Written {
                    report: images,
                    at: now,
                })
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot report this host's image copies")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(uid: &str, version: u32, phase: CopyPhase) -> HostImage {
        HostImage {
            sha256: (phase == CopyPhase::Ready).then(|| "ab".repeat(32)),
            bytes: Some(10),
            virtual_bytes: Some(20),
            ..HostImage::new(uid, "deskvirt-images/debian", version, phase)
        }
    }

    #[test]
    fn only_a_ready_copy_of_that_version_is_a_base() {
        let report = HostReport {
            image_dir: Some(PathBuf::from("/var/lib/deskvirt/images")),
            images: vec![
                held("u1", 2, CopyPhase::Ready),
                held("u2", 1, CopyPhase::Copying),
                held("u3", 1, CopyPhase::Failed),
            ],
        };
        assert_eq!(
            ready_copy(&report, "u1", 2),
            Some(ReadyCopy {
                path: PathBuf::from("/var/lib/deskvirt/images/managed/u1/v2.qcow2"),
                sha256: "ab".repeat(32),
                bytes: Some(10),
                virtual_bytes: Some(20),
            })
        );
        assert_eq!(ready_copy(&report, "u1", 1), None);
        assert_eq!(ready_copy(&report, "u2", 1), None);
        assert_eq!(ready_copy(&report, "u3", 1), None);
        assert_eq!(ready_copy(&report, "u4", 1), None);
        let no_pool = HostReport {
            image_dir: None,
            ..report.clone()
        };
        assert_eq!(ready_copy(&no_pool, "u1", 2), None);

        let holdings = Holdings::default();
        let mut seen = holdings.subscribe();
        assert_eq!(holdings.ready_copy("u1", 2), None);
        holdings.publish(report.clone());
        assert!(seen.has_changed().unwrap_or(false));
        seen.mark_unchanged();
        assert!(holdings.ready_copy("u1", 2).is_some());
        holdings.publish(report);
        assert!(!seen.has_changed().unwrap_or(true), "no change, no news");
    }
}
