//! `dlock run KEY -- COMMAND`: flock(1) with leases.

use super::{child, connect, duration_arg, exit, tree, BackendArg};
use clap::Args;
use fencelock::{Key, LockInfo, Wait};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The lock key (1 to 1024 bytes of UTF-8); with --all, leave it out
    #[arg(required_unless_present = "all")]
    key: Option<String>,
    /// Take a shared (read) lock: readers share the key, a writer (without --shared)
    /// excludes them all; interoperates with `flock -s` on the file backend
    #[arg(long, conflicts_with = "permits")]
    shared: bool,
    /// Take one of N permits of the semaphore KEY (every holder must give the same N);
    /// COMMAND also sees DLOCK_PERMITS
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    permits: Option<u32>,
    /// Take every key of a comma-separated list, all or nothing, in one canonical order
    /// (no deadlock between overlapping lists); write a comma inside a key as `\,` and a
    /// backslash as `\\`; may be repeated
    #[arg(long, value_name = "K1,K2,…", conflicts_with = "permits")]
    all: Vec<String>,
    /// Keep the lock taken until DUR after acquisition even if COMMAND ends sooner, so a
    /// replica whose schedule fires a little later skips the run (with --no-wait). On a
    /// backend with TTLs the store ends the lease then and dlock exits at once; on file,
    /// the SQL session modes and ZooKeeper dlock stays, holding, until then
    #[arg(long, value_name = "DUR", value_parser = duration_arg, conflicts_with = "all")]
    hold_at_least: Option<Duration>,
    /// Never hold the lock longer than DUR after acquisition: the lease is not renewed
    /// past it, and a COMMAND still running then is stopped as on a lost lease (SIGTERM,
    /// SIGKILL after --kill-after, exit 76)
    #[arg(long, value_name = "DUR", value_parser = duration_arg, conflicts_with = "all")]
    hold_at_most: Option<Duration>,
    #[command(flatten)]
    common: Common,
}

/// `dlock elect NAME [--value V] -- COMMAND`.
#[derive(Debug, Args)]
pub struct ElectArgs {
    /// The election's name (a lock key)
    name: String,
    /// What the leader publishes for `dlock leader` (default: HOST:PID)
    #[arg(long, value_name = "V")]
    value: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// The options `run` and `elect` share.
#[derive(Debug, Args)]
pub struct Common {
    #[command(flatten)]
    backend: BackendArg,
    /// Lease TTL, at least 30ms (at most 24h): a crashed holder's lock ends after this
    /// long (renewed every TTL/3)
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = duration_arg)]
    ttl: Duration,
    /// Wait at most this long for the lock (default: without limit, like flock(1)); a
    /// bare number is seconds, as in flock -w SECS
    #[arg(long, short = 'w', value_name = "DUR", value_parser = duration_arg, conflicts_with = "no_wait")]
    wait: Option<Duration>,
    /// Fail at once (exit 75, or -E's status) if the lock is held elsewhere
    #[arg(long, short = 'n')]
    no_wait: bool,
    /// The exit status when the lock is not acquired (held elsewhere with --no-wait, or
    /// --wait ran out) instead of 75, as flock -E
    #[arg(long, short = 'E', value_name = "N")]
    conflict_exit_code: Option<u8>,
    /// Say on stderr what dlock waits for and who holds it, and when it acquires and
    /// releases (on a terminal the waiting line appears after 1s without -v)
    #[arg(long, short = 'v')]
    verbose: bool,
    /// Run this shell command line (with sh -c) instead of COMMAND, as flock -c
    #[arg(
        long = "command",
        short = 'c',
        value_name = "STRING",
        conflicts_with = "command"
    )]
    shell: Option<String>,
    /// After a lost lease, how long COMMAND has between SIGTERM and SIGKILL
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = duration_arg)]
    kill_after: Duration,
    /// Serve Prometheus metrics on ADDR while dlock runs (HOST:PORT with an IP address,
    /// or a bare PORT on 127.0.0.1); see "Observability" in the README
    #[arg(long, value_name = "ADDR", value_parser = super::metrics::parse_addr)]
    metrics: Option<std::net::SocketAddr>,
    /// The command to run under the lock and its arguments: everything from COMMAND on
    /// is COMMAND's (`--` before it is allowed); without COMMAND, hold the lock until a
    /// signal
    #[arg(
        value_name = "COMMAND",
        trailing_var_arg = true,
        num_args = 0..
    )]
    command: Vec<String>,
}

