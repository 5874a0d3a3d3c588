//! The backends, one module each behind a cargo feature, and the URL dispatch.

pub mod counting;
#[cfg(feature = "file")]
pub mod file;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub mod sql_url;

use crate::core::locks::Locks;
use crate::error::Result;
use crate::location::BackendUrl;

/// The URL schemes dlock knows, and the cargo feature that builds each.
pub const SCHEMES: &[(&str, &str)] = &[
    ("file", "file"),
    ("memory", "memory"),
    ("redis", "redis"),
    ("rediss", "redis"),
    ("redlock", "redis"),
    ("postgres", "postgres"),
    ("postgresql", "postgres"),
    ("mysql", "mysql"),
    ("etcd", "etcd"),
];

/// Opens the backend a URL names (SPEC §3).
pub async fn open(url: &str) -> Result<Locks> {
    // A multi-host authority is not a URL the `url` crate parses: Redlock parses its own.
    #[cfg(feature = "redis")]
    if redis::is_redlock_url(url) {
        return Ok(Locks::from_backend(redis::RedlockBackend::open(url).await?));
    }
    let url = BackendUrl::parse(url)?;
    match url.scheme() {
        #[cfg(feature = "file")]
        "file" => Ok(Locks::from_backend(file::FileBackend::open(&url)?)),
        #[cfg(feature = "memory")]
        "memory" => Ok(Locks::from_backend(memory::MemoryBackend::open(&url)?)),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => postgres::open(&url).await,
        #[cfg(feature = "mysql")]
        "mysql" => mysql::open(&url).await,
        #[cfg(feature = "redis")]
        "redis" | "rediss" => Ok(Locks::from_backend(redis::RedisBackend::open(&url).await?)),
        scheme => Err(unknown_scheme(&url, scheme)),
    }
}

/// The SQL that creates the tables a backend URL needs (PostgreSQL and MySQL), for
/// databases where clients may not run DDL; `None` for backends without a schema.
/// Nothing is connected to.
pub fn schema_sql(url: &str) -> Result<Option<String>> {
    if url.starts_with("redlock://") {
        return Ok(None);
    }
    let parsed = BackendUrl::parse(url)?;
    match parsed.scheme() {
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => postgres::schema_sql(url).map(Some),
        #[cfg(feature = "mysql")]
        "mysql" => mysql::schema_sql(url).map(Some),
        scheme if SCHEMES.iter().any(|(s, _)| *s == scheme) => Ok(None),
        scheme => Err(unknown_scheme(&parsed, scheme)),
    }
}

fn unknown_scheme(url: &BackendUrl, scheme: &str) -> crate::Error {
    match SCHEMES.iter().find(|(s, _)| *s == scheme) {
        Some((_, feature)) => url.error(format!(
            "this build of dlock has no {scheme}:// backend; build it with the cargo feature {feature:?}"
        )),
        None => {
            let known: Vec<String> = SCHEMES.iter().map(|(s, _)| format!("{s}://")).collect();
            url.error(format!("unknown backend {scheme:?}; known: {}", known.join(", ")))
        }
    }
}
