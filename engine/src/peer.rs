//! Peers: everything from a segment name to the path one request travels.
//!
//! - **Naming**: a name becomes a descriptor through the [`MetadataStore`]; the engine's
//!   own name (or what the store says reaches it) becomes the local peer.
//! - **Connecting**: the best transport both sides speak is the *primary* path; a peer
//!   reached over a fabric also gets a TCP *fallback* path (device memory the fabric could
//!   not register, and retries). Each path carries its connection, its slice size and
//!   every buffer's keys for its transport. The engine's own segment is a path too: a
//!   checked memory copy ([`LocalConnection`]).
//! - **Per request**: [`PeerInner::path_for`] picks the path, [`PeerInner::retry_leg`]
//!   the path of a retry. Nothing else in the engine asks which protocol a request uses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport_api::{
    BufferDescriptor, Connection, ControlPlane, FailReason, PeerControl, Protocol, RemoteKeys,
    RemoteStatus, SegmentDescriptor, Transport, TransportError,
};
use ferry_transport_tcp::TcpConnection;
use parking_lot::Mutex;

use crate::control::ControlState;
use crate::local::LocalConnection;
use crate::registry::Registry;
use crate::{Error, Result, SegmentError};

/// Which of a peer's paths a request travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leg {
    /// The best transport both sides speak (or the local copy).
    Primary,
    /// TCP, for a peer whose primary path is a fabric.
    Fallback,
}

/// One way to reach a peer: a connection, the slice size its transport takes, and every
/// published buffer's keys for that transport.
pub(crate) struct Path {
    /// The transport; `None` for the engine's own segment (memory copies).
    protocol: Option<Protocol>,
    conn: Arc<dyn Connection>,
    max_slice: usize,
    /// Per buffer of the descriptor, in order.
    keys: Vec<Option<RemoteKeys>>,
}

impl Path {
    pub(crate) fn new(
        protocol: Option<Protocol>,
        conn: Arc<dyn Connection>,
        max_slice: usize,
        descriptor: &SegmentDescriptor,
    ) -> Self {
        let keyed = protocol.unwrap_or(Protocol::Tcp);
        Path {
            protocol,
            conn,
            max_slice: max_slice.max(1),
            keys: descriptor
                .buffers
                .iter()
                .map(|b| b.keys_of(keyed))
                .collect(),
        }
    }

    pub(crate) fn conn(&self) -> &dyn Connection {
        &*self.conn
    }

    /// The largest slice the path's transport takes.
    pub(crate) fn max_slice(&self) -> usize {
        self.max_slice
    }

    /// Buffer `index`'s keys on this path.
    pub(crate) fn keys(&self, index: usize) -> Option<&RemoteKeys> {
        self.keys.get(index).and_then(Option::as_ref)
    }
}

/// Where notifications to a peer go.
enum Messenger {
    /// This engine's own queue.
    Own(Arc<ControlState>),
    /// The peer's TCP lanes.
    Lanes(Arc<TcpConnection>),
}

/// What an engine's batches did with one peer, by the name it was opened by, since the
/// engine started: kept across the peer's restarts and the engine's re-openings of it
/// ([`crate::Engine::peer_stats`], [`Segment::stats`]). Tasks count when their batch is
/// dropped, by their status then: one past the deadline as timed out, one still open
/// before it not at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Tasks that completed.
    pub completed: u64,
    /// Tasks that failed: refused by the peer, a lost connection, a transport's error.
    pub failed: u64,
    /// Tasks that ended at their deadline.
    pub timed_out: u64,
    /// Bytes of completed WRITE tasks, to the peer.
    pub bytes_written: u64,
    /// Bytes of completed READ tasks, from the peer.
    pub bytes_read: u64,
    /// Tasks that failed on a fabric and were tried again over TCP.
    pub retried_over_tcp: u64,
    /// Times the peer's descriptor was fetched and its paths set up again after the first
    /// opening: after its connection died or its descriptor went stale (a restart, a
    /// re-registration), and for every `refresh_segment` (Mooncake's API fetches again
    /// for a peer address the descriptor at hand does not hold).
    pub reopened: u64,
}

