//! Renewals of lease-table rows that fall due together, sent as one statement.
//!
//! The lease engine brings renewals forward onto a shared grid
//! ([`RENEWAL_SLOT`](crate::core::lease::RENEWAL_SLOT)), so a handle holding many leases
//! sees them come due in bursts. Each renewal on its own is a statement, a round trip and
//! a row update; the batcher sends every renewal waiting at that moment as one
//! `UPDATE … FROM unnest(…)`, which costs the client and the server about as much as one
//! renewal. Each row is still owner-checked and must not have expired, exactly as a
//! single renewal checks it, and each lease hears only about its own row.
//!
//! The batcher's task holds the connection, never the backend, so it ends when the
//! backend's last clone goes (its queue closes), and it is started again on the next
//! renewal if it ended with its runtime.

use super::{pg_error, Shared};
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::Type;

/// The most renewals one statement carries; more wait for the next.
const MAX_BATCH: usize = 1000;

/// How long one batch statement may run before its renewals answer "unavailable" (each
/// lease's own bound, a third of its TTL, is usually shorter and answers first).
const BATCH_LIMIT: Duration = Duration::from_secs(10);

/// One lease's renewal, waiting for its batch.
struct Renewal {
    key: String,
    owner: String,
    ttl_ms: i64,
    reply: oneshot::Sender<Result<bool>>,
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

/// Queues renewals of one handle and sends them in batches.
pub(super) struct RenewBatcher {
    db: Arc<Shared>,
    sql: Arc<str>,
    describe: Arc<str>,
    queue: Mutex<Option<mpsc::UnboundedSender<Renewal>>>,
}

impl RenewBatcher {
    pub(super) fn new(db: Arc<Shared>, table: &str, describe: &str) -> Self {
        RenewBatcher {
            db,
            sql: batch_sql(table).into(),
            describe: describe.into(),
            queue: Mutex::new(None),
        }
    }

    /// Renews the row of `key` held by `owner` for `ttl`: `true` if it was still ours.
    pub(super) async fn renew(&self, key: &str, owner: &str, ttl_ms: i64) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(Renewal {
            key: key.to_owned(),
            owner: owner.to_owned(),
            ttl_ms,
            reply,
        });
        answer.await.unwrap_or_else(|_| {
            Err(Error::unavailable(
                &self.describe,
                "the renewal batch ended without an answer",
            ))
        })
    }

    fn enqueue(&self, renewal: Renewal) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let renewal = match queue.as_ref() {
            Some(open) => match open.send(renewal) {
                Ok(()) => return,
                // The task ended (with the runtime it ran on): start another.
                Err(mpsc::error::SendError(renewal)) => renewal,
            },
            None => renewal,
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        // A fresh channel with its receiver at hand cannot refuse.
        let _ = sender.send(renewal);
        tokio::spawn(run_batches(
            Arc::clone(&self.db),
            Arc::clone(&self.sql),
            Arc::clone(&self.describe),
            receiver,
        ));
        *queue = Some(sender);
    }
}

/// Sends the renewals waiting at each moment as one statement, until the queue closes.
async fn run_batches(
    db: Arc<Shared>,
    sql: Arc<str>,
    describe: Arc<str>,
    mut queue: mpsc::UnboundedReceiver<Renewal>,
) {
    let mut batch = Vec::new();
    while let Some(first) = queue.recv().await {
        batch.push(first);
        // The renewals of a slot fire on one timer tick: let the other leases' tasks of
        // the tick run and queue theirs before the statement goes.
        tokio::task::yield_now().await;
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(renewal) => batch.push(renewal),
                Err(_) => break,
            }
        }
        // Renewals whose lease stopped waiting (its own bound ran out) need no statement.
        batch.retain(|renewal| !renewal.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let outcome = tokio::time::timeout(BATCH_LIMIT, send_batch(&db, &sql, &describe, &batch))
            .await
            .unwrap_or_else(|_| {
                Err(Error::unavailable(
                    &describe,
                    format!("a renewal batch did not answer within {BATCH_LIMIT:?}"),
                ))
            });
        match outcome {
            Ok(renewed) => {
                for renewal in batch.drain(..) {
                    let ours = renewed.contains(&(renewal.key, renewal.owner));
                    let _ = renewal.reply.send(Ok(ours));
                }
            }
            Err(err) => {
                for renewal in batch.drain(..) {
                    let _ = renewal.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// One batch statement: the (key, owner) pairs it renewed.
async fn send_batch(
    db: &Shared,
    sql: &str,
    describe: &str,
    batch: &[Renewal],
) -> Result<HashSet<(String, String)>> {
    let keys: Vec<&str> = batch.iter().map(|r| r.key.as_str()).collect();
    let owners: Vec<&str> = batch.iter().map(|r| r.owner.as_str()).collect();
    let ttls: Vec<i64> = batch.iter().map(|r| r.ttl_ms).collect();
    let conn = db.get().await?;
    let rows = conn
        .query_typed(
            sql,
            &[
                (&keys, Type::TEXT_ARRAY),
                (&owners, Type::TEXT_ARRAY),
                (&ttls, Type::INT8_ARRAY),
            ],
        )
        .await
        .map_err(|err| pg_error(describe, err))?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            Some((
                row.try_get::<_, String>(0).ok()?,
                row.try_get::<_, String>(1).ok()?,
            ))
        })
        .collect())
}
