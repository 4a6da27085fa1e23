use std::io;

/// Categories the engine branches on, whatever the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller asked for something malformed or out of range.
    InvalidInput,
    /// Not available in this build or on this host.
    Unsupported,
    /// The peer could not be reached or went away.
    Unreachable,
    /// The peer or the device refused.
    Rejected,
    /// A deadline passed.
    TimedOut,
    /// A local I/O failure.
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
        /// What went wrong.
        reason: String,
    },
    /// Registering a region with the transport failed.
    #[error("cannot register region at {addr:#x} ({len} bytes): {reason}")]
    RegisterRegion {
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// Why.
        reason: String,
    },
    /// The transport was shut down.
    #[error("the transport is shut down")]
    Closed,
}
