//! Lock+unlock pairs per second through dlock on PostgreSQL and MariaDB, in both modes,
//! at 1 and 32 concurrent tasks (each on its own key, sharing one `Locks` handle), beside
//! the same SQL run without dlock in the same run:
//! - PostgreSQL: `pgbench` with scripts holding exactly the statements dlock sends, plus
//!   the bare `pg_advisory_lock`/`pg_advisory_unlock` pair;
//! - MariaDB (no pgbench): dlock's statements, the bare `GET_LOCK`/`RELEASE_LOCK` pair and
//!   the bare lease-row `INSERT`/`DELETE` pair, through mysql_async, a connection per task.
//!
//! Then the hand-off latency: 16 waiters on 16 handles contend for one key; each new
//! holder measures the time from the previous holder's release call to its own grant.
//!
//! Starts private servers (fsync off, like the conformance tests). Run with
//! `cargo bench --bench sql`; `DLOCK_BENCH_SECS` sets the seconds per figure (default 3).

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
    let locks = dlock::connect(url).await.expect("connect");
    let tag = format!("bench-{:x}", rand::random::<u32>());
    pairs_per_second(tasks, move |task| {
        let (locks, key) = (locks.clone(), format!("{tag}-{task}"));
        async move {
            let lease = locks.lock(&key).acquire().await.expect("acquire");
            assert!(lease.release().await.expect("release"));
        }
    })
    .await
}

const PG_SESSION_SCRIPT: &str = r"\set id :client_id + 1000000
WITH l AS (SELECT pg_advisory_lock(:id))
INSERT INTO dlock_sessions AS h (key, lock_id, owner, fence, backend_pid, acquired_at, renewed_at, ttl_ms, pid, host)
SELECT 'pgbench-' || (:id)::text, :id, md5(random()::text), nextval('dlock_fence_seq'), pg_backend_pid(), clock_timestamp(), clock_timestamp(), 30000, 1, 'bench' FROM l
ON CONFLICT (key) DO UPDATE SET lock_id = excluded.lock_id, owner = excluded.owner, fence = excluded.fence,
    backend_pid = excluded.backend_pid, acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at,
    ttl_ms = excluded.ttl_ms, pid = excluded.pid, host = excluded.host
RETURNING fence;
WITH d AS (DELETE FROM dlock_sessions WHERE key = 'pgbench-' || (:id)::text AND backend_pid = pg_backend_pid() RETURNING 1)
SELECT pg_advisory_unlock(:id), (SELECT count(*) FROM d);
";

const PG_LEASE_SCRIPT: &str = r"\set id :client_id + 1000000
WITH ins AS (
    INSERT INTO dlock_leases AS l (key, owner, fence, expires_at, acquired_at, renewed_at, ttl_ms, pid, host)
    VALUES ('pgbench-' || (:id)::text, 'owner-' || (:id)::text, nextval('dlock_fence_seq'), clock_timestamp() + (30000::float8 * interval '1 millisecond'), clock_timestamp(), clock_timestamp(), 30000, 1, 'bench')
    ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, fence = nextval('dlock_fence_seq'),
        expires_at = clock_timestamp() + (30000::float8 * interval '1 millisecond'), acquired_at = clock_timestamp(),
        renewed_at = clock_timestamp(), ttl_ms = excluded.ttl_ms, pid = excluded.pid, host = excluded.host
    WHERE l.expires_at <= clock_timestamp()
    RETURNING fence)
SELECT (SELECT fence FROM ins),
       (SELECT (extract(epoch FROM (expires_at - clock_timestamp())) * 1000)::bigint FROM dlock_leases WHERE key = 'pgbench-' || (:id)::text);
WITH d AS (UPDATE dlock_leases SET expires_at = least(expires_at, statement_timestamp()) WHERE key = 'pgbench-' || (:id)::text AND owner = 'owner-' || (:id)::text RETURNING expires_at = statement_timestamp() AS live)
SELECT live, pg_notify('dlock' || chr(58) || 'dlock_leases', 'pgbench-' || (:id)::text)::text FROM d;
";

const PG_BARE_SCRIPT: &str = r"\set id :client_id + 2000000
SELECT pg_advisory_lock(:id);
SELECT pg_advisory_unlock(:id);
";

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

