//! `mode=session` on MySQL/MariaDB: a lock is a user-level lock (`GET_LOCK`).
//!
//! Each held lease has a connection of its own (user-level locks belong to the session).
//! The name is a hash of the fence namespace and the key (see
//! [`lock_name`](super::lock_name)). After `GET_LOCK` returns 1, the same connection
//! bumps the fence counter and records the holder row `(k, key_text, lock_name, owner,
//! fence, conn_id, …)`; any failure in between closes the connection, which frees the
//! lock.
//!
//! Pool, waiting task, interruption of an abandoned wait and loss detection are the
//! shared session engine's ([`crate::backends::sql_session`]); this module is the MySQL
//! dialect of it. An abandoned `GET_LOCK(name, timeout)` is interrupted with `KILL QUERY`
//! from an administrative connection. The client library does not notice a dead idle
//! connection by itself, and the lease's own connection belongs to its renewals, so the
//! holder's session is checked on the administrative connection instead
//! (`IS_USED_LOCK(name) = <the holder's connection id>`); a server that refuses
//! connections has no sessions left either.

use super::renew_batch::{self, RowRenewal};
use super::{
    counter_ddl, counter_probe, ensure_schema, epoch_us, is_connection_error, lock_name, my_error,
    row_key, table_probe, Conns, Settings,
};
use crate::backends::sql_session::{BoxFuture, Claim, Dialect, Held, Liveness, SessionLocks};
use crate::core::backend::{LockInfo, LockKind};
use crate::error::{Error, Result};
use crate::key::Key;
use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::Row;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `GET_LOCK` timeout for a wait without deadline (the client interrupts it when abandoned).
const FOREVER_SECS: u64 = 365 * 24 * 3600;

/// The sessions table's definition.
pub(crate) fn ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    k BINARY(32) PRIMARY KEY,
    key_text VARBINARY(1024) NOT NULL,
    lock_name VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    owner VARCHAR(64) NOT NULL,
    fence BIGINT UNSIGNED NOT NULL,
    conn_id BIGINT UNSIGNED NOT NULL,
    acquired_at DATETIME(6) NOT NULL,
    renewed_at DATETIME(6) NOT NULL,
    ttl_ms BIGINT NULL,
    pid INT UNSIGNED NULL,
    host VARCHAR(255) NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    )
}

/// Takes the lock without waiting (timeout 0) or with a timeout in seconds.
const TRY_LOCK: &str = "SELECT GET_LOCK(?, ?)";
const UNLOCK: &str = "SELECT RELEASE_LOCK(?)";

/// The statements of one uncontended acquire and its release (see
/// [`super::bench_statements`]).
pub(super) fn bench_statements(table: &str, counter: &str) -> Vec<(&'static str, String)> {
    let Sql {
        bump,
        record,
        forget,
        ..
    } = Sql::new(table, counter);
    vec![
        ("get_lock", TRY_LOCK.to_owned()),
        ("bump", bump),
        ("record", record),
        ("release_lock", UNLOCK.to_owned()),
        ("forget", forget),
    ]
}

struct Sql {
    bump: String,
    record: String,
    renew: String,
    /// The sessions table, for [`Sql::renew_rows`].
    table: String,
    forget: String,
    inspect: String,
    list: String,
}

impl Sql {
    fn new(t: &str, counter: &str) -> Self {
        let cols = format!(
            "key_text, owner, fence, pid, host, {}, {}, NULL, ttl_ms, conn_id",
            epoch_us("acquired_at"),
            epoch_us("renewed_at")
        );
        let renew = format!(
            "UPDATE {t} SET renewed_at = UTC_TIMESTAMP(6), ttl_ms = ?
WHERE k = ? AND owner = ? AND conn_id = CONNECTION_ID() AND IS_USED_LOCK(lock_name) = CONNECTION_ID()"
        );
        Sql {
            bump: format!("UPDATE {counter} SET fence = LAST_INSERT_ID(fence + 1) WHERE id = 1"),
            record: format!(
                "INSERT INTO {t} (k, key_text, lock_name, owner, fence, conn_id, acquired_at, renewed_at, ttl_ms, pid, host)
VALUES (?, ?, ?, ?, LAST_INSERT_ID(), CONNECTION_ID(), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), ?, ?, ?)
ON DUPLICATE KEY UPDATE key_text = VALUES(key_text), lock_name = VALUES(lock_name), owner = VALUES(owner),
    fence = VALUES(fence), conn_id = VALUES(conn_id), acquired_at = VALUES(acquired_at),
    renewed_at = VALUES(renewed_at), ttl_ms = VALUES(ttl_ms), pid = VALUES(pid), host = VALUES(host)"
            ),
            renew,
            table: t.to_owned(),
            forget: format!("DELETE FROM {t} WHERE k = ? AND owner = ?"),
            inspect: format!("SELECT {cols} FROM {t} WHERE k = ? AND conn_id = ?"),
            list: format!("SELECT {cols} FROM {t} WHERE IS_USED_LOCK(lock_name) = conn_id ORDER BY key_text"),
        }
    }
}

