//! `file:///dir`: flock(2) on one file per key in a directory of this host (SPEC §3).
//!
//! Holding a lock is holding an exclusive flock on `<dir>/<name>.lock` (see [`naming`] for
//! the name of a key), so `flock(1)` on the same path and dlock exclude each other. The
//! kernel frees the lock when the holder process dies, and queues waiters: a waiter
//! blocks in the kernel and is woken at release.
//!
//! The lock file holds a one-line record (see [`record`]): the holder's fence, owner
//! token, pid, host, acquisition and renewal times. `status` reads it without locking, and
//! asks the kernel (`/proc/locks`) whether, and by which pid, the file is locked.
//!
//! TTL on this backend: a lock lives as long as its holder's open file, exactly as with
//! flock(1). A holder that is stopped (SIGSTOP) or hung keeps it; renewal only refreshes
//! the record's `renewed_at`, so `status` flags a holder that has not renewed within its
//! TTL. Lock files are never deleted: deleting a flock file lets two processes lock two
//! different files of the same name. `release --force` replaces the file by a new one
//! instead: new acquirers lock the new file, and the old holder sees at its next renewal
//! that its file was replaced and reports its lease lost.
//!
//! Fences. The counter of a key is its fence file `<dir>/<name>.fence` (see [`naming`]),
//! which dlock never replaces or deletes. A fence is handed out only by [`advance`], under
//! an exclusive flock on that file, verified after locking to still be the file of that
//! name, and is written there before the flock is dropped and before the lease is
//! handed over. So every acquirer of the key, whichever lock file it holds,
//! serializes on one inode and reads the value the previous one left: fences strictly
//! increase with no assumption about timing. That matters because after a force-release
//! two lock files of a key exist for a while, and a waiter on the old one can still take
//! it (it checked the file was current just before the replacement): it gets a fence of
//! its own, lower than every later holder's, and the fenced resource rejects it. Keeping
//! the counter in the lock file, as before, gave both files the same count.
//!
//! The lock record's copy of the fence is a floor: the next fence exceeds both it and
//! the fence file, so a fence file deleted by hand (or a directory from before fence
//! files) continues from the record. The clock is a floor too: a new fence is at least
//! the time in microseconds since 1970, so fences keep increasing even when a power loss
//! takes the fence file's last writes (or the whole new file) with it, without an fsync
//! per acquisition. Only a power loss together with the clock being set back across it
//! could repeat a fence. A counter at `u64::MAX` is an error, never a repeated fence.
//!
//! Every entry of the directory is opened through [`dir::LockDir`]: relative to a
//! descriptor of the directory, never following a link, and used only if it is a regular
//! file with one name, since in a shared directory anyone in the group can plant links.

mod dir;
mod flock;
pub(crate) mod naming;
mod proc_locks;
pub(crate) mod record;

mod kinds;

use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, Granted, HeldLease, LockInfo, LockKind,
};
use crate::error::{Error, Result};
use crate::key::Key;
use crate::location::BackendUrl;
use async_trait::async_trait;
use dir::{Access, LockDir, OpenError};
use proc_locks::{Holding, KernelLocks};
use record::{Contents, Record, Stored};
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// A lock this process holds: the open, flocked file is the lease's handle.
#[derive(Debug)]
struct HeldFile {
    file: File,
    name: String,
    record: Record,
    record_len: u64,
    /// False for a reader: several share the lock file, whose record is the last
    /// writer's, so a reader keeps its own record nowhere (see the module docs).
    writes_record: bool,
    inner: Arc<Inner>,
}

impl Drop for HeldFile {
    fn drop(&mut self) {
        flock::unlock(&self.file);
    }
}

#[derive(Debug)]
struct Inner {
    dir: LockDir,
    describe: String,
}

/// The file backend.
#[derive(Debug, Clone)]
pub struct FileBackend {
    inner: Arc<Inner>,
}

