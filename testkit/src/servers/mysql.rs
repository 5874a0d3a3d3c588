//! A private MariaDB (or MySQL) server: `mariadb-install-db` into a temporary directory,
//! then `mariadbd` on a free loopback port, tied to the test process. A database `dlock`
//! and a user `dlock` (password `dlock-secret`) are created for the tests.
//!
//! [`Mysql::start_tls`] starts one that also speaks TLS, with a certificate of a
//! [`TestCa`] for the host name `localhost` only.

use super::{run_checked, run_setup, sql_url, ServerProcess};
use crate::process::{logged, require_binary, temp_dir};
use crate::tls::TestCa;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const BIN_DIRS: &[&str] = &["/usr/sbin", "/usr/bin"];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The options that give a server (and its `mariadb-install-db`) a temporary directory of
/// its own, inside `dir`: a starting server deletes every `#sql*` file in its temporary
/// directory, so servers sharing one (the default, /tmp) delete each other's temporary
/// tables ("Could not remove temporary table", failed installs). The InnoDB log is kept
/// small too (16 MB, instead of 96 MB per server written at install).
fn install_and_server_options(dir: &std::path::Path) -> [String; 2] {
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).expect("cannot create the server's temporary directory");
    [
        format!("--tmpdir={}", tmp.display()),
        "--innodb-log-file-size=16M".to_owned(),
    ]
}

/// A running private MariaDB server.
pub struct Mysql {
    process: ServerProcess,
    server: PathBuf,
    durable: bool,
    tls: bool,
}

/// The users of a TLS server besides `dlock` (all privileges, password `dlock-secret`):
/// `dlock_tls` may connect only over TLS (`REQUIRE SSL`), `dlock_cert` only with a client
/// certificate of the CA whose subject is `/CN=dlock_cert`.
pub const TLS_USERS: &[&str] = &["dlock_tls", "dlock_cert"];

impl std::ops::Deref for Mysql {
    type Target = ServerProcess;
    fn deref(&self) -> &ServerProcess {
        &self.process
    }
}

impl Mysql {
    /// Starts a new server. `durable` flushes the InnoDB log at every commit.
    pub fn start(durable: bool) -> Mysql {
        Mysql::start_with(durable, None)
    }

    /// Starts a new server that speaks TLS: its certificate is issued by `ca` for
    /// `localhost` (not for `127.0.0.1`, so that a URL with that address names the wrong
    /// host), client certificates of `ca` are checked, and [`TLS_USERS`] exist.
    pub fn start_tls(ca: &TestCa) -> Mysql {
        Mysql::start_with(false, Some(ca))
    }

    fn start_with(durable: bool, ca: Option<&TestCa>) -> Mysql {
        let install = require_binary("mariadb-install-db", "mariadb-server", BIN_DIRS);
        let server = require_binary("mariadbd", "mariadb-server", BIN_DIRS);
        let dir = temp_dir("dlock-mariadb-");
        copy_fresh_install(&install, &server, &dir.path().join("data"));
        if let Some(ca) = ca {
            let issued = ca.issue("mariadb-server", "localhost", &["localhost"]);
            for (from, to) in [
                (issued.cert_file.as_path(), "server.pem"),
                (issued.key_file.as_path(), "server.key"),
                (ca.ca_file(), "ca.pem"),
            ] {
                std::fs::copy(from, dir.path().join(to)).expect("cannot copy a TLS file");
            }
        }
        let process = ServerProcess::new("mariadbd", "mariadbd.log", dir, libc::SIGTERM);
        let server = Mysql {
            process,
            server,
            durable,
            tls: ca.is_some(),
        };
        server.launch();
        let client = require_binary("mariadb", "mariadb-client", BIN_DIRS);
        let mut setup = "CREATE DATABASE IF NOT EXISTS dlock; \
            CREATE USER IF NOT EXISTS 'dlock'@'%' IDENTIFIED BY 'dlock-secret'; \
            GRANT ALL ON *.* TO 'dlock'@'%' WITH GRANT OPTION;"
            .to_owned();
        if server.tls {
            setup.push_str(
                " CREATE USER 'dlock_tls'@'%' IDENTIFIED BY 'dlock-secret' REQUIRE SSL; \
                GRANT ALL ON *.* TO 'dlock_tls'@'%'; \
                CREATE USER 'dlock_cert'@'%' IDENTIFIED BY 'dlock-secret' REQUIRE SUBJECT '/CN=dlock_cert'; \
                GRANT ALL ON *.* TO 'dlock_cert'@'%';",
            );
        }
        setup.push_str(" FLUSH PRIVILEGES;");
        run_checked(
            Command::new(client)
                .arg("--no-defaults")
                .arg(format!("--socket={}", server.socket().display()))
                .args(["-uroot", "-e", &setup]),
            "the mariadb client's setup",
        );
        server
    }

