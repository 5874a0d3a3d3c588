//! Uncontended acquire+release pairs per second on the file and memory backends, each
//! beside the raw primitive doing the same work in the same run:
//! - file: `open` + `flock(LOCK_EX|LOCK_NB)` + write and fsync the fence + unlock + close;
//! - memory: a `tokio::sync::Mutex` lock/unlock per key in a shared map.
//!
//! Run with `cargo bench -p dlock-bench --bench lock_pairs`. Figures on a shared machine drift; the ratio
//! to the raw primitive of the same run is the number to read.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

const RUN_FOR: Duration = Duration::from_secs(3);

async fn pairs_per_second<F, Fut>(tasks: usize, one_pair: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let one_pair = Arc::new(one_pair);
    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let one_pair = Arc::clone(&one_pair);
        handles.push(tokio::spawn(async move {
            let mut done = 0u64;
            while started.elapsed() < RUN_FOR {
                one_pair(task, done).await;
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for handle in handles {
        total += handle.await.unwrap_or(0);
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn row(name: &str, tasks: usize, dlock: f64, raw: f64) {
    println!(
        "| {name:<7} | {tasks:>5} | {dlock:>12.0} | {raw:>12.0} | {:>6.2} |",
        dlock / raw
    );
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    println!("| backend | tasks | dlock pairs/s | raw pairs/s | ratio |");
    println!("|---------|------:|-------------:|------------:|------:|");
    for tasks in [1, 16] {
        let url = format!("file://{}", dir.path().display());
        let locks = fencelock::connect(&url).await.unwrap();
        let dlock_rate = pairs_per_second(tasks, move |task, n| {
            let locks = locks.clone();
            async move {
                let lease = locks
                    .lock(format!("d{task}-{}", n % 64))
                    .try_acquire()
                    .await
                    .unwrap()
                    .unwrap();
                lease.release().await.unwrap();
            }
        })
        .await;
        let raw_dir = dir.path().to_owned();
        let raw_rate = pairs_per_second(tasks, move |task, n| {
            let path = raw_dir.join(format!("r{task}-{}.lock", n % 64));
            async move {
                tokio::task::spawn_blocking(move || {
                    let mut file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(path)
                        .unwrap();
                    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                    file.write_all(b"{\"fence\":1}\n").unwrap();
                    file.sync_data().unwrap();
                    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
                })
                .await
                .unwrap();
            }
        })
        .await;
        row("file", tasks, dlock_rate, raw_rate);

        let locks = fencelock::connect("memory://bench").await.unwrap();
        let dlock_rate = pairs_per_second(tasks, move |task, n| {
            let locks = locks.clone();
            async move {
                let lease = locks
                    .lock(format!("m{task}-{}", n % 64))
                    .try_acquire()
                    .await
                    .unwrap()
                    .unwrap();
                lease.release().await.unwrap();
            }
        })
        .await;
        let map: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
            Arc::default();
        let raw_rate = pairs_per_second(tasks, move |task, n| {
            let map = Arc::clone(&map);
            async move {
                let mutex = Arc::clone(
                    map.lock()
                        .unwrap()
                        .entry(format!("m{task}-{}", n % 64))
                        .or_default(),
                );
                let guard = mutex.try_lock().unwrap();
                drop(guard);
            }
        })
        .await;
        row("memory", tasks, dlock_rate, raw_rate);
    }
}
