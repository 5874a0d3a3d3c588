//! `dlock status`, `list`, `release` and error messages show keys with terminal control
//! characters as visible escapes, so a key cannot clear or retitle the operator's
//! terminal, forge a table row, or reorder the text; `--json` keeps keys exact.

use std::process::{Command, Output};

/// Keys a hostile or careless client could lock.
const KEYS: &[&str] = &[
    "clear\u{1b}[2J\u{1b}[H",
    "title\u{1b}]0;pwned\u{7}",
    "row\nforged  1  x",
    "cr\rover",
    "bidi\u{202e}txt.exe",
    "iso\u{2066}late\u{2069}",
    "c1\u{9b}31m\u{85}",
    "del\u{7f}",
];

/// Characters that must never reach the terminal raw (newline only ends a line).
fn forbidden(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{9}' | '\u{b}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn dlock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dlock"))
        .args(args)
        .env_remove("DLOCK_BACKEND")
        .env_remove("DLOCK_LOG")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn assert_safe(what: &str, out: &str, lines: usize) {
    if let Some(c) = out.chars().find(|c| forbidden(*c)) {
        panic!("{what}: raw {c:?} in {out:?}");
    }
    assert_eq!(out.lines().count(), lines, "{what}: {out:?}");
}

#[tokio::test]
async fn control_characters_in_keys_are_escaped_in_human_output_only() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let locks = fencelock::connect(&url).await.unwrap();
    let mut leases = Vec::new();
    for key in KEYS {
        leases.push(locks.lock(key).acquire().await.unwrap());
    }

    let list = dlock(&["list", "--backend", &url]);
    assert!(list.status.success());
    let table = text(&list.stdout);
    assert_safe("list", &table, 1 + KEYS.len());
    for shown in [
        "clear\\x1b[2J\\x1b[H",
        "title\\x1b]0;pwned\\x07",
        "row\\nforged  1  x",
        "cr\\rover",
        "bidi\\u{202e}txt.exe",
        "iso\\u{2066}late\\u{2069}",
        "c1\\u{9b}31m\\u{85}",
        "del\\x7f",
    ] {
        assert!(table.contains(shown), "{shown} not in {table}");
    }

    let json = dlock(&["list", "--backend", &url, "--json"]);
    let mut keys: Vec<String> = text(&json.stdout)
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["key"].as_str().unwrap().to_owned()
        })
        .collect();
    keys.sort();
    let mut expected: Vec<String> = KEYS.iter().map(|k| (*k).to_owned()).collect();
    expected.sort();
    assert_eq!(keys, expected);

    for key in KEYS {
        let status = dlock(&["status", key, "--backend", &url]);
        assert!(status.status.success(), "{status:?}");
        assert_safe("status", &text(&status.stdout), 2);
        let json = dlock(&["status", key, "--backend", &url, "--json"]);
        let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(value["key"].as_str(), Some(*key));

        let run = dlock(&["run", key, "--no-wait", "--backend", &url, "--", "true"]);
        assert_eq!(run.status.code(), Some(75), "{run:?}");
        assert_safe("run --no-wait", &text(&run.stderr), 1);

        let refused = dlock(&["release", key, "--backend", &url]);
        assert_eq!(refused.status.code(), Some(64), "{refused:?}");
        assert_safe("release without --force", &text(&refused.stderr), 1);
    }

    for lease in leases {
        lease.release().await.unwrap();
    }
    for key in KEYS {
        let free = dlock(&["status", key, "--backend", &url]);
        assert_eq!(free.status.code(), Some(1), "{free:?}");
        assert_safe("status of a free key", &text(&free.stdout), 1);
        let release = dlock(&["release", key, "--force", "--backend", &url]);
        assert_safe("release --force", &text(&release.stdout), 1);
    }
    let empty = dlock(&["list", "--backend", &format!("{url}/evil\u{1b}[2J")]);
    assert_safe("list of an empty backend", &text(&empty.stdout), 1);
    assert_safe("list of an empty backend", &text(&empty.stderr), 0);
}

#[test]
fn errors_naming_a_url_are_escaped() {
    let out = dlock(&[
        "list",
        "--backend",
        "file:///tmp/\u{1b}]0;x\u{7}\u{202e}?a=1",
    ]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert_safe("bad URL error", &text(&out.stderr), 1);
    // Unavailable names the backend unquoted.
    let port = dlock_testkit::process::free_port();
    let url = format!("postgres://u@127.0.0.1:{port}/db\u{1b}[2J\u{202e}");
    let out = dlock(&["list", "--backend", &url]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let stderr = text(&out.stderr);
    assert_safe("unavailable error", &stderr, 1);
    assert!(stderr.contains("/db\\x1b[2J\\u{202e}"), "{stderr}");
}
