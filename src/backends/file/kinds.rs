//! Shared locks, writer intents and semaphores on lock files.
//!
//! Shared: a reader holds `flock(LOCK_SH)` on the key's lock file, the same file a
//! writer locks with `LOCK_EX`, so `flock -s` and `dlock run --shared` share with each
//! other and exclude writers of both kinds. A reader's fence comes from the key's fence
//! file like a writer's, so fences of all kinds are ordered by one counter. Readers write
//! no record (several share one file, whose record stays the last writer's); `status`
//! lists them from `/proc/locks`, by pid.
//!
//! Writer starvation. The kernel's flock does not prefer writers: a new `LOCK_SH` is
//! granted while a `LOCK_EX` waits. So a dlock writer that has to wait writes an intent
//! file `<name>.intent` (its owner token and an expiry [`INTENT`] ahead, on the wall
//! clock), rewritten every third of that while it waits, and emptied when it gets the
//! lock or gives up. A dlock reader does not join while a live intent is there, so the
//! readers drain and the writer gets in. `flock -s` knows nothing of intents: a stream of
//! plain `flock -s` readers can still starve a writer, as it can starve `flock -x`.
//!
//! Semaphores: permit `i` of `N` is an exclusive flock on the slot file
//! `<name>.permit-<i>`, which holds that permit's record (owner, fence, pid), and `N` is
//! recorded in `<name>.permits`, under whose flock permits are taken, so that a request
//! with another `N` while permits are held is refused ([`Error::PermitMismatch`]). A
//! killed holder's slot is freed by the kernel at once. A waiter waits in the kernel on
//! one slot at a time (in turn) for a short while, then tries them all again.

use super::dir::{Access, OpenError};
use super::flock::{self, KernelWait, Mode};
use super::proc_locks::KernelLocks;
use super::record::{self, Record};
use super::{inspect_file, naming, FileBackend, Inner, Unlocking, FENCE_LOCK_WAIT};
use crate::core::backend::{AcquireRequest, Attempt, Granted, LockInfo, LockKind};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a waiting writer's intent keeps new dlock readers out after it was last
/// written; a writer that vanished without emptying it holds readers back this long.
const INTENT: Duration = Duration::from_secs(2);

/// The suffix of a semaphore's file recording its number of permits.
pub(super) const PERMITS_SUFFIX: &str = ".permits";

/// The longest pause between two looks at a semaphore's other slots while waiting.
const PERMIT_POLL: Duration = Duration::from_millis(200);

fn intent_name(key: &str) -> String {
    naming::name_with(key, ".intent")
}

fn slot_name(key: &str, i: u32) -> String {
    naming::name_with(key, &format!(".permit-{i}"))
}

fn permits_name(key: &str) -> String {
    naming::name_with(key, PERMITS_SUFFIX)
}

/// What `<name>.permits` holds.
#[derive(Debug, Serialize, Deserialize)]
struct PermitsRecord {
    key: String,
    permits: u32,
}

impl Inner {
    fn write_intent(&self, key: &str, owner: &str) -> Result<()> {
        let name = intent_name(key);
        let file = self.open(&name, Access::Create)?;
        let until = record::now_ms().saturating_add(INTENT.as_millis() as u64);
        let line = format!("{owner} {until}\n");
        file.write_all_at(line.as_bytes(), 0)
            .and_then(|()| file.set_len(line.len() as u64))
            .map_err(|e| self.io_error("write", &name, &e))
    }

