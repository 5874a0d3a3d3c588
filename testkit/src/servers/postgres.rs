//! A private PostgreSQL cluster: `initdb` into a temporary directory, then `postgres` on a
//! free loopback port (unix socket inside the directory too), tied to the test process.
//! PostgreSQL refuses to run as root, so under root the cluster runs as the `postgres`
//! system user of the Debian package.
//!
//! [`Postgres::start_tls`] starts one that also speaks TLS, with a certificate of a
//! [`TestCa`] for the host name `localhost` only.

use super::{run_setup, sql_url, ServerProcess};
use crate::process::{logged, require_binary, temp_dir};
use crate::tls::TestCa;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const BIN_DIRS: &[&str] = &["/usr/lib/postgresql/*/bin"];

/// A running private PostgreSQL server.
pub struct Postgres {
    process: ServerProcess,
    postgres: PathBuf,
    durable: bool,
    tls: bool,
}

/// The roles of a TLS server besides `postgres` (superusers, no password): `dlock_tls`
/// may connect only over TLS, `dlock_cert` only over TLS with a client certificate of
/// the CA whose common name is `dlock_cert`.
pub const TLS_ROLES: &[&str] = &["dlock_tls", "dlock_cert"];

fn system_user(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null result of getpwnam.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// Runs `command` as the `postgres` user when this process is root.
fn as_server_user(command: &mut Command) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let (uid, gid) = system_user("postgres").expect(
            "running as root needs the `postgres` system user (apt-get install postgresql)",
        );
        command.uid(uid).gid(gid);
    }
}

fn chown_tree(path: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let (uid, gid) = system_user("postgres").expect("no `postgres` system user");
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(path)
        .status()
        .expect("cannot run chown");
    assert!(status.success(), "chown of {} failed", path.display());
}

impl Postgres {
    /// Starts a new cluster. `durable` keeps fsync on (for restart tests); otherwise the
    /// server skips fsync for speed.
    pub fn start(durable: bool) -> Postgres {
        Postgres::start_with(durable, None)
    }

    /// Starts a new cluster with `ssl=on`: its certificate is issued by `ca` for
    /// `localhost` (not for `127.0.0.1`, so that a URL with that address names the wrong
    /// host), client certificates of `ca` are checked, and [`TLS_ROLES`] exist.
    pub fn start_tls(ca: &TestCa) -> Postgres {
        Postgres::start_with(false, Some(ca))
    }

    fn start_with(durable: bool, ca: Option<&TestCa>) -> Postgres {
        let initdb = require_binary("initdb", "postgresql", BIN_DIRS);
        let postgres = require_binary("postgres", "postgresql", BIN_DIRS);
        let dir = temp_dir("dlock-pg-");
        chown_tree(dir.path());
        let data = dir.path().join("data");
        let mut init = logged(&initdb, dir.path(), "initdb.log");
        init.arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .current_dir(dir.path());
        as_server_user(&mut init);
        run_setup(&mut init, dir.path(), "initdb.log", "initdb");
        if let Some(ca) = ca {
            let issued = ca.issue("postgres-server", "localhost", &["localhost"]);
            for (from, to) in [
                (issued.cert_file.as_path(), "server.crt"),
                (issued.key_file.as_path(), "server.key"),
                (ca.ca_file(), "root.crt"),
            ] {
                std::fs::copy(from, dir.path().join(to)).expect("cannot copy a TLS file");
            }
            // First match wins: the TLS roles' rules go before initdb's `trust` lines.
            let hba = data.join("pg_hba.conf");
            let initial = std::fs::read_to_string(&hba).expect("cannot read pg_hba.conf");
            let rules = "hostnossl all dlock_tls all reject\n\
                hostssl all dlock_cert all cert\n\
                hostnossl all dlock_cert all reject\n";
            std::fs::write(&hba, format!("{rules}{initial}")).expect("cannot write pg_hba.conf");
            chown_tree(dir.path());
        }
        let server = Postgres {
            process: ServerProcess::new("postgres", "postgres.log", dir, libc::SIGINT),
            postgres,
            durable,
            tls: ca.is_some(),
        };
        server.launch();
        if server.tls {
            let psql = require_binary("psql", "postgresql-client", BIN_DIRS);
            let roles: String = TLS_ROLES
                .iter()
                .map(|role| format!("CREATE ROLE {role} LOGIN SUPERUSER;"))
                .collect();
            super::run_checked(
                Command::new(psql)
                    .arg("-h")
                    .arg(server.process.dir.path())
                    .args(["-p", &server.port().to_string(), "-U", "postgres"])
                    .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", &roles]),
                "psql's setup of the TLS roles",
            );
        }
        server
    }

