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
pub(crate) const OWN_OPTIONS: &[&str] = &["mode", "table", "sessions"];

/// What a SQL URL says beyond the client's connection options.
pub(crate) struct SqlOptions {
    pub(crate) mode: Mode,
    /// The table of the mode (`dlock_sessions` or `dlock_leases` unless `?table=`),
    /// possibly qualified by `namespace` (schema or database).
    pub(crate) table: String,
    /// `sessions=shared` (session mode only): exclusive leases share connections.
    pub(crate) shared_sessions: bool,
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
    let shared_sessions = match url.option("sessions").as_deref() {
        None | Some("dedicated") => false,
        Some("shared") if mode == Mode::Session => true,
        Some("shared") => {
            return Err(url.error(
                "sessions=shared is for mode=session: a lease table holds any number of leases on a few connections already",
            ))
        }
        Some(other) => {
            return Err(url.error(format!(
                "unknown sessions {other:?}; expected sessions=dedicated (a connection per lease, the default) or sessions=shared (up to {} exclusive leases per connection, which end together)",
                crate::backends::sql_session::LEASES_PER_SESSION
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
        shared_sessions,
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

/// What a failed TLS handshake says, found in the chain of a client library's error:
/// `Some` when the failure is rustls's (a certificate that did not verify, a handshake
/// the server broke off), in words that name the check that failed.
pub(crate) fn tls_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(current) = next {
        let found = current.downcast_ref::<rustls::Error>().or_else(|| {
            current
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = found {
            return Some(describe_tls_error(tls));
        }
        next = current.source();
    }
    None
}

fn describe_tls_error(err: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match err {
        rustls::Error::InvalidCertificate(cert) => {
            let why = match cert {
                C::UnknownIssuer => {
                    "the server's certificate is not signed by a trusted CA (check the CA file given)"
                        .to_owned()
                }
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    format!("the server's certificate does not name the host connected to ({cert})")
                }
                other => format!("{other}"),
            };
            format!("TLS certificate verification failed: {why}")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// The certificates of a PEM file (`what` names the option in messages).
pub(crate) fn read_certs(
    path: &str,
    what: &str,
) -> std::result::Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|err| format!("cannot read {what}={path}: {err}"))?;
    if certs.is_empty() {
        return Err(format!("{what}={path} holds no PEM certificate"));
    }
    Ok(certs)
}

/// The private key of a PEM file (`what` names the option in messages).
pub(crate) fn read_key(
    path: &str,
    what: &str,
) -> std::result::Result<rustls::pki_types::PrivateKeyDer<'static>, String> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_file(path)
        .map_err(|err| format!("cannot read a PEM private key from {what}={path}: {err}"))
}

/// Removes the options `names` from `url`'s query.
pub(crate) fn remove_options(url: &mut Url, names: &[&str]) {
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !names.contains(&k.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.set_query(None);
    if !kept.is_empty() {
        url.query_pairs_mut().extend_pairs(kept.iter());
    }
}
