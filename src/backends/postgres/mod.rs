//! `postgres://` and `postgresql://`: locks in PostgreSQL, in one of two modes chosen by
//! `?mode=` (see `docs/backends/postgres.md`).
//!
//! * `mode=session` (the default): a lock is a session-level advisory lock
//!   (`pg_advisory_lock`) held on a connection of its own for as long as the lease lives.
//!   Waiting happens in the server's lock queue; the lock is freed the moment the holding
//!   session ends (process killed, `pg_terminate_backend`, server restart), and the
//!   holder's `lost()` fires then. The default because it frees a dead holder's lock at
//!   once and waits in the server's fair queue, which a TTL table cannot.
//! * `mode=lease`: a lock is a row in a lease table (`dlock_leases` unless `?table=`),
//!   taken, renewed and released by single owner-checked statements that use the
//!   server's clock for expiry. One connection serves every lease of a handle (it works
//!   through transaction-pooling proxies such as PgBouncer, where session locks do not);
//!   waiters are woken by `LISTEN/NOTIFY` on one shared listening connection, and at the
//!   holder's expiry.
//!
//! Fences come from the sequence `dlock_fence_seq` (beside the table) in both modes:
//! strictly increasing for every key and durable across server restarts. Session-mode
//! advisory keys are namespaced by that sequence (see [`keys`]), so URLs that share a
//! sequence share locks and URLs that do not, do not.

pub mod keys;
mod lease_kinds;
mod lease_table;
mod listener;
mod renew_batch;
pub(crate) mod session;
pub(crate) mod session_kinds;
pub mod tls;

use super::sql_url;
use crate::core::backend::Backend;
use crate::error::{Error, Result};
use crate::location::BackendUrl;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{CancelToken, Client, Config, Row, Statement};

pub use lease_table::PgLeaseBackend;
pub use tls::{PgSslMode, PgTls};

/// Connection options passed on to the client (libpq names).
const CLIENT_OPTIONS: &[&str] = &[
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

pub use super::sql_url::Mode;

/// Opens a PostgreSQL backend from its URL.
pub(crate) async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    let settings = Settings::parse(&BackendUrl::parse(url)?)?;
    Ok(match settings.mode {
        Mode::Session => Arc::new(session::connect(settings).await?),
        Mode::Lease => Arc::new(PgLeaseBackend::connect(settings).await?),
    })
}

/// Server-side bounds of every statement, so that no call waits on the server without
/// limit even when the client's own timer is gone: a session-lock wait sets its own
/// (the caller's deadline) for the one statement that waits.
const STATEMENT_BOUNDS: &str =
    "-c statement_timeout=15000 -c lock_timeout=5000 -c idle_in_transaction_session_timeout=30000";

/// Everything parsed from a PostgreSQL URL.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Which mode.
    pub mode: Mode,
    /// The client configuration (host, port, user, password, database, …).
    pub config: Config,
    /// TLS: `sslmode` and the certificates (see [`tls`]).
    pub tls: PgTls,
    /// The table of the mode (`dlock_sessions` or `dlock_leases` unless `?table=`),
    /// possibly schema-qualified.
    pub table: String,
    /// The fence sequence, in the table's schema.
    pub sequence: String,
    /// `sessions=shared`: exclusive session-mode leases share connections.
    pub shared_sessions: bool,
    /// The URL with its password hidden, for messages.
    pub describe: String,
}

