//! `etcd://h1:p1[,h2:p2,…][?prefix=…]`: the etcd v3 lock recipe over leases, revisions and
//! watches.
//!
//! Every contender for key `k` puts one etcd key `<prefix><k>/<lease id>` (see [`names`])
//! bound to an etcd lease of its own, with its holder record as the value. The contender
//! whose etcd key has the lowest create revision in that range holds the lock; the others
//! each watch only the etcd key just ahead of theirs (the next-lower create revision) for
//! its deletion, so the lock passes in arrival order and a release wakes exactly one
//! waiter. The fence is the holder's create revision: etcd revisions are cluster-wide,
//! strictly increasing and committed through raft before they are answered, so a later
//! holder always has a higher one, across restarts of every member.
//!
//! Readers and semaphore permits queue the same way, their kind in their holder record;
//! [`order`] decides from the queue who holds the key (a reader when no older entry is a
//! writer, a permit of N when fewer than N older permits exist), so the policy is FIFO
//! and write-preferring, and each reader or permit is a lease and an entry of its own.
//!
//! One etcd lease per dlock lease: the lease is what etcd expires, revokes and watches on
//! its own, so tying exactly one lock entry to exactly one lease makes "the lease ended"
//! and "the entry is gone" the same event. A lease shared by several locks (as etcd's
//! `concurrency.Session` does) would let one lock's renewal keep another alive, and a
//! revoke meant for one lock would free them all. Its ID is derived from the owner token
//! ([`names::lease_of`]), so a cancelled attempt is cleaned up by owner alone.
//!
//! TTL: etcd leases count whole seconds, so a TTL is rounded up to the next second, and
//! etcd raises it further to its minimum lease TTL (1.5 election timeouts, rounded up:
//! 2 s with etcd's default 1 s election timeout). The holder's own view is not widened:
//! it still counts its lease lost once renewals fail for the TTL it asked for. A holder
//! that dies is replaced only after the longer etcd lease expires.

mod config;
mod names;
mod order;

use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, EndSignal, Granted, HeldLease, LockInfo,
    LockKind,
};
use crate::core::owner::Owner;
use crate::core::wait::DEADLINE_GRACE;
use crate::error::{Error, LossReason, Result};
use crate::key::Key;
use async_trait::async_trait;
use config::Config;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, GetResponse, KeyValue,
    LeaseGrantOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchFilterType, WatchOptions, WatchStream,
};
use names::Record;
use order::Contender;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Opens `etcd://…`. Nothing is sent until the first request (except, with credentials,
/// the authentication, which is bounded by the connect timeout).
pub(crate) async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(EtcdBackend::open(url).await?))
}

/// What every etcd call needs: the client (one channel balanced over every endpoint),
/// the prefix and the bounds.
#[derive(Clone)]
struct Store {
    client: Client,
    describe: Arc<str>,
    prefix: Arc<str>,
    command_timeout: Duration,
}

/// The etcd backend.
#[derive(Clone)]
pub struct EtcdBackend {
    store: Store,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("describe", &self.store.describe)
            .finish_non_exhaustive()
    }
}

/// True for gRPC answers that may heal by themselves (no leader yet, a member
/// restarting, a request timed out inside the cluster).
fn is_transient(err: &etcd_client::Error) -> bool {
    use tonic::Code;
    match err {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Unknown
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Internal
                | Code::Cancelled
        ),
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::WatchError(_)
        | etcd_client::Error::LeaseKeepAliveError(_) => true,
        _ => false,
    }
}

fn message_of(err: &etcd_client::Error) -> String {
    match err {
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    }
}

fn is_lease_not_found(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(text) => text.contains("lease not found"),
        _ => false,
    }
}

fn is_lease_exists(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status) if status.message().contains("lease already exists"))
}

/// The etcd lease TTL for a dlock TTL: whole seconds, rounded up.
fn lease_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

