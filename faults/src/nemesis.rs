//! The nemeses: what the harness does to clients and servers, and low-level helpers to do it.

use std::path::Path;
use std::time::Duration;

/// Declares the nemeses: one entry each, in report order. Adding a nemesis is an entry
/// here, its arms in `Backend::applicable` and `Backend::overlap_possible` (cluster.rs),
/// and its injection in `Runner::inject` (run.rs). `mixed`: whether the mixed nemesis
/// picks it; `proxies`: whether each client reaches the servers through proxies of its own
/// under it.
macro_rules! nemeses {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident = $name:literal, mixed: $mixed:literal, proxies: $proxies:literal;
    )*) => {
        /// A kind of fault, or a mix of all that apply.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Nemesis {
            $($(#[doc = $doc])* $variant,)*
        }

        /// Every nemesis, in report order.
        pub const ALL: &[Nemesis] = &[$(Nemesis::$variant),*];

        impl Nemesis {
            /// Its name on the command line and in reports.
            pub fn name(self) -> &'static str {
                match self {
                    $(Nemesis::$variant => $name,)*
                }
            }

            /// Whether [`Nemesis::Mixed`] picks this one among its faults.
            pub fn in_mix(self) -> bool {
                match self {
                    $(Nemesis::$variant => $mixed,)*
                }
            }

            /// Whether clients reach the servers through proxies of their own (which the
            /// network nemeses slow down, freeze or cut).
            pub fn uses_proxies(self) -> bool {
                match self {
                    $(Nemesis::$variant => $proxies,)*
                }
            }
        }
    };
}

nemeses! {
    /// No faults: the baseline.
    None = "none", mixed: false, proxies: false;
    /// SIGKILL a client process (a replacement starts at once).
    KillClient = "kill-client", mixed: true, proxies: false;
    /// SIGSTOP a client for longer than the TTL, then SIGCONT.
    PauseClient = "pause-client", mixed: true, proxies: false;
    /// SIGKILL a backend server, then restart it on the same port and data.
    KillServer = "kill-server", mixed: true, proxies: false;
    /// SIGSTOP a backend server for longer than the TTL, then SIGCONT.
    PauseServer = "pause-server", mixed: true, proxies: false;
    /// Jump a client's clock (libfaketime, wall and monotonic) by more than the TTL, one way
    /// and back again.
    Clock = "clock", mixed: true, proxies: false;
    /// Cut one client off from the server(s) for longer than the TTL, then heal: every
    /// client reaches the servers through proxies of its own, which stop moving bytes.
    Partition = "partition", mixed: true, proxies: true;
    /// Slow one client's network: its proxies delay every chunk each way by 20–100 ms
    /// (jitter, in order) for longer than the TTL, then forward at once again.
    Slow = "slow", mixed: true, proxies: true;
    /// Freeze one client's open connections (no byte moves, nothing is closed) for 1–3×TTL,
    /// then thaw them; connections it opens meanwhile pass.
    Freeze = "freeze", mixed: true, proxies: true;
    /// A network going bad the way networks do, on one client: slow, then frozen, then cut
    /// off, then healed.
    Degrade = "degrade", mixed: false, proxies: true;
    /// Break the lock with the backend's force-release (an operator's `dlock release KEY
    /// --force`), in bursts, whoever holds it.
    ForceRelease = "force-release", mixed: false, proxies: false;
    /// Beside the workers, `dlock run` of a key of its own over a process tree (a shell,
    /// its background child writing a heartbeat line with `$DLOCK_FENCE` every 20 ms, and a
    /// foreground sleep), broken in turn by a force-release of that key and by a SIGKILL of
    /// dlock: once the loss is known plus `--kill-after`, no process of the tree may run
    /// and the heartbeat may not grow.
    ProcessTree = "process-tree", mixed: false, proxies: false;
    /// Plant, in the file backend's lock directory, what a hostile member of a shared
    /// directory's group could: links to a file outside it, dangling links, FIFOs, hard
    /// links, for other keys and in place of the workers' key's fence file. Nothing
    /// outside the directory may be written or created, and a planted entry never works
    /// as a lock.
    HostileDir = "hostile-dir", mixed: false, proxies: false;
    /// Each fault picked at random among those that apply.
    Mixed = "mixed", mixed: false, proxies: true;
}

impl Nemesis {
    /// Parses a name.
    pub fn parse(name: &str) -> Option<Nemesis> {
        ALL.iter().copied().find(|n| n.name() == name)
    }
}

