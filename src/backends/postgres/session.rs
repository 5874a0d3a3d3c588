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
//! The sessions table and its holders table are `UNLOGGED`: a row describes a session,
//! which a server crash ends anyway, and a write to an unlogged table makes no WAL, so
//! acquire and release commit without waiting for a WAL flush (which was most of their
//! cost). The fence needs no table: the sequence's own WAL record, written every 32
//! values and flushed by the commit of the statement that wrote it, keeps fences
//! increasing over a crash. Tables created by an earlier version stay logged until an
//! administrator runs `ALTER TABLE … SET UNLOGGED` (docs/backends/postgres.md).
//!
//! Waiting happens in the server's lock queue, bounded on the server too: the wait runs
//! with `lock_timeout` and `statement_timeout` set to the time left before the caller's
//! deadline (none for a wait without limit), so a wait whose cancel request is lost
//! (network down) still ends. Pool, waiting task, cancellation of an abandoned wait
//! (the protocol's cancel request) and loss detection are the shared session engine's
//! ([`crate::backends::sql_session`]); this module is PostgreSQL's dialect of it. The
//! end of a lease's connection task is its loss signal: it needs no lock the renewal
//! holds.

use super::keys::{namespaced_key, pg_locks_halves};
use super::session_kinds::{self, KindSql};
use super::{ensure_schema, fence_namespace, millis, pg_error, Conn, Settings, Shared};
use crate::backends::sql_session::{BoxFuture, Claim, Dialect, Held, Liveness, SessionLocks};
use crate::backends::sql_sweep::SweepClock;
use crate::core::backend::{LockInfo, LockKind};
use crate::error::{Error, Result};
use crate::key::Key;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::types::Type;
use tokio_postgres::{CancelToken, Config, Row};

const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// The most renewals of a shared session sent as one statement. A connection keeps
/// buffers as large as the largest statement it sent and answer it read, for its whole
/// life: 32 leases keep them near 4 KB, where a session's 128 at once grew them to about
/// 16 KB each, which on 10,000 held leases was 1 MB more of memory for no fewer writes.
const RENEW_CHUNK: usize = 32;

/// The sessions table's definition, and its holders table's (readers, permits).
pub(crate) fn ddl(table: &str) -> String {
    let holders = session_kinds::ddl(&session_kinds::holders_table(table));
    format!(
        "CREATE UNLOGGED TABLE IF NOT EXISTS {table} (
    key text PRIMARY KEY,
    lock_id bigint NOT NULL,
    owner text NOT NULL,
    fence bigint NOT NULL,
    backend_pid integer NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at timestamptz NOT NULL,
    ttl_ms bigint,
    pid integer,
    host text,
    value text
);
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS value text;
{holders}"
    )
}

struct Sql {
    try_lock: String,
    wait_lock: String,
    renew: String,
    renew_many: String,
    release: String,
    inspect: String,
    list: String,
    force: String,
    held: String,
    sweep: String,
    kinds: KindSql,
}

const LOCK_MATCH: &str = "l.locktype = 'advisory' AND l.granted AND l.objsubid = 1";

