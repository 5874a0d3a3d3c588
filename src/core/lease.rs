//! [`Lease`]: a held lock, renewed in the background until released or dropped.

use crate::core::backend::Backend;
use crate::core::local_queue::LocalTurn;
use crate::core::owner::Owner;
use crate::error::{Error, LossReason, Result};
use crate::key::Key;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

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
    /// Wakes the background task after a manual `extend`.
    extended: Notify,
    lost: watch::Sender<Option<LossReason>>,
    /// Keeps other tasks of this handle queued behind this lease; given up after the
    /// backend release (so the next local task finds the key free), or as soon as the
    /// lease is lost (so a holder that keeps its lost lease cannot block its own handle).
    turn: Mutex<Option<LocalTurn>>,
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
        self.extended.notify_one();
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

/// What the backend granted: the lease's identity and when its TTL started counting.
pub(crate) struct Grant {
    pub(crate) key: Key,
    pub(crate) owner: Owner,
    pub(crate) fence: u64,
    pub(crate) ttl: Duration,
    /// When the successful request was sent: the lease is surely valid until then + TTL.
    pub(crate) sent_at: Instant,
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
/// # async fn main() -> Result<(), dlock::Error> {
/// let locks = dlock::connect("memory://").await?;
/// let lease = locks.lock("invoice-42").acquire().await?;
/// // Pass the fence to the protected store so it can reject a stale holder's writes.
/// println!("holding {} with fence {}", lease.key(), lease.fence());
/// assert!(lease.release().await?);
/// # Ok(()) }
/// ```
pub struct Lease {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
    released: bool,
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

    /// Starts the background task that renews the lease (every `renew_every`, if given)
    /// and watches for its loss.
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
        } = grant;
        let (lost, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            key,
            owner,
            fence,
            ttl,
            backend,
            valid_until: Mutex::new(sent_at + ttl),
            extended: Notify::new(),
            lost,
            turn: Mutex::new(turn),
        });
        let task = tokio::spawn(guard_lease(Arc::clone(&shared), renew_every));
        Lease {
            shared,
            task: Some(task),
            released: false,
        }
    }

    /// A cloneable view of this lease (identity and loss signal).
    pub fn handle(&self) -> LeaseHandle {
        LeaseHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Extends the lease to `ttl` from now, checked against the owner token. Needed only
    /// when automatic renewal is off ([`LockBuilder::auto_renew`](crate::LockBuilder::auto_renew)).
    ///
    /// Fails with [`Error::LeaseLost`] if the backend no longer knows this lease as held.
    pub async fn extend(&self, ttl: Duration) -> Result<()> {
        let sent = Instant::now();
        let held = self
            .shared
            .backend
            .renew(&self.shared.key, &self.shared.owner, ttl)
            .await?;
        if held {
            self.shared.set_valid_until(sent + ttl);
            Ok(())
        } else {
            self.shared.mark_lost(LossReason::RenewalRefused);
            Err(self.shared.lost_error(LossReason::RenewalRefused))
        }
    }

    /// Releases the lock now. Returns `true` if the lease was still held, `false` if it
    /// had already been lost (expired, or broken by `release --force`).
    pub async fn release(mut self) -> Result<bool> {
        self.released = true;
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let held = self
            .shared
            .backend
            .release(&self.shared.key, &self.shared.owner)
            .await;
        self.shared.give_up_turn();
        held
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if self.released {
            // release() ran (or was cancelled midway): the local queue moves on either way.
            self.shared.give_up_turn();
            return;
        }
        let shared = Arc::clone(&self.shared);
        let release = async move {
            if let Err(err) = shared.backend.release(&shared.key, &shared.owner).await {
                tracing::warn!(key = %shared.key, %err, "background release of a dropped lease failed; it ends at its TTL");
            }
            shared.give_up_turn();
        };
        spawn_detached(release);
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

/// The lease's background task: renews on schedule, and marks the lease lost when a
/// renewal is refused, when the lease may have expired, or when the backend session
/// holding it ends.
async fn guard_lease(shared: Arc<Shared>, renew_every: Option<Duration>) {
    let expires = shared.backend.capabilities().expires;
    let session_ended = shared.backend.session_ended(&shared.key, &shared.owner);
    tokio::pin!(session_ended);
    let mut next_renewal = renew_every.map(|every| Instant::now() + every);
    let mut last_error: Option<String> = None;
    loop {
        let loss_deadline = shared.loss_deadline();
        let lapse = async {
            if expires {
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
        tokio::select! {
            detail = &mut session_ended => {
                shared.mark_lost(LossReason::SessionEnded { detail });
                return;
            }
            () = lapse => {
                shared.mark_lost(match last_error.take() {
                    Some(last_error) => LossReason::RenewalFailed { last_error },
                    None => LossReason::Expired,
                });
                return;
            }
            () = shared.extended.notified() => continue,
            () = renewal_due => {}
        }
        let Some(every) = renew_every else { continue };
        let sent = Instant::now();
        let renewal = shared.backend.renew(&shared.key, &shared.owner, shared.ttl);
        let outcome = if expires {
            match tokio::time::timeout_at(loss_deadline.into(), renewal).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Error::unavailable(
                    shared.backend.describe(),
                    "renewal did not answer before the lease may have expired",
                )),
            }
        } else {
            renewal.await
        };
        match outcome {
            Ok(true) => {
                *shared
                    .valid_until
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = sent + shared.ttl;
                last_error = None;
                next_renewal = Some(sent + every);
            }
            Ok(false) => {
                shared.mark_lost(LossReason::RenewalRefused);
                return;
            }
            Err(err) => {
                tracing::warn!(key = %shared.key, %err, "lease renewal failed; retrying");
                last_error = Some(err.to_string());
                // Retry sooner than the normal cadence, but leave time for a few tries
                // before the lease may have expired.
                let now = Instant::now();
                let left = shared.loss_deadline().saturating_duration_since(now);
                let retry_in = (left / 4).clamp(Duration::from_millis(10), every);
                next_renewal = Some(now + retry_in);
            }
        }
    }
}
