//! `mode=session`: a lock is a session-level advisory lock (`pg_advisory_lock`).
//!
//! Each held lease has a connection of its own (an advisory lock belongs to the session
//! that took it, and a waiting `pg_advisory_lock` blocks its connection), taken from a
//! small idle pool of this handle and returned to it after an orderly release. The
//! connection's end (holder killed, `pg_terminate_backend`, server restart, network loss
//! detected by TCP keepalives) frees the lock on the server and fires the lease's `lost()`.
//!
//! Taking the lock and recording the holder happen in one statement: a CTE calls
//! `pg_try_advisory_lock` (or the blocking `pg_advisory_lock` for a wait) and, if that got
//! the lock, upserts the holder row `(key, lock_id, owner, fence, backend_pid, …)` in the
//! sessions table with the fence from `nextval('dlock_fence_seq')`.
//!
//! Waiting happens in the server's lock queue: the blocking statement runs in a task that
//! owns the connection. When the wait is abandoned (deadline passed or future dropped)
//! the query is cancelled with the protocol's cancel request, and a connection whose
//! state is then uncertain is closed, never pooled: the server frees whatever its session
//! held. Only connections released in order (unlock confirmed) go back to the pool.

use super::keys::{namespaced_key, pg_locks_halves};
use super::{ensure_schema, fence_namespace, millis, pg_error, Conn, Settings, Shared};
use crate::core::backend::{AcquireRequest, Attempt, Backend, Capabilities, LockInfo};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
use crate::key::Key;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;
use tokio_postgres::types::Type;
use tokio_postgres::{CancelToken, Config, NoTls, Row};

const MAX_IDLE: usize = 32;
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The sessions table's definition.
pub(crate) fn ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    key text PRIMARY KEY,
    lock_id bigint NOT NULL,
    owner text NOT NULL,
    fence bigint NOT NULL,
    backend_pid integer NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at timestamptz NOT NULL,
    ttl_ms bigint,
    pid integer,
    host text
);"
    )
}

struct Sql {
    try_lock: String,
    wait_lock: String,
    renew: String,
    release: String,
    inspect: String,
    list: String,
    force: String,
    held: String,
    sweep: String,
}

const LOCK_MATCH: &str = "l.locktype = 'advisory' AND l.granted AND l.objsubid = 1";

impl Sql {
    fn new(t: &str, seq: &str) -> Self {
        let upsert = |lock: &str, filter: &str| {
            format!(
                "WITH l AS (SELECT {lock})
INSERT INTO {t} AS h (key, lock_id, owner, fence, backend_pid, acquired_at, renewed_at, ttl_ms, pid, host)
SELECT $2, $1, $3, nextval('{seq}'), pg_backend_pid(), clock_timestamp(), clock_timestamp(), $4, $5, $6 FROM l {filter}
ON CONFLICT (key) DO UPDATE SET lock_id = excluded.lock_id, owner = excluded.owner, fence = excluded.fence,
    backend_pid = excluded.backend_pid, acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at,
    ttl_ms = excluded.ttl_ms, pid = excluded.pid, host = excluded.host
RETURNING fence"
            )
        };
        let this_db =
            "l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";
        let row_lock = "l.pid = h.backend_pid AND l.classid = ((h.lock_id >> 32) & 4294967295)::oid AND l.objid = (h.lock_id & 4294967295)::oid";
        Sql {
            try_lock: upsert("pg_try_advisory_lock($1) AS got", "WHERE l.got"),
            wait_lock: upsert("pg_advisory_lock($1)", ""),
            renew: format!(
                "UPDATE {t} SET renewed_at = clock_timestamp(), ttl_ms = $3
 WHERE key = $1 AND owner = $2 AND backend_pid = pg_backend_pid()"
            ),
            release: format!(
                "WITH d AS (DELETE FROM {t} WHERE key = $2 AND owner = $3 AND backend_pid = pg_backend_pid() RETURNING 1)
SELECT pg_advisory_unlock($1), (SELECT count(*) FROM d)"
            ),
            inspect: format!(
                "SELECT h.owner, h.fence, h.pid, h.host, h.acquired_at, h.renewed_at, h.ttl_ms, l.pid,
       host(a.client_addr), a.application_name
FROM pg_locks l
LEFT JOIN {t} h ON h.key = $1 AND h.backend_pid = l.pid
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE {LOCK_MATCH} AND {this_db} AND l.classid = $2 AND l.objid = $3"
            ),
            list: format!(
                "SELECT h.key, h.owner, h.fence, h.pid, h.host, h.acquired_at, h.renewed_at, h.ttl_ms, l.pid
FROM {t} h JOIN pg_locks l ON {LOCK_MATCH} AND {row_lock}
ORDER BY h.key"
            ),
            force: format!(
                "WITH holders AS (SELECT l.pid FROM pg_locks l WHERE {LOCK_MATCH} AND {this_db} AND l.classid = $2 AND l.objid = $3),
     d AS (DELETE FROM {t} WHERE key = $1 AND backend_pid IN (SELECT pid FROM holders))
SELECT pg_terminate_backend(pid) FROM holders"
            ),
            held: format!(
                "SELECT 1 FROM pg_locks l WHERE {LOCK_MATCH} AND {this_db} AND l.classid = $1 AND l.objid = $2"
            ),
            sweep: format!(
                "DELETE FROM {t} h WHERE NOT EXISTS (SELECT 1 FROM pg_locks l WHERE {LOCK_MATCH} AND {row_lock})"
            ),
        }
    }
}

