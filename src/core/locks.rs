//! [`Locks`], the handle on one backend, and [`LockBuilder`], the options of one lock.

use crate::core::backend::{AcquireRequest, Attempt, Backend, Holder, LockInfo, LockKind};
use crate::core::backoff::Backoff;
use crate::core::lease::{spawn_detached, Grant, HoldLimits, Lease, LeaseHandle};
use crate::core::local_queue::{LocalQueues, LocalTurn};
use crate::core::metrics::{self, Labels};
use crate::core::owner::Owner;
use crate::core::wait;
use crate::error::{Error, Result};
use crate::key::Key;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// The TTL of a lease unless set otherwise (SPEC §4).
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// The shortest TTL accepted: renewal at TTL/3 must be able to make a round trip.
pub const MIN_TTL: Duration = Duration::from_millis(30);

/// The longest TTL accepted (a year): longer ones would overflow clock arithmetic, here
/// and in the stores.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A handle on one lock backend. Cheap to clone and share across tasks.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), fencelock::Error> {
/// let locks = fencelock::connect("memory://").await?;
/// let other = locks.clone(); // same backend, usable from another task
/// let lease = locks.lock("migrations").acquire().await?;
/// assert!(other.lock("migrations").try_acquire().await?.is_none());
/// lease.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Locks {
    backend: Arc<dyn Backend>,
    queues: Arc<LocalQueues>,
}

impl Locks {
    /// Connects to the backend named by `url` (SPEC §3). Same as [`crate::connect`].
    pub async fn connect(url: &str) -> Result<Locks> {
        Ok(Locks::from_arc(crate::registry::open(url).await?))
    }

    /// Wraps a backend of your own.
    pub fn from_backend(backend: impl Backend) -> Locks {
        Locks::from_arc(Arc::new(backend))
    }

    /// Wraps a shared backend.
    pub fn from_arc(backend: Arc<dyn Backend>) -> Locks {
        Locks {
            backend,
            queues: Arc::default(),
        }
    }

    /// The backend, for backend-specific use.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The backend's URL with any password hidden, for messages.
    pub fn describe(&self) -> &str {
        self.backend.describe()
    }

    /// Starts describing a lock on `key`; an invalid key is reported when acquiring.
    pub fn lock(&self, key: impl AsRef<str>) -> LockBuilder {
        LockBuilder {
            locks: self.clone(),
            key: Key::new(key.as_ref()),
            ttl: DEFAULT_TTL,
            wait: Wait::Forever,
            backoff: Backoff::default(),
            renew_every: Some(DEFAULT_TTL / 3),
            renew_set: false,
            hold: HoldLimits::default(),
            kind: LockKind::Exclusive,
            value: None,
        }
    }

