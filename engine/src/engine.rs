use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::{backends, Error, FailReason, Result};

/// Notifications queued for the application before new ones are refused as busy.
const NOTIFY_QUEUE: usize = 65536;

/// A small message from a peer (e.g. "KV blocks 12..40 are written").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The sender's segment name.
    pub from: String,
    /// The message.
    pub message: Vec<u8>,
}

struct Published {
    descriptor: BufferDescriptor,
    memory: Arc<RegionMemory>,
}

/// What the handshake port serves: this engine's descriptor and its notification queue.
pub(crate) struct ControlState {
    name: RwLock<String>,
    incarnation: u64,
    endpoints: RwLock<Vec<Endpoint>>,
    published: RwLock<Vec<Published>>,
    notify_tx: Sender<Notification>,
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
                .iter()
                .map(|p| p.descriptor.clone())
                .collect(),
        }
    }
}

impl ControlPlane for ControlState {
    fn descriptor(&self) -> Vec<u8> {
        serde_json::to_vec(&ControlState::descriptor(self)).unwrap_or_default()
    }

    fn notification(&self, from: &str, body: &[u8]) -> bool {
        self.notify_tx
            .try_send(Notification {
                from: from.to_string(),
                message: body.to_vec(),
            })
            .is_ok()
    }
}

pub(crate) struct Inner {
    tcp: Arc<TcpTransport>,
    /// Every started transport, best first (TCP last).
    transports: Vec<Arc<dyn Transport>>,
    control: Arc<ControlState>,
    pub(crate) batches: Arc<BatchTable>,
    segments: Mutex<HashMap<String, Arc<SegmentInner>>>,
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

