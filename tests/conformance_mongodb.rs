//! The conformance suite on `mongodb://`, against a private SecantusDB server.
#![cfg(feature = "mongodb")]

use dlock_testkit::servers::mongodb::MongoServer;
use std::sync::{Arc, OnceLock};
use tokio::sync::Semaphore;

fn server() -> &'static MongoServer {
    static SERVER: OnceLock<MongoServer> = OnceLock::new();
    SERVER.get_or_init(MongoServer::start)
}

/// SecantusDB is one Python process answering one request at a time: with every test of
/// this binary beside each other (`cargo test` runs them all at once), a request could
/// wait its turn past the 750 ms a `try_acquire` allows and be reported unavailable. The
/// tests take turns, a few at a time.
const TESTS_AT_ONCE: usize = 4;

async fn target() -> dlock_testkit::Target {
    static TURNS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let turns = Arc::clone(TURNS.get_or_init(|| Arc::new(Semaphore::new(TESTS_AT_ONCE))));
    let turn = turns
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    dlock_testkit::Target::new(server().url("conformance"), env!("CARGO_BIN_EXE_dlock"))
        .keeping(Arc::new(turn))
}

dlock_testkit::conformance_tests!(target());
dlock_testkit::conformance_kind_tests!(target());
