//! The engine: its lifecycle (start, shutdown) and the operations applications call.
//! What each operation needs lives below it: registered memory in `registry.rs`, peers
//! and routes in `peer.rs`, batches in `batch/`, naming in `metadata.rs`.

use std::sync::Arc;
use std::time::Duration;

use ferry_transport_api::{
    Access, ControlPlane, Location, Protocol, SegmentDescriptor, StagingStats, Transport,
    TransportContext,
};
use ferry_transport_tcp::{TcpStats, TcpTransport};

use crate::backends::device;
use crate::batch::{progress_of, BatchBuilder, BatchDefaults, BatchId, BatchTable, Progress};
use crate::control::{ControlState, Notification};
use crate::local::LocalConnection;
use crate::memory::{self, Buffer};
use crate::metadata::{self, Metadata, StoreSettings};
use crate::peer::{Peers, Segment};
use crate::registry::Registry;
use crate::{Error, Result};

/// What `Engine::start` is given: the transports, built, and the engine-wide settings.
pub(crate) struct Start {
    pub(crate) tcp: TcpTransport,
    /// Fabric transports, best first.
    pub(crate) fabrics: Vec<Arc<dyn Transport>>,
    pub(crate) listen: String,
    pub(crate) timeout: Duration,
    pub(crate) retry_over_tcp: bool,
    pub(crate) notify_queue_bytes: usize,
    pub(crate) metadata: Metadata,
    /// The segment name; `None`: the TCP address peers reach it on.
    pub(crate) name: Option<String>,
    pub(crate) store: StoreSettings,
}

/// A transfer engine: registered memory, peers' segments, batches of READ and WRITE.
///
/// Build one with [`Engine::builder`] or [`Engine::from_config`]. The engine is
/// `Send + Sync`; share it by reference or in an `Arc`. Dropping it stops its
/// transports; transfers still in flight fail with [`FailReason::Shutdown`](crate::FailReason::Shutdown).
pub struct Engine {
    registry: Arc<Registry>,
    batches: Arc<BatchTable>,
    peers: Arc<Peers>,
    timeout: Duration,
}

impl Engine {
    pub(crate) fn start(parts: Start) -> Result<Engine> {
        let Start {
            tcp,
            fabrics,
            listen,
            timeout,
            retry_over_tcp,
            notify_queue_bytes,
            metadata,
            name: chosen_name,
            store: store_settings,
        } = parts;
        let busy_poll = tcp.config().busy_poll;
        tcp.set_listen(&listen);
        let tcp = Arc::new(tcp);
        let batches = BatchTable::new(BatchDefaults {
            timeout,
            retry_over_tcp,
            busy_poll,
        });
        let control = Arc::new(ControlState::new(notify_queue_bytes));
        let staging = device::staging();
        let ctx = TransportContext {
            completions: batches.clone(),
            control: None,
            staging: staging.clone(),
        };
        let mut transports = fabrics;
        // Best first, whatever order they were added in (contract 3).
        transports.sort_by_key(|t| t.protocol());
        transports.push(tcp.clone());
        control.answer_with(&transports);
        let mut endpoints = Vec::new();
        for (i, t) in transports.iter().enumerate() {
            // Only TCP serves the engine's port, so only it answers descriptor fetches
            // and notifications.
            let control =
                (t.protocol() == Protocol::Tcp).then(|| control.clone() as Arc<dyn ControlPlane>);
            match t.start(TransportContext {
                control,
                ..ctx.clone()
            }) {
                Ok(ep) => endpoints.push(ep),
                Err(e) => {
                    for started in &transports[..i] {
                        started.shutdown();
                    }
                    return Err(e.into());
                }
            }
        }
        let address = endpoints
            .iter()
            .find(|e| e.protocol == Protocol::Tcp)
            .map(|e| e.address.clone())
            .unwrap_or_default();
        let name = chosen_name.unwrap_or(address);
        control.own.set_identity(name.clone(), endpoints);
        let store = metadata::open(&metadata, tcp.clone(), &store_settings)
            .and_then(|store| store.start(&control.own).map(|()| store));
        let store = match store {
            Ok(store) => store,
            Err(e) => {
                for t in &transports {
                    t.shutdown();
                }
                return Err(e);
            }
        };
        let local = Arc::new(LocalConnection::new(tcp.clone(), batches.clone()));
        let protocols: Vec<Protocol> = transports.iter().map(|t| t.protocol()).collect();
        let registry = Arc::new(Registry::new(transports, tcp, control, store, staging));
        tracing::info!(segment = %name, ?protocols, metadata = %registry.store.describe(), "engine started");
        Ok(Engine {
            peers: Arc::new(Peers::new(registry.clone(), local)),
            registry,
            batches,
            timeout,
        })
    }