impl Sql {
    /// `renew` over several rows of one session ([`super::renew_batch`]): `rows` is a
    /// [`renew_batch::rows_clause`].
    fn renew_rows(&self, ttl: Duration, rows: &str) -> String {
        format!(
            "UPDATE {} SET renewed_at = UTC_TIMESTAMP(6), ttl_ms = {}
WHERE {rows} AND conn_id = CONNECTION_ID() AND IS_USED_LOCK(lock_name) = CONNECTION_ID()",
            self.table,
            super::millis(ttl)
        )
    }
}

/// A connection of one lease, and whether one of its calls found it dead.
pub(crate) struct MyConn {
    conn: mysql_async::Conn,
    /// MariaDB rather than MySQL: they bound statements with different settings.
    mariadb: bool,
    broken: bool,
}

impl MyConn {
    fn failed(&mut self, err: &mysql_async::Error) {
        if is_connection_error(err) {
            self.broken = true;
        }
    }
}

/// MySQL's half of the session engine.
pub(crate) struct MySession {
    describe: String,
    /// The fence counter (`database.table`), which namespaces the lock names.
    namespace: String,
    dial: super::Dial,
    sql: Sql,
    admin: Arc<Conns>,
}

/// The MySQL/MariaDB user-level-lock backend (`?mode=session`, the default).
pub(crate) type MysqlSessionBackend = SessionLocks<MySession>;

/// Connects, and creates the counter and sessions tables unless they exist.
pub(crate) async fn connect(settings: Settings) -> Result<MysqlSessionBackend> {
    let admin = Conns::new(settings.dial.clone(), settings.describe.clone());
    let mut conn = admin.take().await?;
    let mut statements = counter_ddl(&settings.counter);
    statements.push(ddl(&settings.table));
    let probes = [
        counter_probe(&settings.counter),
        table_probe(&settings.table),
    ];
    ensure_schema(&mut conn, &settings.describe, &probes, statements).await?;
    conn.keep();
    drop(conn);
    let shared_sessions = settings.shared_sessions;
    Ok(SessionLocks::new(
        MySession {
            namespace: settings.namespace,
            sql: Sql::new(&settings.table, &settings.counter),
            describe: settings.describe,
            dial: settings.dial,
            admin,
        },
        shared_sessions,
    ))
}

impl MySession {
    fn err(&self, err: mysql_async::Error) -> Error {
        my_error(&self.describe, err)
    }

    /// `GET_LOCK(name, timeout)`, then the fence and the holder row: `Some(fence)` if the
    /// lock is ours, `None` if `GET_LOCK` timed out.
    async fn lock(
        &self,
        conn: &mut MyConn,
        claim: &Claim<String>,
        get_lock: &str,
        timeout_secs: u64,
    ) -> Result<Option<u64>> {
        let outcome = self
            .lock_raw(&mut conn.conn, claim, get_lock, timeout_secs)
            .await;
        outcome.map_err(|err| {
            conn.failed(&err);
            self.err(err)
        })
    }

    async fn lock_raw(
        &self,
        conn: &mut mysql_async::Conn,
        claim: &Claim<String>,
        get_lock: &str,
        timeout_secs: u64,
    ) -> mysql_async::Result<Option<u64>> {
        let got: Option<Option<i64>> = conn
            .exec_first(get_lock, (claim.lock.as_str(), timeout_secs))
            .await?;
        if got.flatten() != Some(1) {
            return Ok(None);
        }
        conn.query_drop(self.sql.bump.as_str()).await?;
        let fence = conn.last_insert_id().unwrap_or(0);
        conn.exec_drop(
            self.sql.record.as_str(),
            (
                row_key(claim.key.as_str()),
                claim.key.as_str().as_bytes(),
                claim.lock.as_str(),
                claim.owner.as_str(),
                super::millis(claim.ttl),
                claim.pid,
                &*claim.host,
            ),
        )
        .await?;
        Ok(Some(fence))
    }

