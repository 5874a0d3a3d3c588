//! `mode=lease` on MySQL/MariaDB: a lock is a row of the lease table, with an expiry on the
//! server's clock (`UTC_TIMESTAMP(6)`, independent of the session time zone).
//!
//! * A key's row is never deleted: release and force-release clear its owner and expire
//!   it, so its `fence` column carries the key's last fence to the next holder. No row is
//!   shared between keys, so a client stalled while holding one row's lock delays that
//!   key alone (and by at most the session's `innodb_lock_wait_timeout`).
//! * acquire: a read of the row (a held row answers at once, with the server-computed
//!   time to its expiry); else one autocommit `INSERT … ON DUPLICATE KEY UPDATE` that
//!   takes over only an expired (or released) row and then bumps its fence
//!   (`fence = IF(expired, fence + 1, fence)`), and inserts a new key's row with the
//!   handle's first fence: one above the counter `dlock_fence_counter` that earlier
//!   versions drew every fence from, where it exists, so that fences of keys whose rows
//!   those versions deleted keep increasing. Then a plain read of the row: the lock is
//!   ours only if the row has this request's owner token and has not already expired.
//!   `UTC_TIMESTAMP(6)` is the time a statement *started*: an insert that waited for the
//!   row lock longer than the TTL judged the row, and stamped the new expiry, with the
//!   time it began waiting, so it could take over a lease already expired, and the next
//!   acquirer could take it over at once (two grants microseconds apart). The read's own,
//!   fresh, timestamp catches that; so does the client-side check that the attempt did
//!   not outlast the TTL. A grant refused that way is cleared at once.
//! * renew: `UPDATE … WHERE k = ? AND owner = ? AND expires_at > UTC_TIMESTAMP(6)`; the
//!   exclusive renewals that fall due together go as a few such statements over many
//!   rows, on one connection ([`super::renew_batch`]).
//! * release: `UPDATE … SET owner = '', expires_at = <long ago> WHERE k = ? AND owner = ?`.
//!
//! MySQL has no LISTEN/NOTIFY: waiters retry with the engine's jittered backoff (5 ms
//! doubling to 1 s) and no later than the holder's expiry.

use super::lease_kinds::{self, KindSql};
use super::renew_batch::{self, RowRenewal};
use super::{
    ensure_schema, epoch_us, from_micros, is_lock_wait_timeout, micros, my_error, row_key,
    table_probe, Conns, Lent, Settings, STATEMENT_TIMEOUT,
};
use crate::backends::sql_session::Cleanups;
use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, Granted, HeldLease, LockInfo, LockKind,
};
use crate::core::owner::Owner;
use crate::core::renew_batch::{RenewBatcher, RenewalSink};
use crate::error::{Error, Result};
use crate::key::Key;
use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::Row;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long before the engine's limit of an acquire attempt its statements give up.
const ATTEMPT_MARGIN: Duration = Duration::from_millis(100);

/// The expiry of a released row: long past, so that any later statement sees it expired.
const RELEASED: &str = "'1970-01-01 00:00:01'";

/// The lease table's definition.
pub(crate) fn ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    k BINARY(32) PRIMARY KEY,
    key_text VARBINARY(1024) NOT NULL,
    owner VARCHAR(64) NOT NULL,
    fence BIGINT UNSIGNED NOT NULL,
    expires_at DATETIME(6) NOT NULL,
    acquired_at DATETIME(6) NOT NULL,
    renewed_at DATETIME(6) NOT NULL,
    ttl_ms BIGINT NOT NULL,
    pid INT UNSIGNED NULL,
    host VARCHAR(255) NULL,
    value TEXT NULL,
    KEY (expires_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    )
}

struct Sql {
    peek: String,
    claim: String,
    mine: String,
    clear: String,
    renew: String,
    release_live: String,
    release_any: String,
    force: String,
    inspect: String,
    list: String,
    kinds: KindSql,
}

