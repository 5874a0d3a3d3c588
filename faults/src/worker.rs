//! The workload of one client: acquire the key, read-modify-write the fenced store,
//! release, until a deadline. Runs as a separate process (`dlock-fault-worker`) or, for
//! `memory://`, as a task inside the harness.
//!
//! Three workloads ([`Workload`]): the mutex (every section a writer), read-write (three
//! sections in four are readers under `shared()`, which only read the store, fenced; the
//! fourth a writer doing the fenced read-modify-write), and a semaphore of N permits (each
//! section holds one permit and touches no shared value: the checker counts moments with
//! more than N sections open).
//!
//! The worker is deliberately naive: it writes even when its lease's `lost()` has fired,
//! so that the fence, not the client's good behaviour, is what stops a stale holder.

use crate::store::StoreClient;
use fencelock::Locks;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Which kind of lease the workers take and what they do under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workload {
    /// Exclusive leases, each section a fenced read-modify-write.
    #[default]
    Mutex,
    /// Readers (`shared()`, a fenced read) and writers (exclusive, a fenced
    /// read-modify-write) on one key.
    ReadWrite,
    /// Permits of a semaphore; each section holds one.
    Semaphore {
        /// The semaphore's number of permits.
        permits: u32,
    },
}

impl Workload {
    /// `mutex`, `rw`, `semaphore:N`.
    pub fn name(self) -> String {
        match self {
            Workload::Mutex => "mutex".into(),
            Workload::ReadWrite => "rw".into(),
            Workload::Semaphore { permits } => format!("semaphore:{permits}"),
        }
    }

    /// Parses [`Workload::name`]'s spelling.
    pub fn parse(text: &str) -> Result<Workload, String> {
        match text {
            "mutex" => Ok(Workload::Mutex),
            "rw" | "read-write" => Ok(Workload::ReadWrite),
            _ => text
                .strip_prefix("semaphore:")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| *n >= 1)
                .map(|permits| Workload::Semaphore { permits })
                .ok_or_else(|| {
                    format!("unknown workload {text:?}: mutex, rw or semaphore:N (N >= 1)")
                }),
        }
    }

    /// How many sections may be open at once without a fault (1, or N permits);
    /// readers of the read-write workload are counted apart by the checker.
    pub fn holders(self) -> usize {
        match self {
            Workload::Semaphore { permits } => permits as usize,
            _ => 1,
        }
    }

    /// Whether section number `section` of `client` is a reader.
    pub fn is_reader(self, client: u32, section: u64) -> bool {
        self == Workload::ReadWrite && !(u64::from(client) + section).is_multiple_of(4)
    }
}

/// What one worker does.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The worker's incarnation number (unique per run).
    pub client: u32,
    /// The lock key.
    pub key: String,
    /// The lease TTL.
    pub ttl: Duration,
    /// How long a critical section sleeps between its read and its write.
    pub work: Duration,
    /// Where the fenced store listens.
    pub store: String,
    /// How long to run.
    pub run_for: Duration,
    /// Which leases to take.
    pub workload: Workload,
}

/// What a worker did, for its log.
#[derive(Debug, Default, Clone)]
pub struct WorkerStats {
    /// Critical sections entered.
    pub sections: u64,
    /// Writes the store accepted.
    pub accepted: u64,
    /// Reads or writes the store rejected as stale.
    pub stale: u64,
    /// Sections in which `lost()` had fired by their end.
    pub lost: u64,
    /// Releases that found the lease already lost.
    pub released_lost: u64,
    /// dlock errors (acquire, release), by message.
    pub errors: Vec<String>,
}

/// A timeout for every dlock call, so that a paused or dead server cannot hang a worker.
fn call_timeout(ttl: Duration) -> Duration {
    ttl * 4 + Duration::from_secs(2)
}

