//! The backends, one module each behind a cargo feature; [`crate::Scheme`] is their
//! registry. Each module offers `open(url)`, returning its backend behind the one trait.

pub mod counting;
#[cfg(feature = "dynamodb")]
pub mod dynamodb;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "file")]
pub mod file;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(feature = "mongodb")]
pub mod mongodb;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) mod sql_session;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) mod sql_sweep;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) mod sql_url;
#[cfg(feature = "zookeeper")]
pub mod zookeeper;
