//! The one registry of backends: every URL scheme dlock knows, the cargo feature that
//! builds it, and the one place that opens a backend from its URL. Tests, the fault
//! harness and the benchmarks iterate [`Scheme::ALL`] instead of sniffing URLs.

use crate::core::backend::Backend;
use crate::error::{Error, Result};
use crate::location::redact;
use std::sync::Arc;

/// A kind of backend, as named by the scheme of its URL (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scheme {
    /// `file:///dir`: flock(2) on one file per key.
    File,
    /// `memory://[name]`: inside one process.
    Memory,
    /// `redis://`, `rediss://`: one Redis node.
    Redis,
    /// `redlock://h1:p1,h2:p2,…`: Redlock over independent Redis nodes.
    Redlock,
    /// `redis+cluster://h1:p1,h2:p2,…`, `rediss+cluster://`: a Redis Cluster, each lock
    /// in one hash slot.
    RedisCluster,
    /// `postgres://`, `postgresql://`: advisory locks or a lease table.
    Postgres,
    /// `mysql://`: `GET_LOCK` or a lease table.
    Mysql,
    /// `etcd://h1:p1,h2:p2,…`: etcd v3 leases, revisions and watches.
    Etcd,
    /// `zk://h1:p1,h2:p2[/chroot]`: ZooKeeper's lock recipe.
    Zookeeper,
    /// `mongodb://`: one document per key, expiry by the server's clock.
    Mongodb,
    /// `dynamodb://TABLE?region=…`: one item per key, conditional writes, takeover of a
    /// lease seen unrenewed for a whole lease.
    Dynamodb,
}

impl Scheme {
    /// Every scheme, built into this binary or not.
    pub const ALL: &'static [Scheme] = &[
        Scheme::File,
        Scheme::Memory,
        Scheme::Redis,
        Scheme::Redlock,
        Scheme::RedisCluster,
        Scheme::Postgres,
        Scheme::Mysql,
        Scheme::Etcd,
        Scheme::Zookeeper,
        Scheme::Mongodb,
        Scheme::Dynamodb,
    ];

    /// The URL schemes that name this backend; the first is the canonical one.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Scheme::File => &["file"],
            Scheme::Memory => &["memory"],
            Scheme::Redis => &["redis", "rediss"],
            Scheme::Redlock => &["redlock"],
            Scheme::RedisCluster => &["redis+cluster", "rediss+cluster"],
            Scheme::Postgres => &["postgres", "postgresql"],
            Scheme::Mysql => &["mysql"],
            Scheme::Etcd => &["etcd"],
            Scheme::Zookeeper => &["zk", "zookeeper"],
            Scheme::Mongodb => &["mongodb"],
            Scheme::Dynamodb => &["dynamodb"],
        }
    }

    /// How a URL of this backend is written, and what the backend is, for help texts.
    pub fn usage(self) -> (&'static str, &'static str) {
        match self {
            Scheme::File => (
                "file:///dir",
                "flock(2) on files in a directory of this host",
            ),
            Scheme::Memory => ("memory://[name]", "inside one process (tests)"),
            Scheme::Redis => (
                "redis://[user:pass@]host:port[/db]",
                "one Redis node (rediss:// for TLS)",
            ),
            Scheme::Redlock => (
                "redlock://h1:p1,h2:p2,h3:p3",
                "Redlock over independent Redis nodes",
            ),
            Scheme::Postgres => (
                "postgres://user@host/db[?mode=lease]",
                "PostgreSQL advisory locks or a lease table",
            ),
            Scheme::Mysql => (
                "mysql://user@host/db[?mode=lease]",
                "MySQL/MariaDB GET_LOCK or a lease table",
            ),
            Scheme::Etcd => ("etcd://h1:p1[,h2:p2,…]", "etcd v3 leases"),
            Scheme::Zookeeper => ("zk://h1:p1[,h2:p2,…][/chroot]", "ZooKeeper's lock recipe"),
            Scheme::Mongodb => (
                "mongodb://host:port/db[?collection=…]",
                "MongoDB, a document per key",
            ),
            Scheme::RedisCluster => (
                "redis+cluster://h1:p1,h2:p2,…",
                "Redis Cluster (rediss+cluster:// for TLS)",
            ),
            Scheme::Dynamodb => (
                "dynamodb://table?region=…[&endpoint=…]",
                "DynamoDB conditional writes",
            ),
        }
    }

    /// The cargo feature that builds this backend.
    pub fn feature(self) -> &'static str {
        match self {
            Scheme::File => "file",
            Scheme::Memory => "memory",
            Scheme::Redis | Scheme::Redlock | Scheme::RedisCluster => "redis",
            Scheme::Postgres => "postgres",
            Scheme::Mysql => "mysql",
            Scheme::Etcd => "etcd",
            Scheme::Zookeeper => "zookeeper",
            Scheme::Mongodb => "mongodb",
            Scheme::Dynamodb => "dynamodb",
        }
    }

    /// True if this build of dlock has the backend.
    pub fn is_enabled(self) -> bool {
        match self {
            Scheme::File => cfg!(feature = "file"),
            Scheme::Memory => cfg!(feature = "memory"),
            Scheme::Redis | Scheme::Redlock | Scheme::RedisCluster => cfg!(feature = "redis"),
            Scheme::Postgres => cfg!(feature = "postgres"),
            Scheme::Mysql => cfg!(feature = "mysql"),
            Scheme::Etcd => cfg!(feature = "etcd"),
            Scheme::Zookeeper => cfg!(feature = "zookeeper"),
            Scheme::Mongodb => cfg!(feature = "mongodb"),
            Scheme::Dynamodb => cfg!(feature = "dynamodb"),
        }
    }

    /// The scheme of a backend URL.
    ///
    /// ```
    /// use fencelock::Scheme;
    /// assert_eq!(Scheme::of("rediss://h:6380").unwrap(), Scheme::Redis);
    /// assert_eq!(Scheme::of("redlock://a:1,b:2,c:3").unwrap(), Scheme::Redlock);
    /// assert_eq!(Scheme::of("redis+cluster://a:1,b:2").unwrap(), Scheme::RedisCluster);
    /// assert!(Scheme::of("nosuch://x").unwrap_err().to_string().contains("unknown backend"));
    /// ```
    pub fn of(url: &str) -> Result<Scheme> {
        let bad = |reason: String| Error::BadUrl {
            url: redact(url),
            reason,
        };
        let Some((name, _)) = url.split_once("://") else {
            return Err(bad(format!(
                "expected SCHEME://…, e.g. file:///var/lock/dlock, memory://, redis://host:6379; known: {}",
                known()
            )));
        };
        let lower = name.to_ascii_lowercase();
        Scheme::ALL
            .iter()
            .copied()
            .find(|scheme| scheme.names().contains(&lower.as_str()))
            .ok_or_else(|| bad(format!("unknown backend {name:?}; known: {}", known())))
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://", self.names()[0])
    }
}