impl FileBackend {
    /// Opens the lock directory of a `file:///abs/dir` URL, creating its last component
    /// if missing (the default directory, with its parents).
    pub fn open(url: &BackendUrl) -> Result<Self> {
        url.reject_unknown_options(&[])?;
        if url.url().host_str().is_some_and(|h| !h.is_empty()) {
            return Err(url.error(
                "a file URL names a local directory and has no host; write file:///absolute/dir",
            ));
        }
        let dir = url.url().to_file_path().map_err(|()| {
            url.error("expected an absolute directory, as in file:///var/lock/dlock")
        })?;
        // The default directory is made with its parents; a named one only if its
        // parent exists, so that a mistyped shared directory is an error.
        let parents = crate::location::implicit_dir()
            .and_then(|default| std::path::absolute(default).ok())
            .is_some_and(|default| default == dir);
        Self::open_dir_with(dir, url.redacted(), parents)
    }

    /// Opens a lock directory, creating it (its last component only) if its parent
    /// exists.
    pub fn open_dir(dir: PathBuf, describe: &str) -> Result<Self> {
        Self::open_dir_with(dir, describe, false)
    }

    fn open_dir_with(dir: PathBuf, describe: &str, parents: bool) -> Result<Self> {
        let describe = describe.trim_end_matches('/').to_owned();
        let dir = LockDir::open(&dir, parents).map_err(|err| match err {
            dir::DirError::MissingParent(missing) => Error::unavailable(
                &describe,
                format!(
                    "cannot create the lock directory {}: {} does not exist; dlock creates only \
                     the last component of a lock directory, so check the path (a mistyped \
                     shared directory would exclude nobody) or create it first with mkdir -p",
                    dir.display(),
                    missing.display()
                ),
            ),
            dir::DirError::Io(err) => Error::unavailable(
                &describe,
                format!("cannot open the lock directory {}: {err}", dir.display()),
            ),
        })?;
        Ok(FileBackend {
            inner: Arc::new(Inner { dir, describe }),
        })
    }

    /// The lock file of `key`.
    pub fn path_of(&self, key: &Key) -> PathBuf {
        self.inner.dir.path().join(naming::file_name(key.as_str()))
    }

    /// Runs blocking file work (a fence file's flock may wait for another process) on tokio's blocking pool, or in place on a
    /// current-thread runtime: there a thread hop costs more than it saves (it is what
    /// `dlock run` uses, where starting a pool thread was most of the lock's cost).
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        if tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
        {
            return work();
        }
        tokio::task::spawn_blocking(work).await.map_err(|err| {
            Error::unavailable(&self.inner.describe, format!("file task failed: {err}"))
        })?
    }

    fn new_record(request: &AcquireRequest<'_>, fence: u64) -> Record {
        let now = record::now_ms();
        Record {
            key: request.key.to_string(),
            fence,
            owner: Some(request.owner.to_string()),
            pid: Some(request.holder.pid),
            host: Some(request.holder.host.clone()),
            acquired_at_ms: Some(now),
            renewed_at_ms: Some(now),
            ttl_ms: Some(u64::try_from(request.ttl.as_millis()).unwrap_or(u64::MAX)),
            value: request.holder.value.clone(),
            permits: match request.kind {
                LockKind::Semaphore { permits } => Some(permits),
                _ => None,
            },
        }
    }

    /// Claims the locked lock file of `key` on the blocking pool, waiting for its fence
    /// file: `None` if the file was replaced meanwhile.
    async fn claim_waiting(
        &self,
        file: File,
        key: &Key,
        template: Record,
    ) -> Result<Option<Box<HeldFile>>> {
        let (key, inner) = (key.to_string(), Arc::clone(&self.inner));
        let claimed = self
            .blocking(move || inner.claim(file, &key, |fence| Record { fence, ..template }))
            .await?;
        Ok(claimed.map(Box::new))
    }

    fn grant(held: impl Into<Box<HeldFile>>, sent_at: Instant) -> Granted {
        let held: Box<HeldFile> = held.into();
        Granted {
            fence: held.record.fence,
            sent_at,
            lease: held,
        }
    }
}

