//! Keeps each image version this host should hold moving towards a verified copy: looks at
//! its place every round, starts a fetch (nothing there) or a check (a file without a record)
//! in a spawned task, at most `copies` at once, retries a failed one after a backoff (doubling
//! from `--image-retry` up to 10 minutes), and says where each stands as the host reports it
//! (`HostImage`), with `since` kept from the last phase change (also across a restart, from
//! the report in the DomainNode). Nothing here knows of Kubernetes but the report's type.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deskvirt_crds::image::{CopyPhase, HostImage};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::DiskLocks;
use super::capture::{self, CaptureFrom, CaptureSettings};
use super::error::{CopyError, Reason};
use super::fetch::{self, CopySpec, InPlace, Progress, Settings, Verified};
use super::http::HttpClient;
use super::targets::Target;
use crate::agent::error_chain;
use crate::hypervisor::Backoff;
use crate::metrics::Metrics;

/// The longest wait before a failed copy is tried again.
pub const MAX_RETRY: Duration = Duration::from_secs(600);
/// Wait before a capture whose disk was still held by a process is tried again.
pub const BUSY_RETRY: Duration = Duration::from_secs(2);
/// Longest message reported (the CRD's bound).
const MAX_MESSAGE: usize = 1024;

/// The copies of this host, by image UID.
pub struct Copies {
    run: Runner,
    entries: BTreeMap<(String, u32), Entry>,
}

/// What every copy task shares.
struct Runner {
    http: HttpClient,
    settings: Arc<Settings>,
    slots: Arc<Semaphore>,
    width: usize,
    backoff: Backoff,
    metrics: Metrics,
    /// Told when a copy task ends, so that its answer is taken (and reported) at once.
    ended: Arc<Notify>,
    /// The desktops' disk locks (a capture holds its template's).
    locks: DiskLocks,
    /// How captures run.
    capture: Arc<CaptureSettings>,
}

/// One image version's copy.
struct Entry {
    spec: CopySpec,
    image: String,
    refused: Option<String>,
    phase: Option<CopyPhase>,
    since: Option<Time>,
    /// This host's last report of the image, as read at the first look (for `since`).
    prior: Option<HostImage>,
    percent: Option<u8>,
    reason: Option<Reason>,
    message: Option<String>,
    ready: Option<Verified>,
    failures: u32,
    retry_at: Option<Instant>,
    job: Option<Job>,
    /// The file in place was read and had another sum: the next attempt fetches it again.
    damaged: bool,
    /// The host that puts the file in place, when another host of a shared pool does.
    written_by: Option<String>,
    /// The template whose disk this host captures into the version.
    capture: Option<CaptureFrom>,
    /// Why this host can get no copy.
    unavailable: Option<String>,
    /// Reported as the message of a Ready copy (what a capture's sealing reset).
    note: Option<String>,
}

/// A fetch or a check running.
struct Job {
    kind: Kind,
    progress: Arc<Progress>,
    /// The verified file, and a note for the report (what sealing reset, for a capture).
    handle: JoinHandle<Result<(Verified, Option<String>), CopyError>>,
    /// Set by the task once it has its answer (just before it returns it).
    answered: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fetch,
    Verify,
    /// Made from a template's disk on this host.
    Capture,
    /// A fetch over a file found damaged.
    Repair,
}

impl Drop for Copies {
    fn drop(&mut self) {
        for e in self.entries.values_mut() {
            e.abort();
        }
    }
}

impl Copies {
    /// No copies yet; `width` run at once (at least one), a failed one is retried after
    /// `retry`, doubling.
    pub fn new(
        http: HttpClient,
        settings: Settings,
        width: usize,
        retry: Duration,
        metrics: Metrics,
    ) -> Self {
        let width = width.max(1);
        Self {
            run: Runner {
                http,
                settings: Arc::new(settings),
                slots: Arc::new(Semaphore::new(width)),
                width,
                backoff: Backoff {
                    initial: retry,
                    max: MAX_RETRY.max(retry),
                },
                metrics,
                ended: Arc::new(Notify::new()),
                locks: DiskLocks::default(),
                capture: Arc::new(CaptureSettings::default()),
            },
            entries: BTreeMap::new(),
        }
    }

