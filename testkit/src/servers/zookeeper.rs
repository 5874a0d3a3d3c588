//! Private ZooKeeper servers for tests: one standalone server or a 3-server ensemble,
//! started from Debian's `zookeeper` package with `java` (not as the system service),
//! each on loopback ports with its data in a temporary directory, killed when dropped
//! (and, through [`spawn_tied`], when the test process dies). Servers kept in a `static`
//! are never dropped: they are killed and their directories removed when the test
//! process exits.
//!
//! `tickTime` is 200 ms so that sessions may be short: the servers grant session
//! timeouts from 400 ms (2 ticks) to 30 s.

use crate::process::{free_port, logged, require_binary, spawn_tied, temp_dir, wait_for_port};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Every running member (pid) and every data directory, for the cleanup at exit.
static RUNNING: Mutex<(Vec<u32>, Vec<PathBuf>)> = Mutex::new((Vec::new(), Vec::new()));

extern "C" fn clean_up_at_exit() {
    let Ok(mut running) = RUNNING.lock() else {
        return;
    };
    for pid in running.0.drain(..) {
        // SAFETY: kill(2) and waitpid(2) on children this process started.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
        }
    }
    for dir in running.1.drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn register_cleanup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain function that only touches a static.
    ONCE.call_once(|| unsafe {
        libc::atexit(clean_up_at_exit);
    });
}

const JARS: &str = "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar";

/// The tick of the test servers.
pub const TICK: Duration = Duration::from_millis(200);

/// The longest session timeout the test servers grant.
pub const MAX_SESSION: Duration = Duration::from_secs(30);

struct Member {
    id: usize,
    client_port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

/// One ZooKeeper server or an ensemble of them.
pub struct ZooKeeper {
    java: PathBuf,
    ensemble: bool,
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

fn check_installed() -> PathBuf {
    let java = require_binary("java", "default-jre-headless", &[]);
    if !Path::new("/usr/share/java/zookeeper.jar").is_file() {
        panic!("ZooKeeper is not installed: install the Debian package `zookeeper` (apt-get install zookeeper)");
    }
    java
}

impl ZooKeeper {
    /// A standalone server.
    pub fn start() -> ZooKeeper {
        ZooKeeper::start_members(1)
    }

    /// A 3-server ensemble.
    pub fn start_ensemble() -> ZooKeeper {
        ZooKeeper::start_members(3)
    }

    fn start_members(count: usize) -> ZooKeeper {
        let java = check_installed();
        register_cleanup();
        let dir = temp_dir("dlock-zk-");
        RUNNING.lock().unwrap().1.push(dir.path().to_owned());
        let ensemble = count > 1;
        let ports: Vec<(u16, u16, u16)> = (0..count)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut members = Vec::new();
        for (i, (client, peer, election)) in ports.iter().enumerate() {
            let id = i + 1;
            let member_dir = dir.path().join(format!("zk{id}"));
            std::fs::create_dir_all(member_dir.join("data")).unwrap();
            let mut cfg = format!(
                "tickTime={}\ninitLimit=20\nsyncLimit=10\ndataDir={}\nclientPort={client}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\nmaxClientCnxns=0\nmaxSessionTimeout={}\n4lw.commands.whitelist=srvr,ruok\n\
                 znode.container.checkIntervalMs=1000\n",
                TICK.as_millis(),
                member_dir.join("data").display(),
                MAX_SESSION.as_millis(),
            );
            if ensemble {
                let _ = (peer, election);
                for (j, (_, p, e)) in ports.iter().enumerate() {
                    cfg.push_str(&format!("server.{}=127.0.0.1:{p}:{e}\n", j + 1));
                }
                std::fs::write(member_dir.join("data/myid"), format!("{id}\n")).unwrap();
            }
            std::fs::write(member_dir.join("zoo.cfg"), cfg).unwrap();
            members.push(Member {
                id,
                client_port: *client,
                dir: member_dir,
                child: Mutex::new(None),
            });
        }
        let zk = ZooKeeper {
            java,
            ensemble,
            members,
            _dir: dir,
        };
        for i in 0..count {
            zk.launch(i);
        }
        zk.wait_serving(Duration::from_secs(60));
        zk
    }

