//! ZooKeeper under faults, each test on servers of its own: a leader killed while a lease
//! is held, a holder process killed, every member restarted; and the `dlock` command on
//! `zk://`.

use dlock_testkit::process::signal;
use dlock_testkit::servers::zookeeper::ZooKeeper;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DLOCK: &str = env!("CARGO_BIN_EXE_dlock");

/// A generous upper bound for "promptly" on a loaded machine.
const PROMPTLY: Duration = Duration::from_secs(20);

fn dlock(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(DLOCK);
    command
        .args(args)
        .env("DLOCK_BACKEND", url)
        .stdin(Stdio::null());
    command
}

fn output(url: &str, args: &[&str]) -> Output {
    dlock(url, args).output().unwrap()
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn wait_held(url: &str, key: &str) {
    let started = Instant::now();
    while !output(url, &["status", key]).status.success() {
        assert!(started.elapsed() < PROMPTLY, "{key} never became held");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn connect(url: &str) -> fencelock::Locks {
    fencelock::connect(url).await.unwrap()
}

/// Waits until some member leads again (after a leader was killed).
fn wait_for_leader(zk: &ZooKeeper) -> usize {
    let started = Instant::now();
    loop {
        if let Some(leader) = zk.leader() {
            return leader;
        }
        assert!(
            started.elapsed() < PROMPTLY * 3,
            "no new leader was elected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_held_the_lease_survives_alone() {
    let zk = ZooKeeper::start_ensemble();
    let url = zk.url();
    let locks = connect(&url).await;
    let lease = locks
        .lock("leader")
        .ttl(Duration::from_secs(15))
        .acquire()
        .await
        .unwrap();
    let other = connect(&url).await;
    let waiter = tokio::spawn({
        let other = other.clone();
        async move { other.lock("leader").acquire().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leader = zk.leader().expect("the ensemble has no leader");
    let elected = tokio::task::block_in_place(|| {
        zk.kill(leader);
        wait_for_leader(&zk)
    });
    assert_ne!(elected, leader);
    // Long enough for every client to have reconnected to a survivor.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!lease.is_lost(), "the lease was lost with the leader");
    assert!(!waiter.is_finished(), "a second holder got the lock");
    let started = Instant::now();
    loop {
        match other.lock("leader").try_acquire().await {
            Ok(None) => break,
            Ok(Some(_)) => panic!("a second holder got the lock after the leader died"),
            Err(err) if err.is_transient() && started.elapsed() < PROMPTLY => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(err) => panic!("{err}"),
        }
    }
    let fence = lease.fence();
    assert!(lease.release().await.unwrap(), "the lease was not held");
    let next = tokio::time::timeout(PROMPTLY, waiter)
        .await
        .expect("the waiter was not handed the lock")
        .unwrap()
        .unwrap();
    assert!(next.fence() > fence);
    assert!(next.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_holder_is_freed_within_its_session_timeout_and_the_waiter_woken() {
    let zk = ZooKeeper::start();
    let url = zk.url();
    let mut holder: Child = dlock(&url, &["run", "killed", "--ttl", "2s", "--", "sleep", "60"])
        .spawn()
        .unwrap();
    wait_held(&url, "killed");
    let locks = connect(&url).await;
    let info = locks.status("killed").await.unwrap().unwrap();
    assert_eq!(info.pid, Some(holder.id()));
    // A waiter that would retry only every minute: it can only get the lock in time if
    // the store wakes it.
    let waiter = tokio::spawn({
        let locks = locks.clone();
        async move {
            locks
                .lock("killed")
                .backoff(Duration::from_secs(60), Duration::from_secs(60))
                .acquire()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "the waiter got a held lock");
    let killed_at = Instant::now();
    signal(holder.id(), libc::SIGKILL);
    holder.wait().unwrap();
    let lease = tokio::time::timeout(PROMPTLY, waiter)
        .await
        .expect("the waiter was not woken after the holder died")
        .unwrap()
        .unwrap();
    let waited = killed_at.elapsed();
    // The session timeout is 2 s; the bound only leaves room for a loaded machine.
    assert!(
        waited < Duration::from_secs(2) + Duration::from_secs(10),
        "freed after {waited:?}"
    );
    assert!(lease.fence() > info.fence.unwrap());
    assert!(lease.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_member_keeps_fences_increasing() {
    let zk = ZooKeeper::start_ensemble();
    let url = zk.url();
    let mut last = 0;
    for _ in 0..3 {
        let lease = connect(&url).await.lock("fence").acquire().await.unwrap();
        assert!(lease.fence() > last);
        last = lease.fence();
        assert!(lease.release().await.unwrap());
    }
    tokio::task::block_in_place(|| {
        zk.restart_all();
        wait_for_leader(&zk)
    });
    for _ in 0..3 {
        let lease = connect(&url)
            .await
            .lock("fence")
            .wait_for(PROMPTLY)
            .acquire()
            .await
            .unwrap();
        assert!(lease.fence() > last, "fence {} after {last}", lease.fence());
        last = lease.fence();
        assert!(lease.release().await.unwrap());
    }
}

#[test]
fn cli_run_status_list_and_release_force() {
    let zk = ZooKeeper::start();
    let url = zk.url();
    let out = output(&url, &["status", "job"]);
    assert_eq!(code(&out), 1, "a free key shows as held");
    let holder = dlock(&url, &["run", "job", "--", "sleep", "30"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_held(&url, "job");
    let out = output(&url, &["status", "job", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["held"], true);
    assert_eq!(json["key"], "job");
    assert_eq!(json["pid"], holder.id());
    assert!(json["fence"].as_u64().unwrap() >= 1);
    let out = output(&url, &["list", "--json"]);
    let listed: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["key"], "job");
    let out = output(&url, &["run", "job", "--no-wait", "--", "true"]);
    assert_eq!(code(&out), 75, "a held lock was taken again");
    let out = output(&url, &["release", "job", "--force"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    // The holder learns from its znode's deletion that its lease is gone.
    let out = holder.wait_with_output().unwrap();
    assert_eq!(code(&out), 76, "the broken holder went on");
    assert_eq!(code(&output(&url, &["status", "job"])), 1);
    assert_eq!(code(&output(&url, &["release", "job", "--force"])), 1);
    let out = output(
        &url,
        &[
            "run",
            "job",
            "--no-wait",
            "--",
            "sh",
            "-c",
            "echo $DLOCK_FENCE",
        ],
    );
    assert!(out.status.success());
    let fence: u64 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(fence > json["fence"].as_u64().unwrap());
}

#[test]
fn fifty_parallel_runs_count_to_fifty() {
    let zk = ZooKeeper::start();
    let url = zk.url();
    let dir = tempfile::Builder::new()
        .prefix("dlock-zk-counter-")
        .tempdir()
        .unwrap();
    let counter = dir.path().join("counter");
    std::fs::write(&counter, "0").unwrap();
    let script = format!(
        "n=$(cat {0}); sleep 0.01; echo $((n + 1)) > {0}",
        counter.display()
    );
    let children: Vec<Child> = (0..50)
        .map(|_| {
            dlock(&url, &["run", "counter", "--", "sh", "-c", &script])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "50");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_cut_off_longer_than_its_session_could_live_is_lost() {
    let zk = ZooKeeper::start();
    let url = zk.url();
    let locks = connect(&url).await;
    let lease = locks
        .lock("cut-off")
        .ttl(Duration::from_secs(2))
        // Without renewals, failing ones cannot end the lease first: only the watch on
        // the session's connection can.
        .auto_renew(false)
        .acquire()
        .await
        .unwrap();
    // A frozen server answers nothing, and its session tracker stands still too: only the
    // client's own reckoning can end the lease.
    zk.pause(0);
    let reason = tokio::time::timeout(PROMPTLY, lease.lost()).await;
    zk.resume(0);
    let reason = reason.expect("the lease was not given up while the server was silent");
    assert!(
        matches!(&reason, fencelock::LossReason::SessionEnded { detail } if detail.contains("disconnected")),
        "{reason:?}"
    );
    // The servers may or may not have expired the session meanwhile; either way the
    // release completes.
    let _ = lease.release().await;
}
