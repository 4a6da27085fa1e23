//! Moving device memory through host memory, for transports that cannot reach it
//! directly (TCP). Defined here, implemented by `ferry-mem-cuda`, handed to transports by
//! the engine in [`crate::TransportContext::staging`]; transports never depend on a GPU
//! library.

use std::os::fd::OwnedFd;

use crate::{Location, RegionMemory, TransportError};

/// A pool of pinned host buffers and the copy engine of each device.
pub trait Staging: Send + Sync {
    /// A staging buffer for memory at `location` (a device), from the pool; it goes
    /// back when dropped. Copies through it run on a stream of that device, never of
    /// another.
    fn buffer(&self, location: Location) -> Result<Box<dyn StagingBuffer>, TransportError>;

    /// What the pool holds: to check that buffers come back and stay on their devices.
    fn stats(&self) -> StagingStats;

    /// The PCI bus id (`dddd:bb:dd.f`) of device `device`, for transports that choose a
    /// NIC close to it; `None` when unknown.
    fn pci_bus_id(&self, device: u32) -> Option<String> {
        let _ = device;
        None
    }

    /// Exports device memory as a dma-buf, for fabric transports that register it with
    /// their NIC directly: the descriptor, and the offset of the region's start in it.
    fn export_dmabuf(&self, region: &RegionMemory) -> Result<(OwnedFd, u64), TransportError> {
        let _ = region;
        Err(TransportError::Unsupported {
            what: "exporting device memory as a dma-buf".into(),
            why: "these device services cannot".into(),
        })
    }
}

/// A staging pool's accounting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StagingStats {
    /// Buffers on loan now.
    pub leased: usize,
    /// Buffers ever created, per device ordinal (devices with none are left out).
    pub created: Vec<(u32, usize)>,
}

/// One pinned host buffer with its own copy queue. Used by one thread at a time; a copy
/// started on it must be waited for before its bytes are used or another copy starts.
pub trait StagingBuffer: Send {
    /// Size of the host buffer in bytes: the largest copy it takes.
    fn capacity(&self) -> usize;

    /// Starts copying `len` bytes of device memory at `offset` of `region` into the
    /// start of this buffer.
    fn download(
        &mut self,
        region: &RegionMemory,
        offset: usize,
        len: usize,
    ) -> Result<(), TransportError>;

    /// Starts copying the first `len` bytes of this buffer into device memory at `offset`
    /// of `region`.
    fn upload(
        &mut self,
        region: &RegionMemory,
        offset: usize,
        len: usize,
    ) -> Result<(), TransportError>;

    /// Waits until the copy last started has finished.
    fn wait(&mut self) -> Result<(), TransportError>;

    /// The host bytes. Between copies only (after [`wait`](Self::wait)).
    fn host(&mut self) -> &mut [u8];
}
