//! No password or other credential of a backend URL shows in an error, its `Debug`, a
//! log line or the CLI's output: userinfo passwords, credential query options, percent-
//! encoded passwords, and passwords that are also part of a host name.

use dlock_testkit::process::free_port;
use fencelock::backend::BackendUrl;
use std::process::Command;

/// Every secret below starts with this; finding it anywhere is a leak.
const SECRET: &str = "hunter2";

/// Backend URLs whose server cannot be reached (nothing listens on the port) or which
/// are rejected, each holding a secret.
fn urls() -> Vec<String> {
    let p = free_port();
    let (a, b, c) = (free_port(), free_port(), free_port());
    let nodes = format!("127.0.0.1:{a},127.0.0.1:{b},127.0.0.1:{c}");
    vec![
        format!("redis://u:{SECRET}xyz@127.0.0.1:{p}/0"),
        format!("redis://:{SECRET}xyz@127.0.0.1:{p}"),
        format!("redis://127.0.0.1:{p}/0?password={SECRET}xyz"),
        format!("redis://u:{SECRET}%2Fx%40yz@127.0.0.1:{p}"),
        format!("redis://u:{SECRET}/xyz@127.0.0.1:{p}"),
        format!("rediss://u:{SECRET}xyz@127.0.0.1:{p}"),
        format!("redlock://u:{SECRET}xyz@{nodes}"),
        format!("redlock://{nodes}/0?token={SECRET}xyz"),
        format!("postgres://u:{SECRET}xyz@127.0.0.1:{p}/db"),
        format!("postgres://u:{SECRET}%40xyz@127.0.0.1:{p}/db"),
        format!("postgres://u@127.0.0.1:{p}/db?sslmode=disable&password={SECRET}xyz"),
        format!("postgresql://u@127.0.0.1:{p}/db?password=hun%74er2xyz"),
        format!("postgres://u@127.0.0.1:{p}/db?sslpassword={SECRET}xyz"),
        format!("postgres://u@127.0.0.1:{p},127.0.0.1:{a}/db?PassWord={SECRET}xyz"),
        format!("mysql://u:{SECRET}xyz@127.0.0.1:{p}/db"),
        format!("mysql://u:{SECRET}%3Axyz@127.0.0.1:{p}/db?mode=lease"),
        format!("mysql://u@127.0.0.1:{p}/db?password={SECRET}xyz"),
        format!("mysql://u@127.0.0.1:{p}/db?aws_secret_access_key={SECRET}xyz"),
        format!("file:///nonexistent/dlock?api_key={SECRET}xyz"),
        format!("memory://m?session_token={SECRET}xyz"),
        format!("etcd://u:{SECRET}xyz@127.0.0.1:{p}?auth={SECRET}xyz"),
    ]
}

/// URLs whose password is also (part of) the host name, and how the host must still
/// show.
fn host_lookalikes() -> Vec<(String, String)> {
    let p = free_port();
    vec![
        (
            format!("redis://u:localhost@localhost:{p}"),
            format!("redis://u:***@localhost:{p}"),
        ),
        (
            format!("postgres://u:127.0.0.1@127.0.0.1:{p}/db"),
            format!("postgres://u:***@127.0.0.1:{p}/db"),
        ),
        (
            format!("mysql://u@127.0.0.1:{p}/db?password=127.0.0.1"),
            format!("mysql://u@127.0.0.1:{p}/db?password=***"),
        ),
    ]
}

fn assert_clean(what: &str, text: &str) {
    assert!(!text.contains(SECRET), "{what} shows the secret: {text}");
    assert!(
        !text.contains("hun%74er2"),
        "{what} shows the secret: {text}"
    );
}

async fn connect_error(url: &str) -> fencelock::Error {
    match tokio::time::timeout(std::time::Duration::from_secs(60), fencelock::connect(url)).await {
        Ok(Ok(_)) => panic!("{url}: connected to nothing"),
        Ok(Err(err)) => err,
        Err(_) => panic!("{url}: connect did not fail within 60 s"),
    }
}

fn dlock(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_dlock"))
        .args(args)
        .env("DLOCK_LOG", "debug")
        .env_remove("DLOCK_BACKEND")
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn library_errors_and_their_debug_hide_credentials() {
    for url in urls() {
        let err = connect_error(&url).await;
        assert_clean(&format!("error of {url}"), &err.to_string());
        assert_clean(&format!("Debug of the error of {url}"), &format!("{err:?}"));
    }
    for (url, shown) in host_lookalikes() {
        let err = connect_error(&url).await;
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(text.contains(&shown), "{url}: expected {shown} in {text}");
            assert!(!text.contains(&url), "{url}: shown as given in {text}");
        }
    }
}

#[test]
fn cli_list_and_status_hide_credentials() {
    for url in urls() {
        for args in [
            vec!["list", "--backend", &url],
            vec!["status", "job", "--backend", &url],
            vec!["release", "job", "--force", "--backend", &url],
        ] {
            let out = dlock(&args);
            assert_clean(&format!("dlock {args:?}"), &out);
        }
    }
    for (url, shown) in host_lookalikes() {
        let out = dlock(&["list", "--backend", &url]);
        assert!(out.contains(&shown), "{url}: expected {shown} in {out}");
    }
}

#[test]
fn debug_of_urls_and_settings_hides_credentials() {
    let p = free_port();
    let url = format!("postgres://u:{SECRET}a@127.0.0.1:{p}/db?password={SECRET}b");
    let parsed = BackendUrl::parse(&url).unwrap();
    assert_clean("Debug of BackendUrl", &format!("{parsed:?}"));
    let settings = fencelock::backends::postgres::Settings::parse(&parsed).unwrap();
    assert_clean("Debug of postgres Settings", &format!("{settings:?}"));
    let url = format!("mysql://u:{SECRET}a@127.0.0.1:{p}/db?mode=lease");
    let parsed = BackendUrl::parse(&url).unwrap();
    let settings = fencelock::backends::mysql::Settings::parse(&parsed).unwrap();
    assert_clean("Debug of mysql Settings", &format!("{settings:?}"));
}

/// The reported case: a reachable server, so `list` prints its "no locks held on URL".
#[test]
fn list_on_a_live_postgres_hides_a_query_password() {
    let server = dlock_testkit::servers::postgres::Postgres::start(false);
    let url = server.url(&format!("password={SECRET}xyz&mode=lease"));
    let out = dlock(&["list", "--backend", &url]);
    assert!(out.contains("no locks held on"), "{out}");
    assert!(out.contains("password=***"), "{out}");
    assert_clean("dlock list", &out);
}
