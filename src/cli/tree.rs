//! COMMAND's process tree: one process group that dlock signals as a whole, a watchdog
//! that kills that group if dlock dies, and the terminal handed to the group as shells do.
//!
//! - COMMAND runs in a process group of its own whose leader is the watchdog, a second
//!   dlock process (`dlock __watchdog`). Signals on lease loss, forwarded signals and the
//!   final clean-up go to the whole group, so a foreground step of a shell script stops
//!   with the script.
//! - The watchdog reads a pipe whose write end only dlock holds. When dlock dies, even by
//!   SIGKILL, the pipe reaches end of file and the watchdog SIGKILLs the group. It works
//!   with dlock's credentials, so it also stops a setuid COMMAND, for which the kernel
//!   drops `PR_SET_PDEATHSIG` at exec. As group leader it keeps the group's id from being
//!   reused while dlock may still signal it.
//! - dlock is a child subreaper: processes that leave the group (setsid, setpgid) and are
//!   orphaned stay dlock's descendants, so dlock reaps them and, when COMMAND's lease ends,
//!   finds and kills them too by walking its descendants in `/proc`.
//! - On a terminal where dlock is in the foreground, the group gets the terminal: Ctrl-C
//!   reaches COMMAND's group once (not dlock), and dlock takes the terminal back at the end.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The hidden first argument that makes dlock a watchdog.
pub const WATCHDOG: &str = "__watchdog";

/// Signals the watchdog ignores: it shares COMMAND's group, which the terminal and dlock
/// signal as a whole, and must outlive every member but itself.
const WATCHDOG_IGNORES: [libc::c_int; 8] = [
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGPIPE,
];

/// The watchdog's whole life: wait for end of file on stdin, then SIGKILL its group.
pub fn watchdog() -> std::process::ExitCode {
    // SAFETY: getpid/getpgrp have no preconditions.
    let (me, group) = unsafe { (libc::getpid(), libc::getpgrp()) };
    // dlock makes its watchdog the leader of a new group; anything else (a user typing
    // `dlock __watchdog`) must not kill the group it was started in.
    if me != group {
        super::exit::report("__watchdog is internal to dlock run");
        return std::process::ExitCode::from(super::exit::USAGE);
    }
    // SAFETY: PR_SET_NAME reads a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"dlock-watchdog".as_ptr(), 0, 0, 0) };
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reading into a buffer of the length given.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 || (n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted) {
            continue;
        }
        break;
    }
    // SAFETY: kill(2) of our own process group, which holds only COMMAND's tree.
    unsafe { libc::kill(0, libc::SIGKILL) };
    std::process::ExitCode::SUCCESS
}

/// Makes dlock the reaper of orphans among its descendants.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether stdin is a terminal whose foreground process group is dlock's.
pub fn foreground_terminal() -> bool {
    // SAFETY: isatty/tcgetpgrp/getpgrp on fd 0, no memory involved.
    unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() }
}

/// Makes `group` the terminal's foreground group. SIGTTOU is blocked meanwhile, since a
/// background process may only do this when it does not get SIGTTOU for it.
fn hand_terminal(group: libc::pid_t) {
    // SAFETY: signal mask calls on the calling thread with valid sets; tcsetpgrp on fd 0.
    // Only async-signal-safe calls: this also runs between fork and exec.
    unsafe {
        let mut block: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, libc::SIGTTOU);
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        libc::tcsetpgrp(0, group);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
}

/// COMMAND's process group, its watchdog and what dlock knows of them.
pub struct Group {
    /// The group id: the watchdog's pid.
    pgid: libc::pid_t,
    /// The write end of the watchdog's pipe; closing it (or dying) fires the watchdog.
    alarm: Option<OwnedFd>,
    /// COMMAND's pid, until it is reaped.
    command: Option<libc::pid_t>,
    /// Whether the terminal was handed to the group.
    terminal: bool,
}