fn fence_of(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

impl Store {
    fn error(&self, what: &str, err: etcd_client::Error) -> Error {
        let detail = format!("cannot {what}: {}", message_of(&err));
        let detail = if matches!(&err, etcd_client::Error::GRpcStatus(s) if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument) && s.message().contains("auth"))
        {
            format!("{detail} (check the user and password in the URL, and the user's roles)")
        } else {
            detail
        };
        if is_transient(&err) {
            Error::unavailable(&self.describe, detail).caused_by(err)
        } else {
            Error::backend(&self.describe, detail).caused_by(err)
        }
    }

    /// Sends one etcd request, answered by `until` (and within the command timeout).
    ///
    /// A request that fails transiently is sent again until then: the client balances
    /// over every endpoint, so a retry reaches another member when one is down, and an
    /// election lasts about one election timeout. Every request sent here is safe to
    /// repeat: puts of the same entry, deletes and revokes that check what they remove,
    /// grants of a fixed lease ID, reads. (A repeated grant of a longer lease may leave an
    /// unused lease behind, which ends at its TTL.)
    async fn call<T, F, Fut>(&self, what: &str, until: Option<Instant>, mut send: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let mut limit = Instant::now() + self.command_timeout;
        if let Some(until) = until {
            limit = limit.min(until);
        }
        let mut pause = Duration::from_millis(10);
        loop {
            match tokio::time::timeout_at(limit.into(), send(self.client.clone())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(err)) if is_transient(&err) && Instant::now() + pause < limit => {
                    tracing::debug!(%err, "etcd request failed; sending it again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
                Ok(Err(err)) => return Err(self.error(what, err)),
                Err(_) => {
                    return Err(Error::unavailable(
                        &self.describe,
                        format!("cannot {what}: etcd did not answer in time"),
                    ))
                }
            }
        }
    }

    /// Revokes a lease (deleting every key bound to it); `false` if it was already gone.
    async fn revoke(&self, lease: i64, until: Option<Instant>) -> Result<bool> {
        self.call("revoke a lease", until, |mut client| async move {
            match client.lease_revoke(lease).await {
                Ok(_) => Ok(true),
                Err(err) if is_lease_not_found(&err) => Ok(false),
                Err(err) => Err(err),
            }
        })
        .await
    }

    /// Revokes in the background, for cleanups that must not hold their caller up.
    fn revoke_detached(&self, lease: i64) {
        let store = self.clone();
        tokio::spawn(async move {
            for pause in [0u64, 200, 1000] {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                if store.revoke(lease, None).await.is_ok() {
                    return;
                }
            }
            tracing::debug!(
                lease,
                "cannot revoke an abandoned etcd lease; it ends at its TTL"
            );
        });
    }

    /// One keep-alive round trip: `false` if etcd no longer knows the lease.
    async fn keep_alive(&self, lease: i64, until: Option<Instant>) -> Result<bool> {
        self.call("renew a lease", until, |mut client| async move {
            // The call sends one keep-alive and reads its answer; dropping the stream
            // ends it, so no late answer can be taken for the next renewal's.
            match client.lease_keep_alive(lease).await {
                Ok(_) => Ok(true),
                Err(err) if is_lease_not_found(&err) => Ok(false),
                Err(err) => Err(err),
            }
        })
        .await
    }

    /// Grants lease `id` for `seconds`, replacing a leftover of an earlier attempt with
    /// the same owner; returns the TTL etcd granted (it may raise it to its minimum).
    async fn grant(&self, id: i64, seconds: i64, until: Option<Instant>) -> Result<i64> {
        for _ in 0..3 {
            let granted = self
                .call("grant a lease", until, |mut client| async move {
                    let options = LeaseGrantOptions::new().with_id(id);
                    match client.lease_grant(seconds, Some(options)).await {
                        Ok(granted) => Ok(Some(granted.ttl())),
                        Err(err) if is_lease_exists(&err) => Ok(None),
                        Err(err) => Err(err),
                    }
                })
                .await?;
            match granted {
                Some(ttl) => return Ok(ttl),
                // The ID is a function of this acquire's owner token: the lease is what
                // an earlier, cancelled attempt of this very acquire left behind (or a
                // retried grant that had reached etcd).
                None => {
                    self.revoke(id, until).await?;
                }
            }
        }
        Err(Error::unavailable(
            &self.describe,
            "cannot grant a lease: its ID stays taken",
        ))
    }

    /// A transaction.
    async fn txn(&self, what: &str, until: Option<Instant>, txn: Txn) -> Result<TxnResponse> {
        self.call(what, until, |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    }

    /// A read.
    async fn get(
        &self,
        what: &str,
        until: Option<Instant>,
        key: &[u8],
        options: Option<GetOptions>,
    ) -> Result<GetResponse> {
        self.call(what, until, |mut client| {
            let (key, options) = (key.to_vec(), options.clone());
            async move { client.get(key, options).await }
        })
        .await
    }

    /// The contenders for the lock whose etcd range is `range`, lowest create revision
    /// first, and the revision the answer was read at.
    async fn queue(
        &self,
        range: &[u8],
        with_values: bool,
        limit: Option<i64>,
        until: Option<Instant>,
    ) -> Result<(Vec<KeyValue>, i64)> {
        let mut options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        if !with_values {
            options = options.with_keys_only();
        }
        if let Some(limit) = limit {
            options = options.with_limit(limit);
        }
        let mut response = self
            .get("read the lock's queue", until, range, Some(options))
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok((response.take_kvs(), revision))
    }

    /// Deletes `entry` if it is still the one created at `revision`; `true` if it was.
    async fn delete_entry(
        &self,
        entry: &[u8],
        revision: i64,
        until: Option<Instant>,
    ) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::create_revision(
                entry.to_vec(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::delete(entry.to_vec(), None)]);
        let response = self.txn("delete a lock entry", until, txn).await?;
        Ok(response.succeeded())
    }

    /// Opens a watch on the deletions of `entry` from `revision` on.
    async fn watch_deletes(&self, entry: &[u8], revision: i64) -> Result<WatchStream> {
        self.watch_deletes_with(entry, revision, false).await
    }

    /// Opens a watch on the deletions of `entry`, or of every key under it with
    /// `prefix`, from `revision` on.
    async fn watch_deletes_with(
        &self,
        entry: &[u8],
        revision: i64,
        prefix: bool,
    ) -> Result<WatchStream> {
        let mut options = WatchOptions::new()
            .with_start_revision(revision)
            .with_filters([WatchFilterType::NoPut]);
        if prefix {
            options = options.with_prefix();
        }
        self.call("watch a lock entry", None, |mut client| {
            let (entry, options) = (entry.to_vec(), options.clone());
            async move { client.watch(entry, Some(options)).await }
        })
        .await
    }
}

/// A contender's entry, just put into the lock's range.
struct Entry {
    lease: EtcdLease,
    /// Whether it holds the key at once.
    holds: bool,
    /// When the grant of its lease was sent.
    sent_at: Instant,
}

/// How a wait in the queue ended.
enum Turn {
    Granted(Granted),
    TimedOut,
    /// Our own entry or lease went away while waiting (expired, deleted by hand).
    Lost,
}

impl EtcdBackend {
    /// Opens the client for `url`.
    pub async fn open(url: &str) -> Result<Self> {
        let config = Config::parse(url)?;
        let describe: Arc<str> = config.describe.clone().into();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            // HTTP/2 pings find a member that vanished without closing its connections;
            // etcd refuses pings more often than every 5 s, and without open streams.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(false)
            // A member cut off from its leader refuses requests instead of serving stale
            // reads or holding watches that would never fire.
            .with_require_leader(true);
        if let Some((user, password)) = &config.credentials {
            options = options.with_user(user.clone(), password.clone());
        }
        if let Some(ca_file) = &config.ca_file {
            let read = |path: &str| {
                std::fs::read(path).map_err(|err| Error::BadUrl {
                    url: config.describe.clone(),
                    reason: format!("cannot read {path}: {err}"),
                })
            };
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(ca_file)?));
            if let Some((cert, key)) = &config.client_identity {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(domain) = &config.domain {
                tls = tls.domain_name(domain.clone());
            }
            options = options.with_tls(tls);
        }
        let scheme = if config.tls() { "https" } else { "http" };
        let endpoints: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let connect = Client::connect(endpoints, Some(options));
        let limit = config.connect_timeout + Duration::from_secs(1);
        let client = match tokio::time::timeout(limit, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => {
                let store_describe = Arc::clone(&describe);
                let detail = format!("cannot connect: {}", message_of(&err));
                let detail = if config.credentials.is_some() && !is_transient(&err) {
                    format!("{detail} (check the user and password in the URL)")
                } else {
                    detail
                };
                return Err(if is_transient(&err) {
                    Error::unavailable(&store_describe, detail).caused_by(err)
                } else {
                    Error::backend(&store_describe, detail).caused_by(err)
                });
            }
            Err(_) => {
                return Err(Error::unavailable(
                    &describe,
                    "cannot connect: etcd did not answer in time",
                ))
            }
        };
        Ok(EtcdBackend {
            store: Store {
                client,
                describe,
                prefix: config.prefix.into(),
                command_timeout: config.command_timeout,
            },
        })
    }

    /// When a call made now must have answered: within the command timeout, and
    /// shortly after the caller's deadline.
    fn until(&self, request: &AcquireRequest<'_>) -> Option<Instant> {
        request.deadline.map(|d| d + DEADLINE_GRACE / 2)
    }

    /// Puts this request's entry into the lock's range, bound to a new lease of its own.
    async fn enqueue(&self, request: &AcquireRequest<'_>) -> Result<Entry> {
        let store = &self.store;
        let until = self.until(request);
        let id = names::lease_of(request.owner);
        let sent_at = Instant::now();
        let granted = store.grant(id, lease_seconds(request.ttl), until).await?;
        let entry = names::entry_of(&store.prefix, request.key, id);
        let range = names::range_of(&store.prefix, request.key);
        // A writer needs only the oldest entry's name; readers and permits read the
        // kinds of every entry older than theirs, in the same round trip.
        let mut first = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        if request.kind == LockKind::Exclusive {
            first = first.with_limit(1).with_keys_only();
        }
        let txn = Txn::new().and_then([
            TxnOp::put(
                entry.clone(),
                Record::new(request).to_json(),
                Some(PutOptions::new().with_lease(id)),
            ),
            TxnOp::get(entry.clone(), Some(GetOptions::new().with_keys_only())),
            TxnOp::get(range, Some(first)),
        ]);
        let response = store.txn("put a lock entry", until, txn).await?;
        let responses = response.op_responses();
        let kvs = |i: usize| match responses.get(i) {
            Some(TxnOpResponse::Get(get)) => get.kvs().to_vec(),
            _ => Vec::new(),
        };
        let revision = kvs(1).first().map(KeyValue::create_revision).unwrap_or(0);
        if revision <= 0 {
            return Err(Error::backend(
                &store.describe,
                "etcd did not return the lock entry it just stored",
            ));
        }
        let queue = kvs(2);
        let holds = if request.kind == LockKind::Exclusive {
            queue.first().is_some_and(|kv| kv.key() == entry.as_slice())
        } else {
            let queue: Vec<Contender> = queue.iter().map(Contender::of).collect();
            let at = queue.iter().position(|c| c.entry == entry);
            match at.map(|at| order::turn(&queue, at)) {
                Some(order::Turn::Holds) => true,
                Some(order::Turn::Mismatch { held_with }) => {
                    self.leave(id, until).await;
                    return Err(self.mismatch(request, held_with));
                }
                _ => false,
            }
        };
        Ok(Entry {
            lease: EtcdLease {
                store: store.clone(),
                id,
                entry,
                revision,
                granted_seconds: granted,
            },
            holds,
            sent_at,
        })
    }

    /// Revokes lease `id`, in the background if etcd does not answer by `until`.
    async fn leave(&self, id: i64, until: Option<Instant>) {
        let until = until.unwrap_or_else(|| Instant::now() + DEADLINE_GRACE / 2);
        if self.store.revoke(id, Some(until)).await.is_err() {
            self.store.revoke_detached(id);
        }
    }

    fn mismatch(&self, request: &AcquireRequest<'_>, held_with: u32) -> Error {
        Error::PermitMismatch {
            key: request.key.to_string(),
            backend: self.store.describe.to_string(),
            held_with,
            asked: match request.kind {
                LockKind::Semaphore { permits } => permits,
                _ => 0,
            },
        }
    }

    /// Waits for `entry` to hold the key ([`order::turn`]), watching only the older
    /// entries that keep it out and keeping its lease alive meanwhile.
    async fn wait_turn(&self, request: &AcquireRequest<'_>, entry: Entry) -> Result<Turn> {
        let store = &self.store;
        let Entry { lease, sent_at, .. } = entry;
        let range = names::range_of(&store.prefix, request.key);
        let every = (request.ttl / 3).max(Duration::from_millis(10));
        let mut alive_at = sent_at;
        let mut next_keep_alive = Instant::now() + every;
        let deadline = async {
            match request.deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            let with_kinds = request.kind != LockKind::Exclusive;
            let (queue, read_at) = store
                .queue(&range, with_kinds, None, self.until(request))
                .await?;
            let queue: Vec<Contender> = queue.iter().map(Contender::of).collect();
            let Some(position) = queue.iter().position(|c| c.entry == lease.entry) else {
                return Ok(Turn::Lost);
            };
            let blockers = match order::turn(&queue, position) {
                order::Turn::Holds => {
                    return Ok(Turn::Granted(Granted {
                        fence: fence_of(lease.revision),
                        sent_at: alive_at,
                        lease: Box::new(lease),
                    }))
                }
                order::Turn::Mismatch { held_with } => {
                    self.leave(lease.id, self.until(request)).await;
                    return Err(self.mismatch(request, held_with));
                }
                order::Turn::Waits(blockers) => blockers,
            };
            // One blocker is watched alone; several (older permits) through the range,
            // keeping only their deletions.
            let mut watch = match blockers.as_slice() {
                [one] => store.watch_deletes(one, read_at + 1).await?,
                _ => store.watch_deletes_with(&range, read_at + 1, true).await?,
            };
            loop {
                tokio::select! {
                    message = watch.message() => match message {
                        Ok(Some(response)) => {
                            let deleted = response.events().iter().any(|e| {
                                e.event_type() == EventType::Delete
                                    && e.kv().is_some_and(|kv| {
                                        blockers.iter().any(|b| b.as_slice() == kv.key())
                                    })
                            });
                            if deleted || response.canceled() {
                                break;
                            }
                        }
                        // The stream broke (a member went away): read the queue again,
                        // which reports the store unavailable if it is.
                        Ok(None) | Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            break;
                        }
                    },
                    () = tokio::time::sleep_until(next_keep_alive.into()) => {
                        let sent = Instant::now();
                        match store.keep_alive(lease.id, Some(sent + every)).await {
                            Ok(true) => alive_at = sent,
                            Ok(false) => return Ok(Turn::Lost),
                            Err(err) => {
                                if sent.saturating_duration_since(alive_at) >= request.ttl {
                                    return Err(err);
                                }
                            }
                        }
                        next_keep_alive = Instant::now() + every;
                    }
                    () = &mut deadline => {
                        let until = Instant::now() + DEADLINE_GRACE / 2;
                        if store.revoke(lease.id, Some(until)).await.is_err() {
                            store.revoke_detached(lease.id);
                        }
                        return Ok(Turn::TimedOut);
                    }
                }
            }
        }
    }

    /// The entries that hold `key` now, oldest first.
    async fn holders(&self, key: &Key) -> Result<Vec<KeyValue>> {
        let range = names::range_of(&self.store.prefix, key);
        let (queue, _) = self.store.queue(&range, true, None, None).await?;
        Ok(holding(queue))
    }
}

