//! `sessions=shared`: the exclusive locks of many leases on a few connections.
//!
//! A session can hold many locks, so a handle that holds a thousand exclusive leases
//! need not open a thousand connections (a server's `max_connections` is often a few
//! hundred, and every connection costs the server a process or a thread). With shared
//! sessions an uncontended exclusive lock is taken on a session that already holds
//! others, up to [`LEASES_PER_SESSION`] each; a lock that has to wait in the server's
//! queue, a shared lock and a semaphore permit still get a connection of their own.
//!
//! What changes for the leases of one session is that they end together: the session's
//! end (holder killed, network lost, `release --force` of any one of its keys, which ends
//! the session) fires `lost()` of every lease on it. That is why sharing is chosen in the
//! URL, not the default.
//!
//! Three rules keep a shared session from holding a lock nobody owns:
//! - session locks are reentrant (a session that holds a lock gets it again at once), so
//!   a session never takes a key it already holds or is taking;
//! - every statement runs in a task of its own that owns the session's connection for
//!   the statement's length, so a caller that gives up (deadline, dropped future) never
//!   drops a statement mid-flight; a grant nobody received is unlocked by that task;
//! - a statement that fails or does not answer within [`CALL_LIMIT`] without the session
//!   being known to be closed leaves the lock's state unknown: the session is closed,
//!   which frees every lock it held, and its leases are told they are lost.

use super::{BoxFuture, Claim, Dialect, Held, Liveness, Pool, CALL_LIMIT, CHECK_EVERY};
use crate::core::backend::{EndSignal, Granted, HeldLease};
use crate::error::{Error, LossReason, Result};
use crate::key::Key;
use async_trait::async_trait;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// The most leases one shared session (`sessions=shared` of a PostgreSQL or MySQL URL)
/// holds; more open another session. It bounds how
/// long a renewal waits behind the others of its session (their statements run one at a
/// time on the connection).
pub const LEASES_PER_SESSION: usize = 128;

/// The shared sessions of one handle.
pub(super) struct SharedSessions<D: Dialect> {
    open: Mutex<Vec<Arc<SharedSession<D>>>>,
    /// Held while a session is opened: the acquires that find every session full wait
    /// for that one instead of each opening its own.
    opening: tokio::sync::Mutex<()>,
}

impl<D: Dialect> Default for SharedSessions<D> {
    fn default() -> Self {
        SharedSessions {
            open: Mutex::new(Vec::new()),
            opening: tokio::sync::Mutex::new(()),
        }
    }
}

/// Which keys a session holds or is taking: a key here is never asked for again on this
/// session. At most [`LEASES_PER_SESSION`], so a scan is as quick as a lookup, and the
/// slots are reserved once with the session.
struct Claims {
    slots: Vec<Slot>,
    /// The id of the next claim.
    next_id: u64,
}

/// One key of a session.
struct Slot {
    key: Key,
    /// Names this claim, not its key: a key released and taken again on the same session
    /// is another claim, which the earlier lease's end signal must not touch.
    id: u64,
    /// `true` once the key is surely held (granted, not yet unlocked). Changed only by a
    /// task that owns the connection, so a liveness check that owns it sees a settled set.
    locked: bool,
    /// The lease's end signal, woken when the session ends ([`SessionEnded`]). One per
    /// lease here costs a pointer pair, where a subscription of its own to the session's
    /// end would cost each lease a boxed waiter.
    waker: Option<Waker>,
}

impl Claims {
    fn with_room() -> Self {
        Claims {
            slots: Vec::with_capacity(LEASES_PER_SESSION),
            next_id: 0,
        }
    }

    fn add(&mut self, key: &Key) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.slots.push(Slot {
            key: key.clone(),
            id,
            locked: false,
            waker: None,
        });
        id
    }

    fn slot(&mut self, id: u64) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|slot| slot.id == id)
    }

    fn remove(&mut self, id: u64) {
        if let Some(at) = self.slots.iter().position(|slot| slot.id == id) {
            self.slots.swap_remove(at);
        }
    }
}

/// One connection whose session holds the locks of several leases.
struct SharedSession<D: Dialect> {
    /// `None` once closed on purpose.
    conn: tokio::sync::Mutex<Option<D::Conn>>,
    /// The server's id of the session, known after its first statement.
    id: AtomicU64,
    claims: Mutex<Claims>,
    /// Renewals waiting for the connection: whichever statement task gets it next sends
    /// them all as one statement ([`Dialect::renew_many`]).
    due: Mutex<Vec<DueRenewal<D>>>,
    /// Why the session ended, once it has: every lease on it is lost.
    ended: watch::Sender<Option<String>>,
}

/// One lease's renewal, waiting on its session.
struct DueRenewal<D: Dialect> {
    held: Held<D::Lock>,
    ttl: Duration,
    reply: oneshot::Sender<Result<bool>>,
}