    /// The connection id holding `name`, asked on an administrative connection.
    async fn used_by(&self, name: &str) -> mysql_async::Result<Option<u64>> {
        let mut conn = self.admin.take_raw().await?;
        let holder: Option<Option<u64>> =
            conn.exec_first("SELECT IS_USED_LOCK(?)", (name,)).await?;
        conn.keep();
        Ok(holder.flatten())
    }
}

/// What interrupts a waiting `GET_LOCK`: the waiting connection's id.
pub(crate) struct Waiting(u32);

#[async_trait]
impl Dialect for MySession {
    type Conn = MyConn;
    type Lock = String;
    type Interrupt = Waiting;

    async fn connect(&self) -> Result<MyConn> {
        let (conn, mariadb) = super::open_conn(&self.dial)
            .await
            .map_err(|e| self.err(e))?;
        Ok(MyConn {
            conn,
            mariadb,
            broken: false,
        })
    }

    fn describe(&self) -> &str {
        &self.describe
    }

    fn lock_of(&self, key: &Key) -> String {
        lock_name(&self.namespace, key.as_str())
    }

    fn is_closed(&self, conn: &MyConn) -> bool {
        conn.broken
    }

    async fn ping(&self, conn: &mut MyConn) -> Result<()> {
        let outcome = conn.conn.ping().await;
        outcome.map_err(|err| {
            conn.failed(&err);
            self.err(err)
        })
    }

    fn session_id(&self, conn: &MyConn) -> u64 {
        u64::from(conn.conn.id())
    }

    async fn try_lock(&self, conn: &mut MyConn, claim: &Claim<String>) -> Result<Option<u64>> {
        self.lock(conn, claim, TRY_LOCK, 0).await
    }

    async fn wait_lock(&self, conn: &mut MyConn, claim: &Claim<String>) -> Result<Option<u64>> {
        let deadline = claim.deadline;
        let timeout_secs = deadline.map_or(FOREVER_SECS, |d| {
            d.saturating_duration_since(Instant::now())
                .as_secs()
                .saturating_add(1)
        });
        // The session's statement bound would end the wait early: this one statement is
        // bounded by GET_LOCK's own timeout (the caller's deadline) instead.
        let get_lock = if conn.mariadb {
            "SET STATEMENT max_statement_time = 0 FOR SELECT GET_LOCK(?, ?)"
        } else {
            "SELECT /*+ MAX_EXECUTION_TIME(4294967295) */ GET_LOCK(?, ?)"
        };
        self.lock(conn, claim, get_lock, timeout_secs).await
    }

    fn interrupter(&self, conn: &MyConn) -> Waiting {
        Waiting(conn.conn.id())
    }

    async fn interrupt(&self, waiting: Waiting) {
        let killed = async {
            let mut admin = self.admin.take_raw().await?;
            admin
                .query_drop(format!("KILL QUERY {}", waiting.0))
                .await?;
            admin.keep();
            mysql_async::Result::Ok(())
        };
        if let Err(err) = killed.await {
            tracing::debug!(%err, "interrupting an abandoned wait failed; its connection is closed anyway");
        }
    }

    async fn renew(&self, conn: &mut MyConn, held: &Held<String>, ttl: Duration) -> Result<bool> {
        let renewed = conn
            .conn
            .exec_drop(
                self.sql.renew.as_str(),
                (
                    super::millis(ttl),
                    row_key(held.key.as_str()),
                    held.owner.as_str(),
                ),
            )
            .await;
        match renewed {
            Ok(()) => Ok(conn.conn.affected_rows() == 1),
            Err(err) => {
                conn.failed(&err);
                Err(self.err(err))
            }
        }
    }

    async fn renew_many(
        &self,
        conn: &mut MyConn,
        leases: &[(Held<String>, Duration)],
    ) -> Result<Vec<bool>> {
        // A shared session holds exclusive locks only; anything else goes one by one.
        if leases.len() == 1 || leases.iter().any(|(h, _)| h.kind != LockKind::Exclusive) {
            let mut renewed = Vec::with_capacity(leases.len());
            for (held, ttl) in leases {
                renewed.push(self.renew(conn, held, *ttl).await?);
            }
            return Ok(renewed);
        }
        let keys: Vec<Vec<u8>> = leases
            .iter()
            .map(|(held, _)| row_key(held.key.as_str()))
            .collect();
        let rows: Vec<RowRenewal<'_>> = leases
            .iter()
            .zip(&keys)
            .map(|((held, ttl), k)| RowRenewal {
                k,
                owner: held.owner.as_str(),
                ttl: *ttl,
            })
            .collect();
        let sql = &self.sql;
        let renewed = renew_batch::renew_rows(
            &mut conn.conn,
            |ttl, rows| sql.renew_rows(ttl, rows),
            &sql.renew,
            |ttl| vec![super::millis(ttl).into()],
            &rows,
        )
        .await;
        renewed.map_err(|err| {
            conn.failed(&err);
            self.err(err)
        })
    }

