//! `dlock run` and COMMAND's whole process tree: what COMMAND starts stops when the lease
//! is lost and when dlock dies (even by SIGKILL, even for a setuid COMMAND), and a Ctrl-C
//! or a `kill -INT` reaches COMMAND exactly once. File backend in a temporary directory.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dlock_testkit::cli::LockDir;

const DLOCK: &str = env!("CARGO_BIN_EXE_dlock");

/// A private lock directory for `dlock` (removed when dropped).
fn new_dir() -> LockDir {
    LockDir::new(DLOCK, "dlock-tree-")
}

/// A dlock process, killed and reaped when the test ends however it ends.
struct Running(Child);

impl Running {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Its exit status, waiting at most `limit`.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < limit, "dlock did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Processes COMMAND started, SIGKILLed when the test ends if they still run.
struct Strays(Vec<i32>);

impl Drop for Strays {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if alive(pid) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_owned())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

fn dies_within(pid: i32, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The pid a script wrote into `file`.
fn read_pid(file: &Path) -> i32 {
    let started = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} never written",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A COMMAND whose foreground step (a grandchild of dlock) writes its pid, then `marker`
/// after 4 seconds.
fn grandchild_script(dir: &LockDir) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let pid = dir.path().join("grandchild");
    let marker = dir.path().join("marker");
    let script = format!(
        "sh -c 'echo $$ > {}; sleep 4; touch {}'; echo after",
        pid.display(),
        marker.display()
    );
    (script, pid, marker)
}

#[test]
fn force_release_stops_commands_foreground_children() {
    let dir = new_dir();
    let (script, pid_file, marker) = grandchild_script(&dir);
    let mut holder = Running(
        dir.dlock(&[
            "run",
            "job",
            "--ttl",
            "1s",
            "--kill-after",
            "2s",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let grandchild = read_pid(&pid_file);
    let _strays = Strays(vec![grandchild]);
    let written = Instant::now();
    let out = dir.dlock(&["release", "job", "--force"]).output().unwrap();
    assert!(out.status.success(), "release --force failed: {out:?}");
    let status = holder.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(76), "{status:?}");
    assert!(
        dies_within(grandchild, Duration::from_secs(10)),
        "COMMAND's child {grandchild} runs on after the lease was lost"
    );
    std::thread::sleep(Duration::from_secs(5).saturating_sub(written.elapsed()));
    assert!(
        !marker.exists(),
        "COMMAND's child went on working outside the lock"
    );
}

#[test]
fn sigkill_of_dlock_stops_commands_foreground_children() {
    let dir = new_dir();
    let (script, pid_file, marker) = grandchild_script(&dir);
    let mut holder = Running(
        dir.dlock(&["run", "job", "--", "sh", "-c", &script])
            .spawn()
            .unwrap(),
    );
    let grandchild = read_pid(&pid_file);
    let _strays = Strays(vec![grandchild]);
    let written = Instant::now();
    unsafe { libc::kill(holder.pid(), libc::SIGKILL) };
    holder.wait(Duration::from_secs(10));
    assert!(
        dies_within(grandchild, Duration::from_secs(10)),
        "COMMAND's child {grandchild} runs on after dlock was killed"
    );
    std::thread::sleep(Duration::from_secs(5).saturating_sub(written.elapsed()));
    assert!(
        !marker.exists(),
        "COMMAND's child went on working outside the lock"
    );
    let out = dir
        .dlock(&["run", "job", "--no-wait", "--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "lock not free: {out:?}");
}

/// The direct children of `parent` whose command line contains `needle`.
fn children_named(parent: i32, needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// The effective uid of `pid`.
fn euid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[test]
fn setuid_command_dies_with_dlock() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: making a setuid binary of another user needs root");
        return;
    }
    let dir = new_dir();
    let binary = dir.path().join("sleep-as-nobody");
    std::fs::copy("/bin/sleep", &binary).unwrap();
    let path = std::ffi::CString::new(binary.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::chown(path.as_ptr(), 65534, 65534) }, 0);
    assert_eq!(unsafe { libc::chmod(path.as_ptr(), 0o4755) }, 0);
    let mut holder = Running(
        dir.dlock(&["run", "k", "--", binary.to_str().unwrap(), "30"])
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let command = loop {
        if let Some(&pid) = children_named(holder.pid(), "sleep-as-nobody").first() {
            if euid(pid) == Some(65534) {
                break pid;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the setuid COMMAND did not start with changed credentials"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let _strays = Strays(vec![command]);
    unsafe { libc::kill(holder.pid(), libc::SIGKILL) };
    holder.wait(Duration::from_secs(10));
    assert!(
        dies_within(command, Duration::from_secs(10)),
        "setuid COMMAND {command} runs on after dlock was killed"
    );
}

/// A COMMAND that counts the SIGINTs it gets for a second after the first, and exits
/// with the count. Perl's handlers run once per delivered signal.
const COUNT_SIGINTS: &str = r#"$n = 0; $SIG{INT} = sub { $n++ }; $| = 1; print "ready\n";
select(undef, undef, undef, 0.05) while !$n;
select(undef, undef, undef, 0.05) for 1 .. 20;
exit $n;"#;

#[test]
fn kill_int_of_dlock_reaches_command_once() {
    let dir = new_dir();
    let mut child = dir
        .dlock(&["run", "k", "--", "perl", "-e", COUNT_SIGINTS])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut holder = Running(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    unsafe { libc::kill(holder.pid(), libc::SIGINT) };
    let status = holder.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "SIGINTs COMMAND got: {status:?}");
}

#[test]
fn ctrl_c_on_a_terminal_reaches_command_once() {
    let dir = new_dir();
    let (mut master, mut slave) = (0, 0);
    let made = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(made, 0, "openpty: {}", std::io::Error::last_os_error());
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    let mut command = dir.dlock(&["run", "k", "--", "perl", "-e", COUNT_SIGINTS]);
    command
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // dlock starts a session with the pty as its controlling terminal, as a login shell
    // would have it: it is in the terminal's foreground.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut holder = Running(command.spawn().unwrap());
    // Only dlock and its children keep the terminal open from here on.
    drop(command);
    drop(slave);
    let output = Arc::new(Mutex::new(Vec::new()));
    let mut reader = std::fs::File::from(master.try_clone().unwrap());
    let seen = Arc::clone(&output);
    // Ends with EIO once every process on the terminal is gone.
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let started = Instant::now();
    while !String::from_utf8_lossy(&output.lock().unwrap()).contains("ready") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "COMMAND never started: {:?}",
            String::from_utf8_lossy(&output.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whether a SIGINT from the terminal and dlock's forwarded one would coalesce is up to
    // the scheduler; who the terminal signals is not.
    let foreground = unsafe { libc::tcgetpgrp(master.as_raw_fd()) };
    assert_ne!(
        foreground,
        holder.pid(),
        "dlock shares the terminal's foreground group with COMMAND: Ctrl-C reaches COMMAND \
         from the terminal and again from dlock"
    );
    let mut terminal = std::fs::File::from(master);
    terminal.write_all(b"\x03").unwrap();
    let status = holder.wait(Duration::from_secs(20));
    drop(terminal);
    let _ = reader.join();
    let text = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    assert_eq!(
        status.code(),
        Some(1),
        "SIGINTs COMMAND got for one Ctrl-C: {status:?}; terminal: {text:?}"
    );
}

/// The watchdog is a forked copy of dlock that never execs: it must hold none of dlock's
/// descriptors (a copy of the lock file's would keep the flock after dlock lets go of
/// it, a copy of a connection would keep a server session), and it shows as
/// `dlock-watchdog`, not as a second `dlock run`.
#[test]
fn the_watchdog_holds_nothing_of_dlocks() {
    let dir = new_dir();
    let holder = Running(
        dir.dlock(&["run", "k", "--", "sleep", "30"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let watchdog = loop {
        if let Some(&pid) = children_named(holder.pid(), "dlock-watchdog").first() {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no watchdog among dlock's children"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let cmdline = std::fs::read(format!("/proc/{watchdog}/cmdline")).unwrap();
    let shown: Vec<&[u8]> = cmdline
        .split(|b| *b == 0)
        .filter(|arg| !arg.is_empty())
        .collect();
    assert_eq!(shown, [b"dlock-watchdog".as_slice()], "{cmdline:?}");
    let mut fds: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{watchdog}/fd"))
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            (
                entry.file_name().to_string_lossy().into_owned(),
                target.to_string_lossy().into_owned(),
            )
        })
        .collect();
    fds.sort();
    let names: Vec<&str> = fds.iter().map(|(fd, _)| fd.as_str()).collect();
    assert_eq!(names, ["0", "1", "2"], "the watchdog holds more: {fds:?}");
    assert!(fds[0].1.starts_with("pipe:"), "{fds:?}");
    assert!(
        fds[1..].iter().all(|(_, target)| target == "/dev/null"),
        "{fds:?}"
    );
}
