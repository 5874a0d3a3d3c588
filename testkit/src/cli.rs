//! A private lock directory for tests of the `dlock` binary: every command runs with it
//! as the default file backend, with no backend or log setting inherited from the
//! environment, and it is removed when dropped (or, if a test leaks it, at the exit of
//! the test process).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a helper waits for a state that a working `dlock` reaches at once.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// A temporary lock directory and the `dlock` binary that uses it.
pub struct LockDir {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl LockDir {
    /// A new directory named `PREFIX<pid>-…` for `bin` (a test's
    /// `env!("CARGO_BIN_EXE_dlock")`).
    pub fn new(bin: impl Into<PathBuf>, prefix: &str) -> LockDir {
        LockDir {
            dir: crate::process::temp_dir(prefix),
            bin: bin.into(),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `dlock ARGS` with this directory as the default backend and stdin closed.
    pub fn dlock(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .args(args)
            .env_remove("DLOCK_BACKEND")
            .env_remove("DLOCK_LOG")
            .env("DLOCK_DIR", self.path())
            .stdin(Stdio::null());
        command
    }

    /// `dlock ARGS`, run to its end.
    pub fn output(&self, args: &[&str]) -> Output {
        self.dlock(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()))
    }

    /// `dlock ARGS` started in the background, its stdout discarded.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.dlock(args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()))
    }

    /// The lock file of `key`.
    pub fn lock_file(&self, key: &str) -> PathBuf {
        self.path().join(format!("{key}.lock"))
    }

    /// Waits until `dlock status KEY` reports the key held.
    pub fn wait_held(&self, key: &str) {
        self.wait_for(key, "held", |out| out.status.success());
    }

    /// Waits until `key` is held and its holder record written (the file is locked just
    /// before the holder writes its pid, host and fence into it).
    pub fn wait_recorded(&self, key: &str) {
        self.wait_for(key, "held with a record", |out| {
            String::from_utf8_lossy(&out.stdout).contains("\"host\":\"")
        });
    }

    /// `dlock status KEY --json`, parsed, once `ready` holds for it.
    pub fn wait_status(
        &self,
        key: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        self.wait_for(key, "ready", |out| {
            last = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            ready(&last)
        });
        last
    }

    /// A holder of `key` (`dlock run KEY -- sleep 30`), once its record is written; it is
    /// killed when dropped.
    pub fn hold(&self, key: &str) -> Holder {
        let child = self.spawn(&["run", key, "--", "sleep", "30"]);
        let holder = Holder(child);
        self.wait_recorded(key);
        holder
    }

    fn wait_for(&self, key: &str, what: &str, mut done: impl FnMut(&Output) -> bool) {
        let started = Instant::now();
        loop {
            let out = self.output(&["status", key, "--json"]);
            if done(&out) {
                return;
            }
            assert!(
                started.elapsed() < PROMPTLY,
                "{key} never became {what}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A background `dlock` killed (and reaped) when dropped, passing or failing.
pub struct Holder(pub Child);

impl Holder {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
