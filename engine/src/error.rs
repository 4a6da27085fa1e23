use ferry_transport_api::{ErrorKind, FailReason, TransportError};

/// Errors of `ferry-engine`. Messages say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Asked for a protocol, memory kind or backend this build does not contain.
    #[error("{what} is not compiled in; rebuild ferry-engine with `--features {feature}`")]
    FeatureNotCompiled {
        /// What was asked for.
        what: String,
        /// The Cargo feature that provides it.
        feature: &'static str,
    },
    /// A configuration value that cannot be used.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Registering memory failed.
    #[error("cannot register memory: {0}")]
    RegisterRegion(String),
    /// A transport failed to start or refused an operation.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Fetching or parsing a peer's descriptor failed.
    #[error("cannot open segment `{segment}`: {reason}")]
    OpenSegment {
        /// The segment name.
        segment: String,
        /// Why.
        reason: String,
    },
    /// A request that cannot be valid (out of bounds, wrong access, device memory on a
    /// path that cannot carry it).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A batch handle or id that no longer names a live batch.
    #[error("stale batch handle (the batch was released)")]
    StaleBatch,
    /// Tasks of a batch ended without completing.
    #[error("{failed} of {total} tasks failed, {timed_out} timed out (first: task {first_task}: {first_reason})")]
    TasksFailed {
        /// Tasks in the batch.
        total: usize,
        /// Tasks that failed.
        failed: usize,
        /// Tasks whose deadline passed.
        timed_out: usize,
        /// The first task that did not complete.
        first_task: usize,
        /// Why it did not.
        first_reason: FailReason,
    },
    /// `wait` returned before every task ended.
    #[error("{pending} tasks still pending after the wait's timeout")]
    WaitTimedOut {
        /// Tasks still pending.
        pending: usize,
    },
    /// A notification could not be delivered.
    #[error("notification to `{segment}` failed: {reason}")]
    Notify {
        /// The segment.
        segment: String,
        /// Why.
        reason: FailReason,
    },
    /// The engine was shut down.
    #[error("the engine is shut down")]
    Shutdown,
}

impl Error {
    /// The category of this error, for callers that branch on it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::FeatureNotCompiled { .. } => ErrorKind::Unsupported,
            Error::Config(_) | Error::InvalidRequest(_) | Error::StaleBatch => {
                ErrorKind::InvalidInput
            }
            Error::RegisterRegion(_) => ErrorKind::Rejected,
            Error::Transport(e) => e.kind(),
            Error::OpenSegment { .. } | Error::Shutdown => ErrorKind::Unreachable,
            Error::TasksFailed { .. } | Error::Notify { .. } => ErrorKind::Rejected,
            Error::WaitTimedOut { .. } => ErrorKind::TimedOut,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