impl Sql {
    fn new(t: &str, seq: &str) -> Self {
        let upsert = |lock: &str, filter: &str| {
            format!(
                "WITH l AS (SELECT {lock})
INSERT INTO {t} AS h (key, lock_id, owner, fence, backend_pid, acquired_at, renewed_at, ttl_ms, pid, host, value)
SELECT $2, $1, $3, nextval('{seq}'), pg_backend_pid(), clock_timestamp(), clock_timestamp(), $4, $5, $6, $7 FROM l {filter}
ON CONFLICT (key) DO UPDATE SET lock_id = excluded.lock_id, owner = excluded.owner, fence = excluded.fence,
    backend_pid = excluded.backend_pid, acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at,
    ttl_ms = excluded.ttl_ms, pid = excluded.pid, host = excluded.host, value = excluded.value
RETURNING fence, backend_pid"
            )
        };
        let this_db =
            "l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";
        let kinds = KindSql::new(&session_kinds::holders_table(t), seq, LOCK_MATCH);
        let row_lock = "l.pid = h.backend_pid AND l.classid = ((h.lock_id >> 32) & 4294967295)::oid AND l.objid = (h.lock_id & 4294967295)::oid";
        Sql {
            try_lock: upsert("pg_try_advisory_lock($1) AS got", "WHERE l.got"),
            wait_lock: upsert("pg_advisory_lock($1)", ""),
            renew: format!(
                "UPDATE {t} SET renewed_at = clock_timestamp(), ttl_ms = $3
 WHERE key = $1 AND owner = $2 AND backend_pid = pg_backend_pid()"
            ),
            renew_many: format!(
                "UPDATE {t} AS h SET renewed_at = clock_timestamp(), ttl_ms = b.ttl
 FROM unnest($1::text[], $2::text[], $3::int8[]) AS b(key, owner, ttl)
 WHERE h.key = b.key AND h.owner = b.owner AND h.backend_pid = pg_backend_pid()
 RETURNING h.key"
            ),
            release: format!(
                "WITH d AS (DELETE FROM {t} WHERE key = $2 AND owner = $3 AND backend_pid = pg_backend_pid() RETURNING 1)
SELECT pg_advisory_unlock($1), (SELECT count(*) FROM d)"
            ),
            inspect: format!(
                "SELECT h.owner, h.fence, h.pid, h.host, h.acquired_at, h.renewed_at, h.ttl_ms, l.pid,
       host(a.client_addr), a.application_name, h.value
FROM pg_locks l
LEFT JOIN {t} h ON h.key = $1 AND h.backend_pid = l.pid
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE {LOCK_MATCH} AND {this_db} AND l.classid = $2 AND l.objid = $3"
            ),
            list: format!(
                "SELECT h.key, h.owner, h.fence, h.pid, h.host, h.acquired_at, h.renewed_at, h.ttl_ms, l.pid, h.value
FROM {t} h JOIN pg_locks l ON {LOCK_MATCH} AND {row_lock}
ORDER BY h.key"
            ),
            force: format!(
                "WITH d AS (DELETE FROM {t} WHERE key = $1 AND backend_pid = $2), r AS ({})
SELECT pg_terminate_backend($2)",
                kinds.force
            ),
            held: format!(
                "SELECT l.pid FROM pg_locks l WHERE {LOCK_MATCH} AND {this_db} AND l.classid = $1 AND l.objid = $2"
            ),
            sweep: format!(
                "WITH r AS ({}) DELETE FROM {t} h WHERE NOT EXISTS (SELECT 1 FROM pg_locks l WHERE {LOCK_MATCH} AND {row_lock})",
                kinds.sweep
            ),
            kinds,
        }
    }
}

/// The statements of one uncontended acquire and its release (see
/// [`super::bench_statements`]).
pub(super) fn bench_statements(table: &str, sequence: &str) -> Vec<(&'static str, String)> {
    let Sql {
        try_lock, release, ..
    } = Sql::new(table, sequence);
    // A plain lock publishes no value.
    let try_lock = try_lock.replace("$7", "NULL::text");
    vec![("acquire", try_lock), ("release", release)]
}

/// PostgreSQL's half of the session engine.
pub(crate) struct PgSession {
    describe: String,
    /// The schema-qualified fence sequence, which namespaces the advisory keys.
    namespace: String,
    config: Config,
    tls: super::PgTls,
    sql: Arc<Sql>,
    admin: Arc<Shared>,
    sweeps: SweepClock,
}

/// The PostgreSQL advisory-lock backend (`?mode=session`, the default).
pub(crate) type PgSessionBackend = SessionLocks<PgSession>;

/// Connects, and creates the sequence and sessions table unless they exist.
pub(crate) async fn connect(settings: Settings) -> Result<PgSessionBackend> {
    let admin = Arc::new(Shared::new(
        settings.config.clone(),
        settings.tls.clone(),
        settings.describe.clone(),
    ));
    let conn = admin.get().await?;
    // The holders table is the newest part: a schema without it predates the kinds and
    // the `value` column, which the script adds.
    ensure_schema(
        &conn,
        &settings.describe,
        &session_kinds::holders_table(&settings.table),
        &settings.sequence,
        &ddl(&settings.table),
    )
    .await?;
    let namespace = fence_namespace(&conn, &settings.describe, &settings.sequence).await?;
    let shared_sessions = settings.shared_sessions;
    Ok(SessionLocks::new(
        PgSession {
            namespace,
            sql: Arc::new(Sql::new(&settings.table, &settings.sequence)),
            describe: settings.describe,
            config: settings.config,
            tls: settings.tls,
            admin,
            sweeps: SweepClock::new(SWEEP_EVERY, false),
        },
        shared_sessions,
    ))
}

