//! Renewals that fall due together, sent as a few statements on one connection.
//!
//! The lease engine brings renewals onto a shared grid, so a handle holding many leases
//! sees them come due in bursts. Sent one by one on the lease table, a burst of a
//! thousand renewals is a thousand statements, each on a connection of its own (the idle
//! pool keeps 32, so most of them are new connections, handshake and all). MySQL has no
//! `unnest` and no `RETURNING` on `UPDATE`, so a batch says how many rows it renewed, not
//! which: a chunk whose count is short is renewed again one lease at a time, each
//! statement with the same owner check, so each lease still hears only about its own row.
//! That is rare (a lease lost or broken by `release --force` in the same slot).
//!
//! Chunks have sizes from [`CHUNKS`] only, so each connection prepares at most that many
//! batch statements (mysql_async caches prepared statements per connection).

use mysql_async::prelude::Queryable;
use mysql_async::Value;
use std::time::Duration;

/// The sizes a chunk may have, largest first: a batch of `n` renewals of one TTL goes as
/// `n / 32` chunks of 32 and the binary digits of the rest.
pub(crate) const CHUNKS: [usize; 6] = [32, 16, 8, 4, 2, 1];

/// One renewal: the row's key (`row_key`), its owner token and TTL.
pub(crate) struct RowRenewal<'a> {
    pub(crate) k: &'a [u8],
    pub(crate) owner: &'a str,
    pub(crate) ttl: Duration,
}

/// A statement for each chunk size, from `sql(n)`, and the statement for one row alone
/// with the parameters `(k, owner, ttl)`.
pub(crate) struct ChunkStatements {
    by_size: Vec<(usize, String)>,
    one: String,
}

impl ChunkStatements {
    /// `chunk(n)` is the statement of `n` rows; `one` the single-row statement of the
    /// fallback. Both must update only rows that are still the owner's, and count each
    /// row they renew once.
    pub(crate) fn new(chunk: impl Fn(usize) -> String, one: String) -> Self {
        ChunkStatements {
            by_size: CHUNKS.iter().map(|&n| (n, chunk(n))).collect(),
            one,
        }
    }

    fn of_size(&self, n: usize) -> &str {
        self.by_size
            .iter()
            .find(|(size, _)| *size == n)
            .map_or(self.one.as_str(), |(_, sql)| sql.as_str())
    }
}

/// `k IN (?, …)` and `(k, owner) IN ((?, ?), …)` for `n` rows: the first lets the server
/// find the rows by primary key, the second is the owner check of each.
pub(crate) fn rows_clause(n: usize) -> String {
    let keys = vec!["?"; n].join(", ");
    let pairs = vec!["(?, ?)"; n].join(", ");
    format!("k IN ({keys}) AND (k, owner) IN ({pairs})")
}

/// Renews `batch` on `conn`: for each renewal, in order, whether its row was still its
/// owner's and is now extended. `params(ttl)` gives the statements' leading parameters
/// for a TTL (what the `SET` clause needs), the same for the chunk and the single-row
/// statement.
pub(crate) async fn renew_rows(
    conn: &mut mysql_async::Conn,
    statements: &ChunkStatements,
    batch: &[RowRenewal<'_>],
    params: impl Fn(Duration) -> Vec<Value>,
) -> mysql_async::Result<Vec<bool>> {
    let mut answers = vec![false; batch.len()];
    // One statement carries one TTL: group the renewals by it (a handle's leases mostly
    // share one).
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| batch[i].ttl);
    for group in order.chunk_by(|a, b| batch[*a].ttl == batch[*b].ttl) {
        let mut rest = group;
        while !rest.is_empty() {
            let size = CHUNKS
                .iter()
                .copied()
                .find(|&c| c <= rest.len())
                .unwrap_or(1);
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            let ttl = batch[chunk[0]].ttl;
            let mut values = params(ttl);
            values.extend(chunk.iter().map(|&i| Value::from(batch[i].k)));
            for &i in chunk {
                values.push(Value::from(batch[i].k));
                values.push(Value::from(batch[i].owner));
            }
            conn.exec_drop(statements.of_size(size), values).await?;
            if conn.affected_rows() == size as u64 {
                for &i in chunk {
                    answers[i] = true;
                }
                continue;
            }
            // Short: find out which, one row at a time (renewing a row twice is harmless).
            for &i in chunk {
                let mut values = params(ttl);
                values.push(Value::from(batch[i].k));
                values.push(Value::from(batch[i].owner));
                conn.exec_drop(statements.one.as_str(), values).await?;
                answers[i] = conn.affected_rows() == 1;
            }
        }
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_size_has_its_statement_and_the_clause_has_a_placeholder_per_value() {
        let statements = ChunkStatements::new(|n| format!("chunk {n}"), "one".into());
        for n in CHUNKS {
            assert_eq!(statements.of_size(n), format!("chunk {n}"));
        }
        let clause = rows_clause(3);
        assert_eq!(clause.matches('?').count(), 3 + 2 * 3, "{clause}");
        assert_eq!(
            clause,
            "k IN (?, ?, ?) AND (k, owner) IN ((?, ?), (?, ?), (?, ?))"
        );
    }
}
