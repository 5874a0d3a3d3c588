//! `redlock://host1:port1,host2:port2,host3:port3[/db][?options]`: the Redlock algorithm
//! over N independent Redis nodes, each with the single-node layout of SPEC §3.
//!
//! - **Acquire**: the acquire script is sent to all N nodes in parallel, each with a
//!   timeout small against the TTL (TTL/10, at least 10 ms, at most `command_timeout`).
//!   The lock is held if a majority (N/2+1) granted it and the validity
//!   `TTL − elapsed − drift` (drift = TTL·1% + 2 ms) is still positive; otherwise it is
//!   released on all nodes at once and the engine retries after a random delay.
//! - **Fence**: each node keeps a counter beside the lock. Phase 1 returns the counters of
//!   the granting nodes; the fence is their maximum + 1, and phase 2 writes it back (only
//!   where this owner still holds the lock) to a majority before the lease is handed out.
//!   Any two majorities intersect, so the next holder reads at least this fence on one
//!   node of its own majority and picks a larger one.
//! - **Renew / release** go to all nodes in parallel; renewal needs a majority, and a
//!   lease whose renewal cannot reach a majority before its validity ends is lost.
//!
//! The conditions under which this holds are in docs/backends/redis.md.

use super::config::{split_hosts, NodeConfig, Options};
use super::node::{abandon_soon, Node, NodeAttempt};
use super::waker::{ChannelWatch, Waker};
use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, Granted, HeldLease, KeyWatch, LockInfo,
    LockKind,
};
use crate::core::lease::Lease;
use crate::core::locks::{Locks, Wait};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
use crate::key::Key;
use async_trait::async_trait;
use futures_util::future::join_all;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest random delay before a woken Redlock waiter retries, so that waiters
/// woken by the same release (one message per node) do not split the vote.
const RETRY_JITTER: Duration = Duration::from_millis(10);

/// True if `text` is a `redlock://` URL (parsed here, since its multi-host authority is
/// not a URL the `url` crate accepts).
pub fn is_redlock_url(text: &str) -> bool {
    text.get(..10)
        .is_some_and(|s| s.eq_ignore_ascii_case("redlock://"))
}

/// Redlock over N independent Redis nodes.
#[derive(Debug)]
pub struct RedlockBackend {
    cluster: Arc<Cluster>,
    wakers: Vec<Waker>,
}

/// The nodes and the majority rule, shared by the backend and its leases.
#[derive(Debug)]
struct Cluster {
    nodes: Vec<Node>,
    quorum: usize,
    command_timeout: Duration,
    describe: String,
}

/// Opens `redlock://` URLs, for the registry of schemes.
pub(crate) async fn open_redlock(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(RedlockBackend::open(url).await?))
}

impl RedlockBackend {
    /// Parses a `redlock://` URL and connects to its nodes. Fails if fewer than a
    /// majority can be reached; the others are retried at each use.
    pub async fn open(text: &str) -> Result<RedlockBackend> {
        let redacted = crate::redact(text);
        let bad = |reason: String| Error::BadUrl {
            url: redacted.clone(),
            reason,
        };
        if !is_redlock_url(text) {
            return Err(bad("not a redlock:// URL".to_owned()));
        }
        let urls = split_hosts(
            text,
            "redlock://",
            "redis",
            "redlock://h1:6379,h2:6379,h3:6379",
            &redacted,
        )?;
        let first = urls.first().ok_or_else(|| bad("no nodes".to_owned()))?;
        let options = Options::parse(first, &redacted)?;
        let configs = urls
            .iter()
            .map(|url| NodeConfig::from_url(url, &redacted, &options))
            .collect::<Result<Vec<_>>>()?;
        let wakers = configs
            .iter()
            .map(|c| {
                Waker::new(
                    &c.describe,
                    c.client.clone(),
                    format!("{}released", options.prefix),
                    options.connect_timeout,
                    options.command_timeout,
                )
            })
            .collect();
        let nodes: Vec<Node> = configs.into_iter().map(Node::new).collect();
        let quorum = nodes.len() / 2 + 1;
        let cluster = Cluster {
            nodes,
            quorum,
            command_timeout: options.command_timeout,
            describe: redacted.clone(),
        };
        let connected = join_all(cluster.nodes.iter().map(|n| n.connection())).await;
        let errors: Vec<Error> = connected.into_iter().filter_map(Result::err).collect();
        if cluster.nodes.len() - errors.len() < quorum {
            // An authentication failure everywhere is a server answer, not an outage.
            return Err(cluster.quorum_error(
                "connect",
                cluster.nodes.len() - errors.len(),
                &errors,
            ));
        }
        Ok(RedlockBackend {
            cluster: Arc::new(cluster),
            wakers,
        })
    }

