//! Regression tests of the SQL backends' lock and fence namespaces, and of MySQL lease
//! mode under a stalled acquirer, against private servers.
#![cfg(all(feature = "postgres", feature = "mysql"))]

use dlock_testkit::servers::mysql::Mysql;
use dlock_testkit::servers::postgres::Postgres;
use dlock_testkit::unique_name;
use fencelock::Locks;
use mysql_async::prelude::Queryable;
use std::time::Duration;

/// A generous upper bound for things that must not wait on another session.
const PROMPTLY: Duration = Duration::from_secs(5);

async fn within<T>(limit: Duration, what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: did not happen within {limit:?}"),
    }
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

fn my_url(server: &Mysql, database: &str, query: &str) -> String {
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!(
        "mysql://dlock:dlock-secret@127.0.0.1:{}/{database}{query}",
        server.port()
    )
}

/// `a` and `b` are independent namespaces: the same key is held in both at once, fences
/// strictly increase in each, and force-releasing it in `b` leaves `a`'s holder alone.
async fn independent(a: &Locks, b: &Locks, key: &str) {
    let mut last = (0, 0);
    for _ in 0..3 {
        let in_a = within(PROMPTLY, "acquire in a", a.lock(key).try_acquire())
            .await
            .unwrap()
            .expect("the key was not free in the first namespace");
        let in_b = within(PROMPTLY, "acquire in b", b.lock(key).try_acquire())
            .await
            .unwrap()
            .expect("a holder in one namespace blocked the same key in another");
        assert!(
            in_a.fence() > last.0,
            "fence {} after {}",
            in_a.fence(),
            last.0
        );
        assert!(
            in_b.fence() > last.1,
            "fence {} after {}",
            in_b.fence(),
            last.1
        );
        last = (in_a.fence(), in_b.fence());
        assert!(in_b.release().await.unwrap());
        assert!(in_a.release().await.unwrap());
    }
    let in_a = a.lock(key).acquire().await.unwrap();
    let in_b = b.lock(key).acquire().await.unwrap();
    assert!(b.force_release(key).await.unwrap(), "force found nothing");
    within(PROMPTLY, "lost() of the forced holder", in_b.lost()).await;
    assert!(
        !in_a.is_lost(),
        "force-release in one namespace broke the holder in another"
    );
    let status = a
        .status(key)
        .await
        .unwrap()
        .expect("holder gone from status");
    assert_eq!(status.owner.as_deref(), Some(in_a.owner()));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!in_a.is_lost());
    assert!(in_a.release().await.unwrap());
}

/// `a` and `b` share one namespace: a holder in one excludes the other.
async fn shared(a: &Locks, b: &Locks, key: &str) {
    let held = a.lock(key).acquire().await.unwrap();
    assert!(
        b.lock(key).try_acquire().await.unwrap().is_none(),
        "two URLs sharing a fence counter did not exclude each other"
    );
    let status = b
        .status(key)
        .await
        .unwrap()
        .expect("status shows no holder");
    assert!(status.note.is_some());
    let fence = held.fence();
    assert!(held.release().await.unwrap());
    let next = b.lock(key).try_acquire().await.unwrap().expect("not freed");
    assert!(next.fence() > fence);
    assert!(next.release().await.unwrap());
}

/// Regression: PostgreSQL advisory keys hashed only the key, while the fence sequence is
/// per schema: `?table=other.locks` excluded the default table's holders and yet counted
/// its fences from 1 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_session_locks_are_per_fence_sequence() {
    let pg = Postgres::shared();
    let admin = pg.admin().await;
    let (one, two) = (unique_name("h_one"), unique_name("h_two"));
    for schema in [&one, &two] {
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
    }
    let key = unique_name("same-key");
    let a = fencelock::connect(&pg.url(&format!("table={one}.locks")))
        .await
        .unwrap();
    let b = fencelock::connect(&pg.url(&format!("table={two}.locks")))
        .await
        .unwrap();
    independent(&a, &b, &key).await;
    // The default table is in yet another namespace (public).
    let default = fencelock::connect(&pg.url("")).await.unwrap();
    independent(&default, &a, &key).await;

    // Two tables beside one sequence share it, so they share locks; so do the default
    // table and the same table named with its schema.
    let c = fencelock::connect(&pg.url(&format!("table={one}.other_locks")))
        .await
        .unwrap();
    shared(&a, &c, &key).await;
    let qualified = fencelock::connect(&pg.url("table=public.dlock_sessions"))
        .await
        .unwrap();
    shared(&default, &qualified, &key).await;

    for schema in [&one, &two] {
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
}