/// One held lease: its connection, which holds the advisory lock.
struct Held {
    conn: Arc<Conn>,
    lock_id: i64,
}

struct Inner {
    describe: String,
    /// The schema-qualified fence sequence, which namespaces the advisory keys.
    namespace: String,
    config: Config,
    sql: Sql,
    admin: Shared,
    idle: Mutex<Vec<Conn>>,
    held: Mutex<HashMap<Owner, Held>>,
    last_sweep: Mutex<Instant>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSessionBackend")
            .field("url", &self.describe)
            .finish()
    }
}

/// The PostgreSQL advisory-lock backend (`?mode=session`, the default).
#[derive(Debug, Clone)]
pub struct PgSessionBackend {
    inner: Arc<Inner>,
}

/// Cancels the running query of a waiting connection when dropped, unless disarmed.
struct CancelOnDrop(Option<CancelToken>);

impl CancelOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(token) = self.0.take() else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = token.cancel_query(NoTls).await {
                    tracing::debug!(err = %super::detail(&err), "cancelling an abandoned wait failed; its connection is closed anyway");
                }
            });
        }
    }
}

/// The owned parameters of an acquire statement.
struct Params {
    lock_id: i64,
    key: String,
    owner: String,
    ttl_ms: i64,
    pid: Option<i32>,
    host: String,
}

impl Params {
    fn of(request: &AcquireRequest<'_>, namespace: &str) -> Self {
        Params {
            lock_id: namespaced_key(namespace, request.key.as_str()),
            key: request.key.to_string(),
            owner: request.owner.to_string(),
            ttl_ms: millis(request.ttl),
            pid: i32::try_from(request.holder.pid).ok(),
            host: request.holder.host.clone(),
        }
    }

    async fn run(
        &self,
        conn: &Conn,
        sql: &str,
    ) -> std::result::Result<Option<i64>, tokio_postgres::Error> {
        let rows = conn
            .query_typed(
                sql,
                &[
                    (&self.lock_id, Type::INT8),
                    (&self.key, Type::TEXT),
                    (&self.owner, Type::TEXT),
                    (&self.ttl_ms, Type::INT8),
                    (&self.pid, Type::INT4),
                    (&self.host, Type::TEXT),
                ],
            )
            .await?;
        Ok(rows.first().and_then(|r| r.try_get::<_, i64>(0).ok()))
    }
}

impl PgSessionBackend {
    /// Connects, and creates the sequence and sessions table unless they exist.
    pub async fn connect(settings: Settings) -> Result<Self> {
        let admin = Shared::new(settings.config.clone(), settings.describe.clone());
        let conn = admin.get().await?;
        ensure_schema(
            &conn,
            &settings.describe,
            &settings.table,
            &settings.sequence,
            &ddl(&settings.table),
        )
        .await?;
        let namespace = fence_namespace(&conn, &settings.describe, &settings.sequence).await?;
        Ok(PgSessionBackend {
            inner: Arc::new(Inner {
                namespace,
                sql: Sql::new(&settings.table, &settings.sequence),
                describe: settings.describe,
                config: settings.config,
                admin,
                idle: Mutex::new(Vec::new()),
                held: Mutex::new(HashMap::new()),
                last_sweep: Mutex::new(Instant::now()),
            }),
        })
    }

    fn held(&self) -> MutexGuard<'_, HashMap<Owner, Held>> {
        self.inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn err(&self, err: &tokio_postgres::Error) -> Error {
        pg_error(&self.inner.describe, err)
    }

    fn lock_id(&self, key: &Key) -> i64 {
        namespaced_key(&self.inner.namespace, key.as_str())
    }

    /// An idle connection of the pool, or a new one.
    async fn take_conn(&self) -> Result<Conn> {
        loop {
            let next = self
                .inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match next {
                Some(conn) if !conn.is_closed() => return Ok(conn),
                Some(_) => continue,
                None => return Conn::open(&self.inner.config, &self.inner.describe).await,
            }
        }
    }

