//! pgbench scripts that run exactly the statements dlock sends for one uncontended
//! acquire and release ([`fencelock::backends::postgres::bench_statements`]), so a change to
//! dlock's SQL changes the baseline with it.
//!
//! Each client works on its own key: the lock id is `:id`, the key `'pgbench-' || :id`,
//! the owner token `'owner-' || :id`. Casts pin the parameter types that dlock binds,
//! since pgbench sends its variables untyped.

use fencelock::backends::postgres::{bench_channel, bench_statements};

/// Where the lock ids of dlock's scripts start (the bare script uses other ids).
const FIRST_ID: u32 = 1_000_000;

/// A bare advisory lock and unlock: what dlock's statements are measured against. Not
/// dlock's SQL, so it is written here.
pub const BARE: &str = r"\set id :client_id + 2000000
SELECT pg_advisory_lock(:id);
SELECT pg_advisory_unlock(:id);
";

/// The table of [`LEASE_MINIMAL`], made by [`LEASE_MINIMAL_SETUP`] before pgbench runs.
pub const LEASE_MINIMAL_TABLE: &str = "dlock_bench_minimal_leases";

/// The least a lease costs in SQL, what dlock's lease mode is measured against: one
/// insert that takes the key's row only if it has expired (a fresh key's row is simply
/// inserted), and an owner-checked delete. Each client has its own key (ids apart from
/// the other scripts'). Not dlock's SQL, so it is written here.
pub const LEASE_MINIMAL: &str = r"\set id :client_id + 3000000
INSERT INTO dlock_bench_minimal_leases AS l (key, owner, expires_at) VALUES (('pgbench-' || (:id)::text), ('owner-' || (:id)::text), now() + 30000 * interval '1 millisecond') ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at WHERE l.expires_at <= now();
DELETE FROM dlock_bench_minimal_leases WHERE key = ('pgbench-' || (:id)::text) AND owner = ('owner-' || (:id)::text);
";

/// The table [`LEASE_MINIMAL`] works on: a logged table as dlock's lease table, with only
/// the columns a lease needs (no index but the key's).
pub const LEASE_MINIMAL_SETUP: &str = "CREATE TABLE IF NOT EXISTS dlock_bench_minimal_leases \
(key text PRIMARY KEY, owner text NOT NULL, expires_at timestamptz NOT NULL);
";

/// Removes [`LEASE_MINIMAL_SETUP`]'s table after the run.
pub const LEASE_MINIMAL_TEARDOWN: &str = "DROP TABLE IF EXISTS dlock_bench_minimal_leases;\n";

const LOCK_ID: &str = "(:id)::bigint";
const KEY: &str = "('pgbench-' || (:id)::text)";
const OWNER: &str = "('owner-' || (:id)::text)";
const TTL_MS: &str = "30000::bigint";
const PID: &str = "1::integer";
const HOST: &str = "'bench'::text";

/// The pgbench expressions of one statement's `$1`, `$2`, … (see `bench_statements`).
fn params(lease: bool, name: &str, channel: &str) -> Vec<String> {
    let list: &[&str] = match (lease, name) {
        (false, "acquire") => &[LOCK_ID, KEY, OWNER, TTL_MS, PID, HOST],
        (false, _) => &[LOCK_ID, KEY, OWNER],
        (true, "acquire") => &[KEY, OWNER, TTL_MS, PID, HOST],
        (true, _) => &[KEY, OWNER, channel],
    };
    list.iter().map(|p| (*p).to_owned()).collect()
}

/// `value` as a SQL text expression. pgbench reads `:name` as a variable even inside a
/// string literal, so a colon is spelled `chr(58)`.
fn text(value: &str) -> String {
    let quoted = value.replace('\'', "''").replace(':', "' || chr(58) || '");
    format!("('{quoted}')::text")
}

/// `sql` with `$n` replaced by `params[n - 1]`.
pub fn substitute(sql: &str, params: &[String]) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - at - 1);
        let param = rest[at + 1..at + 1 + digits]
            .parse::<usize>()
            .ok()
            .and_then(|n| params.get(n.wrapping_sub(1)));
        match param {
            Some(param) => out.push_str(param),
            None => out.push_str(&rest[at..at + 1 + digits]),
        }
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    out
}

/// The script of `url`'s mode (`postgres://…` with `?mode=` and `?table=` as dlock reads
/// them; only the mode and the names matter).
pub fn script(url: &str) -> fencelock::Result<String> {
    let lease = url.contains("mode=lease");
    let channel = if lease {
        text(&bench_channel(url)?)
    } else {
        String::new()
    };
    let mut out = format!("\\set id :client_id + {FIRST_ID}\n");
    for (name, sql) in bench_statements(url)? {
        // pgbench (10 and later) ends a statement at its `;`, not at the line's end.
        out.push_str(&substitute(&sql, &params(lease, name, &channel)));
        out.push_str(";\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const URLS: [&str; 2] = [
        "postgres://postgres@127.0.0.1/postgres",
        "postgres://postgres@127.0.0.1/postgres?mode=lease",
    ];

    #[test]
    fn scripts_hold_the_library_statements() {
        for url in URLS {
            let script = script(url).unwrap();
            let statements = bench_statements(url).unwrap();
            assert_eq!(statements.len(), 2, "{url}");
            let mut at = 0;
            for (name, sql) in statements {
                // The library's statement verbatim, only its parameters bound, in order.
                let lease = url.contains("mode=lease");
                let bound = substitute(&sql, &params(lease, name, &text("dlock:dlock_leases")));
                assert_ne!(bound, sql, "{url} {name}: no parameter bound");
                let found = script[at..]
                    .find(&format!("{bound};\n"))
                    .unwrap_or_else(|| panic!("{url} {name} missing from\n{script}"));
                at += found + bound.len();
            }
            assert!(
                !script.contains('$'),
                "{url}: a parameter left unbound:\n{script}"
            );
        }
    }

    #[test]
    fn lease_release_notifies_the_tables_channel() {
        let script = script("postgres://u@h/db?mode=lease&table=app_locks").unwrap();
        assert!(
            script.contains("('dlock' || chr(58) || 'app_locks')::text"),
            "{script}"
        );
        assert!(script.contains("INSERT INTO app_locks"), "{script}");
    }

    #[test]
    fn minimal_lease_script_uses_its_setup_table() {
        for sql in [LEASE_MINIMAL, LEASE_MINIMAL_SETUP, LEASE_MINIMAL_TEARDOWN] {
            assert!(sql.contains(LEASE_MINIMAL_TABLE), "{sql}");
        }
        assert!(LEASE_MINIMAL.starts_with("\\set id"), "{LEASE_MINIMAL}");
    }

    #[test]
    fn substitution_binds_by_number() {
        let params = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(substitute("f($2, $1, $3)", &params), "f(b, a, $3)");
    }
}
