//! The conformance suite on `mongodb://`, against a private SecantusDB server.
#![cfg(feature = "mongodb")]

use dlock_testkit::servers::mongodb::MongoServer;
use std::sync::OnceLock;

fn server() -> &'static MongoServer {
    static SERVER: OnceLock<MongoServer> = OnceLock::new();
    SERVER.get_or_init(MongoServer::start)
}

async fn target() -> dlock_testkit::Target {
    dlock_testkit::Target::new(server().url("conformance"), env!("CARGO_BIN_EXE_dlock"))
}

dlock_testkit::conformance_tests!(target());
dlock_testkit::conformance_kind_tests!(target());
