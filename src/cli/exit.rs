//! Exit statuses (SPEC §4, after sysexits.h and flock(1)) and one-line error messages.

use dlock::Error;
use std::process::ExitCode;

/// COMMAND ran and this is its status: passed through.
/// The lock was not acquired: held elsewhere with `--no-wait`, or `--wait` ran out.
pub const NOT_ACQUIRED: u8 = 75; // EX_TEMPFAIL
/// The backend could not be reached or answered with an error.
pub const UNAVAILABLE: u8 = 69; // EX_UNAVAILABLE
/// Bad arguments, key, duration or URL.
pub const USAGE: u8 = 64; // EX_USAGE
/// The lease was lost while COMMAND ran; COMMAND got SIGTERM, then SIGKILL.
pub const LEASE_LOST: u8 = 76; // EX_PROTOCOL: the store took the lease away
/// COMMAND could not be executed (found but not runnable), as in shells and env(1).
pub const CANNOT_EXECUTE: u8 = 126;
/// COMMAND was not found, as in shells and env(1).
pub const NOT_FOUND: u8 = 127;

/// The exit status for a library error.
pub fn status_of(err: &Error) -> u8 {
    match err {
        Error::NotAcquired { .. } => NOT_ACQUIRED,
        Error::LeaseLost { .. } => LEASE_LOST,
        err if err.is_usage() => USAGE,
        _ => UNAVAILABLE,
    }
}

/// Prints `message` as one line on stderr, prefixed with `dlock: `.
pub fn report(message: impl std::fmt::Display) {
    let text = message.to_string();
    let one_line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    eprintln!("dlock: {}", one_line.join(" "));
}

/// Reports `err` and returns its exit status.
pub fn fail(err: &Error) -> ExitCode {
    report(err);
    ExitCode::from(status_of(err))
}
