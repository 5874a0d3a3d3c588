//! Metrics: what the library records through the `metrics` facade (read back with
//! `metrics-util`'s DebuggingRecorder, on memory:// in this process), and what
//! `dlock run --metrics ADDR` serves for Prometheus (the real binary on the file backend
//! in a private directory, scraped over loopback HTTP).

use dlock_testkit::process::{free_port, wait_for_port};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The process-wide recorder, installed once; only the library test reads it.
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().unwrap();
        snapshotter
    })
}

/// Every metric of the snapshot: (kind, name, sorted labels, value).
type Row = (MetricKind, String, Vec<(String, String)>, DebugValue);

fn rows(snapshotter: &Snapshotter) -> Vec<Row> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (kind, key) = key.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            (kind, key.name().to_owned(), labels, value)
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    labels
}

fn find<'a>(rows: &'a [Row], name: &str, want: &[(&str, &str)]) -> &'a DebugValue {
    let want = labels(want);
    rows.iter()
        .find(|(_, n, l, _)| n == name && *l == want)
        .map(|(_, _, _, v)| v)
        .unwrap_or_else(|| panic!("no {name} {want:?} in {rows:#?}"))
}

#[tokio::test]
async fn the_library_records_acquires_holders_renewals_and_a_loss_by_reason() {
    let snapshotter = snapshotter();
    let locks = fencelock::connect("memory://metrics-test").await.unwrap();
    let lease = locks
        .lock("billing")
        .ttl(Duration::from_millis(300))
        .acquire()
        .await
        .unwrap();
    // A second acquirer that cannot have the key: a not_acquired outcome.
    assert!(locks
        .lock("billing")
        .wait_for(Duration::from_millis(50))
        .acquire()
        .await
        .is_err());
    // Two renewals at TTL/3, then the operator breaks the lock.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(locks.force_release("billing").await.unwrap());
    let reason = tokio::time::timeout(Duration::from_secs(5), lease.lost())
        .await
        .expect("the holder notices the force-release");
    assert_eq!(reason, fencelock::LossReason::RenewalRefused, "{reason}");
    drop(lease);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let rows = rows(snapshotter);
    let memory = [("backend", "memory"), ("kind", "exclusive")];
    let with = |extra: (&'static str, &'static str)| {
        let mut all = memory.to_vec();
        all.push(extra);
        all
    };
    assert_eq!(
        find(
            &rows,
            "dlock_leases_lost_total",
            &with(("reason", "renewal_refused"))
        ),
        &DebugValue::Counter(1)
    );
    assert_eq!(
        find(
            &rows,
            "dlock_renewal_failures_total",
            &with(("reason", "refused"))
        ),
        &DebugValue::Counter(1)
    );
    match find(&rows, "dlock_renewals_total", &memory) {
        DebugValue::Counter(n) => assert!(*n >= 1, "renewals: {n}"),
        other => panic!("renewals: {other:?}"),
    }
    match find(
        &rows,
        "dlock_acquire_duration_seconds",
        &with(("outcome", "acquired")),
    ) {
        DebugValue::Histogram(values) => assert_eq!(values.len(), 1, "{values:?}"),
        other => panic!("acquire: {other:?}"),
    }
    match find(
        &rows,
        "dlock_acquire_duration_seconds",
        &with(("outcome", "not_acquired")),
    ) {
        DebugValue::Histogram(values) => {
            assert_eq!(values.len(), 1, "{values:?}");
            assert!(values[0].0 >= 0.05, "waited {values:?}");
        }
        other => panic!("not acquired: {other:?}"),
    }
    match find(
        &rows,
        "dlock_acquire_attempts",
        &with(("outcome", "acquired")),
    ) {
        DebugValue::Histogram(values) => assert_eq!(values[0].0, 1.0, "{values:?}"),
        other => panic!("attempts: {other:?}"),
    }
    match find(&rows, "dlock_hold_duration_seconds", &with(("end", "lost"))) {
        DebugValue::Histogram(values) => {
            assert_eq!(values.len(), 1, "{values:?}");
            assert!(values[0].0 >= 0.2, "held {values:?}");
        }
        other => panic!("hold: {other:?}"),
    }
    // Back to no holder and no waiter.
    assert_eq!(
        find(&rows, "dlock_holders", &memory),
        &DebugValue::Gauge(0.0.into())
    );
    assert_eq!(
        find(&rows, "dlock_waiters", &memory),
        &DebugValue::Gauge(0.0.into())
    );
    // No key label by default, no URL anywhere.
    for (_, name, labels, _) in &rows {
        for (key, value) in labels {
            assert_ne!(key, "key", "{name} {labels:?}");
            assert!(!value.contains("metrics-test"), "{name} {labels:?}");
        }
    }

    // Opted in: the key becomes a label of the leases taken afterwards.
    fencelock::metrics::set_key_label(true);
    let lease = locks.lock("ledger").acquire().await.unwrap();
    fencelock::metrics::set_key_label(false);
    assert!(lease.release().await.unwrap());
    let rows = self::rows(snapshotter);
    match find(
        &rows,
        "dlock_hold_duration_seconds",
        &[
            ("backend", "memory"),
            ("kind", "exclusive"),
            ("key", "ledger"),
            ("end", "released"),
        ],
    ) {
        DebugValue::Histogram(values) => assert_eq!(values.len(), 1, "{values:?}"),
        other => panic!("hold: {other:?}"),
    }
}