    /// Returns a connection that holds no lock to the pool.
    fn recycle(&self, conn: Conn) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    fn keep(&self, owner: &Owner, conn: Conn, lock_id: i64) {
        self.held().insert(
            owner.clone(),
            Held {
                conn: Arc::new(conn),
                lock_id,
            },
        );
    }

    fn maybe_sweep(&self) {
        if !super::sweep_due(&self.inner.last_sweep, SWEEP_EVERY) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            super::run_sweep(
                &this.inner.admin,
                &this.inner.sql.sweep,
                "stale holder rows",
            )
            .await;
        });
    }
}

fn opt_u32(row: &Row, index: usize) -> Option<u32> {
    row.try_get::<_, Option<i32>>(index)
        .ok()
        .flatten()
        .and_then(|p| u32::try_from(p).ok())
}

fn holder_info(mut info: LockInfo, row: &Row, first: usize) -> LockInfo {
    info.owner = row.try_get(first).ok();
    info.fence = row
        .try_get::<_, i64>(first + 1)
        .ok()
        .and_then(|f| u64::try_from(f).ok());
    info.pid = opt_u32(row, first + 2);
    info.host = row.try_get(first + 3).ok().flatten();
    info.acquired_at = row.try_get::<_, SystemTime>(first + 4).ok();
    info.renewed_at = row.try_get::<_, SystemTime>(first + 5).ok();
    info.ttl = row
        .try_get::<_, Option<i64>>(first + 6)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .map(Duration::from_millis);
    info
}

