//! The session-lock engine shared by PostgreSQL (`pg_advisory_lock`) and MySQL/MariaDB
//! (`GET_LOCK`): a lock belongs to the database session that took it, so every held
//! lease owns a connection of its own, unless the URL asks for shared sessions
//! ([`shared`]: many exclusive leases on one connection).
//!
//! What is the same for both databases lives here, once: the idle pool of connections,
//! the task that owns a connection while it waits in the server's lock queue (and the
//! interruption of a wait that was abandoned), the lease handle that owns its connection
//! alone, the detection of the holding session's death, and `release --force`. A
//! database supplies only its [`Dialect`]: how to connect, lock, wait, unlock,
//! interrupt a waiting connection, tell whether a session still holds a lock, end a
//! session from outside, and the statements of `status` and `list`.
//!
//! Loss detection never shares a lock with renewal: the handle's connection is used only
//! by the engine's lease task (renew, release), and [`HeldLease::ended`] watches either a
//! signal of the connection's end that the client library gives without the connection
//! (PostgreSQL: the end of its connection task) or, where there is none (MySQL), asks on a
//! separate administrative connection every [`CHECK_EVERY`] whether the holder's session
//! still holds the lock.

use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, EndSignal, Granted, HeldLease, LockInfo,
    LockKind,
};
use crate::core::backoff::Backoff;
use crate::core::owner::Owner;
use crate::error::{Error, LossReason, Result};
use crate::key::Key;
use async_trait::async_trait;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

mod shared;

pub use shared::LEASES_PER_SESSION;

/// Idle connections kept per handle; more are closed after their release.
const MAX_IDLE: usize = 32;
/// An idle connection older than this is checked before it is lent again: the server or
/// a proxy may have closed it meanwhile.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(60);
/// How often a holder's session is checked where the client cannot see its end.
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(500);
/// The longest one call of the engine's own (connect, liveness check, unlock) may take.
pub(crate) const CALL_LIMIT: Duration = Duration::from_secs(10);
/// How long `release --force` waits for the server to free the lock of the session it
/// ended (ending a session is asynchronous in both databases).
const FORCE_SETTLE: Duration = Duration::from_secs(5);

/// A future returned by the dialect, boxed to keep the trait object-free of generics.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One lock request, owned, so that the task that waits with it outlives the caller.
/// It reads as the [`Held`] lock it asks for (`claim.key`, `claim.lock`).
#[derive(Debug, Clone)]
pub(crate) struct Claim<L> {
    /// The lock asked for: what a held lease keeps of its claim.
    pub(crate) held: Held<L>,
    pub(crate) ttl: Duration,
    pub(crate) pid: u32,
    /// Shared with the other claims of the process when it is this machine's name.
    pub(crate) host: Arc<str>,
    /// The value published beside the lease (an election's leader value).
    pub(crate) value: Option<Arc<str>>,
    /// When a wait in the server's queue gives up (`None`: never).
    pub(crate) deadline: Option<Instant>,
}

impl<L> std::ops::Deref for Claim<L> {
    type Target = Held<L>;

    fn deref(&self) -> &Held<L> {
        &self.held
    }
}

/// A lock as its holder names it to renew and unlock it: the part of a [`Claim`] a held
/// lease keeps (tens of thousands may be held at once).
#[derive(Debug, Clone)]
pub(crate) struct Held<L> {
    pub(crate) key: Key,
    pub(crate) owner: Owner,
    /// Which kind of lease is asked for.
    pub(crate) kind: LockKind,
    /// The database's name of the lock (an advisory key, a `GET_LOCK` name).
    pub(crate) lock: L,
}

/// What the server says about a holder's session.
pub(crate) enum Liveness {
    /// It still holds the lock.
    Holding,
    /// It no longer does (ended, killed, the server restarted), with the reason.
    Gone(String),
    /// Could not tell (the server did not answer): asked again later.
    Unknown,
}