    /// Captures take the desktops' disk locks from `locks` and run with `settings`.
    pub fn set_capture(&mut self, locks: DiskLocks, settings: CaptureSettings) {
        self.run.locks = locks;
        self.run.capture = Arc::new(settings);
    }

    /// Told each time a copy task ends (a permit is kept until the next wait).
    pub fn ended(&self) -> Arc<Notify> {
        self.run.ended.clone()
    }

    /// One round: the copies of images no longer targeted stop and leave the report (their
    /// files stay); each target's copy moves on. `image_dir` is the pool's (`None`: no pool,
    /// nothing held); `prior` is this host's report as the DomainNode shows it.
    pub async fn step(
        &mut self,
        image_dir: Option<&Path>,
        targets: &[Target],
        prior: &[HostImage],
    ) {
        let Some(image_dir) = image_dir else {
            self.entries.clear();
            return;
        };
        self.entries.retain(|(uid, version), _| {
            targets
                .iter()
                .any(|t| &t.uid == uid && t.version == *version)
        });
        for t in targets {
            let spec = CopySpec {
                uid: t.uid.clone(),
                version: t.version,
                url: t.url.clone(),
                sha256: t.sha256.clone(),
                image_dir: image_dir.to_path_buf(),
            };
            let prior = prior
                .iter()
                .find(|p| p.uid == t.uid && p.version == t.version);
            let fresh = || Entry::new(spec.clone(), prior);
            let entry = self
                .entries
                .entry((t.uid.clone(), t.version))
                .or_insert_with(fresh);
            if entry.spec != spec {
                // Another version (or source, or directory): the old copy stops, its files stay.
                entry.abort();
                *entry = Entry::new(spec.clone(), None);
            }
            entry.image = t.image.clone();
            entry.refused = t.refused.clone();
            entry.written_by = t.written_by.clone();
            entry.capture = t.capture.clone();
            entry.unavailable = t.unavailable.clone();
            self.run.advance(entry).await;
        }
    }

    /// The report of every copy, by UID.
    pub fn report(&self) -> Vec<HostImage> {
        self.entries.values().filter_map(Entry::report).collect()
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.abort();
    }
}

impl Entry {
    fn new(spec: CopySpec, prior: Option<&HostImage>) -> Self {
        Self {
            spec,
            image: String::new(),
            refused: None,
            phase: None,
            since: None,
            prior: prior.cloned(),
            percent: None,
            reason: None,
            message: None,
            ready: None,
            failures: 0,
            retry_at: None,
            job: None,
            damaged: false,
            written_by: None,
            capture: None,
            unavailable: None,
            note: None,
        }
    }

    fn abort(&mut self) {
        if let Some(job) = self.job.take() {
            job.handle.abort();
        }
    }

    /// Moves to `phase`; `since` changes only with the phase (the first one is taken from
    /// the prior report when that was in the same phase of the same version).
    fn set_phase(&mut self, phase: CopyPhase) {
        if self.phase == Some(phase) {
            return;
        }
        let prior = self
            .prior
            .take()
            .filter(|p| self.phase.is_none() && p.version == self.spec.version && p.phase == phase);
        self.since = prior.and_then(|p| p.since).or_else(|| Some(now()));
        self.phase = Some(phase);
    }

    fn ready(&mut self, v: Verified) {
        if self.phase != Some(CopyPhase::Ready) {
            tracing::info!(image = %self.image, version = self.spec.version, sha256 = %v.sha256, "the image's copy on this host is verified");
        }
        self.set_phase(CopyPhase::Ready);
        self.ready = Some(v);
        self.percent = None;
        self.reason = None;
        self.message = None;
        self.failures = 0;
        self.retry_at = None;
    }

    /// Waits for another host to put the file in place.
    fn pending(&mut self, message: String) {
        self.set_phase(CopyPhase::Pending);
        self.ready = None;
        self.percent = None;
        self.reason = None;
        self.message = Some(message);
    }

    fn copying(&mut self, percent: u8, message: Option<String>) {
        self.set_phase(CopyPhase::Copying);
        self.ready = None;
        self.percent = Some(percent);
        self.reason = None;
        self.message = message;
    }

