//! The registration edge: the one place in the engine that turns pointers into registered
//! memory. Owned allocations are page-aligned and zeroed; borrowed memory is the caller's
//! promise (see [`crate::Engine::register`]).
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;

use ferry_transport_api::{Access, BufferDescriptor, Location, RegionMemory};

use crate::engine::Inner;
use crate::{backends, Engine, Error, Result};

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
    let layout = Layout::from_size_align(len.max(1).next_multiple_of(PAGE), PAGE)
        .map_err(|e| Error::RegisterRegion(format!("cannot allocate {len} bytes: {e}")))?;
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    let ptr = NonNull::new(ptr)
        .ok_or_else(|| Error::RegisterRegion(format!("out of memory allocating {len} bytes")))?;
    let owner = PageAlloc { ptr, layout };
    // SAFETY: `len <= layout.size()` bytes at `ptr` are valid for reads and writes until
    // `owner` is dropped, and `owner` moves into the region.
    Ok(unsafe { RegionMemory::from_raw(ptr, len, location, Box::new(owner)) })
}

/// Wraps memory the caller owns.
///
/// # Safety
/// As [`crate::Engine::register`].
pub(crate) unsafe fn borrow(ptr: *mut u8, len: usize, location: Location) -> Result<RegionMemory> {
    let ptr = NonNull::new(ptr).ok_or_else(|| Error::RegisterRegion("null pointer".into()))?;
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
    pub(crate) engine: Arc<Inner>,
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

    /// Copies `data` into the buffer at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        if self.inner.memory.copy_from_slice_at(offset, data) {
            Ok(())
        } else {
            Err(self.access_error(offset, data.len()))
        }
    }

    /// Copies `out.len()` bytes at `offset` out of the buffer.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        if self.inner.memory.copy_to_slice_at(offset, out) {
            Ok(())
        } else {
            Err(self.access_error(offset, out.len()))
        }
    }

    fn access_error(&self, offset: usize, len: usize) -> Error {
        if !self.location().is_host() {
            Error::InvalidRequest(format!(
                "{} memory cannot be read or written by the CPU",
                self.location()
            ))
        } else {
            Error::InvalidRequest(format!(
                "{len} bytes at offset {offset} run past the buffer's {} bytes",
                self.len()
            ))
        }
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
        self.engine.deregister(&self.memory);
        if self.borrowed {
            // The caller may free its memory once we return: wait until no transfer in
            // flight still uses it. Transfers end by their deadline, so this is bounded.
            while Arc::strong_count(&self.memory) > 1 {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    }
}

impl Engine {
    /// Registers memory the caller owns (a tensor, an mmap) at `location`, published to
    /// peers with `access`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid for reads and writes until the returned [`Buffer`]
    /// and all its clones are dropped (the drop waits for transfers still using it). The
    /// memory is shared with peers and transports: they read and write it concurrently
    /// with the caller, as a NIC would, so the caller must not hold Rust references into
    /// it while transfers touch it. `location` must be where the memory really is.
    pub unsafe fn register(
        &self,
        ptr: *mut u8,
        len: usize,
        location: Location,
        access: Access,
    ) -> Result<Buffer> {
        backends::require_location(location)?;
        // SAFETY: forwarded from this function's contract.
        let memory = unsafe { borrow(ptr, len, location)? };
        self.publish(memory, access, "", true)
    }
}
