//! `mode=lease` on MySQL/MariaDB: shared locks and semaphores as rows of a holders table.
//!
//! Every reader and permit is a row of `<table>_holders` (primary key `(k, owner)`) with
//! its own expiry on the server's clock. The key's lease row stays the key's one lock and
//! its fence counter: while readers or permits live it has the empty owner and the latest
//! of their expiries, so the exclusive statements refuse a writer unchanged, and every
//! reader or permit bumps the row's fence like a writer's takeover does.
//!
//! A reader's or permit's acquire and release are one `READ COMMITTED` transaction that
//! first locks the key's row (`SELECT … FOR UPDATE`): its later reads then see every
//! change committed before it got that lock. A release recomputes the row's expiry from
//! the holders that remain.
//!
//! Writer starvation: a writer refused by live readers writes an *intent* row (kind
//! `intent`, expiring [`INTENT`] later); readers are refused while a live intent exists,
//! and the writer is told to retry within a third of it. It goes when the writer
//! acquires (a statement only writers that left one send) or abandons.

use super::{epoch_us, micros, row_key};
use crate::core::backend::{AcquireRequest, LockKind};
use crate::error::Result;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use std::time::Duration;

/// How long a refused writer's intent keeps new readers out after its last attempt.
pub(crate) const INTENT: Duration = Duration::from_secs(2);

/// The expiry of a released row (as the lease table's).
const RELEASED: &str = "'1970-01-01 00:00:01'";

/// The holders table of the lease table `table`.
pub(crate) fn holders_table(table: &str) -> String {
    format!("{table}_holders")
}

/// The holders table's definition.
pub(crate) fn ddl(table: &str) -> String {
    let h = holders_table(table);
    format!(
        "CREATE TABLE IF NOT EXISTS {h} (
    k BINARY(32) NOT NULL,
    owner VARCHAR(64) NOT NULL,
    key_text VARBINARY(1024) NOT NULL,
    kind VARCHAR(16) NOT NULL,
    permits INT UNSIGNED NULL,
    fence BIGINT UNSIGNED NOT NULL,
    expires_at DATETIME(6) NOT NULL,
    acquired_at DATETIME(6) NOT NULL,
    renewed_at DATETIME(6) NOT NULL,
    ttl_ms BIGINT NOT NULL,
    pid INT UNSIGNED NULL,
    host VARCHAR(255) NULL,
    value TEXT NULL,
    PRIMARY KEY (k, owner)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    )
}

/// The statements of the kinds.
pub(crate) struct KindSql {
    ensure_row: String,
    lock_row: String,
    conflict: String,
    intents: String,
    permits: String,
    insert: String,
    mark_row: String,
    delete: String,
    shrink_row: String,
    pub(crate) renew_holder: String,
    pub(crate) renew_row: String,
    pub(crate) intent: String,
    pub(crate) drop_intent: String,
    pub(crate) force: String,
    pub(crate) inspect: String,
    pub(crate) list: String,
}

