//! The `dlock` command line (SPEC §4): a thin user of the library that maps its errors
//! to exit statuses.

mod child;
mod exit;
mod inspect;
mod metrics;
mod run;
mod schema;
mod tree;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

const EXIT_HELP: &str = "\
Exit statuses: COMMAND's own; 75 lock not acquired; 69 backend unavailable;
64 bad usage; 76 lease lost while COMMAND ran; 126/127 COMMAND not runnable/found.";

/// The backends of this build, from the registry, then the exit statuses.
fn after_help() -> String {
    let mut text = String::from("Backends (--backend or DLOCK_BACKEND; default: file:// in $DLOCK_DIR,\nelse $XDG_STATE_HOME/dlock, else ~/.local/state/dlock):\n");
    let mut missing = Vec::new();
    for scheme in fencelock::Scheme::ALL {
        if scheme.is_enabled() {
            let (url, what) = scheme.usage();
            text.push_str(&format!("  {url:<40} {what}\n"));
        } else {
            missing.push(format!("{scheme} (feature {})", scheme.feature()));
        }
    }
    if !missing.is_empty() {
        text.push_str(&format!("  not in this build: {}\n", missing.join(", ")));
    }
    text.push('\n');
    text.push_str(EXIT_HELP);
    text
}

/// Distributed locks with leases and fencing tokens: flock(1) for a fleet.
#[derive(Debug, Parser)]
#[command(name = "dlock", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct BackendArg {
    /// Backend URL [default: file backend in $DLOCK_DIR, $XDG_STATE_HOME/dlock or
    /// ~/.local/state/dlock]
    #[arg(
        long,
        short = 'b',
        env = "DLOCK_BACKEND",
        value_name = "URL",
        hide_env_values = true
    )]
    backend: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run COMMAND while holding the lock KEY
    #[command(after_help = "\
Examples:
  dlock run nightly-report -- ./report.sh            wait for the lock, then run
  dlock run deploy --no-wait -- ./deploy.sh          exit 75 at once if held elsewhere
  dlock run migrate --wait 30s --backend postgres://db/app -- ./migrate
  dlock run catalog --shared -- ./read-catalog.sh    readers share; a writer excludes all
  dlock run api-slots --permits 4 -- ./call-api.sh   one of 4 permits
  dlock run --all account-3,account-7 -- ./transfer  every key or none (\\, escapes a comma)

COMMAND sees DLOCK_KEY, DLOCK_FENCE (the fencing token) and DLOCK_OWNER (with --all:
DLOCK_KEYS and DLOCK_FENCES, comma-separated in sorted key order; with --permits:
DLOCK_PERMITS). It runs in
a process group of its own (in the terminal's foreground when dlock is); SIGINT,
SIGTERM and SIGHUP sent to dlock are passed to that group. If the lease is lost, the
whole tree gets SIGTERM, then SIGKILL after --kill-after, and dlock exits 76; what
COMMAND leaves running when it exits is stopped the same way. If dlock itself dies,
even by SIGKILL, a watchdog process SIGKILLs COMMAND's group.")]
    Run(run::RunArgs),
    /// Run COMMAND while this process leads the election NAME
    #[command(after_help = "\
Examples:
  dlock elect scheduler --value \"$(hostname):8080\" -- ./scheduler
  dlock leader scheduler --watch

The candidate waits (like run) until it leads, then runs COMMAND, which sees
DLOCK_TERM (the term: strictly greater than every earlier leader's), DLOCK_VALUE and
DLOCK_KEY. If leadership is lost, COMMAND's process group is stopped as in run and
dlock exits 76; when COMMAND exits, dlock resigns.")]
    Elect(run::ElectArgs),
    /// Show who leads the election NAME (exit 0 if somebody leads, 1 if nobody)
    #[command(after_help = "Example:\n  dlock leader scheduler --watch --json")]
    Leader {
        /// The election's name
        name: String,
        #[command(flatten)]
        backend: BackendArg,
        /// Print one JSON object instead of a line
        #[arg(long)]
        json: bool,
        /// Keep running, printing a line at each change of leader
        #[arg(long)]
        watch: bool,
    },
    /// Show who holds KEY (exit 0 if held, 1 if free)
    #[command(
        after_help = "Example:\n  dlock status nightly-report --json\n  dlock status nightly-report --watch"
    )]
    Status {
        /// The lock key
        key: String,
        #[command(flatten)]
        backend: BackendArg,
        /// Print one JSON object instead of a table
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        watch: inspect::WatchArgs,
    },
    /// List the locks currently held
    #[command(
        after_help = "Example:\n  dlock list --backend redis://127.0.0.1:6379 --json\n  dlock list --watch > locks.log"
    )]
    List {
        #[command(flatten)]
        backend: BackendArg,
        /// Print one JSON object per lock instead of a table
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        watch: inspect::WatchArgs,
    },
    /// Break the lock on KEY whoever holds it (exit 0 if it was held, 1 if not)
    #[command(after_help = "\
