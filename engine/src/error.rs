use ferry_transport_api::{ErrorKind, FailReason, TransportError};

use crate::features::Feature;

/// Errors of `ferry-engine`. Messages are whole sentences that say what to do; a variant
/// that wraps a cause keeps it as its [`source`](std::error::Error::source), so print the
/// chain (`{:#}` with `anyhow`) to see it.
///
/// [`kind`](Error::kind) sorts every error into one [`ErrorKind`], decided where the error
/// is built; see [`ErrorKind`] for what each category means and the exception class a
/// language binding maps it to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Asked for a protocol or memory kind this build does not contain. Kind:
    /// `Unsupported`.
    #[error(
        "{what} is not compiled into this build: rebuild ferry-engine with `--features {feature}`"
    )]
    FeatureNotCompiled {
        /// What was asked for.
        what: String,
        /// The Cargo feature that provides it.
        feature: Feature,
    },
    /// Asked for something ferry does not implement yet, in any build. Kind:
    /// `Unsupported`.
    #[error("{what} is not implemented yet")]
    NotImplemented {
        /// What was asked for.
        what: String,
    },
    /// A configuration value that cannot be used. Kind: `InvalidInput`.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A transport refused to register memory. Kind: the transport's (`Unsupported` when
    /// it cannot register such memory here, `Rejected` when the device refused).
    #[error("cannot register the memory with a transport")]
    RegisterRegion {
        /// The transport's error.
        #[source]
        source: TransportError,
    },
    /// Publishing a buffer would take this engine's descriptor past what peers accept.
    /// Kind: `InvalidInput`.
    #[error(
        "cannot publish the buffer: the segment descriptor would be {total} bytes, over the \
         {} MiB peers accept ({buffers} buffers are published); publish fewer, larger buffers \
         (peers address blocks by offset) or shorter names, or register this one with \
         Access::Local", cap >> 20
    )]
    DescriptorFull {
        /// The descriptor's size with the buffer, in bytes.
        total: usize,
        /// The most peers accept, in bytes.
        cap: usize,
        /// Buffers already published.
        buffers: usize,
    },
    /// Encoding a buffer's descriptor failed. Kind: `InvalidInput`.
    #[error("cannot encode the buffer's descriptor")]
    EncodeDescriptor(#[source] serde_json::Error),
    /// Allocating memory for a region failed. Kind: `InvalidInput` when the size cannot
    /// be allocated at all, `Io` when memory ran out.
    #[error("cannot allocate {len} bytes")]
    Allocate {
        /// Bytes asked for.
        len: usize,
        /// Why the size is impossible, when it is.
        #[source]
        source: Option<std::alloc::LayoutError>,
    },
    /// A transport failed to start or refused an operation. Kind: the transport's.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Fetching or checking a peer's descriptor failed. Kind: the cause's.
    #[error("cannot open segment `{segment}`")]
    OpenSegment {
        /// The segment name.
        segment: String,
        /// Why.
        #[source]
        source: SegmentError,
    },
    /// A request that cannot be valid (out of bounds, wrong access, device memory on a
    /// path that cannot carry it). Kind: `InvalidInput`.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A batch handle or id that no longer names a live batch. Kind: `InvalidInput`.
    #[error("stale batch handle (the batch was released)")]
    StaleBatch,
    /// Tasks of a batch ended without completing. Kind: `Rejected`.
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
    /// `wait` returned before every task ended. Kind: `TimedOut`.
    #[error("{pending} tasks still pending after the wait's timeout")]
    WaitTimedOut {
        /// Tasks still pending.
        pending: usize,
    },
    /// A notification could not be delivered. Kind: `Rejected`.
    #[error("notification to `{segment}` failed: {reason}")]
    Notify {
        /// The segment.
        segment: String,
        /// Why.
        reason: FailReason,
    },
    /// The metadata store could not be reached or refused a write when the engine
    /// started. Kind: `Unreachable`.
    #[error("metadata store `{store}`: {message}")]
    MetadataStore {
        /// The store.
        store: String,
        /// What went wrong.
        message: String,
    },
    /// Another live engine holds this segment name in the metadata store. Kind:
    /// `Rejected`.
    #[error("segment name `{name}` is held by another live engine in metadata store `{store}`; choose another name, or stop that engine")]
    NameTaken {
        /// The name.
        name: String,
        /// The store.
        store: String,
    },
    /// The engine was shut down. Kind: `Unreachable`.
    #[error("the engine is shut down")]
    Shutdown,
}