impl KindSql {
    pub(crate) fn new(t: &str) -> Self {
        let h = holders_table(t);
        let live = "expires_at > UTC_TIMESTAMP(6)";
        let us = |c: &str| format!("TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), {c})");
        let cols = format!(
            "key_text, owner, fence, pid, host, {}, {}, {}, ttl_ms, value, permits",
            epoch_us("acquired_at"),
            epoch_us("renewed_at"),
            epoch_us("expires_at")
        );
        KindSql {
            ensure_row: format!(
                "INSERT IGNORE INTO {t} (k, key_text, owner, fence, expires_at, acquired_at, renewed_at, ttl_ms)
VALUES (?, ?, '', ?, {RELEASED}, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 0)"
            ),
            lock_row: format!(
                "SELECT owner, fence, {} FROM {t} WHERE k = ? FOR UPDATE",
                us("expires_at")
            ),
            conflict: format!(
                "SELECT permits FROM {h} WHERE k = ? AND kind <> 'intent' AND {live} AND NOT (permits <=> ?) LIMIT 1"
            ),
            intents: format!(
                "SELECT MIN({}) FROM {h} WHERE k = ? AND kind = 'intent' AND {live}",
                us("expires_at")
            ),
            permits: format!(
                "SELECT COUNT(*), MIN({}) FROM {h} WHERE k = ? AND kind = 'semaphore' AND owner <> ? AND {live}",
                us("expires_at")
            ),
            insert: format!(
                "REPLACE INTO {h} (k, owner, key_text, kind, permits, fence, expires_at, acquired_at, renewed_at, ttl_ms, pid, host, value)
VALUES (?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), ?, ?, ?, ?)"
            ),
            // Assignments run left to right: the expiry reads the old owner.
            mark_row: format!(
                "UPDATE {t} SET fence = ?, expires_at = GREATEST(IF(owner = '', expires_at, {RELEASED}), UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND),
    owner = '' WHERE k = ?"
            ),
            delete: format!("DELETE FROM {h} WHERE k = ? AND owner = ? AND kind <> 'intent' AND {live}"),
            shrink_row: format!(
                "UPDATE {t} SET expires_at = COALESCE((SELECT MAX(expires_at) FROM {h} WHERE k = ? AND kind <> 'intent' AND {live}), {RELEASED})
WHERE k = ? AND owner = ''"
            ),
            renew_holder: format!(
                "UPDATE {h} SET renewed_at = UTC_TIMESTAMP(6), ttl_ms = ?, expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND
WHERE k = ? AND owner = ? AND kind <> 'intent' AND {live}"
            ),
            renew_row: format!(
                "UPDATE {t} SET expires_at = GREATEST(expires_at, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND) WHERE k = ? AND owner = ''"
            ),
            intent: format!(
                "INSERT INTO {h} (k, owner, key_text, kind, fence, expires_at, acquired_at, renewed_at, ttl_ms)
VALUES (?, ?, ?, 'intent', 0, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 0)
ON DUPLICATE KEY UPDATE expires_at = VALUES(expires_at)"
            ),
            drop_intent: format!("DELETE FROM {h} WHERE k = ? AND owner = ? AND kind = 'intent'"),
            force: format!("DELETE FROM {h} WHERE k = ?"),
            inspect: format!(
                "SELECT {cols} FROM {h} WHERE k = ? AND kind <> 'intent' AND {live} ORDER BY fence"
            ),
            list: format!(
                "SELECT {cols} FROM {h} WHERE kind <> 'intent' AND {live} ORDER BY key_text, fence"
            ),
        }
    }
}

/// What a reader's or permit's attempt found.
pub(crate) enum Outcome {
    /// Granted, with this fence.
    Granted(u64),
    /// Held; the time until the blocking lease ends, where known.
    Held(Option<Duration>),
}

fn wait_of(us: Option<i64>) -> Option<Duration> {
    us.filter(|us| *us > 0)
        .map(|us| Duration::from_micros(us.unsigned_abs()))
}

