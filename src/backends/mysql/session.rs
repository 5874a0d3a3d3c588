//! `mode=session` on MySQL/MariaDB: a lock is a user-level lock (`GET_LOCK`).
//!
//! Each held lease has a connection of its own (user-level locks belong to the session),
//! from a small idle pool of this handle. The name is a hash of the fence namespace and
//! the key (see [`lock_name`](super::lock_name)). After `GET_LOCK`
//! returns 1, the same connection bumps the fence counter and records the holder row
//! `(k, key_text, lock_name, owner, fence, conn_id, …)`; any failure in between closes the
//! connection, which frees the lock.
//!
//! Waiting: `GET_LOCK(name, timeout)` in a task that owns the connection. An abandoned
//! wait (deadline passed, future dropped) is interrupted with `KILL QUERY` from another
//! connection, and the waiting connection is then closed, never pooled.
//!
//! The client library does not notice a dead idle connection by itself, so each held
//! lease's connection is pinged every 500 ms; a failed ping (connection killed, server
//! restarted, network gone) fires the lease's `lost()`.

use super::{
    counter_ddl, counter_probe, ensure_schema, epoch_us, is_connection_error, lock_name, my_error,
    row_key, table_probe, Settings,
};
use crate::core::backend::{AcquireRequest, Attempt, Backend, Capabilities, LockInfo};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
use crate::key::Key;
use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Pool, Row};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const MAX_IDLE: usize = 32;
const PING_EVERY: Duration = Duration::from_millis(500);
const PING_IDLE_AFTER: Duration = Duration::from_secs(60);
/// `GET_LOCK` timeout for a wait without deadline (the client cancels it when abandoned).
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

struct Sql {
    bump: String,
    record: String,
    renew: String,
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
        Sql {
            bump: format!("UPDATE {counter} SET fence = LAST_INSERT_ID(fence + 1) WHERE id = 1"),
            record: format!(
                "INSERT INTO {t} (k, key_text, lock_name, owner, fence, conn_id, acquired_at, renewed_at, ttl_ms, pid, host)
VALUES (?, ?, ?, ?, LAST_INSERT_ID(), CONNECTION_ID(), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), ?, ?, ?)
ON DUPLICATE KEY UPDATE key_text = VALUES(key_text), lock_name = VALUES(lock_name), owner = VALUES(owner),
    fence = VALUES(fence), conn_id = VALUES(conn_id), acquired_at = VALUES(acquired_at),
    renewed_at = VALUES(renewed_at), ttl_ms = VALUES(ttl_ms), pid = VALUES(pid), host = VALUES(host)"
            ),
            renew: format!(
                "UPDATE {t} SET renewed_at = UTC_TIMESTAMP(6), ttl_ms = ?
WHERE k = ? AND owner = ? AND conn_id = CONNECTION_ID() AND IS_USED_LOCK(lock_name) = CONNECTION_ID()"
            ),
            forget: format!("DELETE FROM {t} WHERE k = ? AND owner = ?"),
            inspect: format!("SELECT {cols} FROM {t} WHERE k = ? AND conn_id = ?"),
            list: format!("SELECT {cols} FROM {t} WHERE IS_USED_LOCK(lock_name) = conn_id ORDER BY key_text"),
        }
    }
}

/// One held lease: the connection that holds the user-level lock.
struct Held {
    conn: Arc<tokio::sync::Mutex<Conn>>,
    dead: Arc<AtomicBool>,
    name: String,
}

struct Inner {
    describe: String,
    /// The fence counter (`database.table`), which namespaces the lock names.
    namespace: String,
    opts: Opts,
    sql: Sql,
    admin: Pool,
    idle: Mutex<Vec<(Conn, Instant)>>,
    held: Mutex<HashMap<Owner, Held>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlSessionBackend")
            .field("url", &self.describe)
            .finish()
    }
}

/// The MySQL/MariaDB user-level-lock backend (`?mode=session`, the default).
#[derive(Debug, Clone)]
pub struct MysqlSessionBackend {
    inner: Arc<Inner>,
}