    async fn unlock(&self, conn: &mut MyConn, held: &Held<String>) -> Result<bool> {
        let released: mysql_async::Result<Option<Option<i64>>> =
            conn.conn.exec_first(UNLOCK, (held.lock.as_str(),)).await;
        let released = match released {
            Ok(value) => value.flatten() == Some(1),
            Err(err) => {
                conn.failed(&err);
                return Err(self.err(err));
            }
        };
        if released {
            // Remove the holder row; a later holder's row has another owner and stays.
            let forget = conn
                .conn
                .exec_drop(
                    self.sql.forget.as_str(),
                    (row_key(held.key.as_str()), held.owner.as_str()),
                )
                .await;
            if let Err(err) = forget {
                conn.failed(&err);
                tracing::debug!(%err, "removing the holder row failed; the next holder overwrites it");
            }
        }
        Ok(released)
    }

    fn end_signal(&self, _conn: &MyConn) -> Option<BoxFuture<String>> {
        None
    }

    async fn check(&self, lock: &String, id: u64) -> Liveness {
        match self.used_by(lock).await {
            Ok(Some(holder)) if holder == id => Liveness::Holding,
            Ok(_) => Liveness::Gone(format!(
                "the server shows connection {id} no longer holding GET_LOCK({lock:?})"
            )),
            Err(err) if super::is_refused(&err) => Liveness::Gone(format!(
                "the server refuses connections ({err}): it is not running, so neither is the session that held the lock"
            )),
            Err(_) => Liveness::Unknown,
        }
    }

    async fn holders(&self, key: &Key) -> Result<Vec<u64>> {
        Ok(self
            .used_by(&self.lock_of(key))
            .await
            .map_err(|e| self.err(e))?
            .into_iter()
            .collect())
    }

    async fn end_session(&self, _key: &Key, id: u64) -> Result<()> {
        let mut conn = self.admin.take().await?;
        conn.query_drop(format!("KILL CONNECTION {id}"))
            .await
            .map_err(|e| self.err(e))?;
        conn.keep();
        Ok(())
    }

    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let name = self.lock_of(key);
        let used_by = self.used_by(&name).await.map_err(|e| self.err(e))?;
        let Some(conn_id) = used_by else {
            return Ok(None);
        };
        let mut conn = self.admin.take().await?;
        let row: Option<Row> = conn
            .exec_first(self.sql.inspect.as_str(), (row_key(key.as_str()), conn_id))
            .await
            .map_err(|e| self.err(e))?;
        conn.keep();
        let mut info = match row {
            Some(row) => {
                let mut info = super::lease_table::info_of(row);
                info.key = key.to_string();
                info.note = Some(format!(
                    "GET_LOCK({name:?}) held by connection {conn_id}; freed when that connection ends"
                ));
                info
            }
            None => {
                let mut info = LockInfo::new(key.as_str());
                info.note = Some(format!(
                    "GET_LOCK({name:?}) held by connection {conn_id}, which is not a dlock lease on this key"
                ));
                info
            }
        };
        info.expires_at = None;
        Ok(Some(info))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let mut conn = self.admin.take().await?;
        let rows: Vec<Row> = conn
            .query(self.sql.list.as_str())
            .await
            .map_err(|e| self.err(e))?;
        conn.keep();
        Ok(rows
            .into_iter()
            .map(|row| {
                let conn_id = row.get_opt::<u64, _>(9).and_then(Result::ok);
                let mut info = super::lease_table::info_of(row);
                // The same note as `inspect`, so that `status` and `list` agree.
                if let Some(conn_id) = conn_id {
                    let name = lock_name(&self.namespace, &info.key);
                    info.note = Some(format!(
                        "GET_LOCK({name:?}) held by connection {conn_id}; freed when that connection ends"
                    ));
                }
                info.expires_at = None;
                info
            })
            .collect())
    }
}
