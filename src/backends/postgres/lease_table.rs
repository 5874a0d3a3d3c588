//! `mode=lease`: a lock is a row of the lease table, with an expiry on the server's clock.
//!
//! * acquire: one `INSERT … ON CONFLICT (key) DO UPDATE SET fence = nextval(…), … WHERE
//!   <expired> RETURNING fence`; when the row is held, the same statement returns how long
//!   until it expires, computed by the server. The fence of a takeover is drawn in the
//!   `DO UPDATE`, under the row lock that decides the grant; the `VALUES` fence (drawn
//!   before the conflict check, possibly before a concurrent grant it then waits for) is
//!   only used when the key has no row at all.
//! * renew: `UPDATE … WHERE key = b.key AND owner = b.owner AND expires_at >
//!   clock_timestamp()` over the renewals that fall due together, `b` (see
//!   [`super::renew_batch`]).
//! * release: an owner-checked `UPDATE` that ends the row's expiry now (the row stays, so
//!   an acquire waiting on it takes it over with a fresh fence instead of re-inserting
//!   with the fence it drew before waiting) and `pg_notify(channel, key)` in the same
//!   statement, which wakes the waiters through their [`Listener`].
//! * Rows of keys released or expired more than [`SWEEP_MARGIN`] ago are deleted by a
//!   sweep (at most once every 30 s per handle, 1000 rows at a time), so the table holds
//!   the held locks and the keys used in the last few minutes. An acquire could only
//!   re-insert a deleted row with a stale fence if its one statement ran longer than the
//!   margin.

use super::lease_kinds::{self, KindSql};
use super::listener::Listener;
use super::renew_batch::{self, LeaseRows};
use super::{ensure_schema, millis, pg_error, Settings, Shared};
use crate::backends::sql_session::Cleanups;
use crate::backends::sql_sweep::SweepClock;
use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, Granted, HeldLease, KeyWatch, LockInfo,
    LockKind,
};
use crate::core::owner::Owner;
use crate::core::renew_batch::RenewBatcher;
use crate::error::Result;
use crate::key::Key;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::types::Type;
use tokio_postgres::Row;

const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// How long a row stays after its lease was released or expired before the sweep may
/// delete it. Deleting a row an acquire is waiting on makes that acquire's speculative
/// insertion restart with the fence it drew before waiting: rows are only deleted long
/// after any grant on them, so no acquire statement still in flight drew its fence before
/// that grant.
const SWEEP_MARGIN: &str = "interval '5 minutes'";

/// The lease table's definition, with the holders table and functions of the kinds.
pub(crate) fn ddl(table: &str, sequence: &str) -> String {
    let kinds = lease_kinds::ddl(table, sequence);
    let index = table.rsplit('.').next().unwrap_or(table);
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    key text PRIMARY KEY,
    owner text NOT NULL,
    fence bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at timestamptz NOT NULL,
    ttl_ms bigint NOT NULL,
    pid integer,
    host text,
    value text
);
CREATE INDEX IF NOT EXISTS {index}_expires_at ON {table} (expires_at);
{kinds}"
    )
}

struct Sql {
    acquire: String,
    release: String,
    force: String,
    inspect: String,
    list: String,
    sweep: String,
    kinds: KindSql,
}

