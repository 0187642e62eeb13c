//! Whether this replica may still commit a write: only until the instant its leader Lease
//! cannot yet have expired for anybody else, measured on the local monotonic clock.
//!
//! That instant is the local time taken *before* the last successful renewal was sent (the
//! Lease's `renewTime` is written from the same moment), plus the Lease duration, minus a
//! margin for the skew between this replica's clock and the clocks of those who judge the
//! Lease expired. A replica that hangs (a stalled renewal, a paused process, a long wait on the
//! ledger lock) finds the instant past when it resumes, and writes nothing: the leader flag
//! alone cannot say so, since nobody had the chance to clear it.
//!
//! Every committing write of the Desktop pass calls [`check`] right before it is sent; the pass
//! runs inside [`scope`], and a write outside any scope is refused (fails closed).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

/// Default allowance for clock skew between replicas.
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(1);

/// The instant until which a Lease renewed by a request sent at `sent` for `lease` cannot have
/// expired for another replica whose clock is at most `margin` ahead; `None` when the margin
/// eats the whole Lease (then nothing may ever commit).
pub fn deadline(sent: Instant, lease: Duration, margin: Duration) -> Option<Instant> {
    let valid = lease.checked_sub(margin).filter(|d| !d.is_zero())?;
    sent.checked_add(valid)
}

/// The margin actually used for a Lease of `lease`: `wanted`, at most a quarter of the Lease,
/// so a short Lease (tests) still leaves a window to commit in.
pub fn margin_for(lease: Duration, wanted: Duration) -> Duration {
    wanted.min(lease / 4)
}

/// How often to renew a Lease of `lease`: three times within the window the fence leaves, so
/// one slow renewal does not let the fence lapse.
pub fn renew_every(lease: Duration, wanted_margin: Duration) -> Duration {
    let window = lease.saturating_sub(margin_for(lease, wanted_margin));
    (window / 3).max(Duration::from_millis(200))
}

/// Why a write was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fenced {
    #[error("the leader Lease may have expired: this replica no longer commits")]
    Lapsed,
    #[error("a write outside a fenced pass")]
    NoScope,
}

/// This replica's right to commit; cheap to clone, shared by the elector and the passes.
#[derive(Clone, Debug)]
pub struct Fence {
    until: Arc<Mutex<Option<Instant>>>,
    lapsed: Arc<Notify>,
    margin: Duration,
    /// Writes refused because the fence had lapsed.
    refused: Counter,
}

impl Default for Fence {
    fn default() -> Self {
        Self::new(DEFAULT_MARGIN, Counter::default())
    }
}

impl Fence {
    /// A fence that holds nothing yet; `refused` counts the writes it stops.
    pub fn new(margin: Duration, refused: Counter) -> Self {
        Self {
            until: Arc::new(Mutex::new(None)),
            lapsed: Arc::new(Notify::new()),
            margin,
            refused,
        }
    }

    /// How often the elector renews a Lease of `lease` (see [`renew_every`]).
    pub fn renew_every(&self, lease: Duration) -> Duration {
        renew_every(lease, self.margin)
    }

    /// Records a successful renewal whose request was sent at `sent`.
    pub fn renewed(&self, sent: Instant, lease: Duration) {
        let until = deadline(sent, lease, margin_for(lease, self.margin));
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }

    /// No more commits until the next renewal (stepping down, shutting down).
    pub fn revoke(&self) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The instant commits stop, if any is allowed at all.
    pub fn until(&self) -> Option<Instant> {
        *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a write may be sent at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        self.until().is_some_and(|until| now < until)
    }

    /// Whether a write may be sent now; if not, it is counted and the elector is woken so the
    /// replica steps down at once.
    pub fn check(&self) -> Result<(), Fenced> {
        if self.holds(Instant::now()) {
            return Ok(());
        }
        self.refused.inc();
        self.lapsed.notify_one();
        tracing::warn!("write not sent: the leader Lease may have expired");
        Err(Fenced::Lapsed)
    }

    /// Completes when a write was refused (for the elector, which then steps down).
    pub async fn refused_write(&self) {
        self.lapsed.notified().await;
    }
}

tokio::task_local! {
    static PASS: Fence;
}

/// Runs `pass` with `fence` guarding its writes ([`check`]).
pub fn scope<F: Future>(fence: Fence, pass: F) -> impl Future<Output = F::Output> {
    PASS.scope(fence, pass)
}

/// Whether the pass running now may send a write; refused outside [`scope`].
pub fn check() -> Result<(), Fenced> {
    PASS.try_with(Fence::check).unwrap_or(Err(Fenced::NoScope))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_deadline_counts_from_the_send_minus_the_margin() {
        let sent = Instant::now();
        assert_eq!(deadline(sent, S(15), S(2)), Some(sent + S(13)));
        assert_eq!(deadline(sent, S(2), S(2)), None, "no window at all");
        assert_eq!(deadline(sent, S(1), S(2)), None);
        assert_eq!(margin_for(S(15), S(2)), S(2));
        assert_eq!(
            margin_for(S(2), S(2)),
            Duration::from_millis(500),
            "a quarter of a short one"
        );
        assert_eq!(renew_every(S(15), S(1)), Duration::from_secs(14) / 3);
        assert_eq!(renew_every(S(2), S(1)), Duration::from_millis(500));
    }

    #[test]
    fn a_fence_holds_only_until_its_deadline() {
        let refused = Counter::default();
        let f = Fence::new(S(2), refused.clone());
        let t = Instant::now();
        assert!(!f.holds(t), "nothing renewed yet");
        f.renewed(t, S(15));
        assert!(f.holds(t + Duration::from_millis(12_900)));
        assert!(!f.holds(t + S(13)), "the margin is kept back");
        // A renewal sent long ago (a paused process) gives a lapsed fence.
        f.renewed(Instant::now() - S(14), S(15));
        assert_eq!(f.check(), Err(Fenced::Lapsed));
        assert_eq!(refused.get(), 1);
        f.renewed(Instant::now(), S(15));
        assert_eq!(f.check(), Ok(()));
        f.revoke();
        assert_eq!(f.check(), Err(Fenced::Lapsed));
        assert_eq!(refused.get(), 2);
    }

    #[tokio::test]
    async fn writes_outside_a_pass_are_refused() {
        assert_eq!(check(), Err(Fenced::NoScope));
        let f = Fence::new(S(1), Counter::default());
        f.renewed(Instant::now(), S(15));
        assert_eq!(scope(f.clone(), async { check() }).await, Ok(()));
        f.revoke();
        assert_eq!(
            scope(f.clone(), async { check() }).await,
            Err(Fenced::Lapsed)
        );
        // The elector hears of the refusal.
        tokio::time::timeout(S(1), f.refused_write())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