    /// Failed with `reason`; counted and logged when the reason or message is new.
    fn failed(&mut self, reason: Reason, message: String, metrics: &Metrics) {
        let message: String = message.chars().take(MAX_MESSAGE).collect();
        let news = self.phase != Some(CopyPhase::Failed)
            || self.reason != Some(reason)
            || self.message.as_deref() != Some(message.as_str());
        if news {
            tracing::warn!(image = %self.image, version = self.spec.version, reason = reason.as_str(), %message, "the image cannot be copied onto this host");
            metrics
                .image_copy_failures
                .get_or_create(&[("reason", reason.as_str())])
                .inc();
        }
        self.set_phase(CopyPhase::Failed);
        self.ready = None;
        self.percent = None;
        self.reason = Some(reason);
        self.message = Some(message);
    }

    /// Whether a failed copy waits for its backoff.
    fn waiting(&self, now: Instant) -> bool {
        self.phase == Some(CopyPhase::Failed) && self.retry_at.is_some_and(|at| now < at)
    }

    fn report(&self) -> Option<HostImage> {
        let phase = self.phase?;
        let ready = self.ready.as_ref().filter(|_| phase == CopyPhase::Ready);
        Some(HostImage {
            uid: self.spec.uid.clone(),
            image: self.image.clone(),
            version: self.spec.version,
            phase,
            percent: self.percent.filter(|_| phase == CopyPhase::Copying),
            sha256: ready.map(|v| v.sha256.clone()),
            bytes: ready.map(|v| v.bytes),
            virtual_bytes: ready.map(|v| v.virtual_bytes),
            reason: self.reason.map(|r| r.as_str().to_string()),
            message: self
                .message
                .clone()
                .or_else(|| ready.and(self.note.clone())),
            since: self.since.clone(),
        })
    }
}

/// Now, in whole seconds (what a status keeps, so a report read back compares equal).
fn now() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

impl Runner {
    /// Moves one copy on: takes the answer of a finished task, shows a running one's progress,
    /// else looks at the version's place and starts what it needs.
    async fn advance(&self, e: &mut Entry) {
        if let Some(why) = e.refused.clone() {
            e.abort();
            e.failed(Reason::BadFile, why, &self.metrics);
            return;
        }
        // A task that has its answer is awaited (it only has to return it): the round its
        // end started takes the answer.
        if e.job
            .as_ref()
            .is_some_and(|j| j.handle.is_finished() || j.answered.load(Ordering::Acquire))
            && let Some(job) = e.job.take()
        {
            self.settle(e, job).await;
        }
        if let Some(job) = &e.job {
            let (percent, message) = if !job.progress.started() {
                let width = self.width;
                (
                    0,
                    Some(format!("waiting for a free copy slot ({width} at once)")),
                )
            } else if job.kind == Kind::Verify {
                let m = "reading the file found in place again: it has no record of a check";
                (job.progress.percent(), Some(m.to_string()))
            } else {
                (job.progress.percent(), None)
            };
            e.copying(percent, message);
            return;
        }
        let now = Instant::now();
        match fetch::in_place(&e.spec).await {
            Ok(InPlace::Verified(v)) => e.ready(v),
            Ok(_) if e.waiting(now) => {}
            Ok(InPlace::Missing) if let Some(why) = e.unavailable.clone() => e.pending(why),
            Ok(InPlace::Missing) if e.capture.is_some() => self.start(e, Kind::Capture),
            // A capture's sum is not known yet: nothing to check a file against.
            Ok(InPlace::Unverified) if e.spec.sha256.is_empty() => {
                e.pending("waiting for the capture's checksum".to_string())
            }
            // A shared directory's file is fetched (and repaired) by its writer alone.
            Ok(InPlace::Missing) if let Some(w) = e.written_by.clone() => e.pending(format!(
                "host {w} fetches the copy into the image directory this host shares; this \
                 host checks it once it is there"
            )),
            Ok(InPlace::Unverified)
                if e.damaged
                    && let Some(w) = e.written_by.clone() =>
            {
                let m = format!("the shared copy is damaged; host {w} fetches it again");
                e.failed(Reason::Damaged, m, &self.metrics);
            }
            Ok(InPlace::Unverified) if e.damaged => self.start(e, Kind::Repair),
            Ok(InPlace::Unverified) => self.start(e, Kind::Verify),
            Ok(InPlace::Missing) => self.start(e, Kind::Fetch),
            Err(err) => e.failed(err.reason(), error_chain(&err), &self.metrics),
        }
    }

