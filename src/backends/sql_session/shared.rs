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

use super::{BoxFuture, Claim, Dialect, Liveness, Pool, CALL_LIMIT, CHECK_EVERY};
use crate::core::backend::{EndSignal, Granted, HeldLease};
use crate::error::{Error, LossReason, Result};
use crate::key::Key;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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
/// session. The flag is `true` once the key is surely held (granted, not yet unlocked);
/// it is changed only by a task that owns the connection, so a liveness check that owns
/// it sees a settled set.
type Claims = HashMap<Key, bool>;

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
    claim: Claim<D::Lock>,
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

    /// Reserves `key` on this session if it has room and does not hold the key already.
    fn reserve(&self, key: &Key) -> bool {
        if self.has_ended() {
            return false;
        }
        let mut claims = self.claims();
        if claims.len() >= LEASES_PER_SESSION || claims.contains_key(key) {
            return false;
        }
        claims.insert(key.clone(), false);
        true
    }

    fn unclaim(&self, key: &Key) {
        self.claims().remove(key);
    }

    fn end(&self, reason: String) {
        self.ended.send_if_modified(|ended| {
            let first = ended.is_none();
            if first {
                *ended = Some(reason);
            }
            first
        });
    }

    /// Closes the connection, which frees every lock of the session, and ends its leases.
    fn close(&self, conn: &mut Option<D::Conn>, reason: String) {
        *conn = None;
        self.end(reason);
    }
}

