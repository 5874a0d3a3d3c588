//! `zk://h1:p1[,h2:p2,…][/chroot]`: the lock recipe of ZooKeeper (Curator's
//! `InterProcessMutex`) over ephemeral sequential znodes.
//!
//! A key is the container znode `<chroot>/dlock/<name>` (see [`naming`]). An acquirer
//! creates the ephemeral sequential child `_c_<owner>-lock-<seq>` carrying its holder
//! record (JSON: key, owner, pid, host, acquisition time, TTL, published value); it holds
//! the lock while its child has the lowest sequence number. A waiter watches only the child just below
//! its own, so a release wakes exactly one waiter, without polling. The fence is the
//! holder child's creation zxid (`czxid`): zxids grow across the whole ensemble, and a
//! later holder's child was created after every earlier holder's.
//!
//! Readers and semaphore permits are children of the same queue, their kind in their
//! name (Curator's `InterProcessReadWriteLock` and `InterProcessSemaphoreV2`); [`order`]
//! decides from one listing who holds the key, FIFO and write-preferring.
//!
//! The lease is a ZooKeeper session of its own: each lease (and each waiting attempt)
//! opens one session, whose timeout is the lease's TTL as the servers clamp it (by
//! default to 2 to 20 times their `tickTime`). One session per lease, not one per handle
//! as Curator does, because the TTL is chosen per lease: a session's timeout is fixed when
//! it is opened, and a lease taken with a 1 s TTL must be freed about 1 s after its holder
//! dies, whatever other leases of the same handle asked for. It also keeps leases
//! independent: one session that expires ends exactly one lease. The cost is one TCP
//! connection per held or waiting lease, which counts against the servers'
//! `maxClientCnxns` (60 per client address by default).
//!
//! Renewal is the client's heartbeats; `renew` checks that the session is connected and
//! that the lease's znode still exists in it. The lease ends (its `ended` signal fires)
//! when the session expires or is closed, when its znode is deleted from outside
//! (`dlock release --force`), or when the client stays disconnected longer than the
//! session could survive on the servers.

mod naming;
mod order;

use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, EndSignal, Granted, HeldLease, LockInfo,
    LockKind,
};
use crate::core::owner::Owner;
use crate::core::wait::{attempt_limit, call_deadline};
use crate::duration::format_duration;
use crate::error::{Error, LossReason, Result};
use crate::key::Key;
use crate::location::redact;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use zookeeper_client as zk;

/// How long an administrative call (status, list, release --force, cleanup) may take.
const ADMIN_LIMIT: Duration = Duration::from_secs(10);

/// The session timeout asked for by the administrative session.
const ADMIN_SESSION: Duration = Duration::from_secs(10);

/// The longest session timeout that fits the protocol's 32-bit milliseconds.
const MAX_SESSION: Duration = Duration::from_millis(i32::MAX as u64);

/// What a lock znode carries: who holds (or waits for) the lock.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HolderRecord {
    key: String,
    owner: String,
    pid: u32,
    host: String,
    acquired_at_ms: u64,
    ttl_ms: u64,
    /// The value the holder published (an election's leader value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

#[derive(Debug)]
struct Inner {
    /// `h1:p1,h2:p2`, for the client.
    hosts: String,
    /// `<chroot>/dlock`.
    root: String,
    describe: Arc<str>,
    /// The session for status, list, release --force and cleanups, opened when first
    /// needed and again after it expired.
    admin: tokio::sync::Mutex<Option<zk::Client>>,
}

/// The ZooKeeper backend.
#[derive(Debug, Clone)]
pub struct ZkBackend {
    inner: Arc<Inner>,
}

/// Opens `zk://…`.
pub(crate) async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(ZkBackend::open(url)?))
}

fn bad_url(url: &str, reason: impl Into<String>) -> Error {
    Error::BadUrl {
        url: redact(url),
        reason: reason.into(),
    }
}

