//! ferry's TCP data plane: the transport every ferry engine carries, and the port its
//! handshake shares.
//!
//! Layering: implements [`ferry_transport_api::Transport`]; used by `ferry-engine`, which
//! owns the memory and the batches. No other transport depends on it.
//!
//! What it guarantees:
//! - **Persistent lanes.** One set of connections per peer ([`TcpConfig::lanes`]), kept
//!   open; requests are pipelined, large requests arrive as slices striped over lanes.
//! - **Zero copy for host memory.** Payloads go between the socket and registered memory
//!   with vectored reads and writes; many small requests share one system call.
//! - **Checked remote access.** The target resolves every request (address, length,
//!   region key, access) before a byte moves. A refused request gets an error status and
//!   is counted; a stream that breaks the protocol is closed. Other peers are unaffected.
//! - **Completed means visible.** A WRITE completes when the target acknowledges that the
//!   bytes are in its memory; a READ when the bytes are in local memory.
//! - **One port.** Descriptor requests and notifications use the data port.
//!
//! Threads: an accept thread, one thread per accepted connection, and a sender and a
//! receiver thread per lane. All types are `Send + Sync`.
//!
//! ```no_run
//! use ferry_transport_tcp::{TcpConfig, TcpTransport};
//! let tcp = TcpTransport::new(TcpConfig { lanes: 2, ..TcpConfig::default() });
//! assert_eq!(tcp.config().lanes, 2);
//! ```
#![forbid(unsafe_code)]

mod frame;
mod initiator;
mod pipe;
mod regions;
mod staged;
mod target;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_transport_api::{
    Access, Connection, ControlPlane, Endpoint, Protocol, RegionMemory, Staging, Transport,
    TransportContext, TransportError,
};
use parking_lot::Mutex;

pub use initiator::TcpConnection;

/// Settings of the TCP transport. The defaults suit one host or a small cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    /// Connections kept open per peer; slices are striped over them.
    pub lanes: usize,
    /// Largest slice a request is cut into.
    pub max_slice: usize,
    /// Most slices in flight per lane before the sender waits for answers.
    pub max_inflight: usize,
    /// How long a thread that runs out of work spins before it sleeps in the kernel.
    /// Waking a sleeping thread on another core costs tens of microseconds, so a short
    /// spin keeps small-request latency low; zero saves CPU on idle links.
    pub busy_poll: Duration,
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// The address peers should use to reach this engine, when it differs from the bound
    /// one (e.g. listening on `0.0.0.0`).
    pub advertise: Option<String>,
    /// Most connections the target serves at once (each has a thread); further ones are
    /// closed at once and counted in [`TcpStats::refused_connections`].
    pub max_connections: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            lanes: 1,
            max_slice: 1 << 20,
            max_inflight: 1024,
            busy_poll: Duration::from_micros(50),
            connect_timeout: Duration::from_secs(5),
            advertise: None,
            max_connections: 1024,
        }
    }
}

/// Counters of the target side, for tests and monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Connections accepted.
    pub connections: u64,
    /// Requests refused (bad key, out of bounds, not registered, access denied).
    pub rejected_requests: u64,
    /// Connections closed because the peer broke the protocol.
    pub protocol_errors: u64,
    /// Connections refused because [`TcpConfig::max_connections`] were open.
    pub refused_connections: u64,
    /// Connections being served now.
    pub open_connections: u64,
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    open_connections: AtomicU64,
    refused_connections: AtomicU64,
    rejected_requests: AtomicU64,
    protocol_errors: AtomicU64,
}

/// State shared by the transport's threads.
struct Shared {
    config: TcpConfig,
    regions: regions::Regions,
    stats: Stats,
    ctx: OnceLock<TransportContext>,
    stop: AtomicBool,
    wakers: Mutex<Vec<Arc<mio::Waker>>>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn control(&self) -> Option<&Arc<dyn ControlPlane>> {
        self.ctx.get().map(|c| &c.control)
    }

    /// The engine's staging for device memory, if it has one.
    fn staging(&self) -> Option<&Arc<dyn Staging>> {
        self.ctx.get().and_then(|c| c.staging.as_ref())
    }
}

/// The TCP transport. Create it with [`TcpTransport::new`], then hand it to the engine,
/// which calls [`Transport::start`] with the address to listen on.
pub struct TcpTransport {
    shared: Arc<Shared>,
    listen: Mutex<String>,
    local: OnceLock<SocketAddr>,
    peers: Mutex<HashMap<String, Arc<TcpConnection>>>,
}

