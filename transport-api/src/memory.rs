//! Registered memory as transports see it.
#![allow(unsafe_code)]

use std::any::Any;
use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::ptr::NonNull;

use crate::Location;

/// A registered range of memory: its address, length and [`Location`], and whatever keeps
/// it alive.
///
/// Registered memory is shared memory in the RMA sense: remote peers read and write it
/// while the owner holds it, exactly as a NIC's DMA would. Transports hold an
/// `Arc<RegionMemory>` for every slice in flight, so a region outlives the transfers that
/// touch it.
///
/// Two views of the bytes:
/// - the host accessors ([`io_slice`](Self::io_slice),
///   [`copy_from_slice_at`](Self::copy_from_slice_at), ...) return `None` or refuse for
///   device memory: a GPU pointer never reaches a socket or a CPU copy;
/// - the NIC's view, [`dma_addr`](Self::dma_addr), is a bounds-checked address valid for
///   any location, for transports that hand memory to a NIC or driver (libfabric with
///   `FI_HMEM`, ibverbs) and never dereference it.
pub struct RegionMemory {
    ptr: NonNull<u8>,
    len: usize,
    location: Location,
    _owner: Box<dyn Any + Send + Sync>,
}

// SAFETY: `RegionMemory` is a handle to memory that `from_raw`'s contract declares valid
// for concurrent access from any thread for the handle's whole life; the pointer is never
// used to create references that outlive a method call except the `IoSlice`s whose
// lifetime is tied to `&self`.
unsafe impl Send for RegionMemory {}
// SAFETY: as above; every accessor takes `&self` and treats the bytes as shared memory.
unsafe impl Sync for RegionMemory {}

impl RegionMemory {
    /// Wraps `len` bytes at `ptr`, kept alive by `owner` (dropped with the region).
    ///
    /// # Safety
    /// - For host memory: `ptr..ptr+len` is valid for reads and writes for as long as
    ///   `owner` lives, and the caller accepts that peers and transports read and write it
    ///   concurrently with any local use (as with DMA); the caller does not hold Rust
    ///   references into it across such accesses.
    /// - For device memory: `ptr` is a device address of `len` bytes; it is never
    ///   dereferenced by this type.
    pub unsafe fn from_raw(
        ptr: NonNull<u8>,
        len: usize,
        location: Location,
        owner: Box<dyn Any + Send + Sync>,
    ) -> Self {
        RegionMemory {
            ptr,
            len,
            location,
            _owner: owner,
        }
    }

    /// Start address, as published to peers.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as usize as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the memory lives.
    pub fn location(&self) -> Location {
        self.location
    }

    /// Whether `offset..offset+len` lies inside the region.
    pub fn contains(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// The address of `len` bytes at `offset`, for handing to a NIC or driver (a work
    /// request, an RMA post), whatever the [`Location`]: for device memory it is a device
    /// address. `None` when the range is not inside the region.
    ///
    /// Never dereferenced by ferry: a transport passes it to hardware that reaches the
    /// memory by DMA, with the registration that covers the region. Reading or writing the
    /// bytes from the CPU goes through the host accessors, which refuse device memory.
    pub fn dma_addr(&self, offset: usize, len: usize) -> Option<u64> {
        if !self.contains(offset, len) {
            return None;
        }
        // `offset <= len`, and `addr..addr+len` is one allocation, so this cannot wrap.
        self.addr().checked_add(offset as u64)
    }

    fn host_ptr(&self, offset: usize, len: usize) -> Option<*mut u8> {
        if !self.location.is_host() || !self.contains(offset, len) {
            return None;
        }
        // SAFETY: `offset <= self.len`, so the result stays inside (or one past) the
        // allocation described by `from_raw`'s contract.
        Some(unsafe { self.ptr.as_ptr().add(offset) })
    }

    /// A view of `len` bytes at `offset` for a vectored socket write, or `None` when out
    /// of bounds or not host memory.
    pub fn io_slice(&self, offset: usize, len: usize) -> Option<IoSlice<'_>> {
        let p = self.host_ptr(offset, len)?;
        // SAFETY: in bounds, host memory valid for reads while `self` lives (from_raw).
        Some(IoSlice::new(unsafe { std::slice::from_raw_parts(p, len) }))
    }

