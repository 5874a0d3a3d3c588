//! The one error type of dlock.
//!
//! Every failure is a variant a program can match on and a message a person can
//! act on. Backend URLs in messages are always redacted (no passwords).

use std::sync::Arc;
use std::time::Duration;

/// The underlying error of an [`Error`], shared so that errors stay cheap to clone.
#[derive(Debug, Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Why a lease stopped being held before it was released.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// The backend refused a renewal: the lease expired or was taken away
    /// (for example by `dlock release --force`).
    RenewalRefused,
    /// Automatic renewal was off and the lease was not extended before its TTL ran out.
    Expired,
    /// Renewal failed for so long that the lease may have expired.
    RenewalFailed {
        /// The last error seen while renewing.
        last_error: String,
    },
    /// The backend's session that held the lock ended (connection closed,
    /// server restarted), or the store reported the lock gone.
    SessionEnded {
        /// What the backend reported.
        detail: String,
    },
    /// The lease reached its hold-at-most limit
    /// ([`LockBuilder::hold_at_most`](crate::LockBuilder::hold_at_most)).
    HoldLimit {
        /// The limit, counted from the acquisition.
        limit: std::time::Duration,
    },
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LossReason::RenewalRefused => {
                f.write_str("the backend refused to renew it (expired or force-released)")
            }
            LossReason::Expired => f.write_str("it was not extended before its TTL ran out"),
            LossReason::RenewalFailed { last_error } => write!(
                f,
                "renewal failed until the lease may have expired (last error: {last_error})"
            ),
            LossReason::SessionEnded { detail } => {
                write!(f, "the backend session holding it ended ({detail})")
            }
            LossReason::HoldLimit { limit } => write!(
                f,
                "it reached its hold-at-most limit of {} after acquisition",
                crate::duration::format_duration(*limit)
            ),
        }
    }
}

/// Everything that can go wrong in dlock.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key is not a valid lock key (SPEC §2: 1 to 1024 bytes of UTF-8, no NUL).
    #[error("bad key {key:?}: {reason}")]
    BadKey {
        /// The key as given, shortened for display when very long.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The backend URL cannot be used.
    #[error("bad backend URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given, with any password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A duration could not be parsed or is out of range.
    #[error("bad duration {input:?}: {reason}")]
    BadDuration {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A lock option (TTL, wait, backoff) is out of range.
    #[error("bad option: {0}")]
    BadOption(String),

    /// The lock was not acquired within the allowed wait.
    #[error("lock {key:?} on {backend} is held elsewhere; not acquired after waiting {}", crate::duration::format_duration(*waited))]
    NotAcquired {
        /// The key.
        key: String,
        /// The backend (redacted URL).
        backend: String,
        /// How long the caller waited.
        waited: Duration,
    },

    /// The lease was lost while it should have been held.
    #[error("lease on {key:?} (fence {fence}) on {backend} was lost: {reason}")]
    LeaseLost {
        /// The key.
        key: String,
        /// The backend (redacted URL).
        backend: String,
        /// The lease's fencing token.
        fence: u64,
        /// Why it was lost.
        reason: LossReason,
    },

    /// The backend could not be reached, timed out, or failed locally (I/O).
    #[error("backend {backend} is unavailable: {detail}")]
    Unavailable {
        /// The backend (redacted URL).
        backend: String,
        /// What went wrong, in words a person can act on.
        detail: String,
        /// The client library's error, where there was one.
        #[source]
        source: Option<Cause>,
    },

    /// The backend answered with an error.
    #[error("backend {backend} answered with an error: {detail}")]
    Backend {
        /// The backend (redacted URL).
        backend: String,
        /// The error as the backend reported it.
        detail: String,
        /// The client library's error, where there was one.
        #[source]
        source: Option<Cause>,
    },

    /// A semaphore was asked for with another number of permits than its current
    /// holders took it with: every holder of one semaphore key must agree on the count.
    #[error("semaphore {key:?} on {backend} is held with {held_with} permits, but {asked} were asked for; every holder of a semaphore must use the same number of permits")]
    PermitMismatch {
        /// The key.
        key: String,
        /// The backend (redacted URL).
        backend: String,
        /// The number of permits the current holders took the semaphore with.
        held_with: u32,
        /// The number of permits this request asked for.
        asked: u32,
    },

    /// The backend cannot do what was asked.
    #[error("backend {backend} does not support {what}")]
    Unsupported {
        /// The backend (redacted URL).
        backend: String,
        /// What was asked.
        what: String,
    },
}

impl Error {
    /// True for errors caused by the caller's input (key, URL, duration, options),
    /// which retrying cannot fix.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::BadKey { .. }
                | Error::BadUrl { .. }
                | Error::BadDuration { .. }
                | Error::BadOption(_)
                | Error::Unsupported { .. }
                | Error::PermitMismatch { .. }
        )
    }

    /// True when the backend could not be reached or failed; a retry later may work.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Backend { .. })
    }

    /// True for failures that may heal by themselves (the store unreachable, restarting,
    /// or slow to answer): a waiter retries them until its deadline. Errors the store
    /// answered with (bad credentials, missing permissions) are not transient.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// An [`Error::Unavailable`] for `backend`.
    pub fn unavailable(backend: &str, detail: impl std::fmt::Display) -> Self {
        Error::Unavailable {
            backend: backend.to_owned(),
            detail: detail.to_string(),
            source: None,
        }
    }

    /// An [`Error::Backend`] for `backend`.
    pub fn backend(backend: &str, detail: impl std::fmt::Display) -> Self {
        Error::Backend {
            backend: backend.to_owned(),
            detail: detail.to_string(),
            source: None,
        }
    }

    /// The same error, keeping `cause` (the client library's error) as its
    /// [`source`](std::error::Error::source).
    pub fn caused_by(self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        let cause = Some(Cause(Arc::new(cause)));
        match self {
            Error::Unavailable {
                backend, detail, ..
            } => Error::Unavailable {
                backend,
                detail,
                source: cause,
            },
            Error::Backend {
                backend, detail, ..
            } => Error::Backend {
                backend,
                detail,
                source: cause,
            },
            other => other,
        }
    }
}

/// `Result` with dlock's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
