//! TLS on the SQL backends, against private PostgreSQL and MariaDB servers whose
//! certificates come from a CA of the test kit (issued for `localhost` only): the
//! verifying modes connect, a wrong CA, a wrong host name and a server without TLS are
//! clear one-line errors, client certificates are sent, and the conformance suite passes
//! over a verifying TLS URL of each backend.
//!
//! The servers' `dlock_tls` role/user may connect only over TLS, so a lock taken with it
//! shows that TLS was used.
#![cfg(all(feature = "postgres", feature = "mysql"))]

use dlock_testkit::servers::mysql::Mysql;
use dlock_testkit::servers::postgres::Postgres;
use dlock_testkit::tls::TestCa;
use std::process::Command;
use std::sync::OnceLock;

/// A password that must never show.
const SECRET: &str = "hunter2";

fn ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| TestCa::new("dlock test CA"))
}

/// A CA that signed none of the servers' certificates.
fn other_ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| TestCa::new("some other CA"))
}

fn ca_file() -> String {
    ca().ca_file().display().to_string()
}

fn pg() -> &'static Postgres {
    static SERVER: OnceLock<&'static Postgres> = OnceLock::new();
    SERVER.get_or_init(|| dlock_testkit::servers::until_exit(Postgres::start_tls(ca())))
}

fn my() -> &'static Mysql {
    static SERVER: OnceLock<&'static Mysql> = OnceLock::new();
    SERVER.get_or_init(|| dlock_testkit::servers::until_exit(Mysql::start_tls(ca())))
}

/// Takes and releases a lock on `url`: the fence of the lease.
async fn lock_once(url: &str, key: &str) -> Result<u64, fencelock::Error> {
    let locks = fencelock::connect(url).await?;
    let lease = locks
        .lock(key)
        .try_acquire()
        .await?
        .expect("a free key is acquired");
    let fence = lease.fence();
    lease.release().await?;
    Ok(fence)
}

/// The error of connecting to `url`, checked to be one line without the password and
/// naming the backend.
async fn connect_error(url: &str, scheme: &str) -> fencelock::Error {
    let err = match fencelock::connect(url).await {
        Ok(_) => panic!("connecting to {url} succeeded"),
        Err(err) => err,
    };
    let text = err.to_string();
    assert!(!text.contains('\n'), "more than one line: {text}");
    assert!(!text.contains(SECRET), "the password shows: {text}");
    assert!(text.contains(&format!("backend {scheme}://")), "{text}");
    assert!(text.contains(":***@"), "{text}");
    err
}

fn with_password(url: &str, user: &str) -> String {
    url.replacen(&format!("{user}@"), &format!("{user}:{SECRET}@"), 1)
}

