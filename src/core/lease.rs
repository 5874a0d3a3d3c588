//! [`Lease`]: a held lock, renewed in the background until released or dropped.

use crate::core::backend::{Backend, HeldLease};
use crate::core::local_queue::LocalTurn;
use crate::core::metrics::{Holding, Labels};
use crate::core::owner::Owner;
use crate::error::{Error, LossReason, Result};
use crate::key::Key;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};
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
    /// Why the lease may no longer be held, once it may not.
    lost: Mutex<Option<LossReason>>,
    /// Wakes every [`Lease::lost`] future when `lost` is set.
    lost_wake: Notify,
    /// What the [`Lease`] asks of its background task.
    mailbox: Mailbox,
    /// When the grant reached this process: hold-at-least times count from here.
    acquired_at: Instant,
    /// The hold limits the lease was taken with.
    hold: HoldLimits,
    /// The hold-at-most limit's end: when the winning request was sent, plus the limit.
    cap: Option<Instant>,
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

    /// The moment the lease ends by its hold-at-most limit, less the same drift
    /// allowance as [`loss_deadline`](Self::loss_deadline).
    fn cap_deadline(&self) -> Option<Instant> {
        let drift = self.ttl / 100 + Duration::from_millis(2);
        self.cap.map(|cap| cap.checked_sub(drift).unwrap_or(cap))
    }

    /// `ttl` for a renewal sent at `sent`, shortened so that the lease ends at its
    /// hold-at-most limit; `None` if too little is left for one (the limit's end comes first).
    fn capped_ttl(&self, ttl: Duration, sent: Instant) -> Option<Duration> {
        match self.cap {
            None => Some(ttl),
            Some(cap) => {
                let left = cap.saturating_duration_since(sent);
                (left >= crate::core::locks::MIN_TTL).then(|| ttl.min(left))
            }
        }
    }

    fn lost_reason(&self) -> Option<LossReason> {
        self.lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
        {
            let mut lost = self.lost.lock().unwrap_or_else(PoisonError::into_inner);
            if lost.is_some() {
                return;
            }
            tracing::warn!(key = %self.key, fence = self.fence, backend = self.backend.describe(), %reason, "lease lost");
            *lost = Some(reason);
        }
        self.lost_wake.notify_waiters();
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

/// How long a lease must stay held at least, and may stay held at most, after its
/// acquisition ([`LockBuilder::hold_at_least`](crate::LockBuilder::hold_at_least),
/// [`LockBuilder::hold_at_most`](crate::LockBuilder::hold_at_most)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HoldLimits {
    pub(crate) at_least: Option<Duration>,
    pub(crate) at_most: Option<Duration>,
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
    pub(crate) hold: HoldLimits,
    /// The kind of lease, for its metrics.
    pub(crate) kind: crate::core::backend::LockKind,
}

/// What a [`Lease`] asks of its background task, which alone owns the store-side handle.
enum Command {
    Extend(Duration, oneshot::Sender<Result<bool>>),
    Release(oneshot::Sender<Result<bool>>),
    /// Release, but not before this long after the acquisition.
    ReleaseAfter(Duration, oneshot::Sender<Result<bool>>),
}

/// The commands of a [`Lease`] to its background task: a queue and a wake-up. A channel
/// would do, but costs a block of slots per lease for a lease's whole life, and one
/// process may hold tens of thousands of leases.
#[derive(Default)]
struct Mailbox {
    state: Mutex<MailState>,
    wake: Notify,
}

#[derive(Default)]
struct MailState {
    commands: VecDeque<Command>,
    /// The [`Lease`] was dropped: no command will come, release it.
    dropped: bool,
    /// The task takes no more commands (it has ended, or is ending).
    closed: bool,
}

impl Mailbox {
    fn state(&self) -> std::sync::MutexGuard<'_, MailState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `command` for the task; gives it back if the task takes no more.
    fn post(&self, command: Command) -> std::result::Result<(), Command> {
        {
            let mut state = self.state();
            if state.closed {
                return Err(command);
            }
            state.commands.push_back(command);
        }
        // A stored permit if the task is busy: it looks again before it waits.
        self.wake.notify_one();
        Ok(())
    }

    fn lease_dropped(&self) {
        self.state().dropped = true;
        self.wake.notify_one();
    }

    /// The next command, or `None` once the lease is dropped with none left. Cancel
    /// safe: a command is taken only when this returns it.
    async fn next(&self) -> Option<Command> {
        loop {
            {
                let mut state = self.state();
                if let Some(command) = state.commands.pop_front() {
                    return Some(command);
                }
                if state.dropped {
                    return None;
                }
            }
            self.wake.notified().await;
        }
    }

