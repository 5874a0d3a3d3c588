//! Metrics of the lease engine, recorded through the [`metrics`] facade.
//!
//! Nothing is recorded anywhere until the program installs a recorder (for example
//! `metrics-exporter-prometheus`, or `metrics-util`'s `DebuggingRecorder` in a test);
//! without one every call below is a no-op. `dlock run --metrics ADDR` installs a
//! Prometheus exporter for the time COMMAND runs.
//!
//! | name | type | labels |
//! |---|---|---|
//! | [`ACQUIRE_DURATION`] `dlock_acquire_duration_seconds` | histogram | `backend`, `kind`, `outcome` (`acquired`, `not_acquired`, `error`) |
//! | [`ACQUIRE_ATTEMPTS`] `dlock_acquire_attempts` | histogram | `backend`, `kind`, `outcome` |
//! | [`HOLD_DURATION`] `dlock_hold_duration_seconds` | histogram | `backend`, `kind`, `end` (`released`, `dropped`, `lost`) |
//! | [`HOLDERS`] `dlock_holders` | gauge | `backend`, `kind` |
//! | [`WAITERS`] `dlock_waiters` | gauge | `backend`, `kind` |
//! | [`RENEWALS`] `dlock_renewals_total` | counter | `backend`, `kind` |
//! | [`RENEWAL_FAILURES`] `dlock_renewal_failures_total` | counter | `backend`, `kind`, `reason` (`error`, `refused`) |
//! | [`LOSSES`] `dlock_leases_lost_total` | counter | `backend`, `kind`, `reason` (`renewal_refused`, `expired`, `renewal_failed`, `session_ended`) |
//!
//! `backend` is the URL's scheme (`file`, `redis`, `postgres`, …; `rediss` counts as
//! `redis` and `postgresql` as `postgres`; `other` for a
//! backend outside the registry), never the URL: no host, database or password reaches a
//! metric, and the number of series stays bounded. `kind` is `exclusive`, `shared` or
//! `semaphore`. The key is **not** a label by default, since keys are unbounded (a key
//! per job or per account would make a series each); [`set_key_label`] adds it for
//! programs with a small, fixed set of keys.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), fencelock::Error> {
//! // With a recorder installed (metrics::set_global_recorder), this records one
//! // acquire (outcome "acquired"), a holder while the lease is held, and its hold time.
//! fencelock::metrics::describe();
//! let locks = fencelock::connect("memory://metrics-doc").await?;
//! let lease = locks.lock("report").acquire().await?;
//! lease.release().await?;
//! # Ok(()) }
//! ```

use crate::core::backend::LockKind;
use crate::error::LossReason;
use crate::registry::Scheme;
use metrics::{Label, Unit};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Histogram: seconds from the start of an acquire to its answer (also for
/// `try_acquire`), labelled with the `outcome`.
pub const ACQUIRE_DURATION: &str = "dlock_acquire_duration_seconds";
/// Histogram: store attempts one acquire made (contention: 1 when the key was free).
/// Backends that wait in the store's own queue (file, ZooKeeper, etcd, the SQL session
/// modes) make one call however long they wait, and count 1.
pub const ACQUIRE_ATTEMPTS: &str = "dlock_acquire_attempts";
/// Histogram: seconds a lease was held, from its grant to its release or loss.
pub const HOLD_DURATION: &str = "dlock_hold_duration_seconds";
/// Gauge: leases this process holds now.
pub const HOLDERS: &str = "dlock_holders";
/// Gauge: acquires of this process that are waiting now (not those with `no_wait`).
pub const WAITERS: &str = "dlock_waiters";
/// Counter: successful renewals (automatic ones and `extend`).
pub const RENEWALS: &str = "dlock_renewals_total";
/// Counter: renewals that failed (`reason="error"`: the store did not answer or failed,
/// retried until the lease may have expired) or were refused (`reason="refused"`: the
/// store no longer knows the lease; it is lost).
pub const RENEWAL_FAILURES: &str = "dlock_renewal_failures_total";
/// Counter: leases lost, by `reason`.
pub const LOSSES: &str = "dlock_leases_lost_total";

static KEY_LABEL: AtomicBool = AtomicBool::new(false);

/// Adds the lock key as a `key` label to every metric of leases taken afterwards (off by
/// default). Only for programs with a small, fixed set of keys: every key makes series of
/// its own in the metrics store.
pub fn set_key_label(on: bool) {
    KEY_LABEL.store(on, Ordering::Relaxed);
}

/// Registers the description and unit of each metric with the installed recorder. Call
/// it once after installing the recorder; the metrics are recorded without it too.
pub fn describe() {
    metrics::describe_histogram!(
        ACQUIRE_DURATION,
        Unit::Seconds,
        "Time from the start of an acquire to its answer"
    );
    metrics::describe_histogram!(
        ACQUIRE_ATTEMPTS,
        Unit::Count,
        "Store attempts per acquire (contention)"
    );
    metrics::describe_histogram!(
        HOLD_DURATION,
        Unit::Seconds,
        "Time a lease was held, from grant to release or loss"
    );
    metrics::describe_gauge!(HOLDERS, Unit::Count, "Leases held by this process");
    metrics::describe_gauge!(
        WAITERS,
        Unit::Count,
        "Acquires of this process waiting for a lock"
    );
    metrics::describe_counter!(RENEWALS, Unit::Count, "Successful lease renewals");
    metrics::describe_counter!(
        RENEWAL_FAILURES,
        Unit::Count,
        "Lease renewals that failed or were refused"
    );
    metrics::describe_counter!(LOSSES, Unit::Count, "Leases lost, by reason");
}

/// The `backend` label: the scheme of a backend's (redacted) URL if the registry knows
/// it, in its first spelling (`rediss` is `redis`, `postgresql` is `postgres`), else
/// `other`. Never the URL itself.
pub(crate) fn backend_label(describe: &str) -> &'static str {
    let Some((scheme, _)) = describe.split_once("://") else {
        return "other";
    };
    Scheme::ALL
        .iter()
        .find(|s| {
            s.names()
                .iter()
                .any(|name| name.eq_ignore_ascii_case(scheme))
        })
        .and_then(|s| s.names().first().copied())
        .unwrap_or("other")
}

