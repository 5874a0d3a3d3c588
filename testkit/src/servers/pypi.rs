//! Servers shipped as PyPI packages (SecantusDB, Valkey): each installed once into a
//! virtualenv of its own in the test cache (`$DLOCK_TEST_CACHE`, default
//! `~/.cache/dlock-test`) and reused by every run; and private loopback ports below
//! 32768 for servers that must come back on the same port.

use std::path::PathBuf;
use std::process::Command;

/// The test cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DLOCK_TEST_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/dlock-test")
}

/// The virtualenv `<cache>/<package>-<version>` with `package==version` installed,
/// installing it first if needed (once: an exclusive lock on the cache serializes
/// concurrent test processes).
pub fn venv(package: &str, version: &str) -> PathBuf {
    let cache = cache_dir();
    let venv = cache.join(format!("{package}-{version}"));
    let ready = || venv.join("bin/python").is_file();
    if ready() {
        return venv;
    }
    std::fs::create_dir_all(&cache).expect("cannot create the test cache directory");
    let lock = std::fs::File::create(cache.join(".install.lock"))
        .expect("cannot create the test cache's lock file");
    // SAFETY: flock(2) on a file descriptor we own; released when `lock` is closed.
    use std::os::fd::AsRawFd;
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if ready() {
        return venv;
    }
    let staging = cache.join(format!("{package}-{version}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    let run = |command: &mut Command, what: &str| {
        let output = command.output().unwrap_or_else(|err| {
            panic!("cannot run {what}: {err}; install python3 and python3-venv")
        });
        assert!(
            output.status.success(),
            "{what} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(
        Command::new("python3").arg("-m").arg("venv").arg(&staging),
        "python3 -m venv (Debian package python3-venv)",
    );
    run(
        Command::new(staging.join("bin/python")).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("{package}=={version}"),
        ]),
        &format!("pip install {package}"),
    );
    std::fs::rename(&staging, &venv).expect("cannot move the virtualenv into place");
    venv
}