    /// The number of nodes.
    pub fn node_count(&self) -> usize {
        self.cluster.nodes.len()
    }

    /// How many nodes must agree (N/2+1).
    pub fn quorum(&self) -> usize {
        self.cluster.quorum
    }
    /// Takes every key of `keys` (all or nothing) with the given TTL and wait, in sorted
    /// order so that two callers asking for overlapping sets cannot deadlock; on failure
    /// the keys already taken are released. Each key is an ordinary lease with its own
    /// renewal and loss signal. Meant for `redlock://` handles, but it works on any
    /// backend (the ordering argument does not depend on the store).
    ///
    /// ```no_run
    /// # async fn f(locks: fencelock::Locks) -> fencelock::Result<()> {
    /// use fencelock::backends::redis::RedlockBackend;
    /// let leases = RedlockBackend::acquire_all(
    ///     &locks, &["account:7", "account:3"], std::time::Duration::from_secs(10), fencelock::Wait::Forever,
    /// ).await?;
    /// assert_eq!(leases[0].key(), "account:3");
    /// # Ok(()) }
    /// ```
    pub async fn acquire_all(
        locks: &Locks,
        keys: &[impl AsRef<str>],
        ttl: Duration,
        wait: Wait,
    ) -> Result<Vec<Lease>> {
        let sorted: BTreeSet<&str> = keys.iter().map(AsRef::as_ref).collect();
        let deadline = match wait {
            Wait::For(limit) => Instant::now().checked_add(limit),
            _ => None,
        };
        let mut leases: Vec<Lease> = Vec::with_capacity(sorted.len());
        for key in sorted {
            let this_wait = match (wait, deadline) {
                (Wait::For(_), Some(deadline)) => {
                    Wait::For(deadline.saturating_duration_since(Instant::now()))
                }
                (other, _) => other,
            };
            match locks.lock(key).ttl(ttl).wait(this_wait).acquire().await {
                Ok(lease) => leases.push(lease),
                Err(err) => {
                    join_all(leases.into_iter().map(Lease::release)).await;
                    return Err(err);
                }
            }
        }
        Ok(leases)
    }
}

impl Cluster {
    fn node_timeout(&self, ttl: Duration) -> Duration {
        (ttl / 10).clamp(
            Duration::from_millis(10),
            self.command_timeout.max(Duration::from_millis(10)),
        )
    }

    /// How long a release waits for each node: the engine gives a whole release at least
    /// a second (a third of the TTL for longer ones), and a frozen node must not make
    /// it miss the answers of the others.
    fn release_timeout(&self, ttl: Duration) -> Duration {
        self.command_timeout
            .min((ttl / 4).max(Duration::from_millis(800)))
    }

    fn quorum_detail(&self, what: &str, answered: usize, errors: &[Error]) -> String {
        let errors: Vec<String> = errors.iter().map(Error::to_string).collect();
        format!(
            "no quorum: {what} reached {answered} of {} Redlock nodes, {} needed ({})",
            self.nodes.len(),
            self.quorum,
            errors.join("; ")
        )
    }

    /// No majority answered: `Backend` when every failing node refused us (credentials,
    /// permissions), which waiting will not change; else `Unavailable`. The first node's
    /// error is kept as the source.
    fn quorum_error(&self, what: &str, answered: usize, errors: &[Error]) -> Error {
        let detail = self.quorum_detail(what, answered, errors);
        let refused = !errors.is_empty() && errors.iter().all(|e| !e.is_transient());
        let error = if refused {
            Error::backend(&self.describe, detail)
        } else {
            Error::unavailable(&self.describe, detail)
        };
        match errors.first() {
            Some(first) => error.caused_by(first.clone()),
            None => error,
        }
    }

