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
//! - **Bounded by peers.** A connection that sends nothing is closed after
//!   [`TcpConfig::idle_timeout`]; a frame that stops moving closes its connection after
//!   [`TcpConfig::progress_timeout`]; TCP keepalive finds peers that vanished; the
//!   connection limit fits the process's file-descriptor limit; deregistering a region
//!   closes the connections that hold it, so its memory is released at once.
//! - **Optional authentication.** With [`TcpConfig::secret`] set, every connection proves
//!   knowledge of the shared secret (and checks the target's proof) before any other
//!   frame. Without it, anyone who reaches the port can read and write every buffer
//!   published for remote access: region keys protect against stale descriptors, not
//!   against the network.
//!
//! Threads: an accept thread, one thread per accepted connection, and a sender and a
//! receiver thread per lane. All types are `Send + Sync`.
//!
//! ```no_run
//! use ferry_transport_tcp::{TcpConfig, TcpTransport};
//! let tcp = TcpTransport::new(TcpConfig { lanes: 2, ..TcpConfig::default() });
//! assert_eq!(tcp.config().lanes, 2);
//! ```
// `unsafe` only in `sockopt` (one `setsockopt` that socket2 lacks), allowed there.
#![deny(unsafe_code)]

mod frame;
mod initiator;
mod lane;
mod pipe;
mod regions;
mod sockopt;
mod staged;
mod target;

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferry_transport_api::{
    Access, Connection, ControlPlane, Endpoint, Opcode, PeerControl, Protocol, RegionMemory,
    RemoteStatus, Staging, Transport, TransportContext, TransportError,
};
use parking_lot::Mutex;

pub use initiator::TcpConnection;

/// Settings of the TCP transport. The defaults suit one host or a small cluster.
///
/// `serde`, with every field defaulted so a partial document works. Durations are
/// integers whose names carry the unit: `busy_poll_us` in microseconds,
/// `connect_timeout_ms`, `idle_timeout_ms`, `progress_timeout_ms` and `keepalive_ms`
/// (`null`: off) in milliseconds. `secret` is read from a string and never serialized.
/// A duration longer than the clock can add (`Duration::MAX` for "never") is taken as
/// [`FOREVER`](ferry_transport_api::FOREVER), and `keepalive` is at most Linux's
/// 32767 s.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    #[serde(rename = "busy_poll_us", with = "duration_serde::micros")]
    pub busy_poll: Duration,
    /// Limit for establishing a connection.
    #[serde(rename = "connect_timeout_ms", with = "duration_serde::millis")]
    pub connect_timeout: Duration,
    /// The address peers should use to reach this engine, when it differs from the bound
    /// one (e.g. listening on `0.0.0.0`).
    pub advertise: Option<String>,
    /// Most connections the target serves at once (each has a thread); further ones are
    /// closed at once and counted in [`TcpStats::refused_connections`]. Each costs three
    /// file descriptors: at start the transport raises the soft descriptor limit to fit,
    /// or, where the hard limit forbids, serves fewer and warns
    /// ([`TcpTransport::max_connections`] tells how many).
    pub max_connections: usize,
    /// A connection that has sent no request for this long is closed (counted in
    /// [`TcpStats::idle_timeouts`]): one that was accepted and sent nothing, or one that
    /// only fetched a descriptor. An initiator's data lane (it says so when it opens) and a
    /// connection that has carried requests stay open while idle for as long as TCP
    /// keepalive finds the peer alive; only [`TcpConfig::max_connections`] bounds how
    /// many such connections one peer holds.
    #[serde(rename = "idle_timeout_ms", with = "duration_serde::millis")]
    pub idle_timeout: Duration,
    /// A frame that stops moving for this long (a request's payload no longer arrives, an
    /// answer is no longer read by the peer, the handshake stalls) closes its connection
    /// (counted in [`TcpStats::progress_timeouts`]), releasing the memory it holds.
    #[serde(rename = "progress_timeout_ms", with = "duration_serde::millis")]
    pub progress_timeout: Duration,
    /// TCP keepalive on every connection, both sides: probes start after this much
    /// silence and repeat at a third of it (at least 1 s), three times, so a peer that
    /// vanished without closing is found within about twice this. `None` disables it.
    #[serde(rename = "keepalive_ms", with = "duration_serde::opt_millis")]
    pub keepalive: Option<Duration>,
    /// A secret shared by every engine allowed to use this port. When set, each
    /// connection (data lanes, descriptor fetches, notifications) starts with a mutual
    /// HMAC-SHA256 challenge-response, and a peer without the secret is closed before any
    /// other frame and counted in [`TcpStats::auth_failures`]. Peers must all set the
    /// same secret. It authenticates who connects; it does not encrypt the data or
    /// protect it from an attacker on the path.
    #[serde(skip_serializing)]
    pub secret: Option<SharedSecret>,
    /// The TCP congestion control of the data connections: the lanes this engine opens
    /// and every connection it accepts. A name the kernel offers (`cubic`, `reno`,
    /// `bbr`, ...; unprivileged processes may use those in
    /// `/proc/sys/net/ipv4/tcp_allowed_congestion_control`); `None`, the default: the
    /// host's (`net.ipv4.tcp_congestion_control`). Each side's choice governs what it
    /// sends: the initiator's its WRITE payloads, the target's its READ answers. With
    /// `bbr` and no `fq` queueing discipline TCP paces itself with a timer per burst,
    /// which costs CPU on every send; `cubic` does not. A name the kernel refuses fails
    /// the transport's start, naming the ones it allows.
    pub congestion_control: Option<String>,
}