pub(crate) fn kind_label(kind: LockKind) -> &'static str {
    match kind {
        LockKind::Shared => "shared",
        LockKind::Semaphore { .. } => "semaphore",
        _ => "exclusive",
    }
}

pub(crate) fn loss_label(reason: &LossReason) -> &'static str {
    match reason {
        LossReason::RenewalRefused => "renewal_refused",
        LossReason::Expired => "expired",
        LossReason::RenewalFailed { .. } => "renewal_failed",
        LossReason::SessionEnded { .. } => "session_ended",
        LossReason::HoldLimit { .. } => "hold_limit",
    }
}

/// The labels every metric of one lease (or acquire) carries. Kept as static parts (and
/// the key only when [`set_key_label`] asked for it): a held lease carries these for its
/// whole life, so they cost no allocation until a metric is recorded.
#[derive(Clone, Debug)]
pub(crate) struct Labels {
    backend: &'static str,
    kind: &'static str,
    key: Option<Arc<str>>,
}

impl Labels {
    pub(crate) fn new(describe: &str, kind: LockKind, key: &str) -> Labels {
        Labels {
            backend: backend_label(describe),
            kind: kind_label(kind),
            key: KEY_LABEL.load(Ordering::Relaxed).then(|| Arc::from(key)),
        }
    }

    fn base(&self) -> Vec<Label> {
        let mut labels = Vec::with_capacity(4);
        labels.push(Label::from_static_parts("backend", self.backend));
        labels.push(Label::from_static_parts("kind", self.kind));
        if let Some(key) = &self.key {
            labels.push(Label::new("key", key.to_string()));
        }
        labels
    }

    fn with(&self, name: &'static str, value: &'static str) -> Vec<Label> {
        let mut labels = self.base();
        labels.push(Label::from_static_parts(name, value));
        labels
    }

    pub(crate) fn acquired(&self, outcome: &'static str, took: Duration, attempts: u32) {
        let labels = self.with("outcome", outcome);
        metrics::histogram!(ACQUIRE_DURATION, labels.clone()).record(took.as_secs_f64());
        metrics::histogram!(ACQUIRE_ATTEMPTS, labels).record(f64::from(attempts.max(1)));
    }

    pub(crate) fn renewed(&self) {
        metrics::counter!(RENEWALS, self.base()).increment(1);
    }

    pub(crate) fn renewal_failed(&self, refused: bool) {
        let reason = if refused { "refused" } else { "error" };
        metrics::counter!(RENEWAL_FAILURES, self.with("reason", reason)).increment(1);
    }

    pub(crate) fn lost(&self, reason: &LossReason) {
        metrics::counter!(LOSSES, self.with("reason", loss_label(reason))).increment(1);
    }

