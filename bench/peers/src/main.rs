//! Raw-store and peer-client figures for the comparison in docs/benchmarks.md, measured the
//! way `dlock-bench` measures dlock and printed as the same JSON objects:
//!
//! - `raw-redis`: redis-rs `SET key token NX PX ttl` + `EVALSHA` compare-and-delete on one
//!   multiplexed connection: the commands a dlock Redis lease costs, with no library around them.
//! - `raw-postgres`: tokio-postgres `pg_advisory_lock` / `pg_advisory_unlock` per task connection.
//! - `rslock`: the rslock crate's Redlock client on one node, with its default retry
//!   (3 tries, up to 200 ms apart) and tuned (unbounded tries, up to 5 ms apart).

use clap::{Parser, ValueEnum};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
enum Client {
    RawRedis,
    RawPostgres,
    Rslock,
    RslockTuned,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
enum Mode {
    Uncontended,
    Handoff,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, value_enum)]
    client: Client,
    #[arg(long)]
    url: String,
    #[arg(long, value_enum, default_value = "uncontended")]
    mode: Mode,
    #[arg(long, short = 'c', default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 5.0)]
    hold_ms: f64,
}

const CAD: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

fn percentiles(mut samples: Vec<Duration>) -> serde_json::Value {
    if samples.is_empty() {
        return serde_json::json!({"count": 0});
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i.min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    serde_json::json!({
        "count": samples.len(), "p10_us": at(0.10), "p25_us": at(0.25), "p50_us": at(0.5),
        "p75_us": at(0.75), "p90_us": at(0.9), "p99_us": at(0.99), "max_us": at(1.0),
    })
}

fn key() -> String {
    format!("peer-{:016x}", rand::random::<u64>())
}

/// One acquire+release of a fresh key; returns the acquire latency.
type Pair = Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Duration> + Send>> + Send + Sync>;

async fn uncontended(args: &Args, make: impl Fn() -> Pair) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let ops = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let pair = make();
        let ops = Arc::clone(&ops);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < until {
                samples.push(pair().await);
                ops.fetch_add(1, Ordering::Relaxed);
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let seconds = started.elapsed().as_secs_f64();
    let ops = ops.load(Ordering::Relaxed);
    serde_json::json!({"operations": ops, "seconds": seconds, "per_second": ops as f64 / seconds, "acquire": percentiles(all)})
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut report = match (args.client, args.mode) {
        (Client::RawRedis, Mode::Uncontended) => {
            let client = redis::Client::open(args.url.as_str()).unwrap();
            let conn = client.get_multiplexed_async_connection().await.unwrap();
            let script = redis::Script::new(CAD);
            uncontended(&args, || {
                let (conn, script) = (conn.clone(), script.clone());
                Arc::new(move || {
                    let (mut conn, script) = (conn.clone(), script.clone());
                    Box::pin(async move {
                        let (k, token) = (key(), format!("{:032x}", rand::random::<u128>()));
                        let t = Instant::now();
                        let ok: Option<String> = redis::cmd("SET").arg(&k).arg(&token).arg("NX").arg("PX").arg(30_000).query_async(&mut conn).await.unwrap();
                        let latency = t.elapsed();
                        assert!(ok.is_some());
                        let _: i64 = script.key(&k).arg(&token).invoke_async(&mut conn).await.unwrap();
                        latency
                    })
                })
            })
            .await
        }
        (Client::RawPostgres, Mode::Uncontended) => {
            let mut conns = Vec::new();
            for _ in 0..args.concurrency {
                let (client, conn) = tokio_postgres::connect(&args.url, tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(conn);
                conns.push(Arc::new(client));
            }
            let conns = Mutex::new(conns);
            uncontended(&args, || {
                let client = conns.lock().unwrap().pop().unwrap();
                Arc::new(move || {
                    let client = Arc::clone(&client);
                    Box::pin(async move {
                        let k: i64 = rand::random();
                        let t = Instant::now();
                        client.execute("SELECT pg_advisory_lock($1)", &[&k]).await.unwrap();
                        let latency = t.elapsed();
                        client.execute("SELECT pg_advisory_unlock($1)", &[&k]).await.unwrap();
                        latency
                    })
                })
            })
            .await
        }
        (Client::Rslock | Client::RslockTuned, mode) => {
            let mut manager = rslock::LockManager::new(vec![args.url.clone()]);
            if args.client == Client::RslockTuned {
                manager.set_retry(u32::MAX, Duration::from_millis(5));
            }
            let manager = Arc::new(manager);
            match mode {
                Mode::Uncontended => {
                    uncontended(&args, || {
                        let manager = Arc::clone(&manager);
                        Arc::new(move || {
                            let manager = Arc::clone(&manager);
                            Box::pin(async move {
                                let k = key();
                                let t = Instant::now();
                                let lock = manager.lock(k.as_bytes(), Duration::from_secs(30)).await.unwrap();
                                let latency = t.elapsed();
                                manager.unlock(&lock).await;
                                latency
                            })
                        })
                    })
                    .await
                }
                Mode::Handoff => rslock_handoff(&args, manager).await,
            }
        }
        (client, mode) => panic!("{client:?} does not measure {mode:?}"),
    };
    let name = match args.client {
        Client::RawRedis => "redis-rs (raw)",
        Client::RawPostgres => "tokio-postgres (raw)",
        Client::Rslock => "rslock (default retry)",
        Client::RslockTuned => "rslock (tuned retry)",
    };
    let fields = report.as_object_mut().unwrap();
    fields.insert("client".into(), name.into());
    fields.insert("mode".into(), format!("{:?}", args.mode).to_lowercase().into());
    fields.insert("concurrency".into(), args.concurrency.into());
    println!("{report}");
}

/// The hand-off of `dlock-bench --mode handoff`: N waiters on one key; the holder holds,
/// releases, and steps aside until someone else has acquired. A waiter whose retries run
/// out (rslock's default gives up after 3 tries) simply tries again.
async fn rslock_handoff(args: &Args, manager: Arc<rslock::LockManager>) -> serde_json::Value {
    let resource = key();
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let released_at = Arc::new(Mutex::new(None::<Instant>));
    let (generation, _) = tokio::sync::watch::channel(0u64);
    let generation = Arc::new(generation);
    let ops = Arc::new(AtomicU64::new(0));
    let hold = Duration::from_secs_f64(args.hold_ms / 1000.0);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (manager, resource, released_at, generation, ops) =
            (Arc::clone(&manager), resource.clone(), Arc::clone(&released_at), Arc::clone(&generation), Arc::clone(&ops));
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < until {
                let lock = match manager.lock(resource.as_bytes(), Duration::from_secs(30)).await {
                    Ok(lock) => lock,
                    Err(_) => continue,
                };
                if let Some(r) = released_at.lock().unwrap().take() {
                    samples.push(r.elapsed());
                }
                let mut mine = 0;
                generation.send_modify(|g| {
                    *g += 1;
                    mine = *g;
                });
                tokio::time::sleep(hold).await;
                *released_at.lock().unwrap() = Some(Instant::now());
                manager.unlock(&lock).await;
                ops.fetch_add(1, Ordering::Relaxed);
                let mut rx = generation.subscribe();
                let left = until.saturating_duration_since(Instant::now());
                let _ = tokio::time::timeout(left, rx.wait_for(|g| *g > mine)).await;
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let seconds = started.elapsed().as_secs_f64();
    let ops = ops.load(Ordering::Relaxed);
    serde_json::json!({"operations": ops, "seconds": seconds, "per_second": ops as f64 / seconds, "handoff": percentiles(all)})
}
