//! `redis+cluster://h1:p1,h2:p2,…[?options]` and `rediss+cluster://…` (TLS): the
//! single-node protocol of `redis://` on a Redis Cluster. Every key of one lock (the lock,
//! its fence counter, its holder record and its release channel) is in the lock's hash
//! slot ([`KeyNames::in_slot`](super::node::KeyNames::in_slot)), so each script runs on
//! the master of that slot, reached through redis-rs's cluster connection, which follows
//! MOVED and ASK and refreshes its slot map after a failover.
//!
//! Waiters are woken through sharded Pub/Sub (Redis 7+): the release scripts SPUBLISH
//! the key on the lock's own shard channel, and a waiter SSUBSCRIBEs it (on a RESP3
//! cluster connection of its handle, which redis-rs resubscribes after reconnecting)
//! before its first attempt, and the channel is unsubscribed once nobody here waits for
//! the key. On older servers the scripts PUBLISH instead and waiters retry with backoff,
//! at the latest when the holder's lease would expire.
//!
//! The listed hosts are only where the client starts: it learns the others from the
//! cluster. Options are those of `redis://` (see the module `redis`); a cluster has only
//! database 0. The failover behaviour is in docs/backends/redis.md.

use super::config::{split_hosts, NodeConfig, Options};
use super::node::{map_error, KeyNames, Layout, Node};
use super::single;
use super::waker::{ChannelWatch, Watchers};
use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, KeyWatch, LockInfo,
};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
use crate::key::Key;
use async_trait::async_trait;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{ProtocolVersion, PushInfo, PushKind, Value};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::OnceCell;

/// The URL schemes of Redis Cluster, with the scheme of their nodes.
const SCHEMES: &[(&str, &str)] = &[
    ("redis+cluster://", "redis"),
    ("rediss+cluster://", "rediss"),
];

/// Locks on a Redis Cluster, with the single-node protocol on each lock's slot.
#[derive(Debug)]
pub struct RedisClusterBackend {
    node: Arc<Node<ClusterClient>>,
    waker: Option<ShardWaker>,
    describe: String,
}

/// Opens `redis+cluster://` and `rediss+cluster://` URLs, for the registry of schemes.
pub(crate) async fn open_cluster(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(RedisClusterBackend::open(url).await?))
}

impl RedisClusterBackend {
    /// Connects to the cluster through the nodes the URL lists (any reachable one is
    /// enough). Fails with `Unavailable` if none answers, and with a `Backend` error if
    /// the credentials are refused or the server is not in cluster mode.
    pub async fn open(text: &str) -> Result<RedisClusterBackend> {
        let redacted = crate::redact(text);
        let bad = |reason: String| Error::BadUrl {
            url: redacted.clone(),
            reason,
        };
        let (scheme, node_scheme) = SCHEMES
            .iter()
            .copied()
            .find(|(scheme, _)| {
                text.get(..scheme.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
            })
            .ok_or_else(|| bad("not a redis+cluster:// URL".to_owned()))?;
        let urls = split_hosts(
            text,
            scheme,
            node_scheme,
            "redis+cluster://h1:6379,h2:6379,h3:6379",
            &redacted,
        )?;
        let first = urls.first().ok_or_else(|| bad("no nodes".to_owned()))?;
        let options = Options::parse(first, &redacted)?;
        // Each node URL through the single-node parser: it checks the host, the database
        // and ca_file, and gives the clean URL redis-rs is handed.
        let mut nodes = Vec::new();
        for url in &urls {
            let config = NodeConfig::from_url(url, &redacted, &options)?;
            if config.client.get_connection_info().redis_settings().db() != 0 {
                return Err(bad(
                    "a Redis Cluster has only database 0; remove the /N path".to_owned(),
                ));
            }
            nodes.push(config.client.get_connection_info().clone());
        }
        let build = |push: Option<tokio::sync::mpsc::UnboundedSender<PushInfo>>| {
            let mut builder = ClusterClientBuilder::new(nodes.clone())
                .connection_timeout(options.connect_timeout)
                .response_timeout(options.command_timeout)
                .retries(3)
                .min_retry_wait(20)
                .max_retry_wait(500);
            if let Some(path) = &options.ca_file {
                let pem = std::fs::read(path)
                    .map_err(|err| bad(format!("cannot read ca_file {path:?}: {err}")))?;
                builder = builder.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                });
            }
            if let Some(push) = push {
                builder = builder
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(push);
            }
            builder.build().map_err(|err| {
                bad(format!(
                    "redis client rejected the URL: {}",
                    crate::redact(&err.to_string())
                ))
            })
        };
        let config = NodeConfig {
            client: build(None)?,
            describe: redacted.clone(),
            options: options.clone(),
        };
        let probe = Node::with_layout(config, Layout::Cluster { sharded: false });
        probe.connection().await?;
        // Also checks the credentials and that the servers are a cluster.
        let sharded = probe.major_version().await? >= 7;
        let node = Arc::new(probe.into_layout(Layout::Cluster { sharded }));
        let waker = if sharded {
            let (push, pushes) = tokio::sync::mpsc::unbounded_channel();
            Some(ShardWaker::new(
                &redacted,
                build(Some(push))?,
                pushes,
                &options,
            ))
        } else {
            None
        };
        Ok(RedisClusterBackend {
            node,
            waker,
            describe: redacted,
        })
    }

    /// True if waiters are woken through sharded Pub/Sub (Redis 7+); otherwise they
    /// retry with backoff.
    pub fn sharded_pubsub(&self) -> bool {
        self.waker.is_some()
    }
}

