//! A private MariaDB (or MySQL) server: `mariadb-install-db` into a temporary directory,
//! then `mariadbd` on a free loopback port, tied to the test process. A database `dlock`
//! and a user `dlock` (password `dlock-secret`) are created for the tests.

use crate::process::{free_port, logged, require_binary, spawn_tied, temp_dir, wait_for_port};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

const BIN_DIRS: &[&str] = &["/usr/sbin", "/usr/bin"];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A running private MariaDB server.
pub struct Mysql {
    port: u16,
    dir: tempfile::TempDir,
    server: PathBuf,
    durable: bool,
    child: Mutex<Option<Child>>,
}

impl Mysql {
    /// Starts a new server. `durable` flushes the InnoDB log at every commit.
    pub fn start(durable: bool) -> Mysql {
        let install = require_binary("mariadb-install-db", "mariadb-server", BIN_DIRS);
        let server = require_binary("mariadbd", "mariadb-server", BIN_DIRS);
        let dir = temp_dir("dlock-mariadb-");
        let data = dir.path().join("data");
        let mut init = logged(&install, dir.path(), "install.log");
        init.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if is_root() {
            init.arg("--user=root");
        }
        let status = init.status().expect("cannot run mariadb-install-db");
        assert!(
            status.success(),
            "mariadb-install-db failed: {}",
            std::fs::read_to_string(dir.path().join("install.log")).unwrap_or_default()
        );
        let server = Mysql {
            port: free_port(),
            dir,
            server,
            durable,
            child: Mutex::new(None),
        };
        server.launch();
        let client = require_binary("mariadb", "mariadb-client", BIN_DIRS);
        let setup = "CREATE DATABASE IF NOT EXISTS dlock; \
            CREATE USER IF NOT EXISTS 'dlock'@'%' IDENTIFIED BY 'dlock-secret'; \
            GRANT ALL ON *.* TO 'dlock'@'%' WITH GRANT OPTION; FLUSH PRIVILEGES;";
        let output = Command::new(client)
            .arg("--no-defaults")
            .arg(format!("--socket={}", server.socket().display()))
            .args(["-uroot", "-e", setup])
            .output()
            .expect("cannot run the mariadb client");
        assert!(
            output.status.success(),
            "setup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        server
    }

    /// One server per test binary, started on first use.
    pub fn shared() -> &'static Mysql {
        static SHARED: OnceLock<Mysql> = OnceLock::new();
        SHARED.get_or_init(|| Mysql::start(false))
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    /// Starts the server (again) on its port and data, after [`stop`](Self::stop).
    pub fn launch(&self) {
        let mut command = logged(&self.server, self.dir.path(), "mariadbd.log");
        command
            .arg("--no-defaults")
            .arg(format!(
                "--datadir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--port={}", self.port))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("mariadbd.pid").display()
            ))
            .args(["--bind-address=127.0.0.1", "--skip-name-resolve"])
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
        let child = spawn_tied(command).expect("cannot start mariadbd");
        assert!(
            wait_for_port(self.port, Duration::from_secs(60)),
            "mariadbd did not open port {}: {}",
            self.port,
            self.log()
        );
        *self.child.lock().unwrap() = Some(child);
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mariadbd.log")).unwrap_or_default()
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A backend URL for this server with the given query (e.g. `"mode=lease"`).
    pub fn url(&self, query: &str) -> String {
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!(
            "mysql://dlock:dlock-secret@127.0.0.1:{}/dlock{query}",
            self.port
        )
    }

    /// Stops the server (SIGTERM: orderly shutdown) and waits for it.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            crate::process::signal(child.id(), libc::SIGTERM);
            child.wait().expect("cannot wait for mariadbd");
        }
    }

    /// Stops and starts the server again on the same port and data.
    pub fn restart(&self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Mysql {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            crate::process::signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }
}
