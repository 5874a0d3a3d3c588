//! One Redis node: a lazily (re)connected multiplexed connection, the key names of the
//! layout, and one method per script. Used by the single-node backend and, N times, by
//! Redlock.

use super::config::NodeConfig;
use super::scripts;
use crate::core::backend::{AcquireRequest, LockInfo};
use crate::core::owner::Owner;
use crate::error::{Error, Result};
use crate::key::Key;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::OnceCell;

/// The Redis key names of one lock.
#[derive(Debug, Clone)]
pub struct KeyNames {
    /// `<prefix><key>`: holds the owner token.
    pub lock: String,
    /// `{<prefix><key>}:fence`: the fencing counter.
    pub fence: String,
    /// `{<prefix><key>}:holder`: who holds it, for `status`.
    pub holder: String,
    /// `<prefix>released`: the Pub/Sub channel a release publishes the key on.
    pub channel: String,
}

impl KeyNames {
    /// The names for `key` under `prefix`.
    pub fn new(prefix: &str, key: &str) -> KeyNames {
        let lock = format!("{prefix}{key}");
        KeyNames {
            fence: format!("{{{lock}}}:fence"),
            holder: format!("{{{lock}}}:holder"),
            channel: format!("{prefix}released"),
            lock,
        }
    }
}

/// True if a key found by SCAN is one of the side keys rather than a lock.
fn is_side_key(name: &str) -> bool {
    name.starts_with('{') && (name.ends_with("}:fence") || name.ends_with("}:holder"))
}

/// What the acquire script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAttempt {
    /// Taken; the number is the fence (single node) or the node's counter (Redlock).
    Taken(u64),
    /// Held by somebody else; remaining TTL in ms (-1: no expiry).
    Held(i64),
}

/// One Redis node.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    conn: OnceCell<ConnectionManager>,
}