impl Settings {
    /// Parses and checks a `postgres://` URL.
    pub fn parse(url: &BackendUrl) -> Result<Self> {
        let sql_url::SqlOptions {
            mode,
            table,
            shared_sessions,
            mut client_url,
        } = sql_url::parse(url, CLIENT_OPTIONS, "advisory locks", "schema")?;
        let sequence = sql_url::beside(&table, "dlock_fence_seq");
        let tls =
            PgTls::from_options(|name| url.option(name)).map_err(|reason| url.error(reason))?;
        // tokio-postgres knows only disable/prefer/require and no certificate options:
        // the connector does the rest.
        sql_url::remove_options(&mut client_url, tls::OPTIONS);
        let _ = client_url.set_scheme("postgresql");
        let text = client_url.as_str().replacen("postgresql:", "postgres:", 1);
        let mut config = Config::from_str(&text).map_err(|err| url.error(format!("{err}")))?;
        if config.get_hosts().is_empty() {
            return Err(url.error("no host; write postgres://user:password@host:5432/database"));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if url.option("keepalives_idle").is_none() {
            // A holder on a dead network must learn it within seconds, not hours.
            config.keepalives_idle(Duration::from_secs(5));
        }
        if url.option("keepalives_interval").is_none() {
            config.keepalives_interval(Duration::from_secs(2));
        }
        if url.option("keepalives_retries").is_none() {
            config.keepalives_retries(3);
        }
        if config.get_application_name().is_none() {
            config.application_name("dlock");
        }
        let options = match config.get_options() {
            Some(given) => format!("{STATEMENT_BOUNDS} {given}"),
            None => STATEMENT_BOUNDS.to_owned(),
        };
        config.options(&options);
        config.ssl_mode(tls.ssl_mode());
        Ok(Settings {
            mode,
            config,
            tls,
            table,
            sequence,
            shared_sessions,
            describe: url.redacted().to_owned(),
        })
    }

    /// The `LISTEN/NOTIFY` channel of this lease table.
    pub fn channel(&self) -> String {
        format!("dlock:{}", self.table)
    }
}

/// One connection, with the signal of its end and a way to cancel its running query.
pub(crate) struct Conn {
    pub(crate) client: Client,
    closed: watch::Receiver<Option<String>>,
    pub(crate) cancel: CancelToken,
    /// The server's process id of this session, once a statement has returned it.
    backend_pid: std::sync::atomic::AtomicU32,
    /// Statements prepared on this connection, by SQL text: dlock's statements are few and
    /// fixed, and planning the CTEs costs more than executing them.
    prepared: std::sync::Mutex<std::collections::HashMap<String, Statement>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("closed", &self.client.is_closed())
            .finish()
    }
}

impl Conn {
    /// Opens a connection and drives it in a task of its own.
    pub(crate) async fn open(config: &Config, tls: &PgTls, describe: &str) -> Result<Conn> {
        let (client, connection) = config
            .connect(tls.connector())
            .await
            .map_err(|err| connect_error(describe, tls, err))?;
        let (tx, closed) = watch::channel(None);
        tokio::spawn(async move {
            let reason = match connection.await {
                Ok(()) => "the connection was closed".to_owned(),
                Err(err) => format!("the connection failed: {}", detail(&err)),
            };
            let _ = tx.send(Some(reason));
        });
        let cancel = client.cancel_token();
        Ok(Conn::new(client, closed, cancel))
    }

