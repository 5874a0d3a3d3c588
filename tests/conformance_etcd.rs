//! The conformance suite on `etcd://`, against a private single-member etcd and a private
//! three-member cluster.

use dlock_testkit::servers::etcd::EtcdCluster;
use std::sync::Arc;

mod one_member {
    use super::*;

    async fn target() -> dlock_testkit::Target {
        let url = EtcdCluster::shared(1).url();
        dlock_testkit::Target::new(url, env!("CARGO_BIN_EXE_dlock")).keeping(Arc::new(()))
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}

mod three_members {
    use super::*;

    async fn target() -> dlock_testkit::Target {
        let url = EtcdCluster::shared(3).url();
        dlock_testkit::Target::new(url, env!("CARGO_BIN_EXE_dlock")).keeping(Arc::new(()))
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}
