//! The conformance suite on `redlock://` over 3 and over 5 private redis-servers.

use dlock_testkit::servers::redis::RedisServer;
use std::sync::OnceLock;

fn url(nodes: &[RedisServer]) -> String {
    let hosts: Vec<String> = nodes.iter().map(RedisServer::address).collect();
    format!("redlock://{}", hosts.join(","))
}

mod three_nodes {
    use super::*;

    fn servers() -> &'static Vec<RedisServer> {
        static SERVERS: OnceLock<Vec<RedisServer>> = OnceLock::new();
        SERVERS.get_or_init(|| (0..3).map(|_| RedisServer::start()).collect())
    }

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(url(servers()), env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}

mod five_nodes {
    use super::*;

    fn servers() -> &'static Vec<RedisServer> {
        static SERVERS: OnceLock<Vec<RedisServer>> = OnceLock::new();
        SERVERS.get_or_init(|| (0..5).map(|_| RedisServer::start()).collect())
    }

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(url(servers()), env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}