fn known() -> String {
    let all: Vec<String> = Scheme::ALL
        .iter()
        .flat_map(|s| s.names().iter().map(|n| format!("{n}://")))
        .collect();
    all.join(", ")
}

fn not_built(url: &str, scheme: Scheme) -> Error {
    Error::BadUrl {
        url: redact(url),
        reason: format!(
            "the feature for {scheme} is not enabled in this build; build dlock with the cargo feature {:?}",
            scheme.feature()
        ),
    }
}

/// Opens the backend a URL names.
pub(crate) async fn open(url: &str) -> Result<Arc<dyn Backend>> {
    let scheme = Scheme::of(url)?;
    #[allow(unreachable_patterns)]
    match scheme {
        #[cfg(feature = "file")]
        Scheme::File => crate::backends::file::open(url).await,
        #[cfg(feature = "memory")]
        Scheme::Memory => crate::backends::memory::open(url).await,
        #[cfg(feature = "redis")]
        Scheme::Redis => crate::backends::redis::open(url).await,
        #[cfg(feature = "redis")]
        Scheme::Redlock => crate::backends::redis::open_redlock(url).await,
        #[cfg(feature = "redis")]
        Scheme::RedisCluster => crate::backends::redis::open_cluster(url).await,
        #[cfg(feature = "postgres")]
        Scheme::Postgres => crate::backends::postgres::open(url).await,
        #[cfg(feature = "mysql")]
        Scheme::Mysql => crate::backends::mysql::open(url).await,
        #[cfg(feature = "etcd")]
        Scheme::Etcd => crate::backends::etcd::open(url).await,
        #[cfg(feature = "zookeeper")]
        Scheme::Zookeeper => crate::backends::zookeeper::open(url).await,
        #[cfg(feature = "mongodb")]
        Scheme::Mongodb => crate::backends::mongodb::open(url).await,
        #[cfg(feature = "dynamodb")]
        Scheme::Dynamodb => crate::backends::dynamodb::open(url).await,
        other => Err(not_built(url, other)),
    }
}

/// The SQL that creates what a backend URL needs, for stores where clients may not run
/// DDL; `None` for backends without a schema. Nothing is connected to.
///
/// ```
/// assert!(fencelock::schema_sql("memory://").unwrap().is_none());
/// ```
pub fn schema_sql(url: &str) -> Result<Option<String>> {
    let scheme = Scheme::of(url)?;
    #[allow(unreachable_patterns)]
    match scheme {
        #[cfg(feature = "postgres")]
        Scheme::Postgres => crate::backends::postgres::schema_sql(url).map(Some),
        #[cfg(feature = "mysql")]
        Scheme::Mysql => crate::backends::mysql::schema_sql(url).map(Some),
        #[cfg(feature = "dynamodb")]
        Scheme::Dynamodb => crate::backends::dynamodb::schema(url).map(Some),
        other if other.is_enabled() => Ok(None),
        other => Err(not_built(url, other)),
    }
}
