//! The server backends: Redis (with and without AOF) and Valkey, Redlock over three Redis
//! nodes, a Redis Cluster (three masters, three replicas), PostgreSQL and MariaDB (each in
//! session and lease-table mode), etcd and ZooKeeper (three members each), a MongoDB-wire
//! server and a DynamoDB-API server, started privately by the testkit launchers, with the
//! controls the nemeses need.

use crate::cluster::{Backend, Kind, ServerCtl, Via};
use crate::nemesis::{pid_listening_on, process_tree, signal, wait_port_closed};
use dlock_testkit::servers::dynamodb::DynamoServer;
use dlock_testkit::servers::etcd::EtcdCluster;
use dlock_testkit::servers::mongodb::MongoServer;
use dlock_testkit::servers::mysql::Mysql;
use dlock_testkit::servers::postgres::Postgres;
use dlock_testkit::servers::redis::{Engine, RedisConfig, RedisServer};
use dlock_testkit::servers::redis_cluster::RedisCluster;
use dlock_testkit::servers::zookeeper::ZooKeeper;
use std::sync::Arc;
use std::time::Duration;

struct RedisCtl(Arc<RedisServer>);

impl ServerCtl for RedisCtl {
    fn name(&self) -> String {
        format!("redis-server {}", self.0.address())
    }
    fn pid(&self) -> Option<u32> {
        self.0.pid()
    }
    fn kill_and_restart(&self) {
        self.0.kill();
        self.0.start_again();
    }
}

/// Kills the process listening on `port` with SIGKILL and waits until it is gone.
fn kill_listener(port: u16) {
    if let Some(pid) = pid_listening_on(port) {
        signal(pid, libc::SIGKILL);
    }
    wait_port_closed(port, Duration::from_secs(30));
}

struct PostgresCtl(Arc<Postgres>);

