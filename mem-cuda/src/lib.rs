//! ferry's GPU memory support, over the CUDA driver API loaded at run time.
//!
//! `cudarc` is built with `dynamic-loading`, so this crate builds with no CUDA toolkit
//! and runs on hosts without a GPU: every entry point first checks that the driver
//! library is present ([`driver_present`]) and returns [`CudaError::DriverMissing`]
//! otherwise (cudarc itself panics when asked to load a missing library).
//!
//! What it offers the engine:
//! - [`Cuda::memory_kind`]: pointer attributes, so a registration can tell pageable host,
//!   pinned host and device memory apart, with the device ordinal; [`Cuda::resolve`]
//!   turns [`Location::Auto`] into a real location and refuses a wrong explicit one;
//! - [`Cuda::alloc`]: device memory owned by a [`DeviceMemory`];
//! - [`StagingPool`]: pinned host buffers per device with a stream each, implementing
//!   [`ferry_transport_api::Staging`] for TCP; copies run on a stream of the buffer's own
//!   device, with that device's primary context current, so no context is ever created on
//!   a device the caller did not use;
//! - [`Cuda::export_dmabuf`]: a dma-buf file descriptor for a device range (for RDMA
//!   registration).
//!
//! Layering: depends on `transport-api` only; transports never depend on it (the engine
//! hands them the staging capability).
#![allow(unsafe_code)]

use std::ffi::{c_void, CStr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys;
use ferry_transport_api::{
    Location, RegionMemory, Staging, StagingBuffer, StagingStats, TransportError,
};
use parking_lot::Mutex;

/// Why a CUDA operation could not be done.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// `libcuda.so` is not on this host.
    #[error(
        "the CUDA driver library (libcuda.so) was not found on this host: install the \
         NVIDIA driver, or use host memory"
    )]
    DriverMissing,
    /// The driver refused a call.
    #[error("CUDA {call} failed: {message}")]
    Driver {
        /// The driver function.
        call: &'static str,
        /// The driver's error name and text.
        message: String,
    },
    /// No device with this ordinal.
    #[error("CUDA device {device} does not exist (this host has {count})")]
    NoDevice {
        /// The ordinal asked for.
        device: u32,
        /// How many devices the driver reports.
        count: u32,
    },
    /// A malformed request (wrong memory kind, out of range).
    #[error("{0}")]
    Invalid(String),
}

impl From<CudaError> for TransportError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Invalid(message) => TransportError::invalid(message),
            other => TransportError::Unsupported {
                what: "device memory".into(),
                why: other.to_string(),
            },
        }
    }
}

/// Whether the CUDA driver library can be loaded here. Never panics; probed once.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to open the library; cudarc's own probe, which cannot panic.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

fn check(call: &'static str, rc: sys::CUresult) -> Result<(), CudaError> {
    if rc == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver writes a pointer to a static string (or leaves it null).
    let message = unsafe {
        if sys::cuGetErrorString(rc, &mut text) == sys::CUresult::CUDA_SUCCESS && !text.is_null() {
            format!("{rc:?}: {}", CStr::from_ptr(text).to_string_lossy())
        } else {
            format!("{rc:?}")
        }
    };
    Err(CudaError::Driver { call, message })
}

/// A primary context handle (the driver's own, shared by every user of the device).
struct Context(sys::CUcontext);

// SAFETY: CUDA contexts may be made current on any thread.
unsafe impl Send for Context {}
// SAFETY: as above; the handle is only passed to the driver.
unsafe impl Sync for Context {}

struct Gpu {
    device: sys::CUdevice,
    name: String,
    total_memory: usize,
    /// Retained on first use, so untouched devices get no context.
    context: OnceLock<Result<Context, CudaError>>,
    /// The stream plain copies run on: non-blocking, so a copy never waits on work the
    /// caller queued on the legacy default stream (or on a stream held by a host
    /// function waiting for this very copy). Created on first copy; the lock serialises
    /// copies on it.
    copy_stream: Mutex<Option<CopyStream>>,
}

struct CopyStream(sys::CUstream);

// SAFETY: a stream handle may be used from any thread; uses are serialised by the
// `copy_stream` lock.
unsafe impl Send for CopyStream {}

