//! Decides when a burst of watch events for one key reaches a controller: the first at once,
//! then at most one per window, the last of a burst at its window's end (leading and trailing
//! edge). kube-runtime's debounce has only the trailing edge, which holds everything back for
//! as long as events keep coming; a pool's status would not move during a burst.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

/// What the throttle remembers per key.
struct Keys<T, K> {
    window: Duration,
    /// When each key last passed.
    passed: HashMap<T, Instant>,
    /// The latest item of each key held back, and when it may pass.
    held: HashMap<T, (Instant, K)>,
}

impl<T: Hash + Eq + Clone, K> Keys<T, K> {
    /// `item` of `key` arriving at `now`: passed on at once, or held until its window's end
    /// (replacing what was held: the latest stands for all).
    fn arrive(&mut self, key: T, item: K, now: Instant) -> Option<K> {
        match self.passed.get(&key) {
            Some(&at) if now < at + self.window => {
                self.held.insert(key, (at + self.window, item));
                None
            }
            _ => {
                self.passed.insert(key, now);
                Some(item)
            }
        }
    }

    /// A held item whose time came by `now`.
    fn ripe(&mut self, now: Instant) -> Option<K> {
        let key = self
            .held
            .iter()
            .find(|(_, (at, _))| *at <= now)
            .map(|(k, _)| k.clone())?;
        let (_, item) = self.held.remove(&key)?;
        self.passed.insert(key, now);
        Some(item)
    }

    /// When the next held item may pass.
    fn next_due(&self) -> Option<Instant> {
        self.held.values().map(|(at, _)| *at).min()
    }

    /// Any held item, at the end of the input.
    fn flush(&mut self) -> Option<K> {
        let key = self.held.keys().next().cloned()?;
        self.held.remove(&key).map(|(_, item)| item)
    }
}

/// `input` with the items of each `key` throttled to one per `window`: the first of a burst
/// passes at once, the latest of the rest at the window's end. Errors pass at once.
pub fn throttled<K, E, T, F>(
    input: impl Stream<Item = Result<K, E>> + Send + 'static,
    window: Duration,
    key: F,
) -> BoxStream<'static, Result<K, E>>
where
    K: Send + 'static,
    E: Send + 'static,
    T: Hash + Eq + Clone + Send + 'static,
    F: Fn(&K) -> T + Send + 'static,
{
    let keys = Keys {
        window,
        passed: HashMap::new(),
        held: HashMap::new(),
    };
    let input = input.boxed();
    futures::stream::unfold(
        (input, keys, key, false),
        |(mut input, mut keys, key, mut ended)| async move {
            loop {
                if let Some(item) = keys.ripe(Instant::now()) {
                    return Some((Ok(item), (input, keys, key, ended)));
                }
                if ended {
                    let item = keys.flush()?;
                    return Some((Ok(item), (input, keys, key, ended)));
                }
                let next = match keys.next_due() {
                    Some(at) => tokio::select! {
                        next = input.next() => next,
                        () = tokio::time::sleep_until(at) => continue,
                    },
                    None => input.next().await,
                };
                match next {
                    None => ended = true,
                    Some(Err(e)) => return Some((Err(e), (input, keys, key, ended))),
                    Some(Ok(item)) => {
                        if let Some(item) = keys.arrive(key(&item), item, Instant::now()) {
                            return Some((Ok(item), (input, keys, key, ended)));
                        }
                    }
                }
            }
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    const WINDOW: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_its_first_at_once_and_its_last_at_the_windows_end() {
        let (tx, mut rx) = mpsc::unbounded_channel::<Result<(&str, u32), ()>>();
        // The test decides when each item arrives.
        let input = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut out = throttled(input, WINDOW, |(pool, _)| *pool);
        let start = Instant::now();
        let send = |item| tx.send(Ok(item)).unwrap_or_else(|_| panic!("closed"));

        send(("a", 1));
        assert_eq!(out.next().await, Some(Ok(("a", 1))), "the first at once");
        assert_eq!(Instant::now(), start);

        // The rest of the burst: only the latest passes, at the window's end.
        send(("a", 2));
        send(("a", 3));
        // Another key is not held back by the first.
        send(("b", 1));
        assert_eq!(out.next().await, Some(Ok(("b", 1))));
        assert_eq!(Instant::now(), start);
        assert_eq!(
            out.next().await,
            Some(Ok(("a", 3))),
            "the latest stands for all"
        );
        assert_eq!(Instant::now(), start + WINDOW);

        // Errors are never held.
        tx.send(Err(())).unwrap_or_else(|_| panic!("closed"));
        assert_eq!(out.next().await, Some(Err(())));

        // Quiet for a window: the next passes at once again.
        tokio::time::sleep(WINDOW * 2).await;
        let at = Instant::now();
        send(("a", 4));
        assert_eq!(out.next().await, Some(Ok(("a", 4))));
        assert_eq!(Instant::now(), at);

        // What is held when the input ends still passes.
        send(("a", 5));
        drop(tx);
        assert_eq!(out.next().await, Some(Ok(("a", 5))));
        assert_eq!(out.next().await, None);
    }
}