/// One database's half of the engine.
#[async_trait]
pub(crate) trait Dialect: Send + Sync + Sized + 'static {
    /// A connection of one session.
    type Conn: Send + Sync + 'static;
    /// What names a lock in the database.
    type Lock: Clone + Send + Sync + std::fmt::Debug + 'static;
    /// What interrupts a connection's waiting statement from outside.
    type Interrupt: Send + 'static;

    /// The redacted URL, for messages.
    fn describe(&self) -> &str;
    /// The database's name of `key`'s lock.
    fn lock_of(&self, key: &Key) -> Self::Lock;
    /// Whether the dialect takes shared and semaphore leases besides exclusive ones.
    fn kinds(&self) -> bool {
        false
    }
    /// Whether a wait for `kind` happens in the server's queue ([`wait_lock`]); other
    /// kinds wait by attempts repeated with backoff.
    ///
    /// [`wait_lock`]: Dialect::wait_lock
    fn waits_in_queue(&self, kind: LockKind) -> bool {
        kind == LockKind::Exclusive
    }

    /// Opens a session (bounded by the connect timeout of the settings).
    async fn connect(&self) -> Result<Self::Conn>;
    /// True if the connection has surely ended (seen without a round trip).
    fn is_closed(&self, conn: &Self::Conn) -> bool;
    /// One round trip, for an idle connection about to be reused.
    async fn ping(&self, conn: &mut Self::Conn) -> Result<()>;
    /// The server's id of the connection's session.
    fn session_id(&self, conn: &Self::Conn) -> u64;

    /// Takes the lock if it is free and records the holder: its fence, or `None`.
    async fn try_lock(
        &self,
        conn: &mut Self::Conn,
        claim: &Claim<Self::Lock>,
    ) -> Result<Option<u64>>;
    /// Waits in the server's queue until the claim's deadline (`None`: without limit):
    /// its fence, or `None` if the deadline passed. The connection is closed afterwards
    /// unless it returned a fence.
    async fn wait_lock(
        &self,
        conn: &mut Self::Conn,
        claim: &Claim<Self::Lock>,
    ) -> Result<Option<u64>>;
    /// What [`interrupt`](Dialect::interrupt) needs to stop `conn`'s running statement.
    fn interrupter(&self, conn: &Self::Conn) -> Self::Interrupt;
    /// Stops a waiting statement from outside its connection.
    async fn interrupt(&self, interrupt: Self::Interrupt);
    /// Updates the holder record; `false` if this session no longer holds the lock.
    async fn renew(
        &self,
        conn: &mut Self::Conn,
        held: &Held<Self::Lock>,
        ttl: Duration,
    ) -> Result<bool>;
    /// Renews several leases of one session at once (the renewals of a shared session
    /// that fell due together): for each, in order, whether the session still holds it.
    /// The default renews them one after another.
    async fn renew_many(
        &self,
        conn: &mut Self::Conn,
        leases: &[(Held<Self::Lock>, Duration)],
    ) -> Result<Vec<bool>> {
        let mut renewed = Vec::with_capacity(leases.len());
        for (held, ttl) in leases {
            renewed.push(self.renew(conn, held, *ttl).await?);
        }
        Ok(renewed)
    }
    /// Unlocks and removes the holder record; `false` if it was not held.
    async fn unlock(&self, conn: &mut Self::Conn, held: &Held<Self::Lock>) -> Result<bool>;

    /// Resolves when the connection ends, where the client library tells without the
    /// connection itself; `None` where it cannot (the engine then asks
    /// [`check`](Dialect::check) periodically).
    fn end_signal(&self, conn: &Self::Conn) -> Option<BoxFuture<String>>;
    /// Whether session `id` still holds `lock`, asked on another connection.
    async fn check(&self, lock: &Self::Lock, id: u64) -> Liveness;

    /// The sessions holding `key`'s lock (several for readers and permits).
    async fn holders(&self, key: &Key) -> Result<Vec<u64>>;
    /// Ends session `id`, which holds `key`'s lock, and forgets its holder record.
    async fn end_session(&self, key: &Key, id: u64) -> Result<()>;
    /// Who holds `key`, for `status`.
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>>;
    /// Every dlock lock held, for `list`.
    async fn list(&self) -> Result<Vec<LockInfo>>;
}

