//! The conformance suite on `redis+cluster://`, against a private Redis Cluster of 3
//! masters with one replica each.

use dlock_testkit::servers::redis_cluster::RedisCluster;
use std::sync::OnceLock;

fn cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}

async fn target() -> dlock_testkit::Target {
    dlock_testkit::Target::new(cluster().url(), env!("CARGO_BIN_EXE_dlock"))
}

dlock_testkit::conformance_tests!(target());
dlock_testkit::conformance_kind_tests!(target());
