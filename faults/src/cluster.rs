//! The backends under test: their URLs, the servers behind them (started privately from
//! the installed binaries by the testkit launchers), and what dlock promises on each.

use crate::nemesis::Nemesis;
use crate::servers::SqlMode;
use std::any::Any;
use std::sync::Arc;

/// A server the nemeses can kill, restart and pause.
pub trait ServerCtl: Send + Sync {
    /// For messages: "redis 127.0.0.1:6400".
    fn name(&self) -> String;
    /// The server's pid now (it changes at restart).
    fn pid(&self) -> Option<u32>;
    /// SIGKILLs the server and starts it again on the same port and data; blocks until it
    /// accepts connections.
    fn kill_and_restart(&self);
}

/// How a backend treats a holder that stops answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// flock(2): the lock lives exactly as long as the holder's open file.
    Flock,
    /// In one process.
    Memory,
    /// A lease with a server-side TTL (Redis, Redlock, SQL lease tables).
    Ttl,
    /// A lock tied to a database session (PostgreSQL advisory locks).
    Session,
}

/// One backend under test.
pub struct Backend {
    /// Short name for reports ("file", "redis-aof", …).
    pub name: String,
    /// The URL the workers connect to.
    pub url: String,
    /// How the backend holds locks.
    pub kind: Kind,
    /// The servers behind it (empty for file and memory).
    pub servers: Vec<Arc<dyn ServerCtl>>,
    /// Whether fences survive a server restart (data on disk).
    pub durable_fences: bool,
    /// Keeps temporary directories and servers alive.
    pub keep: Vec<Arc<dyn Any + Send + Sync>>,
    /// The servers' ports, and how to write the URL when a client reaches them through
    /// other ports (its own proxies, for the partition nemesis).
    pub via: Option<Via>,
    /// The shortest lease the store grants whatever the TTL asked (etcd rounds a lease up
    /// to its minimum TTL, and extends every lease when a new leader is elected): the
    /// end-of-run check waits for leases of at least this length to run out.
    pub ttl_floor: std::time::Duration,
}

/// The servers' ports and the URL for other ports.
#[derive(Clone)]
pub struct Via {
    /// The ports of the servers, in URL order.
    pub ports: Vec<u16>,
    /// The URL naming these ports instead.
    pub url: UrlFor,
}

/// Writes a backend URL naming the given ports.
pub type UrlFor = Arc<dyn Fn(&[u16]) -> String + Send + Sync>;

impl Backend {
    /// A backend on `file://` in a fresh temporary directory.
    pub fn file() -> Backend {
        let dir = dlock_testkit::process::temp_dir("dlock-faults-file-");
        Backend {
            name: "file".into(),
            url: format!("file://{}", dir.path().display()),
            kind: Kind::Flock,
            servers: Vec::new(),
            durable_fences: true,
            keep: vec![Arc::new(dir)],
            via: None,
            ttl_floor: std::time::Duration::ZERO,
        }
    }

    /// A backend on `memory://` (workers run as tasks of the harness process).
    pub fn memory() -> Backend {
        Backend {
            name: "memory".into(),
            url: format!("memory://faults{}", rand::random::<u32>()),
            kind: Kind::Memory,
            servers: Vec::new(),
            durable_fences: true,
            keep: Vec::new(),
            via: None,
            ttl_floor: std::time::Duration::ZERO,
        }
    }