#[async_trait]
impl Backend for RedisClusterBackend {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            shared_locks: true,
            semaphores: true,
            ..Capabilities::expiring()
        }
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        single::try_acquire(&self.node, request).await
    }

    async fn watch(&self, key: &Key) -> Result<Option<Box<dyn KeyWatch>>> {
        let Some(waker) = &self.waker else {
            return Ok(None);
        };
        Ok(waker
            .watch(key)
            .await
            .map(|watch| Box::new(watch) as Box<dyn KeyWatch>))
    }

    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        single::abandon(&self.node, key, owner).await
    }
}

#[async_trait]
impl Admin for RedisClusterBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        self.node.inspect(key).await
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        single::list(&self.node).await
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        self.node.force_release(key).await
    }
}

/// The wake-up hub of a cluster handle: one RESP3 cluster connection subscribed to the
/// shard channel of each key somebody here waits for.
struct ShardWaker {
    inner: Arc<ShardInner>,
}

impl std::fmt::Debug for ShardWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardWaker")
            .field("backend", &self.inner.describe)
            .finish_non_exhaustive()
    }
}

struct ShardInner {
    describe: String,
    client: ClusterClient,
    prefix: String,
    connect_timeout: Duration,
    command_timeout: Duration,
    conn: OnceCell<ClusterConnection>,
    watchers: Arc<Watchers>,
    /// Held while (un)subscribing, so that an unsubscription for a key nobody waited
    /// for any longer cannot overtake the subscription of a new waiter.
    ops: tokio::sync::Mutex<()>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for ShardInner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ShardWaker {
    fn new(
        describe: &str,
        client: ClusterClient,
        pushes: tokio::sync::mpsc::UnboundedReceiver<PushInfo>,
        options: &Options,
    ) -> ShardWaker {
        let (idle, idle_keys) = tokio::sync::mpsc::unbounded_channel();
        let watchers = Arc::new(Watchers::reporting_idle(idle));
        let inner = Arc::new_cyclic(|weak: &Weak<ShardInner>| {
            let tasks = vec![
                tokio::spawn(read(Arc::downgrade(&watchers), pushes)).abort_handle(),
                tokio::spawn(unsubscribe_idle(weak.clone(), idle_keys)).abort_handle(),
            ];
            ShardInner {
                describe: describe.to_owned(),
                client,
                prefix: options.prefix.clone(),
                connect_timeout: options.connect_timeout,
                command_timeout: options.command_timeout,
                conn: OnceCell::new(),
                watchers,
                ops: tokio::sync::Mutex::new(()),
                tasks,
            }
        });
        ShardWaker { inner }
    }

    /// A watch on releases of `key`, once its shard channel's subscription is confirmed;
    /// `None` if it cannot be had (the engine then retries with backoff).
    async fn watch(&self, key: &Key) -> Option<ChannelWatch> {
        let inner = &self.inner;
        let watch = inner.watchers.watch(key.as_str());
        let channel = KeyNames::in_slot(&inner.prefix, key.as_str()).channel;
        let subscribed = async {
            let mut conn = inner.connection().await?;
            let _ops = inner.ops.lock().await;
            match tokio::time::timeout(inner.command_timeout, conn.ssubscribe(&channel)).await {
                Ok(outcome) => outcome.map_err(|err| err.to_string()),
                Err(_) => Err("SSUBSCRIBE timed out".to_owned()),
            }
        };
        match subscribed.await {
            Ok(()) => Some(watch),
            Err(err) => {
                tracing::debug!(backend = %inner.describe, %err, "no shard channel subscription; waiters will poll");
                None
            }
        }
    }
}

impl ShardInner {
    async fn connection(&self) -> std::result::Result<ClusterConnection, String> {
        let connect = async {
            match tokio::time::timeout(
                self.connect_timeout + self.command_timeout,
                self.client.get_async_connection(),
            )
            .await
            {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(err)) => Err(map_error(&self.describe, &err).to_string()),
                Err(_) => Err(format!(
                    "connecting timed out after {:?}",
                    self.connect_timeout
                )),
            }
        };
        self.conn.get_or_try_init(|| connect).await.cloned()
    }
}

/// Wakes the waiters of each released key; after a lost connection (redis-rs reconnects
/// and resubscribes by itself), every waiter, since a release may have been missed.
async fn read(
    watchers: Weak<Watchers>,
    mut pushes: tokio::sync::mpsc::UnboundedReceiver<PushInfo>,
) {
    while let Some(push) = pushes.recv().await {
        let Some(watchers) = watchers.upgrade() else {
            return;
        };
        match push.kind {
            PushKind::SMessage => {
                if let Some(Value::BulkString(key)) = push.data.get(1) {
                    watchers.wake(&String::from_utf8_lossy(key));
                }
            }
            PushKind::Disconnection => watchers.wake_all(),
            _ => {}
        }
    }
}

/// Unsubscribes the shard channels of keys nobody here waits for any longer.
async fn unsubscribe_idle(
    inner: Weak<ShardInner>,
    mut idle_keys: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    while let Some(key) = idle_keys.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let Some(mut conn) = inner.conn.get().cloned() else {
            continue;
        };
        let _ops = inner.ops.lock().await;
        if inner.watchers.contains(&key) {
            continue;
        }
        let channel = KeyNames::in_slot(&inner.prefix, &key).channel;
        // A failed unsubscription costs only unwanted wake-ups of nobody.
        let _ = tokio::time::timeout(inner.command_timeout, conn.sunsubscribe(&channel)).await;
    }
}