#[async_trait]
impl Backend for PgSessionBackend {
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
        self.maybe_sweep();
        let params = Params::of(&request, &self.inner.namespace);
        let conn = self.take_conn().await?;
        // If this future is dropped mid-query, `conn` is dropped with it: the connection
        // closes and the server frees anything it took.
        match params.run(&conn, &self.inner.sql.try_lock).await {
            Ok(Some(fence)) => {
                self.keep(request.owner, conn, params.lock_id);
                Ok(Attempt::Acquired {
                    fence: u64::try_from(fence).unwrap_or(0),
                })
            }
            Ok(None) => {
                self.recycle(conn);
                Ok(Attempt::Held { expires_in: None })
            }
            Err(err) => Err(self.err(&err)),
        }
    }

    async fn acquire_wait(
        &self,
        request: AcquireRequest<'_>,
        deadline: Option<Instant>,
    ) -> Result<Option<u64>> {
        self.maybe_sweep();
        let params = Params::of(&request, &self.inner.namespace);
        let lock_id = params.lock_id;
        let conn = self.take_conn().await?;
        let mut cancel = CancelOnDrop(Some(conn.cancel.clone()));
        let (tx, mut rx) = oneshot::channel::<Result<(Conn, i64)>>();
        let (sql, describe) = (
            self.inner.sql.wait_lock.clone(),
            self.inner.describe.clone(),
        );
        // The task owns the connection, so the blocking statement is never dropped
        // mid-flight. If nobody receives its result, the connection is dropped (closed),
        // which frees a lock taken too late.
        tokio::spawn(async move {
            let outcome = match params.run(&conn, &sql).await {
                Ok(Some(fence)) => Ok((conn, fence)),
                Ok(None) => Err(Error::backend(
                    &describe,
                    "the lock statement returned no fence",
                )),
                Err(err) => Err(pg_error(&describe, &err)),
            };
            let _ = tx.send(outcome);
        });
        let received = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), &mut rx).await.ok(),
            None => Some((&mut rx).await),
        };
        let received = match received {
            Some(received) => received,
            None => {
                // Deadline: take a result that raced in, else cancel (on drop) and give up.
                rx.close();
                match rx.try_recv() {
                    Ok(received) => Ok(received),
                    Err(_) => return Ok(None),
                }
            }
        };
        match received {
            Ok(Ok((conn, fence))) => {
                cancel.disarm();
                self.keep(request.owner, conn, lock_id);
                Ok(Some(u64::try_from(fence).unwrap_or(0)))
            }
            Ok(Err(err)) => {
                cancel.disarm();
                Err(err)
            }
            Err(_) => Err(Error::unavailable(
                &self.inner.describe,
                "the waiting connection's task ended",
            )),
        }
    }

    async fn renew(&self, key: &Key, owner: &Owner, ttl: Duration) -> Result<bool> {
        let Some(conn) = self.held().get(owner).map(|h| Arc::clone(&h.conn)) else {
            return Ok(false);
        };
        if conn.is_closed() {
            // The session ended: `session_ended` reports the loss with its reason.
            return Err(Error::unavailable(
                &self.inner.describe,
                "the session holding the lock ended",
            ));
        }
        let n = conn
            .execute_typed(
                &self.inner.sql.renew,
                &[
                    (&key.as_str(), Type::TEXT),
                    (&owner.as_str(), Type::TEXT),
                    (&millis(ttl), Type::INT8),
                ],
            )
            .await
            .map_err(|e| self.err(&e))?;
        Ok(n == 1)
    }

    async fn release(&self, key: &Key, owner: &Owner) -> Result<bool> {
        let Some(held) = self.held().remove(owner) else {
            return Ok(false);
        };
        if held.conn.is_closed() {
            return Ok(false);
        }
        let rows = held
            .conn
            .query_typed(
                &self.inner.sql.release,
                &[
                    (&held.lock_id, Type::INT8),
                    (&key.as_str(), Type::TEXT),
                    (&owner.as_str(), Type::TEXT),
                ],
            )
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            // The session is gone (terminated, server restarted): so is its lock.
            Err(err) if err.as_db_error().is_none() || held.conn.is_closed() => return Ok(false),
            Err(err) => return Err(self.err(&err)),
        };
        let unlocked = rows
            .first()
            .and_then(|r| r.try_get::<_, bool>(0).ok())
            .unwrap_or(false);
        if unlocked {
            if let Ok(conn) = Arc::try_unwrap(held.conn) {
                self.recycle(conn);
            }
        }
        Ok(unlocked)
    }

    async fn session_ended(&self, _key: &Key, owner: &Owner) -> String {
        let ended = self.held().get(owner).map(|h| h.conn.ended());
        match ended {
            Some(ended) => ended.await,
            None => std::future::pending().await,
        }
    }

    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let (classid, objid) = pg_locks_halves(self.lock_id(key));
        let conn = self.inner.admin.get().await?;
        let rows = conn
            .query_typed(
                &self.inner.sql.inspect,
                &[
                    (&key.as_str(), Type::TEXT),
                    (&classid, Type::OID),
                    (&objid, Type::OID),
                ],
            )
            .await
            .map_err(|e| self.err(&e))?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let server_pid = row.try_get::<_, i32>(7).unwrap_or_default();
        let client_addr: Option<String> = row.try_get(8).ok().flatten();
        let from = client_addr
            .map(|a| format!(" from {a}"))
            .unwrap_or_default();
        let info = LockInfo::new(key.as_str());
        if row.try_get::<_, Option<String>>(0).ok().flatten().is_some() {
            let mut info = holder_info(info, row, 0);
            info.note = Some(format!(
                "advisory lock held by PostgreSQL session pid {server_pid}{from}; freed when that session ends"
            ));
            Ok(Some(info))
        } else {
            let app: Option<String> = row.try_get(9).ok().flatten();
            let mut info = info;
            info.note = Some(format!(
                "advisory lock {} held by PostgreSQL session pid {server_pid}{from} (application {:?}), which is not a dlock lease on this key in this table",
                self.lock_id(key),
                app.unwrap_or_default()
            ));
            Ok(Some(info))
        }
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let conn = self.inner.admin.get().await?;
        let rows = conn
            .query_typed(&self.inner.sql.list, &[])
            .await
            .map_err(|e| self.err(&e))?;
        Ok(rows
            .iter()
            .map(|row| {
                let info = LockInfo::new(row.try_get::<_, String>(0).unwrap_or_default());
                let server_pid = row.try_get::<_, i32>(8).unwrap_or_default();
                let mut info = holder_info(info, row, 1);
                info.note = Some(format!(
                    "advisory lock held by PostgreSQL session pid {server_pid}"
                ));
                info
            })
            .collect())
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let (classid, objid) = pg_locks_halves(self.lock_id(key));
        let conn = self.inner.admin.get().await?;
        let rows = conn
            .query_typed(
                &self.inner.sql.force,
                &[
                    (&key.as_str(), Type::TEXT),
                    (&classid, Type::OID),
                    (&objid, Type::OID),
                ],
            )
            .await
            .map_err(|e| self.err(&e))?;
        let terminated = rows
            .iter()
            .any(|r| r.try_get::<_, bool>(0).unwrap_or(false));
        if terminated {
            // pg_terminate_backend only signals; wait (briefly) until the lock is free, so
            // that the old holder cannot release or renew in between.
            for _ in 0..250 {
                let still = conn
                    .query_typed(
                        &self.inner.sql.held,
                        &[(&classid, Type::OID), (&objid, Type::OID)],
                    )
                    .await
                    .map_err(|e| self.err(&e))?;
                if still.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(terminated)
    }
}
