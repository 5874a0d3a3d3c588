//! One shared `LISTEN` connection per backend handle: wakes the waiters of a key when its
//! holder releases (the release statement runs `pg_notify(channel, key)`).
//!
//! A waiter subscribes (and the connection is listening) before its first attempt, so a
//! release between the attempt and the wait is not missed. When the listening connection
//! ends, every waiter is woken (spuriously), and the next wait reconnects and wakes them
//! once more after `LISTEN` is active again, so that nothing released meanwhile is missed.

use super::{connect_error, detail, pg_error, Conn, PgTls};
use crate::core::backend::KeyWatch;
use crate::error::{Error, Result};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, Config};

type Watchers = Arc<Mutex<HashMap<String, watch::Sender<u64>>>>;

/// The shared listener.
#[derive(Debug)]
pub(crate) struct Listener {
    config: Config,
    tls: PgTls,
    describe: String,
    channel: String,
    live: tokio::sync::Mutex<Option<Arc<Conn>>>,
    watchers: Watchers,
}

fn wake_all(watchers: &Watchers) {
    let map = watchers.lock().unwrap_or_else(PoisonError::into_inner);
    for sender in map.values() {
        sender.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Listener {
    pub(crate) fn new(config: Config, tls: PgTls, describe: String, channel: String) -> Arc<Self> {
        Arc::new(Listener {
            config,
            tls,
            describe,
            channel,
            live: tokio::sync::Mutex::new(None),
            watchers: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Makes sure a connection is listening; after a reconnection every waiter is woken.
    async fn ensure(&self) -> Result<()> {
        let mut live = self.live.lock().await;
        if live.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        let reconnect = live.is_some();
        let (client, mut connection) =
            self.config
                .connect(self.tls.connector())
                .await
                .map_err(|err| match connect_error(&self.describe, &self.tls, err) {
                    Error::Unavailable { detail, .. } => Error::unavailable(
                        &self.describe,
                        detail.replacen("cannot connect", "cannot connect the listener", 1),
                    ),
                    other => other,
                })?;
        let (tx, closed) = watch::channel(None);
        let watchers = Arc::clone(&self.watchers);
        tokio::spawn(async move {
            let reason = loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(note))) => {
                        let map = watchers.lock().unwrap_or_else(PoisonError::into_inner);
                        if let Some(sender) = map.get(note.payload()) {
                            sender.send_modify(|n| *n = n.wrapping_add(1));
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => break detail(&err),
                    None => break "the listening connection was closed".to_owned(),
                }
            };
            let _ = tx.send(Some(reason));
            wake_all(&watchers);
        });
        let cancel = client.cancel_token();
        let conn = Conn::new(client, closed, cancel);
        let listen = format!("LISTEN \"{}\"", self.channel.replace('"', "\"\""));
        conn.client
            .batch_execute(&listen)
            .await
            .map_err(|err| pg_error(&self.describe, err))?;
        *live = Some(Arc::new(conn));
        if reconnect {
            wake_all(&self.watchers);
        }
        Ok(())
    }

    /// Subscribes to releases of `key`; the connection is listening when this returns.
    pub(crate) async fn watch(self: &Arc<Self>, key: &str) -> Result<Box<dyn KeyWatch>> {
        let receiver = {
            let mut map = self.watchers.lock().unwrap_or_else(PoisonError::into_inner);
            map.entry(key.to_owned())
                .or_insert_with(|| watch::channel(0).0)
                .subscribe()
        };
        let watch = PgWatch {
            listener: Arc::downgrade(self),
            key: key.to_owned(),
            receiver,
        };
        self.ensure().await?;
        Ok(Box::new(watch))
    }
}

struct PgWatch {
    listener: Weak<Listener>,
    key: String,
    receiver: watch::Receiver<u64>,
}

#[async_trait]
impl KeyWatch for PgWatch {
    async fn changed(&mut self) {
        if let Some(listener) = self.listener.upgrade() {
            if let Err(err) = listener.ensure().await {
                tracing::debug!(%err, "listener unavailable; the waiter polls");
                tokio::time::sleep(Duration::from_millis(500)).await;
                return;
            }
        }
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for PgWatch {
    fn drop(&mut self) {
        let Some(listener) = self.listener.upgrade() else {
            return;
        };
        let mut map = listener
            .watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map.get(&self.key).is_some_and(|s| s.receiver_count() <= 1) {
            map.remove(&self.key);
        }
    }
}