    /// This engine's segment name (`host:port` of its one port); peers open it by this
    /// name.
    pub fn name(&self) -> String {
        self.registry.control.own.name()
    }

    /// The descriptor peers receive.
    pub fn descriptor(&self) -> SegmentDescriptor {
        self.registry.control.own.descriptor()
    }

    /// Transports this engine runs, best first.
    pub fn protocols(&self) -> Vec<Protocol> {
        self.registry
            .transports()
            .iter()
            .map(|t| t.protocol())
            .collect()
    }

    /// Notifications refused as busy because the queue was full (by count or by bytes:
    /// see [`EngineBuilder::notification_queue_bytes`](crate::EngineBuilder::notification_queue_bytes))
    /// since the engine started.
    pub fn refused_notifications(&self) -> u64 {
        self.registry.control.refused()
    }

    /// How many opened segments the engine caches. Segments whose connection died are
    /// dropped from the cache the next time a segment is opened.
    pub fn cached_segments(&self) -> usize {
        self.peers.cached_count()
    }

    /// Counters of this engine's batches and their waits.
    pub fn batch_stats(&self) -> crate::BatchStats {
        self.batches.stats()
    }

    /// What this engine's batches did with each peer it opened, by the name it was
    /// opened by, sorted by name (see [`PeerStats`](crate::PeerStats)).
    pub fn peer_stats(&self) -> Vec<(String, crate::PeerStats)> {
        self.peers.stats()
    }

    /// Counters of the TCP target (refused requests, protocol errors, connections).
    pub fn tcp_stats(&self) -> TcpStats {
        self.registry.tcp.stats()
    }

    /// The device-memory staging pool's accounting (buffers on loan, buffers made per
    /// device); `None` without CUDA support or driver.
    pub fn staging_stats(&self) -> Option<StagingStats> {
        self.registry.staging.as_ref().map(|s| s.stats())
    }

    /// Allocates `len` zeroed, page-aligned bytes at `location` (`cpu`, or `cuda:N`
    /// with the `cuda` feature), registered with every transport and published to peers
    /// for reading and writing.
    pub fn allocate(&self, len: usize, location: Location) -> Result<Buffer> {
        self.allocate_with(len, location, Access::RemoteReadWrite, "")
    }

    /// As [`allocate`](Self::allocate), with the access peers get and a name they can
    /// look the buffer up by ([`Segment::buffer_named`]).
    pub fn allocate_with(
        &self,
        len: usize,
        location: Location,
        access: Access,
        name: &str,
    ) -> Result<Buffer> {
        let memory =
            match location {
                Location::Host { .. } => memory::allocate_host(len, location)?,
                Location::Cuda { device } => device::allocate(len, device)?,
                Location::Auto => return Err(Error::InvalidRequest(
                    "Location::Auto is for registering caller memory; allocate at cpu or cuda:N"
                        .into(),
                )),
            };
        let registered = self.registry.register(memory, access, name)?;
        Ok(Buffer::new(self.registry.clone(), registered, false))
    }

