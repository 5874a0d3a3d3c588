//! Retry delays with exponential growth and full jitter.

use rand::Rng;
use std::time::Duration;

/// How long a waiter without a wake-up notification pauses between attempts:
/// starting at `min`, doubling up to `max`, each delay drawn at random from its upper
/// half so that many waiters do not retry in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub min: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(5),
            max: Duration::from_secs(1),
        }
    }
}

/// The delays of one acquire call.
#[derive(Debug)]
pub(crate) struct Delays {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn delays(&self) -> Delays {
        Delays {
            next: self.min,
            max: self.max.max(self.min),
        }
    }
}

impl Delays {
    /// The next delay, jittered into [d/2, d].
    pub(crate) fn next_delay(&mut self) -> Duration {
        let current = self.next;
        self.next = (self.next * 2).min(self.max);
        jitter_upper_half(current)
    }

    /// The largest delay, jittered the same way.
    pub(crate) fn ceiling(&self) -> Duration {
        jitter_upper_half(self.max)
    }
}

pub(crate) fn jitter_upper_half(d: Duration) -> Duration {
    let half = d / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return d;
    }
    half + Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

/// A small random delay added to a known expiry, so that waiters woken by the same
/// expiry do not all retry in the same millisecond.
pub(crate) fn expiry_spread(d: Duration) -> Duration {
    let spread_ms = (d.as_millis() / 50).clamp(1, 50);
    let spread = u64::try_from(spread_ms).unwrap_or(50);
    d + Duration::from_micros(rand::rng().random_range(0..=spread * 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_max_with_jitter() {
        let mut delays = Backoff {
            min: Duration::from_millis(10),
            max: Duration::from_millis(80),
        }
        .delays();
        let seen: Vec<_> = (0..6).map(|_| delays.next_delay()).collect();
        assert!(seen[0] >= Duration::from_millis(5) && seen[0] <= Duration::from_millis(10));
        assert!(seen[5] >= Duration::from_millis(40) && seen[5] <= Duration::from_millis(80));
    }
}
