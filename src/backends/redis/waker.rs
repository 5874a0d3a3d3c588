//! Wake-ups for waiters: one shared Pub/Sub subscriber connection per backend instance,
//! subscribed lazily to one channel per watched key (`<prefix>released:<key>`) with
//! reference counting, fanned out to the local [`KeyWatch`]es.
//!
//! Why one channel per key rather than one channel for all releases: a client then
//! receives only the releases it waits for, so a busy server with many keys and many
//! clients does not send every release to every client.
//!
//! In this process, each message wakes **one** waiter of the key ([`Notify::notify_one`]:
//! if it was dropped meanwhile, tokio passes the wake-up on), so many local waiters do not
//! stampede the server: only the woken one tries, and the next release wakes the next.
//! Across processes, each client wakes once per release. When the subscriber connection
//! breaks, every waiter is woken (a release may have been missed) and the connection is
//! re-established in the background while anybody waits; meanwhile waiters still retry
//! at the holder's expiry, which the engine always bounds their wait by.

use crate::core::backend::KeyWatch;
use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug)]
struct Channel {
    refs: usize,
    notify: Arc<Notify>,
}

struct Connection {
    sink: PubSubSink,
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
    connect_timeout: Duration,
    command_timeout: Duration,
    channels: Mutex<HashMap<String, Channel>>,
    /// Held while (un)subscribing, so that the subscription state and the server agree.
    connection: tokio::sync::Mutex<Option<Connection>>,
    generations: std::sync::atomic::AtomicU64,
}

impl Inner {
    fn channels(&self) -> MutexGuard<'_, HashMap<String, Channel>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens the subscriber connection and subscribes to every watched channel.
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
        let watched: Vec<String> = self.channels().keys().cloned().collect();
        if !watched.is_empty() {
            tokio::time::timeout(self.command_timeout, sink.subscribe(&watched))
                .await
                .map_err(|_| "SUBSCRIBE timed out".to_owned())?
                .map_err(|err| err.to_string())?;
        }
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let reader = tokio::spawn(read(Arc::downgrade(self), stream, generation)).abort_handle();
        // Releases may have happened while nobody listened.
        self.wake_all();
        Ok(Connection {
            sink,
            generation,
            reader,
        })
    }

    fn wake_all(&self) {
        for channel in self.channels().values() {
            channel.notify.notify_waiters();
        }
    }
}

/// Reads messages until the connection breaks, then wakes everybody and reconnects.
async fn read(inner: Weak<Inner>, mut stream: PubSubStream, generation: u64) {
    while let Some(message) = stream.next().await {
        let Some(inner) = inner.upgrade() else { return };
        let notify = inner
            .channels()
            .get(message.get_channel_name())
            .map(|channel| Arc::clone(&channel.notify));
        if let Some(notify) = notify {
            notify.notify_one();
        }
    }
    let Some(strong) = inner.upgrade() else {
        return;
    };
    tracing::debug!(backend = %strong.describe, "Pub/Sub connection lost; waking waiters and reconnecting");
    strong.wake_all();
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
            if inner.channels().is_empty() {
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
            .finish_non_exhaustive()
    }
}

impl Waker {
    /// A hub for the node `client` connects to; it connects at the first watch.
    pub fn new(
        describe: &str,
        client: redis::Client,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Waker {
        Waker {
            inner: Arc::new(Inner {
                describe: describe.to_owned(),
                client,
                connect_timeout,
                command_timeout,
                channels: Mutex::new(HashMap::new()),
                connection: tokio::sync::Mutex::new(None),
                generations: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Subscribes to `channel` (if nobody here does yet) and returns a watch on it, once
    /// the server has confirmed the subscription. `None` if the subscriber connection
    /// cannot be had: the engine then retries with backoff.
    pub async fn watch(&self, channel: &str) -> Option<ChannelWatch> {
        let mut connection = self.inner.connection.lock().await;
        if connection.is_none() {
            match self.inner.connect().await {
                Ok(fresh) => *connection = Some(fresh),
                Err(err) => {
                    tracing::debug!(backend = %self.inner.describe, %err, "no Pub/Sub connection; waiters will poll");
                    return None;
                }
            }
        }
        let (notify, first) = {
            let mut channels = self.inner.channels();
            let entry = channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    refs: 0,
                    notify: Arc::new(Notify::new()),
                });
            entry.refs += 1;
            (Arc::clone(&entry.notify), entry.refs == 1)
        };
        let watch = ChannelWatch {
            inner: Arc::clone(&self.inner),
            channel: channel.to_owned(),
            notify,
        };
        if first {
            let current = connection.as_mut()?;
            let subscribed =
                tokio::time::timeout(self.inner.command_timeout, current.sink.subscribe(channel))
                    .await;
            if !matches!(subscribed, Ok(Ok(()))) {
                tracing::debug!(backend = %self.inner.describe, "SUBSCRIBE failed; waiters will poll");
                *connection = None;
                drop(connection);
                drop(watch);
                return None;
            }
        }
        Some(watch)
    }
}

/// One waiter's subscription to a channel; unsubscribes when the last one is dropped.
pub struct ChannelWatch {
    inner: Arc<Inner>,
    channel: String,
    notify: Arc<Notify>,
}

impl ChannelWatch {
    /// Resolves at the next wake-up for this waiter.
    pub async fn notified(&self) {
        self.notify.notified().await;
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
        let last = {
            let mut channels = self.inner.channels();
            match channels.get_mut(&self.channel) {
                Some(entry) => {
                    entry.refs = entry.refs.saturating_sub(1);
                    if entry.refs == 0 {
                        channels.remove(&self.channel);
                        true
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        if !last {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (inner, channel) = (Arc::clone(&self.inner), self.channel.clone());
        runtime.spawn(async move {
            let mut connection = inner.connection.lock().await;
            // A new watch may have subscribed again meanwhile.
            if inner.channels().contains_key(&channel) {
                return;
            }
            if let Some(current) = connection.as_mut() {
                let unsubscribed =
                    tokio::time::timeout(inner.command_timeout, current.sink.unsubscribe(&channel))
                        .await;
                if !matches!(unsubscribed, Ok(Ok(()))) {
                    *connection = None;
                }
            }
        });
    }
}