/// Splits `zk://h1:p1,h2:p2/chroot` into the host list and the chroot (`""` for none).
fn parse_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .ok_or_else(|| bad_url(url, "expected zk://host:port[,host:port…][/chroot]"))?;
    if rest.contains(['?', '#']) {
        return Err(bad_url(url, "this backend takes no options"));
    }
    let (hosts, chroot) = match rest.find('/') {
        Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if hosts.contains('@') {
        return Err(bad_url(
            url,
            "ZooKeeper authentication is not supported; remove the user part",
        ));
    }
    if hosts.is_empty() {
        return Err(bad_url(
            url,
            "no server; write zk://host:port[,host:port…][/chroot]",
        ));
    }
    let mut list = Vec::new();
    for host in hosts.split(',') {
        let port = match host.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((_, "")) => None,
                Some((_, port)) => Some(port.strip_prefix(':').ok_or_else(|| {
                    bad_url(url, format!("bad server {host:?}; write [v6]:port"))
                })?),
                None => return Err(bad_url(url, format!("bad server {host:?}"))),
            },
            None => host.rsplit_once(':').map(|(_, port)| port),
        };
        let name_len = host.len() - port.map_or(0, |p| p.len() + 1);
        if name_len == 0 {
            return Err(bad_url(url, format!("bad server {host:?}: no host name")));
        }
        match port {
            Some(port) if port.parse::<u16>().map_or(true, |p| p == 0) => {
                return Err(bad_url(url, format!("bad port in {host:?}")));
            }
            Some(_) => list.push(host.to_owned()),
            None => list.push(format!("{host}:2181")),
        }
    }
    if chroot
        .split('/')
        .skip(1)
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(bad_url(
            url,
            format!("bad chroot {chroot:?}: empty, `.` and `..` components are not allowed"),
        ));
    }
    Ok((list.join(","), chroot.to_owned()))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Transient: the ensemble may answer later, or a new session will do.
fn is_transient(err: &zk::Error) -> bool {
    matches!(
        err,
        zk::Error::ConnectionLoss
            | zk::Error::Timeout
            | zk::Error::NoHosts
            | zk::Error::SessionExpired
            | zk::Error::SessionMoved
            | zk::Error::ClientClosed
            | zk::Error::Throttled
    )
}

fn zk_error(describe: &str, what: &str, err: zk::Error) -> Error {
    let detail = format!("{what}: {err}");
    let error = if is_transient(&err) {
        Error::unavailable(describe, detail)
    } else {
        Error::backend(describe, detail)
    };
    error.caused_by(err)
}

/// Runs one client call within `limit`; the outer error is the call not answering.
async fn bounded<T>(
    describe: &str,
    what: &str,
    limit: Duration,
    call: impl Future<Output = std::result::Result<T, zk::Error>>,
) -> Result<std::result::Result<T, zk::Error>> {
    tokio::time::timeout(limit, call).await.map_err(|_| {
        Error::unavailable(
            describe,
            format!(
                "ZooKeeper did not answer ({what}) within {}",
                format_duration(limit)
            ),
        )
    })
}

/// Lock children in queue order.
fn queue(children: Vec<String>) -> Vec<String> {
    order::queue(children).into_iter().map(|(c, _)| c).collect()
}

/// An acquirer's session and znode, before it knows whether it holds the lock.
struct Entry {
    client: zk::Client,
    dir: String,
    name: String,
    czxid: i64,
    record: HolderRecord,
}

impl Entry {
    fn path(&self) -> String {
        format!("{}/{}", self.dir, self.name)
    }
}

/// Where an entry stands in its key's queue.
enum Place {
    /// It holds the key.
    First,
    /// It waits for one of these children to go.
    Behind(Vec<String>),
    /// A semaphore entry behind permits taken with this other number of permits.
    Mismatch(u32),
    /// The entry's znode is gone (its session expired, or it was deleted from outside).
    Gone,
}

impl ZkBackend {
    /// Parses a `zk://` URL; connects only when first used.
    pub fn open(url: &str) -> Result<Self> {
        let (hosts, chroot) = parse_url(url)?;
        Ok(ZkBackend {
            inner: Arc::new(Inner {
                hosts,
                root: format!("{chroot}/dlock"),
                describe: redact(url).trim_end_matches('/').into(),
                admin: tokio::sync::Mutex::new(None),
            }),
        })
    }

