//! `mode=lease`: shared locks and semaphores as rows of a holders table.
//!
//! Every reader and permit is a row of `<table>_holders` (primary key `(key, owner)`)
//! with its own expiry on the server's clock, fence and holder. The key's row in the
//! lease table stays the one lock of the key: while readers or permits live it has the
//! empty owner and the latest of their expiries, so the exclusive statement refuses a
//! writer unchanged, without looking at the holders table.
//!
//! Readers and permits are taken, renewed and released by PL/pgSQL functions, one call
//! each: a function first locks the key's row (`FOR UPDATE`), and its later statements
//! then see every change committed before that lock was granted (each statement of a
//! function takes a fresh snapshot under `READ COMMITTED`), which one statement could
//! not. A release recomputes the key row's expiry from the holders that remain.
//!
//! Writer starvation: a writer refused by live readers writes an *intent* row (kind
//! `intent`, expiring [`INTENT_SECONDS`] later) in its acquire statement; readers are
//! refused while a live intent exists, and the writer is told to retry within a third of
//! it. The intent goes when the writer acquires (the same statement) or abandons.

/// How long a refused writer's intent keeps new readers out after its last attempt.
pub(crate) const INTENT_SECONDS: u64 = 2;

/// The holders table of the lease table `table`.
pub(crate) fn holders_table(table: &str) -> String {
    format!("{table}_holders")
}

fn function(table: &str, what: &str) -> String {
    format!("{table}_{what}")
}

/// The holders table, its functions, and the `value` column of the lease table.
pub(crate) fn ddl(t: &str, seq: &str) -> String {
    let h = holders_table(t);
    let acquire = function(t, "kind_acquire");
    let release = function(t, "kind_release");
    let renew = function(t, "kind_renew");
    format!(
        "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS value text;
CREATE TABLE IF NOT EXISTS {h} (
    key text NOT NULL,
    owner text NOT NULL,
    kind text NOT NULL,
    permits integer,
    fence bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at timestamptz NOT NULL,
    ttl_ms bigint NOT NULL,
    pid integer,
    host text,
    value text,
    PRIMARY KEY (key, owner)
);
CREATE OR REPLACE FUNCTION {acquire}(p_key text, p_owner text, p_ttl bigint, p_pid integer, p_host text, p_value text, p_permits integer,
    OUT o_fence bigint, OUT o_wait_ms bigint, OUT o_conflict integer, OUT o_held_with integer)
LANGUAGE plpgsql AS $f$
DECLARE
    v_ttl interval := p_ttl * interval '1 millisecond';
    v_row record;
    v_until timestamptz;
    v_n integer;
BEGIN
    INSERT INTO {t} AS l (key, owner, fence, expires_at, acquired_at, renewed_at, ttl_ms)
    VALUES (p_key, '', 0, '-infinity', clock_timestamp(), clock_timestamp(), 0)
    ON CONFLICT (key) DO NOTHING;
    SELECT * INTO v_row FROM {t} l WHERE l.key = p_key FOR UPDATE;
    o_conflict := 0;
    IF v_row.owner <> '' AND v_row.expires_at > clock_timestamp() THEN
        o_wait_ms := (extract(epoch FROM (v_row.expires_at - clock_timestamp())) * 1000)::bigint;
        RETURN;
    END IF;
    SELECT h.permits INTO v_row FROM {h} h WHERE h.key = p_key AND h.kind <> 'intent'
        AND h.expires_at > clock_timestamp() AND h.permits IS DISTINCT FROM p_permits LIMIT 1;
    IF FOUND THEN
        o_conflict := 1;
        o_held_with := v_row.permits;
        RETURN;
    END IF;
    IF p_permits IS NULL THEN
        SELECT min(h.expires_at) INTO v_until FROM {h} h WHERE h.key = p_key AND h.kind = 'intent'
            AND h.expires_at > clock_timestamp();
        IF v_until IS NOT NULL THEN
            o_wait_ms := (extract(epoch FROM (v_until - clock_timestamp())) * 1000)::bigint;
            RETURN;
        END IF;
    ELSE
        SELECT count(*), min(h.expires_at) INTO v_n, v_until FROM {h} h WHERE h.key = p_key
            AND h.kind = 'semaphore' AND h.owner <> p_owner AND h.expires_at > clock_timestamp();
        IF v_n >= p_permits THEN
            o_wait_ms := (extract(epoch FROM (v_until - clock_timestamp())) * 1000)::bigint;
            RETURN;
        END IF;
    END IF;
    o_fence := nextval('{seq}');
    INSERT INTO {h} AS h (key, owner, kind, permits, fence, expires_at, acquired_at, renewed_at, ttl_ms, pid, host, value)
    VALUES (p_key, p_owner, CASE WHEN p_permits IS NULL THEN 'shared' ELSE 'semaphore' END, p_permits, o_fence,
        clock_timestamp() + v_ttl, clock_timestamp(), clock_timestamp(), p_ttl, p_pid, p_host, p_value)
    ON CONFLICT (key, owner) DO UPDATE SET kind = excluded.kind, permits = excluded.permits, fence = excluded.fence,
        expires_at = excluded.expires_at, acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at,
        ttl_ms = excluded.ttl_ms, pid = excluded.pid, host = excluded.host, value = excluded.value;
    UPDATE {t} l SET expires_at = greatest(CASE WHEN l.owner = '' THEN l.expires_at ELSE '-infinity' END, clock_timestamp() + v_ttl),
        owner = '', fence = o_fence
    WHERE l.key = p_key;
END
$f$;
CREATE OR REPLACE FUNCTION {renew}(p_key text, p_owner text, p_ttl bigint) RETURNS boolean
LANGUAGE plpgsql AS $f$
DECLARE
    v_ttl interval := p_ttl * interval '1 millisecond';
BEGIN
    UPDATE {h} h SET expires_at = clock_timestamp() + v_ttl, renewed_at = clock_timestamp(), ttl_ms = p_ttl
    WHERE h.key = p_key AND h.owner = p_owner AND h.kind <> 'intent' AND h.expires_at > clock_timestamp();
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE {t} l SET expires_at = greatest(l.expires_at, clock_timestamp() + v_ttl)
    WHERE l.key = p_key AND l.owner = '';
    RETURN true;
END
$f$;
CREATE OR REPLACE FUNCTION {release}(p_key text, p_owner text, p_channel text) RETURNS boolean
LANGUAGE plpgsql AS $f$
DECLARE
    v_live boolean;
BEGIN
    PERFORM 1 FROM {t} l WHERE l.key = p_key FOR UPDATE;
    DELETE FROM {h} h WHERE h.key = p_key AND h.owner = p_owner
    RETURNING h.kind <> 'intent' AND h.expires_at > clock_timestamp() INTO v_live;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE {t} l SET expires_at = coalesce(
        (SELECT max(h.expires_at) FROM {h} h WHERE h.key = p_key AND h.kind <> 'intent' AND h.expires_at > clock_timestamp()),
        least(l.expires_at, statement_timestamp()))
    WHERE l.key = p_key AND l.owner = '';
    PERFORM pg_notify(p_channel, p_key);
    RETURN v_live;
END
$f$;"
    )
}

