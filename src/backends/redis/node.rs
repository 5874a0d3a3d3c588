//! One Redis store: a lazily (re)connected multiplexed connection, the key names of the
//! layout, and one method per script. Used by the single-node backend, N times by
//! Redlock, and over a slot-routing cluster connection by Redis Cluster: the scripts and
//! their arguments are the same whichever connection carries them ([`Connect`]).

use super::config::{NodeConfig, Options};
use super::renew_batch::{self, RenewScript, Renewal};
use super::scripts;
use crate::core::backend::{AcquireRequest, LockInfo, LockKind};
use crate::core::owner::Owner;
use crate::core::renew_batch::RenewBatcher;
use crate::error::{Error, Result};
use crate::key::Key;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, RedisResult, Value};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{LazyLock, OnceLock};
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
    /// `{<prefix><key>}:leases`: the reader or permit leases and their expiries.
    pub leases: String,
    /// `{<prefix><key>}:records`: the mode of the leases and one record per lease.
    pub records: String,
    /// `{<prefix><key>}:intents`: the writers waiting for the readers to drain.
    pub intents: String,
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
            leases: format!("{{{lock}}}:leases"),
            records: format!("{{{lock}}}:records"),
            intents: format!("{{{lock}}}:intents"),
            channel: format!("{prefix}released"),
            lock,
        }
    }

    /// The names for `key` under `prefix` in a cluster, where every key a script touches
    /// must be in one hash slot, and so must a shard channel published from it.
    ///
    /// `{K}:fence` is in `K`'s slot unless `K` contains a `}` or a hash tag of its own
    /// (`a{b}c` hashes `b`; `{a{b}c}:fence` hashes `a{b`). Only for those keys the side
    /// names get a leading tag chosen to hash to `K`'s slot: `{T}{K}:fence`, still
    /// unique per lock and still recognized as side keys.
    pub fn in_slot(prefix: &str, key: &str) -> KeyNames {
        let lock = format!("{prefix}{key}");
        let slot = hash_slot(lock.as_bytes());
        let side = |suffix: &str| {
            let plain = format!("{{{lock}}}:{suffix}");
            if hash_slot(plain.as_bytes()) == slot {
                plain
            } else {
                format!("{{{}}}{plain}", slot_tag(slot))
            }
        };
        KeyNames {
            fence: side("fence"),
            holder: side("holder"),
            leases: side("leases"),
            records: side("records"),
            intents: side("intents"),
            channel: side("released"),
            lock,
        }
    }
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the text
/// between the first `{` and the next `}`, if not empty) or of the whole key, mod 16384.
pub fn hash_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = key.get(open + 1..)?;
        let len = rest.iter().position(|&b| b == b'}')?;
        rest.get(..len).filter(|tag| !tag.is_empty())
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc & 0x3fff
}

/// Converts an answer, with redis-rs's error for a wrong shape.
fn parse<T: redis::FromRedisValue>(value: Value) -> RedisResult<T> {
    T::from_redis_value(value).map_err(Into::into)
}

/// A short hash tag (a decimal number) for every slot: the first number hashing there.
fn slot_tag(slot: u16) -> u32 {
    static TAGS: LazyLock<Vec<u32>> = LazyLock::new(|| {
        let mut tags = vec![u32::MAX; 16384];
        let mut left = tags.len();
        let mut n: u32 = 0;
        while left > 0 && n < u32::MAX {
            if let Some(tag) = tags.get_mut(usize::from(hash_slot(n.to_string().as_bytes()))) {
                if *tag == u32::MAX {
                    *tag = n;
                    left -= 1;
                }
            }
            n += 1;
        }
        tags
    });
    TAGS.get(usize::from(slot)).copied().unwrap_or(0)
}

/// Which key names and which release notification a [`Node`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One server: [`KeyNames::new`], releases PUBLISH on the prefix's channel.
    Single,
    /// A cluster: [`KeyNames::in_slot`]; releases SPUBLISH on the lock's own shard
    /// channel when the servers have sharded Pub/Sub (Redis 7+), else PUBLISH it.
    Cluster {
        /// The servers have SPUBLISH.
        sharded: bool,
    },
}

