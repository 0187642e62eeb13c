//! Keeps the libvirt connection: opened lazily outside any lock (one open at a time; other
//! callers wait for it up to their deadline), shared by concurrent calls, dropped on a
//! disconnect and reopened with capped exponential backoff. Decides when libvirt counts as
//! stalled: a call that missed its deadline marks it so, and only a probe that answers clears
//! it, so a hung daemon costs a bounded number of stuck threads. Closing never panics.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use virt::connect::Connect;

use crate::hypervisor::backoff::Backoff;
use crate::hypervisor::error::HypervisorError;

/// An open connection. `virt::connect::Connect` has no `close()` in virt 0.5 and its `Drop`
/// panics when `virConnectClose` fails (a dead daemon): we drop it inside `catch_unwind` and
/// ignore the outcome, so losing libvirt never takes the agent down.
pub(super) struct Conn(Option<Connect>);

impl Conn {
    /// The connection; `None` only while it is being dropped.
    pub(super) fn get(&self) -> Option<&Connect> {
        self.0.as_ref()
    }

    /// A connection of its own to `uri`, for one call that holds it for long (a migration),
    /// closed when dropped.
    pub(super) fn open(uri: &str) -> Result<Self, virt::error::Error> {
        Connect::open(Some(uri)).map(|c| Self(Some(c)))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take()
            && catch_unwind(AssertUnwindSafe(move || drop(conn))).is_err()
        {
            tracing::warn!("libvirt connection did not close cleanly; ignored");
        }
    }
}

struct State {
    conn: Option<Arc<Conn>>,
    failures: u32,
    next_attempt: Option<Instant>,
    /// A `Connect::open` runs (outside the lock); others wait on [`Connection::opened`].
    opening: bool,
}

/// The shared connection state of one hypervisor handle.
pub(super) struct Connection {
    uri: String,
    backoff: Backoff,
    connected: AtomicBool,
    /// A call missed its deadline and no probe has answered since.
    stalled: AtomicBool,
    /// A probe runs (at most one, even when it hangs).
    probing: AtomicBool,
    /// Calls that missed their deadline and still run in their blocking thread.
    abandoned: AtomicUsize,
    state: Mutex<State>,
    opened: Condvar,
}

static QUIET_LIBVIRT: Once = Once::new();

impl Connection {
    /// A connection to `uri`, not opened yet.
    pub(super) fn new(uri: &str, backoff: Backoff) -> Self {
        // libvirt prints every error to stderr by default; we log through tracing instead.
        QUIET_LIBVIRT.call_once(virt::error::clear_error_callback);
        Self {
            uri: uri.to_string(),
            backoff,
            connected: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            abandoned: AtomicUsize::new(0),
            state: Mutex::new(State {
                conn: None,
                failures: 0,
                next_attempt: None,
                opening: false,
            }),
            opened: Condvar::new(),
        }
    }

    /// The URI.
    pub(super) fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the last attempt found libvirt reachable and answering in time.
    pub(super) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed) && !self.is_stalled()
    }

    /// Whether a call missed its deadline and no probe has answered since.
    pub(super) fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Calls still running after their deadline.
    pub(super) fn abandoned(&self) -> usize {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// Records that call `op` missed its deadline `after`; its thread still runs.
    pub(super) fn missed_deadline(&self, op: &'static str, after: Duration) {
        if !self.stalled.swap(true, Ordering::Relaxed) {
            tracing::warn!(uri = %self.uri, op, ?after, "libvirt did not answer in time; calls fail fast until it answers a probe");
        }
    }

    /// Counts a call that outlived its deadline (`true`) or came back after it (`false`).
    pub(super) fn count_abandoned(&self, stuck: bool) {
        if stuck {
            self.abandoned.fetch_add(1, Ordering::Relaxed);
        } else {
            self.abandoned.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Takes the probe slot; `false` when a probe already runs.
    pub(super) fn start_probe(&self) -> bool {
        !self.probing.swap(true, Ordering::Relaxed)
    }

    /// Releases the probe slot; an answer (even a late one) means libvirt works again.
    pub(super) fn end_probe(&self, answered: bool) {
        if answered && self.stalled.swap(false, Ordering::Relaxed) {
            tracing::info!(uri = %self.uri, "libvirt answers again");
        }
        self.probing.store(false, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The open connection, opening it when the backoff allows; waits until `deadline` for an
    /// open another call started. Blocking, but never holds the lock while libvirt works.
    pub(super) fn get(
        &self,
        op: &'static str,
        deadline: Instant,
    ) -> Result<Arc<Conn>, HypervisorError> {
        let mut state = self.lock();
        let waiting = Instant::now();
        while state.opening && state.conn.is_none() {
            if self.is_stalled() {
                // The open in flight is the one that stalled: waiting for it would only hold
                // one more thread for a whole deadline (a probe while the daemon hangs).
                return Err(HypervisorError::Disconnected {
                    op,
                    message: "still connecting to a libvirt that stopped answering".into(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Another call's open outlasted this call's deadline: libvirt is not answering,
                // as surely as when a call of its own misses it (whichever of the two timers
                // fires first, the call ends stalled, and later calls fail fast).
                self.missed_deadline(op, waiting.elapsed());
                return Err(HypervisorError::Disconnected {
                    op,
                    message: "still connecting".into(),
                });
            }
            state = match self.opened.wait_timeout(state, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        if let Some(conn) = &state.conn {
            return Ok(Arc::clone(conn));
        }
        let now = Instant::now();
        if let Some(next) = state.next_attempt.filter(|next| now < *next) {
            let wait = next.saturating_duration_since(now);
            return Err(HypervisorError::Disconnected {
                op,
                message: format!("next reconnect attempt in {wait:?}"),
            });
        }
        state.opening = true;
        drop(state);
        let opened = Connect::open(Some(&self.uri));
        let mut state = self.lock();
        state.opening = false;
        self.opened.notify_all();
        match opened {
            Ok(conn) => {
                let conn = Arc::new(Conn(Some(conn)));
                state.conn = Some(Arc::clone(&conn));
                if state.failures > 0 {
                    tracing::info!(uri = %self.uri, after_failures = state.failures, "reconnected to libvirt");
                }
                state.failures = 0;
                state.next_attempt = None;
                self.connected.store(true, Ordering::Relaxed);
                Ok(conn)
            }
            Err(err) => {
                state.failures = state.failures.saturating_add(1);
                let delay = self.backoff.delay(state.failures);
                state.next_attempt = Some(Instant::now() + delay);
                self.connected.store(false, Ordering::Relaxed);
                tracing::warn!(uri = %self.uri, failures = state.failures, retry_in = ?delay, error = %err, "cannot connect to libvirt");
                Err(HypervisorError::Disconnected {
                    op,
                    message: err.to_string(),
                })
            }
        }
    }

    /// Forgets `conn` after a call found it dead; the next call reopens. Blocking.
    pub(super) fn invalidate(&self, conn: &Arc<Conn>) {
        let stale = {
            let mut state = self.lock();
            match &state.conn {
                Some(current) if Arc::ptr_eq(current, conn) => {
                    tracing::warn!(uri = %self.uri, "lost the libvirt connection");
                    self.connected.store(false, Ordering::Relaxed);
                    state.conn.take()
                }
                _ => None,
            }
        };
        drop(stale);
    }
}
