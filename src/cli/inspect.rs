//! `dlock status`, `dlock list` and `dlock release --force`.

use super::exit::printable;
use super::{connect, exit};
use fencelock::LockInfo;
use std::process::ExitCode;
use std::time::SystemTime;

pub async fn status(key: &str, backend: Option<String>, json: bool) -> ExitCode {
    if let Err(err) = fencelock::Key::new(key) {
        return exit::fail(&err);
    }
    let what = format!("cannot read lock {key:?}");
    let locks = match connect(backend).await {
        Ok(locks) => locks,
        Err(err) => return exit::fail_on(&what, &err),
    };
    match locks.status(key).await {
        Ok(Some(info)) => {
            if json {
                print_json(&info, true);
            } else {
                print_table(&[info]);
            }
            ExitCode::SUCCESS
        }
        Ok(None) => {
            if json {
                print_json(&LockInfo::new(key), false);
            } else {
                println!("{}: free", printable(key));
            }
            ExitCode::from(1)
        }
        Err(err) => exit::fail_on(&what, &err),
    }
}

pub async fn list(backend: Option<String>, json: bool) -> ExitCode {
    let locks = match connect(backend).await {
        Ok(locks) => locks,
        Err(err) => return exit::fail(&err),
    };
    match locks.list().await {
        Ok(all) => {
            if json {
                for info in &all {
                    print_json(info, true);
                }
            } else if all.is_empty() {
                println!("no locks held on {}", printable(locks.describe()));
            } else {
                print_table(&all);
            }
            ExitCode::SUCCESS
        }
        Err(err) => exit::fail(&err),
    }
}

pub async fn release(key: &str, force: bool, backend: Option<String>) -> ExitCode {
    if !force {
        exit::report(format!(
            "release breaks the lock on {key:?} whoever holds it; add --force to confirm"
        ));
        return ExitCode::from(exit::USAGE);
    }
    if let Err(err) = fencelock::Key::new(key) {
        return exit::fail(&err);
    }
    let what = format!("cannot release lock {key:?}");
    let locks = match connect(backend).await {
        Ok(locks) => locks,
        Err(err) => return exit::fail_on(&what, &err),
    };
    match locks.force_release(key).await {
        Ok(true) => {
            println!("{}: released", printable(key));
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("{}: was not held", printable(key));
            ExitCode::from(1)
        }
        Err(err) => exit::fail_on(&what, &err),
    }
}

fn print_json(info: &LockInfo, held: bool) {
    let mut value = serde_json::to_value(info).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert("held".into(), held.into());
    }
    println!("{value}");
}

pub(super) fn ago(t: Option<SystemTime>) -> String {
    match t {
        Some(t) => match SystemTime::now().duration_since(t) {
            Ok(d) => format!("{} ago", short(d)),
            Err(e) => format!("in {}", short(e.duration())),
        },
        None => "-".into(),
    }
}

pub(super) fn short(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    if secs < 1 {
        format!("{}ms", d.as_millis())
    } else if secs < 120 {
        format!("{secs}s")
    } else if secs < 7200 {
        format!("{}m", secs / 60)
    } else {
        format!("{}h", secs / 3600)
    }
}

/// One row per lease: a shared key or a semaphore shows each reader or permit, the kind
/// named in the note.
fn rows_of(all: &[LockInfo]) -> Vec<LockInfo> {
    let mut rows = Vec::new();
    for info in all {
        if info.holders.is_empty() {
            rows.push(info.clone());
            continue;
        }
        let count = info.holders.len();
        for holder in &info.holders {
            let mut row = holder.clone();
            row.key.clone_from(&info.key);
            let kind = match (info.kind.as_deref(), info.permits) {
                (Some("semaphore"), Some(permits)) => {
                    format!("semaphore: {count} of {permits} permits held")
                }
                (Some(kind), _) => format!("{kind}: {count} holders"),
                (None, _) => format!("{count} holders"),
            };
            row.note = Some(match &holder.note {
                Some(note) => format!("{kind}; {note}"),
                None => kind,
            });
            rows.push(row);
        }
    }
    rows
}

fn print_table(all: &[LockInfo]) {
    let rows: Vec<Vec<String>> = rows_of(all)
        .iter()
        .map(|i| {
            let cells = [
                i.key.clone(),
                i.fence.map_or("-".into(), |f| f.to_string()),
                i.owner
                    .as_deref()
                    .map_or("-".into(), |o| o.chars().take(12).collect()),
                match (&i.host, i.pid) {
                    (Some(host), Some(pid)) => format!("{host}:{pid}"),
                    (None, Some(pid)) => pid.to_string(),
                    (Some(host), None) => host.clone(),
                    (None, None) => "-".into(),
                },
                ago(i.acquired_at),
                ago(i.renewed_at),
                // When the store ends the lease unless renewed; "-" where it does not
                // (a session or file lock lasts as long as its holder).
                ago(i.expires_at),
                i.note.clone().unwrap_or_default(),
            ];
            cells
                .iter()
                .map(|cell| printable(cell).into_owned())
                .collect()
        })
        .collect();
    print!(
        "{}",
        layout(
            &["KEY", "FENCE", "OWNER", "HOLDER", "ACQUIRED", "RENEWED", "EXPIRES", "NOTE"],
            &rows,
        )
    );
}