/// SQLSTATE `lock_not_available`: `lock_timeout` ran out.
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// SQLSTATE `query_canceled`: the cancel request or `statement_timeout`.
const QUERY_CANCELED: &str = "57014";

/// The parameters of an acquire statement, in the order the statements take them.
/// A semaphore's statement also takes `$8` permits and `$9` the slot ids.
fn run_params<'a>(
    claim: &'a Claim<i64>,
    owned: &'a Owned<'a>,
) -> Vec<(&'a (dyn tokio_postgres::types::ToSql + Sync), Type)> {
    let mut params: Vec<(&'a (dyn tokio_postgres::types::ToSql + Sync), Type)> = vec![
        (&claim.lock, Type::INT8),
        (&owned.key, Type::TEXT),
        (&owned.owner, Type::TEXT),
        (&owned.ttl_ms, Type::INT8),
        (&owned.pid, Type::INT4),
        (&owned.host, Type::TEXT),
        (&owned.value, Type::TEXT),
    ];
    if let Some((permits, slots)) = &owned.permits {
        params.push((permits, Type::INT4));
        params.push((slots, Type::INT8_ARRAY));
    }
    params
}

/// The values of a claim in the types the statements take.
struct Owned<'a> {
    key: &'a str,
    owner: &'a str,
    host: &'a str,
    value: Option<&'a str>,
    ttl_ms: i64,
    pid: Option<i32>,
    /// A semaphore's permits and slot ids.
    permits: Option<(i32, Vec<i64>)>,
}

/// What an acquire statement answered.
enum Answer {
    /// Granted, with this fence.
    Granted(u64),
    /// Held by others of the same kind (or a writer): wait.
    Held,
    /// Held by live holders of another kind or permit count.
    Conflict(LockKind),
}

fn is_code(err: &tokio_postgres::Error, code: &str) -> bool {
    err.as_db_error().is_some_and(|db| db.code().code() == code)
}

impl PgSession {
    fn maybe_sweep(&self) {
        if !self.sweeps.due() {
            return;
        }
        let (admin, sql) = (Arc::clone(&self.admin), Arc::clone(&self.sql));
        tokio::spawn(async move {
            super::run_sweep(&admin, &sql.sweep, "stale holder rows").await;
        });
    }

