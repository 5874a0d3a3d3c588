//! `memory://[name]`: locks inside one process, for tests and single-process programs.
//!
//! All handles opened on the same URL in one process share one store, so fences keep
//! increasing across handles. Waiters are woken by a broadcast at release; a holder
//! that stops renewing loses the lock at its TTL.
//!
//! Every kind of lease is kept here: a key holds one writer, any number of readers, or
//! up to N permits, each a lease of its own (owner, TTL, fence from the one counter).
//!
//! Writer starvation: the policy is write-preferring. A writer that finds the key held
//! leaves an *intent* (its owner token and an expiry [`WRITER_INTENT`] ahead) that new
//! readers respect, so a stream of overlapping readers drains and the writer gets in.
//! The intent is renewed at each of the writer's attempts, and the writer is told to
//! attempt again within a third of its life; it goes when the writer acquires or
//! abandons, and lapses by itself when a writer vanishes without a word. Any store
//! without a queue can copy the recipe: an intent record beside the lock with its own
//! expiry, written by a refused writer, checked by readers before they join.

use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, Granted, HeldLease, KeyWatch, LockInfo,
    LockKind,
};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
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
    value: Option<String>,
    acquired_at: SystemTime,
    renewed_at: SystemTime,
}

/// What a key is held as; set by its first holder, kept while any holder lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Exclusive,
    Shared,
    Semaphore(u32),
}

impl Mode {
    fn of(kind: LockKind) -> Mode {
        match kind {
            LockKind::Shared => Mode::Shared,
            LockKind::Semaphore { permits } => Mode::Semaphore(permits),
            _ => Mode::Exclusive,
        }
    }

    fn kind(self) -> LockKind {
        match self {
            Mode::Exclusive => LockKind::Exclusive,
            Mode::Shared => LockKind::Shared,
            Mode::Semaphore(permits) => LockKind::Semaphore { permits },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Exclusive => "an exclusive lock",
            Mode::Shared => "a shared lock",
            Mode::Semaphore(_) => "a semaphore",
        }
    }
}

/// One key: its holders (one writer, readers, or permits) and the intents of waiting
/// writers, which keep new readers out (see [`WRITER_INTENT`]).
#[derive(Debug)]
struct Slot {
    mode: Mode,
    holders: Vec<Entry>,
    intents: Vec<(Owner, Instant)>,
}

impl Slot {
    fn prune(&mut self, now: Instant) {
        self.holders.retain(|e| e.expires > now);
        self.intents.retain(|(_, until)| *until > now);
    }

    fn is_idle(&self, now: Instant) -> bool {
        !self.holders.iter().any(|e| e.expires > now) && !self.intents.iter().any(|(_, u)| *u > now)
    }

    fn live(&self, now: Instant) -> impl Iterator<Item = &Entry> {
        self.holders.iter().filter(move |e| e.expires > now)
    }

    /// When the first live holder's lease runs out.
    fn first_expiry(&self, now: Instant) -> Option<Duration> {
        self.live(now).map(|e| e.expires - now).min()
    }
}