impl<D: Dialect> SharedSessions<D> {
    /// A session with room for `key`, reserved for it: an open one, or a new one.
    async fn reserve(&self, pool: &Arc<Pool<D>>, key: &Key) -> Result<Arc<SharedSession<D>>> {
        if let Some(session) = self.reserve_open(key) {
            return Ok(session);
        }
        let _opening = self.opening.lock().await;
        if let Some(session) = self.reserve_open(key) {
            return Ok(session);
        }
        let conn = pool.take().await?;
        let watched = pool.dialect.end_signal(&conn);
        let session = Arc::new(SharedSession {
            conn: tokio::sync::Mutex::new(Some(conn)),
            id: AtomicU64::new(0),
            claims: Mutex::new(Claims::default()),
            due: Mutex::new(Vec::new()),
            ended: watch::channel(None).0,
        });
        session.claims().insert(key.clone(), false);
        tokio::spawn(watch_session(
            Arc::downgrade(pool),
            Arc::downgrade(&session),
            watched,
        ));
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&session));
        Ok(session)
    }

    /// An open session with room for `key`, reserved for it.
    fn reserve_open(&self, key: &Key) -> Option<Arc<SharedSession<D>>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.retain(|session| !session.has_ended());
        open.iter().find(|session| session.reserve(key)).cloned()
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
            let session = self.reserve(pool, &claim.key).await?;
            let sent_at = Instant::now();
            let (tx, rx) = oneshot::channel();
            tokio::spawn(try_lock_task(
                Arc::clone(pool),
                Arc::clone(&session),
                claim.clone(),
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
                            claim: claim.clone(),
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
            .iter()
            .find_map(|(key, &locked)| locked.then(|| key.clone()));
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
    reply: oneshot::Sender<Result<Option<u64>>>,
) {
    let dialect = &pool.dialect;
    let mut conn = session.conn.lock().await;
    let Some(open) = conn.as_mut() else {
        session.unclaim(&claim.key);
        let reason = session.ended.borrow().clone();
        let _ = reply.send(Err(gone(dialect.describe(), reason)));
        return;
    };
    let outcome = match tokio::time::timeout(CALL_LIMIT, dialect.try_lock(open, &claim)).await {
        Ok(Ok(Some(fence))) => {
            session
                .id
                .store(dialect.session_id(open), Ordering::Relaxed);
            session.claims().insert(claim.key.clone(), true);
            Ok(Some(fence))
        }
        Ok(Ok(None)) => {
            session.unclaim(&claim.key);
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
            session.unclaim(&claim.key);
            Err(err)
        }
        Err(_) => {
            session.close(
                &mut conn,
                format!("a lock statement took longer than {CALL_LIMIT:?}"),
            );
            session.unclaim(&claim.key);
            Err(Error::unavailable(
                dialect.describe(),
                format!("the lock statement took longer than {CALL_LIMIT:?}"),
            ))
        }
    };
    if let Err(Ok(Some(_))) = reply.send(outcome) {
        // The caller gave up before the grant reached it: nobody owns this lock.
        if let Err(err) = unlock_locked(dialect, &session, &mut conn, &claim).await {
            tracing::debug!(key = %claim.key, %err, "unlocking an abandoned grant failed; its session was closed");
        }
    }
}

/// Unlocks `claim`'s lock on the session whose connection `conn` is: `Ok(false)` if it
/// was no longer held. A failure closes the session, so the lock cannot outlive it.
async fn unlock_locked<D: Dialect>(
    dialect: &D,
    session: &SharedSession<D>,
    conn: &mut Option<D::Conn>,
    claim: &Claim<D::Lock>,
) -> Result<bool> {
    let Some(open) = conn.as_mut() else {
        session.unclaim(&claim.key);
        return Ok(false);
    };
    let outcome = match tokio::time::timeout(CALL_LIMIT, dialect.unlock(open, claim)).await {
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
    session.unclaim(&claim.key);
    outcome
}

/// Sends the renewals waiting on `session` as one statement, once it has the connection;
/// nothing if another task already sent them.
async fn renew_due<D: Dialect>(pool: Arc<Pool<D>>, session: Arc<SharedSession<D>>) {
    let dialect = &pool.dialect;
    let mut conn = session.conn.lock().await;
    let due = std::mem::take(&mut *session.due.lock().unwrap_or_else(PoisonError::into_inner));
    // Renewals whose lease stopped waiting (its own bound ran out) need no statement.
    let (claims, replies): (Vec<_>, Vec<_>) = due
        .into_iter()
        .filter(|due| !due.reply.is_closed())
        .map(|due| ((due.claim, due.ttl), due.reply))
        .unzip();
    if claims.is_empty() {
        return;
    }
    let Some(open) = conn.as_mut() else {
        for reply in replies {
            let _ = reply.send(Ok(false));
        }
        return;
    };
    let outcome = match tokio::time::timeout(CALL_LIMIT, dialect.renew_many(open, &claims)).await {
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
    claim: Claim<D::Lock>,
}

impl<D: Dialect> SharedLease<D> {
    /// Runs one statement of this lease in a task of its own (see the module's rules).
    async fn run<T: Send + 'static>(
        &self,
        statement: impl FnOnce(Arc<Pool<D>>, Arc<SharedSession<D>>, Claim<D::Lock>) -> BoxFuture<T>
            + Send
            + 'static,
    ) -> Option<T> {
        let pool = self.pool.upgrade()?;
        let task = tokio::spawn(statement(
            pool,
            Arc::clone(&self.session),
            self.claim.clone(),
        ));
        task.await.ok()
    }
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
                claim: self.claim.clone(),
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

    async fn release(self: Box<Self>) -> Result<bool> {
        let released = self
            .run(|pool, session, claim| {
                Box::pin(async move {
                    let mut conn = session.conn.lock().await;
                    unlock_locked(&pool.dialect, &session, &mut conn, &claim).await
                })
            })
            .await;
        released.unwrap_or(Ok(false))
    }

    fn ended(&mut self) -> EndSignal {
        let mut ended = self.session.ended.subscribe();
        Box::pin(async move {
            let detail = match ended.wait_for(Option::is_some).await {
                Ok(reason) => Ok(reason.clone().unwrap_or_default()),
                Err(_) => Err(()),
            };
            let Ok(detail) = detail else {
                return std::future::pending().await;
            };
            LossReason::SessionEnded { detail }
        })
    }
}
