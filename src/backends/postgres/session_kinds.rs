//! `mode=session`: shared locks and semaphores on advisory locks.
//!
//! * A reader takes the key's advisory lock in shared mode (`pg_try_advisory_lock_shared`,
//!   or `pg_advisory_lock_shared` for a wait), the very lock a writer takes exclusively:
//!   readers share it and a writer excludes them at the server. PostgreSQL's lock queue
//!   is FIFO and a new request that conflicts with a queued one waits behind it, so a
//!   queued writer holds every later reader back (no intent record is needed).
//! * Permit `i` of a semaphore is an exclusive advisory lock on a slot id of its own,
//!   derived from `(key, i)` in the handle's namespace ([`slot_ids`]); every permit
//!   holder also holds the key's lock in shared mode, which keeps writers out.
//!
//! Each reader or permit has a row in the holders table (`<table>_holders`, primary key
//! `(key, owner)`) with its fence, its session's pid and its permit count (`NULL` for a
//! reader): the record `status` shows, and what a request with another count or kind is
//! checked against. A row counts only while its session still holds the advisory lock it
//! names (`pg_locks`), so a dead session's permit is free at once, whatever its row says.

use super::keys::namespaced_key;
use crate::core::backend::LockKind;
use crate::error::{Error, Result};

/// The holders table of the sessions table `table`.
pub(crate) fn holders_table(table: &str) -> String {
    format!("{table}_holders")
}

/// The holders table's definition.
pub(crate) fn ddl(h: &str) -> String {
    format!(
        "CREATE UNLOGGED TABLE IF NOT EXISTS {h} (
    key text NOT NULL,
    owner text NOT NULL,
    permits integer,
    lock_id bigint NOT NULL,
    fence bigint NOT NULL,
    backend_pid integer NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at timestamptz NOT NULL,
    ttl_ms bigint,
    pid integer,
    host text,
    value text,
    PRIMARY KEY (key, owner)
);"
    )
}

/// The advisory ids of permits `0..permits` of `key`: a NUL byte never occurs in a key,
/// so no slot id hashes like a key's own lock.
pub(crate) fn slot_ids(namespace: &str, key: &str, permits: u32) -> Vec<i64> {
    (0..permits)
        .map(|i| namespaced_key(namespace, &format!("{key}\0permit {i}")))
        .collect()
}

/// True while row `h`'s session holds the advisory lock the row names.
fn live(lock_match: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM pg_locks l WHERE {lock_match} AND l.pid = h.backend_pid
    AND l.classid = ((h.lock_id >> 32) & 4294967295)::oid AND l.objid = (h.lock_id & 4294967295)::oid)"
    )
}

/// The statements of readers and permits. Parameters of the acquires: `$1` the key's
/// lock id, `$2` key, `$3` owner, `$4` TTL ms, `$5` pid, `$6` host, `$7` value; a
/// semaphore's also `$8` permits and `$9` the slot ids. Each returns one row: the fence
/// (`NULL`: not granted), the session's pid, how many live holders of another kind or
/// count there are, and the count of one of them.
pub(crate) struct KindSql {
    pub(crate) try_shared: String,
    pub(crate) wait_shared: String,
    pub(crate) try_permit: String,
    pub(crate) renew: String,
    pub(crate) release: String,
    pub(crate) inspect: String,
    pub(crate) list: String,
    pub(crate) force: String,
    pub(crate) sweep: String,
}

