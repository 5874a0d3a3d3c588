//! `dlock-bench`: what a lock costs when nobody else wants it, and how fast the next
//! waiter gets it when somebody does, on any backend.
//!
//! Every key it takes starts with `dlock-bench-<pid>-`, so a run never touches another
//! program's locks; without `--backend` it runs on the file backend in a temporary
//! directory that it removes afterwards. It says where it writes before it starts.
//! Every lease it takes is released before it exits; what stays behind in a store is
//! only what the backend keeps by design after a release: on the Redis backends the fence
//! counter of each key (`{dlock:dlock-bench-<pid>-…}:fence`), which expires by itself
//! once the server clock has passed the fence by the TTL plus a minute (it must outlive
//! the leases it fenced), and the per-key fence files of the file backend, whose
//! directory is removed.

mod modes;
#[cfg(any(
    feature = "redis",
    feature = "mysql",
    feature = "etcd",
    feature = "mongodb",
    feature = "dynamodb"
))]
mod raw;
mod stats;

use clap::{Parser, ValueEnum};
use fencelock::backends::counting::Counting;
use fencelock::{LockKind, Locks};
use serde::Serialize;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exit status when a run saw two holders at once.
const VIOLATION: u8 = 70; // EX_SOFTWARE

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// N tasks, each acquiring and releasing fresh random keys
    Uncontended,
    /// N tasks looping on one key
    Contended,
    /// One key, N waiters; the holder holds for --hold, releases and steps aside
    Handoff,
    /// Hold N leases at once (default 10000) with automatic renewal
    Held,
}

/// Measures dlock on one backend: pairs/s, acquire latency, hand-off latency, the cost
/// of held leases. Exits 70 if two holders were ever seen at once.
#[derive(Debug, Parser)]
#[command(
    name = "dlock-bench",
    after_help = "Examples:
  dlock-bench --backend redis://127.0.0.1:6379 --concurrency 64
  dlock-bench --mode handoff --concurrency 16 --hold 5ms
  dlock-bench --mode held --concurrency 10000 --duration 60s --json
  dlock-bench --backend etcd://127.0.0.1:2379 --raw --concurrency 16

Modes: uncontended (fresh random keys: pairs/s, acquire latency), contended (one
key: pairs/s, latency, switch share, tasks served), handoff (release -> next
holder latency), held (memory, CPU and renewal traffic of many held leases).
Every mode checks mutual exclusion and exits 70 if it was violated; a backend
that does not offer --kind ends the run at once with exit status 78.
With --raw, the store's own client runs what a dlock lease costs on it, for
comparison (etcd://, redis://, redis+cluster://, mongodb://, dynamodb://)."
)]
pub struct BenchArgs {
    /// Backend URL [default: the file backend in a temporary directory, removed afterwards]
    #[arg(long, short = 'b', value_name = "URL")]
    backend: Option<String>,
    /// What to measure
    #[arg(long, value_enum, default_value = "uncontended")]
    mode: Mode,
    /// Concurrent tasks (held: leases) [default: 1; handoff: 16; held: 10000]
    #[arg(long, short = 'c')]
    concurrency: Option<usize>,
    /// How long to measure [default: 10s; held: 60s]
    #[arg(long, short = 'd', value_name = "DUR", value_parser = duration_arg)]
    duration: Option<Duration>,
    /// Handoff: how long each holder holds the lock
    #[arg(long, value_name = "DUR", default_value = "5ms", value_parser = duration_arg)]
    hold: Duration,
    /// Lease TTL
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = duration_arg)]
    ttl: Duration,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
    /// Uncontended and contended: the lease kind, `exclusive`, `shared` or
    /// `semaphore:N` (N permits)
    #[arg(long, value_name = "KIND", default_value = "exclusive", value_parser = kind_arg)]
    kind: LockKind,
    /// Measure the store's own client instead of dlock, running the operations a dlock
    /// lease costs on it (uncontended; handoff on etcd's Lock RPC and on memory://, a
    /// tokio Mutex per key): etcd://, redis://, redis+cluster://, redlock://, mysql://,
    /// mongodb://, dynamodb:// and memory:// URLs
    #[arg(long)]
    raw: bool,
}

