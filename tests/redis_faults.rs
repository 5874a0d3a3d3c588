//! Fault tests on real redis-server processes: Redlock with nodes down, a single node
//! restarted or frozen under a holder or a waiter, attempts on a frozen server, a holder
//! killed with SIGKILL, TLS and AUTH, and Redlock's multi-key acquisition.

use dlock_testkit::process::signal;
use dlock_testkit::proxy::Proxy;
use dlock_testkit::servers::redis::{RedisConfig, RedisServer};
use fencelock::backends::redis::RedlockBackend;
use fencelock::{Error, Wait};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn redlock_url(nodes: &[RedisServer]) -> String {
    let hosts: Vec<String> = nodes.iter().map(RedisServer::address).collect();
    format!("redlock://{}", hosts.join(","))
}

async fn within<T>(limit: Duration, what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: did not happen within {limit:?}"),
    }
}

/// Lock and holder keys left on a node (fence counters are meant to stay).
fn stray_keys(server: &RedisServer) -> Vec<String> {
    let mut keys: Vec<String> = server
        .cli(&["--scan", "--pattern", "*"])
        .lines()
        .map(str::to_owned)
        .filter(|k| !k.is_empty() && !k.ends_with("}:fence"))
        .collect();
    keys.sort();
    keys
}

fn evalsha_calls(server: &RedisServer) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_five_nodes_tolerates_two_down_and_reports_quorum_loss_with_three() {
    let nodes: Vec<RedisServer> = (0..5).map(|_| RedisServer::start()).collect();
    let url = redlock_url(&nodes);
    let locks = fencelock::connect(&url).await.unwrap();
    let mut last_fence = 0;
    for i in 0..5 {
        let lease = locks.lock(format!("warmup-{i}")).acquire().await.unwrap();
        lease.release().await.unwrap();
    }

    nodes[0].kill();
    nodes[3].kill();
    let fresh = fencelock::connect(&url)
        .await
        .expect("a handle opens with 3 of 5 nodes up");
    for round in 0..20 {
        let handle = if round % 2 == 0 { &locks } else { &fresh };
        let lease = within(
            Duration::from_secs(10),
            "acquire with 2 of 5 down",
            handle.lock("job").acquire(),
        )
        .await
        .unwrap();
        assert!(
            lease.fence() > last_fence,
            "fence {} after {last_fence}",
            lease.fence()
        );
        last_fence = lease.fence();
        assert!(lease.release().await.unwrap(), "release with 2 of 5 down");
    }
    let lease = locks
        .lock("held-while-degraded")
        .ttl(Duration::from_secs(2))
        .acquire()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!lease.is_lost(), "renewal with 3 of 5 nodes failed");
    lease.release().await.unwrap();

    nodes[4].kill();
    let err = locks.lock("job").try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("quorum") && text.contains("2 of 5") && text.contains("3 needed"),
        "{text}"
    );
    let err = fencelock::connect(&url).await.unwrap_err();
    assert!(err.to_string().contains("quorum"), "{err}");

    for index in [0, 3, 4] {
        nodes[index].start_again();
    }
    let lease = within(
        Duration::from_secs(10),
        "acquire after the nodes are back",
        async {
            loop {
                match locks.lock("job").acquire().await {
                    Ok(lease) => break lease,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        },
    )
    .await;
    assert!(
        lease.fence() > last_fence,
        "fence {} after {last_fence}",
        lease.fence()
    );
    lease.release().await.unwrap();
    for (index, node) in nodes.iter().enumerate() {
        assert_eq!(
            stray_keys(node),
            Vec::<String>::new(),
            "stray keys on node {index}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_fences_increase_while_the_majority_changes() {
    let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let locks = fencelock::connect(&redlock_url(&nodes)).await.unwrap();
    let mut last = 0;
    let mut take = |fence: u64| {
        assert!(fence > last, "fence {fence} after {last}");
        last = fence;
    };
    let lease = locks.lock("k").acquire().await.unwrap();
    take(lease.fence());
    lease.release().await.unwrap();
    // Majority {1, 2}.
    nodes[0].kill();
    let lease = locks.lock("k").acquire().await.unwrap();
    take(lease.fence());
    lease.release().await.unwrap();
    // Node 0 comes back empty (no persistence); majority {0, 2}.
    nodes[0].start_again();
    nodes[1].kill();
    let lease = within(Duration::from_secs(10), "acquire on {0, 2}", async {
        loop {
            match locks.lock("k").acquire().await {
                Ok(lease) => break lease,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    take(lease.fence());
    lease.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holder_sees_lost_when_its_node_is_restarted() {
    let server = RedisServer::start();
    let locks = fencelock::connect(&server.url()).await.unwrap();
    let lease = locks
        .lock("restart")
        .ttl(Duration::from_secs(1))
        .acquire()
        .await
        .unwrap();
    let first_fence = lease.fence();
    server.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.start_again();
    within(
        Duration::from_secs(5),
        "lost() after the restart",
        lease.lost(),
    )
    .await;
    // A lost lease keeps its place in the handle's local queue until it is dropped.
    drop(lease);
    // The counter was lost with the restart; the fence floor (server clock) still goes up.
    let next = within(
        Duration::from_secs(10),
        "acquire after the restart",
        async {
            loop {
                match locks.lock("restart").acquire().await {
                    Ok(lease) => break lease,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        },
    )
    .await;
    assert!(
        next.fence() > first_fence,
        "fence {} after {first_fence}",
        next.fence()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holder_sees_lost_when_its_node_is_frozen_past_the_ttl() {
    let server = RedisServer::start();
    let locks = fencelock::connect(&server.url()).await.unwrap();
    let lease = locks
        .lock("frozen")
        .ttl(Duration::from_secs(1))
        .acquire()
        .await
        .unwrap();
    let frozen_at = Instant::now();
    server.pause();
    let reason = within(
        Duration::from_secs(5),
        "lost() while the node is frozen",
        lease.lost(),
    )
    .await;
    server.resume();
    assert!(
        frozen_at.elapsed() <= Duration::from_millis(1500),
        "lost() late: {:?}",
        frozen_at.elapsed()
    );
    assert!(
        matches!(reason, fencelock::LossReason::RenewalFailed { .. }),
        "{reason:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_holder_frees_the_key_at_its_ttl_and_the_waiter_gets_it_without_polling() {
    let server = RedisServer::start();
    let url = server.url();
    let mut holder = Command::new(env!("CARGO_BIN_EXE_dlock"))
        .args([
            "run",
            "victim",
            "--backend",
            &url,
            "--ttl",
            "3s",
            "--",
            "sleep",
            "60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let locks = fencelock::connect(&url).await.unwrap();
    within(
        Duration::from_secs(10),
        "the CLI holder takes the lock",
        async {
            while locks.status("victim").await.unwrap().is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    let waiter = tokio::spawn({
        let locks = locks.clone();
        async move { locks.lock("victim").acquire().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(holder.id(), libc::SIGKILL);
    holder.wait().unwrap();
    let killed_at = Instant::now();
    let calls_before = evalsha_calls(&server);
    let lease = within(Duration::from_secs(10), "the waiter gets the lock", waiter)
        .await
        .unwrap()
        .unwrap();
    let waited = killed_at.elapsed();
    let attempts = evalsha_calls(&server) - calls_before;
    assert!(
        waited <= Duration::from_millis(3500),
        "freed late: {waited:?}"
    );
    assert!(
        attempts <= 4,
        "the waiter polled: {attempts} script calls while waiting ~3 s"
    );
    lease.release().await.unwrap();
}

/// A client that is not dlock (redis-py's `Lock`, node-redlock, a bare `SET NX PX`)
/// publishes nothing when it deletes its lock: a dlock waiter behind it must still get
/// the key soon after, not at the foreign lock's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiter_behind_a_foreign_holder_gets_the_key_soon_after_its_release() {
    let server = RedisServer::start();
    let locks = fencelock::connect(&server.url()).await.unwrap();
    for (key, expiry) in [
        ("foreign-px", &["PX", "30000"][..]),
        ("foreign-forever", &[][..]),
    ] {
        let lock_key = format!("dlock:{key}");
        let mut set = vec!["SET", lock_key.as_str(), "their-token", "NX"];
        set.extend_from_slice(expiry);
        assert_eq!(server.cli(&set).trim(), "OK");
        let waiter = tokio::spawn({
            let locks = locks.clone();
            async move { locks.lock(key).acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiter.is_finished(),
            "{key}: acquired while held elsewhere"
        );
        assert_eq!(server.cli(&["DEL", lock_key.as_str()]).trim(), "1");
        let deleted_at = Instant::now();
        let lease = within(
            Duration::from_secs(5),
            "the waiter gets the key after the foreign release",
            waiter,
        )
        .await
        .unwrap()
        .unwrap();
        // Far below the foreign lease's 30 s (or its lack of any expiry).
        assert!(
            deleted_at.elapsed() < Duration::from_secs(3),
            "{key}: acquired {:?} after the foreign release",
            deleted_at.elapsed()
        );
        lease.release().await.unwrap();
    }
    drop(locks);
    assert_eq!(stray_keys(&server), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_connects_with_the_ca_and_fails_clearly_without() {
    let server = RedisServer::start_with(RedisConfig {
        tls: true,
        ..RedisConfig::default()
    });
    let locks = fencelock::connect(&server.url())
        .await
        .expect("TLS with ca_file");
    let lease = locks.lock("tls").acquire().await.unwrap();
    assert!(lease.fence() > 0);
    assert!(lease.release().await.unwrap());
    let plain_tls = format!("rediss://127.0.0.1:{}?connect_timeout=2s", server.port());
    let err = fencelock::connect(&plain_tls).await.unwrap_err();
    assert!(
        matches!(err, Error::Unavailable { .. } | Error::Backend { .. }),
        "{err:?}"
    );
    let plain = format!(
        "redis://127.0.0.1:{}?connect_timeout=1s&command_timeout=1s",
        server.port()
    );
    assert!(
        fencelock::connect(&plain).await.is_err(),
        "plain text to a TLS port connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requirepass_and_acl_users_authenticate_and_wrong_passwords_are_clear_errors() {
    let server = RedisServer::start_with(RedisConfig {
        password: Some("s3cret-default".into()),
        acl_user: Some(("alice".into(), "alice-pw".into())),
        ..RedisConfig::default()
    });
    let port = server.port();
    for url in [
        format!("redis://:s3cret-default@127.0.0.1:{port}"),
        format!("redis://default:s3cret-default@127.0.0.1:{port}/0"),
        format!("redis://alice:alice-pw@127.0.0.1:{port}/1?prefix=app:"),
    ] {
        let locks = fencelock::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let lease = locks.lock("auth").acquire().await.unwrap();
        assert!(lease.release().await.unwrap());
    }
    for (url, secret) in [
        (
            format!("redis://:wrong-pass-1@127.0.0.1:{port}"),
            "wrong-pass-1",
        ),
        (
            format!("redis://alice:wrong-pass-2@127.0.0.1:{port}"),
            "wrong-pass-2",
        ),
        (format!("redis://127.0.0.1:{port}"), "s3cret-default"),
        (
            format!("redlock://alice:wrong-pass-3@127.0.0.1:{port}"),
            "wrong-pass-3",
        ),
    ] {
        let err = fencelock::connect(&url).await.unwrap_err();
        let text = err.to_string();
        assert!(!text.contains(secret), "password in the message: {text}");
        assert!(matches!(err, Error::Backend { .. }), "{url}: {err:?}");
        assert!(
            text.contains("authentication") || text.contains("NOAUTH"),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_server_is_unavailable_naming_the_redacted_url() {
    let port = dlock_testkit::process::free_port();
    let err = fencelock::connect(&format!(
        "redis://:hunter2@127.0.0.1:{port}?connect_timeout=1s"
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{port}")) && !text.contains("hunter2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_acquire_all_is_all_or_nothing_and_cannot_deadlock() {
    let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let locks = fencelock::connect(&redlock_url(&nodes)).await.unwrap();
    let blocker = locks.lock("b").acquire().await.unwrap();
    let err = RedlockBackend::acquire_all(
        &locks,
        &["c", "a", "b"],
        Duration::from_secs(5),
        Wait::For(Duration::from_millis(300)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::NotAcquired { .. }), "{err:?}");
    assert!(
        locks.status("a").await.unwrap().is_none(),
        "a was left held"
    );
    assert!(
        locks.status("c").await.unwrap().is_none(),
        "c was left held"
    );
    blocker.release().await.unwrap();
    let leases = RedlockBackend::acquire_all(
        &locks,
        &["c", "a", "b", "a"],
        Duration::from_secs(5),
        Wait::No,
    )
    .await
    .unwrap();
    let keys: Vec<&str> = leases.iter().map(|l| l.key()).collect();
    assert_eq!(keys, ["a", "b", "c"]);
    for lease in leases {
        lease.release().await.unwrap();
    }
    // Opposite orders from two tasks, many times: sorted acquisition never deadlocks.
    let mut tasks = Vec::new();
    for order in [["x", "y"], ["y", "x"]] {
        let locks = locks.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..15 {
                let leases = RedlockBackend::acquire_all(
                    &locks,
                    &order,
                    Duration::from_secs(5),
                    Wait::Forever,
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
                for lease in leases {
                    assert!(lease.release().await.unwrap());
                }
            }
        }));
    }
    for task in tasks {
        within(Duration::from_secs(60), "opposite-order acquire_all", task)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_local_waiters_do_not_stampede_the_server_at_release() {
    let server = RedisServer::start();
    let locks = fencelock::connect(&server.url()).await.unwrap();
    let lease = locks.lock("crowd").acquire().await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..50 {
        let locks = locks.clone();
        waiters.push(tokio::spawn(async move {
            locks.lock("crowd").acquire().await.unwrap()
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = evalsha_calls(&server);
    lease.release().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = evalsha_calls(&server) - before;
    // The release itself, and the attempt of the one woken waiter (a spurious extra wake
    // is allowed), not 50 attempts.
    assert!(
        calls <= 4,
        "{calls} script calls after one release with 50 waiters"
    );
    let finished: Vec<_> = waiters.iter().filter(|w| w.is_finished()).collect();
    assert_eq!(finished.len(), 1, "exactly one waiter should hold the lock");
    for waiter in waiters {
        waiter.abort();
    }
}

/// A hand-off between two tasks of one handle does not wait for the release's reply:
/// the next task's acquire follows the release on the same connection, and the server,
/// which runs them in order, grants it while the reply is still on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_local_hand_off_sends_the_next_acquire_behind_the_release_without_its_reply() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port()).await;
    // A command timeout well past the assertion's bound: without the pipelining, the
    // release would give up at it and let the next task go that late.
    let locks = fencelock::connect(&format!(
        "redis://127.0.0.1:{}?command_timeout=20s",
        proxy.port()
    ))
    .await
    .unwrap();
    let key = "pipelined-hand-off";
    // Loads the scripts: a first call answered NOSCRIPT would wait for that answer.
    let warmup = locks.lock("pipelined-warmup").acquire().await.unwrap();
    assert!(warmup.release().await.unwrap());
    let holder = locks.lock(key).acquire().await.unwrap();
    let first_owner = holder.owner().to_owned();
    let waiter = {
        let locks = locks.clone();
        tokio::spawn(async move { locks.lock(key).acquire().await })
    };
    // The waiter queues in the process behind the holder (or, if it is late, takes its
    // turn after the release: either way its acquire is sent after the release).
    tokio::time::sleep(Duration::from_millis(200)).await;

    proxy.freeze_replies();
    let release = tokio::spawn(holder.release());
    let lock_key = format!("dlock:{key}");
    let started = Instant::now();
    let taken_by = loop {
        let value = server.cli(&["GET", &lock_key]);
        let value = value.trim();
        if !value.is_empty() && value != first_owner {
            break value.to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the next task's acquire did not reach the server while the release's reply was held (key: {value:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        !release.is_finished(),
        "the release's reply crossed a frozen proxy"
    );
    proxy.thaw();

    assert!(within(Duration::from_secs(10), "the release", release)
        .await
        .unwrap()
        .unwrap());
    let next = within(Duration::from_secs(10), "the next acquire", waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.owner(), taken_by);
    next.release().await.unwrap();
    assert_eq!(stray_keys(&server), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_lease_is_lost_when_renewal_cannot_reach_a_majority() {
    let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let locks = fencelock::connect(&redlock_url(&nodes)).await.unwrap();
    let lease = locks
        .lock("majority")
        .ttl(Duration::from_secs(1))
        .acquire()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!lease.is_lost(), "renewed on 3 of 3 nodes, yet lost");
    nodes[1].pause();
    nodes[2].kill();
    let since = Instant::now();
    let reason = within(
        Duration::from_secs(5),
        "lost() with 1 of 3 nodes left",
        lease.lost(),
    )
    .await;
    nodes[1].resume();
    assert!(
        since.elapsed() <= Duration::from_millis(1100),
        "lost() fired after {:?}, past the validity",
        since.elapsed()
    );
    assert!(
        matches!(reason, fencelock::LossReason::RenewalFailed { .. }),
        "{reason:?}"
    );
}

/// How long past its deadline a call on a frozen server may take to fail: a liveness bound
/// (the engine's grace for the answer, then a brief cleanup), not a speed target.
const FROZEN_SLACK: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attempts_on_a_frozen_server_fail_typed_soon_after_their_deadline() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port()).await;
    let locks = fencelock::connect(&format!("redis://127.0.0.1:{}", proxy.port()))
        .await
        .unwrap();
    let key = "frozen-attempt";
    let ttl = Duration::from_secs(2);
    // Connects the handle through the proxy before the freeze.
    let lease = locks.lock("frozen-warmup").try_acquire().await.unwrap();
    assert!(lease
        .expect("free key not acquired")
        .release()
        .await
        .unwrap());

    proxy.freeze();
    let err = within(
        FROZEN_SLACK,
        "try_acquire on a frozen server",
        locks.lock(key).ttl(ttl).try_acquire(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    let err = within(
        FROZEN_SLACK,
        "acquire().no_wait() on a frozen server",
        locks.lock(key).ttl(ttl).no_wait().acquire(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    let wait = Duration::from_millis(500);
    let err = within(
        wait + FROZEN_SLACK,
        "acquire() with a wait on a frozen server",
        locks.lock(key).ttl(ttl).wait_for(wait).acquire(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Unavailable { .. } | Error::NotAcquired { .. }),
        "{err:?}"
    );

    // The frozen attempts reach the server at the thaw; their cleanups follow them on the
    // same connection, and anything left ends at its TTL.
    proxy.thaw();
    let lease = within(
        Duration::from_secs(15),
        "acquire after the thaw",
        locks
            .lock(key)
            .ttl(ttl)
            .wait_for(Duration::from_secs(10))
            .acquire(),
    )
    .await
    .unwrap();
    assert!(lease.release().await.unwrap());
    assert_eq!(stray_keys(&server), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiter_without_limit_waits_across_a_server_restart_then_acquires() {
    let server = RedisServer::start();
    let key = "restart-wait";
    let holder_locks = fencelock::connect(&server.url()).await.unwrap();
    let holder = holder_locks
        .lock(key)
        .ttl(Duration::from_secs(30))
        .acquire()
        .await
        .unwrap();
    let locks = fencelock::connect(&server.url()).await.unwrap();
    let waiter = tokio::spawn(async move {
        locks
            .lock(key)
            .ttl(Duration::from_secs(5))
            .wait(Wait::Forever)
            .acquire()
            .await
    });
    let still_waiting = |waiter: &tokio::task::JoinHandle<_>, when: &str| {
        assert!(!waiter.is_finished(), "the waiter returned {when}");
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    still_waiting(&waiter, "while the lock was held");

    server.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    still_waiting(&waiter, "while the server was down");
    // Without persistence the restarted server has forgotten the holder's key.
    server.start_again();
    let lease = within(
        Duration::from_secs(20),
        "the waiter acquires after the restart",
        waiter,
    )
    .await
    .unwrap()
    .unwrap_or_else(|err| panic!("the waiter failed instead of waiting on: {err:?}"));
    assert!(lease.release().await.unwrap());
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_attempts_with_a_frozen_majority_fail_typed_soon_after_their_deadline() {
    let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let mut proxies = Vec::new();
    for node in &nodes {
        proxies.push(Proxy::start(node.port()).await);
    }
    let hosts: Vec<String> = proxies
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.port()))
        .collect();
    let locks = fencelock::connect(&format!("redlock://{}", hosts.join(",")))
        .await
        .unwrap();
    let ttl = Duration::from_secs(2);
    let lease = locks.lock("redlock-warmup").try_acquire().await.unwrap();
    assert!(lease
        .expect("free key not acquired")
        .release()
        .await
        .unwrap());

    proxies[0].freeze();
    proxies[2].freeze();
    let err = within(
        FROZEN_SLACK,
        "Redlock try_acquire with 2 of 3 nodes frozen",
        locks.lock("redlock-frozen").ttl(ttl).try_acquire(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("quorum"), "{err}");

    for proxy in &proxies {
        proxy.thaw();
    }
    let lease = within(
        Duration::from_secs(15),
        "Redlock acquire after the thaw",
        locks
            .lock("redlock-frozen")
            .ttl(ttl)
            .wait_for(Duration::from_secs(10))
            .acquire(),
    )
    .await
    .unwrap();
    assert!(lease.release().await.unwrap());
    for (index, node) in nodes.iter().enumerate() {
        assert_eq!(
            stray_keys(node),
            Vec::<String>::new(),
            "stray keys on node {index}"
        );
    }
}