/// One CUDA device as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal (`cuda:N`).
    pub ordinal: u32,
    /// Marketing name.
    pub name: String,
    /// Memory in bytes.
    pub total_memory: usize,
}

/// What kind of memory a pointer refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// Ordinary host memory CUDA does not know.
    Pageable,
    /// Host memory pinned (page-locked) by CUDA.
    Pinned,
    /// Memory of a CUDA device.
    Device {
        /// Its ordinal.
        device: u32,
    },
}

/// The loaded driver and its devices. Get it with [`cuda`].
pub struct Cuda {
    driver_version: i32,
    gpus: Vec<Gpu>,
}

/// The driver, initialised once per process; an error when it is absent or fails.
pub fn cuda() -> Result<&'static Cuda, CudaError> {
    if !driver_present() {
        return Err(CudaError::DriverMissing);
    }
    static CUDA: OnceLock<Result<Cuda, CudaError>> = OnceLock::new();
    CUDA.get_or_init(Cuda::init).as_ref().map_err(Clone::clone)
}

impl Cuda {
    fn init() -> Result<Cuda, CudaError> {
        // SAFETY: plain driver calls with pointers to live locals; the library is present
        // (checked by `cuda`).
        unsafe {
            let rc = sys::cuInit(0);
            if rc == sys::CUresult::CUDA_ERROR_NO_DEVICE {
                return Ok(Cuda {
                    driver_version: 0,
                    gpus: Vec::new(),
                });
            }
            check("cuInit", rc)?;
            let mut driver_version = 0;
            check(
                "cuDriverGetVersion",
                sys::cuDriverGetVersion(&mut driver_version),
            )?;
            let mut count = 0;
            check("cuDeviceGetCount", sys::cuDeviceGetCount(&mut count))?;
            let mut gpus = Vec::new();
            for ordinal in 0..count {
                let mut device = 0;
                check("cuDeviceGet", sys::cuDeviceGet(&mut device, ordinal))?;
                let mut name = [0 as std::ffi::c_char; 256];
                check(
                    "cuDeviceGetName",
                    sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, device),
                )?;
                let mut total_memory = 0;
                check(
                    "cuDeviceTotalMem",
                    sys::cuDeviceTotalMem_v2(&mut total_memory, device),
                )?;
                gpus.push(Gpu {
                    device,
                    name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
                    total_memory,
                    context: OnceLock::new(),
                    copy_stream: Mutex::new(None),
                });
            }
            Ok(Cuda {
                driver_version,
                gpus,
            })
        }
    }

    /// The driver's CUDA version (e.g. 12080 for 12.8); 0 when it found no device.
    pub fn driver_version(&self) -> i32 {
        self.driver_version
    }

    /// Every device, in ordinal order.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.gpus
            .iter()
            .enumerate()
            .map(|(i, g)| DeviceInfo {
                ordinal: i as u32,
                name: g.name.clone(),
                total_memory: g.total_memory,
            })
            .collect()
    }

    /// Makes `device`'s primary context current on this thread (retaining it on first
    /// use).
    fn bind(&self, device: u32) -> Result<(), CudaError> {
        let gpu = self.gpus.get(device as usize).ok_or(CudaError::NoDevice {
            device,
            count: self.gpus.len() as u32,
        })?;
        let ctx = gpu
            .context
            .get_or_init(|| {
                let mut ctx: sys::CUcontext = std::ptr::null_mut();
                // SAFETY: retains the device's primary context into a live local; never
                // released, so it outlives every use (a process-wide singleton).
                check("cuDevicePrimaryCtxRetain", unsafe {
                    sys::cuDevicePrimaryCtxRetain(&mut ctx, gpu.device)
                })
                .map(|()| Context(ctx))
            })
            .as_ref()
            .map_err(Clone::clone)?;
        // SAFETY: a retained primary context.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx.0) })
    }

    /// The PCI bus id of `device` (`0000:3b:00.0`), for choosing the NICs closest to it.
    pub fn pci_bus_id(&self, device: u32) -> Result<String, CudaError> {
        let gpu = self.gpus.get(device as usize).ok_or(CudaError::NoDevice {
            device,
            count: self.gpus.len() as u32,
        })?;
        let mut id = [0 as std::ffi::c_char; 64];
        // SAFETY: the driver writes a NUL-terminated id of at most `len` bytes into a live
        // local buffer of that size.
        check("cuDeviceGetPCIBusId", unsafe {
            sys::cuDeviceGetPCIBusId(id.as_mut_ptr(), id.len() as i32, gpu.device)
        })?;
        // SAFETY: NUL-terminated by the driver (the buffer is larger than any bus id).
        Ok(unsafe { CStr::from_ptr(id.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    /// What kind of memory `ptr` points to, from the driver's pointer attributes.
    pub fn memory_kind(&self, ptr: *const u8) -> Result<MemoryKind, CudaError> {
        let mut kind: u32 = 0;
        // SAFETY: the attribute is a 32-bit enum written into a live local; the pointer
        // is only looked up, never dereferenced.
        let rc = unsafe {
            sys::cuPointerGetAttribute(
                (&mut kind as *mut u32).cast::<c_void>(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                ptr as sys::CUdeviceptr,
            )
        };
        if rc == sys::CUresult::CUDA_ERROR_INVALID_VALUE {
            // Memory the driver does not know: ordinary host memory.
            return Ok(MemoryKind::Pageable);
        }
        check("cuPointerGetAttribute", rc)?;
        if kind == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32 {
            return Ok(MemoryKind::Pinned);
        }
        let mut ordinal: i32 = 0;
        // SAFETY: as above, a 32-bit int.
        check("cuPointerGetAttribute", unsafe {
            sys::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast::<c_void>(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr as sys::CUdeviceptr,
            )
        })?;
        Ok(MemoryKind::Device {
            device: ordinal.max(0) as u32,
        })
    }

    /// The location of `ptr` for a registration that claims `claimed`: [`Location::Auto`]
    /// becomes host or `Cuda { device }`; an explicit location that does not match the
    /// memory is an error.
    pub fn resolve(&self, ptr: *const u8, claimed: Location) -> Result<Location, CudaError> {
        let kind = self.memory_kind(ptr)?;
        let actual = match kind {
            MemoryKind::Device { device } => Location::Cuda { device },
            MemoryKind::Pageable | MemoryKind::Pinned => Location::host(),
        };
        match (claimed, actual) {
            (Location::Auto, a) => Ok(a),
            (Location::Host { .. }, Location::Host { .. }) => Ok(claimed),
            (Location::Cuda { device: c }, Location::Cuda { device: a }) if c == a => Ok(claimed),
            (c, a) => Err(CudaError::Invalid(format!(
                "memory at {ptr:p} is {a} memory, but was registered as {c}"
            ))),
        }
    }

    /// Allocates `len` zeroed bytes on `device`.
    pub fn alloc(&'static self, device: u32, len: usize) -> Result<DeviceMemory, CudaError> {
        self.bind(device)?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: allocates into a live local with the device's context current.
        check("cuMemAlloc", unsafe {
            sys::cuMemAlloc_v2(&mut ptr, len.max(1))
        })?;
        let memory = DeviceMemory {
            ptr,
            len,
            device,
            cuda: self,
        };
        // SAFETY: `ptr..ptr+len` is the allocation just made.
        check("cuMemsetD8", unsafe {
            sys::cuMemsetD8_v2(ptr, 0, len.max(1))
        })?;
        Ok(memory)
    }

    /// Copies `len` bytes from `src` to `dst`, either of which may be device memory of
    /// `device` (unified addressing); returns when the copy is done.
    ///
    /// # Safety
    /// `src..src+len` must be readable and `dst..dst+len` writable memory (host or
    /// device), not overlapping.
    pub unsafe fn copy(
        &self,
        device: u32,
        dst: *mut u8,
        src: *const u8,
        len: usize,
    ) -> Result<(), CudaError> {
        if len == 0 {
            return Ok(());
        }
        self.bind(device)?;
        let gpu = self.gpus.get(device as usize).ok_or(CudaError::NoDevice {
            device,
            count: self.gpus.len() as u32,
        })?;
        let mut stream = gpu.copy_stream.lock();
        if stream.is_none() {
            let mut s: sys::CUstream = std::ptr::null_mut();
            // SAFETY: creates a stream of the current (`device`'s primary) context into a
            // live local.
            check("cuStreamCreate", unsafe {
                sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
            })?;
            *stream = Some(CopyStream(s));
        }
        let Some(CopyStream(s)) = stream.as_ref() else {
            return Err(CudaError::Invalid("no copy stream".into()));
        };
        // SAFETY: the caller's contract for both ranges; the copy is complete when the
        // stream is synchronised below, before the ranges can go.
        check("cuMemcpyAsync", unsafe {
            sys::cuMemcpyAsync(dst as sys::CUdeviceptr, src as sys::CUdeviceptr, len, *s)
        })?;
        // SAFETY: a live stream of this context.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(*s)
        })
    }

    /// Runs `f` on a driver thread once all work enqueued on `stream` (a `CUstream` as
    /// an integer; 0: the legacy default stream of `device`'s primary context) before this
    /// call is done; work enqueued on the stream after it waits until `f` returns. `f`
    /// must not call CUDA (the driver forbids it there): work that does hands it to
    /// another thread and waits. A panic in `f` is caught, never unwound into the driver.
    pub fn launch_host_func(
        &self,
        device: u32,
        stream: usize,
        f: Box<dyn FnOnce() + Send + 'static>,
    ) -> Result<(), CudaError> {
        unsafe extern "C" fn trampoline(data: *mut c_void) {
            // SAFETY: made by `Box::into_raw` below and handed to the driver, which calls
            // this exactly once.
            let f = unsafe { Box::from_raw(data.cast::<Box<dyn FnOnce() + Send>>()) };
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        }
        self.bind(device)?;
        let data = Box::into_raw(Box::new(f)).cast::<c_void>();
        // SAFETY: `stream` is the caller's stream handle (or 0); `data` is a live boxed
        // closure that the trampoline takes back once.
        let rc = unsafe { sys::cuLaunchHostFunc(stream as sys::CUstream, Some(trampoline), data) };
        check("cuLaunchHostFunc", rc).inspect_err(|_| {
            // SAFETY: the driver refused it, so it will never call the trampoline.
            drop(unsafe { Box::from_raw(data.cast::<Box<dyn FnOnce() + Send>>()) });
        })
    }

    /// A dma-buf file descriptor for the device range `ptr..ptr+len` (both aligned to the
    /// host page size), for registering device memory with an RDMA NIC.
    pub fn export_dmabuf(&self, ptr: *const u8, len: usize) -> Result<OwnedFd, CudaError> {
        let MemoryKind::Device { device } = self.memory_kind(ptr)? else {
            return Err(CudaError::Invalid(format!(
                "dma-buf export needs device memory; {ptr:p} is host memory"
            )));
        };
        if (ptr as usize) % 4096 != 0 || len % 4096 != 0 || len == 0 {
            return Err(CudaError::Invalid(format!(
                "dma-buf export needs a page-aligned range; got {ptr:p}+{len}"
            )));
        }
        if !has_symbol(c"cuMemGetHandleForAddressRange") {
            return Err(CudaError::Invalid(
                "this CUDA driver cannot export dma-bufs (it needs CUDA 11.7 or newer)".into(),
            ));
        }
        self.bind(device)?;
        let mut fd: i32 = -1;
        // SAFETY: the driver writes one int (the fd) into a live local.
        check("cuMemGetHandleForAddressRange", unsafe {
            sys::cuMemGetHandleForAddressRange(
                (&mut fd as *mut i32).cast::<c_void>(),
                ptr as sys::CUdeviceptr,
                len,
                sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        })?;
        if fd < 0 {
            return Err(CudaError::Invalid("the driver returned no dma-buf".into()));
        }
        // SAFETY: a fresh descriptor the driver handed over; owned from here on.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Whether the loaded driver exports `name` (cudarc panics on calling a missing one).
fn has_symbol(name: &CStr) -> bool {
    // SAFETY: only looks the symbol up; the library is present (checked by `cuda`).
    unsafe {
        sys::culib()
            .get::<unsafe extern "C" fn()>(name.to_bytes_with_nul())
            .is_ok()
    }
}

/// Device memory from [`Cuda::alloc`], freed on drop.
pub struct DeviceMemory {
    ptr: sys::CUdeviceptr,
    len: usize,
    device: u32,
    cuda: &'static Cuda,
}

impl DeviceMemory {
    /// The device address (valid in this process through unified addressing).
    pub fn ptr(&self) -> *mut u8 {
        self.ptr as *mut u8
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the allocation is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device ordinal.
    pub fn device(&self) -> u32 {
        self.device
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        let freed = self.cuda.bind(self.device).and_then(|()| {
            // SAFETY: allocated by `Cuda::alloc`, freed once.
            check("cuMemFree", unsafe { sys::cuMemFree_v2(self.ptr) })
        });
        if let Err(e) = freed {
            tracing::warn!(error = %e, "freeing device memory failed");
        }
    }
}

/// A pinned host buffer and a stream of one device.
struct Pinned {
    host: *mut u8,
    len: usize,
    stream: sys::CUstream,
    device: u32,
    cuda: &'static Cuda,
}

// SAFETY: plain host memory and a stream handle, used by one thread at a time (a lease).
unsafe impl Send for Pinned {}

impl Pinned {
    fn new(cuda: &'static Cuda, device: u32, len: usize) -> Result<Pinned, CudaError> {
        cuda.bind(device)?;
        let mut host: *mut c_void = std::ptr::null_mut();
        // SAFETY: allocates into a live local with the device's context current;
        // portable, so any context may copy from it.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(&mut host, len, sys::CU_MEMHOSTALLOC_PORTABLE)
        })?;
        let mut stream: sys::CUstream = std::ptr::null_mut();
        // SAFETY: creates a stream of the current (the buffer's own) device.
        let rc = unsafe {
            sys::cuStreamCreate(
                &mut stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            )
        };
        if let Err(e) = check("cuStreamCreate", rc) {
            // SAFETY: allocated just above, freed once.
            unsafe { sys::cuMemFreeHost(host) };
            return Err(e);
        }
        Ok(Pinned {
            host: host.cast(),
            len,
            stream,
            device,
            cuda,
        })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.cuda.bind(self.device).is_ok() {
            // SAFETY: created in `Pinned::new`, each destroyed once; the stream is idle
            // (leases wait for their copies).
            unsafe {
                sys::cuStreamDestroy_v2(self.stream);
                sys::cuMemFreeHost(self.host.cast());
            }
        }
    }
}

struct PoolInner {
    cuda: &'static Cuda,
    chunk: usize,
    /// Idle buffers, per device ordinal.
    idle: Mutex<Vec<Vec<Pinned>>>,
    /// Buffers ever created, per device ordinal.
    created: Mutex<Vec<usize>>,
    leased: AtomicUsize,
}

/// Pinned host buffers per device for moving device memory over TCP. Buffers are made on
/// demand and kept for reuse.
#[derive(Clone)]
pub struct StagingPool {
    inner: Arc<PoolInner>,
}

impl StagingPool {
    /// A pool of `chunk`-byte buffers.
    pub fn new(cuda: &'static Cuda, chunk: usize) -> StagingPool {
        let n = cuda.gpus.len();
        StagingPool {
            inner: Arc::new(PoolInner {
                cuda,
                chunk: chunk.max(4096),
                idle: Mutex::new((0..n).map(|_| Vec::new()).collect()),
                created: Mutex::new(vec![0; n]),
                leased: AtomicUsize::new(0),
            }),
        }
    }
}

impl Staging for StagingPool {
    fn buffer(&self, location: Location) -> Result<Box<dyn StagingBuffer>, TransportError> {
        let Location::Cuda { device } = location else {
            return Err(TransportError::invalid(format!(
                "staging is for device memory, not {location}"
            )));
        };
        let p = &self.inner;
        let reused = p.idle.lock().get_mut(device as usize).and_then(Vec::pop);
        let pinned = match reused {
            Some(b) => b,
            None => {
                let b = Pinned::new(p.cuda, device, p.chunk)?;
                if let Some(n) = p.created.lock().get_mut(device as usize) {
                    *n += 1;
                }
                b
            }
        };
        p.leased.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(Lease {
            pinned: Some(pinned),
            pool: p.clone(),
        }))
    }

    fn pci_bus_id(&self, device: u32) -> Option<String> {
        self.inner.cuda.pci_bus_id(device).ok()
    }

    fn export_dmabuf(&self, region: &RegionMemory) -> Result<(OwnedFd, u64), TransportError> {
        // The driver exports whole host pages: the region's range, widened to them.
        const PAGE: u64 = 4096;
        let start = region.addr() & !(PAGE - 1);
        let end = (region.addr() + region.len() as u64).div_ceil(PAGE) * PAGE;
        let fd = self
            .inner
            .cuda
            .export_dmabuf(start as *const u8, (end - start) as usize)?;
        Ok((fd, region.addr() - start))
    }

    fn stats(&self) -> StagingStats {
        StagingStats {
            leased: self.inner.leased.load(Ordering::Relaxed),
            created: self
                .inner
                .created
                .lock()
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(d, &n)| (d as u32, n))
                .collect(),
        }
    }
}

/// A pinned buffer on loan; back to the pool on drop.
struct Lease {
    pinned: Option<Pinned>,
    pool: Arc<PoolInner>,
}

impl Lease {
    fn pinned(&self) -> &Pinned {
        self.pinned
            .as_ref()
            .expect("a lease holds its buffer until dropped")
    }

    /// Checks that a copy of `len` bytes at `offset` of `region` fits and is on this
    /// buffer's device, and makes that device current.
    fn prepare(&self, region: &RegionMemory, offset: usize, len: usize) -> Result<u64, CudaError> {
        let b = self.pinned();
        if region.location() != (Location::Cuda { device: b.device }) {
            return Err(CudaError::Invalid(format!(
                "a cuda:{} staging buffer cannot copy {} memory",
                b.device,
                region.location()
            )));
        }
        if len > b.len || !region.contains(offset, len) {
            return Err(CudaError::Invalid(format!(
                "staging copy of {len} bytes at offset {offset} does not fit (buffer {}, region {})",
                b.len,
                region.len()
            )));
        }
        self.pool.cuda.bind(b.device)?;
        Ok(region.addr() + offset as u64)
    }
}

impl StagingBuffer for Lease {
    fn capacity(&self) -> usize {
        self.pinned().len
    }

    fn download(
        &mut self,
        region: &RegionMemory,
        offset: usize,
        len: usize,
    ) -> Result<(), TransportError> {
        let src = self.prepare(region, offset, len)?;
        let b = self.pinned();
        // SAFETY: `src..src+len` is inside the registered device region (checked), the
        // host side is this lease's pinned buffer of at least `len` bytes; the lease is
        // not reused before `wait`.
        check("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(b.host.cast(), src, len, b.stream)
        })?;
        Ok(())
    }

    fn upload(
        &mut self,
        region: &RegionMemory,
        offset: usize,
        len: usize,
    ) -> Result<(), TransportError> {
        let dst = self.prepare(region, offset, len)?;
        let b = self.pinned();
        // SAFETY: as in `download`, the other way.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, b.host.cast_const().cast(), len, b.stream)
        })?;
        Ok(())
    }

    fn wait(&mut self) -> Result<(), TransportError> {
        let b = self.pinned();
        self.pool.cuda.bind(b.device)?;
        // SAFETY: a live stream of the current device.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(b.stream)
        })?;
        Ok(())
    }

    fn host(&mut self) -> &mut [u8] {
        let b = self.pinned();
        // SAFETY: `len` bytes of pinned host memory owned by this lease; no copy is in
        // flight between `wait` and the next copy (the trait's contract).
        unsafe { std::slice::from_raw_parts_mut(b.host, b.len) }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(b) = self.pinned.take() {
            // A copy still running would write into a reused buffer: wait for it.
            if self.pool.cuda.bind(b.device).is_ok() {
                // SAFETY: a live stream of the current device.
                unsafe { sys::cuStreamSynchronize(b.stream) };
            }
            if let Some(idle) = self.pool.idle.lock().get_mut(b.device as usize) {
                idle.push(b);
            }
            self.pool.leased.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ptr::NonNull;

    use super::*;

    /// The driver and the last device, or why the GPU tests cannot run.
    fn gpu() -> Option<(&'static Cuda, u32)> {
        match cuda() {
            Ok(c) if !c.gpus.is_empty() => Some((c, c.gpus.len() as u32 - 1)),
            Ok(_) => {
                eprintln!("skipped: the CUDA driver found no device");
                None
            }
            Err(e) => {
                eprintln!("skipped: needs an NVIDIA GPU ({e})");
                None
            }
        }
    }

    fn device_region(memory: DeviceMemory) -> RegionMemory {
        let (ptr, len, device) = (memory.ptr(), memory.len(), memory.device());
        // SAFETY: `len` bytes of device memory owned by `memory`, moved into the region.
        unsafe {
            RegionMemory::from_raw(
                NonNull::new(ptr).unwrap(),
                len,
                Location::Cuda { device },
                Box::new(memory),
            )
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn pointer_attributes_tell_device_pinned_and_pageable_memory_apart() {
        let Some((c, d)) = gpu() else { return };
        let device = c.alloc(d, 1 << 20).unwrap();
        assert_eq!(
            c.memory_kind(device.ptr()).unwrap(),
            MemoryKind::Device { device: d }
        );
        let pinned = Pinned::new(c, d, 4096).unwrap();
        assert_eq!(c.memory_kind(pinned.host).unwrap(), MemoryKind::Pinned);
        let pageable = vec![0u8; 4096];
        assert_eq!(
            c.memory_kind(pageable.as_ptr()).unwrap(),
            MemoryKind::Pageable
        );
        assert_eq!(
            c.resolve(device.ptr(), Location::Auto).unwrap(),
            Location::Cuda { device: d }
        );
        assert_eq!(
            c.resolve(pinned.host, Location::Auto).unwrap(),
            Location::host()
        );
        assert!(c.resolve(device.ptr(), Location::host()).is_err());
        assert!(c
            .resolve(pageable.as_ptr(), Location::Cuda { device: d })
            .is_err());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn staging_copies_round_trip_and_buffers_come_back() {
        let Some((c, d)) = gpu() else { return };
        let len = 3 << 20;
        let region = device_region(c.alloc(d, len).unwrap());
        let pool = StagingPool::new(c, 1 << 20);
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        {
            let mut b = pool.buffer(Location::Cuda { device: d }).unwrap();
            for (i, chunk) in data.chunks(1 << 20).enumerate() {
                b.host()[..chunk.len()].copy_from_slice(chunk);
                b.upload(&region, i << 20, chunk.len()).unwrap();
                b.wait().unwrap();
            }
            let mut back = vec![0u8; len];
            for (i, out) in back.chunks_mut(1 << 20).enumerate() {
                b.download(&region, i << 20, out.len()).unwrap();
                b.wait().unwrap();
                out.copy_from_slice(&b.host()[..out.len()]);
            }
            assert!(back == data, "staged bytes differ");
            // Out of the region, or bigger than the buffer: refused.
            assert!(b.download(&region, len - 10, 20).is_err());
            assert!(b.upload(&region, 0, (1 << 20) + 1).is_err());
            assert!(pool.buffer(Location::host()).is_err());
            assert_eq!(pool.stats().leased, 1);
        }
        let stats = pool.stats();
        assert_eq!(stats.leased, 0);
        assert_eq!(stats.created, vec![(d, 1)]);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn dmabuf_export_of_device_memory() {
        let Some((c, d)) = gpu() else { return };
        let device = c.alloc(d, 2 << 20).unwrap();
        match c.export_dmabuf(device.ptr(), 2 << 20) {
            Ok(fd) => assert!(std::os::fd::AsRawFd::as_raw_fd(&fd) >= 0),
            // Some drivers (without the open kernel modules) do not support dma-buf.
            Err(e) => eprintln!("dma-buf export not available here: {e}"),
        }
        let host = vec![0u8; 8192];
        assert!(c.export_dmabuf(host.as_ptr(), 4096).is_err());
    }

    /// On a host without the driver every entry point is an error that names it; with a
    /// driver, the devices are listed.
    #[test]
    fn a_missing_driver_is_an_error_not_a_panic() {
        match cuda() {
            Err(e) => {
                assert!(!driver_present());
                assert_eq!(e, CudaError::DriverMissing);
                let msg = TransportError::from(e).to_string();
                assert!(msg.contains("libcuda.so"), "{msg}");
                eprintln!("skipped the GPU part: {msg}");
            }
            Ok(c) => {
                assert!(driver_present());
                let devices = c.devices();
                assert_eq!(
                    devices.iter().map(|d| d.ordinal).collect::<Vec<_>>(),
                    (0..devices.len() as u32).collect::<Vec<_>>()
                );
            }
        }
    }
}
