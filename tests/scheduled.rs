//! Scheduled jobs: `dlock run --hold-at-least` keeps a key taken after a job that ended
//! early (kept by dlock itself on the file backend, left to the store's expiry on
//! Redis), and `--hold-at-most` stops a COMMAND that overruns with exit 76.

use dlock_testkit::servers::redis::RedisServer;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const DLOCK: &str = env!("CARGO_BIN_EXE_dlock");

fn redis() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// `dlock ARGS` on the file backend in `dir`, or on `backend` if given.
fn dlock(dir: &Path, backend: Option<&str>, args: &[&str]) -> Command {
    let mut command = Command::new(DLOCK);
    command
        .args(args)
        .env_remove("DLOCK_BACKEND")
        .env("DLOCK_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(url) = backend {
        command.env("DLOCK_BACKEND", url);
    }
    command
}

fn output(dir: &Path, backend: Option<&str>, args: &[&str]) -> Output {
    dlock(dir, backend, args).output().unwrap()
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits for `child` at most `limit`; `None` if it is still running then.
fn wait_at_most(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dlock-scheduled-")
        .tempdir()
        .unwrap()
}

/// A unique key per test run, so runs against one Redis never meet.
fn unique(name: &str) -> String {
    format!("scheduled-{name}-{}-{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// On the file backend a flock dies with its process, so dlock stays and holds the key
/// after COMMAND ended, until the hold-at-least time is up; a second `--no-wait` run
/// during the window exits 75, one after it runs, with a higher fence.
#[test]
fn hold_at_least_on_file_keeps_dlock_holding_then_releases() {
    let dir = temp_dir();
    let hold = Duration::from_secs(3);
    let started = Instant::now();
    let mut first = dlock(
        dir.path(),
        None,
        &[
            "run",
            "nightly",
            "--no-wait",
            "--hold-at-least",
            "3s",
            "--",
            "sh",
            "-c",
            "echo $DLOCK_FENCE",
        ],
    )
    .spawn()
    .unwrap();
    // COMMAND is done at once; dlock keeps the lock.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        first.try_wait().unwrap().is_none(),
        "dlock exited before its hold-at-least time on the file backend"
    );
    let during = output(
        dir.path(),
        None,
        &["run", "nightly", "--no-wait", "--", "true"],
    );
    assert_eq!(code(&during), 75, "{}", stderr(&during));
    let status = wait_at_most(&mut first, Duration::from_secs(15)).expect("dlock never exited");
    let held_for = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        held_for >= hold,
        "released after {held_for:?}, before {hold:?}"
    );
    let mut out = String::new();
    std::io::Read::read_to_string(first.stdout.as_mut().unwrap(), &mut out).unwrap();
    let first_fence: u64 = out.trim().parse().unwrap();

    let after = output(
        dir.path(),
        None,
        &[
            "run",
            "nightly",
            "--no-wait",
            "--",
            "sh",
            "-c",
            "echo $DLOCK_FENCE",
        ],
    );
    assert_eq!(code(&after), 0, "{}", stderr(&after));
    let next: u64 = String::from_utf8_lossy(&after.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(next > first_fence, "fence {next} after {first_fence}");
}

/// A signal during the hold ends it: the lock is released at once and dlock exits with
/// COMMAND's status.
#[test]
fn hold_at_least_on_file_ends_early_on_sigterm() {
    let dir = temp_dir();
    let mut first = dlock(
        dir.path(),
        None,
        &["run", "k", "--hold-at-least", "1h", "--", "true"],
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(first.try_wait().unwrap().is_none(), "dlock did not hold");
    let held = output(dir.path(), None, &["status", "k"]);
    assert_eq!(
        code(&held),
        0,
        "not held during the hold: {}",
        stderr(&held)
    );
    dlock_testkit::process::signal(first.id(), libc::SIGTERM);
    let status = wait_at_most(&mut first, Duration::from_secs(10)).expect("SIGTERM ignored");
    assert_eq!(status.code(), Some(0), "{status:?}");
    let free = output(dir.path(), None, &["run", "k", "--no-wait", "--", "true"]);
    assert_eq!(code(&free), 0, "{}", stderr(&free));
}

/// On Redis the store ends the lease: dlock exits as soon as COMMAND is done, the key
/// keeps its expiry (PTTL at most the remaining hold) and a second run is refused until
/// the key has expired by itself, then runs with a higher fence.
#[test]
fn hold_at_least_on_redis_leaves_the_key_to_expire_by_itself() {
    let dir = temp_dir();
    let url = redis().url();
    let key = unique("report");
    let hold = Duration::from_secs(3);
    let started = Instant::now();
    let first = output(
        dir.path(),
        Some(&url),
        &[
            "run",
            &key,
            "--no-wait",
            "--hold-at-least",
            "3s",
            "--",
            "sh",
            "-c",
            "echo $DLOCK_FENCE",
        ],
    );
    let exited_after = started.elapsed();
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    assert!(
        exited_after < Duration::from_secs(2),
        "dlock waited {exited_after:?} on a backend with TTLs"
    );
    let first_fence: u64 = String::from_utf8_lossy(&first.stdout)
        .trim()
        .parse()
        .unwrap();
    let pttl: i64 = redis()
        .cli(&["PTTL", &format!("dlock:{key}")])
        .trim()
        .parse()
        .unwrap();
    assert!(
        pttl > 0 && pttl <= 3000,
        "the lock key's PTTL is {pttl} ms, not the rest of the hold"
    );
    let during = output(
        dir.path(),
        Some(&url),
        &["run", &key, "--no-wait", "--", "true"],
    );
    assert_eq!(code(&during), 75, "{}", stderr(&during));

    // Nobody releases it: it expires by itself when the hold is over.
    let next = loop {
        let again = output(
            dir.path(),
            Some(&url),
            &[
                "run",
                &key,
                "--no-wait",
                "--",
                "sh",
                "-c",
                "echo $DLOCK_FENCE",
            ],
        );
        if code(&again) == 0 {
            break again;
        }
        assert_eq!(code(&again), 75, "{}", stderr(&again));
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the key never expired"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let free_after = started.elapsed();
    assert!(
        free_after >= hold,
        "free after {free_after:?}, before {hold:?}"
    );
    let next_fence: u64 = String::from_utf8_lossy(&next.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(
        next_fence > first_fence,
        "fence {next_fence} after {first_fence}"
    );
}

/// `--hold-at-most` stops a COMMAND that overruns it as on a lost lease: SIGTERM to its
/// group and exit 76, on the file backend (dlock's own deadline) and on Redis (where the
/// lease is also taken with a TTL no longer than the limit).
#[test]
fn hold_at_most_stops_a_long_command_with_76() {
    let dir = temp_dir();
    let url = redis().url();
    let key = unique("bounded");
    for backend in [None, Some(url.as_str())] {
        let started = Instant::now();
        let out = output(
            dir.path(),
            backend,
            &[
                "run",
                &key,
                "--hold-at-most",
                "1500ms",
                "--",
                "sh",
                "-c",
                "trap 'echo terminated; exit 3' TERM; sleep 30 & wait",
            ],
        );
        let took = started.elapsed();
        assert_eq!(code(&out), 76, "{backend:?}: {}", stderr(&out));
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_secs(10),
            "{backend:?}: stopped after {took:?}"
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("terminated"),
            "{backend:?}: COMMAND did not get SIGTERM: {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr(&out).contains("hold-at-most limit of 1.5s"),
            "{backend:?}: {}",
            stderr(&out)
        );
        // The lock is free again at once.
        let free = output(
            dir.path(),
            backend,
            &["run", &key, "--no-wait", "--", "true"],
        );
        assert_eq!(code(&free), 0, "{backend:?}: {}", stderr(&free));
    }
}

/// On Redis, a job within its hold-at-most limit runs normally, and its lease was taken
/// with a TTL no longer than the limit even with a longer `--ttl`.
#[test]
fn hold_at_most_caps_the_store_ttl() {
    let dir = temp_dir();
    let url = redis().url();
    let key = unique("capped");
    let mut child = dlock(
        dir.path(),
        Some(&url),
        &[
            "run",
            &key,
            "--ttl",
            "1m",
            "--hold-at-most",
            "5s",
            "--",
            "sleep",
            "1",
        ],
    )
    .spawn()
    .unwrap();
    let name = format!("dlock:{key}");
    let started = Instant::now();
    let pttl = loop {
        let pttl: i64 = redis().cli(&["PTTL", &name]).trim().parse().unwrap();
        if pttl > 0 {
            break pttl;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never held");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(pttl <= 5000, "PTTL {pttl} ms above the 5s limit");
    let status = wait_at_most(&mut child, Duration::from_secs(10)).expect("did not end");
    assert!(status.success(), "{status:?}");
}

/// Contradicting or impossible hold times are usage errors, named in one line.
#[test]
fn bad_hold_times_are_usage_errors() {
    let dir = temp_dir();
    for (args, needle) in [
        (
            vec!["--hold-at-least", "10s", "--hold-at-most", "5s"],
            "longer than --hold-at-most",
        ),
        (vec!["--hold-at-least", "9000h"], "longest lease"),
        (vec!["--hold-at-most", "1ms"], "hold-at-most"),
    ] {
        let mut all = vec!["run", "k"];
        all.extend(args.iter().copied());
        all.extend(["--", "true"]);
        let out = output(dir.path(), None, &all);
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).trim_end().lines().count(), 1);
    }
    let out = output(
        dir.path(),
        None,
        &["run", "--all", "a,b", "--hold-at-least", "1s", "--", "true"],
    );
    assert_eq!(code(&out), 64, "{}", stderr(&out));
}