    pub(crate) fn new(
        client: Client,
        closed: watch::Receiver<Option<String>>,
        cancel: CancelToken,
    ) -> Conn {
        Conn {
            client,
            closed,
            cancel,
            backend_pid: std::sync::atomic::AtomicU32::new(0),
            prepared: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// `sql` prepared on this connection (once; later calls reuse it).
    async fn statement(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Statement, tokio_postgres::Error> {
        let cached = self
            .prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(sql)
            .cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        let statement = self.client.prepare_typed(sql, &types).await?;
        self.prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// Runs `sql` (prepared once per connection) with typed parameters.
    pub(crate) async fn query_typed(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.statement(sql, params).await?;
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
        self.client.query(&statement, &values).await
    }

    /// Executes `sql` (prepared once per connection); the number of rows affected.
    pub(crate) async fn execute_typed(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, tokio_postgres::Error> {
        let statement = self.statement(sql, params).await?;
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
        self.client.execute(&statement, &values).await
    }

    /// The server's process id of this session (0 until a lock statement returned it).
    pub(crate) fn backend_pid(&self) -> u32 {
        self.backend_pid.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set_backend_pid(&self, pid: i32) {
        let pid = u32::try_from(pid).unwrap_or_default();
        self.backend_pid
            .store(pid, std::sync::atomic::Ordering::Relaxed);
    }

    /// True once the connection has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed() || self.closed.borrow().is_some()
    }

    /// Resolves with the reason when the connection ends.
    pub(crate) fn ended(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut closed = self.closed.clone();
        async move {
            loop {
                if let Some(reason) = closed.borrow_and_update().clone() {
                    return reason;
                }
                if closed.changed().await.is_err() {
                    return "the connection was closed".to_owned();
                }
            }
        }
    }
}

/// The error of a failed connection attempt: "cannot connect: …", and for TLS failures a
/// [`Error::Backend`] that says which check failed (it does not heal by retrying).
pub(crate) fn connect_error(describe: &str, tls: &PgTls, err: tokio_postgres::Error) -> Error {
    if let Some(failure) = sql_url::tls_failure(&err) {
        let mode = tls.mode().as_str();
        return Error::backend(
            describe,
            format!("cannot connect: {failure} (sslmode={mode})"),
        )
        .caused_by(err);
    }
    if tls.ssl_mode() == tokio_postgres::config::SslMode::Require
        && std::error::Error::source(&err)
            .is_some_and(|cause| cause.to_string().contains("server does not support TLS"))
    {
        let mode = tls.mode().as_str();
        return Error::backend(
            describe,
            format!("cannot connect: the server does not offer TLS, which sslmode={mode} requires (enable ssl on the server, or use sslmode=prefer or disable)"),
        )
        .caused_by(err);
    }
    match pg_error(describe, err) {
        Error::Unavailable { detail, source, .. } => Error::Unavailable {
            backend: describe.to_owned(),
            detail: format!("cannot connect: {detail}"),
            source,
        },
        other => other,
    }
}

/// The text of a client error, with the server's message where there is one.
pub(crate) fn detail(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => err.to_string(),
    }
}

/// SQLSTATEs that say the server is unreachable, restarting or overloaded, or that a
/// statement ran out of time: they may heal by themselves.
fn is_transient_state(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || matches!(
            code,
            "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now (starting up, shutting down)
                | "53300" // too_many_connections
                | "57014" // query_canceled (statement_timeout)
                | "55P03" // lock_not_available (lock_timeout)
                | "40001" // serialization_failure
                | "40P01" // deadlock_detected
        )
}

/// Maps a client error: the connection lost, I/O, timeouts and the server's transient
/// states are [`Error::Unavailable`] (waiters retry them); the rest of what the server
/// answers (bad credentials, missing privileges) is [`Error::Backend`].
pub(crate) fn pg_error(describe: &str, err: tokio_postgres::Error) -> Error {
    let text = detail(&err);
    let transient = match err.as_db_error() {
        Some(db) => is_transient_state(db.code().code()),
        None => true,
    };
    let mapped = if transient {
        Error::unavailable(describe, text)
    } else {
        Error::backend(describe, text)
    };
    mapped.caused_by(err)
}

/// Runs a sweep statement on `db`; a failure only delays the sweep to the next one.
pub(crate) async fn run_sweep(db: &Shared, sql: &str, what: &str) {
    if let Ok(conn) = db.get().await {
        let sweep = tokio::time::timeout(Duration::from_secs(30), conn.client.execute(sql, &[]));
        if let Ok(Err(err)) = sweep.await {
            tracing::debug!(err = %detail(&err), "sweeping {what} failed");
        }
    }
}

/// A connection shared by many requests (tokio-postgres pipelines them), reopened when it
/// has failed.
#[derive(Debug)]
pub(crate) struct Shared {
    config: Config,
    tls: PgTls,
    describe: String,
    current: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

impl Shared {
    pub(crate) fn new(config: Config, tls: PgTls, describe: String) -> Self {
        Shared {
            config,
            tls,
            describe,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The live connection, reconnecting if the last one ended.
    pub(crate) async fn get(&self) -> Result<Arc<Conn>> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref() {
            if !conn.is_closed() {
                return Ok(Arc::clone(conn));
            }
        }
        let conn = Arc::new(Conn::open(&self.config, &self.tls, &self.describe).await?);
        *current = Some(Arc::clone(&conn));
        Ok(conn)
    }
}

/// Creates the sequence and `table` (with `ddl`) unless they exist, serialised by a
/// transaction-level advisory lock so that concurrent first users do not race.
pub(crate) async fn ensure_schema(
    conn: &Conn,
    describe: &str,
    table: &str,
    sequence: &str,
    ddl: &str,
) -> Result<()> {
    let rows = conn
        .query_typed(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
            &[(&table, Type::TEXT), (&sequence, Type::TEXT)],
        )
        .await
        .map_err(|err| pg_error(describe, err))?;
    if rows.first().and_then(|r| r.try_get::<_, bool>(0).ok()) == Some(true) {
        return Ok(());
    }
    let script = format!(
        "BEGIN;\nSELECT pg_advisory_xact_lock({lock});\nCREATE SEQUENCE IF NOT EXISTS {sequence};\n{ddl}\nCOMMIT;",
        lock = keys::advisory_key("dlock schema"),
    );
    if let Err(err) = conn.client.batch_execute(&script).await {
        let _ = conn.client.batch_execute("ROLLBACK").await;
        return Err(Error::backend(
            describe,
            format!(
                "cannot create the dlock schema ({}); have it created by a role with CREATE on the schema (see docs/backends/postgres.md and fencelock::backends::postgres::schema_sql)",
                detail(&err)
            ),
        ));
    }
    Ok(())
}

/// The schema-qualified name of `sequence` as the server resolves it (through the
/// `search_path` when unqualified): the fence namespace of session-mode locks.
pub(crate) async fn fence_namespace(conn: &Conn, describe: &str, sequence: &str) -> Result<String> {
    let rows = conn
        .query_typed(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
            &[(&sequence, Type::TEXT)],
        )
        .await
        .map_err(|err| pg_error(describe, err))?;
    rows.first()
        .and_then(|r| r.try_get::<_, String>(0).ok())
        .ok_or_else(|| {
            Error::backend(
                describe,
                format!("the fence sequence {sequence} is not visible to this role; create it (dlock schema) and grant USAGE on it"),
            )
        })
}

/// The SQL that creates what `url`'s mode needs, for administrators who create the
/// schema themselves (the client then needs only SELECT, INSERT, UPDATE, DELETE on the
/// table and USAGE on the sequence).
pub fn schema_sql(url: &str) -> Result<String> {
    let url = BackendUrl::parse(url)?;
    let settings = Settings::parse(&url)?;
    let ddl = match settings.mode {
        Mode::Session => session::ddl(&settings.table),
        Mode::Lease => lease_table::ddl(&settings.table, &settings.sequence),
    };
    Ok(format!(
        "CREATE SEQUENCE IF NOT EXISTS {};\n{ddl}\n",
        settings.sequence
    ))
}

/// For the benchmarks only: the statements `url`'s mode sends for one uncontended
/// `try_acquire` and its release, in order, each named, built exactly as the backend
/// builds them (so a benchmark runs dlock's SQL, never a copy of it).
///
/// Parameters, in the order the statements take them:
/// - session `acquire`: `$1` lock id (`bigint`), `$2` key, `$3` owner token (`text`),
///   `$4` TTL in ms (`bigint`), `$5` holder pid (`integer`), `$6` holder host (`text`);
///   it returns `(fence, backend_pid)` when it got the lock;
/// - session `release`: `$1` lock id (`bigint`), `$2` key, `$3` owner token (`text`);
/// - lease `acquire`: `$1` key, `$2` owner token (`text`), `$3` TTL in ms (`bigint`),
///   `$4` holder pid (`integer`), `$5` holder host (`text`);
/// - lease `release`: `$1` key, `$2` owner token, `$3` the notification channel
///   ([`Settings::channel`], `text`).
#[doc(hidden)]
pub fn bench_statements(url: &str) -> Result<Vec<(&'static str, String)>> {
    let url = BackendUrl::parse(url)?;
    let settings = Settings::parse(&url)?;
    Ok(match settings.mode {
        Mode::Session => session::bench_statements(&settings.table, &settings.sequence),
        Mode::Lease => lease_table::bench_statements(&settings.table, &settings.sequence),
    })
}

/// For the benchmarks only: the `LISTEN/NOTIFY` channel `url`'s lease release notifies
/// (its `$3`).
#[doc(hidden)]
pub fn bench_channel(url: &str) -> Result<String> {
    Ok(Settings::parse(&BackendUrl::parse(url)?)?.channel())
}

/// Milliseconds as the `bigint` the SQL takes.
pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_for_admins() {
        let sql = schema_sql("postgres://u@h/db").unwrap();
        assert!(
            sql.contains("CREATE SEQUENCE IF NOT EXISTS dlock_fence_seq"),
            "{sql}"
        );
        assert!(
            sql.contains("CREATE UNLOGGED TABLE IF NOT EXISTS dlock_sessions"),
            "{sql}"
        );
        assert!(
            sql.contains("CREATE UNLOGGED TABLE IF NOT EXISTS dlock_sessions_holders"),
            "{sql}"
        );
        let sql = schema_sql("postgres://u@h/db?mode=lease").unwrap();
        for part in [
            "CREATE TABLE IF NOT EXISTS dlock_leases_holders",
            "FUNCTION dlock_leases_kind_acquire",
            "FUNCTION dlock_leases_kind_release",
            "FUNCTION dlock_leases_kind_renew",
        ] {
            assert!(sql.contains(part), "{part}: {sql}");
        }
    }

    #[test]
    fn bench_statements_bind_no_value() {
        for url in ["postgres://u@h/db", "postgres://u@h/db?mode=lease"] {
            let acquire = &bench_statements(url).unwrap()[0].1;
            assert!(acquire.contains("NULL::text"), "{acquire}");
            assert!(
                !acquire.contains("$6, $7") && !acquire.contains("$5, $6)"),
                "{acquire}"
            );
        }
    }

    #[test]
    fn parses_modes_and_rejects_typos() {
        let s =
            Settings::parse(&BackendUrl::parse("postgres://u:pw@localhost:5/db").unwrap()).unwrap();
        assert_eq!(s.mode, Mode::Session);
        assert_eq!(s.table, "dlock_sessions");
        let s = Settings::parse(
            &BackendUrl::parse("postgresql://u@h/db?mode=lease&table=app.locks&sslmode=disable")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(s.mode, Mode::Lease);
        assert_eq!(s.sequence, "app.dlock_fence_seq");
        for bad in [
            "postgres://u:secret@h/db?mode=nope",
            "postgres://u:secret@h/db?tabel=x",
            "postgres://u:secret@h/db?table=x;drop",
        ] {
            let err = Settings::parse(&BackendUrl::parse(bad).unwrap()).unwrap_err();
            assert!(matches!(err, Error::BadUrl { .. }), "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn sessions_are_dedicated_unless_shared_is_asked_for_in_session_mode() {
        let parse = |url: &str| Settings::parse(&BackendUrl::parse(url).unwrap());
        assert!(!parse("postgres://u@h/db").unwrap().shared_sessions);
        assert!(
            !parse("postgres://u@h/db?sessions=dedicated")
                .unwrap()
                .shared_sessions
        );
        assert!(
            parse("postgres://u@h/db?sessions=shared")
                .unwrap()
                .shared_sessions
        );
        let err = parse("postgres://u@h/db?mode=lease&sessions=shared").unwrap_err();
        assert!(err.to_string().contains("mode=session"), "{err}");
        let err = parse("postgres://u:secret@h/db?sessions=pooled").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sessions=shared") && !text.contains("secret"),
            "{text}"
        );
    }
}
