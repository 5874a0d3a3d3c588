//! The default way to wait for a lock: attempts, woken by the store's notifications and
//! the holder's expiry, with backoff in between, and transient errors retried until the
//! deadline. Backends with a queue of their own override [`Backend::acquire`].

use crate::core::backend::{AcquireRequest, Attempt, Backend, Granted, KeyWatch};
use crate::core::backoff::expiry_spread;
use crate::error::{Error, Result};
use std::time::{Duration, Instant};

/// How long one store call may take past the caller's deadline, so that a call that was
/// sent just before the deadline can still report what it did, and no longer.
pub(crate) const DEADLINE_GRACE: Duration = Duration::from_millis(750);

/// The longest one attempt may take while waiting without limit: a store that does not
/// answer within it counts as unavailable for this attempt, and the wait goes on.
pub(crate) fn attempt_limit(ttl: Duration) -> Duration {
    ttl.clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// When a call sent now must have answered: the caller's deadline plus the grace, and
/// never later than one attempt's limit from now.
pub(crate) fn call_deadline(request: &AcquireRequest<'_>, now: Instant) -> Instant {
    let limit = now + attempt_limit(request.ttl);
    match request.deadline {
        Some(deadline) => (deadline + DEADLINE_GRACE).min(limit),
        None => limit,
    }
}

/// One bounded attempt. A call that does not answer in time is abandoned (whatever it
/// may have taken is freed by owner token) and reported as the store being unavailable.
pub(crate) async fn bounded_attempt<B: Backend + ?Sized>(
    backend: &B,
    request: &AcquireRequest<'_>,
) -> Result<Attempt> {
    let until = call_deadline(request, Instant::now());
    crate::core::metrics::attempt_made();
    match tokio::time::timeout_at(until.into(), backend.try_acquire(request)).await {
        Ok(outcome) => outcome,
        Err(_) => {
            // A wait that goes on retries with the same owner token, so the cleanup must
            // be done before the next attempt (or it could free that attempt's grant); a
            // caller whose deadline has passed is answered at once and the cleanup is
            // left to the acquire's abandon guard, in the background.
            if request.deadline.is_none_or(|d| Instant::now() < d) {
                abandon_bounded(backend, request).await;
            }
            Err(Error::unavailable(
                backend.describe(),
                "the store did not answer an acquire attempt in time",
            ))
        }
    }
}

/// Frees what an abandoned attempt may have taken, waiting at most the grace for it.
pub(crate) async fn abandon_bounded<B: Backend + ?Sized>(
    backend: &B,
    request: &AcquireRequest<'_>,
) {
    let cleanup = backend.abandon(request.key, request.owner);
    match tokio::time::timeout(DEADLINE_GRACE, cleanup).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::debug!(key = %request.key, %err, "cleanup after an abandoned attempt failed; it ends at its TTL")
        }
        Err(_) => {
            tracing::debug!(key = %request.key, "cleanup after an abandoned attempt timed out; it ends at its TTL")
        }
    }
}

/// Subscribes to release events, retrying transient errors until the deadline.
async fn watch_bounded<B: Backend + ?Sized>(
    backend: &B,
    request: &AcquireRequest<'_>,
) -> Result<Option<Box<dyn KeyWatch>>> {
    let until = call_deadline(request, Instant::now());
    match tokio::time::timeout_at(until.into(), backend.watch(request.key)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Error::unavailable(
            backend.describe(),
            "the store did not answer a subscription to release events in time",
        )),
    }
}

/// The engine's wait: see the module documentation.
pub async fn poll_until_acquired<B: Backend + ?Sized>(
    backend: &B,
    request: &AcquireRequest<'_>,
) -> Result<Option<Granted>> {
    let mut delays = request.backoff.delays();
    let mut watch: Option<Box<dyn KeyWatch>> = None;
    let mut watching = false;
    // The first attempt goes out unsubscribed: a free key costs one round trip, with no
    // subscription to open (a change stream, a Pub/Sub channel) and close again.
    let mut refused = false;
    loop {
        let now = Instant::now();
        let passed = request.deadline.is_some_and(|d| now >= d);
        // After a refusal, subscribe before the next attempt so that a release between
        // the two is not missed.
        let mut failure = None;
        if refused && !watching && !passed {
            match watch_bounded(backend, request).await {
                Ok(found) => {
                    watch = found;
                    watching = true;
                }
                Err(err) => failure = Some(err),
            }
        }
        let expires_in = match failure {
            Some(err) => Err(err),
            None => match bounded_attempt(backend, request).await {
                Ok(Attempt::Acquired(granted)) => return Ok(Some(granted)),
                Ok(Attempt::Held { expires_in }) => Ok(expires_in),
                Err(err) => Err(err),
            },
        };
        let now = Instant::now();
        let pause = match expires_in {
            // Transient failures (a store restarting, a reset connection) are retried
            // until the deadline; the rest will not heal by waiting.
            Err(err) if err.is_transient() => {
                if request.deadline.is_some_and(|d| now >= d) {
                    return Err(err);
                }
                tracing::debug!(key = %request.key, %err, "transient error while waiting; retrying");
                // The subscription may have died with the connection: renew it too.
                watching = false;
                watch = None;
                delays.next_delay()
            }
            Err(err) => return Err(err),
            Ok(expires_in) => {
                if request.deadline.is_some_and(|d| now >= d) {
                    return Ok(None);
                }
                if !refused {
                    // Held at the first attempt: subscribe and attempt again at once.
                    refused = true;
                    continue;
                }
                match (&watch, expires_in) {
                    // Woken by the store at release; the expiry covers a holder that died.
                    (Some(_), Some(expires_in)) => expiry_spread(expires_in),
                    (Some(_), None) => delays.ceiling(),
                    (None, Some(expires_in)) => delays.next_delay().min(expiry_spread(expires_in)),
                    (None, None) => delays.next_delay(),
                }
            }
        };
        let mut wake_at = now + pause;
        if let Some(deadline) = request.deadline {
            wake_at = wake_at.min(deadline);
        }
        match watch.as_mut() {
            Some(watch) => {
                tokio::select! {
                    () = watch.changed() => {}
                    () = tokio::time::sleep_until(wake_at.into()) => {}
                }
            }
            None => tokio::time::sleep_until(wake_at.into()).await,
        }
    }
}
