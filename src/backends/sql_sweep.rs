//! When the SQL backends sweep stale rows (expired leases, holder rows of ended
//! sessions): at most once per interval per handle, in the background.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Says when the next sweep is due.
#[derive(Debug)]
pub(crate) struct SweepClock {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl SweepClock {
    /// A clock whose first sweep is due at once (`at_once`: short-lived clients such as
    /// the CLI sweep too) or one interval from now.
    pub(crate) fn new(every: Duration, at_once: bool) -> Self {
        SweepClock {
            every,
            last: Mutex::new((!at_once).then(Instant::now)),
        }
    }

    /// True at most once per interval: the caller sweeps now.
    pub(crate) fn due(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < self.every) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}
