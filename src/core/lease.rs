//! [`Lease`]: a held lock, renewed in the background until released or dropped.

use crate::core::backend::{Backend, HeldLease};
use crate::core::local_queue::LocalTurn;
use crate::core::metrics::{Holding, Labels};
use crate::core::owner::Owner;
use crate::error::{Error, LossReason, Result};
use crate::key::Key;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// State shared by a [`Lease`], its [`LeaseHandle`]s and its background task.
pub(crate) struct Shared {
    pub(crate) key: Key,
    pub(crate) owner: Owner,
    pub(crate) fence: u64,
    pub(crate) ttl: Duration,
    pub(crate) backend: Arc<dyn Backend>,
    /// The instant until which the lease is surely held: when the last successful
    /// acquire or renewal was *sent*, plus its TTL.
    valid_until: Mutex<Instant>,
    lost: watch::Sender<Option<LossReason>>,
    /// Keeps other tasks of this handle queued behind this lease; given up after the
    /// backend release (so the next local task finds the key free), or as soon as the
    /// lease is lost (so a holder that keeps its lost lease cannot block its own handle).
    turn: Mutex<Option<LocalTurn>>,
    /// The labels of this lease's metrics (backend scheme and kind).
    metrics: Labels,
}

impl Shared {
    fn valid_until(&self) -> Instant {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn set_valid_until(&self, at: Instant) {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = at;
    }

    /// The moment the lease may have expired: its validity less a clock-drift allowance
    /// (1% of the TTL plus 2 ms, as Redlock reckons it).
    fn loss_deadline(&self) -> Instant {
        let drift = self.ttl / 100 + Duration::from_millis(2);
        self.valid_until()
            .checked_sub(drift)
            .unwrap_or_else(Instant::now)
    }

    fn give_up_turn(&self) {
        let turn = self
            .turn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(turn);
    }

    fn mark_lost(&self, reason: LossReason) {
        self.give_up_turn();
        self.lost.send_if_modified(|state| {
            if state.is_none() {
                tracing::warn!(key = %self.key, fence = self.fence, backend = self.backend.describe(), %reason, "lease lost");
                *state = Some(reason);
                true
            } else {
                false
            }
        });
    }

    fn lost_error(&self, reason: LossReason) -> Error {
        Error::LeaseLost {
            key: self.key.to_string(),
            backend: self.backend.describe().to_owned(),
            fence: self.fence,
            reason,
        }
    }
}

/// What the backend granted: the lease's identity, when its TTL started counting, and
/// the handle on its store-side state.
pub(crate) struct Grant {
    pub(crate) key: Key,
    pub(crate) owner: Owner,
    pub(crate) fence: u64,
    pub(crate) ttl: Duration,
    /// When the successful request was sent: the lease is surely valid until then + TTL.
    pub(crate) sent_at: Instant,
    pub(crate) lease: Box<dyn HeldLease>,
    /// The kind of lease, for its metrics.
    pub(crate) kind: crate::core::backend::LockKind,
}

/// What a [`Lease`] asks of its background task, which alone owns the store-side handle.
enum Command {
    Extend(Duration, oneshot::Sender<Result<bool>>),
    Release(oneshot::Sender<Result<bool>>),
}

/// A held lock.
///
/// The lease is renewed in the background (by default every TTL/3) until it is
/// [released](Lease::release) or dropped. Dropping it releases the lock in the
/// background without blocking. If the lease may no longer be held, [`Lease::lost`]
/// resolves at once: stop working on the protected resource then.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), fencelock::Error> {
/// let locks = fencelock::connect("memory://").await?;
/// let lease = locks.lock("invoice-42").acquire().await?;
/// // Pass the fence to the protected store so it can reject a stale holder's writes.
/// println!("holding {} with fence {}", lease.key(), lease.fence());
/// assert!(lease.release().await?);
/// # Ok(()) }
/// ```
#[must_use = "a Lease is released as soon as it is dropped"]
pub struct Lease {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    task: Option<JoinHandle<()>>,
}

/// A cheap, cloneable view of a [`Lease`]: its identity and its loss signal, without the
/// power to release it. [`LockBuilder::run`](crate::LockBuilder::run) hands one to the guarded work.
#[derive(Clone)]
pub struct LeaseHandle {
    shared: Arc<Shared>,
}

macro_rules! lease_identity {
    () => {
        /// The locked key.
        pub fn key(&self) -> &str {
            self.shared.key.as_str()
        }

        /// This lease's owner token (128 random bits, hex).
        pub fn owner(&self) -> &str {
            self.shared.owner.as_str()
        }

        /// The fencing token: strictly greater than every fence handed out earlier for
        /// this key on this backend. Give it to the protected resource with every write.
        pub fn fence(&self) -> u64 {
            self.shared.fence
        }

        /// The TTL the lease was taken (and is renewed) with.
        pub fn ttl(&self) -> Duration {
            self.shared.ttl
        }

        /// Resolves when the lease may no longer be held: a renewal was refused, renewal
        /// failed until the lease may have expired, or the backend session holding it
        /// ended. Never resolves for a lease that stays held or is released normally.
        /// Can be called any number of times; each future resolves with the reason.
        pub fn lost(&self) -> impl Future<Output = LossReason> + Send + 'static {
            let mut rx = self.shared.lost.subscribe();
            async move {
                loop {
                    if let Some(reason) = rx.borrow_and_update().clone() {
                        return reason;
                    }
                    if rx.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                }
            }
        }

        /// True once the lease may no longer be held (see [`lost`](Self::lost)).
        pub fn is_lost(&self) -> bool {
            self.shared.lost.borrow().is_some()
        }
    };
}