impl Sql {
    fn new(t: &str) -> Self {
        let cols = format!(
            "key_text, owner, fence, pid, host, {}, {}, {}, ttl_ms, value",
            epoch_us("acquired_at"),
            epoch_us("renewed_at"),
            epoch_us("expires_at")
        );
        let expired = "expires_at <= UTC_TIMESTAMP(6)";
        let free = format!("owner = '', expires_at = {RELEASED}");
        Sql {
            kinds: KindSql::new(t),
            // The empty owner: held by readers or permits.
            peek: format!("SELECT TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at), owner = '' FROM {t} WHERE k = ?"),
            // Assignments run left to right and see earlier ones: expires_at goes last so
            // every condition reads the old expiry.
            claim: format!(
                "INSERT INTO {t} (k, key_text, owner, fence, expires_at, acquired_at, renewed_at, ttl_ms, pid, host, value)
VALUES (?, ?, ?, ?, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), ?, ?, ?, ?)
ON DUPLICATE KEY UPDATE
    fence = IF({expired}, fence + 1, fence),
    owner = IF({expired}, VALUES(owner), owner),
    acquired_at = IF({expired}, VALUES(acquired_at), acquired_at),
    renewed_at = IF({expired}, VALUES(renewed_at), renewed_at),
    ttl_ms = IF({expired}, VALUES(ttl_ms), ttl_ms),
    pid = IF({expired}, VALUES(pid), pid),
    host = IF({expired}, VALUES(host), host),
    value = IF({expired}, VALUES(value), value),
    expires_at = IF({expired}, VALUES(expires_at), expires_at)"
            ),
            mine: format!(
                "SELECT owner, fence, expires_at > UTC_TIMESTAMP(6) FROM {t} WHERE k = ?"
            ),
            clear: format!("UPDATE {t} SET {free} WHERE k = ? AND owner = ?"),
            renew: format!(
                "UPDATE {t} SET renewed_at = UTC_TIMESTAMP(6), ttl_ms = ?, expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND
WHERE k = ? AND owner = ? AND expires_at > UTC_TIMESTAMP(6)"
            ),
            release_live: format!("UPDATE {t} SET {free} WHERE k = ? AND owner = ? AND expires_at > UTC_TIMESTAMP(6)"),
            release_any: format!("UPDATE {t} SET {free} WHERE k = ? AND owner = ?"),
            force: format!("UPDATE {t} SET {free} WHERE k = ? AND expires_at > UTC_TIMESTAMP(6)"),
            inspect: format!("SELECT {cols} FROM {t} WHERE k = ? AND expires_at > UTC_TIMESTAMP(6) AND owner <> ''"),
            list: format!("SELECT {cols} FROM {t} WHERE expires_at > UTC_TIMESTAMP(6) AND owner <> '' ORDER BY key_text"),
        }
    }
}

/// The statements of one uncontended acquire and its release (see
/// [`super::bench_statements`]).
pub(super) fn bench_statements(table: &str) -> Vec<(&'static str, String)> {
    let Sql {
        peek,
        claim,
        mine,
        release_live,
        ..
    } = Sql::new(table);
    vec![
        ("peek", peek),
        ("claim", claim),
        ("mine", mine),
        ("release", release_live),
    ]
}

/// The MySQL/MariaDB lease-table backend (`?mode=lease`).
#[derive(Debug, Clone)]
pub struct MysqlLeaseBackend {
    inner: Arc<Inner>,
}

struct Inner {
    describe: String,
    conns: Arc<Conns>,
    sql: Sql,
    /// The fence of a key's first row: above every fence the counter of earlier versions
    /// handed out, where that counter exists.
    first_fence: u64,
    /// Abandoned attempts whose rows are being freed.
    cleanups: Cleanups,
    /// Writers of this handle that left an intent: they withdraw it when granted.
    intents: Mutex<HashSet<(Key, String)>>,
    /// Exclusive renewals that fall due together.
    renewals: RenewBatcher<LeaseRows>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::backends::sql_url::fmt_backend(f, "MysqlLeaseBackend", &self.describe)
    }
}

