//! The conformance suite: each behaviour of SPEC §2 written once over [`fencelock::Locks`]
//! and run against every backend by [`conformance_tests!`](crate::conformance_tests).

use crate::process::{is_alive, signal};
use crate::Target;
use fencelock::backend::Owner;
use fencelock::{Error, Key, LossReason};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A TTL short enough for tests to watch several pass, long enough for a round trip.
const SHORT_TTL: Duration = Duration::from_millis(400);

/// An upper bound for "promptly", generous for a loaded 2-core CI machine.
const PROMPTLY: Duration = Duration::from_secs(10);

async fn within<T>(limit: Duration, what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: did not happen within {limit:?}"),
    }
}

/// 100 tasks over 10 client handles each do a non-atomic read-modify-write of a shared
/// counter under the lock: no update may be lost and no two may overlap.
pub async fn mutual_exclusion_under_contention(target: &Target) {
    const HANDLES: usize = 10;
    const TASKS_PER_HANDLE: usize = 10;
    let key = target.unique_key("mutex");
    let counter = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..HANDLES {
        let locks = target.locks().await;
        for _ in 0..TASKS_PER_HANDLE {
            let (locks, key, counter, inside) = (
                locks.clone(),
                key.clone(),
                Arc::clone(&counter),
                Arc::clone(&inside),
            );
            tasks.push(tokio::spawn(async move {
                let lease = locks
                    .lock(&key)
                    .ttl(Duration::from_secs(10))
                    .acquire()
                    .await
                    .unwrap();
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                let read = counter.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                counter.store(read + 1, Ordering::SeqCst);
                inside.store(false, Ordering::SeqCst);
                assert!(lease.release().await.unwrap(), "lease was lost while held");
            }));
        }
    }
    for task in tasks {
        within(Duration::from_secs(120), "100 contended acquisitions", task)
            .await
            .unwrap();
    }
    assert_eq!(
        counter.load(Ordering::SeqCst),
        (HANDLES * TASKS_PER_HANDLE) as u64
    );
}

/// `try_acquire` on a held key returns `None` at once, from the same and another handle.
pub async fn try_acquire_on_held_key_returns_none(target: &Target) {
    let key = target.unique_key("try");
    let (locks, other) = (target.locks().await, target.locks().await);
    let lease = locks
        .lock(&key)
        .try_acquire()
        .await
        .unwrap()
        .expect("free key not acquired");
    assert!(locks.lock(&key).try_acquire().await.unwrap().is_none());
    assert!(other.lock(&key).try_acquire().await.unwrap().is_none());
    let err = other.lock(&key).no_wait().acquire().await.unwrap_err();
    assert!(matches!(err, Error::NotAcquired { .. }), "{err:?}");
    assert!(lease.release().await.unwrap());
    let again = other.lock(&key).try_acquire().await.unwrap();
    assert!(again.is_some(), "released key not acquirable");
}

/// A bounded wait on a held key fails with `NotAcquired` after its deadline, not before
/// and not long after.
pub async fn wait_times_out_within_its_deadline(target: &Target) {
    let key = target.unique_key("deadline");
    let (locks, other) = (target.locks().await, target.locks().await);
    let _lease = locks.lock(&key).acquire().await.unwrap();
    let limit = Duration::from_millis(700);
    let started = Instant::now();
    let err = other
        .lock(&key)
        .wait_for(limit)
        .acquire()
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, Error::NotAcquired { .. }), "{err:?}");
    assert!(
        waited >= limit - Duration::from_millis(20),
        "gave up early after {waited:?}"
    );
    assert!(
        waited < limit + Duration::from_secs(3),
        "gave up late after {waited:?}"
    );
}

/// Fences strictly increase over successive holders, from one handle and from fresh ones.
pub async fn fences_strictly_increase_across_handles(target: &Target) {
    let key = target.unique_key("fence");
    let mut last = 0;
    let shared = target.locks().await;
    for round in 0..12 {
        let locks = if round % 2 == 0 {
            shared.clone()
        } else {
            target.locks().await
        };
        let lease = locks.lock(&key).acquire().await.unwrap();
        assert!(lease.fence() > last, "fence {} after {last}", lease.fence());
        last = lease.fence();
        if round % 3 == 0 {
            drop(lease); // background release must also let the next holder in
        } else {
            lease.release().await.unwrap();
        }
    }
}