/// [`PeerStats`] as the engine's threads add to it.
#[derive(Debug, Default)]
pub(crate) struct PeerCounters {
    completed: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    retried_over_tcp: AtomicU64,
    reopened: AtomicU64,
}

impl PeerCounters {
    /// Adds what one batch did with the peer (its tasks' outcomes and bytes).
    pub(crate) fn add(&self, t: &PeerStats) {
        for (c, n) in [
            (&self.completed, t.completed),
            (&self.failed, t.failed),
            (&self.timed_out, t.timed_out),
            (&self.bytes_written, t.bytes_written),
            (&self.bytes_read, t.bytes_read),
            (&self.retried_over_tcp, t.retried_over_tcp),
            (&self.reopened, t.reopened),
        ] {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn retried(&self) {
        self.retried_over_tcp.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> PeerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PeerStats {
            completed: get(&self.completed),
            failed: get(&self.failed),
            timed_out: get(&self.timed_out),
            bytes_written: get(&self.bytes_written),
            bytes_read: get(&self.bytes_read),
            retried_over_tcp: get(&self.retried_over_tcp),
            reopened: get(&self.reopened),
        }
    }
}

pub(crate) struct PeerInner {
    /// The name it was opened by (the peer's descriptor may claim any name).
    name: String,
    /// Shared by every opening of this name.
    pub(crate) counters: Arc<PeerCounters>,
    /// Shared, so that the opening that replaces a stale one can compare with it
    /// without a copy.
    descriptor: Arc<SegmentDescriptor>,
    primary: Path,
    /// TCP, when the primary path is a fabric.
    fallback: Option<Path>,
    messenger: Messenger,
    /// `(start address, buffer index)` of every buffer, sorted: finds the buffer that
    /// holds an address in O(log n).
    by_addr: Vec<(u64, usize)>,
    stale: AtomicBool,
    /// Set when this opening fetched the very descriptor of the stale one it replaced:
    /// the access error that made that one stale was the peer's answer to what it
    /// publishes, not news of a change. Until then further access errors leave this
    /// opening usable (they fail their tasks, and fetch nothing), so a peer that refuses
    /// its own keys costs one fetch a [`REOPEN_BACKOFF`], not one per batch.
    /// [`Engine::refresh_segment`](crate::Engine::refresh_segment) fetches regardless.
    trusted_until: Option<Instant>,
}

/// How many buffers starting at or below an address [`PeerInner::locate`] looks at.
/// Buffers overlap only when the same memory is published more than once, so the
/// nearest few decide.
const OVERLAP_PROBE: usize = 4;

fn address_index(descriptor: &SegmentDescriptor) -> Vec<(u64, usize)> {
    let mut v: Vec<(u64, usize)> = descriptor
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| (b.addr, i))
        .collect();
    v.sort_unstable();
    v
}

impl PeerInner {
    /// The name it was opened by.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The published buffer that holds `addr..addr + len`, and the offset of `addr` in
    /// it.
    pub(crate) fn locate(&self, addr: u64, len: u64) -> Option<(usize, u64)> {
        let end = addr.checked_add(len)?;
        let below = self.by_addr.partition_point(|&(start, _)| start <= addr);
        self.by_addr[..below]
            .iter()
            .rev()
            .take(OVERLAP_PROBE)
            .map(|&(start, i)| (start, i, &self.descriptor.buffers[i]))
            .find(|(start, _, b)| start.checked_add(b.len).is_some_and(|e| end <= e))
            .map(|(start, i, _)| (i, addr - start))
    }