pub(crate) fn info_of(mut row: Row) -> LockInfo {
    let key: Vec<u8> = row.take_opt(0).and_then(|r| r.ok()).unwrap_or_default();
    let mut info = LockInfo::new(String::from_utf8_lossy(&key).into_owned());
    info.owner = row.take_opt(1).and_then(|r| r.ok());
    info.fence = row.take_opt(2).and_then(|r| r.ok());
    info.pid = row
        .take_opt::<Option<u32>, _>(3)
        .and_then(|r| r.ok())
        .flatten();
    info.host = row
        .take_opt::<Option<String>, _>(4)
        .and_then(|r| r.ok())
        .flatten();
    info.acquired_at = from_micros(row.take_opt(5).and_then(|r| r.ok()));
    info.renewed_at = from_micros(row.take_opt(6).and_then(|r| r.ok()));
    info.expires_at = from_micros(
        row.take_opt::<Option<i64>, _>(7)
            .and_then(|r| r.ok())
            .flatten(),
    );
    info.ttl = row
        .take_opt::<Option<i64>, _>(8)
        .and_then(|r| r.ok())
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .map(Duration::from_millis);
    info.value = row
        .take_opt::<Option<String>, _>(9)
        .and_then(|r| r.ok())
        .flatten();
    info
}

/// The record of a key held by readers or permits (rows of the kinds' `inspect`).
fn holders_info(mut rows: Vec<Row>) -> Option<LockInfo> {
    let permits = rows
        .first_mut()?
        .take_opt::<Option<u32>, _>(10)
        .and_then(|r| r.ok())
        .flatten();
    let kind = match permits {
        Some(permits) => LockKind::Semaphore { permits },
        None => LockKind::Shared,
    };
    let holders: Vec<LockInfo> = rows.into_iter().map(info_of).collect();
    let key = holders.first()?.key.clone();
    Some(LockInfo::of_holders(key, kind, holders))
}

/// The server's error code for a missing table.
const ER_NO_SUCH_TABLE: u16 = 1146;

