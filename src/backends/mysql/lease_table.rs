//! `mode=lease` on MySQL/MariaDB: a lock is a row of the lease table, with an expiry on the
//! server's clock (`UTC_TIMESTAMP(6)`, independent of the session time zone).
//!
//! * acquire: a read of the row (a held row answers at once, with the server-computed
//!   time to its expiry); else one short transaction: bump the fence counter
//!   (`fence = LAST_INSERT_ID(fence + 1)`, whose row lock orders acquirers), then
//!   `INSERT … ON DUPLICATE KEY UPDATE` that overwrites only an expired row, then a locking
//!   read of the row (`SELECT owner, fence, expires_at > UTC_TIMESTAMP(6) … FOR UPDATE`,
//!   in the same transaction, under the row lock the insert took): the lock is ours only
//!   if the row now has this request's owner token and fence and has not already expired.
//!   `UTC_TIMESTAMP(6)` is the time a statement *started*: an insert that waited for the
//!   row lock longer than the TTL judged the row, and stamped the new expiry, with the
//!   time it began waiting, so it could take over a lease and commit it already expired,
//!   and the next acquirer took it over at once (two grants microseconds apart). The
//!   read's own, fresh, timestamp catches that; so does the client-side check that the
//!   attempt did not outlast the TTL before committing.
//! * renew: `UPDATE … WHERE k = ? AND owner = ? AND expires_at > UTC_TIMESTAMP(6)`.
//! * release: `DELETE … WHERE k = ? AND owner = ?`.
//! * Expired rows are swept (at most every 30 s per handle); released rows are deleted.
//!
//! MySQL has no LISTEN/NOTIFY: waiters retry with the engine's jittered backoff (5 ms
//! doubling to 1 s) and no later than the holder's expiry.

use super::{
    counter_ddl, ensure_schema, epoch_us, from_micros, micros, my_error, row_key, Conns, Lent,
    Settings,
};
use crate::backends::sql_sweep::SweepClock;
use crate::core::backend::{AcquireRequest, Admin, Attempt, Backend, Granted, HeldLease, LockInfo};
use crate::core::owner::Owner;
use crate::error::Result;
use crate::key::Key;
use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::Row;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SWEEP_EVERY: Duration = Duration::from_secs(30);

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
    KEY (expires_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    )
}

struct Sql {
    peek: String,
    bump: String,
    insert: String,
    mine: String,
    renew: String,
    release_live: String,
    release_any: String,
    force: String,
    inspect: String,
    list: String,
    sweep: String,
    sweep_one: String,
}

impl Sql {
    fn new(t: &str, counter: &str) -> Self {
        let cols = format!(
            "key_text, owner, fence, pid, host, {}, {}, {}, ttl_ms",
            epoch_us("acquired_at"),
            epoch_us("renewed_at"),
            epoch_us("expires_at")
        );
        let expired = "expires_at <= UTC_TIMESTAMP(6)";
        Sql {
            peek: format!("SELECT TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at) FROM {t} WHERE k = ?"),
            bump: format!("UPDATE {counter} SET fence = LAST_INSERT_ID(fence + 1) WHERE id = 1"),
            // Assignments run left to right and see earlier ones: expires_at goes last so
            // every condition reads the old expiry.
            insert: format!(
                "INSERT INTO {t} (k, key_text, owner, fence, expires_at, acquired_at, renewed_at, ttl_ms, pid, host)
VALUES (?, ?, ?, LAST_INSERT_ID(), UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), ?, ?, ?)
ON DUPLICATE KEY UPDATE
    owner = IF({expired}, VALUES(owner), owner),
    fence = IF({expired}, VALUES(fence), fence),
    acquired_at = IF({expired}, VALUES(acquired_at), acquired_at),
    renewed_at = IF({expired}, VALUES(renewed_at), renewed_at),
    ttl_ms = IF({expired}, VALUES(ttl_ms), ttl_ms),
    pid = IF({expired}, VALUES(pid), pid),
    host = IF({expired}, VALUES(host), host),
    expires_at = IF({expired}, VALUES(expires_at), expires_at)"
            ),
            mine: format!(
                "SELECT owner, fence, expires_at > UTC_TIMESTAMP(6) FROM {t} WHERE k = ? FOR UPDATE"
            ),
            renew: format!(
                "UPDATE {t} SET renewed_at = UTC_TIMESTAMP(6), ttl_ms = ?, expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND
WHERE k = ? AND owner = ? AND expires_at > UTC_TIMESTAMP(6)"
            ),
            release_live: format!("DELETE FROM {t} WHERE k = ? AND owner = ? AND expires_at > UTC_TIMESTAMP(6)"),
            release_any: format!("DELETE FROM {t} WHERE k = ? AND owner = ?"),
            force: format!("DELETE FROM {t} WHERE k = ? AND expires_at > UTC_TIMESTAMP(6)"),
            inspect: format!("SELECT {cols} FROM {t} WHERE k = ? AND expires_at > UTC_TIMESTAMP(6)"),
            list: format!("SELECT {cols} FROM {t} WHERE expires_at > UTC_TIMESTAMP(6) ORDER BY key_text"),
            // Found by a plain read, deleted one row at a time by primary key: a range
            // DELETE would take gap locks on the expiry index and could deadlock with an
            // acquirer taking over an expired row.
            sweep: format!("SELECT k FROM {t} WHERE expires_at < UTC_TIMESTAMP(6) LIMIT 1000"),
            sweep_one: format!("DELETE FROM {t} WHERE k = ? AND expires_at < UTC_TIMESTAMP(6)"),
        }
    }
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
    sweeps: SweepClock,
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
    info
}