impl Sql {
    fn new(t: &str, seq: &str) -> Self {
        let ttl = "($3::float8 * interval '1 millisecond')";
        let intents = lease_kinds::intent_ctes(t);
        let h = lease_kinds::holders_table(t);
        Sql {
            kinds: KindSql::new(t),
            acquire: format!(
                "WITH ins AS (
    INSERT INTO {t} AS l (key, owner, fence, expires_at, acquired_at, renewed_at, ttl_ms, pid, host, value)
    VALUES ($1, $2, nextval('{seq}'), clock_timestamp() + {ttl}, clock_timestamp(), clock_timestamp(), $3, $4, $5, $6)
    ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, fence = nextval('{seq}'),
        expires_at = clock_timestamp() + {ttl}, acquired_at = clock_timestamp(),
        renewed_at = clock_timestamp(), ttl_ms = excluded.ttl_ms, pid = excluded.pid, host = excluded.host,
        value = excluded.value
    WHERE l.expires_at <= clock_timestamp()
    RETURNING fence),
{intents}
SELECT (SELECT fence FROM ins),
       (SELECT (extract(epoch FROM (expires_at - clock_timestamp())) * 1000)::bigint FROM {t} WHERE key = $1),
       (SELECT count(*) FROM it)"
            ),
            // The row stays (see SWEEP_MARGIN): its expiry becomes the statement's start,
            // and it was live if that changed it.
            release: format!(
                "WITH d AS (UPDATE {t} SET expires_at = least(expires_at, statement_timestamp())
 WHERE key = $1 AND owner = $2 RETURNING expires_at = statement_timestamp() AS live)
SELECT live, pg_notify($3, $1)::text FROM d"
            ),
            // Every reader and permit of the key goes with it.
            force: format!(
                "WITH d AS (UPDATE {t} SET expires_at = least(expires_at, statement_timestamp())
 WHERE key = $1 RETURNING expires_at = statement_timestamp() AS live),
r AS (DELETE FROM {h} WHERE key = $1)
SELECT live, pg_notify($2, $1)::text FROM d"
            ),
            inspect: format!(
                "SELECT key, owner, fence, pid, host, acquired_at, renewed_at, expires_at, ttl_ms, value FROM {t}
 WHERE key = $1 AND expires_at > clock_timestamp() AND owner <> ''"
            ),
            list: format!(
                "SELECT key, owner, fence, pid, host, acquired_at, renewed_at, expires_at, ttl_ms, value FROM {t}
 WHERE expires_at > clock_timestamp() AND owner <> '' ORDER BY key"
            ),
            sweep: format!(
                "DELETE FROM {t} WHERE key IN (SELECT key FROM {t} WHERE expires_at < clock_timestamp() - {SWEEP_MARGIN}
 LIMIT 1000 FOR UPDATE SKIP LOCKED) AND expires_at < clock_timestamp() - {SWEEP_MARGIN}"
            ),
        }
    }
}

/// The statements of one uncontended acquire and its release (see
/// [`super::bench_statements`]).
pub(super) fn bench_statements(table: &str, sequence: &str) -> Vec<(&'static str, String)> {
    let Sql {
        acquire, release, ..
    } = Sql::new(table, sequence);
    // A plain lock publishes no value.
    let acquire = acquire.replace("$6", "NULL::text");
    vec![("acquire", acquire), ("release", release)]
}

/// The PostgreSQL lease-table backend (`?mode=lease`).
#[derive(Debug, Clone)]
pub struct PgLeaseBackend {
    inner: Arc<Inner>,
}

struct Inner {
    describe: String,
    channel: String,
    db: Arc<Shared>,
    /// Exclusive renewals, sent in batches.
    renewals: RenewBatcher<LeaseRows>,
    listener: Arc<Listener>,
    sql: Sql,
    sweeps: SweepClock,
    /// Abandoned attempts whose rows are being freed.
    cleanups: Cleanups,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::backends::sql_url::fmt_backend(f, "PgLeaseBackend", &self.describe)
    }
}

impl PgLeaseBackend {
    /// Connects, and creates the sequence and table unless they exist.
    pub async fn connect(settings: Settings) -> Result<Self> {
        let db = Arc::new(Shared::new(
            settings.config.clone(),
            settings.tls.clone(),
            settings.describe.clone(),
        ));
        let conn = db.get().await?;
        // The holders table is the newest part: a schema without it predates the kinds.
        ensure_schema(
            &conn,
            &settings.describe,
            &lease_kinds::holders_table(&settings.table),
            &settings.sequence,
            &ddl(&settings.table, &settings.sequence),
        )
        .await?;
        let channel = settings.channel();
        let renewals = renew_batch::batcher(Arc::clone(&db), &settings.table, &settings.describe);
        Ok(PgLeaseBackend {
            inner: Arc::new(Inner {
                listener: Listener::new(
                    settings.config.clone(),
                    settings.tls.clone(),
                    settings.describe.clone(),
                    channel.clone(),
                ),
                describe: settings.describe,
                channel,
                renewals,
                db,
                sql: Sql::new(&settings.table, &settings.sequence),
                sweeps: SweepClock::new(SWEEP_EVERY, true),
                cleanups: Cleanups::default(),
            }),
        })
    }

