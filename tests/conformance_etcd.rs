//! The conformance suite on `etcd://`, against a private single-member etcd and a private
//! three-member cluster.

use dlock_testkit::servers::etcd::EtcdCluster;
use std::sync::{Arc, OnceLock};

fn single() -> &'static EtcdCluster {
    static SERVER: OnceLock<EtcdCluster> = OnceLock::new();
    SERVER.get_or_init(EtcdCluster::start)
}

fn cluster() -> &'static EtcdCluster {
    static CLUSTER: OnceLock<EtcdCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| EtcdCluster::start_members(3))
}

mod one_member {
    use super::*;

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(single().url(), env!("CARGO_BIN_EXE_dlock"))
            .keeping(Arc::new(()))
    }

    dlock_testkit::conformance_tests!(target());
}

mod three_members {
    use super::*;

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(cluster().url(), env!("CARGO_BIN_EXE_dlock"))
            .keeping(Arc::new(()))
    }

    dlock_testkit::conformance_tests!(target());
}
