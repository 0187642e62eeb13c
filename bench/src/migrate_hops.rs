//! When each hand-over of a live migration was seen, from the DesktopMigration's POST: a watch
//! on the migration and one on its Desktop, started before the POST, record the first event
//! that shows each step (no polling, so no poll interval is added to the figures).

use std::time::{Duration, Instant};

use deskvirt_crds::desktop::DesktopStatus;
use deskvirt_crds::migration::{MigrationPhase, MigrationState};
use deskvirt_crds::{Desktop, DesktopMigration};
use futures::StreamExt;
use kube::Api;
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::oneshot;

/// A step of a live migration, in the order they happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// The operator chose and reserved the target (the migration's `status.target`).
    Reserved,
    /// The operator recorded the target on the Desktop (`status.migration`).
    Recorded,
    /// The source host reported it started moving the domain.
    Started,
    /// The source host reported the domain runs on the target.
    Completed,
    /// The operator bound the Desktop to the target.
    Bound,
    /// The migration's phase is `Succeeded`.
    Succeeded,
}

impl Hop {
    pub const ALL: [Hop; 6] = [
        Hop::Reserved,
        Hop::Recorded,
        Hop::Started,
        Hop::Completed,
        Hop::Bound,
        Hop::Succeeded,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Hop::Reserved => "target reserved (operator, migration status)",
            Hop::Recorded => "target recorded on the Desktop (operator)",
            Hop::Started => "source reported Started (agent)",
            Hop::Completed => "source reported Completed (agent, after libvirt's call)",
            Hop::Bound => "Desktop bound to the target (operator)",
            Hop::Succeeded => "migration Succeeded (operator)",
        }
    }
}

/// The time of each hop from the POST; a hop no event showed on its own (two steps in one
/// write) takes the next one's time.
pub type Steps = [Option<Duration>; 6];

/// What one watch event shows.
enum Seen<K> {
    /// The object as it is now.
    Object(K),
    /// The watch's first list is done.
    Listed,
    /// Nothing this bench reads (a deletion, the start of a list).
    Other,
}

fn seen<K>(event: Option<Result<Event<K>, watcher::Error>>, what: &str) -> anyhow::Result<Seen<K>> {
    Ok(match event {
        None => anyhow::bail!("the {what} watch ended"),
        Some(Ok(Event::Apply(k) | Event::InitApply(k))) => Seen::Object(k),
        Some(Ok(Event::InitDone)) => Seen::Listed,
        Some(Ok(_)) => Seen::Other,
        Some(Err(e)) => return Err(e.into()),
    })
}

/// When each hop was first seen.
#[derive(Default)]
struct Marks(Vec<(Hop, Instant)>);

impl Marks {
    fn mark(&mut self, hop: Hop) {
        if !self.0.iter().any(|(h, _)| *h == hop) {
            self.0.push((hop, Instant::now()));
        }
    }

    /// The hops the Desktop's status shows of migration `uid` (to host `target` once known).
    fn desktop(&mut self, st: &DesktopStatus, uid: &str, target: Option<&str>) {
        if st.migration.as_ref().is_some_and(|r| r.uid == uid) {
            self.mark(Hop::Recorded);
        }
        if let Some(r) = st.migration_report.as_ref().filter(|r| r.uid == uid) {
            self.mark(Hop::Started);
            if r.state == MigrationState::Completed {
                self.mark(Hop::Completed);
            }
        }
        if target.is_some() && st.node.as_deref() == target {
            self.mark(Hop::Bound);
        }
    }
}

/// Watches migration `name` and its desktop `name` until the migration is Succeeded or Failed
/// (or `limit` passes). `listed` is sent once both watches listed (then the POST may go);
/// `posted` carries the POST's instant and the migration's UID from its response.
pub async fn watch(
    migrations: Api<DesktopMigration>,
    desktops: Api<Desktop>,
    name: String,
    listed: oneshot::Sender<()>,
    posted: oneshot::Receiver<(Instant, String)>,
    limit: Duration,
) -> anyhow::Result<(Steps, DesktopMigration)> {
    let by_name = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut ms = watcher(migrations, by_name.clone())
        .default_backoff()
        .boxed();
    let mut ds = watcher(desktops, by_name).default_backoff().boxed();
    let mut list_done = after_lists(2, listed);
    let mut marks = Marks::default();
    // The POST's instant and the migration's UID, once the POST answered; the target once the
    // migration's status shows it; the Desktop as last seen (read again once the UID is known).
    let (mut post, mut target): (Option<(Instant, String)>, Option<String>) = (None, None);
    let mut last_desktop: Option<DesktopStatus> = None;
    let mut posted = Some(posted);
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    let done = loop {
        tokio::select! {
            () = &mut deadline => anyhow::bail!("migration {name} did not end within {limit:?}"),
            p = async { posted.as_mut()?.await.ok() }, if posted.is_some() => {
                posted = None;
                let Some(p) = p else { anyhow::bail!("the POST of migration {name} did not answer") };
                if let Some(st) = &last_desktop {
                    marks.desktop(st, &p.1, target.as_deref());
                }
                post = Some(p);
            }
            m = ms.next() => {
                let m = match seen(m, "migration")? {
                    Seen::Object(m) => m,
                    Seen::Listed => { list_done(); continue; }
                    Seen::Other => continue,
                };
                let st = m.status.clone().unwrap_or_default();
                if st.target.is_some() {
                    target = st.target.clone();
                    marks.mark(Hop::Reserved);
                }
                if m.phase().is_terminal() {
                    marks.mark(Hop::Succeeded);
                    break m;
                }
            }
            d = ds.next() => {
                let d = match seen(d, "desktop")? {
                    Seen::Object(d) => d,
                    Seen::Listed => { list_done(); continue; }
                    Seen::Other => continue,
                };
                let st = d.status.unwrap_or_default();
                if let Some((_, uid)) = &post {
                    marks.desktop(&st, uid, target.as_deref());
                }
                last_desktop = Some(st);
            }
        }
    };
    let t0 = match post {
        Some((t0, _)) => t0,
        None => anyhow::bail!("migration {name} ended before its POST answered"),
    };
    let mut seen: Steps = [None; 6];
    for (i, hop) in Hop::ALL.iter().enumerate() {
        seen[i] = marks
            .0
            .iter()
            .find(|(h, _)| h == hop)
            .map(|(_, t)| t.saturating_duration_since(t0));
    }
    // A hop hidden in a later write takes that write's time.
    for i in (0..seen.len().saturating_sub(1)).rev() {
        if seen[i].is_none() {
            seen[i] = seen[i + 1];
        }
    }
    anyhow::ensure!(
        done.phase() == MigrationPhase::Succeeded,
        "migration {name} ended {:?}",
        done.status.as_ref().map(|s| &s.conditions)
    );
    Ok((seen, done))
}

/// A callback for each watch's first full list: it sends `listed` once `watches` have listed
/// (then the request they time may go).
pub fn after_lists(watches: u32, listed: oneshot::Sender<()>) -> impl FnMut() {
    let (mut lists, mut listed) = (0, Some(listed));
    move || {
        lists += 1;
        if lists == watches
            && let Some(tx) = listed.take()
        {
            let _ = tx.send(());
        }
    }
}
