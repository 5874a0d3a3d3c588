//! `mongodb://[user:pass@]host:port[,…]/db[?collection=…&driver options]`: one document
//! per key, every expiry decided by the server's clock (`$$NOW`), never the client's.
//!
//! * acquire: one `findAndModify` with `upsert` whose filter matches the key's document
//!   only when it is free (no owner) or expired. A held document does not match, so the
//!   upsert tries to insert a second document with the same `_id` and fails with a
//!   duplicate-key error (E11000): the lock is held, and one read tells how long the
//!   holder's lease still runs.
//! * The fence lives in the same document and survives releases (a release clears the
//!   owner, the document stays): `fence = max(fence + 1, $$NOW in ms)`. The clock term
//!   keeps fences increasing when the TTL index has deleted a document (see
//!   [`GC_MARGIN`]): a new document starts above every fence handed out before.
//! * renew and release are single owner-checked updates; a renew only extends a lease
//!   that has not expired.
//! * Waiters are woken by a change stream on the collection ([`watch`]).
//! * Shared locks and semaphores are entries of the same document (`kinds`): every
//!   kind shares the fence counter, and an exclusive grant also requires no live entry.
//!
//! Dates are compared as `{$toLong: date}` milliseconds rather than as dates: servers
//! that store dates without a time zone (SecantusDB 0.7) compare a stored date with
//! `$$NOW` wrongly, while the millisecond numbers compare right everywhere.

mod config;
mod kinds;
mod watch;

use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, Granted, HeldLease, KeyWatch, LockInfo,
    LockKind,
};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
use crate::key::Key;
use async_trait::async_trait;
use config::Settings;
use futures_util::StreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, IndexModel};
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long after its lease ended (released, or expired unrenewed) a document may be
/// deleted by the TTL index on `gc_at`. No live lease can reach it: `gc_at` is always
/// the lease's expiry plus this margin, and every renewal moves it.
pub const GC_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// E11000: the insert half of the upsert met the held document.
const DUPLICATE_KEY: i32 = 11000;

/// Server error codes that mean "try again later" rather than "this will not work".
const TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    50,    // MaxTimeMSExpired
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    189,   // PrimarySteppedDown
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `{$toLong: "$$NOW"}`: the server's clock in ms since the epoch.
fn now_ms() -> Bson {
    Bson::Document(doc! { "$toLong": "$$NOW" })
}

/// True (in an expression) while the document's lease has not expired.
fn live_expr() -> Document {
    doc! { "$gt": [ { "$toLong": "$expires_at" }, now_ms() ] }
}

/// `$$NOW + ms`, as a date.
fn now_plus(ms: i64) -> Document {
    doc! { "$add": [ "$$NOW", ms ] }
}

/// The update of an owner's release: the owner goes, the fence and the holder record stay.
fn release_pipeline() -> Vec<Document> {
    vec![doc! { "$set": {
        "released_live": live_expr(),
        "owner": Bson::Null,
        "expires_at": "$$NOW",
        "gc_at": now_plus(millis(GC_MARGIN)),
    } }]
}

/// Maps a driver error: unreachable, timed out or shutting down is transient.
fn map_error(settings: &Settings, err: &mongodb::error::Error) -> Error {
    let describe = settings.describe.as_str();
    let detail = settings.scrub(&err.to_string());
    let transient = match err.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::Shutdown => true,
        ErrorKind::Command(command) => TRANSIENT_CODES.contains(&command.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => true,
        ErrorKind::Write(WriteFailure::WriteError(write)) => TRANSIENT_CODES.contains(&write.code),
        _ => {
            err.contains_label("RetryableWriteError")
                || err.contains_label("ResumableChangeStreamError")
        }
    };
    if transient {
        Error::unavailable(describe, detail)
    } else {
        Error::backend(describe, detail)
    }
}

fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    match err.kind.as_ref() {
        ErrorKind::Command(command) => command.code == DUPLICATE_KEY,
        ErrorKind::Write(WriteFailure::WriteError(write)) => write.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// What the backend and its leases share.
struct Shared {
    settings: Settings,
    locks: Collection<Document>,
}

impl Shared {
    /// Runs one driver call, bounded by the command timeout.
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = std::result::Result<T, mongodb::error::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.settings.command_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(map_error(&self.settings, &err)),
            Err(_) => Err(Error::unavailable(
                &self.settings.describe,
                format!(
                    "{what} got no answer within {}",
                    crate::duration::format_duration(self.settings.command_timeout)
                ),
            )),
        }
    }

    /// Clears `owner`'s exclusive hold on `key`; true if that lease was still live.
    async fn clear(&self, key: &Key, owner: &Owner) -> Result<bool> {
        let filter = doc! { "_id": key.as_str(), "owner": owner.as_str() };
        let after = self
            .bounded(
                "a release",
                self.locks
                    .find_one_and_update(filter, release_pipeline())
                    .return_document(ReturnDocument::After)
                    .projection(doc! { "released_live": 1 })
                    .into_future(),
            )
            .await?;
        Ok(after.is_some_and(|d| d.get_bool("released_live").unwrap_or(false)))
    }

    /// The documents an aggregation `pipeline` yields.
    async fn views(&self, what: &str, pipeline: Vec<Document>) -> Result<Vec<Document>> {
        self.bounded(what, async {
            let mut cursor = self.locks.aggregate(pipeline).await?;
            let mut all = Vec::new();
            while let Some(d) = cursor.next().await {
                all.push(d?);
            }
            Ok(all)
        })
        .await
    }

    /// The holder of `key` as the server sees it now: its owner, fence, and how long it
    /// still holds the lock by the server's clock (zero once expired or released).
    async fn holder(&self, key: &Key) -> Result<Option<(Option<String>, Option<u64>, Duration)>> {
        let pipeline = [
            doc! { "$match": { "_id": key.as_str() } },
            doc! { "$project": {
                "owner": 1,
                "fence": 1,
                "remaining": { "$subtract": [ { "$toLong": "$expires_at" }, now_ms() ] },
            } },
        ];
        let found = self
            .bounded("reading the holder", async {
                let mut cursor = self.locks.aggregate(pipeline).await?;
                cursor.next().await.transpose()
            })
            .await?;
        Ok(found.map(|d| {
            let owner = d.get_str("owner").ok().map(str::to_owned);
            let fence = int(&d, "fence").and_then(|f| u64::try_from(f).ok());
            let ms = int(&d, "remaining").unwrap_or(0);
            let remaining = if owner.is_some() && ms > 0 {
                Duration::from_millis(u64::try_from(ms).unwrap_or(0))
            } else {
                Duration::ZERO
            };
            (owner, fence, remaining)
        }))
    }
}

fn int(d: &Document, field: &str) -> Option<i64> {
    match d.get(field)? {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        // Truncation of a whole number stored as a double is intended.
        #[allow(clippy::cast_possible_truncation)]
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}

fn info_of(d: &Document) -> LockInfo {
    let key = match d.get("_id") {
        Some(Bson::String(key)) => key.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let mut info = LockInfo::new(key);
    info.owner = d.get_str("owner").ok().map(str::to_owned);
    info.fence = int(d, "fence").and_then(|f| u64::try_from(f).ok());
    info.pid = int(d, "pid").and_then(|p| u32::try_from(p).ok());
    info.host = d.get_str("host").ok().map(str::to_owned);
    info.value = d.get_str("value").ok().map(str::to_owned);
    info.acquired_at = d
        .get_datetime("acquired_at")
        .ok()
        .map(|t| t.to_system_time());
    info.renewed_at = d
        .get_datetime("renewed_at")
        .ok()
        .map(|t| t.to_system_time());
    info.expires_at = d
        .get_datetime("expires_at")
        .ok()
        .map(|t| t.to_system_time());
    info.ttl = int(d, "ttl_ms")
        .and_then(|t| u64::try_from(t).ok())
        .map(Duration::from_millis);
    info
}

/// The filter and update of an exclusive grant: the key is free when no exclusive lease
/// is live and no reader or permit is either.
fn exclusive_grant(request: &AcquireRequest<'_>, ms: i64) -> (Document, Vec<Document>) {
    let filter = doc! {
        "_id": request.key.as_str(),
        "$expr": { "$and": [ kinds::exclusive_free(), kinds::no_live_leases() ] },
    };
    let value = request
        .holder
        .value
        .as_deref()
        .map_or(Bson::Null, |v| Bson::Document(kinds::literal(v)));
    let update = vec![doc! { "$set": {
        "owner": request.owner.as_str(),
        "fence": { "$max": [ { "$add": [ { "$ifNull": [ "$fence", 0_i64 ] }, 1_i64 ] }, now_ms() ] },
        "expires_at": now_plus(ms),
        "acquired_at": "$$NOW",
        "renewed_at": "$$NOW",
        "ttl_ms": ms,
        "pid": i64::from(request.holder.pid),
        "host": kinds::literal(&request.holder.host),
        "value": value,
        "mode": kinds::mode_name(LockKind::Exclusive),
        "leases": [],
        "intent": kinds::intent_without(request.owner),
        "gc_at": now_plus(ms.saturating_add(millis(GC_MARGIN))),
    } }];
    (filter, update)
}

/// The MongoDB backend.
#[derive(Clone)]
pub struct MongoBackend {
    shared: Arc<Shared>,
    hub: Arc<watch::Hub>,
}

impl std::fmt::Debug for MongoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoBackend")
            .field("url", &self.shared.settings.describe)
            .field("collection", &self.shared.settings.collection)
            .finish_non_exhaustive()
    }
}