/// `serde` for durations as integer counts of one unit.
mod duration_serde {
    pub(crate) mod micros {
        use std::time::Duration;

        pub(crate) fn serialize<S: serde::Serializer>(
            d: &Duration,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        }

        pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Duration, D::Error> {
            <u64 as serde::Deserialize>::deserialize(d).map(Duration::from_micros)
        }
    }

    pub(crate) mod millis {
        use std::time::Duration;

        pub(crate) fn serialize<S: serde::Serializer>(
            d: &Duration,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        }

        pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Duration, D::Error> {
            <u64 as serde::Deserialize>::deserialize(d).map(Duration::from_millis)
        }
    }

    pub(crate) mod opt_millis {
        use std::time::Duration;

        pub(crate) fn serialize<S: serde::Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            <Option<u64> as serde::Deserialize>::deserialize(d)
                .map(|m| m.map(Duration::from_millis))
        }
    }
}

/// A shared secret for [`TcpConfig::secret`]. Its `Debug` output does not show the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedSecret(Arc<[u8]>);

impl SharedSecret {
    /// A secret made of `bytes` (at least 16 random bytes are recommended; an empty secret
    /// is refused when the transport starts).
    pub fn new(bytes: impl AsRef<[u8]>) -> Self {
        SharedSecret(bytes.as_ref().into())
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecret(<redacted>)")
    }
}

/// Reads the secret from a string (its UTF-8 bytes). There is no `Serialize`: a
/// configuration written back out never carries the secret.
impl<'de> serde::Deserialize<'de> for SharedSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        if s.is_empty() {
            return Err(serde::de::Error::custom(
                "an empty shared secret authenticates no one",
            ));
        }
        Ok(SharedSecret::from(s))
    }
}

impl From<&str> for SharedSecret {
    fn from(s: &str) -> Self {
        SharedSecret::new(s)
    }
}

impl From<String> for SharedSecret {
    fn from(s: String) -> Self {
        SharedSecret::new(s)
    }
}

impl From<Vec<u8>> for SharedSecret {
    fn from(v: Vec<u8>) -> Self {
        SharedSecret::new(v)
    }
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
            idle_timeout: Duration::from_secs(60),
            progress_timeout: Duration::from_secs(10),
            keepalive: Some(Duration::from_secs(10)),
            secret: None,
            congestion_control: None,
        }
    }
}