/// Opens `file:///abs/dir`.
pub(crate) async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(FileBackend::open(&BackendUrl::parse(url)?)?))
}

#[async_trait]
impl HeldLease for HeldFile {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let inner = Arc::clone(&self.inner);
        let current = inner
            .dir
            .is_current(&self.file, &self.name)
            .map_err(|e| inner.io_error("check", &self.name, &e))?;
        if !current {
            return Ok(false);
        }
        if !self.writes_record {
            return Ok(true);
        }
        self.record.renewed_at_ms = Some(record::now_ms());
        self.record.ttl_ms = Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self.record_len = record::write(&self.file, &self.record, self.record_len)
            .map_err(|e| inner.io_error("write", &self.name, &e))?;
        Ok(true)
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        // Dropping the handle unlocks the file; the file itself stays (see module docs).
        Ok(self
            .inner
            .dir
            .is_current(&self.file, &self.name)
            .unwrap_or(false))
    }
}

/// How long a fence file may stay locked by someone else before taking a fence fails.
/// dlock holds it only for a read and a write.
const FENCE_LOCK_WAIT: Duration = Duration::from_secs(10);

impl Inner {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn io_error(&self, what: &str, name: &str, err: &io::Error) -> Error {
        Error::unavailable(
            &self.describe,
            format!("cannot {what} {}: {err}", self.path(name)),
        )
    }

    fn open_error(&self, name: &str, err: OpenError) -> Error {
        match err {
            OpenError::Io(err) => self.io_error("open", name, &err),
            OpenError::Refused(why) => Error::backend(
                &self.describe,
                format!(
                    "refusing to use {}: {why}; remove it (whoever can write the lock directory may have planted it)",
                    self.path(name)
                ),
            ),
        }
    }

    fn open(&self, name: &str, access: Access) -> Result<File> {
        self.dir
            .open_file(name, access)
            .map_err(|e| self.open_error(name, e))
    }

    /// [`advance`](Inner::advance), waiting for the fence file.
    fn advance_waiting(
        &self,
        key: &str,
        lock_name: &str,
        in_record: Option<u64>,
        step: u64,
    ) -> Result<u64> {
        self.advance(key, lock_name, in_record, step, FenceWait::Wait)?
            .ok_or_else(|| Error::unavailable(&self.describe, "the fence file was busy"))
    }

    fn exhausted(&self, key: &str, name: &str) -> Error {
        Error::backend(
            &self.describe,
            format!(
                "the fence counter of key {key:?} is exhausted ({} in {}): no larger fence exists, so the lock is not handed out",
                u64::MAX,
                self.path(name)
            ),
        )
    }

