//! The `dlock` command's messages, help and flock(1)-style forms (SPEC §4), with the real
//! binary on the file backend in a private temporary directory; the connection-error
//! tests use a closed loopback port, which needs no server.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dlock_testkit::cli::LockDir;

const DLOCK: &str = env!("CARGO_BIN_EXE_dlock");

/// A private lock directory for `dlock` (removed when dropped).
fn new_dir() -> LockDir {
    LockDir::new(DLOCK, "dlock-polish-")
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn one_line(output: &Output) -> String {
    let text = stderr(output);
    assert_eq!(text.trim_end().lines().count(), 1, "not one line: {text:?}");
    assert!(text.starts_with("dlock: "), "{text:?}");
    text
}

fn signal(child: &Child, number: i32) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill on the pid of a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, number) }, 0);
}

/// The child's exit status, waiting at most `limit`.
fn wait_for(child: &mut Child, limit: Duration) -> i32 {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(started.elapsed() < limit, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn flock_form_runs_command_and_options_after_it_are_its_own() {
    let dir = new_dir();
    let out = dir.output(&["run", "demo", "echo", "hi", "--ttl", "x", "-n"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "hi --ttl x -n\n");

    // Options before COMMAND are dlock's; `--` is still accepted.
    let out = dir.output(&["run", "demo", "-n", "--", "echo", "hi"]);
    assert_eq!((code(&out), stdout(&out)), (0, "hi\n".to_owned()));

    // With --all there is no KEY: the first word is COMMAND.
    let out = dir.output(&["run", "--all", "a,b", "sh", "-c", "echo $DLOCK_KEYS"]);
    assert_eq!((code(&out), stdout(&out)), (0, "a,b\n".to_owned()));
}

#[test]
fn usage_errors_are_one_readable_line_pointing_at_the_subcommand_help() {
    let dir = new_dir();
    let out = dir.output(&["run", "demo", "--no-wiat", "--", "true"]);
    assert_eq!(code(&out), 64);
    let message = one_line(&out);
    assert!(message.contains("did you mean --no-wait?"), "{message}");
    assert!(message.contains("(see dlock run --help)"), "{message}");
    assert!(!message.contains("tip:"), "{message}");

    let out = dir.output(&["stauts", "demo"]);
    assert_eq!(code(&out), 64);
    let message = one_line(&out);
    assert!(message.contains("did you mean status?"), "{message}");
    assert!(message.contains("(see dlock --help)"), "{message}");

    let out = dir.output(&["status"]);
    assert_eq!(code(&out), 64);
    let message = one_line(&out);
    assert!(
        message.contains("<KEY>") && message.contains("(see dlock status --help)"),
        "{message}"
    );
}

#[test]
fn a_refusal_names_the_holder_and_how_long_it_waited() {
    let dir = new_dir();
    let holder = dir.hold("k");

    let out = dir.output(&["run", "k", "-n", "--", "true"]);
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    let message = one_line(&out);
    assert!(
        message.contains(&format!("held by {}@", holder.pid())),
        "{message}"
    );
    assert!(
        message.contains("fence ") && message.contains("acquired "),
        "{message}"
    );
    assert!(message.contains("not acquired (--no-wait)"), "{message}");
    assert!(!message.contains("waiting 0ms"), "{message}");

    let started = Instant::now();
    let out = dir.output(&["run", "k", "-w", "1", "--", "true"]);
    let waited = started.elapsed();
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(4),
        "-w 1 took {waited:?}"
    );
    let message = one_line(&out);
    assert!(
        message.contains("not acquired after waiting 1s")
            && message.contains(&format!("{}@", holder.pid())),
        "{message}"
    );

    // -E replaces the conflict status, as flock -E does.
    let out = dir.output(&["run", "k", "-n", "-E", "3", "--", "true"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let out = dir.output(&["run", "k", "--no-wait", "--conflict-exit-code", "0", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("not acquired"), "{}", stderr(&out));
}

#[test]
fn a_wait_is_announced_on_a_terminal_and_with_verbose_only() {
    let dir = new_dir();
    let holder = dir.hold("k");
    let expected = "waiting for lock \"k\" on file://";
    let by = format!("held by {}@", holder.pid());

    // Not on a terminal, without -v: silent until the refusal.
    let out = dir.output(&["run", "k", "-w", "2", "--", "true"]);
    assert_eq!(code(&out), 75);
    assert!(!stderr(&out).contains("waiting for"), "{}", stderr(&out));

    // -v: said once, without a terminal.
    let out = dir.output(&["run", "k", "-v", "-w", "2", "--", "true"]);
    assert_eq!(code(&out), 75);
    let text = stderr(&out);
    assert_eq!(text.matches(&expected).count(), 1, "{text}");
    assert!(text.contains(&by), "{text}");

    // On a terminal (script(1) gives dlock a pseudo-terminal): said once, by itself.
    let line = format!("{DLOCK} run k -w 2 -- true");
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env_remove("DLOCK_BACKEND")
        .env("DLOCK_DIR", dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("script(1) from util-linux is needed for the terminal case");
    let text = stdout(&out);
    assert_eq!(code(&out), 75, "{text}");
    assert_eq!(text.matches(&expected).count(), 1, "{text}");
    assert!(text.contains(&by), "{text}");
    drop(holder);

    // -v also says when the lock is taken and released.
    let out = dir.output(&["run", "k", "-v", "--", "true"]);
    assert_eq!(code(&out), 0);
    let text = stderr(&out);
    assert!(
        text.contains("acquired lock \"k\" (fence ") && text.contains("released \"k\""),
        "{text}"
    );
}

#[test]
fn help_documents_verbose_log_ttl_minimum_force_and_schema_url() {
    let dir = new_dir();
    let help = |args: &[&str]| {
        let out = dir.output(args);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        stdout(&out)
    };
    let top = help(&["--help"]);
    assert!(
        top.contains("DLOCK_LOG") && top.contains("-v/--verbose"),
        "{top}"
    );
    let run = help(&["run", "--help"]);
    assert!(run.contains("at least 30ms"), "{run}");
    for option in [
        "--verbose",
        "-E, --conflict-exit-code",
        "-c, --command",
        "-n, --no-wait",
        "-w, --wait",
    ] {
        assert!(run.contains(option), "{option} not in {run}");
    }
    let release = help(&["release", "--help"]);
    assert!(
        release.contains("Usage: dlock release --force"),
        "{release}"
    );
    let schema = help(&["schema", "--help"]);
    assert!(schema.contains("PostgreSQL or MySQL"), "{schema}");
    assert!(!schema.contains(".local/state/dlock"), "{schema}");

    let out = dir.output(&["schema"]);
    assert_eq!(code(&out), 64);
    let message = one_line(&out);
    assert!(message.contains("postgres://"), "{message}");
}

#[test]
fn bench_is_not_a_subcommand_and_says_where_the_benchmarks_are() {
    let dir = new_dir();
    let out = dir.output(&["bench"]);
    assert_eq!(code(&out), 64);
    let message = one_line(&out);
    assert!(
        message.contains("dlock-bench") && message.contains("temporary directory"),
        "{message}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn an_unreachable_backend_names_key_backend_and_cause_once() {
    let dir = new_dir();
    let port = closed_port();
    for url in [
        format!("redis://127.0.0.1:{port}"),
        format!("postgres://u@127.0.0.1:{port}/db"),
        format!("mysql://u@127.0.0.1:{port}/db"),
    ] {
        for args in [
            vec!["run", "nightly", "-n", "--backend", &url, "--", "true"],
            vec!["status", "nightly", "--backend", &url],
            vec!["release", "nightly", "--force", "--backend", &url],
        ] {
            let out = dir.output(&args);
            assert_eq!(code(&out), 69, "{args:?}: {}", stderr(&out));
            let message = one_line(&out);
            assert!(message.contains("\"nightly\""), "no key: {message}");
            assert!(message.contains(&url), "no backend: {message}");
            assert!(
                message.to_lowercase().contains("connection refused"),
                "no cause: {message}"
            );
            let parts: Vec<&str> = message.trim_end().split(": ").collect();
            assert!(
                parts.windows(2).all(|w| w[0] != w[1]),
                "a repeated part: {message}"
            );
        }
    }
}

#[test]
fn a_named_directory_gets_only_its_last_component_created() {
    let dir = new_dir();
    let missing = dir.path().join("mistyped");
    let url = format!("file://{}/locks", missing.display());
    let out = dir.output(&["run", "k", "--backend", &url, "--", "true"]);
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    let message = one_line(&out);
    assert!(
        message.contains(&format!("{} does not exist", missing.display())),
        "{message}"
    );
    assert!(message.contains("\"k\""), "{message}");
    assert!(!missing.exists(), "the missing parent was created");

    // The same through DLOCK_DIR.
    let out = dir
        .dlock(&["run", "k", "--", "true"])
        .env("DLOCK_DIR", missing.join("locks"))
        .output()
        .unwrap();
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(!missing.exists(), "the missing parent was created");

    // A missing last component is created, private.
    let last = dir.path().join("locks");
    let url = format!("file://{}", last.display());
    let out = dir.output(&["run", "k", "--backend", &url, "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&last).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);

    // The default directory is created with its parents.
    let state: PathBuf = dir.path().join("home/.local/state");
    let out = dir
        .dlock(&["run", "k", "--", "true"])
        .env_remove("DLOCK_DIR")
        .env("XDG_STATE_HOME", &state)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(state.join("dlock/k.lock").is_file());
}

/// The words of the table row of `key` with numbers and time units blanked (times move
/// between calls).
fn row(table: &str, key: &str) -> (String, Vec<String>) {
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default().to_owned();
    let line = lines
        .find(|line| line.starts_with(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no row for {key} in {table}"));
    let words = line
        .split_whitespace()
        .map(|w| {
            w.chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .collect::<String>()
        })
        .map(|w| match w.trim_start_matches('#') {
            "ms" | "s" | "m" | "h" => "#".to_owned(),
            _ => w.replace('#', ""),
        })
        .collect();
    (header, words)
}

#[test]
fn status_and_list_show_one_lock_in_the_same_columns() {
    let dir = new_dir();
    let _holder = dir.hold("k");
    let status = stdout(&dir.output(&["status", "k"]));
    let list = stdout(&dir.output(&["list"]));
    let (status_header, status_row) = row(&status, "k");
    let (list_header, list_row) = row(&list, "k");
    assert_eq!(status_header, list_header);
    assert_eq!(
        status_header.split_whitespace().collect::<Vec<_>>(),
        ["KEY", "FENCE", "OWNER", "HOLDER", "ACQUIRED", "RENEWED", "EXPIRES", "NOTE"]
    );
    assert_eq!(status_row, list_row, "{status}\n{list}");
    assert!(!status.contains("renewed"), "{status}");
}

#[test]
fn a_shell_string_runs_with_sh_c_and_excludes_command() {
    let dir = new_dir();
    let out = dir.output(&["run", "k", "-c", "echo \"$DLOCK_KEY\"; exit 3"]);
    assert_eq!((code(&out), stdout(&out)), (3, "k\n".to_owned()));
    let out = dir.output(&["run", "k", "-c", "true", "--", "echo", "both"]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    one_line(&out);
}

/// Spawns a holder without COMMAND and reads the line it prints once it holds.
fn spawn_holder(dir: &LockDir, args: &[&str]) -> (Child, String) {
    let mut child = dir.dlock(args).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

#[test]
fn hold_prints_key_and_fence_and_releases_on_a_signal() {
    let dir = new_dir();
    for (args, number) in [
        (vec!["hold", "k"], libc::SIGTERM),
        (vec!["run", "k"], libc::SIGINT),
    ] {
        let (mut child, line) = spawn_holder(&dir, &args);
        assert!(line.starts_with("key=k fence="), "{line:?}");
        assert!(line.contains(" owner="), "{line:?}");
        let status = stdout(&dir.output(&["status", "k", "--json"]));
        let fence = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("fence="))
            .unwrap();
        assert!(status.contains(&format!("\"fence\":{fence}")), "{status}");
        signal(&child, number);
        assert_eq!(wait_for(&mut child, Duration::from_secs(5)), 0, "{args:?}");
        assert_eq!(code(&dir.output(&["status", "k"])), 1, "still held");
    }

    let out = dir.output(&["hold", "k", "--", "true"]);
    assert_eq!(code(&out), 64);
    one_line(&out);
}

#[test]
fn hold_exits_76_when_the_lease_is_lost() {
    let dir = new_dir();
    let (mut child, line) = spawn_holder(&dir, &["hold", "k", "--ttl", "1s"]);
    assert!(line.starts_with("key=k "), "{line:?}");
    assert_eq!(code(&dir.output(&["release", "k", "--force"])), 0);
    assert_eq!(wait_for(&mut child, Duration::from_secs(5)), 76);
}
