//! The [`Backend`] trait: what a store must do to hold leases, and nothing more.
//!
//! Renewal, loss detection, deadlines, backoff and cancellation live once in the
//! core lease engine; a backend only speaks its store's protocol.

use crate::core::backoff::Backoff;
use crate::core::owner::Owner;
use crate::error::{LossReason, Result};
use crate::key::Key;
use async_trait::async_trait;
use serde::Serialize;
use std::future::Future;
use std::pin::Pin;
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
    /// A value the holder publishes beside its lease (the leader's address in an
    /// election); backends store it where they store the pid and show it in
    /// [`LockInfo::value`]. `None` for plain locks.
    pub value: Option<String>,
}

impl Holder {
    /// The current process on this host.
    pub fn current() -> Self {
        Holder {
            pid: std::process::id(),
            host: crate::core::host::host_name(),
            requested_at: SystemTime::now(),
            value: None,
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
    /// When a waiting acquire gives up (`None`: never). [`Backend::try_acquire`] ignores it.
    pub deadline: Option<Instant>,
    /// Retry delays for waiting without a wake-up from the store.
    pub backoff: Backoff,
    /// Which kind of lease is asked for. The engine only sends a kind the backend
    /// declares in its [`Capabilities`].
    pub kind: LockKind,
}

/// The kind of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum LockKind {
    /// One holder at a time (the default).
    #[default]
    Exclusive,
    /// Readers share the key; a writer ([`LockKind::Exclusive`]) excludes every reader
    /// and writer.
    Shared,
    /// At most `permits` holders at a time, each with a lease of its own.
    Semaphore {
        /// How many leases the key admits at once; every holder must agree on it.
        permits: u32,
    },
}

/// A lease the store granted: its fence and the handle that owns its store-side state.
pub struct Granted {
    /// Strictly greater than every fence handed out earlier for this key.
    pub fence: u64,
    /// When the request that won the lock was sent: the lease is surely valid until
    /// then plus its TTL.
    pub sent_at: Instant,
    /// The lease's own state in the store (its connection, file, session…).
    pub lease: Box<dyn HeldLease>,
}

impl std::fmt::Debug for Granted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Granted")
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

/// The result of one attempt to take a lock.
#[derive(Debug)]
pub enum Attempt {
    /// The lock is ours.
    Acquired(Granted),
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
    /// where a lock lives exactly as long as its holder's session (flock, advisory locks):
    /// there a lease is given up only when renewals *fail* for a whole TTL.
    pub expires: bool,
    /// A holder process that dies frees the lock at once because the store sees its
    /// session end (flock, database sessions), not only after the TTL.
    pub freed_on_holder_death: bool,
    /// Locks are visible to other processes (false only for `memory://`).
    pub shared_between_processes: bool,
    /// The backend takes [`LockKind::Shared`] leases.
    pub shared_locks: bool,
    /// The backend takes [`LockKind::Semaphore`] leases.
    pub semaphores: bool,
}

impl Capabilities {
    /// A store whose leases expire at their TTL and are seen by every process: the
    /// usual case (Redis, lease tables).
    pub const fn expiring() -> Self {
        Capabilities {
            expires: true,
            freed_on_holder_death: false,
            shared_between_processes: true,
            shared_locks: false,
            semaphores: false,
        }
    }

    /// A store that ties each lock to its holder's session (flock, advisory locks).
    pub const fn session_bound() -> Self {
        Capabilities {
            expires: false,
            freed_on_holder_death: true,
            shared_between_processes: true,
            shared_locks: false,
            semaphores: false,
        }
    }

    /// Whether the backend takes leases of `kind`.
    pub fn supports(&self, kind: LockKind) -> bool {
        match kind {
            LockKind::Exclusive => true,
            LockKind::Shared => self.shared_locks,
            LockKind::Semaphore { .. } => self.semaphores,
        }
    }

    /// The same, visible to this process only.
    pub const fn process_local(self) -> Self {
        Capabilities {
            shared_between_processes: false,
            ..self
        }
    }
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities::expiring()
    }
}

