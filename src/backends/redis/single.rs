//! `redis://` and `rediss://`: one Redis node (SPEC §3 "Redis single-node layout").

use super::config::{NodeConfig, Options};
use super::node::{abandon_soon, Connect, Node, NodeAttempt};
use super::waker::Waker;
use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, Granted, HeldLease, KeyWatch, LockInfo,
    LockKind,
};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
use crate::key::Key;
use crate::location::BackendUrl;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Locks on one Redis node: the key `<prefix><key>` holds the owner token, taken with
/// `SET NX PX` and renewed or released only by compare-and-expire / compare-and-delete
/// scripts, so any client following that canonical protocol excludes dlock and is
/// excluded by it. Readers and semaphore permits are leases in a sorted set beside it
/// (docs/backends/redis.md, "Shared locks and semaphores"). Waiters are woken by a
/// Pub/Sub message from the release script, and at the holder's expiry.
#[derive(Debug)]
pub struct RedisBackend {
    node: Arc<Node>,
    waker: Waker,
    describe: String,
    run_id: String,
}

impl RedisBackend {
    /// Connects to the node a `redis://` or `rediss://` URL names. Fails with
    /// `Unavailable` if it cannot be reached and with a `Backend` error if it rejects
    /// the credentials.
    pub async fn open(url: &BackendUrl) -> Result<RedisBackend> {
        let options = Options::parse(url.url(), url.redacted())?;
        let mut config = NodeConfig::from_url(url.url(), url.redacted(), &options)?;
        // Messages name the URL as the user wrote it (password hidden).
        config.describe = url.redacted().to_owned();
        let waker = Waker::new(
            url.redacted(),
            config.client.clone(),
            format!("{}released", options.prefix),
            options.connect_timeout,
            options.command_timeout,
        );
        let node = Arc::new(Node::new(config));
        node.connection().await?;
        // Also checks the credentials: a server with requirepass accepts the connection
        // but refuses commands without them.
        let run_id = node.run_id().await?;
        Ok(RedisBackend {
            node,
            waker,
            describe: url.redacted().to_owned(),
            run_id,
        })
    }

    /// The run id of the Redis server when this handle connected (it changes at each
    /// server start; see docs/backends/redis.md on what that means for fences).
    pub fn server_run_id(&self) -> &str {
        &self.run_id
    }
}

/// Opens `redis://` and `rediss://` URLs, for the registry of schemes.
pub(crate) async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(
        RedisBackend::open(&BackendUrl::parse(url)?).await?,
    ))
}

/// One lease held on the node: everything its renewals and release need (the TTL comes
/// with each renewal), so that no table of leases is kept beside the backend.
struct RedisLease<C: Connect> {
    node: Arc<Node<C>>,
    key: Key,
    owner: Owner,
    kind: LockKind,
}

#[async_trait]
impl<C: Connect> HeldLease for RedisLease<C> {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        self.node
            .renew(&self.key, &self.owner, ttl, self.kind)
            .await
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        self.node.release(&self.key, &self.owner).await
    }

    fn release_keeps_call_order(&self) -> bool {
        C::KEEPS_CALL_ORDER
    }
}

#[async_trait]
impl Backend for RedisBackend {
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
        try_acquire(&self.node, request).await
    }

    async fn watch(&self, key: &Key) -> Result<Option<Box<dyn KeyWatch>>> {
        Ok(self
            .waker
            .watch(key.as_str())
            .await
            .map(|watch| Box::new(watch) as Box<dyn KeyWatch>))
    }

    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        abandon(&self.node, key, owner).await
    }
}

#[async_trait]
impl Admin for RedisBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        self.node.inspect(key).await
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        list(&self.node).await
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        self.node.force_release(key).await
    }
}

/// The single-node protocol's attempt on `node` (one server, or the master of the key's
/// slot in a cluster).
pub(super) async fn try_acquire<C: Connect>(
    node: &Arc<Node<C>>,
    request: &AcquireRequest<'_>,
) -> Result<Attempt> {
    let sent_at = Instant::now();
    Ok(match node.acquire(request, false, 0).await? {
        NodeAttempt::Taken { number, .. } => Attempt::Acquired(Granted {
            fence: number,
            sent_at,
            lease: Box::new(RedisLease {
                node: Arc::clone(node),
                key: request.key.clone(),
                owner: request.owner.clone(),
                kind: request.kind,
            }),
        }),
        NodeAttempt::Mismatch(held_with) => {
            return Err(mismatch(node.describe(), request, held_with))
        }
        NodeAttempt::Held(pttl) => Attempt::Held {
            expires_in: match pttl {
                -1 => None,
                ms => Some(Duration::from_millis(ms.max(0).unsigned_abs())),
            },
        },
    })
}

/// The error of a semaphore request whose count differs from the holders'.
pub(super) fn mismatch(describe: &str, request: &AcquireRequest<'_>, held_with: u32) -> Error {
    let asked = match request.kind {
        LockKind::Semaphore { permits } => permits,
        _ => 0,
    };
    Error::PermitMismatch {
        key: request.key.to_string(),
        backend: describe.to_owned(),
        held_with,
        asked,
    }
}

/// Frees what an abandoned attempt on `node` may have taken.
pub(super) async fn abandon<C: Connect>(
    node: &Arc<Node<C>>,
    key: &Key,
    owner: &Owner,
) -> Result<()> {
    let node = Arc::clone(node);
    let (key, owner) = (key.clone(), owner.clone());
    abandon_soon(async move { node.release(&key, &owner).await.map(drop) }).await
}

/// Every lock held on `node`.
pub(super) async fn list<C: Connect>(node: &Node<C>) -> Result<Vec<LockInfo>> {
    let mut all = Vec::new();
    for name in node.scan_keys().await? {
        let Ok(key) = Key::new(name) else { continue };
        if let Some(info) = node.inspect(&key).await? {
            all.push(info);
        }
    }
    Ok(all)
}
