//! flock(2) on lock files: a non-blocking attempt, and a blocking wait in the kernel's
//! queue that can be abandoned (deadline or dropped future) without ever taking the lock
//! afterwards.
//!
//! The kernel has no asynchronous flock, so a waiter blocks in `flock(LOCK_EX)` on a
//! thread of its own and is woken by the kernel at release. To abandon a wait, the thread
//! is marked abandoned and interrupted with a signal (a no-op handler installed without
//! `SA_RESTART`, so `flock` returns `EINTR`); the signal is repeated until the thread has
//! gone, which closes the race where it arrives just before the thread enters `flock`.
//!
//! At most [`MAX_BLOCKED_THREADS`] threads of a process block in `flock` at once; a
//! waiter beyond them tries `LOCK_NB` at a growing pause (2 ms to 50 ms) until it gets
//! the lock or a thread becomes free, so that a process waiting for a thousand keys does
//! not start a thousand threads. Such a waiter is not in the kernel's queue meanwhile:
//! it can be overtaken, and it notices a release up to 50 ms late.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The signal that interrupts an abandoned waiter. SIGURG is ignored by default and
/// otherwise only sent for out-of-band socket data to processes that asked for it, which
/// is why Go's runtime picked it for the same purpose.
const INTERRUPT: libc::c_int = libc::SIGURG;

/// Exclusive (`LOCK_EX`) or shared (`LOCK_SH`, as `flock -s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Exclusive,
    Shared,
}

impl Mode {
    fn op(self) -> libc::c_int {
        match self {
            Mode::Exclusive => libc::LOCK_EX,
            Mode::Shared => libc::LOCK_SH,
        }
    }
}

/// Takes an exclusive lock without waiting: `Ok(true)` if taken, `Ok(false)` if held.
pub(crate) fn try_lock(file: &File) -> io::Result<bool> {
    try_lock_as(file, Mode::Exclusive)
}

/// Takes a lock of `mode` without waiting: `Ok(true)` if taken, `Ok(false)` if held.
pub(crate) fn try_lock_as(file: &File, mode: Mode) -> io::Result<bool> {
    loop {
        // SAFETY: flock on a valid, owned descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode.op() | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}

/// Takes an exclusive lock, retrying for at most `limit`: `Ok(false)` if it stayed held.
/// For locks held only for a few writes (fence files), where a kernel wait on a thread
/// of its own would cost more than the rare retry.
pub(crate) fn lock_within(file: &File, limit: Duration) -> io::Result<bool> {
    let until = Instant::now() + limit;
    let mut pause = Duration::from_micros(200);
    loop {
        if try_lock(file)? {
            return Ok(true);
        }
        if Instant::now() >= until {
            return Ok(false);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Releases the lock on the open file description explicitly, so that a copy of the
/// descriptor inherited by a forked child cannot keep it.
pub(crate) fn unlock(file: &File) {
    // SAFETY: flock on a valid, owned descriptor; failure leaves only close() to unlock.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs the no-op handler once, unless the program handles SIGURG itself (then an
/// abandoned waiter that cannot be interrupted unlocks at once when it gets the lock).
fn install_interrupt_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: reading and setting a signal disposition with zeroed, then filled,
        // sigaction structures; the handler is async-signal-safe (it does nothing).
        unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(INTERRUPT, std::ptr::null(), &mut current) != 0 {
                return;
            }
            if current.sa_sigaction != libc::SIG_DFL && current.sa_sigaction != libc::SIG_IGN {
                return;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = 0; // no SA_RESTART: flock must return EINTR
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(INTERRUPT, &action, std::ptr::null_mut());
        }
    });
}

/// How many threads of this process may block in `flock` at once (see the module docs).
pub(crate) const MAX_BLOCKED_THREADS: usize = 64;

/// The name of those threads.
pub(crate) const WAIT_THREAD_NAME: &str = "dlock-flock-wait";

/// The threads of this process blocked in `flock` (or about to be).
static BLOCKED_THREADS: AtomicUsize = AtomicUsize::new(0);

/// A place among the [`MAX_BLOCKED_THREADS`], given back when dropped.
struct ThreadSlot;

impl ThreadSlot {
    fn take() -> Option<ThreadSlot> {
        BLOCKED_THREADS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_BLOCKED_THREADS).then_some(n + 1)
            })
            .ok()
            .map(|_| ThreadSlot)
    }
}

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        BLOCKED_THREADS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pauses of a waiter without a thread.
const POLL_FIRST: Duration = Duration::from_millis(2);
const POLL_MOST: Duration = Duration::from_millis(50);

/// A wait for a lock on `file`: in the kernel's queue on a thread of its own, or, when
/// all [`MAX_BLOCKED_THREADS`] are taken, by trying at intervals until one is free.
pub(crate) struct KernelWait {
    result: Option<oneshot::Receiver<io::Result<File>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    abandoned: Arc<AtomicBool>,
    /// Waiting without a thread: the file to try, and how.
    polling: Option<(File, Mode)>,
}