/// The store-side state of one held lease, owned by the lease engine from the grant to
/// the release. Every operation of one lease goes through its own handle, so nothing of
/// one lease is looked up in tables shared with others.
///
/// The engine calls [`renew`](HeldLease::renew) and the future from
/// [`ended`](HeldLease::ended) concurrently, and bounds every call in time; a dropped
/// `renew` future (timed out) must leave the handle usable for [`release`](HeldLease::release)
/// (or make that release report the lease as not held).
#[async_trait]
pub trait HeldLease: Send + Sync + 'static {
    /// Extends the lease to `ttl` from now; `Ok(false)` if the store no longer knows it
    /// as held (expired, or broken by `release --force`).
    async fn renew(&mut self, ttl: Duration) -> Result<bool>;

    /// Releases the lease; `Ok(false)` if it was no longer held.
    async fn release(self: Box<Self>) -> Result<bool>;

    /// Makes the lease end by itself `ttl` from now, by the store's clock, and lets go of
    /// it without releasing; `Ok(false)` if the store no longer knows it as held. The
    /// engine calls it, on backends whose leases expire ([`Capabilities::expires`]), for
    /// a lease released before its hold-at-least time
    /// ([`Lease::release_after`](crate::Lease::release_after)), and drops the handle
    /// afterwards. The default is a [`renew`](HeldLease::renew) with `ttl`, which is
    /// right for stores whose renewal sets the remaining lifetime (a key's expiry, an
    /// expiry column); a store whose renewal cannot shorten a lease overrides it.
    async fn expire_after(mut self: Box<Self>, ttl: Duration) -> Result<bool> {
        self.renew(ttl).await
    }

    /// Whether this lease's release, once its future has been polled once, is on its
    /// way to the store ahead of every call that this backend handle sends afterwards,
    /// and is run by the store before them: one connection whose commands the server
    /// runs in the order sent, and a release that does not wait for anything before
    /// sending. The engine then lets the next task of this process that waits for the
    /// key try at once, its acquire queued behind the release on the connection, rather
    /// than after the release's reply comes back: a hand-off inside a process in one
    /// round trip instead of two. The store still decides every grant, so a wrong `true`
    /// costs speed, not safety (the attempt is refused and the waiter waits for the
    /// release's notification). The default is `false`.
    fn release_keeps_call_order(&self) -> bool {
        false
    }

    /// A future that resolves when the store reports the lease's end on its own (the
    /// session holding it died, its key was deleted). Taken once, right after the grant;
    /// it must not need the handle (it runs while `renew` does). The default never resolves.
    fn ended(&mut self) -> EndSignal {
        Box::pin(std::future::pending())
    }
}

/// The future returned by [`HeldLease::ended`].
pub type EndSignal = Pin<Box<dyn Future<Output = LossReason> + Send + 'static>>;

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
    /// The kind of the lock: absent for an exclusive lock, `"shared"` for a key held by
    /// readers, `"semaphore"` for a key held through permits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// For a semaphore: the number of permits its holders took it with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// The value the holder published ([`Holder::value`], the leader's value in an
    /// election).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// For a shared lock or a semaphore, which several leases hold at once: one record
    /// per lease (reader or permit), each with its own owner, fence, pid and times. The
    /// key's own owner and fence are then absent. Empty for an exclusive lock.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<LockInfo>,
}

/// The names [`LockInfo::kind`] uses.
pub(crate) fn kind_name(kind: LockKind) -> Option<&'static str> {
    match kind {
        LockKind::Exclusive => None,
        LockKind::Shared => Some("shared"),
        LockKind::Semaphore { .. } => Some("semaphore"),
    }
}

impl LockInfo {
    /// The record of a key held by several leases at once (readers, permits): the key,
    /// its kind and one record per holder.
    pub fn of_holders(key: impl Into<String>, kind: LockKind, holders: Vec<LockInfo>) -> Self {
        let mut info = LockInfo::new(key);
        info.kind = kind_name(kind).map(str::to_owned);
        if let LockKind::Semaphore { permits } = kind {
            info.permits = Some(permits);
        }
        info.holders = holders;
        info
    }

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
            kind: None,
            permits: None,
            value: None,
            holders: Vec::new(),
        }
    }
}

