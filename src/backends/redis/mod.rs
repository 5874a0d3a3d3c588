//! Redis backends (cargo feature `redis`): `redis://` and `rediss://` for one node, and
//! `redlock://h1:p1,h2:p2,h3:p3` for the Redlock algorithm over N independent nodes, and
//! `redis+cluster://h1:p1,h2:p2,…` (`rediss+cluster://` for TLS) for a Redis Cluster.
//!
//! URL options (query string): `prefix` (default `dlock:`), `connect_timeout` (default
//! 5 s), `command_timeout` (default 2 s), `ca_file` (PEM of the CA that signed a
//! `rediss://` server's certificate). User, password and database number go in the URL
//! as usual: `redis://user:password@host:6379/2`. Passwords never appear in messages.
//!
//! The layout, the fence guarantee and the Redlock conditions are documented in
//! `docs/backends/redis.md`.

mod cluster;
mod config;
mod node;
mod redlock;
mod renew_batch;
mod scripts;
mod single;
mod waker;

pub(crate) use cluster::open_cluster;
pub use cluster::RedisClusterBackend;
pub use config::{Options, DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PREFIX};
pub use node::KeyNames;
pub(crate) use redlock::open_redlock;
pub use redlock::{is_redlock_url, RedlockBackend};
pub(crate) use single::open;
pub use single::RedisBackend;
