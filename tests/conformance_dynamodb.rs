//! The conformance suite on `dynamodb://`, against two private DynamoDB-compatible
//! servers: dynalite and moto (DynamoDB Local cannot be installed here).
#![cfg(feature = "dynamodb")]

mod dynalite {
    use dlock_testkit::servers::dynamodb::DynamoServer;
    use std::sync::OnceLock;

    fn server() -> &'static DynamoServer {
        static SERVER: OnceLock<DynamoServer> = OnceLock::new();
        SERVER.get_or_init(DynamoServer::dynalite)
    }

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(server().url("conformance"), env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}

mod moto {
    use dlock_testkit::servers::dynamodb::DynamoServer;
    use std::sync::OnceLock;

    fn server() -> &'static DynamoServer {
        static SERVER: OnceLock<DynamoServer> = OnceLock::new();
        SERVER.get_or_init(DynamoServer::moto)
    }

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(server().url("conformance"), env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}
