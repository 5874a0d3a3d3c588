//! `dlock run KEY -- COMMAND`: flock(1) with leases.

use super::{child, connect, duration_arg, exit, tree, BackendArg};
use clap::Args;
use dlock::{Key, Wait};
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The lock key (1 to 1024 bytes of UTF-8)
    key: String,
    #[command(flatten)]
    backend: BackendArg,
    /// Lease TTL: a crashed holder's lock ends after this long (renewed every TTL/3)
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = duration_arg)]
    ttl: Duration,
    /// Wait at most this long for the lock (default: without limit, like flock(1))
    #[arg(long, short = 'w', value_name = "DUR", value_parser = duration_arg, conflicts_with = "no_wait")]
    wait: Option<Duration>,
    /// Fail at once (exit 75) if the lock is held elsewhere
    #[arg(long, short = 'n')]
    no_wait: bool,
    /// After a lost lease, how long COMMAND has between SIGTERM and SIGKILL
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = duration_arg)]
    kill_after: Duration,
    /// The command to run under the lock, after `--`
    #[arg(required = true, last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// How long connecting may take past a limited wait: `--no-wait` against a store that
/// does not answer must fail about as fast as against one that says "held".
const CONNECT_GRACE: Duration = Duration::from_secs(1);

/// Connects, within the wait's limit plus a grace when the wait is limited.
async fn connect_within(backend: Option<String>, wait: Wait) -> Result<dlock::Locks, dlock::Error> {
    let limit = match wait {
        Wait::No => Duration::ZERO,
        Wait::For(limit) => limit,
        Wait::Forever => return connect(backend).await,
    };
    let url = match backend {
        Some(url) => url,
        None => dlock::default_url()?,
    };
    let describe = dlock::redact(&url);
    match tokio::time::timeout(limit.saturating_add(CONNECT_GRACE), connect(Some(url))).await {
        Ok(connected) => connected,
        Err(_) => Err(dlock::Error::unavailable(
            &describe,
            "no answer while connecting, within the wait's limit",
        )),
    }
}

/// Signals dlock listens to, while waiting and while COMMAND runs.
struct Signals(Vec<(libc::c_int, Signal)>);

impl Signals {
    fn install() -> std::io::Result<Self> {
        let mut all = Vec::new();
        for number in child::FORWARDED {
            all.push((number, signal(SignalKind::from_raw(number))?));
        }
        Ok(Signals(all))
    }

    /// The next signal received.
    async fn recv(&mut self) -> libc::c_int {
        let waits = self.0.iter_mut().map(|(number, stream)| {
            let number = *number;
            Box::pin(async move {
                stream.recv().await;
                number
            })
        });
        futures_select_all(waits).await
    }
}

async fn futures_select_all<F: std::future::Future<Output = libc::c_int> + Unpin>(
    futures: impl Iterator<Item = F>,
) -> libc::c_int {
    let mut futures: Vec<F> = futures.collect();
    std::future::poll_fn(move |cx| {
        for future in futures.iter_mut() {
            if let std::task::Poll::Ready(number) = std::pin::Pin::new(future).poll(cx) {
                return std::task::Poll::Ready(number);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

pub async fn run(args: RunArgs) -> ExitCode {
    if let Err(err) = Key::new(args.key.as_str()) {
        return exit::fail(&err);
    }
    let Some(program) = args.command.first().cloned() else {
        exit::report("no COMMAND given after --");
        return ExitCode::from(exit::USAGE);
    };
    let mut signals = match Signals::install() {
        Ok(signals) => signals,
        Err(err) => {
            exit::report(format!("cannot handle signals: {err}"));
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let wait = match (args.no_wait, args.wait) {
        (true, _) => Wait::No,
        (false, Some(limit)) => Wait::For(limit),
        (false, None) => Wait::Forever,
    };
    let locks = match connect_within(args.backend.backend, wait).await {
        Ok(locks) => locks,
        Err(err) => return exit::fail(&err),
    };
    let acquire = locks.lock(&args.key).ttl(args.ttl).wait(wait).acquire();
    let lease = tokio::select! {
        lease = acquire => match lease {
            Ok(lease) => lease,
            Err(err) => return exit::fail(&err),
        },
        number = signals.recv() => {
            // Interrupted while waiting: nothing is held (the acquire was dropped).
            return ExitCode::from(u8::try_from(128 + number).unwrap_or(255));
        }
    };

    // Registered before COMMAND starts, so that its end is never missed.
    let mut children = match signal(SignalKind::child()) {
        Ok(children) => children,
        Err(err) => {
            exit::report(format!("cannot handle signals: {err}"));
            let _ = lease.release().await;
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    if let Err(err) = tree::become_subreaper() {
        tracing::debug!("not a child subreaper: {err}");
    }
    let mut group = match tree::Group::new(tree::foreground_terminal()) {
        Ok(group) => group,
        Err(err) => {
            exit::report(format!(
                "cannot start the watchdog that stops {program:?} if dlock dies: {err}"
            ));
            let _ = lease.release().await;
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let mut command = child::command(&program, &args.command[1..]);
    command
        .env("DLOCK_KEY", lease.key())
        .env("DLOCK_FENCE", lease.fence().to_string())
        .env("DLOCK_OWNER", lease.owner());
    if let Err(err) = group.spawn(command) {
        let (status, message) = child::spawn_failure(&program, &err);
        exit::report(message);
        group.close();
        let _ = lease.release().await;
        return ExitCode::from(status);
    }
    let lost = lease.lost();
    tokio::pin!(lost);
    let code = loop {
        tokio::select! {
            _ = children.recv() => {
                if let Some(status) = group.reap() {
                    break child::exit_code(status);
                }
                group.follow_stop();
            }
            number = signals.recv() => group.forward(number),
            reason = &mut lost => {
                let err = dlock::Error::LeaseLost {
                    key: lease.key().to_owned(),
                    backend: locks.describe().to_owned(),
                    fence: lease.fence(),
                    reason,
                };
                exit::report(format!("{err}; stopping {program:?} and its process group (SIGTERM, SIGKILL after {:?})", args.kill_after));
                group.stop(args.kill_after).await;
                group.close();
                drop(lease);
                return ExitCode::from(exit::LEASE_LOST);
            }
        }
    };
    // What COMMAND left running (background jobs, daemons) must not outlive the lock.
    group.stop(args.kill_after).await;
    group.close();
    if let Err(err) = lease.release().await {
        exit::report(format!(
            "{err} (the lease on {:?} ends at its TTL)",
            args.key
        ));
    }
    ExitCode::from(code)
}
