//! Liveness and readiness. Decides liveness by progress: each loop of the process registers a
//! [`Beat`] with the silence it may keep, ticks it once per round, and the process is live
//! while no loop has been silent for longer (a loop blocked forever on a call fails it; a loop
//! whose calls time out keeps ticking). Readiness is a flag the process sets: API server
//! reached and caches synced (operator), libvirt answering (agent). A loop that works on
//! demand (a controller's reconciles) registers [`Work`] instead: it is stalled when a piece of
//! its work has been in flight for longer than one may take, so an idle controller is live, and
//! one reconcile stuck for ever fails liveness even while others finish.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shared health state, cheap to clone.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Time origin of the beats.
    origin: Instant,
    live: AtomicBool,
    ready: AtomicBool,
    loops: Mutex<Vec<Arc<Loop>>>,
}

#[derive(Debug)]
struct Loop {
    name: &'static str,
    allowed: Duration,
    /// Milliseconds since `origin` at the last tick.
    last: AtomicU64,
    /// For on-demand work ([`Work`]): the pieces in flight; `None` for a periodic loop.
    pieces: Option<Mutex<Pieces>>,
}

/// The pieces of on-demand work in flight, with when each began (ms since origin).
#[derive(Debug, Default)]
struct Pieces {
    next: u64,
    started: BTreeMap<u64, u64>,
}

impl Loop {
    /// How long the loop has been silent at `now` (ms since origin), if longer than it may: a
    /// periodic loop since its last tick, on-demand work since its oldest piece in flight began.
    fn stalled_at(&self, now: u64) -> Option<Duration> {
        let since = match &self.pieces {
            None => self.last.load(Ordering::Relaxed),
            Some(p) => *p
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .started
                .values()
                .min()?,
        };
        let silent = Duration::from_millis(now.saturating_sub(since));
        (silent > self.allowed).then_some(silent)
    }
}

/// Progress of a loop that works on demand: [`Work::begin`] each piece (a reconcile); the
/// guard marks it finished when dropped. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Work {
    origin: Instant,
    inner: Arc<Loop>,
}

/// One piece of [`Work`] in flight, until dropped.
#[derive(Debug)]
pub struct Busy {
    work: Work,
    id: u64,
}

impl Work {
    /// Work that no [`Health`] watches (unit tests, tools).
    pub fn unwatched() -> Self {
        Self {
            origin: Instant::now(),
            inner: Arc::new(Loop {
                name: "unwatched",
                allowed: Duration::MAX,
                last: AtomicU64::new(0),
                pieces: Some(Mutex::default()),
            }),
        }
    }

    /// Starts a piece of work, timed from now until its guard is dropped.
    pub fn begin(&self) -> Busy {
        let now = millis(self.origin.elapsed());
        let id = self.with_pieces(|p| {
            let id = p.next;
            p.next += 1;
            p.started.insert(id, now);
            id
        });
        Busy {
            work: self.clone(),
            id,
        }
    }

    fn with_pieces<T>(&self, f: impl FnOnce(&mut Pieces) -> T) -> T {
        let mut fallback = Pieces::default();
        match &self.inner.pieces {
            Some(p) => f(&mut p.lock().unwrap_or_else(|e| e.into_inner())),
            None => f(&mut fallback),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.work.with_pieces(|p| p.started.remove(&self.id));
    }
}

/// One loop's progress handle: [`Beat::tick`] once per round.
#[derive(Clone, Debug)]
pub struct Beat {
    origin: Instant,
    inner: Arc<Loop>,
}

impl Beat {
    /// Records that the loop completed a round now.
    pub fn tick(&self) {
        self.inner
            .last
            .store(millis(self.origin.elapsed()), Ordering::Relaxed);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Live, not yet ready, watching no loop.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                live: AtomicBool::new(true),
                ready: AtomicBool::new(false),
                loops: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Watches loop `name`, which must tick at least every `allowed` (counted from now).
    pub fn watch(&self, name: &'static str, allowed: Duration) -> Beat {
        Beat {
            origin: self.inner.origin,
            inner: self.register(name, allowed, None),
        }
    }

    /// Watches on-demand work `name`: no piece may stay in flight longer than `allowed` (the
    /// longest one may take, its deadlines included).
    pub fn watch_work(&self, name: &'static str, allowed: Duration) -> Work {
        Work {
            origin: self.inner.origin,
            inner: self.register(name, allowed, Some(Mutex::default())),
        }
    }

    fn register(
        &self,
        name: &'static str,
        allowed: Duration,
        pieces: Option<Mutex<Pieces>>,
    ) -> Arc<Loop> {
        let inner = Arc::new(Loop {
            name,
            allowed,
            last: AtomicU64::new(millis(self.inner.origin.elapsed())),
            pieces,
        });
        self.inner
            .loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&inner));
        inner
    }

    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Relaxed);
    }

    /// Forces liveness off (or back on); the loops' progress counts as well.
    pub fn set_live(&self, live: bool) {
        self.inner.live.store(live, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    /// Live unless forced off or a watched loop has been silent longer than it may.
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Relaxed) && self.stalled().is_empty()
    }

    /// The watched loops silent for longer than they may, with their silence.
    pub fn stalled(&self) -> Vec<(&'static str, Duration)> {
        let now = millis(self.inner.origin.elapsed());
        self.inner
            .loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|l| l.stalled_at(now).map(|silent| (l.name, silent)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_loop_fails_liveness_and_a_tick_restores_it() {
        let health = Health::new();
        assert!(health.is_live());
        let quiet = health.watch("quiet", Duration::from_millis(50));
        let busy = health.watch("busy", Duration::from_secs(60));
        busy.tick();
        assert!(health.is_live());
        std::thread::sleep(Duration::from_millis(120));
        let stalled = health.stalled();
        assert_eq!(stalled.len(), 1, "{stalled:?}");
        assert_eq!(stalled[0].0, "quiet");
        assert!(!health.is_live());
        quiet.tick();
        assert!(health.is_live());
    }

    #[test]
    fn on_demand_work_is_stalled_only_by_a_piece_in_flight_too_long() {
        let health = Health::new();
        let work = health.watch_work("reconciles", Duration::from_secs(60));
        let at = |secs: u64| work.inner.stalled_at(secs * 1000);
        // Idle for an hour: live.
        assert_eq!(at(3600), None);
        // A piece in flight: timed from when it began.
        let stuck = work.begin();
        let began = millis(work.origin.elapsed()) / 1000;
        assert_eq!(at(began + 30), None);
        // Others beginning and finishing meanwhile do not hide it.
        drop(work.begin());
        assert!(at(began + 62).is_some());
        // Once it finishes, nothing in flight: live however long the quiet lasts.
        drop(stuck);
        assert_eq!(at(began + 3600), None);
        // Unwatched work never stalls anyone.
        drop(Work::unwatched().begin());
    }

    #[test]
    fn readiness_is_independent_of_liveness() {
        let health = Health::new();
        assert!(!health.is_ready());
        health.set_ready(true);
        assert!(health.is_ready());
        health.set_live(false);
        assert!(!health.is_live());
        assert!(health.is_ready());
    }
}
