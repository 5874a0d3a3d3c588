//! `sessions=shared` on PostgreSQL and MySQL: a handle holds a thousand session leases
//! over a user limited to a few connections, and the leases of one session end together.
#![cfg(all(feature = "postgres", feature = "mysql"))]

use dlock_testkit::servers::mysql::Mysql;
use dlock_testkit::servers::postgres::Postgres;
use fencelock::{Lease, Locks, LossReason};
use mysql_async::prelude::Queryable;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio_postgres::NoTls;

const PROMPTLY: Duration = Duration::from_secs(10);
/// The connections the limited user may open.
const LIMIT: u64 = 12;
const LEASES: usize = 1000;
/// How long an acquire retries a refused connection before it fails.
const WAIT: Duration = Duration::from_secs(3);

type Count = Box<dyn Fn() -> Pin<Box<dyn Future<Output = u64> + Send>> + Send + Sync>;

fn keys(prefix: &str) -> Vec<String> {
    let run = rand::random::<u32>();
    (0..LEASES)
        .map(|i| format!("{prefix}-{run:08x}-{i}"))
        .collect()
}

/// Takes every key on `locks`, 50 at a time, each waiting at most [`WAIT`]: the leases,
/// in the order of `keys`.
async fn hold_all(locks: &Locks, keys: &[String]) -> Vec<fencelock::Result<Lease>> {
    let mut leases = Vec::new();
    for chunk in keys.chunks(50) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|k| {
                let (locks, k) = (locks.clone(), k.clone());
                tokio::spawn(async move { locks.lock(&k).wait_for(WAIT).acquire().await })
            })
            .collect();
        for task in tasks {
            leases.push(task.await.unwrap());
        }
    }
    leases
}