/// GET / over loopback HTTP/1.0: the body.
fn scrape(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_owned())
        }
        _ => Err(std::io::Error::other(format!("bad response {response:?}"))),
    }
}

/// Scrapes until `ready` holds for the body (or fails after 10 s).
fn scrape_until(port: u16, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(body) = scrape(port) {
            if ready(&body) {
                return body;
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("scrape never got ready; last:\n{last}");
}

/// `dlock run KEY --metrics 127.0.0.1:PORT -- sh -c 'until [ -e DONE ]; …'`.
fn dlock_run(url: &str, key: &str, port: u16, done: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dlock"))
        .args(["run", key, "--backend", url, "--metrics"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--",
            "sh",
            "-c",
            "until [ -e \"$1\" ]; do sleep 0.05; done",
            "sh",
        ])
        .arg(done)
        .env_remove("DLOCK_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_scrape_during_dlock_run_shows_the_acquire_histogram_a_holder_and_a_waiter() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("locks").display());
    let (done1, done2) = (dir.path().join("done1"), dir.path().join("done2"));
    let (port1, port2) = (free_port(), free_port());

    let holder = dlock_run(&url, "nightly", port1, &done1);
    assert!(wait_for_port(port1, Duration::from_secs(10)));
    let held = "dlock_holders{backend=\"file\",kind=\"exclusive\"} 1\n";
    let body = scrape_until(port1, |body| body.contains(held));
    assert!(
        body.contains("# TYPE dlock_acquire_duration_seconds histogram"),
        "{body}"
    );
    assert!(
        body.contains(
            "dlock_acquire_duration_seconds_count{backend=\"file\",kind=\"exclusive\",outcome=\"acquired\"} 1\n"
        ),
        "{body}"
    );
    assert!(
        body.contains("dlock_acquire_duration_seconds_bucket{backend=\"file\",kind=\"exclusive\",outcome=\"acquired\",le=\"+Inf\"} 1\n"),
        "{body}"
    );
    // The backend label is the scheme: the lock directory never shows.
    assert!(!body.contains(&*dir.path().to_string_lossy()), "{body}");

    // A second run waits for the key: a waiter, no holder yet.
    let waiter = dlock_run(&url, "nightly", port2, &done2);
    assert!(wait_for_port(port2, Duration::from_secs(10)));
    scrape_until(port2, |body| {
        body.contains("dlock_waiters{backend=\"file\",kind=\"exclusive\"} 1\n")
            && !body.contains(held)
    });

    std::fs::write(&done1, "").unwrap();
    finish(holder);
    let body = scrape_until(port2, |body| body.contains(held));
    assert!(
        body.contains("dlock_waiters{backend=\"file\",kind=\"exclusive\"} 0\n"),
        "{body}"
    );
    std::fs::write(&done2, "").unwrap();
    finish(waiter);
}

#[test]
fn a_metrics_port_in_use_is_one_line_and_exit_69_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let marker = dir.path().join("ran");
    let out = Command::new(env!("CARGO_BIN_EXE_dlock"))
        .args(["run", "k", "--metrics"])
        .arg(port.to_string())
        .args(["--", "touch"])
        .arg(&marker)
        .env("DLOCK_DIR", dir.path().join("locks"))
        .env_remove("DLOCK_BACKEND")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "dlock: cannot serve metrics on 127.0.0.1:{port}: "
        )),
        "{stderr}"
    );
    assert!(!marker.exists());

    let out = Command::new(env!("CARGO_BIN_EXE_dlock"))
        .args(["run", "k", "--metrics", "db.example:9464", "--", "true"])
        .env("DLOCK_DIR", dir.path().join("locks"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}
