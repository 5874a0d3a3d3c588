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
    let all = rows_of(all);
    let rows: Vec<[String; 8]> = all
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
            cells.map(|cell| printable(&cell).into_owned())
        })
        .collect();
    let header = [
        "KEY", "FENCE", "OWNER", "HOLDER", "ACQUIRED", "RENEWED", "EXPIRES", "NOTE",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
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