/// Interrupts the waiting `GET_LOCK` of connection `id` when dropped, unless disarmed.
struct KillOnDrop {
    pool: Option<Pool>,
    id: u32,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some(pool) = self.pool.take() else { return };
        let id = self.id;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                match pool.get_conn().await {
                    Ok(mut conn) => {
                        if let Err(err) = conn.query_drop(format!("KILL QUERY {id}")).await {
                            tracing::debug!(%err, "interrupting an abandoned wait failed");
                        }
                    }
                    Err(err) => tracing::debug!(%err, "interrupting an abandoned wait failed"),
                }
            });
        }
    }
}

/// The owned parameters of an acquisition.
struct Params {
    k: Vec<u8>,
    key: String,
    name: String,
    owner: String,
    ttl_ms: i64,
    pid: u32,
    host: String,
}

impl Params {
    fn of(request: &AcquireRequest<'_>, namespace: &str) -> Self {
        Params {
            k: row_key(request.key.as_str()),
            key: request.key.to_string(),
            name: lock_name(namespace, request.key.as_str()),
            owner: request.owner.to_string(),
            ttl_ms: i64::try_from(request.ttl.as_millis()).unwrap_or(i64::MAX),
            pid: request.holder.pid,
            host: request.holder.host.clone(),
        }
    }

    /// `GET_LOCK(name, timeout)`, then the fence and the holder row: `Some(fence)` if the
    /// lock is ours, `None` if `GET_LOCK` timed out.
    async fn lock(
        &self,
        conn: &mut Conn,
        sql: &Sql,
        timeout_secs: u64,
    ) -> mysql_async::Result<Option<u64>> {
        let got: Option<Option<i64>> = conn
            .exec_first("SELECT GET_LOCK(?, ?)", (self.name.as_str(), timeout_secs))
            .await?;
        if got.flatten() != Some(1) {
            return Ok(None);
        }
        conn.query_drop(sql.bump.as_str()).await?;
        let fence = conn.last_insert_id().unwrap_or(0);
        conn.exec_drop(
            sql.record.as_str(),
            (
                self.k.as_slice(),
                self.key.as_bytes(),
                self.name.as_str(),
                self.owner.as_str(),
                self.ttl_ms,
                self.pid,
                self.host.as_str(),
            ),
        )
        .await?;
        Ok(Some(fence))
    }
}

