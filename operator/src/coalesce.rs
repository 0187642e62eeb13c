//! When a status that many events fan into may be written: at most once per key per window (a
//! pool's status changes with every desktop of the pool, and a burst of desktops would write it
//! once per change). A change inside the window waits for its end, so the last value of a burst
//! is always written. Pure but for its lock; the caller supplies the clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The last write of each key, and the window.
#[derive(Debug)]
pub struct Coalescer {
    window: Duration,
    last: Mutex<HashMap<String, Instant>>,
}

impl Coalescer {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// How long a write of `key` must wait at `now`: `None` when it may go now.
    pub fn wait(&self, key: &str, now: Instant) -> Option<Duration> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let since = now.saturating_duration_since(*last.get(key)?);
        (since < self.window).then(|| self.window - since)
    }

    /// Records a write of `key` at `now`.
    pub fn wrote(&self, key: &str, now: Instant) {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_write_per_window_then_the_rest_at_its_end() {
        let c = Coalescer::new(Duration::from_secs(2));
        let t0 = Instant::now();
        assert_eq!(c.wait("p", t0), None, "the first change goes at once");
        c.wrote("p", t0);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(c.wait("p", t1), Some(Duration::from_millis(1500)));
        assert_eq!(c.wait("q", t1), None, "keys are independent");
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(
            c.wait("p", t2),
            None,
            "the window's end lets the last value through"
        );
        c.wrote("p", t2);
        assert_eq!(c.wait("p", t2), Some(Duration::from_secs(2)));
        // A clock that went back never waits longer than the window.
        assert_eq!(c.wait("p", t1), Some(Duration::from_secs(2)));
        let zero = Coalescer::new(Duration::ZERO);
        zero.wrote("p", t0);
        assert_eq!(zero.wait("p", t0), None, "no window: never waits");
    }
}
