//! One Redis server gets the exclusive renewals that fall due together as one script
//! call, and each lease still hears about its own key only. Each test starts its own
//! redis-server, so the command counts are this test's alone.
#![cfg(feature = "redis")]

use dlock_testkit::servers::redis::RedisServer;
use fencelock::{Lease, LossReason};
use std::time::Duration;

/// Renewed every 400 ms: on the engine's renewal grid.
const TTL: Duration = Duration::from_millis(1200);

/// Calls of EVALSHA and EVAL so far.
fn script_calls(server: &RedisServer) -> u64 {
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn count_keys(server: &RedisServer, pattern: &str) -> usize {
    server
        .cli(&["--scan", "--pattern", pattern])
        .lines()
        .filter(|k| !k.is_empty())
        .count()
}

async fn hold(locks: &fencelock::Locks, prefix: &str, n: usize) -> Vec<Lease> {
    let mut leases = Vec::with_capacity(n);
    for i in 0..n {
        let lease = locks
            .lock(format!("{prefix}-{i}"))
            .ttl(TTL)
            .try_acquire()
            .await
            .unwrap()
            .expect("a free key");
        leases.push(lease);
    }
    leases
}

#[tokio::test]
async fn renewals_that_fall_due_together_share_a_script_call() {
    let server = RedisServer::start();
    let locks = fencelock::connect(&server.url()).await.unwrap();
    let leases = hold(&locks, "batch", 200).await;
    let before = script_calls(&server);
    // At least two renewal rounds of every lease, 400 renewals or more; one call per
    // renewal would be as many script calls.
    tokio::time::sleep(TTL + Duration::from_millis(300)).await;
    let calls = script_calls(&server) - before;
    assert!(
        calls <= 60,
        "two rounds of renewals of 200 leases took {calls} script calls"
    );
    // Unrenewed, every key would have expired by now.
    assert_eq!(count_keys(&server, "dlock:batch-*"), 200);
    assert_eq!(count_keys(&server, "{dlock:batch-*}:holder"), 200);
    let record = server.cli(&[
        "HMGET",
        "{dlock:batch-7}:holder",
        "acquired_ms",
        "renewed_ms",
    ]);
    let times: Vec<u64> = record.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert!(
        times[1] > times[0],
        "the holder record was not renewed: {record:?}"
    );
    for lease in leases {
        assert!(!lease.is_lost(), "{} lost", lease.key());
        assert!(lease.release().await.unwrap());
    }
    assert_eq!(count_keys(&server, "dlock:batch-*"), 0);
}

/// A batch is owner-checked key by key: the lease whose key another owner took is lost,
/// its batch mates keep renewing.
#[tokio::test]
async fn a_key_taken_over_ends_only_its_own_lease() {
    let server = RedisServer::start();
    let locks = fencelock::connect(&server.url()).await.unwrap();
    let mut leases = hold(&locks, "taken", 20).await;
    let victim = leases.remove(7);
    assert_eq!(
        server
            .cli(&["SET", "dlock:taken-7", "somebody else", "PX", "60000"])
            .trim(),
        "OK"
    );
    let reason = tokio::time::timeout(TTL * 2, victim.lost())
        .await
        .expect("the taken-over lease is told within two TTLs");
    assert!(
        matches!(reason, LossReason::RenewalRefused),
        "lost for another reason: {reason:?}"
    );
    // Its batch mates renewed past the moment the victim was refused, and hold on.
    tokio::time::sleep(TTL).await;
    for lease in leases {
        assert!(!lease.is_lost(), "{} lost", lease.key());
        assert!(lease.release().await.unwrap());
    }
    assert!(
        !victim.release().await.unwrap(),
        "the key is somebody else's"
    );
    assert_eq!(
        server.cli(&["GET", "dlock:taken-7"]).trim(),
        "somebody else"
    );
}