impl ServerCtl for PostgresCtl {
    fn name(&self) -> String {
        format!("postgres 127.0.0.1:{}", self.0.port())
    }
    fn pid(&self) -> Option<u32> {
        pid_listening_on(self.0.port())
    }
    fn kill_and_restart(&self) {
        // A crash of the whole server (postmaster and every backend), as when its machine
        // dies: backends left running would keep the old shared memory in use and the
        // new postmaster would refuse to start.
        if let Some(pid) = self.pid() {
            let tree = process_tree(pid);
            for &pid in &tree {
                signal(pid, libc::SIGKILL);
            }
            let until = std::time::Instant::now() + Duration::from_secs(30);
            while tree.iter().any(|&p| dlock_testkit::process::is_alive(p))
                && std::time::Instant::now() < until
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        wait_port_closed(self.0.port(), Duration::from_secs(30));
        self.0.restart();
    }
}

struct MysqlCtl(Arc<Mysql>);

impl ServerCtl for MysqlCtl {
    fn name(&self) -> String {
        format!("mariadbd 127.0.0.1:{}", self.0.port())
    }
    fn pid(&self) -> Option<u32> {
        pid_listening_on(self.0.port())
    }
    fn kill_and_restart(&self) {
        kill_listener(self.0.port());
        self.0.restart();
    }
}

/// Waits until dlock can connect to `url` and query it (a server whose port is open may still
/// be starting up), for at most a minute. Runs on a thread of its own so that it can be
/// called from inside or outside a runtime.
fn wait_ready(url: &str) {
    let shown = fencelock::redact(url);
    let url = url.to_owned();
    let ready = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cannot start a runtime");
        runtime.block_on(async {
            let until = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let attempt = async { fencelock::connect(&url).await?.list().await };
                match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(err)) if std::time::Instant::now() >= until => {
                        return Err(err.to_string())
                    }
                    Err(_) if std::time::Instant::now() >= until => {
                        return Err("timed out".to_owned())
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
    })
    .join()
    .expect("readiness thread panicked");
    if let Err(err) = ready {
        panic!("{shown}: server not ready after a minute: {err}");
    }
}

/// `url` with its one host's port replaced by `new`.
fn with_port(url: &str, old: u16, new: u16) -> String {
    url.replacen(&format!("127.0.0.1:{old}"), &format!("127.0.0.1:{new}"), 1)
}

struct Single {
    name: &'static str,
    url: String,
    port: u16,
    kind: Kind,
    durable_fences: bool,
    ctl: Arc<dyn ServerCtl>,
    keep: Arc<dyn std::any::Any + Send + Sync>,
}

fn single(s: Single) -> Backend {
    wait_ready(&s.url);
    let Single {
        name,
        url,
        port,
        kind,
        durable_fences,
        ctl,
        keep,
    } = s;
    let template = url.clone();
    Backend {
        name: name.into(),
        url,
        kind,
        servers: vec![ctl],
        durable_fences,
        keep: vec![keep],
        via: Some(Via {
            ports: vec![port],
            url: Arc::new(move |ports: &[u16]| with_port(&template, port, ports[0])),
        }),
        ttl_floor: Duration::ZERO,
    }
}

/// Redis, one node; `aof` turns on `appendonly yes` with `appendfsync always`.
pub fn redis(aof: bool) -> Backend {
    let server = Arc::new(RedisServer::start_with(RedisConfig {
        appendonly: aof,
        ..RedisConfig::default()
    }));
    let name = if aof { "redis-aof" } else { "redis" };
    single(Single {
        name,
        url: server.url(),
        port: server.port(),
        kind: Kind::Ttl,
        durable_fences: aof,
        ctl: Arc::new(RedisCtl(Arc::clone(&server))),
        keep: server,
    })
}

/// Valkey, one node without persistence: the Redis backend against the other server.
pub fn valkey() -> Backend {
    let server = Arc::new(RedisServer::start_with(RedisConfig {
        engine: Engine::Valkey,
        ..RedisConfig::default()
    }));
    single(Single {
        name: "valkey",
        url: server.url(),
        port: server.port(),
        kind: Kind::Ttl,
        durable_fences: false,
        ctl: Arc::new(RedisCtl(Arc::clone(&server))),
        keep: server,
    })
}

/// A node of a Redis Cluster: killed, it comes back as a replica of the master its own
/// replica became (the cluster is healed before the next fault).
struct ClusterNodeCtl {
    cluster: Arc<RedisCluster>,
    index: usize,
}

impl ServerCtl for ClusterNodeCtl {
    fn name(&self) -> String {
        format!(
            "redis cluster node {}",
            self.cluster.nodes()[self.index].address()
        )
    }
    fn pid(&self) -> Option<u32> {
        self.cluster.nodes()[self.index].pid()
    }
    fn kill_and_restart(&self) {
        let node = &self.cluster.nodes()[self.index];
        node.kill();
        node.start_again();
        self.cluster.wait_healthy();
    }
}

/// A Redis Cluster of three masters with one replica each, without persistence. Killing a
/// master fails its slots over to the replica, which may not have the last writes
/// (replication is asynchronous): the lease may be lost, and the fence's clock floor keeps
/// fences increasing. The cluster client follows the topology the nodes announce, so the
/// network nemeses (which put proxies in front of the ports of the URL) do not apply.
pub fn redis_cluster() -> Backend {
    let cluster = Arc::new(RedisCluster::start());
    let url = cluster.url();
    wait_ready(&url);
    Backend {
        name: "redis-cluster".into(),
        url,
        kind: Kind::Ttl,
        servers: (0..cluster.nodes().len())
            .map(|index| {
                Arc::new(ClusterNodeCtl {
                    cluster: Arc::clone(&cluster),
                    index,
                }) as Arc<dyn ServerCtl>
            })
            .collect(),
        durable_fences: false,
        keep: vec![cluster as Arc<dyn std::any::Any + Send + Sync>],
        via: None,
        ttl_floor: Duration::ZERO,
    }
}

/// Redlock over three Redis nodes without persistence.
pub fn redlock() -> Backend {
    let nodes: Vec<Arc<RedisServer>> = (0..3).map(|_| Arc::new(RedisServer::start())).collect();
    let ports: Vec<u16> = nodes.iter().map(|n| n.port()).collect();
    let url_for = |ports: &[u16]| {
        let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redlock://{}", hosts.join(","))
    };
    Backend {
        name: "redlock".into(),
        url: url_for(&ports),
        kind: Kind::Ttl,
        servers: nodes
            .iter()
            .map(|n| Arc::new(RedisCtl(Arc::clone(n))) as Arc<dyn ServerCtl>)
            .collect(),
        durable_fences: false,
        keep: nodes
            .into_iter()
            .map(|n| n as Arc<dyn std::any::Any + Send + Sync>)
            .collect(),
        via: Some(Via {
            ports,
            url: Arc::new(url_for),
        }),
        ttl_floor: Duration::ZERO,
    }
}

/// How a SQL backend holds its locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlMode {
    /// Session locks, a connection per lease (the default).
    Session,
    /// Session locks, exclusive leases sharing connections (`sessions=shared`).
    SharedSessions,
    /// A lease table (`mode=lease`).
    Lease,
}

