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