/// The statements dlock sends for one pair, through mysql_async without dlock.
async fn mysql_same_sql(server: &Mysql, tasks: usize, lease: bool) -> f64 {
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
            let key = format!("same-{task}");
            let owner = format!("owner-{task}");
            if lease {
                let _: Option<Option<i64>> = conn
                    .exec_first(
                        "SELECT TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at) FROM dlock_leases WHERE k = UNHEX(SHA2(?, 256))",
                        (key.as_str(),),
                    )
                    .await
                    .expect("peek");
                conn.query_drop("START TRANSACTION").await.expect("begin");
                conn.query_drop("UPDATE dlock_fence_counter SET fence = LAST_INSERT_ID(fence + 1) WHERE id = 1")
                    .await
                    .expect("bump");
                conn.exec_drop(
                    "INSERT INTO dlock_leases (k, key_text, owner, fence, expires_at, acquired_at, renewed_at, ttl_ms, pid, host) \
                     VALUES (UNHEX(SHA2(?, 256)), ?, ?, LAST_INSERT_ID(), UTC_TIMESTAMP(6) + INTERVAL 30 SECOND, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 30000, 1, 'b') \
                     ON DUPLICATE KEY UPDATE owner = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(owner), owner), \
                     fence = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(fence), fence), \
                     expires_at = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(expires_at), expires_at)",
                    (key.as_str(), key.as_str(), owner.as_str()),
                )
                .await
                .expect("insert");
                let _: Option<(String, u64, bool)> = conn
                    .exec_first(
                        "SELECT owner, fence, expires_at > UTC_TIMESTAMP(6) FROM dlock_leases WHERE k = UNHEX(SHA2(?, 256)) FOR UPDATE",
                        (key.as_str(),),
                    )
                    .await
                    .expect("mine");
                conn.query_drop("COMMIT").await.expect("commit");
                conn.exec_drop(
                    "DELETE FROM dlock_leases WHERE k = UNHEX(SHA2(?, 256)) AND owner = ? AND expires_at > UTC_TIMESTAMP(6)",
                    (key.as_str(), owner.as_str()),
                )
                .await
                .expect("delete");
            } else {
                let _: Option<i64> = conn.exec_first("SELECT GET_LOCK(?, 0)", (key.as_str(),)).await.expect("get_lock");
                conn.query_drop("UPDATE dlock_fence_counter SET fence = LAST_INSERT_ID(fence + 1) WHERE id = 1")
                    .await
                    .expect("bump");
                conn.exec_drop(
                    "INSERT INTO dlock_sessions (k, key_text, lock_name, owner, fence, conn_id, acquired_at, renewed_at, ttl_ms, pid, host) \
                     VALUES (UNHEX(SHA2(?, 256)), ?, ?, ?, LAST_INSERT_ID(), CONNECTION_ID(), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 30000, 1, 'b') \
                     ON DUPLICATE KEY UPDATE owner = VALUES(owner), fence = VALUES(fence), conn_id = VALUES(conn_id)",
                    (key.as_str(), key.as_str(), key.as_str(), owner.as_str()),
                )
                .await
                .expect("record");
                let _: Option<i64> = conn.exec_first("SELECT RELEASE_LOCK(?)", (key.as_str(),)).await.expect("release_lock");
                conn.exec_drop("DELETE FROM dlock_sessions WHERE k = UNHEX(SHA2(?, 256)) AND owner = ?", (key.as_str(), owner.as_str()))
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
        let locks = dlock::connect(url).await.expect("connect");
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
    runtime.block_on(async {
        // Create the schemas before the baselines use the tables.
        for url in [pg.url(""), pg.url("mode=lease"), my.url(""), my.url("mode=lease")] {
            dlock::connect(&url).await.expect("connect");
        }
        println!("| database | mode | tasks | dlock pairs/s | baseline (same run) | baseline pairs/s | dlock / baseline |");
        println!("|---|---|---:|---:|---|---:|---:|");
        let row = |db: &str, mode: &str, tasks: usize, ours: f64, what: &str, base: f64| {
            println!("| {db} | {mode} | {tasks} | {ours:.0} | {what} | {base:.0} | {:.2} |", ours / base);
        };
        for tasks in [1, 32] {
            let ours = dlock_pairs(&pg.url(""), tasks).await;
            let same = pgbench(&pg, PG_SESSION_SCRIPT, tasks);
            row("PostgreSQL", "session", tasks, ours, "pgbench, dlock's SQL", same);
            let bare = pgbench(&pg, PG_BARE_SCRIPT, tasks);
            row("PostgreSQL", "session", tasks, ours, "pgbench, bare advisory lock/unlock", bare);
            let ours = dlock_pairs(&pg.url("mode=lease"), tasks).await;
            let same = pgbench(&pg, PG_LEASE_SCRIPT, tasks);
            row("PostgreSQL", "lease", tasks, ours, "pgbench, dlock's SQL", same);
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
