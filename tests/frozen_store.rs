//! On the consensus stores and Redis Cluster too, an attempt against a store that stopped answering (a
//! frozen link: nothing moves, nothing is closed) ends with a typed error within its
//! deadline plus at most a second, instead of hanging.
#![cfg(all(feature = "etcd", feature = "zookeeper", feature = "redis"))]

use dlock_testkit::proxy::Proxy;
use dlock_testkit::servers::etcd::EtcdCluster;
use dlock_testkit::servers::zookeeper::ZooKeeper;
use fencelock::Error;
use std::time::Duration;

/// The deadline of a `--no-wait` attempt is now: it must end within this.
const FROZEN_SLACK: Duration = Duration::from_millis(1500);

fn port_of(host_port: &str) -> u16 {
    host_port.rsplit(':').next().unwrap().parse().unwrap()
}

async fn frozen_attempts_fail_typed(url: String, proxy: &Proxy) {
    let locks = fencelock::connect(&url).await.unwrap();
    // The handle is connected through the proxy before the freeze.
    let lease = locks.lock("frozen-warmup").try_acquire().await.unwrap();
    assert!(lease.expect("a free key").release().await.unwrap());

    proxy.freeze();
    for attempt in ["try_acquire", "no_wait().acquire()"] {
        let call = async {
            match attempt {
                "try_acquire" => locks.lock("frozen").try_acquire().await.map(|_| ()),
                _ => locks.lock("frozen").no_wait().acquire().await.map(|_| ()),
            }
        };
        let outcome = tokio::time::timeout(FROZEN_SLACK, call)
            .await
            .unwrap_or_else(|_| {
                panic!("{url}: {attempt} on a frozen store did not end within {FROZEN_SLACK:?}")
            });
        let err = outcome.expect_err("an attempt on a frozen store succeeded");
        assert!(
            matches!(err, Error::Unavailable { .. }),
            "{url}: {attempt}: {err:?}"
        );
    }
    proxy.thaw();
    // After the thaw the store serves again and nothing was left held.
    let lease = tokio::time::timeout(
        Duration::from_secs(30),
        locks
            .lock("frozen")
            .wait_for(Duration::from_secs(25))
            .acquire(),
    )
    .await
    .expect("acquire after the thaw hung")
    .expect("acquire after the thaw failed");
    assert!(lease.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_attempts_behind_a_frozen_link_fail_typed_and_promptly() {
    let cluster = EtcdCluster::start();
    let proxy = Proxy::start(port_of(&cluster.endpoints()[0])).await;
    let url = format!("etcd://127.0.0.1:{}", proxy.port());
    frozen_attempts_fail_typed(url, &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_attempts_behind_a_frozen_link_fail_typed_and_promptly() {
    let server = ZooKeeper::start();
    let proxy = Proxy::start(port_of(&server.hosts())).await;
    let url = format!("zk://127.0.0.1:{}", proxy.port());
    frozen_attempts_fail_typed(url, &proxy).await;
}

/// Redis Cluster: the client learns every node's own address from the cluster, so the
/// freeze is of the servers themselves (SIGSTOP: connections stay open, nothing answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_attempts_on_frozen_nodes_fail_typed_and_promptly() {
    let cluster = dlock_testkit::servers::redis_cluster::RedisCluster::start();
    let url = cluster.url();
    let locks = fencelock::connect(&url).await.unwrap();
    let lease = locks.lock("frozen-warmup").try_acquire().await.unwrap();
    assert!(lease.expect("a free key").release().await.unwrap());
    for node in cluster.nodes() {
        node.pause();
    }
    for attempt in ["try_acquire", "no_wait().acquire()"] {
        let call = async {
            match attempt {
                "try_acquire" => locks.lock("frozen").try_acquire().await.map(|_| ()),
                _ => locks.lock("frozen").no_wait().acquire().await.map(|_| ()),
            }
        };
        let outcome = tokio::time::timeout(FROZEN_SLACK, call)
            .await
            .unwrap_or_else(|_| {
                panic!("{url}: {attempt} on frozen nodes did not end within {FROZEN_SLACK:?}")
            });
        let err = outcome.expect_err("an attempt on frozen nodes succeeded");
        assert!(
            matches!(err, Error::Unavailable { .. }),
            "{url}: {attempt}: {err:?}"
        );
    }
    for node in cluster.nodes() {
        node.resume();
    }
}
