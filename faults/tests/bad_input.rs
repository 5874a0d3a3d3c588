//! Bad-input sweep (issue 7, acceptance 3): random and hostile keys, URLs and durations,
//! and server replies cut short by a proxy of our own, give typed `dlock::Error`s, never a
//! panic, and leave no lock held.

use dlock::Error;
use rand::Rng;
use std::time::Duration;

fn file_url() -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new()
        .prefix("dlock-badinput-")
        .tempdir()
        .unwrap();
    let url = format!("file://{}", dir.path().display());
    (dir, url)
}

fn hostile_keys() -> Vec<String> {
    let mut keys: Vec<String> = vec![
        String::new(),
        "\0".into(),
        "a\0b".into(),
        "x".repeat(1025),
        "é".repeat(513), // 1026 bytes
        "x".repeat(1024),
        "x'); DROP TABLE locks;--".into(),
        "../../etc/passwd".into(),
        "/".into(),
        ".".into(),
        "..".into(),
        ".hidden".into(),
        " ".into(),
        "\n\r\t".into(),
        "%2E%2E".into(),
        "*".into(),
        "{a}:[b]".into(),
        "\u{202e}evil\u{feff}".into(),
        "🔒".repeat(256), // exactly 1024 bytes
        "dlock:".into(),
        "key with spaces".into(),
        "$(reboot)".into(),
        "\\\\?\\C:".into(),
    ];
    let mut rng = rand::rng();
    for _ in 0..200 {
        let len = rng.random_range(0..1100);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let mut key = String::from_utf8_lossy(&bytes).into_owned();
        if rng.random_bool(0.5) {
            key = key.chars().take(rng.random_range(0..40)).collect();
        }
        keys.push(key);
    }
    keys
}

fn key_is_valid(key: &str) -> bool {
    !key.is_empty() && key.len() <= 1024 && !key.contains('\0')
}

