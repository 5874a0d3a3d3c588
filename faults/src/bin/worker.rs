//! `dlock-fault-worker`: one client process of the fault-injection workload.

use clap::Parser;
use dlock_faults::worker::{run, WorkerConfig, Workload};
use std::time::Duration;

/// One client of the fault-injection workload (started by `dlock-faults`).
#[derive(Parser, Debug)]
struct Args {
    /// Backend URL.
    #[arg(long)]
    url: String,
    /// Lock key.
    #[arg(long)]
    key: String,
    /// Address of the fenced store.
    #[arg(long)]
    store: String,
    /// This worker's incarnation number.
    #[arg(long)]
    client: u32,
    /// Lease TTL.
    #[arg(long, value_parser = fencelock::parse_duration)]
    ttl: Duration,
    /// Time between read and write inside a critical section.
    #[arg(long, value_parser = fencelock::parse_duration)]
    work: Duration,
    /// How long to run.
    #[arg(long, value_parser = fencelock::parse_duration)]
    run_for: Duration,
    /// Which leases to take: mutex, rw or semaphore:N.
    #[arg(long, default_value = "mutex", value_parser = Workload::parse)]
    workload: Workload,
}

fn main() {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("worker {}: cannot start a runtime: {err}", args.client);
            std::process::exit(3);
        }
    };
    let code = runtime.block_on(async move {
        let connect = tokio::time::timeout(Duration::from_secs(10), fencelock::connect(&args.url));
        let locks = match connect.await {
            Ok(Ok(locks)) => locks,
            Err(_) => {
                eprintln!("worker {}: connect timed out", args.client);
                return 4;
            }
            Ok(Err(err)) => {
                eprintln!("worker {}: connect: {err}", args.client);
                // Servers may be down under a nemesis; the harness counts this.
                return 4;
            }
        };
        let config = WorkerConfig {
            client: args.client,
            key: args.key,
            ttl: args.ttl,
            work: args.work,
            store: args.store,
            run_for: args.run_for,
            workload: args.workload,
        };
        match run(locks, config).await {
            Ok(stats) => {
                for err in &stats.errors {
                    eprintln!("worker {}: dlock error: {err}", args.client);
                }
                println!(
                    "worker {} sections={} accepted={} stale={} lost={} released_lost={} errors={}",
                    args.client,
                    stats.sections,
                    stats.accepted,
                    stats.stale,
                    stats.lost,
                    stats.released_lost,
                    stats.errors.len()
                );
                0
            }
            Err(err) => {
                eprintln!("worker {}: store connection: {err}", args.client);
                2
            }
        }
    });
    // The work is done and every lease released or given up. Tearing the runtime down
    // would only cancel client libraries' background tasks mid-flight (the MongoDB
    // driver panics in its connection pool when its worker task goes first), which the
    // harness would count as a panic of this worker: exit with the runtime still up.
    std::mem::forget(runtime);
    std::process::exit(code);
}