impl MysqlLeaseBackend {
    /// Connects, and creates the lease table unless it exists. A connect to an existing
    /// table only reads.
    pub async fn connect(settings: Settings) -> Result<Self> {
        let conns = Conns::new(settings.dial.clone(), settings.describe.clone());
        let mut conn = conns.take().await?;
        let holders = lease_kinds::holders_table(&settings.table);
        ensure_schema(
            &mut conn,
            &settings.describe,
            &[table_probe(&settings.table), table_probe(&holders)],
            vec![ddl(&settings.table), lease_kinds::ddl(&settings.table)],
        )
        .await?;
        // Tables of versions before the kinds lack the value column.
        let probe = format!("SELECT value FROM {} LIMIT 0", settings.table);
        if let Err(mysql_async::Error::Server(_)) = conn.query_drop(probe).await {
            conn.query_drop(format!(
                "ALTER TABLE {} ADD COLUMN value TEXT NULL",
                settings.table
            ))
            .await
            .map_err(|err| {
                Error::backend(
                    &settings.describe,
                    format!("cannot add the value column to {} ({err}); have it added by a user with ALTER (see docs/backends/mysql.md)", settings.table),
                )
            })?;
        }
        // A plain (consistent, non-locking) read: a stalled client of an earlier version
        // holding the counter's row lock does not delay it.
        let old: mysql_async::Result<Option<u64>> = conn
            .query_first(format!(
                "SELECT fence FROM {} WHERE id = 1",
                settings.counter
            ))
            .await;
        let old = match old {
            Ok(old) => old.unwrap_or(0),
            Err(mysql_async::Error::Server(err)) if err.code == ER_NO_SUCH_TABLE => 0,
            Err(err) => return Err(my_error(&settings.describe, err)),
        };
        conn.keep();
        drop(conn);
        let sql = Sql::new(&settings.table);
        let renewals = RenewBatcher::new(
            LeaseRows {
                conns: Arc::clone(&conns),
                table: settings.table.clone(),
                one: sql.renew.clone(),
                describe: settings.describe.clone(),
            },
            &settings.describe,
            MAX_RENEW_BATCH,
            STATEMENT_TIMEOUT,
        );
        Ok(MysqlLeaseBackend {
            inner: Arc::new(Inner {
                renewals,
                describe: settings.describe,
                conns,
                sql,
                first_fence: old.saturating_add(1),
                cleanups: Cleanups::default(),
                intents: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// Runs one statement on the lease row of `key`, bounded in time; a row-lock wait that
    /// ran out is reported as such.
    async fn on_row<T>(
        &self,
        key: &str,
        statement: impl std::future::Future<Output = mysql_async::Result<T>>,
    ) -> Result<T> {
        self.on_row_until(key, None, statement).await
    }

    /// [`on_row`](Self::on_row), for an acquire attempt on connection `id` that must
    /// answer by `end`, earlier than the row-lock wait can run out: a statement still
    /// waiting then (the read before it answered, so the server does) is reported as the
    /// lock wait it is, and interrupted on the server, so that it cannot take the row
    /// after its caller gave up.
    async fn on_row_until<T>(
        &self,
        key: &str,
        attempt: Option<(Instant, u32)>,
        statement: impl std::future::Future<Output = mysql_async::Result<T>>,
    ) -> Result<T> {
        let limit = Instant::now() + STATEMENT_TIMEOUT;
        let until = attempt.map_or(limit, |(end, _)| end.min(limit));
        match tokio::time::timeout_at(until.into(), statement).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) if is_lock_wait_timeout(&err) => Err(Error::unavailable(
                &self.inner.describe,
                format!(
                    "lock wait timeout on the lease row of {key:?}: another session held its row lock for over {} s (a client stalled mid-statement, or a transaction left open on the table); try again",
                    super::ROW_LOCK_WAIT.as_secs()
                ),
            )),
            Ok(Err(err)) => Err(my_error(&self.inner.describe, err)),
            // Dropping the statement drops its connection (never pooled again).
            Err(_) if until < limit => {
                if let Some((_, id)) = attempt {
                    self.interrupt(id).await;
                }
                Err(Error::unavailable(
                &self.inner.describe,
                format!(
                    "lock wait timeout on the lease row of {key:?}: its row lock stayed taken until this attempt's deadline (another session holds it: a client stalled mid-statement, or a transaction left open on the table; or the server stopped answering); try again"
                    ),
                ))
            }
            Err(_) => Err(Error::unavailable(
                &self.inner.describe,
                format!(
                    "no answer within {} s to a statement on the lease row of {key:?}",
                    STATEMENT_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// Stops the statement running on connection `id` (`KILL QUERY`), briefly bounded.
    async fn interrupt(&self, id: u32) {
        let killed = tokio::time::timeout(ATTEMPT_MARGIN / 2, async {
            let mut admin = self.inner.conns.take_raw().await?;
            admin.query_drop(format!("KILL QUERY {id}")).await?;
            admin.keep();
            mysql_async::Result::Ok(())
        })
        .await;
        if !matches!(killed, Ok(Ok(()))) {
            tracing::debug!(id, "interrupting an acquire that waited on a row lock failed; its connection is closed anyway");
        }
    }

    async fn conn(&self) -> Result<Lent> {
        self.inner.conns.take().await
    }

    /// The acquiring statement and the read that judges it: `Some(fence)` if the row is ours.
    async fn claim(
        &self,
        conn: &mut mysql_async::Conn,
        request: &AcquireRequest<'_>,
        began: Instant,
    ) -> Result<Option<u64>> {
        let key = request.key.as_str();
        let k = row_key(key);
        // Answer before the engine gives up on the attempt, so that a row-lock wait is
        // reported as such rather than as a store that did not answer.
        let attempt = crate::core::wait::call_deadline(request, began)
            .checked_sub(ATTEMPT_MARGIN)
            .filter(|end| *end > began)
            .map(|end| (end, conn.id()));
        self.on_row_until(
            key,
            attempt,
            conn.exec_drop(
                self.inner.sql.claim.as_str(),
                (
                    k.as_slice(),
                    key.as_bytes(),
                    request.owner.as_str(),
                    self.inner.first_fence,
                    micros(request.ttl),
                    super::millis(request.ttl),
                    request.holder.pid,
                    request.holder.host.as_str(),
                    request.holder.value.as_deref(),
                ),
            ),
        )
        .await?;
        // A fresh statement, so a fresh UTC_TIMESTAMP(6): is the row ours, and still live?
        let now: Option<(String, u64, bool)> = self
            .on_row_until(
                key,
                attempt,
                conn.exec_first(self.inner.sql.mine.as_str(), (k.as_slice(),)),
            )
            .await?;
        let Some((owner, fence, live)) = now else {
            return Ok(None);
        };
        if owner != request.owner.as_str() {
            return Ok(None);
        }
        // A lease whose validity (counted from before the attempt) is already over must
        // not be handed out.
        if live && began.elapsed() < request.ttl {
            return Ok(Some(fence));
        }
        // Taken, but too late to hand out: free it for the next acquirer at once.
        self.on_row(
            key,
            conn.exec_drop(
                self.inner.sql.clear.as_str(),
                (k.as_slice(), request.owner.as_str()),
            ),
        )
        .await?;
        Ok(None)
    }
}

#[async_trait]
impl Backend for MysqlLeaseBackend {
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
        let began = Instant::now();
        if self.inner.cleanups.running(request.key, request.owner) {
            return Ok(Attempt::Held { expires_in: None });
        }
        let mut conn = self.conn().await?;
        if request.kind != LockKind::Exclusive {
            return self.try_kind(conn, request, began).await;
        }
        let key = request.key.as_str();
        let k = row_key(key);
        let remaining: Option<(Option<i64>, Option<bool>)> = self
            .on_row(
                key,
                conn.exec_first(self.inner.sql.peek.as_str(), (k.as_slice(),)),
            )
            .await?;
        if let Some((Some(us), by_holders)) = remaining {
            if us > 0 {
                let mut expires_in = Duration::from_micros(us.unsigned_abs());
                if by_holders == Some(true) {
                    self.leave_intent(&mut conn, request).await?;
                    expires_in = expires_in.min(lease_kinds::INTENT / 3);
                }
                conn.keep();
                return Ok(Attempt::Held {
                    expires_in: Some(expires_in),
                });
            }
        }
        // A dropped future (or a failed statement) closes the connection.
        let claimed = self.claim(&mut conn, request, began).await?;
        if claimed.is_some() && self.intent_left(request.key, request.owner, false) {
            self.on_row(
                key,
                conn.exec_drop(
                    self.inner.sql.kinds.drop_intent.as_str(),
                    (k.as_slice(), request.owner.as_str()),
                ),
            )
            .await?;
        }
        conn.keep();
        match claimed {
            Some(fence) => Ok(Attempt::Acquired(Granted {
                fence,
                sent_at: began,
                lease: self.held(request.key, request.owner, LockKind::Exclusive),
            })),
            None => Ok(Attempt::Held { expires_in: None }),
        }
    }

    /// The owner-checked release, in the background: the caller gave up on a store that
    /// did not answer, and must not wait for that store again. The attempt's kind is not
    /// known here: the row, and any reader, permit or intent of the owner, are freed.
    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        self.intent_left(key, owner, false);
        let (this, k, o) = (self.clone(), key.clone(), owner.clone());
        let cleanup = async move {
            let row = this.release_row(&k, &o).await;
            let holder = this.release_holder(&k, &o).await;
            Ok(row? | holder?)
        };
        self.inner.cleanups.spawn(cleanup, key, owner);
        Ok(())
    }
}

impl MysqlLeaseBackend {
    /// The handle of a row held (or maybe taken) by `owner`.
    fn held(&self, key: &Key, owner: &Owner, kind: LockKind) -> Box<dyn HeldLease> {
        Box::new(MysqlLease {
            backend: self.clone(),
            key: key.clone(),
            owner: owner.clone(),
            kind,
        })
    }

    /// Whether `owner` left an intent on `key` (and notes that it did, if `leaves`).
    fn intent_left(&self, key: &Key, owner: &Owner, leaves: bool) -> bool {
        let mut intents = self
            .inner
            .intents
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mark = (key.clone(), owner.as_str().to_owned());
        if leaves {
            !intents.insert(mark)
        } else {
            intents.remove(&mark)
        }
    }

    /// A writer refused by readers writes (or refreshes) its intent.
    async fn leave_intent(&self, conn: &mut Lent, request: &AcquireRequest<'_>) -> Result<()> {
        let key = request.key.as_str();
        self.intent_left(request.key, request.owner, true);
        self.on_row(
            key,
            conn.exec_drop(
                self.inner.sql.kinds.intent.as_str(),
                (
                    row_key(key),
                    request.owner.as_str(),
                    key.as_bytes(),
                    micros(lease_kinds::INTENT),
                ),
            ),
        )
        .await
    }

    /// One attempt at a reader or a permit, on its own transaction.
    async fn try_kind(
        &self,
        mut conn: Lent,
        request: &AcquireRequest<'_>,
        began: Instant,
    ) -> Result<Attempt> {
        let outcome = self
            .on_row(
                request.key.as_str(),
                lease_kinds::try_kind(
                    &mut conn,
                    &self.inner.sql.kinds,
                    &self.inner.describe,
                    request,
                    self.inner.first_fence,
                ),
            )
            .await?;
        // Only a finished transaction returns the connection to the pool.
        conn.keep();
        match outcome? {
            lease_kinds::Outcome::Granted(fence) => Ok(Attempt::Acquired(Granted {
                fence,
                sent_at: began,
                lease: self.held(request.key, request.owner, request.kind),
            })),
            lease_kinds::Outcome::Held(expires_in) => Ok(Attempt::Held { expires_in }),
        }
    }

    /// A reader's or permit's release: `true` if it was live.
    async fn release_holder(&self, key: &Key, owner: &Owner) -> Result<bool> {
        let mut conn = self.conn().await?;
        let live = self
            .on_row(
                key.as_str(),
                lease_kinds::release(
                    &mut conn,
                    &self.inner.sql.kinds,
                    key.as_str(),
                    owner.as_str(),
                ),
            )
            .await?;
        conn.keep();
        Ok(live)
    }
}

/// The most renewals one batch carries; more wait for the next.
const MAX_RENEW_BATCH: usize = 256;

/// The batch statement for `ttl` over the rows of a [`renew_batch::rows_clause`]:
/// [`Sql::renew`] over several rows.
fn renew_rows_sql(table: &str, ttl: Duration, rows: &str) -> String {
    format!(
        "UPDATE {table} SET renewed_at = UTC_TIMESTAMP(6), ttl_ms = {}, expires_at = UTC_TIMESTAMP(6) + INTERVAL {} MICROSECOND
WHERE {rows} AND expires_at > UTC_TIMESTAMP(6)",
        super::millis(ttl),
        micros(ttl)
    )
}

/// One exclusive lease's renewal, waiting for its batch.
struct Renewal {
    k: Vec<u8>,
    owner: Owner,
    ttl: Duration,
}

/// The lease table's batch statements, on a connection of the handle's pool.
struct LeaseRows {
    conns: Arc<Conns>,
    table: String,
    /// [`Sql::renew`], for the rows of a short chunk.
    one: String,
    describe: String,
}

impl RenewalSink for LeaseRows {
    type Renewal = Renewal;

    async fn send(&self, batch: &[Renewal]) -> Result<Vec<bool>> {
        let rows: Vec<RowRenewal<'_>> = batch
            .iter()
            .map(|r| RowRenewal {
                k: &r.k,
                owner: r.owner.as_str(),
                ttl: r.ttl,
            })
            .collect();
        let mut conn = self.conns.take().await?;
        let renewed = renew_batch::renew_rows(
            &mut conn,
            |ttl, rows| renew_rows_sql(&self.table, ttl, rows),
            &self.one,
            |ttl| vec![super::millis(ttl).into(), micros(ttl).into()],
            &rows,
        )
        .await
        .map_err(|err| my_error(&self.describe, err))?;
        // Dropped without `keep` after an error or a timeout: it closes.
        conn.keep();
        Ok(renewed)
    }
}

/// One held row, renewed and released on connections of the handle's pool.
struct MysqlLease {
    backend: MysqlLeaseBackend,
    key: Key,
    owner: Owner,
    kind: LockKind,
}

#[async_trait]
impl HeldLease for MysqlLease {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let backend = &self.backend;
        if self.kind != LockKind::Exclusive {
            let mut conn = backend.conn().await?;
            let k = row_key(self.key.as_str());
            let sql = &backend.inner.sql.kinds;
            backend
                .on_row(
                    self.key.as_str(),
                    conn.exec_drop(
                        sql.renew_holder.as_str(),
                        (
                            super::millis(ttl),
                            micros(ttl),
                            k.as_slice(),
                            self.owner.as_str(),
                        ),
                    ),
                )
                .await?;
            if conn.affected_rows() != 1 {
                conn.keep();
                return Ok(false);
            }
            backend
                .on_row(
                    self.key.as_str(),
                    conn.exec_drop(sql.renew_row.as_str(), (micros(ttl), k.as_slice())),
                )
                .await?;
            conn.keep();
            return Ok(true);
        }
        backend
            .inner
            .renewals
            .renew(Renewal {
                k: row_key(self.key.as_str()),
                owner: self.owner.clone(),
                ttl,
            })
            .await
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        if self.kind != LockKind::Exclusive {
            return self.backend.release_holder(&self.key, &self.owner).await;
        }
        self.backend.release_row(&self.key, &self.owner).await
    }
}

impl MysqlLeaseBackend {
    /// The owner-checked release (the row stays, with its fence): `true` if the lease
    /// was still live.
    async fn release_row(&self, key: &Key, owner: &Owner) -> Result<bool> {
        let mut conn = self.conn().await?;
        let k = row_key(key.as_str());
        self.on_row(
            key.as_str(),
            conn.exec_drop(
                self.inner.sql.release_live.as_str(),
                (k.as_slice(), owner.as_str()),
            ),
        )
        .await?;
        if conn.affected_rows() == 1 {
            conn.keep();
            return Ok(true);
        }
        self.on_row(
            key.as_str(),
            conn.exec_drop(
                self.inner.sql.release_any.as_str(),
                (k.as_slice(), owner.as_str()),
            ),
        )
        .await?;
        conn.keep();
        Ok(false)
    }
}

#[async_trait]
impl Admin for MysqlLeaseBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let mut conn = self.conn().await?;
        let rows: Vec<Row> = self
            .on_row(
                key.as_str(),
                conn.exec(
                    self.inner.sql.kinds.inspect.as_str(),
                    (row_key(key.as_str()),),
                ),
            )
            .await?;
        if let Some(info) = holders_info(rows) {
            conn.keep();
            return Ok(Some(info));
        }
        let row: Option<Row> = self
            .on_row(
                key.as_str(),
                conn.exec_first(self.inner.sql.inspect.as_str(), (row_key(key.as_str()),)),
            )
            .await?;
        conn.keep();
        Ok(row.map(info_of))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let mut conn = self.conn().await?;
        let rows: Vec<Row> = self
            .on_row("*", conn.query(self.inner.sql.list.as_str()))
            .await?;
        let mut all: Vec<LockInfo> = rows.into_iter().map(info_of).collect();
        let rows: Vec<Row> = self
            .on_row("*", conn.query(self.inner.sql.kinds.list.as_str()))
            .await?;
        conn.keep();
        // Rows come ordered by key: one record per run of a key.
        let mut run: Vec<Row> = Vec::new();
        let mut run_key: Option<Vec<u8>> = None;
        for row in rows {
            let key: Option<Vec<u8>> = row.get(0);
            if key != run_key && !run.is_empty() {
                all.extend(holders_info(std::mem::take(&mut run)));
            }
            run_key = key;
            run.push(row);
        }
        all.extend(holders_info(run));
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let mut conn = self.conn().await?;
        self.on_row(
            key.as_str(),
            conn.exec_drop(self.inner.sql.force.as_str(), (row_key(key.as_str()),)),
        )
        .await?;
        let held = conn.affected_rows() > 0;
        // Every reader and permit of the key goes with it.
        self.on_row(
            key.as_str(),
            conn.exec_drop(
                self.inner.sql.kinds.force.as_str(),
                (row_key(key.as_str()),),
            ),
        )
        .await?;
        conn.keep();
        Ok(held)
    }
}
