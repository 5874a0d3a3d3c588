//! `dlock-bench --raw`: the store's own client running the operations a dlock lease
//! costs on it, measured by the same loops as dlock, so that compare.py can state dlock's
//! figures as ratios to the raw store of the same run.
//!
//! Each store module sends what dlock's backend sends for one acquire and one release
//! (see its doc comment); keys are fresh and in the run's namespace, as dlock's.

#[cfg(feature = "dynamodb")]
mod dynamodb;
#[cfg(feature = "etcd")]
mod etcd;
mod memory;
#[cfg(feature = "mongodb")]
mod mongodb;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod redlock;

use super::modes::Details;
use super::stats::percentiles;
use super::{Mode, Report};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Every store call is bounded by this, so that a stalled store ends the run with an
/// error instead of hanging it.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Awaits one store call for at most [`CALL_TIMEOUT`].
async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(format!("{what}: {err}")),
        Err(_) => Err(format!("{what}: no answer within {CALL_TIMEOUT:?}")),
    }
}

/// A random owner token, as dlock writes one per lease.
fn owner_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// What a raw acquire hands back for its release.
pub enum Token {
    /// The owner token written with the key.
    Owner(String),
    /// etcd: the lease the lock key is bound to, and the lock key the Lock RPC made.
    #[cfg(feature = "etcd")]
    Etcd { lease: i64, key: Vec<u8> },
    /// memory: the held mutex.
    Memory(tokio::sync::OwnedMutexGuard<()>),
    /// MySQL session mode: the connection that holds the `GET_LOCK` lock.
    #[cfg(feature = "mysql")]
    MysqlSession(Box<mysql_async::Conn>),
}

/// A raw client of one store.
#[derive(Clone)]
pub enum Store {
    Memory(memory::Memory),
    #[cfg(feature = "etcd")]
    Etcd(Box<etcd::Etcd>),
    #[cfg(feature = "redis")]
    Redis(redis::Redis),
    #[cfg(feature = "redis")]
    Redlock(redlock::Redlock),
    #[cfg(feature = "mysql")]
    Mysql(mysql::Mysql),
    #[cfg(feature = "mongodb")]
    Mongo(mongodb::Mongo),
    #[cfg(feature = "dynamodb")]
    Dynamo(dynamodb::Dynamo),
}

impl Store {
    /// The raw client for a dlock backend URL of a store that has one here.
    pub async fn connect(url: &str) -> Result<Store, String> {
        let scheme = url.split("://").next().unwrap_or_default();
        match scheme {
            "memory" => Ok(Store::Memory(memory::Memory::default())),
            #[cfg(feature = "etcd")]
            "etcd" => etcd::Etcd::connect(url)
                .await
                .map(|etcd| Store::Etcd(Box::new(etcd))),
            #[cfg(feature = "redis")]
            "redis" | "redis+cluster" => redis::Redis::connect(url).await.map(Store::Redis),
            #[cfg(feature = "redis")]
            "redlock" => redlock::Redlock::connect(url).await.map(Store::Redlock),
            #[cfg(feature = "mysql")]
            "mysql" => mysql::Mysql::connect(url).await.map(Store::Mysql),
            #[cfg(feature = "mongodb")]
            "mongodb" => mongodb::Mongo::connect(url).await.map(Store::Mongo),
            #[cfg(feature = "dynamodb")]
            "dynamodb" => dynamodb::Dynamo::connect(url).await.map(Store::Dynamo),
            other => Err(format!(
                "--raw has no raw client for {other}:// in this build (memory; etcd, redis, \
                 redis+cluster, redlock, mysql, mongodb and dynamodb, each with its feature)"
            )),
        }
    }