    /// Runs `op` on every node in parallel, each bounded by `limit`.
    async fn on_all<'a, T, F, Fut>(&'a self, limit: Duration, op: F) -> Vec<Result<T>>
    where
        F: Fn(&'a Node) -> Fut,
        Fut: Future<Output = Result<T>> + 'a,
    {
        join_all(self.nodes.iter().map(|node| {
            let fut = op(node);
            async move {
                match tokio::time::timeout(limit, fut).await {
                    Ok(result) => result,
                    Err(_) => Err(Error::unavailable(
                        node.describe(),
                        format!("no answer within {limit:?}"),
                    )),
                }
            }
        }))
        .await
    }

    /// Tallies owner-checked boolean answers: `Ok(true)` with a majority of yes,
    /// `Ok(false)` when a majority is impossible, else a quorum error.
    fn tally(&self, what: &str, results: Vec<Result<bool>>) -> Result<bool> {
        let yes = results.iter().filter(|r| matches!(r, Ok(true))).count();
        let no = results.iter().filter(|r| matches!(r, Ok(false))).count();
        if yes >= self.quorum {
            return Ok(true);
        }
        if self.nodes.len() - no < self.quorum {
            return Ok(false);
        }
        let errors: Vec<Error> = results.into_iter().filter_map(Result::err).collect();
        Err(self.quorum_error(what, yes + no, &errors))
    }

    async fn release_everywhere(
        &self,
        key: &Key,
        owner: &Owner,
        limit: Duration,
    ) -> Vec<Result<bool>> {
        self.on_all(limit, |node| node.release(key, owner)).await
    }
}

/// One lease's record from the nodes that hold it: the first node's, with the highest
/// fence (phase 2 wrote it on the majority) and the earliest expiry.
fn merged(key: &Key, infos: Vec<LockInfo>) -> LockInfo {
    let fence = infos.iter().filter_map(|i| i.fence).max();
    let expires_at = infos.iter().filter_map(|i| i.expires_at).min();
    let mut info = infos
        .into_iter()
        .next()
        .unwrap_or_else(|| LockInfo::new(key.as_str()));
    info.fence = fence;
    info.expires_at = expires_at;
    info
}

/// The readers or permits of `key` that a majority of nodes knows, from each node's
/// record of its holders; `None` if there are none.
fn quorum_holders(key: &Key, nodes: &[LockInfo], quorum: usize) -> Option<LockInfo> {
    let mut by_owner: BTreeMap<String, Vec<LockInfo>> = BTreeMap::new();
    for holder in nodes.iter().flat_map(|info| info.holders.iter()) {
        if let Some(owner) = &holder.owner {
            by_owner
                .entry(owner.clone())
                .or_default()
                .push(holder.clone());
        }
    }
    let mut holders: Vec<LockInfo> = by_owner
        .into_values()
        .filter(|infos| infos.len() >= quorum)
        .map(|infos| merged(key, infos))
        .collect();
    if holders.is_empty() {
        return None;
    }
    holders.sort_by_key(|h| h.fence);
    let first = nodes.first()?;
    let kind = match first.permits {
        Some(permits) if first.kind.as_deref() == Some("semaphore") => {
            LockKind::Semaphore { permits }
        }
        _ => LockKind::Shared,
    };
    Some(LockInfo::of_holders(key.as_str(), kind, holders))
}

/// The semaphore slot granted by the most nodes (the lowest on a tie), if any.
fn most_granted_slot(grants: &[(usize, u64, u32)]) -> Option<u32> {
    let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
    for &(_, _, slot) in grants {
        *votes.entry(slot).or_default() += 1;
    }
    let most = votes.values().copied().max()?;
    votes
        .into_iter()
        .find(|&(_, n)| n == most)
        .map(|(slot, _)| slot)
}

/// Wakes at the first release message from any node, then waits a small random delay.
struct RedlockWatch {
    watches: Vec<ChannelWatch>,
}

#[async_trait]
impl KeyWatch for RedlockWatch {
    async fn changed(&mut self) {
        let waits = self.watches.iter_mut().map(|w| Box::pin(w.notified()));
        futures_util::future::select_all(waits).await;
        let jitter = rand::rng().random_range(Duration::ZERO..=RETRY_JITTER);
        tokio::time::sleep(jitter).await;
    }
}

/// One lease held on a majority of the nodes: the nodes, the key, the owner token and the
/// TTL of the last grant or renewal (which bounds how long a release may wait per node).
struct RedlockLease {
    cluster: Arc<Cluster>,
    key: Key,
    owner: Owner,
    kind: LockKind,
    ttl: Duration,
}