/// Regression: MySQL `GET_LOCK` names are server-wide while fence counters are per
/// database: a holder in one database blocked the key in another, and `release --force`
/// in the second killed the first's holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_session_locks_are_per_fence_counter() {
    let my = Mysql::shared();
    let mut admin = my_admin(my).await;
    let other = unique_name("h_db");
    admin
        .query_drop(format!("CREATE DATABASE {other}"))
        .await
        .unwrap();
    let key = unique_name("same-key");
    let a = fencelock::connect(&my.url("")).await.unwrap();
    let b = fencelock::connect(&my_url(my, &other, "")).await.unwrap();
    independent(&a, &b, &key).await;

    // The counter is beside the table: a URL of the other database naming a table of
    // the first shares the first's counter, and so its locks.
    let c = fencelock::connect(&my_url(my, &other, "table=dlock.dlock_sessions"))
        .await
        .unwrap();
    shared(&a, &c, &key).await;
    // A long key (hashed name) too.
    let long = format!("{key}-{}", "x".repeat(100));
    independent(&a, &b, &long).await;

    admin
        .query_drop(format!("DROP DATABASE {other}"))
        .await
        .unwrap();
}

/// Regression: MySQL lease mode took every fence from one counter row, locked from the
/// bump to the commit, and every connect wrote that row: one acquirer frozen mid-acquire
/// froze every acquisition and every new connection of its database for the lock-wait
/// timeout (50 s), and the error then blamed missing CREATE rights.
///
/// Also the migration from that schema: fences of keys whose rows the old code deleted
/// exceed the old counter, and those of existing rows exceed the row's fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_lease_stalled_acquirer_blocks_only_its_own_key() {
    let my = Mysql::shared();
    let mut admin = my_admin(my).await;
    let db = unique_name("h_lease");
    admin
        .query_drop(format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    // The schema an earlier version left: its counter, and a lease row of its own.
    admin
        .query_drop(format!(
            "CREATE TABLE {db}.dlock_fence_counter (id TINYINT UNSIGNED PRIMARY KEY, fence BIGINT UNSIGNED NOT NULL) ENGINE=InnoDB"
        ))
        .await
        .unwrap();
    admin
        .query_drop(format!(
            "INSERT INTO {db}.dlock_fence_counter (id, fence) VALUES (1, 1000)"
        ))
        .await
        .unwrap();
    let url = my_url(my, &db, "mode=lease");
    let first = fencelock::connect(&url).await.unwrap();
    let (old_key, stalled_key, free_key) = (
        unique_name("old"),
        unique_name("stalled"),
        unique_name("free"),
    );
    admin
        .exec_drop(
            format!(
                "INSERT INTO {db}.dlock_leases (k, key_text, owner, fence, expires_at, acquired_at, renewed_at, ttl_ms)
VALUES (UNHEX(SHA2(?, 256)), ?, 'gone', 1500, UTC_TIMESTAMP(6) - INTERVAL 1 SECOND, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 1000)"
            ),
            (old_key.as_str(), old_key.as_str()),
        )
        .await
        .unwrap();

    // A client frozen mid-acquire: its transaction holds the old counter row and the
    // row of the key it was taking.
    let mut frozen = my_admin(my).await;
    frozen.query_drop("START TRANSACTION").await.unwrap();
    let _: Vec<u64> = frozen
        .query(format!(
            "SELECT fence FROM {db}.dlock_fence_counter WHERE id = 1 FOR UPDATE"
        ))
        .await
        .unwrap();
    frozen
        .exec_drop(
            format!(
                "INSERT INTO {db}.dlock_leases (k, key_text, owner, fence, expires_at, acquired_at, renewed_at, ttl_ms)
VALUES (UNHEX(SHA2(?, 256)), ?, 'frozen', 1001, UTC_TIMESTAMP(6) + INTERVAL 1 HOUR, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 1000)"
            ),
            (stalled_key.as_str(), stalled_key.as_str()),
        )
        .await
        .unwrap();

    let free = within(
        PROMPTLY,
        "acquire of an unrelated key",
        first.lock(&free_key).try_acquire(),
    )
    .await
    .unwrap()
    .expect("an unrelated key was not free");
    assert!(
        free.fence() > 1000,
        "fence {} not above the old counter",
        free.fence()
    );
    let second = within(
        PROMPTLY,
        "connect beside a stalled acquirer",
        fencelock::connect(&url),
    )
    .await
    .unwrap();
    let old = within(
        PROMPTLY,
        "acquire of a key with an old row",
        second.lock(&old_key).try_acquire(),
    )
    .await
    .unwrap()
    .expect("the expired old row was not taken over");
    assert!(
        old.fence() > 1500,
        "fence {} not above the old row's",
        old.fence()
    );

    // The stalled key itself: a bounded wait, reported as what it is.
    let err = within(
        Duration::from_secs(30),
        "acquire of the stalled key",
        second.lock(&stalled_key).try_acquire(),
    )
    .await
    .expect_err("acquired a key whose row another session holds");
    let text = err.to_string();
    assert!(
        text.contains("lock wait timeout on the lease row"),
        "{text}"
    );
    assert!(!text.contains("CREATE"), "{text}");

    // Fences keep increasing per key across releases.
    let mut last = free.fence();
    assert!(free.release().await.unwrap());
    for locks in [&first, &second] {
        let again = locks.lock(&free_key).acquire().await.unwrap();
        assert!(again.fence() > last, "fence {} after {last}", again.fence());
        last = again.fence();
        assert!(again.release().await.unwrap());
    }
    assert!(old.release().await.unwrap());

    frozen.query_drop("ROLLBACK").await.unwrap();
    let unstalled = within(
        PROMPTLY,
        "acquire of the key once the stall ended",
        second.lock(&stalled_key).try_acquire(),
    )
    .await
    .unwrap()
    .expect("the key was not free once the stall ended");
    assert!(unstalled.fence() > 1000);
    assert!(unstalled.release().await.unwrap());
    drop(frozen);

    admin
        .query_drop(format!("DROP DATABASE {db}"))
        .await
        .unwrap();
}