/// Counters, for tests and monitoring: the target side's, and how the initiator side
/// received its answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Connections accepted.
    pub connections: u64,
    /// Requests refused (bad key, out of bounds, not registered, access denied).
    pub rejected_requests: u64,
    /// Connections closed because the peer broke the protocol: accepted ones whose
    /// initiator sent what a target cannot serve, and this side's lanes whose target
    /// answered out of turn. Each is also logged as a warning naming the peer.
    pub protocol_errors: u64,
    /// Connections refused because [`TcpConfig::max_connections`] were open.
    pub refused_connections: u64,
    /// Connections being served now.
    pub open_connections: u64,
    /// Connections closed because they did not authenticate with the shared secret
    /// ([`TcpConfig::secret`]): no proof, a wrong one, or none in time.
    pub auth_failures: u64,
    /// Connections closed after sending no request for [`TcpConfig::idle_timeout`].
    pub idle_timeouts: u64,
    /// Connections closed because a frame stopped moving for
    /// [`TcpConfig::progress_timeout`].
    pub progress_timeouts: u64,
    /// Connections closed because a region they were using was deregistered.
    pub closed_on_deregister: u64,
    /// Connections the transport keeps a handle on (for shutdown and deregistration);
    /// it falls back to [`open_connections`](Self::open_connections) as soon as closed
    /// connections' threads end.
    pub tracked_connections: u64,
    /// Answers a waiting thread read itself while driving its connection
    /// ([`Connection::start_driving`]), rather than the lane's receiver thread.
    pub answers_read_by_waiters: u64,
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    open_connections: AtomicU64,
    refused_connections: AtomicU64,
    rejected_requests: AtomicU64,
    protocol_errors: AtomicU64,
    auth_failures: AtomicU64,
    idle_timeouts: AtomicU64,
    progress_timeouts: AtomicU64,
    closed_on_deregister: AtomicU64,
    answers_read_by_waiters: AtomicU64,
}