    /// Starts describing an all-or-nothing lock on several keys: see
    /// [`MultiLockBuilder`]. Keys are taken one by one in one canonical order (sorted,
    /// duplicates once), so two callers asking for overlapping sets in any order cannot
    /// deadlock; if any key cannot be had before the deadline, the keys already taken are
    /// released and nothing is held.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), fencelock::Error> {
    /// let locks = fencelock::connect("memory://").await?;
    /// let both = locks.lock_all(["account-7", "account-3"]).acquire().await?;
    /// assert_eq!(both.keys().collect::<Vec<_>>(), ["account-3", "account-7"]);
    /// assert!(locks.lock("account-3").try_acquire().await?.is_none());
    /// both.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn lock_all<I>(&self, keys: I) -> crate::core::multi::MultiLockBuilder
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let keys: Result<Vec<Key>> = keys.into_iter().map(|k| Key::new(k.as_ref())).collect();
        crate::core::multi::MultiLockBuilder::new(self.lock("-"), keys)
    }

    /// Starts a campaign for the leadership of `name`, publishing `value` (an address, a
    /// host name) to whoever asks [`leader`](Locks::leader): see
    /// [`ElectionBuilder`](crate::ElectionBuilder).
    ///
    /// An election is an exclusive lease on the key `name` whose holder record carries
    /// `value`; the term is the lease's fence, so a newer leader always has a higher term.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), fencelock::Error> {
    /// let locks = fencelock::connect("memory://").await?;
    /// let leadership = locks.elect("scheduler", "10.0.0.7:8080").campaign().await?;
    /// let leader = locks.leader("scheduler").await?.expect("somebody leads");
    /// assert_eq!(leader.value.as_deref(), Some("10.0.0.7:8080"));
    /// assert_eq!(leader.term, leadership.term());
    /// leadership.resign().await?;
    /// assert!(locks.leader("scheduler").await?.is_none());
    /// # Ok(()) }
    /// ```
    pub fn elect(
        &self,
        name: impl AsRef<str>,
        value: impl Into<String>,
    ) -> crate::core::election::ElectionBuilder {
        let mut builder = self.lock(name);
        builder.value = Some(value.into());
        crate::core::election::ElectionBuilder::new(builder)
    }

    /// Who leads `name` now (its value and term), or `None` if nobody does.
    pub async fn leader(
        &self,
        name: impl AsRef<str>,
    ) -> Result<Option<crate::core::election::Leader>> {
        Ok(self
            .status(name)
            .await?
            .and_then(crate::core::election::Leader::from_info))
    }

    /// Observes the leadership of `name`: each [`changed`](crate::LeaderWatch::changed)
    /// resolves when the leader (or its term) differs from the one last reported.
    pub fn watch_leader(&self, name: impl AsRef<str>) -> crate::core::election::LeaderWatch {
        crate::core::election::LeaderWatch::new(self.clone(), name.as_ref())
    }

    /// Starts describing one permit of the semaphore `key`: at most `permits` leases on
    /// the key at once, each a lease of its own (owner token, TTL, renewal, loss signal,
    /// fence). Every holder must agree on `permits`; a holder that asks with another
    /// count gets a typed error instead of over-admission.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), fencelock::Error> {
    /// let locks = fencelock::connect("memory://").await?;
    /// let a = locks.semaphore("api-slots", 2).acquire().await?;
    /// let b = locks.semaphore("api-slots", 2).acquire().await?;
    /// assert!(locks.semaphore("api-slots", 2).try_acquire().await?.is_none());
    /// assert!(a.fence() < b.fence());
    /// # Ok(()) }
    /// ```
    pub fn semaphore(&self, key: impl AsRef<str>, permits: u32) -> LockBuilder {
        LockBuilder {
            kind: LockKind::Semaphore { permits },
            ..self.lock(key)
        }
    }

    /// Runs `work` while holding `key` with default options; see [`LockBuilder::run`].
    pub async fn with_lock<F, Fut, T>(&self, key: impl AsRef<str>, work: F) -> Result<T>
    where
        F: FnOnce(LeaseHandle) -> Fut,
        Fut: Future<Output = T>,
    {
        self.lock(key).run(work).await
    }

    /// Who holds `key`, if anybody.
    pub async fn status(&self, key: impl AsRef<str>) -> Result<Option<LockInfo>> {
        let key = Key::new(key.as_ref())?;
        self.admin_call(self.backend.inspect(&key)).await
    }

    /// Every lock currently held on this backend.
    pub async fn list(&self) -> Result<Vec<LockInfo>> {
        self.admin_call(self.backend.list()).await
    }

    /// Breaks the lock on `key` whoever holds it (an operator's tool); `true` if it was
    /// held. The holder's [`Lease::lost`] fires at its next renewal.
    pub async fn force_release(&self, key: impl AsRef<str>) -> Result<bool> {
        let key = Key::new(key.as_ref())?;
        self.admin_call(self.backend.force_release(&key)).await
    }

    /// Bounds an operator's call: a store that does not answer is reported, not waited for.
    async fn admin_call<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(ADMIN_CALL_LIMIT, call).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::unavailable(
                self.describe(),
                format!(
                    "no answer within {}",
                    crate::duration::format_duration(ADMIN_CALL_LIMIT)
                ),
            )),
        }
    }
}

/// How long `status`, `list` and `release --force` wait for the store.
const ADMIN_CALL_LIMIT: Duration = Duration::from_secs(10);

/// How long [`LockBuilder::acquire`] waits for a held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// One attempt only.
    No,
    /// Up to this long.
    For(Duration),
    /// Without limit (the default, as flock(1)).
    Forever,
}