/// How a [`Node`] reaches its store: a [`redis::Client`] (one server, through a
/// `ConnectionManager`) or a [`ClusterClient`] (a cluster, through its connection that
/// routes each command to its slot's master and follows MOVED and ASK).
pub trait Connect: Clone + Send + Sync + 'static {
    /// The shared multiplexed connection.
    type Conn: ConnectionLike + Clone + Send + Sync + 'static;
    /// A server of the store, as [`Connect::servers`] lists them.
    type Server: Send + Sync + 'static;
    /// Commands sent on one [`Connect::Conn`] reach the server in the order their
    /// futures were first polled, and it runs them in that order.
    const KEEPS_CALL_ORDER: bool;

    /// Connects, each connection attempt bounded by `options.connect_timeout`.
    fn open(&self, options: &Options) -> impl Future<Output = RedisResult<Self::Conn>> + Send;

    /// The servers that between them hold every key: the one server, or every master.
    fn servers(
        conn: &mut Self::Conn,
    ) -> impl Future<Output = RedisResult<Vec<Self::Server>>> + Send;

    /// Runs `cmd` on `server` (`None`: on any one server of the store).
    fn query_on(
        conn: &mut Self::Conn,
        cmd: Cmd,
        server: Option<&Self::Server>,
    ) -> impl Future<Output = RedisResult<Value>> + Send;
}

impl Connect for redis::Client {
    type Conn = ConnectionManager;
    type Server = ();
    // A multiplexed connection queues each command into its one socket's pipeline
    // when first polled (once connected), and the server answers a socket in order.
    const KEEPS_CALL_ORDER: bool = true;

    async fn open(&self, options: &Options) -> RedisResult<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.command_timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        ConnectionManager::new_with_config(self.clone(), config).await
    }

    async fn servers(_: &mut ConnectionManager) -> RedisResult<Vec<()>> {
        Ok(vec![()])
    }

    async fn query_on(
        conn: &mut ConnectionManager,
        cmd: Cmd,
        _: Option<&()>,
    ) -> RedisResult<Value> {
        cmd.query_async(conn).await
    }
}

impl Connect for ClusterClient {
    type Conn = ClusterConnection;
    /// `(host, port)` of a master.
    type Server = (String, u16);
    // The cluster connection routes each request by itself, concurrently with the
    // others, and may retry it after a redirection.
    const KEEPS_CALL_ORDER: bool = false;

    async fn open(&self, _: &Options) -> RedisResult<ClusterConnection> {
        // The timeouts and retries were set when the client was built.
        self.get_async_connection().await
    }

    async fn servers(conn: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
        // CLUSTER SLOTS (rather than SHARDS) so that Redis 6 clusters are listed too:
        // [[start, end, [host, port, id, …], replica…], …].
        let slots: Vec<Vec<Value>> = parse(
            conn.route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
            )
            .await?,
        )?;
        let mut masters: Vec<(String, u16)> = Vec::new();
        for range in slots {
            let Some(master) = range.into_iter().nth(2) else {
                continue;
            };
            let (host, port): (String, u16) = match master {
                Value::Array(fields) if fields.len() >= 2 => {
                    (parse(fields[0].clone())?, parse(fields[1].clone())?)
                }
                _ => continue,
            };
            if !masters.contains(&(host.clone(), port)) {
                masters.push((host, port));
            }
        }
        Ok(masters)
    }

    async fn query_on(
        conn: &mut ClusterConnection,
        cmd: Cmd,
        server: Option<&(String, u16)>,
    ) -> RedisResult<Value> {
        let route = match server {
            Some((host, port)) => SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            },
            None => SingleNodeRoutingInfo::RandomPrimary,
        };
        conn.route_command(cmd, RoutingInfo::SingleNode(route))
            .await
    }
}

/// The suffixes of the side keys of a lock.
const SIDE_SUFFIXES: &[&str] = &["}:fence", "}:holder", "}:leases", "}:records", "}:intents"];