impl<D: Dialect> SharedSession<D> {
    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn has_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }

    /// Reserves `key` on this session if it has room and does not hold the key already:
    /// the claim's id.
    fn reserve(&self, key: &Key) -> Option<u64> {
        if self.has_ended() {
            return None;
        }
        let mut claims = self.claims();
        if claims.slots.len() >= LEASES_PER_SESSION
            || claims.slots.iter().any(|slot| slot.key == *key)
        {
            return None;
        }
        Some(claims.add(key))
    }

    fn unclaim(&self, id: u64) {
        self.claims().remove(id);
    }

    fn end(&self, reason: String) {
        let first = self.ended.send_if_modified(|ended| {
            let first = ended.is_none();
            if first {
                *ended = Some(reason);
            }
            first
        });
        if !first {
            return;
        }
        // After the end is set: an end signal registers before it looks (see its poll).
        let wakers: Vec<Waker> = self
            .claims()
            .slots
            .iter_mut()
            .filter_map(|slot| slot.waker.take())
            .collect();
        for waker in wakers {
            waker.wake();
        }
    }

    /// Closes the connection, which frees every lock of the session, and ends its leases.
    fn close(&self, conn: &mut Option<D::Conn>, reason: String) {
        *conn = None;
        self.end(reason);
    }
}

impl<D: Dialect> SharedSessions<D> {
    /// A session with room for `key`, reserved for it (an open one, or a new one), and
    /// the claim's id there.
    async fn reserve(
        &self,
        pool: &Arc<Pool<D>>,
        key: &Key,
    ) -> Result<(Arc<SharedSession<D>>, u64)> {
        if let Some(reserved) = self.reserve_open(key) {
            return Ok(reserved);
        }
        let _opening = self.opening.lock().await;
        if let Some(reserved) = self.reserve_open(key) {
            return Ok(reserved);
        }
        let conn = pool.take().await?;
        let watched = pool.dialect.end_signal(&conn);
        let session = Arc::new(SharedSession {
            conn: tokio::sync::Mutex::new(Some(conn)),
            id: AtomicU64::new(0),
            claims: Mutex::new(Claims::with_room()),
            due: Mutex::new(Vec::new()),
            ended: watch::channel(None).0,
        });
        let id = session.claims().add(key);
        tokio::spawn(watch_session(
            Arc::downgrade(pool),
            Arc::downgrade(&session),
            watched,
        ));
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&session));
        Ok((session, id))
    }

    /// An open session with room for `key`, reserved for it, and the claim's id there.
    fn reserve_open(&self, key: &Key) -> Option<(Arc<SharedSession<D>>, u64)> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.retain(|session| !session.has_ended());
        open.iter()
            .find_map(|session| Some((Arc::clone(session), session.reserve(key)?)))
    }

    /// One attempt at an exclusive lock on a shared session: its grant, or `None` if
    /// another session holds the key. A session found closed on the way is replaced
    /// once (an idle connection the server or a proxy had closed).
    pub(super) async fn try_lock(
        &self,
        pool: &Arc<Pool<D>>,
        claim: &Claim<D::Lock>,
    ) -> Result<Option<Granted>> {
        let mut replaced = false;
        loop {
            let (session, id) = self.reserve(pool, &claim.key).await?;
            let sent_at = Instant::now();
            let (tx, rx) = oneshot::channel();
            tokio::spawn(try_lock_task(
                Arc::clone(pool),
                Arc::clone(&session),
                claim.clone(),
                id,
                tx,
            ));
            let outcome = rx.await.unwrap_or_else(|_| {
                Err(Error::unavailable(
                    pool.dialect.describe(),
                    "the task taking the lock ended",
                ))
            });
            match outcome {
                Ok(Some(fence)) => {
                    return Ok(Some(Granted {
                        fence,
                        sent_at,
                        lease: Box::new(SharedLease {
                            pool: Arc::downgrade(pool),
                            session,
                            held: claim.held.clone(),
                            id,
                        }),
                    }))
                }
                Ok(None) => return Ok(None),
                Err(_) if session.has_ended() && !replaced => replaced = true,
                Err(err) => return Err(err),
            }
        }
    }
}