impl MongoBackend {
    /// Connects and makes sure the TTL index on `gc_at` exists.
    pub async fn connect(settings: Settings) -> Result<Self> {
        let bad = |err: &mongodb::error::Error| Error::BadUrl {
            url: settings.describe.clone(),
            reason: settings.scrub(&err.to_string()),
        };
        let mut options = ClientOptions::parse(&settings.driver_url)
            .await
            .map_err(|e| bad(&e))?;
        if options.app_name.is_none() {
            options.app_name = Some("dlock".to_owned());
        }
        let client = Client::with_options(options).map_err(|e| bad(&e))?;
        let locks = client
            .database(&settings.database)
            .collection::<Document>(&settings.collection);
        let shared = Arc::new(Shared { settings, locks });
        let index = IndexModel::builder()
            .keys(doc! { "gc_at": 1 })
            .options(
                IndexOptions::builder()
                    .name("dlock_gc_at".to_owned())
                    .expire_after(Duration::ZERO)
                    .build(),
            )
            .build();
        shared
            .bounded(
                "creating the TTL index",
                shared.locks.create_index(index).into_future(),
            )
            .await?;
        Ok(MongoBackend {
            hub: watch::Hub::new(shared.locks.clone(), shared.settings.describe.clone()),
            shared,
        })
    }
}

impl MongoBackend {
    /// The answer to a request the key refused: how long to wait, or why waiting cannot
    /// help. A writer refused by readers leaves its intent, and comes back within it.
    async fn refused(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let shared = &self.shared;
        let Ok(state) = kinds::state(shared, request.key).await else {
            return Ok(Attempt::Held { expires_in: None });
        };
        let Some(state) = state else {
            return Ok(Attempt::Held {
                expires_in: Some(Duration::ZERO),
            });
        };
        let expires_in =
            match state.refusal(request.kind, request.key, &shared.settings.describe)? {
                kinds::Refusal::Held(left) => left,
                kinds::Refusal::Readers(left) => {
                    kinds::write_intent(shared, request.key, request.owner).await?;
                    left.min(kinds::WRITER_INTENT / 3)
                }
            };
        Ok(Attempt::Held {
            expires_in: Some(expires_in),
        })
    }
}

/// Opens `mongodb://…`.
pub(crate) async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(
        MongoBackend::connect(Settings::parse(url)?).await?,
    ))
}

/// One held lease: its key, owner token and kind on the shared collection.
struct MongoLease {
    shared: Arc<Shared>,
    key: Key,
    owner: Owner,
    kind: LockKind,
}

#[async_trait]
impl HeldLease for MongoLease {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        if self.kind != LockKind::Exclusive {
            return kinds::renew(&self.shared, &self.key, &self.owner, ttl).await;
        }
        let ms = millis(ttl);
        let filter = doc! {
            "_id": self.key.as_str(),
            "owner": self.owner.as_str(),
            "$expr": live_expr(),
        };
        let update = vec![doc! { "$set": {
            "expires_at": now_plus(ms),
            "renewed_at": "$$NOW",
            "ttl_ms": ms,
            "gc_at": now_plus(ms.saturating_add(millis(GC_MARGIN))),
        } }];
        let result = self
            .shared
            .bounded(
                "a renewal",
                self.shared.locks.update_one(filter, update).into_future(),
            )
            .await?;
        Ok(result.matched_count == 1)
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        if self.kind != LockKind::Exclusive {
            return kinds::release(&self.shared, &self.key, &self.owner).await;
        }
        self.shared.clear(&self.key, &self.owner).await
    }
}