/// `dlock leader NAME [--watch]`.
pub async fn leader(name: &str, backend: Option<String>, json: bool, watch: bool) -> ExitCode {
    if let Err(err) = fencelock::Key::new(name) {
        return exit::fail(&err);
    }
    let what = format!("cannot read election {name:?}");
    let locks = match connect(backend).await {
        Ok(locks) => locks,
        Err(err) => return exit::fail_on(&what, &err),
    };
    let show = |leader: &Option<fencelock::Leader>| {
        if json {
            let value = match leader {
                Some(l) => serde_json::json!({
                    "name": name, "led": true, "value": l.value, "term": l.term,
                    "pid": l.pid, "host": l.host,
                }),
                None => serde_json::json!({ "name": name, "led": false }),
            };
            println!("{value}");
        } else {
            match leader {
                Some(l) => {
                    let at = match (&l.host, l.pid) {
                        (Some(host), Some(pid)) => format!(" ({host}:{pid})"),
                        _ => String::new(),
                    };
                    println!(
                        "{}: led by {} in term {}{}",
                        printable(name),
                        printable(l.value.as_deref().unwrap_or("-")),
                        l.term,
                        printable(&at)
                    );
                }
                None => println!("{}: no leader", printable(name)),
            }
        }
    };
    if !watch {
        return match locks.leader(name).await {
            Ok(leader) => {
                show(&leader);
                ExitCode::from(if leader.is_some() { 0 } else { 1 })
            }
            Err(err) => exit::fail_on(&what, &err),
        };
    }
    let mut changes = locks.watch_leader(name);
    loop {
        match changes.changed().await {
            Ok(leader) => show(&leader),
            Err(err) => return exit::fail_on(&what, &err),
        }
    }
}

/// `--watch` and `--interval` of `dlock status` and `dlock list`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Keep running and show the lock(s) live: redrawn in place on a terminal; elsewhere
    /// (a pipe, a file) a new block at each change of holder. Ends with status 0 on
    /// SIGINT or SIGTERM
    #[arg(long, conflicts_with = "json")]
    pub watch: bool,
    /// With --watch: how often to ask the backend
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = interval_arg, requires = "watch")]
    pub interval: std::time::Duration,
}

fn interval_arg(text: &str) -> Result<std::time::Duration, String> {
    let interval = super::duration_arg(text)?;
    if interval < std::time::Duration::from_millis(10) {
        return Err("the interval must be at least 10ms".to_owned());
    }
    Ok(interval)
}

/// `dlock status KEY --watch`.
pub async fn watch_status(key: &str, backend: Option<String>, args: WatchArgs) -> ExitCode {
    if let Err(err) = fencelock::Key::new(key) {
        return exit::fail(&err);
    }
    let locks = match connect(backend).await {
        Ok(locks) => locks,
        Err(err) => return exit::fail(&err),
    };
    let title = format!("dlock status {}", printable(key));
    let free = format!("{}: free", printable(key));
    watch(&locks, &title, &free, args, |locks| async move {
        locks
            .status(key)
            .await
            .map(|info| info.into_iter().collect())
    })
    .await
}

/// `dlock list --watch`.
pub async fn watch_list(backend: Option<String>, args: WatchArgs) -> ExitCode {
    let locks = match connect(backend).await {
        Ok(locks) => locks,
        Err(err) => return exit::fail(&err),
    };
    let none = format!("no locks held on {}", printable(locks.describe()));
    watch(&locks, "dlock list", &none, args, |locks| async move {
        locks.list().await
    })
    .await
}

/// What identifies a state of the watched locks, leaving out what changes by itself
/// (ages, renewal times, notes that say how long ago): a new block is printed on a pipe
/// only when this changes.
fn identity(all: &[LockInfo]) -> Vec<String> {
    rows_of(all)
        .iter()
        .map(|i| {
            format!(
                "{}\u{0}{:?}\u{0}{:?}\u{0}{:?}\u{0}{:?}\u{0}{:?}",
                i.key, i.fence, i.owner, i.host, i.pid, i.value
            )
        })
        .collect()
}

