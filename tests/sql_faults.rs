//! Fault tests of the PostgreSQL and MySQL backends against private servers: a holder's
//! connection killed by the server, server restarts, and abandoned waits.
#![cfg(all(feature = "postgres", feature = "mysql"))]

use dlock_testkit::proxy::Proxy;
use dlock_testkit::servers::mysql::Mysql;
use dlock_testkit::servers::postgres::Postgres;
use fencelock::backends::postgres::keys::{advisory_key, pg_locks_halves};
use fencelock::{Error, Locks, LossReason};
use mysql_async::prelude::Queryable;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

const PROMPTLY: Duration = Duration::from_secs(10);

async fn within<T>(limit: Duration, what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: did not happen within {limit:?}"),
    }
}

fn key(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

async fn pg_admin(server: &Postgres) -> tokio_postgres::Client {
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", server.port());
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn my_admin(server: &Mysql) -> mysql_async::Conn {
    let url = format!(
        "mysql://dlock:dlock-secret@127.0.0.1:{}/dlock",
        server.port()
    );
    mysql_async::Conn::new(mysql_async::Opts::from_url(&url).unwrap())
        .await
        .unwrap()
}

/// The server pids holding or waiting for `key`'s advisory lock.
async fn pg_lockers(admin: &tokio_postgres::Client, key: &str, granted: bool) -> Vec<i32> {
    let (classid, objid) = pg_locks_halves(advisory_key(key));
    admin
        .query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND classid = $1 AND objid = $2 AND granted = $3",
            &[&classid, &objid, &granted],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn pg_dlock_connections(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dlock-drop100'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn my_connections(admin: &mut mysql_async::Conn) -> u64 {
    let n: Option<u64> = admin
        .query_first("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'drop100'")
        .await
        .unwrap();
    n.unwrap_or(0)
}

/// The `GET_LOCK` name of `key` for a URL of the test database `dlock`.
fn my_lock_name(key: &str) -> String {
    fencelock::backends::mysql::lock_name("dlock.dlock_fence_counter", key)
}

async fn my_waiting_get_lock(admin: &mut mysql_async::Conn) -> u64 {
    let n: Option<u64> = admin
        .query_first("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'drop100' AND INFO LIKE 'SELECT GET_LOCK%'")
        .await
        .unwrap();
    n.unwrap_or(0)
}

/// A holder whose connection is killed by the server loses its lease at once, and a
/// waiter gets the lock with a higher fence.
async fn killed_connection_fires_lost(
    locks: &Locks,
    waiter: &Locks,
    kill: impl std::future::Future<Output = ()>,
    k: &str,
) {
    let lease = locks.lock(k).acquire().await.unwrap();
    let waiting = tokio::spawn({
        let (waiter, k) = (waiter.clone(), k.to_owned());
        async move { waiter.lock(&k).acquire().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the waiter got a held lock");
    let started = Instant::now();
    kill.await;
    let reason = within(
        PROMPTLY,
        "lost() after the connection was killed",
        lease.lost(),
    )
    .await;
    assert!(
        matches!(reason, LossReason::SessionEnded { .. }),
        "{reason:?}"
    );
    eprintln!("lost() {:?} after the kill: {reason}", started.elapsed());
    let next = within(PROMPTLY, "the waiter's acquire", waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(next.fence() > lease.fence());
    assert!(!lease.release().await.unwrap());
    assert!(next.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_terminate_backend_fires_lost_and_lets_a_waiter_in() {
    let server = Postgres::shared();
    let admin = pg_admin(server).await;
    let url = server.url("");
    let (locks, waiter) = (
        fencelock::connect(&url).await.unwrap(),
        fencelock::connect(&url).await.unwrap(),
    );
    let k = key("terminate");
    let kill = async {
        let pids = pg_lockers(&admin, &k, true).await;
        assert_eq!(pids.len(), 1, "{pids:?}");
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&pids[0]])
            .await
            .unwrap();
    };
    killed_connection_fires_lost(&locks, &waiter, kill, &k).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_kill_fires_lost_and_lets_a_waiter_in() {
    let server = Mysql::shared();
    let mut admin = my_admin(server).await;
    let url = server.url("");
    let (locks, waiter) = (
        fencelock::connect(&url).await.unwrap(),
        fencelock::connect(&url).await.unwrap(),
    );
    let k = key("kill");
    let kill = async {
        let id: Option<Option<u64>> = admin
            .exec_first("SELECT IS_USED_LOCK(?)", (my_lock_name(&k),))
            .await
            .unwrap();
        let id = id.flatten().expect("the lock is not held");
        admin
            .query_drop(format!("KILL CONNECTION {id}"))
            .await
            .unwrap();
    };
    killed_connection_fires_lost(&locks, &waiter, kill, &k).await;
}

async fn in_blocking(work: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(work).await.unwrap();
}

/// Session mode: a restart ends the holding session (lost fires); lease mode: a restart
/// shorter than the TTL keeps the lease, an outage longer than the TTL loses it. Fences
/// after the restart are greater than before in every case.
async fn restart_checks(
    url_session: String,
    url_lease: String,
    stop: impl Fn() + Send + Sync + Clone + 'static,
    start: impl Fn() + Send + Sync + Clone + 'static,
) {
    let session = fencelock::connect(&url_session).await.unwrap();
    let lease_locks = fencelock::connect(&url_lease).await.unwrap();
    let (ks, kl, kx) = (key("restart-s"), key("restart-l"), key("restart-x"));
    let held = session.lock(&ks).acquire().await.unwrap();
    let kept = lease_locks
        .lock(&kl)
        .ttl(Duration::from_secs(20))
        .acquire()
        .await
        .unwrap();
    let short = lease_locks
        .lock(&kx)
        .ttl(Duration::from_millis(1500))
        .acquire()
        .await
        .unwrap();
    let before = held.fence().max(kept.fence()).max(short.fence());

    let (stop2, start2) = (stop.clone(), start.clone());
    in_blocking(stop2).await;
    let reason = within(
        PROMPTLY,
        "session lease lost() at the server's stop",
        held.lost(),
    )
    .await;
    assert!(
        matches!(reason, LossReason::SessionEnded { .. }),
        "{reason:?}"
    );
    let reason = within(
        PROMPTLY,
        "short lease lost() during the outage",
        short.lost(),
    )
    .await;
    assert!(
        matches!(reason, LossReason::RenewalFailed { .. }),
        "{reason:?}"
    );
    in_blocking(start2).await;

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !kept.is_lost(),
        "a lease whose outage was shorter than its TTL was reported lost"
    );
    let other = fencelock::connect(&url_lease).await.unwrap();
    assert!(
        other.lock(&kl).try_acquire().await.unwrap().is_none(),
        "the kept lease was free after the restart"
    );
    assert!(kept.release().await.unwrap());
    // A lost lease keeps its handle's local turn on the key until it is dropped.
    assert!(!held.release().await.unwrap());
    assert!(!short.release().await.unwrap());

    let again = session
        .lock(&ks)
        .wait_for(PROMPTLY)
        .acquire()
        .await
        .unwrap();
    assert!(
        again.fence() > before,
        "session fence {} after {before}",
        again.fence()
    );
    let again_l = other.lock(&kl).wait_for(PROMPTLY).acquire().await.unwrap();
    assert!(
        again_l.fence() > before,
        "lease fence {} after {before}",
        again_l.fence()
    );
    let again_x = other.lock(&kx).wait_for(PROMPTLY).acquire().await.unwrap();
    assert!(again_x.fence() > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_restart_fires_lost_and_fences_keep_increasing() {
    let server: &'static Postgres = dlock_testkit::servers::until_exit(Postgres::start(true));
    restart_checks(
        server.url(""),
        server.url("mode=lease"),
        move || server.stop(),
        move || server.launch(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_restart_fires_lost_and_fences_keep_increasing() {
    let server: &'static Mysql = dlock_testkit::servers::until_exit(Mysql::start(true));
    restart_checks(
        server.url(""),
        server.url("mode=lease"),
        move || server.stop(),
        move || server.launch(),
    )
    .await;
}

/// Spawns 100 waiting acquires on held `k` over 4 handles, drops them, and releases.
async fn drop_100_waiters(url: &str, k: &str) {
    let holder = fencelock::connect(url).await.unwrap();
    let lease = holder.lock(k).acquire().await.unwrap();
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(fencelock::connect(url).await.unwrap());
    }
    let mut waiters = Vec::new();
    for i in 0..100 {
        let (locks, k) = (handles[i % 4].clone(), k.to_owned());
        waiters.push(tokio::spawn(async move { locks.lock(&k).acquire().await }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for waiter in &waiters {
        waiter.abort();
    }
    for waiter in waiters {
        assert!(
            waiter.await.unwrap_err().is_cancelled(),
            "a waiter acquired a held lock"
        );
    }
    assert!(lease.release().await.unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fresh = fencelock::connect(url).await.unwrap();
    assert!(
        fresh.status(k).await.unwrap().is_none(),
        "a dropped waiter holds the lock"
    );
    let after = fresh
        .lock(k)
        .try_acquire()
        .await
        .unwrap()
        .expect("the key is not free");
    after.release().await.unwrap();
    drop(handles);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_dropping_100_waiters_leaks_no_lock_and_no_connection() {
    let server = Postgres::shared();
    let admin = pg_admin(server).await;
    for query in ["", "mode=lease"] {
        let k = key("drop100");
        // A name of its own, so that the other tests' connections are not counted.
        let url = server.url(query);
        let url = format!(
            "{url}{}application_name=dlock-drop100",
            if query.is_empty() { "?" } else { "&" }
        );
        let before = pg_dlock_connections(&admin).await;
        assert_eq!(before, 0);
        drop_100_waiters(&url, &k).await;
        let deadline = Instant::now() + PROMPTLY;
        loop {
            let waiting = pg_lockers(&admin, &k, false).await;
            let granted = pg_lockers(&admin, &k, true).await;
            let now = pg_dlock_connections(&admin).await;
            if waiting.is_empty() && granted.is_empty() && now <= before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{query}: waiting {waiting:?}, granted {granted:?}, dlock connections {now} (before {before})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_dropping_100_waiters_leaks_no_lock_and_no_connection() {
    let server = Mysql::shared();
    let mut admin = my_admin(server).await;
    for query in ["", "mode=lease"] {
        let k = key("drop100");
        // A user of its own, so that the other tests' connections are not counted.
        admin
            .query_drop(
                "CREATE USER IF NOT EXISTS 'drop100'@'%' IDENTIFIED BY 'drop-secret'; \
                 GRANT ALL ON dlock.* TO 'drop100'@'%'",
            )
            .await
            .unwrap();
        let url = server
            .url(query)
            .replace("dlock:dlock-secret@", "drop100:drop-secret@");
        let before = my_connections(&mut admin).await;
        assert_eq!(before, 0);
        drop_100_waiters(&url, &k).await;
        let deadline = Instant::now() + PROMPTLY;
        loop {
            let waiting = my_waiting_get_lock(&mut admin).await;
            let used: Option<Option<u64>> = admin
                .exec_first("SELECT IS_USED_LOCK(?)", (my_lock_name(&k),))
                .await
                .unwrap();
            let now = my_connections(&mut admin).await;
            if waiting == 0 && used.flatten().is_none() && now <= before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{query}: {waiting} GET_LOCK waiting, held by {used:?}, dlock connections {now} (before {before})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_name_the_problem_without_the_password() {
    for url in [
        "postgres://u:hunter2@127.0.0.1:1/db?mode=sessions",
        "postgres://u:hunter2@127.0.0.1:1/db?table=x;drop",
        "mysql://u:hunter2@127.0.0.1:1/db?nope=1",
    ] {
        let err = fencelock::connect(url).await.unwrap_err();
        assert!(matches!(err, Error::BadUrl { .. }), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
    for url in [
        "postgres://u:hunter2@127.0.0.1:1/db",
        "mysql://u:hunter2@127.0.0.1:1/db",
    ] {
        let err = fencelock::connect(url).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dlock"))
        .args(args)
        .output()
        .expect("cannot run dlock")
}

/// `dlock run`, `status`, `list` and `release --force` from the CLI on all four
/// combinations of database and mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_run_status_list_in_both_modes_on_both_databases() {
    let (pg, my) = (Postgres::shared(), Mysql::shared());
    for url in [
        pg.url(""),
        pg.url("mode=lease"),
        my.url(""),
        my.url("mode=lease"),
    ] {
        let k = key("cli");
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_dlock"))
            .args([
                "run",
                &k,
                "--backend",
                &url,
                "--ttl",
                "2s",
                "--",
                "sh",
                "-c",
                "echo $DLOCK_FENCE; sleep 3",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            let out = cli(&["status", &k, "--backend", &url, "--json"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains("\"fence\"") {
                break text;
            }
            assert!(started.elapsed() < PROMPTLY, "{url}: never held: {text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.contains(&k), "{url}: {status}");
        let list = cli(&["list", "--backend", &url, "--json"]);
        assert!(
            String::from_utf8_lossy(&list.stdout).contains(&k),
            "{url}: {list:?}"
        );
        let human = cli(&["status", &k, "--backend", &url]);
        assert!(human.status.success(), "{url}: {human:?}");
        eprintln!(
            "{}:\n{}",
            fencelock::redact(&url),
            String::from_utf8_lossy(&human.stdout)
        );
        let busy = cli(&["run", &k, "--backend", &url, "--no-wait", "--", "true"]);
        assert_eq!(busy.status.code(), Some(75), "{url}: {busy:?}");
        let out = run.wait_with_output().unwrap();
        assert!(out.status.success(), "{url}: {out:?}");
        let fence: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(fence > 0);
        let after = cli(&["status", &k, "--backend", &url, "--json"]);
        assert!(
            !String::from_utf8_lossy(&after.stdout).contains("\"fence\""),
            "{url}: {after:?}"
        );
        let bad = cli(&[
            "status",
            &k,
            "--backend",
            &url.replace("dlock-secret", "wrong-secret"),
        ]);
        if url.starts_with("mysql") {
            assert_eq!(bad.status.code(), Some(69), "{url}: {bad:?}");
            assert!(
                !String::from_utf8_lossy(&bad.stderr).contains("wrong-secret"),
                "{bad:?}"
            );
        }
    }
}

/// A role that may not run DDL cannot create the lease table (a clear error); after an
/// administrator runs `dlock schema`'s SQL and grants the documented privileges, it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_schema_by_an_administrator_for_a_role_without_ddl() {
    let server = Postgres::shared();
    let admin = pg_admin(server).await;
    let table = format!("limited_{:x}", rand::random::<u32>());
    admin
        .batch_execute("DO $$ BEGIN CREATE ROLE limited LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        .await
        .unwrap();
    let url = format!(
        "postgres://limited@127.0.0.1:{}/postgres?mode=lease&table={table}",
        server.port()
    );
    let err = fencelock::connect(&url).await.unwrap_err();
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    assert!(
        err.to_string().contains("cannot create the dlock schema"),
        "{err}"
    );

    let out = cli(&["schema", "--backend", &url]);
    assert!(out.status.success(), "{out:?}");
    let sql = String::from_utf8(out.stdout).unwrap();
    admin.batch_execute(&sql).await.unwrap();
    admin
        .batch_execute(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {table}, {table}_holders TO limited; GRANT USAGE ON SEQUENCE dlock_fence_seq TO limited"
        ))
        .await
        .unwrap();
    let locks = fencelock::connect(&url).await.unwrap();
    let k = key("limited");
    let lease = locks.lock(&k).acquire().await.unwrap();
    let first = lease.fence();
    let waiter = tokio::spawn({
        let (locks, k) = (fencelock::connect(&url).await.unwrap(), k.clone());
        async move { locks.lock(&k).acquire().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(lease.release().await.unwrap());
    let next = within(PROMPTLY, "hand-off under the limited role", waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(next.fence() > first);
    assert_eq!(
        locks.status(&k).await.unwrap().unwrap().owner.as_deref(),
        Some(next.owner())
    );
}

/// Rows of expired, never released leases are swept on PostgreSQL: the lease table does
/// not grow with keys that are no longer held. (MySQL keeps one row per key, which carries
/// the key's fence: see docs/backends/mysql.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_rows_are_swept() {
    let pg = Postgres::shared();
    let tag = key("swept");
    let url = pg.url("mode=lease");
    let locks = fencelock::connect(&url).await.unwrap();
    for i in 0..20 {
        let lease = locks
            .lock(format!("{tag}-{i}"))
            .ttl(Duration::from_millis(100))
            .auto_renew(false)
            .acquire()
            .await
            .unwrap();
        std::mem::forget(lease); // a holder that vanished without releasing
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // PostgreSQL sweeps rows only minutes after their expiry: age these.
    pg_admin(pg)
        .await
        .execute(
            "UPDATE dlock_leases SET expires_at = expires_at - interval '1 hour' WHERE key LIKE $1",
            &[&format!("{tag}-%")],
        )
        .await
        .unwrap();
    // A new handle sweeps at its first acquire.
    let fresh = fencelock::connect(&url).await.unwrap();
    let lease = fresh.lock(key("trigger")).acquire().await.unwrap();
    lease.release().await.unwrap();
    let deadline = Instant::now() + PROMPTLY;
    loop {
        let admin = pg_admin(pg).await;
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM dlock_leases WHERE key LIKE $1",
                &[&format!("{tag}-%")],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} expired rows left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the contenders of one key saw: the fences granted, in grant order, and every
/// grant that broke mutual exclusion or fence order.
#[derive(Default)]
struct Grants {
    fences: Vec<u64>,
    problems: Vec<String>,
}

/// `handles` tasks, each on its own handle, acquire `k` `per_task` times each with `ttl`
/// (holding it for `hold`), checking at each grant that no one else is inside and that the fence
/// is greater than every fence granted before.
async fn contend(
    handles: &[fencelock::Locks],
    k: &str,
    per_task: usize,
    ttl: Duration,
    hold: Duration,
    grants: &std::sync::Arc<std::sync::Mutex<Grants>>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let inside = std::sync::Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, locks) in handles.iter().enumerate() {
        let (locks, k, inside, grants) =
            (locks.clone(), k.to_owned(), inside.clone(), grants.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_task {
                let lease = locks
                    .lock(&k)
                    .ttl(ttl)
                    .auto_renew(false)
                    .backoff(Duration::from_millis(1), Duration::from_millis(20))
                    .wait_for(Duration::from_secs(60))
                    .acquire()
                    .await
                    .unwrap();
                let fence = lease.fence();
                {
                    let mut g = grants.lock().unwrap();
                    if inside.swap(true, Ordering::SeqCst) {
                        g.problems
                            .push(format!("task {i}: granted fence {fence} while held"));
                    }
                    if let Some(&last) = g.fences.last() {
                        if fence <= last {
                            g.problems.push(format!(
                                "task {i}: fence {fence} granted after fence {last}"
                            ));
                        }
                    }
                    g.fences.push(fence);
                }
                if !hold.is_zero() {
                    tokio::time::sleep(hold).await;
                }
                inside.store(false, Ordering::SeqCst);
                if !lease.release().await.unwrap() {
                    grants.lock().unwrap().problems.push(format!(
                        "task {i}: the lease of fence {fence} had ended before its release"
                    ));
                }
            }
        }));
    }
    for task in tasks {
        within(Duration::from_secs(120), "the contenders", task)
            .await
            .unwrap();
    }
}

async fn lease_handles(url: &str, n: usize) -> Vec<fencelock::Locks> {
    let mut handles = Vec::new();
    for _ in 0..n {
        handles.push(fencelock::connect(url).await.unwrap());
    }
    handles
}

/// Regression: many waiters of a lease whose holder vanished (its row expires unreleased)
/// race for it; exactly one wins at a time, and fences increase in grant order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_expired_holder_many_waiters_one_winner() {
    let (pg, my) = (Postgres::shared(), Mysql::shared());
    for url in [pg.url("mode=lease"), my.url("mode=lease")] {
        let handles = lease_handles(&url, 12).await;
        let k = key("expired-race");
        let grants = std::sync::Arc::new(std::sync::Mutex::new(Grants::default()));
        for _round in 0..6 {
            let leaked = handles[0]
                .lock(&k)
                .ttl(Duration::from_millis(300))
                .auto_renew(false)
                .wait_for(Duration::from_secs(30))
                .acquire()
                .await
                .unwrap();
            {
                let mut g = grants.lock().unwrap();
                if let Some(&last) = g.fences.last() {
                    if leaked.fence() <= last {
                        g.problems.push(format!(
                            "leaked holder: fence {} granted after fence {last}",
                            leaked.fence()
                        ));
                    }
                }
                g.fences.push(leaked.fence());
            }
            std::mem::forget(leaked); // a holder killed without releasing
            contend(
                &handles,
                &k,
                1,
                Duration::from_secs(10),
                Duration::from_millis(3),
                &grants,
            )
            .await;
        }
        let g = grants.lock().unwrap();
        assert!(g.problems.is_empty(), "{url}: {:#?}", g.problems);
        assert_eq!(g.fences.len(), 6 * 13);
    }
}

/// Regression: release/acquire churn on one key by many handles; every grant's fence is
/// greater than every fence granted before it (PostgreSQL granted a fence taken before a
/// concurrent grant when a release deleted the row the acquire was waiting on).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_release_churn_grants_increasing_fences() {
    let (pg, my) = (Postgres::shared(), Mysql::shared());
    for url in [pg.url("mode=lease"), my.url("mode=lease")] {
        let handles = lease_handles(&url, 16).await;
        let k = key("churn");
        let grants = std::sync::Arc::new(std::sync::Mutex::new(Grants::default()));
        contend(
            &handles,
            &k,
            40,
            Duration::from_secs(10),
            Duration::ZERO,
            &grants,
        )
        .await;
        let g = grants.lock().unwrap();
        assert!(g.problems.is_empty(), "{url}: {:#?}", g.problems);
        assert_eq!(g.fences.len(), 16 * 40);
    }
}

/// Regression: MySQL stamps `UTC_TIMESTAMP(6)` at the start of a statement. An acquire
/// whose `INSERT … ON DUPLICATE KEY UPDATE` waited for the row lock longer than the TTL
/// judged the row by, and stamped its new expiry from, the time it started waiting: it
/// committed a lease already expired, and the next acquirer took it over at once, so two
/// acquirers were granted the lock microseconds apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_lease_acquire_that_waited_on_the_row_is_not_granted_expired() {
    use sha2::Digest;
    let my = Mysql::shared();
    let url = my.url("mode=lease");
    let handles = lease_handles(&url, 6).await;
    let grants = std::sync::Arc::new(std::sync::Mutex::new(Grants::default()));
    for _round in 0..3 {
        let k = key("row-wait");
        let leaked = handles[0]
            .lock(&k)
            .ttl(Duration::from_millis(300))
            .auto_renew(false)
            .acquire()
            .await
            .unwrap();
        grants.lock().unwrap().fences.push(leaked.fence());
        std::mem::forget(leaked); // a holder killed without releasing
                                  // Something else holds the row lock for longer than the TTL (as a stalled
                                  // connection would), while the waiters find the lease expired.
        let mut admin = my_admin(my).await;
        admin.query_drop("START TRANSACTION").await.unwrap();
        admin
            .exec_drop(
                "SELECT k FROM dlock_leases WHERE k = ? FOR UPDATE",
                (sha2::Sha256::digest(k.as_bytes()).to_vec(),),
            )
            .await
            .unwrap();
        let release_row = async {
            tokio::time::sleep(Duration::from_millis(1300)).await;
            admin.query_drop("COMMIT").await.unwrap();
        };
        let ((), ()) = tokio::join!(
            release_row,
            contend(
                &handles,
                &k,
                1,
                Duration::from_millis(800),
                Duration::from_millis(20),
                &grants
            )
        );
    }
    let g = grants.lock().unwrap();
    assert!(g.problems.is_empty(), "{:#?}", g.problems);
}

/// `url` with its server's port replaced by the proxy's.
fn via(url: &str, server_port: u16, proxy: &Proxy) -> String {
    url.replace(
        &format!("127.0.0.1:{server_port}/"),
        &format!("127.0.0.1:{}/", proxy.port()),
    )
}

/// A session lease held through a slow link that then stalls survives the stall; when
/// its session is then killed from outside, `lost()` fires within seconds and a waiter
/// (on a direct connection) is admitted only after the kill, with a higher fence.
///
/// The window: the server frees a killed session's lock at once, and the waiter can be
/// admitted before the holder hears of the kill (PostgreSQL: when the server's close
/// reaches the holder's connection, one round trip through the proxy; MySQL: at the next
/// liveness check on the administrative connection, every 500 ms plus its round trip).
/// No client can close that window, because the holder learns of the kill only from the
/// server; the fence, which the waiter gets higher, is what protects the resource in it.
async fn stalled_then_killed(
    direct: &str,
    proxied: &str,
    proxy: &Proxy,
    k: &str,
    kill: impl std::future::Future<Output = ()>,
) {
    proxy.set_latency(Duration::from_millis(50));
    let holder = fencelock::connect(proxied).await.unwrap();
    let lease = holder
        .lock(k)
        .ttl(Duration::from_secs(3))
        .acquire()
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let (waiter, k) = (fencelock::connect(direct).await.unwrap(), k.to_owned());
        async move {
            let lease = waiter
                .lock(&k)
                .wait_for(Duration::from_secs(30))
                .acquire()
                .await;
            (Instant::now(), lease)
        }
    });
    proxy.freeze_for(Duration::from_millis(1500)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !lease.is_lost(),
        "a stall shorter than the TTL lost the lease"
    );
    assert!(!waiting.is_finished(), "the waiter got a held lock");
    let killed_at = Instant::now();
    kill.await;
    let reason = within(
        Duration::from_secs(5),
        "lost() after the kill",
        lease.lost(),
    )
    .await;
    let lost_at = Instant::now();
    assert!(
        matches!(reason, LossReason::SessionEnded { .. }),
        "{reason:?}"
    );
    let (admitted_at, next) = within(PROMPTLY, "the waiter's acquire", waiting)
        .await
        .unwrap();
    let next = next.unwrap();
    assert!(
        admitted_at > killed_at,
        "the waiter was admitted before the kill"
    );
    assert!(next.fence() > lease.fence());
    eprintln!(
        "after the kill: holder lost at {:?}, waiter admitted at {:?}",
        lost_at - killed_at,
        admitted_at - killed_at
    );
    assert!(!lease.release().await.unwrap());
    assert!(next.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_session_through_a_stalled_link_then_killed() {
    let server = Mysql::shared();
    let proxy = Proxy::start(server.port()).await;
    let direct = server.url("");
    let proxied = via(&direct, server.port(), &proxy);
    let mut admin = my_admin(server).await;
    let k = key("stall-kill");
    let kill = async {
        let id: Option<Option<u64>> = admin
            .exec_first("SELECT IS_USED_LOCK(?)", (my_lock_name(&k),))
            .await
            .unwrap();
        let id = id.flatten().expect("the lock is not held");
        admin.query_drop(format!("KILL {id}")).await.unwrap();
    };
    stalled_then_killed(&direct, &proxied, &proxy, &k, kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_session_through_a_stalled_link_then_terminated() {
    let server = Postgres::shared();
    let proxy = Proxy::start(server.port()).await;
    let direct = server.url("");
    let proxied = via(&direct, server.port(), &proxy);
    let admin = pg_admin(server).await;
    let k = key("stall-terminate");
    let kill = async {
        let pids = pg_lockers(&admin, &k, true).await;
        assert_eq!(pids.len(), 1, "{pids:?}");
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&pids[0]])
            .await
            .unwrap();
    };
    stalled_then_killed(&direct, &proxied, &proxy, &k, kill).await;
}

/// Against a frozen link, an attempt that does not wait fails with a typed, transient
/// error soon after its (immediate) deadline, in both modes on both databases.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_wait_behind_a_frozen_link_fails_promptly_with_a_typed_error() {
    let (pg, my) = (Postgres::shared(), Mysql::shared());
    for (server_url, port) in [
        (pg.url(""), pg.port()),
        (pg.url("mode=lease"), pg.port()),
        (my.url(""), my.port()),
        (my.url("mode=lease"), my.port()),
    ] {
        let proxy = Proxy::start(port).await;
        let url = via(&server_url, port, &proxy);
        let locks = fencelock::connect(&url).await.unwrap();
        let k = key("frozen");
        // A connection in the pool, so that the attempt meets a stalled open connection.
        let warm = locks
            .lock(key("warm"))
            .try_acquire()
            .await
            .unwrap()
            .unwrap();
        assert!(warm.release().await.unwrap());
        proxy.freeze();
        for no_wait in [true, false] {
            let started = Instant::now();
            let attempt = async {
                if no_wait {
                    locks.lock(&k).no_wait().acquire().await.map(Some)
                } else {
                    locks.lock(&k).try_acquire().await
                }
            };
            let outcome = within(
                Duration::from_millis(1500),
                "an attempt behind a frozen link",
                attempt,
            )
            .await;
            let err = outcome.expect_err("an attempt behind a frozen link succeeded");
            assert!(err.is_transient(), "{url}: {err:?}");
            eprintln!(
                "{}: failed after {:?}: {err}",
                fencelock::redact(&url),
                started.elapsed()
            );
        }
        proxy.thaw();
    }
}

/// A waiter without limit on PostgreSQL (session mode) keeps waiting across a restart of
/// the server: the holder's lock dies with the restart, and the waiter then acquires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_unlimited_waiter_survives_a_server_restart() {
    let server = std::sync::Arc::new(Postgres::start(true));
    let url = server.url("");
    let k = key("restart-wait");
    let holder = fencelock::connect(&url).await.unwrap();
    let lease = holder.lock(&k).acquire().await.unwrap();
    let waiting = tokio::spawn({
        let (waiter, k) = (fencelock::connect(&url).await.unwrap(), k.clone());
        async move {
            waiter
                .lock(&k)
                .wait(fencelock::Wait::Forever)
                .acquire()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the waiter got a held lock");
    let stopping = std::sync::Arc::clone(&server);
    in_blocking(move || stopping.stop()).await;
    within(PROMPTLY, "the holder's lost() at the stop", lease.lost()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "the waiter gave up while the server was down"
    );
    let starting = std::sync::Arc::clone(&server);
    in_blocking(move || starting.launch()).await;
    let next = within(
        Duration::from_secs(30),
        "the waiter's acquire after the restart",
        waiting,
    )
    .await
    .unwrap()
    .expect("the waiter returned an error instead of waiting");
    assert!(next.fence() > lease.fence());
    assert!(next.release().await.unwrap());
    drop(lease);
    drop(holder);
}