#[async_trait]
impl Backend for MongoBackend {
    fn describe(&self) -> &str {
        &self.shared.settings.describe
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            shared_locks: true,
            semaphores: true,
            ..Capabilities::expiring()
        }
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let shared = &self.shared;
        let ms = millis(request.ttl);
        let (filter, update) = if request.kind == LockKind::Exclusive {
            exclusive_grant(request, ms)
        } else {
            (
                doc! { "_id": request.key.as_str(), "$expr": kinds::admits(request.kind) },
                kinds::grant_pipeline(request.kind, request.owner, ms, request.holder),
            )
        };
        let sent_at = Instant::now();
        let call = shared
            .locks
            .find_one_and_update(filter, update)
            .upsert(true)
            .return_document(ReturnDocument::After)
            .projection(doc! { "fence": 1 });
        let outcome =
            match tokio::time::timeout(shared.settings.command_timeout, call.into_future()).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    return Err(Error::unavailable(
                        &shared.settings.describe,
                        "an acquire attempt got no answer in time",
                    ))
                }
            };
        let fence = match outcome {
            Ok(Some(granted)) => int(&granted, "fence")
                .and_then(|f| u64::try_from(f).ok())
                .ok_or_else(|| {
                    Error::backend(
                        &shared.settings.describe,
                        format!(
                            "the lock document of {:?} has no valid fence",
                            request.key.as_str()
                        ),
                    )
                })?,
            // SecantusDB answers an upsert that found the document freed between its
            // read and its write with no document although the update landed: whether
            // the lock is ours is then read back.
            Ok(None) if request.kind == LockKind::Exclusive => {
                match shared.holder(request.key).await? {
                    Some((Some(owner), Some(fence), remaining))
                        if owner == request.owner.as_str() && !remaining.is_zero() =>
                    {
                        fence
                    }
                    other => {
                        return Ok(Attempt::Held {
                            expires_in: other.map(|(_, _, remaining)| remaining),
                        })
                    }
                }
            }
            Ok(None) => match kinds::own_fence(shared, request.key, request.owner).await? {
                Some(fence) => fence,
                None => return self.refused(request).await,
            },
            Err(err) if is_duplicate_key(&err) => return self.refused(request).await,
            Err(err) => return Err(map_error(&shared.settings, &err)),
        };
        if request.kind == LockKind::Shared {
            // Readers waiting here share the key with this one: each event wakes one
            // local waiter, so a reader that got in wakes the next.
            self.hub.pass_on(request.key.as_str());
        }
        Ok(Attempt::Acquired(Granted {
            fence,
            sent_at,
            lease: Box::new(MongoLease {
                shared: Arc::clone(shared),
                key: request.key.clone(),
                owner: request.owner.clone(),
                kind: request.kind,
            }),
        }))
    }

    async fn watch(&self, key: &Key) -> Result<Option<Box<dyn KeyWatch>>> {
        Ok(self
            .hub
            .watch(key.as_str(), self.shared.settings.command_timeout)
            .await
            .map(|w| Box::new(w) as Box<dyn KeyWatch>))
    }

    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        kinds::abandon(&self.shared, key, owner).await
    }
}

#[async_trait]
impl Admin for MongoBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let pipeline = vec![
            doc! { "$match": { "_id": key.as_str() } },
            kinds::view_stage(),
        ];
        Ok(self
            .shared
            .views("reading the lock", pipeline)
            .await?
            .iter()
            .find_map(kinds::info_of_view))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let pipeline = vec![
            kinds::held_match(),
            kinds::view_stage(),
            doc! { "$sort": { "_id": 1 } },
        ];
        Ok(self
            .shared
            .views("listing the locks", pipeline)
            .await?
            .iter()
            .filter_map(kinds::info_of_view)
            .collect())
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        kinds::force_release(&self.shared, key).await
    }
}