/// Why a segment could not be opened (the source of [`Error::OpenSegment`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// The peer's descriptor could not be fetched. Kind: the transport's.
    #[error("cannot fetch the peer's descriptor")]
    Fetch(#[source] TransportError),
    /// The peer sent a descriptor that is not JSON of the expected shape. Kind:
    /// `Rejected`.
    #[error("the peer sent a descriptor that does not parse, refused")]
    Parse(#[source] serde_json::Error),
    /// The peer sent a descriptor that parses but cannot be right. Kind: `Rejected`.
    #[error("the peer sent a descriptor that cannot be right, refused")]
    Invalid(#[source] TransportError),
    /// The metadata store has no segment by this name (no engine publishes it, or its
    /// entry expired). Kind: `Unreachable`.
    #[error("metadata store `{store}` has no segment by this name")]
    NotFound {
        /// The store.
        store: String,
    },
    /// The metadata store could not be asked. Kind: `Unreachable`.
    #[error("metadata store `{store}` cannot be reached: {message}")]
    Store {
        /// The store.
        store: String,
        /// What went wrong.
        message: String,
    },
    /// The metadata store gave no address for the peer's TCP lanes and its descriptor
    /// names no TCP endpoint. Kind: `Rejected`.
    #[error("the peer's descriptor names no TCP endpoint, and the metadata store gave no address")]
    NoTcpEndpoint,
}

impl SegmentError {
    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SegmentError::Fetch(e) => e.kind(),
            SegmentError::NotFound { .. } | SegmentError::Store { .. } => ErrorKind::Unreachable,
            SegmentError::Parse(_) | SegmentError::Invalid(_) | SegmentError::NoTcpEndpoint => {
                ErrorKind::Rejected
            }
        }
    }
}

impl Error {
    /// The category of this error, for callers that branch on it (each variant documents
    /// its kind).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::FeatureNotCompiled { .. } | Error::NotImplemented { .. } => {
                ErrorKind::Unsupported
            }
            Error::Config(_)
            | Error::InvalidRequest(_)
            | Error::StaleBatch
            | Error::DescriptorFull { .. }
            | Error::EncodeDescriptor(_)
            | Error::Allocate {
                source: Some(_), ..
            } => ErrorKind::InvalidInput,
            Error::Allocate { source: None, .. } => ErrorKind::Io,
            Error::RegisterRegion { source } | Error::Transport(source) => source.kind(),
            Error::OpenSegment { source, .. } => source.kind(),
            Error::Shutdown | Error::MetadataStore { .. } => ErrorKind::Unreachable,
            Error::NameTaken { .. } => ErrorKind::Rejected,
            Error::TasksFailed { .. } | Error::Notify { .. } => ErrorKind::Rejected,
            Error::WaitTimedOut { .. } => ErrorKind::TimedOut,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_registration_keeps_the_transports_kind_and_cause() {
        let unsupported = Error::RegisterRegion {
            source: TransportError::Unsupported {
                what: "registering cuda:0 memory".into(),
                why: "no FI_HMEM".into(),
            },
        };
        assert_eq!(unsupported.kind(), ErrorKind::Unsupported);
        let cause = std::error::Error::source(&unsupported).expect("the cause is kept");
        assert!(cause.to_string().contains("no FI_HMEM"), "{cause}");
        let refused = Error::RegisterRegion {
            source: TransportError::register_region(0x1000, 64, "the device refused it"),
        };
        assert_eq!(refused.kind(), ErrorKind::Rejected);
        let open = Error::Transport(TransportError::Open {
            call: "fi_domain",
            code: 12,
            message: "Cannot allocate memory".into(),
        });
        assert_ne!(
            open.kind(),
            ErrorKind::Unsupported,
            "an open failure is not 'no device'"
        );
    }
}