/// Splits `--all` values at commas not escaped by a backslash.
fn split_keys(lists: &[String]) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    for list in lists {
        let mut key = String::new();
        let mut chars = list.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(next @ (',' | '\\')) => key.push(next),
                    _ => return Err(format!("bad escape in --all {list:?}: write \\, for a comma and \\\\ for a backslash")),
                },
                ',' => keys.push(std::mem::take(&mut key)),
                c => key.push(c),
            }
        }
        keys.push(key);
    }
    Ok(keys)
}

/// What `run` or `elect` holds while COMMAND runs.
enum Held {
    One(fencelock::Lease),
    All(fencelock::MultiLease),
    Leader(fencelock::Leadership),
}

impl Held {
    fn lease(&self) -> Option<&fencelock::Lease> {
        match self {
            Held::One(lease) => Some(lease),
            Held::Leader(leadership) => Some(leadership.lease()),
            Held::All(_) => None,
        }
    }

    fn set_env(&self, command: &mut std::process::Command, permits: Option<u32>) {
        if let Some(lease) = self.lease() {
            command
                .env("DLOCK_KEY", lease.key())
                .env("DLOCK_FENCE", lease.fence().to_string())
                .env("DLOCK_OWNER", lease.owner());
        }
        if let Held::All(all) = self {
            let keys: Vec<String> = all
                .keys()
                .map(|k| k.replace('\\', "\\\\").replace(',', "\\,"))
                .collect();
            let fences: Vec<String> = all.fences().iter().map(|(_, f)| f.to_string()).collect();
            command
                .env("DLOCK_KEYS", keys.join(","))
                .env("DLOCK_FENCES", fences.join(","));
        }
        if let Some(permits) = permits {
            command.env("DLOCK_PERMITS", permits.to_string());
        }
        if let Held::Leader(leadership) = self {
            command
                .env("DLOCK_TERM", leadership.term().to_string())
                .env("DLOCK_VALUE", leadership.value());
        }
    }