    fn describe_str(&self) -> &str {
        &self.inner.describe
    }

    fn dir_of(&self, key: &Key) -> String {
        format!("{}/{}", self.inner.root, naming::node_name(key.as_str()))
    }

    /// Opens a session asking for `timeout`, within `limit`.
    async fn session(&self, timeout: Duration, limit: Duration) -> Result<zk::Client> {
        let connecting = zk::Client::connector()
            .with_session_timeout(timeout.clamp(Duration::from_millis(1), MAX_SESSION))
            .connect(&self.inner.hosts);
        match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(err)) => Err(zk_error(self.describe_str(), "cannot open a session", err)),
            Err(_) => Err(Error::unavailable(
                self.describe_str(),
                format!(
                    "no ZooKeeper server of {} opened a session within {}",
                    self.inner.hosts,
                    format_duration(limit)
                ),
            )),
        }
    }

    /// The administrative session, opened again if it ended.
    async fn admin(&self) -> Result<zk::Client> {
        let mut slot = self.inner.admin.lock().await;
        if let Some(client) = slot.as_ref() {
            if !client.state().is_terminated() {
                return Ok(client.clone());
            }
        }
        let client = self.session(ADMIN_SESSION, ADMIN_LIMIT).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Forgets an administrative session that failed, so the next call opens a new one.
    async fn admin_failed(&self, err: &zk::Error) {
        if matches!(err, zk::Error::SessionExpired | zk::Error::ClientClosed) {
            *self.inner.admin.lock().await = None;
        }
    }

    /// Opens a session for `request` and queues its znode, within `until`.
    async fn enter(&self, request: &AcquireRequest<'_>, until: Instant) -> Result<Entry> {
        let describe = self.describe_str();
        let left = |now: Instant| until.saturating_duration_since(now);
        let client = self.session(request.ttl, left(Instant::now())).await?;
        let dir = self.dir_of(request.key);
        let record = HolderRecord {
            key: request.key.to_string(),
            owner: request.owner.to_string(),
            pid: request.holder.pid,
            host: request.holder.host.clone(),
            acquired_at_ms: now_ms(),
            ttl_ms: millis(request.ttl),
            value: request.holder.value.clone(),
        };
        let data = serde_json::to_vec(&record).map_err(|err| {
            Error::backend(describe, format!("cannot encode the holder record: {err}"))
        })?;
        let tag = order::tag(request.kind);
        let prefix = format!("{dir}/_c_{}-{tag}-", request.owner);
        let options = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
        let parent = zk::CreateMode::Container.with_acls(zk::Acls::anyone_all());
        // The key's container may be removed by the servers whenever it is empty: create
        // it again and retry, a few times at most.
        for _ in 0..4 {
            let created = bounded(
                describe,
                "create the lock znode",
                left(Instant::now()),
                client.create(&prefix, &data, &options),
            )
            .await?;
            match created {
                Ok((stat, sequence)) => {
                    return Ok(Entry {
                        name: format!("_c_{}-{tag}-{sequence}", request.owner),
                        client,
                        dir,
                        czxid: stat.czxid,
                        record,
                    })
                }
                Err(zk::Error::NoNode) => {
                    bounded(
                        describe,
                        "create the key's znode",
                        left(Instant::now()),
                        client.mkdir(&dir, &parent),
                    )
                    .await?
                    .map_err(|err| zk_error(describe, "cannot create the key's znode", err))?;
                }
                Err(err) => return Err(zk_error(describe, "cannot create the lock znode", err)),
            }
        }
        Err(Error::unavailable(
            describe,
            format!("the key's znode {dir} kept disappearing; retry"),
        ))
    }

    /// Reads the queue of `entry`'s key.
    async fn place(&self, entry: &Entry, limit: Duration) -> Result<Place> {
        let children = bounded(
            self.describe_str(),
            "list the lock's queue",
            limit,
            entry.client.list_children(&entry.dir),
        )
        .await?;
        let children = match children {
            Ok(children) => children,
            Err(zk::Error::NoNode) => return Ok(Place::Gone),
            Err(err) => {
                return Err(zk_error(
                    self.describe_str(),
                    "cannot list the lock's queue",
                    err,
                ))
            }
        };
        Ok(Self::place_in(entry, children))
    }

    /// Where `entry` stands among `children` (a listing of its key's znode).
    fn place_in(entry: &Entry, children: Vec<String>) -> Place {
        let ordered = order::queue(children);
        match ordered.iter().position(|(c, _)| *c == entry.name) {
            None => Place::Gone,
            Some(at) => match order::turn(&ordered, at) {
                order::Turn::Holds => Place::First,
                order::Turn::Waits(blockers) => Place::Behind(blockers),
                order::Turn::Mismatch { held_with } => Place::Mismatch(held_with),
            },
        }
    }

    fn mismatch(&self, request: &AcquireRequest<'_>, held_with: u32) -> Error {
        Error::PermitMismatch {
            key: request.key.to_string(),
            backend: self.describe_str().to_owned(),
            held_with,
            asked: match request.kind {
                LockKind::Semaphore { permits } => permits,
                _ => 0,
            },
        }
    }

    /// Turns a first-in-queue entry into a lease: watches its znode for deletion from
    /// outside, and hands the session to the lease.
    async fn grant(&self, entry: Entry, sent_at: Instant, limit: Duration) -> Result<Granted> {
        let path = entry.path();
        let watched = bounded(
            self.describe_str(),
            "watch the lock znode",
            limit,
            entry.client.check_and_watch_stat(&path),
        )
        .await?
        .map_err(|err| zk_error(self.describe_str(), "cannot watch the lock znode", err))?;
        let (stat, watcher) = watched;
        if stat.is_none() {
            return Err(Error::unavailable(
                self.describe_str(),
                "the lock znode vanished as it was granted (session expired or force-released); retry",
            ));
        }
        let lease = ZkLease {
            state: entry.client.state_watcher(),
            session_timeout: entry.client.session_timeout(),
            client: entry.client,
            path,
            describe: Arc::clone(&self.inner.describe),
            watcher: Some(watcher),
        };
        Ok(Granted {
            fence: u64::try_from(entry.czxid).unwrap_or(0),
            sent_at,
            lease: Box::new(lease),
        })
    }

    /// Rewrites the record of an entry that waited, so that `status` shows when it got the
    /// lock rather than when it queued.
    async fn stamp_acquired(&self, entry: &Entry, limit: Duration) -> Result<()> {
        let record = HolderRecord {
            acquired_at_ms: now_ms(),
            ..entry.record.clone()
        };
        let data = serde_json::to_vec(&record).map_err(|err| {
            Error::backend(
                self.describe_str(),
                format!("cannot encode the holder record: {err}"),
            )
        })?;
        bounded(
            self.describe_str(),
            "update the holder record",
            limit,
            entry.client.set_data(&entry.path(), &data, None),
        )
        .await?
        .map_err(|err| zk_error(self.describe_str(), "cannot update the holder record", err))?;
        Ok(())
    }

    /// Deletes an entry's znode (best effort: closing its session deletes it too).
    async fn leave(&self, entry: Entry) {
        let path = entry.path();
        // Within the engine's grace past a deadline; closing the session is the fallback.
        let _ = tokio::time::timeout(Duration::from_millis(500), entry.client.delete(&path, None))
            .await;
    }

    /// The lock children of `dir` that hold its key now, in queue order, with their
    /// kinds, data and stats, read on the admin session.
    async fn holders_of(&self, client: &zk::Client, dir: &str) -> Result<Vec<HeldNode>> {
        let describe = self.describe_str();
        // A holder may release between the listing and the reads: look again then.
        'listing: for _ in 0..4 {
            let children = match bounded(
                describe,
                "list a lock",
                ADMIN_LIMIT,
                client.list_children(dir),
            )
            .await?
            {
                Ok(children) => children,
                Err(zk::Error::NoNode) => return Ok(Vec::new()),
                Err(err) => {
                    self.admin_failed(&err).await;
                    return Err(zk_error(describe, "cannot list a lock", err));
                }
            };
            let ordered = order::queue(children);
            let mut held = Vec::new();
            for at in order::holders(&ordered) {
                let (name, kind) = &ordered[at];
                let path = format!("{dir}/{name}");
                match bounded(describe, "read a lock", ADMIN_LIMIT, client.get_data(&path)).await? {
                    Ok((data, stat)) => held.push(HeldNode {
                        path,
                        kind: *kind,
                        data,
                        stat,
                    }),
                    Err(zk::Error::NoNode) => continue 'listing,
                    Err(err) => {
                        self.admin_failed(&err).await;
                        return Err(zk_error(describe, "cannot read a lock", err));
                    }
                }
            }
            return Ok(held);
        }
        Ok(Vec::new())
    }

    /// What `status` shows of a key held by `held` (in queue order): the holder of an
    /// exclusive lock, or one record per reader or permit.
    fn key_info(key: Option<&str>, held: &[HeldNode]) -> Option<LockInfo> {
        let first = held.first()?;
        let first_info = Self::info(key, &first.data, &first.stat)?;
        if first.kind == LockKind::Exclusive {
            return Some(first_info);
        }
        let key = first_info.key.clone();
        let holders = held
            .iter()
            .filter_map(|node| Self::info(Some(&key), &node.data, &node.stat))
            .collect();
        Some(LockInfo::of_holders(key, first.kind, holders))
    }

    fn info(key: Option<&str>, data: &[u8], stat: &zk::Stat) -> Option<LockInfo> {
        let record = serde_json::from_slice::<HolderRecord>(data).ok();
        let key = key
            .map(str::to_owned)
            .or_else(|| record.as_ref().map(|r| r.key.clone()))?;
        let mut info = LockInfo::new(key);
        info.fence = u64::try_from(stat.czxid).ok();
        match record {
            Some(record) => {
                info.owner = Some(record.owner);
                info.pid = Some(record.pid);
                info.host = Some(record.host);
                info.acquired_at = Some(UNIX_EPOCH + Duration::from_millis(record.acquired_at_ms));
                info.ttl = Some(Duration::from_millis(record.ttl_ms));
                info.value = record.value;
                info.note = Some(format!(
                    "held by ZooKeeper session 0x{:x}; freed when it ends",
                    stat.ephemeral_owner
                ));
            }
            None => {
                info.note = Some(format!(
                    "held by ZooKeeper session 0x{:x} without a dlock record (another client of the lock recipe)",
                    stat.ephemeral_owner
                ));
            }
        }
        Some(info)
    }
}