impl MysqlLeaseBackend {
    /// Connects, and creates the counter and lease tables unless they exist.
    pub async fn connect(settings: Settings) -> Result<Self> {
        let conns = Conns::new(settings.opts.clone(), settings.describe.clone());
        let mut conn = conns.take().await?;
        let mut statements = counter_ddl(&settings.counter);
        statements.push(ddl(&settings.table));
        ensure_schema(&mut conn, &settings.describe, statements).await?;
        conn.keep();
        drop(conn);
        Ok(MysqlLeaseBackend {
            inner: Arc::new(Inner {
                describe: settings.describe,
                conns,
                sql: Sql::new(&settings.table, &settings.counter),
                sweeps: SweepClock::new(SWEEP_EVERY, true),
            }),
        })
    }

    fn err(&self, err: mysql_async::Error) -> crate::Error {
        my_error(&self.inner.describe, err)
    }

    async fn conn(&self) -> Result<Lent> {
        self.inner.conns.take().await
    }

    fn maybe_sweep(&self) {
        if !self.inner.sweeps.due() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(mut conn) = this.conn().await {
                let swept: mysql_async::Result<()> = async {
                    let keys: Vec<Vec<u8>> = conn.query(this.inner.sql.sweep.as_str()).await?;
                    for k in keys {
                        conn.exec_drop(this.inner.sql.sweep_one.as_str(), (k,))
                            .await?;
                    }
                    Ok(())
                }
                .await;
                match swept {
                    Ok(()) => conn.keep(),
                    Err(err) => tracing::debug!(%err, "sweeping expired leases failed"),
                }
            }
        });
    }

    /// One acquiring transaction: `Some(fence)` if the row is ours.
    async fn claim(
        &self,
        conn: &mut mysql_async::Conn,
        request: &AcquireRequest<'_>,
        began: Instant,
    ) -> Result<Option<u64>> {
        let mut tx = conn
            .start_transaction(mysql_async::TxOpts::default())
            .await
            .map_err(|e| self.err(e))?;
        tx.query_drop(self.inner.sql.bump.as_str())
            .await
            .map_err(|e| self.err(e))?;
        let fence = tx.last_insert_id().ok_or_else(|| {
            crate::Error::backend(&self.inner.describe, "the fence counter returned no value")
        })?;
        let k = row_key(request.key.as_str());
        tx.exec_drop(
            self.inner.sql.insert.as_str(),
            (
                k.as_slice(),
                request.key.as_str().as_bytes(),
                request.owner.as_str(),
                micros(request.ttl),
                i64::try_from(request.ttl.as_millis()).unwrap_or(i64::MAX),
                request.holder.pid,
                request.holder.host.as_str(),
            ),
        )
        .await
        .map_err(|e| self.err(e))?;
        // A locking read: the newest row version, which this transaction now has locked.
        let now: Option<(String, u64, bool)> = tx
            .exec_first(self.inner.sql.mine.as_str(), (k.as_slice(),))
            .await
            .map_err(|e| self.err(e))?;
        let ours = matches!(now, Some((owner, f, live)) if live && owner == request.owner.as_str() && f == fence)
            // A lease whose validity (counted from before the attempt) is already over
            // must not be handed out.
            && began.elapsed() < request.ttl;
        if ours {
            tx.commit().await.map_err(|e| self.err(e))?;
            Ok(Some(fence))
        } else {
            tx.rollback().await.map_err(|e| self.err(e))?;
            Ok(None)
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::backends::sql_url::fmt_backend(f, "MysqlLeaseBackend", &self.describe)
    }
}