    /// The owner and remaining life of a live writer intent on `key`, if any.
    fn live_intent(&self, key: &str) -> Option<(String, Duration)> {
        let file = self
            .dir
            .open_file(&intent_name(key), Access::Inspect)
            .ok()?;
        let mut buf = [0u8; 128];
        let n = file.read_at(&mut buf, 0).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]);
        let (owner, until) = text.trim().split_once(' ')?;
        let until: u64 = until.parse().ok()?;
        let left = until.checked_sub(record::now_ms()).filter(|l| *l > 0)?;
        // A clock set back must not make an intent last longer than its life.
        Some((owner.to_owned(), Duration::from_millis(left).min(INTENT)))
    }

    /// Empties the intent file if it is `owner`'s (another writer may have replaced it).
    fn clear_intent(&self, key: &str, owner: &str) {
        if self.live_intent(key).is_some_and(|(o, _)| o == owner) {
            if let Ok(file) = self.dir.open_file(&intent_name(key), Access::Create) {
                let _ = file.set_len(0);
            }
        }
    }

    /// One attempt at a permit of `key`'s `permits`-permit semaphore, under the flock of
    /// its permits file.
    fn take_permit(
        self: &Arc<Self>,
        key: &str,
        permits: u32,
        template: &Record,
    ) -> Result<Option<super::HeldFile>> {
        let name = permits_name(key);
        let meta = Unlocking(self.open(&name, Access::Create)?);
        if !flock::lock_within(&meta.0, FENCE_LOCK_WAIT)
            .map_err(|e| self.io_error("lock", &name, &e))?
        {
            return Err(Error::unavailable(
                &self.describe,
                format!("{} stayed locked by another process", self.path(&name)),
            ));
        }
        let recorded = read_permits(&meta.0);
        if let Some(held_with) = recorded.as_ref().map(|r| r.permits) {
            if held_with != permits && self.any_slot_held(key, held_with)? {
                return Err(Error::PermitMismatch {
                    key: key.to_owned(),
                    backend: self.describe.clone(),
                    held_with,
                    asked: permits,
                });
            }
        }
        if recorded.as_ref().map(|r| r.permits) != Some(permits) {
            let text = serde_json::to_string(&PermitsRecord {
                key: key.to_owned(),
                permits,
            })
            .map_err(|e| self.io_error("write", &name, &io::Error::other(e)))?;
            let line = format!("{text}\n");
            meta.0
                .write_all_at(line.as_bytes(), 0)
                .and_then(|()| meta.0.set_len(line.len() as u64))
                .map_err(|e| self.io_error("write", &name, &e))?;
        }
        for i in 0..permits {
            let slot = slot_name(key, i);
            let file = self.open(&slot, Access::Create)?;
            if !flock::try_lock(&file).map_err(|e| self.io_error("lock", &slot, &e))? {
                continue;
            }
            let template = template.clone();
            if let Some(held) =
                self.claim_as(file, key, slot, true, |fence| Record { fence, ..template })?
            {
                return Ok(Some(held));
            }
        }
        Ok(None)
    }

    /// The names of the permit slots of `key`'s semaphore, as many as its permits file
    /// records (none if `key` was never a semaphore).
    pub(super) fn permit_slots(&self, key: &str) -> Vec<String> {
        let Ok(file) = self.dir.open_file(&permits_name(key), Access::Inspect) else {
            return Vec::new();
        };
        read_permits(&file).map_or_else(Vec::new, |r| {
            (0..r.permits).map(|i| slot_name(key, i)).collect()
        })
    }

    fn any_slot_held(&self, key: &str, permits: u32) -> Result<bool> {
        for i in 0..permits {
            let slot = slot_name(key, i);
            let file = match self.dir.open_file(&slot, Access::Create) {
                Ok(file) => file,
                Err(err) => return Err(self.open_error(&slot, err)),
            };
            if !flock::try_lock(&file).map_err(|e| self.io_error("lock", &slot, &e))? {
                return Ok(true);
            }
            flock::unlock(&file);
        }
        Ok(false)
    }
}

fn read_permits(file: &File) -> Option<PermitsRecord> {
    let mut buf = vec![0u8; 4096];
    let n = file.read_at(&mut buf, 0).ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    serde_json::from_str(text.lines().next()?.trim()).ok()
}

impl FileBackend {
    /// Waits in the kernel for the exclusive lock on `file`, keeping a writer intent up
    /// meanwhile so that new dlock readers let the current ones drain.
    pub(super) async fn wait_as_writer(
        &self,
        mut file: File,
        key: &str,
        owner: &str,
        deadline: Option<Instant>,
    ) -> Result<Option<File>> {
        let inner = &self.inner;
        let name = naming::file_name(key);
        loop {
            inner.write_intent(key, owner)?;
            let slice = Instant::now() + INTENT / 3;
            let until = deadline.map_or(slice, |d| d.min(slice));
            let wait = KernelWait::start(file, Mode::Exclusive)
                .map_err(|e| inner.io_error("wait for", &name, &e))?;
            let got = wait.wait(Some(until)).await;
            match got.map_err(|e| inner.io_error("lock", &name, &e)) {
                Ok(Some(locked)) => {
                    inner.clear_intent(key, owner);
                    return Ok(Some(locked));
                }
                Ok(None) if deadline.is_some_and(|d| Instant::now() >= d) => {
                    inner.clear_intent(key, owner);
                    return Ok(None);
                }
                Ok(None) => file = inner.open(&name, Access::Create)?,
                Err(err) => {
                    inner.clear_intent(key, owner);
                    return Err(err);
                }
            }
        }
    }