/// Cleaning up after an abandoned attempt of another owner token changes nothing: only
/// the lease's own handle can renew or release it.
pub async fn wrong_owner_cannot_release_or_renew(target: &Target) {
    let key_text = target.unique_key("owner");
    let key = Key::new(&key_text).unwrap();
    let locks = target.locks().await;
    let lease = locks.lock(&key_text).acquire().await.unwrap();
    let stranger = Owner::random();
    let backend = target.locks().await.backend().clone();
    backend.abandon(&key, &stranger).await.unwrap();
    assert!(target
        .locks()
        .await
        .lock(&key_text)
        .try_acquire()
        .await
        .unwrap()
        .is_none());
    assert!(!lease.is_lost());
    lease.extend(Duration::from_secs(60)).await.unwrap();
    assert!(
        lease.release().await.unwrap(),
        "the real owner lost its lease"
    );
}

/// Automatic renewal keeps a short lease alive for many TTLs.
pub async fn renewal_keeps_lease_alive_past_several_ttls(target: &Target) {
    let key = target.unique_key("renew");
    let locks = target.locks().await;
    let lease = locks.lock(&key).ttl(SHORT_TTL).acquire().await.unwrap();
    let other = target.locks().await;
    for _ in 0..5 {
        tokio::time::sleep(SHORT_TTL).await;
        if lease.is_lost() {
            panic!("lease lost although renewed: {}", lease.lost().await);
        }
        assert!(
            other.lock(&key).try_acquire().await.unwrap().is_none(),
            "lease expired although renewed"
        );
    }
    assert!(lease.release().await.unwrap());
}

/// A lease that is neither renewed nor released ends at its TTL on backends with TTLs;
/// on session-bound backends (flock) it stays held as long as its holder lives.
pub async fn ttl_expiry_frees_a_lease_that_is_not_renewed(target: &Target) {
    let key = target.unique_key("expiry");
    let locks = target.locks().await;
    let lease = locks
        .lock(&key)
        .ttl(SHORT_TTL)
        .auto_renew(false)
        .acquire()
        .await
        .unwrap();
    let first_fence = lease.fence();
    let expires = locks.backend().capabilities().expires;
    std::mem::forget(lease); // a holder that hangs: no renewal, no release
    tokio::time::sleep(SHORT_TTL * 3).await;
    let other = target.locks().await;
    let next = other.lock(&key).try_acquire().await.unwrap();
    if expires {
        let next = next.expect("a lease not renewed was still held after 3 TTLs");
        assert!(next.fence() > first_fence);
    } else {
        assert!(
            next.is_none(),
            "a session-bound lock was freed although its holder lives"
        );
    }
}

/// With automatic renewal off, `extend` keeps the lease; when extension stops, `lost()`
/// fires (backends with TTLs).
pub async fn extend_by_hand_keeps_lease_then_expiry_is_lost(target: &Target) {
    let key = target.unique_key("extend");
    let locks = target.locks().await;
    let lease = locks
        .lock(&key)
        .ttl(SHORT_TTL)
        .auto_renew(false)
        .acquire()
        .await
        .unwrap();
    for _ in 0..4 {
        // Early in the TTL, so that a slow store's answer still arrives in time.
        tokio::time::sleep(SHORT_TTL / 4).await;
        lease.extend(SHORT_TTL).await.unwrap();
        assert!(!lease.is_lost());
    }
    assert!(target
        .locks()
        .await
        .lock(&key)
        .try_acquire()
        .await
        .unwrap()
        .is_none());
    if locks.backend().capabilities().expires {
        let reason = within(PROMPTLY, "lost() after extension stopped", lease.lost()).await;
        assert_eq!(reason, LossReason::Expired);
    } else {
        tokio::time::sleep(SHORT_TTL * 2).await;
        assert!(
            !lease.is_lost(),
            "a session-bound lease was reported lost while held"
        );
        assert!(lease.release().await.unwrap());
    }
}

