use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use ferry_transport_api::{
    Access, BufferDescriptor, ControlPlane, Endpoint, Location, Opcode, Protocol, RegionMemory,
    RemoteStatus, SegmentDescriptor, Staging, StagingStats, Transport, TransportKey,
};
use ferry_transport_tcp::{TcpStats, TcpTransport};
use parking_lot::{Mutex, RwLock};

use crate::batch::{progress_of, BatchBuilder, BatchId, BatchTable, Progress};
use crate::builder::{EngineBuilder, NeedsTransport};
use crate::memory::{self, Buffer, BufferInner};
use crate::segment::{Route, Segment, SegmentInner};
use crate::{backends, Error, FailReason, Result, SegmentError};

/// Notifications queued for the application before new ones are refused as busy.
const NOTIFY_QUEUE: usize = 65536;
/// Bytes of notifications queued for the application, by default, before new ones are
/// refused as busy (an application that never reads them holds at most this much).
pub(crate) const NOTIFY_QUEUE_BYTES: usize = 64 << 20;
/// What a queued notification costs besides its sender's name and its message.
const NOTIFY_OVERHEAD: usize = 64;

/// A small message from a peer (e.g. "KV blocks 12..40 are written").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The sender's segment name, as the sender declares it (not authenticated).
    pub from: String,
    /// The message.
    pub message: Vec<u8>,
}

impl Notification {
    fn cost(&self) -> usize {
        self.from.len() + self.message.len() + NOTIFY_OVERHEAD
    }
}

struct Published {
    descriptor: BufferDescriptor,
    memory: Arc<RegionMemory>,
    /// The buffer's part of the encoded descriptor.
    encoded: Box<[u8]>,
}

/// The published buffers, in registration order, with what serving and checking them
/// needs: an index by TCP key (local copies) and the encoded size (the cap).
#[derive(Default)]
struct PublishedSet {
    by_id: BTreeMap<u64, Published>,
    by_key: HashMap<u64, u64>,
    next_id: u64,
    /// Bytes the buffers take in the encoded descriptor, separators included.
    encoded_len: usize,
}

/// What the handshake port serves: this engine's descriptor and its notification queue.
pub(crate) struct ControlState {
    name: RwLock<String>,
    incarnation: u64,
    endpoints: RwLock<Vec<Endpoint>>,
    published: RwLock<PublishedSet>,
    /// The encoded descriptor, made again only after the published set changed (a
    /// descriptor request costs a copy, not a serialisation of every buffer). Locked
    /// after `published`, never before.
    encoded: Mutex<Option<Arc<[u8]>>>,
    notify_tx: Sender<Notification>,
    notify_bytes: AtomicUsize,
    notify_cap: usize,
    notify_refused: AtomicU64,
}

impl ControlState {
    fn descriptor(&self) -> SegmentDescriptor {
        SegmentDescriptor {
            name: self.name.read().clone(),
            incarnation: self.incarnation,
            endpoints: self.endpoints.read().clone(),
            buffers: self
                .published
                .read()
                .by_id
                .values()
                .map(|p| p.descriptor.clone())
                .collect(),
        }
    }

    /// The descriptor without buffers, encoded, cut just inside its empty buffer list:
    /// the buffers' encodings go after it, then `]}`.
    fn encoded_head(&self) -> Vec<u8> {
        let empty = SegmentDescriptor {
            name: self.name.read().clone(),
            incarnation: self.incarnation,
            endpoints: self.endpoints.read().clone(),
            buffers: Vec::new(),
        };
        let mut head = serde_json::to_vec(&empty).unwrap_or_default();
        debug_assert!(head.ends_with(b"[]}"), "buffers must be the last field");
        head.truncate(head.len().saturating_sub(2));
        head
    }