/// The watch view's table: holder, age, last renewal and expiry of every lease.
fn watch_table(all: &[LockInfo]) -> String {
    let rows: Vec<Vec<String>> = rows_of(all)
        .iter()
        .map(|i| {
            let cells = [
                i.key.clone(),
                i.fence.map_or("-".into(), |f| f.to_string()),
                match (&i.host, i.pid) {
                    (Some(host), Some(pid)) => format!("{host}:{pid}"),
                    (None, Some(pid)) => pid.to_string(),
                    (Some(host), None) => host.clone(),
                    (None, None) => "-".into(),
                },
                i.acquired_at
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .map_or("-".into(), short),
                ago(i.renewed_at),
                i.expires_at.map_or("-".into(), |e| ago(Some(e))),
                i.note.clone().unwrap_or_default(),
            ];
            cells
                .iter()
                .map(|cell| printable(cell).into_owned())
                .collect()
        })
        .collect();
    layout(
        &[
            "KEY", "FENCE", "HOLDER", "AGE", "RENEWED", "EXPIRES", "NOTE",
        ],
        &rows,
    )
}

/// Columns of times, which are at least [`TIME_WIDTH`] wide.
const TIME_COLUMNS: [&str; 4] = ["ACQUIRED", "AGE", "RENEWED", "EXPIRES"];

/// The width of the longest time [`ago`] writes below two hours ("999ms ago"), so that a
/// table keeps its columns while times tick over: `--watch` does not jitter and two
/// calls a moment apart line up.
const TIME_WIDTH: usize = 9;

/// Columns aligned, the last one ragged, one line per row.
fn layout(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header
        .iter()
        .map(|h| {
            if TIME_COLUMNS.contains(h) {
                h.len().max(TIME_WIDTH)
            } else {
                h.len()
            }
        })
        .collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for cells in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The wall-clock time, UTC, to the second (RFC 3339: `2026-12-01T16:18:12Z`).
fn now_utc() -> String {
    utc(SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()))
}

/// Seconds since 1970 as an RFC 3339 time, UTC.
fn utc(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Polls `fetch` every interval until SIGINT or SIGTERM. On a terminal the view is
/// redrawn in place; anywhere else a block (a time-stamped title, then the table or
/// `empty`) is printed first and then at each change of holders, so the output
/// reads as a log. A failed poll is shown (once per distinct message) and polling goes
/// on: a store that comes back is shown again.
async fn watch<'a, F, Fut>(
    locks: &'a fencelock::Locks,
    title: &str,
    empty: &str,
    args: WatchArgs,
    fetch: F,
) -> ExitCode
where
    F: Fn(&'a fencelock::Locks) -> Fut,
    Fut: std::future::Future<Output = fencelock::Result<Vec<LockInfo>>>,
{
    use std::io::{IsTerminal, Write};
    use tokio::signal::unix::{signal, SignalKind};
    let (mut interrupt, mut terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(err), _) | (_, Err(err)) => {
            exit::report(format!("cannot handle signals: {err}"));
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let tty = std::io::stdout().is_terminal();
    let backend = printable(locks.describe()).into_owned();
    let mut last: Option<Result<Vec<String>, String>> = None;
    let mut ticks = tokio::time::interval(args.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = ticks.tick() => {}
        }
        let polled = tokio::select! {
            biased;
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            polled = fetch(locks) => polled,
        };
        let state = polled
            .as_ref()
            .map(|all| identity(all))
            .map_err(|err| err.to_string());
        let body = match &polled {
            Ok(all) if all.is_empty() => format!("{empty}\n"),
            Ok(all) => watch_table(all),
            Err(err) => format!("dlock: {}\n", printable(&err.to_string())),
        };
        let text = if tty {
            // Home, then each line cleared to its end, then the rest of the screen:
            // redrawn in place without flicker.
            let mut screen = format!(
                "\x1b[H{title} on {backend}, every {}, {} (Ctrl-C ends)\x1b[K\n\x1b[K\n",
                short(args.interval),
                now_utc()
            );
            for line in body.lines() {
                screen.push_str(line);
                screen.push_str("\x1b[K\n");
            }
            screen.push_str("\x1b[J");
            screen
        } else if last.as_ref() != Some(&state) {
            let held = match &polled {
                Ok(all) => format!("{} held", rows_of(all).len()),
                Err(_) => "error".to_owned(),
            };
            format!("--- {} {title} on {backend}: {held}\n{body}\n", now_utc())
        } else {
            continue;
        };
        last = Some(state);
        let mut out = std::io::stdout().lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // Whoever read the output is gone (a closed pipe): nothing left to show.
            return ExitCode::SUCCESS;
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_times() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc(1_796_142_692), "2026-12-01T16:31:32Z");
        assert_eq!(super::utc(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
