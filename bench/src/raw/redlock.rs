//! redis-rs doing the work of one Redlock pair over N independent nodes (dlock's
//! `redlock://`), one multiplexed connection per node and every node asked in parallel:
//! `SET key owner NX PX ttl` on all, taken when a majority answered OK (if not, the
//! compare-and-delete on all, so that no minority grant is left to expire); then the
//! compare-and-delete script (`EVALSHA`) on all. No fence, no validity arithmetic: the
//! least a Redlock lock can cost.

use super::redis::COMPARE_AND_DELETE;
use super::{bounded, owner_token, Token};
use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::Script;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct Redlock {
    nodes: Vec<MultiplexedConnection>,
    release: Arc<Script>,
}

impl Redlock {
    /// `redlock://host:port,host:port,…` (options after `?` or `/` are ignored).
    pub async fn connect(url: &str) -> Result<Redlock, String> {
        let rest = url.strip_prefix("redlock://").unwrap_or(url);
        let hosts = rest.split(['/', '?']).next().unwrap_or_default();
        let mut nodes = Vec::new();
        for host in hosts.split(',') {
            let client =
                redis::Client::open(format!("redis://{host}")).map_err(|err| err.to_string())?;
            let what = format!("connect to the Redlock node {host}");
            nodes.push(bounded(&what, client.get_multiplexed_async_connection()).await?);
        }
        Ok(Redlock {
            nodes,
            release: Arc::new(Script::new(COMPARE_AND_DELETE)),
        })
    }

    fn majority(&self) -> usize {
        self.nodes.len() / 2 + 1
    }

    pub async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<Token>, String> {
        let owner = owner_token();
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let mut set = redis::cmd("SET");
        set.arg(key).arg(&owner).arg("NX").arg("PX").arg(ms);
        let answers = join_all(self.nodes.iter().map(|node| {
            let (mut node, set) = (node.clone(), set.clone());
            async move { bounded("SET NX", set.query_async::<Option<String>>(&mut node)).await }
        }))
        .await;
        // A node that failed counts as a refusal, as in Redlock.
        let granted = answers.iter().filter(|a| matches!(a, Ok(Some(_)))).count();
        if granted >= self.majority() {
            return Ok(Some(Token::Owner(owner)));
        }
        self.compare_and_delete(key, &owner).await;
        match answers.into_iter().find_map(Result::err) {
            Some(err) => Err(err),
            None => Ok(None),
        }
    }

    pub async fn release(&self, key: &str, owner: &str) -> Result<bool, String> {
        Ok(self.compare_and_delete(key, owner).await >= self.majority())
    }

    /// The compare-and-delete on every node at once; how many deleted the key.
    async fn compare_and_delete(&self, key: &str, owner: &str) -> usize {
        let answers = join_all(self.nodes.iter().map(|node| {
            let mut node = node.clone();
            let mut invocation = self.release.key(key);
            invocation.arg(owner);
            async move { bounded("EVALSHA", invocation.invoke_async::<i64>(&mut node)).await }
        }))
        .await;
        answers.iter().filter(|a| matches!(a, Ok(1))).count()
    }
}