#[async_trait]
impl Backend for ZkBackend {
    fn describe(&self) -> &str {
        &self.inner.describe
    }

    fn capabilities(&self) -> Capabilities {
        // The session, kept alive by the client's heartbeats, is the lease: it ends when
        // its holder dies or is cut off for a session timeout, not when renewals stop.
        Capabilities {
            shared_locks: true,
            semaphores: true,
            ..Capabilities::session_bound()
        }
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let until = Instant::now() + attempt_limit(request.ttl);
        let entry = self.enter(request, until).await?;
        let sent_at = Instant::now();
        let left = until.saturating_duration_since(sent_at);
        match self.place(&entry, left).await? {
            Place::First => Ok(Attempt::Acquired(self.grant(entry, sent_at, left).await?)),
            Place::Behind(_) => {
                self.leave(entry).await;
                Ok(Attempt::Held { expires_in: None })
            }
            Place::Mismatch(held_with) => {
                self.leave(entry).await;
                Err(self.mismatch(request, held_with))
            }
            Place::Gone => Err(Error::unavailable(
                self.describe_str(),
                "the lock znode vanished right after it was created (session expired); retry",
            )),
        }
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Option<Granted>> {
        let mut delays = request.backoff.delays();
        let passed = |now: Instant| request.deadline.is_some_and(|d| now >= d);
        loop {
            let now = Instant::now();
            if passed(now) {
                return Ok(None);
            }
            match self.wait_in_queue(request).await {
                Ok(outcome) => return Ok(outcome),
                Err(err) if err.is_transient() => {
                    let now = Instant::now();
                    if passed(now) {
                        return Err(err);
                    }
                    tracing::debug!(key = %request.key, %err, "transient error while waiting; retrying");
                    let mut wake = now + delays.next_delay();
                    if let Some(deadline) = request.deadline {
                        wake = wake.min(deadline);
                    }
                    tokio::time::sleep_until(wake.into()).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        let describe = self.describe_str();
        let client = self.admin().await?;
        let dir = self.dir_of(key);
        let children = match bounded(
            describe,
            "list a lock",
            ADMIN_LIMIT,
            client.list_children(&dir),
        )
        .await?
        {
            Ok(children) => children,
            Err(zk::Error::NoNode) => return Ok(()),
            Err(err) => {
                self.admin_failed(&err).await;
                return Err(zk_error(describe, "cannot list a lock", err));
            }
        };
        for child in queue(children) {
            let path = format!("{dir}/{child}");
            let data = match bounded(describe, "read a lock", ADMIN_LIMIT, client.get_data(&path))
                .await?
            {
                Ok((data, _)) => data,
                Err(zk::Error::NoNode) => continue,
                Err(err) => return Err(zk_error(describe, "cannot read a lock", err)),
            };
            let mine = serde_json::from_slice::<HolderRecord>(&data)
                .is_ok_and(|record| record.owner == owner.as_str());
            if mine {
                match bounded(
                    describe,
                    "delete a lock",
                    ADMIN_LIMIT,
                    client.delete(&path, None),
                )
                .await?
                {
                    Ok(()) | Err(zk::Error::NoNode) => {}
                    Err(err) => return Err(zk_error(describe, "cannot delete a lock", err)),
                }
            }
        }
        Ok(())
    }
}

impl ZkBackend {
    /// One session's turn in the queue: enter, then wait for each predecessor's deletion
    /// until first or the deadline. Dropping this future closes the session, which
    /// deletes its znode.
    async fn wait_in_queue(&self, request: &AcquireRequest<'_>) -> Result<Option<Granted>> {
        let entry = self
            .enter(request, call_deadline(request, Instant::now()))
            .await?;
        let mut waited = false;
        loop {
            let sent_at = Instant::now();
            let limit = call_deadline(request, sent_at).saturating_duration_since(sent_at);
            let blockers = match self.place(&entry, limit).await? {
                Place::First => {
                    if waited {
                        self.stamp_acquired(&entry, limit).await?;
                    }
                    return self.grant(entry, sent_at, limit).await.map(Some);
                }
                Place::Gone => {
                    return Err(Error::unavailable(
                        self.describe_str(),
                        "the waiting znode vanished (session expired or deleted from outside); queuing again",
                    ))
                }
                Place::Mismatch(held_with) => {
                    self.leave(entry).await;
                    return Err(self.mismatch(request, held_with));
                }
                Place::Behind(blockers) => blockers,
            };
            waited = true;
            let watcher = match blockers.as_slice() {
                [predecessor] => {
                    let path = format!("{}/{predecessor}", entry.dir);
                    let watched = bounded(
                        self.describe_str(),
                        "watch the lock's previous waiter",
                        limit,
                        entry.client.check_and_watch_stat(&path),
                    )
                    .await?
                    .map_err(|err| {
                        zk_error(self.describe_str(), "cannot watch the previous waiter", err)
                    })?;
                    let (stat, watcher) = watched;
                    if stat.is_none() {
                        continue;
                    }
                    watcher
                }
                // A permit waits for any earlier child to go: one watch on the key's
                // children, set by the listing that shows them all still there.
                _ => {
                    let watched = bounded(
                        self.describe_str(),
                        "watch the lock's queue",
                        limit,
                        entry.client.list_and_watch_children(&entry.dir),
                    )
                    .await?
                    .map_err(|err| {
                        zk_error(self.describe_str(), "cannot watch the lock's queue", err)
                    })?;
                    let (children, watcher) = watched;
                    if !blockers.iter().all(|b| children.contains(b)) {
                        continue;
                    }
                    watcher
                }
            };
            let deadline = async {
                match request.deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = watcher.changed() => {
                    if event.session_state.is_terminated() {
                        return Err(Error::unavailable(
                            self.describe_str(),
                            format!("the waiting session ended ({:?}); queuing again", event.session_state),
                        ));
                    }
                }
                () = deadline => {
                    self.leave(entry).await;
                    return Ok(None);
                }
            }
        }
    }
}

#[async_trait]
impl Admin for ZkBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let client = self.admin().await?;
        let held = self.holders_of(&client, &self.dir_of(key)).await?;
        Ok(Self::key_info(Some(key.as_str()), &held))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let describe = self.describe_str();
        let client = self.admin().await?;
        let root = &self.inner.root;
        let names = match bounded(
            describe,
            "list the locks",
            ADMIN_LIMIT,
            client.list_children(root),
        )
        .await?
        {
            Ok(names) => names,
            Err(zk::Error::NoNode) => return Ok(Vec::new()),
            Err(err) => {
                self.admin_failed(&err).await;
                return Err(zk_error(describe, "cannot list the locks", err));
            }
        };
        let mut all = Vec::new();
        for name in names {
            let key = naming::key_of(&name);
            let held = self.holders_of(&client, &format!("{root}/{name}")).await?;
            if let Some(info) = Self::key_info(key.as_deref(), &held) {
                all.push(info);
            }
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let describe = self.describe_str();
        let client = self.admin().await?;
        let mut deleted_any = false;
        // Only the holders read here, each at the version read: had one released
        // meanwhile, the next holder keeps its lease. Every reader or permit goes.
        for node in self.holders_of(&client, &self.dir_of(key)).await? {
            match bounded(
                describe,
                "delete the holder's znode",
                ADMIN_LIMIT,
                client.delete(&node.path, Some(node.stat.version)),
            )
            .await?
            {
                Ok(()) => deleted_any = true,
                Err(zk::Error::NoNode) => {}
                Err(err) => {
                    self.admin_failed(&err).await;
                    return Err(zk_error(describe, "cannot delete the holder's znode", err));
                }
            }
        }
        Ok(deleted_any)
    }
}

/// A znode that holds its key, as `status` reads it.
struct HeldNode {
    path: String,
    kind: LockKind,
    data: Vec<u8>,
    stat: zk::Stat,
}

/// A held lock: the session whose ephemeral znode is first in the key's queue.
struct ZkLease {
    client: zk::Client,
    path: String,
    describe: Arc<str>,
    state: zk::StateWatcher,
    session_timeout: Duration,
    watcher: Option<zk::OneshotWatcher>,
}

impl ZkLease {
    fn unavailable(&self, detail: impl std::fmt::Display) -> Error {
        Error::unavailable(&self.describe, detail)
    }
}

#[async_trait]
impl HeldLease for ZkLease {
    async fn renew(&mut self, _ttl: Duration) -> Result<bool> {
        // The session timeout was fixed when the session opened; the heartbeats keep it.
        match self.client.state() {
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {}
            zk::SessionState::Disconnected => {
                return Err(self.unavailable(format!(
                    "disconnected from ZooKeeper; the session survives {} without a server",
                    format_duration(self.session_timeout)
                )))
            }
            _ => return Ok(false),
        }
        let limit = (self.session_timeout / 3).max(Duration::from_millis(100));
        match bounded(
            &self.describe,
            "check the lock znode",
            limit,
            self.client.check_stat(&self.path),
        )
        .await?
        {
            Ok(Some(stat)) => Ok(stat.ephemeral_owner == self.client.session_id().0),
            Ok(None) | Err(zk::Error::SessionExpired | zk::Error::ClientClosed) => Ok(false),
            Err(err) => Err(zk_error(&self.describe, "cannot check the lock znode", err)),
        }
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        let limit = self
            .session_timeout
            .clamp(Duration::from_millis(500), Duration::from_secs(5));
        let deleted = bounded(
            &self.describe,
            "delete the lock znode",
            limit,
            self.client.delete(&self.path, None),
        )
        .await;
        // Dropping the client closes the session, which deletes the znode anyway.
        match deleted? {
            Ok(()) => Ok(true),
            Err(zk::Error::NoNode | zk::Error::SessionExpired | zk::Error::ClientClosed) => {
                Ok(false)
            }
            Err(err) => Err(zk_error(
                &self.describe,
                "cannot delete the lock znode",
                err,
            )),
        }
    }

    fn ended(&mut self) -> EndSignal {
        let mut state = self.state.clone();
        let watcher = self.watcher.take();
        // The client gives up a silent connection after 2/5 of the session timeout, so a
        // session still disconnected 3/5 of it later may have expired on the servers.
        let survives = self.session_timeout * 3 / 5;
        Box::pin(async move {
            let mut node = Box::pin(async move {
                match watcher {
                    Some(watcher) => watcher.changed().await,
                    None => std::future::pending().await,
                }
            });
            let mut node_watched = true;
            let mut disconnected_at: Option<Instant> = None;
            loop {
                let current = state.peek_state();
                if current.is_terminated() {
                    return LossReason::SessionEnded {
                        detail: format!("ZooKeeper session {current:?}"),
                    };
                }
                if matches!(current, zk::SessionState::Disconnected) {
                    disconnected_at.get_or_insert_with(Instant::now);
                } else {
                    disconnected_at = None;
                }
                let cut_off = async {
                    match disconnected_at {
                        Some(at) => tokio::time::sleep_until((at + survives).into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    event = &mut node, if node_watched => {
                        node_watched = false;
                        // A session event is reported by the state check above; after
                        // any other change, deletion is left to the renewal's check.
                        if event.event_type == zk::EventType::NodeDeleted {
                            return LossReason::SessionEnded {
                                detail: "its lock znode was deleted (release --force)".to_owned(),
                            };
                        }
                    }
                    _ = state.changed() => {}
                    () = cut_off => {
                        return LossReason::SessionEnded {
                            detail: format!(
                                "disconnected from ZooKeeper for {}, longer than the session may live",
                                format_duration(survives)
                            ),
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let ok = |url: &str| parse_url(url).unwrap();
        assert_eq!(ok("zk://a:1"), ("a:1".to_owned(), String::new()));
        assert_eq!(
            ok("zk://a,b:2/app/locks/"),
            ("a:2181,b:2".to_owned(), "/app/locks".to_owned())
        );
        assert_eq!(
            ok("zk://[::1]:5,[::1]"),
            ("[::1]:5,[::1]:2181".to_owned(), String::new())
        );
        for bad in [
            "zk://",
            "zk:///x",
            "zk://a:0",
            "zk://a:x",
            "zk://u:p@a:1",
            "zk://a:1?x=1",
            "zk://a:1/x//y",
            "zk://a:1/..",
            "zk://:1",
        ] {
            let err = parse_url(bad).unwrap_err();
            assert!(matches!(err, Error::BadUrl { .. }), "{bad}: {err:?}");
            assert!(!err.to_string().contains(":p@"), "{err}");
        }
    }

    #[test]
    fn queue_order_is_by_sequence() {
        let children = vec![
            "_c_b-lock-0000000010".to_owned(),
            "foreign".to_owned(),
            "_c_a-lock-0000000002".to_owned(),
            "x-lock-0000000009".to_owned(),
        ];
        assert_eq!(
            queue(children),
            [
                "_c_a-lock-0000000002",
                "x-lock-0000000009",
                "_c_b-lock-0000000010"
            ]
        );
    }
}