    /// The path a request between `local` and the peer's buffer `buffer` travels. A fabric
    /// carries it only when both buffers are registered with the fabric; device memory it
    /// could not register goes over TCP, staged.
    pub(crate) fn path_for(&self, local: &BufferDescriptor, buffer: usize) -> Result<Leg> {
        let primary = &self.primary;
        let fabric_ok = match primary.protocol {
            None | Some(Protocol::Tcp) => true,
            Some(p) => local.key(p).is_some(),
        };
        if fabric_ok && primary.keys(buffer).is_some() {
            return Ok(Leg::Primary);
        }
        if self
            .fallback
            .as_ref()
            .is_some_and(|f| f.keys(buffer).is_some())
        {
            return Ok(Leg::Fallback);
        }
        let protocol = primary.protocol.unwrap_or(Protocol::Tcp);
        Err(Error::InvalidRequest(format!(
            "the remote buffer has no {protocol} key in its descriptor"
        )))
    }

    pub(crate) fn path(&self, leg: Leg) -> &Path {
        match (leg, &self.fallback) {
            (Leg::Fallback, Some(f)) => f,
            _ => &self.primary,
        }
    }

    /// Where a request that failed on `used` is tried again, if anywhere: the TCP
    /// fallback of a fabric path, when it has the buffer's keys.
    pub(crate) fn retry_leg(&self, used: Leg, buffer: usize) -> Option<Leg> {
        (used == Leg::Primary && self.fallback.as_ref()?.keys(buffer).is_some())
            .then_some(Leg::Fallback)
    }

    /// The descriptor as fetched.
    pub(crate) fn descriptor(&self) -> &SegmentDescriptor {
        &self.descriptor
    }

    /// Rings every path's doorbell: all of a submission's slices are posted.
    pub(crate) fn flush(&self) {
        self.primary.conn.flush();
        if let Some(f) = &self.fallback {
            f.conn.flush();
        }
    }

    /// After an access error: marks the cached descriptor out of date, so the next
    /// `open_segment` (or the next request on this opening) fetches it again; unless the
    /// descriptor was just fetched and found unchanged (see `trusted_until`).
    pub(crate) fn mark_stale(&self) {
        if self.trusted_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.expire("after an access error");
    }

    /// Marks the cached descriptor out of date, whatever else holds.
    fn expire(&self, why: &str) {
        if !self.stale.swap(true, Ordering::AcqRel) {
            tracing::debug!(segment = %self.name, "descriptor marked stale {why}");
        }
    }

    fn usable(&self) -> bool {
        !self.stale.load(Ordering::Acquire)
            && self.primary.conn.is_alive()
            && self.fallback.as_ref().is_none_or(|f| f.conn.is_alive())
            && match &self.messenger {
                Messenger::Own(_) => true,
                Messenger::Lanes(tcp) => tcp.is_alive(),
            }
    }

    /// Sends a notification from `from` and waits until it is queued.
    pub(crate) fn notify(
        &self,
        from: &str,
        message: &[u8],
        timeout: Duration,
    ) -> Result<(), FailReason> {
        match &self.messenger {
            Messenger::Own(control) => {
                if ControlPlane::notification(&**control, from, message) {
                    Ok(())
                } else {
                    Err(FailReason::Remote(RemoteStatus::Busy))
                }
            }
            Messenger::Lanes(tcp) => tcp.notify(from, message, timeout).inspect_err(|r| {
                if r.suggests_stale_descriptor() {
                    self.mark_stale();
                }
            }),
        }
    }

