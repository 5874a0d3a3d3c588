//! The [`Backend`] trait: what a store must do to hold leases, and nothing more.
//!
//! Renewal, loss detection, deadlines, backoff and cancellation live once in the
//! core lease engine; a backend only speaks its store's protocol.

use crate::core::owner::Owner;
use crate::error::Result;
use crate::key::Key;
use async_trait::async_trait;
use serde::Serialize;
use std::time::{Duration, Instant, SystemTime};

/// Who is asking for a lease, for backends that can store it beside the lock
/// so that `dlock status` can show it.
#[derive(Debug, Clone)]
pub struct Holder {
    /// Process id of the requesting process.
    pub pid: u32,
    /// Host name of the requesting machine.
    pub host: String,
    /// When the request was made (wall clock, for display only).
    pub requested_at: SystemTime,
}

impl Holder {
    /// The current process on this host.
    pub fn current() -> Self {
        Holder {
            pid: std::process::id(),
            host: crate::core::host::host_name(),
            requested_at: SystemTime::now(),
        }
    }
}

/// One request to take a lock.
#[derive(Debug, Clone, Copy)]
pub struct AcquireRequest<'a> {
    /// The key to lock.
    pub key: &'a Key,
    /// The owner token of the new lease; only it can renew or release the lease.
    pub owner: &'a Owner,
    /// How long the lease lasts unless renewed.
    pub ttl: Duration,
    /// Who asks.
    pub holder: &'a Holder,
}

/// The result of one attempt to take a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The lock is ours, with this fencing token.
    Acquired {
        /// Strictly greater than every fence handed out earlier for this key.
        fence: u64,
    },
    /// Somebody else holds it.
    Held {
        /// When the current holder's lease runs out unless renewed, if the backend knows;
        /// a waiter without a wake-up notification retries no later than this.
        expires_in: Option<Duration>,
    },
}

/// What a backend can do beyond the required operations; the engine adapts to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Leases end by themselves after their TTL when not renewed. False for stores
    /// where a lock lives exactly as long as its holder's session (flock, advisory locks).
    pub expires: bool,
    /// [`Backend::acquire_wait`] waits in the store's own queue (kernel flock, PostgreSQL
    /// advisory-lock queue) and the engine should use it instead of try-and-wait.
    pub native_wait: bool,
    /// A holder process that dies frees the lock at once because the store sees its
    /// session end (flock, database sessions), not only after the TTL.
    pub freed_on_holder_death: bool,
    /// Locks are visible to other processes (false only for `memory://`).
    pub shared_between_processes: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            expires: true,
            native_wait: false,
            freed_on_holder_death: false,
            shared_between_processes: true,
        }
    }
}

/// A subscription to "this key may have become free" events, created before an
/// acquire attempt so that a release between the attempt and the wait is not missed.
#[async_trait]
pub trait KeyWatch: Send {
    /// Resolves at the next event after the previous call (or after creation).
    /// Spurious wake-ups are allowed; missed ones are not.
    async fn changed(&mut self);
}

/// What is known about one held lock, for `status` and `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockInfo {
    /// The key.
    pub key: String,
    /// The holder's owner token, where the store keeps it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The holder's fencing token, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    /// The holder's process id, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The holder's host name, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// When the lease was acquired.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "crate::core::serde_time::opt"
    )]
    pub acquired_at: Option<SystemTime>,
    /// When the lease was last renewed.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "crate::core::serde_time::opt"
    )]
    pub renewed_at: Option<SystemTime>,
    /// When the lease ends unless renewed (for stores with TTLs).
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "crate::core::serde_time::opt"
    )]
    pub expires_at: Option<SystemTime>,
    /// The lease's TTL as requested by the holder.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "crate::core::serde_time::opt_duration_ms",
        rename = "ttl_ms"
    )]
    pub ttl: Option<Duration>,
    /// Backend-specific remarks for an operator (for example "held by a process that
    /// does not use dlock", or "not renewed for 3 TTLs: the holder may be hung").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl LockInfo {
    /// A record with only the key set.
    pub fn new(key: impl Into<String>) -> Self {
        LockInfo {
            key: key.into(),
            owner: None,
            fence: None,
            pid: None,
            host: None,
            acquired_at: None,
            renewed_at: None,
            expires_at: None,
            ttl: None,
            note: None,
        }
    }
}

/// What a store must do to hold leases. Implemented once per backend; everything
/// else (renewal, loss detection, waiting, deadlines) is the engine's.
///
/// Every method must be cancel-safe: when its future is dropped, no lock may be left
/// held that the engine does not know about.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// The backend's URL with any password replaced by `***`, for messages.
    fn describe(&self) -> &str;

    /// What this backend can do beyond the required operations.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// One attempt to take the lock (one round trip where the store allows).
    async fn try_acquire(&self, request: AcquireRequest<'_>) -> Result<Attempt>;

    /// Waits in the store's own queue until the lock is taken or `deadline` passes
    /// (`None` = no limit). Returns the fence, or `None` when the deadline passed.
    /// Only called when [`Capabilities::native_wait`] is set.
    async fn acquire_wait(
        &self,
        request: AcquireRequest<'_>,
        deadline: Option<Instant>,
    ) -> Result<Option<u64>> {
        let _ = (request, deadline);
        Err(crate::error::Error::Unsupported {
            backend: self.describe().to_owned(),
            what: "waiting in the store's own queue".to_owned(),
        })
    }

    /// Extends the lease to `ttl` from now if `owner` still holds it; `false` if not.
    async fn renew(&self, key: &Key, owner: &Owner, ttl: Duration) -> Result<bool>;

    /// Releases the lease if `owner` still holds it; `false` if it did not.
    async fn release(&self, key: &Key, owner: &Owner) -> Result<bool>;

    /// Subscribes to "may be free" events for `key`; `None` if the store has none
    /// (the engine then retries with backoff, never later than the holder's expiry).
    async fn watch(&self, key: &Key) -> Result<Option<Box<dyn KeyWatch>>> {
        let _ = key;
        Ok(None)
    }

    /// Resolves when the store-side session holding `owner`'s lease ends, for stores whose
    /// locks are tied to a session (the engine then reports the lease lost at once).
    /// The default never resolves.
    async fn session_ended(&self, key: &Key, owner: &Owner) -> String {
        let _ = (key, owner);
        std::future::pending().await
    }

    /// Who holds `key`, if anybody.
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>>;

    /// Every lock currently held.
    async fn list(&self) -> Result<Vec<LockInfo>>;

    /// Breaks the lock on `key` whoever holds it; `true` if it was held.
    async fn force_release(&self, key: &Key) -> Result<bool>;
}
