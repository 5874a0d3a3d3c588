//! `mysql://`: locks in MySQL or MariaDB, in one of two modes chosen by `?mode=` (see
//! `docs/backends/mysql.md`).
//!
//! * `mode=session` (the default): a lock is a user-level lock (`GET_LOCK`) held on a
//!   connection of its own for as long as the lease lives; it is freed by the server the
//!   moment that connection ends, and the holder's `lost()` fires then. Waits happen in
//!   the server (`GET_LOCK(name, timeout)`). The default for the same reasons as for
//!   PostgreSQL: a dead holder frees the lock at once, and no TTL has to be guessed.
//! * `mode=lease`: a lock is a row of a lease table (`dlock_leases` unless `?table=`)
//!   with an expiry on the server's clock (`UTC_TIMESTAMP(6)`), taken in one short
//!   transaction and renewed and released by single owner-checked statements.
//!
//! Fences are strictly increasing for every key and durable across restarts. Session
//! mode draws them from the one-row InnoDB counter table `dlock_fence_counter`
//! (`fence = LAST_INSERT_ID(fence + 1)`, one autocommit statement while the lock is held);
//! its `GET_LOCK` names are namespaced by that counter (database and table, see
//! [`lock_name`]), so URLs that share a counter share locks and others do not. Lease mode
//! keeps a fence per key in the key's row, which outlives releases: no row is shared by
//! different keys.
//!
//! Every connection bounds its InnoDB row-lock waits (`innodb_lock_wait_timeout`), so a
//! client stalled while holding a row lock delays others by seconds, with an error that
//! says so, not by the server's default 50 s.

mod lease_kinds;
mod lease_table;
mod renew_batch;
mod session;
pub mod tls;

use super::sql_url;
use crate::core::backend::Backend;
use crate::error::{Error, Result};
use crate::location::BackendUrl;
use mysql_async::{Opts, OptsBuilder, PoolConstraints, PoolOpts};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

pub use lease_table::MysqlLeaseBackend;
pub use tls::MysqlSslMode;

/// Options passed on to the client (mysql_async's URL parameters).
const CLIENT_OPTIONS: &[&str] = &[
    "pool_min",
    "pool_max",
    "inactive_connection_ttl",
    "ttl_check_interval",
    "conn_ttl",
    "abs_conn_ttl",
    "abs_conn_ttl_jitter",
    "tcp_keepalive",
    "max_allowed_packet",
    "wait_timeout",
    "enable_cleartext_plugin",
    "reset_connection",
    "tcp_nodelay",
    "stmt_cache_size",
    "prefer_socket",
    "secure_auth",
    "socket",
    "compression",
    "ssl-mode",
    "ssl-ca",
    "ssl-cert",
    "ssl-key",
];

/// The longest user-level lock name the server takes.
pub const MAX_LOCK_NAME_CHARS: usize = 64;

pub use super::sql_url::Mode;

/// Everything parsed from a MySQL URL.
#[derive(Clone)]
pub struct Settings {
    /// Which mode.
    pub mode: Mode,
    /// The client options (with TLS unless `ssl-mode=DISABLED`).
    pub opts: Opts,
    /// `ssl-mode` (see [`tls`]).
    pub ssl_mode: MysqlSslMode,
    /// How connections are opened: `opts`, and for `PREFERRED` the plain fallback.
    pub(crate) dial: Dial,
    /// The mode's table, possibly `database.table`.
    pub table: String,
    /// The fence counter table, in the same database.
    pub counter: String,
    /// `sessions=shared`: exclusive session-mode leases share connections.
    pub shared_sessions: bool,
    /// The fence namespace of session-mode locks: `database.dlock_fence_counter`, with
    /// the database of the table (the URL's unless the table names one).
    pub namespace: String,
    /// The URL with its password hidden.
    pub describe: String,
}