    /// A peer made of given paths, for tests of what runs on top of them.
    #[cfg(test)]
    pub(crate) fn for_tests(
        descriptor: SegmentDescriptor,
        primary: Path,
        fallback: Option<Path>,
        control: Arc<ControlState>,
    ) -> Self {
        PeerInner {
            name: descriptor.name.clone(),
            counters: Arc::default(),
            descriptor: Arc::new(descriptor),
            primary,
            fallback,
            messenger: Messenger::Own(control),
            by_addr: Vec::new(),
            stale: AtomicBool::new(false),
            trusted_until: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }
}

/// Opened peers by name, and how to open more.
pub(crate) struct Peers {
    registry: Arc<Registry>,
    local: Arc<LocalConnection>,
    /// Opened segments by the name they were opened by. Dead and stale ones are dropped
    /// whenever a segment is fetched, so the cache holds live peers only.
    segments: Mutex<HashMap<String, Arc<PeerInner>>>,
    /// One gate per name being opened, so two opens of one name fetch and connect once
    /// while opens of other names go ahead. No lock is held across network I/O but the
    /// gate of the name being opened.
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Peers whose re-opening failed, and when (see [`Peers::current`]).
    unreachable: Mutex<HashMap<String, std::time::Instant>>,
    /// Every name opened so far and its counters, kept when its peer is dropped from the
    /// cache (one entry per name ever opened).
    counters: Mutex<HashMap<String, Arc<PeerCounters>>>,
}

/// How long a peer that could not be opened again is left alone before the next try.
const REOPEN_BACKOFF: Duration = Duration::from_secs(1);

impl Peers {
    pub(crate) fn new(registry: Arc<Registry>, local: Arc<LocalConnection>) -> Self {
        Peers {
            registry,
            local,
            segments: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            unreachable: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
        }
    }

    /// The counters of `name`, for a peer opened under it just now: a name opened before
    /// counts one more re-opening.
    fn counters_for(&self, name: &str) -> Arc<PeerCounters> {
        let mut all = self.counters.lock();
        match all.get(name) {
            Some(c) => {
                c.reopened.fetch_add(1, Ordering::Relaxed);
                c.clone()
            }
            None => {
                let c = Arc::<PeerCounters>::default();
                all.insert(name.to_string(), c.clone());
                c
            }
        }
    }

