//! Private etcd clusters for tests (one member, or three): started from the installed
//! `etcd` binary (Debian `etcd-server`) on loopback ports below 32768, each member with a
//! data directory in one temporary directory, killed and removed when dropped (and,
//! through [`spawn_tied`], when the test process dies).

use crate::process::{logged, require_binary, spawn_tied, temp_dir, wait_for_port};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One member's ports and process.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: super::Running,
}

/// A private etcd cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    binary: PathBuf,
    token: String,
    tls: bool,
    dir: tempfile::TempDir,
}

/// A loopback port below 32768 that nothing listens on now. The kernel hands out its
/// ephemeral ports above 32768, so ports taken here do not race with outgoing
/// connections; a port another program binds between this check and etcd's start makes
/// the launch fail loudly.
fn low_port() -> u16 {
    for _ in 0..1000 {
        let port = 20000 + (rand::random::<u16>() % 12000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between 20000 and 32000");
}

/// Clusters shared by the tests of one process, stopped and removed when it exits
/// (statics are never dropped).
static SHARED: Mutex<Vec<&'static EtcdCluster>> = Mutex::new(Vec::new());

extern "C" fn stop_shared() {
    let shared = std::mem::take(&mut *SHARED.lock().unwrap_or_else(|e| e.into_inner()));
    for cluster in shared {
        for i in 0..cluster.members.len() {
            cluster.resume(i);
            cluster.kill(i);
        }
        let _ = std::fs::remove_dir_all(cluster.dir.path());
    }
}

impl EtcdCluster {
    /// A cluster of `count` members shared by every test of this process that asks for
    /// the same size; its processes and files go when the process exits.
    pub fn shared(count: usize) -> &'static EtcdCluster {
        static START: Mutex<()> = Mutex::new(());
        let _one_at_a_time = START.lock().unwrap_or_else(|e| e.into_inner());
        let shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = shared.iter().find(|c| c.members.len() == count) {
            return found;
        }
        if shared.is_empty() {
            // SAFETY: registers a plain function without arguments.
            unsafe { libc::atexit(stop_shared) };
        }
        drop(shared);
        let cluster: &'static EtcdCluster = Box::leak(Box::new(EtcdCluster::start_members(count)));
        SHARED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cluster);
        cluster
    }

    /// A single-member cluster.
    pub fn start() -> EtcdCluster {
        EtcdCluster::start_members(1)
    }

    /// A cluster of `count` members, started together; returns once it has a leader.
    pub fn start_members(count: usize) -> EtcdCluster {
        EtcdCluster::launch(count, false)
    }

    /// A single member serving clients over TLS only, with a certificate for 127.0.0.1
    /// signed by a CA made for it (see [`ca_file`](Self::ca_file)).
    pub fn start_tls() -> EtcdCluster {
        EtcdCluster::launch(1, true)
    }

    fn launch(count: usize, tls: bool) -> EtcdCluster {
        let binary = require_binary("etcd", "etcd-server", &[]);
        let dir = temp_dir("dlock-etcd-");
        let mut ports = Vec::new();
        while ports.len() < count * 2 {
            let port = low_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let members = (0..count)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                child: super::Running::default(),
            })
            .collect();
        let cluster = EtcdCluster {
            members,
            binary,
            token: format!("dlock-test-{:016x}", rand::random::<u64>()),
            tls,
            dir,
        };
        if tls {
            super::make_certificates(cluster.dir.path());
        }
        for i in 0..count {
            cluster.spawn_member(i);
        }
        for i in 0..count {
            cluster.wait_member(i);
        }
        cluster.wait_healthy();
        cluster
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn member_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn spawn_member(&self, i: usize) {
        let member = &self.members[i];
        let log = format!("{}.log", member.name);
        // A log file per start, so a restart does not truncate what the crash left.
        let log_path = self.dir.path().join(&log);
        if std::fs::metadata(&log_path).is_ok_and(|meta| meta.len() > 0) {
            let _ = std::fs::rename(&log_path, self.dir.path().join(format!("{log}.old")));
        }
        let mut command = logged(&self.binary, self.dir.path(), &log);
        let scheme = if self.tls { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.member_dir(i))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster()])
            .args(["--initial-cluster-token", &self.token])
            // A restarted member finds its data directory and ignores this.
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            // The defaults (100 ms heartbeat, 1 s election timeout): etcd's shortest lease
            // is then 2 s, which is what the backend's documentation describes.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"]);
        if self.tls {
            command
                .arg("--cert-file")
                .arg(self.dir.path().join("server.pem"))
                .arg("--key-file")
                .arg(self.dir.path().join("server.key"));
        }
        let child = spawn_tied(command).expect("cannot start etcd");
        member.child.set(child);
    }

    fn wait_member(&self, i: usize) {
        let member = &self.members[i];
        if !wait_for_port(member.client_port, Duration::from_secs(20)) {
            panic!(
                "etcd member {} did not listen on port {} within 20 s; log:\n{}",
                member.name,
                member.client_port,
                self.log(i)
            );
        }
    }

    /// The log of member `i` (its current start).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default()
    }

    /// Waits until a quorum answers a linearizable read.
    pub fn wait_healthy(&self) {
        let started = Instant::now();
        loop {
            let output = self
                .etcdctl(&["get", "--consistency=l", "dlock-launcher-probe"])
                .output()
                .expect("cannot run etcdctl");
            if output.status.success() {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "etcd cluster did not become healthy within 30 s: {}\nlog of m0:\n{}",
                String::from_utf8_lossy(&output.stderr),
                self.log(0)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `etcdctl` (Debian `etcd-client`) against the running members.
    pub fn etcdctl(&self, args: &[&str]) -> Command {
        let binary = require_binary("etcdctl", "etcd-client", &[]);
        let mut command = Command::new(binary);
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .arg("--command-timeout=5s")
            .arg("--dial-timeout=2s");
        if self.tls {
            command.arg(format!("--cacert={}", self.ca_file().display()));
        }
        command.args(args);
        command
    }

    /// Runs `etcdctl ARGS`, returning its stdout; fails the test if it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let output = self.etcdctl(args).output().expect("cannot run etcdctl");
        assert!(
            output.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `host:port` of every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// `etcd://h1:p1,h2:p2,…` for every member (with `?ca_file=` for TLS).
    pub fn url(&self) -> String {
        let url = format!("etcd://{}", self.endpoints().join(","));
        if self.tls {
            format!("{url}?ca_file={}", self.ca_file().display())
        } else {
            url
        }
    }

    /// The PEM file of the CA that signed a TLS member's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// How many members the cluster has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The index of the member that is the raft leader now, if one answers as leader.
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&i| {
            if self.pid(i).is_none() {
                return false;
            }
            let binary = require_binary("etcdctl", "etcd-client", &[]);
            let output = Command::new(binary)
                .env("ETCDCTL_API", "3")
                .arg(format!(
                    "--endpoints=127.0.0.1:{}",
                    self.members[i].client_port
                ))
                .args(["--command-timeout=3s", "endpoint", "status", "-w", "simple"])
                .output();
            // ENDPOINT, ID, VERSION, DB SIZE, IS LEADER, …
            output.is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split(',')
                    .nth(4)
                    .is_some_and(|field| field.trim() == "true")
            })
        })
    }

    /// Waits until some member is the leader, and returns it.
    pub fn wait_leader(&self) -> usize {
        let started = Instant::now();
        loop {
            if let Some(leader) = self.leader() {
                return leader;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no etcd leader within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process id of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.pid()
    }

    /// Kills member `i` with SIGKILL (a crash); its data directory stays.
    pub fn kill(&self, i: usize) {
        self.members[i].child.kill();
    }

    /// Starts member `i` again from its data directory after [`kill`](Self::kill).
    pub fn start_again(&self, i: usize) {
        if self.pid(i).is_none() {
            self.spawn_member(i);
            self.wait_member(i);
        }
    }

    /// Freezes member `i` with SIGSTOP.
    pub fn pause(&self, i: usize) {
        self.members[i].child.pause();
    }

    /// Thaws member `i` after [`pause`](Self::pause).
    pub fn resume(&self, i: usize) {
        self.members[i].child.resume();
    }

    /// Turns on authentication with user `root` and `password` (etcd's root user has
    /// every permission); clients must then give `root:password@` in the URL.
    pub fn enable_auth(&self, password: &str) {
        self.ctl(&[
            "user",
            "add",
            "root",
            &format!("--new-user-password={password}"),
        ]);
        self.ctl(&["auth", "enable"]);
    }

    /// The temporary directory holding every member's data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.resume(i);
            self.kill(i);
        }
    }
}
