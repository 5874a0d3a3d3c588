//! The four measurements of `dlock-bench`.

use super::stats::{human_us, percentiles, Percentiles};
use super::{Exclusion, Report, Run};
use fencelock::backends::counting::CallCounts;
use fencelock::Error;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Mode-specific results.
#[derive(Debug, Default, Serialize)]
pub struct Details {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acquire: Option<Percentiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff: Option<Percentiles>,
    /// Contended: the share of consecutive acquisitions that went to a different task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switch_share: Option<f64>,
    /// Contended and handoff: how many tasks acquired at least once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks_served: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leases_held: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leases_lost: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_mib: Option<f64>,
    /// The RSS before the first lease was taken (runtime and connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_before_mib: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_share_of_one_core: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renewals_per_second: Option<f64>,
}

fn fresh_key(prefix: &str) -> String {
    format!(
        "{}{prefix}-{:016x}",
        super::key_prefix(),
        rand::random::<u64>()
    )
}

fn remaining(run: &Run) -> Duration {
    run.until.saturating_duration_since(Instant::now())
}

async fn join_samples(tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>) -> Vec<Duration> {
    let mut all = Vec::new();
    for task in tasks {
        if let Ok(samples) = task.await {
            all.extend(samples);
        }
    }
    all
}

pub async fn uncontended(run: &Arc<Run>) -> Details {
    let tasks = (0..run.concurrency)
        .map(|_| {
            let run = Arc::clone(run);
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while run.running() {
                    let key = fresh_key("u");
                    let started = Instant::now();
                    match run.lock(&key).no_wait().acquire().await {
                        Ok(lease) => {
                            samples.push(started.elapsed());
                            match lease.release().await {
                                Ok(true) => {
                                    run.operations.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(false) => run.lost(&key),
                                Err(err) => run.error(&err),
                            }
                        }
                        Err(err) => {
                            run.error(&err);
                            // Retrying cannot make a backend support the kind.
                            if run.unsupported(&err) {
                                break;
                            }
                        }
                    }
                }
                samples
            })
        })
        .collect();
    Details {
        acquire: Some(percentiles(join_samples(tasks).await)),
        ..Details::default()
    }
}

pub async fn contended(run: &Arc<Run>) -> Details {
    const NOBODY: usize = usize::MAX;
    let key = fresh_key("c");
    let exclusion = Arc::new(Exclusion::admitting(run.admits()));
    let last_holder = Arc::new(AtomicUsize::new(NOBODY));
    let switches = Arc::new(AtomicU64::new(0));
    let served = Arc::new(
        (0..run.concurrency)
            .map(|_| AtomicU64::new(0))
            .collect::<Vec<_>>(),
    );
    let tasks = (0..run.concurrency)
        .map(|task| {
            let (run, key, exclusion) = (Arc::clone(run), key.clone(), Arc::clone(&exclusion));
            let (last_holder, switches, served) = (
                Arc::clone(&last_holder),
                Arc::clone(&switches),
                Arc::clone(&served),
            );
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while run.running() {
                    let started = Instant::now();
                    let lease = match run.lock(&key).wait_for(remaining(&run)).acquire().await {
                        Ok(lease) => lease,
                        Err(Error::NotAcquired { .. }) => break,
                        Err(err) => {
                            run.error(&err);
                            if run.unsupported(&err) {
                                break;
                            }
                            continue;
                        }
                    };
                    samples.push(started.elapsed());
                    exclusion.enter(&run);
                    let previous = last_holder.swap(task, Ordering::SeqCst);
                    if previous != task && previous != NOBODY {
                        switches.fetch_add(1, Ordering::Relaxed);
                    }
                    served[task].fetch_add(1, Ordering::Relaxed);
                    exclusion.leave();
                    match lease.release().await {
                        Ok(_) => {
                            run.operations.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => run.error(&err),
                    }
                }
                samples
            })
        })
        .collect();
    let samples = join_samples(tasks).await;
    let total = run.operations.load(Ordering::Relaxed);
    Details {
        acquire: Some(percentiles(samples)),
        switch_share: Some(
            switches.load(Ordering::Relaxed) as f64 / total.saturating_sub(1).max(1) as f64,
        ),
        tasks_served: Some(
            served
                .iter()
                .filter(|n| n.load(Ordering::Relaxed) > 0)
                .count(),
        ),
        ..Details::default()
    }
}

pub async fn handoff(run: &Arc<Run>) -> Details {
    let key = fresh_key("h");
    let exclusion = Arc::new(Exclusion::new());
    let released_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let (generation, _) = watch::channel(0u64);
    let generation = Arc::new(generation);
    let served = Arc::new(AtomicUsize::new(0));
    let tasks = (0..run.concurrency)
        .map(|_| {
            let (run, key, exclusion) = (Arc::clone(run), key.clone(), Arc::clone(&exclusion));
            let (released_at, generation, served) = (
                Arc::clone(&released_at),
                Arc::clone(&generation),
                Arc::clone(&served),
            );
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut counted = false;
                while run.running() {
                    let lease = match run
                        .locks
                        .lock(&key)
                        .ttl(run.ttl)
                        .wait_for(remaining(&run))
                        .acquire()
                        .await
                    {
                        Ok(lease) => lease,
                        Err(Error::NotAcquired { .. }) => break,
                        Err(err) => {
                            run.error(&err);
                            continue;
                        }
                    };
                    let acquired = Instant::now();
                    if let Some(released) = released_at.lock().ok().and_then(|mut r| r.take()) {
                        samples.push(acquired - released);
                    }
                    if !counted {
                        counted = true;
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    exclusion.enter(&run);
                    let mine = generation.send_modify_return(|g| {
                        *g += 1;
                        *g
                    });
                    tokio::time::sleep(run.hold).await;
                    exclusion.leave();
                    if let Ok(mut r) = released_at.lock() {
                        *r = Some(Instant::now());
                    }
                    match lease.release().await {
                        Ok(_) => {
                            run.operations.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => run.error(&err),
                    }
                    // Step aside until somebody else has acquired.
                    let mut rx = generation.subscribe();
                    let _ = tokio::time::timeout(remaining(&run), rx.wait_for(|g| *g > mine)).await;
                }
                samples
            })
        })
        .collect();
    let samples = join_samples(tasks).await;
    Details {
        handoff: Some(percentiles(samples)),
        tasks_served: Some(served.load(Ordering::Relaxed)),
        ..Details::default()
    }
}

