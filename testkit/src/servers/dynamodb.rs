//! Private DynamoDB-compatible servers for tests, since DynamoDB Local (a Java download
//! from AWS) cannot be installed from any package registry:
//!
//! * **dynalite** (npm `dynalite`, DynamoDB's API on LevelDB, in Node.js): in memory by
//!   default, or on disk with `--path`, where its data (and so the fences) survive a
//!   restart ([`DynamoServer::dynalite_on_disk`]).
//! * **moto** in server mode (PyPI `moto[server]`): in memory only; a restart loses
//!   every table. Its server handles requests on parallel threads without a lock around
//!   a conditional write's check and write, so two conditional writes can both pass;
//!   the launcher ([`MOTO_LAUNCHER`]) serves it with one lock around each request, which
//!   gives the atomic conditional writes that DynamoDB has.
//!
//! Both are installed once into the test cache (`$DLOCK_TEST_CACHE`, default
//! `~/.cache/dlock-test`) and reused by every run. Each server runs on a private
//! loopback port below 32768 (outside the kernel's range of ephemeral ports, so that no
//! client socket takes it between a stop and a restart), dies with the test process
//! (`PR_SET_PDEATHSIG`) and is killed when dropped. Its log goes to an unlinked
//! temporary file, so that a server kept in a `static` (never dropped) leaves nothing
//! behind; only dynalite on disk has a directory, removed when the server is dropped.
//!
//! The SDK needs credentials even for these servers: [`DynamoServer`] sets dummy ones in
//! the environment (`AWS_ACCESS_KEY_ID=dlocktest`…) unless some are set already, and
//! turns off the instance-metadata lookup, so that nothing leaves the loopback.

use crate::process::{spawn_tied, temp_dir, wait_for_port};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The dynalite release the backend is tested against.
pub const DYNALITE_VERSION: &str = "4.0.0";
/// The moto release the backend is tested against.
pub const MOTO_VERSION: &str = "5.2.5";

/// Runs moto's server as `moto_server` does, but one request at a time:
/// `python -c SCRIPT HOST PORT`.
pub const MOTO_LAUNCHER: &str = r#"
import os, signal, sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
host, port = sys.argv[1], int(sys.argv[2])
os.environ.setdefault("MOTO_PORT", str(port))
app = DomainDispatcherApplication(create_backend_app)
one_at_a_time = threading.Lock()
def serialized(environ, start_response):
    with one_at_a_time:
        return list(app(environ, start_response))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
run_simple(host, port, serialized, threaded=True, request_handler=MotoRequestHandler)
"#;

/// The test cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DLOCK_TEST_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/dlock-test")
}

fn run(command: &mut Command, what: &str, hint: &str) {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {what}: {err}; {hint}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Installs into `cache/name` once: `install` fills the directory, and a marker file
/// written last says it is complete. An exclusive lock on the cache serializes
/// concurrent test processes.
fn installed(name: &str, install: impl FnOnce(&Path)) -> PathBuf {
    let cache = cache_dir();
    let dir = cache.join(name);
    let marker = dir.join(".installed");
    if marker.is_file() {
        return dir;
    }
    std::fs::create_dir_all(&cache).expect("cannot create the test cache directory");
    let lock = std::fs::File::create(cache.join(".install.lock"))
        .expect("cannot create the test cache's lock file");
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a file descriptor we own; released when `lock` is closed.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if marker.is_file() {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create an install directory");
    install(&dir);
    std::fs::write(&marker, b"").expect("cannot mark an install complete");
    dir
}

/// dynalite's command-line entry point, installing it first if needed.
pub fn dynalite() -> PathBuf {
    let dir = installed(&format!("dynalite-{DYNALITE_VERSION}"), |dir| {
        run(
            Command::new("npm")
                .arg("install")
                .arg("--prefix")
                .arg(dir)
                .args([
                    "--no-audit",
                    "--no-fund",
                    "--silent",
                    &format!("dynalite@{DYNALITE_VERSION}"),
                ]),
            "npm install dynalite",
            "install the Debian packages nodejs and npm",
        );
    });
    dir.join("node_modules/dynalite/cli.js")
}

/// The Python of the virtualenv with moto, installing it first if needed.
pub fn moto_python() -> PathBuf {
    let dir = installed(&format!("moto-{MOTO_VERSION}"), |dir| {
        run(
            Command::new("python3").arg("-m").arg("venv").arg(dir),
            "python3 -m venv",
            "install the Debian package python3-venv",
        );
        run(
            Command::new(dir.join("bin/python")).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                &format!("moto[server]=={MOTO_VERSION}"),
            ]),
            "pip install moto[server]",
            "install the Debian package python3-pip",
        );
    });
    dir.join("bin/python")
}

