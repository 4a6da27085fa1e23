use std::sync::Arc;

use crate::{
    Access, Completions, Endpoint, FailReason, Protocol, RegionMemory, Slice, Staging,
    TransportError,
};

/// Services the engine lends a transport when it starts.
#[derive(Clone)]
pub struct TransportContext {
    /// Where slice completions go.
    pub completions: Arc<dyn Completions>,
    /// The engine's control plane (descriptor fetches, notifications), given only to
    /// the transport that serves the engine's port; `None` for every other.
    pub control: Option<Arc<dyn ControlPlane>>,
    /// How to move device memory through host memory, when the engine has device
    /// support (feature `cuda`) and a driver was found; `None` otherwise.
    pub staging: Option<Arc<dyn Staging>>,
}

/// The engine's side of the handshake port: what a peer may ask besides data.
pub trait ControlPlane: Send + Sync {
    /// The engine's current segment descriptor, serialized.
    fn descriptor(&self) -> Vec<u8>;
    /// A notification from a peer; returns false when it could not be queued.
    fn notification(&self, from: &str, body: &[u8]) -> bool;
}

/// A one-sided, keyed RMA transport.
///
/// Lifecycle: the engine calls [`start`](Self::start) once, then
/// [`register`](Self::register) for every region (before publishing it), then
/// [`connect`](Self::connect) per peer endpoint, and posts slices on the connections.
/// [`shutdown`](Self::shutdown) fails whatever is still in flight with
/// [`FailReason::Shutdown`].
pub trait Transport: Send + Sync {
    /// Which protocol this is.
    fn protocol(&self) -> Protocol;

    /// Starts the transport's workers and returns the endpoint to publish (a transport
    /// with several rails puts every rail's address in it).
    fn start(&self, ctx: TransportContext) -> Result<Endpoint, TransportError>;

    /// Registers a region and returns its keys for this transport: one per rail (device)
    /// the transport drives, rail 0 first; never empty. Peers must present the key of
    /// the rail they reach with every request that touches the region.
    fn register(
        &self,
        region: &Arc<RegionMemory>,
        access: Access,
    ) -> Result<Vec<u64>, TransportError>;

    /// Forgets a region: later requests that name it are refused. Requests already in
    /// flight keep the memory alive through their `Arc`.
    fn deregister(&self, region: &RegionMemory);

    /// Connects to a peer's endpoint (or returns the live connection already open).
    fn connect(&self, endpoint: &Endpoint) -> Result<Arc<dyn Connection>, TransportError>;

    /// The largest slice this transport accepts; the engine cuts requests to it.
    fn max_slice(&self) -> usize;

    /// Stops the workers; in-flight slices complete with [`FailReason::Shutdown`].
    fn shutdown(&self);
}

/// A live path to one peer.
pub trait Connection: Send + Sync {
    /// Posts a slice. On `Ok`, the slice will be reported through [`Completions`]
    /// exactly once. On `Err`, nothing was posted and nothing will be reported.
    fn post(&self, slice: Slice) -> Result<(), FailReason>;

    /// The doorbell: every slice of a submission has been posted. A transport may start
    /// sending on the calling thread (for a small submission this saves waking a worker),
    /// and must make sure everything posted is under way without further calls.
    fn flush(&self) {}

    /// Whether the connection still works; a dead one is replaced on the next
    /// [`Transport::connect`].
    fn is_alive(&self) -> bool;
}