impl LeaseHandle {
    lease_identity!();
}

impl Lease {
    lease_identity!();

    /// Starts the background task that owns the lease's store-side handle, renews it
    /// (every `renew_every`, if given) and watches for its loss.
    pub(crate) fn start(
        backend: Arc<dyn Backend>,
        grant: Grant,
        renew_every: Option<Duration>,
        turn: Option<LocalTurn>,
    ) -> Lease {
        let Grant {
            key,
            owner,
            fence,
            ttl,
            sent_at,
            lease,
            kind,
        } = grant;
        let (lost, _) = watch::channel(None);
        let metrics = Labels::new(backend.describe(), kind, key.as_str());
        let shared = Arc::new(Shared {
            key,
            owner,
            fence,
            ttl,
            backend,
            valid_until: Mutex::new(sent_at + ttl),
            lost,
            turn: Mutex::new(turn),
            metrics,
        });
        let (commands, inbox) = mpsc::channel(4);
        let task = tokio::spawn(guard_lease(Arc::clone(&shared), lease, renew_every, inbox));
        Lease {
            shared,
            commands,
            task: Some(task),
        }
    }

    /// A cloneable view of this lease (identity and loss signal).
    pub fn handle(&self) -> LeaseHandle {
        LeaseHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<bool>>) -> Command,
    ) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(command(reply)).await.is_err() {
            // The task has ended: the lease was lost (and given up) before this call.
            return Ok(false);
        }
        answer.await.unwrap_or(Ok(false))
    }

    /// Extends the lease to `ttl` from now, checked against the owner token. Needed only
    /// when automatic renewal is off ([`LockBuilder::auto_renew`](crate::LockBuilder::auto_renew)).
    ///
    /// Fails with [`Error::LeaseLost`] if the backend no longer knows this lease as held.
    ///
    /// Cancel safety: if the future is dropped, the extension may or may not have reached
    /// the store; the lease stays in force either way.
    pub async fn extend(&self, ttl: Duration) -> Result<()> {
        if !(crate::core::locks::MIN_TTL..=crate::core::locks::MAX_TTL).contains(&ttl) {
            return Err(Error::BadOption(format!(
                "TTL {ttl:?} is outside {:?}..={:?}",
                crate::core::locks::MIN_TTL,
                crate::core::locks::MAX_TTL
            )));
        }
        if let Some(reason) = self.shared.lost.borrow().clone() {
            return Err(self.shared.lost_error(reason));
        }
        if self.ask(|reply| Command::Extend(ttl, reply)).await? {
            Ok(())
        } else {
            let reason = self
                .shared
                .lost
                .borrow()
                .clone()
                .unwrap_or(LossReason::RenewalRefused);
            Err(self.shared.lost_error(reason))
        }
    }

    /// Releases the lock now. Returns `true` if the lease was still held, `false` if it
    /// had already been lost (expired, or broken by `release --force`).
    ///
    /// Cancel safety: if the future is dropped, the release still completes in the
    /// background.
    pub async fn release(mut self) -> Result<bool> {
        let held = self.ask(Command::Release).await;
        // The task has handed the store-side lease back (or given it up): nothing is left
        // for Drop to do.
        self.task = None;
        held
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The background task sees its command channel close and releases the lease
        // itself, without blocking the dropping thread.
        let _ = self.task.take();
    }
}

