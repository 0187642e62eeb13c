//! Liveness and readiness. Decides liveness by progress: each loop of the process registers a
//! [`Beat`] with the silence it may keep, ticks it once per round, and the process is live
//! while no loop has been silent for longer (a loop blocked forever on a call fails it; a loop
//! whose calls time out keeps ticking). Readiness is a flag the process sets: API server
//! reached and caches synced (operator), libvirt answering (agent).

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
        let inner = Arc::new(Loop {
            name,
            allowed,
            last: AtomicU64::new(millis(self.inner.origin.elapsed())),
        });
        self.inner
            .loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&inner));
        Beat {
            origin: self.inner.origin,
            inner,
        }
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
            .filter_map(|l| {
                let silent =
                    Duration::from_millis(now.saturating_sub(l.last.load(Ordering::Relaxed)));
                (silent > l.allowed).then_some((l.name, silent))
            })
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