    /// Takes the next fence of `key` (`step` 1), or makes sure the fence file is at least
    /// `in_record` (`step` 0, for force-release), under the fence file's flock. See the
    /// module docs for why this makes fences strictly increasing. `in_record` is the
    /// fence in the lock record (`None` if it is unreadable).
    ///
    /// With [`FenceWait::TryOnly`] it answers `None` rather than wait for a fence file
    /// another process has locked.
    fn advance(
        &self,
        key: &str,
        lock_name: &str,
        in_record: Option<u64>,
        step: u64,
        wait: FenceWait,
    ) -> Result<Option<u64>> {
        let name = naming::fence_name(key);
        for _ in 0..8 {
            let file = Unlocking(self.open(&name, Access::Create)?);
            let locked = match wait {
                FenceWait::Wait => flock::lock_within(&file.0, FENCE_LOCK_WAIT),
                FenceWait::TryOnly => flock::try_lock(&file.0),
            }
            .map_err(|e| self.io_error("lock", &name, &e))?;
            if !locked && wait == FenceWait::TryOnly {
                return Ok(None);
            }
            if !locked {
                return Err(Error::unavailable(
                    &self.describe,
                    format!(
                        "{} stayed locked by another process for {}; only dlock should lock fence files",
                        self.path(&name),
                        crate::duration::format_duration(FENCE_LOCK_WAIT)
                    ),
                ));
            }
            // Removed or replaced by hand between open and lock: lock the file now there.
            if !self
                .dir
                .is_current(&file.0, &name)
                .map_err(|e| self.io_error("check", &name, &e))?
            {
                continue;
            }
            let stored =
                record::read_fence(&file.0).map_err(|e| self.io_error("read", &name, &e))?;
            let known = match stored {
                Stored::Fence(v) => Some(v.max(in_record.unwrap_or(0))),
                Stored::Empty => in_record,
                Stored::Unreadable => None,
            };
            let counted = match known {
                Some(k) => k.checked_add(step).ok_or_else(|| {
                    let source = if in_record == Some(k) {
                        lock_name
                    } else {
                        &name
                    };
                    self.exhausted(key, source)
                })?,
                None => in_record
                    .unwrap_or(0)
                    .checked_add(step)
                    .ok_or_else(|| self.exhausted(key, lock_name))?,
            };
            // A new fence is at least the clock, in µs since 1970. That, not an fsync, is
            // what keeps fences increasing over a power loss that takes the last writes of
            // the fence file with it: every fence handed out before the crash was at most
            // the clock then (or a few counts above it in a burst), and the clock has
            // moved on since. An fsync per acquisition cost milliseconds on disks that
            // honour it; a process crash loses nothing either way (the page cache stays).
            let next = if step == 0 {
                counted
            } else {
                counted.max(record::clock_floor())
            };
            if !matches!(stored, Stored::Fence(v) if v == next) {
                record::write_fence(&file.0, next)
                    .map_err(|e| self.io_error("write the fence to", &name, &e))?;
            }
            return Ok(Some(next));
        }
        Err(Error::unavailable(
            &self.describe,
            format!(
                "{} keeps being replaced while dlock locks it",
                self.path(&name)
            ),
        ))
    }

    /// After the flock is taken: checks the file is still current, takes the next fence
    /// and writes the record. `None` if the file was replaced meanwhile.
    fn claim(
        self: &Arc<Self>,
        file: File,
        key: &str,
        new_record: impl FnOnce(u64) -> Record,
    ) -> Result<Option<HeldFile>> {
        self.claim_as(file, key, naming::file_name(key), true, new_record)
    }

    /// [`claim`](Inner::claim) of the file `name` (a lock file, or a permit's slot file);
    /// a reader (`writes_record` false) takes its fence and leaves the record alone.
    fn claim_as(
        self: &Arc<Self>,
        file: File,
        key: &str,
        name: String,
        writes_record: bool,
        new_record: impl FnOnce(u64) -> Record,
    ) -> Result<Option<HeldFile>> {
        match self.claim_with(file, key, name, writes_record, new_record, FenceWait::Wait)? {
            Claimed::Held(held) => Ok(Some(*held)),
            Claimed::Replaced => Ok(None),
            // Waiting for the fence file either takes it or fails.
            Claimed::FenceBusy(file) => {
                flock::unlock(&file);
                Err(Error::unavailable(
                    &self.describe,
                    "the fence file was busy",
                ))
            }
        }
    }

    /// [`claim_as`](Inner::claim_as), waiting for a fence file locked by another process
    /// only if `wait` says so; a claim that does not wait answers [`Claimed::FenceBusy`]
    /// with `file` still locked, to be claimed again where waiting is allowed.
    fn claim_with(
        self: &Arc<Self>,
        mut file: File,
        key: &str,
        name: String,
        writes_record: bool,
        new_record: impl FnOnce(u64) -> Record,
        wait: FenceWait,
    ) -> Result<Claimed> {
        let current = self
            .dir
            .is_current(&file, &name)
            .map_err(|e| self.io_error("check", &name, &e))?;
        if !current {
            flock::unlock(&file);
            return Ok(Claimed::Replaced);
        }
        let claimed = (|| {
            let (contents, old_len) =
                record::read(&mut file).map_err(|e| self.io_error("read", &name, &e))?;
            let in_record = match contents {
                Contents::Empty => Some(0),
                Contents::Record(previous) => Some(previous.fence),
                Contents::Unreadable => None,
            };
            let Some(fence) = self.advance(key, &name, in_record, 1, wait)? else {
                return Ok(None);
            };
            let record = new_record(fence);
            if !writes_record {
                return Ok(Some((record, old_len)));
            }
            // The fence file is durable already; this copy is for status, and a floor.
            let record_len = record::write(&file, &record, old_len)
                .map_err(|e| self.io_error("write", &name, &e))?;
            Ok(Some((record, record_len)))
        })();
        match claimed {
            Ok(Some((record, record_len))) => Ok(Claimed::Held(Box::new(HeldFile {
                file,
                name,
                record,
                record_len,
                writes_record,
                inner: Arc::clone(self),
            }))),
            Ok(None) => Ok(Claimed::FenceBusy(file)),
            Err(err) => {
                flock::unlock(&file);
                Err(err)
            }
        }
    }
}

