//! All-or-nothing locks on several keys, built on single-key leases by the engine, so
//! they work on every backend.

use crate::core::lease::Lease;
use crate::core::locks::{LockBuilder, Wait};
use crate::error::{Error, LossReason, Result};
use crate::key::Key;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// The options of an all-or-nothing lock on several keys, from
/// [`Locks::lock_all`](crate::Locks::lock_all); the same as [`LockBuilder`]'s, applied to
/// every key. The wait covers the whole set: its deadline is shared by all the keys.
#[derive(Debug, Clone)]
#[must_use = "a MultiLockBuilder does nothing until acquire() or try_acquire() is called"]
pub struct MultiLockBuilder {
    template: LockBuilder,
    keys: Result<Vec<Key>>,
}

macro_rules! delegate {
    ($($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $($arg: $ty),*) -> Self {
                self.template = self.template.$name($($arg),*);
                self
            }
        )*
    };
}

impl MultiLockBuilder {
    pub(crate) fn new(template: LockBuilder, keys: Result<Vec<Key>>) -> Self {
        let keys = keys.and_then(|mut keys| {
            if keys.is_empty() {
                return Err(Error::BadOption(
                    "lock_all needs at least one key".to_owned(),
                ));
            }
            // The canonical order that makes overlapping sets deadlock-free.
            keys.sort();
            keys.dedup();
            Ok(keys)
        });
        MultiLockBuilder { template, keys }
    }

    delegate! {
        /// Every lease's TTL (see [`LockBuilder::ttl`]).
        ttl(ttl: Duration);
        /// How long to wait for the whole set (see [`LockBuilder::wait`]).
        wait(wait: Wait);
        /// Wait up to `limit` for the whole set.
        wait_for(limit: Duration);
        /// One attempt per key, without waiting.
        no_wait();
        /// Retry delays (see [`LockBuilder::backoff`]).
        backoff(min: Duration, max: Duration);
        /// Automatic renewal (see [`LockBuilder::auto_renew`]).
        auto_renew(on: bool);
        /// Renewal interval (see [`LockBuilder::renew_every`]).
        renew_every(every: Duration);
        /// Take every key shared (see [`LockBuilder::shared`]).
        shared();
    }

    /// Takes every key, waiting as configured; [`Error::NotAcquired`] (naming the key
    /// that could not be had) when the wait runs out, with nothing left held.
    pub async fn acquire(self) -> Result<MultiLease> {
        let started = Instant::now();
        match self.acquire_inner(started).await? {
            Ok(all) => Ok(all),
            Err(key) => Err(Error::NotAcquired {
                key: key.to_string(),
                backend: self.template.locks().describe().to_owned(),
                waited: started.elapsed(),
            }),
        }
    }

    /// One attempt per key: every lease, or `None` (with nothing held) if any key is
    /// held elsewhere.
    pub async fn try_acquire(self) -> Result<Option<MultiLease>> {
        let this = self.no_wait();
        Ok(this.acquire_inner(Instant::now()).await?.ok())
    }

    /// `Ok(Err(key))` when `key` was not had in time.
    async fn acquire_inner(&self, started: Instant) -> Result<Result<MultiLease, Key>> {
        let keys = self.keys.clone()?;
        let deadline = match self.template.wait_mode() {
            Wait::No => None,
            Wait::For(limit) => Some(started + limit),
            Wait::Forever => None,
        };
        let mut parts: Vec<Lease> = Vec::with_capacity(keys.len());
        for key in keys {
            let builder = self.template.for_key(key.clone());
            let builder = match (self.template.wait_mode(), deadline) {
                (Wait::No, _) => builder.no_wait(),
                (_, Some(deadline)) => {
                    builder.wait_for(deadline.saturating_duration_since(Instant::now()))
                }
                (_, None) => builder,
            };
            // A dropped future drops `parts`, whose leases release in the background.
            match builder.acquire_or_none().await {
                Ok(Some(lease)) => parts.push(lease),
                Ok(None) => {
                    release_all(parts).await;
                    return Ok(Err(key));
                }
                Err(err) => {
                    release_all(parts).await;
                    return Err(err);
                }
            }
        }
        Ok(Ok(MultiLease { parts }))
    }
}

/// Releases leases taken so far, last first; failures leave them to their TTL.
async fn release_all(parts: Vec<Lease>) {
    for lease in parts.into_iter().rev() {
        if let Err(err) = lease.release().await {
            tracing::debug!(%err, "release of a partly acquired lock_all failed; it ends at its TTL");
        }
    }
}

/// Several keys held together, from [`Locks::lock_all`](crate::Locks::lock_all): one
/// lease per key (in the canonical order), released together.
#[must_use = "a MultiLease is released as soon as it is dropped"]
#[derive(Debug)]
pub struct MultiLease {
    parts: Vec<Lease>,
}

impl MultiLease {
    /// The keys held, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().map(Lease::key)
    }

    /// Each key with its fence, sorted by key. Pass each fence to the resource the key
    /// protects.
    pub fn fences(&self) -> Vec<(&str, u64)> {
        self.parts.iter().map(|l| (l.key(), l.fence())).collect()
    }

    /// The fence of `key`, if it is one of the keys held.
    pub fn fence_of(&self, key: &str) -> Option<u64> {
        self.parts.iter().find(|l| l.key() == key).map(Lease::fence)
    }

    /// The single-key leases.
    pub fn parts(&self) -> &[Lease] {
        &self.parts
    }

    /// Resolves when any of the keys may no longer be held, with that part's reason.
    pub fn lost(&self) -> impl Future<Output = LossReason> + Send + 'static {
        let mut all: Vec<Pin<Box<dyn Future<Output = LossReason> + Send>>> = self
            .parts
            .iter()
            .map(|l| Box::pin(l.lost()) as Pin<Box<dyn Future<Output = LossReason> + Send>>)
            .collect();
        std::future::poll_fn(move |cx| {
            for part in all.iter_mut() {
                if let std::task::Poll::Ready(reason) = part.as_mut().poll(cx) {
                    return std::task::Poll::Ready(reason);
                }
            }
            std::task::Poll::Pending
        })
    }

    /// True once any part may no longer be held.
    pub fn is_lost(&self) -> bool {
        self.parts.iter().any(Lease::is_lost)
    }

    /// Releases every key; `true` if every part was still held. Every part is released
    /// even if one fails; the first error is returned.
    pub async fn release(self) -> Result<bool> {
        let mut all_held = true;
        let mut first_error = None;
        for lease in self.parts.into_iter().rev() {
            match lease.release().await {
                Ok(held) => all_held &= held,
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(all_held),
        }
    }
}