/// The checks, over a user limited to [`LIMIT`] connections: `dedicated` and `shared`
/// are its URLs without and with `sessions=shared`, `admin` an unlimited user's,
/// `connections` counts the limited user's connections.
async fn a_thousand_leases_on_few_connections(
    dedicated: &str,
    shared: &str,
    admin: &str,
    connections: Count,
) {
    // The limit is real: a connection per lease runs out of connections.
    let few = fencelock::connect(dedicated).await.unwrap();
    let held = hold_all(&few, &keys("dedicated")[..20]).await;
    let refused = held.iter().filter(|lease| lease.is_err()).count();
    assert!(
        refused > 0,
        "20 dedicated leases fit in {LIMIT} connections"
    );
    for lease in held.into_iter().flatten() {
        assert!(lease.release().await.unwrap());
    }
    drop(few);
    let closed = async {
        while connections().await > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PROMPTLY, closed)
        .await
        .expect("the dropped handle's connections stayed open");

    let locks = fencelock::connect(shared).await.unwrap();
    let keys = keys("shared");
    let leases: Vec<Lease> = hold_all(&locks, &keys)
        .await
        .into_iter()
        .map(|lease| lease.expect("a shared-session lease failed"))
        .collect();
    let open = connections().await;
    assert!(open <= LIMIT, "{LEASES} leases opened {open} connections");
    eprintln!("{LEASES} leases held on {open} connections");
    let fences: HashSet<u64> = leases.iter().map(Lease::fence).collect();
    assert_eq!(fences.len(), LEASES, "fences repeat");

    // Other handles see every key held, and a fresh one takes none of them.
    let other = fencelock::connect(admin).await.unwrap();
    for k in keys.iter().step_by(97) {
        assert!(
            other.status(k).await.unwrap().is_some(),
            "{k} not shown held"
        );
        assert!(
            other.lock(k).try_acquire().await.unwrap().is_none(),
            "{k} taken twice"
        );
    }

    // Breaking one key ends its session: that lease and the others on the session are
    // lost, their keys free; the leases of other sessions hold on.
    let broken = &keys[0];
    assert!(other.force_release(broken).await.unwrap());
    let reason = tokio::time::timeout(PROMPTLY, leases[0].lost())
        .await
        .expect("lost() did not fire after release --force");
    assert!(
        matches!(reason, LossReason::SessionEnded { .. }),
        "{reason:?}"
    );
    let taken = other
        .lock(broken)
        .try_acquire()
        .await
        .unwrap()
        .expect("the broken key is not free");
    assert!(taken.release().await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut lost = 0;
    for lease in leases {
        let was_lost = lease.is_lost();
        // Every lease of the ended session heard of it: a key that is free again was lost.
        let free = other.lock(lease.key()).try_acquire().await.unwrap();
        assert_eq!(
            free.is_some(),
            was_lost,
            "{} is free but its lease is not lost, or the reverse",
            lease.key()
        );
        if let Some(free) = free {
            assert!(free.release().await.unwrap());
        }
        let released = lease.release().await.unwrap();
        assert_eq!(
            released, !was_lost,
            "release of a lost lease said held, or the reverse"
        );
        lost += usize::from(was_lost);
    }
    assert!(
        (1..=fencelock::LEASES_PER_SESSION).contains(&lost),
        "{lost} leases lost by breaking one session"
    );
    eprintln!("breaking one key ended {lost} leases");

    // Released, every key is free and no holder is listed.
    let listed: Vec<_> = other
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|info| keys.contains(&info.key))
        .collect();
    assert!(listed.is_empty(), "released keys still listed: {listed:?}");
    for k in keys.iter().step_by(101) {
        let lease = other.lock(k).try_acquire().await.unwrap();
        assert!(lease
            .expect("a released key is not free")
            .release()
            .await
            .unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_a_thousand_leases_on_twelve_connections() {
    let server = Postgres::shared();
    let admin_url = server.url("");
    // The schema, made by the unlimited user.
    drop(fencelock::connect(&admin_url).await.unwrap());
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", server.port());
    let (admin, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE dlock_few LOGIN CONNECTION LIMIT {LIMIT};
             EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             GRANT ALL ON ALL TABLES IN SCHEMA public TO dlock_few;
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO dlock_few;"
        ))
        .await
        .unwrap();
    let admin = std::sync::Arc::new(admin);
    let count: Count = Box::new(move || {
        let admin = std::sync::Arc::clone(&admin);
        Box::pin(async move {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'dlock_few'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            u64::try_from(n).unwrap()
        })
    });
    a_thousand_leases_on_few_connections(
        &server.url_as("127.0.0.1", "dlock_few", ""),
        &server.url_as("127.0.0.1", "dlock_few", "sessions=shared"),
        &admin_url,
        count,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_a_thousand_leases_on_twelve_connections() {
    let server = Mysql::shared();
    let admin_url = server.url("");
    drop(fencelock::connect(&admin_url).await.unwrap());
    let opts = mysql_async::Opts::from_url(&admin_url).unwrap();
    let mut admin = mysql_async::Conn::new(opts.clone()).await.unwrap();
    admin
        .query_drop(format!(
            "CREATE USER IF NOT EXISTS 'dlock_few'@'%' IDENTIFIED BY 'dlock-secret' WITH MAX_USER_CONNECTIONS {LIMIT}"
        ))
        .await
        .unwrap();
    admin
        .query_drop("GRANT ALL ON dlock.* TO 'dlock_few'@'%'")
        .await
        .unwrap();
    drop(admin);
    let count: Count = Box::new(move || {
        let opts = opts.clone();
        Box::pin(async move {
            let mut admin = mysql_async::Conn::new(opts).await.unwrap();
            let n: Option<u64> = admin
                .query_first(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'dlock_few'",
                )
                .await
                .unwrap();
            let _ = admin.disconnect().await;
            n.unwrap_or(0)
        })
    });
    a_thousand_leases_on_few_connections(
        &server.url_as("127.0.0.1", "dlock_few", ""),
        &server.url_as("127.0.0.1", "dlock_few", "sessions=shared"),
        &admin_url,
        count,
    )
    .await;
}

/// A table of the wrong shape (a lease-mode table named as the sessions table) makes every
/// lock statement fail, and the first failure closes the session. The acquires queued on
/// that session behind it are told why it closed, not only that it had: the user's clue
/// (`column "lock_id" … does not exist`) must not be lost in the crowd.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_acquires_behind_a_closed_shared_session_say_why_it_closed() {
    let server = Postgres::shared();
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", server.port());
    let (admin, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    let schema = format!("wrong_shape_{:08x}", rand::random::<u32>());
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let table = format!("table={schema}.locks");
    drop(
        fencelock::connect(&server.url(&format!("mode=lease&{table}")))
            .await
            .unwrap(),
    );
    let locks = fencelock::connect(&server.url(&format!("sessions=shared&{table}")))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock(format!("shape-{i}")).try_acquire().await })
        })
        .collect();
    for task in tasks {
        let outcome = tokio::time::timeout(PROMPTLY, task)
            .await
            .expect("an acquire answers promptly")
            .unwrap();
        let err = outcome.expect_err("no lock can be taken with a table of the wrong shape");
        assert!(err.to_string().contains("lock_id"), "{err}");
    }
    drop(locks);
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