/// Whether taking a fence may wait for a fence file another process has locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FenceWait {
    /// Up to [`FENCE_LOCK_WAIT`] (on a thread that may block).
    Wait,
    /// Not at all (on the runtime's own thread).
    TryOnly,
}

/// What a claim of a locked file came to.
enum Claimed {
    /// Fenced and recorded: the lease.
    Held(Box<HeldFile>),
    /// The file was replaced (`release --force`) after it was opened; unlocked.
    Replaced,
    /// Another process had the fence file locked, and the claim was not to wait; the
    /// lock file is still locked.
    FenceBusy(File),
}

/// What one non-waiting attempt at an exclusive lock came to.
enum TryOutcome {
    Taken(Box<HeldFile>),
    Held,
    /// Locked, but the fence file was busy: the lock file, still locked.
    FenceBusy(File),
}

impl Inner {
    /// One attempt at `key`'s exclusive lock that never waits for anything: open, a
    /// non-blocking flock, the fence (unless its file is busy), the record.
    fn try_exclusive(self: &Arc<Self>, key: &str, template: &Record) -> Result<TryOutcome> {
        let name = naming::file_name(key);
        // A replaced file (release --force) is retried a few times at most.
        for _ in 0..8 {
            let file = self.open(&name, Access::Create)?;
            if !flock::try_lock(&file).map_err(|e| self.io_error("lock", &name, &e))? {
                return Ok(TryOutcome::Held);
            }
            let make = |fence| Record {
                fence,
                ..template.clone()
            };
            match self.claim_with(file, key, name.clone(), true, make, FenceWait::TryOnly)? {
                Claimed::Held(held) => return Ok(TryOutcome::Taken(held)),
                Claimed::Replaced => {}
                Claimed::FenceBusy(file) => return Ok(TryOutcome::FenceBusy(file)),
            }
        }
        Ok(TryOutcome::Held)
    }
}

/// A file whose flock is released explicitly when it is dropped (see [`flock::unlock`]).
struct Unlocking(File);

impl Drop for Unlocking {
    fn drop(&mut self) {
        flock::unlock(&self.0);
    }
}