    fn encode(&self, set: &PublishedSet) -> Arc<[u8]> {
        let mut out = self.encoded_head();
        out.reserve(set.encoded_len + 2);
        for (i, p) in set.by_id.values().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&p.encoded);
        }
        out.extend_from_slice(b"]}");
        out.into()
    }

    fn encoded(&self) -> Arc<[u8]> {
        let set = self.published.read();
        let mut cache = self.encoded.lock();
        cache.get_or_insert_with(|| self.encode(&set)).clone()
    }

    /// Adds a buffer to the descriptor, unless that would take the descriptor past what
    /// peers accept. Returns its id.
    fn publish(&self, descriptor: BufferDescriptor, memory: Arc<RegionMemory>) -> Result<u64> {
        let encoded: Box<[u8]> = serde_json::to_vec(&descriptor)
            .map_err(Error::EncodeDescriptor)?
            .into();
        let head = self.encoded_head().len() + 2;
        let mut set = self.published.write();
        let total = head + set.encoded_len + encoded.len() + usize::from(!set.by_id.is_empty());
        let cap = SegmentDescriptor::MAX_ENCODED_LEN;
        if total > cap {
            return Err(Error::DescriptorFull {
                total,
                cap,
                buffers: set.by_id.len(),
            });
        }
        let id = set.next_id;
        set.next_id += 1;
        if let Some(key) = descriptor.key(Protocol::Tcp) {
            set.by_key.insert(key, id);
        }
        set.encoded_len += encoded.len() + usize::from(!set.by_id.is_empty());
        set.by_id.insert(
            id,
            Published {
                descriptor,
                memory,
                encoded,
            },
        );
        *self.encoded.lock() = None;
        Ok(id)
    }

    fn withdraw(&self, id: u64) {
        let mut set = self.published.write();
        let Some(p) = set.by_id.remove(&id) else {
            return;
        };
        if let Some(key) = p.descriptor.key(Protocol::Tcp) {
            if set.by_key.get(&key) == Some(&id) {
                set.by_key.remove(&key);
            }
        }
        set.encoded_len -= p.encoded.len() + usize::from(!set.by_id.is_empty());
        *self.encoded.lock() = None;
    }

    /// Takes a notification's place in the queue's byte budget, or says it is full.
    fn take_notify_budget(&self, cost: usize) -> bool {
        let before = self.notify_bytes.fetch_add(cost, Ordering::AcqRel);
        if before + cost > self.notify_cap {
            self.notify_bytes.fetch_sub(cost, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn received(&self, n: Option<Notification>) -> Option<Notification> {
        if let Some(n) = &n {
            self.notify_bytes.fetch_sub(n.cost(), Ordering::AcqRel);
        }
        n
    }
}

impl ControlPlane for ControlState {
    fn descriptor(&self) -> Vec<u8> {
        self.encoded().to_vec()
    }

    fn notification(&self, from: &str, body: &[u8]) -> bool {
        let n = Notification {
            from: from.to_string(),
            message: body.to_vec(),
        };
        let cost = n.cost();
        let queued = self.take_notify_budget(cost)
            && match self.notify_tx.try_send(n) {
                Ok(()) => true,
                Err(_) => {
                    self.notify_bytes.fetch_sub(cost, Ordering::AcqRel);
                    false
                }
            };
        if !queued {
            let refused = self.notify_refused.fetch_add(1, Ordering::Relaxed);
            if (refused + 1).is_power_of_two() {
                tracing::warn!(
                    refused = refused + 1,
                    "notification queue full; refusing notifications as busy (read them with recv_notification)"
                );
            }
        }
        queued
    }
}

pub(crate) struct Inner {
    tcp: Arc<TcpTransport>,
    /// Every started transport, best first (TCP last).
    transports: Vec<Arc<dyn Transport>>,
    control: Arc<ControlState>,
    pub(crate) batches: Arc<BatchTable>,
    /// Opened segments by the name they were opened by. Dead and stale ones are dropped
    /// whenever a segment is fetched, so the cache holds live peers only.
    segments: Mutex<HashMap<String, Arc<SegmentInner>>>,
    /// One gate per name being opened, so two opens of one name fetch and connect once
    /// while opens of other names go ahead. No lock is held across network I/O but the
    /// gate of the name being opened.
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    notify_rx: Receiver<Notification>,
    pub(crate) timeout: Duration,
    pub(crate) busy_poll: Duration,
    pub(crate) retry_over_tcp: bool,
    /// Pinned staging for device memory (feature `cuda` with a driver present).
    staging: Option<Arc<dyn Staging>>,
    /// Device regions some fabric transport could not register (warned about once).
    staged_warned: AtomicBool,
    shut: AtomicBool,
}

impl Inner {
    pub(crate) fn is_shut_down(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }

    /// TCP's slice size (for retries over TCP).
    pub(crate) fn tcp_slice(&self) -> usize {
        self.tcp.max_slice()
    }

    /// The slice size of the transport a request travels on.
    pub(crate) fn max_slice(&self, route: &Route) -> usize {
        match route {
            Route::Local => self.tcp.max_slice(),
            Route::Remote { max_slice, .. } => *max_slice,
        }
    }

    pub(crate) fn deregister(&self, memory: &RegionMemory, published: Option<u64>) {
        for t in &self.transports {
            t.deregister(memory);
        }
        if let Some(id) = published {
            self.control.withdraw(id);
        }
    }

    /// A request to this engine's own segment: checked like a peer's, then copied.
    pub(crate) fn local_copy(
        &self,
        op: Opcode,
        local: &RegionMemory,
        local_offset: usize,
        addr: u64,
        key: u64,
        len: usize,
    ) -> Result<(), FailReason> {
        // The lock is let go before the copy: a large copy must not hold up registration.
        let (region, offset) = {
            let set = self.control.published.read();
            let found = set
                .by_key
                .get(&key)
                .and_then(|id| set.by_id.get(id))
                .filter(|p| {
                    let d = &p.descriptor;
                    addr >= d.addr && addr - d.addr < d.len
                });
            let Some(p) = found else {
                // Refused: tell a wrong key from an address nothing covers.
                let covered = set.by_id.values().any(|p| {
                    let d = &p.descriptor;
                    addr >= d.addr && addr - d.addr < d.len
                });
                return Err(FailReason::Remote(if covered {
                    RemoteStatus::KeyMismatch
                } else {
                    RemoteStatus::NotRegistered
                }));
            };
            let d = &p.descriptor;
            let allowed = match op {
                Opcode::Read => d.access.remote_read(),
                Opcode::Write => d.access.remote_write(),
            };
            if !allowed {
                return Err(FailReason::Remote(RemoteStatus::AccessDenied));
            }
            (p.memory.clone(), (addr - d.addr) as usize)
        };
        let (dst, dst_off, src, src_off) = match op {
            Opcode::Write => (&*region, offset, local, local_offset),
            Opcode::Read => (local, local_offset, &*region, offset),
        };
        let ok = if dst.location().is_host() && src.location().is_host() {
            dst.copy_within_regions(dst_off, src, src_off, len)
        } else {
            memory::device_copy(dst, dst_off, src, src_off, len).is_ok()
        };
        if ok {
            Ok(())
        } else {
            Err(FailReason::Remote(RemoteStatus::OutOfBounds))
        }
    }

    /// Whether `name` names this engine, by what it knows of itself: its own name, or
    /// the address it is bound to. Never from anything a peer sends.
    fn is_own_name(&self, name: &str) -> bool {
        if name == *self.control.name.read() {
            return true;
        }
        let (Some(bound), Ok(asked)) =
            (self.tcp.local_addr(), name.parse::<std::net::SocketAddr>())
        else {
            return false;
        };
        asked.port() == bound.port()
            && (asked.ip() == bound.ip()
                || (bound.ip().is_unspecified() && asked.ip().is_loopback()))
    }

    /// The cached segment for `name` if it is still usable; a dead or stale one is
    /// dropped from the cache.
    fn cached(&self, name: &str) -> Option<Arc<SegmentInner>> {
        let mut segments = self.segments.lock();
        match segments.get(name) {
            Some(s) if s.usable() => Some(s.clone()),
            Some(_) => {
                let dead = segments.remove(name);
                // Closing what the dead segment held fails its transfers, which runs
                // completions: not under the cache's lock.
                drop(segments);
                drop(dead);
                None
            }
            None => None,
        }
    }
}

/// A transfer engine: registered memory, peers' segments, batches of READ and WRITE.
///
/// Build one with [`Engine::builder`] or [`Engine::from_config`]. The engine is
/// `Send + Sync`; share it by reference or in an `Arc`. Dropping it stops its
/// transports; transfers still in flight fail with [`FailReason::Shutdown`].
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts building an engine; add a transport next.
    pub fn builder() -> EngineBuilder<NeedsTransport> {
        EngineBuilder::new()
    }

    pub(crate) fn start(
        tcp: TcpTransport,
        fabrics: Vec<Arc<dyn Transport>>,
        listen: &str,
        timeout: Duration,
        retry_over_tcp: bool,
        notify_queue_bytes: usize,
    ) -> Result<Engine> {
        let busy_poll = tcp.config().busy_poll;
        tcp.set_listen(listen);
        let tcp = Arc::new(tcp);
        let batches = Arc::new(BatchTable::new());
        let (notify_tx, notify_rx) = crossbeam_channel::bounded(NOTIFY_QUEUE);
        let control = Arc::new(ControlState {
            name: RwLock::new(String::new()),
            incarnation: rand::random(),
            endpoints: RwLock::new(Vec::new()),
            published: RwLock::new(PublishedSet::default()),
            encoded: Mutex::new(None),
            notify_tx,
            notify_bytes: AtomicUsize::new(0),
            notify_cap: notify_queue_bytes,
            notify_refused: AtomicU64::new(0),
        });
        let staging = backends::device::staging();
        let ctx = ferry_transport_api::TransportContext {
            completions: batches.clone(),
            control: None,
            staging: staging.clone(),
        };
        let mut transports = fabrics;
        transports.push(tcp.clone());
        let mut endpoints = Vec::new();
        for (i, t) in transports.iter().enumerate() {
            // Only TCP serves the engine's port, so only it answers descriptor fetches
            // and notifications.
            let control =
                (t.protocol() == Protocol::Tcp).then(|| control.clone() as Arc<dyn ControlPlane>);
            match t.start(ferry_transport_api::TransportContext {
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
        let name = endpoints
            .iter()
            .find(|e| e.protocol == Protocol::Tcp)
            .map(|e| e.address.clone())
            .unwrap_or_default();
        *control.name.write() = name.clone();
        *control.endpoints.write() = endpoints;
        // The port serves descriptors from the moment TCP starts: one asked for before the
        // name and endpoints were known must not stay cached.
        *control.encoded.lock() = None;
        tracing::info!(segment = %name, protocols = ?transports.iter().map(|t| t.protocol()).collect::<Vec<_>>(), "engine started");
        Ok(Engine {
            inner: Arc::new(Inner {
                tcp,
                transports,
                control,
                batches,
                segments: Mutex::new(HashMap::new()),
                opening: Mutex::new(HashMap::new()),
                notify_rx,
                timeout,
                busy_poll,
                retry_over_tcp,
                staging,
                staged_warned: AtomicBool::new(false),
                shut: AtomicBool::new(false),
            }),
        })
    }

    /// This engine's segment name (`host:port` of its one port); peers open it by this
    /// name.
    pub fn name(&self) -> String {
        self.inner.control.name.read().clone()
    }

    /// The descriptor peers receive.
    pub fn descriptor(&self) -> SegmentDescriptor {
        self.inner.control.descriptor()
    }

    /// Transports this engine runs, best first.
    pub fn protocols(&self) -> Vec<Protocol> {
        self.inner.transports.iter().map(|t| t.protocol()).collect()
    }

    /// Notifications refused as busy because the queue was full (by count or by bytes:
    /// see [`EngineBuilder::notification_queue_bytes`]) since the engine started.
    pub fn refused_notifications(&self) -> u64 {
        self.inner.control.notify_refused.load(Ordering::Relaxed)
    }

    /// How many opened segments the engine caches. Segments whose connection died are
    /// dropped from the cache the next time a segment is opened.
    pub fn cached_segments(&self) -> usize {
        self.inner.segments.lock().len()
    }

    /// Counters of this engine's batch waits.
    pub fn batch_stats(&self) -> crate::BatchStats {
        self.inner.batches.stats()
    }

    /// Counters of the TCP target (refused requests, protocol errors, connections).
    pub fn tcp_stats(&self) -> TcpStats {
        self.inner.tcp.stats()
    }

    /// The device-memory staging pool's accounting (buffers on loan, buffers made per
    /// device); `None` without CUDA support or driver.
    pub fn staging_stats(&self) -> Option<StagingStats> {
        self.inner.staging.as_ref().map(|s| s.stats())
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
                Location::Cuda { device } => backends::device::allocate(len, device)?,
                Location::Auto => return Err(Error::InvalidRequest(
                    "Location::Auto is for registering caller memory; allocate at cpu or cuda:N"
                        .into(),
                )),
            };
        self.publish(memory, access, name, false)
    }

    pub(crate) fn publish(
        &self,
        memory: RegionMemory,
        access: Access,
        name: &str,
        borrowed: bool,
    ) -> Result<Buffer> {
        if self.inner.is_shut_down() {
            return Err(Error::Shutdown);
        }
        let memory = Arc::new(memory);
        let mut keys = Vec::with_capacity(self.inner.transports.len());
        for t in &self.inner.transports {
            match t.register(&memory, access) {
                Ok(rails) => keys.extend(rails.into_iter().map(|key| TransportKey {
                    protocol: t.protocol(),
                    key,
                })),
                // A fabric that cannot register device memory: the region travels over
                // TCP, staged through host memory.
                Err(e)
                    if !memory.location().is_host()
                        && t.protocol() != Protocol::Tcp
                        && e.kind() == ferry_transport_api::ErrorKind::Unsupported =>
                {
                    if !self.inner.staged_warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(protocol = %t.protocol(), location = %memory.location(), error = %e, "device memory cannot be registered with this fabric; such regions travel over TCP, staged through host memory");
                    }
                }
                Err(e) => {
                    for done in &self.inner.transports {
                        done.deregister(&memory);
                    }
                    return Err(Error::RegisterRegion { source: e });
                }
            }
        }
        let descriptor = BufferDescriptor {
            name: name.to_string(),
            addr: memory.addr(),
            len: memory.len() as u64,
            location: memory.location(),
            access,
            keys,
        };
        let published = if access == Access::Local {
            None
        } else {
            match self
                .inner
                .control
                .publish(descriptor.clone(), memory.clone())
            {
                Ok(id) => Some(id),
                Err(e) => {
                    self.inner.deregister(&memory, None);
                    return Err(e);
                }
            }
        };
        tracing::debug!(addr = descriptor.addr, len = descriptor.len, location = %descriptor.location, "registered");
        Ok(Buffer {
            inner: Arc::new(BufferInner {
                memory,
                descriptor,
                borrowed,
                published,
                engine: self.inner.clone(),
            }),
        })
    }

    /// Opens a segment by name: `host:port` of a peer's engine (peer-to-peer metadata),
    /// or this engine's own name. The descriptor is cached; a cached one is fetched again
    /// after an access error on it (the peer restarted, a buffer went away) or when its
    /// connection broke.
    ///
    /// The segment is this engine's own (requests become memory copies) only when `name`
    /// is this engine's name or the address it is bound to; any other name is a peer,
    /// whatever its descriptor says. The peer's descriptor is checked before it is used
    /// (ranges, keys, endpoints), and its TCP lanes connect to `name`, the address the
    /// descriptor came from, never to an address the descriptor names. Opens of one name
    /// at once fetch and connect once; opens of other names do not wait for them.
    pub fn open_segment(&self, name: &str) -> Result<Segment> {
        if self.inner.is_shut_down() {
            return Err(Error::Shutdown);
        }
        if let Some(inner) = self.inner.cached(name) {
            return Ok(Segment { inner });
        }
        let gate = self
            .inner
            .opening
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone();
        let opened = {
            let _one_at_a_time = gate.lock();
            match self.inner.cached(name) {
                Some(inner) => Ok(inner),
                None => self.fetch_segment(name).map(|inner| {
                    let inner = Arc::new(inner);
                    let mut evicted = Vec::new();
                    {
                        let mut segments = self.inner.segments.lock();
                        // Bound the cache: what is dead or stale is never handed out
                        // again, so it goes (and is dropped after the lock).
                        segments.retain(|_, s| {
                            let keep = s.usable();
                            if !keep {
                                evicted.push(s.clone());
                            }
                            keep
                        });
                        if !self.inner.is_shut_down() {
                            evicted.extend(segments.insert(name.to_string(), inner.clone()));
                        }
                    }
                    drop(evicted);
                    inner
                }),
            }
        };
        {
            let mut opening = self.inner.opening.lock();
            // The map's clone and ours: nobody else waits on this gate.
            if Arc::strong_count(&gate) == 2
                && opening.get(name).is_some_and(|g| Arc::ptr_eq(g, &gate))
            {
                opening.remove(name);
            }
        }
        opened.map(|inner| Segment { inner })
    }

    /// Fetches a segment's descriptor again, whatever the cache holds (e.g. after the
    /// peer registered more buffers), and caches the result.
    pub fn refresh_segment(&self, name: &str) -> Result<Segment> {
        if let Some(old) = self.inner.segments.lock().get(name) {
            old.mark_stale();
        }
        self.open_segment(name)
    }

    fn fetch_segment(&self, name: &str) -> Result<SegmentInner> {
        let open_err = |source: SegmentError| Error::OpenSegment {
            segment: name.to_string(),
            source,
        };
        if self.inner.is_own_name(name) {
            return Ok(SegmentInner::new(
                name.to_string(),
                self.descriptor(),
                Route::Local,
            ));
        }
        let body = self
            .inner
            .tcp
            .fetch_descriptor(name)
            .map_err(|e| open_err(SegmentError::Fetch(e)))?;
        let descriptor: SegmentDescriptor =
            serde_json::from_slice(&body).map_err(|e| open_err(SegmentError::Parse(e)))?;
        descriptor
            .validate()
            .map_err(|e| open_err(SegmentError::Invalid(e)))?;
        if descriptor.incarnation == self.inner.control.incarnation {
            // A peer serving this engine's own descriptor (anyone can fetch it from our
            // port): it is still the peer, reached over the network like any other.
            tracing::warn!(segment = name, "the peer serves a descriptor with this engine's own incarnation; treating it as the remote peer it is");
        }
        // Contract: the lanes go where the descriptor came from. The advertised address
        // could send them (and the data) anywhere.
        let tcp = self.inner.tcp.connect_tcp(name)?;
        // Contract 3: the best transport both sides speak.
        let mut route = None;
        for t in &self.inner.transports {
            let protocol = t.protocol();
            if protocol == Protocol::Tcp {
                break;
            }
            if let Some(ep) = descriptor.endpoint(protocol) {
                match t.connect(ep) {
                    Ok(conn) => {
                        route = Some(Route::Remote {
                            protocol,
                            conn,
                            tcp: tcp.clone(),
                            max_slice: t.max_slice(),
                        });
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(segment = name, %protocol, error = %e, "cannot connect over the fabric; trying the next transport")
                    }
                }
            }
        }
        let route = route.unwrap_or_else(|| Route::Remote {
            protocol: Protocol::Tcp,
            conn: tcp.clone(),
            tcp,
            max_slice: self.inner.tcp.max_slice(),
        });
        if let Route::Remote { protocol, .. } = &route {
            tracing::info!(segment = name, %protocol, "segment opened");
        }
        Ok(SegmentInner::new(name.to_string(), descriptor, route))
    }

    /// Starts a batch of requests.
    pub fn batch(&self) -> BatchBuilder {
        BatchBuilder::new(&self.inner)
    }

    /// Progress of a batch by id; [`Error::StaleBatch`] once the batch was released.
    pub fn batch_progress(&self, id: BatchId) -> Result<Progress> {
        progress_of(&self.inner.batches, id)
    }

    /// Sends a small message (up to 64 KiB) to a segment's engine and waits until it is
    /// queued there. Messages to one peer arrive in the order they were sent.
    pub fn notify(&self, segment: &Segment, message: &[u8]) -> Result<()> {
        let err = |reason| Error::Notify {
            segment: segment.name().to_string(),
            reason,
        };
        match &segment.inner.route {
            Route::Local => {
                let ok = ControlPlane::notification(&*self.inner.control, &self.name(), message);
                if ok {
                    Ok(())
                } else {
                    Err(err(FailReason::Remote(RemoteStatus::Busy)))
                }
            }
            Route::Remote { tcp, .. } => tcp
                .notify(&self.name(), message, self.inner.timeout)
                .map_err(|r| {
                    if r.suggests_stale_descriptor() {
                        segment.inner.mark_stale();
                    }
                    err(r)
                }),
        }
    }

    /// The next notification from a peer, waiting up to `timeout`.
    pub fn recv_notification(&self, timeout: Duration) -> Option<Notification> {
        let n = self.inner.notify_rx.recv_timeout(timeout).ok();
        self.inner.control.received(n)
    }

    /// The next notification if one is queued.
    pub fn try_recv_notification(&self) -> Option<Notification> {
        let n = self.inner.notify_rx.try_recv().ok();
        self.inner.control.received(n)
    }

    /// Stops the transports: in-flight transfers fail with [`FailReason::Shutdown`], and
    /// later calls return [`Error::Shutdown`]. Dropping the engine does this too.
    pub fn shutdown(&self) {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        let cached = std::mem::take(&mut *self.inner.segments.lock());
        drop(cached);
        for t in &self.inner.transports {
            t.shutdown();
        }
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
