//! The process-tree nemesis's subject: `dlock run` of a key of its own, over a tree of
//! processes, restarted each time it ends. Its members are found by an environment variable
//! that every descendant inherits (even one that leaves the process group), and each
//! incarnation's background child appends its lease's fence to a heartbeat file of its own.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `--kill-after` of the `dlock run` under test: SIGTERM, then SIGKILL this much later.
pub const KILL_AFTER: Duration = Duration::from_millis(200);

/// What the harness allows on top of the promised delay before a tree must be gone: a
/// loaded machine may be slow to schedule dlock's renewal, its signals and the exits.
pub const MARGIN: Duration = Duration::from_secs(1);

/// The variable that marks a tree's processes: `<run tag>-<incarnation>`.
const MARK: &str = "DLOCK_FAULTS_TREE";

/// COMMAND: a shell whose background child (a grandchild of dlock, with a `sleep` child of
/// its own each round) writes the lease's fence every 20 ms, and whose foreground step is a
/// sleep, as a script's long step would be.
const SCRIPT: &str = r#"sh -c 'while :; do echo "$DLOCK_FENCE" >> "$DLOCK_FAULTS_HEARTBEAT"; sleep 0.02; done' & sleep 30"#;

/// `dlock run` over a process tree, one incarnation at a time.
pub struct Tree {
    bin: PathBuf,
    url: String,
    key: String,
    dir: PathBuf,
    ttl: Duration,
    tag: String,
    incarnation: u32,
    dlock: Option<Child>,
    kill_next: bool,
    /// Trees found running, or heartbeats found growing, after their lease was lost and
    /// the promised delay passed.
    pub breaches: Vec<String>,
}

impl Tree {
    /// A tree of `dlock` (the binary `bin`) on `url`, logging into `dir`. Starts nothing.
    pub fn new(bin: PathBuf, url: &str, dir: PathBuf, ttl: Duration) -> Tree {
        let tag = format!("{:08x}", rand::random::<u32>());
        Tree {
            bin,
            url: url.to_owned(),
            key: format!("faults-tree-{tag}"),
            dir,
            ttl,
            tag,
            incarnation: 0,
            dlock: None,
            kill_next: false,
            breaches: Vec::new(),
        }
    }

    /// The tree's own key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease's TTL of `dlock run`.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn mark(&self, incarnation: u32) -> String {
        format!("{}-{incarnation}", self.tag)
    }

    fn heartbeat(&self, incarnation: u32) -> PathBuf {
        self.dir.join(format!("tree-{incarnation}.heartbeat"))
    }

    /// Reaps a `dlock run` that ended and, with `respawn`, starts the next incarnation.
    pub fn tick(&mut self, respawn: bool) -> std::io::Result<()> {
        if let Some(child) = &mut self.dlock {
            if child.try_wait()?.is_some() {
                self.dlock = None;
            }
        }
        if self.dlock.is_none() && respawn {
            self.spawn()?;
        }
        Ok(())
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        self.incarnation += 1;
        let i = self.incarnation;
        let log = std::fs::File::create(self.dir.join(format!("tree-{i}.log")))?;
        let mut command = Command::new(&self.bin);
        command
            .args(["run", &self.key, "--ttl"])
            .arg(format!("{}ms", self.ttl.as_millis()))
            .arg("--kill-after")
            .arg(format!("{}ms", KILL_AFTER.as_millis()))
            .args(["--backend", &self.url, "--", "sh", "-c", SCRIPT])
            .env_remove("DLOCK_BACKEND")
            .env(MARK, self.mark(i))
            .env("DLOCK_FAULTS_HEARTBEAT", self.heartbeat(i))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = dlock_testkit::process::spawn_tied(command).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", self.bin.display()),
            )
        })?;
        self.dlock = Some(child);
        Ok(())
    }

    /// The incarnation running now and the fence its tree last wrote, once its COMMAND
    /// runs (holds the lease) and its heartbeat has begun.
    pub fn running(&self) -> Option<(u32, String)> {
        self.dlock.as_ref()?;
        let text = std::fs::read_to_string(self.heartbeat(self.incarnation)).ok()?;
        let fence = text.lines().last()?.to_owned();
        Some((self.incarnation, fence))
    }

    /// Which fault comes next: true for a SIGKILL of dlock, false for a force-release. They
    /// alternate.
    pub fn next_is_kill(&mut self) -> bool {
        self.kill_next = !self.kill_next;
        !self.kill_next
    }

    /// SIGKILLs the running dlock and reaps it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.dlock.take() {
            crate::nemesis::signal(child.id(), libc::SIGKILL);
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }

    /// After incarnation `i` lost its lease and the promised delay passed: none of its
    /// processes may be alive (they are killed and counted), and its heartbeat may not grow.
    pub async fn check(&mut self, i: u32) {
        let mark = self.mark(i);
        let before = file_len(&self.heartbeat(i));
        let alive = members(|m| m == mark);
        for &pid in &alive {
            crate::nemesis::signal(pid, libc::SIGKILL);
        }
        if !alive.is_empty() {
            self.breaches.push(format!(
                "tree {i}: processes {alive:?} still ran after the lease was lost"
            ));
        }
        // Ten heartbeat periods: a live writer would have appended meanwhile.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if alive.is_empty() && file_len(&self.heartbeat(i)) != before {
            self.breaches.push(format!(
                "tree {i}: the heartbeat grew after the lease was lost"
            ));
        }
    }

    /// Ends the last incarnation the way an operator would (SIGTERM to dlock, which stops
    /// the tree and releases), then checks that no process of any incarnation is left.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.dlock.take() {
            crate::nemesis::signal(child.id(), libc::SIGTERM);
            let until = Instant::now() + self.ttl * 4 + KILL_AFTER + Duration::from_secs(5);
            while Instant::now() < until && matches!(child.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if matches!(child.try_wait(), Ok(None)) {
                self.breaches
                    .push(format!("tree {}: dlock ignored SIGTERM", self.incarnation));
                crate::nemesis::signal(child.id(), libc::SIGKILL);
                let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            }
        }
        let prefix = format!("{}-", self.tag);
        let until = Instant::now() + KILL_AFTER + MARGIN;
        let mut left = members(|m| m.starts_with(&prefix));
        while !left.is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            left = members(|m| m.starts_with(&prefix));
        }
        for &pid in &left {
            crate::nemesis::signal(pid, libc::SIGKILL);
        }
        if !left.is_empty() {
            self.breaches.push(format!(
                "processes {left:?} of dlock run's trees outlived dlock"
            ));
        }
        if !self.breaches.is_empty() {
            let _ = std::fs::write(
                self.dir.join("tree-breaches.txt"),
                self.breaches.join("\n") + "\n",
            );
        }
    }
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The live processes whose tree mark satisfies `matches` (zombies have no environment
/// left, so they do not count: they run nothing).
fn members(matches: impl Fn(&str) -> bool) -> Vec<u32> {
    let prefix = format!("{MARK}=");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let marked = environ.split(|&b| b == 0).any(|var| {
            std::str::from_utf8(var)
                .ok()
                .and_then(|v| v.strip_prefix(&prefix))
                .is_some_and(&matches)
        });
        if marked {
            found.push(pid);
        }
    }
    found
}
