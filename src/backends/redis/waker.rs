//! Wake-ups for waiters: one shared Pub/Sub subscriber connection per backend instance,
//! subscribed to the one channel `<prefix>released` on which every release script
//! publishes the released key, fanned out to the local [`KeyWatch`]es by key.
//!
//! Why one channel for the prefix rather than one channel per key: a per-key channel
//! costs a SUBSCRIBE round trip before every waiting acquire (the watch must be in place
//! before the first attempt) and an UNSUBSCRIBE after it, serialized on the one
//! subscriber connection; in the benchmark that cut `acquire()` to a quarter of
//! `try_acquire()` at 64 tasks. With one channel, a handle
//! subscribes once, at its first wait, and every later wait costs no round trip. The
//! price is that a subscribed handle receives the releases of every key under its prefix
//! (a few dozen bytes each); give unrelated applications different prefixes.
//!
//! In this process, each message wakes every waiter of the key, and a waiter busy with an
//! attempt when it comes sees it at its next wait (a per-key generation counter, never a
//! missed wake-up). Exclusive waiters of one handle line up in the engine's local queue,
//! so only the head of it watches and one message causes one attempt; readers and
//! permit holders, which can all get in at once, are all woken.
//! Across processes, each client wakes once per release. When the subscriber connection
//! breaks, every waiter is woken (a release may have been missed) and the connection is
//! re-established in the background while anybody waits; meanwhile waiters still retry
//! at the holder's expiry, which the engine always bounds their wait by.

use crate::core::backend::KeyWatch;
use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug)]
struct Watched {
    refs: usize,
    /// Bumped at each wake-up; each waiter waits for a value it has not seen.
    generation: watch::Sender<u64>,
}

/// The local waiters, by key, of one wake-up hub (this module's, or the cluster's shard
/// channel hub).
#[derive(Debug, Default)]
pub struct Watchers {
    keys: Mutex<HashMap<String, Watched>>,
    /// Told each key nobody here waits for any longer, if the hub wants to know (to
    /// unsubscribe its channel).
    idle: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

impl Watchers {
    /// Waiters that tell `idle` of each key they stop waiting for.
    pub fn reporting_idle(idle: tokio::sync::mpsc::UnboundedSender<String>) -> Watchers {
        Watchers {
            keys: Mutex::default(),
            idle: Some(idle),
        }
    }

    fn keys(&self) -> MutexGuard<'_, HashMap<String, Watched>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers one more waiter for `key`.
    pub fn watch(self: &Arc<Self>, key: &str) -> ChannelWatch {
        let seen = {
            let mut keys = self.keys();
            let entry = keys.entry(key.to_owned()).or_insert_with(|| Watched {
                refs: 0,
                generation: watch::channel(0).0,
            });
            entry.refs += 1;
            entry.generation.subscribe()
        };
        ChannelWatch {
            watchers: Arc::clone(self),
            key: key.to_owned(),
            seen,
        }
    }