impl TcpTransport {
    /// A transport with `config`, not yet listening.
    pub fn new(config: TcpConfig) -> Self {
        TcpTransport {
            shared: Arc::new(Shared {
                config,
                regions: Default::default(),
                stats: Default::default(),
                ctx: OnceLock::new(),
                stop: AtomicBool::new(false),
                wakers: Mutex::new(Vec::new()),
            }),
            listen: Mutex::new("127.0.0.1:0".into()),
            local: OnceLock::new(),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &TcpConfig {
        &self.shared.config
    }

    /// Sets the address [`Transport::start`] binds (default `127.0.0.1:0`).
    pub fn set_listen(&self, addr: &str) {
        *self.listen.lock() = addr.to_string();
    }

    /// The bound address, once started.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local.get().copied()
    }

    /// A snapshot of the target's counters.
    pub fn stats(&self) -> TcpStats {
        let s = &self.shared.stats;
        TcpStats {
            connections: s.connections.load(Ordering::Relaxed),
            rejected_requests: s.rejected_requests.load(Ordering::Relaxed),
            protocol_errors: s.protocol_errors.load(Ordering::Relaxed),
            refused_connections: s.refused_connections.load(Ordering::Relaxed),
            open_connections: s.open_connections.load(Ordering::Relaxed),
        }
    }

    /// Connects to a peer's TCP endpoint (`host:port`), or returns the live lanes already
    /// open to it.
    pub fn connect_tcp(&self, address: &str) -> Result<Arc<TcpConnection>, TransportError> {
        if self.shared.stopping() {
            return Err(TransportError::Closed);
        }
        let mut peers = self.peers.lock();
        if let Some(c) = peers.get(address) {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        let addr = resolve(address)?;
        let conn = TcpConnection::open(&self.shared, address, addr).map_err(|source| {
            TransportError::ConnectPeer {
                peer: address.to_string(),
                source,
            }
        })?;
        let conn = Arc::new(conn);
        peers.insert(address.to_string(), conn.clone());
        Ok(conn)
    }
}

fn resolve(address: &str) -> Result<SocketAddr, TransportError> {
    address
        .to_socket_addrs()
        .map_err(|source| TransportError::ConnectPeer {
            peer: address.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| TransportError::invalid(format!("`{address}` resolves to no address")))
}

impl Transport for TcpTransport {
    fn protocol(&self) -> Protocol {
        Protocol::Tcp
    }

    fn start(&self, ctx: TransportContext) -> Result<Endpoint, TransportError> {
        if self.shared.ctx.set(ctx).is_err() {
            return Err(TransportError::invalid(
                "the TCP transport was started twice",
            ));
        }
        let addr = self.listen.lock().clone();
        let bound =
            target::listen(&self.shared, &addr).map_err(|source| TransportError::Listen {
                addr: addr.clone(),
                source,
            })?;
        let _ = self.local.set(bound);
        let address = match &self.shared.config.advertise {
            Some(a) => a.clone(),
            None if bound.ip().is_unspecified() => {
                tracing::warn!(%bound, "listening on all interfaces without an advertised address; peers are told 127.0.0.1");
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port()).to_string()
            }
            None => bound.to_string(),
        };
        tracing::info!(%bound, %address, "tcp transport listening");
        Ok(Endpoint {
            protocol: Protocol::Tcp,
            address,
        })
    }

    fn register(
        &self,
        region: &Arc<RegionMemory>,
        access: Access,
    ) -> Result<Vec<u64>, TransportError> {
        Ok(vec![self.shared.regions.insert(region, access)])
    }

    fn deregister(&self, region: &RegionMemory) {
        self.shared.regions.remove(region);
    }

    fn connect(&self, endpoint: &Endpoint) -> Result<Arc<dyn Connection>, TransportError> {
        if endpoint.protocol != Protocol::Tcp {
            return Err(TransportError::invalid(format!(
                "{} endpoint given to the TCP transport",
                endpoint.protocol
            )));
        }
        Ok(self.connect_tcp(&endpoint.address)?)
    }

    fn max_slice(&self) -> usize {
        self.shared.config.max_slice.max(4096)
    }

    fn shutdown(&self) {
        if self.shared.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        for w in self.shared.wakers.lock().drain(..) {
            let _ = w.wake();
        }
        for (_, c) in self.peers.lock().drain() {
            c.close(ferry_transport_api::FailReason::Shutdown);
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Fetches a peer's segment descriptor over its data port (peer-to-peer metadata).
pub fn fetch_descriptor(address: &str, timeout: Duration) -> Result<Vec<u8>, TransportError> {
    let addr = resolve(address)?;
    let connect_err = |source| TransportError::ConnectPeer {
        peer: address.to_string(),
        source,
    };
    let handshake = |reason: String| TransportError::Handshake {
        peer: address.to_string(),
        reason,
    };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(connect_err)?;
    s.set_read_timeout(Some(timeout)).map_err(connect_err)?;
    s.set_write_timeout(Some(timeout)).map_err(connect_err)?;
    s.write_all(&frame::Header::new(frame::Kind::GetDescriptor, 0, 0).encode())
        .map_err(|e| handshake(format!("sending the request: {e}")))?;
    let mut hb = [0u8; frame::HEADER_LEN];
    s.read_exact(&mut hb)
        .map_err(|e| handshake(format!("reading the answer: {e}")))?;
    let h = frame::Header::decode(&hb).map_err(|e| handshake(e.to_string()))?;
    if h.kind != frame::Kind::Descriptor {
        return Err(handshake(format!("answered with a {:?} frame", h.kind)));
    }
    let mut body = vec![0u8; h.count as usize];
    s.read_exact(&mut body)
        .map_err(|e| handshake(format!("reading the descriptor: {e}")))?;
    Ok(body)
}
