//! The lock kinds from the command line on the file backend: `--shared` beside
//! `flock -s`, `--permits`, `--all`, `elect` and `leader`.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dlock_testkit::cli::{LockDir, PROMPTLY};

const DLOCK: &str = env!("CARGO_BIN_EXE_dlock");

/// A private lock directory for `dlock` (removed when dropped).
fn new_dir() -> LockDir {
    LockDir::new(DLOCK, "dlock-kinds-")
}

/// Children killed when the test ends, passing or failing.
struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn holders(value: &serde_json::Value) -> usize {
    value["holders"].as_array().map_or(0, Vec::len)
}

#[test]
fn flock_s_and_dlock_shared_share_with_readers_and_exclude_writers() {
    let dir = new_dir();
    let key = "catalog";
    std::fs::File::create(dir.lock_file(key)).unwrap();

    // A `flock -s` reader: dlock readers share with it, dlock writers are kept out.
    let mut kids = Kids(vec![flock(&dir, &["-s", "-o"], key, &["sleep", "60"])
        .spawn()
        .unwrap()]);
    dir.wait_status(key, |v| v["kind"] == "shared" && holders(v) == 1);
    let out = dir.output(&["run", key, "--shared", "--no-wait", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        code(&dir.output(&["run", key, "--no-wait", "--", "true"])),
        75
    );
    drop(kids);

    // A dlock reader: `flock -s` shares with it, `flock -x` is kept out.
    kids = Kids(vec![
        dir.spawn(&["run", key, "--shared", "--", "sleep", "60"])
    ]);
    dir.wait_status(key, |v| v["kind"] == "shared" && holders(v) == 1);
    let shared = flock(&dir, &["-s", "-n"], key, &["true"]).status().unwrap();
    assert!(
        shared.success(),
        "flock -s was refused beside a dlock reader"
    );
    let exclusive = flock(&dir, &["-x", "-n"], key, &["true"]).status().unwrap();
    assert_eq!(
        exclusive.code(),
        Some(1),
        "flock -x got in beside a dlock reader"
    );
    assert_eq!(
        code(&dir.output(&["run", key, "--no-wait", "--", "true"])),
        75
    );
    drop(kids);

    // Writers of either kind keep readers of the other out.
    kids = Kids(vec![flock(&dir, &["-x", "-o"], key, &["sleep", "60"])
        .spawn()
        .unwrap()]);
    dir.wait_status(key, |v| v["held"] == true && v["kind"].is_null());
    assert_eq!(
        code(&dir.output(&["run", key, "--shared", "--no-wait", "--", "true"])),
        75
    );
    drop(kids);
    kids = Kids(vec![dir.spawn(&["run", key, "--", "sleep", "60"])]);
    dir.wait_status(key, |v| v["fence"].is_u64());
    let shared = flock(&dir, &["-s", "-n"], key, &["true"]).status().unwrap();
    assert_eq!(
        shared.code(),
        Some(1),
        "flock -s got in beside a dlock writer"
    );
    drop(kids);
}

#[test]
fn permits_two_admits_two_and_not_three() {
    let dir = new_dir();
    let key = "slots";
    let _kids = Kids(vec![
        dir.spawn(&["run", key, "--permits", "2", "--", "sleep", "60"]),
        dir.spawn(&["run", key, "--permits", "2", "--", "sleep", "60"]),
    ]);
    let status = dir.wait_status(key, |v| holders(v) == 2);
    assert_eq!(status["kind"], "semaphore");
    assert_eq!(status["permits"], 2);
    let third = dir.output(&["run", key, "--permits", "2", "--no-wait", "--", "true"]);
    assert_eq!(
        code(&third),
        75,
        "{}",
        String::from_utf8_lossy(&third.stderr)
    );
    // Another count while permits are held is a usage error, not a third holder.
    let mismatch = dir.output(&["run", key, "--permits", "3", "--wait", "5s", "--", "true"]);
    assert_eq!(code(&mismatch), 64);
    assert!(
        String::from_utf8_lossy(&mismatch.stderr).contains("2 permits"),
        "{}",
        String::from_utf8_lossy(&mismatch.stderr)
    );
    let env = dir.output(&[
        "run",
        "other",
        "--permits",
        "3",
        "--",
        "sh",
        "-c",
        "echo $DLOCK_PERMITS $DLOCK_FENCE",
    ]);
    let text = String::from_utf8_lossy(&env.stdout);
    assert!(text.starts_with("3 "), "{text}");
}

#[test]
fn all_takes_every_key_or_none() {
    let dir = new_dir();
    let kids = Kids(vec![dir.spawn(&["run", "b", "--", "sleep", "60"])]);
    dir.wait_status("b", |v| v["fence"].is_u64());
    let out = dir.output(&["run", "--all", "c,a,b", "--wait", "300ms", "--", "true"]);
    assert_eq!(code(&out), 75, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        code(&dir.output(&["run", "a", "--no-wait", "--", "true"])),
        0
    );
    drop(kids);
    let out = dir.output(&[
        "run",
        "--all",
        "c,a\\,x",
        "--all",
        "b",
        "--",
        "sh",
        "-c",
        "echo $DLOCK_KEYS",
    ]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "a\\,x,b,c");
}

#[test]
fn elect_runs_exactly_one_leader_and_a_new_one_after_a_kill() {
    let dir = new_dir();
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let mut kids = Kids(Vec::new());
    for i in 0..3 {
        let script = format!("touch {}/{i}; exec sleep 60", marks.display());
        kids.0.push(dir.spawn(&[
            "elect",
            "sched",
            "--value",
            &format!("cand-{i}"),
            "--",
            "sh",
            "-c",
            &script,
        ]));
    }
    let leaders = || std::fs::read_dir(&marks).unwrap().count();
    let started = Instant::now();
    while leaders() == 0 {
        assert!(started.elapsed() < PROMPTLY, "nobody became leader");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(leaders(), 1, "several leaders at once");
    let first: String = std::fs::read_dir(&marks)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .next()
        .unwrap();
    let out = dir.output(&["leader", "sched", "--json"]);
    assert_eq!(code(&out), 0);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["value"], format!("cand-{first}"));
    let first_term = shown["term"].as_u64().unwrap();

    // SIGKILL the leader's dlock: its watchdog stops its COMMAND, the kernel frees the
    // lock, and exactly one other candidate takes over with a higher term.
    let index: usize = first.parse().unwrap();
    kids.0[index].kill().unwrap();
    kids.0[index].wait().unwrap();
    let started = Instant::now();
    while leaders() < 2 {
        assert!(started.elapsed() < PROMPTLY, "no new leader after the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(leaders(), 2, "several new leaders");
    // The new leader's record may be read a moment before it is complete: ask again
    // until it names a term.
    let started = Instant::now();
    let shown = loop {
        let out = dir.output(&["leader", "sched", "--json"]);
        let shown: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if shown["term"].as_u64().is_some() {
            break shown;
        }
        assert!(
            started.elapsed() < PROMPTLY,
            "the new leader is not shown: {shown}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(shown["term"].as_u64().unwrap_or(0) > first_term, "{shown}");
    assert_ne!(shown["value"], format!("cand-{first}"));
    drop(kids);
    let out = dir.output(&["leader", "sched"]);
    assert_eq!(code(&out), 1, "{}", String::from_utf8_lossy(&out.stdout));
}

/// `flock ARGS LOCKFILE COMMAND` on `key`'s lock file: util-linux beside dlock.
fn flock(dir: &LockDir, args: &[&str], key: &str, command: &[&str]) -> Command {
    let mut flock = Command::new("flock");
    flock
        .args(args)
        .arg(dir.lock_file(key))
        .args(command)
        .stdin(Stdio::null());
    flock
}
