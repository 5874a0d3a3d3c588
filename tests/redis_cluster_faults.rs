//! Redis Cluster under faults and from the command line: a master killed under a
//! holder (its replica takes over), wake-ups through shard channels, every key of a lock
//! in one slot, and `dlock run`/`status`/`list`/`release --force` on the cluster.

use dlock_testkit::servers::redis_cluster::RedisCluster;
use fencelock::backends::redis::KeyNames;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const DLOCK: &str = env!("CARGO_BIN_EXE_dlock");

/// The cluster of the tests that do not kill nodes.
fn shared() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}

async fn within<T>(limit: Duration, what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: did not happen within {limit:?}"),
    }
}

/// `dlock ARGS` on `cluster`.
fn dlock(cluster: &RedisCluster, args: &[&str]) -> Command {
    let mut command = Command::new(DLOCK);
    command
        .args(args)
        .env("DLOCK_BACKEND", cluster.url())
        .stdin(Stdio::null());
    command
}

fn run(cluster: &RedisCluster, args: &[&str]) -> Output {
    dlock(cluster, args).output().unwrap()
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

/// What became of a lease whose master was killed: kept (the replica had the key and
/// the holder's renewals reached it once promoted) or lost (it had not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Kept,
    Lost,
}

/// Kills the master of a held key at once after the acquisition (the worst moment for
/// asynchronous replication), waits for its replica to take over, and checks that the
/// holder either kept a lease nobody else can take or saw `lost()`, and that the next
/// holder's fence is larger either way. Repeated, with the outcomes printed, since which
/// of the two happens depends on whether the replica got the write in time
/// (`DLOCK_FAILOVER_ROUNDS=N` repeats it N times, for measuring).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_master_hands_over_to_its_replica_with_fences_still_increasing() {
    let rounds: usize = std::env::var("DLOCK_FAILOVER_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let cluster = RedisCluster::start();
    let locks = fencelock::connect(&cluster.url()).await.unwrap();
    let mut outcomes = Vec::new();
    for round in 0..rounds {
        let key = format!("failover-{round}");
        let lease = locks
            .lock(&key)
            .ttl(Duration::from_secs(6))
            .acquire()
            .await
            .unwrap();
        let fence = lease.fence();
        let master = cluster.master_of(&format!("dlock:{key}"));
        master.kill();
        let killed_at = Instant::now();
        // The replica is promoted after cluster-node-timeout (1.5 s) and an election.
        tokio::task::block_in_place(|| cluster.wait_healthy());
        let promoted_after = killed_at.elapsed();
        // Long enough for a renewal on the new master, or for the lease to run out.
        let outcome = tokio::select! {
            _ = lease.lost() => Outcome::Lost,
            () = tokio::time::sleep(Duration::from_secs(8)) => Outcome::Kept,
        };
        let other = fencelock::connect(&cluster.url()).await.unwrap();
        if outcome == Outcome::Kept {
            assert!(
                other.lock(&key).try_acquire().await.unwrap().is_none(),
                "round {round}: the lease was kept, yet another handle took the key"
            );
            assert!(
                lease.release().await.unwrap(),
                "round {round}: release failed"
            );
        } else {
            drop(lease);
        }
        let next = within(
            Duration::from_secs(20),
            "acquire after the failover",
            other.lock(&key).acquire(),
        )
        .await
        .unwrap();
        assert!(
            next.fence() > fence,
            "round {round} ({outcome:?}): fence {} after {fence}",
            next.fence()
        );
        let next_fence = next.fence();
        next.release().await.unwrap();
        eprintln!(
            "failover round {round}: {outcome:?}, promoted after {promoted_after:?}, fence {fence} -> {next_fence}"
        );
        outcomes.push(outcome);
        // The old master comes back as a replica of the new one.
        master.start_again();
        tokio::task::block_in_place(|| cluster.wait_healthy());
    }
    let kept = outcomes.iter().filter(|o| **o == Outcome::Kept).count();
    eprintln!(
        "failover: lease kept in {kept} of {rounds} rounds, lost() in {}",
        rounds - kept
    );
}