    /// One server per test binary, started on first use.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        let mut fresh = false;
        let server = SHARED.get_or_init(|| {
            fresh = true;
            Postgres::start(false)
        });
        if fresh {
            super::keep_until_exit(server);
        }
        server
    }

    /// Starts the server (again) on its port and data, after [`stop`](Self::stop).
    pub fn launch(&self) {
        let mut command = logged(&self.postgres, self.process.dir.path(), "postgres.log");
        command
            .arg("-D")
            .arg(self.process.dir.path().join("data"))
            .args(["-p", &self.port().to_string(), "-k"])
            .arg(self.process.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=600",
            ])
            .args([
                "-c",
                "shared_buffers=32MB",
                "-c",
                "log_min_messages=warning",
            ])
            .current_dir(self.process.dir.path());
        if self.tls {
            let dir = self.process.dir.path();
            let file = |name: &str| dir.join(name).display().to_string();
            command.args([
                "-c".to_owned(),
                "ssl=on".to_owned(),
                "-c".to_owned(),
                format!("ssl_cert_file={}", file("server.crt")),
                "-c".to_owned(),
                format!("ssl_key_file={}", file("server.key")),
                "-c".to_owned(),
                format!("ssl_ca_file={}", file("root.crt")),
            ]);
        }
        if !self.durable {
            command.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        as_server_user(&mut command);
        self.process.spawn(command);
        // The port opens a moment before the server accepts sessions.
        std::thread::sleep(Duration::from_millis(200));
    }

    /// A backend URL for this server with the given query (e.g. `"mode=lease"`).
    pub fn url(&self, query: &str) -> String {
        sql_url("postgres", "postgres", self.port(), "postgres", query)
    }

    /// A session of the superuser, for tests that look at (or change) what the backend
    /// wrote.
    pub async fn admin(&self) -> tokio_postgres::Client {
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port());
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("cannot open an admin session to the private PostgreSQL");
        tokio::spawn(connection);
        client
    }

    /// A schema of its own on this server, named after `prefix`: a test that counts or
    /// inspects the rows a backend writes sees only its own there.
    pub async fn scratch(&self, prefix: &str) -> Scratch {
        let admin = self.admin().await;
        let schema = crate::unique_name(prefix);
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .expect("cannot create a scratch schema on the private PostgreSQL");
        Scratch {
            admin,
            schema,
            port: self.port(),
        }
    }

    /// A backend URL for this server with the given host (`localhost`, `127.0.0.1`),
    /// role (user) and query.
    pub fn url_as(&self, host: &str, user: &str, query: &str) -> String {
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("postgres://{user}@{host}:{}/postgres{query}", self.port())
    }

    /// Stops and starts the server again on the same port and data.
    pub fn restart(&self) {
        self.stop();
        self.launch();
    }
}

impl std::ops::Deref for Postgres {
    type Target = ServerProcess;
    fn deref(&self) -> &ServerProcess {
        &self.process
    }
}

/// A schema of a test's own, from [`Postgres::scratch`]; [`Scratch::close`] drops it with
/// everything in it.
pub struct Scratch {
    /// A superuser session, for looking at what the backend wrote.
    pub admin: tokio_postgres::Client,
    /// The schema's name.
    pub schema: String,
    port: u16,
}

impl Scratch {
    /// A backend URL whose tables are in this schema (`{schema}.locks`), with the given
    /// further query (e.g. `"mode=lease"`).
    pub fn url(&self, query: &str) -> String {
        let table = format!("table={}.locks", self.schema);
        let query = if query.is_empty() {
            table
        } else {
            format!("{query}&{table}")
        };
        sql_url("postgres", "postgres", self.port, "postgres", &query)
    }

    /// Drops the schema with everything in it; close every handle on it first.
    pub async fn close(self) {
        self.admin
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .await
            .expect("cannot drop the scratch schema");
    }
}