    /// A view of `len` bytes at `offset` for a vectored socket read, or `None` when out of
    /// bounds or not host memory. Several views may cover the same bytes: registered
    /// memory is shared memory (see the type's docs).
    pub fn io_slice_mut(&self, offset: usize, len: usize) -> Option<IoSliceMut<'_>> {
        let p = self.host_ptr(offset, len)?;
        // SAFETY: in bounds, host memory valid for writes while `self` lives; concurrent
        // access is part of `from_raw`'s contract.
        Some(IoSliceMut::new(unsafe {
            std::slice::from_raw_parts_mut(p, len)
        }))
    }

    /// Copies `src` into the region at `offset`. Returns false (copying nothing) when out
    /// of bounds or not host memory.
    pub fn copy_from_slice_at(&self, offset: usize, src: &[u8]) -> bool {
        let Some(p) = self.host_ptr(offset, src.len()) else {
            return false;
        };
        // SAFETY: destination in bounds and writable (from_raw); `src` is a distinct Rust
        // borrow, so `copy` (memmove) is valid even if it aliases.
        unsafe { std::ptr::copy(src.as_ptr(), p, src.len()) };
        true
    }

    /// Copies `dst.len()` bytes at `offset` out of the region. Returns false (copying
    /// nothing) when out of bounds or not host memory.
    pub fn copy_to_slice_at(&self, offset: usize, dst: &mut [u8]) -> bool {
        let Some(p) = self.host_ptr(offset, dst.len()) else {
            return false;
        };
        // SAFETY: source in bounds and readable (from_raw); `dst` is an exclusive borrow.
        unsafe { std::ptr::copy(p, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Copies `len` bytes from `src` at `src_offset` to `self` at `offset` (the regions
    /// may be the same or overlap). Returns false when either side is out of bounds or
    /// not host memory.
    pub fn copy_within_regions(
        &self,
        offset: usize,
        src: &RegionMemory,
        src_offset: usize,
        len: usize,
    ) -> bool {
        let (Some(d), Some(s)) = (self.host_ptr(offset, len), src.host_ptr(src_offset, len)) else {
            return false;
        };
        // SAFETY: both ranges in bounds of live host regions; `copy` allows overlap.
        unsafe { std::ptr::copy(s, d, len) };
        true
    }
}

impl fmt::Debug for RegionMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionMemory")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .field("location", &self.location)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(len: usize) -> RegionMemory {
        let mut v = vec![0u8; len].into_boxed_slice();
        let ptr = NonNull::new(v.as_mut_ptr()).unwrap();
        // SAFETY: the boxed slice is moved into the owner and lives as long as the region.
        unsafe { RegionMemory::from_raw(ptr, len, Location::host(), Box::new(v)) }
    }

    #[test]
    fn bounds_are_checked() {
        let r = region(16);
        assert!(r.io_slice(0, 16).is_some());
        assert!(r.io_slice(1, 16).is_none());
        assert!(r.io_slice(usize::MAX, 2).is_none());
        assert!(!r.copy_from_slice_at(10, &[1; 7]));
        assert!(r.copy_from_slice_at(9, &[7; 7]));
        let mut out = [0u8; 8];
        assert!(r.copy_to_slice_at(8, &mut out));
        assert_eq!(out, [0, 7, 7, 7, 7, 7, 7, 7]);
    }

    #[test]
    fn device_memory_never_reaches_host_accessors() {
        let owner = vec![0u8; 8];
        let ptr = NonNull::new(owner.as_ptr() as *mut u8).unwrap();
        // SAFETY: never dereferenced as device memory.
        let r = unsafe {
            RegionMemory::from_raw(ptr, 8, Location::Cuda { device: 0 }, Box::new(owner))
        };
        assert!(r.io_slice(0, 4).is_none());
        assert!(r.io_slice_mut(0, 4).is_none());
        assert!(!r.copy_from_slice_at(0, &[1]));
    }

    /// The NIC's view covers device memory as well as host memory, checked against the
    /// region's bounds like the host views.
    #[test]
    fn dma_addresses_cover_every_location_within_bounds() {
        let host = region(16);
        let owner = vec![0u8; 16];
        let ptr = NonNull::new(owner.as_ptr() as *mut u8).unwrap();
        // SAFETY: never dereferenced as device memory.
        let device = unsafe {
            RegionMemory::from_raw(ptr, 16, Location::Cuda { device: 1 }, Box::new(owner))
        };
        for r in [&host, &device] {
            assert_eq!(r.dma_addr(0, 16), Some(r.addr()));
            assert_eq!(r.dma_addr(5, 11), Some(r.addr() + 5));
            assert_eq!(r.dma_addr(16, 0), Some(r.addr() + 16));
            assert_eq!(r.dma_addr(5, 12), None);
            assert_eq!(r.dma_addr(17, 0), None);
            assert_eq!(r.dma_addr(usize::MAX, 2), None);
        }
        assert!(device.io_slice(5, 11).is_none(), "host views still refuse");
    }
}
