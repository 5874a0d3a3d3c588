//! Launchers for the real servers the backends talk to, started from the installed
//! binaries.

pub mod dynamodb;
pub mod etcd;
pub mod mongodb;
pub mod mysql;
pub mod postgres;
pub mod pypi;
pub mod redis;
pub mod redis_cluster;
pub mod zookeeper;

use crate::process::{free_port, signal, spawn_tied, wait_for_port};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

/// The process of one private server, whichever it is: its free loopback port, its
/// temporary directory (removed when dropped), its log, and the child while it runs
/// (killed when dropped). The SQL launchers dereference to it.
pub struct ServerProcess {
    name: &'static str,
    log_file: &'static str,
    stop_signal: i32,
    pub(crate) port: u16,
    pub(crate) dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl ServerProcess {
    /// A server `name` logging to `log_file` in `dir`, on a free port, not yet started;
    /// `stop_signal` shuts it down in order.
    pub(crate) fn new(
        name: &'static str,
        log_file: &'static str,
        dir: tempfile::TempDir,
        stop_signal: i32,
    ) -> Self {
        ServerProcess {
            name,
            log_file,
            stop_signal,
            port: free_port(),
            dir,
            child: Mutex::new(None),
        }
    }

    /// Starts `command` and waits until it listens on the port.
    pub(crate) fn spawn(&self, command: Command) {
        let child =
            spawn_tied(command).unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name));
        *self.child.lock().unwrap() = Some(child);
        assert!(
            wait_for_port(self.port, Duration::from_secs(60)),
            "{} did not open port {}: {}",
            self.name,
            self.port,
            self.log()
        );
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server in order (sessions are ended) and waits for it.
    pub fn stop(&self) {
        self.stop_with(self.stop_signal);
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(self.log_file)).unwrap_or_default()
    }

    /// Sends `signal_number` and waits for the process to end.
    pub(crate) fn stop_with(&self, signal_number: i32) {
        let taken = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut child) = taken {
            signal(child.id(), signal_number);
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop_with(libc::SIGKILL);
    }
}

/// The process of a running test server, as every launcher controls it: its pid, a
/// crash (SIGKILL), an orderly stop, a freeze (SIGSTOP) and a thaw.
#[derive(Default)]
pub struct Running(Mutex<Option<Child>>);

impl Running {
    /// Takes over a started server process.
    pub fn set(&self, child: Child) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Child::id)
    }

    /// Kills it with SIGKILL (thawing it first, so that it dies at once) and waits.
    pub fn kill(&self) {
        let taken = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut child) = taken {
            signal(child.id(), libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it with SIGTERM, and SIGKILL if it is still there after `grace`.
    pub fn stop(&self, grace: Duration) {
        let taken = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut child) = taken {
            signal(child.id(), libc::SIGCONT);
            signal(child.id(), libc::SIGTERM);
            let until = std::time::Instant::now() + grace;
            while std::time::Instant::now() < until {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it with SIGSTOP: connections stay open, nothing answers.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGSTOP);
        }
    }

    /// Thaws it after [`pause`](Self::pause).
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGCONT);
        }
    }
}

/// Servers that live until the test process exits (one per test binary, in a `static`,
/// or leaked on purpose): statics are never dropped, so an exit hook kills them and
/// removes their directories, and a run leaves nothing in the temporary directory.
static UNTIL_EXIT: Mutex<Vec<&'static ServerProcess>> = Mutex::new(Vec::new());

extern "C" fn stop_servers_kept_until_exit() {
    let kept = std::mem::take(&mut *UNTIL_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
    for server in kept {
        server.stop_with(libc::SIGKILL);
        let _ = std::fs::remove_dir_all(server.dir.path());
    }
}

/// Keeps `server` until the test process exits, then stops it and removes its data.
pub fn until_exit<T>(server: T) -> &'static T
where
    T: std::ops::Deref<Target = ServerProcess> + Send + Sync + 'static,
{
    let server: &'static T = Box::leak(Box::new(server));
    keep_until_exit(server);
    server
}

/// Registers a server that is already `'static` (in a `static`) for the exit hook.
pub(crate) fn keep_until_exit<T>(server: &'static T)
where
    T: std::ops::Deref<Target = ServerProcess> + Sync + 'static,
{
    static HOOK: std::sync::Once = std::sync::Once::new();
    // SAFETY: atexit(3) with a function that never unwinds into C.
    HOOK.call_once(|| unsafe {
        libc::atexit(stop_servers_kept_until_exit);
    });
    UNTIL_EXIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(&**server);
}

/// A backend URL `scheme://credentials@127.0.0.1:port/database?query`.
pub(crate) fn sql_url(
    scheme: &str,
    credentials: &str,
    port: u16,
    database: &str,
    query: &str,
) -> String {
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{scheme}://{credentials}@127.0.0.1:{port}/{database}{query}")
}

/// Runs a setup tool whose output goes to `log_file` in `dir`; fails the test with that
/// log if it fails.
pub(crate) fn run_setup(command: &mut Command, dir: &std::path::Path, log_file: &str, what: &str) {
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        status.success(),
        "{what} failed: {}",
        std::fs::read_to_string(dir.join(log_file)).unwrap_or_default()
    );
}

/// Runs a command to its end; fails the test with its stderr if it fails.
pub(crate) fn run_checked(command: &mut Command, what: &str) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A CA and a server certificate for 127.0.0.1/localhost signed by it, made with the
/// `openssl` command (package `openssl`).
pub(crate) fn make_certificates(dir: &std::path::Path) {
    let openssl = crate::process::require_binary("openssl", "openssl", &[]);
    let run = |args: &[&str]| {
        run_checked(
            Command::new(&openssl).current_dir(dir).args(args),
            &format!("openssl {args:?}"),
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=dlock test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ];
    ca.extend(ec);
    run(&ca);
    let mut csr = vec![
        "req",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ];
    csr.extend(ec);
    run(&csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("cannot write ext.cnf");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}
