//! A wrapper that counts the calls a backend receives, to measure the round trips that
//! renewal and waiting cost (used by `dlock-bench`).

use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, EndSignal, Granted, HeldLease, KeyWatch,
    LockInfo,
};
use crate::core::owner::Owner;
use crate::error::Result;
use crate::key::Key;
use async_trait::async_trait;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How many calls of each kind a [`Counting`] backend has passed on.
#[derive(Debug, Default)]
pub struct CallCounts {
    /// `try_acquire` calls.
    pub try_acquire: AtomicU64,
    /// `acquire` calls (waits, in the store's queue or the engine's loop).
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
/// # async fn main() -> Result<(), fencelock::Error> {
/// use fencelock::backends::counting::Counting;
/// let inner = fencelock::connect("memory://").await?;
/// let counting = Counting::new(inner.backend().clone());
/// let counts = counting.counts();
/// let locks = fencelock::Locks::from_backend(counting);
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

/// A lease of the wrapped backend, counting its renewals and release.
struct CountingLease {
    inner: Box<dyn HeldLease>,
    counts: Arc<CallCounts>,
}

#[async_trait]
impl HeldLease for CountingLease {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        bump(&self.counts.renew);
        self.inner.renew(ttl).await
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        bump(&self.counts.release);
        self.inner.release().await
    }

    async fn expire_after(self: Box<Self>, ttl: Duration) -> Result<bool> {
        bump(&self.counts.renew);
        self.inner.expire_after(ttl).await
    }

    fn release_keeps_call_order(&self) -> bool {
        self.inner.release_keeps_call_order()
    }

    fn ended(&mut self) -> EndSignal {
        self.inner.ended()
    }
}

impl Counting {
    fn wrap(&self, granted: Granted) -> Granted {
        Granted {
            lease: Box::new(CountingLease {
                inner: granted.lease,
                counts: Arc::clone(&self.counts),
            }),
            ..granted
        }
    }
}

#[async_trait]
impl Backend for Counting {
    fn describe(&self) -> &str {
        self.inner.describe()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        bump(&self.counts.try_acquire);
        Ok(match self.inner.try_acquire(request).await? {
            Attempt::Acquired(granted) => Attempt::Acquired(self.wrap(granted)),
            held => held,
        })
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Option<Granted>> {
        bump(&self.counts.acquire_wait);
        Ok(self
            .inner
            .acquire(request)
            .await?
            .map(|granted| self.wrap(granted)))
    }

    async fn watch(&self, key: &Key) -> Result<Option<Box<dyn KeyWatch>>> {
        self.inner.watch(key).await
    }

    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        self.inner.abandon(key, owner).await
    }
}

#[async_trait]
impl Admin for Counting {
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