#[async_trait]
impl HeldLease for RedlockLease {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let limit = self.cluster.node_timeout(ttl);
        let (key, owner, kind) = (&self.key, &self.owner, self.kind);
        let results = self
            .cluster
            .on_all(limit, |node| node.renew(key, owner, ttl, kind))
            .await;
        let renewed = self.cluster.tally("renewal", results)?;
        if renewed {
            self.ttl = ttl;
        }
        Ok(renewed)
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        let limit = self.cluster.release_timeout(self.ttl);
        let results = self
            .cluster
            .release_everywhere(&self.key, &self.owner, limit)
            .await;
        self.cluster.tally("release", results)
    }
}

#[async_trait]
impl Backend for RedlockBackend {
    fn describe(&self) -> &str {
        &self.cluster.describe
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            shared_locks: true,
            semaphores: true,
            ..Capabilities::expiring()
        }
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let cluster = &self.cluster;
        let started = Instant::now();
        let limit = cluster.node_timeout(request.ttl);
        // Every node is asked to try the slots from the same one, so that nodes in the
        // same state grant the same slot; a random start spreads concurrent requests.
        let first_slot = match request.kind {
            LockKind::Semaphore { permits } if permits > 1 => rand::rng().random_range(0..permits),
            _ => 0,
        };
        let results = cluster
            .on_all(limit, |node| node.acquire(request, true, first_slot))
            .await;
        // (node, counter, slot) of each grant.
        let mut grants: Vec<(usize, u64, u32)> = Vec::new();
        // When each node's lock frees: zero where we were granted (we release below),
        // the remaining TTL where held, unknown (None) where the node failed.
        let mut frees: Vec<Option<Duration>> = Vec::new();
        let mut errors = Vec::new();
        let mut mismatches: Vec<u32> = Vec::new();
        for (index, result) in results.into_iter().enumerate() {
            match result {
                Ok(NodeAttempt::Taken { number, slot }) => {
                    grants.push((index, number, slot));
                    frees.push(Some(Duration::ZERO));
                }
                Ok(NodeAttempt::Mismatch(held_with)) => {
                    mismatches.push(held_with);
                    frees.push(None);
                }
                Ok(NodeAttempt::Held(pttl)) => {
                    frees.push((pttl >= 0).then(|| Duration::from_millis(pttl.unsigned_abs())));
                }
                Err(err) => {
                    errors.push(err);
                    frees.push(None);
                }
            }
        }
        // A permit holds one slot on a majority: the slot granted by most nodes.
        let slot = most_granted_slot(&grants);
        let granted: Vec<(usize, u64)> = grants
            .iter()
            .filter(|(_, _, s)| Some(*s) == slot)
            .map(|&(index, counter, _)| (index, counter))
            .collect();
        let drift = request.ttl / 100 + Duration::from_millis(2);
        if granted.len() >= cluster.quorum {
            // Grants of another slot are given back, so that this lease holds one slot.
            let strays = grants.iter().filter(|(_, _, s)| Some(*s) != slot);
            join_all(strays.filter_map(|&(index, _, _)| {
                let node = cluster.nodes.get(index)?;
                Some(tokio::time::timeout(
                    limit,
                    node.release(request.key, request.owner),
                ))
            }))
            .await;
            let fence = granted
                .iter()
                .map(|&(_, counter)| counter)
                .max()
                .unwrap_or(0)
                .saturating_add(1);
            let commits = join_all(granted.iter().filter_map(|&(index, _)| {
                let node = cluster.nodes.get(index)?;
                Some(async move {
                    tokio::time::timeout(
                        limit,
                        node.commit_fence(request.key, request.owner, fence, request.kind),
                    )
                    .await
                    .unwrap_or(Ok(false))
                })
            }))
            .await;
            let committed = commits.iter().filter(|r| matches!(r, Ok(true))).count();
            let valid = request
                .ttl
                .checked_sub(started.elapsed() + drift)
                .is_some_and(|v| !v.is_zero());
            if committed >= cluster.quorum && valid {
                return Ok(Attempt::Acquired(Granted {
                    fence,
                    sent_at: started,
                    lease: Box::new(RedlockLease {
                        cluster: Arc::clone(cluster),
                        key: request.key.clone(),
                        owner: request.owner.clone(),
                        kind: request.kind,
                        ttl: request.ttl,
                    }),
                }));
            }
        }
        // Not held: give back what we took, on all nodes at once (also those that did not
        // answer in time: the command may still have reached them). A writer's intent
        // stays: it still waits.
        if !grants.is_empty() || !errors.is_empty() {
            let cleanup = cluster
                .node_timeout(request.ttl)
                .max(Duration::from_millis(50));
            cluster
                .on_all(cleanup, |node| {
                    node.release_keeping_intent(request.key, request.owner, true)
                })
                .await;
        }
        // The count differs on so many nodes that no majority can grant it.
        if cluster.nodes.len() - mismatches.len() < cluster.quorum {
            if let Some(&held_with) = mismatches.iter().max() {
                return Err(super::single::mismatch(
                    &cluster.describe,
                    request,
                    held_with,
                ));
            }
        }
        let answered = cluster.nodes.len() - errors.len();
        if answered < cluster.quorum {
            return Err(cluster.quorum_error("acquire", answered, &errors));
        }
        // The lock can be had once a majority of nodes is free.
        let mut sorted: Vec<Duration> = frees.iter().map(|f| f.unwrap_or(Duration::MAX)).collect();
        sorted.sort();
        let free_in = sorted
            .get(cluster.quorum - 1)
            .copied()
            .unwrap_or(Duration::MAX);
        let expires_in = if free_in == Duration::MAX {
            None
        } else if free_in.is_zero() {
            // A split vote or a slow round: retry after a random delay.
            Some(rand::rng().random_range(Duration::from_millis(1)..=RETRY_JITTER * 3))
        } else {
            Some(free_in)
        };
        Ok(Attempt::Held { expires_in })
    }

    async fn watch(&self, key: &Key) -> Result<Option<Box<dyn KeyWatch>>> {
        let watches: Vec<ChannelWatch> =
            join_all(self.wakers.iter().map(|w| w.watch(key.as_str())))
                .await
                .into_iter()
                .flatten()
                .collect();
        if watches.is_empty() {
            return Ok(None);
        }
        Ok(Some(Box::new(RedlockWatch { watches })))
    }

    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        let cluster = Arc::clone(&self.cluster);
        let (key, owner) = (key.clone(), owner.clone());
        abandon_soon(async move {
            let limit = cluster.command_timeout;
            cluster.release_everywhere(&key, &owner, limit).await;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl Admin for RedlockBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let cluster = &self.cluster;
        let results = cluster
            .on_all(cluster.command_timeout, |node| node.inspect(key))
            .await;
        let mut errors = Vec::new();
        let mut by_owner: BTreeMap<String, Vec<LockInfo>> = BTreeMap::new();
        let mut shared: Vec<LockInfo> = Vec::new();
        for result in results {
            match result {
                Ok(Some(info)) if !info.holders.is_empty() => shared.push(info),
                Ok(Some(info)) => {
                    if let Some(owner) = info.owner.clone() {
                        by_owner.entry(owner).or_default().push(info);
                    }
                }
                Ok(None) => {}
                Err(err) => errors.push(err),
            }
        }
        let answered = cluster.nodes.len() - errors.len();
        if let Some(info) = quorum_holders(key, &shared, cluster.quorum) {
            return Ok(Some(info));
        }
        let held = by_owner
            .into_values()
            .find(|infos| infos.len() >= cluster.quorum);
        match held {
            Some(infos) => Ok(Some(merged(key, infos))),
            None if answered < cluster.quorum => {
                Err(cluster.quorum_error("status", answered, &errors))
            }
            None => Ok(None),
        }
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let cluster = &self.cluster;
        let results = cluster
            .on_all(cluster.command_timeout, |node| node.scan_keys())
            .await;
        let mut errors = Vec::new();
        let mut names = BTreeSet::new();
        for result in results {
            match result {
                Ok(found) => names.extend(found),
                Err(err) => errors.push(err),
            }
        }
        let answered = cluster.nodes.len() - errors.len();
        if answered < cluster.quorum {
            return Err(cluster.quorum_error("list", answered, &errors));
        }
        let mut all = Vec::new();
        for name in names {
            let Ok(key) = Key::new(name) else { continue };
            if let Some(info) = self.inspect(&key).await? {
                all.push(info);
            }
        }
        Ok(all)
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let cluster = &self.cluster;
        let results = cluster
            .on_all(cluster.command_timeout, |node| node.force_release(key))
            .await;
        cluster.tally("force release", results)
    }
}