/// One held lease: its etcd lease and the entry bound to it.
struct EtcdLease {
    store: Store,
    id: i64,
    entry: Vec<u8>,
    /// The entry's create revision: the fence.
    revision: i64,
    /// The TTL etcd granted, in seconds.
    granted_seconds: i64,
}

impl EtcdLease {
    /// Moves the entry to a new lease with a longer TTL (an etcd lease keeps the TTL it
    /// was granted with); the entry keeps its create revision, hence the fence.
    async fn lengthen(&mut self, seconds: i64) -> Result<bool> {
        let store = &self.store;
        let granted = store
            .call("grant a lease", None, |mut client| async move {
                client.lease_grant(seconds, None).await
            })
            .await?;
        let new_id = granted.id();
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.entry.clone(),
                CompareOp::Equal,
                self.revision,
            )])
            .and_then([TxnOp::put(
                self.entry.clone(),
                Vec::new(),
                Some(PutOptions::new().with_lease(new_id).with_ignore_value()),
            )]);
        let moved = store.txn("renew a lease", None, txn).await;
        match moved {
            Ok(response) if response.succeeded() => {
                let old = std::mem::replace(&mut self.id, new_id);
                self.granted_seconds = granted.ttl();
                if store.revoke(old, None).await.is_err() {
                    store.revoke_detached(old);
                }
                Ok(true)
            }
            outcome => {
                if store.revoke(new_id, None).await.is_err() {
                    store.revoke_detached(new_id);
                }
                outcome.map(|_| false)
            }
        }
    }
}