    /// One server per test binary, started on first use.
    pub fn shared() -> &'static Mysql {
        static SHARED: OnceLock<Mysql> = OnceLock::new();
        let mut fresh = false;
        let server = SHARED.get_or_init(|| {
            fresh = true;
            Mysql::start(false)
        });
        if fresh {
            super::keep_until_exit(server);
        }
        server
    }

    /// A backend URL for this server with the given query (e.g. `"mode=lease"`).
    pub fn url(&self, query: &str) -> String {
        sql_url("mysql", "dlock:dlock-secret", self.port(), "dlock", query)
    }

    /// A backend URL for this server with the given host (`localhost`, `127.0.0.1`),
    /// user (password `dlock-secret`) and query.
    pub fn url_as(&self, host: &str, user: &str, query: &str) -> String {
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!(
            "mysql://{user}:dlock-secret@{host}:{}/dlock{query}",
            self.port()
        )
    }

    fn socket(&self) -> PathBuf {
        self.process.dir.path().join("mysqld.sock")
    }

    /// Starts the server (again) on its port and data, after [`stop`](Self::stop).
    pub fn launch(&self) {
        let mut command = logged(&self.server, self.process.dir.path(), "mariadbd.log");
        command
            .arg("--no-defaults")
            .arg(format!(
                "--datadir={}",
                self.process.dir.path().join("data").display()
            ))
            .arg(format!("--port={}", self.port()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!(
                "--pid-file={}",
                self.process.dir.path().join("mariadbd.pid").display()
            ))
            .args(["--bind-address=127.0.0.1", "--skip-name-resolve"])
            .args(install_and_server_options(self.process.dir.path()))
            .args([
                "--max-connections=600",
                "--innodb-buffer-pool-size=64M",
                "--skip-log-bin",
            ]);
        if is_root() {
            // mariadbd refuses to run as root unless told to.
            command.arg("--user=root");
        }
        if self.tls {
            let dir = self.process.dir.path();
            command
                .arg(format!("--ssl-cert={}", dir.join("server.pem").display()))
                .arg(format!("--ssl-key={}", dir.join("server.key").display()))
                .arg(format!("--ssl-ca={}", dir.join("ca.pem").display()));
        }
        if !self.durable {
            command.args([
                "--innodb-flush-log-at-trx-commit=0",
                "--sync-binlog=0",
                "--innodb-doublewrite=0",
            ]);
        }
        self.process.spawn(command);
        // The TCP port opens a moment before the socket the setup uses.
        self.wait_for_socket();
    }

    fn wait_for_socket(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mariadbd did not open {}: {}",
                self.socket().display(),
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Stops and starts the server again on the same port and data.
    pub fn restart(&self) {
        self.stop();
        self.launch();
    }
}

/// Copies a fresh install's data directory to `data`. `mariadb-install-db` runs once per
/// MariaDB build into a template in the test cache, which every server copies: an
/// install takes a second of CPU (several on a loaded machine), and under nextest every
/// test process starts its own server, beside tests that measure time.
fn copy_fresh_install(install: &Path, server: &Path, data: &Path) {
    let template = template_data_dir(install, server);
    run_checked(
        Command::new("cp").arg("-a").arg(&template).arg(data),
        "copying the MariaDB template data directory",
    );
}

/// `<cache>/mariadb-datadir-v1-<size>-<mtime of mariadbd>` (v1: the install options),
/// installed unless it is there.
/// Concurrent test processes may install at once; the first complete install to be
/// renamed into place wins, and a partial one never is.
fn template_data_dir(install: &Path, server: &Path) -> PathBuf {
    let built = std::fs::metadata(server)
        .map(|m| {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            format!("{}-{mtime}", m.len())
        })
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", server.display()));
    let cache = super::pypi::cache_dir();
    let template = cache.join(format!("mariadb-datadir-v1-{built}"));
    if template.is_dir() {
        return template;
    }
    std::fs::create_dir_all(&cache)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", cache.display()));
    let work = tempfile::Builder::new()
        .prefix("mariadb-install-")
        .tempdir_in(&cache)
        .expect("cannot create a directory in the test cache");
    let data = work.path().join("data");
    let mut init = logged(install, work.path(), "install.log");
    init.arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
        .args(install_and_server_options(work.path()));
    if is_root() {
        init.arg("--user=root");
    }
    run_setup(&mut init, work.path(), "install.log", "mariadb-install-db");
    if std::fs::rename(&data, &template).is_err() && !template.is_dir() {
        panic!("cannot move the MariaDB install to {}", template.display());
    }
    template
}
