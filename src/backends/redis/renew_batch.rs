//! Exclusive renewals on one Redis server that fall due together, sent as one call of
//! the [`RENEW`](super::scripts::RENEW) script.
//!
//! The shared [`RenewBatcher`] gathers the renewals of a grid slot. Sent one by one, a
//! thousand leases renewing in the same second are a thousand script calls in flight,
//! each with its own command buffer and future; as batches they are ten. The script
//! checks each lease's owner exactly as a call for that lease alone would. Only exclusive
//! leases on a single server go this way: a reader's or permit's renewal touches its
//! key's sorted set (`RENEW_SHARED`), and a cluster's keys lie in different slots, which
//! one script may not span.

use super::node::{run_script, Connect, ScriptCall};
use super::scripts;
use crate::core::owner::Owner;
use crate::core::renew_batch::{RenewBatcher, RenewalSink};
use crate::error::{Error, Result};
use crate::key::Key;
use std::fmt::Write as _;
use std::time::Duration;

/// The most leases one script call renews: the server runs a script to its end before
/// any other command, so a batch is kept to well under a millisecond of its time.
const MAX_BATCH: usize = 100;

/// One exclusive lease's renewal.
pub(super) struct Renewal {
    pub(super) key: Key,
    pub(super) owner: Owner,
    pub(super) ttl_ms: u64,
}

/// The script call of a batch, on the server's shared connection.
pub(super) struct RenewScript<C: Connect> {
    conn: C::Conn,
    prefix: String,
    describe: String,
    command_timeout: Duration,
}

/// The renewal batcher of one server, sending on `conn`.
pub(super) fn batcher<C: Connect>(
    conn: C::Conn,
    prefix: &str,
    describe: &str,
    command_timeout: Duration,
) -> RenewBatcher<RenewScript<C>> {
    let sink = RenewScript {
        conn,
        prefix: prefix.to_owned(),
        describe: describe.to_owned(),
        command_timeout,
    };
    // The script call is bounded by the command timeout; the batch's own bound only
    // backs it up.
    RenewBatcher::new(sink, describe, MAX_BATCH, command_timeout * 2)
}

impl<C: Connect> RenewalSink for RenewScript<C> {
    type Renewal = Renewal;

    async fn send(&self, batch: &[Renewal]) -> Result<Vec<bool>> {
        let mut call = ScriptCall::with_capacity(
            &scripts::RENEW,
            2 * batch.len(),
            4 * batch.len() + 4,
            batch
                .iter()
                .map(|r| 2 * (self.prefix.len() + r.key.as_str().len()) + r.owner.as_str().len())
                .sum::<usize>()
                + 32 * batch.len()
                + 64,
        );
        // The names of `KeyNames::new`, written straight into the command.
        let mut name = String::new();
        for renewal in batch {
            name.clear();
            let _ = write!(name, "{}{}", self.prefix, renewal.key.as_str());
            call.key(name.as_str());
            name.clear();
            let _ = write!(name, "{{{}{}}}:holder", self.prefix, renewal.key.as_str());
            call.key(name.as_str());
        }
        call.arg(super::node::now_ms());
        for renewal in batch {
            call.arg(renewal.owner.as_str()).arg(renewal.ttl_ms);
        }
        let mut conn = self.conn.clone();
        let answers: Vec<i64> =
            run_script::<C, _>(&mut conn, &call, &self.describe, self.command_timeout).await?;
        if answers.len() != batch.len() {
            return Err(Error::backend(
                &self.describe,
                format!(
                    "the renewal script answered {} times for {} leases",
                    answers.len(),
                    batch.len()
                ),
            ));
        }
        Ok(answers.into_iter().map(|done| done == 1).collect())
    }
}