#[async_trait]
impl HeldLease for EtcdLease {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let seconds = lease_seconds(ttl);
        if seconds > self.granted_seconds {
            return self.lengthen(seconds).await;
        }
        self.store.keep_alive(self.id, None).await
    }

    /// A keep-alive restores the etcd lease's granted TTL, which may be longer than
    /// `ttl`: a lease of another length moves the entry to a new etcd lease of exactly
    /// `ttl` (in whole seconds, rounded up, at least etcd's minimum).
    async fn expire_after(mut self: Box<Self>, ttl: Duration) -> Result<bool> {
        let seconds = lease_seconds(ttl);
        if seconds == self.granted_seconds {
            return self.store.keep_alive(self.id, None).await;
        }
        self.lengthen(seconds).await
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        let held = self
            .store
            .delete_entry(&self.entry, self.revision, None)
            .await?;
        // The lease has nothing else bound to it; revoking it spares etcd its expiry.
        if self.store.revoke(self.id, None).await.is_err() {
            self.store.revoke_detached(self.id);
        }
        Ok(held)
    }

    fn ended(&mut self) -> EndSignal {
        // A watch stream costs etcd a round trip and a watcher, which a short lease would
        // pay for nothing: it opens after a third of the lease (the first keep-alive
        // would notice a revoked lease by then anyway), and from the revision after the
        // entry's creation, so a deletion in between is still seen.
        let after = Duration::from_millis(
            u64::try_from(self.granted_seconds.max(1)).unwrap_or(1) * 1000 / 3,
        )
        .min(WATCH_END_AFTER);
        let (store, entry, revision) = (self.store.clone(), self.entry.clone(), self.revision);
        Box::pin(async move {
            tokio::time::sleep(after).await;
            watch_end(store, entry, revision).await
        })
    }
}

