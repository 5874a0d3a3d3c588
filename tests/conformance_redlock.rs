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

/// A permit holds one slot of N on each node of its majority, so holders spread over
/// different majorities cannot exceed N. Here two permits of a 2-permit semaphore are
/// held on different majorities (A on nodes 0 and 1, B on nodes 0 and 2), so nodes 1
/// and 2 each count only one: a third permit must still be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permits_over_different_majorities_never_exceed_the_count() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let locks = fencelock::connect(&url(&nodes)).await.unwrap();
    let key = "spread";
    let leases = format!("{{dlock:{key}}}:leases");
    let records = format!("{{dlock:{key}}}:records");
    let until = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    let (a, b) = ("a".repeat(32), "b".repeat(32));
    // Writes the permit of `owner` in `slot` on `node`, as the acquire script does.
    let hold = |node: &RedisServer, owner: &str, slot: u32| {
        let record = format!(r#"{{"fence":"1","pid":"1","host":"h","slot":{slot}}}"#);
        node.cli(&["ZADD", &leases, &until.to_string(), owner]);
        node.cli(&[
            "HSET",
            &records,
            owner,
            &record,
            ".mode",
            "semaphore",
            ".permits",
            "2",
        ]);
    };
    hold(&nodes[0], &a, 0);
    hold(&nodes[1], &a, 0);
    hold(&nodes[0], &b, 1);
    hold(&nodes[2], &b, 1);
    let info = locks.status(key).await.unwrap().expect("permits not shown");
    assert_eq!(info.holders.len(), 2, "{info:?}");
    for _ in 0..20 {
        assert!(
            locks
                .semaphore(key, 2)
                .try_acquire()
                .await
                .unwrap()
                .is_none(),
            "a third permit of two was granted"
        );
    }
    // Once A's permit is gone, its slot is free on a majority.
    for node in &nodes[..2] {
        node.cli(&["ZREM", &leases, &a]);
        node.cli(&["HDEL", &records, &a]);
    }
    let third = locks.semaphore(key, 2).try_acquire().await.unwrap();
    assert!(third.is_some(), "a freed permit was not granted");
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
