//! The file backend under hostile conditions: force-release racing holders (fences must
//! stay unique), an exhausted fence counter, and a lock directory whose entries were
//! planted by someone else (symlinks, FIFOs, directories, hard links).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A generous upper bound, so that an operation that blocks (a FIFO read) fails the test
/// instead of hanging it.
const LIMIT: Duration = Duration::from_secs(30);

fn temp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

async fn locks_in(dir: &Path) -> fencelock::Locks {
    fencelock::connect(&format!("file://{}", dir.display()))
        .await
        .unwrap()
}

async fn acquire(locks: &fencelock::Locks, key: &str) -> fencelock::Result<fencelock::Lease> {
    tokio::time::timeout(
        LIMIT,
        locks
            .lock(key)
            .ttl(Duration::from_secs(30))
            .wait_for(Duration::from_secs(5))
            .acquire(),
    )
    .await
    .expect("acquire did not return")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn force_release_never_duplicates_fences() {
    let dir = temp("dlock-hardening-");
    let fences = Arc::new(Mutex::new(Vec::new()));
    let mut holders = Vec::new();
    for _ in 0..3 {
        // Each holder has a backend of its own, as separate processes would.
        let locks = locks_in(dir.path()).await;
        let fences = Arc::clone(&fences);
        holders.push(tokio::spawn(async move {
            for _ in 0..300 {
                let lease = acquire(&locks, "race").await.unwrap();
                fences.lock().unwrap().push(lease.fence());
                tokio::task::yield_now().await;
                let _ = lease.release().await;
            }
        }));
    }
    let breaker = locks_in(dir.path()).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forcing = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut forced = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if breaker.force_release("race").await.unwrap() {
                    forced += 1;
                }
                tokio::task::yield_now().await;
            }
            forced
        })
    };
    for holder in holders {
        tokio::time::timeout(Duration::from_secs(300), holder)
            .await
            .expect("holders hung")
            .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let forced = forcing.await.unwrap();
    let fences = fences.lock().unwrap().clone();
    assert!(forced > 0, "no force-release happened");
    let mut seen = HashSet::new();
    let duplicates: Vec<u64> = fences
        .iter()
        .copied()
        .filter(|f| !seen.insert(*f))
        .collect();
    assert!(
        duplicates.is_empty(),
        "{} duplicate fences in {} sections ({forced} force-releases): {:?}",
        duplicates.len(),
        fences.len(),
        &duplicates[..duplicates.len().min(10)]
    );
    assert!(!fences.contains(&0), "fence 0 handed out");
}

#[tokio::test]
async fn unreadable_record_at_force_release_keeps_fences_increasing() {
    let dir = temp("dlock-hardening-");
    let locks = locks_in(dir.path()).await;
    let first = acquire(&locks, "k").await.unwrap();
    let fence = first.fence();
    // The record of the held file gets corrupted, then the lock is force-released.
    std::fs::write(dir.path().join("k.lock"), b"garbage\n").unwrap();
    assert!(locks.force_release("k").await.unwrap());
    let other = locks_in(dir.path()).await;
    let second = acquire(&other, "k").await.unwrap();
    assert!(
        second.fence() > fence,
        "fence {} after fence {fence}",
        second.fence()
    );
    drop(second);
    drop(first);
}

/// A power loss can take the last writes of the fence file and of the lock file with it
/// (dlock does not fsync them). Here both are put back to what an early acquisition
/// left, as such a crash would: the next fence must still exceed every fence handed out
/// before, which the clock floor guarantees.
#[tokio::test]
async fn fence_files_rolled_back_by_a_crash_never_repeat_a_fence() {
    let dir = temp("dlock-hardening-");
    let locks = locks_in(dir.path()).await;
    let first = acquire(&locks, "k").await.unwrap();
    let early_fence = std::fs::read(dir.path().join("k.fence")).unwrap();
    let early_record = std::fs::read(dir.path().join("k.lock")).unwrap();
    first.release().await.unwrap();
    let mut highest = 0;
    for _ in 0..20 {
        let lease = acquire(&locks, "k").await.unwrap();
        highest = highest.max(lease.fence());
        lease.release().await.unwrap();
    }
    std::fs::write(dir.path().join("k.fence"), &early_fence).unwrap();
    std::fs::write(dir.path().join("k.lock"), &early_record).unwrap();
    let after = acquire(&locks, "k").await.unwrap();
    assert!(
        after.fence() > highest,
        "fence {} after a rollback, though {highest} was handed out before",
        after.fence()
    );
    after.release().await.unwrap();
}

#[tokio::test]
async fn exhausted_fence_counter_is_an_error() {
    let dir = temp("dlock-hardening-");
    let locks = locks_in(dir.path()).await;
    std::fs::write(
        dir.path().join("k.lock"),
        format!("{{\"key\":\"k\",\"fence\":{}}}\n", u64::MAX),
    )
    .unwrap();
    let err = acquire(&locks, "k").await.unwrap_err();
    assert!(
        err.to_string().contains("fence counter") && err.to_string().contains("k.lock"),
        "{err}"
    );
    // It stays an error: a repeated fence is never handed out.
    assert!(acquire(&locks, "k").await.is_err());
    assert!(locks
        .lock("k")
        .ttl(Duration::from_secs(30))
        .try_acquire()
        .await
        .is_err());
}