    /// How the report names the client.
    pub fn describe(&self) -> &'static str {
        match self {
            Store::Memory(_) => "tokio Mutex (raw)",
            #[cfg(feature = "etcd")]
            Store::Etcd(_) => "etcd-client Lock RPC (raw)",
            #[cfg(feature = "redis")]
            Store::Redis(r) => r.describe(),
            #[cfg(feature = "redis")]
            Store::Redlock(_) => "redis-rs Redlock (raw)",
            #[cfg(feature = "mysql")]
            Store::Mysql(s) => s.describe(),
            #[cfg(feature = "mongodb")]
            Store::Mongo(_) => "mongodb findOneAndUpdate (raw)",
            #[cfg(feature = "dynamodb")]
            Store::Dynamo(_) => "aws-sdk-dynamodb conditional writes (raw)",
        }
    }

    /// Whether [`acquire`](Self::acquire) can wait for a held key (hand-off needs it).
    pub fn waits(&self) -> bool {
        match self {
            Store::Memory(_) => true,
            #[cfg(feature = "etcd")]
            Store::Etcd(_) => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Takes `key`, waiting until `until` if the store can wait; `None` if it was held
    /// (or still was at `until`).
    pub async fn acquire(
        &self,
        key: &str,
        ttl: Duration,
        until: Instant,
    ) -> Result<Option<Token>, String> {
        let _ = (key, ttl, until);
        match self {
            Store::Memory(s) => s.acquire(key, until).await,
            #[cfg(feature = "etcd")]
            Store::Etcd(s) => s.acquire(key, ttl, until).await,
            #[cfg(feature = "redis")]
            Store::Redis(s) => s.acquire(key, ttl).await,
            #[cfg(feature = "redis")]
            Store::Redlock(s) => s.acquire(key, ttl).await,
            #[cfg(feature = "mysql")]
            Store::Mysql(s) => s.acquire(key, ttl).await,
            #[cfg(feature = "mongodb")]
            Store::Mongo(s) => s.acquire(key, ttl).await,
            #[cfg(feature = "dynamodb")]
            Store::Dynamo(s) => s.acquire(key, ttl).await,
        }
    }

    /// Releases what `acquire` took; false if it was no longer held.
    pub async fn release(&self, key: &str, token: Token) -> Result<bool, String> {
        let _ = key;
        match (self, token) {
            (Store::Memory(s), Token::Memory(guard)) => Ok(s.release(key, guard)),
            #[cfg(feature = "etcd")]
            (Store::Etcd(s), Token::Etcd { lease, key }) => s.release(lease, key).await,
            #[cfg(feature = "redis")]
            (Store::Redis(s), Token::Owner(owner)) => s.release(key, &owner).await,
            #[cfg(feature = "redis")]
            (Store::Redlock(s), Token::Owner(owner)) => s.release(key, &owner).await,
            #[cfg(feature = "mysql")]
            (Store::Mysql(s), Token::MysqlSession(conn)) => s.release_session(key, *conn).await,
            #[cfg(feature = "mysql")]
            (Store::Mysql(s), Token::Owner(owner)) => s.release_lease(key, &owner).await,
            #[cfg(feature = "mongodb")]
            (Store::Mongo(s), Token::Owner(owner)) => s.release(key, &owner).await,
            #[cfg(feature = "dynamodb")]
            (Store::Dynamo(s), Token::Owner(owner)) => s.release(key, &owner).await,
            #[allow(unreachable_patterns)]
            _ => Err("a token of another store".to_owned()),
        }
    }

    /// Removes what the client set up for its run (MySQL's lease table).
    pub async fn finish(&self) -> Result<(), String> {
        match self {
            #[cfg(feature = "mysql")]
            Store::Mysql(s) => s.finish().await,
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        }
    }
}

/// The counters of one raw run.
#[derive(Default)]
struct Tally {
    operations: AtomicU64,
    violations: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Tally {
    fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(message);
        }
    }
}

/// What a raw run is asked to do.
pub struct RawArgs {
    pub mode: Mode,
    pub concurrency: usize,
    pub duration: Duration,
    pub ttl: Duration,
    pub hold: Duration,
}

/// Runs one raw measurement and reports it as `dlock-bench` reports dlock's.
pub async fn bench(store: Store, args: RawArgs) -> Result<Report, String> {
    let store = Arc::new(store);
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let until = started + args.duration;
    let details = match args.mode {
        Mode::Uncontended => Ok(uncontended(&store, &tally, &args, until).await),
        Mode::Handoff if store.waits() => Ok(handoff(&store, &tally, &args, until).await),
        Mode::Handoff => Err(format!(
            "{} has no waiting acquire, so --raw measures no hand-off on it",
            store.describe()
        )),
        other => Err(format!(
            "--raw measures uncontended and handoff, not {other:?}"
        )),
    };
    let seconds = started.elapsed().as_secs_f64();
    // After the clock stops, and also when nothing ran: the clean-up is not measured.
    if let Err(err) = store.finish().await {
        tally.error(err);
    }
    let details = details?;
    let operations = tally.operations.load(Ordering::Relaxed);
    Ok(Report {
        backend: store.describe().to_owned(),
        mode: args.mode,
        kind: "exclusive".to_owned(),
        concurrency: args.concurrency,
        seconds,
        operations,
        per_second: operations as f64 / seconds,
        violations: tally.violations.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        last_error: tally.last_error.lock().ok().and_then(|e| e.clone()),
        unsupported: false,
        details,
    })
}