impl SqlMode {
    /// The URL query and the kind of backend it makes.
    fn query_and_kind(self) -> (&'static str, Kind) {
        match self {
            SqlMode::Session => ("", Kind::Session),
            SqlMode::SharedSessions => ("sessions=shared", Kind::Session),
            SqlMode::Lease => ("mode=lease", Kind::Ttl),
        }
    }
}

/// PostgreSQL in session mode (advisory locks, dedicated or shared sessions) or
/// lease-table mode.
pub fn postgres(mode: SqlMode) -> Backend {
    let server = Arc::new(Postgres::start(true));
    let name = match mode {
        SqlMode::Session => "postgres",
        SqlMode::SharedSessions => "postgres-shared",
        SqlMode::Lease => "postgres-lease",
    };
    let (query, kind) = mode.query_and_kind();
    single(Single {
        name,
        url: server.url(query),
        port: server.port(),
        kind,
        durable_fences: true,
        ctl: Arc::new(PostgresCtl(Arc::clone(&server))),
        keep: server,
    })
}

/// MariaDB in session mode (`GET_LOCK`, dedicated or shared sessions) or lease-table mode.
pub fn mysql(mode: SqlMode) -> Backend {
    let server = Arc::new(Mysql::start(true));
    let name = match mode {
        SqlMode::Session => "mysql",
        SqlMode::SharedSessions => "mysql-shared",
        SqlMode::Lease => "mysql-lease",
    };
    let (query, kind) = mode.query_and_kind();
    single(Single {
        name,
        url: server.url(query),
        port: server.port(),
        kind,
        durable_fences: true,
        ctl: Arc::new(MysqlCtl(Arc::clone(&server))),
        keep: server,
    })
}

/// One member of a multi-server store (etcd or ZooKeeper) the nemeses can kill and pause.
struct MemberCtl<C> {
    cluster: Arc<C>,
    index: usize,
    label: &'static str,
    port: u16,
}

/// What the harness needs of a multi-server launcher.
trait Members: Send + Sync + 'static {
    fn member_pid(&self, i: usize) -> Option<u32>;
    fn kill_member(&self, i: usize);
    fn start_member(&self, i: usize);
}

impl Members for EtcdCluster {
    fn member_pid(&self, i: usize) -> Option<u32> {
        self.pid(i)
    }
    fn kill_member(&self, i: usize) {
        self.kill(i);
    }
    fn start_member(&self, i: usize) {
        self.start_again(i);
    }
}

impl Members for ZooKeeper {
    fn member_pid(&self, i: usize) -> Option<u32> {
        self.pid(i)
    }
    fn kill_member(&self, i: usize) {
        self.kill(i);
    }
    fn start_member(&self, i: usize) {
        self.start_again(i);
    }
}

impl<C: Members> ServerCtl for MemberCtl<C> {
    fn name(&self) -> String {
        format!(
            "{} member {} (127.0.0.1:{})",
            self.label, self.index, self.port
        )
    }
    fn pid(&self) -> Option<u32> {
        self.cluster.member_pid(self.index)
    }
    fn kill_and_restart(&self) {
        self.cluster.kill_member(self.index);
        self.cluster.start_member(self.index);
    }
}