struct Pool<D: Dialect> {
    dialect: D,
    idle: Mutex<Vec<(D::Conn, Instant)>>,
}

impl<D: Dialect> Pool<D> {
    fn pop(&self) -> Option<(D::Conn, Instant)> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    /// Returns a connection that holds no lock.
    fn recycle(&self, conn: D::Conn) {
        if self.dialect.is_closed(&conn) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    /// An idle connection that is still open, or a new one.
    async fn take(&self) -> Result<D::Conn> {
        while let Some((mut conn, since)) = self.pop() {
            if self.dialect.is_closed(&conn) {
                continue;
            }
            if since.elapsed() < CHECK_IDLE_AFTER {
                return Ok(conn);
            }
            let ping = tokio::time::timeout(CALL_LIMIT, self.dialect.ping(&mut conn)).await;
            if matches!(ping, Ok(Ok(()))) {
                return Ok(conn);
            }
        }
        match tokio::time::timeout(CALL_LIMIT, self.dialect.connect()).await {
            Ok(conn) => conn,
            Err(_) => Err(Error::unavailable(
                self.dialect.describe(),
                format!("connecting took longer than {CALL_LIMIT:?}"),
            )),
        }
    }
}

/// A session-lock backend over a [`Dialect`].
pub(crate) struct SessionLocks<D: Dialect> {
    pool: Arc<Pool<D>>,
    /// `sessions=shared`: where exclusive leases are taken, several on one connection.
    shared: Option<shared::SharedSessions<D>>,
}

impl<D: Dialect> std::fmt::Debug for SessionLocks<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLocks")
            .field("url", &self.pool.dialect.describe())
            .field("shared_sessions", &self.shared.is_some())
            .finish()
    }
}

impl<D: Dialect> SessionLocks<D> {
    /// The engine over `dialect`; with `shared_sessions`, exclusive leases share
    /// connections (see [`shared`]).
    pub(crate) fn new(dialect: D, shared_sessions: bool) -> Self {
        SessionLocks {
            pool: Arc::new(Pool {
                dialect,
                idle: Mutex::new(Vec::new()),
            }),
            shared: shared_sessions.then(shared::SharedSessions::default),
        }
    }

    /// The shared sessions, if this request's lease goes on one.
    fn shared_for(&self, request: &AcquireRequest<'_>) -> Option<&shared::SharedSessions<D>> {
        self.shared
            .as_ref()
            .filter(|_| request.kind == LockKind::Exclusive)
    }

    fn claim(&self, request: &AcquireRequest<'_>) -> Claim<D::Lock> {
        Claim {
            held: Held {
                key: request.key.clone(),
                owner: request.owner.clone(),
                kind: request.kind,
                lock: self.pool.dialect.lock_of(request.key),
            },
            ttl: request.ttl,
            pid: request.holder.pid,
            host: crate::core::host::shared_host(&request.holder.host),
            value: request.holder.value.as_deref().map(Arc::from),
            deadline: request.deadline,
        }
    }

    fn grant(&self, conn: D::Conn, claim: Claim<D::Lock>, fence: u64, sent_at: Instant) -> Granted {
        let (dead, _) = watch::channel(None);
        Granted {
            fence,
            sent_at,
            lease: Box::new(SessionLease {
                pool: Arc::downgrade(&self.pool),
                id: self.pool.dialect.session_id(&conn),
                conn,
                held: claim.held,
                dead,
            }),
        }
    }