impl KindSql {
    pub(crate) fn new(h: &str, seq: &str, lock_match: &str) -> Self {
        let live = live(lock_match);
        let insert = |permits: &str, lock: &str, from: &str| {
            format!(
                "ins AS (INSERT INTO {h} AS h (key, owner, permits, lock_id, fence, backend_pid, acquired_at, renewed_at, ttl_ms, pid, host, value)
SELECT $2, $3, {permits}, {lock}, nextval('{seq}'), pg_backend_pid(), clock_timestamp(), clock_timestamp(), $4, $5, $6, $7 FROM {from}
ON CONFLICT (key, owner) DO UPDATE SET permits = excluded.permits, lock_id = excluded.lock_id, fence = excluded.fence,
    backend_pid = excluded.backend_pid, acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at,
    ttl_ms = excluded.ttl_ms, pid = excluded.pid, host = excluded.host, value = excluded.value
RETURNING fence, backend_pid)"
            )
        };
        // Readers check for live permits first; the check gates the lock (a one-time
        // filter), so a refused reader takes nothing.
        let shared = |lock: &str| {
            format!(
                "WITH other AS (SELECT h.permits FROM {h} h WHERE h.key = $2 AND h.permits IS NOT NULL AND {live} LIMIT 1),
l AS (SELECT {lock} AS got WHERE NOT EXISTS (SELECT 1 FROM other)),
{ins}
SELECT (SELECT fence FROM ins), (SELECT backend_pid FROM ins), (SELECT count(*) FROM other), (SELECT permits FROM other)",
                ins = insert("NULL::integer", "$1", "l WHERE l.got"),
            )
        };
        KindSql {
            try_shared: shared("pg_try_advisory_lock_shared($1)"),
            wait_shared: shared("pg_advisory_lock_shared($1)::text IS NOT NULL"),
            // The key's shared lock, then the first free slot; the key's lock is given
            // back when no slot was free. A slot is tried only once the key's lock is
            // held (the CASE), so a refused permit takes nothing.
            try_permit: format!(
                "WITH other AS (SELECT h.permits FROM {h} h WHERE h.key = $2 AND h.permits IS DISTINCT FROM $8 AND {live} LIMIT 1),
k AS (SELECT pg_try_advisory_lock_shared($1) AS got WHERE NOT EXISTS (SELECT 1 FROM other)),
s AS (SELECT u.id FROM k, unnest($9::bigint[]) AS u(id) WHERE CASE WHEN k.got THEN pg_try_advisory_lock(u.id) ELSE false END LIMIT 1),
undo AS (SELECT pg_advisory_unlock_shared($1) FROM k WHERE k.got AND NOT EXISTS (SELECT 1 FROM s)),
{ins}
SELECT (SELECT fence FROM ins), (SELECT backend_pid FROM ins), (SELECT count(*) FROM other), (SELECT permits FROM other), (SELECT count(*) FROM undo)",
                ins = insert("$8", "s.id", "s"),
            ),
            renew: format!(
                "UPDATE {h} SET renewed_at = clock_timestamp(), ttl_ms = $3
 WHERE key = $1 AND owner = $2 AND backend_pid = pg_backend_pid()"
            ),
            release: format!(
                "WITH d AS (DELETE FROM {h} WHERE key = $2 AND owner = $3 AND backend_pid = pg_backend_pid() RETURNING lock_id, permits)
SELECT (SELECT count(*) FROM d), pg_advisory_unlock_shared($1),
    (SELECT bool_and(pg_advisory_unlock(d.lock_id)) FROM d WHERE d.permits IS NOT NULL)"
            ),
            inspect: format!(
                "SELECT h.owner, h.fence, h.pid, h.host, h.acquired_at, h.renewed_at, h.ttl_ms, h.permits, h.value, h.backend_pid
FROM {h} h WHERE h.key = $1 AND {live} ORDER BY h.fence"
            ),
            list: format!(
                "SELECT h.key, h.owner, h.fence, h.pid, h.host, h.acquired_at, h.renewed_at, h.ttl_ms, h.permits, h.value, h.backend_pid
FROM {h} h WHERE {live} ORDER BY h.key, h.fence"
            ),
            force: format!("DELETE FROM {h} WHERE key = $1 AND backend_pid = $2"),
            sweep: format!("DELETE FROM {h} h WHERE NOT {live}"),
        }
    }
}

/// The kind of a holders row with `permits`.
pub(crate) fn kind_of(permits: Option<i32>) -> LockKind {
    match permits.and_then(|p| u32::try_from(p).ok()) {
        Some(permits) => LockKind::Semaphore { permits },
        None => LockKind::Shared,
    }
}

/// The error of a request of `asked` on a key that live holders hold as `held`.
pub(crate) fn conflict(describe: &str, key: &str, held: LockKind, asked: LockKind) -> Error {
    crate::backends::sql_session::kind_conflict(describe, key, held, asked)
}

/// Fails unless `permits` fits the statements' `integer`.
pub(crate) fn permits_param(describe: &str, permits: u32) -> Result<i32> {
    i32::try_from(permits).map_err(|_| {
        Error::backend(
            describe,
            format!("a semaphore of {permits} permits is more than this backend keeps"),
        )
    })
}