/// How long a waiting writer's intent keeps new readers out after its last attempt.
/// A waiting writer renews it at every attempt, and is told to attempt again well within
/// it; a writer that gave up without a word (its process died, its deadline passed)
/// stops holding readers back after this long at most.
const WRITER_INTENT: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Store {
    held: Mutex<HashMap<Key, Slot>>,
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

    fn held(&self) -> MutexGuard<'_, HashMap<Key, Slot>> {
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

    /// Removes `owner`'s lease (and its writer intent) on `key`: true if the lease was
    /// there and still valid.
    fn release(&self, key: &Key, owner: &Owner) -> bool {
        let now = Instant::now();
        let (removed, changed) = {
            let mut held = self.held();
            let Some(slot) = held.get_mut(key) else {
                return false;
            };
            let intents = slot.intents.len();
            slot.intents.retain(|(o, _)| o != owner);
            let mut removed = None;
            if let Some(at) = slot.holders.iter().position(|e| e.owner == *owner) {
                removed = Some(slot.holders.remove(at).expires > now);
            }
            let changed = removed.is_some() || slot.intents.len() != intents;
            if slot.is_idle(now) {
                held.remove(key);
            }
            (removed, changed)
        };
        if changed {
            // A withdrawn intent lets waiting readers in, too.
            self.announce_release(key);
        }
        removed.unwrap_or(false)
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
        let entry = held
            .get_mut(&self.key)
            .and_then(|slot| slot.holders.iter_mut().find(|e| e.owner == self.owner));
        match entry {
            Some(entry) if entry.expires > now => {
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
    info.value.clone_from(&entry.value);
    info.acquired_at = Some(entry.acquired_at);
    info.renewed_at = Some(entry.renewed_at);
    info.expires_at = Some(SystemTime::now() + entry.expires.saturating_duration_since(now));
    info.ttl = Some(entry.ttl);
    info
}

/// A key's record: its holder's for an exclusive lock, one per holder otherwise.
fn slot_info(key: &Key, slot: &Slot, now: Instant) -> Option<LockInfo> {
    let mut live: Vec<&Entry> = slot.live(now).collect();
    if live.is_empty() {
        return None;
    }
    if slot.mode == Mode::Exclusive {
        return live.first().map(|entry| info(key, entry, now));
    }
    live.sort_by_key(|e| e.fence);
    let holders = live.into_iter().map(|e| info(key, e, now)).collect();
    Some(LockInfo::of_holders(
        key.as_str(),
        slot.mode.kind(),
        holders,
    ))
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

impl MemoryBackend {
    /// Why `request` cannot have the key now (`Some(Held)`), or a typed error for a
    /// request that never can while the current holders hold it; `None`: grant it.
    fn refusal(
        &self,
        slot: &mut Slot,
        asked: Mode,
        request: &AcquireRequest<'_>,
        now: Instant,
    ) -> Result<Option<Attempt>> {
        let held = || Attempt::Held {
            expires_in: slot.first_expiry(now),
        };
        if slot.holders.is_empty() {
            // A free key: readers still respect waiting writers.
            if asked == Mode::Shared && !slot.intents.is_empty() {
                return Ok(Some(Attempt::Held {
                    expires_in: slot.intents.iter().map(|(_, u)| *u - now).min(),
                }));
            }
            return Ok(None);
        }
        match (slot.mode, asked) {
            (Mode::Semaphore(held_with), Mode::Semaphore(permits)) => {
                if held_with != permits {
                    return Err(Error::PermitMismatch {
                        key: request.key.to_string(),
                        backend: self.describe.clone(),
                        held_with,
                        asked: permits,
                    });
                }
                let full = slot.holders.len() >= usize::try_from(permits).unwrap_or(usize::MAX);
                Ok(full.then(held))
            }
            (Mode::Semaphore(_), _) | (_, Mode::Semaphore(_)) => Err(Error::backend(
                &self.describe,
                format!(
                    "key {:?} is held as {}, and was asked for as {}: a key is either a lock or a semaphore",
                    request.key.as_str(),
                    slot.mode.name(),
                    asked.name()
                ),
            )),
            (Mode::Shared, Mode::Shared) if slot.intents.is_empty() => Ok(None),
            (_, Mode::Exclusive) => {
                // Write-preferring: the waiting writer's intent holds new readers back,
                // renewed at each of its attempts, which it is told to make well within
                // the intent's life.
                let until = now + WRITER_INTENT;
                match slot.intents.iter_mut().find(|(o, _)| o == request.owner) {
                    Some(intent) => intent.1 = until,
                    None => slot.intents.push((request.owner.clone(), until)),
                }
                let retry = WRITER_INTENT / 3;
                Ok(Some(Attempt::Held {
                    expires_in: Some(slot.first_expiry(now).map_or(retry, |e| e.min(retry))),
                }))
            }
            _ => Ok(Some(held())),
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            shared_locks: true,
            semaphores: true,
            ..Capabilities::expiring().process_local()
        }
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let now = Instant::now();
        let mut held = self.store.held();
        // Holders that stopped renewing leave entries behind; sweep them once the map has
        // doubled since the last sweep, so its size stays proportional to the live locks.
        if held.len() >= 64 && held.len() >= 2 * self.store.swept_at.load(Ordering::Relaxed) {
            held.retain(|_, slot| !slot.is_idle(now));
            self.store
                .swept_at
                .store(held.len().max(32), Ordering::Relaxed);
        }
        let asked = Mode::of(request.kind);
        let slot = held.entry(request.key.clone()).or_insert_with(|| Slot {
            mode: asked,
            holders: Vec::new(),
            intents: Vec::new(),
        });
        slot.prune(now);
        if let Some(refused) = self.refusal(slot, asked, request, now)? {
            if slot.holders.is_empty() && slot.intents.is_empty() {
                held.remove(request.key);
            }
            return Ok(refused);
        }
        let fence = self.store.next_fence();
        let wall = SystemTime::now();
        slot.mode = asked;
        slot.intents.retain(|(o, _)| o != request.owner);
        // Most keys have one holder: room for exactly one, not the four a first push makes.
        slot.holders.reserve_exact(1);
        slot.holders.push(Entry {
            owner: request.owner.clone(),
            fence,
            expires: now + request.ttl,
            ttl: request.ttl,
            pid: request.holder.pid,
            host: request.holder.host.clone(),
            value: request.holder.value.clone(),
            acquired_at: wall,
            renewed_at: wall,
        });
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
        Ok(held.get(key).and_then(|slot| slot_info(key, slot, now)))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let now = Instant::now();
        let mut held = self.store.held();
        held.retain(|_, slot| !slot.is_idle(now));
        let mut all: Vec<_> = held
            .iter()
            .filter_map(|(key, slot)| slot_info(key, slot, now))
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let now = Instant::now();
        let removed = self.store.held().remove(key);
        let was_held = removed.is_some_and(|slot| slot.live(now).next().is_some());
        self.store.announce_release(key);
        Ok(was_held)
    }
}