    /// One wait in the server's queue, on a connection owned by a task of its own: the
    /// blocking statement is never dropped mid-flight, and a wait whose caller went away
    /// (deadline, dropped future) is interrupted, its connection closed (which frees a
    /// lock granted too late).
    async fn wait_once(&self, claim: &Claim<D::Lock>) -> Result<Option<Granted>> {
        let deadline = claim.deadline;
        let mut conn = self.pool.take().await?;
        let sent_at = Instant::now();
        let mut interrupt = InterruptOnDrop {
            pool: Arc::downgrade(&self.pool),
            interrupt: Some(self.pool.dialect.interrupter(&conn)),
        };
        let (tx, mut rx) = oneshot::channel::<Result<Option<(D::Conn, u64)>>>();
        let pool = Arc::clone(&self.pool);
        let owned = claim.clone();
        tokio::spawn(async move {
            let outcome = match pool.dialect.wait_lock(&mut conn, &owned).await {
                Ok(Some(fence)) => Ok(Some((conn, fence))),
                Ok(None) => Ok(None),
                Err(err) => Err(err),
            };
            // Nobody receives: the connection is dropped (closed) with the result.
            let _ = tx.send(outcome);
        });
        let received = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), &mut rx).await.ok(),
            None => Some((&mut rx).await),
        };
        let received = match received {
            Some(received) => received,
            None => {
                // The deadline: take a grant that raced in, else interrupt (on drop).
                rx.close();
                match rx.try_recv() {
                    Ok(received) => Ok(received),
                    Err(_) => return Ok(None),
                }
            }
        };
        interrupt.disarm();
        match received {
            Ok(Ok(Some((conn, fence)))) => {
                Ok(Some(self.grant(conn, claim.clone(), fence, sent_at)))
            }
            Ok(Ok(None)) => Ok(None),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::unavailable(
                self.pool.dialect.describe(),
                "the waiting connection's task ended",
            )),
        }
    }
}

impl<D: Dialect> SessionLocks<D> {
    /// A free key is taken on a shared session (where the lease goes on one); a held one
    /// is waited for in the server's queue on a connection of its own, which then holds it.
    async fn take_or_wait(
        &self,
        shared: Option<&shared::SharedSessions<D>>,
        claim: &Claim<D::Lock>,
    ) -> Result<Option<Granted>> {
        if let Some(shared) = shared {
            if let Some(granted) = shared.try_lock(&self.pool, claim).await? {
                return Ok(Some(granted));
            }
        }
        self.wait_once(claim).await
    }
}

/// Interrupts a waiting connection's statement when dropped, unless disarmed.
struct InterruptOnDrop<D: Dialect> {
    pool: Weak<Pool<D>>,
    interrupt: Option<D::Interrupt>,
}

impl<D: Dialect> InterruptOnDrop<D> {
    fn disarm(&mut self) {
        self.interrupt = None;
    }
}

impl<D: Dialect> Drop for InterruptOnDrop<D> {
    fn drop(&mut self) {
        let (Some(interrupt), Some(pool)) = (self.interrupt.take(), self.pool.upgrade()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if tokio::time::timeout(CALL_LIMIT, pool.dialect.interrupt(interrupt))
                    .await
                    .is_err()
                {
                    tracing::debug!(
                        "interrupting an abandoned wait timed out; its connection is closed anyway"
                    );
                }
            });
        }
    }
}

/// One held lease: the connection whose session holds the lock, owned alone.
struct SessionLease<D: Dialect> {
    pool: Weak<Pool<D>>,
    conn: D::Conn,
    id: u64,
    held: Held<D::Lock>,
    /// Set when one of this lease's own calls found its connection dead; wakes `ended`.
    dead: watch::Sender<Option<String>>,
}

impl<D: Dialect> SessionLease<D> {
    fn note_failure(&self, dialect: &D, err: &Error) {
        if dialect.is_closed(&self.conn) {
            self.dead.send_if_modified(|dead| {
                let first = dead.is_none();
                if first {
                    *dead = Some(format!("the connection holding the lock failed: {err}"));
                }
                first
            });
        }
    }
}

