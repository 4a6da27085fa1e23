//! The registration edge: the one place in the engine that turns pointers into registered
//! memory. Owned allocations are page-aligned and zeroed; borrowed memory is the caller's
//! promise (see [`crate::Engine::register`]).
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;

use ferry_transport_api::{Access, BufferDescriptor, Location, RegionMemory};

use crate::backends::device;
use crate::registry::{Registered, Registry};
use crate::{Error, Result};

const PAGE: usize = 4096;

/// A page-aligned allocation freed when the last user (a buffer or a transfer in flight)
/// lets go.
struct PageAlloc {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the allocation is plain bytes with no thread affinity.
unsafe impl Send for PageAlloc {}
// SAFETY: `PageAlloc` itself never touches the bytes; access goes through RegionMemory.
unsafe impl Sync for PageAlloc {}

impl Drop for PageAlloc {
    fn drop(&mut self) {
        // SAFETY: allocated in `allocate_host` with exactly this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Allocates `len` zeroed, page-aligned host bytes as a region.
pub(crate) fn allocate_host(len: usize, location: Location) -> Result<RegionMemory> {
    let layout = Layout::from_size_align(len.max(1).next_multiple_of(PAGE), PAGE).map_err(|e| {
        Error::Allocate {
            len,
            source: Some(e),
        }
    })?;
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    let ptr = NonNull::new(ptr).ok_or(Error::Allocate { len, source: None })?;
    let owner = PageAlloc { ptr, layout };
    // SAFETY: `len <= layout.size()` bytes at `ptr` are valid for reads and writes until
    // `owner` is dropped, and `owner` moves into the region.
    Ok(unsafe { RegionMemory::from_raw(ptr, len, location, Box::new(owner)) })
}

/// The address `offset` bytes into a region, for handing to the CUDA driver (never
/// dereferenced here).
fn region_ptr(m: &RegionMemory, offset: usize) -> *mut u8 {
    (m.addr() + offset as u64) as usize as *mut u8
}

/// Copies between two regions of which at least one is device memory, through the
/// driver. Fails when a range is out of bounds.
pub(crate) fn device_copy(
    dst: &RegionMemory,
    dst_off: usize,
    src: &RegionMemory,
    src_off: usize,
    len: usize,
) -> Result<()> {
    if !dst.contains(dst_off, len) || !src.contains(src_off, len) {
        return Err(Error::InvalidRequest("copy out of bounds".into()));
    }
    let device = match (dst.location(), src.location()) {
        (Location::Cuda { device }, _) | (_, Location::Cuda { device }) => device,
        _ => 0,
    };
    // SAFETY: both ranges are inside registered regions (checked), which stay valid
    // while the references live.
    unsafe {
        device::copy(
            device,
            region_ptr(dst, dst_off),
            region_ptr(src, src_off),
            len,
        )
    }
}

/// Wraps memory the caller owns.
///
/// # Safety
/// As [`crate::Engine::register`].
pub(crate) unsafe fn borrow(ptr: *mut u8, len: usize, location: Location) -> Result<RegionMemory> {
    let ptr = NonNull::new(ptr)
        .ok_or_else(|| Error::InvalidRequest("cannot register a null pointer".into()))?;
    // SAFETY: forwarded from the caller's contract; the unit owner frees nothing.
    Ok(unsafe { RegionMemory::from_raw(ptr, len, location, Box::new(())) })
}

/// Registered memory: owned (from [`crate::Engine::allocate`]) or borrowed (from
/// [`crate::Engine::register`]). Cheap to clone; deregistered when the last clone drops.
#[derive(Clone)]
pub struct Buffer {
    pub(crate) inner: Arc<BufferInner>,
}

pub(crate) struct BufferInner {
    pub(crate) memory: Arc<RegionMemory>,
    pub(crate) descriptor: BufferDescriptor,
    pub(crate) borrowed: bool,
    /// Its id in the engine's published set; `None` for local-only buffers.
    pub(crate) published: Option<u64>,
    /// The engine's registry it was registered with (and deregisters from).
    pub(crate) registry: Arc<Registry>,
}

impl Buffer {
    /// Wraps a region just registered with `registry`.
    pub(crate) fn new(registry: Arc<Registry>, registered: Registered, borrowed: bool) -> Self {
        Buffer {
            inner: Arc::new(BufferInner {
                memory: registered.memory,
                descriptor: registered.descriptor,
                borrowed,
                published: registered.published,
                registry,
            }),
        }
    }
}

impl Buffer {
    /// Start address.
    pub fn addr(&self) -> u64 {
        self.inner.memory.addr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.memory.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the memory lives.
    pub fn location(&self) -> Location {
        self.inner.memory.location()
    }

    /// What peers may do with it.
    pub fn access(&self) -> Access {
        self.inner.descriptor.access
    }

    /// How peers see this buffer (address, length, keys).
    pub fn descriptor(&self) -> &BufferDescriptor {
        &self.inner.descriptor
    }

    /// Copies `data` into the buffer at `offset` (through the driver for device
    /// memory).
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        let m = &self.inner.memory;
        if !m.contains(offset, data.len()) {
            return Err(self.bounds_error(offset, data.len()));
        }
        match m.location() {
            Location::Cuda { device } => {
                // SAFETY: the range is inside the device region (checked); `data` is
                // readable host memory.
                unsafe { device::copy(device, region_ptr(m, offset), data.as_ptr(), data.len()) }
            }
            _ if m.copy_from_slice_at(offset, data) => Ok(()),
            _ => Err(self.bounds_error(offset, data.len())),
        }
    }

    /// Copies `out.len()` bytes at `offset` out of the buffer (through the driver for
    /// device memory).
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        let m = &self.inner.memory;
        if !m.contains(offset, out.len()) {
            return Err(self.bounds_error(offset, out.len()));
        }
        match m.location() {
            Location::Cuda { device } => {
                // SAFETY: as in `write_at`, the other way.
                unsafe { device::copy(device, out.as_mut_ptr(), region_ptr(m, offset), out.len()) }
            }
            _ if m.copy_to_slice_at(offset, out) => Ok(()),
            _ => Err(self.bounds_error(offset, out.len())),
        }
    }

    fn bounds_error(&self, offset: usize, len: usize) -> Error {
        Error::InvalidRequest(format!(
            "{len} bytes at offset {offset} run past the buffer's {} bytes",
            self.len()
        ))
    }

    pub(crate) fn memory(&self) -> &Arc<RegionMemory> {
        &self.inner.memory
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .field("location", &self.location())
            .field("access", &self.access())
            .finish()
    }
}

impl Drop for BufferInner {
    fn drop(&mut self) {
        self.registry.deregister(&self.memory, self.published);
        if self.borrowed {
            // The caller may free its memory once we return: wait until no transfer in
            // flight still uses it. TCP ends every transfer by its deadline and closes
            // connections whose frame holds a deregistered region; a fabric operation
            // whose completion the provider never delivers keeps the memory (the NIC may
            // still write it) until the transport shuts down, so say so when it lasts.
            let start = std::time::Instant::now();
            let mut warned = false;
            while Arc::strong_count(&self.memory) > 1 {
                if !warned && start.elapsed() >= std::time::Duration::from_secs(5) {
                    warned = true;
                    tracing::warn!(
                        len = self.memory.len(),
                        holders = Arc::strong_count(&self.memory) - 1,
                        "dropping a caller-owned buffer waits for transfers still using it (a fabric operation the provider never completed holds it until the engine shuts down)"
                    );
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    }
}
