//! Device memory: mem-cuda with the `cuda` feature, errors naming the feature without.
//! Both builds offer the same functions.
#![allow(unsafe_code)]

#[cfg(feature = "cuda")]
pub(crate) use with_cuda::*;
#[cfg(not(feature = "cuda"))]
pub(crate) use without_cuda::*;

/// What this process knows about CUDA (`ferry info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaStatus {
    /// Whether the `cuda` feature is compiled in.
    pub compiled: bool,
    /// The devices found, as `(ordinal, name, bytes)`.
    pub devices: Vec<(u32, String, usize)>,
    /// Why CUDA cannot be used, when it cannot (no feature, no driver, no device).
    pub unavailable: Option<String>,
}

#[cfg(feature = "cuda")]
mod with_cuda {
    use std::sync::Arc;

    use ferry_mem_cuda::{cuda, CudaError, DeviceMemory, StagingPool};
    use ferry_transport_api::{Location, RegionMemory, Staging};

    use crate::Error;

    /// Bytes per staging buffer (two per transfer in progress, on each side).
    const STAGING_CHUNK: usize = 256 * 1024;

    fn err(e: CudaError) -> Error {
        match e {
            CudaError::Invalid(m) => Error::InvalidRequest(m),
            other => Error::Transport(other.into()),
        }
    }

    pub(crate) fn status() -> super::CudaStatus {
        let (devices, unavailable) = match cuda() {
            Ok(c) => {
                let devices: Vec<_> = c
                    .devices()
                    .into_iter()
                    .map(|d| (d.ordinal, d.name, d.total_memory))
                    .collect();
                let none = devices
                    .is_empty()
                    .then(|| "the CUDA driver found no device".to_string());
                (devices, none)
            }
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        super::CudaStatus {
            compiled: true,
            devices,
            unavailable,
        }
    }

    /// The staging pool transports use for device memory, when a driver is present.
    pub(crate) fn staging() -> Option<Arc<dyn Staging>> {
        cuda()
            .ok()
            .map(|c| Arc::new(StagingPool::new(c, STAGING_CHUNK)) as Arc<dyn Staging>)
    }

    /// Allocates zeroed device memory as a region.
    pub(crate) fn allocate(len: usize, device: u32) -> Result<RegionMemory, Error> {
        let memory: DeviceMemory = cuda().and_then(|c| c.alloc(device, len)).map_err(err)?;
        let ptr =
            std::ptr::NonNull::new(memory.ptr()).ok_or(Error::Allocate { len, source: None })?;
        // SAFETY: `len` bytes of device memory at `ptr`, owned by `memory`, which moves
        // into the region and frees them when the last user lets go.
        Ok(
            unsafe {
                RegionMemory::from_raw(ptr, len, Location::Cuda { device }, Box::new(memory))
            },
        )
    }

    /// Where caller memory at `ptr` really is; `Auto` resolved, a wrong claim refused.
    pub(crate) fn resolve(ptr: *const u8, claimed: Location) -> Result<Location, Error> {
        match cuda() {
            Ok(c) => c.resolve(ptr, claimed).map_err(err),
            // Without a driver no device memory exists: only host memory is possible.
            Err(_) if matches!(claimed, Location::Auto | Location::Host { .. }) => {
                Ok(match claimed {
                    Location::Auto => Location::host(),
                    other => other,
                })
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Copies `len` bytes between two places of which at least one is device memory.
    ///
    /// # Safety
    /// As `ferry_mem_cuda::Cuda::copy`.
    pub(crate) unsafe fn copy(
        device: u32,
        dst: *mut u8,
        src: *const u8,
        len: usize,
    ) -> Result<(), Error> {
        let c = cuda().map_err(err)?;
        // SAFETY: forwarded.
        unsafe { c.copy(device, dst, src, len) }.map_err(err)
    }
    /// Runs `f` once the work enqueued on `stream` of `device` is done (see
    /// `ferry_mem_cuda::Cuda::launch_host_func`).
    pub(crate) fn after_stream(
        device: u32,
        stream: usize,
        f: Box<dyn FnOnce() + Send + 'static>,
    ) -> Result<(), Error> {
        cuda()
            .and_then(|c| c.launch_host_func(device, stream, f))
            .map_err(err)
    }
}

#[cfg(not(feature = "cuda"))]
mod without_cuda {
    use std::sync::Arc;

    use ferry_transport_api::{Location, RegionMemory, Staging};

    use crate::error::Error;
    use crate::features::Feature;

    fn missing(what: String) -> Error {
        Error::FeatureNotCompiled {
            what,
            feature: Feature::Cuda,
        }
    }

    pub(crate) fn status() -> super::CudaStatus {
        super::CudaStatus {
            compiled: false,
            devices: Vec::new(),
            unavailable: Some(
                "this build has no CUDA support (enable the `cuda` feature of ferry-engine)".into(),
            ),
        }
    }

    pub(crate) fn staging() -> Option<Arc<dyn Staging>> {
        None
    }

    pub(crate) fn allocate(_len: usize, device: u32) -> Result<RegionMemory, Error> {
        Err(missing(format!("device memory (cuda:{device})")))
    }

    pub(crate) fn resolve(_ptr: *const u8, claimed: Location) -> Result<Location, Error> {
        match claimed {
            Location::Host { .. } => Ok(claimed),
            Location::Auto => Err(missing(
                "telling device from host memory (Location::Auto)".into(),
            )),
            Location::Cuda { .. } => Err(missing(format!("device memory ({claimed})"))),
        }
    }

    /// Never reached: without CUDA no device region exists.
    ///
    /// # Safety
    /// None needed; nothing is touched.
    pub(crate) unsafe fn copy(
        device: u32,
        _dst: *mut u8,
        _src: *const u8,
        _len: usize,
    ) -> Result<(), Error> {
        Err(missing(format!("copying cuda:{device} memory")))
    }
    pub(crate) fn after_stream(
        device: u32,
        _stream: usize,
        _f: Box<dyn FnOnce() + Send + 'static>,
    ) -> Result<(), Error> {
        Err(missing(format!("work ordered on a cuda:{device} stream")))
    }
}
