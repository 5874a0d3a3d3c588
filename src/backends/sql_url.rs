//! URL options shared by the SQL backends (PostgreSQL, MySQL): the mode, the table, and
//! the client URL with dlock's own options taken out.

use crate::error::Result;
use crate::location::BackendUrl;
use url::Url;

/// The two ways to hold a lock in a SQL database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A session lock (PostgreSQL advisory lock, MySQL `GET_LOCK`) on a connection per
    /// lease: the database frees it when the session ends.
    Session,
    /// Rows in a lease table with a server-side expiry.
    Lease,
}

/// dlock's own options of a SQL URL.
pub(crate) const OWN_OPTIONS: &[&str] = &["mode", "table"];

/// What a SQL URL says beyond the client's connection options.
pub(crate) struct SqlOptions {
    pub(crate) mode: Mode,
    /// The table of the mode (`dlock_sessions` or `dlock_leases` unless `?table=`),
    /// possibly qualified by `namespace` (schema or database).
    pub(crate) table: String,
    /// The URL without dlock's own options, for the client library.
    pub(crate) client_url: Url,
}

/// Parses `mode` and `table`, rejects options that are neither dlock's nor in
/// `client_options`. `session_lock` names the session lock in messages, `namespace` what
/// qualifies a table name (`schema`, `database`).
pub(crate) fn parse(
    url: &BackendUrl,
    client_options: &[&str],
    session_lock: &str,
    namespace: &str,
) -> Result<SqlOptions> {
    let mut known: Vec<&str> = OWN_OPTIONS.to_vec();
    known.extend_from_slice(client_options);
    url.reject_unknown_options(&known)?;
    let mode = match url.option("mode").as_deref() {
        None | Some("session") => Mode::Session,
        Some("lease") => Mode::Lease,
        Some(other) => {
            return Err(url.error(format!(
                "unknown mode {other:?}; expected mode=session ({session_lock}, the default) or mode=lease (a lease table)"
            )))
        }
    };
    let table = match url.option("table") {
        Some(table) => {
            check_identifier(&table, namespace).map_err(|reason| url.error(reason))?;
            table
        }
        None => match mode {
            Mode::Session => "dlock_sessions".to_owned(),
            Mode::Lease => "dlock_leases".to_owned(),
        },
    };
    let mut client_url = url.url().clone();
    let passed: Vec<(String, String)> = url
        .url()
        .query_pairs()
        .filter(|(k, _)| !OWN_OPTIONS.contains(&k.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    client_url.set_query(None);
    if !passed.is_empty() {
        client_url.query_pairs_mut().extend_pairs(passed.iter());
    }
    Ok(SqlOptions {
        mode,
        table,
        client_url,
    })
}

/// `name` in the same schema or database as `table`.
pub(crate) fn beside(table: &str, name: &str) -> String {
    match table.rsplit_once('.') {
        Some((namespace, _)) => format!("{namespace}.{name}"),
        None => name.to_owned(),
    }
}

/// A table name must be a plain lowercase identifier, optionally qualified, so that it can
/// be written into SQL without quoting (keys never are: they are bind parameters).
fn check_identifier(name: &str, namespace: &str) -> std::result::Result<(), String> {
    let parts: Vec<&str> = name.split('.').collect();
    let ok = parts.len() <= 2
        && parts.iter().all(|part| {
            let mut chars = part.chars();
            matches!(chars.next(), Some('a'..='z' | '_'))
                && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
                && part.len() <= 50
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad table name {name:?}: use lowercase letters, digits and _ (at most 50), optionally {namespace}.table"
        ))
    }
}

/// The `Debug` of a SQL backend: its kind and redacted URL, nothing of its connections.
pub(crate) fn fmt_backend(
    f: &mut std::fmt::Formatter<'_>,
    kind: &str,
    describe: &str,
) -> std::fmt::Result {
    f.debug_struct(kind).field("url", &describe).finish()
}
