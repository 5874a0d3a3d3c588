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
Diagnostics: -v/--verbose on run, hold and elect says on stderr what dlock waits for and
who holds it, and when it acquires and releases (on a terminal the waiting line appears
by itself after 1s); DLOCK_LOG=debug (a tracing filter, e.g. fencelock=debug) logs the
library's internals on stderr.

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

/// The backend of `dlock schema`: a SQL URL, no file default.
#[derive(Debug, Args)]
struct SqlBackendArg {
    /// PostgreSQL or MySQL backend URL (postgres://… or mysql://…, with its ?mode= and
    /// ?table= options)
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
    /// Run COMMAND while holding the lock KEY (without COMMAND: hold it until a signal)
    #[command(after_help = "\
Examples:
  dlock run nightly-report -- ./report.sh            wait for the lock, then run
  dlock run nightly-report ./report.sh --full        the same; --full is the script's
  dlock run deploy -n -- ./deploy.sh                 exit 75 at once if held elsewhere
  dlock run deploy -w 30 -E 0 ./deploy.sh            wait 30s; not acquired: exit 0
  dlock run backup -c 'pg_dump app > app.sql'        a shell command line (sh -c)
  dlock run maintenance                              hold until Ctrl-C/SIGTERM (as hold)
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
even by SIGKILL, a watchdog process SIGKILLs COMMAND's group.

Options come before COMMAND: everything from COMMAND on is COMMAND's (`--` before it is
allowed, and needed when COMMAND starts with `-`). Without COMMAND (and without -c),
dlock holds the lock as `dlock hold` does.")]
    Run(run::RunArgs),
    /// Hold the lock KEY until SIGINT or SIGTERM, printing its key and fence
    #[command(after_help = "\
Examples:
  dlock hold maintenance                  prints key=maintenance fence=N, holds until Ctrl-C
  dlock hold maintenance -n --ttl 1m      exit 75 at once if held elsewhere

Once the lock is taken, one line `key=KEY fence=FENCE owner=OWNER` is printed on stdout
(with --all: keys=… fences=…). On SIGINT, SIGTERM or SIGHUP dlock releases the lock and
exits 0; if the lease is lost it exits 76. This is etcdctl lock KEY without a command,
and `dlock run KEY` without COMMAND.")]
    Hold(run::RunArgs),
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
    /// Break the lock on KEY whoever holds it (--force required; exit 0 if it was held, 1 if not)
    #[command(
        override_usage = "dlock release --force [OPTIONS] <KEY>",
        after_help = "\
Example:
  dlock release nightly-report --force

The holder is told at its next renewal: its lease is reported lost (dlock run sends
its COMMAND SIGTERM and exits 76)."
    )]
    Release {
        /// The lock key
        key: String,
        /// Required: confirms that the lock is to be broken, whoever holds it
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
USAGE on the PostgreSQL sequence). Nothing is connected to. The file backend has no
schema: --backend (or DLOCK_BACKEND) must be a postgres:// or mysql:// URL.")]
    Schema {
        #[command(flatten)]
        backend: SqlBackendArg,
    },
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    fencelock::parse_duration(text).map_err(|err| match err {
        fencelock::Error::BadDuration { reason, .. } => reason,
        other => other.to_string(),
    })
}

pub fn main() -> ExitCode {
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
            exit::report(usage_error(&err));
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
            Command::Run(args) => run::run(args, false).await,
            Command::Hold(args) => run::run(args, true).await,
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

/// clap's usage error as one readable line (SPEC §4): the message, its tips in words
/// (`did you mean --no-wait?`), and the help of the subcommand it is about.
fn usage_error(err: &clap::Error) -> String {
    let command = Cli::command();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let subcommand = args.iter().find_map(|arg| {
        command
            .get_subcommands()
            .find(|sub| sub.get_name() == arg || sub.get_all_aliases().any(|a| a == arg))
            .map(|sub| sub.get_name().to_owned())
    });
    if subcommand.is_none() && args.first().is_some_and(|arg| arg == "bench") {
        return "dlock has no bench subcommand: the benchmarks are the separate program \
                dlock-bench (cargo run --release -p dlock-bench -- --help in the source tree), \
                which works in a temporary directory it removes, or in the key namespace \
                dlock-bench-<pid>- of --backend, and says where it writes"
            .to_owned();
    }
    let text = err.to_string();
    let mut message = Vec::new();
    let mut tips = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more"))
        .filter(|line| !line.is_empty())
    {
        match line.strip_prefix("tip: ") {
            Some(tip) => tips.push(tip_in_words(tip)),
            None => message.push(line.trim_start_matches("error: ")),
        }
    }
    // "did you mean --no-wait?" makes "to pass '--no-wiat' as a value, use …" noise.
    if tips.iter().any(|tip| tip.starts_with("did you mean")) {
        tips.retain(|tip| tip.starts_with("did you mean"));
    }
    let mut out = message.join(" ");
    for tip in tips {
        out.push_str("; ");
        out.push_str(&tip);
    }
    match subcommand {
        Some(name) => format!("{out} (see dlock {name} --help)"),
        None => format!("{out} (see dlock --help)"),
    }
}

/// `a similar argument exists: '--no-wait'` as `did you mean --no-wait?`.
fn tip_in_words(tip: &str) -> String {
    let unquote = |list: &str| list.replace('\'', "");
    for prefix in [
        "a similar argument exists: ",
        "a similar subcommand exists: ",
        "a similar value exists: ",
        "some similar arguments exist: ",
        "some similar subcommands exist: ",
        "some similar values exist: ",
    ] {
        if let Some(list) = tip.strip_prefix(prefix) {
            return format!("did you mean {}?", unquote(list).replace(", ", " or "));
        }
    }
    tip.to_owned()
}

/// Connects to `--backend`, `$DLOCK_BACKEND` or the default file backend.
async fn connect(backend: Option<String>) -> Result<fencelock::Locks, fencelock::Error> {
    let url = match backend {
        Some(url) => url,
        None => fencelock::default_url()?,
    };
    fencelock::connect(&url).await
}
