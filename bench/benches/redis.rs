//! Redis benchmark: dlock beside raw redis-rs doing the same commands, in the same run,
//! against a private redis-server.
//!
//! `cargo bench -p dlock-bench --bench redis --features redis` prints:
//! - uncontended lock+unlock pairs per second on fresh random keys, at 1 and 64
//!   concurrent tasks: dlock `try_acquire` + `release` (one script each), dlock
//!   `acquire` (waiting mode: also SUBSCRIBE/UNSUBSCRIBE for the wake-up), and raw
//!   redis-rs `SET NX PX` + EVALSHA compare-and-delete on one multiplexed connection;
//! - hand-off latency with 16 waiters on one key (release → next waiter holds), p50
//!   and p99, for dlock (waiters sharing one handle, and one handle each) and for raw
//!   redis-rs (SET NX PX retried on a Pub/Sub message from the release script).
//!
//! Each throughput figure is the median of three runs of `DLOCK_BENCH_SECS` seconds
//! (default 2), the variants taking turns so that a shared machine's load hits them alike.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use dlock_testkit::servers::redis::RedisServer;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
";

fn run_secs() -> Duration {
    let secs = std::env::var("DLOCK_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

fn random_key() -> String {
    format!("bench-{:016x}", rand::random::<u64>())
}

/// Runs `tasks` copies of `one` (one lock+unlock pair per call) for `length`; pairs/s.
async fn throughput<F, Fut>(tasks: usize, length: Duration, one: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + length;
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (one, done) = (one.clone(), Arc::clone(&done));
        handles.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                one().await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Hand-off latencies with 16 dlock waiters on one key.
async fn dlock_handoff(url: &str, shared_handle: bool, handoffs: usize) -> Vec<Duration> {
    let key = random_key();
    let shared = fencelock::connect(url).await.unwrap();
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let remaining = Arc::new(AtomicI64::new(handoffs as i64 + 1));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let locks = if shared_handle {
            shared.clone()
        } else {
            fencelock::connect(url).await.unwrap()
        };
        let (key, released_at, latencies, remaining) = (
            key.clone(),
            Arc::clone(&released_at),
            Arc::clone(&latencies),
            Arc::clone(&remaining),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let lease = locks
                    .lock(&key)
                    .ttl(Duration::from_secs(30))
                    .wait_for(Duration::from_secs(5))
                    .acquire()
                    .await;
                let Ok(lease) = lease else { return };
                if let Some(at) = released_at.lock().unwrap().take() {
                    latencies.lock().unwrap().push(at.elapsed());
                }
                let left = remaining.fetch_sub(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(200)).await;
                *released_at.lock().unwrap() = Some(Instant::now());
                lease.release().await.unwrap();
                if left <= 1 {
                    return;
                }
                // Let the others in: the next waiter is already woken.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    // Wait until enough hand-offs happened, then stop the waiters.
    let started = Instant::now();
    while remaining.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "dlock hand-off stalled: {} hand-offs left, {} waiters alive",
            remaining.load(Ordering::SeqCst),
            tasks.iter().filter(|t| !t.is_finished()).count()
        );
    }
    for task in tasks {
        task.abort();
    }
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    latencies
}

/// The same hand-off with raw redis-rs: SET NX PX, retried when the release script's
/// PUBLISH arrives on one shared subscriber connection.
async fn raw_handoff(client: &redis::Client, handoffs: usize) -> Vec<Duration> {
    let key = random_key();
    let channel = format!("released:{key}");
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(&channel).await.unwrap();
    let (wake, _) = tokio::sync::broadcast::channel::<()>(1024);
    let fanout = {
        let wake = wake.clone();
        tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while stream.next().await.is_some() {
                let _ = wake.send(());
            }
        })
    };
    let script = Arc::new(redis::Script::new(RELEASE_SCRIPT));
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let remaining = Arc::new(AtomicI64::new(handoffs as i64 + 1));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (mut conn, key, channel, script) = (
            conn.clone(),
            key.clone(),
            channel.clone(),
            Arc::clone(&script),
        );
        let (released_at, latencies, remaining) = (
            Arc::clone(&released_at),
            Arc::clone(&latencies),
            Arc::clone(&remaining),
        );
        let mut woken = wake.subscribe();
        tasks.push(tokio::spawn(async move {
            let token = format!("{:032x}", rand::random::<u128>());
            loop {
                let taken: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if taken.is_none() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), woken.recv()).await;
                    continue;
                }
                if let Some(at) = released_at.lock().unwrap().take() {
                    latencies.lock().unwrap().push(at.elapsed());
                }
                let left = remaining.fetch_sub(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(200)).await;
                *released_at.lock().unwrap() = Some(Instant::now());
                let _: i64 = script
                    .key(&key)
                    .arg(&token)
                    .arg(&channel)
                    .arg(&key)
                    .invoke_async(&mut conn)
                    .await
                    .unwrap();
                if left <= 1 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                woken = woken.resubscribe();
            }
        }));
    }
    let started = Instant::now();
    while remaining.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "raw hand-off stalled: {} hand-offs left, {} waiters alive",
            remaining.load(Ordering::SeqCst),
            tasks.iter().filter(|t| !t.is_finished()).count()
        );
    }
    for task in tasks {
        task.abort();
    }
    fanout.abort();
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    latencies
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = RedisServer::start();
    let url = server.url();
    let length = run_secs();
    runtime.block_on(async {
        let locks = fencelock::connect(&url).await.unwrap();
        let client = redis::Client::open(url.as_str()).unwrap();
        let raw = client.get_multiplexed_async_connection().await.unwrap();
        let release = Arc::new(redis::Script::new(RELEASE_SCRIPT));

        println!("dlock Redis benchmark against a private redis-server ({}), {length:?} per run", url);
        println!();
        println!("uncontended lock+unlock pairs/s on fresh random keys");
        println!("{:>6}  {:>22}  {:>22}  {:>18}  {:>8}", "tasks", "dlock try_acquire", "dlock acquire (wait)", "raw redis-rs", "ratio");
        for tasks in [1usize, 64] {
            // The three variants take turns, three rounds each, and the median round is
            // reported: a shared machine's load then hits all of them alike.
            let (mut dlock_try, mut dlock_wait, mut raw_rate) = (Vec::new(), Vec::new(), Vec::new());
            for _round in 0..3 {
                let l = locks.clone();
                dlock_try.push(
                    throughput(tasks, length, move || {
                        let l = l.clone();
                        async move {
                            let lease = l.lock(random_key()).try_acquire().await.unwrap().unwrap();
                            lease.release().await.unwrap();
                        }
                    })
                    .await,
                );
                let l = locks.clone();
                dlock_wait.push(
                    throughput(tasks, length, move || {
                        let l = l.clone();
                        async move {
                            let lease = l.lock(random_key()).acquire().await.unwrap();
                            lease.release().await.unwrap();
                        }
                    })
                    .await,
                );
                let (conn, script) = (raw.clone(), Arc::clone(&release));
                raw_rate.push(
                    throughput(tasks, length, move || {
                        let (mut conn, script) = (conn.clone(), Arc::clone(&script));
                        async move {
                            let key = random_key();
                            let token = format!("{:032x}", rand::random::<u128>());
                            let taken: Option<String> = redis::cmd("SET")
                                .arg(&key)
                                .arg(&token)
                                .arg("NX")
                                .arg("PX")
                                .arg(30_000)
                                .query_async(&mut conn)
                                .await
                                .unwrap();
                            assert!(taken.is_some());
                            let _: i64 = script
                                .key(&key)
                                .arg(&token)
                                .arg("released")
                                .arg(&key)
                                .invoke_async(&mut conn)
                                .await
                                .unwrap();
                        }
                    })
                    .await,
                );
            }
            let (dlock_try, dlock_wait, raw_rate) = (median(dlock_try), median(dlock_wait), median(raw_rate));
            println!(
                "{tasks:>6}  {dlock_try:>22.0}  {dlock_wait:>22.0}  {raw_rate:>18.0}  {:>7.2}x",
                dlock_try / raw_rate
            );
        }
        println!("(ratio = dlock try_acquire / raw redis-rs)");
        println!();
        let handoffs = 400;
        println!("hand-off latency, 16 waiters on one key, {handoffs} hand-offs (release -> next holder)");
        println!("{:<34}  {:>10}  {:>10}", "", "p50", "p99");
        let mut rows = Vec::new();
        for (name, latencies) in [
            ("dlock, 16 waiters on one handle", dlock_handoff(&url, true, handoffs).await),
            ("dlock, 16 waiters, a handle each", dlock_handoff(&url, false, handoffs).await),
            ("raw redis-rs SET NX + Pub/Sub", raw_handoff(&client, handoffs).await),
        ] {
            eprintln!("{name}: {} samples", latencies.len());
            rows.push((name, latencies));
        }
        for (name, latencies) in &rows {
            println!(
                "{name:<34}  {:>10.3?}  {:>10.3?}",
                percentile(latencies, 0.5),
                percentile(latencies, 0.99)
            );
        }
    });
    drop(server);
}