    /// A backend at a URL the harness does not control (only client nemeses apply),
    /// classified by what the backend itself declares, never by the URL's text.
    pub fn external(url: &str) -> Result<Backend, String> {
        let capabilities = {
            let url = url.to_owned();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    fencelock::connect(&url)
                        .await
                        .map(|locks| locks.backend().capabilities())
                        .map_err(|e| e.to_string())
                })
            })
            .join()
            .map_err(|_| "the connecting thread panicked".to_owned())??
        };
        let kind = if !capabilities.shared_between_processes {
            Kind::Memory
        } else if capabilities.expires {
            Kind::Ttl
        } else if matches!(fencelock::Scheme::of(url), Ok(fencelock::Scheme::File)) {
            Kind::Flock
        } else {
            Kind::Session
        };
        Ok(Backend {
            name: fencelock::redact(url),
            url: url.to_owned(),
            kind,
            servers: Vec::new(),
            durable_fences: true,
            keep: Vec::new(),
            via: None,
            ttl_floor: std::time::Duration::ZERO,
        })
    }

    /// Every backend this build can start, by name.
    pub fn names() -> Vec<&'static str> {
        vec![
            "file",
            "memory",
            "redis",
            "redis-aof",
            "valkey",
            "redlock",
            "redis-cluster",
            "postgres",
            "postgres-shared",
            "postgres-lease",
            "mysql",
            "mysql-shared",
            "mysql-lease",
            "etcd",
            "zookeeper",
            "mongodb",
            "dynamodb",
        ]
    }

    /// Starts the backend called `name` (see [`Backend::names`]), or uses `name` as a URL.
    pub fn start(name: &str) -> Result<Backend, String> {
        match name {
            "file" => Ok(Backend::file()),
            "memory" => Ok(Backend::memory()),
            "redis" => Ok(crate::servers::redis(false)),
            "redis-aof" => Ok(crate::servers::redis(true)),
            "valkey" => Ok(crate::servers::valkey()),
            "redlock" => Ok(crate::servers::redlock()),
            "redis-cluster" => Ok(crate::servers::redis_cluster()),
            "postgres" => Ok(crate::servers::postgres(SqlMode::Session)),
            "postgres-shared" => Ok(crate::servers::postgres(SqlMode::SharedSessions)),
            "postgres-lease" => Ok(crate::servers::postgres(SqlMode::Lease)),
            "mysql" => Ok(crate::servers::mysql(SqlMode::Session)),
            "mysql-shared" => Ok(crate::servers::mysql(SqlMode::SharedSessions)),
            "mysql-lease" => Ok(crate::servers::mysql(SqlMode::Lease)),
            "etcd" => Ok(crate::servers::etcd()),
            "zookeeper" => Ok(crate::servers::zookeeper()),
            "mongodb" => Ok(crate::servers::mongodb()),
            "dynamodb" => Ok(crate::servers::dynamodb()),
            url if url.contains("://") => Backend::external(url),
            other => Err(format!(
                "unknown backend {other:?}; known: {} or a URL",
                Backend::names().join(", ")
            )),
        }
    }

    /// Whether `nemesis` can run here; `Err` says why not.
    pub fn applicable(&self, nemesis: Nemesis) -> Result<(), &'static str> {
        let client_processes = self.kind != Kind::Memory;
        match nemesis {
            Nemesis::None | Nemesis::KillClient | Nemesis::Mixed => Ok(()),
            Nemesis::PauseClient if client_processes => Ok(()),
            Nemesis::PauseClient => Err(
                "memory:// clients are tasks of one process; a task cannot be stopped from outside",
            ),
            Nemesis::KillServer | Nemesis::PauseServer if self.servers.is_empty() => {
                Err("no server: the backend is local, or the harness does not control it")
            }
            Nemesis::KillServer | Nemesis::PauseServer => Ok(()),
            Nemesis::Clock if !client_processes => {
                Err("memory:// clients share the harness process's clock")
            }
            Nemesis::Clock if crate::nemesis::libfaketime().is_none() => {
                Err("libfaketime is not installed (apt-get install faketime)")
            }
            Nemesis::Clock => Ok(()),
            Nemesis::Partition | Nemesis::Slow | Nemesis::Freeze | Nemesis::Degrade
                if self.via.is_none() =>
            {
                Err("no network between client and store: the backend is local, or the harness does not control it")
            }
            Nemesis::Partition | Nemesis::Slow | Nemesis::Freeze | Nemesis::Degrade => Ok(()),
            Nemesis::ForceRelease => Ok(()),
            Nemesis::ProcessTree if !client_processes => {
                Err("memory:// locks live in one process; dlock run cannot share them")
            }
            Nemesis::ProcessTree => Ok(()),
            Nemesis::HostileDir if self.kind == Kind::Flock && self.url.starts_with("file://") => {
                Ok(())
            }
            Nemesis::HostileDir => Err("only the file backend has a lock directory"),
        }
    }

    /// Whether dlock's README allows two holders' critical sections to overlap on this
    /// backend under `nemesis` (the fence must then reject the stale holder's writes).
    pub fn overlap_possible(&self, nemesis: Nemesis) -> bool {
        match (self.kind, nemesis) {
            // Breaking a held lock is what force-release is for: the next holder starts
            // while the old one may still be inside its section, on every backend.
            (_, Nemesis::ForceRelease) => true,
            // The process-tree nemesis breaks `dlock run`'s own key, never the workers'.
            (_, Nemesis::None | Nemesis::KillClient | Nemesis::ProcessTree) => false,
            // A stopped holder keeps its flock; clocks play no part in flock.
            (Kind::Flock | Kind::Memory, _) => false,
            // A stopped holder's lease runs out at the server while it sleeps; a client whose
            // clock jumps back renews too late; a server restart without persistence forgets.
            (Kind::Ttl, _) => true,
            // A cut-off client stays in its session and the server keeps the lock; a killed
            // server ends every
            // session, and a holder mid-section learns of it only afterwards. The clock
            // nemesis moves the client's CLOCK_MONOTONIC back too (libfaketime), which no
            // real clock does: the runtime's timers then fire early, renewals count as
            // timed out, and after a TTL of them the holder gives its session lock up
            // (`lost()` fires) while the naive worker goes on writing.
            (Kind::Session, Nemesis::KillServer | Nemesis::Mixed | Nemesis::Clock) => true,
            (Kind::Session, _) => false,
        }
    }
}
