//! Renewals of lease-table rows that fall due together, sent as one statement.
//!
//! The shared [`RenewBatcher`] gathers the renewals of a grid slot; this sink sends them
//! as one `UPDATE … FROM unnest(…)`, which costs the client and the server about as much
//! as one renewal. Each row is still owner-checked and must not have expired, exactly as
//! a single renewal checks it, and each lease hears only about its own row.

use super::{pg_error, Shared};
use crate::core::owner::Owner;
use crate::core::renew_batch::{RenewBatcher, RenewalSink};
use crate::error::Result;
use crate::key::Key;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::types::Type;

/// The most renewals one statement carries; more wait for the next.
const MAX_BATCH: usize = 1000;

/// How long one batch statement may run before its renewals answer "unavailable".
const BATCH_LIMIT: Duration = Duration::from_secs(10);

/// One lease's renewal, waiting for its batch.
pub(super) struct Renewal {
    pub(super) key: Key,
    pub(super) owner: Owner,
    pub(super) ttl_ms: i64,
}

/// The statement of a batch: `$1` keys, `$2` owner tokens, `$3` TTLs in ms; it returns
/// the key and owner of every row it renewed.
pub(super) fn batch_sql(table: &str) -> String {
    format!(
        "UPDATE {table} AS l SET expires_at = clock_timestamp() + (b.ttl::float8 * interval '1 millisecond'),
    renewed_at = clock_timestamp(), ttl_ms = b.ttl
 FROM unnest($1::text[], $2::text[], $3::int8[]) AS b(key, owner, ttl)
 WHERE l.key = b.key AND l.owner = b.owner AND l.expires_at > clock_timestamp()
 RETURNING l.key, l.owner"
    )
}

/// The lease table's batch statement on the handle's connection pool.
pub(super) struct LeaseRows {
    db: Arc<Shared>,
    sql: String,
    describe: String,
}

/// The renewal batcher of a lease-table handle.
pub(super) fn batcher(db: Arc<Shared>, table: &str, describe: &str) -> RenewBatcher<LeaseRows> {
    let sink = LeaseRows {
        db,
        sql: batch_sql(table),
        describe: describe.to_owned(),
    };
    RenewBatcher::new(sink, describe, MAX_BATCH, BATCH_LIMIT)
}

impl RenewalSink for LeaseRows {
    type Renewal = Renewal;

    async fn send(&self, batch: &[Renewal]) -> Result<Vec<bool>> {
        let keys: Vec<&str> = batch.iter().map(|r| r.key.as_str()).collect();
        let owners: Vec<&str> = batch.iter().map(|r| r.owner.as_str()).collect();
        let ttls: Vec<i64> = batch.iter().map(|r| r.ttl_ms).collect();
        let conn = self.db.get().await?;
        let rows = conn
            .query_typed(
                &self.sql,
                &[
                    (&keys, Type::TEXT_ARRAY),
                    (&owners, Type::TEXT_ARRAY),
                    (&ttls, Type::INT8_ARRAY),
                ],
            )
            .await
            .map_err(|err| pg_error(&self.describe, err))?;
        let renewed: HashSet<(&str, &str)> = rows
            .iter()
            .filter_map(|row| Some((row.try_get(0).ok()?, row.try_get(1).ok()?)))
            .collect();
        Ok(batch
            .iter()
            .map(|r| renewed.contains(&(r.key.as_str(), r.owner.as_str())))
            .collect())
    }
}
