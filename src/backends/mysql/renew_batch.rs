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
//! A chunk is a plain (text protocol) statement whose rows are written as hexadecimal
//! literals, which carry any byte safely: prepared, every chunk size would be another
//! statement kept, with its parameters' metadata, in each connection's cache.

use mysql_async::prelude::Queryable;
use mysql_async::Value;
use std::fmt::Write as _;
use std::time::Duration;

/// The most rows one statement renews.
pub(crate) const CHUNK: usize = 64;

/// One renewal: the row's key (`row_key`), its owner token and TTL.
pub(crate) struct RowRenewal<'a> {
    pub(crate) k: &'a [u8],
    pub(crate) owner: &'a str,
    pub(crate) ttl: Duration,
}

/// `k IN (X'…', …) AND (k, owner) IN ((X'…', X'…'), …)` for `rows`: the first lets the
/// server find the rows by primary key, the second is the owner check of each.
pub(crate) fn rows_clause(rows: &[&RowRenewal<'_>]) -> String {
    let mut keys = String::with_capacity(rows.len() * 70);
    let mut pairs = String::with_capacity(rows.len() * 140);
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            keys.push_str(", ");
            pairs.push_str(", ");
        }
        hex_literal(&mut keys, row.k);
        pairs.push('(');
        hex_literal(&mut pairs, row.k);
        pairs.push_str(", ");
        hex_literal(&mut pairs, row.owner.as_bytes());
        pairs.push(')');
    }
    format!("k IN ({keys}) AND (k, owner) IN ({pairs})")
}

/// `X'…'`, MySQL's hexadecimal literal: a binary string of exactly these bytes.
fn hex_literal(out: &mut String, bytes: &[u8]) {
    out.push_str("X'");
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out.push('\'');
}

/// Renews `batch` on `conn`: for each renewal, in order, whether its row was still its
/// owner's and is now extended. `chunk_sql(ttl, rows)` is the statement that renews the
/// rows of a [`rows_clause`] for `ttl`; `one` the prepared single-row statement of the
/// fallback, whose parameters are `params(ttl)` then the row's key and owner.
pub(crate) async fn renew_rows(
    conn: &mut mysql_async::Conn,
    chunk_sql: impl Fn(Duration, &str) -> String,
    one: &str,
    params: impl Fn(Duration) -> Vec<Value>,
    batch: &[RowRenewal<'_>],
) -> mysql_async::Result<Vec<bool>> {
    let mut answers = vec![false; batch.len()];
    // One statement carries one TTL: group the renewals by it (a handle's leases mostly
    // share one).
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| batch[i].ttl);
    for group in order.chunk_by(|a, b| batch[*a].ttl == batch[*b].ttl) {
        for chunk in group.chunks(CHUNK) {
            let ttl = batch[chunk[0]].ttl;
            let rows: Vec<&RowRenewal<'_>> = chunk.iter().map(|&i| &batch[i]).collect();
            conn.query_drop(chunk_sql(ttl, &rows_clause(&rows))).await?;
            if conn.affected_rows() == chunk.len() as u64 {
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
                conn.exec_drop(one, values).await?;
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
    fn rows_are_hex_literals_whatever_their_bytes() {
        let renewal = |k: &'static [u8], owner: &'static str| RowRenewal {
            k,
            owner,
            ttl: Duration::from_secs(1),
        };
        let (a, b) = (
            renewal(&[0x00, 0xff], "ab"),
            renewal(b"k", "x'); DROP TABLE t; --"),
        );
        let clause = rows_clause(&[&a, &b]);
        assert_eq!(
            clause,
            "k IN (X'00ff', X'6b') AND (k, owner) IN ((X'00ff', X'6162'), \
             (X'6b', X'7827293b2044524f50205441424c4520743b202d2d'))"
        );
        assert!(!clause.contains("DROP"), "{clause}");
    }
}
