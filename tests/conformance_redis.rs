//! The conformance suite on `redis://`, against a private redis-server.

use dlock_testkit::servers::redis::RedisServer;
use std::sync::{Arc, OnceLock};

fn server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

async fn target() -> dlock_testkit::Target {
    dlock_testkit::Target::new(server().url(), env!("CARGO_BIN_EXE_dlock")).keeping(Arc::new(()))
}

dlock_testkit::conformance_tests!(target());
dlock_testkit::conformance_kind_tests!(target());

/// The PTTL of `name` on the server, in ms (-2: absent, -1: no expiry).
fn pttl(name: &str) -> i64 {
    let text = server().cli(&["PTTL", name]);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("PTTL {name}: {text:?}"))
}

/// Readers, permits and a waiting writer's intent leave only keys that expire, and a
/// released key leaves nothing of its leases behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_sets_and_intents_expire_and_go_with_their_last_lease() {
    use std::time::Duration;
    let target = target().await;
    let locks = target.locks().await;
    let (rkey, skey) = (target.unique_key("exp-rw"), target.unique_key("exp-sem"));
    let ttl = Duration::from_secs(5);
    let reader = locks.lock(&rkey).ttl(ttl).shared().acquire().await.unwrap();
    let permit = locks.semaphore(&skey, 2).ttl(ttl).acquire().await.unwrap();
    // A refused writer leaves its intent.
    assert!(locks.lock(&rkey).try_acquire().await.unwrap().is_none());
    let bound = |limit: Duration| i64::try_from(limit.as_millis()).unwrap();
    for key in [&rkey, &skey] {
        for side in ["leases", "records"] {
            let left = pttl(&format!("{{dlock:{key}}}:{side}"));
            assert!(left > 0 && left <= bound(ttl), "{key} {side}: PTTL {left}");
        }
    }
    let intent = pttl(&format!("{{dlock:{rkey}}}:intents"));
    assert!(intent > 0 && intent <= 2_000, "intent PTTL {intent}");
    assert!(reader.release().await.unwrap());
    assert!(permit.release().await.unwrap());
    for key in [&rkey, &skey] {
        for side in ["leases", "records"] {
            let name = format!("{{dlock:{key}}}:{side}");
            assert_eq!(pttl(&name), -2, "{name} outlived its last lease");
        }
    }
}