    fn owned<'a>(&self, claim: &'a Claim<i64>) -> Result<Owned<'a>> {
        let permits = match claim.kind {
            LockKind::Semaphore { permits } => Some((
                session_kinds::permits_param(&self.describe, permits)?,
                session_kinds::slot_ids(&self.namespace, claim.key.as_str(), permits),
            )),
            _ => None,
        };
        Ok(Owned {
            key: claim.key.as_str(),
            owner: claim.owner.as_str(),
            host: &claim.host,
            value: claim.value.as_deref(),
            ttl_ms: millis(claim.ttl),
            pid: i32::try_from(claim.pid).ok(),
            permits,
        })
    }

    /// The acquire statement of `claim`'s kind (a semaphore never waits in the queue).
    fn lock_sql(&self, claim: &Claim<i64>, wait: bool) -> &str {
        match (claim.kind, wait) {
            (LockKind::Shared, false) => &self.sql.kinds.try_shared,
            (LockKind::Shared, true) => &self.sql.kinds.wait_shared,
            (LockKind::Semaphore { .. }, _) => &self.sql.kinds.try_permit,
            (_, false) => &self.sql.try_lock,
            (_, true) => &self.sql.wait_lock,
        }
    }

    async fn lock_with(
        &self,
        conn: &Conn,
        claim: &Claim<i64>,
        wait: bool,
    ) -> Result<Result<Answer, tokio_postgres::Error>> {
        let owned = self.owned(claim)?;
        let sql = self.lock_sql(claim, wait);
        let rows = match conn.query_typed(sql, &run_params(claim, &owned)).await {
            Ok(rows) => rows,
            Err(err) => return Ok(Err(err)),
        };
        let Some(row) = rows.first() else {
            return Ok(Ok(Answer::Held));
        };
        if let Ok(Some(pid)) = row.try_get::<_, Option<i32>>(1) {
            conn.set_backend_pid(pid);
        }
        if let Ok(Some(fence)) = row.try_get::<_, Option<i64>>(0) {
            return Ok(Ok(Answer::Granted(u64::try_from(fence).unwrap_or(0))));
        }
        // The kinds' statements count the live holders of another kind or count.
        if row.try_get::<_, i64>(2).unwrap_or(0) > 0 {
            let held = session_kinds::kind_of(row.try_get::<_, Option<i32>>(3).ok().flatten());
            return Ok(Ok(Answer::Conflict(held)));
        }
        Ok(Ok(Answer::Held))
    }

    /// A fence, `None` for held, or the typed error of a conflict of kinds.
    fn settle(&self, claim: &Claim<i64>, answer: Answer) -> Result<Option<u64>> {
        match answer {
            Answer::Granted(fence) => Ok(Some(fence)),
            Answer::Held => Ok(None),
            Answer::Conflict(held) => Err(session_kinds::conflict(
                &self.describe,
                claim.key.as_str(),
                held,
                claim.kind,
            )),
        }
    }

    /// One statement renewing `leases` (at most [`RENEW_CHUNK`]), each row still checked
    /// against its owner and this session: for each, whether it was renewed.
    async fn renew_chunk(
        &self,
        conn: &Conn,
        leases: &[(Held<i64>, Duration)],
    ) -> Result<Vec<bool>> {
        let keys: Vec<&str> = leases.iter().map(|(h, _)| h.key.as_str()).collect();
        let owners: Vec<&str> = leases.iter().map(|(h, _)| h.owner.as_str()).collect();
        let ttls: Vec<i64> = leases.iter().map(|(_, ttl)| millis(*ttl)).collect();
        let rows = conn
            .query_typed(
                &self.sql.renew_many,
                &[
                    (&keys, Type::TEXT_ARRAY),
                    (&owners, Type::TEXT_ARRAY),
                    (&ttls, Type::INT8_ARRAY),
                ],
            )
            .await
            .map_err(|e| pg_error(&self.describe, e))?;
        // The key is the table's primary key, and a session holds a key once.
        let renewed: std::collections::HashSet<&str> = rows
            .iter()
            .filter_map(|row| row.try_get::<_, &str>(0).ok())
            .collect();
        Ok(keys.iter().map(|key| renewed.contains(key)).collect())
    }

    async fn admin_rows(
        &self,
        sql: &str,
        params: &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)],
    ) -> Result<Vec<Row>> {
        let conn = self.admin.get().await?;
        conn.query_typed(sql, params)
            .await
            .map_err(|e| pg_error(&self.describe, e))
    }
}

#[async_trait]
impl Dialect for PgSession {
    type Conn = Conn;
    type Lock = i64;
    type Interrupt = CancelToken;

    fn describe(&self) -> &str {
        &self.describe
    }

    fn lock_of(&self, key: &Key) -> i64 {
        namespaced_key(&self.namespace, key.as_str())
    }

    fn kinds(&self) -> bool {
        true
    }

    fn waits_in_queue(&self, kind: LockKind) -> bool {
        matches!(kind, LockKind::Exclusive | LockKind::Shared)
    }

    async fn connect(&self) -> Result<Conn> {
        Conn::open(&self.config, &self.tls, &self.describe).await
    }

    fn is_closed(&self, conn: &Conn) -> bool {
        conn.is_closed()
    }

    async fn ping(&self, conn: &mut Conn) -> Result<()> {
        conn.client
            .simple_query("")
            .await
            .map(drop)
            .map_err(|e| pg_error(&self.describe, e))
    }

    fn session_id(&self, conn: &Conn) -> u64 {
        u64::from(conn.backend_pid())
    }

    async fn try_lock(&self, conn: &mut Conn, claim: &Claim<i64>) -> Result<Option<u64>> {
        self.maybe_sweep();
        let answer = self
            .lock_with(conn, claim, false)
            .await?
            .map_err(|e| pg_error(&self.describe, e))?;
        self.settle(claim, answer)
    }

