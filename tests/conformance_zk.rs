//! The conformance suite on `zk://`, against a private standalone ZooKeeper server and a
//! private 3-server ensemble.

use dlock_testkit::servers::zookeeper::ZooKeeper;
use std::sync::OnceLock;

mod single {
    use super::*;

    fn server() -> &'static ZooKeeper {
        static SERVER: OnceLock<ZooKeeper> = OnceLock::new();
        SERVER.get_or_init(ZooKeeper::start)
    }

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(server().url(), env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}

mod ensemble {
    use super::*;

    fn servers() -> &'static ZooKeeper {
        static SERVERS: OnceLock<ZooKeeper> = OnceLock::new();
        SERVERS.get_or_init(ZooKeeper::start_ensemble)
    }

    async fn target() -> dlock_testkit::Target {
        // A chroot, as deployments sharing an ensemble use.
        let url = format!("{}/apps/dlock-tests", servers().url());
        dlock_testkit::Target::new(url, env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}
