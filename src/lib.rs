//! # fencelock: distributed locks with leases and fencing tokens
//!
//! One API over the stores teams already run: local files (flock), memory, and (behind
//! cargo features) Redis (one node, Redlock, Cluster), PostgreSQL, MySQL/MariaDB, etcd,
//! ZooKeeper, MongoDB and DynamoDB. The `dlock` command of the same package is `flock(1)`
//! for a fleet. Every lock is a
//! [`Lease`]: an owner token, a TTL renewed automatically, a loss signal, and a
//! **fencing token** that strictly increases per key.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), fencelock::Error> {
//! # let dir = std::env::temp_dir().join(format!("dlock-doc-{}", std::process::id()));
//! # let url = format!("file://{}", dir.display());
//! let locks = fencelock::connect(&url).await?; // or "memory://", "redis://host:6379", …
//! let lease = locks.lock("nightly-report").acquire().await?;
//! println!("{} held with fence {}", lease.key(), lease.fence());
//! tokio::select! {
//!     reason = lease.lost() => eprintln!("lost the lock: {reason}"),
//!     () = async { /* the work */ } => {}
//! }
//! lease.release().await?;
//! # drop(locks);
//! # let _ = std::fs::remove_dir_all(&dir);
//! # Ok(()) }
//! ```
//!
//! The store behind a [`Locks`] handle implements [`backend::Backend`]; the lease engine
//! (acquire loop, renewal, loss detection, bounds on every store call) is written once,
//! and [`backend`] holds what a backend author needs.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![warn(missing_docs)]
// docs.rs builds with every feature and `--cfg docsrs`: each backend's items carry a
// "available on crate feature … only" badge.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod backends;
mod core;
mod duration;
mod error;
mod key;
mod location;
mod registry;

pub use crate::core::backend::{LockInfo, LockKind};
pub use crate::core::election::{ElectionBuilder, Leader, LeaderWatch, Leadership};
pub use crate::core::lease::{Lease, LeaseHandle};
pub use crate::core::locks::{LockBuilder, Locks, Wait, DEFAULT_TTL, MAX_TTL, MIN_TTL};
/// Metric names and options (see the module for names, types and labels).
pub use crate::core::metrics;
pub use crate::core::multi::{MultiLease, MultiLockBuilder};
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "mysql"))))]
pub use backends::sql_session::LEASES_PER_SESSION;
pub use duration::parse_duration;
pub use error::{Cause, Error, LossReason, Result};
pub use key::{Key, MAX_KEY_BYTES};
pub use location::{default_url, redact, BACKEND_ENV, DIR_ENV};
pub use registry::{schema_sql, Scheme};

/// Connects to the backend named by `url` (SPEC §3) and returns a shareable handle.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// assert!(fencelock::connect("memory://").await.is_ok());
/// let err = fencelock::connect("nosuch://x").await.unwrap_err();
/// assert!(err.to_string().contains("unknown backend"));
/// # }
/// ```
pub async fn connect(url: &str) -> Result<Locks> {
    Locks::connect(url).await
}

/// Connects to `$DLOCK_BACKEND`, or else the default file backend (SPEC §3).
pub async fn connect_default() -> Result<Locks> {
    connect(&default_url()?).await
}

/// The README's examples, compiled as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
