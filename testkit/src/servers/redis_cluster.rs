//! A private Redis Cluster for tests: `masters` × (1 + `replicas_per_master`)
//! [`RedisServer`]s in cluster mode on loopback ports below 32768, joined by
//! `redis-cli --cluster create`, and handed out once every node reports
//! `cluster_state:ok` and every replica is in sync with its master. Dropping it kills
//! every node and removes their directories.

use super::redis::{Engine, RedisConfig, RedisServer};
use crate::process::require_binary;
use std::process::Command;
use std::time::{Duration, Instant};

/// How a [`RedisCluster`] is made.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Number of masters (at least 3, Redis's minimum).
    pub masters: usize,
    /// Replicas of each master.
    pub replicas_per_master: usize,
    /// `cluster-node-timeout`: how long a master may be unreachable before a replica
    /// takes over.
    pub node_timeout: Duration,
    /// Which server program runs.
    pub engine: Engine,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            masters: 3,
            replicas_per_master: 1,
            node_timeout: Duration::from_millis(1500),
            engine: Engine::Redis,
        }
    }
}

/// A private Redis Cluster.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// How long forming the cluster, or healing it after a failover, may take.
const SETTLE: Duration = Duration::from_secs(60);

impl RedisCluster {
    /// 3 masters with one replica each.
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(ClusterConfig::default())
    }

    /// A cluster made as `config` says.
    pub fn start_with(config: ClusterConfig) -> RedisCluster {
        let count = config.masters * (1 + config.replicas_per_master);
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                RedisServer::start_with(RedisConfig {
                    engine: config.engine,
                    cluster_node_timeout: Some(config.node_timeout),
                    ..RedisConfig::default()
                })
            })
            .collect();
        let mut create = Command::new(require_binary("redis-cli", "redis-tools", &[]));
        create.arg("--cluster").arg("create");
        create.args(nodes.iter().map(RedisServer::address));
        create.args([
            "--cluster-replicas",
            &config.replicas_per_master.to_string(),
            "--cluster-yes",
        ]);
        let output = create
            .output()
            .expect("cannot run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_healthy();
        cluster
    }

    /// `redis+cluster://` naming every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(RedisServer::address).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Every node, masters and replicas.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The nodes that run.
    fn running(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|node| node.pid().is_some())
    }

    /// The master that serves `key`'s hash slot now, as the running nodes see it.
    pub fn master_of(&self, key: &str) -> &RedisServer {
        let asker = self.running().next().expect("no node runs");
        let slot: u16 = asker
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answered no number");
        // Lines of CLUSTER NODES: id host:port@bus flags master ping pong epoch state slots…
        let nodes = asker.cli(&["CLUSTER", "NODES"]);
        let port = nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = fields.get(2)?;
                if !flags.contains("master") || flags.contains("fail") {
                    return None;
                }
                let port: u16 = fields.get(1)?.split(['@', ',']).next()?.rsplit(':').next()?.parse().ok()?;
                let serves = fields.get(8..)?.iter().any(|range| {
                    let (low, high) = range.split_once('-').unwrap_or((range, range));
                    matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(l), Ok(h)) if l <= slot && slot <= h)
                });
                serves.then_some(port)
            })
            .next()
            .unwrap_or_else(|| panic!("no master serves slot {slot}:\n{nodes}"));
        self.nodes
            .iter()
            .find(|node| node.port() == port)
            .expect("the master is not one of ours")
    }

    /// Waits until every running node reports `cluster_state:ok` and every running
    /// master has all its running replicas in sync (after forming the cluster, after a
    /// failover, after a killed node came back as a replica).
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + SETTLE;
        loop {
            if self.is_healthy() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle within {SETTLE:?}; CLUSTER NODES:\n{}",
                self.running()
                    .next()
                    .map(|n| n.cli(&["CLUSTER", "NODES"]))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn is_healthy(&self) -> bool {
        self.running().all(|node| {
            let info = node.cli(&["CLUSTER", "INFO"]);
            if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                return false;
            }
            let replication = node.cli(&["INFO", "replication"]);
            let field = |name: &str| {
                replication
                    .lines()
                    .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
                    .map(str::to_owned)
            };
            match field("role").as_deref() {
                // A replica counts once its link is up and the initial sync is done.
                Some("slave") => {
                    field("master_link_status").as_deref() == Some("up")
                        && field("master_sync_in_progress").as_deref() == Some("0")
                }
                Some("master") => true,
                _ => false,
            }
        })
    }
}
