//! `file:///dir`: flock(2) on one file per key in a directory of this host (SPEC §3).
//!
//! Holding a lock is holding an exclusive flock on `<dir>/<name>.lock` (see [`naming`] for
//! the name of a key), so `flock(1)` on the same path and dlock exclude each other. The
//! kernel frees the lock when the holder process dies, and queues waiters: a waiter
//! blocks in the kernel and is woken at release.
//!
//! The lock file holds a one-line record (see [`record`]): the last fence handed out for
//! the key, fsynced under the lock before the lease is handed over, and the holder's owner
//! token, pid, host, acquisition and renewal times. `status` reads it without locking, and
//! asks the kernel (`/proc/locks`) whether, and by which pid, the file is locked.
//!
//! TTL on this backend: a lock lives as long as its holder's open file, exactly as with
//! flock(1). A holder that is stopped (SIGSTOP) or hung keeps it; renewal only refreshes
//! the record's `renewed_at`, so `status` flags a holder that has not renewed within its
//! TTL. Lock files are never deleted: deleting a flock file lets two processes lock two
//! different files of the same name. `release --force` replaces the file by a new one
//! (same fence counter) instead: new acquirers lock the new file, and the old holder sees
//! at its next renewal that its file was replaced and reports its lease lost.

mod flock;
pub(crate) mod naming;
mod proc_locks;
pub(crate) mod record;

use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, Granted, HeldLease, LockInfo,
};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
use crate::key::Key;
use crate::location::BackendUrl;
use async_trait::async_trait;
use flock::KernelWait;
use proc_locks::{Holding, KernelLocks};
use record::{Contents, Record};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// A lock this process holds: the open, flocked file is the lease.
#[derive(Debug)]
struct HeldFile {
    file: File,
    path: PathBuf,
    record: Record,
    record_len: u64,
    describe: Arc<str>,
}

impl Drop for HeldFile {
    fn drop(&mut self) {
        flock::unlock(&self.file);
    }
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    describe: Arc<str>,
}

/// The file backend.
#[derive(Debug, Clone)]
pub struct FileBackend {
    inner: Arc<Inner>,
}

impl FileBackend {
    /// Opens (creating if needed) the lock directory of a `file:///abs/dir` URL.
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
        Self::open_dir(dir, url.redacted())
    }

    /// Opens (creating if needed) a lock directory.
    pub fn open_dir(dir: PathBuf, describe: &str) -> Result<Self> {
        let describe = describe.trim_end_matches('/').to_owned();
        std::fs::create_dir_all(&dir).map_err(|err| {
            Error::unavailable(
                &describe,
                format!("cannot create the lock directory {}: {err}", dir.display()),
            )
        })?;
        if !dir.is_dir() {
            return Err(Error::unavailable(
                &describe,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(FileBackend {
            inner: Arc::new(Inner {
                dir,
                describe: describe.into(),
            }),
        })
    }

    /// The lock file of `key`.
    pub fn path_of(&self, key: &Key) -> PathBuf {
        self.inner.dir.join(naming::file_name(key.as_str()))
    }

    fn io_error(&self, what: &str, path: &Path, err: &io::Error) -> Error {
        io_error(&self.inner.describe, what, path, err)
    }

    /// Runs blocking file work (an fsync) on tokio's blocking pool, or in place on a
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
        }
    }

    fn grant(held: HeldFile, sent_at: Instant) -> Granted {
        Granted {
            fence: held.record.fence,
            sent_at,
            lease: Box::new(held),
        }
    }
}

fn io_error(describe: &str, what: &str, path: &Path, err: &io::Error) -> Error {
    Error::unavailable(describe, format!("cannot {what} {}: {err}", path.display())).caused_by(
        io::Error::new(err.kind(), err.to_string()),
    )
}

/// Opens `file:///abs/dir`.
pub(crate) async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(FileBackend::open(&BackendUrl::parse(url)?)?))
}

#[async_trait]
impl HeldLease for HeldFile {
    async fn renew(&mut self, ttl: Duration) -> Result<bool> {
        let current = is_current(&self.file, &self.path)
            .map_err(|e| io_error(&self.describe, "check", &self.path, &e))?;
        if !current {
            return Ok(false);
        }
        self.record.renewed_at_ms = Some(record::now_ms());
        self.record.ttl_ms = Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self.record_len = record::write(&self.file, &self.record, self.record_len)
            .map_err(|e| io_error(&self.describe, "write", &self.path, &e))?;
        Ok(true)
    }

    async fn release(self: Box<Self>) -> Result<bool> {
        // Dropping the handle unlocks the file; the file itself stays (see module docs).
        Ok(is_current(&self.file, &self.path).unwrap_or(false))
    }
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o664)
        .open(path)
}