fn kind_arg(text: &str) -> Result<LockKind, String> {
    match text {
        "exclusive" => Ok(LockKind::Exclusive),
        "shared" => Ok(LockKind::Shared),
        other => match other.strip_prefix("semaphore:").map(str::parse::<u32>) {
            Some(Ok(permits)) if permits > 0 => Ok(LockKind::Semaphore { permits }),
            _ => Err("expected exclusive, shared or semaphore:N with N at least 1".to_owned()),
        },
    }
}

/// How a kind is printed in the report.
pub fn kind_name(kind: LockKind) -> String {
    match kind {
        LockKind::Shared => "shared".to_owned(),
        LockKind::Semaphore { permits } => format!("semaphore:{permits}"),
        _ => "exclusive".to_owned(),
    }
}

/// What every mode shares while it runs: the lock handle, the clock, the counters.
pub struct Run {
    pub locks: Locks,
    pub kind: LockKind,
    pub ttl: Duration,
    pub hold: Duration,
    pub concurrency: usize,
    pub until: Instant,
    pub started: Instant,
    pub operations: AtomicU64,
    pub violations: AtomicU64,
    pub errors: AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
    /// Set once the backend answered that it cannot do what the run asks.
    pub unsupported: std::sync::atomic::AtomicBool,
}

impl Run {
    /// A lock on `key` of the run's kind and TTL.
    pub fn lock(&self, key: &str) -> fencelock::LockBuilder {
        let builder = match self.kind {
            LockKind::Shared => self.locks.lock(key).shared(),
            LockKind::Semaphore { permits } => self.locks.semaphore(key, permits),
            _ => self.locks.lock(key),
        };
        builder.ttl(self.ttl)
    }

    /// How many holders the run's kind admits at once.
    pub fn admits(&self) -> u64 {
        match self.kind {
            LockKind::Shared => u64::MAX,
            LockKind::Semaphore { permits } => u64::from(permits),
            _ => 1,
        }
    }

    pub fn running(&self) -> bool {
        Instant::now() < self.until
    }

    pub fn error(&self, err: &fencelock::Error) {
        self.note_error(err.to_string());
    }

    /// Notes and tells whether `err` says the backend cannot do what the run asks (a
    /// lock kind it does not offer), which no retry changes.
    pub fn unsupported(&self, err: &fencelock::Error) -> bool {
        let unsupported = matches!(err, fencelock::Error::Unsupported { .. });
        if unsupported {
            self.unsupported.store(true, Ordering::Relaxed);
        }
        unsupported
    }

    /// A lease found no longer held at its release.
    pub fn lost(&self, key: &str) {
        self.note_error(format!("the lease on {key:?} was lost before its release"));
    }

    fn note_error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(message);
        }
    }
}

/// Marks a critical section; more tasks inside at once than the kind admits (two, for
/// an exclusive lock) is a violation.
pub struct Exclusion {
    inside: AtomicU64,
    limit: u64,
}

impl Default for Exclusion {
    fn default() -> Self {
        Exclusion::new()
    }
}

impl Exclusion {
    pub fn new() -> Self {
        Exclusion::admitting(1)
    }

    pub fn admitting(limit: u64) -> Self {
        Exclusion {
            inside: AtomicU64::new(0),
            limit,
        }
    }