/// True if a key found by SCAN is one of the side keys rather than a lock.
fn is_side_key(name: &str) -> bool {
    name.starts_with('{') && SIDE_SUFFIXES.iter().any(|suffix| name.ends_with(suffix))
}

/// What the acquire script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAttempt {
    /// Taken; `number` is the fence (single node) or the node's counter (Redlock), and
    /// `slot` the semaphore slot the permit took (0 for other kinds).
    Taken {
        /// The fence or the counter.
        number: u64,
        /// The semaphore slot.
        slot: u32,
    },
    /// Held by somebody else; ms until a retry may succeed (-1: the holder has no expiry).
    Held(i64),
    /// The key's permits were taken with this other count.
    Mismatch(u32),
}

/// The script's code for a kind.
fn kind_code(kind: LockKind) -> (&'static str, u32) {
    match kind {
        LockKind::Shared => ("s", 0),
        LockKind::Semaphore { permits } => ("p", permits),
        _ => ("x", 0),
    }
}

/// What the kinds' scripts keep per reader or permit lease (every number a string, so
/// that Lua keeps all its digits).
#[derive(Debug, Default, serde::Deserialize)]
struct LeaseRecord {
    fence: Option<String>,
    pid: Option<String>,
    host: Option<String>,
    value: Option<String>,
    acquired_ms: Option<String>,
    renewed_ms: Option<String>,
    ttl_ms: Option<String>,
}

/// One Redis node, or one Redis Cluster seen through its slot-routing connection.
pub struct Node<C: Connect = redis::Client> {
    config: NodeConfig<C>,
    layout: Layout,
    conn: OnceCell<C::Conn>,
    /// Exclusive renewals on a single server, sent in batches; made with the connection.
    renewals: OnceLock<RenewBatcher<RenewScript<C>>>,
}

impl<C: Connect> std::fmt::Debug for Node<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("describe", &self.config.describe)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
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
    /// A single server that connects on first use.
    pub fn new(config: NodeConfig) -> Node {
        Node::with_layout(config, Layout::Single)
    }
}

impl<C: Connect> Node<C> {
    /// A store with the given layout that connects on first use.
    pub fn with_layout(config: NodeConfig<C>, layout: Layout) -> Node<C> {
        Node {
            config,
            layout,
            conn: OnceCell::new(),
            renewals: OnceLock::new(),
        }
    }

    /// The same store with another layout, keeping the connection.
    pub fn into_layout(self, layout: Layout) -> Node<C> {
        Node { layout, ..self }
    }

    /// The node's URL without password.
    pub fn describe(&self) -> &str {
        &self.config.describe
    }

    /// The key names of `key` on this node.
    pub fn names(&self, key: &Key) -> KeyNames {
        match self.layout {
            Layout::Single => KeyNames::new(&self.config.options.prefix, key.as_str()),
            Layout::Cluster { .. } => KeyNames::in_slot(&self.config.options.prefix, key.as_str()),
        }
    }

    /// True if releases are published on shard channels.
    fn sharded(&self) -> bool {
        self.layout == Layout::Cluster { sharded: true }
    }

    /// Maps a redis-rs error to dlock's, naming this node and never its password.
    pub fn error(&self, err: &redis::RedisError) -> Error {
        map_error(&self.config.describe, err)
    }