    fn err(&self, err: tokio_postgres::Error) -> crate::Error {
        pg_error(&self.inner.describe, err)
    }

    /// The owner-checked release: `true` if the lease was still live.
    async fn release_row(&self, key: &Key, owner: &Owner) -> Result<bool> {
        let conn = self.inner.db.get().await?;
        let rows = conn
            .query_typed(
                &self.inner.sql.release,
                &[
                    (&key.as_str(), Type::TEXT),
                    (&owner.as_str(), Type::TEXT),
                    (&self.inner.channel.as_str(), Type::TEXT),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows
            .first()
            .and_then(|r| r.try_get::<_, bool>(0).ok())
            .unwrap_or(false))
    }

    fn maybe_sweep(&self) {
        if !self.inner.sweeps.due() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            super::run_sweep(&this.inner.db, &this.inner.sql.sweep, "expired leases").await;
        });
    }
}

/// The record of a key held by readers or permits (rows of the kinds' `inspect`).
fn holders_info(rows: &[Row]) -> Option<LockInfo> {
    let row = rows.first()?;
    let kind = match row
        .try_get::<_, Option<i32>>(10)
        .ok()
        .flatten()
        .and_then(|p| u32::try_from(p).ok())
    {
        Some(permits) => LockKind::Semaphore { permits },
        None => LockKind::Shared,
    };
    let key = row.try_get::<_, String>(0).unwrap_or_default();
    Some(LockInfo::of_holders(
        key,
        kind,
        rows.iter().map(info_of).collect(),
    ))
}

fn info_of(row: &Row) -> LockInfo {
    let mut info = LockInfo::new(row.try_get::<_, String>(0).unwrap_or_default());
    info.owner = row.try_get(1).ok();
    info.fence = row
        .try_get::<_, i64>(2)
        .ok()
        .and_then(|f| u64::try_from(f).ok());
    info.pid = row
        .try_get::<_, Option<i32>>(3)
        .ok()
        .flatten()
        .and_then(|p| u32::try_from(p).ok());
    info.host = row.try_get(4).ok().flatten();
    info.acquired_at = row.try_get::<_, SystemTime>(5).ok();
    info.renewed_at = row.try_get::<_, SystemTime>(6).ok();
    info.expires_at = row.try_get::<_, SystemTime>(7).ok();
    info.ttl = row
        .try_get::<_, i64>(8)
        .ok()
        .and_then(|t| u64::try_from(t).ok())
        .map(Duration::from_millis);
    info.value = row.try_get(9).ok().flatten();
    info
}

impl PgLeaseBackend {
    /// The handle of a row held (or maybe taken) by `owner`.
    fn held(&self, key: &Key, owner: &Owner, kind: LockKind) -> Box<dyn HeldLease> {
        Box::new(PgLease {
            backend: self.clone(),
            key: key.clone(),
            owner: owner.clone(),
            kind,
        })
    }