    /// Takes the answer of a finished task.
    async fn settle(&self, e: &mut Entry, job: Job) {
        let result = match job.handle.await {
            Ok(r) => r,
            Err(join) => Err(CopyError::Stopped(join.to_string())),
        };
        match result {
            Ok((v, note)) => {
                e.damaged = false;
                e.ready(v);
                if note.is_some() {
                    e.note = note;
                }
            }
            // Put in place by another attempt: the look at the place decides.
            Err(CopyError::Exists { .. }) => {}
            // A damaged file in place is fetched again at once (the source is not to blame);
            // a repair that fails waits for its backoff like every other failure.
            Err(err @ CopyError::Damaged { .. }) if !e.damaged => {
                e.damaged = true;
                e.retry_at = None;
                e.failed(err.reason(), error_chain(&err), &self.metrics);
                tracing::warn!(image = %e.image, error = %error_chain(&err), "a copy in place is damaged; fetching it again");
            }
            // The template's disk is still open (its QEMU is going away): looked at again soon,
            // without counting as a failure.
            Err(err @ CopyError::DiskBusy(_)) => {
                e.retry_at = Some(Instant::now() + BUSY_RETRY);
                e.failed(err.reason(), error_chain(&err), &self.metrics);
            }
            Err(err) => {
                e.failures = e.failures.saturating_add(1);
                let delay = self.backoff.delay(e.failures);
                e.retry_at = Some(Instant::now() + delay);
                e.failed(err.reason(), error_chain(&err), &self.metrics);
                tracing::info!(image = %e.image, retry_in = ?delay, "the copy is tried again later");
            }
        }
    }

    /// Starts a fetch or a check of `e` in a task that waits for a copy slot.
    fn start(&self, e: &mut Entry, kind: Kind) {
        let progress = Arc::new(match kind {
            Kind::Fetch | Kind::Repair => {
                Progress::fetching(self.metrics.image_fetched_bytes.clone())
            }
            Kind::Verify | Kind::Capture => Progress::default(),
        });
        let slots = self.slots.clone();
        let http = self.http.clone();
        let settings = self.settings.clone();
        let spec = e.spec.clone();
        let active = self.metrics.image_copies_active.clone();
        let shared = progress.clone();
        let ended = self.ended.clone();
        let from = e.capture.clone().map(|c| {
            let lock = self.locks.lock(&c.desktop_uid);
            (c, lock)
        });
        let capturing = self.capture.clone();
        let answered = Arc::new(AtomicBool::new(false));
        let has_answer = answered.clone();
        tracing::info!(image = %e.image, version = spec.version, kind = ?kind, "starting a copy of the image");
        let handle = tokio::spawn(async move {
            // The semaphore is never closed; without a permit the copy runs anyway.
            let _slot = slots.acquire_owned().await.ok();
            shared.start();
            active.inc();
            let _active = scopeguard(move || {
                active.dec();
            });
            let plain = |r: Result<Verified, CopyError>| r.map(|v| (v, None));
            let answer = match (kind, from) {
                (Kind::Fetch, _) => plain(fetch::fetch(&http, &spec, &settings, &shared).await),
                (Kind::Verify, _) => plain(fetch::verify(&spec, &settings, shared.clone()).await),
                (Kind::Repair, _) => plain(fetch::repair(&http, &spec, &settings, &shared).await),
                (Kind::Capture, Some((from, lock))) => {
                    capture::capture(&spec, &from, &settings, &capturing, lock, &shared)
                        .await
                        .map(|c| (c.verified, Some(c.sealed)))
                }
                (Kind::Capture, None) => Err(CopyError::Capture("no template named".into())),
            };
            has_answer.store(true, Ordering::Release);
            ended.notify_one();
            answer
        });
        e.job = Some(Job {
            kind,
            progress,
            handle,
            answered,
        });
        e.copying(0, None);
    }
}