/// What a store must do to hold leases. Implemented once per backend; everything
/// else (renewal, loss detection, deadlines, retries of transient errors) is the engine's.
///
/// Every call the engine makes is bounded in time: acquire calls by the caller's
/// deadline plus a short grace, renewals by a fraction of the TTL. Every method must be
/// cancel-safe: when its future is dropped, no lock may be left held that
/// [`abandon`](Backend::abandon) cannot clean up.
///
/// A complete backend, keeping its locks in this process:
///
/// ```
/// use fencelock::backend::{
///     async_trait, AcquireRequest, Admin, Attempt, Backend, Granted, HeldLease, Owner,
/// };
/// use fencelock::{Key, LockInfo, Locks, Result};
/// use std::collections::HashMap;
/// use std::sync::{Arc, Mutex};
/// use std::time::{Duration, Instant};
///
/// #[derive(Debug, Default)]
/// struct Table {
///     held: HashMap<Key, (Owner, u64, Instant)>,
///     last_fence: u64,
/// }
///
/// #[derive(Debug, Default)]
/// struct Tiny(Arc<Mutex<Table>>);
///
/// struct TinyLease { table: Arc<Mutex<Table>>, key: Key, owner: Owner }
///
/// #[async_trait]
/// impl HeldLease for TinyLease {
///     async fn renew(&mut self, ttl: Duration) -> Result<bool> {
///         let mut t = self.table.lock().unwrap();
///         Ok(match t.held.get_mut(&self.key) {
///             Some((o, _, until)) if *o == self.owner && *until > Instant::now() => {
///                 *until = Instant::now() + ttl;
///                 true
///             }
///             _ => false,
///         })
///     }
///     async fn release(self: Box<Self>) -> Result<bool> {
///         let mut t = self.table.lock().unwrap();
///         let mine = t.held.get(&self.key).is_some_and(|(o, _, _)| *o == self.owner);
///         if mine {
///             t.held.remove(&self.key);
///         }
///         Ok(mine)
///     }
/// }
///
/// #[async_trait]
/// impl Admin for Tiny {
///     async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
///         let t = self.0.lock().unwrap();
///         Ok(t.held.get(key).map(|(_, fence, _)| {
///             let mut info = LockInfo::new(key.as_str());
///             info.fence = Some(*fence);
///             info
///         }))
///     }
///     async fn list(&self) -> Result<Vec<LockInfo>> {
///         Ok(Vec::new())
///     }
///     async fn force_release(&self, key: &Key) -> Result<bool> {
///         Ok(self.0.lock().unwrap().held.remove(key).is_some())
///     }
/// }
///
/// #[async_trait]
/// impl Backend for Tiny {
///     fn describe(&self) -> &str {
///         "tiny://"
///     }
///     async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
///         let sent_at = Instant::now();
///         let mut t = self.0.lock().unwrap();
///         if let Some((_, _, until)) = t.held.get(request.key) {
///             if *until > sent_at {
///                 return Ok(Attempt::Held { expires_in: Some(*until - sent_at) });
///             }
///         }
///         t.last_fence += 1;
///         let fence = t.last_fence;
///         t.held.insert(request.key.clone(), (request.owner.clone(), fence, sent_at + request.ttl));
///         let lease = TinyLease {
///             table: Arc::clone(&self.0),
///             key: request.key.clone(),
///             owner: request.owner.clone(),
///         };
///         Ok(Attempt::Acquired(Granted { fence, sent_at, lease: Box::new(lease) }))
///     }
///     async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
///         let mut t = self.0.lock().unwrap();
///         if t.held.get(key).is_some_and(|(o, _, _)| o == owner) {
///             t.held.remove(key);
///         }
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<()> {
/// let locks = Locks::from_backend(Tiny::default());
/// let lease = locks.lock("k").acquire().await?;
/// assert!(locks.lock("k").try_acquire().await?.is_none());
/// assert!(lease.release().await?);
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Backend: Admin + Send + Sync + std::fmt::Debug + 'static {
    /// The backend's URL with any credential replaced by `***`, for messages.
    fn describe(&self) -> &str;

    /// What this backend can do beyond the required operations.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// One attempt to take the lock (one round trip where the store allows).
    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt>;

    /// Takes the lock, waiting until `request.deadline` (`None`: without limit); `None`
    /// when the deadline passed first. The default is the engine's loop over
    /// [`try_acquire`](Backend::try_acquire), woken by [`watch`](Backend::watch) and the
    /// holder's expiry, retrying transient errors; a store with a queue of its own
    /// (kernel flock, advisory-lock queues) overrides it.
    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Option<Granted>> {
        crate::core::wait::poll_until_acquired(self, request).await
    }

    /// Subscribes to "may be free" events for `key`; `None` if the store has none
    /// (the engine then retries with backoff, never later than the holder's expiry).
    async fn watch(&self, key: &Key) -> Result<Option<Box<dyn KeyWatch>>> {
        let _ = key;
        Ok(None)
    }

    /// Frees whatever an acquire with `owner` may have taken in the store although its
    /// caller never saw the grant (the call was cancelled or timed out midway). Stores
    /// whose grant dies with the dropped call (a connection or file of its own) need not
    /// do anything, which is the default.
    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        let _ = (key, owner);
        Ok(())
    }
}

/// Inspection and administration, for `dlock status`, `list` and `release --force`.
#[async_trait]
pub trait Admin: Send + Sync {
    /// Who holds `key`, if anybody.
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>>;

    /// Every lock currently held.
    async fn list(&self) -> Result<Vec<LockInfo>>;

    /// Breaks the lock on `key` whoever holds it; `true` if it was held.
    async fn force_release(&self, key: &Key) -> Result<bool>;
}
