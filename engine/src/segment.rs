//! Segments: a peer's published memory as this engine sees it, with the route chosen to
//! reach it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_transport_api::{BufferDescriptor, Connection, Protocol, RemoteKeys, SegmentDescriptor};
use ferry_transport_tcp::TcpConnection;

use crate::{Error, Result};

pub(crate) enum Route {
    /// The engine's own segment: requests are memory copies.
    Local,
    /// A peer, over the best transport both sides speak.
    Remote {
        protocol: Protocol,
        conn: Arc<dyn Connection>,
        /// Lanes for notifications (the same as `conn` when `protocol` is TCP).
        tcp: Arc<TcpConnection>,
        /// The largest slice `conn`'s transport takes.
        max_slice: usize,
    },
}

pub(crate) struct SegmentInner {
    /// The name it was opened by (the peer's descriptor may claim any name).
    name: String,
    pub(crate) descriptor: SegmentDescriptor,
    pub(crate) route: Route,
    /// Per buffer, its keys for the route's transport and for TCP (the same for a TCP or
    /// local route), so requests and retries share them instead of collecting them.
    keys: Vec<[Option<RemoteKeys>; 2]>,
    stale: AtomicBool,
}

impl SegmentInner {
    pub(crate) fn new(name: String, descriptor: SegmentDescriptor, route: Route) -> Self {
        let protocol = match &route {
            Route::Local => Protocol::Tcp,
            Route::Remote { protocol, .. } => *protocol,
        };
        let keys = descriptor
            .buffers
            .iter()
            .map(|b| {
                let tcp = b.keys_of(Protocol::Tcp);
                let routed = if protocol == Protocol::Tcp {
                    tcp.clone()
                } else {
                    b.keys_of(protocol)
                };
                [routed, tcp]
            })
            .collect();
        SegmentInner {
            name,
            descriptor,
            route,
            keys,
            stale: AtomicBool::new(false),
        }
    }

    /// Buffer `index`'s keys: for TCP when `over_tcp`, else for the route's transport.
    pub(crate) fn keys(&self, index: usize, over_tcp: bool) -> Option<&RemoteKeys> {
        self.keys
            .get(index)
            .and_then(|k| k[usize::from(over_tcp)].as_ref())
    }

    /// Marks the cached descriptor out of date: the next `open_segment` fetches it again.
    pub(crate) fn mark_stale(&self) {
        if !self.stale.swap(true, Ordering::AcqRel) {
            tracing::debug!(segment = %self.name, "descriptor marked stale after an access error");
        }
    }

    pub(crate) fn usable(&self) -> bool {
        !self.stale.load(Ordering::Acquire)
            && match &self.route {
                Route::Local => true,
                Route::Remote { conn, tcp, .. } => conn.is_alive() && tcp.is_alive(),
            }
    }
}

/// A peer's segment (or this engine's own), opened with [`crate::Engine::open_segment`].
/// Cheap to clone.
#[derive(Clone)]
pub struct Segment {
    pub(crate) inner: Arc<SegmentInner>,
}

impl Segment {
    /// The name the segment was opened by (`host:port` with peer-to-peer metadata).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The descriptor as fetched (checked: every range fits, keys match endpoints). Its
    /// `name` and TCP endpoint are what the peer claims; requests use neither.
    pub fn descriptor(&self) -> &SegmentDescriptor {
        &self.inner.descriptor
    }

    /// The transport requests to this segment use; `None` for the engine's own segment
    /// (plain memory copies).
    pub fn protocol(&self) -> Option<Protocol> {
        match &self.inner.route {
            Route::Local => None,
            Route::Remote { protocol, .. } => Some(*protocol),
        }
    }

    /// The `host:port` its TCP lanes are connected to (also the fallback's): the name it
    /// was opened by, not an address its descriptor names. `None` for the engine's own
    /// segment.
    pub fn tcp_address(&self) -> Option<&str> {
        match &self.inner.route {
            Route::Local => None,
            Route::Remote { tcp, .. } => Some(tcp.peer()),
        }
    }

    /// Whether this is the engine's own segment.
    pub fn is_local(&self) -> bool {
        matches!(self.inner.route, Route::Local)
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
    /// Its keys for TCP (`over_tcp`) or for the transport of its segment's route.
    pub(crate) fn keys(&self, over_tcp: bool) -> Option<&RemoteKeys> {
        self.segment.inner.keys(self.index, over_tcp)
    }

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
