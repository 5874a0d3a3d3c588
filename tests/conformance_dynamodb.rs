//! The conformance suite on `dynamodb://`, against two private DynamoDB-compatible
//! servers: dynalite and moto (DynamoDB Local cannot be installed here).
//!
//! The lock kinds' suite runs on servers of its own: its hundred contending readers and
//! writers would otherwise queue ahead of the core suite's renewals on the same server
//! (moto serves one request at a time), which tests the machine rather than the lock.
#![cfg(feature = "dynamodb")]

macro_rules! on_server {
    ($name:ident, $start:path, $($suite:ident),+) => {
        mod $name {
            use dlock_testkit::servers::dynamodb::DynamoServer;
            use std::sync::OnceLock;

            fn server() -> &'static DynamoServer {
                static SERVER: OnceLock<DynamoServer> = OnceLock::new();
                SERVER.get_or_init($start)
            }

            async fn target() -> dlock_testkit::Target {
                dlock_testkit::Target::new(server().url("conformance"), env!("CARGO_BIN_EXE_dlock"))
            }

            $(dlock_testkit::$suite!(target());)+
        }
    };
}

on_server!(dynalite, DynamoServer::dynalite, conformance_tests);
on_server!(
    dynalite_kinds,
    DynamoServer::dynalite,
    conformance_kind_tests
);
on_server!(moto, DynamoServer::moto, conformance_tests);
on_server!(moto_kinds, DynamoServer::moto, conformance_kind_tests);