#[async_trait]
impl Backend for FileBackend {
    fn describe(&self) -> &str {
        &self.inner.describe
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            shared_locks: true,
            semaphores: true,
            ..Capabilities::session_bound()
        }
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        match request.kind {
            LockKind::Shared => return self.try_read(request).await,
            LockKind::Semaphore { permits } => return self.try_permit(request, permits).await,
            _ => {}
        }
        let sent_at = Instant::now();
        let template = Self::new_record(request, 0);
        // An attempt waits for nothing but a fence file another process holds for a
        // read and a write, so it runs on the runtime's thread: the hop to the blocking
        // pool and back was most of an in-process hand-off. Only when that fence file is
        // busy does the claim go to the pool, where it may wait for it.
        let outcome = self.inner.try_exclusive(request.key.as_str(), &template)?;
        let held = match outcome {
            TryOutcome::Taken(held) => Some(held),
            TryOutcome::Held => None,
            TryOutcome::FenceBusy(file) => self.claim_waiting(file, request.key, template).await?,
        };
        Ok(match held {
            Some(held) => Attempt::Acquired(Self::grant(held, sent_at)),
            None => Attempt::Held { expires_in: None },
        })
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Option<Granted>> {
        match request.kind {
            LockKind::Shared => return self.read(request).await,
            LockKind::Semaphore { permits } => return self.permit(request, permits).await,
            _ => {}
        }
        let deadline = request.deadline;
        let owner = request.owner.to_string();
        let key = request.key.to_string();
        let name = naming::file_name(&key);
        let template = Self::new_record(request, 0);
        let inner = &self.inner;
        loop {
            let file = inner.open(&name, Access::Create)?;
            // A free lock needs no waiting thread.
            let file = if flock::try_lock(&file).map_err(|e| inner.io_error("lock", &name, &e))? {
                file
            } else {
                match self.wait_as_writer(file, &key, &owner, deadline).await? {
                    Some(file) => file,
                    None => return Ok(None),
                }
            };
            // As in `try_acquire`: on this thread unless the fence file is busy.
            let claimed = match inner.claim_with(
                file,
                &key,
                name.clone(),
                true,
                |fence| Record {
                    fence,
                    ..template.clone()
                },
                FenceWait::TryOnly,
            )? {
                Claimed::Held(held) => Some(held),
                Claimed::Replaced => None,
                Claimed::FenceBusy(file) => {
                    self.claim_waiting(file, request.key, template.clone())
                        .await?
                }
            };
            if let Some(held) = claimed {
                // The kernel granted the lock just now; the flock lives while the file does.
                return Ok(Some(Self::grant(held, Instant::now())));
            }
        }
    }
}

#[async_trait]
impl Admin for FileBackend {
    async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let name = naming::file_name(key.as_str());
        let kernel = KernelLocks::read();
        if let Some(info) = inspect_file(&self.inner, &name, &kernel, Some(key.as_str())) {
            return Ok(Some(info));
        }
        Ok(kinds::inspect_permits(&self.inner, key.as_str(), &kernel))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let inner = &self.inner;
        let entries =
            std::fs::read_dir(inner.dir.path()).map_err(|e| inner.io_error("read", "", &e))?;
        let kernel = KernelLocks::read();
        let mut all = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(kinds::PERMITS_SUFFIX) {
                if let Some(info) = kinds::inspect_permits_file(inner, name, &kernel) {
                    all.push(info);
                }
                continue;
            }
            if !name.ends_with(".lock") {
                continue;
            }
            let key = naming::key_of(name);
            if let Some(info) = inspect_file(inner, name, &kernel, key.as_deref()) {
                all.push(info);
            }
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let key = key.to_string();
        let inner = Arc::clone(&self.inner);
        self.blocking(move || force_release(&inner, &key)).await
    }
}

/// Replaces the lock file of `key`, and each of its semaphore's permit slots, by a new
/// one if it is locked: every holder finds its file replaced at its next renewal.
fn force_release(inner: &Inner, key: &str) -> Result<bool> {
    let mut broken = replace_if_held(inner, key, &naming::file_name(key))?;
    for slot in inner.permit_slots(key) {
        broken |= replace_if_held(inner, key, &slot)?;
    }
    Ok(broken)
}