    /// [`PeerStats`] of every name opened so far, sorted by name.
    pub(crate) fn stats(&self) -> Vec<(String, PeerStats)> {
        let mut v: Vec<_> = self
            .counters
            .lock()
            .iter()
            .map(|(name, c)| (name.clone(), c.snapshot()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// When `peer` can no longer be used (its connection died, or an access error made
    /// its descriptor stale, as after a restart), the peer of the same name opened anew
    /// and where buffer `index` of the old descriptor is in the new one: by its name, or
    /// at the same index with the same length for an unnamed one. `None` while `peer` is
    /// usable (the common case, which costs two atomic loads).
    pub(crate) fn current(
        &self,
        peer: &Arc<PeerInner>,
        index: usize,
    ) -> Result<Option<(Arc<PeerInner>, usize)>> {
        if peer.usable() || peer.primary.protocol.is_none() {
            return Ok(None);
        }
        // A peer that could not be opened a moment ago is not tried again for every
        // request: until then the request goes to the old path, where it fails at once.
        if self
            .unreachable
            .lock()
            .get(&peer.name)
            .is_some_and(|at| at.elapsed() < REOPEN_BACKOFF)
        {
            return Ok(None);
        }
        let fresh = match self.open(&peer.name) {
            Ok(fresh) => {
                self.unreachable.lock().remove(&peer.name);
                fresh
            }
            Err(e) => {
                tracing::debug!(segment = %peer.name, error = %e, "the peer cannot be opened again yet");
                let mut unreachable = self.unreachable.lock();
                // Bounded: names that failed long ago go first.
                unreachable.retain(|_, at| at.elapsed() < REOPEN_BACKOFF);
                unreachable.insert(peer.name.clone(), Instant::now());
                return Ok(None);
            }
        };
        let old = &peer.descriptor.buffers[index];
        let found = if old.name.is_empty() {
            fresh
                .descriptor
                .buffers
                .get(index)
                .filter(|b| b.name.is_empty() && b.len == old.len)
                .map(|_| index)
        } else {
            fresh
                .descriptor
                .buffers
                .iter()
                .position(|b| b.name == old.name)
        };
        match found {
            Some(i) => {
                // Per request on an old handle: the opening itself was logged once.
                tracing::debug!(segment = %peer.name, "a request on an old handle follows the peer's current opening");
                Ok(Some((fresh, i)))
            }
            None => Err(Error::InvalidRequest(format!(
                "segment `{}` changed and no longer publishes that buffer ({}); open it again and pick a buffer",
                peer.name,
                if old.name.is_empty() {
                    format!("unnamed, {} bytes, at index {index}", old.len)
                } else {
                    format!("`{}`", old.name)
                }
            ))),
        }
    }

    /// How many opened peers are cached.
    pub(crate) fn cached_count(&self) -> usize {
        self.segments.lock().len()
    }

    /// Drops every cached peer (at shutdown).
    pub(crate) fn clear(&self) {
        let cached = std::mem::take(&mut *self.segments.lock());
        drop(cached);
    }

    /// Marks the cached peer `name` stale, so the next open fetches it again (for
    /// `refresh_segment`: whatever the last fetch found).
    pub(crate) fn mark_stale(&self, name: &str) {
        if let Some(old) = self.segments.lock().get(name) {
            old.expire("on request");
        }
    }

    /// The cached peer for `name` if it is still usable. A dead or stale one is dropped
    /// from the cache; a stale one's descriptor comes back in the error, so that the
    /// fetch that replaces it can tell an unchanged descriptor.
    fn cached(
        &self,
        name: &str,
    ) -> std::result::Result<Arc<PeerInner>, Option<Arc<SegmentDescriptor>>> {
        let mut segments = self.segments.lock();
        match segments.get(name) {
            Some(s) if s.usable() => Ok(s.clone()),
            Some(_) => {
                let dead = segments.remove(name);
                // Closing what the dead peer held fails its transfers, which runs
                // completions: not under the cache's lock.
                drop(segments);
                Err(dead.and_then(|d| {
                    d.stale
                        .load(Ordering::Acquire)
                        .then(|| d.descriptor.clone())
                }))
            }
            None => Err(None),
        }
    }

    /// The peer named `name`, from the cache or opened now.
    pub(crate) fn open(&self, name: &str) -> Result<Arc<PeerInner>> {
        let previous = match self.cached(name) {
            Ok(inner) => return Ok(inner),
            Err(previous) => previous,
        };
        let gate = self
            .opening
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone();
        let opened = {
            let _one_at_a_time = gate.lock();
            match self.cached(name) {
                Ok(inner) => Ok(inner),
                Err(again) => self
                    .connect(name, again.or(previous).as_ref())
                    .map(|inner| {
                        let inner = Arc::new(inner);
                        let mut evicted = Vec::new();
                        {
                            let mut segments = self.segments.lock();
                            // Bound the cache: what is dead or stale is never handed out
                            // again, so it goes (and is dropped after the lock).
                            segments.retain(|_, s| {
                                let keep = s.usable();
                                if !keep {
                                    evicted.push(s.clone());
                                }
                                keep
                            });
                            if !self.registry.is_shut_down() {
                                evicted.extend(segments.insert(name.to_string(), inner.clone()));
                            }
                        }
                        drop(evicted);
                        inner
                    }),
            }
        };
        {
            let mut opening = self.opening.lock();
            // The map's clone and ours: nobody else waits on this gate.
            if Arc::strong_count(&gate) == 2
                && opening.get(name).is_some_and(|g| Arc::ptr_eq(g, &gate))
            {
                opening.remove(name);
            }
        }
        opened
    }

    /// Whether `name` names this engine, by what it knows of itself: its own name, or
    /// what its metadata store says reaches it. Never from anything a peer sends.
    fn is_own_name(&self, name: &str) -> bool {
        name == self.registry.control.own.name() || self.registry.store.names_self(name)
    }

    /// Names and connects a peer (contract 3: the best transport both sides speak, with
    /// TCP as the fallback). `previous`: the descriptor of the stale opening this one
    /// replaces, if any.
    fn connect(&self, name: &str, previous: Option<&Arc<SegmentDescriptor>>) -> Result<PeerInner> {
        let open_err = |source: SegmentError| Error::OpenSegment {
            segment: name.to_string(),
            source,
        };
        let registry = &self.registry;
        let tcp_transport = &registry.tcp;
        if self.is_own_name(name) {
            let descriptor = registry.control.own.descriptor();
            let primary = Path::new(
                None,
                self.local.clone(),
                tcp_transport.max_slice(),
                &descriptor,
            );
            return Ok(PeerInner {
                name: name.to_string(),
                counters: self.counters_for(name),
                primary,
                fallback: None,
                messenger: Messenger::Own(registry.control.clone()),
                by_addr: address_index(&descriptor),
                descriptor: Arc::new(descriptor),
                stale: AtomicBool::new(false),
                trusted_until: None,
            });
        }
        let fetched = registry.store.fetch(name).map_err(open_err)?;
        let descriptor: SegmentDescriptor =
            serde_json::from_slice(&fetched.body).map_err(|e| open_err(SegmentError::Parse(e)))?;
        descriptor
            .validate()
            .map_err(|e| open_err(SegmentError::Invalid(e)))?;
        let trusted_until = previous.is_some_and(|p| **p == descriptor).then(|| {
            tracing::debug!(
                segment = name,
                "fetched again after an access error: unchanged"
            );
            Instant::now() + REOPEN_BACKOFF
        });
        if descriptor.incarnation == registry.control.own.incarnation() {
            // A peer serving this engine's own descriptor (anyone can fetch it from our
            // port): it is still the peer, reached over the network like any other.
            tracing::warn!(segment = name, "the peer serves a descriptor with this engine's own incarnation; treating it as the remote peer it is");
        }
        let address = match fetched.tcp_address {
            Some(a) => a,
            None => descriptor
                .endpoint(Protocol::Tcp)
                .map(|e| e.address.clone())
                .ok_or_else(|| open_err(SegmentError::NoTcpEndpoint))?,
        };
        let tcp = tcp_transport.connect_tcp(&address)?;
        let tcp_path = |d: &SegmentDescriptor| {
            Path::new(
                Some(Protocol::Tcp),
                tcp.clone(),
                tcp_transport.max_slice(),
                d,
            )
        };
        // Contract 3: the best transport both sides speak.
        let mut fabric = None;
        for t in registry.transports() {
            let protocol = t.protocol();
            if protocol == Protocol::Tcp {
                break;
            }
            if let Some(ep) = descriptor.endpoint(protocol) {
                let port = PeerPort {
                    tcp: tcp_transport,
                    address: &address,
                    name,
                };
                match t.connect(ep, &port) {
                    Ok(conn) => {
                        fabric = Some(Path::new(Some(protocol), conn, t.max_slice(), &descriptor));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(segment = name, %protocol, error = %e, "cannot connect over the fabric; trying the next transport")
                    }
                }
            }
        }
        let (primary, fallback) = match fabric {
            Some(f) => (f, Some(tcp_path(&descriptor))),
            None => (tcp_path(&descriptor), None),
        };
        tracing::info!(segment = name, protocol = ?primary.protocol, "segment opened");
        Ok(PeerInner {
            name: name.to_string(),
            counters: self.counters_for(name),
            primary,
            fallback,
            messenger: Messenger::Lanes(tcp),
            by_addr: address_index(&descriptor),
            descriptor: Arc::new(descriptor),
            stale: AtomicBool::new(false),
            trusted_until,
        })
    }
}

/// The peer's port, as a fabric transport's way to set up its connection state with the
/// peer's transport of the same protocol (contract 8: no second listener).
struct PeerPort<'a> {
    tcp: &'a ferry_transport_tcp::TcpTransport,
    address: &'a str,
    /// The name the peer was opened by, as logs give it.
    name: &'a str,
}

impl PeerControl for PeerPort<'_> {
    fn exchange(
        &self,
        protocol: Protocol,
        body: &[u8],
        timeout: Duration,
    ) -> std::result::Result<Vec<u8>, TransportError> {
        self.tcp.exchange(self.address, protocol, body, timeout)
    }

    fn name(&self) -> &str {
        self.name
    }
}

/// A peer's segment (or this engine's own), opened with [`crate::Engine::open_segment`].
/// Cheap to clone.
#[derive(Clone)]
pub struct Segment {
    pub(crate) inner: Arc<PeerInner>,
}

impl Segment {
    /// The name the segment was opened by (`host:port` with peer-to-peer metadata).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// What this engine's batches did with the peer of this name so far, across its
    /// re-openings (see [`PeerStats`]).
    pub fn stats(&self) -> PeerStats {
        self.inner.counters.snapshot()
    }