/// Watches a shared session's end: the client library's signal where it has one, else a
/// liveness check of one of its locks every [`CHECK_EVERY`].
async fn watch_session<D: Dialect>(
    pool: std::sync::Weak<Pool<D>>,
    session: std::sync::Weak<SharedSession<D>>,
    watched: Option<BoxFuture<String>>,
) {
    if let Some(watched) = watched {
        // Ends when the session has ended some other way, or is gone.
        let ended = async {
            if let Some(session) = session.upgrade() {
                let mut ended = session.ended.subscribe();
                drop(session);
                let _ = ended.wait_for(Option::is_some).await;
            }
        };
        tokio::select! {
            reason = watched => {
                if let Some(session) = session.upgrade() {
                    session.end(reason);
                }
            }
            () = ended => {}
        }
        return;
    }
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let (Some(pool), Some(session)) = (pool.upgrade(), session.upgrade()) else {
            return;
        };
        if session.has_ended() {
            return;
        }
        // Owning the connection keeps the set of locked keys settled during the check.
        let conn = session.conn.lock().await;
        if conn.is_none() {
            return;
        }
        let locked = session
            .claims()
            .slots
            .iter()
            .find_map(|slot| slot.locked.then(|| slot.key.clone()));
        let Some(key) = locked else {
            continue;
        };
        let id = session.id.load(Ordering::Relaxed);
        let lock = pool.dialect.lock_of(&key);
        let check = tokio::time::timeout(CALL_LIMIT, pool.dialect.check(&lock, id)).await;
        drop(conn);
        if let Ok(Liveness::Gone(reason)) = check {
            session.end(reason);
            return;
        }
    }
}

/// Takes `claim`'s lock on the session; a grant the caller no longer waits for is
/// unlocked here.
async fn try_lock_task<D: Dialect>(
    pool: Arc<Pool<D>>,
    session: Arc<SharedSession<D>>,
    claim: Claim<D::Lock>,
    id: u64,
    reply: oneshot::Sender<Result<Option<u64>>>,
) {
    let dialect = &pool.dialect;
    let mut conn = session.conn.lock().await;
    let Some(open) = conn.as_mut() else {
        session.unclaim(id);
        let reason = session.ended.borrow().clone();
        let _ = reply.send(Err(gone(dialect.describe(), reason)));
        return;
    };
    let outcome = match tokio::time::timeout(CALL_LIMIT, dialect.try_lock(open, &claim)).await {
        Ok(Ok(Some(fence))) => {
            session
                .id
                .store(dialect.session_id(open), Ordering::Relaxed);
            if let Some(slot) = session.claims().slot(id) {
                slot.locked = true;
            }
            Ok(Some(fence))
        }
        Ok(Ok(None)) => {
            session.unclaim(id);
            Ok(None)
        }
        // The statement may have taken the lock before it failed (a session lock
        // outlives the failed statement): unlock it, or close the session.
        Ok(Err(err)) => {
            if dialect.is_closed(open) {
                session.close(
                    &mut conn,
                    format!("the connection holding the lock failed: {err}"),
                );
            } else if !matches!(
                tokio::time::timeout(CALL_LIMIT, dialect.unlock(open, &claim)).await,
                Ok(Ok(_))
            ) {
                session.close(
                    &mut conn,
                    format!("a failed lock could not be undone: {err}"),
                );
            }
            session.unclaim(id);
            Err(err)
        }
        Err(_) => {
            session.close(
                &mut conn,
                format!("a lock statement took longer than {CALL_LIMIT:?}"),
            );
            session.unclaim(id);
            Err(Error::unavailable(
                dialect.describe(),
                format!("the lock statement took longer than {CALL_LIMIT:?}"),
            ))
        }
    };
    if let Err(Ok(Some(_))) = reply.send(outcome) {
        // The caller gave up before the grant reached it: nobody owns this lock.
        if let Err(err) = unlock_locked(dialect, &session, &mut conn, &claim, id).await {
            tracing::debug!(key = %claim.key, %err, "unlocking an abandoned grant failed; its session was closed");
        }
    }
}

/// Unlocks `held` (claim `id`) on the session whose connection `conn` is: `Ok(false)` if
/// it was no longer held. A failure closes the session, so the lock cannot outlive it.
async fn unlock_locked<D: Dialect>(
    dialect: &D,
    session: &SharedSession<D>,
    conn: &mut Option<D::Conn>,
    held: &Held<D::Lock>,
    id: u64,
) -> Result<bool> {
    let Some(open) = conn.as_mut() else {
        session.unclaim(id);
        return Ok(false);
    };
    let outcome = match tokio::time::timeout(CALL_LIMIT, dialect.unlock(open, held)).await {
        Ok(Ok(held)) => Ok(held),
        Ok(Err(_)) if dialect.is_closed(open) => {
            session.close(conn, "the connection holding the lock failed".to_owned());
            Ok(false)
        }
        Ok(Err(err)) => {
            session.close(conn, format!("a lock could not be unlocked: {err}"));
            Err(err)
        }
        Err(_) => {
            session.close(conn, format!("an unlock took longer than {CALL_LIMIT:?}"));
            Err(Error::unavailable(
                dialect.describe(),
                format!("the unlock took longer than {CALL_LIMIT:?}"),
            ))
        }
    };
    session.unclaim(id);
    outcome
}

