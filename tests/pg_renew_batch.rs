//! PostgreSQL sends the renewals that fall due together as one statement (lease mode: the
//! handle's; shared sessions: each session's), and still tells each lease about its own
//! row only. Against a private server.
#![cfg(feature = "postgres")]

use dlock_testkit::servers::postgres::{self, Postgres};
use fencelock::{Lease, LossReason};
use std::time::Duration;

/// Renewed every 400 ms: on the engine's renewal grid.
const TTL: Duration = Duration::from_millis(1200);

/// A scratch schema on the shared server, so that only this test's rows are counted,
/// and a handle whose table is in it.
struct Scratch {
    schema: postgres::Scratch,
    locks: fencelock::Locks,
}

impl Scratch {
    async fn open(query: &str) -> Scratch {
        let schema = Postgres::shared().scratch("renew_batch").await;
        let locks = fencelock::connect(&schema.url(query)).await.unwrap();
        Scratch { schema, locks }
    }

    /// Closes the handle and drops the schema with everything in it.
    async fn close(self) {
        drop(self.locks);
        self.schema.close().await;
    }
}

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

/// Rows updated by one statement carry its transaction id: once every lease has renewed,
/// far fewer distinct `xmin`s than rows means renewals went together. One statement per
/// renewal leaves one `xmin` per row.
async fn renewals_share_statements(query: &str) {
    let scratch = Scratch::open(query).await;
    let (admin, schema) = (&scratch.schema.admin, &scratch.schema.schema);
    let leases = hold(&scratch.locks, "batch", 200).await;
    // Three renewal rounds.
    tokio::time::sleep(TTL + Duration::from_millis(300)).await;
    let row = admin
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT xmin::text), count(*) FILTER (WHERE renewed_at > acquired_at)
                 FROM {schema}.locks"
            ),
            &[],
        )
        .await
        .unwrap();
    let (rows, statements, renewed): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(rows, 200);
    assert_eq!(renewed, 200, "every lease was renewed");
    assert!(
        statements <= 40,
        "the last renewals of 200 leases took {statements} statements"
    );
    for lease in leases {
        assert!(!lease.is_lost());
        assert!(lease.release().await.unwrap());
    }
    scratch.close().await;
}

#[tokio::test]
async fn lease_mode_renewals_that_fall_due_together_share_a_statement() {
    renewals_share_statements("mode=lease").await;
}

/// 200 leases are two shared sessions (128 leases each at most).
#[tokio::test]
async fn shared_session_renewals_that_fall_due_together_share_a_statement() {
    renewals_share_statements("sessions=shared").await;
}

/// A batch is owner-checked row by row: the lease whose row another owner took is lost,
/// its batch mates keep renewing.
async fn a_row_taken_over_ends_only_its_own_lease(query: &str) {
    let scratch = Scratch::open(query).await;
    let (admin, schema) = (&scratch.schema.admin, &scratch.schema.schema);
    let mut leases = hold(&scratch.locks, "taken", 20).await;
    let victim = leases.remove(7);
    admin
        .execute(
            &format!("UPDATE {schema}.locks SET owner = 'somebody else' WHERE key = 'taken-7'"),
            &[],
        )
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
    scratch.close().await;
}

#[tokio::test]
async fn lease_mode_row_taken_over_ends_only_its_own_lease() {
    a_row_taken_over_ends_only_its_own_lease("mode=lease").await;
}

#[tokio::test]
async fn shared_session_row_taken_over_ends_only_its_own_lease() {
    a_row_taken_over_ends_only_its_own_lease("sessions=shared").await;
}