// By hand: the Debug of mysql_async's `Opts` shows the password.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("mode", &self.mode)
            .field("ssl_mode", &self.ssl_mode)
            .field("table", &self.table)
            .field("counter", &self.counter)
            .field("namespace", &self.namespace)
            .field("shared_sessions", &self.shared_sessions)
            .field("describe", &self.describe)
            .finish_non_exhaustive()
    }
}

/// Opens a MySQL backend from its URL.
pub(crate) async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    let settings = Settings::parse(&BackendUrl::parse(url)?)?;
    Ok(match settings.mode {
        Mode::Session => Arc::new(session::connect(settings).await?),
        Mode::Lease => Arc::new(MysqlLeaseBackend::connect(settings).await?),
    })
}

/// How long one connection attempt may take (the client library has no timeout of its
/// own for the handshake).
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// Server-side bounds of every statement of the session (MariaDB's `max_statement_time`,
/// seconds; MySQL's `max_execution_time`, milliseconds, which bounds `SELECT`s), beside
/// the row-lock wait bound ([`ROW_LOCK_WAIT`]) the connection's init statements set. A
/// `GET_LOCK` wait lifts the statement bound for itself: its own timeout is the caller's
/// deadline.
const MARIADB_BOUNDS: &str = "SET SESSION max_statement_time = 15";
const MYSQL_BOUNDS: &str = "SET SESSION max_execution_time = 15000";

/// The options connections are opened with: under `ssl-mode=PREFERRED`, TLS first and,
/// once the server has said it has no TLS, plain connections.
#[derive(Clone)]
pub(crate) struct Dial {
    opts: Opts,
    plain: Option<Arc<Plain>>,
}

struct Plain {
    opts: Opts,
    /// The server answered without TLS: later connections go plain at once.
    chosen: std::sync::atomic::AtomicBool,
}

impl Dial {
    /// A connection, TLS or plain as the mode says.
    async fn connect(&self) -> mysql_async::Result<mysql_async::Conn> {
        use std::sync::atomic::Ordering;
        let Some(plain) = &self.plain else {
            return mysql_async::Conn::new(self.opts.clone()).await;
        };
        if plain.chosen.load(Ordering::Relaxed) {
            return mysql_async::Conn::new(plain.opts.clone()).await;
        }
        match mysql_async::Conn::new(self.opts.clone()).await {
            Err(mysql_async::Error::Driver(
                mysql_async::DriverError::NoClientSslFlagFromServer,
            )) => {
                plain.chosen.store(true, Ordering::Relaxed);
                mysql_async::Conn::new(plain.opts.clone()).await
            }
            other => other,
        }
    }
}

/// Opens a connection with the statement bounds set, bounded in time; `true` for MariaDB.
pub(crate) async fn open_conn(dial: &Dial) -> mysql_async::Result<(mysql_async::Conn, bool)> {
    use mysql_async::prelude::Queryable;
    let opened = tokio::time::timeout(CONNECT_LIMIT, async {
        let mut conn = dial.connect().await?;
        let mariadb = match conn.query_drop(MARIADB_BOUNDS).await {
            Ok(()) => true,
            // MySQL has no max_statement_time (unknown system variable).
            Err(mysql_async::Error::Server(err)) if err.code == 1193 => {
                conn.query_drop(MYSQL_BOUNDS).await?;
                false
            }
            Err(err) => return Err(err),
        };
        Ok((conn, mariadb))
    })
    .await;
    match opened {
        Ok(opened) => opened,
        Err(_) => Err(mysql_async::Error::Io(mysql_async::IoError::Io(
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting took longer than {CONNECT_LIMIT:?}"),
            ),
        ))),
    }
}

