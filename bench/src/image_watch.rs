//! When each step of one DesktopImage's distribution was seen: a watch on the image and one on
//! the run's DomainNodes, both listed before the POST, record the first event that shows each
//! step (no polling, so no poll interval is added to the figures); and what the agent's copy
//! itself took on each host, from the times of the files it wrote.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use deskvirt_crds::constants::condition::READY;
use deskvirt_crds::image::CopyPhase;
use deskvirt_crds::{DesktopImage, DomainNode};
use futures::StreamExt;
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::oneshot;

/// When each step was first seen.
#[derive(Debug, Default)]
pub struct Marks {
    /// The operator cut the version (`status.version` set).
    pub cut: Option<Instant>,
    /// Each host's first report of the image in its DomainNode (its copy started).
    pub started: BTreeMap<String, Instant>,
    /// Each host's report of its copy as Ready.
    pub host_ready: BTreeMap<String, Instant>,
    /// The image's `Ready=True`.
    pub ready: Option<Instant>,
}

/// The steps of one run, from the POST.
#[derive(Debug, Clone, Copy, Default)]
pub struct Steps {
    pub cut: Duration,
    pub first_started: Duration,
    pub last_started: Duration,
    pub first_host_ready: Duration,
    pub last_host_ready: Duration,
    pub ready: Duration,
}

impl Marks {
    /// The steps from `t0` (the instant just before the POST).
    pub fn steps(&self, t0: Instant) -> Steps {
        let from =
            |t: Option<&Instant>| t.map_or(Duration::ZERO, |t| t.saturating_duration_since(t0));
        let ready = from(self.ready.as_ref());
        Steps {
            cut: from(self.cut.as_ref()),
            first_started: from(self.started.values().min()),
            last_started: from(self.started.values().max()),
            first_host_ready: from(self.host_ready.values().min()),
            last_host_ready: from(self.host_ready.values().max()),
            ready,
        }
    }

    fn mark_node(&mut self, dn: &DomainNode, image: &str) -> anyhow::Result<()> {
        let host = dn.name_any();
        let Some(copy) = dn
            .status
            .as_ref()
            .and_then(|s| s.images.iter().find(|i| i.image == image))
        else {
            return Ok(());
        };
        let now = Instant::now();
        self.started.entry(host.clone()).or_insert(now);
        match copy.phase {
            CopyPhase::Ready => {
                self.host_ready.entry(host).or_insert(now);
            }
            CopyPhase::Failed => anyhow::bail!(
                "host {host} failed to copy {image}: {} {}",
                copy.reason.as_deref().unwrap_or_default(),
                copy.message.as_deref().unwrap_or_default()
            ),
            _ => {}
        }
        Ok(())
    }
}

/// What to watch: DesktopImage `name` in `namespace`, and the DomainNodes matching `selector`
/// until `hosts` of them hold a Ready copy.
pub struct Watched {
    pub images: Api<DesktopImage>,
    pub nodes: Api<DomainNode>,
    pub selector: String,
    pub namespace: String,
    pub name: String,
    pub hosts: usize,
}

/// Watches until the image is `Ready=True` and `w.hosts` hosts reported a Ready copy (or
/// `limit` passes, or a host reports its copy Failed). `listed` is sent once both watches
/// listed: then the POST may go. The hosts' reports name the image `<namespace>/<name>`.
pub async fn watch(
    w: Watched,
    listed: oneshot::Sender<()>,
    limit: Duration,
) -> anyhow::Result<(Marks, DesktopImage)> {
    let Watched {
        images,
        nodes,
        selector,
        namespace,
        name,
        hosts,
    } = w;
    let by_name = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut is = watcher(images, by_name).default_backoff().boxed();
    let by_label = watcher::Config::default().labels(&selector);
    let mut ns = watcher(nodes, by_label).default_backoff().boxed();
    let mut list_done = crate::migrate_hops::after_lists(2, listed);
    let key = format!("{namespace}/{name}");
    let mut marks = Marks::default();
    let mut last: Option<DesktopImage> = None;
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        if marks.ready.is_some() && marks.host_ready.len() >= hosts {
            break;
        }
        tokio::select! {
            () = &mut deadline => anyhow::bail!(
                "image {name} was not Ready on {hosts} hosts within {limit:?} (seen: {marks:?}; status {:?})",
                last.and_then(|i| i.status)
            ),
            e = is.next() => match e {
                None => anyhow::bail!("the image watch ended"),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Event::InitDone)) => list_done(),
                Some(Ok(Event::Apply(i) | Event::InitApply(i))) => {
                    let st = i.status.clone().unwrap_or_default();
                    let now = Instant::now();
                    if st.version.is_some() {
                        marks.cut.get_or_insert(now);
                    }
                    if deskvirt_crds::conditions::is_true(&st.conditions, READY) {
                        marks.ready.get_or_insert(now);
                    }
                    last = Some(i);
                }
                Some(Ok(_)) => {}
            },
            e = ns.next() => match e {
                None => anyhow::bail!("the DomainNode watch ended"),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Event::InitDone)) => list_done(),
                Some(Ok(Event::Apply(dn) | Event::InitApply(dn))) => marks.mark_node(&dn, &key)?,
                Some(Ok(_)) => {}
            },
        }
    }
    let image = last.ok_or_else(|| anyhow::anyhow!("image {name} was never seen"))?;
    Ok((marks, image))
}

/// What the agent's copy took on one host, from the files it wrote: the copy's birth (the
/// fetch opens it before its GET), its last write (the end of the download and hash) and the
/// record beside it (written after `qemu-img info` and the fsync).
#[derive(Debug, Clone, Copy, Default)]
pub struct FileTimes {
    /// Birth → last write: download and SHA-256, streamed.
    pub download: Duration,
    /// Last write → record: `qemu-img info`, read-only, fsync, the record.
    pub check: Duration,
}

/// [`FileTimes`] of `file` and its record `<file>.verified`, when the file system keeps birth
/// times.
pub fn file_times(file: &Path) -> Option<FileTimes> {
    let meta = std::fs::metadata(file).ok()?;
    let mut record = file.as_os_str().to_os_string();
    record.push(".verified");
    let recorded = std::fs::metadata(record).ok()?.modified().ok()?;
    let (born, written) = (meta.created().ok()?, meta.modified().ok()?);
    let between = |a: SystemTime, b: SystemTime| b.duration_since(a).unwrap_or_default();
    Some(FileTimes {
        download: between(born, written),
        check: between(written, recorded),
    })
}
