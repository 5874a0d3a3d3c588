//! Leader election on leases: a campaign is a wait for an exclusive lease whose holder
//! record carries the candidate's value; the term is the lease's fence.

use crate::core::backend::{KeyWatch, LockInfo};
use crate::core::lease::{Lease, LeaseHandle};
use crate::core::locks::{LockBuilder, Locks, Wait};
use crate::error::{LossReason, Result};
use std::future::Future;
use std::time::Duration;

/// The options of a campaign, from [`Locks::elect`](crate::Locks::elect): the leader's
/// TTL and how long to wait to become leader (by default without limit).
#[derive(Debug, Clone)]
#[must_use = "an ElectionBuilder does nothing until campaign() is called"]
pub struct ElectionBuilder {
    builder: LockBuilder,
}

impl ElectionBuilder {
    pub(crate) fn new(builder: LockBuilder) -> Self {
        ElectionBuilder { builder }
    }

    /// The leadership lease's TTL: a leader that dies is replaced after this long (at
    /// once on session-bound backends).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.builder = self.builder.ttl(ttl);
        self
    }

    /// How long to campaign before giving up.
    pub fn wait(mut self, wait: Wait) -> Self {
        self.builder = self.builder.wait(wait);
        self
    }

    /// Campaign at most `limit`.
    pub fn wait_for(self, limit: Duration) -> Self {
        self.wait(Wait::For(limit))
    }

    /// Waits until this candidate leads; [`Error::NotAcquired`](crate::Error::NotAcquired)
    /// if the wait runs out first.
    pub async fn campaign(self) -> Result<Leadership> {
        let value = self.builder.value.clone().unwrap_or_default();
        let lease = self.builder.acquire().await?;
        Ok(Leadership { lease, value })
    }

    /// One attempt: the leadership if nobody leads, else `None`.
    pub async fn try_campaign(self) -> Result<Option<Leadership>> {
        let value = self.builder.value.clone().unwrap_or_default();
        Ok(self
            .builder
            .try_acquire()
            .await?
            .map(|lease| Leadership { lease, value }))
    }
}

/// Being the leader of an election: a lease renewed in the background. Stop acting as
/// leader when [`lost`](Leadership::lost) resolves; pass [`term`](Leadership::term) to
/// whatever the leader writes to, so a deposed leader's writes can be refused.
#[must_use = "leadership ends as soon as the Leadership is dropped"]
#[derive(Debug)]
pub struct Leadership {
    lease: Lease,
    value: String,
}

impl Leadership {
    /// The election's name.
    pub fn name(&self) -> &str {
        self.lease.key()
    }

    /// The value this leader published.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The term: the lease's fence, strictly greater than every earlier leader's.
    pub fn term(&self) -> u64 {
        self.lease.fence()
    }

    /// Resolves when the leadership may have ended (see [`Lease::lost`]).
    pub fn lost(&self) -> impl Future<Output = LossReason> + Send + 'static {
        self.lease.lost()
    }

    /// True once the leadership may have ended.
    pub fn is_lost(&self) -> bool {
        self.lease.is_lost()
    }

    /// The underlying lease.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// A cloneable view of the underlying lease.
    pub fn handle(&self) -> LeaseHandle {
        self.lease.handle()
    }

    /// Steps down, letting the next candidate lead; `true` if it still led.
    pub async fn resign(self) -> Result<bool> {
        self.lease.release().await
    }
}

/// Who leads an election, from [`Locks::leader`](crate::Locks::leader).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leader {
    /// The value the leader published, where the backend stores it.
    pub value: Option<String>,
    /// The leader's term (its lease's fence).
    pub term: u64,
    /// The leader's process id, where known.
    pub pid: Option<u32>,
    /// The leader's host, where known.
    pub host: Option<String>,
}

impl Leader {
    pub(crate) fn from_info(info: LockInfo) -> Option<Leader> {
        Some(Leader {
            term: info.fence?,
            value: info.value,
            pid: info.pid,
            host: info.host,
        })
    }
}

/// How often a leader watch looks again when the store does not tell it of a change:
/// stores notify releases, not acquisitions.
const LEADER_POLL: Duration = Duration::from_millis(200);

/// Observes an election, from [`Locks::watch_leader`](crate::Locks::watch_leader).
pub struct LeaderWatch {
    locks: Locks,
    name: String,
    last: Option<Option<u64>>,
    watch: Option<Box<dyn KeyWatch>>,
}

impl std::fmt::Debug for LeaderWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderWatch")
            .field("name", &self.name)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl LeaderWatch {
    pub(crate) fn new(locks: Locks, name: &str) -> Self {
        LeaderWatch {
            locks,
            name: name.to_owned(),
            last: None,
            watch: None,
        }
    }

    /// The leader (or `None`: nobody leads) as soon as it differs from what the previous
    /// call returned; the first call returns the current state at once.
    pub async fn changed(&mut self) -> Result<Option<Leader>> {
        loop {
            if self.watch.is_none() {
                if let Ok(key) = crate::key::Key::new(&self.name) {
                    // Subscribed before looking, so a release between the two is seen.
                    self.watch = self.locks.backend().watch(&key).await.ok().flatten();
                }
            }
            let now = self.locks.leader(&self.name).await?;
            let term = now.as_ref().map(|l| l.term);
            if self.last != Some(term) {
                self.last = Some(term);
                return Ok(now);
            }
            match self.watch.as_mut() {
                Some(watch) => {
                    tokio::select! {
                        () = watch.changed() => {}
                        () = tokio::time::sleep(LEADER_POLL) => {}
                    }
                }
                None => tokio::time::sleep(LEADER_POLL).await,
            }
        }
    }
}