    /// One attempt at a shared lock; refused while a writer's intent is live.
    pub(super) async fn try_read(&self, request: &AcquireRequest<'_>) -> Result<Attempt> {
        let sent_at = Instant::now();
        if let Some((_, left)) = self.inner.live_intent(request.key.as_str()) {
            return Ok(Attempt::Held {
                expires_in: Some(left),
            });
        }
        let key = request.key.to_string();
        let inner = Arc::clone(&self.inner);
        let template = Self::new_record(request, 0);
        let claimed = self
            .blocking(move || {
                let name = naming::file_name(&key);
                for _ in 0..8 {
                    let file = inner.open(&name, Access::Create)?;
                    if !flock::try_lock_as(&file, Mode::Shared)
                        .map_err(|e| inner.io_error("lock", &name, &e))?
                    {
                        return Ok(None);
                    }
                    let template = template.clone();
                    if let Some(held) =
                        inner.claim_as(file, &key, name.clone(), false, |fence| Record {
                            fence,
                            ..template
                        })?
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

    /// A shared lock, waiting: first for a writer's intent to go, then in the kernel.
    pub(super) async fn read(&self, request: &AcquireRequest<'_>) -> Result<Option<Granted>> {
        let deadline = request.deadline;
        let key = request.key.to_string();
        let name = naming::file_name(&key);
        let template = Self::new_record(request, 0);
        let inner = &self.inner;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some((_, left)) = inner.live_intent(&key) {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return Ok(None);
                }
                let mut wake = now + pause.min(left);
                if let Some(d) = deadline {
                    wake = wake.min(d);
                }
                tokio::time::sleep_until(wake.into()).await;
                pause = (pause * 2).min(Duration::from_millis(100));
                continue;
            }
            let file = inner.open(&name, Access::Create)?;
            let file = if flock::try_lock_as(&file, Mode::Shared)
                .map_err(|e| inner.io_error("lock", &name, &e))?
            {
                file
            } else {
                let wait = KernelWait::start(file, Mode::Shared)
                    .map_err(|e| inner.io_error("wait for", &name, &e))?;
                match wait
                    .wait(deadline)
                    .await
                    .map_err(|e| inner.io_error("lock", &name, &e))?
                {
                    Some(file) => file,
                    None => return Ok(None),
                }
            };
            let (key, template) = (key.clone(), template.clone());
            let this = Arc::clone(inner);
            let slot = name.clone();
            let claimed = self
                .blocking(move || {
                    this.claim_as(file, &key, slot, false, |fence| Record {
                        fence,
                        ..template
                    })
                })
                .await?;
            if let Some(held) = claimed {
                return Ok(Some(Self::grant(held, Instant::now())));
            }
        }
    }

    /// One attempt at a permit.
    pub(super) async fn try_permit(
        &self,
        request: &AcquireRequest<'_>,
        permits: u32,
    ) -> Result<Attempt> {
        let sent_at = Instant::now();
        let key = request.key.to_string();
        let inner = Arc::clone(&self.inner);
        let template = Self::new_record(request, 0);
        let claimed = self
            .blocking(move || inner.take_permit(&key, permits, &template))
            .await?;
        Ok(match claimed {
            Some(held) => Attempt::Acquired(Self::grant(held, sent_at)),
            None => Attempt::Held { expires_in: None },
        })
    }

    /// A permit, waiting: in the kernel on one slot at a time, in turn, for a short
    /// while, then another attempt at every slot.
    pub(super) async fn permit(
        &self,
        request: &AcquireRequest<'_>,
        permits: u32,
    ) -> Result<Option<Granted>> {
        let deadline = request.deadline;
        let key = request.key.to_string();
        let mut pause = Duration::from_millis(10);
        let mut turn = 0u32;
        loop {
            if let Attempt::Acquired(granted) = self.try_permit(request, permits).await? {
                return Ok(Some(granted));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            let slot = slot_name(&key, turn % permits);
            turn = turn.wrapping_add(1);
            let file = self.inner.open(&slot, Access::Create)?;
            let mut until = now + pause;
            if let Some(d) = deadline {
                until = until.min(d);
            }
            let wait = KernelWait::start(file, Mode::Exclusive)
                .map_err(|e| self.inner.io_error("wait for", &slot, &e))?;
            // Woken when that slot frees: the next attempt takes it (or another) under
            // the permits file's flock, which checks the count.
            if let Some(file) = wait
                .wait(Some(until))
                .await
                .map_err(|e| self.inner.io_error("lock", &slot, &e))?
            {
                flock::unlock(&file);
            }
            pause = (pause * 2).min(PERMIT_POLL);
        }
    }
}

/// The record of `key`'s semaphore: one holder per held slot.
pub(super) fn inspect_permits(inner: &Inner, key: &str, kernel: &KernelLocks) -> Option<LockInfo> {
    let file = match inner.dir.open_file(&permits_name(key), Access::Inspect) {
        Ok(file) => file,
        Err(OpenError::Io(_) | OpenError::Refused(_)) => return None,
    };
    let recorded = read_permits(&file)?;
    permits_info(inner, &recorded, kernel)
}

/// The same, from the name of a permits file (for `list`).
pub(super) fn inspect_permits_file(
    inner: &Inner,
    name: &str,
    kernel: &KernelLocks,
) -> Option<LockInfo> {
    let file = inner.dir.open_file(name, Access::Inspect).ok()?;
    let recorded = read_permits(&file)?;
    // Only the file of that key's name: a planted one names no other key's slots.
    if permits_name(&recorded.key) != name {
        return None;
    }
    permits_info(inner, &recorded, kernel)
}

fn permits_info(inner: &Inner, recorded: &PermitsRecord, kernel: &KernelLocks) -> Option<LockInfo> {
    let key = recorded.key.as_str();
    let holders: Vec<LockInfo> = (0..recorded.permits)
        .filter_map(|i| inspect_file(inner, &slot_name(key, i), kernel, Some(key)))
        .collect();
    if holders.is_empty() {
        return None;
    }
    Some(LockInfo::of_holders(
        key,
        LockKind::Semaphore {
            permits: recorded.permits,
        },
        holders,
    ))
}