    async fn wait_lock(&self, conn: &mut Conn, claim: &Claim<i64>) -> Result<Option<u64>> {
        let deadline = claim.deadline;
        self.maybe_sweep();
        // The server ends the wait by itself at the deadline, and the statement's other
        // work stays bounded; "0" (no limit) for a wait without one.
        let limit = deadline.map_or_else(
            || "0".to_owned(),
            |d| {
                millis(d.saturating_duration_since(Instant::now()))
                    .max(1)
                    .to_string()
            },
        );
        let set = conn
            .query_typed(
                "SELECT set_config('lock_timeout', $1, false), set_config('statement_timeout', $1, false)",
                &[(&limit, Type::TEXT)],
            )
            .await;
        let waited = match set {
            Ok(_) => self.lock_with(conn, claim, true).await?,
            Err(err) => Err(err),
        };
        match waited {
            Ok(Answer::Granted(fence)) => {
                // Back to the connection's defaults for the renewals and the release.
                conn.client
                    .batch_execute("RESET lock_timeout; RESET statement_timeout")
                    .await
                    .map_err(|e| pg_error(&self.describe, e))?;
                Ok(Some(fence))
            }
            Ok(Answer::Held) => Err(Error::backend(
                &self.describe,
                "the lock statement returned no fence",
            )),
            Ok(conflict @ Answer::Conflict(_)) => self.settle(claim, conflict),
            Err(err)
                if deadline.is_some()
                    && (is_code(&err, LOCK_NOT_AVAILABLE) || is_code(&err, QUERY_CANCELED)) =>
            {
                Ok(None)
            }
            Err(err) => Err(pg_error(&self.describe, err)),
        }
    }

    fn interrupter(&self, conn: &Conn) -> CancelToken {
        conn.cancel.clone()
    }

    async fn interrupt(&self, token: CancelToken) {
        if let Err(err) = token.cancel_query(self.tls.connector()).await {
            tracing::debug!(err = %super::detail(&err), "cancelling an abandoned wait failed; its connection is closed anyway");
        }
    }

    async fn renew(&self, conn: &mut Conn, held: &Held<i64>, ttl: Duration) -> Result<bool> {
        let key = held.key.as_str();
        let sql = match held.kind {
            LockKind::Exclusive => &self.sql.renew,
            _ => &self.sql.kinds.renew,
        };
        let n = conn
            .execute_typed(
                sql,
                &[
                    (&key, Type::TEXT),
                    (&held.owner.as_str(), Type::TEXT),
                    (&millis(ttl), Type::INT8),
                ],
            )
            .await
            .map_err(|e| pg_error(&self.describe, e))?;
        Ok(n == 1)
    }

    async fn renew_many(
        &self,
        conn: &mut Conn,
        leases: &[(Held<i64>, Duration)],
    ) -> Result<Vec<bool>> {
        // A shared session holds exclusive locks only; anything else goes one by one.
        if leases.len() == 1 || leases.iter().any(|(h, _)| h.kind != LockKind::Exclusive) {
            let mut renewed = Vec::with_capacity(leases.len());
            for (lease, ttl) in leases {
                renewed.push(self.renew(conn, lease, *ttl).await?);
            }
            return Ok(renewed);
        }
        let mut renewed = Vec::with_capacity(leases.len());
        for chunk in leases.chunks(RENEW_CHUNK) {
            renewed.extend(self.renew_chunk(conn, chunk).await?);
        }
        Ok(renewed)
    }

    async fn unlock(&self, conn: &mut Conn, held: &Held<i64>) -> Result<bool> {
        let key = held.key.as_str();
        if held.kind != LockKind::Exclusive {
            let rows = conn
                .query_typed(
                    &self.sql.kinds.release,
                    &[
                        (&held.lock, Type::INT8),
                        (&key, Type::TEXT),
                        (&held.owner.as_str(), Type::TEXT),
                    ],
                )
                .await
                .map_err(|e| pg_error(&self.describe, e))?;
            let row = rows.first();
            let deleted = row.and_then(|r| r.try_get::<_, i64>(0).ok()) == Some(1);
            let unlocked = row.and_then(|r| r.try_get::<_, bool>(1).ok()) == Some(true);
            return Ok(deleted && unlocked);
        }
        let rows = conn
            .query_typed(
                &self.sql.release,
                &[
                    (&held.lock, Type::INT8),
                    (&key, Type::TEXT),
                    (&held.owner.as_str(), Type::TEXT),
                ],
            )
            .await
            .map_err(|e| pg_error(&self.describe, e))?;
        Ok(rows
            .first()
            .and_then(|r| r.try_get::<_, bool>(0).ok())
            .unwrap_or(false))
    }

    fn end_signal(&self, conn: &Conn) -> Option<BoxFuture<String>> {
        Some(Box::pin(conn.ended()))
    }

