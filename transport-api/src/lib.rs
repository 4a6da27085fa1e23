//! The vocabulary every ferry transport speaks, and the [`Transport`] trait.
//!
//! This crate sits at the bottom of ferry's layers: `transport-tcp` (and the fabric
//! transports) implement [`Transport`]; `ferry-engine` owns the registered memory, routes
//! requests to transports and turns per-slice completions into per-task status.
//!
//! It does no I/O, starts no threads and calls no C library. Its one `unsafe` item is
//! [`RegionMemory::from_raw`], the point where a pointer becomes registered memory; only
//! the engine's registration edge calls it, so transports can move bytes between sockets
//! and registered memory without `unsafe` of their own.
//!
//! The model is one-sided, keyed RMA, the common ground of TCP, libfabric and ibverbs:
//! - a region is registered with every transport, and each returns 64-bit keys (one per
//!   rail: a transport may drive several devices) that the owner publishes in its
//!   [`SegmentDescriptor`];
//! - a transport publishes an [`Endpoint`] that peers use to [`Transport::connect`];
//! - the engine cuts requests into [`Slice`]s no larger than [`Transport::max_slice`] and
//!   [`Connection::post`]s them; each slice is reported once through [`Completions`].
//!
//! ```
//! use ferry_transport_api::{Location, Protocol};
//! assert_eq!(Protocol::parse("TCP").unwrap(), Protocol::Tcp);
//! assert_eq!(Location::parse("cuda:1").unwrap(), Location::Cuda { device: 1 });
//! ```
//!
//! Every type here is `Send + Sync` where it crosses threads; the traits require it.
#![deny(unsafe_code)]

mod descriptor;
mod error;
mod location;
mod log_limit;
mod memory;
pub mod ops;
mod request;
mod staging;
pub mod sync;
#[cfg(feature = "__testing")]
#[doc(hidden)]
pub mod testing;
mod transport;

pub use descriptor::{
    BufferDescriptor, Endpoint, Protocol, RemoteKeys, SegmentDescriptor, TransportKey,
};
pub use error::{ErrorKind, TransportError};
pub use location::{Access, Location};
pub use log_limit::{LogLimit, LINES_PER_SECOND};
pub use memory::RegionMemory;
pub use request::{CompletionToken, Completions, FailReason, Opcode, RemoteStatus, Slice};
pub use staging::{Staging, StagingBuffer, StagingStats};
pub use transport::{
    Connection, ControlPlane, NoExchange, PeerControl, Transport, TransportContext,
};

/// The longest wait, limit or deadline ferry keeps: a longer one (`Duration::MAX`, as a
/// caller may write for "never", or a huge float from a binding) is taken as this, which
/// no process outlives, so that adding it to an `Instant` cannot overflow.
pub const FOREVER: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

/// `d`, at most [`FOREVER`]: what a transport does to every duration of its
/// configuration when it is made.
pub fn at_most_forever(d: std::time::Duration) -> std::time::Duration {
    d.min(FOREVER)
}

/// `start + d`, with `d` at most [`FOREVER`] (and, on a clock that cannot hold even
/// that, a day): the deadline of a wait or a request whose length a caller chose.
pub fn instant_after(start: std::time::Instant, d: std::time::Duration) -> std::time::Instant {
    start
        .checked_add(at_most_forever(d))
        .or_else(|| start.checked_add(std::time::Duration::from_secs(24 * 3600)))
        .unwrap_or(start)
}