/// `lost()` fires when an operator breaks the lease; the next holder gets a higher fence,
/// and the old lease's release reports it was no longer held.
pub async fn lost_fires_when_lease_is_broken_from_outside(target: &Target) {
    let key = target.unique_key("broken");
    let locks = target.locks().await;
    let lease = locks.lock(&key).ttl(SHORT_TTL).acquire().await.unwrap();
    let admin = target.locks().await;
    assert!(
        admin.force_release(&key).await.unwrap(),
        "force-release found nothing held"
    );
    within(PROMPTLY, "lost() after force-release", lease.lost()).await;
    assert!(lease.is_lost());
    let next = admin.lock(&key).wait_for(PROMPTLY).acquire().await.unwrap();
    let next_fence = next.fence();
    assert!(next_fence > lease.fence());
    assert!(next.release().await.unwrap());
    // A holder that keeps its lost lease does not block its own handle.
    let again = within(
        PROMPTLY,
        "re-acquire beside a lost lease",
        locks.lock(&key).acquire(),
    )
    .await
    .unwrap();
    assert!(again.fence() > next_fence);
    assert!(
        !lease.release().await.unwrap(),
        "a broken lease was reported still held"
    );
    assert!(
        again.release().await.unwrap(),
        "the old holder's release freed the new holder"
    );
}

