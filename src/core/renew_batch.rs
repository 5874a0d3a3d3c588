//! Renewals that fall due together, sent to the store as one call.
//!
//! The lease engine brings renewals forward onto a shared grid
//! ([`RENEWAL_SLOT`](crate::core::lease::RENEWAL_SLOT)), so a handle holding many leases
//! sees them come due in bursts. Sent one by one, each renewal is a call, a round trip
//! and a future in flight with its own command buffer; a [`RenewBatcher`] sends every
//! renewal waiting at that moment as one call of its [`RenewalSink`] (one statement, one
//! script), which costs the client and the server about as much as one renewal. The sink
//! checks each lease's owner exactly as a single renewal would, and each lease hears only
//! about its own.
//!
//! The batcher's task holds the sink, never the backend, so it ends when the backend's
//! last clone goes (its queue closes), and it is started again on the next renewal if it
//! ended with its runtime.

use crate::error::{Error, Result};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Where a backend's batches go: one store call for many renewals.
pub(crate) trait RenewalSink: Send + Sync + 'static {
    /// What one lease's renewal carries (key, owner, TTL, whatever the call needs).
    type Renewal: Send + 'static;

    /// Sends `batch` as one call: for each renewal, in order, whether its lease was
    /// still the caller's and is now extended. An error answers every renewal of the
    /// batch with it.
    fn send(&self, batch: &[Self::Renewal]) -> impl Future<Output = Result<Vec<bool>>> + Send;
}

/// One renewal and the lease waiting for its answer.
struct Queued<R> {
    renewal: R,
    reply: oneshot::Sender<Result<bool>>,
}

/// Queues the renewals of one handle and sends them in batches through its sink.
pub(crate) struct RenewBatcher<S: RenewalSink> {
    sink: Arc<S>,
    describe: Arc<str>,
    max_batch: usize,
    limit: Duration,
    queue: Mutex<Option<mpsc::UnboundedSender<Queued<S::Renewal>>>>,
}

impl<S: RenewalSink> RenewBatcher<S> {
    /// A batcher whose calls carry at most `max_batch` renewals (more wait for the next
    /// call) and may each run for `limit` before their renewals answer "unavailable"
    /// (each lease's own bound, a third of its TTL, is usually shorter and answers
    /// first). `describe` names the store in errors.
    pub(crate) fn new(sink: S, describe: &str, max_batch: usize, limit: Duration) -> Self {
        RenewBatcher {
            sink: Arc::new(sink),
            describe: describe.into(),
            max_batch: max_batch.max(1),
            limit,
            queue: Mutex::new(None),
        }
    }

    /// Renews one lease with the next batch: `true` if it was still ours.
    pub(crate) async fn renew(&self, renewal: S::Renewal) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(Queued { renewal, reply });
        answer.await.unwrap_or_else(|_| {
            Err(Error::unavailable(
                &self.describe,
                "the renewal batch ended without an answer",
            ))
        })
    }

    fn enqueue(&self, queued: Queued<S::Renewal>) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let queued = match queue.as_ref() {
            Some(open) => match open.send(queued) {
                Ok(()) => return,
                // The task ended (with the runtime it ran on): start another.
                Err(mpsc::error::SendError(queued)) => queued,
            },
            None => queued,
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        // A fresh channel with its receiver at hand cannot refuse.
        let _ = sender.send(queued);
        tokio::spawn(run_batches(
            Arc::clone(&self.sink),
            Arc::clone(&self.describe),
            self.max_batch,
            self.limit,
            receiver,
        ));
        *queue = Some(sender);
    }
}

