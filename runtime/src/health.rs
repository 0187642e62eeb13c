//! Liveness and readiness as shared flags: the process is live while its loops turn, and ready
//! once it has reached the API server (and, for the agent, libvirt).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared health state, cheap to clone.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Flags>,
}

#[derive(Debug)]
struct Flags {
    live: AtomicBool,
    ready: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Live, not yet ready.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Flags {
                live: AtomicBool::new(true),
                ready: AtomicBool::new(false),
            }),
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Relaxed);
    }

    pub fn set_live(&self, live: bool) {
        self.inner.live.store(live, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Relaxed)
    }
}