Example:
  dlock release nightly-report --force

The holder is told at its next renewal: its lease is reported lost (dlock run sends
its COMMAND SIGTERM and exits 76).")]
    Release {
        /// The lock key
        key: String,
        /// Required: confirms that the lock is to be broken
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        backend: BackendArg,
    },
    /// Print the SQL that creates the tables of a PostgreSQL or MySQL backend URL
    #[command(after_help = "\
Example:
  dlock schema --backend 'postgres://admin@db/app?mode=lease' | psql app

dlock creates its tables on first use when the database user may; where it may not,
an administrator runs this SQL once and grants SELECT, INSERT, UPDATE, DELETE (and
USAGE on the PostgreSQL sequence). Nothing is connected to.")]
    Schema {
        #[command(flatten)]
        backend: BackendArg,
    },
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    fencelock::parse_duration(text).map_err(|err| match err {
        fencelock::Error::BadDuration { reason, .. } => reason,
        other => other.to_string(),
    })
}

pub fn main() -> ExitCode {
    // Before clap: the watchdog is no user-facing subcommand.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == tree::WATCHDOG)
    {
        return tree::watchdog();
    }
    let parsed = Cli::command()
        .after_help(after_help())
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = err.print();
                return ExitCode::SUCCESS;
            }
            if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = err.print();
                return ExitCode::from(exit::USAGE);
            }
            // clap writes several lines; SPEC §4 wants one.
            let text = err.to_string();
            let what: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more"))
                .filter(|line| !line.is_empty())
                .collect();
            exit::report(format!(
                "{} (see dlock --help)",
                what.join(" ").trim_start_matches("error: ")
            ));
            return ExitCode::from(exit::USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    // One thread: COMMAND is spawned from the main thread, which its death signal is
    // tied to, and a lock command needs no parallelism.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            exit::report(format!("cannot start: {err}"));
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Elect(args) => run::elect(args).await,
            Command::Leader {
                name,
                backend,
                json,
                watch,
            } => inspect::leader(&name, backend.backend, json, watch).await,
            Command::Status {
                key,
                backend,
                watch,
                ..
            } if watch.watch => inspect::watch_status(&key, backend.backend, watch).await,
            Command::Status {
                key, backend, json, ..
            } => inspect::status(&key, backend.backend, json).await,
            Command::List { backend, watch, .. } if watch.watch => {
                inspect::watch_list(backend.backend, watch).await
            }
            Command::List { backend, json, .. } => inspect::list(backend.backend, json).await,
            Command::Release {
                key,
                force,
                backend,
            } => inspect::release(&key, force, backend.backend).await,
            Command::Schema { backend } => schema::print(backend.backend),
        }
    })
}

/// Connects to `--backend`, `$DLOCK_BACKEND` or the default file backend.
async fn connect(backend: Option<String>) -> Result<fencelock::Locks, fencelock::Error> {
    let url = match backend {
        Some(url) => url,
        None => fencelock::default_url()?,
    };
    fencelock::connect(&url).await
}