/// Runs `f` when dropped (also when the task is aborted).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::testkit::{Reply, Scratch, Server, client, qcow2, settings, sha256};

    fn target(uid: &str, url: &str, sum: &str) -> Target {
        Target {
            uid: uid.into(),
            image: format!("deskvirt-images/{uid}"),
            version: 1,
            url: url.into(),
            sha256: sum.into(),
            refused: None,
            written_by: None,
            capture: None,
            unavailable: None,
        }
    }

    /// Rounds until `done` holds of the report, for at most 10 s.
    async fn until(
        copies: &mut Copies,
        dir: &Path,
        targets: &[Target],
        done: impl Fn(&[HostImage]) -> bool,
    ) -> Vec<HostImage> {
        for _ in 0..200 {
            copies.step(Some(dir), targets, &[]).await;
            let report = copies.report();
            if done(&report) {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never: {:?}", copies.report());
    }

    fn phase_of(report: &[HostImage], uid: &str) -> Option<CopyPhase> {
        report.iter().find(|h| h.uid == uid).map(|h| h.phase)
    }

    #[tokio::test]
    async fn a_failed_copy_is_retried_after_its_backoff_and_then_ready() {
        let dir = Scratch::new("retry");
        let image = qcow2(&dir.0, "src.qcow2", &[]);
        let server = Server::start().await;
        let url = server.route("/a.qcow2", Reply::Bytes(b"not yet".to_vec()));
        let metrics = Metrics::default();
        let mut copies = Copies::new(
            client(),
            settings(),
            2,
            Duration::from_millis(300),
            metrics.clone(),
        );
        let targets = [target("a", &url, &sha256(&image))];
        let report = until(&mut copies, &dir.0, &targets, |r| {
            phase_of(r, "a") == Some(CopyPhase::Failed)
        })
        .await;
        assert_eq!(report[0].reason.as_deref(), Some("ChecksumMismatch"));
        let failed_since = report[0].since.clone();
        // Within the backoff nothing is tried.
        copies.step(Some(&dir.0), &targets, &[]).await;
        assert_eq!(copies.report()[0].since, failed_since);
        server.route("/a.qcow2", Reply::Bytes(image.clone()));
        let report = until(&mut copies, &dir.0, &targets, |r| {
            phase_of(r, "a") == Some(CopyPhase::Ready)
        })
        .await;
        assert_eq!(report[0].sha256.as_deref(), Some(sha256(&image).as_str()));
        assert_eq!(report[0].bytes, Some(image.len() as u64));
        assert_eq!(report[0].virtual_bytes, Some(1 << 20));
        assert_eq!((report[0].percent, report[0].reason.clone()), (None, None));
        assert_eq!(metrics.image_fetched_bytes.get(), 7 + image.len() as u64);
        assert_eq!(
            metrics
                .image_copy_failures
                .get_or_create(&[("reason", "ChecksumMismatch")])
                .get(),
            1
        );
        assert_eq!(metrics.image_copies_active.get(), 0);
        // Untargeted: dropped from the report, the file stays.
        copies.step(Some(&dir.0), &[], &[]).await;
        assert!(copies.report().is_empty());
        assert!(dir.0.join("managed/a/v1.qcow2").exists());
    }

    #[tokio::test]
    async fn copies_wait_for_a_slot_and_since_is_kept_from_the_last_report() {
        let dir = Scratch::new("slots");
        let server = Server::start().await;
        let a = server.route("/a", Reply::Stall(vec![0; 10], 1000));
        let b = server.route("/b", Reply::Stall(vec![0; 10], 1000));
        let patient = Settings {
            read_timeout: Duration::from_secs(10),
            ..settings()
        };
        let mut copies = Copies::new(
            client(),
            patient,
            1,
            Duration::from_secs(30),
            Metrics::default(),
        );
        let targets = [
            target("a", &a, &"0".repeat(64)),
            target("b", &b, &"0".repeat(64)),
        ];
        copies.step(Some(&dir.0), &targets, &[]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        copies.step(Some(&dir.0), &targets, &[]).await;
        let report = copies.report();
        let waiting: Vec<bool> = report
            .iter()
            .map(|h| h.message.as_deref().is_some_and(|m| m.contains("slot")))
            .collect();
        assert_eq!(report.len(), 2);
        assert_eq!(waiting.iter().filter(|w| **w).count(), 1, "{report:?}");
        assert!(report.iter().all(|h| h.phase == CopyPhase::Copying));
        drop(copies);

        // A verified file in place, reported Ready before a restart: Ready since then.
        let image = qcow2(&dir.0, "src.qcow2", &[]);
        let mut copies = Copies::new(
            client(),
            settings(),
            1,
            Duration::from_secs(30),
            Metrics::default(),
        );
        let t = target("c", "http://127.0.0.1:1/none", &sha256(&image));
        let spec = CopySpec {
            uid: "c".into(),
            version: 1,
            url: t.url.clone(),
            sha256: t.sha256.clone(),
            image_dir: dir.0.clone(),
        };
        std::fs::create_dir_all(spec.dir()).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(spec.final_path(), &image).unwrap_or_else(|e| panic!("{e}"));
        let then = Time(Timestamp::from_second(1_700_000_000).unwrap_or_else(|e| panic!("{e}")));
        let prior = HostImage {
            sha256: Some(t.sha256.clone()),
            bytes: Some(image.len() as u64),
            virtual_bytes: Some(1 << 20),
            since: Some(then.clone()),
            ..HostImage::new("c", &t.image, 1, CopyPhase::Ready)
        };
        let targets = [t];
        for _ in 0..200 {
            copies
                .step(Some(&dir.0), &targets, std::slice::from_ref(&prior))
                .await;
            if copies.report().first().map(|h| h.phase) == Some(CopyPhase::Ready) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Read again (no record) on the way, so Copying came between: a new since.
        let report = copies.report();
        assert_eq!(report.first().map(|h| h.phase), Some(CopyPhase::Ready));
        assert_ne!(report[0].since, Some(then.clone()));
        // Once recorded, a restart keeps the reported since.
        drop(copies);
        let mut copies = Copies::new(
            client(),
            settings(),
            1,
            Duration::from_secs(30),
            Metrics::default(),
        );
        copies
            .step(Some(&dir.0), &targets, std::slice::from_ref(&prior))
            .await;
        let report = copies.report();
        assert_eq!(report.first().map(|h| h.phase), Some(CopyPhase::Ready));
        assert_eq!(report[0].since, Some(then));
    }

    #[tokio::test]
    async fn a_refused_file_fails_without_touching_the_host() {
        let dir = Scratch::new("refused");
        let mut copies = Copies::new(
            client(),
            settings(),
            1,
            Duration::from_secs(30),
            Metrics::default(),
        );
        let mut t = target("d", "http://127.0.0.1:1/none", &"0".repeat(64));
        t.refused = Some("the status names another file".into());
        copies.step(Some(&dir.0), &[t], &[]).await;
        let report = copies.report();
        assert_eq!(report[0].phase, CopyPhase::Failed);
        assert_eq!(report[0].reason.as_deref(), Some("BadFile"));
        assert!(!dir.0.join("managed").exists());
    }

    #[tokio::test]
    async fn a_host_of_a_shared_pool_waits_for_the_writer_and_takes_its_file() {
        let dir = Scratch::new("shared");
        let image = qcow2(&dir.0, "src.qcow2", &[]);
        let server = Server::start().await;
        let url = server.route("/s.qcow2", Reply::Bytes(image.clone()));
        let mut reader = Copies::new(
            client(),
            settings(),
            2,
            Duration::from_millis(300),
            Metrics::default(),
        );
        let mut theirs = target("s", &url, &sha256(&image));
        theirs.written_by = Some("h2".into());
        let targets = [theirs];
        reader.step(Some(&dir.0), &targets, &[]).await;
        let report = reader.report();
        assert_eq!(phase_of(&report, "s"), Some(CopyPhase::Pending));
        assert!(
            report[0]
                .message
                .as_deref()
                .is_some_and(|m| m.contains("host h2 fetches the copy")),
            "{report:?}"
        );
        // The writer (here another Copies over the same directory) puts the file in place.
        let mut writer = Copies::new(
            client(),
            settings(),
            2,
            Duration::from_millis(300),
            Metrics::default(),
        );
        let mine = [target("s", &url, &sha256(&image))];
        until(&mut writer, &dir.0, &mine, |r| {
            phase_of(r, "s") == Some(CopyPhase::Ready)
        })
        .await;
        let report = until(&mut reader, &dir.0, &targets, |r| {
            phase_of(r, "s") == Some(CopyPhase::Ready)
        })
        .await;
        assert_eq!(report[0].sha256.as_deref(), Some(sha256(&image).as_str()));
        assert_eq!(server.requests("/s.qcow2"), 1, "only the writer fetched");
    }
}
