use std::sync::Arc;
use std::time::Duration;

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

    /// A peer's set-up message for this engine's `protocol` transport (see
    /// [`PeerControl::exchange`]): the answer to send back, or why it was refused (the
    /// peer sees the message). The default refuses: an engine with no such transport.
    fn exchange(&self, protocol: Protocol, body: &[u8]) -> Result<Vec<u8>, String> {
        let _ = body;
        Err(format!(
            "this peer has no {protocol} transport to answer the exchange"
        ))
    }
}

/// One peer's control port, lent to [`Transport::connect`]: how a transport that must set
/// up state with its peer before data flows (ibverbs RC queue pairs) reaches the peer's
/// transport of the same protocol. It travels over the engine's one port (DESIGN.md,
/// contract 8), so a transport never listens on a port of its own.
pub trait PeerControl: Send + Sync {
    /// Sends `body` to the peer's `protocol` transport ([`Transport::answer`]) and returns
    /// its answer. `timeout` bounds the whole exchange, connecting included.
    fn exchange(
        &self,
        protocol: Protocol,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError>;

    /// How logs name the peer (the engine gives the address it was opened by).
    fn name(&self) -> &str {
        "an unnamed peer"
    }
}

/// A [`PeerControl`] that reaches nobody: for transports that set nothing up with their
/// peer (TCP, libfabric RDM endpoints), and for their tests.
pub struct NoExchange;

impl PeerControl for NoExchange {
    fn exchange(
        &self,
        protocol: Protocol,
        _body: &[u8],
        _timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        Err(TransportError::Unsupported {
            what: format!("a {protocol} set-up exchange"),
            why: "no control port to the peer was given".into(),
        })
    }
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
    /// `peer` reaches the peer's own transport of this protocol, for transports that set
    /// up state with it first; others ignore it.
    fn connect(
        &self,
        endpoint: &Endpoint,
        peer: &dyn PeerControl,
    ) -> Result<Arc<dyn Connection>, TransportError>;

    /// Answers a peer's set-up message ([`PeerControl::exchange`]); the engine calls it
    /// from the thread serving its port, for the transport of the message's protocol.
    /// It must check everything in `body` (it comes from the network) and must not block
    /// for long. The default refuses: a transport that sets nothing up.
    fn answer(&self, body: &[u8]) -> Result<Vec<u8>, TransportError> {
        let _ = body;
        Err(TransportError::Unsupported {
            what: format!("a {} set-up exchange", self.protocol()),
            why: "this transport sets nothing up with its peers".into(),
        })
    }

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

    /// The calling thread is about to spin waiting for answers to slices it posted here:
    /// a transport whose answers a worker thread receives may let the caller receive
    /// them itself instead ([`drive`](Self::drive)), saving the hand-off from that
    /// worker and a spinning thread. Returns whether it does; when it does, the caller
    /// calls [`drive`](Self::drive) while it spins and [`stop_driving`](Self::stop_driving)
    /// once before it stops spinning (to sleep, or because its wait is over).
    fn start_driving(&self) -> bool {
        false
    }

    /// Receives and completes what has arrived, if no other thread is receiving it; never
    /// waits for more than the rest of an answer that has started to arrive. Only
    /// between [`start_driving`](Self::start_driving) and
    /// [`stop_driving`](Self::stop_driving).
    fn drive(&self) {}

    /// Ends what [`start_driving`](Self::start_driving) started: the transport's own
    /// threads receive again.
    fn stop_driving(&self) {}

    /// Whether the connection still works; a dead one is replaced on the next
    /// [`Transport::connect`].
    fn is_alive(&self) -> bool;
}
