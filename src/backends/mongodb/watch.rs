//! Wake-ups for waiters: one change stream per backend handle on the lock collection,
//! opened at the first wait, fanned out to the local [`KeyWatch`]es by `_id`.
//!
//! One stream for the handle rather than one per waiter: a change stream's `getMore`
//! holds a pooled connection while it waits for events, so a stream per waiter would
//! starve the attempts of connections under contention. The stream's `$match` keeps only
//! the events that can free a lock (the owner changed, a reader, permit or writer intent
//! went, which sets `freed`, or the document was replaced or deleted), so renewals cost
//! the waiters nothing.
//!
//! In this process each event wakes **one** waiter of its key ([`Notify::notify_one`]),
//! so that local waiters do not stampede the server. When the stream breaks, every waiter
//! is woken (an event may have been missed) and the stream is reopened in the background
//! while anybody waits; meanwhile waiters still retry at the holder's expiry. A server
//! without change streams (a standalone `mongod`) makes [`Hub::watch`] answer `None` for
//! good: the engine then retries with backoff bounded by the holder's expiry.

use crate::core::backend::KeyWatch;
use async_trait::async_trait;
use futures_util::StreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::change_stream::event::ChangeStreamEvent;
use mongodb::change_stream::ChangeStream;
use mongodb::error::ErrorKind;
use mongodb::Collection;
use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// How long one `getMore` of the stream waits for events on the server.
const AWAIT: Duration = Duration::from_millis(1000);

/// Server codes for "this deployment has no change streams".
const UNSUPPORTED_CODES: &[i32] = &[
    40573, // The $changeStream stage is only supported on replica sets
    40324, // Unrecognized pipeline stage name
    115,   // CommandNotSupported
    303,   // Unsupported (some wire-compatible servers)
];

type Opening<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = std::result::Result<(u64, tokio::task::AbortHandle), String>,
            > + Send
            + 'a,
    >,
>;

struct Watched {
    refs: usize,
    notify: Arc<Notify>,
}

struct Inner {
    describe: String,
    locks: Collection<Document>,
    keys: Mutex<HashMap<String, Watched>>,
    /// Held while opening; `Some` while a reader runs (its generation and task).
    reader: tokio::sync::Mutex<Option<(u64, tokio::task::AbortHandle)>>,
    connected: AtomicBool,
    unsupported: AtomicBool,
    generations: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(reader) = self.reader.try_lock() {
            if let Some((_, task)) = reader.as_ref() {
                task.abort();
            }
        }
    }
}

fn pipeline() -> Vec<Document> {
    vec![doc! { "$match": { "$or": [
        { "operationType": { "$in": ["delete", "replace", "drop", "rename", "dropDatabase", "invalidate"] } },
        { "updateDescription.updatedFields.owner": { "$exists": true } },
        { "updateDescription.removedFields": "owner" },
        { "updateDescription.updatedFields.freed": { "$exists": true } },
    ] } }]
}

fn is_unsupported(err: &mongodb::error::Error) -> bool {
    match err.kind.as_ref() {
        ErrorKind::Command(command) => {
            UNSUPPORTED_CODES.contains(&command.code)
                || command.message.contains("only supported on replica sets")
        }
        _ => false,
    }
}

impl Inner {
    fn keys(&self) -> MutexGuard<'_, HashMap<String, Watched>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_all(&self) {
        for watched in self.keys().values() {
            watched.notify.notify_waiters();
        }
    }

    /// Opens the stream and starts its reader; `Err` says why not.
    ///
    /// Boxed: `open` → `read` → `reopen` → `open` would otherwise be a cycle of opaque
    /// future types.
    fn open(self: &Arc<Self>, timeout: Duration) -> Opening<'_> {
        Box::pin(self.open_inner(timeout))
    }

    async fn open_inner(
        self: &Arc<Self>,
        timeout: Duration,
    ) -> std::result::Result<(u64, tokio::task::AbortHandle), String> {
        let opening = self
            .locks
            .watch()
            .pipeline(pipeline())
            .max_await_time(AWAIT)
            .into_future();
        let stream = match tokio::time::timeout(timeout, opening).await {
            Err(_) => return Err(format!("opening a change stream took over {timeout:?}")),
            Ok(Err(err)) => {
                if is_unsupported(&err) {
                    self.unsupported.store(true, Ordering::Release);
                }
                return Err(err.to_string());
            }
            Ok(Ok(stream)) => stream,
        };
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(read(Arc::downgrade(self), stream, generation)).abort_handle();
        self.connected.store(true, Ordering::Release);
        // Events may have passed while nobody listened.
        self.wake_all();
        Ok((generation, task))
    }
}