/// A waiter subscribes to the lock's shard channel on the slot's master while it waits,
/// is woken by the release long before the holder's TTL, and unsubscribes afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_woken_through_the_lock_shard_channel() {
    let cluster = shared();
    let key = "sharded-wakeup";
    let names = KeyNames::in_slot("dlock:", key);
    let master = cluster.master_of(&names.lock);
    let subscribers = || -> u64 {
        let answer = master.cli(&["PUBSUB", "SHARDNUMSUB", &names.channel]);
        answer
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let holder = fencelock::connect(&cluster.url()).await.unwrap();
    let lease = holder
        .lock(key)
        .ttl(Duration::from_secs(60))
        .acquire()
        .await
        .unwrap();
    let waiter = fencelock::connect(&cluster.url()).await.unwrap();
    let waiting = tokio::spawn(async move { waiter.lock(key).acquire().await });
    within(Duration::from_secs(10), "the waiter's SSUBSCRIBE", async {
        while tokio::task::block_in_place(subscribers) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    lease.release().await.unwrap();
    let next = within(Duration::from_secs(10), "the woken waiter", waiting)
        .await
        .unwrap()
        .unwrap();
    next.release().await.unwrap();
    within(Duration::from_secs(10), "the SUNSUBSCRIBE", async {
        while tokio::task::block_in_place(subscribers) != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The names of keys with hash tags and braces of their own are in the lock's slot, as
/// the cluster itself computes it.
#[test]
fn side_keys_and_channels_share_the_slot_the_server_computes() {
    let cluster = shared();
    let node = &cluster.nodes()[0];
    let slot = |name: &str| node.cli(&["CLUSTER", "KEYSLOT", name]).trim().to_owned();
    for key in ["job", "a{b}c", "x}y", "{}", "{tag}", "ключ{🔒}"] {
        let names = KeyNames::in_slot("dlock:", key);
        let lock = slot(&names.lock);
        for side in [&names.fence, &names.holder, &names.channel] {
            assert_eq!(slot(side), lock, "{key:?}: {side}");
        }
    }
}

#[test]
fn cli_run_status_list_and_force_release() {
    let cluster = shared();
    let key = "cli-held";
    assert_eq!(code(&run(cluster, &["status", key])), 1);
    let holder = dlock(
        cluster,
        &[
            "run",
            key,
            "--ttl",
            "2s",
            "--kill-after",
            "1s",
            "--",
            "sleep",
            "30",
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let started = Instant::now();
    let status = loop {
        let out = run(cluster, &["status", key, "--json"]);
        if out.status.success() {
            break out;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{key} never became held"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["held"], true);
    assert_eq!(json["pid"], holder.id());
    assert!(json["fence"].as_u64().unwrap() >= 1);
    let listed = String::from_utf8(run(cluster, &["list", "--json"]).stdout).unwrap();
    let keys: Vec<String> = listed
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["key"].to_string())
        .collect();
    assert!(keys.contains(&format!("{key:?}")), "{listed}");
    let out = run(cluster, &["release", key, "--force"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let out = holder.wait_with_output().unwrap();
    assert_eq!(code(&out), 76, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(code(&run(cluster, &["status", key])), 1);
    assert_eq!(code(&run(cluster, &["release", key, "--force"])), 1);
}

#[test]
fn fifty_parallel_runs_on_the_cluster_count_to_fifty() {
    let cluster = shared();
    let dir = tempfile::Builder::new()
        .prefix("dlock-cluster-cli-")
        .tempdir()
        .unwrap();
    let counter = dir.path().join("counter");
    std::fs::write(&counter, "0").unwrap();
    let add = format!(
        "n=$(cat {0}); sleep 0.01; echo $((n + 1)) > {0}",
        counter.display()
    );
    let runs: Vec<_> = (0..50)
        .map(|_| {
            dlock(cluster, &["run", "cluster-counter", "--", "sh", "-c", &add])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut one in runs {
        assert!(one.wait().unwrap().success());
    }
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "50");
}