/// A store of `ports.len()` members behind one URL listing them all.
fn ensemble<C: Members>(
    name: &str,
    label: &'static str,
    cluster: Arc<C>,
    ports: Vec<u16>,
    url_for: fn(&[u16]) -> String,
    ttl_floor: Duration,
) -> Backend {
    let url = url_for(&ports);
    wait_ready(&url);
    Backend {
        name: name.into(),
        url,
        kind: Kind::Ttl,
        servers: ports
            .iter()
            .enumerate()
            .map(|(index, &port)| {
                Arc::new(MemberCtl {
                    cluster: Arc::clone(&cluster),
                    index,
                    label,
                    port,
                }) as Arc<dyn ServerCtl>
            })
            .collect(),
        durable_fences: true,
        keep: vec![cluster as Arc<dyn std::any::Any + Send + Sync>],
        via: Some(Via {
            ports,
            url: Arc::new(url_for),
        }),
        ttl_floor,
    }
}

fn port_of(host_port: &str) -> u16 {
    host_port
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a host:port endpoint")
}

fn loopback_list(scheme: &str, ports: &[u16]) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!("{scheme}://{}", hosts.join(","))
}

/// etcd, three members: a lease ends at its etcd lease's TTL when not kept alive.
pub fn etcd() -> Backend {
    let cluster = Arc::new(EtcdCluster::start_members(3));
    let ports = cluster.endpoints().iter().map(|e| port_of(e)).collect();
    // etcd's minimum lease TTL (2 s here), plus the time a new leader takes, since it
    // extends every lease when it is elected.
    let floor = Duration::from_secs(4);
    ensemble(
        "etcd",
        "etcd",
        cluster,
        ports,
        |p| loopback_list("etcd", p),
        floor,
    )
}

/// ZooKeeper, a three-server ensemble: a lease ends with its session's timeout.
pub fn zookeeper() -> Backend {
    let ensemble_ = Arc::new(ZooKeeper::start_ensemble());
    let ports = ensemble_.hosts().split(',').map(port_of).collect();
    // The servers' shortest session (2 ticks), plus a new leader's election.
    let floor = Duration::from_secs(2);
    ensemble(
        "zookeeper",
        "zookeeper",
        ensemble_,
        ports,
        |p| loopback_list("zk", p),
        floor,
    )
}

struct MongoCtl(Arc<MongoServer>);

impl ServerCtl for MongoCtl {
    fn name(&self) -> String {
        format!("secantusdb 127.0.0.1:{}", self.0.port())
    }
    fn pid(&self) -> Option<u32> {
        self.0.pid()
    }
    fn kill_and_restart(&self) {
        self.0.kill();
        self.0.restart();
    }
}

/// A MongoDB-wire server (SecantusDB), one document per key.
pub fn mongodb() -> Backend {
    let server = Arc::new(MongoServer::start());
    single(Single {
        name: "mongodb",
        url: server.url("dlock_faults"),
        port: server.port(),
        kind: Kind::Ttl,
        durable_fences: true,
        ctl: Arc::new(MongoCtl(Arc::clone(&server))),
        keep: server,
    })
}

struct DynamoCtl(Arc<DynamoServer>);

impl ServerCtl for DynamoCtl {
    fn name(&self) -> String {
        format!("dynalite 127.0.0.1:{}", self.0.port())
    }
    fn pid(&self) -> Option<u32> {
        self.0.pid()
    }
    fn kill_and_restart(&self) {
        self.0.kill();
        self.0.restart();
    }
}

/// A DynamoDB-API server (dynalite, its data on disk so that fences survive a restart),
/// one item per key.
pub fn dynamodb() -> Backend {
    let server = Arc::new(DynamoServer::dynalite_on_disk());
    single(Single {
        name: "dynamodb",
        url: server.url("dlock_faults"),
        port: server.port(),
        kind: Kind::Ttl,
        durable_fences: true,
        ctl: Arc::new(DynamoCtl(Arc::clone(&server))),
        keep: server,
    })
}
