//! Lock+unlock pairs per second through dlock (`try_acquire` + `release`) on PostgreSQL
//! and MariaDB, in both modes, at 1 and 32 concurrent tasks (each on its own key, sharing
//! one `Locks` handle), beside the same SQL run without dlock in the same run. The SQL is
//! the library's own (`bench_statements` of each backend), never a copy:
//! - PostgreSQL: `pgbench` with scripts generated from it (`dlock_bench::pgbench`) and
//!   tokio-postgres running it, a connection per task, plus the bare
//!   `pg_advisory_lock`/`pg_advisory_unlock` pair;
//! - MariaDB (no pgbench): dlock's statements, the bare `GET_LOCK`/`RELEASE_LOCK` pair and
//!   the bare lease-row `INSERT`/`DELETE` pair, through mysql_async, a connection per task.
//!
//! Then the hand-off latency: 16 waiters on 16 handles contend for one key; each new
//! holder measures the time from the previous holder's release call to its own grant.
//!
//! Starts private servers (fsync off, like the conformance tests). Run with
//! `cargo bench -p dlock-bench --bench sql`; `DLOCK_BENCH_SECS` sets the seconds per figure (default 3).

use dlock_bench::pgbench;
use dlock_testkit::process::require_binary;
use dlock_testkit::servers::mysql::Mysql;
use dlock_testkit::servers::postgres::Postgres;
use mysql_async::prelude::Queryable;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn run_for() -> Duration {
    let secs = std::env::var("DLOCK_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

async fn pairs_per_second<F, Fut>(tasks: usize, one_pair: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let one_pair = Arc::new(one_pair);
    let limit = run_for();
    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let one_pair = Arc::clone(&one_pair);
        handles.push(tokio::spawn(async move {
            let mut done = 0u64;
            while started.elapsed() < limit {
                one_pair(task).await;
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

async fn dlock_pairs(url: &str, tasks: usize) -> f64 {
    let locks = fencelock::connect(url).await.expect("connect");
    let tag = format!("bench-{:x}", rand::random::<u32>());
    pairs_per_second(tasks, move |task| {
        let (locks, key) = (locks.clone(), format!("{tag}-{task}"));
        async move {
            // Not waiting: the statements `bench_statements` gives are this path's.
            let lease = locks.lock(&key).try_acquire().await.expect("acquire");
            let lease = lease.expect("an uncontended key is free");
            assert!(lease.release().await.expect("release"));
        }
    })
    .await
}

fn pgbench(server: &Postgres, script: &str, clients: usize) -> f64 {
    let binary = require_binary(
        "pgbench",
        "postgresql-client",
        &["/usr/lib/postgresql/*/bin"],
    );
    let dir = dlock_testkit::process::temp_dir("dlock-pgbench-");
    let path = dir.path().join("script.sql");
    std::fs::write(&path, script).expect("write the pgbench script");
    let secs = run_for().as_secs().max(1).to_string();
    let out = std::process::Command::new(binary)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.port().to_string(),
            "-U",
            "postgres",
            "-n",
            "-M",
            "prepared",
        ])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
            "-T",
            &secs,
            "-f",
        ])
        .arg(&path)
        .arg("postgres")
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "pgbench failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

async fn mysql_bare(server: &Mysql, tasks: usize, lease: bool) -> f64 {
    let url = format!(
        "mysql://dlock:dlock-secret@127.0.0.1:{}/dlock",
        server.port()
    );
    let opts = mysql_async::Opts::from_url(&url).expect("url");
    let mut conns = Vec::new();
    for _ in 0..tasks {
        conns.push(Arc::new(tokio::sync::Mutex::new(
            mysql_async::Conn::new(opts.clone()).await.expect("connect"),
        )));
    }
    let conns = Arc::new(conns);
    pairs_per_second(tasks, move |task| {
        let conns = Arc::clone(&conns);
        async move {
            let mut conn = conns[task].lock().await;
            let name = format!("bare-{task}");
            if lease {
                conn.exec_drop(
                    "INSERT INTO dlock_leases (k, key_text, owner, fence, expires_at, acquired_at, renewed_at, ttl_ms, pid, host) \
                     VALUES (UNHEX(SHA2(?, 256)), ?, 'o', 1, UTC_TIMESTAMP(6) + INTERVAL 30 SECOND, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 30000, 1, 'b')",
                    (name.as_str(), name.as_str()),
                )
                .await
                .expect("insert");
                conn.exec_drop("DELETE FROM dlock_leases WHERE k = UNHEX(SHA2(?, 256)) AND owner = 'o'", (name.as_str(),))
                    .await
                    .expect("delete");
            } else {
                let _: Option<i64> = conn.exec_first("SELECT GET_LOCK(?, 0)", (name.as_str(),)).await.expect("get_lock");
                let _: Option<i64> = conn.exec_first("SELECT RELEASE_LOCK(?)", (name.as_str(),)).await.expect("release_lock");
            }
        }
    })
    .await
}

/// `name`'s statement in `statements` (`bench_statements`' answer).
fn statement(statements: &[(&'static str, String)], name: &str) -> String {
    statements
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, sql)| sql.clone())
        .unwrap_or_else(|| panic!("no {name} statement in {statements:?}"))
}

const TTL: Duration = Duration::from_secs(30);

/// The statements dlock sends for one pair, through tokio-postgres without dlock, with
/// the parameters in the order `bench_statements` documents.
async fn pg_same_sql(server: &Postgres, tasks: usize, lease: bool) -> f64 {
    let url = server.url(if lease { "mode=lease" } else { "" });
    let statements = fencelock::backends::postgres::bench_statements(&url).expect("statements");
    let (acquire, release) = (
        statement(&statements, "acquire"),
        statement(&statements, "release"),
    );
    let channel = fencelock::backends::postgres::bench_channel(&url).expect("channel");
    let mut clients = Vec::new();
    for _ in 0..tasks {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                server.port()
            ),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect");
        tokio::spawn(connection);
        clients.push(Arc::new(client));
    }
    let clients = Arc::new(clients);
    let (acquire, release, channel) = (Arc::new(acquire), Arc::new(release), Arc::new(channel));
    let tag = rand::random::<u32>();
    pairs_per_second(tasks, move |task| {
        let client = Arc::clone(&clients[task]);
        let (acquire, release, channel) = (
            Arc::clone(&acquire),
            Arc::clone(&release),
            Arc::clone(&channel),
        );
        async move {
            use tokio_postgres::types::Type;
            let lock_id = 3_000_000_i64 + task as i64;
            let key = format!("tokio-postgres-{tag:x}-{task}");
            let owner = format!("owner-{task}");
            let (ttl_ms, pid, host) = (TTL.as_millis() as i64, 1_i32, "bench");
            if lease {
                let rows = client
                    .query_typed(
                        &acquire,
                        &[
                            (&key, Type::TEXT),
                            (&owner, Type::TEXT),
                            (&ttl_ms, Type::INT8),
                            (&pid, Type::INT4),
                            (&host, Type::TEXT),
                        ],
                    )
                    .await
                    .expect("acquire");
                assert!(
                    rows[0].get::<_, Option<i64>>(0).is_some(),
                    "the lease was free"
                );
                client
                    .query_typed(
                        &release,
                        &[
                            (&key, Type::TEXT),
                            (&owner, Type::TEXT),
                            (&channel.as_str(), Type::TEXT),
                        ],
                    )
                    .await
                    .expect("release");
            } else {
                let rows = client
                    .query_typed(
                        &acquire,
                        &[
                            (&lock_id, Type::INT8),
                            (&key, Type::TEXT),
                            (&owner, Type::TEXT),
                            (&ttl_ms, Type::INT8),
                            (&pid, Type::INT4),
                            (&host, Type::TEXT),
                        ],
                    )
                    .await
                    .expect("acquire");
                assert_eq!(rows.len(), 1, "the lock was free");
                client
                    .query_typed(
                        &release,
                        &[
                            (&lock_id, Type::INT8),
                            (&key, Type::TEXT),
                            (&owner, Type::TEXT),
                        ],
                    )
                    .await
                    .expect("release");
            }
        }
    })
    .await
}

/// The statements dlock sends for one pair, through mysql_async without dlock, with the
/// parameters in the order `bench_statements` documents.
async fn mysql_same_sql(server: &Mysql, tasks: usize, lease: bool) -> f64 {
    let url = format!(
        "mysql://dlock:dlock-secret@127.0.0.1:{}/dlock",
        server.port()
    );
    let mode_url = server.url(if lease { "mode=lease" } else { "" });
    let statements =
        Arc::new(fencelock::backends::mysql::bench_statements(&mode_url).expect("statements"));
    let opts = mysql_async::Opts::from_url(&url).expect("url");
    let mut conns = Vec::new();
    for _ in 0..tasks {
        conns.push(Arc::new(tokio::sync::Mutex::new(
            mysql_async::Conn::new(opts.clone()).await.expect("connect"),
        )));
    }
    let conns = Arc::new(conns);
    let tag = rand::random::<u32>();
    pairs_per_second(tasks, move |task| {
        let (conns, statements) = (Arc::clone(&conns), Arc::clone(&statements));
        async move {
            let sql = |name: &str| statement(&statements, name);
            let mut conn = conns[task].lock().await;
            let key = format!("same-{tag:x}-{task}");
            // Any 32 bytes unique to the key serve as the row key (dlock's is a SHA-256).
            let k = format!("{key:0>32}").into_bytes();
            let owner = format!("owner-{task}");
            let (ttl_us, ttl_ms, pid, host) = (
                TTL.as_micros() as i64,
                TTL.as_millis() as i64,
                1_u32,
                "bench",
            );
            if lease {
                let _: Option<Option<i64>> = conn
                    .exec_first(sql("peek"), (k.as_slice(),))
                    .await
                    .expect("peek");
                conn.exec_drop(
                    sql("claim"),
                    (
                        k.as_slice(),
                        key.as_bytes(),
                        owner.as_str(),
                        1_u64,
                        ttl_us,
                        ttl_ms,
                        pid,
                        host,
                    ),
                )
                .await
                .expect("claim");
                let mine: Option<(String, u64, bool)> = conn
                    .exec_first(sql("mine"), (k.as_slice(),))
                    .await
                    .expect("mine");
                assert!(
                    mine.is_some_and(|(o, _, live)| o == owner && live),
                    "the lease was free"
                );
                conn.exec_drop(sql("release"), (k.as_slice(), owner.as_str()))
                    .await
                    .expect("release");
            } else {
                let got: Option<i64> = conn
                    .exec_first(sql("get_lock"), (key.as_str(), 0))
                    .await
                    .expect("get_lock");
                assert_eq!(got, Some(1), "the lock was free");
                conn.query_drop(sql("bump")).await.expect("bump");
                conn.exec_drop(
                    sql("record"),
                    (
                        k.as_slice(),
                        key.as_bytes(),
                        key.as_str(),
                        owner.as_str(),
                        ttl_ms,
                        pid,
                        host,
                    ),
                )
                .await
                .expect("record");
                let _: Option<i64> = conn
                    .exec_first(sql("release_lock"), (key.as_str(),))
                    .await
                    .expect("release_lock");
                conn.exec_drop(sql("forget"), (k.as_slice(), owner.as_str()))
                    .await
                    .expect("forget");
            }
        }
    })
    .await
}

/// Median and 99th percentile of the release-to-grant time with 16 waiters on 16 handles.
async fn handoff(url: &str) -> (Duration, Duration, usize) {
    const WAITERS: usize = 16;
    let key = format!("handoff-{:x}", rand::random::<u32>());
    let base = Instant::now();
    let released_at = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let limit = run_for().max(Duration::from_secs(2));
    let mut tasks = Vec::new();
    for _ in 0..WAITERS {
        let locks = fencelock::connect(url).await.expect("connect");
        let (key, released_at, samples) =
            (key.clone(), Arc::clone(&released_at), Arc::clone(&samples));
        tasks.push(tokio::spawn(async move {
            while base.elapsed() < limit {
                let Ok(lease) = locks
                    .lock(&key)
                    .wait_for(Duration::from_secs(10))
                    .acquire()
                    .await
                else {
                    continue;
                };
                let granted = base.elapsed().as_nanos() as u64;
                let released = released_at.load(Ordering::SeqCst);
                if released > 0 {
                    samples
                        .lock()
                        .unwrap()
                        .push(Duration::from_nanos(granted.saturating_sub(released)));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                released_at.store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
                let _ = lease.release().await;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let mut samples = samples.lock().unwrap().clone();
    samples.sort();
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO, 0);
    }
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), samples.len())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pg = Postgres::start(false);
    let my = Mysql::start(false);
    let session_script = pgbench::script(&pg.url("")).expect("the session script");
    let lease_script = pgbench::script(&pg.url("mode=lease")).expect("the lease script");
    runtime.block_on(async {
        // Create the schemas before the baselines use the tables.
        for url in [pg.url(""), pg.url("mode=lease"), my.url(""), my.url("mode=lease")] {
            fencelock::connect(&url).await.expect("connect");
        }
        println!("| database | mode | tasks | dlock pairs/s | baseline (same run) | baseline pairs/s | dlock / baseline |");
        println!("|---|---|---:|---:|---|---:|---:|");
        let row = |db: &str, mode: &str, tasks: usize, ours: f64, what: &str, base: f64| {
            println!("| {db} | {mode} | {tasks} | {ours:.0} | {what} | {base:.0} | {:.2} |", ours / base);
        };
        for tasks in [1, 32] {
            let ours = dlock_pairs(&pg.url(""), tasks).await;
            let same = pgbench(&pg, &session_script, tasks);
            row("PostgreSQL", "session", tasks, ours, "pgbench, dlock's SQL", same);
            let same = pg_same_sql(&pg, tasks, false).await;
            row("PostgreSQL", "session", tasks, ours, "tokio-postgres, dlock's SQL", same);
            let bare = pgbench(&pg, pgbench::BARE, tasks);
            row("PostgreSQL", "session", tasks, ours, "pgbench, bare advisory lock/unlock", bare);
            let ours = dlock_pairs(&pg.url("mode=lease"), tasks).await;
            let same = pgbench(&pg, &lease_script, tasks);
            row("PostgreSQL", "lease", tasks, ours, "pgbench, dlock's SQL", same);
            let same = pg_same_sql(&pg, tasks, true).await;
            row("PostgreSQL", "lease", tasks, ours, "tokio-postgres, dlock's SQL", same);
            let ours = dlock_pairs(&my.url(""), tasks).await;
            let same = mysql_same_sql(&my, tasks, false).await;
            row("MariaDB", "session", tasks, ours, "mysql_async, dlock's SQL", same);
            let bare = mysql_bare(&my, tasks, false).await;
            row("MariaDB", "session", tasks, ours, "mysql_async, bare GET_LOCK/RELEASE_LOCK", bare);
            let ours = dlock_pairs(&my.url("mode=lease"), tasks).await;
            let same = mysql_same_sql(&my, tasks, true).await;
            row("MariaDB", "lease", tasks, ours, "mysql_async, dlock's SQL", same);
            let bare = mysql_bare(&my, tasks, true).await;
            row("MariaDB", "lease", tasks, ours, "mysql_async, bare INSERT/DELETE", bare);
        }
        println!();
        println!("| database | mode | hand-off median | hand-off p99 | hand-offs (16 waiters on 16 handles) |");
        println!("|---|---|---:|---:|---:|");
        for (db, mode, url) in [
            ("PostgreSQL", "session", pg.url("")),
            ("PostgreSQL", "lease", pg.url("mode=lease")),
            ("MariaDB", "session", my.url("")),
            ("MariaDB", "lease", my.url("mode=lease")),
        ] {
            let (median, p99, n) = handoff(&url).await;
            println!("| {db} | {mode} | {median:.2?} | {p99:.2?} | {n} |");
        }
    });
}
