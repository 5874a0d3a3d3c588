//! COMMAND's process tree: one process group that dlock signals as a whole, a watchdog
//! that kills that group if dlock dies, and the terminal handed to the group as shells do.
//!
//! - COMMAND runs in a process group of its own whose leader is the watchdog, a forked
//!   copy of dlock that runs nothing but system calls. Signals on lease loss, forwarded signals and the
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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

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

/// The watchdog's whole life, in the child of a `fork` that is never followed by an
/// exec: leader of a new group, it waits for end of file on `alarm` (whose write end
/// only dlock holds), then SIGKILLs its group.
///
/// A forked copy of dlock instead of a new program saves loading and starting dlock's
/// binary a second time, which was most of what `dlock run` cost beyond flock(1). The
/// price is discipline: the child of a multi-threaded process may make only
/// async-signal-safe calls (no allocation, no lock, no Rust runtime), so everything here
/// is a bare system call, and the child ends with `_exit` without ever returning.
///
/// # Safety
///
/// Only to be called in the child, straight after `fork`; `alarm` and `null` are open
/// descriptors (the pipe's read end, `/dev/null`).
unsafe fn watchdog_after_fork(
    alarm: libc::c_int,
    null: libc::c_int,
    parent: libc::pid_t,
    title: ProcessTitle,
) -> ! {
    // SAFETY: bare system calls only (see above); each result that matters is checked.
    unsafe {
        title.rename();
        if libc::setpgid(0, 0) != 0 {
            libc::_exit(1);
        }
        // dlock's handlers (its runtime's signal pipe) are no business of the watchdog's:
        // defaults, then the ignored ones, and nothing blocked.
        for signal in 1..libc::SIGRTMIN() {
            libc::signal(signal, libc::SIG_DFL);
        }
        for signal in WATCHDOG_IGNORES {
            libc::signal(signal, libc::SIG_IGN);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // dlock died before the watchdog was in place: nobody will close the pipe.
        if libc::getppid() != parent {
            libc::_exit(0);
        }
        // Nothing of dlock's stays open here: a copy of a lock file's descriptor or of a
        // connection would keep dlock's lock or session alive after dlock lets go of it.
        if libc::dup2(alarm, 0) < 0 || libc::dup2(null, 1) < 0 || libc::dup2(null, 2) < 0 {
            libc::_exit(1);
        }
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            // Kernels before 5.9: one close per possible descriptor.
            let mut limit: libc::rlimit = std::mem::zeroed();
            let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur.min(1 << 20) as libc::c_int
            } else {
                1024
            };
            for fd in 3..top {
                libc::close(fd);
            }
        }
        libc::prctl(libc::PR_SET_NAME, c"dlock-watchdog".as_ptr(), 0, 0, 0);
        let mut buf = [0u8; 64];
        loop {
            let n = libc::read(0, buf.as_mut_ptr().cast(), buf.len());
            if n > 0 || (n < 0 && *libc::__errno_location() == libc::EINTR) {
                continue;
            }
            break;
        }
        // Our own process group, which holds only COMMAND's tree.
        libc::kill(0, libc::SIGKILL);
        libc::_exit(0)
    }
}

extern "C" {
    /// glibc's pointer to `argv[0]`, the start of the block of argument strings that
    /// `/proc/PID/cmdline` shows.
    static mut program_invocation_name: *mut libc::c_char;
}

/// Where this process's argument strings are, so that the forked watchdog can show as
/// `dlock-watchdog` in `ps` and `pgrep -f` instead of as a second `dlock run KEY --
/// COMMAND`.
#[derive(Clone, Copy)]
struct ProcessTitle {
    start: *mut u8,
    len: usize,
}

impl ProcessTitle {
    /// Read before the fork (it allocates).
    fn of_this_process() -> ProcessTitle {
        // The strings lie one after the other, each with its NUL, from argv[0] on.
        let len = std::env::args_os().map(|arg| arg.len() + 1).sum();
        // SAFETY: reading a pointer glibc sets once at startup.
        let start = unsafe { program_invocation_name }.cast::<u8>();
        ProcessTitle { start, len }
    }

    /// Overwrites the arguments with the watchdog's name, NUL-padded: memory writes only,
    /// safe after fork.
    ///
    /// # Safety
    ///
    /// In the forked child only, whose copy of the strings nothing else reads.
    unsafe fn rename(self) {
        const NAME: &[u8] = b"dlock-watchdog";
        if self.start.is_null() || self.len <= NAME.len() {
            return;
        }
        // SAFETY: `len` bytes from argv[0] are the argument strings, writable.
        unsafe {
            std::ptr::write_bytes(self.start, 0, self.len);
            std::ptr::copy_nonoverlapping(NAME.as_ptr(), self.start, NAME.len());
        }
    }
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
        // Opened before the fork: the child may not allocate the path's C string.
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        let title = ProcessTitle::of_this_process();
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the child runs only watchdog_after_fork (bare system calls, then
        // _exit), as a child of a multi-threaded process must.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the child, straight after fork, with open descriptors.
            unsafe { watchdog_after_fork(read.as_raw_fd(), null.as_raw_fd(), parent, title) }
        }
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        // As the shells do, in the parent too: the group exists before COMMAND joins it,
        // whichever of the two runs first (EACCES/ESRCH once the child has moved on).
        // SAFETY: setpgid of our own child.
        unsafe { libc::setpgid(pid, pid) };
        drop((read, null));
        Ok(Group {
            pgid: pid,
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
