//! A private PostgreSQL cluster: `initdb` into a temporary directory, then `postgres` on a
//! free loopback port (unix socket inside the directory too), tied to the test process.
//! PostgreSQL refuses to run as root, so under root the cluster runs as the `postgres`
//! system user of the Debian package.

use crate::process::{free_port, logged, require_binary, spawn_tied, temp_dir, wait_for_port};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

const BIN_DIRS: &[&str] = &["/usr/lib/postgresql/*/bin"];

/// A running private PostgreSQL server.
pub struct Postgres {
    port: u16,
    dir: tempfile::TempDir,
    postgres: PathBuf,
    durable: bool,
    child: Mutex<Option<Child>>,
}

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
        let status = init.status().expect("cannot run initdb");
        assert!(
            status.success(),
            "initdb failed: {}",
            std::fs::read_to_string(dir.path().join("initdb.log")).unwrap_or_default()
        );
        let server = Postgres {
            port: free_port(),
            dir,
            postgres,
            durable,
            child: Mutex::new(None),
        };
        server.launch();
        server
    }

    /// One server per test binary, started on first use.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| Postgres::start(false))
    }

    /// Starts the server (again) on its port and data, after [`stop`](Self::stop).
    pub fn launch(&self) {
        let mut command = logged(&self.postgres, self.dir.path(), "postgres.log");
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
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
            .current_dir(self.dir.path());
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
        let child = spawn_tied(command).expect("cannot start postgres");
        assert!(
            wait_for_port(self.port, Duration::from_secs(60)),
            "postgres did not open port {}: {}",
            self.port,
            self.log()
        );
        // The port opens a moment before the server accepts sessions.
        std::thread::sleep(Duration::from_millis(200));
        *self.child.lock().unwrap() = Some(child);
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
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
            "postgres://postgres@127.0.0.1:{}/postgres{query}",
            self.port
        )
    }

    /// Stops the server (fast shutdown: sessions are terminated) and waits for it.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            crate::process::signal(child.id(), libc::SIGINT);
            child.wait().expect("cannot wait for postgres");
        }
    }

    /// Stops and starts the server again on the same port and data.
    pub fn restart(&self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            crate::process::signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }
}