/// Dummy credentials for the SDK, unless the environment has some already; no
/// instance-metadata lookups.
pub fn set_test_credentials() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            std::env::set_var("AWS_ACCESS_KEY_ID", "dlocktest");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "dlocktest");
        }
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    });
}

use crate::process::free_port as private_port;

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// dynalite, in memory.
    Dynalite,
    /// dynalite on LevelDB files: data survive restarts.
    DynaliteOnDisk,
    /// moto's server, in memory.
    Moto,
}

/// A private DynamoDB-compatible server.
pub struct DynamoServer {
    flavor: Flavor,
    port: u16,
    program: PathBuf,
    /// The data of dynalite on disk.
    dir: Option<tempfile::TempDir>,
    child: super::Running,
}

impl DynamoServer {
    /// Starts dynalite, in memory.
    pub fn dynalite() -> DynamoServer {
        DynamoServer::start(Flavor::Dynalite)
    }

    /// Starts dynalite with its data on disk (kept across [`restart`](Self::restart)).
    pub fn dynalite_on_disk() -> DynamoServer {
        DynamoServer::start(Flavor::DynaliteOnDisk)
    }

    /// Starts moto's server (in memory: a restart loses the tables).
    pub fn moto() -> DynamoServer {
        DynamoServer::start(Flavor::Moto)
    }

    /// Starts a server of `flavor`.
    pub fn start(flavor: Flavor) -> DynamoServer {
        set_test_credentials();
        let program = match flavor {
            Flavor::Dynalite | Flavor::DynaliteOnDisk => dynalite(),
            Flavor::Moto => moto_python(),
        };
        let server = DynamoServer {
            flavor,
            port: private_port(),
            program,
            dir: (flavor == Flavor::DynaliteOnDisk).then(|| temp_dir("dlock-dynamodb-")),
            child: super::Running::default(),
        };
        server.launch();
        server
    }

    fn launch(&self) {
        let port = self.port.to_string();
        let mut log = tempfile::tempfile().expect("cannot create a server log");
        let mut command = match self.flavor {
            Flavor::Dynalite | Flavor::DynaliteOnDisk => {
                let mut command = Command::new("node");
                command
                    .arg(&self.program)
                    .args(["--host", "127.0.0.1", "--port", &port])
                    .args(["--createTableMs", "0", "--deleteTableMs", "0"]);
                if let Some(dir) = &self.dir {
                    command.arg("--path").arg(dir.path().join("data"));
                }
                command
            }
            Flavor::Moto => {
                let mut command = Command::new(&self.program);
                command
                    .args(["-c", MOTO_LAUNCHER, "127.0.0.1", &port])
                    .env("MOTO_CALL_RESET_API", "false");
                command
            }
        };
        command
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cannot clone a log handle"))
            .stderr(log.try_clone().expect("cannot clone a log handle"));
        let child = spawn_tied(command).expect("cannot start the DynamoDB test server");
        self.child.set(child);
        // Loading moto's Python modules takes seconds on a loaded machine.
        if !wait_for_port(self.port, Duration::from_secs(90)) {
            let mut text = String::new();
            let _ = log.rewind();
            let _ = log.read_to_string(&mut text);
            panic!(
                "{:?} did not listen on port {} within 90 s; log:\n{text}",
                self.flavor, self.port
            );
        }
    }

    /// Which server this is.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// True if its data survive a restart.
    pub fn keeps_data(&self) -> bool {
        self.flavor == Flavor::DynaliteOnDisk
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `dynamodb://TABLE?region=us-east-1&endpoint=http://127.0.0.1:PORT`.
    pub fn url(&self, table: &str) -> String {
        format!(
            "dynamodb://{table}?region=us-east-1&endpoint={}",
            self.endpoint()
        )
    }

    /// Stops it (SIGTERM; SIGKILL after 10 s). dynalite writes every item to LevelDB as
    /// it goes, so its on-disk data survive either.
    pub fn stop(&self) {
        self.child.stop(Duration::from_secs(10));
    }

    /// Stops it and starts it again on the same port (with the same data where it
    /// keeps data: [`keeps_data`](Self::keeps_data)).
    pub fn restart(&self) {
        self.stop();
        self.launch();
    }

    /// The data directory of dynalite on disk.
    pub fn data_dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(tempfile::TempDir::path)
    }
}

/// The process controls (`pid`, `kill`, `pause`, `resume`) are those of every launcher.
impl std::ops::Deref for DynamoServer {
    type Target = super::Running;
    fn deref(&self) -> &super::Running {
        &self.child
    }
}

impl Drop for DynamoServer {
    fn drop(&mut self) {
        self.kill();
    }
}
