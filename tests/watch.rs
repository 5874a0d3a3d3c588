//! `dlock list --watch` and `dlock status KEY --watch` with their output in a file (not a
//! terminal): plain blocks, one at each change of holders, no escape sequences, keys
//! shown with their control characters escaped; SIGINT and SIGTERM end them with status 0.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `dlock ARGS --watch --interval 50ms` with stdout in `out`.
fn watch(args: &[&str], url: &str, out: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dlock"))
        .args(args)
        .args(["--backend", url, "--watch", "--interval", "50ms"])
        .env_remove("DLOCK_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the file's content satisfies `ready` (or fails after 10 s).
async fn until(out: &std::path::Path, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(out).unwrap_or_default();
        if ready(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "never ready:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `signal` and expects exit status 0 with nothing on stderr.
fn stop(child: Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the child we started and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The blocks of the output: each starts with a `--- TIME …` title line.
fn blocks(text: &str) -> Vec<String> {
    text.split("--- ")
        .filter(|b| !b.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn list_watch_into_a_file_shows_a_lock_appearing_and_disappearing() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("locks").display());
    let out = dir.path().join("watch.log");
    let locks = fencelock::connect(&url).await.unwrap();
    let watcher = watch(&["list"], &url, &out);
    until(&out, |t| t.contains(": 0 held\nno locks held on file://")).await;

    // A key with a terminal escape in it: shown escaped, never raw.
    let lease = locks.lock("deploy\u{1b}[2J").acquire().await.unwrap();
    let fence = lease.fence();
    until(&out, |t| t.contains(&format!("\ndeploy\\x1b[2J  {fence} "))).await;
    // Unchanged holders print nothing more, however many polls pass.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(lease.release().await.unwrap());
    let text = until(&out, |t| {
        blocks(t)
            .last()
            .is_some_and(|b| b.contains(": 0 held\n") && t.contains(": 1 held\n"))
            && blocks(t).len() >= 3
    })
    .await;
    stop(watcher, libc::SIGTERM);
    let text = std::fs::read_to_string(&out).unwrap_or(text);

    assert!(
        !text.contains('\u{1b}'),
        "an escape sequence reached the file:\n{text}"
    );
    // Free, then held (a poll may also catch the lock file locked an instant before its
    // record is written: a block of its own, without a fence), then free again.
    let blocks = blocks(&text);
    // Unchanged holders printed nothing more, however many polls passed.
    assert!((3..=4).contains(&blocks.len()), "{text}");
    assert!(blocks[0].contains(": 0 held\nno locks held on "), "{text}");
    let last = &blocks[blocks.len() - 1];
    assert!(last.contains(": 0 held\nno locks held on "), "{text}");
    for middle in &blocks[1..blocks.len() - 1] {
        assert!(middle.contains(": 1 held\n"), "{text}");
    }
    let with_fence = blocks
        .iter()
        .find(|b| b.contains(&format!("  {fence}  ")))
        .unwrap_or_else(|| panic!("no block with fence {fence}:\n{text}"));
    let held: Vec<&str> = with_fence.lines().collect();
    assert!(held[0].ends_with(": 1 held"), "{text}");
    assert!(held[0].contains(" dlock list on file://"), "{text}");
    let header: Vec<&str> = held[1].split_whitespace().collect();
    assert_eq!(
        header,
        ["KEY", "FENCE", "HOLDER", "AGE", "RENEWED", "EXPIRES", "NOTE"]
    );
    let row: Vec<&str> = held[2].split_whitespace().collect();
    assert_eq!(row[0], "deploy\\x1b[2J", "{text}");
    assert_eq!(row[1], fence.to_string(), "{text}");
    assert!(
        row[2].ends_with(&format!(":{}", std::process::id())),
        "{text}"
    );
    // Each title starts with an RFC 3339 time, UTC.
    for block in &blocks {
        let time = block.split_whitespace().next().unwrap();
        assert!(
            time.len() == 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{text}"
        );
    }
}

#[tokio::test]
async fn status_watch_follows_one_key_across_holders_and_ends_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("locks").display());
    let out = dir.path().join("status.log");
    let locks = fencelock::connect(&url).await.unwrap();
    let watcher = watch(&["status", "report"], &url, &out);
    until(&out, |t| t.contains("report: free\n")).await;

    let first = locks.lock("report").acquire().await.unwrap();
    let fence1 = first.fence();
    // Another key changes nothing in this view.
    let other = locks.lock("unrelated").acquire().await.unwrap();
    until(&out, |t| t.contains(&format!("\nreport  {fence1} "))).await;
    assert!(first.release().await.unwrap());
    // A new holder right after: a new fence is a change even if the poll missed the gap.
    let second = locks.lock("report").acquire().await.unwrap();
    let fence2 = second.fence();
    let text = until(&out, |t| t.contains(&format!("\nreport  {fence2} "))).await;
    assert!(!text.contains("unrelated"), "{text}");
    drop((second, other));
    stop(watcher, libc::SIGINT);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(blocks(&text).len() >= 3, "{text}");
    assert!(
        blocks(&text)[0].contains(" dlock status report on file://"),
        "{text}"
    );
}

#[test]
fn watch_options_are_checked() {
    let dlock = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dlock"))
            .args(args)
            .env("DLOCK_BACKEND", "memory://")
            .output()
            .unwrap()
    };
    for args in [
        &["list", "--interval", "1s"][..],
        &["list", "--watch", "--json"],
        &["list", "--watch", "--interval", "0"],
        &["status", "k", "--watch", "--interval", "soon"],
    ] {
        let out = dlock(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).lines().count(),
            1,
            "{args:?}"
        );
    }
}

/// On a terminal (a pty from script(1), util-linux) the view is redrawn in place: home,
/// each line cleared to its end, the rest of the screen cleared; and SIGINT still ends
/// it with status 0 (script -e and timeout --preserve-status pass the status on).
#[test]
fn on_a_terminal_the_view_is_redrawn_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("locks").display());
    let inner = format!(
        "timeout --preserve-status -s INT 1 '{}' list --watch --interval 100ms --backend '{url}'",
        env!("CARGO_BIN_EXE_dlock")
    );
    let out = Command::new("script")
        .args(["-qfec", &inner, "/dev/null"])
        .env_remove("DLOCK_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("script(1) from util-linux runs the watch on a terminal");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text:?}");
    let frames = text.matches("\u{1b}[H").count();
    assert!(frames >= 3, "{frames} frames: {text:?}");
    assert_eq!(text.matches("\u{1b}[J").count(), frames, "{text:?}");
    assert!(
        text.contains("no locks held on file://") && text.contains("every 100ms"),
        "{text:?}"
    );
}