    /// Registers memory the caller owns (a tensor, an mmap) at `location`, published to
    /// peers with `access`. With the `cuda` feature the pointer's attributes are checked:
    /// [`Location::Auto`] becomes host or `cuda:N`, and a location that does not match
    /// the memory is an error. Without it, device locations and `Auto` are errors that
    /// name the feature.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid for reads and writes until the returned [`Buffer`]
    /// and all its clones are dropped (the drop waits for transfers still using it). The
    /// memory is shared with peers and transports: they read and write it concurrently
    /// with the caller, as a NIC would, so the caller must not hold Rust references into
    /// it while transfers touch it. `location` must be where the memory really is.
    #[allow(unsafe_code)]
    pub unsafe fn register(
        &self,
        ptr: *mut u8,
        len: usize,
        location: Location,
        access: Access,
    ) -> Result<Buffer> {
        let location = device::resolve(ptr, location)?;
        // SAFETY: forwarded from this function's contract.
        let memory = unsafe { memory::borrow(ptr, len, location)? };
        let registered = self.registry.register(memory, access, "")?;
        Ok(Buffer::new(self.registry.clone(), registered, true))
    }

    /// Opens a segment by name: `host:port` of a peer's engine (peer-to-peer metadata),
    /// or this engine's own name. The descriptor is cached; a cached one is fetched again
    /// after an access error on it (the peer restarted, a buffer went away) or when its
    /// connection broke.
    ///
    /// The segment is this engine's own (requests become memory copies, checked like a
    /// peer's) only when `name` is this engine's name or the address it is bound to; any
    /// other name is a peer, whatever its descriptor says. The peer's descriptor is
    /// checked before it is used (ranges, keys, endpoints), and its TCP lanes connect to
    /// `name`, the address the descriptor came from, never to an address the descriptor
    /// names. Opens of one name at once fetch and connect once; opens of other names do
    /// not wait for them.
    pub fn open_segment(&self, name: &str) -> Result<Segment> {
        if self.registry.is_shut_down() {
            return Err(Error::Shutdown);
        }
        self.peers.open(name).map(|inner| Segment { inner })
    }

    /// Fetches a segment's descriptor again, whatever the cache holds (e.g. after the
    /// peer registered more buffers), and caches the result.
    pub fn refresh_segment(&self, name: &str) -> Result<Segment> {
        self.peers.mark_stale(name);
        self.open_segment(name)
    }

    /// Starts a batch of requests.
    pub fn batch(&self) -> BatchBuilder {
        BatchBuilder::new(&self.batches, &self.registry, &self.peers)
    }

    /// Progress of a batch by id; [`Error::StaleBatch`] once the batch was released.
    pub fn batch_progress(&self, id: BatchId) -> Result<Progress> {
        progress_of(&self.batches, id)
    }

    /// Sends a small message (up to 64 KiB) to a segment's engine and waits until it is
    /// queued there. Messages to one peer arrive in the order they were sent.
    pub fn notify(&self, segment: &Segment, message: &[u8]) -> Result<()> {
        segment
            .inner
            .notify(&self.name(), message, self.timeout)
            .map_err(|reason| Error::Notify {
                segment: segment.name().to_string(),
                reason,
            })
    }

    /// The next notification from a peer, waiting up to `timeout`.
    pub fn recv_notification(&self, timeout: Duration) -> Option<Notification> {
        self.registry.control.next(Some(timeout))
    }

    /// The next notification if one is queued.
    pub fn try_recv_notification(&self) -> Option<Notification> {
        self.registry.control.next(None)
    }

    /// Stops the transports: in-flight transfers fail with
    /// [`FailReason::Shutdown`](crate::FailReason::Shutdown), and later calls return
    /// [`Error::Shutdown`]. Dropping the engine does this too.
    pub fn shutdown(&self) {
        if !self.registry.shut_down() {
            return;
        }
        self.peers.clear();
        self.registry.stop_transports();
        tracing::info!(segment = %self.name(), "engine shut down");
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.name())
            .field("protocols", &self.protocols())
            .finish()
    }
}
