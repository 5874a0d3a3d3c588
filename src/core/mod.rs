//! The lease engine, written once for every backend: acquiring with deadlines and
//! backoff, renewal, loss detection, and the [`Lease`](lease::Lease) guard.

pub mod backend;
pub mod backoff;
pub mod election;
pub(crate) mod host;
pub mod lease;
pub(crate) mod local_queue;
pub mod locks;
pub mod metrics;
pub mod multi;
pub mod owner;
pub(crate) mod renew_batch;
pub(crate) mod serde_time;
pub mod wait;