    /// Takes no more commands; those queued are dropped, so their callers hear "not held".
    fn close(&self) {
        let queued = {
            let mut state = self.state();
            state.closed = true;
            std::mem::take(&mut state.commands)
        };
        drop(queued);
    }
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

        /// When the grant reached this process. A hold-at-least time
        /// ([`Lease::release_after`]) counts from here, a hold-at-most limit from the
        /// (earlier) moment the winning request was sent, so that each errs on its safe side.
        pub fn acquired_at(&self) -> Instant {
            self.shared.acquired_at
        }

        /// Resolves when the lease may no longer be held: a renewal was refused, renewal
        /// failed until the lease may have expired, or the backend session holding it
        /// ended. Never resolves for a lease that stays held or is released normally.
        /// Can be called any number of times; each future resolves with the reason.
        pub fn lost(&self) -> impl Future<Output = LossReason> + Send + 'static {
            let shared = Arc::clone(&self.shared);
            async move {
                loop {
                    // Registered before the check, so a loss marked in between wakes it.
                    let notified = shared.lost_wake.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if let Some(reason) = shared.lost_reason() {
                        return reason;
                    }
                    notified.await;
                }
            }
        }

        /// True once the lease may no longer be held (see [`lost`](Self::lost)).
        pub fn is_lost(&self) -> bool {
            self.shared
                .lost
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
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
            hold,
            kind,
        } = grant;
        let metrics = Labels::new(backend.describe(), kind, key.as_str());
        let shared = Arc::new(Shared {
            key,
            owner,
            fence,
            ttl,
            backend,
            valid_until: Mutex::new(sent_at + ttl),
            acquired_at: Instant::now(),
            hold,
            cap: hold.at_most.and_then(|limit| sent_at.checked_add(limit)),
            lost: Mutex::new(None),
            lost_wake: Notify::new(),
            mailbox: Mailbox::default(),
            turn: Mutex::new(turn),
            metrics,
        });
        let task = tokio::spawn(guard_lease(Arc::clone(&shared), lease, renew_every));
        Lease {
            shared,
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
        if self.shared.mailbox.post(command(reply)).is_err() {
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
        if let Some(reason) = self.shared.lost_reason() {
            return Err(self.shared.lost_error(reason));
        }
        if self.ask(|reply| Command::Extend(ttl, reply)).await? {
            Ok(())
        } else {
            let reason = self
                .shared
                .lost_reason()
                .unwrap_or(LossReason::RenewalRefused);
            Err(self.shared.lost_error(reason))
        }
    }

    /// Releases the lock now, or, for a lease taken with
    /// [`hold_at_least`](crate::LockBuilder::hold_at_least), as
    /// [`release_after`](Lease::release_after) with that time. Returns `true` if the
    /// lease was still held, `false` if it had already been lost (expired, or broken by
    /// `release --force`).
    ///
    /// Cancel safety: if the future is dropped, the release still completes in the
    /// background.
    pub async fn release(self) -> Result<bool> {
        match self.shared.hold.at_least {
            Some(at_least) => self.release_after(at_least).await,
            None => self.release_now(Command::Release).await,
        }
    }

    /// Releases the lock, but not before `at_least` has passed since its
    /// [acquisition](Lease::acquired_at): a scheduled job that ends early keeps the key
    /// taken until then, so that a replica whose schedule fires a little later skips
    /// the run (ShedLock's *lock at least for*). Returns as [`release`](Lease::release) does.
    ///
    /// - On a backend whose leases expire by themselves ([`Capabilities::expires`](crate::backend::Capabilities):
    ///   Redis, Redlock, the SQL lease tables, etcd, MongoDB, DynamoDB, memory), the
    ///   lease's remaining lifetime is set in the store, measured by the store's clock
    ///   where it has one (`PEXPIRE`, an expiry column from the server's `now()`, an
    ///   etcd lease of that TTL, in whole seconds rounded up), and the call returns at
    ///   once: the process may exit, and the store ends the lease by itself.
    /// - On a backend whose locks die with their holder's session (file `flock`, the
    ///   PostgreSQL and MySQL session modes, ZooKeeper's ephemeral znodes), the lock
    ///   cannot outlive the process: the call keeps holding (and renewing) the lease
    ///   until the time is up, then releases it.
    ///
    /// With nothing left of the time, it is a plain release. A
    /// [hold-at-most](crate::LockBuilder::hold_at_most) limit wins over it. Fences are
    /// unaffected: the next holder gets a higher one, as after any release.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), fencelock::Error> {
    /// let locks = fencelock::connect("memory://release-after-doc").await?;
    /// let run = locks.lock("nightly-report").no_wait().acquire().await?;
    /// let first = run.fence();
    /// // ... the report, done quickly ...
    /// assert!(run.release_after(Duration::from_millis(300)).await?);
    /// // A replica whose schedule fires a moment later skips the run:
    /// assert!(locks.lock("nightly-report").try_acquire().await?.is_none());
    /// tokio::time::sleep(Duration::from_millis(400)).await;
    /// let next = locks.lock("nightly-report").try_acquire().await?.expect("free again");
    /// assert!(next.fence() > first);
    /// # Ok(()) }
    /// ```
    ///
    /// Fails with [`Error::BadOption`] for a time longer than
    /// [`MAX_TTL`](crate::MAX_TTL) (no store keeps a lease that long), and as
    /// [`release`](Lease::release) does when the store cannot be reached (the lease then
    /// ends at its TTL).
    ///
    /// Cancel safety: dropping the future while it holds a session-bound lock releases
    /// the lock at once (in the background); a lifetime already set in the store stands.
    pub async fn release_after(self, at_least: Duration) -> Result<bool> {
        if at_least > crate::core::locks::MAX_TTL {
            return Err(Error::BadOption(format!(
                "hold-at-least {} is longer than the longest lease, {}",
                crate::duration::format_duration(at_least),
                crate::duration::format_duration(crate::core::locks::MAX_TTL)
            )));
        }
        self.release_now(|reply| Command::ReleaseAfter(at_least, reply))
            .await
    }

    async fn release_now(
        mut self,
        command: impl FnOnce(oneshot::Sender<Result<bool>>) -> Command,
    ) -> Result<bool> {
        let held = self.ask(command).await;
        // The task has handed the store-side lease back (or given it up): nothing is left
        // for Drop to do.
        self.task = None;
        held
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The background task hears of it and releases the lease itself, without
        // blocking the dropping thread (after a release, it has ended already).
        let _ = self.task.take();
        self.shared.mailbox.lease_dropped();
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
// The store calls below are boxed: they run for a moment every TTL/3, while the task
// waits the rest of the time, and a task is as large as the largest future it holds.
async fn guard_lease(
    shared: Arc<Shared>,
    mut lease: Box<dyn HeldLease>,
    renew_every: Option<Duration>,
) {
    let shared: &Shared = &shared;
    // However the task ends, even dropped with its runtime, a command from now on is
    // answered "not held".
    let _closed = CloseOnEnd(&shared.mailbox);
    let expires = shared.backend.capabilities().expires;
    // Counts this lease in the holder gauge until the task ends, however it ends.
    let mut holding: Holding<'_> = shared.metrics.holding();
    let mut ended = lease.ended();
    let mut next_renewal = renew_every.map(|every| renewal_due(Instant::now(), every));
    let mut last_error: Option<String> = None;
    // A release waiting for its hold-at-least time (session-bound backends only).
    let mut held_until: Option<(Instant, oneshot::Sender<Result<bool>>)> = None;
    let outcome: Option<LossReason> = loop {
        // A lease tied to a session lapses only when renewals keep failing: the store
        // never expires it on its own, but a holder that cannot reach its store for a TTL
        // cannot claim to hold it either.
        let lapses = expires || last_error.is_some();
        let hold_over = held_until.as_ref().map(|(at, _)| *at);
        // One timer for the earliest deadline (a lease's task is most of what a held
        // lease costs, and each armed timer, like each value kept across the wait, adds
        // to it); which deadline is due is worked out after it fires.
        let wake = deadlines(shared, lapses, hold_over, next_renewal)
            .iter()
            .filter_map(|(at, _)| *at)
            .min();
        let ttl = tokio::select! {
            biased;
            reason = &mut ended => break Some(reason),
            () = sleep_until(wake) => match due_now(shared, lapses, hold_over, next_renewal) {
                // Woken a hair early: look again.
                None => continue,
                Some(Due::Cap) => break Some(LossReason::HoldLimit {
                    limit: shared.hold.at_most.unwrap_or_default(),
                }),
                Some(Due::Lapse) => break Some(match last_error.take() {
                    Some(last_error) => LossReason::RenewalFailed { last_error },
                    None => LossReason::Expired,
                }),
                Some(Due::HoldOver) => {
                    if let Some((_, reply)) = held_until.take() {
                        Box::pin(finish_release(shared, lease, reply, holding)).await;
                    }
                    return;
                }
                Some(Due::Renewal) => shared.ttl,
            },
            command = shared.mailbox.next() => match command {
                None => break None,
                Some(Command::Release(reply)) => {
                    Box::pin(finish_release(shared, lease, reply, holding)).await;
                    return;
                }
                Some(Command::ReleaseAfter(at_least, reply)) => {
                    let until = shared.acquired_at.checked_add(at_least).unwrap_or_else(Instant::now);
                    let until = shared.cap_deadline().map_or(until, |cap| until.min(cap));
                    let left = until.saturating_duration_since(Instant::now());
                    if left < crate::core::locks::MIN_TTL {
                        Box::pin(finish_release(shared, lease, reply, holding)).await;
                        return;
                    }
                    if !expires {
                        // The lock dies with this process's session: keep it until then.
                        held_until = Some((until, reply));
                        continue;
                    }
                    match Box::pin(hand_over_bounded(shared, lease, &mut ended, left)).await {
                        Renewal::Done(Ok(true)) => {
                            tracing::debug!(key = %shared.key, fence = shared.fence, left = ?left, "lease left to expire in the store");
                            holding.ended("released");
                            drop(holding);
                            shared.give_up_turn();
                            let _ = reply.send(Ok(true));
                        }
                        Renewal::Done(Ok(false)) => {
                            shared.metrics.lost(&LossReason::RenewalRefused);
                            holding.ended("lost");
                            drop(holding);
                            shared.mark_lost(LossReason::RenewalRefused);
                            let _ = reply.send(Ok(false));
                        }
                        Renewal::Done(Err(err)) => {
                            drop(holding);
                            shared.give_up_turn();
                            let _ = reply.send(Err(err));
                        }
                        Renewal::Ended(reason) => {
                            shared.metrics.lost(&reason);
                            holding.ended("lost");
                            drop(holding);
                            shared.mark_lost(reason);
                            let _ = reply.send(Ok(false));
                        }
                    }
                    return;
                }
                Some(Command::Extend(ttl, reply)) => {
                    let sent = Instant::now();
                    let Some(ttl) = shared.capped_ttl(ttl, sent) else {
                        // The hold-at-most limit ends the lease before this TTL would.
                        let _ = reply.send(Ok(true));
                        continue;
                    };
                    let outcome = Box::pin(renew_bounded(shared, &mut lease, &mut ended, ttl, true)).await;
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
        };
        let Some(every) = renew_every else { continue };
        let sent = Instant::now();
        let Some(ttl) = shared.capped_ttl(ttl, sent) else {
            // Too little is left before the hold-at-most limit: that ends the lease.
            next_renewal = None;
            continue;
        };
        match Box::pin(renew_bounded(shared, &mut lease, &mut ended, ttl, false)).await {
            Renewal::Done(Ok(true)) => {
                shared.set_valid_until(sent + ttl);
                shared.metrics.renewed();
                last_error = None;
                next_renewal = Some(renewal_due(sent, every));
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
            shared.mailbox.close();
            let _ = Box::pin(release_bounded(shared, lease)).await;
            if let Some((_, reply)) = held_until.take() {
                let _ = reply.send(Ok(false));
            }
        }
        None => {
            // The Lease was dropped: release in its place.
            if let Err(err) = Box::pin(release_bounded(shared, lease)).await {
                tracing::warn!(key = %shared.key, %err, "background release of a dropped lease failed; it ends at its TTL");
            }
            drop(holding);
            shared.give_up_turn();
        }
    }
}

/// Closes a lease's mailbox when its task ends.
struct CloseOnEnd<'a>(&'a Mailbox);

impl Drop for CloseOnEnd<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The deadlines of a lease's task, in the order they are taken when several are due:
/// the hold-at-most limit, the lease's lapse (if it can lapse), a release waiting for its
/// hold-at-least time, the next renewal.
fn deadlines(
    shared: &Shared,
    lapses: bool,
    hold_over: Option<Instant>,
    next_renewal: Option<Instant>,
) -> [(Option<Instant>, Due); 4] {
    [
        (shared.cap_deadline(), Due::Cap),
        (lapses.then(|| shared.loss_deadline()), Due::Lapse),
        (hold_over, Due::HoldOver),
        (next_renewal, Due::Renewal),
    ]
}

/// The first deadline due now, in the order of [`deadlines`].
fn due_now(
    shared: &Shared,
    lapses: bool,
    hold_over: Option<Instant>,
    next_renewal: Option<Instant>,
) -> Option<Due> {
    let now = Instant::now();
    deadlines(shared, lapses, hold_over, next_renewal)
        .iter()
        .find(|(at, _)| at.is_some_and(|at| at <= now))
        .map(|(_, due)| *due)
}

/// The width of the grid that renewals are brought forward onto.
pub(crate) const RENEWAL_SLOT: Duration = Duration::from_millis(50);

/// When a renewal sent at `sent` is next due: `every` later, brought forward onto a grid
/// of [`RENEWAL_SLOT`]s shared by every lease of the process.
///
/// Leases taken one after another would otherwise renew one after another, each waking
/// the runtime on its own; on the grid, the renewals of a slot fire on one timer tick
/// and reach the store together, where a backend can send them as one statement. A
/// renewal only ever moves *earlier*, by less than a slot, so no lease is renewed later
/// than its cadence says; cadences shorter than four slots stay off the grid, where
/// bringing a renewal forward would be a large part of its interval.
fn renewal_due(sent: Instant, every: Duration) -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let due = sent + every;
    if every < RENEWAL_SLOT * 4 {
        return due;
    }
    let origin = *ORIGIN.get_or_init(|| sent);
    let into_slot = due.saturating_duration_since(origin).as_nanos() % RENEWAL_SLOT.as_nanos();
    // Less than a slot, so it fits in u64 nanoseconds.
    let into_slot = Duration::from_nanos(u64::try_from(into_slot).unwrap_or(0));
    due.checked_sub(into_slot).unwrap_or(due)
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The deadlines of a lease's task.
#[derive(Clone, Copy)]
enum Due {
    /// The hold-at-most limit ends the lease.
    Cap,
    /// The lease may have expired.
    Lapse,
    /// A release waiting for its hold-at-least time may go.
    HoldOver,
    /// The next renewal.
    Renewal,
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

/// Releases the lease and answers the caller. The next local task may go once the store
/// has the release: at its reply, or, where the release keeps the call order
/// ([`HeldLease::release_keeps_call_order`]), as soon as it is sent.
async fn finish_release(
    shared: &Shared,
    lease: Box<dyn HeldLease>,
    reply: oneshot::Sender<Result<bool>>,
    mut holding: Holding<'_>,
) {
    let keeps_order = lease.release_keeps_call_order();
    let mut release = std::pin::pin!(release_bounded(shared, lease));
    if keeps_order {
        // One poll puts the release on the connection; the next task's acquire, sent
        // after it, is run after it.
        let first = std::future::poll_fn(|cx| Poll::Ready(release.as_mut().poll(cx))).await;
        holding.ended("released");
        drop(holding);
        shared.give_up_turn();
        let released = match first {
            Poll::Ready(released) => released,
            Poll::Pending => release.await,
        };
        let _ = reply.send(released);
        return;
    }
    let released = release.await;
    holding.ended("released");
    drop(holding);
    shared.give_up_turn();
    let _ = reply.send(released);
}

/// Sets the lease to end by itself `left` from now in the store and lets go of it,
/// bounded like an `extend` by hand, while still listening for the store's end signal.
async fn hand_over_bounded(
    shared: &Shared,
    lease: Box<dyn HeldLease>,
    ended: &mut crate::core::backend::EndSignal,
    left: Duration,
) -> Renewal {
    let now = Instant::now();
    let until = shared.loss_deadline().max(now + renewal_limit(shared.ttl));
    let call = tokio::time::timeout_at(until.into(), lease.expire_after(left));
    tokio::select! {
        biased;
        reason = ended => Renewal::Ended(reason),
        outcome = call => Renewal::Done(outcome.unwrap_or_else(|_| Err(Error::unavailable(
            shared.backend.describe(),
            "setting the lease's remaining lifetime did not answer in time; it ends at its TTL",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_move_earlier_by_less_than_a_slot_onto_one_grid() {
        let every = Duration::from_secs(10);
        let start = Instant::now();
        let mut dues = Vec::new();
        for step_ms in 0..200 {
            let sent = start + Duration::from_millis(step_ms * 7);
            let due = renewal_due(sent, every);
            assert!(due <= sent + every, "a renewal never moves later");
            assert!(
                sent + every - due < RENEWAL_SLOT,
                "a renewal moves earlier by less than a slot"
            );
            dues.push(due);
        }
        dues.dedup();
        // 200 leases sent over 1.4 s share the 28 or 29 slots of that span.
        assert!(dues.len() <= 30, "{} distinct renewal instants", dues.len());
        for pair in dues.windows(2) {
            let gap = pair[1] - pair[0];
            assert_eq!(gap.as_nanos() % RENEWAL_SLOT.as_nanos(), 0, "{gap:?}");
        }
    }

    #[test]
    fn short_cadences_stay_off_the_grid() {
        let sent = Instant::now() + Duration::from_millis(13);
        let every = RENEWAL_SLOT * 4 - Duration::from_millis(1);
        assert_eq!(renewal_due(sent, every), sent + every);
    }
}