    /// Wakes the waiters of `key`.
    pub fn wake(&self, key: &str) {
        if let Some(watched) = self.keys().get(key) {
            watched.generation.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Wakes every waiter: a release may have been missed.
    pub fn wake_all(&self) {
        for watched in self.keys().values() {
            watched.generation.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// True if somebody here waits for `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.keys().contains_key(key)
    }

    fn is_empty(&self) -> bool {
        self.keys().is_empty()
    }
}

struct Connection {
    // Kept so that the subscription stays open; dropping the stream ends it.
    _sink: PubSubSink,
    generation: u64,
    reader: tokio::task::AbortHandle,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Inner {
    describe: String,
    client: redis::Client,
    channel: String,
    connect_timeout: Duration,
    command_timeout: Duration,
    /// The keys somebody here waits for.
    watchers: Arc<Watchers>,
    /// Held while connecting.
    connection: tokio::sync::Mutex<Option<Connection>>,
    /// True while the subscription is confirmed and the reader runs.
    connected: AtomicBool,
    generations: AtomicU64,
}

impl Inner {
    /// Opens the subscriber connection and subscribes.
    ///
    /// Boxed: `connect` → `read` → `reconnect` → `connect` would otherwise be a cycle of
    /// opaque future types.
    fn connect(
        self: &Arc<Self>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Connection, String>> + Send + '_>>
    {
        Box::pin(self.connect_inner())
    }

    async fn connect_inner(self: &Arc<Self>) -> Result<Connection, String> {
        let pubsub = tokio::time::timeout(self.connect_timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| format!("connecting timed out after {:?}", self.connect_timeout))?
            .map_err(|err| err.to_string())?;
        let (mut sink, stream) = pubsub.split();
        tokio::time::timeout(self.command_timeout, sink.subscribe(&self.channel))
            .await
            .map_err(|_| "SUBSCRIBE timed out".to_owned())?
            .map_err(|err| err.to_string())?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let reader = tokio::spawn(read(Arc::downgrade(self), stream, generation)).abort_handle();
        self.connected.store(true, Ordering::Release);
        // Releases may have happened while nobody listened.
        self.watchers.wake_all();
        Ok(Connection {
            _sink: sink,
            generation,
            reader,
        })
    }
}

/// Reads messages until the connection breaks, then wakes everybody and reconnects.
async fn read(inner: Weak<Inner>, mut stream: PubSubStream, generation: u64) {
    while let Some(message) = stream.next().await {
        let Some(inner) = inner.upgrade() else { return };
        let key = String::from_utf8_lossy(message.get_payload_bytes());
        inner.watchers.wake(&key);
    }
    let Some(strong) = inner.upgrade() else {
        return;
    };
    tracing::debug!(backend = %strong.describe, "Pub/Sub connection lost; waking waiters and reconnecting");
    strong.connected.store(false, Ordering::Release);
    strong.watchers.wake_all();
    tokio::spawn(reconnect(Arc::downgrade(&strong), generation));
}

async fn reconnect(inner: Weak<Inner>, lost_generation: u64) {
    let mut delay = Duration::from_millis(50);
    loop {
        let Some(inner) = inner.upgrade() else { return };
        {
            let mut connection = inner.connection.lock().await;
            match connection.as_ref() {
                Some(current) if current.generation != lost_generation => return,
                _ => {}
            }
            *connection = None;
            if inner.watchers.is_empty() {
                return; // the next watch connects
            }
            match inner.connect().await {
                Ok(fresh) => {
                    *connection = Some(fresh);
                    return;
                }
                Err(err) => {
                    tracing::debug!(backend = %inner.describe, %err, "Pub/Sub reconnect failed")
                }
            }
        }
        drop(inner);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The wake-up hub of one Redis node.
#[derive(Clone)]
pub struct Waker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker")
            .field("backend", &self.inner.describe)
            .field("channel", &self.inner.channel)
            .finish_non_exhaustive()
    }
}

impl Waker {
    /// A hub listening on `channel` of the node `client` connects to; it connects at the
    /// first watch.
    pub fn new(
        describe: &str,
        client: redis::Client,
        channel: String,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Waker {
        Waker {
            inner: Arc::new(Inner {
                describe: describe.to_owned(),
                client,
                channel,
                connect_timeout,
                command_timeout,
                watchers: Arc::default(),
                connection: tokio::sync::Mutex::new(None),
                connected: AtomicBool::new(false),
                generations: AtomicU64::new(0),
            }),
        }
    }

    /// A watch on releases of `key`, returned once the subscription is confirmed by the
    /// server. `None` if the subscriber connection cannot be had: the engine then retries
    /// with backoff.
    pub async fn watch(&self, key: &str) -> Option<ChannelWatch> {
        let watch = self.inner.watchers.watch(key);
        if self.inner.connected.load(Ordering::Acquire) {
            return Some(watch);
        }
        let mut connection = self.inner.connection.lock().await;
        if connection.is_none() || !self.inner.connected.load(Ordering::Acquire) {
            match self.inner.connect().await {
                Ok(fresh) => *connection = Some(fresh),
                Err(err) => {
                    tracing::debug!(backend = %self.inner.describe, %err, "no Pub/Sub connection; waiters will poll");
                    return None;
                }
            }
        }
        Some(watch)
    }
}

/// One waiter's interest in the releases of one key.
pub struct ChannelWatch {
    watchers: Arc<Watchers>,
    key: String,
    seen: watch::Receiver<u64>,
}

impl ChannelWatch {
    /// Resolves at the first wake-up this waiter has not seen yet.
    pub async fn notified(&mut self) {
        if self.seen.changed().await.is_err() {
            // The sender lives as long as a watch of the key, this one included.
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl KeyWatch for ChannelWatch {
    async fn changed(&mut self) {
        self.notified().await;
    }
}

impl Drop for ChannelWatch {
    fn drop(&mut self) {
        let mut keys = self.watchers.keys();
        if let Some(entry) = keys.get_mut(&self.key) {
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                keys.remove(&self.key);
                if let Some(idle) = &self.watchers.idle {
                    let _ = idle.send(self.key.clone());
                }
            }
        }
    }
}
