//! The etcd backend under faults, against private etcd clusters: a leader killed under a
//! held lease, a holder process killed, every member restarted; and `dlock run` with
//! `status`, `list` and `release --force` on an etcd URL.

use dlock_testkit::process::signal;
use dlock_testkit::servers::etcd::EtcdCluster;
use fencelock::{Error, Locks};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

const DLOCK: &str = env!("CARGO_BIN_EXE_dlock");

/// A generous upper bound for "soon" on a loaded 2-core machine.
const SOON: Duration = Duration::from_secs(30);

/// The fault tests start 3-member clusters of their own; one at a time is enough load.
static CLUSTERS: Mutex<()> = Mutex::const_new(());

fn unique(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

fn dlock(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(DLOCK);
    command
        .args(args)
        .args(["--backend", url])
        .env_remove("DLOCK_BACKEND")
        .stdin(Stdio::null());
    command
}

/// `dlock run KEY --backend URL [OPTIONS] -- COMMAND…`.
fn dlock_run(url: &str, key: &str, options: &[&str], command: &[&str]) -> Command {
    let mut run = Command::new(DLOCK);
    run.args(["run", key, "--backend", url])
        .args(options)
        .arg("--")
        .args(command)
        .env_remove("DLOCK_BACKEND")
        .stdin(Stdio::null());
    run
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits until `key` shows a holder with a fence, and returns the fence.
async fn wait_held(locks: &Locks, key: &str) -> u64 {
    let started = Instant::now();
    loop {
        if let Ok(Some(info)) = locks.status(key).await {
            if let Some(fence) = info.fence {
                return fence;
            }
        }
        assert!(started.elapsed() < SOON, "{key} never became held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A held lease survives the death of the raft leader, and nobody else gets the lock
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_held_keeps_the_lease_and_one_holder() {
    let _one = CLUSTERS.lock().await;
    let cluster = EtcdCluster::start_members(3);
    let key = unique("leader");
    let locks = fencelock::connect(&cluster.url()).await.unwrap();
    let lease = locks
        .lock(&key)
        .ttl(Duration::from_secs(6))
        .acquire()
        .await
        .unwrap();
    let leader = cluster.wait_leader();
    cluster.kill(leader);
    // Contenders from fresh handles, through and after the election: none may win.
    let other = fencelock::connect(&cluster.url()).await.unwrap();
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(8) {
        match other.lock(&key).try_acquire().await {
            Ok(None) => answered += 1,
            Ok(Some(second)) => panic!(
                "a second holder (fence {}) beside fence {}",
                second.fence(),
                lease.fence()
            ),
            Err(err) => assert!(err.is_transient(), "{err:?}"),
        }
        assert!(!lease.is_lost(), "the lease was lost when the leader died");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(answered > 0, "the surviving members never answered");
    let new_leader = cluster.wait_leader();
    assert_ne!(new_leader, leader);
    let info = other.status(&key).await.unwrap().expect("no holder shown");
    assert_eq!(info.owner.as_deref(), Some(lease.owner()));
    assert_eq!(info.fence, Some(lease.fence()));
    cluster.start_again(leader);
    let fence = lease.fence();
    assert!(lease.release().await.unwrap(), "the lease was lost");
    let next = other.lock(&key).wait_for(SOON).acquire().await.unwrap();
    assert!(next.fence() > fence);
    assert!(next.release().await.unwrap());
}

/// A `dlock run` holder killed with SIGKILL frees the lock when its etcd lease expires,
/// and a waiter blocked meanwhile is woken by etcd, not by polling: its backoff is far
/// longer than the bound it must meet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_holder_process_is_freed_at_its_ttl_and_the_waiter_is_woken() {
    let cluster = EtcdCluster::shared(1);
    let url = cluster.url();
    let key = unique("killed");
    let mut holder = dlock_run(&url, &key, &["--ttl", "2s"], &["sleep", "120"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let locks = fencelock::connect(&url).await.unwrap();
    let fence = wait_held(&locks, &key).await;
    let waiter = tokio::spawn({
        let (locks, key) = (locks.clone(), key.clone());
        async move {
            locks
                .lock(&key)
                .backoff(Duration::from_secs(600), Duration::from_secs(600))
                .acquire()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "the waiter took a held lock");
    signal(holder.id(), libc::SIGKILL);
    holder.wait().unwrap();
    let lease = tokio::time::timeout(SOON, waiter)
        .await
        .expect("the waiter was not woken after the holder's lease expired")
        .unwrap()
        .unwrap();
    assert!(lease.fence() > fence);
    let info = locks.status(&key).await.unwrap().expect("no holder");
    assert_eq!(info.owner.as_deref(), Some(lease.owner()));
    assert!(lease.release().await.unwrap());
}

/// Fences keep increasing when every member is killed and started again: they are etcd
/// revisions, committed to each member's log before they are handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_increase_across_a_restart_of_every_member() {
    let _one = CLUSTERS.lock().await;
    let cluster = EtcdCluster::start_members(3);
    let key = unique("restart");
    let locks = fencelock::connect(&cluster.url()).await.unwrap();
    let mut last = 0;
    for round in 0..3 {
        let lease = locks.lock(&key).wait_for(SOON).acquire().await.unwrap();
        assert!(lease.fence() > last, "fence {} after {last}", lease.fence());
        last = lease.fence();
        assert!(lease.release().await.unwrap());
        if round < 2 {
            for i in 0..cluster.len() {
                cluster.kill(i);
            }
            for i in 0..cluster.len() {
                cluster.start_again(i);
            }
            cluster.wait_healthy();
        }
    }
    // A handle opened after the restarts sees the same history.
    let fresh = fencelock::connect(&cluster.url()).await.unwrap();
    let lease = fresh.lock(&key).wait_for(SOON).acquire().await.unwrap();
    assert!(lease.fence() > last);
    assert!(lease.release().await.unwrap());
}

/// `dlock run` on an etcd URL, seen by `status` and `list`, broken by `release --force`:
/// the holder's command is stopped and `dlock run` exits 76.
#[test]
fn cli_run_status_list_and_force_release() {
    let cluster = EtcdCluster::shared(1);
    let url = cluster.url();
    let key = unique("cli");
    let out = dlock(&url, &["status", &key]).output().unwrap();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let holder: Child = dlock_run(
        &url,
        &key,
        &["--ttl", "3s", "--kill-after", "1s"],
        &["sleep", "60"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let started = Instant::now();
    while !dlock(&url, &["status", &key])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(started.elapsed() < SOON, "{key} never became held");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = dlock(&url, &["status", &key, "--json"]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["held"], true, "{json}");
    assert_eq!(json["key"], key.as_str());
    assert_eq!(json["pid"], holder.id());
    assert!(json["fence"].as_u64().unwrap() >= 1, "{json}");
    assert!(
        json["owner"].as_str().is_some_and(|o| o.len() == 32),
        "{json}"
    );
    let out = dlock(&url, &["list", "--json"]).output().unwrap();
    let listed: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let entry = listed
        .iter()
        .find(|l| l["key"] == key.as_str())
        .expect("the held key is not listed");
    assert_eq!(entry["fence"], json["fence"]);
    let out = dlock(&url, &["release", &key, "--force"]).output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = holder.wait_with_output().unwrap();
    assert_eq!(code(&out), 76, "{}", stderr(&out));
    assert!(stderr(&out).contains("lost"), "{}", stderr(&out));
    let out = dlock(&url, &["status", &key]).output().unwrap();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let out = dlock(&url, &["release", &key, "--force"]).output().unwrap();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
}

/// Fifty `dlock run` processes doing a read-add-write of one counter file under the
/// lock leave exactly fifty.
#[test]
fn fifty_parallel_runs_count_to_fifty() {
    let cluster = EtcdCluster::shared(1);
    let url = cluster.url();
    let key = unique("counter");
    let dir = tempfile::Builder::new()
        .prefix("dlock-etcd-counter-")
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
            dlock_run(&url, &key, &[], &["sh", "-c", &script])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "50");
}

/// Credentials in the URL: with them the lock works, without them or with a wrong
/// password the error is the store's answer (not retried) and never shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url() {
    let cluster = EtcdCluster::start();
    cluster.enable_auth("s3cret-pw");
    let endpoint = cluster.endpoints().join(",");
    let good = format!("etcd://root:s3cret-pw@{endpoint}");
    let locks = fencelock::connect(&good).await.unwrap();
    let key = unique("auth");
    let lease = locks.lock(&key).acquire().await.unwrap();
    assert!(lease.fence() > 0);
    assert!(lease.release().await.unwrap());
    let wrong = format!("etcd://root:wrong-pw@{endpoint}");
    let err = match fencelock::connect(&wrong).await {
        Ok(locks) => locks.lock(&key).try_acquire().await.unwrap_err(),
        Err(err) => err,
    };
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    assert!(!err.to_string().contains("wrong-pw"), "{err}");
    let anonymous = fencelock::connect(&cluster.url()).await.unwrap();
    let err = anonymous.lock(&key).try_acquire().await.unwrap_err();
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
}

/// A member serving TLS only: reached with `?ca_file=`, refused without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_ca_file() {
    let cluster = EtcdCluster::start_tls();
    let locks = fencelock::connect(&cluster.url()).await.unwrap();
    let key = unique("tls");
    let lease = locks.lock(&key).acquire().await.unwrap();
    let info = locks.status(&key).await.unwrap().expect("no holder");
    assert_eq!(info.fence, Some(lease.fence()));
    assert!(lease.release().await.unwrap());
    let plain = format!(
        "etcd://{}?command_timeout=1s",
        cluster.endpoints().join(",")
    );
    let plain = fencelock::connect(&plain).await.unwrap();
    let err = plain.lock(&key).try_acquire().await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
}
