//! A private MariaDB (or MySQL) server: `mariadb-install-db` into a temporary directory,
//! then `mariadbd` on a free loopback port, tied to the test process. A database `dlock`
//! and a user `dlock` (password `dlock-secret`) are created for the tests.

use super::{run_checked, run_setup, sql_url, ServerProcess};
use crate::process::{logged, require_binary, temp_dir};
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
}

impl std::ops::Deref for Mysql {
    type Target = ServerProcess;
    fn deref(&self) -> &ServerProcess {
        &self.process
    }
}

impl Mysql {
    /// Starts a new server. `durable` flushes the InnoDB log at every commit.
    pub fn start(durable: bool) -> Mysql {
        let install = require_binary("mariadb-install-db", "mariadb-server", BIN_DIRS);
        let server = require_binary("mariadbd", "mariadb-server", BIN_DIRS);
        let dir = temp_dir("dlock-mariadb-");
        copy_fresh_install(&install, &server, &dir.path().join("data"));
        let process = ServerProcess::new("mariadbd", "mariadbd.log", dir, libc::SIGTERM);
        let server = Mysql {
            process,
            server,
            durable,
        };
        server.launch();
        let client = require_binary("mariadb", "mariadb-client", BIN_DIRS);
        let setup = "CREATE DATABASE IF NOT EXISTS dlock; \
            CREATE USER IF NOT EXISTS 'dlock'@'%' IDENTIFIED BY 'dlock-secret'; \
            GRANT ALL ON *.* TO 'dlock'@'%' WITH GRANT OPTION; FLUSH PRIVILEGES;";
        run_checked(
            Command::new(client)
                .arg("--no-defaults")
                .arg(format!("--socket={}", server.socket().display()))
                .args(["-uroot", "-e", setup]),
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