/// One attempt at a reader or a permit, in one transaction on `conn`; `first_fence` is
/// the fence of a key's first row. The caller rolls back (drops the connection) on error.
async fn try_kind_once(
    conn: &mut Conn,
    sql: &KindSql,
    describe: &str,
    request: &AcquireRequest<'_>,
    first_fence: u64,
) -> std::result::Result<Result<Outcome>, mysql_async::Error> {
    let key = request.key.as_str();
    let k = row_key(key);
    let permits = match request.kind {
        LockKind::Semaphore { permits } => Some(permits),
        _ => None,
    };
    conn.query_drop("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .await?;
    conn.query_drop("START TRANSACTION").await?;
    // The exclusive lock first: an `INSERT IGNORE` of an existing row would take a shared
    // lock that two transactions could then both try to upgrade (a deadlock).
    let mut row: Option<(String, u64, Option<i64>)> = conn
        .exec_first(sql.lock_row.as_str(), (k.as_slice(),))
        .await?;
    if row.is_none() {
        conn.exec_drop(
            sql.ensure_row.as_str(),
            (k.as_slice(), key.as_bytes(), first_fence.saturating_sub(1)),
        )
        .await?;
        row = conn
            .exec_first(sql.lock_row.as_str(), (k.as_slice(),))
            .await?;
    }
    let Some((owner, fence, left)) = row else {
        conn.query_drop("ROLLBACK").await?;
        return Ok(Ok(Outcome::Held(None)));
    };
    if !owner.is_empty() && left.is_some_and(|us| us > 0) {
        return held(conn, left).await;
    }
    let other: Option<Option<u32>> = conn
        .exec_first(sql.conflict.as_str(), (k.as_slice(), permits))
        .await?;
    if let Some(held_with) = other {
        conn.query_drop("ROLLBACK").await?;
        let held = match held_with {
            Some(permits) => LockKind::Semaphore { permits },
            None => LockKind::Shared,
        };
        return Ok(Err(crate::backends::sql_session::kind_conflict(
            describe,
            key,
            held,
            request.kind,
        )));
    }
    match permits {
        None => {
            let intent: Option<Option<i64>> = conn
                .exec_first(sql.intents.as_str(), (k.as_slice(),))
                .await?;
            if let Some(Some(us)) = intent {
                return held(conn, Some(us)).await;
            }
        }
        Some(permits) => {
            let taken: Option<(u64, Option<i64>)> = conn
                .exec_first(sql.permits.as_str(), (k.as_slice(), request.owner.as_str()))
                .await?;
            if let Some((n, first)) = taken {
                if n >= u64::from(permits) {
                    return held(conn, first).await;
                }
            }
        }
    }
    let fence = fence + 1;
    let kind = if permits.is_some() {
        "semaphore"
    } else {
        "shared"
    };
    conn.exec_drop(
        sql.insert.as_str(),
        (
            k.as_slice(),
            request.owner.as_str(),
            key.as_bytes(),
            kind,
            permits,
            fence,
            micros(request.ttl),
            super::millis(request.ttl),
            request.holder.pid,
            request.holder.host.as_str(),
            request.holder.value.as_deref(),
        ),
    )
    .await?;
    conn.exec_drop(
        sql.mark_row.as_str(),
        (fence, micros(request.ttl), k.as_slice()),
    )
    .await?;
    conn.query_drop("COMMIT").await?;
    Ok(Ok(Outcome::Granted(fence)))
}

/// A reader's or permit's release, in one transaction: `true` if it was live.
async fn release_once(
    conn: &mut Conn,
    sql: &KindSql,
    key: &str,
    owner: &str,
) -> std::result::Result<bool, mysql_async::Error> {
    let k = row_key(key);
    conn.query_drop("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .await?;
    conn.query_drop("START TRANSACTION").await?;
    let _: Option<(String, u64, Option<i64>)> = conn
        .exec_first(sql.lock_row.as_str(), (k.as_slice(),))
        .await?;
    conn.exec_drop(sql.delete.as_str(), (k.as_slice(), owner))
        .await?;
    let live = conn.affected_rows() == 1;
    conn.exec_drop(sql.drop_intent.as_str(), (k.as_slice(), owner))
        .await?;
    conn.exec_drop(sql.shrink_row.as_str(), (k.as_slice(), k.as_slice()))
        .await?;
    conn.query_drop("COMMIT").await?;
    Ok(live)
}

async fn held(
    conn: &mut Conn,
    wait: Option<i64>,
) -> std::result::Result<Result<Outcome>, mysql_async::Error> {
    conn.query_drop("ROLLBACK").await?;
    Ok(Ok(Outcome::Held(wait_of(wait))))
}

/// InnoDB's deadlock: the server rolled the transaction back, and it may be run again.
const ER_LOCK_DEADLOCK: u16 = 1213;
/// How often a transaction the server chose as a deadlock's victim is run again.
const DEADLOCK_RETRIES: usize = 5;

fn is_deadlock(err: &mysql_async::Error) -> bool {
    matches!(err, mysql_async::Error::Server(e) if e.code == ER_LOCK_DEADLOCK)
}

/// [`try_kind_once`], run again when the server chose it as a deadlock's victim.
pub(crate) async fn try_kind(
    conn: &mut Conn,
    sql: &KindSql,
    describe: &str,
    request: &AcquireRequest<'_>,
    first_fence: u64,
) -> std::result::Result<Result<Outcome>, mysql_async::Error> {
    let mut tries = 0;
    loop {
        match try_kind_once(conn, sql, describe, request, first_fence).await {
            Err(err) if is_deadlock(&err) && tries < DEADLOCK_RETRIES => tries += 1,
            other => return other,
        }
    }
}

/// [`release_once`], run again when the server chose it as a deadlock's victim.
pub(crate) async fn release(
    conn: &mut Conn,
    sql: &KindSql,
    key: &str,
    owner: &str,
) -> std::result::Result<bool, mysql_async::Error> {
    let mut tries = 0;
    loop {
        match release_once(conn, sql, key, owner).await {
            Err(err) if is_deadlock(&err) && tries < DEADLOCK_RETRIES => tries += 1,
            other => return other,
        }
    }
}