/// Runs the workload until the deadline. Errors from dlock are counted, never fatal;
/// only losing the store (the harness) ends the worker early.
pub async fn run(locks: Locks, config: WorkerConfig) -> std::io::Result<WorkerStats> {
    let deadline = Instant::now() + config.run_for;
    let mut store = StoreClient::connect(&config.store).await?;
    let mut stats = WorkerStats::default();
    let limit = call_timeout(config.ttl);
    while Instant::now() < deadline {
        let reader = config.workload.is_reader(config.client, stats.sections + 1);
        let builder = match config.workload {
            Workload::Semaphore { permits } => locks.semaphore(&config.key, permits),
            _ if reader => locks.lock(&config.key).shared(),
            _ => locks.lock(&config.key),
        };
        let acquire = builder.ttl(config.ttl).wait_for(config.ttl * 2).acquire();
        let lease = match tokio::time::timeout(limit, acquire).await {
            Ok(Ok(lease)) => lease,
            Ok(Err(fencelock::Error::NotAcquired { .. })) => continue,
            Ok(Err(err)) => {
                stats.errors.push(err.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(_) => {
                stats.errors.push("acquire timed out".into());
                continue;
            }
        };
        stats.sections += 1;
        let (client, section, fence) = (config.client, stats.sections, lease.fence());
        let begun = Instant::now();
        let lapse = watch_lapse(&lease);
        store
            .call(&format!(
                "B {client} {section} {fence} {}",
                u8::from(reader)
            ))
            .await?;
        match config.workload {
            Workload::Semaphore { .. } => tokio::time::sleep(config.work).await,
            _ if reader => {
                // A reader's read is fenced against writers only: readers overlap.
                let read = store.call(&format!("Q {client} {section} {fence}")).await?;
                if read.starts_with("V ") {
                    tokio::time::sleep(config.work).await;
                } else {
                    stats.stale += 1;
                }
            }
            _ => {
                let read = store.call(&format!("R {client} {section} {fence}")).await?;
                if let Some(value) = read.strip_prefix("V ").and_then(|v| v.parse::<u64>().ok()) {
                    tokio::time::sleep(config.work).await;
                    let next = value + 1;
                    let write = store
                        .call(&format!("W {client} {section} {fence} {next}"))
                        .await?;
                    if write == "A" {
                        stats.accepted += 1;
                    } else {
                        stats.stale += 1;
                    }
                } else {
                    stats.stale += 1;
                }
            }
        }
        let lost = lease.is_lost();
        stats.lost += u64::from(lost);
        // Let a loss that has just fired be timed before the section is reported ended.
        tokio::task::yield_now().await;
        let lapsed = lapse
            .lapsed_at()
            .map(|at| format!(" {}", at.saturating_duration_since(begun).as_micros()))
            .unwrap_or_default();
        lapse.stop();
        store
            .call(&format!(
                "E {client} {section} {fence} {}{lapsed}",
                u8::from(lost)
            ))
            .await?;
        // A release that finds the lease gone is how a holder overtaken between two
        // renewals learns it: the checker counts that as learned, not as silent.
        let held = match tokio::time::timeout(limit, lease.release()).await {
            Ok(Ok(held)) => u8::from(held),
            Ok(Err(err)) => {
                stats.errors.push(format!("release: {err}"));
                2
            }
            Err(_) => {
                stats.errors.push("release timed out".into());
                2
            }
        };
        stats.released_lost += u64::from(held == 0);
        store
            .call(&format!("X {client} {section} {fence} {held}"))
            .await?;
    }
    Ok(stats)
}

/// Times the moment a lease lapses: its `lost()` firing because the holder could not
/// renew in time (a starved or paused process, an unreachable store), as opposed to the
/// store ending or refusing it. The checker tells a successor that began after that
/// moment (the lease model at work) from one that overtook a holder still unaware.
struct LapseWatch {
    at: Arc<Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

fn watch_lapse(lease: &fencelock::Lease) -> LapseWatch {
    let at = Arc::new(Mutex::new(None));
    let lost = lease.lost();
    let task = tokio::spawn({
        let at = Arc::clone(&at);
        async move {
            let reason = lost.await;
            let now = Instant::now();
            if matches!(
                reason,
                fencelock::LossReason::Expired | fencelock::LossReason::RenewalFailed { .. }
            ) {
                *at.lock().unwrap_or_else(PoisonError::into_inner) = Some(now);
            }
        }
    });
    LapseWatch { at, task }
}

impl LapseWatch {
    fn lapsed_at(&self) -> Option<Instant> {
        *self.at.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stop(self) {
        self.task.abort();
    }
}