impl Group {
    /// Starts the watchdog, the leader of a new, empty group.
    pub fn new(terminal: bool) -> io::Result<Group> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, which we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors from pipe2, owned once each.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut command = std::process::Command::new("/proc/self/exe");
        command
            .arg0("dlock")
            .arg(WATCHDOG)
            .stdin(Stdio::from(read))
            .stdout(Stdio::null());
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (setpgid, signal, getppid, _exit) between
        // fork and exec. Ignored signals stay ignored across exec, so the watchdog never
        // has a moment where Ctrl-C on the group would kill it.
        unsafe {
            command.pre_exec(move || {
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                for signal in WATCHDOG_IGNORES {
                    libc::signal(signal, libc::SIG_IGN);
                }
                if libc::getppid() != parent as libc::pid_t {
                    libc::_exit(0);
                }
                Ok(())
            });
        }
        let watchdog = command.spawn()?;
        let pgid = libc::pid_t::try_from(watchdog.id())
            .map_err(|_| io::Error::other("watchdog pid out of range"))?;
        Ok(Group {
            pgid,
            alarm: Some(write),
            command: None,
            terminal,
        })
    }

    /// Starts COMMAND in the group (and, on a terminal, in the foreground).
    pub fn spawn(&mut self, mut command: std::process::Command) -> io::Result<()> {
        let (pgid, terminal) = (self.pgid, self.terminal);
        // SAFETY: only async-signal-safe calls (setpgid, sigprocmask, tcsetpgrp).
        unsafe {
            command.pre_exec(move || {
                if libc::setpgid(0, pgid) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // Done in the child as well as in dlock, as shells do, so COMMAND never
                // reads the terminal before it is in the foreground.
                if terminal {
                    hand_terminal(pgid);
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        self.command = libc::pid_t::try_from(child.id()).ok();
        if terminal {
            hand_terminal(pgid);
        }
        Ok(())
    }

    /// Reaps every child that ended (COMMAND, orphans handed to dlock, the watchdog);
    /// COMMAND's status, once, when it was among them.
    pub fn reap(&mut self) -> Option<ExitStatus> {
        let mut exited = None;
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return exited;
            }
            if Some(pid) == self.command {
                self.command = None;
                exited = Some(ExitStatus::from_raw(status));
            }
        }
    }

    /// When COMMAND was stopped from the terminal (Ctrl-Z), stops dlock as well so the shell
    /// regains control, and on `fg` hands the terminal back and continues the group.
    pub fn follow_stop(&mut self) {
        let Some(command) = self.command.filter(|_| self.terminal) else {
            return;
        };
        // SAFETY: waitid with a zeroed siginfo; WSTOPPED alone never reaps.
        let stopped = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                command as libc::id_t,
                &mut info,
                libc::WSTOPPED | libc::WNOHANG,
            ) == 0
                && info.si_pid() == command
        };
        if !stopped {
            return;
        }
        // SAFETY: getpgrp/raise/tcgetpgrp have no memory preconditions.
        unsafe {
            hand_terminal(libc::getpgrp());
            // Stops dlock until the shell continues it (or does nothing where SIGTSTP is
            // ignored, and COMMAND is continued at once).
            libc::raise(libc::SIGTSTP);
            if libc::tcgetpgrp(0) == libc::getpgrp() {
                hand_terminal(self.pgid);
            }
        }
        self.kill_group(libc::SIGCONT);
    }

    /// Passes a signal dlock received on to COMMAND's group. A signal from the terminal
    /// never gets here while the group is in the foreground, so COMMAND gets each once.
    pub fn forward(&self, signal: libc::c_int) {
        self.kill_group(signal);
    }

    fn kill_group(&self, signal: libc::c_int) {
        // SAFETY: kill(2) of COMMAND's group; its id cannot be reused while the watchdog,
        // its leader, lives.
        unsafe { libc::kill(-self.pgid, signal) };
    }

    /// The live processes of COMMAND's tree: the group's members and every descendant of
    /// dlock, bar the watchdog.
    fn members(&self) -> Vec<libc::pid_t> {
        let me = std::process::id() as libc::pid_t;
        // Mostly nothing is left when COMMAND ends. The kernel's children lists say so
        // from dlock's own few entries; the scan below reads every process's stat, which
        // on a busy host was most of `dlock run`'s cost.
        if descendants(me).is_some_and(|d| d.iter().all(|&pid| pid == self.pgid)) {
            return Vec::new();
        }
        let procs = processes();
        let mut tree = vec![me];
        let mut i = 0;
        while i < tree.len() {
            let parent = tree[i];
            tree.extend(procs.iter().filter(|p| p.ppid == parent).map(|p| p.pid));
            i += 1;
        }
        procs
            .iter()
            .filter(|p| p.alive && p.pid != me && p.pid != self.pgid)
            .filter(|p| p.pgrp == self.pgid || tree.contains(&p.pid))
            .map(|p| p.pid)
            .collect()
    }

    /// Stops COMMAND's whole tree: SIGTERM (and SIGCONT, for stopped processes), then
    /// SIGKILL for what is left after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        self.reap();
        let members = self.members();
        if members.is_empty() {
            return;
        }
        self.kill_group(libc::SIGTERM);
        for &pid in &members {
            // SAFETY: kill(2) of a descendant or group member found just now.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        self.kill_group(libc::SIGCONT);
        let until = Instant::now() + grace;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.reap();
            if self.members().is_empty() {
                return;
            }
        }
        // SIGKILL goes pid by pid so that the watchdog lives on to the end.
        for _ in 0..500 {
            self.reap();
            let members = self.members();
            if members.is_empty() {
                return;
            }
            for pid in members {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Takes the terminal back and lets the watchdog go (it kills its now empty group,
    /// that is itself).
    pub fn close(&mut self) {
        if self.terminal {
            // SAFETY: getpgrp has no preconditions.
            hand_terminal(unsafe { libc::getpgrp() });
        }
        self.alarm = None;
    }
}

struct Proc {
    pid: libc::pid_t,
    ppid: libc::pid_t,
    pgrp: libc::pid_t,
    alive: bool,
}

/// The descendants of `root` (zombies included), from the kernel's per-thread children
/// lists: since dlock is a child subreaper, every orphan of COMMAND's tree is reparented
/// to it and so stays in these lists. `None` if the kernel has no such lists
/// (CONFIG_PROC_CHILDREN), or `root`'s cannot be read.
fn descendants(root: libc::pid_t) -> Option<Vec<libc::pid_t>> {
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
            Ok(tasks) => tasks,
            Err(_) if pid != root => continue, // gone meanwhile
            Err(_) => return None,
        };
        for task in tasks.flatten() {
            let children = match std::fs::read_to_string(task.path().join("children")) {
                Ok(children) => children,
                Err(_) if pid != root => continue,
                Err(_) => return None,
            };
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(child);
                queue.push(child);
            }
        }
    }
    Some(found)
}

/// Every process in `/proc` with its parent and group.
fn processes() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(ppid), Some(pgrp)) = (
            fields.first(),
            fields.get(1).and_then(|f| f.parse().ok()),
            fields.get(2).and_then(|f| f.parse().ok()),
        ) else {
            continue;
        };
        out.push(Proc {
            pid,
            ppid,
            pgrp,
            alive: !matches!(*state, "Z" | "X" | "x"),
        });
    }
    out
}