/// The options of one lock: TTL, waiting, backoff and renewal.
///
/// ```
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), fencelock::Error> {
/// let locks = fencelock::connect("memory://").await?;
/// let lease = locks
///     .lock("nightly-report")
///     .ttl(Duration::from_secs(10))
///     .wait_for(Duration::from_secs(2))
///     .acquire()
///     .await?;
/// # drop(lease);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a LockBuilder does nothing until acquire(), try_acquire() or run() is called"]
pub struct LockBuilder {
    locks: Locks,
    key: Result<Key>,
    ttl: Duration,
    wait: Wait,
    backoff: Backoff,
    renew_every: Option<Duration>,
    renew_set: bool,
    hold: HoldLimits,
    kind: LockKind,
    /// Published in the holder record (elections).
    pub(crate) value: Option<String>,
}

impl LockBuilder {
    /// The lease's TTL (default 30 s, at least 30 ms).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        if !self.renew_set {
            self.renew_every = Some(ttl / 3);
        }
        self
    }

    /// How long to wait for a held lock.
    pub fn wait(mut self, wait: Wait) -> Self {
        self.wait = wait;
        self
    }

    /// Wait up to `limit` for a held lock.
    pub fn wait_for(self, limit: Duration) -> Self {
        self.wait(Wait::For(limit))
    }

    /// Take a shared (read) lease: readers share the key, while a writer (the default,
    /// exclusive kind) excludes every reader and writer.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), fencelock::Error> {
    /// let locks = fencelock::connect("memory://").await?;
    /// let r1 = locks.lock("catalog").shared().acquire().await?;
    /// let r2 = locks.lock("catalog").shared().acquire().await?;
    /// assert!(locks.lock("catalog").try_acquire().await?.is_none()); // a writer waits
    /// # drop((r1, r2));
    /// # Ok(()) }
    /// ```
    pub fn shared(mut self) -> Self {
        self.kind = LockKind::Shared;
        self
    }

    /// Do not wait: one attempt only.
    pub fn no_wait(self) -> Self {
        self.wait(Wait::No)
    }

    /// Retry delays for backends that cannot notify waiters (default 5 ms doubling to 1 s,
    /// jittered). Backends with notifications are woken at release instead, and every
    /// waiter retries no later than the holder's expiry.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff { min, max };
        self
    }

    /// Renew automatically (the default, every TTL/3), or not: then the holder must call
    /// [`Lease::extend`] in time, or the lease is lost when its TTL runs out.
    pub fn auto_renew(mut self, on: bool) -> Self {
        self.renew_set = true;
        self.renew_every = on.then_some(self.ttl / 3);
        self
    }

    /// Renew every `every` instead of every TTL/3 (must be shorter than the TTL).
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_set = true;
        self.renew_every = Some(every);
        self
    }

    /// Keep the key taken for at least `at_least` after the acquisition, even if the
    /// lease is released sooner: [`Lease::release`] then acts as
    /// [`Lease::release_after`] with this time, which says what happens on each kind of
    /// backend. For scheduled jobs run by several replicas: the first to fire runs the
    /// job, and one firing a little later (clock skew, a slow cron) finds the key still
    /// taken and skips it. A dropped lease is released at once, without the wait.
    ///
    /// ```
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), fencelock::Error> {
    /// let locks = fencelock::connect("memory://hold-at-least-doc").await?;
    /// let run = locks
    ///     .lock("nightly-report")
    ///     .hold_at_least(Duration::from_secs(300))
    ///     .no_wait()
    ///     .acquire()
    ///     .await?;
    /// // ... the report, done in a few seconds ...
    /// run.release().await?; // the key stays taken until 5 minutes after the acquisition
    /// assert!(locks.lock("nightly-report").try_acquire().await?.is_none());
    /// # Ok(()) }
    /// ```
    pub fn hold_at_least(mut self, at_least: Duration) -> Self {
        self.hold.at_least = Some(at_least);
        self
    }

    /// Never hold the lease longer than `at_most` after the acquisition (counted from
    /// when the winning request was sent): the lease is taken with a TTL no longer than
    /// that, renewals and [`Lease::extend`] never lengthen it past that moment (the last
    /// renewal sets exactly what is left, so a store with TTLs ends it then by its own
    /// clock even if this process hangs), and when the moment comes the lease is
    /// released and [`Lease::lost`] fires with [`LossReason::HoldLimit`](crate::LossReason::HoldLimit):
    /// stop the work then (`dlock run` stops COMMAND and exits 76, as for any loss).
    ///
    /// ```
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), fencelock::Error> {
    /// let locks = fencelock::connect("memory://").await?;
    /// let lease = locks
    ///     .lock("cache-warmup")
    ///     .hold_at_most(Duration::from_millis(200))
    ///     .acquire()
    ///     .await?;
    /// let reason = lease.lost().await; // the job overran its limit
    /// assert!(matches!(reason, fencelock::LossReason::HoldLimit { .. }));
    /// # Ok(()) }
    /// ```
    pub fn hold_at_most(mut self, at_most: Duration) -> Self {
        self.hold.at_most = Some(at_most);
        self
    }

    /// This builder with its TTL shortened to a hold-at-most limit below it (and the
    /// renewal interval with it, unless set by hand); `None` if there is nothing to shorten.
    fn capped_by_hold(&self) -> Option<LockBuilder> {
        let at_most = self
            .hold
            .at_most
            .filter(|limit| *limit < self.ttl && *limit >= MIN_TTL)?;
        let mut capped = self.clone();
        capped.ttl = at_most;
        if !capped.renew_set {
            capped.renew_every = Some(at_most / 3);
        }
        Some(capped)
    }

    /// The same options for another key (all-or-nothing locks).
    pub(crate) fn for_key(&self, key: Key) -> LockBuilder {
        LockBuilder {
            key: Ok(key),
            ..self.clone()
        }
    }

    /// Takes the lock, waiting as configured: `None` when the wait runs out.
    pub(crate) async fn acquire_or_none(&self) -> Result<Option<Lease>> {
        self.acquire_inner().await
    }

    pub(crate) fn wait_mode(&self) -> Wait {
        self.wait
    }

    pub(crate) fn locks(&self) -> &Locks {
        &self.locks
    }

    fn validate(&self) -> Result<Key> {
        let key = self.key.clone()?;
        if self.ttl < MIN_TTL {
            return Err(Error::BadOption(format!(
                "TTL {:?} is shorter than the minimum {:?}",
                self.ttl, MIN_TTL
            )));
        }
        if self.ttl > MAX_TTL {
            return Err(Error::BadOption(format!(
                "TTL {:?} is longer than the maximum {:?}",
                self.ttl, MAX_TTL
            )));
        }
        if let Some(every) = self.renew_every {
            if every.is_zero() || every >= self.ttl {
                return Err(Error::BadOption(format!(
                    "renewal interval {every:?} must be above zero and below the TTL {:?}",
                    self.ttl
                )));
            }
        }
        let HoldLimits { at_least, at_most } = self.hold;
        if let Some(at_most) = at_most {
            if !(MIN_TTL..=MAX_TTL).contains(&at_most) {
                return Err(Error::BadOption(format!(
                    "hold-at-most {:?} is outside {:?}..={:?}",
                    at_most, MIN_TTL, MAX_TTL
                )));
            }
        }
        if let Some(at_least) = at_least {
            if at_least > MAX_TTL {
                return Err(Error::BadOption(format!(
                    "hold-at-least {at_least:?} is longer than the longest lease, {MAX_TTL:?}"
                )));
            }
            if at_most.is_some_and(|at_most| at_least > at_most) {
                return Err(Error::BadOption(format!(
                    "hold-at-least {at_least:?} is longer than hold-at-most {:?}",
                    at_most.unwrap_or_default()
                )));
            }
        }
        if self.backoff.min.is_zero() || self.backoff.min > self.backoff.max {
            return Err(Error::BadOption(format!(
                "backoff min {:?} must be above zero and at most max {:?}",
                self.backoff.min, self.backoff.max
            )));
        }
        Ok(key)
    }

    /// Takes the lock, waiting as configured. Fails with [`Error::NotAcquired`] when the
    /// wait runs out.
    pub async fn acquire(self) -> Result<Lease> {
        let started = Instant::now();
        match self.acquire_inner().await? {
            Some(lease) => Ok(lease),
            None => Err(Error::NotAcquired {
                key: self.key.map(|k| k.to_string()).unwrap_or_default(),
                backend: self.locks.describe().to_owned(),
                waited: started.elapsed(),
            }),
        }
    }

    /// One attempt, without waiting: the lease, or `None` if the lock is held elsewhere.
    pub async fn try_acquire(self) -> Result<Option<Lease>> {
        self.no_wait().acquire_inner().await
    }

    /// Runs `work` while holding the lock, and releases it afterwards.
    ///
    /// If the lease is lost while `work` runs, `work` is cancelled (dropped at its next
    /// `.await`) and the result is [`Error::LeaseLost`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), fencelock::Error> {
    /// let locks = fencelock::connect("memory://").await?;
    /// let total = locks
    ///     .lock("payments")
    ///     .run(|lease| async move {
    ///         // ... write to the protected store, passing lease.fence() ...
    ///         lease.fence()
    ///     })
    ///     .await?;
    /// assert!(total > 0);
    /// # Ok(()) }
    /// ```
    pub async fn run<F, Fut, T>(self, work: F) -> Result<T>
    where
        F: FnOnce(LeaseHandle) -> Fut,
        Fut: Future<Output = T>,
    {
        let lease = self.acquire().await?;
        let handle = lease.handle();
        let lost = handle.lost();
        let outcome = tokio::select! {
            biased;
            reason = lost => Err(handle.lost_error(reason)),
            value = work(handle.clone()) => Ok(value),
        };
        match outcome {
            Ok(value) => {
                if let Err(err) = lease.release().await {
                    tracing::warn!(key = handle.key(), %err, "release after the guarded work failed; the lease ends at its TTL");
                }
                Ok(value)
            }
            Err(err) => {
                drop(lease);
                Err(err)
            }
        }
    }

    /// Takes the lock as configured, in a `dlock.acquire` span, recording the acquire's
    /// metrics (duration, attempts, outcome; a waiter while it waits).
    async fn acquire_inner(&self) -> Result<Option<Lease>> {
        if let Some(capped) = self.capped_by_hold() {
            return Box::pin(capped.acquire_inner()).await;
        }
        let key = self.validate()?;
        let labels = Labels::new(self.locks.describe(), self.kind, key.as_str());
        let span = tracing::info_span!(
            "dlock.acquire",
            key = %key,
            backend = self.locks.describe(),
            kind = metrics::kind_label(self.kind),
            fence = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let waiting = (self.wait != Wait::No).then(|| labels.waiting());
        let started = Instant::now();
        let (outcome, attempts) =
            metrics::count_attempts(self.acquire_validated(key).instrument(span.clone())).await;
        drop(waiting);
        let label = match &outcome {
            Ok(Some(lease)) => {
                span.record("fence", lease.fence());
                "acquired"
            }
            Ok(None) => "not_acquired",
            Err(_) => "error",
        };
        span.record("outcome", label);
        labels.acquired(label, started.elapsed(), attempts);
        outcome
    }

    async fn acquire_validated(&self, key: Key) -> Result<Option<Lease>> {
        let backend = Arc::clone(&self.locks.backend);
        let owner = Owner::random();
        let mut holder = Holder::current();
        holder.value.clone_from(&self.value);
        let started = Instant::now();
        let deadline = match self.wait {
            Wait::No => Some(started),
            Wait::For(limit) => started.checked_add(limit),
            Wait::Forever => None,
        };
        let request = AcquireRequest {
            key: &key,
            owner: &owner,
            ttl: self.ttl,
            holder: &holder,
            deadline,
            backoff: self.backoff,
            kind: self.kind,
        };
        if !backend.capabilities().supports(self.kind) {
            return Err(Error::Unsupported {
                backend: backend.describe().to_owned(),
                what: format!(
                    "{} (the README's backend table shows which backend has which kind)",
                    match self.kind {
                        LockKind::Shared => "shared locks",
                        LockKind::Semaphore { .. } => "semaphores",
                        _ => "this kind of lease",
                    }
                ),
            });
        }
        if let LockKind::Semaphore { permits: 0 } = self.kind {
            return Err(Error::BadOption(
                "a semaphore needs at least one permit".to_owned(),
            ));
        }
        // Tasks of this handle that want the same key exclusively line up locally; only
        // the first contends at the backend. Shared and semaphore leases go to the store
        // directly, since several of them may hold the key at once.
        if self.kind != LockKind::Exclusive {
            return self.acquire_from_store(&backend, request, None).await;
        }
        let turn = match deadline {
            _ if self.wait == Wait::No => match self.locks.queues.try_enter(&key) {
                Some(turn) => turn,
                None => return Ok(None),
            },
            Some(deadline) => {
                match tokio::time::timeout_at(deadline.into(), self.locks.queues.enter(&key)).await
                {
                    Ok(turn) => turn,
                    Err(_) => return Ok(None),
                }
            }
            None => self.locks.queues.enter(&key).await,
        };
        self.acquire_from_store(&backend, request, Some(turn)).await
    }

    async fn acquire_from_store(
        &self,
        backend: &Arc<dyn Backend>,
        request: AcquireRequest<'_>,
        turn: Option<LocalTurn>,
    ) -> Result<Option<Lease>> {
        let (key, owner, deadline) = (request.key, request.owner, request.deadline);
        // An acquire whose future is dropped mid-flight may have taken the lock in the
        // store; this guard frees it (by our unique owner token) unless disarmed.
        let mut guard = AbandonGuard::new(backend, key, owner);
        let outcome = if self.wait == Wait::No {
            wait::bounded_attempt(backend.as_ref(), &request)
                .await
                .map(|attempt| match attempt {
                    Attempt::Acquired(granted) => Some(granted),
                    Attempt::Held { .. } => None,
                })
        } else {
            // The store's own wait is bounded by the deadline plus a grace for its answer;
            // without a deadline, the wait itself bounds each of its calls.
            let wait = backend.acquire(&request);
            match deadline {
                Some(deadline) => {
                    let until = deadline + wait::DEADLINE_GRACE;
                    match tokio::time::timeout_at(until.into(), wait).await {
                        Ok(outcome) => outcome,
                        Err(_) => Err(Error::unavailable(
                            backend.describe(),
                            "the store did not answer before the wait's deadline",
                        )),
                    }
                }
                None => wait.await,
            }
        };
        match outcome {
            Ok(Some(granted)) => {
                guard.disarm();
                let grant = Grant {
                    key: key.clone(),
                    owner: owner.clone(),
                    fence: granted.fence,
                    ttl: self.ttl,
                    sent_at: granted.sent_at,
                    lease: granted.lease,
                    hold: self.hold,
                    kind: self.kind,
                };
                Ok(Some(Lease::start(
                    Arc::clone(backend),
                    grant,
                    self.renew_every,
                    turn,
                )))
            }
            Ok(None) => {
                guard.disarm();
                Ok(None)
            }
            // The attempt may have reached the store before failing: the guard frees it.
            Err(err) => Err(err),
        }
    }
}

/// Frees, in the background, whatever an abandoned or failed acquire may have taken.
struct AbandonGuard<'a> {
    armed: bool,
    backend: &'a Arc<dyn Backend>,
    key: &'a Key,
    owner: &'a Owner,
}

impl<'a> AbandonGuard<'a> {
    fn new(backend: &'a Arc<dyn Backend>, key: &'a Key, owner: &'a Owner) -> Self {
        AbandonGuard {
            armed: true,
            backend,
            key,
            owner,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (backend, key, owner) = (
            Arc::clone(self.backend),
            self.key.clone(),
            self.owner.clone(),
        );
        spawn_detached(async move {
            let cleanup = backend.abandon(&key, &owner);
            match tokio::time::timeout(wait::DEADLINE_GRACE * 4, cleanup).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::debug!(%key, %err, "cleanup after an abandoned acquire failed; it ends at its TTL")
                }
                Err(_) => {
                    tracing::debug!(%key, "cleanup after an abandoned acquire timed out; it ends at its TTL")
                }
            }
        });
    }
}