    fn lost(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = fencelock::LossReason> + Send>> {
        match self {
            Held::One(lease) => Box::pin(lease.lost()),
            Held::All(all) => Box::pin(all.lost()),
            Held::Leader(leadership) => Box::pin(leadership.lost()),
        }
    }

    fn lost_error(&self, backend: &str, reason: fencelock::LossReason) -> fencelock::Error {
        let (key, fence) = match self {
            Held::One(lease) => (lease.key().to_owned(), lease.fence()),
            Held::Leader(leadership) => (leadership.name().to_owned(), leadership.term()),
            Held::All(all) => {
                let lost = all.parts().iter().find(|l| l.is_lost());
                match lost {
                    Some(lease) => (lease.key().to_owned(), lease.fence()),
                    None => (all.keys().collect::<Vec<_>>().join(","), 0),
                }
            }
        };
        fencelock::Error::LeaseLost {
            key,
            backend: backend.to_owned(),
            fence,
            reason,
        }
    }

    /// `"k" (fence 7)` for the `-v` line.
    fn acquired_text(&self) -> String {
        match self {
            Held::One(lease) => format!("lock {:?} (fence {})", lease.key(), lease.fence()),
            Held::Leader(leadership) => format!(
                "leadership of {:?} (term {})",
                leadership.name(),
                leadership.term()
            ),
            Held::All(all) => {
                let fences: Vec<String> = all
                    .fences()
                    .iter()
                    .map(|(key, fence)| format!("{key:?} (fence {fence})"))
                    .collect();
                format!("locks {}", fences.join(", "))
            }
        }
    }

    fn name(&self) -> String {
        match self {
            Held::One(lease) => lease.key().to_owned(),
            Held::Leader(leadership) => leadership.name().to_owned(),
            Held::All(all) => all.keys().collect::<Vec<_>>().join(","),
        }
    }

    async fn release(self) -> fencelock::Result<bool> {
        match self {
            Held::One(lease) => lease.release().await,
            Held::All(all) => all.release().await,
            Held::Leader(leadership) => leadership.resign().await,
        }
    }
}

/// How long connecting may take past a limited wait: `--no-wait` against a store that
/// does not answer must fail about as fast as against one that says "held".
const CONNECT_GRACE: Duration = Duration::from_secs(1);

/// Connects, within the wait's limit plus a grace when the wait is limited.
async fn connect_within(
    backend: Option<String>,
    wait: Wait,
) -> Result<fencelock::Locks, fencelock::Error> {
    let limit = match wait {
        Wait::No => Duration::ZERO,
        Wait::For(limit) => limit,
        Wait::Forever => return connect(backend).await,
    };
    let url = match backend {
        Some(url) => url,
        None => fencelock::default_url()?,
    };
    let describe = fencelock::redact(&url);
    match tokio::time::timeout(limit.saturating_add(CONNECT_GRACE), connect(Some(url))).await {
        Ok(connected) => connected,
        Err(_) => Err(fencelock::Error::unavailable(
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

/// How long a `run` holds its lock at least and at most, after acquisition.
#[derive(Debug, Clone, Copy, Default)]
struct Hold {
    at_least: Option<Duration>,
    at_most: Option<Duration>,
}

impl Hold {
    fn check(self) -> Result<(), String> {
        if let Some(at_least) = self.at_least {
            if at_least > fencelock::MAX_TTL {
                return Err(format!(
                    "--hold-at-least {at_least:?} is longer than the longest lease, {:?}",
                    fencelock::MAX_TTL
                ));
            }
            if let Some(at_most) = self.at_most.filter(|at_most| at_least > *at_most) {
                return Err(format!(
                    "--hold-at-least {at_least:?} is longer than --hold-at-most {at_most:?}"
                ));
            }
        }
        Ok(())
    }

    fn apply(self, builder: fencelock::LockBuilder) -> fencelock::LockBuilder {
        match self.at_most {
            Some(at_most) => builder.hold_at_most(at_most),
            None => builder,
        }
    }
}

/// What to take.
enum Plan {
    One {
        key: String,
        shared: bool,
        permits: Option<u32>,
        hold: Hold,
    },
    All {
        keys: Vec<String>,
        shared: bool,
    },
    Elect {
        name: String,
        value: String,
    },
}

pub async fn run(mut args: RunArgs, hold: bool) -> ExitCode {
    if !args.all.is_empty() {
        // With --all there is no KEY: a first positional word is COMMAND's.
        if let Some(word) = args.key.take() {
            args.common.command.insert(0, word);
        }
    }
    if hold && (!args.common.command.is_empty() || args.common.shell.is_some()) {
        exit::report(
            "dlock hold takes no COMMAND; to run one under the lock, use dlock run KEY -- COMMAND (see dlock hold --help)",
        );
        return ExitCode::from(exit::USAGE);
    }
    let plan = if args.all.is_empty() {
        let hold = Hold {
            at_least: args.hold_at_least,
            at_most: args.hold_at_most,
        };
        if let Err(message) = hold.check() {
            exit::report(message);
            return ExitCode::from(exit::USAGE);
        }
        Plan::One {
            key: args.key.unwrap_or_default(),
            shared: args.shared,
            permits: args.permits,
            hold,
        }
    } else {
        match split_keys(&args.all) {
            Ok(keys) => Plan::All {
                keys,
                shared: args.shared,
            },
            Err(message) => {
                exit::report(message);
                return ExitCode::from(exit::USAGE);
            }
        }
    };
    supervise(plan, args.common).await
}

pub async fn elect(args: ElectArgs) -> ExitCode {
    let value = args.value.unwrap_or_else(|| {
        format!(
            "{}:{}",
            fencelock::backend::Holder::current().host,
            std::process::id()
        )
    });
    supervise(
        Plan::Elect {
            name: args.name,
            value,
        },
        args.common,
    )
    .await
}

async fn supervise(plan: Plan, args: Common) -> ExitCode {
    let keys: Vec<&str> = match &plan {
        Plan::One { key, .. } => vec![key.as_str()],
        Plan::All { keys, .. } => keys.iter().map(String::as_str).collect(),
        Plan::Elect { name, .. } => vec![name.as_str()],
    };
    for key in keys {
        if let Err(err) = Key::new(key) {
            return exit::fail(&err);
        }
    }
    let name = match &plan {
        Plan::One { key, .. } => key.clone(),
        Plan::All { keys, .. } => keys.join(","),
        Plan::Elect { name, .. } => name.clone(),
    };
    // Before the acquire, so that its wait and latency are measured too.
    if let Some(addr) = args.metrics {
        if let Err(message) = super::metrics::serve(addr) {
            exit::report(message);
            return ExitCode::from(exit::UNAVAILABLE);
        }
    }
    let what = match &plan {
        Plan::One { .. } => format!("cannot take lock {name:?}"),
        Plan::All { .. } => format!("cannot take the locks {name:?}"),
        Plan::Elect { .. } => format!("cannot campaign in election {name:?}"),
    };
    let command: Vec<String> = match &args.shell {
        Some(line) => vec!["/bin/sh".into(), "-c".into(), line.clone()],
        None => args.command.clone(),
    };
    // Without COMMAND: hold the lock until a signal (`dlock hold`).
    let program = command.first().cloned();
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
        Err(err) => return exit::fail_on(&what, &err),
    };
    let keys: Vec<String> = match &plan {
        Plan::One { key, .. } => vec![key.clone()],
        Plan::All { keys, .. } => keys.clone(),
        Plan::Elect { name, .. } => vec![name.clone()],
    };
    let mut permits = None;
    let acquire = async {
        match &plan {
            Plan::One {
                key,
                permits: Some(n),
                hold,
                ..
            } => {
                permits = Some(*n);
                hold.apply(locks.semaphore(key, *n).ttl(args.ttl).wait(wait))
                    .acquire()
                    .await
                    .map(Held::One)
            }
            Plan::One {
                key, shared, hold, ..
            } => {
                let builder = hold.apply(locks.lock(key).ttl(args.ttl).wait(wait));
                let builder = if *shared { builder.shared() } else { builder };
                builder.acquire().await.map(Held::One)
            }
            Plan::All { keys, shared } => {
                let builder = locks.lock_all(keys).ttl(args.ttl).wait(wait);
                let builder = if *shared { builder.shared() } else { builder };
                builder.acquire().await.map(Held::All)
            }
            Plan::Elect { name, value } => locks
                .elect(name, value.as_str())
                .ttl(args.ttl)
                .wait(wait)
                .campaign()
                .await
                .map(Held::Leader),
        }
    };
    // Waiting is not silent: after a while, on a terminal or with -v, say once what
    // dlock waits for and who holds it. A failed lookup says less, never more.
    let notice = async {
        if wait == Wait::No {
            return std::future::pending::<std::convert::Infallible>().await;
        }
        tokio::time::sleep(NOTICE_AFTER).await;
        if args.verbose || std::io::stderr().is_terminal() {
            let mut holder = None;
            for key in &keys {
                if let Lookup::Held(who) = holder_of(&locks, key).await {
                    holder = Some((key, who));
                    break;
                }
            }
            match holder {
                Some((key, who)) => exit::report(format!(
                    "waiting for lock {key:?} on {}, held by {who}",
                    locks.describe()
                )),
                None => exit::report(format!("waiting for lock {name:?} on {}", locks.describe())),
            }
        }
        std::future::pending::<std::convert::Infallible>().await
    };
    let lease = tokio::select! {
        lease = acquire => match lease {
            Ok(lease) => lease,
            Err(err @ fencelock::Error::NotAcquired { .. }) => {
                exit::report(refusal(&locks, &err, wait).await);
                return ExitCode::from(args.conflict_exit_code.unwrap_or(exit::NOT_ACQUIRED));
            }
            Err(err) => return exit::fail_on(&what, &err),
        },
        never = notice => match never {},
        number = signals.recv() => {
            // Interrupted while waiting: nothing is held (the acquire was dropped).
            return ExitCode::from(u8::try_from(128 + number).unwrap_or(255));
        }
    };
    if args.verbose {
        exit::report(format!(
            "acquired {} on {}",
            lease.acquired_text(),
            locks.describe()
        ));
    }
    let Some(program) = program else {
        return hold_until_signal(lease, &locks, &mut signals, args.verbose).await;
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
    let mut command = child::command(&program, &command[1..]);
    lease.set_env(&mut command, permits);
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
                let err = lease.lost_error(locks.describe(), reason);
                exit::report(format!("{err}; stopping {program:?} and its process group (SIGTERM, SIGKILL after {:?})", args.kill_after));
                group.stop(args.kill_after).await;
                group.close();
                drop(lease);
                return ExitCode::from(exit::LEASE_LOST);
            }
        }
    };
    // What COMMAND left running (background jobs, daemons) must not outlive the lock.
    let name = lease.name();
    group.stop(args.kill_after).await;
    group.close();
    let at_least = match &plan {
        Plan::One { hold, .. } => hold.at_least,
        _ => None,
    };
    let released = match (lease, at_least) {
        (Held::One(lease), Some(at_least)) => {
            let expires = locks.backend().capabilities().expires;
            hold_then_release(lease, at_least, expires, &mut signals).await
        }
        (lease, _) => lease.release().await,
    };
    match released {
        Err(err) => exit::report(format!(
            "{} (the lease on {:?} ends at its TTL)",
            exit::describe(&err),
            name
        )),
        Ok(_) if args.verbose => exit::report(format!("released {name:?}")),
        Ok(_) => {}
    }
    ExitCode::from(code)
}

/// Releases `lease`, but not before `at_least` after its acquisition (`--hold-at-least`).
/// A store with TTLs is told when the lease ends, and dlock exits at once; a lock that
/// dies with dlock's session (file, SQL session modes, ZooKeeper) is kept until then by
/// dlock, which waits for it. SIGINT, SIGTERM or SIGHUP during that wait end it early:
/// the lock is released at once.
async fn hold_then_release(
    lease: fencelock::Lease,
    at_least: Duration,
    expires: bool,
    signals: &mut Signals,
) -> fencelock::Result<bool> {
    if !expires {
        let until = lease.acquired_at().checked_add(at_least);
        let hold = async {
            match until {
                Some(until) => tokio::time::sleep_until(until.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = hold => {}
            _ = lease.lost() => {}
            number = signals.recv() => {
                tracing::debug!(signal = number, key = lease.key(), "hold-at-least ended early by a signal");
                return lease.release().await;
            }
        }
    }
    lease.release_after(at_least).await
}

/// How long a wait lasts before dlock says what it waits for (on a terminal, or -v).
const NOTICE_AFTER: Duration = Duration::from_secs(1);

/// How long the lookup of a holder may take after a refusal or while waiting.
const LOOKUP_LIMIT: Duration = Duration::from_secs(1);

/// What a holder lookup found.
enum Lookup {
    Held(String),
    Free,
    Unknown,
}

/// Who holds `key`, looked up within [`LOOKUP_LIMIT`].
async fn holder_of(locks: &fencelock::Locks, key: &str) -> Lookup {
    match tokio::time::timeout(LOOKUP_LIMIT, locks.status(key)).await {
        Ok(Ok(Some(info))) => Lookup::Held(holders_text(&info)),
        Ok(Ok(None)) => Lookup::Free,
        Ok(Err(err)) => {
            tracing::debug!("holder of {key:?} unknown: {err}");
            Lookup::Unknown
        }
        Err(_) => Lookup::Unknown,
    }
}

/// `1234@host (fence 7, acquired 3s ago)`, or for several leases (readers, permits)
/// `2 holders: …`.
fn holders_text(info: &LockInfo) -> String {
    fn one(info: &LockInfo) -> String {
        let who = match (info.pid, &info.host) {
            (Some(pid), Some(host)) => format!("{pid}@{host}"),
            (Some(pid), None) => format!("pid {pid}"),
            (None, Some(host)) => host.clone(),
            (None, None) => "a holder it does not name".to_owned(),
        };
        let mut details = Vec::new();
        if let Some(fence) = info.fence {
            details.push(format!("fence {fence}"));
        }
        if let Some(at) = info.acquired_at {
            details.push(format!("acquired {}", super::inspect::ago(Some(at))));
        }
        if details.is_empty() {
            who
        } else {
            format!("{who} ({})", details.join(", "))
        }
    }
    if info.holders.is_empty() {
        return one(info);
    }
    let shown: Vec<String> = info.holders.iter().take(3).map(one).collect();
    let more = if info.holders.len() > 3 { ", …" } else { "" };
    format!("{} holders: {}{more}", info.holders.len(), shown.join(", "))
}

/// The line for a refused acquire: who holds the key (looked up now, bounded; a failed
/// lookup only says less) and how long dlock waited.
async fn refusal(locks: &fencelock::Locks, err: &fencelock::Error, wait: Wait) -> String {
    let fencelock::Error::NotAcquired {
        key,
        backend,
        waited,
    } = err
    else {
        return exit::describe(err);
    };
    let by = match holder_of(locks, key).await {
        Lookup::Held(who) => format!("is held by {who}"),
        Lookup::Free => "was held elsewhere (free again now)".to_owned(),
        Lookup::Unknown => "is held elsewhere".to_owned(),
    };
    let when = match wait {
        Wait::No => "not acquired (--no-wait)".to_owned(),
        _ => format!(
            "not acquired after waiting {}",
            super::inspect::short(*waited)
        ),
    };
    format!("lock {key:?} on {backend} {by}; {when}")
}

/// `dlock hold`: prints what is held, then holds it until SIGINT, SIGTERM or SIGHUP
/// (release, exit 0) or until the lease is lost (exit 76).
async fn hold_until_signal(
    lease: Held,
    locks: &fencelock::Locks,
    signals: &mut Signals,
    verbose: bool,
) -> ExitCode {
    let line = match &lease {
        Held::One(one) => format!(
            "key={} fence={} owner={}",
            exit::printable(one.key()),
            one.fence(),
            one.owner()
        ),
        Held::Leader(leadership) => format!(
            "key={} fence={} owner={}",
            exit::printable(leadership.name()),
            leadership.term(),
            leadership.lease().owner()
        ),
        Held::All(all) => {
            let keys: Vec<String> = all
                .keys()
                .map(|k| k.replace('\\', "\\\\").replace(',', "\\,"))
                .collect();
            let fences: Vec<String> = all.fences().iter().map(|(_, f)| f.to_string()).collect();
            format!(
                "keys={} fences={}",
                exit::printable(&keys.join(",")),
                fences.join(",")
            )
        }
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    let lost = lease.lost();
    tokio::select! {
        _ = signals.recv() => {}
        reason = lost => {
            exit::report(lease.lost_error(locks.describe(), reason));
            return ExitCode::from(exit::LEASE_LOST);
        }
    }
    let name = lease.name();
    match lease.release().await {
        Ok(_) => {
            if verbose {
                exit::report(format!("released {name:?}"));
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            exit::report(format!(
                "{} (the lease on {name:?} ends at its TTL)",
                exit::describe(&err)
            ));
            ExitCode::from(exit::UNAVAILABLE)
        }
    }
}
