//! Launching real server processes for tests: from installed binaries, on free loopback
//! ports, in temporary directories, and never outliving the test process.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A free loopback port between 20000 and 32000: below the kernel's range of ephemeral
/// ports (32768 and up), so that no client socket takes it between a server's stop and its
/// restart. Racy only against other programs binding ports at the same moment.
pub fn free_port() -> u16 {
    private_port(20000..32000, &[])
}

/// A free loopback port in `range` such that `port + offset` is free too for every
/// offset in `also` (Redis Cluster's bus port is port + 10000), reserved for this
/// process (see [`reserve_port`]).
pub fn private_port(range: std::ops::Range<u16>, also: &[u16]) -> u16 {
    for _ in 0..1000 {
        let port = rand::random_range(range.clone());
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port)
            && also.iter().all(|offset| free(port + offset))
            && reserve_port(port)
            && also.iter().all(|offset| reserve_port(port + offset))
        {
            return port;
        }
    }
    panic!("no free loopback port in {range:?}");
}

/// Reserves `port` for this process until it exits: `false` if this or another test
/// process holds it. A port that is free now is not free for long: a server may take
/// seconds to bind it (SecantusDB imports first), and one stopped for a restart leaves it
/// free meanwhile, so two servers started by tests at once could otherwise be handed the
/// same port, and one test would talk to the other's server. The reservation is an
/// abstract Unix socket named after the port, which the kernel drops with the process:
/// nothing is left on disk.
pub fn reserve_port(port: u16) -> bool {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    static HELD: std::sync::Mutex<Vec<UnixListener>> = std::sync::Mutex::new(Vec::new());
    let Ok(name) = SocketAddr::from_abstract_name(format!("dlock-testkit-port-{port}")) else {
        return false;
    };
    match UnixListener::bind_addr(&name) {
        Ok(held) => {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(held);
            true
        }
        Err(_) => false,
    }
}

/// Finds `binary` on PATH or in `extra_dirs`; fails the test with a message naming the
/// Debian package to install if it is missing.
pub fn require_binary(binary: &str, package: &str, extra_dirs: &[&str]) -> PathBuf {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut candidates: Vec<PathBuf> = path_dirs.into_iter().map(|d| d.join(binary)).collect();
    for pattern in extra_dirs {
        candidates.extend(glob_dirs(pattern).into_iter().map(|d| d.join(binary)));
    }
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("`{binary}` is not installed: install the Debian package `{package}` (apt-get install {package})")
    })
}

/// Expands a trailing-`*` directory pattern like `/usr/lib/postgresql/*/bin`, newest last.
fn glob_dirs(pattern: &str) -> Vec<PathBuf> {
    let Some((head, tail)) = pattern.split_once('*') else {
        return vec![PathBuf::from(pattern)];
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(head)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path().join(tail.trim_start_matches('/')))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.reverse();
    found
}

/// Spawns `command` so that the kernel kills it with SIGKILL when the test process exits,
/// even if the test panics or is killed: the child gets `PR_SET_PDEATHSIG` tied to a
/// thread that lives as long as the process.
pub fn spawn_tied(mut command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: std::sync::OnceLock<std::sync::Mutex<mpsc::Sender<Request>>> =
        std::sync::OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (request_tx, request_rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("testkit-process-keeper".into())
            .spawn(move || {
                // Lives as long as the process: the sender is in a static.
                for (mut command, reply) in request_rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the process keeper thread");
        std::sync::Mutex::new(request_tx)
    });
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent as libc::pid_t {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((command, reply_tx))
        .expect("process keeper thread is gone");
    reply_rx.recv().expect("process keeper thread is gone")
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a pid we started.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// True if process `pid` exists (and is not a zombie we have not reaped).
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// A temporary directory for a server's data or a test's files, named after this
/// process (`PREFIX<pid>-XXXXXX` in the temporary directory). It is removed on drop and,
/// if it is still there, when the test process exits (a server kept in a `static` is
/// never dropped): the exit hook kills this process's remaining children first, then
/// removes every directory made here. A test process killed by a signal runs no exit
/// hook; its directories are removed by the next test process that makes one (see
/// [`remove_stale_dirs`]).
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        remove_stale_dirs(&std::env::temp_dir());
    });
    let dir = tempfile::Builder::new()
        .prefix(&format!("{prefix}{}-", std::process::id()))
        .tempdir()
        .expect("cannot create a temporary directory");
    remove_at_exit(dir.path());
    dir
}

/// Directories to remove when the test process exits.
static AT_EXIT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes `dir` (if it is still there) when the test process exits, after killing the
/// children this process still has.
pub fn remove_at_exit(dir: &Path) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    // SAFETY: atexit(3) with a function that never unwinds into C.
    HOOK.call_once(|| unsafe {
        libc::atexit(clean_up_at_exit);
    });
    AT_EXIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(dir.to_owned());
}

extern "C" fn clean_up_at_exit() {
    // A server still running could write into its directory while it is removed.
    kill_children();
    let dirs = std::mem::take(&mut *AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Kills (SIGKILL) and reaps every child process this process still has: nothing a test
/// started outlives the test process.
pub fn kill_children() {
    let me = std::process::id();
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| parent_of(pid) == Some(me))
                .collect()
        })
        .unwrap_or_default();
    for pid in children {
        // SAFETY: kill(2) and waitpid(2) on a child of this process, which cannot be
        // reused by another process until it is reaped here.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGCONT);
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
        }
    }
}