/// Runs `work` in the background, on the current tokio runtime if there is one, else
/// on a short-lived thread of its own (a lease dropped outside any runtime).
pub(crate) fn spawn_detached(work: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(work);
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("dlock-release".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(work),
                Err(err) => {
                    tracing::warn!(%err, "cannot release a dropped lease in the background")
                }
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(%err, "cannot release a dropped lease in the background");
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.shared.key)
            .field("fence", &self.shared.fence)
            .field("owner", &self.shared.owner)
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl fmt::Debug for LeaseHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseHandle")
            .field("key", &self.shared.key)
            .field("fence", &self.shared.fence)
            .finish()
    }
}

impl LeaseHandle {
    pub(crate) fn lost_error(&self, reason: LossReason) -> Error {
        self.shared.lost_error(reason)
    }
}

/// How long one renewal may take: a third of the TTL, so that a store that hangs still
/// leaves time for more attempts before the lease may have expired.
fn renewal_limit(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(10))
}

/// The lease's background task, sole owner of its store-side handle: renews on schedule,
/// carries out `extend` and `release`, and marks the lease lost when a renewal is refused,
/// when the lease may have expired, or when the store reports the lease's end. Every
/// store call is bounded; the end signal is watched while a renewal runs, so neither can
/// hold the other up.
async fn guard_lease(
    shared: Arc<Shared>,
    mut lease: Box<dyn HeldLease>,
    renew_every: Option<Duration>,
    mut inbox: mpsc::Receiver<Command>,
) {
    let expires = shared.backend.capabilities().expires;
    // Counts this lease in the holder gauge until the task ends, however it ends.
    let mut holding: Holding = shared.metrics.holding();
    let mut ended = lease.ended();
    let mut next_renewal = renew_every.map(|every| Instant::now() + every);
    let mut last_error: Option<String> = None;
    let outcome: Option<LossReason> = loop {
        let loss_deadline = shared.loss_deadline();
        // A lease tied to a session lapses only when renewals keep failing: the store
        // never expires it on its own, but a holder that cannot reach its store for a TTL
        // cannot claim to hold it either.
        let lapses = expires || last_error.is_some();
        let lapse = async {
            if lapses {
                tokio::time::sleep_until(loss_deadline.into()).await
            } else {
                std::future::pending().await
            }
        };
        let renewal_due = async {
            match next_renewal {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let ttl = tokio::select! {
            biased;
            reason = &mut ended => break Some(reason),
            () = lapse => break Some(match last_error.take() {
                Some(last_error) => LossReason::RenewalFailed { last_error },
                None => LossReason::Expired,
            }),
            command = inbox.recv() => match command {
                None => break None,
                Some(Command::Release(reply)) => {
                    let released = release_bounded(&shared, lease).await;
                    holding.ended("released");
                    drop(holding);
                    // The next local task may go as soon as the caller hears back.
                    shared.give_up_turn();
                    let _ = reply.send(released);
                    return;
                }
                Some(Command::Extend(ttl, reply)) => {
                    let sent = Instant::now();
                    let outcome = renew_bounded(&shared, &mut lease, &mut ended, ttl, true).await;
                    match outcome {
                        Renewal::Done(Ok(true)) => {
                            shared.set_valid_until(sent + ttl);
                            shared.metrics.renewed();
                            last_error = None;
                            let _ = reply.send(Ok(true));
                            continue;
                        }
                        Renewal::Done(Ok(false)) => {
                            shared.metrics.renewal_failed(true);
                            let _ = reply.send(Ok(false));
                            break Some(LossReason::RenewalRefused);
                        }
                        Renewal::Done(Err(err)) => {
                            shared.metrics.renewal_failed(false);
                            last_error = Some(err.to_string());
                            let _ = reply.send(Err(err));
                            continue;
                        }
                        Renewal::Ended(reason) => {
                            let _ = reply.send(Ok(false));
                            break Some(reason);
                        }
                    }
                }
            },
            () = renewal_due => shared.ttl,
        };
        let Some(every) = renew_every else { continue };
        let sent = Instant::now();
        match renew_bounded(&shared, &mut lease, &mut ended, ttl, false).await {
            Renewal::Done(Ok(true)) => {
                shared.set_valid_until(sent + ttl);
                shared.metrics.renewed();
                last_error = None;
                next_renewal = Some(sent + every);
            }
            Renewal::Done(Ok(false)) => {
                shared.metrics.renewal_failed(true);
                break Some(LossReason::RenewalRefused);
            }
            Renewal::Done(Err(err)) => {
                shared.metrics.renewal_failed(false);
                tracing::warn!(key = %shared.key, %err, "lease renewal failed; retrying");
                last_error = Some(err.to_string());
                // Retry sooner than the normal cadence, but leave time for a few tries
                // before the lease may have expired.
                let now = Instant::now();
                let left = shared.loss_deadline().saturating_duration_since(now);
                let retry_in = (left / 4).clamp(Duration::from_millis(10), every);
                next_renewal = Some(now + retry_in);
            }
            Renewal::Ended(reason) => break Some(reason),
        }
    };
    match outcome {
        Some(reason) => {
            shared.metrics.lost(&reason);
            holding.ended("lost");
            drop(holding);
            shared.mark_lost(reason);
            // Whatever the store still keeps of the lease (a record, a session) goes now;
            // answering commands that arrive meanwhile with "not held".
            inbox.close();
            let _ = release_bounded(&shared, lease).await;
        }
        None => {
            // The Lease was dropped: release in its place.
            if let Err(err) = release_bounded(&shared, lease).await {
                tracing::warn!(key = %shared.key, %err, "background release of a dropped lease failed; it ends at its TTL");
            }
            drop(holding);
            shared.give_up_turn();
        }
    }
}

enum Renewal {
    Done(Result<bool>),
    Ended(LossReason),
}

/// One renewal, bounded by a fraction of the TTL and by the moment the lease may have
/// expired, while still listening for the store's end signal.
async fn renew_bounded(
    shared: &Shared,
    lease: &mut Box<dyn HeldLease>,
    ended: &mut crate::core::backend::EndSignal,
    ttl: Duration,
    by_hand: bool,
) -> Renewal {
    let now = Instant::now();
    let expires = shared.backend.capabilities().expires;
    // The background renewal retries at its own cadence, so one call may take a third of
    // the TTL; an `extend` by hand is answered once, and may use all the time the lease
    // surely has left (or, for a lease tied to a session, at least a second).
    let until = match (by_hand, expires) {
        (true, true) => shared.loss_deadline().max(now + renewal_limit(shared.ttl)),
        (true, false) => now + renewal_limit(shared.ttl).max(Duration::from_secs(1)),
        (false, true) => (now + renewal_limit(shared.ttl)).min(shared.loss_deadline()),
        (false, false) => now + renewal_limit(shared.ttl),
    };
    let span = tracing::info_span!(
        "dlock.renew",
        key = %shared.key,
        backend = shared.backend.describe(),
        fence = shared.fence,
        by_hand,
    );
    let renewal = tokio::time::timeout_at(until.into(), lease.renew(ttl)).instrument(span);
    tokio::select! {
        biased;
        reason = ended => Renewal::Ended(reason),
        outcome = renewal => Renewal::Done(outcome.unwrap_or_else(|_| Err(Error::unavailable(
            shared.backend.describe(),
            "renewal did not answer in time",
        )))),
    }
}

/// The release, bounded: a store that does not answer lets the lease end at its TTL (or
/// with its session, whose handle is dropped here).
async fn release_bounded(shared: &Shared, lease: Box<dyn HeldLease>) -> Result<bool> {
    // A release may take the time the lease surely has left: answered by then, it tells
    // the truth; a store that is merely slow (busy, or serving one request at a time)
    // is not reported as unreachable.
    let left = shared
        .loss_deadline()
        .saturating_duration_since(Instant::now());
    let limit = left
        .max(renewal_limit(shared.ttl))
        .max(Duration::from_secs(1));
    let span = tracing::info_span!(
        "dlock.release",
        key = %shared.key,
        backend = shared.backend.describe(),
        fence = shared.fence,
    );
    match tokio::time::timeout(limit, lease.release())
        .instrument(span)
        .await
    {
        Ok(outcome) => outcome,
        Err(_) => Err(Error::unavailable(
            shared.backend.describe(),
            "release did not answer in time; the lease ends at its TTL",
        )),
    }
}
