//! Running COMMAND: environment, death with dlock, signals and exit statuses.

use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitStatus;

/// The signals dlock passes on to COMMAND (SPEC §4).
pub const FORWARDED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Builds COMMAND so that it dies with dlock: if dlock is killed (even with SIGKILL) the
/// kernel sends COMMAND SIGKILL (`PR_SET_PDEATHSIG`). That covers COMMAND itself, and not
/// after an exec that changes credentials (setuid, file capabilities); the rest of its
/// tree is the watchdog's (see `tree`).
///
/// The death signal is tied to the thread that forks; dlock spawns COMMAND from its main
/// thread, which lives as long as the process.
pub fn command(program: &str, args: &[String]) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    command.args(args);
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // dlock died between fork and prctl: do not start COMMAND at all.
            if libc::getppid() != parent as libc::pid_t {
                libc::_exit(super::exit::LEASE_LOST.into());
            }
            Ok(())
        });
    }
    command
}

/// The exit status dlock passes on: COMMAND's code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
        (None, None) => 1,
    }
}

/// The status and message for a COMMAND that could not be started.
pub fn spawn_failure(program: &str, err: &io::Error) -> (u8, String) {
    match err.kind() {
        io::ErrorKind::NotFound => (
            super::exit::NOT_FOUND,
            format!("cannot run {program:?}: command not found"),
        ),
        io::ErrorKind::PermissionDenied => (
            super::exit::CANNOT_EXECUTE,
            format!("cannot run {program:?}: permission denied"),
        ),
        _ => (
            super::exit::CANNOT_EXECUTE,
            format!("cannot run {program:?}: {err}"),
        ),
    }
}