/// A file outside the lock directory, as a victim of planted links.
struct Victim {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

const PRECIOUS: &[u8] = b"precious contents\n";

fn victim() -> Victim {
    let dir = temp("dlock-hardening-victim-");
    let path = dir.path().join("victim");
    std::fs::write(&path, PRECIOUS).unwrap();
    Victim { _dir: dir, path }
}

fn assert_refused(err: &fencelock::Error, path: &Path, what: &str) {
    let text = err.to_string();
    assert!(
        text.contains(&path.display().to_string()) && text.contains(what),
        "expected an error naming {} and saying {what:?}, got: {text}",
        path.display()
    );
}

#[tokio::test]
async fn symlink_to_a_file_outside_is_refused() {
    let dir = temp("dlock-hardening-");
    let victim = victim();
    let link = dir.path().join("nightly.lock");
    std::os::unix::fs::symlink(&victim.path, &link).unwrap();
    let locks = locks_in(dir.path()).await;
    let err = acquire(&locks, "nightly").await.unwrap_err();
    assert_refused(&err, &link, "symbolic link");
    let err = locks
        .lock("nightly")
        .try_acquire()
        .await
        .map(|_| ())
        .unwrap_err();
    assert_refused(&err, &link, "symbolic link");
    // Neither status, list nor force-release writes through (or replaces) the link target.
    let _ = locks.status("nightly").await;
    let _ = locks.list().await;
    let _ = locks.force_release("nightly").await;
    assert_eq!(std::fs::read(&victim.path).unwrap(), PRECIOUS);
    assert!(std::fs::symlink_metadata(&victim.path).unwrap().is_file());
}

#[tokio::test]
async fn dangling_symlink_is_refused_and_its_target_not_created() {
    let dir = temp("dlock-hardening-");
    let outside = temp("dlock-hardening-victim-");
    let target = outside.path().join("created-by-dlock");
    let link = dir.path().join("nightly.lock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let locks = locks_in(dir.path()).await;
    let err = acquire(&locks, "nightly").await.unwrap_err();
    assert_refused(&err, &link, "symbolic link");
    let _ = locks.force_release("nightly").await;
    assert!(!target.exists(), "the link target was created");
}

#[tokio::test]
async fn fifo_or_directory_in_place_of_the_lock_file_is_refused() {
    let dir = temp("dlock-hardening-");
    let fifo = dir.path().join("pipe.lock");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    std::fs::create_dir(dir.path().join("sub.lock")).unwrap();
    let locks = locks_in(dir.path()).await;
    let err = acquire(&locks, "pipe").await.unwrap_err();
    assert_refused(&err, &fifo, "not a regular file");
    let err = acquire(&locks, "sub").await.unwrap_err();
    assert_refused(&err, &dir.path().join("sub.lock"), "directory");
    for key in ["pipe", "sub"] {
        let _ = tokio::time::timeout(LIMIT, locks.status(key))
            .await
            .expect("status hung");
        let _ = tokio::time::timeout(LIMIT, locks.force_release(key))
            .await
            .expect("force-release hung");
    }
    let _ = tokio::time::timeout(LIMIT, locks.list())
        .await
        .expect("list hung");
}

#[tokio::test]
async fn hard_link_to_a_foreign_file_is_refused() {
    let dir = temp("dlock-hardening-");
    let victim = victim();
    let link = dir.path().join("nightly.lock");
    std::fs::hard_link(&victim.path, &link).unwrap();
    let locks = locks_in(dir.path()).await;
    let err = acquire(&locks, "nightly").await.unwrap_err();
    assert_refused(&err, &link, "hard link");
    let _ = locks.force_release("nightly").await;
    assert_eq!(std::fs::read(&victim.path).unwrap(), PRECIOUS);
    assert_eq!(std::fs::metadata(&victim.path).unwrap().nlink(), 2);
}

#[tokio::test]
async fn a_created_lock_directory_is_private() {
    let parent = temp("dlock-hardening-");
    // A named directory gets only its last component created (tests/cli_polish.rs).
    let dir = parent.path().join("by-dlock");
    let locks = locks_in(&dir).await;
    drop(acquire(&locks, "k").await.unwrap());
    let mode = std::fs::metadata(&dir).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o700, "mode {mode:o}");
}

/// Locks `path` with flock(1) in another process for `hold`, and returns once it is held.
fn flock_elsewhere(path: &Path, hold: Duration) -> std::process::Child {
    let mut child = std::process::Command::new("flock")
        .arg(path)
        .args([
            "sh",
            "-c",
            &format!("echo held; sleep {}", hold.as_secs_f64()),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("flock(1) from util-linux");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held");
    child
}

/// An attempt takes its fence on the runtime's thread unless another process holds the
/// fence file; then it waits for that file on the blocking pool. Either way the lock is
/// granted once the fence file is free, with a higher fence, and never refused for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_file_locked_by_another_process_delays_the_grant_but_does_not_refuse_it() {
    let dir = temp("dlock-hardening-");
    let locks = locks_in(dir.path()).await;
    let first = acquire(&locks, "k").await.unwrap();
    let mut fence = first.fence();
    first.release().await.unwrap();
    let hold = Duration::from_millis(300);
    for waiting in [false, true] {
        let mut other = flock_elsewhere(&dir.path().join("k.fence"), hold);
        let started = std::time::Instant::now();
        let lease = if waiting {
            acquire(&locks, "k").await.unwrap()
        } else {
            locks
                .lock("k")
                .ttl(Duration::from_secs(30))
                .try_acquire()
                .await
                .unwrap()
                .expect("the lock file is free; only its fence file is busy")
        };
        assert!(
            started.elapsed() >= hold / 2,
            "granted after {:?}, while the fence file was locked elsewhere",
            started.elapsed()
        );
        assert!(
            lease.fence() > fence,
            "fence {} after {fence}",
            lease.fence()
        );
        fence = lease.fence();
        lease.release().await.unwrap();
        other.wait().unwrap();
    }
}