    async fn check(&self, lock: &i64, id: u64) -> Liveness {
        let (classid, objid) = pg_locks_halves(*lock);
        match self
            .admin_rows(
                &self.sql.held,
                &[(&classid, Type::OID), (&objid, Type::OID)],
            )
            .await
        {
            Ok(rows)
                if rows.iter().any(|r| {
                    r.try_get::<_, i32>(0)
                        .ok()
                        .and_then(|p| u64::try_from(p).ok())
                        == Some(id)
                }) =>
            {
                Liveness::Holding
            }
            Ok(_) => Liveness::Gone(format!(
                "session pid {id} no longer holds the advisory lock"
            )),
            Err(_) => Liveness::Unknown,
        }
    }

    async fn holders(&self, key: &Key) -> Result<Vec<u64>> {
        let (classid, objid) = pg_locks_halves(self.lock_of(key));
        let rows = self
            .admin_rows(
                &self.sql.held,
                &[(&classid, Type::OID), (&objid, Type::OID)],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<_, i32>(0).ok())
            .filter_map(|pid| u64::try_from(pid).ok())
            .collect())
    }

    async fn end_session(&self, key: &Key, id: u64) -> Result<()> {
        let pid = i32::try_from(id).unwrap_or_default();
        self.admin_rows(
            &self.sql.force,
            &[(&key.as_str(), Type::TEXT), (&pid, Type::INT4)],
        )
        .await
        .map(drop)
    }

    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let rows = self
            .admin_rows(&self.sql.kinds.inspect, &[(&key.as_str(), Type::TEXT)])
            .await?;
        if let Some(info) = shared_info(key.as_str(), &rows, 0) {
            return Ok(Some(info));
        }
        let (classid, objid) = pg_locks_halves(self.lock_of(key));
        let rows = self
            .admin_rows(
                &self.sql.inspect,
                &[
                    (&key.as_str(), Type::TEXT),
                    (&classid, Type::OID),
                    (&objid, Type::OID),
                ],
            )
            .await?;
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
            info.value = row.try_get(10).ok().flatten();
            info.note = Some(format!(
                "advisory lock held by PostgreSQL session pid {server_pid}{from}; freed when that session ends"
            ));
            Ok(Some(info))
        } else {
            let app: Option<String> = row.try_get(9).ok().flatten();
            let mut info = info;
            info.note = Some(format!(
                "advisory lock {} held by PostgreSQL session pid {server_pid}{from} (application {:?}), which is not a dlock lease on this key in this table",
                self.lock_of(key),
                app.unwrap_or_default()
            ));
            Ok(Some(info))
        }
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let rows = self.admin_rows(&self.sql.list, &[]).await?;
        let mut all: Vec<LockInfo> = rows
            .iter()
            .map(|row| {
                let info = LockInfo::new(row.try_get::<_, String>(0).unwrap_or_default());
                let server_pid = row.try_get::<_, i32>(8).unwrap_or_default();
                let mut info = holder_info(info, row, 1);
                info.value = row.try_get(9).ok().flatten();
                info.note = Some(format!(
                    "advisory lock held by PostgreSQL session pid {server_pid}"
                ));
                info
            })
            .collect();
        let rows = self.admin_rows(&self.sql.kinds.list, &[]).await?;
        // Rows come ordered by key: one record per run of a key.
        let mut start = 0;
        while start < rows.len() {
            let key: String = rows[start].try_get(0).unwrap_or_default();
            let end = rows[start..]
                .iter()
                .position(|r| r.try_get::<_, String>(0).ok().as_deref() != Some(key.as_str()))
                .map_or(rows.len(), |n| start + n);
            all.extend(shared_info(&key, &rows[start..end], 1));
            start = end;
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }
}
/// The record of a key held by readers or permits: the holders rows of the kinds'
/// `inspect` (or `list`, whose columns start one later, after the key).
fn shared_info(key: &str, rows: &[Row], first: usize) -> Option<LockInfo> {
    let row = rows.first()?;
    let kind = session_kinds::kind_of(row.try_get::<_, Option<i32>>(first + 7).ok().flatten());
    let holders = rows
        .iter()
        .map(|row| {
            let mut info = holder_info(LockInfo::new(key), row, first);
            info.value = row.try_get(first + 8).ok().flatten();
            let server_pid = row.try_get::<_, i32>(first + 9).unwrap_or_default();
            info.note = Some(format!(
                "advisory lock held by PostgreSQL session pid {server_pid}; freed when that session ends"
            ));
            info
        })
        .collect();
    Some(LockInfo::of_holders(key, kind, holders))
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
