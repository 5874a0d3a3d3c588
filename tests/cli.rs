//! The `dlock` command on the default file backend, as SPEC §4 and flock(1) users expect.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dlock_testkit::cli::LockDir;

const DLOCK: &str = env!("CARGO_BIN_EXE_dlock");

/// A private lock directory for `dlock` (removed when dropped).
fn new_dir() -> LockDir {
    LockDir::new(DLOCK, "dlock-cli-")
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn one_line(output: &Output) -> String {
    let text = stderr(output);
    assert_eq!(text.trim_end().lines().count(), 1, "not one line: {text:?}");
    text
}

#[test]
fn no_wait_and_wait_give_75_while_held() {
    let dir = new_dir();
    let mut holder = dir.spawn(&["run", "k", "--", "sleep", "5"]);
    dir.wait_held("k");

    let started = Instant::now();
    let out = dir.output(&["run", "k", "--no-wait", "--", "true"]);
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "--no-wait took {:?}",
        started.elapsed()
    );
    let message = one_line(&out);
    assert!(
        message.contains("\"k\"") && message.contains("file://"),
        "{message}"
    );

    let started = Instant::now();
    let out = dir.output(&["run", "k", "--wait", "1s", "--", "true"]);
    let waited = started.elapsed();
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn flock_and_dlock_exclude_each_other() {
    let dir = new_dir();
    let mut holder = dir.spawn(&["run", "k", "--", "sleep", "5"]);
    dir.wait_held("k");
    let flock = Command::new("flock")
        .arg("-n")
        .arg(dir.lock_file("k"))
        .arg("true")
        .status()
        .unwrap();
    assert!(!flock.success(), "flock -n got a lock dlock holds");
    holder.kill().unwrap();
    holder.wait().unwrap();

    let mut flock = Command::new("flock")
        .arg(dir.lock_file("k"))
        .args(["sleep", "1.5"])
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !dir.output(&["status", "k"]).status.success() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "status never showed flock's lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = dir.output(&["run", "k", "--no-wait", "--", "true"]);
    assert_eq!(
        code(&out),
        75,
        "dlock got a lock flock(1) holds: {}",
        stderr(&out)
    );
    // flock(1)'s COMMAND inherits its descriptor: the lock ends when `sleep` does.
    assert!(flock.wait().unwrap().success());
    let out = dir.output(&["run", "k", "--no-wait", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn fifty_parallel_runs_count_to_fifty() {
    let dir = new_dir();
    let counter = dir.path().join("counter");
    std::fs::write(&counter, "0").unwrap();
    let script = format!(
        "n=$(cat {0}); sleep 0.01; echo $((n + 1)) > {0}",
        counter.display()
    );
    let children: Vec<Child> = (0..50)
        .map(|_| {
            dir.dlock(&["run", "counter", "--", "sh", "-c", &script])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "50");
}

#[test]
fn fence_increases_across_runs_and_processes() {
    let dir = new_dir();
    let mut last = 0u64;
    for _ in 0..5 {
        let out = dir.output(&[
            "run",
            "f",
            "--",
            "sh",
            "-c",
            "echo $DLOCK_FENCE $DLOCK_KEY ${#DLOCK_OWNER}",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(fields[1], "f");
        assert_eq!(fields[2], "32", "owner token is not 128 bits of hex");
        let fence: u64 = fields[0].parse().unwrap();
        assert!(fence > last, "fence {fence} after {last}");
        last = fence;
    }
}

#[test]
fn sigkill_of_dlock_stops_command_and_frees_lock() {
    let dir = new_dir();
    let marker = dir.path().join("still-running");
    let script = format!("sleep 2; touch {}", marker.display());
    let mut holder = dir
        .dlock(&["run", "k", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    dir.wait_held("k");
    // The lock is taken a moment before COMMAND is started.
    let started = Instant::now();
    let command_pid: i32 = loop {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", holder.id()))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            break pid.parse().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "COMMAND not started"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    unsafe { libc::kill(holder.id() as i32, libc::SIGKILL) };
    holder.wait().unwrap();

    let started = Instant::now();
    let out = dir.output(&["run", "k", "--no-wait", "--", "true"]);
    assert_eq!(
        code(&out),
        0,
        "lock not free after SIGKILL: {}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        std::fs::read_to_string(format!("/proc/{command_pid}/stat"))
            .map_or(true, |s| s.contains(") Z")),
        "COMMAND still runs after dlock was killed"
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!marker.exists(), "COMMAND went on running outside the lock");
}

#[test]
fn lost_lease_terminates_command_with_status_76() {
    let dir = new_dir();
    let holder = dir
        .dlock(&[
            "run",
            "k",
            "--ttl",
            "300ms",
            "--kill-after",
            "1s",
            "--",
            "sleep",
            "30",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    dir.wait_held("k");
    let out = dir.output(&["release", "k", "--force"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let started = Instant::now();
    let out = holder.wait_with_output().unwrap();
    assert_eq!(code(&out), 76, "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(stderr(&out).contains("lost"), "{}", stderr(&out));
}

/// The process `pid` while it runs `comm` (so that a reused pid is never touched).
fn running_as(pid: &str, comm: &str) -> Option<libc::pid_t> {
    let pid: libc::pid_t = pid.trim().parse().ok()?;
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    (name.trim() == comm && !zombie).then_some(pid)
}

/// A `dlock run` holder whose COMMAND writes its shell's and its background child's pids
/// into `$PIDS`, a directory of their own. Dropped, passed or failed, it kills dlock, the
/// shell and the child: nothing the test started outlives it (nor holds the test's
/// output open).
struct Holder {
    pids: LockDir,
    child: Child,
}

impl Holder {
    fn pid_of(&self, name: &str) -> Option<libc::pid_t> {
        let pid = std::fs::read_to_string(self.pids.path().join(format!("{name}.pid"))).ok()?;
        running_as(&pid, name)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        for name in ["sleep", "sh"] {
            if let Some(pid) = self.pid_of(name) {
                // SAFETY: kill(2) of a process this test started, checked just now.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn signals_are_forwarded_to_command() {
    let dir = new_dir();
    // The background child writes nowhere the test reads: were it left running, it would
    // not hold the test's output open.
    let script = r#"echo $$ > "$PIDS/sh.pid"
trap 'kill $! 2>/dev/null; exit 42' TERM
sleep 10 </dev/null >/dev/null 2>&1 &
echo $! > "$PIDS/sleep.pid"
wait"#;
    let pids = new_dir();
    let log = pids.path().join("holder.log");
    let mut holder = Holder {
        child: dir
            .dlock(&["run", "k", "--", "sh", "-c", script])
            .env("PIDS", pids.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        pids,
    };
    dir.wait_held("k");
    let started = Instant::now();
    while holder.pid_of("sleep").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "COMMAND never started its child"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(holder.child.id() as i32, libc::SIGTERM) };
    let status = holder.child.wait().unwrap();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(42),
        "COMMAND did not get SIGTERM: {log}"
    );
    let started = Instant::now();
    while holder.pid_of("sleep").is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "COMMAND's child outlived dlock run"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = dir.output(&["run", "k", "--no-wait", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn exit_status_is_commands() {
    let dir = new_dir();
    assert_eq!(
        code(&dir.output(&["run", "k", "--", "sh", "-c", "exit 7"])),
        7
    );
    assert_eq!(
        code(&dir.output(&["run", "k", "--", "sh", "-c", "kill -9 $$"])),
        137
    );
    assert_eq!(
        code(&dir.output(&["run", "k", "--", "/no/such/program"])),
        127
    );
}

#[test]
fn bad_input_exits_64_or_69_with_one_line() {
    let dir = new_dir();
    let long_key = "x".repeat(2000);
    for (args, want, needle) in [
        (vec!["run", "", "--", "true"], 64, "empty"),
        (vec!["run", long_key.as_str(), "--", "true"], 64, "1024"),
        (vec!["run", "k", "--ttl", "abc", "--", "true"], 64, "--ttl"),
        (
            vec!["run", "k", "--wait", "5 parsecs", "--", "true"],
            64,
            "--wait",
        ),
        (
            vec!["run", "k", "--backend", "nosuch://x", "--", "true"],
            64,
            "nosuch",
        ),
        (
            vec![
                "run",
                "k",
                "--backend",
                "file:///proc/dlock-unwritable",
                "--",
                "true",
            ],
            69,
            "/proc/dlock-unwritable",
        ),
        // `run k` without COMMAND holds the lock (tests/cli_polish.rs); hold takes none.
        (vec!["hold", "k", "--", "true"], 64, "COMMAND"),
        (vec!["release", "k"], 64, "--force"),
        (vec!["status", ""], 64, "empty"),
    ] {
        let out = dir.output(&args);
        assert_eq!(code(&out), want, "{args:?}: {}", stderr(&out));
        let message = one_line(&out);
        assert!(message.contains(needle), "{args:?}: {message}");
    }
    let out = dir.output(&[
        "run",
        "k",
        "--backend",
        "redis://app:hunter2@127.0.0.1:1",
        "--",
        "true",
    ]);
    assert!(
        !stderr(&out).contains("hunter2"),
        "password printed: {}",
        stderr(&out)
    );
}

#[test]
fn status_list_and_release() {
    let dir = new_dir();
    let out = dir.output(&["status", "k"]);
    assert_eq!(code(&out), 1);
    let mut holder = dir.spawn(&["run", "k", "--", "sleep", "5"]);
    dir.wait_held("k");
    let out = dir.output(&["status", "k", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["held"], true);
    assert_eq!(json["key"], "k");
    assert_eq!(json["pid"], holder.id());
    assert!(json["fence"].as_u64().unwrap() >= 1);
    let out = dir.output(&["list", "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["key"], "k");
    let table = String::from_utf8(dir.output(&["list"]).stdout).unwrap();
    assert!(
        table.starts_with("KEY") && table.contains(&holder.id().to_string()),
        "{table}"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(code(&dir.output(&["release", "k", "--force"])), 1);
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    for sub in ["run", "status", "list", "release"] {
        let out = Command::new(DLOCK).args([sub, "--help"]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Example"), "{sub} --help has no example");
    }
}