/// True if the server refused the connection: nothing listens on its port.
pub(crate) fn is_refused(err: &mysql_async::Error) -> bool {
    matches!(err, mysql_async::Error::Io(mysql_async::IoError::Io(io)) if io.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Milliseconds of a duration, as the SQL takes them.
pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Settings {
    /// Parses and checks a `mysql://` URL.
    pub fn parse(url: &BackendUrl) -> Result<Self> {
        let (ssl_mode, ssl_opts) =
            tls::from_options(|name| url.option(name)).map_err(|reason| url.error(reason))?;
        let sql_url::SqlOptions {
            mode,
            table,
            shared_sessions,
            mut client_url,
        } = sql_url::parse(url, CLIENT_OPTIONS, "GET_LOCK", "database")?;
        sql_url::remove_options(&mut client_url, tls::OPTIONS);
        let counter = sql_url::beside(&table, "dlock_fence_counter");
        if client_url.path().trim_matches('/').is_empty() && !table.contains('.') {
            return Err(url.error("no database; write mysql://user:password@host:3306/database"));
        }
        let parsed =
            Opts::from_url(client_url.as_str()).map_err(|err| url.error(err.to_string()))?;
        let namespace = match counter.split_once('.') {
            Some(_) => counter.clone(),
            None => format!("{}.{counter}", parsed.db_name().unwrap_or_default()),
        };
        let mut init = parsed.init().to_vec();
        init.push(format!(
            "SET SESSION innodb_lock_wait_timeout = {}",
            ROW_LOCK_WAIT.as_secs()
        ));
        let mut builder = OptsBuilder::from_opts(parsed).init(init);
        if url.option("prefer_socket").is_none() {
            builder = builder.prefer_socket(false);
        }
        if url.option("tcp_keepalive").is_none() {
            builder = builder.tcp_keepalive(Some(Duration::from_secs(5)));
        }
        if url.option("pool_min").is_none() && url.option("pool_max").is_none() {
            let constraints = PoolConstraints::new(0, 64).unwrap_or_default();
            builder = builder.pool_opts(
                PoolOpts::default()
                    .with_constraints(constraints)
                    .with_reset_connection(false),
            );
        }
        builder = builder.client_found_rows(false);
        let plain: Opts = builder.clone().into();
        let opts: Opts = builder.ssl_opts(ssl_opts).into();
        let plain = (ssl_mode == MysqlSslMode::Preferred).then(|| {
            Arc::new(Plain {
                opts: plain,
                chosen: std::sync::atomic::AtomicBool::new(false),
            })
        });
        Ok(Settings {
            mode,
            dial: Dial {
                opts: opts.clone(),
                plain,
            },
            opts,
            ssl_mode,
            table,
            counter,
            namespace,
            shared_sessions,
            describe: url.redacted().to_owned(),
        })
    }
}

/// The 32-byte primary key of a dlock key in the tables: SHA-256 of its UTF-8 bytes (keys
/// may be 1024 bytes, longer than InnoDB's index prefix; the text is stored beside it).
pub(crate) fn row_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// The `GET_LOCK` name of `key` among the locks whose fences come from the counter
/// `namespace` (`database.dlock_fence_counter`): `dlock:` and the first 58 hex digits
/// (232 bits) of the SHA-256 of the namespace, a NUL byte and the key. User-level lock
/// names are server-wide while counters are per database, so the name carries the
/// counter: two URLs that share a counter exclude each other, two that do not never do
/// (keys contain no NUL, so no key of one namespace names a lock of another).
pub fn lock_name(namespace: &str, key: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(namespace.as_bytes());
    hash.update([0u8]);
    hash.update(key.as_bytes());
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("dlock:{}", &hex[..MAX_LOCK_NAME_CHARS - 6])
}

/// How long a statement waits for an InnoDB row lock before failing (`ER_LOCK_WAIT_TIMEOUT`).
pub(crate) const ROW_LOCK_WAIT: Duration = Duration::from_secs(3);

/// The client-side bound of one statement: the row-lock wait plus time to run.
pub(crate) const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's error code for an exhausted row-lock wait.
pub(crate) const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;

/// True for the server error of an exhausted row-lock wait.
pub(crate) fn is_lock_wait_timeout(err: &mysql_async::Error) -> bool {
    matches!(err, mysql_async::Error::Server(server) if server.code == ER_LOCK_WAIT_TIMEOUT)
}

/// A small pool of idle connections of one handle. A connection goes back only when the
/// work on it finished without error ([`Lent::keep`]); one whose future was dropped
/// mid-statement or that failed is closed instead (the server then rolls back anything
/// it left open). Connections idle for a minute are pinged before reuse.
pub(crate) struct Conns {
    dial: Dial,
    describe: String,
    idle: std::sync::Mutex<Vec<(mysql_async::Conn, std::time::Instant)>>,
}

// By hand: the Debug of `Opts` shows the password.
impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conns")
            .field("describe", &self.describe)
            .finish_non_exhaustive()
    }
}

