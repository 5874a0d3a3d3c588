//! A thousand waiters on distinct file keys: the kernel has no asynchronous flock, so a
//! waiter in its queue is a thread blocked in flock(2); the file backend caps those
//! threads and lets the others try at intervals. Every waiter still gets its key once
//! the holder lets go. Its own test binary: it counts the threads of the process.

use std::time::{Duration, Instant};

const KEYS: usize = 1_000;
/// The cap of the file backend (`MAX_BLOCKED_THREADS`), plus threads finishing meanwhile.
const MOST_WAIT_THREADS: usize = 64;

/// The threads of this process named like the file backend's waiting threads
/// (`dlock-flock-wait`, which the kernel keeps as its first 15 bytes).
fn waiting_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim() == "dlock-flock-wai")
        })
        .count()
}

/// Stops the waiters if the test fails early, so that none keeps creating lock files
/// in the directory being removed.
struct AbortOnDrop<T>(Vec<tokio::task::JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    fn take(mut self) -> Vec<tokio::task::JoinHandle<T>> {
        std::mem::take(&mut self.0)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_waiters_need_no_thousand_threads_and_all_get_their_key() {
    let dir = tempfile::Builder::new()
        .prefix("dlock-many-waiters-")
        .tempdir()
        .unwrap();
    let url = format!("file://{}", dir.path().display());
    // Two handles: each opens its own lock files, so they exclude each other as two
    // processes would.
    let holder = fencelock::connect(&url).await.unwrap();
    let waiter = fencelock::connect(&url).await.unwrap();
    let mut held = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
        held.push(
            holder
                .lock(format!("key-{i}"))
                .no_wait()
                .acquire()
                .await
                .unwrap(),
        );
    }
    let waits = AbortOnDrop(
        (0..KEYS)
            .map(|i| {
                let waiter = waiter.clone();
                tokio::spawn(async move {
                    waiter
                        .lock(format!("key-{i}"))
                        .wait_for(Duration::from_secs(60))
                        .acquire()
                        .await
                })
            })
            .collect(),
    );
    // Let every waiter reach its wait.
    let settle = Instant::now() + Duration::from_secs(3);
    let mut most = 0;
    while Instant::now() < settle {
        most = most.max(waiting_threads());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        most > 0,
        "no waiter blocked in flock on a thread of its own"
    );
    assert!(
        most <= MOST_WAIT_THREADS,
        "{most} threads blocked in flock for {KEYS} waiters (at most {MOST_WAIT_THREADS} expected)"
    );
    let fences: Vec<u64> = held.iter().map(|lease| lease.fence()).collect();
    for lease in held {
        assert!(lease.release().await.unwrap());
    }
    let mut served = 0;
    for (i, wait) in waits.take().into_iter().enumerate() {
        let lease = tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .expect("a waiter did not get its key in time")
            .unwrap()
            .unwrap_or_else(|err| panic!("waiter {i}: {err}"));
        assert!(
            lease.fence() > fences[i],
            "key-{i}: the fence did not increase"
        );
        lease.release().await.unwrap();
        served += 1;
    }
    assert_eq!(served, KEYS);
    drop((holder, waiter));
    // The waiting threads end with their waits.
    let gone = Instant::now() + Duration::from_secs(10);
    while waiting_threads() > 0 && Instant::now() < gone {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(waiting_threads(), 0, "waiting threads outlived their waits");
}