/// Reads events until the stream breaks, then wakes everybody and reopens it.
async fn read(
    inner: Weak<Inner>,
    mut stream: ChangeStream<ChangeStreamEvent<Document>>,
    generation: u64,
) {
    let ended = loop {
        match stream.next().await {
            Some(Ok(event)) => {
                let Some(inner) = inner.upgrade() else { return };
                let key = match event.document_key.as_ref().and_then(|k| k.get("_id")) {
                    Some(Bson::String(key)) => key.clone(),
                    // Not one of ours, or the whole collection went: wake everybody.
                    _ => {
                        inner.wake_all();
                        continue;
                    }
                };
                let notify = inner.keys().get(&key).map(|w| Arc::clone(&w.notify));
                if let Some(notify) = notify {
                    notify.notify_one();
                }
            }
            Some(Err(err)) => break err.to_string(),
            None => break "the change stream ended".to_owned(),
        }
    };
    let Some(strong) = inner.upgrade() else {
        return;
    };
    tracing::debug!(backend = %strong.describe, reason = %ended, "change stream lost; waking waiters and reopening");
    strong.connected.store(false, Ordering::Release);
    strong.wake_all();
    tokio::spawn(reopen(Arc::downgrade(&strong), generation));
}

async fn reopen(inner: Weak<Inner>, lost: u64) {
    let mut delay = Duration::from_millis(50);
    loop {
        let Some(inner) = inner.upgrade() else { return };
        {
            let mut reader = inner.reader.lock().await;
            match reader.as_ref() {
                Some((current, _)) if *current != lost => return,
                _ => {}
            }
            *reader = None;
            if inner.keys().is_empty() {
                return; // the next watch opens it
            }
            match inner.open(Duration::from_secs(5)).await {
                Ok(fresh) => {
                    *reader = Some(fresh);
                    return;
                }
                Err(err) => {
                    tracing::debug!(backend = %inner.describe, %err, "reopening the change stream failed");
                    // Waiters poll at their own pace; wake them in case a release passed.
                    inner.wake_all();
                }
            }
        }
        drop(inner);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The wake-up hub of one backend handle.
pub struct Hub {
    inner: Arc<Inner>,
}

impl Hub {
    /// A hub on `locks`; it opens its stream at the first watch.
    pub fn new(locks: Collection<Document>, describe: String) -> Arc<Hub> {
        Arc::new(Hub {
            inner: Arc::new(Inner {
                describe,
                locks,
                keys: Mutex::new(HashMap::new()),
                reader: tokio::sync::Mutex::new(None),
                connected: AtomicBool::new(false),
                unsupported: AtomicBool::new(false),
                generations: AtomicU64::new(0),
            }),
        })
    }

    /// A watch on `key`, returned once the stream is open; `None` if the server has no
    /// change streams or the stream cannot be opened now (the engine then polls).
    pub async fn watch(&self, key: &str, timeout: Duration) -> Option<StreamWatch> {
        if self.inner.unsupported.load(Ordering::Acquire) {
            return None;
        }
        let notify = {
            let mut keys = self.inner.keys();
            let entry = keys.entry(key.to_owned()).or_insert_with(|| Watched {
                refs: 0,
                notify: Arc::new(Notify::new()),
            });
            entry.refs += 1;
            Arc::clone(&entry.notify)
        };
        let watch = StreamWatch {
            inner: Arc::clone(&self.inner),
            key: key.to_owned(),
            notify,
        };
        if self.inner.connected.load(Ordering::Acquire) {
            return Some(watch);
        }
        let mut reader = self.inner.reader.lock().await;
        if reader.is_none() || !self.inner.connected.load(Ordering::Acquire) {
            if let Some((_, task)) = reader.take() {
                task.abort();
            }
            match self.inner.open(timeout).await {
                Ok(fresh) => *reader = Some(fresh),
                Err(err) => {
                    tracing::debug!(backend = %self.inner.describe, %err, "no change stream; waiters will poll");
                    return None;
                }
            }
        }
        Some(watch)
    }
}

impl Hub {
    /// Wakes one more local waiter of `key`, if any waits.
    pub fn pass_on(&self, key: &str) {
        if let Some(watched) = self.inner.keys().get(key) {
            watched.notify.notify_one();
        }
    }
}

/// One waiter's interest in one key.
pub struct StreamWatch {
    inner: Arc<Inner>,
    key: String,
    notify: Arc<Notify>,
}

#[async_trait]
impl KeyWatch for StreamWatch {
    async fn changed(&mut self) {
        self.notify.notified().await;
    }
}

impl Drop for StreamWatch {
    fn drop(&mut self) {
        let mut keys = self.inner.keys();
        if let Some(entry) = keys.get_mut(&self.key) {
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                keys.remove(&self.key);
            }
        }
    }
}
