//! Fence counters of the Redis layout expire (they used to stay forever, one key per lock
//! name ever used), and fences stay strictly increasing across a forgotten counter.
//! Each test starts its own redis-server, so nothing is left in a shared store.

use dlock_testkit::servers::redis::RedisServer;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The horizon beyond the lease TTL, as in src/backends/redis/scripts.rs.
const MARGIN: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(5);

fn pttl(server: &RedisServer, key: &str) -> i64 {
    let text = server.cli(&["PTTL", key]);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("PTTL {key}: {text:?}"))
}

/// Every key whose name ends in `suffix`, with its PTTL.
fn keys_ending(server: &RedisServer, suffix: &str) -> Vec<(String, i64)> {
    server
        .cli(&["--scan", "--pattern", &format!("*{suffix}")])
        .lines()
        .filter(|k| !k.is_empty())
        .map(|k| (k.to_owned(), pttl(server, k)))
        .collect()
}

fn assert_fences_expire(server: &RedisServer, expected: usize) {
    let fences = keys_ending(server, "}:fence");
    assert_eq!(fences.len(), expected, "{fences:?}");
    let bound = i64::try_from((TTL + MARGIN + Duration::from_secs(5)).as_millis()).unwrap();
    for (key, ttl) in &fences {
        assert!(
            *ttl > 0 && *ttl <= bound,
            "{key} has PTTL {ttl} ms, expected an expiry within {bound} ms"
        );
    }
}

#[tokio::test]
async fn fence_counters_expire_and_holder_records_too() {
    let server = RedisServer::start();
    let locks = fencelock::connect(&server.url()).await.unwrap();
    let mut held = Vec::new();
    for i in 0..20 {
        let lease = locks
            .lock(format!("expiry-{i}"))
            .ttl(TTL)
            .acquire()
            .await
            .unwrap();
        if i % 2 == 0 {
            lease.release().await.unwrap();
        } else {
            held.push(lease);
        }
    }
    assert_fences_expire(&server, 20);
    let holders = keys_ending(&server, "}:holder");
    assert_eq!(holders.len(), held.len(), "{holders:?}");
    for (key, ttl) in &holders {
        assert!(*ttl > 0, "{key} has PTTL {ttl}");
    }
    for lease in held {
        lease.release().await.unwrap();
    }
    assert!(keys_ending(&server, "}:holder").is_empty());
}

#[tokio::test]
async fn redlock_fence_counters_expire_on_every_node() {
    let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let hosts: Vec<String> = nodes.iter().map(RedisServer::address).collect();
    let locks = fencelock::connect(&format!("redlock://{}", hosts.join(",")))
        .await
        .unwrap();
    for i in 0..10 {
        let lease = locks
            .lock(format!("expiry-{i}"))
            .ttl(TTL)
            .acquire()
            .await
            .unwrap();
        lease.release().await.unwrap();
    }
    for node in &nodes {
        assert_fences_expire(node, 10);
    }
}

#[tokio::test]
async fn fences_increase_across_a_forgotten_counter() {
    let server = RedisServer::start();
    let locks = fencelock::connect(&server.url()).await.unwrap();
    let mut last = 0;
    for round in 0..4 {
        let lease = locks.lock("forgotten").ttl(TTL).acquire().await.unwrap();
        assert!(
            lease.fence() > last,
            "round {round}: {} <= {last}",
            lease.fence()
        );
        last = lease.fence();
        lease.release().await.unwrap();
        // Forget the counter in both ways an expiry can look like.
        if round % 2 == 0 {
            server.cli(&["DEL", "{dlock:forgotten}:fence"]);
        } else {
            server.cli(&["PEXPIRE", "{dlock:forgotten}:fence", "1"]);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test]
async fn a_counter_ahead_of_the_clock_is_kept_until_the_clock_passes_it() {
    let server = RedisServer::start();
    let locks = fencelock::connect(&server.url()).await.unwrap();
    // As after a clock stepped back by an hour while the counter lived.
    let ahead = Duration::from_secs(3600);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let counter = u64::try_from((now + ahead).as_micros()).unwrap();
    server.cli(&["SET", "{dlock:ahead}:fence", &counter.to_string()]);
    let lease = locks.lock("ahead").ttl(TTL).acquire().await.unwrap();
    assert_eq!(lease.fence(), counter + 1);
    lease.release().await.unwrap();
    let left = pttl(&server, "{dlock:ahead}:fence");
    let min = i64::try_from((ahead + TTL + MARGIN - Duration::from_secs(5)).as_millis()).unwrap();
    let max = i64::try_from((ahead + TTL + MARGIN + Duration::from_secs(5)).as_millis()).unwrap();
    assert!(
        (min..=max).contains(&left),
        "PTTL {left} ms: the counter must live until the clock has passed it"
    );
}

/// A holder record that outlived its key (a client that is not dlock deleted the key
/// alone) is replaced whole by the next holder's, not merged into: the new holder's
/// record carries neither the old value nor the old owner's fields.
#[tokio::test]
async fn a_stale_holder_record_is_replaced_not_merged() {
    let server = RedisServer::start();
    let locks = fencelock::connect(&server.url()).await.unwrap();
    // A record with no key beside it, as `DEL K` from another client leaves one.
    server.cli(&[
        "HSET",
        "{dlock:stale-record}:holder",
        "owner",
        "gone",
        "value",
        "the old holder's",
        "note",
        "left behind",
    ]);
    let lease = locks
        .lock("stale-record")
        .ttl(TTL)
        .no_wait()
        .acquire()
        .await
        .unwrap();
    let info = locks.status("stale-record").await.unwrap().unwrap();
    assert_eq!(info.fence, Some(lease.fence()));
    assert_eq!(
        info.value, None,
        "the old holder's value was kept: {info:?}"
    );
    let fields = server.cli(&["HKEYS", "{dlock:stale-record}:holder"]);
    assert!(
        !fields.lines().any(|f| f == "value" || f == "note"),
        "the record kept the old fields: {fields:?}"
    );
    lease.release().await.unwrap();
}