trait SendModifyReturn {
    fn send_modify_return(&self, f: impl FnOnce(&mut u64) -> u64) -> u64;
}

impl SendModifyReturn for watch::Sender<u64> {
    fn send_modify_return(&self, f: impl FnOnce(&mut u64) -> u64) -> u64 {
        let mut out = 0;
        self.send_modify(|g| out = f(g));
        out
    }
}

fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

pub async fn held(run: &Arc<Run>, counts: &CallCounts) -> Details {
    let window = run.until.saturating_duration_since(run.started);
    // What the process holds before any lease: the runtime, the backend's connections.
    let rss_before = rss_mib();
    // 64 takers acquire one lease after another, so that no more than 64 acquires are in
    // flight: the RSS then shows what held leases cost, not 10,000 acquires at once.
    let next = Arc::new(AtomicUsize::new(0));
    let takers: Vec<_> = (0..run.concurrency.min(64))
        .map(|_| {
            let (run, next) = (Arc::clone(run), Arc::clone(&next));
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < run.concurrency {
                    let taken = run
                        .locks
                        .lock(fresh_key("held"))
                        .ttl(run.ttl)
                        .no_wait()
                        .acquire()
                        .await;
                    match taken {
                        Ok(lease) => mine.push(lease),
                        Err(err) => run.error(&err),
                    }
                }
                mine
            })
        })
        .collect();
    let mut leases = Vec::with_capacity(run.concurrency);
    for taker in takers {
        if let Ok(mine) = taker.await {
            leases.extend(mine);
        }
    }
    let (cpu_before, renewals_before, measured_from) =
        (cpu_seconds(), counts.renewals(), Instant::now());
    tokio::time::sleep(window).await;
    let measured = measured_from.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let renewals = counts.renewals() - renewals_before;
    let rss = rss_mib();
    let lost = leases.iter().filter(|l| l.is_lost()).count() as u64;
    run.operations.store(leases.len() as u64, Ordering::Relaxed);
    let held = leases.len();
    for lease in leases {
        if let Err(err) = lease.release().await {
            run.error(&err);
        }
    }
    Details {
        leases_held: Some(held),
        leases_lost: Some(lost),
        rss_mib: rss,
        rss_before_mib: rss_before,
        cpu_seconds: Some(cpu),
        cpu_share_of_one_core: Some(cpu / measured),
        renewals_per_second: Some(renewals as f64 / measured),
        ..Details::default()
    }
}

pub fn print_table(report: &Report) {
    let mut rows: Vec<(&str, String)> = vec![
        ("backend", report.backend.clone()),
        ("mode", format!("{:?}", report.mode).to_lowercase()),
        ("kind", report.kind.clone()),
        ("concurrency", report.concurrency.to_string()),
        ("seconds", format!("{:.1}", report.seconds)),
    ];
    let d = &report.details;
    let latency = |p: &Percentiles| {
        format!(
            "p50 {}  p99 {}  max {}  (n={})",
            human_us(p.p50_us),
            human_us(p.p99_us),
            human_us(p.max_us),
            p.count
        )
    };
    match report.mode {
        super::Mode::Uncontended | super::Mode::Contended => {
            rows.push(("pairs/s", format!("{:.0}", report.per_second)));
        }
        super::Mode::Handoff => rows.push(("hand-offs/s", format!("{:.0}", report.per_second))),
        super::Mode::Held => {}
    }
    if let Some(p) = &d.acquire {
        rows.push(("acquire latency", latency(p)));
    }
    if let Some(p) = &d.handoff {
        rows.push(("hand-off latency", latency(p)));
    }
    if let Some(share) = d.switch_share {
        rows.push(("switch share", format!("{:.1}%", share * 100.0)));
    }
    if let Some(served) = d.tasks_served {
        rows.push((
            "tasks served",
            format!("{served} of {}", report.concurrency),
        ));
    }
    if let Some(held) = d.leases_held {
        rows.push(("leases held", held.to_string()));
        rows.push(("leases lost", d.leases_lost.unwrap_or(0).to_string()));
        rows.push((
            "RSS",
            d.rss_mib.map_or("?".into(), |m| format!("{m:.1} MiB")),
        ));
        rows.push((
            "RSS before the first lease",
            d.rss_before_mib
                .map_or("?".into(), |m| format!("{m:.1} MiB")),
        ));
        rows.push((
            "CPU",
            format!(
                "{:.2}s ({:.2}% of one core)",
                d.cpu_seconds.unwrap_or(0.0),
                d.cpu_share_of_one_core.unwrap_or(0.0) * 100.0
            ),
        ));
        rows.push((
            "renewals/s",
            format!("{:.0}", d.renewals_per_second.unwrap_or(0.0)),
        ));
    }
    rows.push(("violations", report.violations.to_string()));
    rows.push(("errors", report.errors.to_string()));
    for (name, value) in rows {
        println!("{name:<17} {value}");
    }
}