    /// The shared multiplexed connection, connecting (once, shared by concurrent
    /// callers) if needed. It reconnects by itself after the server goes away.
    pub async fn connection(&self) -> Result<C::Conn> {
        let options = &self.config.options;
        let connect = async {
            match tokio::time::timeout(
                options.connect_timeout + options.command_timeout,
                self.config.client.open(options),
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
        bounded(
            &self.config.describe,
            self.config.options.command_timeout,
            what,
            call,
        )
        .await
    }

    async fn invoke<T: redis::FromRedisValue>(&self, call: &ScriptCall<'_>) -> Result<T> {
        let mut conn = self.connection().await?;
        run_script::<C, T>(
            &mut conn,
            call,
            &self.config.describe,
            self.config.options.command_timeout,
        )
        .await
    }

    /// The single-node acquire script (`redlock == false`) or Redlock's phase 1, for any
    /// kind; a permit tries the semaphore slots from `first_slot` on.
    pub async fn acquire(
        &self,
        request: &AcquireRequest<'_>,
        redlock: bool,
        first_slot: u32,
    ) -> Result<NodeAttempt> {
        let names = self.names(request.key);
        let script = &*scripts::ACQUIRE;
        let (kind, permits) = kind_code(request.kind);
        let requested_ms = request
            .holder
            .requested_at
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0);
        let mut call = ScriptCall::new(script, 6);
        call.key(&names.lock)
            .key(&names.fence)
            .key(&names.holder)
            .key(&names.leases)
            .key(&names.records)
            .key(&names.intents)
            .arg(request.owner.as_str())
            .arg(ms(request.ttl))
            .arg(request.holder.pid)
            .arg(&request.holder.host)
            .arg(requested_ms)
            .arg(kind)
            .arg(permits)
            .arg(request.holder.value.as_deref().unwrap_or(""))
            .arg(u8::from(request.holder.value.is_some()))
            .arg(scripts::WRITER_INTENT_MS)
            .arg(first_slot)
            .arg(u8::from(redlock));
        let (taken, number, slot): (i64, String, u32) = self.invoke(&call).await?;
        let parse = |text: &str| {
            text.parse::<i64>().map_err(|_| {
                Error::backend(
                    &self.config.describe,
                    format!("unexpected script answer {text:?}"),
                )
            })
        };
        let value = parse(&number)?;
        let unsigned = |what: &str| {
            u64::try_from(value).map_err(|_| {
                Error::backend(&self.config.describe, format!("negative {what} {value}"))
            })
        };
        match taken {
            1 => Ok(NodeAttempt::Taken {
                number: unsigned("fence counter")?,
                slot,
            }),
            2 => Ok(NodeAttempt::Mismatch(
                u32::try_from(unsigned("permit count")?).unwrap_or(u32::MAX),
            )),
            _ => Ok(NodeAttempt::Held(value)),
        }
    }

    /// Redlock phase 2: records `fence` on this node if `owner` still holds its lease of
    /// `kind` on `key` here.
    pub async fn commit_fence(
        &self,
        key: &Key,
        owner: &Owner,
        fence: u64,
        kind: LockKind,
    ) -> Result<bool> {
        let names = self.names(key);
        let mut call = ScriptCall::new(&scripts::REDLOCK_COMMIT, 5);
        call.key(&names.lock)
            .key(&names.fence)
            .key(&names.holder)
            .key(&names.leases)
            .key(&names.records)
            .arg(owner.as_str())
            .arg(fence.to_string())
            .arg(kind_code(kind).0);
        let done: i64 = self.invoke(&call).await?;
        Ok(done == 1)
    }

    /// Owner-checked extension of a lease of `kind`. An exclusive lease on a single
    /// server renews with the others that fall due at the same moment, in one call.
    pub async fn renew(
        &self,
        key: &Key,
        owner: &Owner,
        ttl: Duration,
        kind: LockKind,
    ) -> Result<bool> {
        if kind == LockKind::Exclusive && self.layout == Layout::Single {
            return self
                .renewals()
                .await?
                .renew(Renewal {
                    key: key.clone(),
                    owner: owner.clone(),
                    ttl_ms: ms(ttl),
                })
                .await;
        }
        let names = self.names(key);
        let mut call = ScriptCall::with_capacity(&scripts::RENEW, 2, 4, 256);
        if kind == LockKind::Exclusive {
            call.key(&names.lock)
                .key(&names.holder)
                .arg(now_ms())
                .arg(owner.as_str())
                .arg(ms(ttl));
            let done: Vec<i64> = self.invoke(&call).await?;
            return Ok(done.first() == Some(&1));
        }
        call = ScriptCall::with_capacity(&scripts::RENEW_SHARED, 2, 4, 256);
        call.key(&names.leases)
            .key(&names.records)
            .arg(owner.as_str())
            .arg(ms(ttl))
            .arg(now_ms());
        let done: i64 = self.invoke(&call).await?;
        Ok(done == 1)
    }

    /// The batcher of this server's exclusive renewals, made on first use.
    async fn renewals(&self) -> Result<&RenewBatcher<RenewScript<C>>> {
        if let Some(batcher) = self.renewals.get() {
            return Ok(batcher);
        }
        let conn = self.connection().await?;
        Ok(self.renewals.get_or_init(|| {
            renew_batch::batcher::<C>(
                conn,
                &self.config.options.prefix,
                &self.config.describe,
                self.config.options.command_timeout,
            )
        }))
    }

    /// Owner-checked removal of whatever lease `owner` has on `key` (and of its writer
    /// intent), publishing to waiters.
    pub async fn release(&self, key: &Key, owner: &Owner) -> Result<bool> {
        self.release_keeping_intent(key, owner, false).await
    }

    /// [`release`](Node::release), keeping the writer intent if `keep_intent`: a
    /// Redlock attempt that failed gives back what it took on some nodes, but its writer
    /// still waits.
    pub async fn release_keeping_intent(
        &self,
        key: &Key,
        owner: &Owner,
        keep_intent: bool,
    ) -> Result<bool> {
        let names = self.names(key);
        let script = if self.sharded() {
            &*scripts::RELEASE_SHARDED
        } else {
            &*scripts::RELEASE
        };
        let mut call = ScriptCall::new(script, 5);
        call.key(&names.lock)
            .key(&names.holder)
            .key(&names.leases)
            .key(&names.records)
            .key(&names.intents)
            .arg(owner.as_str())
            .arg(&names.channel)
            .arg(key.as_str())
            .arg(u8::from(keep_intent));
        let done: i64 = self.invoke(&call).await?;
        Ok(done == 1)
    }

    /// Breaks every lease of `key` whoever holds it, publishing to waiters.
    pub async fn force_release(&self, key: &Key) -> Result<bool> {
        let names = self.names(key);
        let script = if self.sharded() {
            &*scripts::FORCE_RELEASE_SHARDED
        } else {
            &*scripts::FORCE_RELEASE
        };
        let mut call = ScriptCall::new(script, 5);
        call.key(&names.lock)
            .key(&names.holder)
            .key(&names.leases)
            .key(&names.records)
            .key(&names.intents)
            .arg(&names.channel)
            .arg(key.as_str());
        let held: i64 = self.invoke(&call).await?;
        Ok(held > 0)
    }

    /// Who holds `key` on this node: its writer, or its readers or permits.
    pub async fn inspect(&self, key: &Key) -> Result<Option<LockInfo>> {
        let names = self.names(key);
        let mut call = ScriptCall::new(&scripts::INSPECT, 4);
        call.key(&names.lock)
            .key(&names.holder)
            .key(&names.leases)
            .key(&names.records);
        let answer: Option<(String, String, String, Vec<String>)> = self.invoke(&call).await?;
        let Some((mode, first, second, fields)) = answer else {
            return Ok(None);
        };
        if mode == "exclusive" {
            return Ok(exclusive_info(key, first, &second, &fields));
        }
        let kind = match mode.as_str() {
            "semaphore" => LockKind::Semaphore {
                permits: first.parse().unwrap_or(0),
            },
            _ => LockKind::Shared,
        };
        let mut holders: Vec<LockInfo> = fields
            .chunks_exact(3)
            .map(|lease| lease_info(key, &lease[0], &lease[1], &lease[2]))
            .collect();
        if holders.is_empty() {
            return Ok(None);
        }
        holders.sort_by_key(|h| h.fence);
        Ok(Some(LockInfo::of_holders(key.as_str(), kind, holders)))
    }

    /// The lock keys under the prefix (side keys excluded), by SCAN on every server that
    /// holds keys (every master of a cluster).
    pub async fn scan_keys(&self) -> Result<Vec<String>> {
        let prefix = &self.config.options.prefix;
        // Keys held only by readers or permits have no lock key, only their lease set,
        // whose name contains the prefix after a `{`.
        let pattern = format!("*{}*", glob_escape(prefix));
        let mut conn = self.connection().await?;
        let servers = self
            .bounded("listing the servers", C::servers(&mut conn))
            .await?;
        let mut found = Vec::new();
        for server in &servers {
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let answer = C::query_on(&mut conn, scan, Some(server));
                let (next, batch): (u64, Vec<Vec<u8>>) =
                    self.bounded("SCAN", async { parse(answer.await?) }).await?;
                for name in batch {
                    // Keys are UTF-8 by construction (dlock keys are); skip anything else.
                    let Ok(name) = String::from_utf8(name) else {
                        continue;
                    };
                    if let Some(key) = key_of_scanned(&name, prefix, |key| match self.layout {
                        Layout::Single => KeyNames::new(prefix, key),
                        Layout::Cluster { .. } => KeyNames::in_slot(prefix, key),
                    }) {
                        found.push(key);
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// `INFO server` of one server of the store.
    async fn server_info(&self) -> Result<String> {
        let mut conn = self.connection().await?;
        let mut command = redis::cmd("INFO");
        command.arg("server");
        let answer = C::query_on(&mut conn, command, None);
        self.bounded("INFO", async { parse(answer.await?) }).await
    }

    /// A field of `INFO server`, empty if absent.
    async fn info_field(&self, name: &str) -> Result<String> {
        let info = self.server_info().await?;
        Ok(info
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or("")
            .trim()
            .to_owned())
    }

    /// `INFO server`'s run_id, which changes at every server start.
    pub async fn run_id(&self) -> Result<String> {
        self.info_field("run_id").await
    }

    /// The major version the server reports as `redis_version` (Valkey reports the
    /// Redis version it is compatible with there), 0 if it cannot be read.
    pub async fn major_version(&self) -> Result<u32> {
        let version = self.info_field("redis_version").await?;
        Ok(version
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .unwrap_or(0))
    }
}

/// The record of an exclusive lock from the inspect script's answer.
fn exclusive_info(key: &Key, owner: String, pttl: &str, fields: &[String]) -> Option<LockInfo> {
    let pttl: i64 = pttl.parse().unwrap_or(-1);
    if pttl == -2 {
        return None;
    }
    let holder: HashMap<String, String> = fields
        .chunks_exact(2)
        .map(|pair| (pair[0].clone(), pair[1].clone()))
        .collect();
    let mut info = LockInfo::new(key.as_str());
    if pttl >= 0 {
        info.expires_at = Some(SystemTime::now() + Duration::from_millis(pttl.unsigned_abs()));
    } else {
        info.note =
            Some("the Redis key has no expiry: set by a client that does not use a TTL".to_owned());
    }
    if holder.get("owner") == Some(&owner) {
        let number = |name: &str| holder.get(name).and_then(|v| v.parse::<u64>().ok());
        let time = |name: &str| number(name).map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        info.fence = number("fence").filter(|f| *f > 0);
        info.pid = number("pid").and_then(|p| u32::try_from(p).ok());
        info.host = holder.get("host").cloned();
        info.value = holder.get("value").cloned();
        info.acquired_at = time("acquired_ms");
        info.renewed_at = time("renewed_ms");
        info.ttl = number("ttl_ms").map(Duration::from_millis);
    } else if info.note.is_none() {
        info.note = Some("held by a client that does not use dlock (no holder record)".to_owned());
    }
    info.owner = Some(owner);
    Some(info)
}

/// The record of one reader or permit lease: its owner, its remaining ms and its JSON
/// record as the inspect script returns them.
fn lease_info(key: &Key, owner: &str, pttl: &str, record: &str) -> LockInfo {
    let record: LeaseRecord = serde_json::from_str(record).unwrap_or_default();
    let number = |text: &Option<String>| text.as_deref().and_then(|v| v.parse::<u64>().ok());
    let time =
        |text: &Option<String>| number(text).map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    let mut info = LockInfo::new(key.as_str());
    info.owner = Some(owner.to_owned());
    info.fence = number(&record.fence).filter(|f| *f > 0);
    info.pid = number(&record.pid).and_then(|p| u32::try_from(p).ok());
    info.host = record.host.clone();
    info.value = record.value.clone();
    info.acquired_at = time(&record.acquired_ms);
    info.renewed_at = time(&record.renewed_ms);
    info.ttl = number(&record.ttl_ms).map(Duration::from_millis);
    info.expires_at = pttl
        .parse::<u64>()
        .ok()
        .map(|ms| SystemTime::now() + Duration::from_millis(ms));
    info
}

/// The dlock key a SCAN result stands for: the lock `<prefix><key>` itself, or the
/// reader/permit set `{<prefix><key>}:leases` (also with a cluster's leading slot tag)
/// of a key held only by readers or permits; `None` for anything else.
fn key_of_scanned(name: &str, prefix: &str, names: impl Fn(&str) -> KeyNames) -> Option<String> {
    if !is_side_key(name) {
        return name.strip_prefix(prefix).map(str::to_owned);
    }
    let inner = name.strip_suffix("}:leases")?;
    // `{<lock>` or, with a slot tag, `{T}{<lock>`.
    let candidates = [
        inner.strip_prefix('{'),
        inner
            .find('}')
            .and_then(|end| inner.get(end + 1..))
            .and_then(|rest| rest.strip_prefix('{')),
    ];
    candidates
        .into_iter()
        .flatten()
        .filter_map(|lock| lock.strip_prefix(prefix))
        .find(|key| names(key).leases == name)
        .map(str::to_owned)
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

/// Bounds one command of the store `describe` names (including any wait for a
/// reconnection in progress, which redis-rs's own response timeout does not cover) by
/// `limit`, its `command_timeout`.
pub(super) async fn bounded<T>(
    describe: &str,
    limit: Duration,
    what: &str,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(outcome) => outcome.map_err(|err| map_error(describe, &err)),
        Err(_) => Err(Error::unavailable(
            describe,
            format!(
                "{what} did not answer within {} (command_timeout)",
                crate::duration::format_duration(limit)
            ),
        )),
    }
}

/// Sends a script call on `conn`, loading the script first if the server does not know
/// it, bounded by `limit` as [`bounded`] does.
pub(super) async fn run_script<C: Connect, T: redis::FromRedisValue>(
    conn: &mut C::Conn,
    call: &ScriptCall<'_>,
    describe: &str,
    limit: Duration,
) -> Result<T> {
    let evalsha = call.evalsha();
    bounded(describe, limit, "a script call", async {
        match evalsha.query_async(conn).await {
            // The server has not seen the script yet (or forgot it: a restart, SCRIPT
            // FLUSH): load it and send the call again.
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                call.script.load_async(conn).await?;
                evalsha.query_async(conn).await
            }
            other => other,
        }
    })
    .await
}

/// One script call written straight into the one buffer of a `redis::Cmd`, `EVALSHA hash
/// numkeys keys… args…`, rather than through redis-rs's `ScriptInvocation`, which
/// allocates a vector per key and argument and copies them into a command at each call.
/// Loaded on NOSCRIPT. The number of keys comes first, so it is given up front (and
/// checked against the keys added in debug builds).
pub(super) struct ScriptCall<'a> {
    script: &'a redis::Script,
    cmd: Cmd,
    keys: usize,
    keys_added: usize,
}

impl<'a> ScriptCall<'a> {
    pub(super) fn new(script: &'a redis::Script, keys: usize) -> ScriptCall<'a> {
        // Room for the longest call (6 keys, 12 arguments) without growing.
        ScriptCall::with_capacity(script, keys, 24, 512)
    }

    /// A call with room for `args` words (keys and arguments, plus the 3 of `EVALSHA
    /// hash numkeys`) of `bytes` in all, so that the command buffer never grows.
    pub(super) fn with_capacity(
        script: &'a redis::Script,
        keys: usize,
        args: usize,
        bytes: usize,
    ) -> ScriptCall<'a> {
        let mut cmd = Cmd::with_capacity(args, bytes);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        ScriptCall {
            script,
            cmd,
            keys,
            keys_added: 0,
        }
    }

    /// The next key; every key comes before the first argument.
    pub(super) fn key<T: redis::ToRedisArgs>(&mut self, key: T) -> &mut Self {
        self.cmd.arg(key);
        self.keys_added += 1;
        self
    }

    pub(super) fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        debug_assert_eq!(
            self.keys_added, self.keys,
            "a script call's keys come first"
        );
        self.cmd.arg(arg);
        self
    }

    fn evalsha(&self) -> &Cmd {
        debug_assert_eq!(
            self.keys_added, self.keys,
            "a script call's declared key count"
        );
        &self.cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_call_is_evalsha_hash_numkeys_keys_then_args() {
        let script = redis::Script::new("return 1");
        let mut call = ScriptCall::new(&script, 2);
        call.key("k1").key("k2").arg("owner").arg(30_000u64);
        let parts: Vec<&[u8]> = call
            .evalsha()
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => bytes,
                _ => b"<not a plain argument>",
            })
            .collect();
        let expected: Vec<&[u8]> = vec![
            b"EVALSHA",
            script.get_hash().as_bytes(),
            b"2",
            b"k1",
            b"k2",
            b"owner",
            b"30000",
        ];
        assert_eq!(parts, expected);
    }

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

    #[test]
    fn scanned_names_map_back_to_their_keys() {
        let single = |key: &str| KeyNames::new("dlock:", key);
        let cluster = |key: &str| KeyNames::in_slot("dlock:", key);
        for key in ["job", "a{b}c", "x}y", "{}", "}:leases"] {
            for names in [single(key), cluster(key)] {
                let of = |name: &str| {
                    key_of_scanned(name, "dlock:", |k| {
                        if names.leases.starts_with("{dlock:") {
                            single(k)
                        } else {
                            cluster(k)
                        }
                    })
                };
                assert_eq!(of(&names.lock).as_deref(), Some(key), "{names:?}");
                assert_eq!(of(&names.leases).as_deref(), Some(key), "{names:?}");
                for side in [&names.fence, &names.holder, &names.records, &names.intents] {
                    assert_eq!(of(side), None, "{side}");
                }
            }
        }
        assert_eq!(key_of_scanned("other:job", "dlock:", single), None);
    }

    #[test]
    fn hash_slots_follow_the_cluster_spec() {
        // The reference values of the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(hash_slot(b"123456789"), 0x31c3);
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"user1000"));
        // An empty tag hashes the whole key.
        assert_ne!(hash_slot(b"foo{}{bar}"), hash_slot(b"bar"));
        assert_eq!(hash_slot(b"foo{{bar}}zap"), hash_slot(b"{bar"));
        assert_eq!(hash_slot(b"foo{bar}{zap}"), hash_slot(b"bar"));
    }

    #[test]
    fn cluster_names_share_the_lock_slot() {
        for key in [
            "job",
            "a{b}c",
            "x}y",
            "{}",
            "{",
            "}",
            "é{🔒}",
            "*?[]{}$(rm -rf /)",
        ] {
            let names = KeyNames::in_slot("dlock:", key);
            let slot = hash_slot(names.lock.as_bytes());
            for side in [
                &names.fence,
                &names.holder,
                &names.leases,
                &names.records,
                &names.intents,
                &names.channel,
            ] {
                assert_eq!(hash_slot(side.as_bytes()), slot, "{key:?}: {side}");
            }
            assert!(
                is_side_key(&names.fence) && is_side_key(&names.holder),
                "{names:?}"
            );
            assert_eq!(names.lock, format!("dlock:{key}"));
        }
        // Keys without braces keep the single-node names.
        let plain = KeyNames::in_slot("dlock:", "job");
        assert_eq!(plain.fence, KeyNames::new("dlock:", "job").fence);
        assert_eq!(plain.channel, "{dlock:job}:released");
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