/// Replaces the file `name` (the lock file of `key` or one of its permit slots) by a new
/// one if it is locked.
fn replace_if_held(inner: &Inner, key: &str, name: &str) -> Result<bool> {
    let name = name.to_owned();
    let mut old = match inner.dir.open_file(&name, Access::Inspect) {
        Ok(file) => file,
        Err(OpenError::Io(err)) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(inner.open_error(&name, err)),
    };
    let meta = old
        .metadata()
        .map_err(|e| inner.io_error("check", &name, &e))?;
    let was_held = match KernelLocks::read().holder(&meta) {
        Holding::HeldBy(_) | Holding::SharedBy(_) | Holding::Unknown => true,
        // /proc/locks is read in pages while other processes lock and unlock, and an
        // entry can slip between two pages: a lock it does not list may still be held.
        // A non-blocking flock of the file itself is the kernel's own answer.
        Holding::Free => {
            let free = flock::try_lock(&old).map_err(|e| inner.io_error("lock", &name, &e))?;
            if free {
                flock::unlock(&old);
            }
            !free
        }
    };
    if !was_held {
        return Ok(false);
    }
    // The counter stays in the fence file, which is not replaced; carrying the old
    // record's fence into it first keeps a directory from before fence files, or whose
    // fence file was deleted, from restarting at the new file's copy.
    let in_record = record::read_unlocked(&mut old).map(|r| r.fence);
    let fence = inner.advance_waiting(key, &name, in_record, 0)?;
    let fresh = Record {
        key: key.to_owned(),
        fence,
        owner: None,
        pid: None,
        host: None,
        acquired_at_ms: None,
        renewed_at_ms: None,
        ttl_ms: None,
        value: None,
        permits: None,
    };
    let (temp, file) = inner
        .dir
        .create_temp()
        .map_err(|e| inner.io_error("create a file in", "", &e))?;
    let written = record::write(&file, &fresh, 0)
        .and_then(|_| file.sync_data())
        .and_then(|()| inner.dir.rename(&temp, &name))
        .and_then(|()| inner.dir.sync());
    if let Err(err) = written {
        let _ = inner.dir.remove(&temp);
        return Err(inner.io_error("replace", &name, &err));
    }
    Ok(true)
}

/// What `status` shows for one lock file, or `None` if it is not locked (or not a lock
/// file dlock would use).
fn inspect_file(
    inner: &Inner,
    name: &str,
    kernel: &KernelLocks,
    key: Option<&str>,
) -> Option<LockInfo> {
    let mut file = inner.dir.open_file(name, Access::Inspect).ok()?;
    let meta = file.metadata().ok()?;
    let holder_pid = match kernel.holder(&meta) {
        Holding::Free => return None,
        Holding::HeldBy(pid) => Some(pid),
        Holding::SharedBy(pids) => {
            let key = key
                .map(str::to_owned)
                .or_else(|| record::read_unlocked(&mut file).map(|r| r.key))?;
            let readers = pids
                .into_iter()
                .map(|pid| {
                    let mut reader = LockInfo::new(key.as_str());
                    reader.pid = Some(pid);
                    reader
                })
                .collect();
            return Some(LockInfo::of_holders(key, LockKind::Shared, readers));
        }
        Holding::Unknown => None,
    };
    let record = record::read_unlocked(&mut file);
    let key = key
        .map(str::to_owned)
        .or_else(|| record.as_ref().map(|r| r.key.clone()))?;
    let mut info = LockInfo::new(key);
    info.pid = holder_pid;
    match record {
        Some(record)
            if record.owner.is_some() && (holder_pid.is_none() || record.pid == holder_pid) =>
        {
            info.owner = record.owner;
            info.fence = Some(record.fence);
            info.pid = record.pid;
            info.host = record.host;
            info.acquired_at = record.acquired_at_ms.map(record::to_system_time);
            info.renewed_at = record.renewed_at_ms.map(record::to_system_time);
            info.ttl = record.ttl_ms.map(Duration::from_millis);
            info.value = record.value;
            if let (Some(renewed), Some(ttl)) = (info.renewed_at, info.ttl) {
                let silent = SystemTime::now()
                    .duration_since(renewed)
                    .unwrap_or_default();
                if silent > ttl {
                    info.note = Some(format!(
                        "not renewed for {} (TTL {}): the holder may be hung or stopped; it keeps the lock until it exits",
                        crate::duration::format_duration(silent),
                        crate::duration::format_duration(ttl)
                    ));
                }
            }
        }
        _ => {
            info.note = Some(match holder_pid {
                Some(pid) => format!(
                    "locked by pid {pid} without a dlock record (flock(1) or another program)"
                ),
                None => "locked (the holder is unknown: /proc/locks is not readable)".to_owned(),
            });
        }
    }
    Some(info)
}