    fn command(&self, member: &Member) -> Command {
        let mut command = logged(&self.java, &member.dir, "zookeeper.log");
        let main = if self.ensemble {
            "org.apache.zookeeper.server.quorum.QuorumPeerMain"
        } else {
            "org.apache.zookeeper.server.ZooKeeperServerMain"
        };
        command
            .current_dir(&member.dir)
            // No /tmp/hsperfdata_USER/PID file: the JVM writes it whatever TMPDIR says,
            // and a killed server (the fault tests kill them) leaves it behind.
            .args([
                "-Xmx128m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-XX:-UsePerfData",
            ])
            .args(["-Dzookeeper.jmx.log4j.disable=true", "-cp", JARS, main])
            .arg(member.dir.join("zoo.cfg"));
        command
    }

    fn launch(&self, i: usize) {
        let member = &self.members[i];
        let mut slot = member.child.lock().unwrap();
        if slot.is_none() {
            *slot =
                Some(spawn_tied(self.command(member)).expect("cannot start java for ZooKeeper"));
        }
    }

    /// Waits until every running member answers and (for an ensemble) one leads.
    fn wait_serving(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let running: Vec<&Member> = self
                .members
                .iter()
                .filter(|m| m.child.lock().unwrap().is_some())
                .collect();
            let modes: Vec<Option<String>> = running.iter().map(|m| mode(m.client_port)).collect();
            if modes.iter().all(Option::is_some) {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = running
                    .iter()
                    .map(|m| {
                        let log = std::fs::read_to_string(m.dir.join("zookeeper.log"))
                            .unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(30).collect();
                        format!(
                            "--- zk{} ---\n{}",
                            m.id,
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                panic!(
                    "ZooKeeper did not serve within {limit:?}; logs:\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `host:port,…` of every member.
    pub fn hosts(&self) -> String {
        let list: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        list.join(",")
    }

    /// `zk://host:port,…`.
    pub fn url(&self) -> String {
        format!("zk://{}", self.hosts())
    }

    /// How many members the ensemble has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: there is at least one member.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The index of the member that leads (the only one, standalone), if one does.
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            matches!(
                mode(m.client_port).as_deref(),
                Some("leader" | "standalone")
            )
        })
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&self, i: usize) {
        self.resume(i);
        if let Some(mut child) = self.members[i].child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
            RUNNING.lock().unwrap().0.retain(|pid| *pid != child.id());
        }
    }

    /// The pid of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i]
            .child
            .lock()
            .unwrap()
            .as_ref()
            .map(Child::id)
    }

    /// Freezes member `i` with SIGSTOP: its connections stay open, nothing answers.
    pub fn pause(&self, i: usize) {
        if let Some(pid) = self.pid(i) {
            crate::process::signal(pid, libc::SIGSTOP);
        }
    }

    /// Thaws member `i` after [`pause`](Self::pause).
    pub fn resume(&self, i: usize) {
        if let Some(pid) = self.pid(i) {
            crate::process::signal(pid, libc::SIGCONT);
        }
    }

    /// Starts member `i` again (its data kept) and waits until it serves.
    pub fn start_again(&self, i: usize) {
        self.launch(i);
        if !wait_for_port(self.members[i].client_port, Duration::from_secs(30)) {
            panic!("ZooKeeper member {} did not listen again", i + 1);
        }
        self.wait_serving(Duration::from_secs(60));
    }

    /// Kills every member, then starts them all again and waits until they serve.
    pub fn restart_all(&self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        for i in 0..self.members.len() {
            self.launch(i);
        }
        self.wait_serving(Duration::from_secs(60));
    }
}

/// The `Mode:` line of the `srvr` command, when the server serves clients.
fn mode(port: u16) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"srvr").ok()?;
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .find_map(|line| line.strip_prefix("Mode: "))
        .map(|mode| mode.trim().to_owned())
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let dir = self._dir.path().to_owned();
        RUNNING.lock().unwrap().1.retain(|d| *d != dir);
    }
}
