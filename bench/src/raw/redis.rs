//! redis-rs doing what a dlock Redis lease costs: `SET key owner NX PX ttl` to take it
//! and the compare-and-delete script (`EVALSHA`) to give it back, on one multiplexed
//! connection (`redis://`) or through the cluster client's slot routing
//! (`redis+cluster://`).

use super::{bounded, owner_token, Token};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::Script;
use std::sync::Arc;
use std::time::Duration;

/// The owner-checked delete every raw Redis client here releases with.
pub(super) const COMPARE_AND_DELETE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

#[derive(Clone)]
enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

#[derive(Clone)]
pub struct Redis {
    connection: Connection,
    release: Arc<Script>,
}

impl Redis {
    /// `redis://host:port[/db]`, or `redis+cluster://host:port,host:port…`.
    pub async fn connect(url: &str) -> Result<Redis, String> {
        let connection = match url.strip_prefix("redis+cluster://") {
            Some(rest) => {
                let hosts = rest.split(['/', '?']).next().unwrap_or_default();
                let nodes: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
                let client = ClusterClient::new(nodes).map_err(|err| err.to_string())?;
                Connection::Cluster(
                    bounded("connect to the cluster", client.get_async_connection()).await?,
                )
            }
            None => {
                let client = redis::Client::open(url).map_err(|err| err.to_string())?;
                Connection::Single(
                    bounded(
                        "connect to Redis",
                        client.get_multiplexed_async_connection(),
                    )
                    .await?,
                )
            }
        };
        Ok(Redis {
            connection,
            release: Arc::new(Script::new(COMPARE_AND_DELETE)),
        })
    }

    pub fn describe(&self) -> &'static str {
        match self.connection {
            Connection::Single(_) => "redis-rs (raw)",
            Connection::Cluster(_) => "redis-rs cluster client (raw)",
        }
    }

    pub async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<Token>, String> {
        let owner = owner_token();
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let mut set = redis::cmd("SET");
        set.arg(key).arg(&owner).arg("NX").arg("PX").arg(ms);
        let taken: Option<String> = match self.connection.clone() {
            Connection::Single(mut c) => bounded("SET NX", set.query_async(&mut c)).await?,
            Connection::Cluster(mut c) => bounded("SET NX", set.query_async(&mut c)).await?,
        };
        Ok(taken.map(|_| Token::Owner(owner)))
    }

    pub async fn release(&self, key: &str, owner: &str) -> Result<bool, String> {
        let deleted: i64 = match self.connection.clone() {
            Connection::Single(mut c) => self.compare_and_delete(&mut c, key, owner).await?,
            Connection::Cluster(mut c) => self.compare_and_delete(&mut c, key, owner).await?,
        };
        Ok(deleted == 1)
    }

    async fn compare_and_delete<C: ConnectionLike + Send>(
        &self,
        connection: &mut C,
        key: &str,
        owner: &str,
    ) -> Result<i64, String> {
        let mut invocation = self.release.key(key);
        invocation.arg(owner);
        bounded("EVALSHA", invocation.invoke_async(connection)).await
    }
}