/// True if `file` is still the file at `path` (not replaced by `release --force`).
fn is_current(file: &File, path: &Path) -> io::Result<bool> {
    let open = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(now.ino() == open.ino() && now.dev() == open.dev()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

/// After the flock is taken: checks the file is still current, hands out the next
/// fence and writes the record durably. `None` if the file was replaced meanwhile.
fn claim(
    mut file: File,
    path: PathBuf,
    describe: Arc<str>,
    new_record: impl FnOnce(u64) -> Record,
) -> io::Result<Option<HeldFile>> {
    if !is_current(&file, &path)? {
        flock::unlock(&file);
        return Ok(None);
    }
    let (contents, old_len) = record::read(&mut file)?;
    let fence = match contents {
        Contents::Empty => 1,
        Contents::Record(previous) => previous.fence.saturating_add(1),
        // The counter is unreadable (a crash cut the write short, or another program
        // wrote the file). Milliseconds since 1970 exceed any count of acquisitions.
        Contents::Unreadable => record::now_ms().saturating_mul(1000),
    };
    let record = new_record(fence);
    let record_len = record::write(&file, &record, old_len)?;
    file.sync_data()?;
    Ok(Some(HeldFile {
        file,
        path,
        record,
        record_len,
        describe,
    }))
}

#[async_trait]
impl Backend for FileBackend {
    fn describe(&self) -> &str {
        &self.inner.describe
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::session_bound()
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let sent_at = Instant::now();
        let path = self.path_of(request.key);
        let this = self.clone();
        let make = {
            let template = Self::new_record(request, 0);
            move |fence| Record { fence, ..template }
        };
        let describe = Arc::clone(&self.inner.describe);
        let claimed = self
            .blocking(move || {
                // A replaced file (release --force) is retried a few times at most.
                for _ in 0..8 {
                    let file =
                        open_lock_file(&path).map_err(|e| this.io_error("open", &path, &e))?;
                    if !flock::try_lock(&file).map_err(|e| this.io_error("lock", &path, &e))? {
                        return Ok(None);
                    }
                    if let Some(held) = claim(file, path.clone(), describe.clone(), make.clone())
                        .map_err(|e| this.io_error("write the fence to", &path, &e))?
                    {
                        return Ok(Some(held));
                    }
                }
                Ok(None)
            })
            .await?;
        Ok(match claimed {
            Some(held) => Attempt::Acquired(Self::grant(held, sent_at)),
            None => Attempt::Held { expires_in: None },
        })
    }

    async fn acquire(&self, request: &AcquireRequest<'_>) -> Result<Option<Granted>> {
        let deadline = request.deadline;
        let path = self.path_of(request.key);
        let template = Self::new_record(request, 0);
        loop {
            let file = open_lock_file(&path).map_err(|e| self.io_error("open", &path, &e))?;
            // A free lock needs no waiting thread.
            let file = if flock::try_lock(&file).map_err(|e| self.io_error("lock", &path, &e))? {
                file
            } else {
                let wait =
                    KernelWait::start(file).map_err(|e| self.io_error("wait for", &path, &e))?;
                match wait
                    .wait(deadline)
                    .await
                    .map_err(|e| self.io_error("lock", &path, &e))?
                {
                    Some(file) => file,
                    None => return Ok(None),
                }
            };
            let (path_for_claim, template) = (path.clone(), template.clone());
            let this = self.clone();
            let describe = Arc::clone(&self.inner.describe);
            let claimed = self
                .blocking(move || {
                    claim(file, path_for_claim.clone(), describe, |fence| Record {
                        fence,
                        ..template
                    })
                    .map_err(|e| this.io_error("write the fence to", &path_for_claim, &e))
                })
                .await?;
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
        let path = self.path_of(key);
        let kernel = KernelLocks::read();
        Ok(inspect_file(&path, &kernel, Some(key.as_str())))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let dir = self.inner.dir.clone();
        let entries = std::fs::read_dir(&dir).map_err(|e| self.io_error("read", &dir, &e))?;
        let kernel = KernelLocks::read();
        let mut all = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.ends_with(".lock") {
                continue;
            }
            let key = naming::key_of(name);
            if let Some(info) = inspect_file(&entry.path(), &kernel, key.as_deref()) {
                all.push(info);
            }
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    async fn force_release(&self, key: &Key) -> Result<bool> {
        let path = self.path_of(key);
        let was_held = matches!(
            std::fs::metadata(&path).map(|meta| KernelLocks::read().holder(&meta)),
            Ok(Holding::HeldBy(_) | Holding::Unknown)
        );
        if !was_held {
            return Ok(false);
        }
        // Replace the file by a new one that carries the fence counter forward.
        let fence = File::open(&path)
            .ok()
            .and_then(|mut f| record::read_unlocked(&mut f))
            .map_or(0, |r| r.fence);
        let fresh = Record {
            key: key.to_string(),
            fence,
            owner: None,
            pid: None,
            host: None,
            acquired_at_ms: None,
            renewed_at_ms: None,
            ttl_ms: None,
        };
        let temp = self
            .inner
            .dir
            .join(format!(".{}.{}.tmp", std::process::id(), Owner::random()));
        let written = (|| -> io::Result<()> {
            let file = open_lock_file(&temp)?;
            record::write(&file, &fresh, 0)?;
            file.sync_data()?;
            std::fs::rename(&temp, &path)
        })();
        if let Err(err) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(self.io_error("replace", &path, &err));
        }
        Ok(true)
    }
}

/// What `status` shows for one lock file, or `None` if it is not locked.
fn inspect_file(path: &Path, kernel: &KernelLocks, key: Option<&str>) -> Option<LockInfo> {
    let meta = std::fs::metadata(path).ok()?;
    let holder_pid = match kernel.holder(&meta) {
        Holding::Free => return None,
        Holding::HeldBy(pid) => Some(pid),
        Holding::Unknown => None,
    };
    let record = File::open(path)
        .ok()
        .and_then(|mut f| record::read_unlocked(&mut f));
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