/// Sends the renewals waiting at each moment as one call, until the queue closes.
async fn run_batches<S: RenewalSink>(
    sink: Arc<S>,
    describe: Arc<str>,
    max_batch: usize,
    limit: Duration,
    mut queue: mpsc::UnboundedReceiver<Queued<S::Renewal>>,
) {
    let mut batch: Vec<Queued<S::Renewal>> = Vec::new();
    let mut renewals: Vec<S::Renewal> = Vec::new();
    while let Some(first) = queue.recv().await {
        batch.push(first);
        // The renewals of a slot fire on one timer tick: let the other leases' tasks of
        // the tick run and queue theirs before the call goes.
        tokio::task::yield_now().await;
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(queued) => batch.push(queued),
                Err(_) => break,
            }
        }
        // Renewals whose lease stopped waiting (its own bound ran out) need no call.
        batch.retain(|queued| !queued.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let mut replies = Vec::with_capacity(batch.len());
        for queued in batch.drain(..) {
            renewals.push(queued.renewal);
            replies.push(queued.reply);
        }
        let outcome = tokio::time::timeout(limit, sink.send(&renewals))
            .await
            .unwrap_or_else(|_| {
                Err(Error::unavailable(
                    &describe,
                    format!("a renewal batch did not answer within {limit:?}"),
                ))
            })
            .and_then(|answers| {
                if answers.len() == replies.len() {
                    Ok(answers)
                } else {
                    Err(Error::backend(
                        &describe,
                        format!(
                            "a renewal batch of {} answered for {}",
                            replies.len(),
                            answers.len()
                        ),
                    ))
                }
            });
        renewals.clear();
        match outcome {
            Ok(answers) => {
                for (reply, ours) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(ours));
                }
            }
            Err(err) => {
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Renews the even numbers, counting its calls.
    struct Evens {
        calls: Arc<AtomicUsize>,
        largest: Arc<AtomicUsize>,
    }

    impl RenewalSink for Evens {
        type Renewal = u32;

        async fn send(&self, batch: &[u32]) -> Result<Vec<bool>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.largest.fetch_max(batch.len(), Ordering::SeqCst);
            Ok(batch.iter().map(|n| n % 2 == 0).collect())
        }
    }

    #[tokio::test]
    async fn renewals_queued_together_go_in_one_call_and_each_hears_its_own_answer() {
        let calls = Arc::new(AtomicUsize::new(0));
        let largest = Arc::new(AtomicUsize::new(0));
        let sink = Evens {
            calls: Arc::clone(&calls),
            largest: Arc::clone(&largest),
        };
        let batcher = Arc::new(RenewBatcher::new(sink, "test", 8, Duration::from_secs(5)));
        let tasks: Vec<_> = (0..20u32)
            .map(|n| {
                let batcher = Arc::clone(&batcher);
                tokio::spawn(async move { (n, batcher.renew(n).await) })
            })
            .collect();
        for task in tasks {
            let (n, answer) = task.await.expect("the renewal task ran");
            assert_eq!(
                answer.expect("the batch answered"),
                n % 2 == 0,
                "renewal {n}"
            );
        }
        assert!(
            largest.load(Ordering::SeqCst) <= 8,
            "a batch over its maximum"
        );
        assert!(
            calls.load(Ordering::SeqCst) < 20,
            "20 renewals queued together took {} calls",
            calls.load(Ordering::SeqCst)
        );
    }

    /// Answers for one renewal fewer than it was given.
    struct Short;

    impl RenewalSink for Short {
        type Renewal = u32;

        async fn send(&self, batch: &[u32]) -> Result<Vec<bool>> {
            Ok(vec![true; batch.len().saturating_sub(1)])
        }
    }

    #[tokio::test]
    async fn a_sink_answering_for_the_wrong_count_fails_the_batch_rather_than_guess() {
        let batcher = RenewBatcher::new(Short, "test", 8, Duration::from_secs(5));
        let err = batcher
            .renew(1)
            .await
            .expect_err("a short answer is an error");
        assert!(err.to_string().contains("answered for 0"), "{err}");
    }

    /// Never answers.
    struct Frozen;

    impl RenewalSink for Frozen {
        type Renewal = u32;

        async fn send(&self, _: &[u32]) -> Result<Vec<bool>> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_frozen_store_answers_unavailable_within_the_limit() {
        let batcher = RenewBatcher::new(Frozen, "test", 8, Duration::from_secs(5));
        let err = batcher
            .renew(1)
            .await
            .expect_err("a frozen call is an error");
        assert!(err.to_string().contains("did not answer within"), "{err}");
    }
}