    pub fn enter(&self, run: &Run) {
        if self.inside.fetch_add(1, Ordering::SeqCst) >= self.limit {
            run.violations.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn leave(&self) {
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The result of one run, as printed.
#[derive(Debug, Serialize)]
pub struct Report {
    pub backend: String,
    pub mode: Mode,
    pub kind: String,
    pub concurrency: usize,
    pub seconds: f64,
    pub operations: u64,
    pub per_second: f64,
    pub violations: u64,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The backend answered that it cannot do what was asked (`last_error` says what);
    /// the run stopped there.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unsupported: bool,
    #[serde(flatten)]
    pub details: modes::Details,
}

/// Raises the soft limit of open files to the hard limit: the file backend holds one
/// descriptor per lease, and `--mode held` holds 10,000.
fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit with a struct we own.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Exit status for a backend that could not be reached or failed (as the CLI's).
const UNAVAILABLE: u8 = 69;
/// Exit status for bad arguments (as the CLI's).
const USAGE: u8 = 64;
/// Exit status when the backend cannot do what the run asks (a lock kind it does not
/// offer): EX_CONFIG, the setup's limit rather than a failure of the store.
const UNSUPPORTED: u8 = 78;

fn report(message: impl std::fmt::Display) {
    eprintln!("dlock-bench: {message}");
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    fencelock::parse_duration(text).map_err(|err| match err {
        fencelock::Error::BadDuration { reason, .. } => reason,
        other => other.to_string(),
    })
}

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            report(format!("cannot start the runtime: {err}"));
            return ExitCode::from(UNAVAILABLE);
        }
    };
    runtime.block_on(bench(args))
}

/// The key namespace of this run.
pub fn key_prefix() -> String {
    format!("dlock-bench-{}-", std::process::id())
}

/// The run's concurrency and duration, with the mode's defaults; `None` (after saying
/// why) if the concurrency does not fit the mode.
fn sizes(args: &BenchArgs) -> Option<(usize, Duration)> {
    let concurrency = args.concurrency.unwrap_or(match args.mode {
        Mode::Handoff => 16,
        Mode::Held => 10_000,
        _ => 1,
    });
    if concurrency == 0 || (args.mode == Mode::Handoff && concurrency < 2) {
        report("--concurrency must be at least 1 (handoff: at least 2)");
        return None;
    }
    let duration = args.duration.unwrap_or(match args.mode {
        Mode::Held => Duration::from_secs(60),
        _ => Duration::from_secs(10),
    });
    Some((concurrency, duration))
}

/// Prints a report as `--json` or `--table` asks, and maps its outcome to the exit
/// status: 70 for a violation, 69 for errors.
fn finish(args: &BenchArgs, report: &Report) -> ExitCode {
    if args.json {
        println!("{}", serde_json::to_string(report).unwrap_or_default());
    } else {
        modes::print_table(report);
    }
    if report.unsupported {
        self::report(format!(
            "unsupported: {}",
            report.last_error.as_deref().unwrap_or("?")
        ));
        ExitCode::from(UNSUPPORTED)
    } else if report.violations > 0 {
        self::report(format!(
            "MUTUAL EXCLUSION VIOLATED {} times on {}",
            report.violations, report.backend
        ));
        ExitCode::from(VIOLATION)
    } else if report.errors > 0 {
        self::report(format!(
            "{} errors during the run; last: {}",
            report.errors,
            report.last_error.as_deref().unwrap_or("?")
        ));
        ExitCode::from(UNAVAILABLE)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(any(
    feature = "redis",
    feature = "mysql",
    feature = "etcd",
    feature = "mongodb",
    feature = "dynamodb"
))]
async fn raw_bench(args: &BenchArgs, url: &str) -> ExitCode {
    let Some((concurrency, duration)) = sizes(args) else {
        return ExitCode::from(USAGE);
    };
    if args.kind != LockKind::Exclusive {
        report("--raw measures exclusive locks only");
        return ExitCode::from(USAGE);
    }
    let store = match raw::Store::connect(url).await {
        Ok(store) => store,
        Err(err) => {
            report(err);
            return ExitCode::from(UNAVAILABLE);
        }
    };
    let run = raw::RawArgs {
        mode: args.mode,
        concurrency,
        duration,
        ttl: args.ttl,
        hold: args.hold,
    };
    match raw::bench(store, run).await {
        Ok(report) => finish(args, &report),
        Err(err) => {
            report(err);
            ExitCode::from(USAGE)
        }
    }
}

#[cfg(not(any(
    feature = "redis",
    feature = "mysql",
    feature = "etcd",
    feature = "mongodb",
    feature = "dynamodb"
)))]
async fn raw_bench(_: &BenchArgs, _: &str) -> ExitCode {
    report("--raw needs a build with a store's feature (redis, mysql, etcd, mongodb or dynamodb)");
    ExitCode::from(USAGE)
}

