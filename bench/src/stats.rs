//! Percentiles and the few numbers every section prints: samples in, summary out.

use std::time::Duration;

/// A set of latency samples, sorted on construction.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    sorted: Vec<Duration>,
}

impl Samples {
    /// Sorts `samples` once.
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self { sorted: samples }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The nearest-rank percentile `p` (0–100); zero when empty.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let n = self.sorted.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        let index = rank.clamp(1, n) - 1;
        self.sorted.get(index).copied().unwrap_or_default()
    }

    pub fn p50(&self) -> Duration {
        self.percentile(50.0)
    }

    pub fn p95(&self) -> Duration {
        self.percentile(95.0)
    }

    pub fn p99(&self) -> Duration {
        self.percentile(99.0)
    }

    pub fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }

    /// The samples in increasing order (for a CDF).
    pub fn sorted(&self) -> &[Duration] {
        &self.sorted
    }
}

/// Seconds with millisecond precision, as the report prints them.
pub fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// Microseconds with one decimal.
pub fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// `a / b`, or NaN when `b` is zero.
pub fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        f64::NAN
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s = Samples::new((1..=10).rev().map(Duration::from_secs).collect());
        assert_eq!(s.p50(), Duration::from_secs(5));
        assert_eq!(s.p95(), Duration::from_secs(10));
        assert_eq!(s.percentile(0.0), Duration::from_secs(1));
        assert_eq!(Samples::default().p99(), Duration::ZERO);
    }
}