/// Sends the renewals waiting on `session` as one statement, once it has the connection;
/// nothing if another task already sent them.
async fn renew_due<D: Dialect>(pool: Arc<Pool<D>>, session: Arc<SharedSession<D>>) {
    let dialect = &pool.dialect;
    let mut conn = session.conn.lock().await;
    let due = std::mem::take(&mut *session.due.lock().unwrap_or_else(PoisonError::into_inner));
    // Renewals whose lease stopped waiting (its own bound ran out) need no statement.
    let (leases, replies): (Vec<_>, Vec<_>) = due
        .into_iter()
        .filter(|due| !due.reply.is_closed())
        .map(|due| ((due.held, due.ttl), due.reply))
        .unzip();
    if leases.is_empty() {
        return;
    }
    let Some(open) = conn.as_mut() else {
        for reply in replies {
            let _ = reply.send(Ok(false));
        }
        return;
    };
    let outcome = match tokio::time::timeout(CALL_LIMIT, dialect.renew_many(open, &leases)).await {
        Ok(Ok(held)) => Ok(held),
        Ok(Err(err)) => {
            if dialect.is_closed(open) {
                session.close(
                    &mut conn,
                    format!("the connection holding the lock failed: {err}"),
                );
            }
            Err(err)
        }
        Err(_) => {
            session.close(
                &mut conn,
                format!("a renewal took longer than {CALL_LIMIT:?}"),
            );
            Err(Error::unavailable(
                dialect.describe(),
                format!("the renewal took longer than {CALL_LIMIT:?}"),
            ))
        }
    };
    match outcome {
        Ok(held) => {
            for (reply, held) in replies
                .into_iter()
                .zip(held.into_iter().chain(std::iter::repeat(false)))
            {
                let _ = reply.send(Ok(held));
            }
        }
        Err(err) => {
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// The error of a statement that found its shared session closed: with why it closed,
/// since that (a statement the server refused, a connection lost) is what the user can
/// act on, and most of the callers that queued behind the failure see only this.
fn gone(describe: &str, reason: Option<String>) -> Error {
    match reason {
        Some(reason) => {
            Error::unavailable(describe, format!("the shared session had ended: {reason}"))
        }
        None => Error::unavailable(describe, "the shared session had ended"),
    }
}

/// A lease on a shared session.
struct SharedLease<D: Dialect> {
    pool: std::sync::Weak<Pool<D>>,
    session: Arc<SharedSession<D>>,
    held: Held<D::Lock>,
    /// The lease's claim on the session.
    id: u64,
}

#[async_trait]
impl<D: Dialect> HeldLease for SharedLease<D> {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let Some(pool) = self.pool.upgrade() else {
            return Ok(false);
        };
        let (reply, answer) = oneshot::channel();
        let first = {
            let mut due = self
                .session
                .due
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Renewals nobody waits for any more are dropped here too, so that a task
            // that never ran (its runtime shut down) cannot hold the queue up.
            due.retain(|due| !due.reply.is_closed());
            let first = due.is_empty();
            due.push(DueRenewal {
                held: self.held.clone(),
                ttl,
                reply,
            });
            first
        };
        // The renewal that finds the queue empty starts the task that sends it; the ones
        // queued before that task takes the queue go with it, in one statement.
        if first {
            tokio::spawn(renew_due(pool, Arc::clone(&self.session)));
        }
        answer.await.unwrap_or(Ok(false))
    }

    /// Runs in a task of its own (see the module's rules).
    async fn release(self: Box<Self>) -> Result<bool> {
        let Some(pool) = self.pool.upgrade() else {
            return Ok(false);
        };
        let SharedLease {
            session, held, id, ..
        } = *self;
        let task = tokio::spawn(async move {
            let mut conn = session.conn.lock().await;
            unlock_locked(&pool.dialect, &session, &mut conn, &held, id).await
        });
        task.await.unwrap_or(Ok(false))
    }

    fn ended(&mut self) -> EndSignal {
        Box::pin(SessionEnded {
            session: Arc::clone(&self.session),
            id: self.id,
        })
    }
}

/// Resolves when a lease's shared session ends: the lease's slot on the session keeps
/// the waker, which the session's end wakes.
struct SessionEnded<D: Dialect> {
    session: Arc<SharedSession<D>>,
    id: u64,
}

impl<D: Dialect> Future for SessionEnded<D> {
    type Output = LossReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LossReason> {
        // Registered before the look at the end, which `end` sets before it wakes: an end
        // in between finds the waker. A claim no longer on the session was unlocked: its
        // lease ended by its release, and needs no waking.
        if let Some(slot) = self.session.claims().slot(self.id) {
            if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                slot.waker = Some(cx.waker().clone());
            }
        }
        match self.session.ended.borrow().as_ref() {
            Some(reason) => Poll::Ready(LossReason::SessionEnded {
                detail: reason.clone(),
            }),
            None => Poll::Pending,
        }
    }
}
