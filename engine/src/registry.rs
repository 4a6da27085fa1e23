//! Registered memory: the transports every region is registered with, and the published
//! set peers see. A [`Buffer`](crate::Buffer) holds the registry it came from and
//! deregisters through it when its last clone drops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_transport_api::{
    Access, BufferDescriptor, ErrorKind, Protocol, RegionMemory, Staging, Transport, TransportKey,
};
use ferry_transport_tcp::TcpTransport;

use crate::control::ControlState;
use crate::metadata::MetadataStore;
use crate::{Error, Result};

/// A region as registered: its keys and, unless it is local-only, its place in the
/// published set.
pub(crate) struct Registered {
    pub(crate) memory: Arc<RegionMemory>,
    pub(crate) descriptor: BufferDescriptor,
    /// Its id in the published set; `None` for local-only buffers.
    pub(crate) published: Option<u64>,
}

pub(crate) struct Registry {
    /// Every started transport, best first (TCP last).
    transports: Vec<Arc<dyn Transport>>,
    /// The TCP transport (also last in `transports`): the fallback, and the port that
    /// serves the control plane.
    pub(crate) tcp: Arc<TcpTransport>,
    pub(crate) control: Arc<ControlState>,
    pub(crate) store: Arc<dyn MetadataStore>,
    /// Pinned staging for device memory (feature `cuda` with a driver present).
    pub(crate) staging: Option<Arc<dyn Staging>>,
    /// Device regions some fabric transport could not register (warned about once).
    staged_warned: AtomicBool,
    shut: AtomicBool,
}

impl Registry {
    pub(crate) fn new(
        transports: Vec<Arc<dyn Transport>>,
        tcp: Arc<TcpTransport>,
        control: Arc<ControlState>,
        store: Arc<dyn MetadataStore>,
        staging: Option<Arc<dyn Staging>>,
    ) -> Self {
        Registry {
            transports,
            tcp,
            control,
            store,
            staging,
            staged_warned: AtomicBool::new(false),
            shut: AtomicBool::new(false),
        }
    }

    /// Every transport, best first (TCP last).
    pub(crate) fn transports(&self) -> &[Arc<dyn Transport>] {
        &self.transports
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }

    /// Marks the engine shut down; true for the caller that did it first.
    pub(crate) fn shut_down(&self) -> bool {
        !self.shut.swap(true, Ordering::AcqRel)
    }

    /// Registers `memory` with every transport and, unless `access` is local-only,
    /// publishes it under `name`.
    pub(crate) fn register(
        &self,
        memory: RegionMemory,
        access: Access,
        name: &str,
    ) -> Result<Registered> {
        if self.is_shut_down() {
            return Err(Error::Shutdown);
        }
        let memory = Arc::new(memory);
        let mut keys = Vec::with_capacity(self.transports.len());
        for t in &self.transports {
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
                        && e.kind() == ErrorKind::Unsupported =>
                {
                    if !self.staged_warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(protocol = %t.protocol(), location = %memory.location(), error = %e, "device memory cannot be registered with this fabric; such regions travel over TCP, staged through host memory");
                    }
                }
                Err(e) => {
                    for done in &self.transports {
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
            match self.control.own.publish(descriptor.clone()) {
                Ok(id) => Some(id),
                Err(e) => {
                    self.deregister(&memory, None);
                    return Err(e);
                }
            }
        };
        if published.is_some() {
            self.store.publish(&self.control.own);
        }
        tracing::debug!(addr = descriptor.addr, len = descriptor.len, location = %descriptor.location, "registered");
        Ok(Registered {
            memory,
            descriptor,
            published,
        })
    }

    /// Forgets a region everywhere: transports refuse requests naming it from now on.
    pub(crate) fn deregister(&self, memory: &RegionMemory, published: Option<u64>) {
        for t in &self.transports {
            t.deregister(memory);
        }
        if let Some(id) = published {
            self.control.own.withdraw(id);
            if !self.is_shut_down() {
                self.store.publish(&self.control.own);
            }
        }
    }

    /// Stops every transport: in-flight slices fail with `Shutdown`.
    pub(crate) fn stop_transports(&self) {
        self.store.withdraw(&self.control.own);
        for t in &self.transports {
            t.shutdown();
        }
    }
}