#[async_trait]
impl Backend for MysqlLeaseBackend {
    fn describe(&self) -> &str {
        &self.inner.describe
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let began = Instant::now();
        self.maybe_sweep();
        let mut conn = self.conn().await?;
        let k = row_key(request.key.as_str());
        let remaining: Option<Option<i64>> = conn
            .exec_first(self.inner.sql.peek.as_str(), (k.as_slice(),))
            .await
            .map_err(|e| self.err(e))?;
        if let Some(Some(us)) = remaining {
            if us > 0 {
                conn.keep();
                return Ok(Attempt::Held {
                    expires_in: Some(Duration::from_micros(us.unsigned_abs())),
                });
            }
        }
        // A dropped future closes the connection, and the server rolls the transaction back.
        let claimed = self.claim(&mut conn, request, began).await?;
        conn.keep();
        match claimed {
            Some(fence) => Ok(Attempt::Acquired(Granted {
                fence,
                sent_at: began,
                lease: self.held(request.key, request.owner),
            })),
            None => Ok(Attempt::Held { expires_in: None }),
        }
    }

    /// The owner-checked release, in the background: the caller gave up on a store that
    /// did not answer, and must not wait for that store again.
    async fn abandon(&self, key: &Key, owner: &Owner) -> Result<()> {
        crate::backends::sql_session::in_background(self.held(key, owner).release(), key);
        Ok(())
    }
}

impl MysqlLeaseBackend {
    /// The handle of a row held (or maybe taken) by `owner`.
    fn held(&self, key: &Key, owner: &Owner) -> Box<dyn HeldLease> {
        Box::new(MysqlLease {
            backend: self.clone(),
            key: key.clone(),
            owner: owner.clone(),
        })
    }
}

/// One held row, renewed and released on connections of the handle's pool.
struct MysqlLease {
    backend: MysqlLeaseBackend,
    key: Key,
    owner: Owner,
}

#[async_trait]
impl HeldLease for MysqlLease {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let backend = &self.backend;
        let mut conn = backend.conn().await?;
        conn.exec_drop(
            backend.inner.sql.renew.as_str(),
            (
                super::millis(ttl),
                micros(ttl),
                row_key(self.key.as_str()),
                self.owner.as_str(),
            ),
        )
        .await
        .map_err(|e| backend.err(e))?;
        conn.keep();
        Ok(conn.affected_rows() == 1)
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        self.backend.release_row(&self.key, &self.owner).await
    }
}

impl MysqlLeaseBackend {
    /// The owner-checked delete: `true` if the lease was still live.
    async fn release_row(&self, key: &Key, owner: &Owner) -> Result<bool> {
        let mut conn = self.conn().await?;
        let k = row_key(key.as_str());
        conn.exec_drop(
            self.inner.sql.release_live.as_str(),
            (k.as_slice(), owner.as_str()),
        )
        .await
        .map_err(|e| self.err(e))?;
        if conn.affected_rows() == 1 {
            conn.keep();
            return Ok(true);
        }
        conn.exec_drop(
            self.inner.sql.release_any.as_str(),
            (k.as_slice(), owner.as_str()),
        )
        .await
        .map_err(|e| self.err(e))?;
        conn.keep();
        Ok(false)
    }
}

#[async_trait]
impl Admin for MysqlLeaseBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let mut conn = self.conn().await?;
        let row: Option<Row> = conn
            .exec_first(self.inner.sql.inspect.as_str(), (row_key(key.as_str()),))
            .await
            .map_err(|e| self.err(e))?;
        conn.keep();
        Ok(row.map(info_of))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let mut conn = self.conn().await?;
        let rows: Vec<Row> = conn
            .query(self.inner.sql.list.as_str())
            .await
            .map_err(|e| self.err(e))?;
        conn.keep();
        Ok(rows.into_iter().map(info_of).collect())
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let mut conn = self.conn().await?;
        conn.exec_drop(self.inner.sql.force.as_str(), (row_key(key.as_str()),))
            .await
            .map_err(|e| self.err(e))?;
        conn.keep();
        Ok(conn.affected_rows() > 0)
    }
}