const MAX_IDLE: usize = 32;
const PING_IDLE_AFTER: Duration = Duration::from_secs(60);

impl Conns {
    pub(crate) fn new(dial: Dial, describe: String) -> std::sync::Arc<Conns> {
        std::sync::Arc::new(Conns {
            dial,
            describe,
            idle: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// An idle connection, or a new one.
    pub(crate) async fn take(self: &std::sync::Arc<Self>) -> Result<Lent> {
        self.take_raw()
            .await
            .map_err(|e| my_error(&self.describe, e))
    }

    /// [`take`](Self::take), with the client library's error.
    pub(crate) async fn take_raw(self: &std::sync::Arc<Self>) -> mysql_async::Result<Lent> {
        use mysql_async::prelude::Queryable;
        loop {
            let next = self
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            let Some((mut conn, since)) = next else { break };
            if since.elapsed() < PING_IDLE_AFTER || conn.ping().await.is_ok() {
                return Ok(self.lend(conn));
            }
        }
        let (conn, _) = open_conn(&self.dial).await?;
        Ok(self.lend(conn))
    }

    fn lend(self: &std::sync::Arc<Self>, conn: mysql_async::Conn) -> Lent {
        Lent {
            conn: std::mem::ManuallyDrop::new(conn),
            home: std::sync::Arc::clone(self),
            keep: false,
        }
    }
}

/// A connection lent by [`Conns`]; back to the pool on drop only after [`Lent::keep`].
pub(crate) struct Lent {
    conn: std::mem::ManuallyDrop<mysql_async::Conn>,
    home: std::sync::Arc<Conns>,
    keep: bool,
}

impl Lent {
    /// The work on this connection finished cleanly: it may be reused.
    pub(crate) fn keep(&mut self) {
        self.keep = true;
    }
}

impl std::ops::Deref for Lent {
    type Target = mysql_async::Conn;
    fn deref(&self) -> &mysql_async::Conn {
        &self.conn
    }
}

impl std::ops::DerefMut for Lent {
    fn deref_mut(&mut self) -> &mut mysql_async::Conn {
        &mut self.conn
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        // SAFETY: `conn` is taken exactly once, here, and never used again.
        let conn = unsafe { std::mem::ManuallyDrop::take(&mut self.conn) };
        if self.keep {
            let mut idle = self
                .home
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if idle.len() < MAX_IDLE {
                idle.push((conn, std::time::Instant::now()));
            }
        }
    }
}

/// Server error codes that say the server is going away, overloaded, or that a statement
/// ran out of time: they may heal by themselves.
fn is_transient_code(code: u16) -> bool {
    matches!(
        code,
        1040 // too many connections
            | 1053 // server shutdown in progress
            | 1205 // lock wait timeout
            | 1213 // deadlock
            | 1317 // query interrupted
            | 1927 // connection killed (MariaDB)
            | 1969 // max_statement_time exceeded (MariaDB)
            | 2006 // server has gone away
            | 2013 // lost connection during query
            | 3024 // max_execution_time exceeded (MySQL)
    )
}

/// Maps a client error: the connection lost or refused, I/O, timeouts and the server's
/// transient errors are [`Error::Unavailable`] (waiters retry them); the rest of what the
/// server answers (bad credentials, missing privileges) is [`Error::Backend`].
pub(crate) fn my_error(describe: &str, err: mysql_async::Error) -> Error {
    if let Some(failure) = sql_url::tls_failure(&err) {
        return Error::backend(describe, format!("cannot connect: {failure}")).caused_by(err);
    }
    if matches!(
        err,
        mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer)
    ) {
        return Error::backend(
            describe,
            "cannot connect: the server does not offer TLS, which the URL's ssl-mode requires (enable TLS on the server, or use ssl-mode=PREFERRED or DISABLED)",
        )
        .caused_by(err);
    }
    let mapped = match &err {
        mysql_async::Error::Server(server) if !is_transient_code(server.code) => {
            Error::backend(describe, server)
        }
        other => Error::unavailable(describe, other),
    };
    mapped.caused_by(err)
}

/// True for errors that mean the connection is gone.
pub(crate) fn is_connection_error(err: &mysql_async::Error) -> bool {
    !matches!(err, mysql_async::Error::Server(_))
}

/// The counter table's definition and its one row.
pub(crate) fn counter_ddl(counter: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {counter} (id TINYINT UNSIGNED PRIMARY KEY, fence BIGINT UNSIGNED NOT NULL) ENGINE=InnoDB"
        ),
        format!("INSERT IGNORE INTO {counter} (id, fence) VALUES (1, 0)"),
    ]
}

