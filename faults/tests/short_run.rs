//! The CI short run (issue 7, acceptance 1): every backend this build can start, each
//! applicable nemesis for a few seconds. Fails on any write accepted out of fence order,
//! any lost update of an accepted write, any lock left held after the run, any worker
//! panic or hang, and any overlap where the README promises none. A missing server binary
//! fails (naming the Debian package), it does not skip.

use dlock_faults::cluster::Backend;
use dlock_faults::nemesis::{Nemesis, ALL};
use dlock_faults::report;
use dlock_faults::run::{run, RunConfig};
use dlock_faults::worker::Workload;
use std::time::Duration;

/// Seconds per nemesis (override with DLOCK_FAULTS_SECS for a longer local run).
fn secs() -> Duration {
    let secs = std::env::var("DLOCK_FAULTS_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// The backend modes without shared locks and semaphores: MySQL's `GET_LOCK` has no
/// shared mode (README, backend table; `?mode=lease` has every kind). Every other
/// backend runs the kind workloads and fails if it lacks them.
const WITHOUT_KINDS: &[&str] = &["mysql", "mysql-shared"];

/// The nemeses the read-write and semaphore workloads run under.
const KIND_NEMESES: &[Nemesis] = &[
    Nemesis::KillClient,
    Nemesis::PauseClient,
    Nemesis::ForceRelease,
    Nemesis::Mixed,
];

async fn short_run(name: &str) {
    assert!(
        dlock_faults::nemesis::libfaketime().is_some(),
        "libfaketime is not installed: install the Debian package `faketime` (apt-get install faketime)"
    );
    let backend = Backend::start(name).unwrap_or_else(|e| panic!("{e}"));
    // One directory per backend: the backends run side by side and each removes its own.
    // It is under the build's target directory, not /tmp: the logs and histories of a
    // failed run stay there for the post-mortem (until the next run of the backend).
    let log_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("dlock-faults-ci")
        .join(name);
    let _ = std::fs::remove_dir_all(&log_dir);
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    let mut harness_errors: Vec<String> = Vec::new();
    // The mutex workload under every nemesis; the read-write and semaphore workloads
    // under those that break holders (the others break the store or the network, which
    // the kinds share with the mutex).
    let kinds: &[Workload] = if WITHOUT_KINDS.contains(&name) {
        skipped.push("the rw and semaphore workloads: the backend has no such kinds".into());
        &[]
    } else {
        &[Workload::ReadWrite, Workload::Semaphore { permits: 2 }]
    };
    let plan = ALL.iter().map(|&n| (Workload::Mutex, n)).chain(
        kinds
            .iter()
            .flat_map(|&w| KIND_NEMESES.iter().map(move |&n| (w, n))),
    );
    for (workload, nemesis) in plan {
        if let Err(why) = backend.applicable(nemesis) {
            skipped.push(format!("{} ({}): {why}", nemesis.name(), workload.name()));
            continue;
        }
        let config = RunConfig {
            workers: 3,
            ttl: Duration::from_millis(500),
            work: Duration::from_millis(20),
            // Degrade runs its steps one after the other (slow, frozen, cut off: up to
            // 3.7 s at this TTL); it needs the time to reach the last one. Process-tree
            // waits out each loss before the next fault, and alternates two kinds.
            // Kill-server spends much of its time restarting servers (dynalite and
            // SecantusDB take a second or more to start on a loaded machine); it needs the
            // time to let the workload make progress in between.
            duration: if matches!(
                nemesis,
                Nemesis::Degrade | Nemesis::ProcessTree | Nemesis::KillServer
            ) {
                secs() * 2
            } else {
                secs()
            },
            fault_every: Duration::from_millis(1000),
            worker_bin: env!("CARGO_BIN_EXE_dlock-fault-worker").into(),
            dlock_bin: Some(env!("CARGO_BIN_EXE_dlock-faults-cli").into()),
            log_dir: log_dir.clone(),
            workload,
        };
        // A harness error fails the test after the other runs, with the table so far.
        match run(&backend, nemesis, &config).await {
            Ok(result) => results.push(result),
            Err(err) => harness_errors.push(format!(
                "{name} / {} ({}): harness error: {err}",
                nemesis.name(),
                workload.name()
            )),
        }
    }
    let table = report::table(&results);
    eprintln!("{table}");
    for s in &skipped {
        eprintln!("{name}: skipped {s}");
    }
    let mut failures: Vec<String> = results.iter().flat_map(|r| r.failures()).collect();
    failures.extend(harness_errors);
    // The logs and histories are kept only when something failed, for the post-mortem.
    if failures.is_empty() {
        let _ = std::fs::remove_dir_all(&log_dir);
    }
    // The table goes into the failure message too, so that it is in the test's summary
    // (cargo test, nextest) beside the failures it explains.
    assert!(
        failures.is_empty(),
        "fault-injection failures:\n{}\n\n{table}\nlogs and histories: {}",
        failures.join("\n"),
        log_dir.display()
    );
    // Every nemesis that should inject faults did.
    for r in &results {
        if r.nemesis != Nemesis::None {
            assert!(
                r.counts.faults > 0,
                "{} / {}: no fault was injected\n\n{table}",
                r.backend,
                r.nemesis.name()
            );
        }
    }
}

macro_rules! backends {
    ($($test:ident => $name:expr),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                short_run($name).await;
            }
        )*
        /// Every backend the harness knows has a test here.
        #[test]
        fn every_backend_is_covered() {
            let covered: Vec<&str> = vec![$($name),*];
            for name in Backend::names() {
                assert!(covered.contains(&name), "backend {name} has no short-run test");
            }
        }
    };
}

backends! {
    file => "file",
    memory => "memory",
    redis => "redis",
    redis_aof => "redis-aof",
    valkey => "valkey",
    redlock => "redlock",
    redis_cluster => "redis-cluster",
    postgres => "postgres",
    postgres_shared => "postgres-shared",
    postgres_lease => "postgres-lease",
    mysql => "mysql",
    mysql_shared => "mysql-shared",
    mysql_lease => "mysql-lease",
    etcd => "etcd",
    zookeeper => "zookeeper",
    mongodb => "mongodb",
    dynamodb => "dynamodb",
}

/// The short run breaks `dlock run`'s process tree on every backend with client processes.
#[test]
fn process_tree_runs_where_clients_are_processes() {
    assert!(Backend::file().applicable(Nemesis::ProcessTree).is_ok());
    assert!(Backend::memory().applicable(Nemesis::ProcessTree).is_err());
}

/// The file backend's short run includes the hostile lock directory nemesis.
#[test]
fn file_runs_the_hostile_dir_nemesis() {
    assert!(Backend::file().applicable(Nemesis::HostileDir).is_ok());
    assert!(Backend::memory().applicable(Nemesis::HostileDir).is_err());
}
