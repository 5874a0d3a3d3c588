//! `dlock-bench` runs every mode and reports (how fast is for the benchmarks, not tests).

use std::process::Command;

fn bench(backend: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_dlock-bench"))
        .args(["--backend", backend, "--json", "--duration", "400ms"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_mode_runs_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let file = format!("file://{}", dir.path().display());
    for backend in ["memory://bench-smoke", file.as_str()] {
        let report = bench(backend, &["--mode", "uncontended", "-c", "4"]);
        assert!(report["operations"].as_u64().unwrap() > 0, "{report}");
        assert!(
            report["acquire"]["p50_us"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        assert_eq!(report["violations"], 0);

        let report = bench(backend, &["--mode", "contended", "-c", "4"]);
        assert_eq!(report["tasks_served"], 4, "{report}");
        assert!(report["switch_share"].as_f64().unwrap() > 0.5, "{report}");
        assert_eq!(report["violations"], 0);

        let report = bench(backend, &["--mode", "handoff", "-c", "4", "--hold", "2ms"]);
        assert!(
            report["handoff"]["count"].as_u64().unwrap() > 10,
            "{report}"
        );
        assert_eq!(report["tasks_served"], 4, "{report}");
        assert_eq!(report["violations"], 0);

        let report = bench(backend, &["--mode", "held", "-c", "200", "--ttl", "300ms"]);
        assert_eq!(report["leases_held"], 200, "{report}");
        assert_eq!(report["leases_lost"], 0, "{report}");
        assert!(
            report["renewals_per_second"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        assert!(report["rss_mib"].as_f64().unwrap() > 0.0, "{report}");
    }
}

#[test]
fn bad_concurrency_is_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_dlock-bench"))
        .args(["--backend", "memory://", "--mode", "handoff", "-c", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn default_run_uses_its_own_directory_and_removes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dlock-bench"))
        .args(["--mode", "uncontended", "-c", "2", "--duration", "200ms"])
        .env("TMPDIR", tmp.path())
        .env_remove("DLOCK_BACKEND")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("writing keys dlock-bench-"), "{stderr}");
    assert!(stderr.contains("removed afterwards"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "the run left {left:?}");
}

#[test]
fn keys_stay_in_the_run_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    bench(&url, &["--mode", "uncontended", "-c", "2"]);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name.starts_with("dlock-bench-"),
            "a key outside the namespace: {name}"
        );
    }
}

#[test]
fn shared_and_semaphore_kinds_run_on_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    for kind in ["shared", "semaphore:4"] {
        let report = bench(&url, &["--mode", "uncontended", "-c", "4", "--kind", kind]);
        assert_eq!(report["kind"], kind, "{report}");
        assert!(report["operations"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["errors"], 0, "{report}");
        assert!(report.get("unsupported").is_none(), "{report}");
    }
}

/// `--raw` runs the store's own client through the same loops and reports the same
/// fields, on a private Redis.
#[cfg(feature = "redis")]
#[test]
fn raw_client_runs_and_reports_on_redis() {
    let redis = dlock_testkit::servers::redis::RedisServer::start();
    let report = bench(&redis.url(), &["--raw", "--mode", "uncontended", "-c", "4"]);
    assert_eq!(report["backend"], "redis-rs (raw)", "{report}");
    assert!(report["operations"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["acquire"]["p50_us"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_eq!(report["errors"], 0, "{report}");
    // Plain Redis commands have no waiting acquire: a hand-off is refused, not faked.
    let out = Command::new(env!("CARGO_BIN_EXE_dlock-bench"))
        .args(["--backend", &redis.url(), "--raw", "--mode", "handoff"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The memory backend's raw floor, a tokio mutex per key, runs both loops and serves
/// every waiter of the hand-off.
#[cfg(feature = "redis")]
#[test]
fn raw_memory_floor_runs_uncontended_and_handoff() {
    let report = bench("memory://", &["--raw", "--mode", "uncontended", "-c", "4"]);
    assert_eq!(report["backend"], "tokio Mutex (raw)", "{report}");
    assert!(report["operations"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let report = bench(
        "memory://",
        &["--raw", "--mode", "handoff", "-c", "4", "--hold", "2ms"],
    );
    assert!(report["handoff"]["count"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["tasks_served"], 4, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
}
