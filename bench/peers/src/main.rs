//! Raw-store and peer-client figures for the comparison in docs/benchmarks.md, measured the
//! way `dlock-bench` measures dlock and printed as the same JSON objects:
//!
//! - `raw-redis`: redis-rs `SET key token NX PX ttl` + `EVALSHA` compare-and-delete on one
//!   multiplexed connection: the commands a dlock Redis lease costs, with no library around them.
//! - `raw-postgres`: tokio-postgres `pg_advisory_lock` / `pg_advisory_unlock` per task connection.
//! - `rslock`: the rslock crate's Redlock client on one node, with its default retry
//!   (3 tries, up to 200 ms apart) and tuned (unbounded tries, up to 5 ms apart).
//! - `distributed-lock`: the distributed-lock crate (the Rust port of DistributedLock for
//!   .NET), one named lock created from its provider, `acquire(Some(5 s))` then `release()`,
//!   on the store the URL names: `redis://` (its Redlock lock on one node), `postgres://`
//!   (a session advisory lock through its own sqlx pool, default size 10) or `file://DIR`
//!   (its file lock, in a directory of this run under DIR, removed at the end).
//!   `distributed-lock-sized-pool` is the PostgreSQL lock with a pool of --concurrency
//!   connections instead of the default 10.

use clap::{Parser, ValueEnum};
use distributed_lock::{
    DistributedLock, FileLockProvider, LockError, LockHandle, LockProvider, PostgresLockProvider,
    RedisLockProvider,
};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
enum Client {
    RawRedis,
    RawPostgres,
    Rslock,
    RslockTuned,
    DistributedLock,
    DistributedLockSizedPool,
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

/// One acquire+release of a fresh key; returns the acquire latency, or what went wrong.
type Pair = Arc<
    dyn Fn()
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Duration, String>> + Send>>
        + Send
        + Sync,
>;

/// The errors of a run: how many, and the last one, as dlock-bench reports them.
#[derive(Default)]
struct Errors {
    count: AtomicU64,
    last: Mutex<Option<String>>,
}

impl Errors {
    fn note(&self, error: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        *self.last.lock().unwrap() = Some(error);
    }