/// Creates what `probes` look for unless it exists, with `statements` serialised by a
/// user-level lock. Each probe is a plain read that fails, or returns no row, when its
/// table (or row) is missing: a connect to an existing schema writes nothing and takes no
/// row lock, so it cannot wait behind a stalled client.
pub(crate) async fn ensure_schema(
    conn: &mut mysql_async::Conn,
    describe: &str,
    probes: &[String],
    statements: Vec<String>,
) -> Result<()> {
    use mysql_async::prelude::Queryable;
    let mut present = true;
    for probe in probes {
        let found: mysql_async::Result<Option<mysql_async::Row>> = conn.query_first(probe).await;
        match found {
            Ok(Some(_)) => {}
            Ok(None) | Err(mysql_async::Error::Server(_)) => {
                present = false;
                break;
            }
            Err(err) => return Err(my_error(describe, err)),
        }
    }
    if present {
        return Ok(());
    }
    let fail = |err: mysql_async::Error| {
        if is_lock_wait_timeout(&err) {
            return Error::unavailable(
                describe,
                format!("lock wait timeout while creating the dlock tables: another session holds a row lock on them ({err})"),
            );
        }
        Error::backend(
            describe,
            format!("cannot create the dlock tables ({err}); have them created by a user with CREATE (see docs/backends/mysql.md and fencelock::backends::mysql::schema_sql)"),
        )
    };
    conn.query_drop("DO GET_LOCK('dlock:schema', 30)")
        .await
        .map_err(fail)?;
    let mut outcome = Ok(());
    for statement in statements {
        if let Err(err) = conn.query_drop(statement).await {
            outcome = Err(fail(err));
            break;
        }
    }
    let _ = conn.query_drop("DO RELEASE_LOCK('dlock:schema')").await;
    outcome
}

/// A probe of [`ensure_schema`]: a row when `table` exists.
pub(crate) fn table_probe(table: &str) -> String {
    format!("SELECT EXISTS (SELECT 1 FROM {table} LIMIT 1)")
}

/// A probe of [`ensure_schema`]: a row when the counter has its row.
pub(crate) fn counter_probe(counter: &str) -> String {
    format!("SELECT fence FROM {counter} WHERE id = 1")
}

/// The SQL that creates what `url`'s mode needs, for administrators who create the tables
/// themselves (clients then need only SELECT, INSERT, UPDATE, DELETE on them).
pub fn schema_sql(url: &str) -> Result<String> {
    let url = BackendUrl::parse(url)?;
    let settings = Settings::parse(&url)?;
    // Lease mode keeps its fences in its own rows and needs no counter.
    let statements = match settings.mode {
        Mode::Session => {
            let mut statements = counter_ddl(&settings.counter);
            statements.push(session::ddl(&settings.table));
            statements
        }
        Mode::Lease => vec![
            lease_table::ddl(&settings.table),
            lease_kinds::ddl(&settings.table),
        ],
    };
    Ok(statements.iter().map(|s| format!("{s};\n")).collect())
}