/// Session mode's tables hold rows that die with their sessions, so they are created
/// unlogged: writing them makes no WAL, and acquire and release do not wait for a WAL
/// flush. Shared locks keep their rows in the holders table, which is unlogged too.
#[tokio::test]
async fn pg_session_tables_are_unlogged() {
    let scratch = Postgres::shared().scratch("unlogged").await;
    let locks = fencelock::connect(&scratch.url("")).await.unwrap();
    let key = unique_name("k");
    let lease = locks
        .lock(&key)
        .shared()
        .try_acquire()
        .await
        .unwrap()
        .expect("a free key");
    let rows = scratch
        .admin
        .query(
            "SELECT c.relname, c.relpersistence::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relkind = 'r' ORDER BY 1",
            &[&scratch.schema],
        )
        .await
        .unwrap();
    let tables: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        tables,
        [
            ("locks".to_owned(), "u".to_owned()),
            ("locks_holders".to_owned(), "u".to_owned())
        ]
    );
    lease.release().await.unwrap();
    drop(locks);
    scratch.close().await;
}

/// `status` and `list` describe a MySQL session lock alike: both name the `GET_LOCK`
/// lock and the connection holding it.
#[tokio::test]
async fn mysql_session_status_and_list_agree() {
    let my = Mysql::shared();
    let locks = fencelock::connect(&my.url("")).await.unwrap();
    let key = unique_name("agree");
    let lease = locks
        .lock(&key)
        .try_acquire()
        .await
        .unwrap()
        .expect("a free key");
    let status = locks.status(&key).await.unwrap().expect("held");
    let listed = locks
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|info| info.key == key)
        .expect("listed");
    assert!(
        status
            .note
            .as_deref()
            .is_some_and(|n| n.contains("GET_LOCK")),
        "{status:?}"
    );
    assert_eq!(listed.note, status.note);
    assert_eq!(listed.fence, status.fence);
    lease.release().await.unwrap();
}
