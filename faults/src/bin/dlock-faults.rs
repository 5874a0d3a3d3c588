//! `dlock-faults`: runs the fault-injection workload and writes the report.
//!
//! ```text
//! dlock-faults run --backend all --nemesis all --duration 10m --report docs/reliability.md
//! ```

use clap::{Parser, Subcommand};
use dlock_faults::cluster::Backend;
use dlock_faults::nemesis::{self, Nemesis};
use dlock_faults::report;
use dlock_faults::run::{self, RunConfig};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(about = "Fault-injection harness for dlock with a fenced history checker")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs every chosen nemesis against every chosen backend and prints (or writes) the report.
    Run {
        /// A backend name (file, memory, …), a URL, `all`, or a comma-separated list.
        #[arg(long, default_value = "all")]
        backend: String,
        /// A nemesis (none, kill-client, pause-client, kill-server, pause-server, clock, partition, slow, freeze, degrade, force-release, mixed), `all`, or a list.
        #[arg(long, default_value = "all")]
        nemesis: String,
        /// How long each backend runs in total, split evenly between its nemeses.
        #[arg(long, default_value = "60s", value_parser = fencelock::parse_duration)]
        duration: Duration,
        /// Concurrent client processes.
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// Lease TTL.
        #[arg(long, default_value = "600ms", value_parser = fencelock::parse_duration)]
        ttl: Duration,
        /// Time between read and write in a critical section.
        #[arg(long, default_value = "20ms", value_parser = fencelock::parse_duration)]
        work: Duration,
        /// Mean time between faults.
        #[arg(long, default_value = "1500ms", value_parser = fencelock::parse_duration)]
        fault_every: Duration,
        /// Which leases the workers take: mutex (exclusive leases, fenced
        /// read-modify-write), rw (readers under shared() and writers), semaphore:N.
        #[arg(long, default_value = "mutex", value_parser = dlock_faults::worker::Workload::parse)]
        workload: dlock_faults::worker::Workload,
        /// Write the Markdown report here (else print it).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Worker logs go here.
        #[arg(long)]
        log_dir: Option<PathBuf>,
        /// The `dlock-fault-worker` binary (default: next to this one).
        #[arg(long)]
        worker_bin: Option<PathBuf>,
        /// The `dlock` command for the process-tree nemesis (default: `dlock-faults-cli`
        /// next to this binary).
        #[arg(long)]
        dlock_bin: Option<PathBuf>,
    },
}

fn main() {
    let Cmd::Run {
        backend,
        nemesis: nemesis_arg,
        duration,
        workers,
        ttl,
        work,
        fault_every,
        workload,
        report: report_path,
        log_dir,
        worker_bin,
        dlock_bin,
    } = Cli::parse().command;
    let backends: Vec<String> = if backend == "all" {
        Backend::names().into_iter().map(str::to_owned).collect()
    } else {
        backend.split(',').map(str::to_owned).collect()
    };
    let nemeses: Vec<Nemesis> = if nemesis_arg == "all" {
        nemesis::ALL.to_vec()
    } else {
        let mut out = Vec::new();
        for name in nemesis_arg.split(',') {
            match Nemesis::parse(name) {
                Some(n) => out.push(n),
                None => {
                    eprintln!("dlock-faults: unknown nemesis {name:?}");
                    std::process::exit(64);
                }
            }
        }
        out
    };
    let Some(worker_bin) = run::find_worker_bin(worker_bin.as_deref()) else {
        eprintln!(
            "dlock-faults: cannot find dlock-fault-worker next to this binary; pass --worker-bin"
        );
        std::process::exit(64);
    };
    let dlock_bin = run::find_dlock_bin(dlock_bin.as_deref());
    let runtime = tokio::runtime::Runtime::new().expect("cannot start a tokio runtime");
    let mut results = Vec::new();
    let mut failed = false;
    for name in &backends {
        let backend = match Backend::start(name) {
            Ok(b) => b,
            Err(err) => {
                eprintln!("dlock-faults: {err}");
                std::process::exit(64);
            }
        };
        let applicable: Vec<Nemesis> = nemeses
            .iter()
            .copied()
            .filter(|n| match backend.applicable(*n) {
                Ok(()) => true,
                Err(why) => {
                    eprintln!(
                        "dlock-faults: {} / {}: skipped: {why}",
                        backend.name,
                        n.name()
                    );
                    false
                }
            })
            .collect();
        if applicable.is_empty() {
            continue;
        }
        let each = duration / applicable.len() as u32;
        for n in applicable {
            let config = RunConfig {
                workers,
                ttl,
                work,
                duration: each,
                fault_every,
                worker_bin: worker_bin.clone(),
                dlock_bin: dlock_bin.clone(),
                log_dir: log_dir.clone().unwrap_or_else(run::default_log_dir),
                workload,
            };
            eprintln!(
                "dlock-faults: {} / {} for {:?} …",
                backend.name,
                n.name(),
                each
            );
            let result = match runtime.block_on(run::run(&backend, n, &config)) {
                Ok(r) => r,
                Err(err) => {
                    eprintln!(
                        "dlock-faults: {} / {}: harness error: {err}",
                        backend.name,
                        n.name()
                    );
                    failed = true;
                    continue;
                }
            };
            for failure in result.failures() {
                eprintln!("dlock-faults: FAIL {failure}");
                failed = true;
            }
            eprint!(
                "{}",
                report::table(std::slice::from_ref(&result))
                    .lines()
                    .last()
                    .unwrap_or_default()
            );
            eprintln!();
            results.push(result);
        }
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = format!(
        "cargo run -p dlock-faults --bin dlock-faults -- {}",
        args.join(" ")
    );
    let settings = format!(
        "Settings: {workers} client processes per run, TTL {ttl:?}, {work:?} between read and write, a fault every {fault_every:?} on average (pauses and clock jumps last 3×TTL+200ms), {duration:?} per backend split evenly between its nemeses."
    );
    let text = report::markdown(&results, &command, &settings);
    match report_path {
        Some(path) => {
            if let Err(err) = std::fs::write(&path, text) {
                eprintln!("dlock-faults: cannot write {}: {err}", path.display());
                std::process::exit(1);
            }
        }
        None => print!("{text}"),
    }
    std::process::exit(i32::from(failed));
}