/// Every key: a valid one is taken, released and then not held; an invalid one is
/// `BadKey` and nothing is held.
async fn sweep_keys(url: &str) {
    let locks = dlock::connect(url).await.unwrap();
    for key in hostile_keys() {
        let shown: String = key.chars().take(30).collect();
        let attempt = tokio::time::timeout(
            Duration::from_secs(10),
            locks.lock(&key).ttl(Duration::from_secs(5)).try_acquire(),
        )
        .await
        .unwrap_or_else(|_| panic!("{url}: try_acquire({shown:?}) hung"));
        if key_is_valid(&key) {
            let lease = attempt
                .unwrap_or_else(|e| panic!("{url}: valid key {shown:?} refused: {e}"))
                .unwrap_or_else(|| panic!("{url}: valid key {shown:?} was held"));
            assert!(
                lease.release().await.unwrap(),
                "{url}: {shown:?} not released"
            );
            let status = locks.status(&key).await.unwrap();
            assert!(
                status.is_none(),
                "{url}: {shown:?} still held after release"
            );
        } else {
            match attempt {
                Err(Error::BadKey { .. }) => {}
                other => panic!("{url}: invalid key {shown:?} gave {other:?}, not BadKey"),
            }
            assert!(matches!(
                locks.status(&key).await,
                Err(Error::BadKey { .. })
            ));
            assert!(matches!(
                locks.force_release(&key).await,
                Err(Error::BadKey { .. })
            ));
        }
    }
    let left = locks.list().await.unwrap();
    assert!(left.is_empty(), "{url}: locks left held: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_on_file() {
    let (_dir, url) = file_url();
    sweep_keys(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_on_memory() {
    sweep_keys("memory://badinput").await;
}

fn hostile_urls() -> Vec<String> {
    let mut urls: Vec<String> = [
        "",
        "://",
        "memory",
        "nosuch://x",
        "ftp://host/dir",
        "http://127.0.0.1:1/",
        "file://relative/dir",
        "file:",
        "file://",
        "file:///dev/null",
        "file:///proc/self/nonexistent/dir",
        "file:///?prefix=%00",
        "redis://u:pw@[",
        "redis://u:s3cret@[::1",
        "redis://127.0.0.1:0",
        "redis://127.0.0.1:99999",
        "redis://127.0.0.1:1/99999999999999999999",
        "rediss://127.0.0.1:1",
        "redlock://",
        "redlock://127.0.0.1:1,,127.0.0.1:2",
        "redlock://127.0.0.1:1",
        "postgres://",
        "postgres://u:s3cret@127.0.0.1:1/db?connect_timeout=1",
        "postgres://127.0.0.1:1/db?mode=nosuch",
        "postgresql://[::1",
        "mysql://u:s3cret@127.0.0.1:1/db",
        "mysql://127.0.0.1:99999/db",
        "etcd://127.0.0.1:1",
        "memory://x?unknown=1",
        "memory://%00",
        "file:///tmp?prefix=../../etc",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut rng = rand::rng();
    let schemes = [
        "file", "memory", "redis", "redlock", "postgres", "mysql", "etcd", "x",
    ];
    let alphabet: Vec<char> = "abc:/@[]?=&%#,.0123456789 \0é".chars().collect();
    for _ in 0..200 {
        let scheme = schemes[rng.random_range(0..schemes.len())];
        let tail: String = (0..rng.random_range(0..30))
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect();
        urls.push(format!("{scheme}://{tail}"));
    }
    urls
}

/// Every hostile URL gives a typed error (or a working handle), quickly, without a panic,
/// and an error never shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_urls_are_typed_errors() {
    for url in hostile_urls() {
        let outcome = tokio::time::timeout(Duration::from_secs(20), dlock::connect(&url))
            .await
            .unwrap_or_else(|_| panic!("connect({url:?}) hung"));
        match outcome {
            Ok(locks) => {
                // A URL that connects must work or fail typed, and leave nothing held.
                let key = "bad-input-url";
                let attempt =
                    tokio::time::timeout(Duration::from_secs(20), locks.lock(key).try_acquire())
                        .await
                        .unwrap_or_else(|_| panic!("{url:?}: try_acquire hung"));
                if let Ok(Some(lease)) = attempt {
                    let _ = lease.release().await;
                }
            }
            Err(err) => {
                assert!(
                    matches!(
                        err,
                        Error::BadUrl { .. }
                            | Error::Unavailable { .. }
                            | Error::Backend { .. }
                            | Error::BadOption(_)
                            | Error::Unsupported { .. }
                    ),
                    "{url:?}: unexpected error kind {err:?}"
                );
                assert!(
                    !err.to_string().contains("s3cret"),
                    "{url:?}: password in message: {err}"
                );
            }
        }
    }
}

/// Durations: hostile text is `BadDuration`; hostile TTLs and waits are `BadOption` or work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_durations_are_typed_errors() {
    for text in [
        "",
        " ",
        "-1s",
        "1e309s",
        "18446744073709551616s",
        "99999999999999999999d",
        "NaN",
        "NaNs",
        "inf",
        "infs",
        "1..2s",
        "1.2.3s",
        ".s",
        "5 parsecs",
        "5parsecs",
        "s",
        "ms",
        "1 s 2",
        "\0",
        "0x10s",
        "+5s",
        "1_000s",
        "٣s",
        "1e3",
        "9223372036854775807h",
    ] {
        match dlock::parse_duration(text) {
            Ok(d) => assert!(
                d < Duration::from_secs(u64::MAX / 2),
                "{text:?} parsed as {d:?}"
            ),
            Err(Error::BadDuration { .. }) => {}
            Err(other) => panic!("{text:?}: {other:?} is not BadDuration"),
        }
    }
    let mut rng = rand::rng();
    for _ in 0..500 {
        let text: String = (0..rng.random_range(0..12))
            .map(|_| {
                "0123456789.smhde-+ "
                    .chars()
                    .nth(rng.random_range(0..19))
                    .unwrap()
            })
            .collect();
        match dlock::parse_duration(&text) {
            Ok(_) | Err(Error::BadDuration { .. }) => {}
            Err(other) => panic!("{text:?}: {other:?} is not BadDuration"),
        }
    }

    let (_dir, url) = file_url();
    for url in [url.as_str(), "memory://durations"] {
        let locks = dlock::connect(url).await.unwrap();
        let key = "durations";
        for ttl in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_millis(29),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ] {
            let attempt = locks.lock(key).ttl(ttl).try_acquire().await;
            match attempt {
                Ok(Some(lease)) => {
                    lease.release().await.unwrap();
                }
                Err(Error::BadOption(_)) => {}
                other => panic!("{url}: ttl {ttl:?} gave {other:?}"),
            }
        }
        for wait in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
            let lease = locks.lock(key).wait_for(wait).acquire().await.unwrap();
            lease.release().await.unwrap();
        }
        let lease = locks.lock(key).auto_renew(false).acquire().await.unwrap();
        for ttl in [Duration::ZERO, Duration::MAX, Duration::from_secs(u64::MAX)] {
            match lease.extend(ttl).await {
                Err(Error::BadOption(_)) => {}
                other => panic!("{url}: extend({ttl:?}) gave {other:?}"),
            }
        }
        lease.extend(Duration::from_secs(5)).await.unwrap();
        lease.release().await.unwrap();
        for every in [Duration::ZERO, Duration::from_secs(60), Duration::MAX] {
            match locks.lock(key).renew_every(every).try_acquire().await {
                Err(Error::BadOption(_)) => {}
                other => panic!("{url}: renew_every {every:?} gave {other:?}"),
            }
        }
        assert!(
            locks.status(key).await.unwrap().is_none(),
            "{url}: key left held"
        );
    }
}
