//! Three replicas run the same cron entry for the nightly report; their clocks and
//! schedulers differ by a few hundred milliseconds. Each takes `report:nightly` without
//! waiting and with a hold-at-least time: the first runs the report, which is quick,
//! and the key stays taken for the hold, so the replicas firing later skip the run
//! instead of running it again (`dlock run --no-wait --hold-at-least 5m -- report`).
//!
//! `cargo run --example nightly_report [-- --backend URL]` (default: a temporary file backend).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, _dir) = backend()?;
    let locks = fencelock::connect(&url).await?;
    let runs = Arc::new(AtomicU32::new(0));
    let mut replicas = Vec::new();
    for (replica, late_ms) in [("replica-1", 0), ("replica-2", 300), ("replica-3", 700)] {
        let (locks, runs) = (locks.clone(), Arc::clone(&runs));
        replicas.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(late_ms)).await; // its cron fires
            let lease = locks
                .lock("report:nightly")
                .hold_at_least(Duration::from_secs(2))
                .no_wait()
                .try_acquire()
                .await?;
            let Some(lease) = lease else {
                println!("{replica}: fired {late_ms} ms late, the report already ran: skipping");
                return Ok(());
            };
            println!("{replica}: running the report (fence {})", lease.fence());
            tokio::time::sleep(Duration::from_millis(100)).await; // the report
            runs.fetch_add(1, Ordering::SeqCst);
            println!("{replica}: report done; the key stays taken for the rest of 2 s");
            lease.release().await?; // honours the hold
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for replica in replicas {
        replica.await?.map_err(|e| e.to_string())?;
    }
    let runs = runs.load(Ordering::SeqCst);
    println!("the report ran {runs} time(s)");
    assert_eq!(runs, 1);
    Ok(())
}

/// `--backend URL`, or a file backend in a temporary directory removed at exit.
fn backend() -> std::io::Result<(String, Option<tempfile::TempDir>)> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--backend" {
            if let Some(url) = args.next() {
                return Ok((url, None));
            }
        }
    }
    let dir = tempfile::tempdir()?;
    Ok((format!("file://{}", dir.path().display()), Some(dir)))
}