/// For the benchmarks only: the statements `url`'s mode sends for one uncontended
/// `try_acquire` and its release, in order, each named, built exactly as the backend
/// builds them (so a benchmark runs dlock's SQL, never a copy of it). `k` below is the
/// row key, 32 bytes (dlock uses the SHA-256 of the key).
///
/// Parameters, in the order the statements take them:
/// - session `get_lock`: lock name, timeout in seconds (0: no wait); `bump`: none
///   (the fence is then `LAST_INSERT_ID()`); `record`: `k`, key (bytes), lock name,
///   owner token, TTL in ms, holder pid, holder host; `release_lock`: lock name;
///   `forget`: `k`, owner token;
/// - lease `peek`: `k`; `claim`: `k`, key (bytes), owner token, first fence of a new
///   row, TTL in µs, TTL in ms, holder pid, holder host; `mine`: `k`; `release`: `k`,
///   owner token.
#[doc(hidden)]
pub fn bench_statements(url: &str) -> Result<Vec<(&'static str, String)>> {
    let url = BackendUrl::parse(url)?;
    let settings = Settings::parse(&url)?;
    Ok(match settings.mode {
        Mode::Session => session::bench_statements(&settings.table, &settings.counter),
        Mode::Lease => lease_table::bench_statements(&settings.table),
    })
}

/// Microseconds since 1970 as a `SystemTime`.
pub(crate) fn from_micros(micros: Option<i64>) -> Option<std::time::SystemTime> {
    let micros = u64::try_from(micros?).ok()?;
    std::time::UNIX_EPOCH.checked_add(Duration::from_micros(micros))
}

/// Microseconds of a duration, as the SQL takes them.
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// The SQL expression of a `DATETIME(6)` column (UTC) as microseconds since 1970.
pub(crate) fn epoch_us(column: &str) -> String {
    format!("TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {column})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names() {
        let ns = "app.dlock_fence_counter";
        for key in ["short".to_owned(), "x".repeat(1024), "é".repeat(64)] {
            let name = lock_name(ns, &key);
            assert_eq!(name.chars().count(), 64);
            assert!(name.starts_with("dlock:"));
            assert_eq!(name, lock_name(ns, &key));
            assert_ne!(name, lock_name("other.dlock_fence_counter", &key));
        }
        let s =
            Settings::parse(&BackendUrl::parse("mysql://u@h/app?table=db2.t").unwrap()).unwrap();
        assert_eq!(s.namespace, "db2.dlock_fence_counter");
        let s = Settings::parse(&BackendUrl::parse("mysql://u@h/app").unwrap()).unwrap();
        assert_eq!(s.namespace, "app.dlock_fence_counter");
    }

    #[test]
    fn schema_for_admins() {
        let sql = schema_sql("mysql://u@h/db?mode=lease").unwrap();
        assert!(
            sql.contains("CREATE TABLE IF NOT EXISTS dlock_leases"),
            "{sql}"
        );
        assert!(!sql.contains("dlock_fence_counter"), "{sql}");
        assert!(
            sql.contains("CREATE TABLE IF NOT EXISTS dlock_leases_holders"),
            "{sql}"
        );
        assert!(sql.contains("value TEXT NULL"), "{sql}");
        let sql = schema_sql("mysql://u@h/db").unwrap();
        assert!(sql.contains("dlock_fence_counter"), "{sql}");
        assert!(sql.contains("dlock_sessions"), "{sql}");
    }

    #[test]
    fn parses() {
        let s = Settings::parse(&BackendUrl::parse("mysql://u:pw@h:3306/db?mode=lease").unwrap())
            .unwrap();
        assert_eq!(s.mode, Mode::Lease);
        for bad in [
            "mysql://u:secret@h/db?mode=x",
            "mysql://u:secret@h/db?bogus=1",
            "mysql://u:secret@h/",
        ] {
            let err = Settings::parse(&BackendUrl::parse(bad).unwrap()).unwrap_err();
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }
}