    pub(crate) fn deregister(&self, memory: &RegionMemory) {
        for t in &self.transports {
            t.deregister(memory);
        }
        self.control
            .published
            .write()
            .retain(|p| !std::ptr::eq(Arc::as_ptr(&p.memory), memory));
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
        let published = self.control.published.read();
        let mut status = RemoteStatus::NotRegistered;
        for p in published.iter() {
            let d = &p.descriptor;
            if addr < d.addr || addr >= d.addr + d.len {
                continue;
            }
            if d.key(Protocol::Tcp) != Some(key) {
                status = RemoteStatus::KeyMismatch;
                continue;
            }
            let allowed = match op {
                Opcode::Read => d.access.remote_read(),
                Opcode::Write => d.access.remote_write(),
            };
            if !allowed {
                return Err(FailReason::Remote(RemoteStatus::AccessDenied));
            }
            let offset = (addr - d.addr) as usize;
            let (dst, dst_off, src, src_off) = match op {
                Opcode::Write => (&*p.memory, offset, local, local_offset),
                Opcode::Read => (local, local_offset, &*p.memory, offset),
            };
            let ok = if dst.location().is_host() && src.location().is_host() {
                dst.copy_within_regions(dst_off, src, src_off, len)
            } else {
                memory::device_copy(dst, dst_off, src, src_off, len).is_ok()
            };
            return if ok {
                Ok(())
            } else {
                Err(FailReason::Remote(RemoteStatus::OutOfBounds))
            };
        }
        Err(FailReason::Remote(status))
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
            published: RwLock::new(Vec::new()),
            notify_tx,
        });
        let staging = backends::device::staging();
        let ctx = ferry_transport_api::TransportContext {
            completions: batches.clone(),
            control: control.clone(),
            staging: staging.clone(),
        };
        let mut transports = fabrics;
        transports.push(tcp.clone());
        let mut endpoints = Vec::new();
        for (i, t) in transports.iter().enumerate() {
            match t.start(ctx.clone()) {
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
        tracing::info!(segment = %name, protocols = ?transports.iter().map(|t| t.protocol()).collect::<Vec<_>>(), "engine started");
        Ok(Engine {
            inner: Arc::new(Inner {
                tcp,
                transports,
                control,
                batches,
                segments: Mutex::new(HashMap::new()),
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
                    return Err(Error::RegisterRegion(e.to_string()));
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
        if access != Access::Local {
            self.inner.control.published.write().push(Published {
                descriptor: descriptor.clone(),
                memory: memory.clone(),
            });
        }
        tracing::debug!(addr = descriptor.addr, len = descriptor.len, location = %descriptor.location, "registered");
        Ok(Buffer {
            inner: Arc::new(BufferInner {
                memory,
                descriptor,
                borrowed,
                engine: self.inner.clone(),
            }),
        })
    }

    /// Opens a segment by name: `host:port` of a peer's engine (peer-to-peer metadata),
    /// or this engine's own name. The descriptor is cached; a cached one is fetched again
    /// after an access error on it (the peer restarted, a buffer went away) or when its
    /// connection broke.
    pub fn open_segment(&self, name: &str) -> Result<Segment> {
        if self.inner.is_shut_down() {
            return Err(Error::Shutdown);
        }
        if let Some(s) = self.inner.segments.lock().get(name) {
            if s.usable() {
                return Ok(Segment { inner: s.clone() });
            }
        }
        let inner = Arc::new(self.fetch_segment(name)?);
        self.inner
            .segments
            .lock()
            .insert(name.to_string(), inner.clone());
        Ok(Segment { inner })
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
        let open_err = |reason: String| Error::OpenSegment {
            segment: name.to_string(),
            reason,
        };
        if name == self.name() {
            return Ok(SegmentInner::new(self.descriptor(), Route::Local));
        }
        let body =
            ferry_transport_tcp::fetch_descriptor(name, self.inner.tcp.config().connect_timeout)
                .map_err(|e| open_err(format!("{e}{}", source_text(&e))))?;
        let descriptor: SegmentDescriptor = serde_json::from_slice(&body).map_err(|e| {
            open_err(format!(
                "the peer sent a descriptor that does not parse: {e}"
            ))
        })?;
        if descriptor.incarnation == self.inner.control.incarnation {
            return Ok(SegmentInner::new(self.descriptor(), Route::Local));
        }
        let tcp_ep = descriptor
            .endpoint(Protocol::Tcp)
            .ok_or_else(|| open_err("the peer publishes no TCP endpoint".into()))?
            .clone();
        let tcp = self
            .inner
            .tcp
            .connect_tcp(&data_address(name, &tcp_ep.address))?;
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
        Ok(SegmentInner::new(descriptor, route))
    }

    /// Starts a batch of requests.
    pub fn batch(&self) -> BatchBuilder<'_> {
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
        self.inner.notify_rx.recv_timeout(timeout).ok()
    }

    /// The next notification if one is queued.
    pub fn try_recv_notification(&self) -> Option<Notification> {
        self.inner.notify_rx.try_recv().ok()
    }

    /// Stops the transports: in-flight transfers fail with [`FailReason::Shutdown`], and
    /// later calls return [`Error::Shutdown`]. Dropping the engine does this too.
    pub fn shutdown(&self) {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.segments.lock().clear();
        for t in &self.inner.transports {
            t.shutdown();
        }
        tracing::info!(segment = %self.name(), "engine shut down");
    }
}

/// Where to connect a peer's TCP lanes. The engine has one port, so the address its
/// descriptor came from (`name`) reaches it; the advertised address is used unless it is
/// a loopback or unspecified one that differs from `name`'s host (a peer listening on
/// `0.0.0.0` without an advertised address tells everyone 127.0.0.1, which is wrong for
/// anyone on another host).
fn data_address(name: &str, advertised: &str) -> String {
    let host = |a: &str| -> Option<std::net::IpAddr> {
        let h = a.rsplit_once(':')?.0;
        h.trim_start_matches('[').trim_end_matches(']').parse().ok()
    };
    match (host(advertised), host(name)) {
        (Some(a), Some(n)) if (a.is_loopback() || a.is_unspecified()) && a != n => name.to_string(),
        (Some(a), None) if a.is_loopback() || a.is_unspecified() => name.to_string(),
        _ => advertised.to_string(),
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