/// How a wait without a thread ended.
enum Polled {
    Locked(File),
    TimedOut,
    /// A thread became free before the lock did: wait in the kernel's queue after all.
    ThreadFree(File, ThreadSlot),
}

impl KernelWait {
    pub(crate) fn start(file: File, mode: Mode) -> io::Result<KernelWait> {
        match ThreadSlot::take() {
            Some(slot) => KernelWait::on_thread(file, mode, slot),
            None => Ok(KernelWait {
                result: None,
                thread: None,
                abandoned: Arc::new(AtomicBool::new(false)),
                polling: Some((file, mode)),
            }),
        }
    }

    fn on_thread(file: File, mode: Mode, slot: ThreadSlot) -> io::Result<KernelWait> {
        install_interrupt_handler();
        let (tx, rx) = oneshot::channel();
        let abandoned = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&abandoned);
        let thread = std::thread::Builder::new()
            .name(WAIT_THREAD_NAME.into())
            .spawn(move || {
                let _slot = slot;
                let outcome = block_until_locked(&file, mode, &flag).map(|locked| (locked, file));
                match outcome {
                    Ok((true, file)) => {
                        if flag.load(Ordering::SeqCst) {
                            unlock(&file);
                        } else if let Err(Ok(file)) = tx.send(Ok(file)) {
                            // The waiter went away just now: never keep the lock.
                            unlock(&file);
                        }
                    }
                    Ok((false, _)) => {}
                    Err(err) => {
                        let _ = tx.send(Err(err));
                    }
                }
            })?;
        Ok(KernelWait {
            result: Some(rx),
            thread: Some(thread),
            abandoned,
            polling: None,
        })
    }

    /// Waits until the lock is taken (`Some(file)`) or `deadline` passes (`None`).
    pub(crate) async fn wait(mut self, deadline: Option<Instant>) -> io::Result<Option<File>> {
        if let Some((file, mode)) = self.polling.take() {
            match poll_for_lock(file, mode, deadline).await? {
                Polled::Locked(file) => return Ok(Some(file)),
                Polled::TimedOut => return Ok(None),
                Polled::ThreadFree(file, slot) => self = KernelWait::on_thread(file, mode, slot)?,
            }
        }
        let Some(rx) = self.result.as_mut() else {
            return Ok(None);
        };
        let received = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), rx).await {
                Ok(received) => received,
                Err(_) => return Ok(None), // Drop abandons the wait.
            },
            None => rx.await,
        };
        match received {
            Ok(Ok(file)) => {
                self.result = None;
                self.thread = None; // finished: nothing to interrupt
                Ok(Some(file))
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Err(io::Error::other(
                "the flock waiting thread ended unexpectedly",
            )),
        }
    }
}

/// Tries `file` at a growing pause until it is locked, `deadline` passes, or a thread to
/// wait in the kernel's queue becomes free.
async fn poll_for_lock(file: File, mode: Mode, deadline: Option<Instant>) -> io::Result<Polled> {
    let mut pause = POLL_FIRST;
    loop {
        if try_lock_as(&file, mode)? {
            return Ok(Polled::Locked(file));
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Ok(Polled::TimedOut);
        }
        if let Some(slot) = ThreadSlot::take() {
            return Ok(Polled::ThreadFree(file, slot));
        }
        let wake = deadline.map_or(now + pause, |d| d.min(now + pause));
        tokio::time::sleep_until(wake.into()).await;
        pause = (pause * 2).min(POLL_MOST);
    }
}

/// Blocks in flock until locked (`true`) or abandoned (`false`).
fn block_until_locked(file: &File, mode: Mode, abandoned: &AtomicBool) -> io::Result<bool> {
    loop {
        if abandoned.load(Ordering::SeqCst) {
            return Ok(false);
        }
        // SAFETY: flock on a valid, owned descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode.op()) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

impl Drop for KernelWait {
    fn drop(&mut self) {
        // Drop the receiver first: a lock sent from now on is unlocked by the thread.
        self.result = None;
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.abandoned.store(true, Ordering::SeqCst);
        if thread.is_finished() {
            return;
        }
        let interrupter = move || {
            let mut pause = Duration::from_millis(1);
            while !thread.is_finished() {
                // SAFETY: the thread has not been joined or detached, so its pthread_t is
                // still valid even if it has just finished.
                unsafe { libc::pthread_kill(thread.as_pthread_t(), INTERRUPT) };
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            let _ = thread.join();
        };
        if let Err(err) = std::thread::Builder::new()
            .name("dlock-flock-cancel".into())
            .spawn(interrupter)
        {
            tracing::warn!(%err, "cannot interrupt an abandoned flock wait; it unlocks as soon as it gets the lock");
        }
    }
}
