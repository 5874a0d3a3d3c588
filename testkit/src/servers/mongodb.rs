//! Private MongoDB-compatible servers for tests: SecantusDB (the PyPI package
//! `secantusdb`, on WiredTiger, with unique and TTL indexes and change streams), since
//! no MongoDB server package can be installed from the distribution.
//!
//! The package is installed once into a virtualenv in the test cache
//! (`$DLOCK_TEST_CACHE`, default `~/.cache/dlock-test`), then reused by every run. Each
//! server runs in a Python process of its own on a private loopback port below 32768
//! (outside the kernel's range of ephemeral ports, so that no client socket takes it
//! between a stop and a restart), with its data in a temporary directory and its TTL
//! sweep every second. It is killed when dropped; a server kept in a `static` (never
//! dropped) stops and removes its directory itself when the test process dies.

use crate::process::{logged, spawn_tied, temp_dir, wait_for_port};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The SecantusDB release the backend is tested against.
pub const SECANTUSDB_VERSION: &str = "0.7.0b3";

/// Starts one server: `python -c SCRIPT PORT DATA_DIR CLEANUP_DIR`. SIGTERM stops it
/// and keeps its data (for restarts); the death of the test process (SIGHUP, through
/// `PR_SET_PDEATHSIG`) stops it and removes `CLEANUP_DIR`.
const LAUNCHER: &str = r#"
import ctypes, os, shutil, signal, sys, threading
port, data, cleanup = int(sys.argv[1]), sys.argv[2], sys.argv[3]
parent = os.getppid()
ctypes.CDLL(None).prctl(1, signal.SIGHUP)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    shutil.rmtree(cleanup, ignore_errors=True)
    sys.exit(1)
from secantus import SecantusDBServer
server = SecantusDBServer(host="127.0.0.1", port=port, storage_path=data, ttl_sweep_seconds=1.0)
why = []
done = threading.Event()
def stop(signum, frame):
    why.append(signum)
    done.set()
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGHUP, stop)
server.start()
done.wait()
server.stop()
if why and why[0] == signal.SIGHUP:
    shutil.rmtree(cleanup, ignore_errors=True)
"#;

pub use super::pypi::cache_dir;

/// The virtualenv's Python with SecantusDB, installing it first if needed.
pub fn python() -> PathBuf {
    super::pypi::venv("secantusdb", SECANTUSDB_VERSION).join("bin/python")
}

use crate::process::free_port as private_port;

/// A private SecantusDB server.
pub struct MongoServer {
    port: u16,
    python: PathBuf,
    dir: tempfile::TempDir,
    child: super::Running,
}

impl MongoServer {
    /// Starts a server in a fresh directory.
    pub fn start() -> MongoServer {
        let server = MongoServer {
            port: private_port(),
            python: python(),
            dir: temp_dir("dlock-mongodb-"),
            child: super::Running::default(),
        };
        server.launch();
        server
    }

    fn launch(&self) {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).expect("cannot create the data directory");
        let mut command = logged(&self.python, self.dir.path(), "server.log");
        command
            .arg("-c")
            .arg(LAUNCHER)
            .arg(self.port.to_string())
            .arg(&data)
            .arg(self.dir.path());
        let child = spawn_tied(command).expect("cannot start SecantusDB");
        self.child.set(child);
        // Importing the server takes seconds on a loaded machine.
        if !wait_for_port(self.port, Duration::from_secs(90)) {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            panic!(
                "SecantusDB did not listen on port {} within 90 s; log:\n{log}",
                self.port
            );
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mongodb://127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, database: &str) -> String {
        format!("mongodb://127.0.0.1:{}/{database}", self.port)
    }

    /// Stops it cleanly (SIGTERM), keeping its data; killed if it takes over 30 s.
    pub fn stop(&self) {
        self.child.stop(Duration::from_secs(30));
    }

    /// Stops it cleanly and starts it again on the same port with the same data.
    pub fn restart(&self) {
        self.stop();
        self.launch();
    }

    /// The server's directory (its data is in `data/`, its log in `server.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The process controls (`pid`, `kill`, `pause`, `resume`) are those of every launcher.
impl std::ops::Deref for MongoServer {
    type Target = super::Running;
    fn deref(&self) -> &super::Running {
        &self.child
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        self.kill();
    }
}