#[async_trait]
impl<D: Dialect> HeldLease for SessionLease<D> {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let Some(pool) = self.pool.upgrade() else {
            return Ok(false);
        };
        let outcome = pool.dialect.renew(&mut self.conn, &self.held, ttl).await;
        if let Err(err) = &outcome {
            self.note_failure(&pool.dialect, err);
        }
        outcome
    }

    async fn release(mut self: Box<Self>) -> Result<bool> {
        let Some(pool) = self.pool.upgrade() else {
            return Ok(false);
        };
        if pool.dialect.is_closed(&self.conn) {
            return Ok(false);
        }
        match pool.dialect.unlock(&mut self.conn, &self.held).await {
            Ok(true) => {
                pool.recycle(self.conn);
                Ok(true)
            }
            Ok(false) => Ok(false),
            // The session is gone (killed, server restarted): so is its lock.
            Err(_) if pool.dialect.is_closed(&self.conn) => Ok(false),
            Err(err) => Err(err),
        }
    }

    fn ended(&mut self) -> EndSignal {
        let mut dead = self.dead.subscribe();
        let own_failure = async move {
            loop {
                if let Some(reason) = dead.borrow_and_update().clone() {
                    return reason;
                }
                if dead.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        let Some(pool) = self.pool.upgrade() else {
            return Box::pin(std::future::pending());
        };
        let watched: BoxFuture<String> = match pool.dialect.end_signal(&self.conn) {
            Some(signal) => signal,
            None => Box::pin(check_periodically(
                Arc::downgrade(&pool),
                self.held.lock.clone(),
                self.id,
            )),
        };
        Box::pin(async move {
            let detail = tokio::select! {
                detail = own_failure => detail,
                detail = watched => detail,
            };
            LossReason::SessionEnded { detail }
        })
    }
}

/// Asks on another connection, every [`CHECK_EVERY`], whether session `id` still holds
/// `lock`; resolves when the server says it does not.
async fn check_periodically<D: Dialect>(pool: Weak<Pool<D>>, lock: D::Lock, id: u64) -> String {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(pool) = pool.upgrade() else {
            return std::future::pending().await;
        };
        let check = tokio::time::timeout(CALL_LIMIT, pool.dialect.check(&lock, id)).await;
        match check {
            Ok(Liveness::Gone(reason)) => return reason,
            Ok(Liveness::Holding | Liveness::Unknown) | Err(_) => {}
        }
    }
}

#[async_trait]
impl<D: Dialect> Backend for SessionLocks<D> {
    fn describe(&self) -> &str {
        self.pool.dialect.describe()
    }

    fn capabilities(&self) -> Capabilities {
        let kinds = self.pool.dialect.kinds();
        Capabilities {
            shared_locks: kinds,
            semaphores: kinds,
            ..Capabilities::session_bound()
        }
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let claim = self.claim(request);
        if let Some(shared) = self.shared_for(request) {
            return Ok(match shared.try_lock(&self.pool, &claim).await? {
                Some(granted) => Attempt::Acquired(granted),
                None => Attempt::Held { expires_in: None },
            });
        }
        let mut conn = self.pool.take().await?;
        let sent_at = Instant::now();
        // If this future is dropped mid-statement, `conn` goes with it: the connection
        // closes and the server frees whatever it took.
        match self.pool.dialect.try_lock(&mut conn, &claim).await {
            Ok(Some(fence)) => Ok(Attempt::Acquired(self.grant(conn, claim, fence, sent_at))),
            Ok(None) => {
                self.pool.recycle(conn);
                Ok(Attempt::Held { expires_in: None })
            }
            Err(err) => Err(err),
        }
    }

    /// Waits in the server's queue. Transient failures (the server restarting, a reset
    /// connection) are retried on a new connection until the deadline: the server's
    /// queue does not survive them, but the wait does.
    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Option<Granted>> {
        if !self.pool.dialect.waits_in_queue(request.kind) {
            return crate::core::wait::poll_until_acquired(self, request).await;
        }
        let claim = self.claim(request);
        let shared = self.shared_for(request);
        let mut delays = Backoff {
            min: Duration::from_millis(50),
            max: Duration::from_secs(2),
        }
        .delays();
        loop {
            let err = match self.take_or_wait(shared, &claim).await {
                Ok(outcome) => return Ok(outcome),
                Err(err) if err.is_transient() => err,
                Err(err) => return Err(err),
            };
            let now = Instant::now();
            if request.deadline.is_some_and(|d| now >= d) {
                return Err(err);
            }
            tracing::debug!(key = %request.key, %err, "transient error while waiting; retrying");
            let mut wake_at = now + delays.next_delay();
            if let Some(deadline) = request.deadline {
                wake_at = wake_at.min(deadline);
            }
            tokio::time::sleep_until(wake_at.into()).await;
        }
    }
}