fn fresh_key(prefix: &str) -> String {
    format!(
        "{}raw{prefix}-{:016x}",
        super::key_prefix(),
        rand::random::<u64>()
    )
}

async fn uncontended(
    store: &Arc<Store>,
    tally: &Arc<Tally>,
    args: &RawArgs,
    until: Instant,
) -> Details {
    let ttl = args.ttl;
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (store, tally) = (Arc::clone(store), Arc::clone(tally));
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while Instant::now() < until {
                    let key = fresh_key("u");
                    let started = Instant::now();
                    match store.acquire(&key, ttl, started + CALL_TIMEOUT).await {
                        Ok(Some(token)) => {
                            samples.push(started.elapsed());
                            match store.release(&key, token).await {
                                Ok(true) => {
                                    tally.operations.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(false) => tally
                                    .error(format!("{key:?} was no longer held at its release")),
                                Err(err) => tally.error(err),
                            }
                        }
                        Ok(None) => tally.error(format!("the fresh key {key:?} was held")),
                        Err(err) => tally.error(err),
                    }
                }
                samples
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        if let Ok(samples) = task.await {
            all.extend(samples);
        }
    }
    Details {
        acquire: Some(percentiles(all)),
        ..Details::default()
    }
}

/// One key, N waiters blocked in the store's own waiting acquire; each holder holds for
/// `hold`, releases and steps aside until another has acquired, as dlock's hand-off.
async fn handoff(
    store: &Arc<Store>,
    tally: &Arc<Tally>,
    args: &RawArgs,
    until: Instant,
) -> Details {
    let key = Arc::new(fresh_key("h"));
    let inside = Arc::new(AtomicU64::new(0));
    let released_at = Arc::new(Mutex::new(None::<Instant>));
    let generation = Arc::new(watch::channel(0u64).0);
    let served = Arc::new(AtomicUsize::new(0));
    let (ttl, hold) = (args.ttl, args.hold);
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (store, tally, key, inside) = (
                Arc::clone(store),
                Arc::clone(tally),
                Arc::clone(&key),
                Arc::clone(&inside),
            );
            let (released_at, generation, served) = (
                Arc::clone(&released_at),
                Arc::clone(&generation),
                Arc::clone(&served),
            );
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut counted = false;
                while Instant::now() < until {
                    let token = match store.acquire(&key, ttl, until).await {
                        Ok(Some(token)) => token,
                        Ok(None) => break,
                        Err(err) => {
                            tally.error(err);
                            continue;
                        }
                    };
                    let acquired = Instant::now();
                    if let Some(released) = released_at.lock().ok().and_then(|mut r| r.take()) {
                        samples.push(acquired - released);
                    }
                    if !counted {
                        counted = true;
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    if inside.fetch_add(1, Ordering::SeqCst) >= 1 {
                        tally.violations.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut mine = 0;
                    generation.send_modify(|g| {
                        *g += 1;
                        mine = *g;
                    });
                    tokio::time::sleep(hold).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    if let Ok(mut r) = released_at.lock() {
                        *r = Some(Instant::now());
                    }
                    match store.release(&key, token).await {
                        Ok(_) => {
                            tally.operations.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => tally.error(err),
                    }
                    // Step aside until somebody else has acquired.
                    let mut rx = generation.subscribe();
                    let left = until.saturating_duration_since(Instant::now());
                    let _ = tokio::time::timeout(left, rx.wait_for(|g| *g > mine)).await;
                }
                samples
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        if let Ok(samples) = task.await {
            all.extend(samples);
        }
    }
    Details {
        handoff: Some(percentiles(all)),
        tasks_served: Some(served.load(Ordering::Relaxed)),
        ..Details::default()
    }
}