    /// The descriptor as fetched (checked: every range fits, keys match endpoints). Its
    /// `name` and TCP endpoint are what the peer claims; with peer-to-peer metadata
    /// requests use neither.
    pub fn descriptor(&self) -> &SegmentDescriptor {
        &self.inner.descriptor
    }

    /// The transport requests to this segment use; `None` for the engine's own segment
    /// (plain memory copies).
    pub fn protocol(&self) -> Option<Protocol> {
        self.inner.primary.protocol
    }

    /// The `host:port` its TCP lanes are connected to (also the fallback's): with
    /// peer-to-peer metadata the name it was opened by, not an address its descriptor
    /// names. `None` for the engine's own segment.
    pub fn tcp_address(&self) -> Option<&str> {
        match &self.inner.messenger {
            Messenger::Own(_) => None,
            Messenger::Lanes(tcp) => Some(tcp.peer()),
        }
    }

    /// Whether this is the engine's own segment.
    pub fn is_local(&self) -> bool {
        self.inner.primary.protocol.is_none()
    }

    /// Buffers the owner published.
    pub fn buffers(&self) -> &[BufferDescriptor] {
        &self.inner.descriptor.buffers
    }

    /// The `index`-th published buffer.
    pub fn buffer(&self, index: usize) -> Result<RemoteBuffer> {
        if index < self.buffers().len() {
            Ok(RemoteBuffer {
                segment: self.clone(),
                index,
            })
        } else {
            Err(Error::InvalidRequest(format!(
                "segment `{}` publishes {} buffers; there is no buffer {index}",
                self.name(),
                self.buffers().len()
            )))
        }
    }