/// The longest a held lease goes before it watches its entry's deletion.
const WATCH_END_AFTER: Duration = Duration::from_millis(500);

/// Resolves when the entry created at `revision` is deleted: its lease expired or was
/// revoked, or an operator deleted it (`release --force`). Watches from the revision
/// after the entry's creation, so nothing between the grant and the watch is missed;
/// a broken stream is opened again from there.
async fn watch_end(store: Store, entry: Vec<u8>, revision: i64) -> LossReason {
    let ended = |detail: &str| LossReason::SessionEnded {
        detail: format!("etcd reports the lock entry deleted: {detail}"),
    };
    let mut pause = Duration::from_millis(100);
    loop {
        if let Ok(mut watch) = store.watch_deletes(&entry, revision + 1).await {
            // A broken stream is opened again below.
            while let Ok(Some(response)) = watch.message().await {
                if response
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
                {
                    return ended("its lease expired or was revoked, or it was force-released");
                }
                if response.canceled() {
                    // Compacted past our revision: look at the entry itself.
                    let now = store.get("read a lock entry", None, &entry, None).await;
                    if let Ok(now) = now {
                        let same = now
                            .kvs()
                            .first()
                            .is_some_and(|kv| kv.create_revision() == revision);
                        if !same {
                            return ended("it is gone");
                        }
                    }
                    break;
                }
                pause = Duration::from_millis(100);
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

#[async_trait]
impl Backend for EtcdBackend {
    fn describe(&self) -> &str {
        &self.store.describe
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            shared_locks: true,
            semaphores: true,
            ..Capabilities::expiring()
        }
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let entry = self.enqueue(request).await?;
        if entry.holds {
            let revision = entry.lease.revision;
            return Ok(Attempt::Acquired(Granted {
                fence: fence_of(revision),
                sent_at: entry.sent_at,
                lease: Box::new(entry.lease),
            }));
        }
        // Not first: leave the queue at once. A failed revoke is an error, so that the
        // engine's cleanup by owner runs instead of leaving the entry until its TTL.
        self.store
            .revoke(entry.lease.id, self.until(request))
            .await?;
        Ok(Attempt::Held { expires_in: None })
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Option<Granted>> {
        let mut delays = request.backoff.delays();
        loop {
            if request.deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            let outcome = match self.enqueue(request).await {
                Ok(entry) if entry.holds => {
                    let revision = entry.lease.revision;
                    return Ok(Some(Granted {
                        fence: fence_of(revision),
                        sent_at: entry.sent_at,
                        lease: Box::new(entry.lease),
                    }));
                }
                Ok(entry) => self.wait_turn(request, entry).await,
                Err(err) => Err(err),
            };
            match outcome {
                Ok(Turn::Granted(granted)) => return Ok(Some(granted)),
                Ok(Turn::TimedOut) => return Ok(None),
                Ok(Turn::Lost) => {
                    // Our lease or entry vanished while waiting: queue again, behind.
                    let _ = self.abandon(request.key, request.owner).await;
                    let mut wake_at = Instant::now() + delays.next_delay();
                    if let Some(deadline) = request.deadline {
                        wake_at = wake_at.min(deadline);
                    }
                    tokio::time::sleep_until(wake_at.into()).await;
                }
                Err(err) => {
                    let until = Instant::now() + DEADLINE_GRACE / 2;
                    let id = names::lease_of(request.owner);
                    if self.store.revoke(id, Some(until)).await.is_err() {
                        self.store.revoke_detached(id);
                    }
                    let now = Instant::now();
                    if !err.is_transient() || request.deadline.is_some_and(|d| now >= d) {
                        return Err(err);
                    }
                    tracing::debug!(key = %request.key, %err, "transient error while waiting; retrying");
                    let mut wake_at = now + delays.next_delay();
                    if let Some(deadline) = request.deadline {
                        wake_at = wake_at.min(deadline);
                    }
                    tokio::time::sleep_until(wake_at.into()).await;
                }
            }
        }
    }

    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        let _ = key;
        self.store
            .revoke(names::lease_of(owner), None)
            .await
            .map(|_| ())
    }
}

/// The entries of one lock's queue (oldest first) that hold it now.
fn holding(queue: Vec<KeyValue>) -> Vec<KeyValue> {
    let contenders: Vec<Contender> = queue.iter().map(Contender::of).collect();
    let held = order::holders(&contenders);
    queue
        .into_iter()
        .enumerate()
        .filter(|(at, _)| held.contains(at))
        .map(|(_, kv)| kv)
        .collect()
}

/// What `status` shows of one lease entry.
fn entry_info(kv: &KeyValue, key: &str) -> LockInfo {
    Record::info(
        Record::from_json(kv.value()),
        key.to_owned(),
        fence_of(kv.create_revision()),
    )
}

/// What `status` shows of a key held by `holders` (oldest first, not empty): the holder
/// of an exclusive lock, or one record per reader or permit.
fn key_info(key: &str, holders: &[KeyValue]) -> Option<LockInfo> {
    let first = holders.first()?;
    match Contender::of(first).kind {
        LockKind::Exclusive => Some(entry_info(first, key)),
        kind => Some(LockInfo::of_holders(
            key,
            kind,
            holders.iter().map(|kv| entry_info(kv, key)).collect(),
        )),
    }
}

impl EtcdBackend {
    /// When the etcd lease of `kv` ends, if etcd tells.
    async fn expiry(&self, kv: &KeyValue) -> Option<SystemTime> {
        let lease = kv.lease();
        let ttl = self
            .store
            .call("read a lease", None, |mut client| async move {
                client.lease_time_to_live(lease, None).await
            })
            .await
            .ok()?;
        let left = u64::try_from(ttl.ttl()).ok()?;
        Some(SystemTime::now() + Duration::from_secs(left))
    }
}

#[async_trait]
impl Admin for EtcdBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let holders = self.holders(key).await?;
        let Some(mut info) = key_info(key.as_str(), &holders) else {
            return Ok(None);
        };
        // The expiry is a courtesy: status still answers when these extra reads fail.
        if info.holders.is_empty() {
            if let Some(first) = holders.first() {
                info.expires_at = self.expiry(first).await;
            }
        } else {
            for (record, kv) in info.holders.iter_mut().zip(&holders) {
                record.expires_at = self.expiry(kv).await;
            }
        }
        Ok(Some(info))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let prefix = self.store.prefix.as_bytes().to_vec();
        let (all, _) = self.store.queue(&prefix, true, None, None).await?;
        // Oldest first overall, hence oldest first within each key.
        let mut queues: std::collections::BTreeMap<String, Vec<KeyValue>> =
            std::collections::BTreeMap::new();
        for kv in all {
            let Some(key) = names::key_of_entry(&self.store.prefix, kv.key()) else {
                continue;
            };
            queues.entry(key).or_default().push(kv);
        }
        Ok(queues
            .into_iter()
            .filter_map(|(key, queue)| key_info(&key, &holding(queue)))
            .collect())
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let mut deleted_any = false;
        // Deleting an entry is what its holder's watch sees; revoking its lease makes
        // the holder's next renewal fail too. Every reader or permit goes.
        for kv in self.holders(key).await? {
            let deleted = self
                .store
                .delete_entry(kv.key(), kv.create_revision(), None)
                .await?;
            if kv.lease() != 0 {
                self.store.revoke(kv.lease(), None).await?;
            }
            deleted_any |= deleted;
        }
        Ok(deleted_any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(lease_seconds(Duration::from_millis(30)), 1);
        assert_eq!(lease_seconds(Duration::from_secs(1)), 1);
        assert_eq!(lease_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(lease_seconds(Duration::from_secs(30)), 30);
    }
}