/// State shared by the transport's threads.
struct Shared {
    config: TcpConfig,
    regions: regions::Regions,
    stats: Stats,
    ctx: OnceLock<TransportContext>,
    stop: AtomicBool,
    /// Wakes the accept thread (for shutdown).
    accept_waker: Mutex<Option<Arc<mio::Waker>>>,
    /// The accept thread, joined at shutdown so the port is free when it returns (an
    /// engine restarted in the same process binds it again).
    accept_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Every connection being served, removed by its thread as it ends.
    conns: target::Conns,
    /// [`TcpConfig::max_connections`] as the descriptor limit allows, set at start.
    max_connections: AtomicUsize,
    /// Warnings the target logs at a bounded rate for the whole transport, one limit
    /// per kind: a peer that opens connection after connection cannot flood the log.
    warns: target::Warns,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn control(&self) -> Option<&Arc<dyn ControlPlane>> {
        self.ctx.get().and_then(|c| c.control.as_ref())
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
    pub fn new(mut config: TcpConfig) -> Self {
        // Longer than the clock can add is forever (see `at_most_forever`).
        for d in [
            &mut config.busy_poll,
            &mut config.connect_timeout,
            &mut config.idle_timeout,
            &mut config.progress_timeout,
        ] {
            *d = ferry_transport_api::at_most_forever(*d);
        }
        let config_max = config.max_connections;
        TcpTransport {
            shared: Arc::new(Shared {
                config,
                regions: Default::default(),
                stats: Default::default(),
                ctx: OnceLock::new(),
                stop: AtomicBool::new(false),
                accept_waker: Mutex::new(None),
                accept_thread: Mutex::new(None),
                conns: Default::default(),
                max_connections: AtomicUsize::new(config_max),
                warns: target::Warns::new(),
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
            auth_failures: s.auth_failures.load(Ordering::Relaxed),
            idle_timeouts: s.idle_timeouts.load(Ordering::Relaxed),
            progress_timeouts: s.progress_timeouts.load(Ordering::Relaxed),
            closed_on_deregister: s.closed_on_deregister.load(Ordering::Relaxed),
            tracked_connections: self.shared.conns.len() as u64,
            answers_read_by_waiters: s.answers_read_by_waiters.load(Ordering::Relaxed),
        }
    }

    /// How many connections the target serves at once: [`TcpConfig::max_connections`],
    /// or fewer where the file-descriptor limit allows fewer (known once started).
    pub fn max_connections(&self) -> usize {
        self.shared.max_connections.load(Ordering::Relaxed)
    }

    /// Checks a request against the target's table of registered regions exactly as a
    /// peer's request is checked (key, range, access), for a caller that serves requests
    /// to its own memory without a socket (the engine's own segment). Device memory is
    /// allowed: such a caller copies it through the driver. Returns the region and the
    /// offset into it.
    pub fn resolve_own(
        &self,
        op: Opcode,
        addr: u64,
        len: u64,
        key: u64,
    ) -> Result<(Arc<RegionMemory>, usize), RemoteStatus> {
        self.shared
            .regions
            .resolve(op, addr, len, key, true)
            .map(|r| (r.memory, r.offset))
    }

    /// Fetches a peer's segment descriptor over its data port, with this transport's
    /// secret (if any) and [`TcpConfig::connect_timeout`] as the deadline of the whole
    /// exchange.
    pub fn fetch_descriptor(&self, address: &str) -> Result<Vec<u8>, TransportError> {
        let c = &self.shared.config;
        fetch_descriptor_with(address, c.connect_timeout, c.secret.as_ref())
    }

    /// Sends a set-up message to the `protocol` transport of the peer at `address` (its TCP
    /// endpoint) with this transport's secret (if any); see [`exchange_with`].
    pub fn exchange(
        &self,
        address: &str,
        protocol: Protocol,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        exchange_with(
            address,
            protocol,
            body,
            timeout,
            self.shared.config.secret.as_ref(),
        )
    }

    /// Connects to a peer's TCP endpoint (`host:port`), or returns the live lanes already
    /// open to it.
    pub fn connect_tcp(&self, address: &str) -> Result<Arc<TcpConnection>, TransportError> {
        if self.shared.stopping() {
            return Err(TransportError::Closed);
        }
        if let Some(c) = self.peers.lock().get(address) {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        // Connects without the table's lock: a peer whose connect hangs must not hold up
        // connections to others.
        let addr = resolve(address)?;
        let conn = TcpConnection::open(&self.shared, address, addr).map_err(|source| {
            TransportError::ConnectPeer {
                peer: address.to_string(),
                source,
            }
        })?;
        let conn = Arc::new(conn);
        let (winner, dead) = {
            let mut peers = self.peers.lock();
            // Dead peers' lanes are released here, outside the lock below.
            let gone: Vec<String> = peers
                .iter()
                .filter(|(_, c)| !c.is_alive())
                .map(|(k, _)| k.clone())
                .collect();
            let dead: Vec<_> = gone.iter().filter_map(|k| peers.remove(k)).collect();
            let winner = match peers.get(address) {
                // Another thread connected meanwhile: its connection wins.
                Some(c) => Some(c.clone()),
                None if self.shared.stopping() => {
                    drop(peers);
                    conn.close(ferry_transport_api::FailReason::Shutdown);
                    return Err(TransportError::Closed);
                }
                None => {
                    peers.insert(address.to_string(), conn.clone());
                    None
                }
            };
            (winner, dead)
        };
        drop(dead);
        match winner {
            Some(c) => {
                conn.close(ferry_transport_api::FailReason::Shutdown);
                Ok(c)
            }
            None => Ok(conn),
        }
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
        if self
            .shared
            .config
            .secret
            .as_ref()
            .is_some_and(|s| s.bytes().is_empty())
        {
            return Err(TransportError::invalid(
                "TcpConfig::secret is empty; give every peer the same secret of at least 16 random bytes, or none",
            ));
        }
        if let Some(name) = &self.shared.config.congestion_control {
            check_congestion(name)?;
        }
        if self.shared.ctx.set(ctx).is_err() {
            return Err(TransportError::invalid(
                "the TCP transport was started twice",
            ));
        }
        let fit = connection_budget(self.shared.config.max_connections);
        self.shared.max_connections.store(fit, Ordering::Relaxed);
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
        if let Some(key) = self.shared.regions.remove(region) {
            // Requests already resolved hold the memory until their frame ends; a peer
            // that stalls such a frame must not hold it (and the caller) any longer.
            target::close_holders(&self.shared, key);
        }
    }

    fn connect(
        &self,
        endpoint: &Endpoint,
        _peer: &dyn PeerControl,
    ) -> Result<Arc<dyn Connection>, TransportError> {
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
        if let Some(w) = self.shared.accept_waker.lock().take() {
            let _ = w.wake();
        }
        if let Some(t) = self.shared.accept_thread.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        target::close_all(&self.shared);
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

/// File descriptors one served connection costs: the socket and the eventfd that wakes
/// its thread.
const FDS_PER_CONNECTION: u64 = 2;
/// Descriptors left for everything else in the process (files, lanes, libraries).
const FD_RESERVE: u64 = 256;

/// How many connections fit the process's descriptor limit, raising the soft limit
/// (up to the hard one) when `want` needs it.
fn connection_budget(want: usize) -> usize {
    use rlimit::Resource;
    let need = (want as u64)
        .saturating_mul(FDS_PER_CONNECTION)
        .saturating_add(FD_RESERVE);
    let (mut soft, hard) = match rlimit::getrlimit(Resource::NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the open-file limit; trusting max_connections");
            return want;
        }
    };
    if soft < need {
        let to = need.min(hard);
        match rlimit::setrlimit(Resource::NOFILE, to, hard) {
            Ok(()) => {
                tracing::info!(
                    from = soft,
                    to,
                    "raised the open-file limit for the TCP target's connections"
                );
                soft = to;
            }
            Err(e) => tracing::debug!(error = %e, "cannot raise the open-file limit"),
        }
    }
    if soft >= need {
        return want;
    }
    let fit = (soft.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION).max(1) as usize;
    let fit = fit.min(want);
    tracing::warn!(
        max_connections = want,
        serving = fit,
        open_file_limit = soft,
        "the open-file limit (ulimit -n) is too low for max_connections; serving fewer connections (raise the hard limit to serve them all)"
    );
    fit
}

/// Linux's longest keepalive idle time and probe interval (`MAX_TCP_KEEPIDLE`): a longer
/// one is refused by the socket, so it is taken as this.
const MAX_KEEPALIVE: Duration = Duration::from_secs(32767);

/// Sets TCP keepalive on a connected socket: probes after `idle` of silence (1 s to
/// [`MAX_KEEPALIVE`]), every third of it (at least 1 s), three times.
pub(crate) fn set_keepalive(
    socket: &impl std::os::fd::AsFd,
    idle: Option<Duration>,
) -> io::Result<()> {
    let sock = socket2::SockRef::from(socket);
    match idle {
        None => sock.set_keepalive(false),
        Some(idle) => {
            let idle = idle.clamp(Duration::from_secs(1), MAX_KEEPALIVE);
            let ka = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval((idle / 3).max(Duration::from_secs(1)))
                .with_retries(3);
            sock.set_tcp_keepalive(&ka)
        }
    }
}

/// Sets the socket's TCP congestion control to `name`, when one is given.
fn set_congestion(socket: &impl std::os::fd::AsFd, name: Option<&str>) -> io::Result<()> {
    match name {
        Some(name) => socket2::SockRef::from(socket).set_tcp_congestion(name.as_bytes()),
        None => Ok(()),
    }
}

/// Whether this process may give its sockets congestion control `name`: tried on a
/// socket of its own, so a name the kernel refuses fails the start, not every
/// connection.
fn check_congestion(name: &str) -> Result<(), TransportError> {
    // The kernel reads at most 15 bytes of the name and stops at a NUL: a longer name,
    // or one with a NUL, would be cut to another one.
    if name.is_empty() || name.len() > 15 || name.contains('\0') {
        return Err(TransportError::invalid(format!(
            "TcpConfig::congestion_control `{}` is not a congestion control name (1 to 15 \
             bytes, no NUL)",
            name.escape_default()
        )));
    }
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| TransportError::invalid(format!("cannot open a TCP socket: {e}")))?;
    set_congestion(&socket, Some(name)).map_err(|e| {
        let allowed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(", "))
            .unwrap_or_else(|_| "(unreadable)".into());
        TransportError::invalid(format!(
            "TcpConfig::congestion_control `{name}` is refused by the kernel ({e}); this \
             process may use {allowed}"
        ))
    })
}

/// What every data connection gets, the ones this side opens and the ones it accepts:
/// keepalive and the configured congestion control.
pub(crate) fn set_connection_options(
    socket: &impl std::os::fd::AsFd,
    config: &TcpConfig,
) -> io::Result<()> {
    set_keepalive(socket, config.keepalive)?;
    set_congestion(socket, config.congestion_control.as_deref())
}

/// Prepares a connection this side opened to a peer's port: its
/// [options](set_connection_options), then, with a secret, the mutual proof, by
/// `deadline`. Errors name the secret when it is the cause.
pub(crate) fn prepare_client(
    stream: &mut TcpStream,
    config: &TcpConfig,
    deadline: Instant,
) -> io::Result<()> {
    set_connection_options(stream, config)?;
    if let Some(secret) = &config.secret {
        authenticate(stream, secret, deadline)?;
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
    }
    Ok(())
}

fn deadline_passed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("deadline passed {what}"))
}

/// Reads exactly `buf` before `deadline`, however the bytes trickle in.
fn read_exact_by(
    s: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    what: &str,
) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(deadline_passed(what));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[at..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the peer closed the connection {what}"),
                ))
            }
            Ok(n) => at += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` before `deadline`.
pub(crate) fn write_all_by(
    s: &mut TcpStream,
    buf: &[u8],
    deadline: Instant,
    what: &str,
) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(deadline_passed(what));
        }
        s.set_write_timeout(Some(left))?;
        match pipe::send(s, &[std::io::IoSlice::new(&buf[at..])]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The client's half of the challenge-response (see the `frame` module): proves the
/// secret to the target and checks the target's proof, before `deadline`.
fn authenticate(s: &mut TcpStream, secret: &SharedSecret, deadline: Instant) -> io::Result<()> {
    use frame::{Header, Kind, AUTH_LEN, CLIENT_LABEL, HEADER_LEN, TARGET_LABEL};
    let denied = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, why);
    let client_nonce = frame::nonce();
    let mut hello = [0u8; HEADER_LEN + AUTH_LEN];
    hello[..HEADER_LEN].copy_from_slice(&Header::new(Kind::Hello, AUTH_LEN as u32, 0).encode());
    hello[HEADER_LEN..].copy_from_slice(&client_nonce);
    write_all_by(s, &hello, deadline, "while authenticating")?;
    let mut hb = [0u8; HEADER_LEN];
    match read_exact_by(s, &mut hb, deadline, "while authenticating") {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof || is_reset(&e) => {
            return Err(denied(
                "the target closed the connection when asked to authenticate: it has no shared \
                 secret (set the same `TcpConfig::secret` on both sides, or on neither)"
                    .into(),
            ))
        }
        r => r?,
    }
    let h = Header::decode(&hb).map_err(|e| denied(format!("authentication answer: {e}")))?;
    if h.kind != Kind::Challenge || h.count as usize != 2 * AUTH_LEN {
        return Err(denied(format!(
            "the target answered authentication with {:?} of {} bytes",
            h.kind, h.count
        )));
    }
    let mut body = [0u8; 2 * AUTH_LEN];
    read_exact_by(s, &mut body, deadline, "while authenticating")?;
    let mut target_nonce = [0u8; AUTH_LEN];
    target_nonce.copy_from_slice(&body[..AUTH_LEN]);
    let proof = &body[AUTH_LEN..];
    if !frame::auth_verify(
        secret.bytes(),
        TARGET_LABEL,
        &client_nonce,
        &target_nonce,
        proof,
    ) {
        return Err(denied(
            "the target failed to prove the shared secret: its `TcpConfig::secret` differs \
             from ours (or it is not the peer it claims to be)"
                .into(),
        ));
    }
    let mine = frame::auth_proof(secret.bytes(), CLIENT_LABEL, &client_nonce, &target_nonce);
    let mut msg = [0u8; HEADER_LEN + AUTH_LEN];
    msg[..HEADER_LEN].copy_from_slice(&Header::new(Kind::Proof, AUTH_LEN as u32, 0).encode());
    msg[HEADER_LEN..].copy_from_slice(&mine);
    write_all_by(s, &msg, deadline, "while authenticating")
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Fetches a peer's segment descriptor over its data port (peer-to-peer metadata), with
/// no shared secret. `timeout` bounds the whole exchange, however slowly the peer
/// answers. Use [`TcpTransport::fetch_descriptor`] to fetch with the transport's secret.
pub fn fetch_descriptor(address: &str, timeout: Duration) -> Result<Vec<u8>, TransportError> {
    fetch_descriptor_with(address, timeout, None)
}

/// Fetches a peer's segment descriptor, proving `secret` first when one is given, within
/// one deadline (`timeout` from now) for connecting, authenticating and reading.
pub fn fetch_descriptor_with(
    address: &str,
    timeout: Duration,
    secret: Option<&SharedSecret>,
) -> Result<Vec<u8>, TransportError> {
    ask(
        address,
        timeout,
        secret,
        frame::Kind::GetDescriptor,
        &[],
        frame::Kind::Descriptor,
    )
}

/// Sends a set-up message to the peer's `protocol` transport through its port and returns
/// the answer, proving `secret` first when one is given; `timeout` bounds the whole
/// exchange. A peer that refuses gives [`TransportError::Refused`] with its reason.
pub fn exchange_with(
    address: &str,
    protocol: Protocol,
    body: &[u8],
    timeout: Duration,
    secret: Option<&SharedSecret>,
) -> Result<Vec<u8>, TransportError> {
    if body.len() + 1 > frame::MAX_EXCHANGE {
        return Err(TransportError::invalid(format!(
            "a set-up message of {} bytes; at most {} fit",
            body.len(),
            frame::MAX_EXCHANGE - 1
        )));
    }
    let mut message = Vec::with_capacity(body.len() + 1);
    message.push(frame::protocol_byte(protocol));
    message.extend_from_slice(body);
    let answer = ask(
        address,
        timeout,
        secret,
        frame::Kind::Exchange,
        &message,
        frame::Kind::Exchanged,
    )?;
    match frame::decode_exchanged(&answer) {
        Some(Ok(a)) => Ok(a.to_vec()),
        Some(Err(why)) => Err(TransportError::Refused {
            peer: address.to_string(),
            protocol,
            reason: why,
        }),
        None => Err(TransportError::handshake(
            address,
            "the peer answered the set-up with a malformed frame",
        )),
    }
}

/// One request and its answer on a connection of their own, within one deadline for
/// connecting, authenticating, sending and reading.
fn ask(
    address: &str,
    timeout: Duration,
    secret: Option<&SharedSecret>,
    kind: frame::Kind,
    body: &[u8],
    answer: frame::Kind,
) -> Result<Vec<u8>, TransportError> {
    let deadline = ferry_transport_api::instant_after(Instant::now(), timeout);
    let addr = resolve(address)?;
    let connect_err = |source| TransportError::ConnectPeer {
        peer: address.to_string(),
        source,
    };
    let handshake = |reason: &str| TransportError::handshake(address, reason);
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(connect_err)?;
    if let Some(secret) = secret {
        authenticate(&mut s, secret, deadline)
            .map_err(|e| handshake("proving the shared secret").caused_by(e))?;
    }
    let mut request = Vec::with_capacity(frame::HEADER_LEN + body.len());
    request.extend_from_slice(&frame::Header::new(kind, body.len() as u32, 0).encode());
    request.extend_from_slice(body);
    write_all_by(&mut s, &request, deadline, "sending the request")
        .map_err(|e| handshake("sending the request").caused_by(e))?;
    let mut hb = [0u8; frame::HEADER_LEN];
    read_exact_by(&mut s, &mut hb, deadline, "before the answer was complete")
        .map_err(|e| handshake("reading the answer").caused_by(e))?;
    let h = frame::Header::decode(&hb).map_err(|e| handshake(&e.to_string()))?;
    if h.kind == frame::Kind::Challenge && h.count == 0 {
        return Err(handshake(
            "the target requires a shared secret: set `TcpConfig::secret` to the secret its \
             engines share",
        ));
    }
    if h.kind != answer {
        return Err(handshake(&format!("answered with a {:?} frame", h.kind)));
    }
    let mut body = vec![0u8; h.count as usize];
    read_exact_by(
        &mut s,
        &mut body,
        deadline,
        "before the answer was complete",
    )
    .map_err(|e| handshake("reading the answer").caused_by(e))?;
    Ok(body)
}

/// The decoders that read a peer's bytes, reachable from ferry's fuzz targets and
/// wire-format tests. Not part of the API: no stability promise.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::Arc;

    use ferry_transport_api::{Access, Opcode, RegionMemory, RemoteStatus};

    use crate::frame;

    /// Header length.
    pub const HEADER_LEN: usize = frame::HEADER_LEN;
    /// Request descriptor length.
    pub const DESC_LEN: usize = frame::DESC_LEN;
    /// Most descriptors or statuses one message carries.
    pub const MAX_DESCS: usize = frame::MAX_DESCS;
    /// Largest notification body.
    pub const MAX_NOTIFY: usize = frame::MAX_NOTIFY;
    /// Largest descriptor document.
    pub const MAX_DESCRIPTOR: usize = frame::MAX_DESCRIPTOR;
    /// Largest single request a target accepts.
    pub const MAX_REQUEST: u64 = frame::MAX_REQUEST;
    /// Largest set-up exchange body (`Exchange` and `Exchanged` counts), protocol or
    /// status byte included.
    pub const MAX_EXCHANGE: usize = frame::MAX_EXCHANGE;

    /// A header's fields: kind byte, count, sequence number.
    pub type Header = (u8, u32, u64);

    /// Decodes and checks a header as both ends do; the error is the message a peer sees.
    pub fn decode_header(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        frame::Header::decode(b)
            .map(|h| (h.kind as u8, h.count, h.seq))
            .map_err(|e| e.to_string())
    }

    /// Encodes a header whose kind byte is a known kind (the count is not checked).
    pub fn encode_header(kind: u8, count: u32, seq: u64) -> Option<[u8; HEADER_LEN]> {
        // The decoder is the one list of kinds: ask it about a header of this kind alone.
        let mut probe = frame::Header::new(frame::Kind::GetDescriptor, 0, 0).encode();
        probe[3] = kind;
        let kind = match frame::Header::decode(&probe) {
            Ok(h) => h.kind,
            Err(frame::FrameError::TooLong { kind, .. }) => kind,
            Err(_) => return None,
        };
        Some(frame::Header::new(kind, count, seq).encode())
    }

    /// Decodes a request descriptor: (address, length, key).
    pub fn decode_desc(b: &[u8; DESC_LEN]) -> (u64, u64, u64) {
        let d = frame::Desc::decode(b);
        (d.addr, d.len, d.key)
    }

    /// Encodes a request descriptor.
    pub fn encode_desc(addr: u64, len: u64, key: u64) -> [u8; DESC_LEN] {
        let mut b = [0u8; DESC_LEN];
        frame::Desc { addr, len, key }.encode_into(&mut b);
        b
    }

    /// Parses a notification body into (sender, message), as the target does.
    pub fn parse_notification(body: &[u8]) -> Option<(&str, &[u8])> {
        crate::target::parse_notification(body)
    }

    /// Encodes a notification body, as the initiator does.
    pub fn encode_notification(from: &str, message: &[u8]) -> Vec<u8> {
        crate::target::encode_notification(from, message)
    }

    /// The target's table of registered regions, which resolves every request.
    #[derive(Default)]
    pub struct Regions(crate::regions::Regions);

    impl Regions {
        /// Registers `memory`; returns its fresh key.
        pub fn insert(&self, memory: &Arc<RegionMemory>, access: Access) -> u64 {
            self.0.insert(memory, access)
        }

        /// Forgets `memory`.
        pub fn remove(&self, memory: &RegionMemory) {
            self.0.remove(memory);
        }

        /// Checks a request as the target does: the region it lies in and the offset.
        pub fn resolve(
            &self,
            op: Opcode,
            addr: u64,
            len: u64,
            key: u64,
            staging: bool,
        ) -> Result<(Arc<RegionMemory>, usize), RemoteStatus> {
            self.0
                .resolve(op, addr, len, key, staging)
                .map(|r| (r.memory, r.offset))
        }
    }
}

/// The wire format's hot paths as the lanes run them, for ferry's micro-benchmarks
/// (`cargo bench -p ferry-transport-tcp`). Not part of the API: no stability promise.
#[doc(hidden)]
pub mod bench {
    use crate::frame::{Desc, Header, Kind, DESC_LEN, HEADER_LEN};

    pub use crate::fuzzing::Regions;

    /// Header length.
    pub const HEADER: usize = HEADER_LEN;
    /// Request descriptor length.
    pub const DESC: usize = DESC_LEN;

    /// One request of a frame: address, length, region key.
    pub type Request = (u64, u64, u64);

    /// Encodes a WRITE frame's header and request descriptors into `out` as the initiator
    /// does before sending; returns the bytes used. `out` must hold them all.
    pub fn encode_write_frame(requests: &[Request], seq: u64, out: &mut [u8]) -> usize {
        out[..HEADER_LEN]
            .copy_from_slice(&Header::new(Kind::Write, requests.len() as u32, seq).encode());
        for (i, &(addr, len, key)) in requests.iter().enumerate() {
            let at = HEADER_LEN + i * DESC_LEN;
            Desc { addr, len, key }.encode_into(&mut out[at..at + DESC_LEN]);
        }
        HEADER_LEN + requests.len() * DESC_LEN
    }

    /// Decodes a frame as the target does: the header, checked, then its request
    /// descriptors into `out` (cleared first). `None` for a header the target refuses.
    pub fn decode_frame(bytes: &[u8], out: &mut Vec<Request>) -> Option<u64> {
        let header: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
        let h = Header::decode(header).ok()?;
        out.clear();
        let descs = bytes.get(HEADER_LEN..HEADER_LEN + h.count as usize * DESC_LEN)?;
        out.extend(descs.chunks_exact(DESC_LEN).map(|b| {
            let d = Desc::decode(b);
            (d.addr, d.len, d.key)
        }));
        Some(h.seq)
    }

    /// Encodes one header (a WRITE frame's, of `count` requests).
    pub fn encode_header(count: u32, seq: u64) -> [u8; HEADER_LEN] {
        Header::new(Kind::Write, count, seq).encode()
    }

    /// Decodes and checks one header; its count and sequence number.
    pub fn decode_header(b: &[u8; HEADER_LEN]) -> Option<(u32, u64)> {
        Header::decode(b).ok().map(|h| (h.count, h.seq))
    }
}