impl MysqlSessionBackend {
    /// Connects, and creates the counter and sessions tables unless they exist.
    pub async fn connect(settings: Settings) -> Result<Self> {
        let admin = Pool::new(settings.opts.clone());
        let mut conn = admin
            .get_conn()
            .await
            .map_err(|e| my_error(&settings.describe, &e))?;
        let mut statements = counter_ddl(&settings.counter);
        statements.push(ddl(&settings.table));
        let probes = [
            counter_probe(&settings.counter),
            table_probe(&settings.table),
        ];
        ensure_schema(&mut conn, &settings.describe, &probes, statements).await?;
        drop(conn);
        Ok(MysqlSessionBackend {
            inner: Arc::new(Inner {
                namespace: settings.namespace,
                sql: Sql::new(&settings.table, &settings.counter),
                describe: settings.describe,
                opts: settings.opts,
                admin,
                idle: Mutex::new(Vec::new()),
                held: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn held(&self) -> MutexGuard<'_, HashMap<Owner, Held>> {
        self.inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn err(&self, err: &mysql_async::Error) -> Error {
        my_error(&self.inner.describe, err)
    }

    async fn take_conn(&self) -> Result<Conn> {
        loop {
            let next = self
                .inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let Some((mut conn, since)) = next else { break };
            // A connection idle for long may have been closed by the server (wait_timeout).
            if since.elapsed() < PING_IDLE_AFTER || conn.ping().await.is_ok() {
                return Ok(conn);
            }
        }
        Conn::new(self.inner.opts.clone())
            .await
            .map_err(|e| self.err(&e))
    }

    fn recycle(&self, conn: Conn) {
        let mut idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    fn keep(&self, owner: &Owner, conn: Conn, name: String) {
        self.held().insert(
            owner.clone(),
            Held {
                conn: Arc::new(tokio::sync::Mutex::new(conn)),
                dead: Arc::new(AtomicBool::new(false)),
                name,
            },
        );
    }

    fn lock_name(&self, key: &Key) -> String {
        lock_name(&self.inner.namespace, key.as_str())
    }

    async fn admin(&self) -> Result<mysql_async::Conn> {
        self.inner.admin.get_conn().await.map_err(|e| self.err(&e))
    }
}

#[async_trait]
impl Backend for MysqlSessionBackend {
    fn describe(&self) -> &str {
        &self.inner.describe
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            expires: false,
            native_wait: true,
            freed_on_holder_death: true,
            shared_between_processes: true,
        }
    }

    async fn try_acquire(&self, request: AcquireRequest<'_>) -> Result<Attempt> {
        let params = Params::of(&request, &self.inner.namespace);
        let mut conn = self.take_conn().await?;
        // A dropped future drops `conn`: the connection closes and frees what it took.
        match params.lock(&mut conn, &self.inner.sql, 0).await {
            Ok(Some(fence)) => {
                self.keep(request.owner, conn, params.name);
                Ok(Attempt::Acquired { fence })
            }
            Ok(None) => {
                self.recycle(conn);
                Ok(Attempt::Held { expires_in: None })
            }
            Err(err) => {
                let _ = conn.disconnect().await;
                Err(self.err(&err))
            }
        }
    }

    async fn acquire_wait(
        &self,
        request: AcquireRequest<'_>,
        deadline: Option<Instant>,
    ) -> Result<Option<u64>> {
        let params = Params::of(&request, &self.inner.namespace);
        let mut conn = self.take_conn().await?;
        let mut kill = KillOnDrop {
            pool: Some(self.inner.admin.clone()),
            id: conn.id(),
        };
        let timeout_secs = deadline.map_or(FOREVER_SECS, |d| {
            d.saturating_duration_since(Instant::now())
                .as_secs()
                .saturating_add(1)
        });
        let (tx, mut rx) = oneshot::channel::<Result<Option<(Conn, u64)>>>();
        let this = self.clone();
        let name = params.name.clone();
        tokio::spawn(async move {
            let outcome = match params.lock(&mut conn, &this.inner.sql, timeout_secs).await {
                Ok(Some(fence)) => Ok(Some((conn, fence))),
                Ok(None) => {
                    // Timed out or interrupted: it holds nothing, but a late `KILL QUERY`
                    // may still be on its way, so it is closed rather than reused.
                    let _ = conn.disconnect().await;
                    Ok(None)
                }
                Err(err) => {
                    let _ = conn.disconnect().await;
                    Err(this.err(&err))
                }
            };
            if let Err(Ok(Some((conn, _)))) = tx.send(outcome) {
                // Nobody waits any more: closing the connection frees the lock.
                let _ = conn.disconnect().await;
            }
        });
        let received = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), &mut rx).await.ok(),
            None => Some((&mut rx).await),
        };
        let received = match received {
            Some(received) => received,
            None => {
                rx.close();
                match rx.try_recv() {
                    Ok(received) => Ok(received),
                    Err(_) => return Ok(None),
                }
            }
        };
        kill.pool = None;
        match received {
            Ok(Ok(Some((conn, fence)))) => {
                self.keep(request.owner, conn, name);
                Ok(Some(fence))
            }
            Ok(Ok(None)) => Ok(None),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::unavailable(
                &self.inner.describe,
                "the waiting connection's task ended",
            )),
        }
    }

    async fn renew(&self, key: &Key, owner: &Owner, ttl: Duration) -> Result<bool> {
        let Some((conn, dead)) = self
            .held()
            .get(owner)
            .map(|h| (Arc::clone(&h.conn), Arc::clone(&h.dead)))
        else {
            return Ok(false);
        };
        if dead.load(Ordering::SeqCst) {
            return Err(Error::unavailable(
                &self.inner.describe,
                "the session holding the lock ended",
            ));
        }
        let mut conn = conn.lock().await;
        conn.exec_drop(
            self.inner.sql.renew.as_str(),
            (
                i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
                row_key(key.as_str()),
                owner.as_str(),
            ),
        )
        .await
        .map_err(|e| self.err(&e))?;
        Ok(conn.affected_rows() == 1)
    }

    async fn release(&self, key: &Key, owner: &Owner) -> Result<bool> {
        let Some(held) = self.held().remove(owner) else {
            return Ok(false);
        };
        if held.dead.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let released = {
            let mut conn = held.conn.lock().await;
            let released: mysql_async::Result<Option<Option<i64>>> = conn
                .exec_first("SELECT RELEASE_LOCK(?)", (held.name.as_str(),))
                .await;
            match released {
                Ok(value) => value.flatten() == Some(1),
                Err(err) if is_connection_error(&err) => return Ok(false),
                Err(err) => return Err(self.err(&err)),
            }
        };
        if released {
            let mut conn = held.conn.lock().await;
            // Remove the holder row; a later holder's row has another owner and stays.
            if let Err(err) = conn
                .exec_drop(
                    self.inner.sql.forget.as_str(),
                    (row_key(key.as_str()), owner.as_str()),
                )
                .await
            {
                tracing::debug!(%err, "removing the holder row failed; the next holder overwrites it");
            }
        }
        drop(held.conn.lock().await);
        if let Ok(conn) = Arc::try_unwrap(held.conn) {
            let conn = conn.into_inner();
            if released {
                self.recycle(conn);
            } else {
                let _ = conn.disconnect().await;
            }
        }
        Ok(released)
    }

    async fn session_ended(&self, _key: &Key, owner: &Owner) -> String {
        let Some((conn, dead)) = self
            .held()
            .get(owner)
            .map(|h| (Arc::downgrade(&h.conn), Arc::clone(&h.dead)))
        else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(PING_EVERY).await;
            let Some(conn) = conn.upgrade() else {
                return std::future::pending().await;
            };
            let mut conn = conn.lock().await;
            if let Err(err) = conn.ping().await {
                dead.store(true, Ordering::SeqCst);
                return format!("the connection holding the lock failed: {err}");
            }
        }
    }

    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let mut conn = self.admin().await?;
        let name = self.lock_name(key);
        let holder: Option<Option<u64>> = conn
            .exec_first("SELECT IS_USED_LOCK(?)", (name.as_str(),))
            .await
            .map_err(|e| self.err(&e))?;
        let Some(conn_id) = holder.flatten() else {
            return Ok(None);
        };
        let row: Option<Row> = conn
            .exec_first(
                self.inner.sql.inspect.as_str(),
                (row_key(key.as_str()), conn_id),
            )
            .await
            .map_err(|e| self.err(&e))?;
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
        let mut conn = self.admin().await?;
        let rows: Vec<Row> = conn
            .query(self.inner.sql.list.as_str())
            .await
            .map_err(|e| self.err(&e))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let mut info = super::lease_table::info_of(row);
                info.expires_at = None;
                info
            })
            .collect())
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let mut conn = self.admin().await?;
        let name = self.lock_name(key);
        let holder: Option<Option<u64>> = conn
            .exec_first("SELECT IS_USED_LOCK(?)", (name.as_str(),))
            .await
            .map_err(|e| self.err(&e))?;
        let Some(conn_id) = holder.flatten() else {
            return Ok(false);
        };
        conn.query_drop(format!("KILL CONNECTION {conn_id}"))
            .await
            .map_err(|e| self.err(&e))?;
        // KILL returns before the connection is gone; wait (briefly) until the lock is free.
        for _ in 0..100 {
            let still: Option<Option<u64>> = conn
                .exec_first("SELECT IS_USED_LOCK(?)", (name.as_str(),))
                .await
                .map_err(|e| self.err(&e))?;
            if still.flatten() != Some(conn_id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(true)
    }
}