    /// Counts a holder until the returned guard is dropped, which records the hold time.
    pub(crate) fn holding(&self) -> Holding<'_> {
        metrics::gauge!(HOLDERS, self.base()).increment(1.0);
        Holding {
            labels: self,
            since: std::time::Instant::now(),
            end: "dropped",
        }
    }

    /// Counts a waiter until the returned guard is dropped.
    pub(crate) fn waiting(&self) -> Waiting {
        metrics::gauge!(WAITERS, self.base()).increment(1.0);
        Waiting {
            labels: self.clone(),
        }
    }
}

/// One held lease, for the holder gauge and the hold time. It borrows the lease's labels:
/// it lives in the lease's task for the lease's whole life.
pub(crate) struct Holding<'a> {
    labels: &'a Labels,
    since: std::time::Instant,
    end: &'static str,
}

impl Holding<'_> {
    /// How the hold ended: `released`, `dropped` (the default) or `lost`.
    pub(crate) fn ended(&mut self, end: &'static str) {
        self.end = end;
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        metrics::gauge!(HOLDERS, self.labels.base()).decrement(1.0);
        metrics::histogram!(HOLD_DURATION, self.labels.with("end", self.end))
            .record(self.since.elapsed().as_secs_f64());
    }
}

/// One waiting acquire, for the waiter gauge.
pub(crate) struct Waiting {
    labels: Labels,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::gauge!(WAITERS, self.labels.base()).decrement(1.0);
    }
}

/// Installs a Prometheus recorder as the global recorder and serves every metric in the
/// Prometheus text format over HTTP on `addr` (any path), from the current tokio runtime,
/// which may be a single-threaded one: the listener is bound before this returns, and is
/// served whenever the runtime is idle. Histograms get buckets suited to them (acquire
/// latency 1 ms to 5 min, hold time 0.1 s to a day, attempts 1 to 1000). This is what
/// `dlock run --metrics ADDR` does.
///
/// Needs the cargo feature `prometheus` (on by default); without it the error is of
/// kind [`std::io::ErrorKind::Unsupported`]. Must be called inside a tokio runtime.
/// Fails if the address cannot be bound or a global recorder is already installed.
pub fn serve_prometheus(addr: std::net::SocketAddr) -> std::io::Result<()> {
    #[cfg(feature = "prometheus")]
    {
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        const ACQUIRE: &[f64] = &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 300.0,
        ];
        const HOLD: &[f64] = &[
            0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
        ];
        const ATTEMPTS: &[f64] = &[1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0];
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(std::io::Error::other("not inside a tokio runtime"));
        }
        let bucket = |b: PrometheusBuilder, name: &str, buckets: &[f64]| {
            b.set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
        };
        let builder = bucket(
            PrometheusBuilder::new().with_http_listener(addr),
            ACQUIRE_DURATION,
            ACQUIRE,
        )
        .and_then(|b| bucket(b, HOLD_DURATION, HOLD))
        .and_then(|b| bucket(b, ACQUIRE_ATTEMPTS, ATTEMPTS))
        .map_err(std::io::Error::other)?;
        builder.install().map_err(std::io::Error::other)?;
        describe();
        Ok(())
    }
    #[cfg(not(feature = "prometheus"))]
    {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("cannot serve {addr}: built without the Prometheus exporter (cargo feature prometheus)"),
        ))
    }
}

tokio::task_local! {
    /// The attempts of the acquire running in this task (see [`count_attempts`]).
    static ATTEMPTS: Arc<AtomicU32>;
}

/// Runs `acquire`, counting the store attempts it makes through [`attempt_made`].
pub(crate) async fn count_attempts<T>(acquire: impl std::future::Future<Output = T>) -> (T, u32) {
    let counter = Arc::new(AtomicU32::new(0));
    let out = ATTEMPTS.scope(Arc::clone(&counter), acquire).await;
    (out, counter.load(Ordering::Relaxed))
}

/// Counts one store attempt for the acquire of this task, if one is counting.
pub(crate) fn attempt_made() {
    let _ = ATTEMPTS.try_with(|n| n.fetch_add(1, Ordering::Relaxed));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_label_is_the_scheme_never_the_url() {
        assert_eq!(backend_label("redis://:***@db.internal:6379/2"), "redis");
        assert_eq!(backend_label("file:///var/lock/dlock"), "file");
        assert_eq!(backend_label("redis+cluster://a:1,b:2"), "redis+cluster");
        assert_eq!(backend_label("postgresql://u@h/db?mode=lease"), "postgres");
        assert_eq!(backend_label("rediss://h:6380"), "redis");
        assert_eq!(backend_label("custom-store(secret)"), "other");
        assert_eq!(backend_label("anything://x"), "other");
    }
}