/// Milliseconds since the Unix epoch, for the holder record.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Node {
    /// A node that connects on first use.
    pub fn new(config: NodeConfig) -> Node {
        Node {
            config,
            conn: OnceCell::new(),
        }
    }

    /// The node's URL without password.
    pub fn describe(&self) -> &str {
        &self.config.describe
    }

    /// The key names of `key` on this node.
    pub fn names(&self, key: &Key) -> KeyNames {
        KeyNames::new(&self.config.options.prefix, key.as_str())
    }

    /// Maps a redis-rs error to dlock's, naming this node and never its password.
    pub fn error(&self, err: &redis::RedisError) -> Error {
        map_error(&self.config.describe, err)
    }

    /// The shared multiplexed connection, connecting (once, shared by concurrent
    /// callers) if needed. It reconnects by itself after the server goes away.
    pub async fn connection(&self) -> Result<ConnectionManager> {
        let options = &self.config.options;
        let connect = async {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(options.connect_timeout))
                .set_response_timeout(Some(options.command_timeout))
                .set_number_of_retries(2)
                .set_min_delay(Duration::from_millis(20))
                .set_max_delay(Duration::from_millis(500));
            let client = self.config.client.clone();
            match tokio::time::timeout(
                options.connect_timeout + options.command_timeout,
                ConnectionManager::new_with_config(client, config),
            )
            .await
            {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(err)) => Err(self.error(&err)),
                Err(_) => Err(Error::unavailable(
                    &self.config.describe,
                    format!("connecting timed out after {:?}", options.connect_timeout),
                )),
            }
        };
        self.conn.get_or_try_init(|| connect).await.cloned()
    }

    /// Bounds one command (including any wait for a reconnection in progress, which
    /// redis-rs's own response timeout does not cover) by `command_timeout`.
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        let limit = self.config.options.command_timeout;
        match tokio::time::timeout(limit, call).await {
            Ok(outcome) => outcome.map_err(|err| self.error(&err)),
            Err(_) => Err(Error::unavailable(
                &self.config.describe,
                format!(
                    "{what} did not answer within {} (command_timeout)",
                    crate::duration::format_duration(limit)
                ),
            )),
        }
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.connection().await?;
        self.bounded("a script call", invocation.invoke_async(&mut conn))
            .await
    }

    /// The single-node acquire script (`redlock == false`) or Redlock's phase 1.
    pub async fn acquire(
        &self,
        request: &AcquireRequest<'_>,
        redlock: bool,
    ) -> Result<NodeAttempt> {
        let names = self.names(request.key);
        let script = if redlock {
            &*scripts::REDLOCK_ACQUIRE
        } else {
            &*scripts::ACQUIRE
        };
        let requested_ms = request
            .holder
            .requested_at
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&names.lock)
            .key(&names.fence)
            .key(&names.holder)
            .arg(request.owner.as_str())
            .arg(ms(request.ttl))
            .arg(request.holder.pid)
            .arg(&request.holder.host)
            .arg(requested_ms);
        let (taken, number): (i64, String) = self.invoke(&invocation).await?;
        let parse = |text: &str| {
            text.parse::<i64>().map_err(|_| {
                Error::backend(
                    &self.config.describe,
                    format!("unexpected script answer {text:?}"),
                )
            })
        };
        let value = parse(&number)?;
        if taken == 1 {
            let fence = u64::try_from(value).map_err(|_| {
                Error::backend(
                    &self.config.describe,
                    format!("negative fence counter {value}"),
                )
            })?;
            Ok(NodeAttempt::Taken(fence))
        } else {
            Ok(NodeAttempt::Held(value))
        }
    }

    /// Redlock phase 2: records `fence` on this node if `owner` still holds `key` here.
    pub async fn commit_fence(&self, key: &Key, owner: &Owner, fence: u64) -> Result<bool> {
        let names = self.names(key);
        let mut invocation = scripts::REDLOCK_COMMIT.prepare_invoke();
        invocation
            .key(&names.lock)
            .key(&names.fence)
            .key(&names.holder)
            .arg(owner.as_str())
            .arg(fence.to_string());
        let done: i64 = self.invoke(&invocation).await?;
        Ok(done == 1)
    }

    /// Owner-checked PEXPIRE.
    pub async fn renew(&self, key: &Key, owner: &Owner, ttl: Duration) -> Result<bool> {
        let names = self.names(key);
        let mut invocation = scripts::RENEW.prepare_invoke();
        invocation
            .key(&names.lock)
            .key(&names.holder)
            .arg(owner.as_str())
            .arg(ms(ttl))
            .arg(now_ms());
        let done: i64 = self.invoke(&invocation).await?;
        Ok(done == 1)
    }

    /// Owner-checked DEL, publishing to waiters.
    pub async fn release(&self, key: &Key, owner: &Owner) -> Result<bool> {
        let names = self.names(key);
        let mut invocation = scripts::RELEASE.prepare_invoke();
        invocation
            .key(&names.lock)
            .key(&names.holder)
            .arg(owner.as_str())
            .arg(&names.channel)
            .arg(key.as_str());
        let done: i64 = self.invoke(&invocation).await?;
        Ok(done == 1)
    }

    /// DEL whoever holds it, publishing to waiters.
    pub async fn force_release(&self, key: &Key) -> Result<bool> {
        let names = self.names(key);
        let mut invocation = scripts::FORCE_RELEASE.prepare_invoke();
        invocation
            .key(&names.lock)
            .key(&names.holder)
            .arg(&names.channel)
            .arg(key.as_str());
        let held: i64 = self.invoke(&invocation).await?;
        Ok(held > 0)
    }

    /// Who holds `key` on this node.
    pub async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let names = self.names(key);
        let mut invocation = scripts::INSPECT.prepare_invoke();
        invocation.key(&names.lock).key(&names.holder);
        let answer: Option<(String, String, Vec<String>)> = self.invoke(&invocation).await?;
        let Some((owner, pttl, fields)) = answer else {
            return Ok(None);
        };
        let pttl: i64 = pttl.parse().unwrap_or(-1);
        if pttl == -2 {
            return Ok(None);
        }
        let holder: HashMap<String, String> = fields
            .chunks_exact(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect();
        let mut info = LockInfo::new(key.as_str());
        info.owner = Some(owner.clone());
        if pttl >= 0 {
            info.expires_at = Some(SystemTime::now() + Duration::from_millis(pttl.unsigned_abs()));
        } else {
            info.note = Some(
                "the Redis key has no expiry: set by a client that does not use a TTL".to_owned(),
            );
        }
        if holder.get("owner") == Some(&owner) {
            let number = |name: &str| holder.get(name).and_then(|v| v.parse::<u64>().ok());
            let time = |name: &str| number(name).map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
            info.fence = number("fence").filter(|f| *f > 0);
            info.pid = number("pid").and_then(|p| u32::try_from(p).ok());
            info.host = holder.get("host").cloned();
            info.acquired_at = time("acquired_ms");
            info.renewed_at = time("renewed_ms");
            info.ttl = number("ttl_ms").map(Duration::from_millis);
        } else if info.note.is_none() {
            info.note =
                Some("held by a client that does not use dlock (no holder record)".to_owned());
        }
        Ok(Some(info))
    }

    /// The lock keys under the prefix (side keys excluded), by SCAN.
    pub async fn scan_keys(&self) -> Result<Vec<String>> {
        let prefix = &self.config.options.prefix;
        let pattern = format!("{}*", glob_escape(prefix));
        let mut conn = self.connection().await?;
        let mut cursor: u64 = 0;
        let mut found = Vec::new();
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<Vec<u8>>) =
                self.bounded("SCAN", scan.query_async(&mut conn)).await?;
            for name in batch {
                // Keys are UTF-8 by construction (dlock keys are); skip anything else.
                let Ok(name) = String::from_utf8(name) else {
                    continue;
                };
                if is_side_key(&name) {
                    continue;
                }
                if let Some(key) = name.strip_prefix(prefix.as_str()) {
                    found.push(key.to_owned());
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// `INFO server`'s run_id, which changes at every server start.
    pub async fn run_id(&self) -> Result<String> {
        let mut conn = self.connection().await?;
        let mut command = redis::cmd("INFO");
        command.arg("server");
        let info: String = self.bounded("INFO", command.query_async(&mut conn)).await?;
        Ok(info
            .lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .unwrap_or("")
            .trim()
            .to_owned())
    }
}

/// Escapes the glob characters of SCAN MATCH.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Maps a redis-rs error: connection trouble, timeouts and a server not ready yet
/// (loading its data, failing over, busy with a script) are `Unavailable`, which waiters
/// retry until their deadline; refused credentials or permissions, and every other answer
/// of the server, are `Backend`, which fails at once. The redis-rs error is kept as the
/// source. Never includes a password: redis-rs errors do not carry the URL, and
/// `describe` is redacted.
pub fn map_error(describe: &str, err: &redis::RedisError) -> Error {
    let cause = err.clone();
    let code = err.code();
    if err.kind() == redis::ErrorKind::AuthenticationFailed
        || code.is_some_and(|c| matches!(c, "WRONGPASS" | "NOAUTH" | "NOPERM"))
    {
        return Error::backend(
            describe,
            format!(
                "authentication failed or permission denied (check the user and password in the URL, and the user's ACL): {err}"
            ),
        )
        .caused_by(cause);
    }
    if let Some(code) = code.filter(|c| is_not_ready_code(c)) {
        return Error::unavailable(describe, format!("the server is not ready ({code}): {err}"))
            .caused_by(cause);
    }
    if err.is_timeout() {
        return Error::unavailable(describe, format!("timed out: {err}")).caused_by(cause);
    }
    if err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() {
        return Error::unavailable(describe, err).caused_by(cause);
    }
    Error::backend(describe, err).caused_by(cause)
}

/// Error codes of a server that is up but cannot serve yet, and will by itself: loading
/// its data set after a restart, a replica without its master, a cluster re-sharding, or
/// a long script still running.
fn is_not_ready_code(code: &str) -> bool {
    matches!(
        code,
        "LOADING" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "BUSY"
    )
}

/// How long [`abandon_soon`] waits for its cleanup. The engine abandons an attempt when
/// the store did not answer it in time; a store in that state is unlikely to answer the
/// cleanup at once either, and waiting longer would only delay the caller's error.
const ABANDON_WAIT: Duration = Duration::from_millis(250);

/// Runs the cleanup of an abandoned attempt, waiting for it briefly; if the store is slow
/// it finishes in the background (each of its commands bounded by `command_timeout`), and
/// whatever it could not free ends at its TTL.
pub async fn abandon_soon(
    cleanup: impl std::future::Future<Output = Result<()>> + Send + 'static,
) -> Result<()> {
    let task = tokio::spawn(cleanup);
    match tokio::time::timeout(ABANDON_WAIT, task).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) | Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_a_hash_tag() {
        let names = KeyNames::new("dlock:", "job");
        assert_eq!(names.lock, "dlock:job");
        assert_eq!(names.fence, "{dlock:job}:fence");
        assert_eq!(names.holder, "{dlock:job}:holder");
        assert_eq!(names.channel, "dlock:released");
        assert!(is_side_key(&names.fence));
        assert!(!is_side_key(&names.lock));
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    fn server_answer(reply: &[u8]) -> redis::RedisError {
        match redis::parse_redis_value(reply).unwrap().extract_error() {
            Err(err) => err,
            Ok(value) => panic!("not an error reply: {value:?}"),
        }
    }

    #[test]
    fn errors_that_heal_are_transient_and_refusals_are_not() {
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        for (err, transient) in [
            (io, true),
            (
                server_answer(b"-LOADING Redis is loading the dataset in memory\r\n"),
                true,
            ),
            (
                server_answer(b"-BUSY Redis is busy running a script\r\n"),
                true,
            ),
            (
                server_answer(b"-MASTERDOWN Link with MASTER is down\r\n"),
                true,
            ),
            (
                server_answer(b"-WRONGPASS invalid username-password pair\r\n"),
                false,
            ),
            (
                server_answer(b"-NOAUTH Authentication required.\r\n"),
                false,
            ),
            (
                server_answer(
                    b"-NOPERM this user has no permissions to run the 'eval' command\r\n",
                ),
                false,
            ),
            (server_answer(b"-ERR unknown command\r\n"), false),
        ] {
            let mapped = map_error("redis://h:6379", &err);
            assert_eq!(
                mapped.is_transient(),
                transient,
                "{err:?} became {mapped:?}"
            );
            assert!(
                std::error::Error::source(&mapped).is_some(),
                "{mapped:?} lost its source"
            );
        }
    }
}