/// The statements of the kinds, and the writer-intent parts of the exclusive ones.
pub(crate) struct KindSql {
    /// `$1` key, `$2` owner, `$3` TTL ms, `$4` pid, `$5` host, `$6` value, `$7` permits
    /// (`NULL`: a reader): the fence (or `NULL`), the ms until the blocking lease ends,
    /// 1 if live holders of another kind or count hold the key, and their count.
    pub(crate) acquire: String,
    /// `$1` key, `$2` owner, `$3` TTL ms.
    pub(crate) renew: String,
    /// `$1` key, `$2` owner, `$3` channel.
    pub(crate) release: String,
    pub(crate) inspect: String,
    pub(crate) list: String,
}

impl KindSql {
    pub(crate) fn new(t: &str) -> Self {
        let h = holders_table(t);
        let columns = "h.key, h.owner, h.fence, h.pid, h.host, h.acquired_at, h.renewed_at, h.expires_at, h.ttl_ms, h.value, h.permits";
        KindSql {
            acquire: format!(
                "SELECT o_fence, o_wait_ms, o_conflict, o_held_with FROM {}($1, $2, $3, $4, $5, $6, $7)",
                function(t, "kind_acquire")
            ),
            renew: format!("SELECT {}($1, $2, $3)", function(t, "kind_renew")),
            release: format!("SELECT {}($1, $2, $3)", function(t, "kind_release")),
            inspect: format!(
                "SELECT {columns} FROM {h} h WHERE h.key = $1 AND h.kind <> 'intent' AND h.expires_at > clock_timestamp() ORDER BY h.fence"
            ),
            list: format!(
                "SELECT {columns} FROM {h} h WHERE h.kind <> 'intent' AND h.expires_at > clock_timestamp() ORDER BY h.key, h.fence"
            ),
        }
    }
}

/// The exclusive acquire's writer-intent parts: a refused writer facing live readers
/// writes its intent, a granted one removes its own. `ins` is the grant's CTE.
pub(crate) fn intent_ctes(t: &str) -> String {
    let h = holders_table(t);
    format!(
        "it AS (INSERT INTO {h} AS h (key, owner, kind, fence, expires_at, acquired_at, renewed_at, ttl_ms)
    SELECT $1, $2, 'intent', 0, clock_timestamp() + interval '{INTENT_SECONDS} seconds', clock_timestamp(), clock_timestamp(), 0
    WHERE NOT EXISTS (SELECT 1 FROM ins)
      AND EXISTS (SELECT 1 FROM {t} WHERE key = $1 AND owner = '' AND expires_at > clock_timestamp())
    ON CONFLICT (key, owner) DO UPDATE SET expires_at = excluded.expires_at
    RETURNING 1),
di AS (DELETE FROM {h} WHERE key = $1 AND owner = $2 AND kind = 'intent' AND EXISTS (SELECT 1 FROM ins))"
    )
}