#[async_trait]
impl<D: Dialect> Admin for SessionLocks<D> {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        self.pool.dialect.inspect(key).await
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        self.pool.dialect.list().await
    }

    /// Ends the holders' sessions (every reader's and permit's of a shared key), each
    /// waited for (briefly) until the server has freed its lock, so that no old holder
    /// can release or renew in between.
    async fn force_release(&self, key: &Key) -> Result<bool> {
        let dialect = &self.pool.dialect;
        // Only the sessions that hold it now: a waiter granted meanwhile is a new holder.
        let ended = dialect.holders(key).await?;
        for id in &ended {
            dialect.end_session(key, *id).await?;
        }
        let settled = Instant::now() + FORCE_SETTLE;
        while Instant::now() < settled
            && dialect
                .holders(key)
                .await?
                .iter()
                .any(|id| ended.contains(id))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(!ended.is_empty())
    }
}

/// The cleanups of abandoned attempts still running on one lease-table handle.
///
/// A cleanup frees the row by owner token, and every attempt of one acquire carries the
/// same token: a cleanup that ran after a later attempt of the same acquire was granted
/// would free that grant under its holder. So while a cleanup for a key and owner is
/// running, the later attempts of that acquire count the key as held. A cleanup that did
/// not answer may still reach the server (a stalled link delivers it late): its mark stays
/// one more [`CALL_LIMIT`].
#[derive(Debug, Default)]
pub(crate) struct Cleanups {
    running: Arc<Mutex<HashSet<(Key, String)>>>,
}

impl Cleanups {
    /// True while a cleanup of an attempt by `owner` on `key` may still reach the server.
    pub(crate) fn running(&self, key: &Key, owner: &Owner) -> bool {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(key.clone(), owner.as_str().to_owned()))
    }

    /// Runs `cleanup` in the background, bounded by [`CALL_LIMIT`]: the caller gave up on
    /// a store that did not answer, and must not wait for it again.
    pub(crate) fn spawn(
        &self,
        cleanup: impl Future<Output = Result<bool>> + Send + 'static,
        key: &Key,
        owner: &Owner,
    ) {
        let mark = (key.clone(), owner.as_str().to_owned());
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(mark.clone());
        let running = Arc::clone(&self.running);
        tokio::spawn(async move {
            let key = &mark.0;
            match tokio::time::timeout(CALL_LIMIT, cleanup).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    tracing::debug!(%key, %err, "cleanup after an abandoned attempt failed; it ends at its TTL")
                }
                Err(_) => {
                    tracing::debug!(%key, "cleanup after an abandoned attempt timed out; it ends at its TTL");
                    tokio::time::sleep(CALL_LIMIT).await;
                }
            }
            running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&mark);
        });
    }
}

fn name(kind: LockKind) -> &'static str {
    match kind {
        LockKind::Shared => "a shared lock",
        LockKind::Semaphore { .. } => "a semaphore",
        _ => "an exclusive lock",
    }
}

/// The error of a request of `asked` on a key that live holders hold as `held`.
pub(crate) fn kind_conflict(describe: &str, key: &str, held: LockKind, asked: LockKind) -> Error {
    match (held, asked) {
        (
            LockKind::Semaphore { permits: held_with },
            LockKind::Semaphore { permits: asked },
        ) => Error::PermitMismatch {
            key: key.to_owned(),
            backend: describe.to_owned(),
            held_with,
            asked,
        },
        _ => Error::backend(
            describe,
            format!(
                "key {key:?} is held as {}, and was asked for as {}: a key is either a lock or a semaphore",
                name(held),
                name(asked)
            ),
        ),
    }
}