    fn report(&self, fields: &mut serde_json::Value) {
        let fields = fields.as_object_mut().unwrap();
        fields.insert("errors".into(), self.count.load(Ordering::Relaxed).into());
        if let Some(last) = self.last.lock().unwrap().clone() {
            fields.insert("last_error".into(), last.into());
        }
    }
}

async fn uncontended(args: &Args, make: impl Fn() -> Pair) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let pair = make();
        let (ops, errors) = (Arc::clone(&ops), Arc::clone(&errors));
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < until {
                match pair().await {
                    Ok(latency) => {
                        samples.push(latency);
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => errors.note(error),
                }
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
    let mut report = serde_json::json!({"operations": ops, "seconds": seconds, "per_second": ops as f64 / seconds, "acquire": percentiles(all)});
    errors.report(&mut report);
    report
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
                        let ok: Option<String> = redis::cmd("SET")
                            .arg(&k)
                            .arg(&token)
                            .arg("NX")
                            .arg("PX")
                            .arg(30_000)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        let latency = t.elapsed();
                        assert!(ok.is_some());
                        let _: i64 = script
                            .key(&k)
                            .arg(&token)
                            .invoke_async(&mut conn)
                            .await
                            .unwrap();
                        Ok(latency)
                    })
                })
            })
            .await
        }
        (Client::RawPostgres, Mode::Uncontended) => {
            let mut conns = Vec::new();
            for _ in 0..args.concurrency {
                let (client, conn) = tokio_postgres::connect(&args.url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
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
                        client
                            .execute("SELECT pg_advisory_lock($1)", &[&k])
                            .await
                            .unwrap();
                        let latency = t.elapsed();
                        client
                            .execute("SELECT pg_advisory_unlock($1)", &[&k])
                            .await
                            .unwrap();
                        Ok(latency)
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
                                let lock = manager
                                    .lock(k.as_bytes(), Duration::from_secs(30))
                                    .await
                                    .unwrap();
                                let latency = t.elapsed();
                                manager.unlock(&lock).await;
                                Ok(latency)
                            })
                        })
                    })
                    .await
                }
                Mode::Handoff => rslock_handoff(&args, manager).await,
            }
        }
        (Client::DistributedLock | Client::DistributedLockSizedPool, _) => {
            distributed_lock(&args).await
        }
        (client, mode) => panic!("{client:?} does not measure {mode:?}"),
    };
    let postgres = args.url.starts_with("postgres://") || args.url.starts_with("postgresql://");
    let name = match args.client {
        Client::RawRedis => "redis-rs (raw)",
        Client::RawPostgres => "tokio-postgres (raw)",
        Client::Rslock => "rslock (default retry)",
        Client::RslockTuned => "rslock (tuned retry)",
        Client::DistributedLock if postgres => "distributed-lock (default pool of 10)",
        Client::DistributedLock => "distributed-lock",
        Client::DistributedLockSizedPool => "distributed-lock (pool = tasks)",
    };
    let fields = report.as_object_mut().unwrap();
    fields.insert("client".into(), name.into());
    fields.insert(
        "mode".into(),
        format!("{:?}", args.mode).to_lowercase().into(),
    );
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
        let (manager, resource, released_at, generation, ops) = (
            Arc::clone(&manager),
            resource.clone(),
            Arc::clone(&released_at),
            Arc::clone(&generation),
            Arc::clone(&ops),
        );
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < until {
                let lock = match manager
                    .lock(resource.as_bytes(), Duration::from_secs(30))
                    .await
                {
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
    handoff_report(tasks, started, &ops).await
}

/// The report of a hand-off run: its hand-offs per second and the latency percentiles of
/// every waiter's samples.
async fn handoff_report(
    tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>,
    started: Instant,
    ops: &AtomicU64,
) -> serde_json::Value {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let seconds = started.elapsed().as_secs_f64();
    let ops = ops.load(Ordering::Relaxed);
    serde_json::json!({"operations": ops, "seconds": seconds, "per_second": ops as f64 / seconds, "handoff": percentiles(all)})
}

/// A lock name of this run: `peer-PID-RANDOM`, so that what a run leaves behind can be
/// found (the crate keys its Redis locks `distributed-lock:NAME`).
fn dl_name() -> String {
    format!("peer-{}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// Counts and deletes the keys of this process's distributed-lock names left in Redis. The
/// server may still be busy with the polling of the run that just ended: each reply may
/// take up to 30 s.
async fn dl_redis_leftovers(url: &str) -> redis::RedisResult<u64> {
    let client = redis::Client::open(url)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(30)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let pattern = format!("distributed-lock:peer-{}-*", std::process::id());
    let (mut cursor, mut left) = (0u64, 0u64);
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            left += keys.len() as u64;
            let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
        }
        if next == 0 {
            return Ok(left);
        }
        cursor = next;
    }
}

/// The distributed-lock crate on the store its URL names, in the run's mode.
async fn distributed_lock(args: &Args) -> serde_json::Value {
    let url = args.url.as_str();
    if url.starts_with("redis://") {
        assert!(
            args.client == Client::DistributedLock,
            "the pool size is a PostgreSQL setting"
        );
        let provider = RedisLockProvider::builder().url(url).build().await.unwrap();
        let mut report = dl_measure(args, Arc::new(provider)).await;
        // Its release deletes the key; count (and delete) what a failed release left.
        let left = match dl_redis_leftovers(url).await {
            Ok(left) => serde_json::Value::from(left),
            Err(err) => serde_json::Value::from(format!("not counted: {err}")),
        };
        report
            .as_object_mut()
            .unwrap()
            .insert("left_behind".into(), left);
        report
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let builder = PostgresLockProvider::builder();
        let builder = if args.client == Client::DistributedLockSizedPool {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(args.concurrency as u32)
                .connect(url)
                .await
                .unwrap();
            builder.pool(pool)
        } else {
            builder.connection_string(url)
        };
        // Session advisory locks: nothing stays in the database once released.
        dl_measure(args, Arc::new(builder.build().await.unwrap())).await
    } else {
        assert!(
            args.client == Client::DistributedLock,
            "the pool size is a PostgreSQL setting"
        );
        let base = url.strip_prefix("file://").unwrap_or(url);
        let dir = Path::new(base).join(format!("distributed-lock-{}", std::process::id()));
        let provider = FileLockProvider::builder().directory(&dir).build().unwrap();
        let mut report = dl_measure(args, Arc::new(provider)).await;
        // Its release deletes the lock file; count what is left, then remove the directory.
        let left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        std::fs::remove_dir_all(&dir).unwrap();
        report
            .as_object_mut()
            .unwrap()
            .insert("left_behind".into(), left.into());
        report
    }
}

async fn dl_measure<P>(args: &Args, provider: Arc<P>) -> serde_json::Value
where
    P: LockProvider + 'static,
    P::Lock: 'static,
{
    match args.mode {
        Mode::Uncontended => {
            uncontended(args, || {
                let provider = Arc::clone(&provider);
                Arc::new(move || {
                    let provider = Arc::clone(&provider);
                    Box::pin(async move {
                        // As its README: a lock by name, acquire with a timeout, release.
                        let t = Instant::now();
                        let lock = provider.create_lock(&dl_name());
                        let handle = lock
                            .acquire(Some(Duration::from_secs(5)))
                            .await
                            .map_err(|e| e.to_string())?;
                        let latency = t.elapsed();
                        handle.release().await.map_err(|e| e.to_string())?;
                        Ok(latency)
                    })
                })
            })
            .await
        }
        Mode::Handoff => dl_handoff(args, provider).await,
    }
}

/// The hand-off of `rslock_handoff` with the crate's lock: one lock object per waiter on
/// one name (as separate processes would have), `acquire(Some(time left))`. Its Redis
/// acquire does not wait (one `SET NX`, then `Timeout` at once), so there a waiter calls
/// it again at once; `acquire_calls` counts the calls. Two holders at once count as a
/// violation.
async fn dl_handoff<P>(args: &Args, provider: Arc<P>) -> serde_json::Value
where
    P: LockProvider + 'static,
    P::Lock: 'static,
{
    let name = dl_name();
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let released_at = Arc::new(Mutex::new(None::<Instant>));
    let (generation, _) = tokio::sync::watch::channel(0u64);
    let generation = Arc::new(generation);
    let ops = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicU64::new(0));
    let violations = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());
    let hold = Duration::from_secs_f64(args.hold_ms / 1000.0);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let lock = provider.create_lock(&name);
        let (released_at, generation, ops, calls) = (
            Arc::clone(&released_at),
            Arc::clone(&generation),
            Arc::clone(&ops),
            Arc::clone(&calls),
        );
        let (inside, violations, served, errors) = (
            Arc::clone(&inside),
            Arc::clone(&violations),
            Arc::clone(&served),
            Arc::clone(&errors),
        );
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut counted = false;
            while Instant::now() < until {
                // At least 1 ms: its PostgreSQL lock takes a timeout of 0 ms as no timeout.
                let left = until
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                calls.fetch_add(1, Ordering::Relaxed);
                let handle = match lock.acquire(Some(left)).await {
                    Ok(handle) => handle,
                    Err(LockError::Timeout(_)) => continue,
                    Err(e) => {
                        errors.note(e.to_string());
                        continue;
                    }
                };
                if let Some(r) = released_at.lock().unwrap().take() {
                    samples.push(r.elapsed());
                }
                if !counted {
                    counted = true;
                    served.fetch_add(1, Ordering::Relaxed);
                }
                if inside.fetch_add(1, Ordering::SeqCst) > 0 {
                    violations.fetch_add(1, Ordering::Relaxed);
                }
                let mut mine = 0;
                generation.send_modify(|g| {
                    *g += 1;
                    mine = *g;
                });
                tokio::time::sleep(hold).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                *released_at.lock().unwrap() = Some(Instant::now());
                if let Err(e) = handle.release().await {
                    errors.note(e.to_string());
                }
                ops.fetch_add(1, Ordering::Relaxed);
                let mut rx = generation.subscribe();
                let left = until.saturating_duration_since(Instant::now());
                let _ = tokio::time::timeout(left, rx.wait_for(|g| *g > mine)).await;
            }
            samples
        }));
    }
    let mut report = handoff_report(tasks, started, &ops).await;
    let extra = report.as_object_mut().unwrap();
    extra.insert("tasks_served".into(), served.load(Ordering::Relaxed).into());
    extra.insert(
        "violations".into(),
        violations.load(Ordering::Relaxed).into(),
    );
    extra.insert("acquire_calls".into(), calls.load(Ordering::Relaxed).into());
    errors.report(&mut report);
    report
}
