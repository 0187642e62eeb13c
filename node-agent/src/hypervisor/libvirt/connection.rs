//! Keeps the libvirt connection: opened lazily, shared by concurrent calls, dropped on a
//! disconnect and reopened with capped exponential backoff. Closing never panics.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Instant;

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
}

/// The shared connection state of one hypervisor handle.
pub(super) struct Connection {
    uri: String,
    backoff: Backoff,
    connected: AtomicBool,
    state: Mutex<State>,
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
            state: Mutex::new(State {
                conn: None,
                failures: 0,
                next_attempt: None,
            }),
        }
    }

    /// The URI.
    pub(super) fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the last attempt found libvirt reachable.
    pub(super) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The open connection, opening it when the backoff allows. Blocking.
    pub(super) fn get(&self, op: &'static str) -> Result<Arc<Conn>, HypervisorError> {
        let mut state = self.lock();
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
        match Connect::open(Some(&self.uri)) {
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
                state.next_attempt = Some(now + delay);
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
