//! `memory://[name]`: locks inside one process, for tests and single-process programs.
//!
//! All handles opened on the same URL in one process share one store, so fences keep
//! increasing across handles. Waiters are woken by a broadcast at release; a holder
//! that stops renewing loses the lock at its TTL.

use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, Granted, HeldLease, KeyWatch, LockInfo,
};
use crate::core::owner::Owner;
use crate::error::Result;
use crate::key::Key;
use crate::location::BackendUrl;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::broadcast;

#[derive(Debug)]
struct Entry {
    owner: Owner,
    fence: u64,
    expires: Instant,
    ttl: Duration,
    pid: u32,
    host: String,
    acquired_at: SystemTime,
    renewed_at: SystemTime,
}

#[derive(Debug)]
struct Store {
    held: Mutex<HashMap<Key, Entry>>,
    /// One counter for every key: strictly increasing per key, and it never needs
    /// to remember released keys.
    last_fence: Mutex<u64>,
    released: broadcast::Sender<Key>,
    /// The map's size after the last sweep of expired entries.
    swept_at: AtomicUsize,
}

impl Store {
    fn new() -> Self {
        Store {
            held: Mutex::new(HashMap::new()),
            last_fence: Mutex::new(0),
            released: broadcast::channel(1024).0,
            swept_at: AtomicUsize::new(32),
        }
    }

    fn held(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_fence(&self) -> u64 {
        let mut last = self
            .last_fence
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *last += 1;
        *last
    }

    fn announce_release(&self, key: &Key) {
        // No receiver means no waiter: nothing to wake.
        let _ = self.released.send(key.clone());
    }

    /// Removes `owner`'s entry for `key`: `Some(still valid)` if it was there.
    fn release(&self, key: &Key, owner: &Owner) -> bool {
        let now = Instant::now();
        let removed = {
            let mut held = self.held();
            match held.get(key) {
                Some(entry) if entry.owner == *owner => {
                    let was_valid = entry.expires > now;
                    held.remove(key);
                    Some(was_valid)
                }
                _ => None,
            }
        };
        match removed {
            Some(was_valid) => {
                self.announce_release(key);
                was_valid
            }
            None => false,
        }
    }
}

/// One lease held in the store.
struct MemoryLease {
    store: Arc<Store>,
    key: Key,
    owner: Owner,
}

#[async_trait]
impl HeldLease for MemoryLease {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let now = Instant::now();
        let mut held = self.store.held();
        match held.get_mut(&self.key) {
            Some(entry) if entry.owner == self.owner && entry.expires > now => {
                entry.expires = now + ttl;
                entry.ttl = ttl;
                entry.renewed_at = SystemTime::now();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        Ok(self.store.release(&self.key, &self.owner))
    }
}

/// The in-process backend.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    store: Arc<Store>,
    describe: String,
}

impl MemoryBackend {
    /// Opens the process-wide store named by the URL's host (`memory://` is the default one).
    pub fn open(url: &BackendUrl) -> Result<Self> {
        url.reject_unknown_options(&[])?;
        let name = url.url().host_str().unwrap_or("").to_owned();
        static STORES: OnceLock<Mutex<HashMap<String, Arc<Store>>>> = OnceLock::new();
        let stores = STORES.get_or_init(|| Mutex::new(HashMap::new()));
        let store = Arc::clone(
            stores
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(name.clone())
                .or_insert_with(|| Arc::new(Store::new())),
        );
        Ok(MemoryBackend {
            store,
            describe: format!("memory://{name}"),
        })
    }
}

/// Opens `memory://[name]`.
pub(crate) async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(MemoryBackend::open(&BackendUrl::parse(url)?)?))
}

fn info(key: &Key, entry: &Entry, now: Instant) -> LockInfo {
    let mut info = LockInfo::new(key.as_str());
    info.owner = Some(entry.owner.to_string());
    info.fence = Some(entry.fence);
    info.pid = Some(entry.pid);
    info.host = Some(entry.host.clone());
    info.acquired_at = Some(entry.acquired_at);
    info.renewed_at = Some(entry.renewed_at);
    info.expires_at = Some(SystemTime::now() + entry.expires.saturating_duration_since(now));
    info.ttl = Some(entry.ttl);
    info
}

struct MemoryWatch {
    key: Key,
    rx: broadcast::Receiver<Key>,
}

#[async_trait]
impl KeyWatch for MemoryWatch {
    async fn changed(&mut self) {
        loop {
            match self.rx.recv().await {
                Ok(key) if key == self.key => return,
                Ok(_) => continue,
                // Missed messages may have been ours: wake to be safe.
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::expiring().process_local()
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let now = Instant::now();
        let mut held = self.store.held();
        if let Some(entry) = held.get(request.key) {
            if entry.expires > now {
                return Ok(Attempt::Held {
                    expires_in: Some(entry.expires - now),
                });
            }
        }
        // Holders that stopped renewing leave entries behind; sweep them once the map has
        // doubled since the last sweep, so its size stays proportional to the live locks.
        if held.len() >= 64 && held.len() >= 2 * self.store.swept_at.load(Ordering::Relaxed) {
            held.retain(|_, entry| entry.expires > now);
            self.store
                .swept_at
                .store(held.len().max(32), Ordering::Relaxed);
        }
        let fence = self.store.next_fence();
        let wall = SystemTime::now();
        held.insert(
            request.key.clone(),
            Entry {
                owner: request.owner.clone(),
                fence,
                expires: now + request.ttl,
                ttl: request.ttl,
                pid: request.holder.pid,
                host: request.holder.host.clone(),
                acquired_at: wall,
                renewed_at: wall,
            },
        );
        Ok(Attempt::Acquired(Granted {
            fence,
            sent_at: now,
            lease: Box::new(MemoryLease {
                store: Arc::clone(&self.store),
                key: request.key.clone(),
                owner: request.owner.clone(),
            }),
        }))
    }

    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        self.store.release(key, owner);
        Ok(())
    }

    async fn watch(&self, key: &Key) -> Result<Option<Box<dyn KeyWatch>>> {
        Ok(Some(Box::new(MemoryWatch {
            key: key.clone(),
            rx: self.store.released.subscribe(),
        })))
    }
}

#[async_trait]
impl Admin for MemoryBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let now = Instant::now();
        let held = self.store.held();
        Ok(held
            .get(key)
            .filter(|entry| entry.expires > now)
            .map(|entry| info(key, entry, now)))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let now = Instant::now();
        let mut held = self.store.held();
        held.retain(|_, entry| entry.expires > now);
        let mut all: Vec<_> = held
            .iter()
            .map(|(key, entry)| info(key, entry, now))
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let now = Instant::now();
        let removed = self.store.held().remove(key);
        let was_held = removed.is_some_and(|entry| entry.expires > now);
        self.store.announce_release(key);
        Ok(was_held)
    }
}