    /// A reader's or permit's release (or a writer intent's withdrawal): `true` if the
    /// lease was still live.
    async fn release_holder(&self, key: &Key, owner: &Owner) -> Result<bool> {
        let conn = self.inner.db.get().await?;
        let rows = conn
            .query_typed(
                &self.inner.sql.kinds.release,
                &[
                    (&key.as_str(), Type::TEXT),
                    (&owner.as_str(), Type::TEXT),
                    (&self.inner.channel.as_str(), Type::TEXT),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows
            .first()
            .and_then(|r| r.try_get::<_, Option<bool>>(0).ok().flatten())
            .unwrap_or(false))
    }

    /// One attempt at a reader or a permit.
    async fn try_kind(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let permits = match request.kind {
            LockKind::Semaphore { permits } => Some(i32::try_from(permits).map_err(|_| {
                crate::Error::backend(
                    &self.inner.describe,
                    format!("a semaphore of {permits} permits is more than this backend keeps"),
                )
            })?),
            _ => None,
        };
        let conn = self.inner.db.get().await?;
        let pid = i32::try_from(request.holder.pid).ok();
        let sent_at = Instant::now();
        let rows = conn
            .query_typed(
                &self.inner.sql.kinds.acquire,
                &[
                    (&request.key.as_str(), Type::TEXT),
                    (&request.owner.as_str(), Type::TEXT),
                    (&millis(request.ttl), Type::INT8),
                    (&pid, Type::INT4),
                    (&request.holder.host.as_str(), Type::TEXT),
                    (&request.holder.value, Type::TEXT),
                    (&permits, Type::INT4),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        let row = rows.first();
        let get = |i| row.and_then(|r| r.try_get::<_, Option<i64>>(i).ok().flatten());
        if let Some(fence) = get(0) {
            return Ok(Attempt::Acquired(Granted {
                fence: u64::try_from(fence).unwrap_or(0),
                sent_at,
                lease: self.held(request.key, request.owner, request.kind),
            }));
        }
        let conflict = row.and_then(|r| r.try_get::<_, Option<i32>>(2).ok().flatten());
        if conflict.unwrap_or(0) > 0 {
            let held_with = row.and_then(|r| r.try_get::<_, Option<i32>>(3).ok().flatten());
            let held = match held_with.and_then(|p| u32::try_from(p).ok()) {
                Some(permits) => LockKind::Semaphore { permits },
                None => LockKind::Shared,
            };
            return Err(super::session_kinds::conflict(
                &self.inner.describe,
                request.key.as_str(),
                held,
                request.kind,
            ));
        }
        Ok(Attempt::Held {
            expires_in: wait_of(get(1)),
        })
    }
}

/// The time until a blocking lease ends, from the server's milliseconds.
fn wait_of(ms: Option<i64>) -> Option<Duration> {
    ms.filter(|ms| *ms > 0) // a released or expired row just taken by another
        .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// One held row, renewed and released through the handle's shared connection.
struct PgLease {
    backend: PgLeaseBackend,
    key: Key,
    owner: Owner,
    kind: LockKind,
}

#[async_trait]
impl HeldLease for PgLease {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let inner = &self.backend.inner;
        if self.kind == LockKind::Exclusive {
            return inner
                .renewals
                .renew(renew_batch::Renewal {
                    key: self.key.clone(),
                    owner: self.owner.clone(),
                    ttl_ms: millis(ttl),
                })
                .await;
        }
        let conn = inner.db.get().await?;
        let rows = conn
            .query_typed(
                &inner.sql.kinds.renew,
                &[
                    (&self.key.as_str(), Type::TEXT),
                    (&self.owner.as_str(), Type::TEXT),
                    (&millis(ttl), Type::INT8),
                ],
            )
            .await
            .map_err(|e| self.backend.err(e))?;
        Ok(rows
            .first()
            .and_then(|r| r.try_get::<_, Option<bool>>(0).ok().flatten())
            .unwrap_or(false))
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        if self.kind != LockKind::Exclusive {
            return self.backend.release_holder(&self.key, &self.owner).await;
        }
        self.backend.release_row(&self.key, &self.owner).await
    }
}

#[async_trait]
impl Backend for PgLeaseBackend {
    fn describe(&self) -> &str {
        &self.inner.describe
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            shared_locks: true,
            semaphores: true,
            ..Capabilities::expiring()
        }
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        self.maybe_sweep();
        if self.inner.cleanups.running(request.key, request.owner) {
            return Ok(Attempt::Held { expires_in: None });
        }
        if request.kind != LockKind::Exclusive {
            return self.try_kind(request).await;
        }
        let conn = self.inner.db.get().await?;
        let pid = i32::try_from(request.holder.pid).ok();
        let sent_at = Instant::now();
        let rows = conn
            .query_typed(
                &self.inner.sql.acquire,
                &[
                    (&request.key.as_str(), Type::TEXT),
                    (&request.owner.as_str(), Type::TEXT),
                    (&millis(request.ttl), Type::INT8),
                    (&pid, Type::INT4),
                    (&request.holder.host.as_str(), Type::TEXT),
                    (&request.holder.value, Type::TEXT),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        let row = rows.first();
        if let Some(fence) = row.and_then(|r| r.try_get::<_, Option<i64>>(0).ok().flatten()) {
            return Ok(Attempt::Acquired(Granted {
                fence: u64::try_from(fence).unwrap_or(0),
                sent_at,
                lease: self.held(request.key, request.owner, LockKind::Exclusive),
            }));
        }
        let mut expires_in =
            wait_of(row.and_then(|r| r.try_get::<_, Option<i64>>(1).ok().flatten()));
        if row.and_then(|r| r.try_get::<_, i64>(2).ok()).unwrap_or(0) > 0 {
            // Our intent holds readers back only while we come back well within it.
            let retry = Duration::from_secs(lease_kinds::INTENT_SECONDS) / 3;
            expires_in = Some(expires_in.map_or(retry, |e| e.min(retry)));
        }
        Ok(Attempt::Held { expires_in })
    }

    /// The owner-checked release, in the background: the caller gave up on a store that
    /// did not answer, and must not wait for that store again.
    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        // The attempt's kind is not known here: free the row, and any reader, permit or
        // writer intent of the owner.
        let (this, k, o) = (self.clone(), key.clone(), owner.clone());
        let cleanup = async move {
            let row = this.release_row(&k, &o).await;
            let holder = this.release_holder(&k, &o).await;
            Ok(row? | holder?)
        };
        self.inner.cleanups.spawn(cleanup, key, owner);
        Ok(())
    }

    async fn watch(&self, key: &Key) -> Result<Option<Box<dyn KeyWatch>>> {
        Ok(Some(self.inner.listener.watch(key.as_str()).await?))
    }
}

#[async_trait]
impl Admin for PgLeaseBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let conn = self.inner.db.get().await?;
        let rows = conn
            .query_typed(
                &self.inner.sql.kinds.inspect,
                &[(&key.as_str(), Type::TEXT)],
            )
            .await
            .map_err(|e| self.err(e))?;
        if let Some(info) = holders_info(&rows) {
            return Ok(Some(info));
        }
        let rows = conn
            .query_typed(&self.inner.sql.inspect, &[(&key.as_str(), Type::TEXT)])
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows.first().map(info_of))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let conn = self.inner.db.get().await?;
        let rows = conn
            .query_typed(&self.inner.sql.list, &[])
            .await
            .map_err(|e| self.err(e))?;
        let mut all: Vec<LockInfo> = rows.iter().map(info_of).collect();
        let rows = conn
            .query_typed(&self.inner.sql.kinds.list, &[])
            .await
            .map_err(|e| self.err(e))?;
        // Rows come ordered by key: one record per run of a key.
        let mut start = 0;
        while start < rows.len() {
            let key = rows[start].try_get::<_, String>(0).ok();
            let end = rows[start..]
                .iter()
                .position(|r| r.try_get::<_, String>(0).ok() != key)
                .map_or(rows.len(), |n| start + n);
            all.extend(holders_info(&rows[start..end]));
            start = end;
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let conn = self.inner.db.get().await?;
        let rows = conn
            .query_typed(
                &self.inner.sql.force,
                &[
                    (&key.as_str(), Type::TEXT),
                    (&self.inner.channel.as_str(), Type::TEXT),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows
            .first()
            .and_then(|r| r.try_get::<_, bool>(0).ok())
            .unwrap_or(false))
    }
}