/// Waiting acquires that are dropped (cancelled) leave nothing held once the holder
/// releases.
pub async fn dropped_waiting_acquires_leave_nothing_held(target: &Target) {
    let key = target.unique_key("dropped");
    let locks = target.locks().await;
    let lease = locks.lock(&key).acquire().await.unwrap();
    let mut waiters = Vec::new();
    for i in 0..20 {
        let waiter = if i % 2 == 0 {
            locks.clone()
        } else {
            target.locks().await
        };
        let key = key.clone();
        waiters.push(tokio::spawn(
            async move { waiter.lock(&key).acquire().await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for waiter in &waiters {
        waiter.abort();
    }
    for waiter in waiters {
        assert!(
            waiter.await.unwrap_err().is_cancelled(),
            "a waiter acquired a held lock"
        );
    }
    // Bounded waits that time out must not take the lock afterwards either.
    for _ in 0..5 {
        let err = locks
            .lock(&key)
            .wait_for(Duration::from_millis(50))
            .acquire()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotAcquired { .. }), "{err:?}");
    }
    assert!(lease.release().await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = target.locks().await;
    let after = within(
        PROMPTLY,
        "acquire after dropped waiters",
        fresh.lock(&key).acquire(),
    )
    .await;
    assert!(after.is_ok(), "{after:?}");
    let status = fresh
        .status(&key)
        .await
        .unwrap()
        .expect("held key has no status");
    assert_eq!(status.owner.as_deref(), Some(after.unwrap().owner()));
}

/// A waiter blocked on a held key gets it when the holder releases, with a higher fence.
pub async fn waiter_gets_lock_at_release(target: &Target) {
    let key = target.unique_key("handoff");
    let locks = target.locks().await;
    let lease = locks.lock(&key).acquire().await.unwrap();
    let fence = lease.fence();
    let other = target.locks().await;
    let waiter = tokio::spawn({
        let key = key.clone();
        async move { other.lock(&key).acquire().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "waiter acquired a held lock");
    assert!(lease.release().await.unwrap());
    let next = within(PROMPTLY, "hand-off to the waiter", waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(next.fence() > fence);
}

/// A holder process killed with SIGKILL frees the lock: at once on session-bound
/// backends, at its TTL on others.
///
/// For `memory://`, whose locks live inside one process, it checks instead that another
/// process does not see this process's locks.
///
/// A target without a URL (a backend written outside dlock) cannot be run by the `dlock`
/// binary: there the holder is a runtime of its own that is shut down without releasing,
/// which drops every store-side handle the way a dying process would.
pub async fn holder_process_killed_frees_the_lock(target: &Target) {
    let key = target.unique_key("killed");
    if !target.has_cli() {
        return holder_runtime_dropped_frees_the_lock(target, &key).await;
    }
    if !target
        .locks()
        .await
        .backend()
        .capabilities()
        .shared_between_processes
    {
        let lease = target.locks().await.lock(&key).acquire().await.unwrap();
        let status = Command::new(target.cli())
            .args([
                "run",
                &key,
                "--backend",
                target.url(),
                "--no-wait",
                "--",
                "true",
            ])
            .status()
            .expect("cannot start the dlock binary");
        assert!(
            status.success(),
            "another process saw an in-process lock: {status}"
        );
        assert!(lease.release().await.unwrap());
        return;
    }
    let mut holder = Command::new(target.cli())
        .args([
            "run",
            &key,
            "--backend",
            target.url(),
            "--ttl",
            "1s",
            "--",
            "sleep",
            "60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot start the dlock binary");
    let locks = target.locks().await;
    let started = Instant::now();
    // Wait for a complete record: a multi-node backend may show the lock a moment
    // before the holder has written its fence everywhere.
    let info = loop {
        if let Some(info) = locks.status(&key).await.unwrap() {
            if info.fence.is_some() {
                break info;
            }
        }
        assert!(
            started.elapsed() < PROMPTLY,
            "the dlock holder never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(info.fence.is_some_and(|f| f > 0), "{info:?}");
    signal(holder.id(), libc::SIGKILL);
    holder.wait().unwrap();
    let limit = if locks.backend().capabilities().freed_on_holder_death {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(1) + PROMPTLY
    };
    let lease = within(
        limit,
        "acquire after the holder was killed",
        locks.lock(&key).acquire(),
    )
    .await
    .unwrap();
    assert!(lease.fence() > info.fence.unwrap_or(0));
    if let Some(pid) = info.pid {
        if pid != std::process::id() {
            assert!(!is_alive(pid), "the killed holder is still alive");
        }
    }
}

async fn holder_runtime_dropped_frees_the_lock(target: &Target, key: &str) {
    let holder_locks = target.locks().await;
    let held_key = key.to_owned();
    let fence = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let lease = runtime.block_on(async {
            holder_locks
                .lock(&held_key)
                .ttl(Duration::from_secs(1))
                .acquire()
                .await
                .unwrap()
        });
        let fence = lease.fence();
        // The lease's task dies with its runtime; the lease itself is never released.
        std::mem::forget(lease);
        drop(runtime);
        fence
    })
    .join()
    .unwrap();
    let locks = target.locks().await;
    let limit = if locks.backend().capabilities().freed_on_holder_death {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(1) + PROMPTLY
    };
    let lease = within(
        limit,
        "acquire after the holder's runtime was dropped",
        locks.lock(key).acquire(),
    )
    .await
    .unwrap();
    assert!(lease.fence() > fence);
}

/// Every bad key of SPEC §2 is a typed `BadKey` error from every entry point.
pub async fn bad_keys_are_typed_errors(target: &Target) {
    let locks = target.locks().await;
    let too_long = "k".repeat(fencelock::MAX_KEY_BYTES + 1);
    for key in ["", "nul\0inside", too_long.as_str()] {
        let err = locks.lock(key).acquire().await.unwrap_err();
        assert!(matches!(err, Error::BadKey { .. }), "{key:?}: {err:?}");
        assert!(err.is_usage());
        let err = locks.lock(key).try_acquire().await.unwrap_err();
        assert!(matches!(err, Error::BadKey { .. }), "{key:?}: {err:?}");
        let err = locks.status(key).await.unwrap_err();
        assert!(matches!(err, Error::BadKey { .. }), "{key:?}: {err:?}");
        let err = locks.force_release(key).await.unwrap_err();
        assert!(matches!(err, Error::BadKey { .. }), "{key:?}: {err:?}");
        assert!(err.to_string().len() < 300, "message floods: {err}");
    }
}

/// Keys that look like paths, SQL or markup, unicode, and maximum-length keys are just
/// keys: they lock, show in status under their own name, and release.
pub async fn hostile_keys_are_just_keys(target: &Target) {
    let locks = target.locks().await;
    let suffix = target.unique_key("");
    let longest = format!(
        "{suffix}{}",
        "é".repeat((fencelock::MAX_KEY_BYTES - suffix.len()) / 2)
    );
    let keys = [
        format!("../../etc/passwd{suffix}"),
        format!("/abs/path{suffix}"),
        format!(".hidden{suffix}"),
        format!("x'); DROP TABLE locks;--{suffix}"),
        format!("ключ 🔒 {suffix}"),
        format!("{suffix}*?[]{{}}$(rm -rf /)`\\%~\n\t"),
        longest,
    ];
    for key in &keys {
        let lease = locks.lock(key).acquire().await.unwrap();
        assert_eq!(lease.key(), key);
        let info = locks
            .status(key)
            .await
            .unwrap()
            .expect("held key has no status");
        assert_eq!(&info.key, key);
        assert!(target
            .locks()
            .await
            .lock(key)
            .try_acquire()
            .await
            .unwrap()
            .is_none());
        assert!(lease.release().await.unwrap());
        assert!(
            locks.status(key).await.unwrap().is_none(),
            "released key still shown"
        );
    }
}

/// `status` and `list` show the holder's owner and fence while held, and nothing after.
pub async fn status_and_list_show_the_holder(target: &Target) {
    let key = target.unique_key("status");
    let locks = target.locks().await;
    assert!(locks.status(&key).await.unwrap().is_none());
    let lease = locks.lock(&key).acquire().await.unwrap();
    let admin = target.locks().await;
    let info = admin
        .status(&key)
        .await
        .unwrap()
        .expect("held key has no status");
    assert_eq!(info.key, key);
    assert_eq!(info.owner.as_deref(), Some(lease.owner()));
    assert_eq!(info.fence, Some(lease.fence()));
    let listed = admin.list().await.unwrap();
    let entry = listed
        .iter()
        .find(|i| i.key == key)
        .expect("held key not listed");
    assert_eq!(entry.fence, Some(lease.fence()));
    assert!(lease.release().await.unwrap());
    assert!(admin.status(&key).await.unwrap().is_none());
    assert!(!admin.list().await.unwrap().iter().any(|i| i.key == key));
}

/// `release` reports `true` for a held lease and `false` for one already lost;
/// force-releasing a free key reports `false`.
pub async fn release_reports_whether_still_held(target: &Target) {
    let key = target.unique_key("release");
    let locks = target.locks().await;
    assert!(
        !locks.force_release(&key).await.unwrap(),
        "force-release of a free key"
    );
    let lease = locks.lock(&key).acquire().await.unwrap();
    assert!(lease.release().await.unwrap());
    let lease = locks.lock(&key).acquire().await.unwrap();
    assert!(locks.force_release(&key).await.unwrap());
    assert!(!lease.release().await.unwrap());
}

/// A key released by `release()` can be taken again at once through the same handle:
/// the release has reached the store, and the handle's local queue has moved on, by the
/// time `release()` returns.
pub async fn released_key_is_free_at_once_on_the_same_handle(target: &Target) {
    let key = target.unique_key("again");
    let locks = target.locks().await;
    for _ in 0..20 {
        let lease = locks.lock(&key).acquire().await.unwrap();
        assert!(lease.release().await.unwrap());
        let again = locks.lock(&key).try_acquire().await.unwrap();
        let again = again.expect("the key just released was not free on the same handle");
        assert!(again.release().await.unwrap());
    }
}

/// `run` (with_lock) holds the lock during the work and releases it afterwards.
pub async fn with_lock_runs_work_and_releases(target: &Target) {
    let key = target.unique_key("with");
    let locks = target.locks().await;
    let other = target.locks().await;
    let (fence, was_held) = locks
        .with_lock(&key, |lease| {
            let (other, key) = (other.clone(), key.clone());
            async move {
                let held = other.lock(&key).try_acquire().await.unwrap().is_none();
                (lease.fence(), held)
            }
        })
        .await
        .unwrap();
    assert!(fence > 0);
    assert!(was_held, "the lock was free during the guarded work");
    let after = within(
        PROMPTLY,
        "acquire after with_lock",
        other.lock(&key).acquire(),
    )
    .await;
    assert!(after.unwrap().fence() > fence);
}

/// `run` cancels the work and returns `LeaseLost` when the lease is lost meanwhile.
pub async fn with_lock_cancels_work_when_lease_is_lost(target: &Target) {
    let key = target.unique_key("cancel");
    let locks = target.locks().await;
    let admin = target.locks().await;
    let finished = Arc::new(AtomicBool::new(false));
    let result = within(
        PROMPTLY,
        "with_lock cancelled after loss",
        locks.lock(&key).ttl(SHORT_TTL).run(|_lease| {
            let (admin, key, finished) = (admin.clone(), key.clone(), Arc::clone(&finished));
            async move {
                admin.force_release(&key).await.unwrap();
                tokio::time::sleep(Duration::from_secs(60)).await;
                finished.store(true, Ordering::SeqCst);
            }
        }),
    )
    .await;
    let err = result.unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err:?}");
    assert!(!finished.load(Ordering::SeqCst));
}

/// `release_after` keeps the key taken until its time after the acquisition, then frees
/// it. On a backend whose leases expire the call returns at once, and the store ends the
/// lease by itself, with the holder's handle gone; on a session-bound one (the lock dies
/// with its holder) the call holds the lease until then. The next holder's fence is higher.
pub async fn release_after_keeps_the_key_until_its_time(target: &Target) {
    let key = target.unique_key("hold-least");
    let hold = Duration::from_millis(2500);
    let locks = target.locks().await;
    let expires = locks.backend().capabilities().expires;
    let lease = locks
        .lock(&key)
        .ttl(Duration::from_secs(10))
        .acquire()
        .await
        .unwrap();
    let (acquired, first) = (lease.acquired_at(), lease.fence());
    let release = tokio::spawn(lease.release_after(hold));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = target.locks().await;
    if expires {
        let held = within(PROMPTLY, "release_after on a backend with TTLs", release)
            .await
            .unwrap()
            .unwrap();
        assert!(held, "release_after reported the lease as not held");
        let returned = acquired.elapsed();
        assert!(
            returned < hold,
            "release_after waited {returned:?} on a backend whose store expires leases"
        );
        // The store alone keeps the lease now.
        drop(locks);
        assert!(
            other.lock(&key).try_acquire().await.unwrap().is_none(),
            "the key was free during its hold"
        );
        let next = within(PROMPTLY + hold, "the key free after its hold", async {
            loop {
                if let Some(next) = other.lock(&key).try_acquire().await.unwrap() {
                    break next;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let freed = acquired.elapsed();
        assert!(
            freed >= hold - Duration::from_millis(50),
            "free {freed:?} after the acquisition, before its hold of {hold:?}"
        );
        assert!(next.fence() > first, "fence {} after {first}", next.fence());
        assert!(next.release().await.unwrap());
    } else {
        assert!(
            !release.is_finished(),
            "release_after returned before its time on a session-bound backend"
        );
        assert!(
            other.lock(&key).try_acquire().await.unwrap().is_none(),
            "the key was free during its hold"
        );
        let held = within(PROMPTLY + hold, "release_after at its time", release)
            .await
            .unwrap()
            .unwrap();
        assert!(held, "release_after reported the lease as not held");
        let returned = acquired.elapsed();
        assert!(
            returned >= hold,
            "released {returned:?} after the acquisition, before its hold of {hold:?}"
        );
        let next = within(PROMPTLY, "the key free after its hold", async {
            loop {
                if let Some(next) = other.lock(&key).try_acquire().await.unwrap() {
                    break next;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(next.fence() > first, "fence {} after {first}", next.fence());
        assert!(next.release().await.unwrap());
    }
}

/// A lease taken with `hold_at_most` is renewed until its limit (with a TTL no longer
/// than the limit), then lost with `LossReason::HoldLimit`, not before; the key is free
/// again right after, for a holder with a higher fence.
pub async fn hold_at_most_ends_the_lease_at_its_limit(target: &Target) {
    let key = target.unique_key("hold-most");
    // Long enough that a renewal of a slow store (a third of the TTL) is not mistaken
    // for a failure before the limit.
    let limit = Duration::from_secs(3);
    let locks = target.locks().await;
    let lease = locks
        .lock(&key)
        .ttl(Duration::from_secs(10))
        .hold_at_most(limit)
        .acquire()
        .await
        .unwrap();
    let (acquired, first) = (lease.acquired_at(), lease.fence());
    assert!(
        lease.ttl() <= limit,
        "TTL {:?} above the limit",
        lease.ttl()
    );
    let reason = within(PROMPTLY, "lost() at the hold-at-most limit", lease.lost()).await;
    let at = acquired.elapsed();
    assert_eq!(reason, LossReason::HoldLimit { limit });
    assert!(
        at >= limit - Duration::from_millis(200) && at < limit + Duration::from_secs(3),
        "lost {at:?} after the acquisition, with a limit of {limit:?}"
    );
    assert!(
        !lease.release().await.unwrap(),
        "a lease past its limit was still held"
    );
    let other = target.locks().await;
    let next = within(PROMPTLY, "the key free after the limit", async {
        loop {
            if let Some(next) = other.lock(&key).try_acquire().await.unwrap() {
                break next;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(next.fence() > first, "fence {} after {first}", next.fence());
    assert!(next.release().await.unwrap());
}
