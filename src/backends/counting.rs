//! A wrapper that counts the calls a backend receives, to measure the round trips that
//! renewal and waiting cost (used by `dlock bench`).

use crate::core::backend::{AcquireRequest, Attempt, Backend, Capabilities, KeyWatch, LockInfo};
use crate::core::owner::Owner;
use crate::error::Result;
use crate::key::Key;
use async_trait::async_trait;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many calls of each kind a [`Counting`] backend has passed on.
#[derive(Debug, Default)]
pub struct CallCounts {
    /// `try_acquire` calls.
    pub try_acquire: AtomicU64,
    /// `acquire_wait` calls.
    pub acquire_wait: AtomicU64,
    /// `renew` calls.
    pub renew: AtomicU64,
    /// `release` calls.
    pub release: AtomicU64,
}

impl CallCounts {
    /// The `renew` calls so far.
    pub fn renewals(&self) -> u64 {
        self.renew.load(Ordering::Relaxed)
    }
}

/// Passes every call to `inner` and counts it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), dlock::Error> {
/// use dlock::backends::counting::Counting;
/// let inner = dlock::connect("memory://").await?;
/// let counting = Counting::new(inner.backend().clone());
/// let counts = counting.counts();
/// let locks = dlock::Locks::from_backend(counting);
/// locks.lock("k").acquire().await?.release().await?;
/// assert_eq!(counts.release.load(std::sync::atomic::Ordering::Relaxed), 1);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Counting {
    inner: Arc<dyn Backend>,
    counts: Arc<CallCounts>,
}

impl Counting {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        Counting {
            inner,
            counts: Arc::default(),
        }
    }

    /// The counters, shared with the wrapper.
    pub fn counts(&self) -> Arc<CallCounts> {
        Arc::clone(&self.counts)
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[async_trait]
impl Backend for Counting {
    fn describe(&self) -> &str {
        self.inner.describe()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn try_acquire(&self, request: AcquireRequest<'_>) -> Result<Attempt> {
        bump(&self.counts.try_acquire);
        self.inner.try_acquire(request).await
    }

    async fn acquire_wait(
        &self,
        request: AcquireRequest<'_>,
        deadline: Option<Instant>,
    ) -> Result<Option<u64>> {
        bump(&self.counts.acquire_wait);
        self.inner.acquire_wait(request, deadline).await
    }

    async fn renew(&self, key: &Key, owner: &Owner, ttl: Duration) -> Result<bool> {
        bump(&self.counts.renew);
        self.inner.renew(key, owner, ttl).await
    }

    async fn release(&self, key: &Key, owner: &Owner) -> Result<bool> {
        bump(&self.counts.release);
        self.inner.release(key, owner).await
    }

    async fn watch(&self, key: &Key) -> Result<Option<Box<dyn KeyWatch>>> {
        self.inner.watch(key).await
    }

    async fn session_ended(&self, key: &Key, owner: &Owner) -> String {
        self.inner.session_ended(key, owner).await
    }

    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        self.inner.inspect(key).await
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        self.inner.list().await
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        self.inner.force_release(key).await
    }
}
