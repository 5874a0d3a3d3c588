//! Fault tests and the CLI on `mongodb://`, each against a private SecantusDB server: a
//! holder killed with SIGKILL, the server restarted, unreachable or frozen, and the
//! `dlock` commands.
#![cfg(feature = "mongodb")]

use dlock_testkit::process::signal;
use dlock_testkit::servers::mongodb::MongoServer;
use fencelock::Error;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DLOCK: &str = env!("CARGO_BIN_EXE_dlock");

async fn within<T>(limit: Duration, what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: did not happen within {limit:?}"),
    }
}

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

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits until `key` shows as held in `dlock status`.
fn wait_held(url: &str, key: &str) {
    let started = Instant::now();
    while !output(url, &["status", key]).status.success() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{key} never became held"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback port nothing listens on.
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_cli_holder_is_freed_at_its_ttl() {
    let server = MongoServer::start();
    let url = server.url("faults");
    let mut holder: Child = dlock(&url, &["run", "victim", "--ttl", "3s", "--", "sleep", "60"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let locks = fencelock::connect(&url).await.unwrap();
    let info = within(
        Duration::from_secs(30),
        "the CLI holder takes the lock",
        async {
            loop {
                if let Some(info) = locks.status("victim").await.unwrap() {
                    break info;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    assert_eq!(info.pid, Some(holder.id()));
    signal(holder.id(), libc::SIGKILL);
    holder.wait().unwrap();
    // Nobody released it: it is still held until its TTL runs out on the server.
    assert!(locks.lock("victim").try_acquire().await.unwrap().is_none());
    let lease = within(
        Duration::from_secs(20),
        "the lock of a killed holder is freed at its TTL",
        locks.lock("victim").acquire(),
    )
    .await
    .unwrap();
    assert!(lease.fence() > info.fence.unwrap());
    assert!(lease.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fences_keep_increasing_across_a_server_restart() {
    let server = MongoServer::start();
    let url = server.url("faults");
    let locks = fencelock::connect(&url).await.unwrap();
    let mut last = 0;
    for _ in 0..3 {
        let lease = locks.lock("restarted").acquire().await.unwrap();
        assert!(lease.fence() > last);
        last = lease.fence();
        lease.release().await.unwrap();
    }
    server.restart();
    for round in 0..3 {
        let handle = if round == 1 {
            fencelock::connect(&url).await.unwrap()
        } else {
            locks.clone()
        };
        let lease = within(
            Duration::from_secs(60),
            "acquire after the restart",
            handle
                .lock("restarted")
                .wait_for(Duration::from_secs(30))
                .acquire(),
        )
        .await
        .unwrap();
        assert!(lease.fence() > last, "fence {} after {last}", lease.fence());
        last = lease.fence();
        lease.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_server_gives_typed_errors_within_the_deadline() {
    let url = format!("mongodb://127.0.0.1:{}/faults", dead_port());
    let started = Instant::now();
    let err = fencelock::connect(&url).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    // A handle whose server went away: a limited wait ends in a typed error, on time.
    let server = MongoServer::start();
    let url = server.url("faults");
    let locks = fencelock::connect(&url).await.unwrap();
    server.kill();
    let wait = Duration::from_secs(2);
    let started = Instant::now();
    let err = locks
        .lock("gone")
        .wait_for(wait)
        .acquire()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        started.elapsed() <= wait + Duration::from_secs(1),
        "gave up late: {:?}",
        started.elapsed()
    );

    // The CLI: exit 69 with one line, within the wait plus a second (and process start-up).
    let started = Instant::now();
    let out = output(&url, &["run", "gone", "--wait", "2s", "--", "true"]);
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(stderr(&out).contains("unavailable"), "{}", stderr(&out));
    assert!(
        started.elapsed() <= Duration::from_secs(5),
        "gave up late: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frozen_server_gives_typed_errors_within_the_deadline() {
    let server = MongoServer::start();
    let url = format!("{}?command_timeout=2s", server.url("faults"));
    let locks = fencelock::connect(&url).await.unwrap();
    let lease = locks.lock("frozen-held").acquire().await.unwrap();
    server.pause();
    let wait = Duration::from_secs(2);
    let started = Instant::now();
    let err = locks
        .lock("frozen")
        .wait_for(wait)
        .acquire()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        started.elapsed() <= wait + Duration::from_secs(1),
        "gave up late: {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let err = locks.status("frozen-held").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        started.elapsed() <= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let out = output(&url, &["run", "frozen", "--wait", "2s", "--", "true"]);
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(
        started.elapsed() <= Duration::from_secs(5),
        "gave up late: {:?}",
        started.elapsed()
    );
    server.resume();
    drop(lease);
}

#[test]
fn cli_run_status_list_and_release_force() {
    let server = MongoServer::start();
    let url = server.url("cli");
    let out = output(&url, &["status", "k"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let mut holder = dlock(&url, &["run", "k", "--ttl", "3s", "--", "sleep", "60"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_held(&url, "k");
    let out = output(&url, &["status", "k", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["held"], true);
    assert_eq!(json["key"], "k");
    assert_eq!(json["pid"], holder.id());
    assert_eq!(json["ttl_ms"], 3000);
    assert!(json["fence"].as_u64().unwrap() >= 1);
    let out = output(&url, &["list", "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["key"], "k");
    let table = String::from_utf8(output(&url, &["list"]).stdout).unwrap();
    assert!(
        table.starts_with("KEY") && table.contains(&holder.id().to_string()),
        "{table}"
    );
    let out = output(&url, &["release", "k", "--force"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // The holder's next renewal is refused: its command is stopped and it exits 76.
    let started = Instant::now();
    let status = loop {
        if let Some(status) = holder.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "holder never saw the loss"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(76));
    assert_eq!(code(&output(&url, &["status", "k"])), 1);
    assert_eq!(code(&output(&url, &["release", "k", "--force"])), 1);
    let out = output(&url, &["run", "k", "--no-wait", "--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn fifty_parallel_runs_count_to_fifty() {
    let server = MongoServer::start();
    let url = server.url("cli");
    let dir = tempfile::Builder::new()
        .prefix("dlock-mongodb-cli-")
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
