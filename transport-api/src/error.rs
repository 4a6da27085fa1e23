use std::io;

/// A boxed cause, for transports whose underlying library reports its own error type.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Categories the engine branches on, whatever the transport. Each error's `kind()` is
/// decided where the error is built, never guessed from its message.
///
/// Language bindings map each category to one exception class; the suggested Python class
/// is named on each variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller asked for something malformed or out of range: a bad argument or
    /// configuration value, a stale handle. Fix the call. (Python: `ValueError`.)
    InvalidInput,
    /// Not available in this build or on this host: a Cargo feature not compiled in, a
    /// capability not implemented yet, a fabric provider that lists no device, memory a
    /// fabric cannot register. Only this kind means "no device": an engine configured to
    /// fall back to TCP does so on it and on nothing else. (Python: `NotImplementedError`.)
    Unsupported,
    /// The peer could not be reached, went away, or the engine or transport is shut down.
    /// Retrying later may succeed. (Python: `ConnectionError`.)
    Unreachable,
    /// The peer or the device refused: a registration or request it declined, a peer
    /// that answered something unusable, tasks that failed. (Python: `RuntimeError`.)
    Rejected,
    /// A deadline passed. (Python: `TimeoutError`.)
    TimedOut,
    /// A local failure: a socket, an allocation, a device that could not be opened.
    /// (Python: `OSError`.)
    Io,
}

/// Errors of transport set-up and control (data-path failures are [`crate::FailReason`]s).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A malformed argument.
    #[error("{message}")]
    Invalid {
        /// What was wrong and what was expected.
        message: String,
    },
    /// The transport cannot do this here.
    #[error("{what} is not supported: {why}")]
    Unsupported {
        /// The operation.
        what: String,
        /// Why, and what to do about it.
        why: String,
    },
    /// A call that opens the transport's device (fabric, domain, endpoint, queues) failed.
    /// The device exists: this is never "no device", so it is not [`ErrorKind::Unsupported`].
    #[error("cannot open the fabric device: {call} failed with error {code} ({message})")]
    Open {
        /// The library call that failed.
        call: &'static str,
        /// Its error code (positive).
        code: i32,
        /// The library's text for the code.
        message: String,
    },
    /// Opening the listening socket failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address asked for.
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Connecting to a peer failed.
    #[error("cannot connect to peer {peer}")]
    ConnectPeer {
        /// The peer's endpoint address.
        peer: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The peer answered something other than ferry's protocol.
    #[error("handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer's endpoint address.
        peer: String,
        /// What went wrong, or the step that failed when `source` says why.
        reason: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// The peer refused a set-up exchange (it has no such transport, or the message did
    /// not suit it).
    #[error("{peer} refused the {protocol} set-up: {reason}")]
    Refused {
        /// The peer's endpoint address.
        peer: String,
        /// The transport the exchange was for.
        protocol: crate::Protocol,
        /// The peer's reason.
        reason: String,
    },
    /// Registering a region with the transport failed.
    #[error("cannot register region at {addr:#x} ({len} bytes): {reason}")]
    RegisterRegion {
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// Why, or the step that failed when `source` says why.
        reason: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// The transport was shut down.
    #[error("the transport is shut down")]
    Closed,
}

impl TransportError {
    /// An `InvalidInput` error with a message for the user.
    pub fn invalid(message: impl Into<String>) -> Self {
        TransportError::Invalid {
            message: message.into(),
        }
    }

    /// A failed handshake with `peer`, without an underlying error (add one with
    /// [`caused_by`](Self::caused_by)).
    pub fn handshake(peer: impl Into<String>, reason: impl Into<String>) -> Self {
        TransportError::Handshake {
            peer: peer.into(),
            reason: reason.into(),
            source: None,
        }
    }

    /// A refused registration of `len` bytes at `addr`, without an underlying error (add
    /// one with [`caused_by`](Self::caused_by)).
    pub fn register_region(addr: u64, len: u64, reason: impl Into<String>) -> Self {
        TransportError::RegisterRegion {
            addr,
            len,
            reason: reason.into(),
            source: None,
        }
    }

    /// Attaches the underlying error to a `Handshake` or `RegisterRegion` error; other
    /// variants carry their cause in their own fields and are returned unchanged.
    pub fn caused_by(mut self, cause: impl Into<Cause>) -> Self {
        match &mut self {
            TransportError::Handshake { source, .. }
            | TransportError::RegisterRegion { source, .. } => *source = Some(cause.into()),
            _ => {}
        }
        self
    }

    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransportError::Invalid { .. } => ErrorKind::InvalidInput,
            TransportError::Unsupported { .. } => ErrorKind::Unsupported,
            TransportError::Open { .. } | TransportError::Listen { .. } => ErrorKind::Io,
            TransportError::ConnectPeer { source, .. }
                if source.kind() == io::ErrorKind::TimedOut =>
            {
                ErrorKind::TimedOut
            }
            TransportError::ConnectPeer { .. } => ErrorKind::Unreachable,
            TransportError::Handshake {
                source: Some(cause),
                ..
            } if cause.downcast_ref::<io::Error>().is_some_and(|e| {
                matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                )
            }) =>
            {
                ErrorKind::TimedOut
            }
            TransportError::Handshake { .. } => ErrorKind::Unreachable,
            TransportError::RegisterRegion { .. } | TransportError::Refused { .. } => {
                ErrorKind::Rejected
            }
            TransportError::Closed => ErrorKind::Unreachable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_kept_and_kinds_follow_the_variant() {
        let e = TransportError::handshake("h:1", "reading the answer")
            .caused_by(io::Error::new(io::ErrorKind::UnexpectedEof, "eof"));
        let cause = std::error::Error::source(&e).expect("the cause is kept");
        assert_eq!(cause.to_string(), "eof");
        assert_eq!(e.kind(), ErrorKind::Unreachable);
        let open = TransportError::Open {
            call: "fi_domain",
            code: 12,
            message: "Cannot allocate memory".into(),
        };
        assert_eq!(open.kind(), ErrorKind::Io);
        assert_ne!(open.kind(), ErrorKind::Unsupported);
        assert_eq!(
            TransportError::register_region(0x1000, 8, "no").kind(),
            ErrorKind::Rejected
        );
        let refused = TransportError::Refused {
            peer: "h:1".into(),
            protocol: crate::Protocol::Rdma,
            reason: "this engine has no rdma transport".into(),
        };
        assert_eq!(refused.kind(), ErrorKind::Rejected);
        assert!(refused.to_string().contains("refused the rdma set-up"));
    }
}