async fn bench(args: BenchArgs) -> ExitCode {
    raise_open_file_limit();
    // Lock files are never deleted by the file backend (deleting a flock file is unsafe
    // while others may open it), so the default run gets a directory of its own.
    let (url, scratch) = match args.backend.clone() {
        Some(url) => (url, None),
        None => match tempfile::Builder::new().prefix("dlock-bench-").tempdir() {
            Ok(dir) => (format!("file://{}", dir.path().display()), Some(dir)),
            Err(err) => {
                report(format!("cannot create a temporary lock directory: {err}"));
                return ExitCode::from(UNAVAILABLE);
            }
        },
    };
    let redis_family = ["redis:", "rediss:", "redlock:", "redis+cluster:"]
        .iter()
        .any(|scheme| url.starts_with(scheme));
    eprintln!(
        "dlock-bench: writing keys {}* on {}{}",
        key_prefix(),
        fencelock::redact(&url),
        if scratch.is_some() {
            " (removed afterwards)"
        } else if redis_family {
            " (every lease is released; their fence counters expire by themselves a minute after the TTL)"
        } else {
            " (every lease is released)"
        }
    );
    if args.raw {
        return raw_bench(&args, &url).await;
    }
    let locks = match fencelock::connect(&url).await {
        Ok(locks) => locks,
        Err(err) => {
            report(err);
            return ExitCode::from(UNAVAILABLE);
        }
    };
    let counting = Counting::new(locks.backend().clone());
    let counts = counting.counts();
    let locks = Locks::from_backend(counting);
    let Some((concurrency, duration)) = sizes(&args) else {
        return ExitCode::from(USAGE);
    };
    let started = Instant::now();
    let run = Arc::new(Run {
        locks,
        kind: args.kind,
        ttl: args.ttl,
        hold: args.hold,
        concurrency,
        until: started + duration,
        started,
        operations: AtomicU64::new(0),
        violations: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        last_error: std::sync::Mutex::new(None),
        unsupported: std::sync::atomic::AtomicBool::new(false),
    });
    let progress = std::io::stderr().is_terminal().then(|| {
        let run = Arc::clone(&run);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let elapsed = run.started.elapsed().as_secs_f64();
                let ops = run.operations.load(Ordering::Relaxed);
                eprint!(
                    "\r{:>5.1}s / {:.0}s  {ops} operations  {:.0}/s  violations {}   ",
                    elapsed,
                    duration.as_secs_f64(),
                    ops as f64 / elapsed,
                    run.violations.load(Ordering::Relaxed)
                );
            }
        })
    });
    let details = match args.mode {
        Mode::Uncontended => modes::uncontended(&run).await,
        Mode::Contended => modes::contended(&run).await,
        Mode::Handoff => modes::handoff(&run).await,
        Mode::Held => modes::held(&run, &counts).await,
    };
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    let seconds = run.started.elapsed().as_secs_f64();
    let operations = run.operations.load(Ordering::Relaxed);
    let report = Report {
        backend: run.locks.describe().to_owned(),
        mode: args.mode,
        kind: kind_name(args.kind),
        concurrency,
        seconds,
        operations,
        per_second: operations as f64 / seconds,
        violations: run.violations.load(Ordering::Relaxed),
        errors: run.errors.load(Ordering::Relaxed),
        last_error: run.last_error.lock().ok().and_then(|e| e.clone()),
        unsupported: run.unsupported.load(Ordering::Relaxed),
        details,
    };
    let outcome = finish(&args, &report);
    drop(run);
    drop(scratch);
    outcome
}