/// The parent process id of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The pid in the name of a directory made by [`temp_dir`]: `dlock-…-<pid>-XXXXXX`.
fn owner_pid(name: &str) -> Option<u32> {
    if !name.starts_with("dlock-") {
        return None;
    }
    let mut parts = name.rsplit('-');
    let random = parts.next()?;
    let pid = parts.next()?;
    let well_formed = random.len() >= 6
        && random.chars().all(|c| c.is_ascii_alphanumeric())
        && !pid.is_empty()
        && pid.chars().all(|c| c.is_ascii_digit());
    if well_formed {
        pid.parse().ok()
    } else {
        None
    }
}

/// Removes the directories under `tmp` that [`temp_dir`] made for processes that are gone
/// (killed by a signal, so that their exit hook never ran); returns how many it removed.
/// Only names of the form `dlock-…-<pid>-XXXXXX` are touched, and only while no process
/// `<pid>` exists; unless this process is root, only directories it owns.
pub fn remove_stale_dirs(tmp: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(owner_pid) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !meta.is_dir() || (euid != 0 && meta.uid() != euid) {
            continue;
        }
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A command with stdout and stderr sent to `log` in `dir`, for servers. `TMPDIR` is
/// `dir` too: a server's temporary files stay with its data (and go with it), and no two
/// servers share a temporary directory.
pub fn logged(program: &Path, dir: &Path, log: &str) -> Command {
    let mut command = Command::new(program);
    let file = std::fs::File::create(dir.join(log)).expect("cannot create a server log");
    let err = file.try_clone().expect("cannot clone a log handle");
    command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .env("TMPDIR", dir);
    command
}

/// A temporary directory that lives until the test process exits, then is removed (a
/// `static` is never dropped, so a `TempDir` kept in one would stay behind).
pub fn temp_dir_until_exit(prefix: &str) -> &'static Path {
    // `temp_dir` registered it for removal at exit already.
    let dir = temp_dir(prefix).keep();
    Box::leak(dir.into_boxed_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_port_is_never_handed_out_again() {
        let port = free_port();
        assert!(!reserve_port(port), "port {port} reserved twice");
        // The range holds that port only: it is free for TCP, but not to be handed out.
        let again = std::panic::catch_unwind(|| private_port(port..port + 1, &[]));
        assert!(again.is_err(), "port {port} handed out twice");
    }

    #[test]
    fn names_carry_the_owner_pid() {
        assert_eq!(owner_pid("dlock-pg-1234-AbC9eF"), Some(1234));
        assert_eq!(owner_pid("dlock-faults-file-77-xYz012"), Some(77));
        assert_eq!(owner_pid("dlock-pg-AbC9eF"), None);
        assert_eq!(owner_pid("other-1234-AbC9eF"), None);
        assert_eq!(owner_pid("dlock-pg-12a4-AbC9eF"), None);
    }

    #[test]
    fn stale_dirs_of_gone_processes_are_removed_and_no_others() {
        let tmp = tempfile::tempdir().unwrap();
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = tmp.path().join(format!("dlock-pg-{}-AbC9eF", pid_max + 1));
        let live = tmp
            .path()
            .join(format!("dlock-pg-{}-AbC9eF", std::process::id()));
        let unnamed = tmp.path().join("dlock-pg-AbC9eF");
        let file = tmp.path().join(format!("dlock-log-{}-AbC9eF", pid_max + 1));
        for dir in [&gone, &live, &unnamed] {
            std::fs::create_dir_all(dir.join("data")).unwrap();
        }
        std::fs::write(&file, "not a directory").unwrap();
        assert_eq!(remove_stale_dirs(tmp.path()), 1);
        assert!(!gone.exists());
        assert!(live.exists() && unnamed.exists() && file.exists());
    }

    #[test]
    fn temp_dirs_are_named_after_this_process() {
        let dir = temp_dir("dlock-kit-");
        let name = dir.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(owner_pid(&name), Some(std::process::id()), "{name}");
        let registered = AT_EXIT.lock().unwrap().contains(&dir.path().to_owned());
        assert!(registered, "{name} is not removed at exit");
    }

    /// Run by `a_test_process_leaves_no_dir_nor_child_at_exit` in a process of its own:
    /// a directory kept until exit, one never dropped, and a child never waited for.
    #[test]
    fn helper_leaves_things_for_the_exit_hook() {
        let Some(report) = std::env::var_os("DLOCK_TESTKIT_EXIT_REPORT") else {
            return;
        };
        let kept = temp_dir_until_exit("dlock-kit-");
        let forgotten = temp_dir("dlock-kit-");
        let mut sleep = Command::new("sleep");
        sleep.arg("60").stdout(Stdio::null()).stderr(Stdio::null());
        let child = sleep.spawn().unwrap();
        std::fs::write(
            report,
            format!(
                "{}\n{}\n{}\n",
                kept.display(),
                forgotten.path().display(),
                child.id()
            ),
        )
        .unwrap();
        std::mem::forget(forgotten);
        std::mem::forget(child);
    }

    #[test]
    fn a_test_process_leaves_no_dir_nor_child_at_exit() {
        let report = tempfile::NamedTempFile::new().unwrap();
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "process::tests::helper_leaves_things_for_the_exit_hook",
            ])
            .env("DLOCK_TESTKIT_EXIT_REPORT", report.path())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let text = std::fs::read_to_string(report.path()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(!Path::new(lines[0]).exists(), "{} is left", lines[0]);
        assert!(!Path::new(lines[1]).exists(), "{} is left", lines[1]);
        let pid: u32 = lines[2].parse().unwrap();
        assert!(!is_alive(pid), "the child {pid} outlived its test process");
    }
}
