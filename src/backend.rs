//! For backend authors: the traits a store implements and the types they exchange with
//! the lease engine. Users of locks need none of this; see [`crate::Locks`].
//!
//! A backend implements [`Backend`] (taking locks) and [`Admin`] (inspection and
//! `release --force`); every granted lease comes with a [`HeldLease`] that owns its
//! store-side state until it is released. The engine does the rest: waiting with
//! deadlines and backoff (unless the store overrides [`Backend::acquire`] with a queue of
//! its own), renewal, loss detection and a bound on every call. A backend written outside
//! this crate proves itself with the conformance suite of the `dlock-testkit` crate.

pub use crate::core::backend::{
    AcquireRequest, Admin, Attempt, Backend, Capabilities, EndSignal, Granted, HeldLease, Holder,
    KeyWatch, LockKind,
};
pub use crate::core::backoff::Backoff;
pub use crate::core::owner::Owner;
pub use crate::location::BackendUrl;
pub use async_trait::async_trait;

/// The engine's default wait (what [`Backend::acquire`] does unless overridden), for a
/// store that overrides it only in some cases.
pub use crate::core::wait::poll_until_acquired;
