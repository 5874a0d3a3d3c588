//! MySQL/MariaDB sends the renewals that fall due together as a few statements over many
//! rows (lease mode: the handle's, on one connection; shared sessions: each session's),
//! and still tells each lease about its own row only. Against a private server, whose
//! global counters see this test's statements only.
#![cfg(feature = "mysql")]

use dlock_testkit::servers::mysql::Mysql;
use fencelock::{Lease, LossReason};
use mysql_async::prelude::Queryable;
use std::time::Duration;

/// Renewed every 400 ms: on the engine's renewal grid.
const TTL: Duration = Duration::from_millis(1200);

async fn hold(locks: &fencelock::Locks, prefix: &str, n: usize) -> Vec<Lease> {
    let mut leases = Vec::with_capacity(n);
    for i in 0..n {
        let lease = locks
            .lock(format!("{prefix}-{i}"))
            .ttl(TTL)
            .try_acquire()
            .await
            .unwrap()
            .expect("a free key");
        leases.push(lease);
    }
    leases
}

async fn admin(server: &Mysql) -> mysql_async::Conn {
    let opts = mysql_async::Opts::from_url(&server.url("")).unwrap();
    mysql_async::Conn::new(opts).await.unwrap()
}

/// The server's count of `name` (`Com_update`, `Connections`).
async fn status(admin: &mut mysql_async::Conn, name: &str) -> u64 {
    let row: Option<(String, String)> = admin
        .query_first(format!("SHOW GLOBAL STATUS LIKE '{name}'"))
        .await
        .unwrap();
    row.expect("a status variable").1.parse().unwrap()
}

/// 200 leases renewed three times over are 600 renewals; one statement (and, in lease
/// mode, one pooled connection) each would be 600 updates and about as many new
/// connections.
async fn renewals_share_statements(query: &str, table: &str) {
    let server = Mysql::start(false);
    let locks = fencelock::connect(&server.url(query)).await.unwrap();
    let mut admin = admin(&server).await;
    let leases = hold(&locks, "batch", 200).await;
    let (updates, connections) = (
        status(&mut admin, "Com_update").await,
        status(&mut admin, "Connections").await,
    );
    // Three renewal rounds.
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    let updates = status(&mut admin, "Com_update").await - updates;
    let connections = status(&mut admin, "Connections").await - connections;
    assert!(
        updates <= 200,
        "three rounds of renewals of 200 leases took {updates} UPDATE statements"
    );
    assert!(
        connections <= 10,
        "three rounds of renewals of 200 leases opened {connections} connections"
    );
    let renewed: Option<u64> = admin
        .query_first(format!(
            "SELECT COUNT(*) FROM dlock.{table} WHERE renewed_at > acquired_at AND key_text LIKE 'batch-%'"
        ))
        .await
        .unwrap();
    assert_eq!(renewed, Some(200), "every lease was renewed");
    for lease in leases {
        assert!(!lease.is_lost(), "{} lost", lease.key());
        assert!(lease.release().await.unwrap());
    }
    drop(admin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_mode_renewals_that_fall_due_together_share_statements() {
    renewals_share_statements("mode=lease", "dlock_leases").await;
}

/// 200 leases are two shared sessions (128 leases each at most).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_session_renewals_that_fall_due_together_share_statements() {
    renewals_share_statements("sessions=shared", "dlock_sessions").await;
}

/// A batch is owner-checked row by row: the lease whose row another owner took is lost,
/// its batch mates keep renewing.
async fn a_row_taken_over_ends_only_its_own_lease(query: &str, table: &str) {
    let server = Mysql::start(false);
    let locks = fencelock::connect(&server.url(query)).await.unwrap();
    let mut admin = admin(&server).await;
    let mut leases = hold(&locks, "taken", 40).await;
    let victim = leases.remove(7);
    admin
        .query_drop(format!(
            "UPDATE dlock.{table} SET owner = 'somebody else' WHERE key_text = 'taken-7'"
        ))
        .await
        .unwrap();
    let reason = tokio::time::timeout(TTL * 2, victim.lost())
        .await
        .expect("the taken-over lease is told within two TTLs");
    assert!(
        matches!(reason, LossReason::RenewalRefused),
        "lost for another reason: {reason:?}"
    );
    // Its batch mates renewed past the moment the victim was refused, and hold on.
    tokio::time::sleep(TTL).await;
    for lease in leases {
        assert!(!lease.is_lost(), "{} lost", lease.key());
        assert!(lease.release().await.unwrap());
    }
    drop(victim);
    drop(admin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_mode_row_taken_over_ends_only_its_own_lease() {
    a_row_taken_over_ends_only_its_own_lease("mode=lease", "dlock_leases").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_session_row_taken_over_ends_only_its_own_lease() {
    a_row_taken_over_ends_only_its_own_lease("sessions=shared", "dlock_sessions").await;
}