// --- PostgreSQL ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_verify_full_connects_to_the_certificates_host() {
    for mode in ["", "&mode=lease"] {
        let url = pg().url_as(
            "localhost",
            "dlock_tls",
            &format!("sslmode=verify-full&sslrootcert={}{mode}", ca_file()),
        );
        let fence = lock_once(&url, "pg-verify-full").await.unwrap();
        assert!(fence > 0, "{url}: fence {fence}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_verify_ca_and_require_do_not_check_the_name() {
    for query in [
        format!("sslmode=verify-ca&sslrootcert={}", ca_file()),
        format!("sslmode=require&sslrootcert={}", ca_file()),
        "sslmode=require".to_owned(),
        // prefer, the default, takes TLS when the server offers it.
        String::new(),
    ] {
        let url = pg().url_as("127.0.0.1", "dlock_tls", &query);
        lock_once(&url, "pg-verify-ca")
            .await
            .unwrap_or_else(|err| panic!("{url}: {err}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_wrong_ca_is_a_verification_error() {
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = with_password(
            &pg().url_as(
                "localhost",
                "dlock_tls",
                &format!(
                    "sslmode={mode}&sslrootcert={}",
                    other_ca().ca_file().display()
                ),
            ),
            "dlock_tls",
        );
        let err = connect_error(&url, "postgres").await;
        let text = err.to_string();
        assert!(
            text.contains("TLS certificate verification failed")
                && text.contains("not signed by a trusted CA")
                && text.contains(&format!("sslmode={mode}")),
            "{text}"
        );
        assert!(matches!(err, fencelock::Error::Backend { .. }), "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_wrong_host_name_is_a_verification_error() {
    let url = with_password(
        &pg().url_as(
            "127.0.0.1",
            "dlock_tls",
            &format!("sslmode=verify-full&sslrootcert={}", ca_file()),
        ),
        "dlock_tls",
    );
    let text = connect_error(&url, "postgres").await.to_string();
    assert!(
        text.contains("TLS certificate verification failed")
            && text.contains("does not name the host")
            && text.contains("127.0.0.1")
            && text.contains("localhost"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_require_against_a_server_without_tls_fails_clearly() {
    let plain = Postgres::shared();
    for mode in ["require", "verify-full"] {
        let url = with_password(
            &plain.url_as(
                "localhost",
                "postgres",
                &format!("sslmode={mode}&sslrootcert={}", ca_file()),
            ),
            "postgres",
        );
        let text = connect_error(&url, "postgres").await.to_string();
        assert!(
            text.contains(&format!(
                "the server does not offer TLS, which sslmode={mode} requires"
            )),
            "{text}"
        );
    }
    // prefer (the default) and disable go on without TLS.
    for query in ["", "sslmode=prefer", "sslmode=disable"] {
        let url = plain.url_as("localhost", "postgres", query);
        lock_once(&url, "pg-plain")
            .await
            .unwrap_or_else(|err| panic!("{url}: {err}"));
    }
    // dlock_tls may not connect without TLS: the other tests' successes were TLS.
    let url = pg().url_as("localhost", "dlock_tls", "sslmode=disable");
    let text = connect_error(&with_password(&url, "dlock_tls"), "postgres")
        .await
        .to_string();
    assert!(text.contains("no encryption"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_client_certificate_is_sent() {
    let client = ca().issue("pg-client", "dlock_cert", &[]);
    let url = pg().url_as(
        "localhost",
        "dlock_cert",
        &format!(
            "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            ca_file(),
            client.cert_file.display(),
            client.key_file.display()
        ),
    );
    lock_once(&url, "pg-client-cert").await.unwrap();
    // Without it, the server's `cert` rule refuses the role.
    let url = pg().url_as(
        "localhost",
        "dlock_cert",
        &format!("sslmode=verify-full&sslrootcert={}", ca_file()),
    );
    let text = connect_error(&with_password(&url, "dlock_cert"), "postgres")
        .await
        .to_string();
    assert!(text.contains("certificate"), "{text}");
}

#[tokio::test]
async fn pg_bad_tls_options_are_url_errors() {
    let base = format!("postgres://u:{SECRET}@localhost:1/db");
    for (query, expected) in [
        ("sslmode=verify_full", "unknown sslmode \"verify_full\""),
        ("sslmode=VERIFY-FULL", "expected sslmode=disable, prefer"),
        (
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "cannot read sslrootcert=/nonexistent/ca.pem",
        ),
        (
            "sslmode=disable&sslrootcert=/x",
            "sslmode=disable turns off",
        ),
        ("sslcert=/x", "sslcert and sslkey go together"),
        ("ssl-mode=REQUIRED", "unknown option \"ssl-mode\""),
    ] {
        let err = fencelock::connect(&format!("{base}?{query}"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{query} was taken"));
        let text = err.to_string();
        assert!(matches!(err, fencelock::Error::BadUrl { .. }), "{err:?}");
        assert!(text.contains(expected), "{query}: {text}");
        assert!(!text.contains('\n') && !text.contains(SECRET), "{text}");
    }
}

// --- MySQL (MariaDB) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_verify_identity_connects_to_the_certificates_host() {
    for mode in ["", "&mode=lease"] {
        let url = my().url_as(
            "localhost",
            "dlock_tls",
            &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={}{mode}", ca_file()),
        );
        let fence = lock_once(&url, "my-verify-identity")
            .await
            .unwrap_or_else(|err| panic!("{url}: {err}"));
        assert!(fence > 0, "{url}: fence {fence}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_required_and_preferred_do_not_check_the_certificate() {
    for query in [
        "ssl-mode=required".to_owned(),
        // PREFERRED, the default, takes TLS when the server offers it.
        String::new(),
    ] {
        let url = my().url_as("127.0.0.1", "dlock_tls", &query);
        lock_once(&url, "my-verify-ca")
            .await
            .unwrap_or_else(|err| panic!("{url}: {err}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_wrong_ca_is_a_verification_error() {
    for mode in ["VERIFY_IDENTITY"] {
        let url = my().url_as(
            "localhost",
            "dlock_tls",
            &format!("ssl-mode={mode}&ssl-ca={}", other_ca().ca_file().display()),
        );
        let err = connect_error(&url.replace("dlock-secret", SECRET), "mysql").await;
        let text = err.to_string();
        assert!(
            text.contains("TLS certificate verification failed")
                && text.contains("not signed by a trusted CA"),
            "{text}"
        );
        assert!(matches!(err, fencelock::Error::Backend { .. }), "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_wrong_host_name_is_a_verification_error() {
    let url = my().url_as(
        "127.0.0.1",
        "dlock_tls",
        &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={}", ca_file()),
    );
    let text = connect_error(&url.replace("dlock-secret", SECRET), "mysql")
        .await
        .to_string();
    assert!(
        text.contains("TLS certificate verification failed")
            && text.contains("does not name the host")
            && text.contains("127.0.0.1")
            && text.contains("localhost"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_required_against_a_server_without_tls_fails_clearly() {
    let plain = Mysql::shared();
    for query in [
        "ssl-mode=REQUIRED".to_owned(),
        format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={}", ca_file()),
    ] {
        let url = plain.url_as("localhost", "dlock", &query);
        let text = connect_error(&url.replace("dlock-secret", SECRET), "mysql")
            .await
            .to_string();
        assert!(
            text.contains("the server does not offer TLS, which the URL's ssl-mode requires"),
            "{text}"
        );
    }
    // PREFERRED (the default) and DISABLED go on without TLS.
    for query in ["", "ssl-mode=PREFERRED", "ssl-mode=DISABLED"] {
        let url = plain.url_as("localhost", "dlock", query);
        lock_once(&url, "my-plain")
            .await
            .unwrap_or_else(|err| panic!("{url}: {err}"));
    }
    // dlock_tls may not connect without TLS: the other tests' successes were TLS.
    let url = my().url_as("localhost", "dlock_tls", "ssl-mode=DISABLED");
    let text = connect_error(&url.replace("dlock-secret", SECRET), "mysql")
        .await
        .to_string();
    assert!(text.contains("Access denied"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_client_certificate_is_sent() {
    let client = ca().issue("my-client", "dlock_cert", &[]);
    let url = my().url_as(
        "localhost",
        "dlock_cert",
        &format!(
            "ssl-mode=VERIFY_IDENTITY&ssl-ca={}&ssl-cert={}&ssl-key={}",
            ca_file(),
            client.cert_file.display(),
            client.key_file.display()
        ),
    );
    lock_once(&url, "my-client-cert")
        .await
        .unwrap_or_else(|err| panic!("{url}: {err}"));
    let url = my().url_as(
        "localhost",
        "dlock_cert",
        &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={}", ca_file()),
    );
    let text = connect_error(&url.replace("dlock-secret", SECRET), "mysql")
        .await
        .to_string();
    assert!(text.contains("Access denied"), "{text}");
}

#[tokio::test]
async fn mysql_bad_tls_options_are_url_errors() {
    let base = format!("mysql://u:{SECRET}@localhost:1/db");
    for (query, expected) in [
        ("ssl-mode=VERIFY_FULL", "unknown ssl-mode \"VERIFY_FULL\""),
        (
            "ssl-mode=VERIFY_IDENTITY&ssl-ca=/nonexistent/ca.pem",
            "cannot read ssl-ca=/nonexistent/ca.pem",
        ),
        ("ssl-mode=DISABLED&ssl-ca=/x", "ssl-mode=DISABLED turns off"),
        ("ssl-mode=VERIFY_CA", "use ssl-mode=VERIFY_IDENTITY"),
        (
            "ssl-mode=REQUIRED&ssl-ca=/x",
            "use ssl-mode=VERIFY_IDENTITY",
        ),
        ("ssl-key=/x", "ssl-cert and ssl-key go together"),
        (
            "require_ssl=true",
            "option require_ssl is not taken; use ssl-mode=",
        ),
        ("sslmode=require", "unknown option \"sslmode\""),
    ] {
        let err = fencelock::connect(&format!("{base}?{query}"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{query} was taken"));
        let text = err.to_string();
        assert!(matches!(err, fencelock::Error::BadUrl { .. }), "{err:?}");
        assert!(text.contains(expected), "{query}: {text}");
        assert!(!text.contains('\n') && !text.contains(SECRET), "{text}");
    }
}

// --- The CLI ---

fn dlock(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dlock"))
        .args(args)
        .env_remove("DLOCK_BACKEND")
        .output()
        .expect("cannot run dlock")
}

#[test]
fn cli_schema_takes_the_tls_options_and_hides_the_password() {
    let ca = ca_file();
    for url in [
        format!("postgres://u:{SECRET}@db.example:5432/app?sslmode=verify-full&sslrootcert={ca}"),
        format!("mysql://u:{SECRET}@db.example:3306/app?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}"),
    ] {
        let out = dlock(&["schema", "--backend", &url]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{url}: {out:?}");
        assert!(stdout.contains("TABLE IF NOT EXISTS"), "{stdout}");
        assert!(!stdout.contains(SECRET), "{stdout}");
    }
    // A bad value: exit 64, one line naming the option, no password.
    for url in [
        format!("postgres://u:{SECRET}@db.example/app?sslmode=verify&sslrootcert={ca}"),
        format!("mysql://u:{SECRET}@db.example/app?ssl-mode=VERIFY&ssl-ca={ca}"),
    ] {
        let out = dlock(&["schema", "--backend", &url]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{url}: {out:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("ssl") && stderr.contains("u:***@"),
            "{stderr}"
        );
        assert!(!stderr.contains(SECRET), "{stderr}");
    }
}

#[test]
fn cli_certificate_error_is_one_line_with_the_password_hidden() {
    let url = with_password(
        &pg().url_as(
            "127.0.0.1",
            "dlock_tls",
            &format!("sslmode=verify-full&sslrootcert={}", ca_file()),
        ),
        "dlock_tls",
    );
    let out = dlock(&["status", "cli-tls", "--backend", &url]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("TLS certificate verification failed") && stderr.contains("dlock_tls:***@"),
        "{stderr}"
    );
    assert!(!stderr.contains(SECRET), "{stderr}");
}

// --- The conformance suite over verifying TLS URLs ---

mod postgres_verify_full {
    use super::*;

    async fn target() -> dlock_testkit::Target {
        let url = pg().url_as(
            "localhost",
            "dlock_tls",
            &format!("sslmode=verify-full&sslrootcert={}", ca_file()),
        );
        dlock_testkit::Target::new(url, env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
}

mod mysql_verify_identity {
    use super::*;

    async fn target() -> dlock_testkit::Target {
        let url = my().url_as(
            "localhost",
            "dlock_tls",
            &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={}", ca_file()),
        );
        dlock_testkit::Target::new(url, env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
}