    /// The published buffer that holds the peer's addresses `addr..addr + len`, and the
    /// offset of `addr` in it: how a peer's absolute virtual address becomes a request
    /// (O(log n) in the number of buffers). `None` when no published buffer holds the
    /// whole range.
    pub fn locate(&self, addr: u64, len: u64) -> Option<(RemoteBuffer, u64)> {
        let (index, offset) = self.inner.locate(addr, len)?;
        Some((
            RemoteBuffer {
                segment: self.clone(),
                index,
            },
            offset,
        ))
    }

    /// The published buffer registered under `name`.
    pub fn buffer_named(&self, name: &str) -> Result<RemoteBuffer> {
        let index = self
            .buffers()
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "segment `{}` publishes no buffer named `{name}`",
                    self.name()
                ))
            })?;
        self.buffer(index)
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.name())
            .field("protocol", &self.protocol())
            .field("buffers", &self.buffers().len())
            .finish()
    }
}

/// One buffer of a peer's segment: the remote side of a request.
#[derive(Clone, Debug)]
pub struct RemoteBuffer {
    pub(crate) segment: Segment,
    index: usize,
}

impl RemoteBuffer {
    /// Its index in the segment's descriptor.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// The buffer as published.
    pub fn descriptor(&self) -> &BufferDescriptor {
        &self.segment.inner.descriptor.buffers[self.index]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.descriptor().len as usize
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The segment it belongs to.
    pub fn segment(&self) -> &Segment {
        &self.segment
    }
}