/// The libfaketime preload library, if installed (Debian package `faketime`).
pub fn libfaketime() -> Option<std::path::PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file())
}

/// Sets a client's clock offset (read by libfaketime at every clock call).
pub fn set_clock_offset(file: &Path, offset_secs: f64) -> std::io::Result<()> {
    let text = if offset_secs >= 0.0 {
        format!("+{offset_secs:.3}\n")
    } else {
        format!("{offset_secs:.3}\n")
    };
    // Write a new file and rename it over the old one, so a reader never sees half a line.
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, file)
}

/// Files outside the lock directory that the hostile-directory nemesis points its plants
/// at, and checks afterwards: the canary must keep its contents and its single extra link,
/// and the absent file must never appear.
pub struct Hostile {
    canary: std::path::PathBuf,
    absent: std::path::PathBuf,
}

const CANARY: &[u8] = b"written by the hostile-dir nemesis; dlock must never change this\n";

/// What to plant.
#[derive(Debug, Clone, Copy)]
pub enum Plant {
    /// A symbolic link to the canary.
    Link,
    /// A symbolic link to a file that does not exist.
    Dangling,
    /// A FIFO.
    Fifo,
    /// A hard link to the canary.
    HardLink,
}

impl Hostile {
    /// Creates the canary in `outside` (a directory other than the lock directory).
    pub fn new(outside: &Path) -> std::io::Result<Hostile> {
        let canary = outside.join("hostile-canary");
        std::fs::write(&canary, CANARY)?;
        Ok(Hostile {
            canary,
            absent: outside.join("hostile-absent"),
        })
    }

    /// Plants `what` at `at`, replacing whatever is there (atomically, by a rename, as an
    /// attacker racing dlock would).
    pub fn plant(&self, what: Plant, at: &Path) -> std::io::Result<()> {
        let tmp = at.with_extension(format!("plant{:08x}", rand::random::<u32>()));
        match what {
            Plant::Link => std::os::unix::fs::symlink(&self.canary, &tmp)?,
            Plant::Dangling => std::os::unix::fs::symlink(&self.absent, &tmp)?,
            Plant::HardLink => std::fs::hard_link(&self.canary, &tmp)?,
            Plant::Fifo => {
                let c = std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes())
                    .map_err(std::io::Error::other)?;
                // SAFETY: mkfifo on a NUL-terminated path.
                if unsafe { libc::mkfifo(c.as_ptr(), 0o666) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        std::fs::rename(&tmp, at).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Whether everything outside the lock directory is as the nemesis left it.
    pub fn intact(&self) -> bool {
        std::fs::read(&self.canary).is_ok_and(|c| c == CANARY)
            && std::fs::symlink_metadata(&self.absent).is_err()
    }
}

/// Sends `signal` to `pid`; false if the process does not exist.
pub fn signal(pid: u32, signal: libc::c_int) -> bool {
    // SAFETY: kill(2) on a pid this harness started.
    unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
}

/// The pid of the process listening on TCP 127.0.0.1:`port` (found through `/proc`), for
/// servers started by launchers that do not expose their pid.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue; // not LISTEN
            }
            let local_port = cols[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", cols[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| Path::new(i) == target) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// How long a pause lasts: well past the TTL, so a TTL lease surely expires meanwhile.
pub fn pause_length(ttl: Duration) -> Duration {
    ttl * 3 + Duration::from_millis(200)
}

/// The latency the slow nemesis adds to each chunk, each way: (shortest, longest).
pub fn latency() -> (Duration, Duration) {
    (Duration::from_millis(20), Duration::from_millis(100))
}

/// How long a freeze lasts: between 1 and 3 TTLs, so that some freezes end before the
/// lease may expire and others after.
pub fn freeze_length(ttl: Duration) -> Duration {
    ttl.mul_f64(rand::Rng::random_range(&mut rand::rng(), 1.0..3.0))
}

/// How far a clock jump goes: past the TTL.
pub fn clock_jump(ttl: Duration) -> Duration {
    ttl * 3
}

/// `pid` and all its descendants (read from `/proc`), for pausing a server that forks a
/// process per connection (PostgreSQL).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((child, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    tree
}

/// Waits until nothing listens on 127.0.0.1:`port` any more (a killed server is gone).
pub fn wait_port_closed(port: u16, timeout: Duration) -> bool {
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        if pid_listening_on(port).is_none() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
