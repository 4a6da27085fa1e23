//! The one place where Cargo features become code: which transports and memory kinds this
//! build contains. Everything else asks here.

use ferry_transport_api::Protocol;

use crate::builder::{EngineBuilder, NeedsTransport, Tcp};
use crate::{Engine, EngineConfig, Error};

/// Protocols compiled into this build, in priority order (best first).
pub fn compiled() -> &'static [Protocol] {
    if cfg!(feature = "efa") {
        &[Protocol::Efa, Protocol::Tcp]
    } else {
        &[Protocol::Tcp]
    }
}

/// The Cargo features of `ferry-engine` that errors and `ferry info` name. Only features
/// that exist are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Feature {
    /// `tcp`: the TCP transport, the fallback every engine has (on by default).
    Tcp,
    /// `efa`: the libfabric transport (AWS EFA).
    Efa,
    /// `cuda`: GPU device memory.
    Cuda,
}

impl Feature {
    /// The feature's name, as `--features` takes it.
    pub const fn name(self) -> &'static str {
        match self {
            Feature::Tcp => "tcp",
            Feature::Efa => "efa",
            Feature::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The Cargo feature of `ferry-engine` that compiles `protocol` in (named in errors and
/// `ferry info`); `None` for a protocol ferry does not implement yet (RDMA).
pub const fn protocol_feature(protocol: Protocol) -> Option<Feature> {
    match protocol {
        Protocol::Rdma => None,
        Protocol::Efa => Some(Feature::Efa),
        Protocol::Tcp => Some(Feature::Tcp),
    }
}

/// Why `protocol` is not in this build: its feature is off, or it is not implemented.
fn protocol_missing(protocol: Protocol) -> Error {
    let what = format!("protocol `{protocol}`");
    match protocol_feature(protocol) {
        Some(feature) => Error::FeatureNotCompiled { what, feature },
        None => Error::NotImplemented { what },
    }
}

/// A fabric device this build can use, as its library lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FabricDevice {
    /// The ferry protocol it serves.
    pub protocol: Protocol,
    /// The provider (libfabric: `efa`, `tcp;ofi_rxm`, `shm`, ...).
    pub provider: String,
    /// The device (domain) name.
    pub device: String,
}

/// Every fabric device the compiled-in fabric transports find on this host (empty when
/// none is compiled in).
pub fn fabric_devices() -> Vec<FabricDevice> {
    #[allow(unused_mut)]
    let mut out: Vec<FabricDevice> = Vec::new();
    #[cfg(feature = "efa")]
    out.extend(fabrics::efa_providers().into_iter().map(|p| FabricDevice {
        protocol: Protocol::Efa,
        provider: p.provider,
        device: p.domain,
    }));
    // libfabric lists a device once per address format and mode.
    let mut seen = std::collections::HashSet::new();
    out.retain(|d| seen.insert((d.protocol, d.provider.clone(), d.device.clone())));
    out
}

/// Builds an engine for a fabric protocol with its TCP fallback (`from_config`).
pub(crate) fn fabric_engine(
    protocol: Protocol,
    config: &EngineConfig,
    builder: EngineBuilder<NeedsTransport>,
    fallback: Tcp,
) -> Result<Engine, Error> {
    match protocol {
        #[cfg(feature = "efa")]
        Protocol::Efa => builder
            .transport(fabrics::Efa::new(config.efa.clone().unwrap_or_default()))
            .fallback(fallback)
            .build(),
        other => {
            let _ = (config, builder, fallback);
            Err(protocol_missing(other))
        }
    }
}

/// The fabric transports this build contains, as pieces for the engine builder.
pub mod fabrics {
    #[cfg(feature = "efa")]
    pub use efa::Efa;
    #[cfg(feature = "efa")]
    pub use ferry_transport_efa::{providers as efa_providers, EfaConfig, ProviderInfo};

    #[cfg(feature = "efa")]
    mod efa {
        use std::sync::Arc;

        use ferry_transport_efa::{EfaConfig, EfaTransport};

        use crate::builder::{
            sealed_add, AddTransport, NeedsFallback, NeedsTransport, Parts, Ready,
        };

        /// The libfabric transport (AWS EFA), as added to a builder. An engine with it
        /// builds only once a TCP fallback is added too.
        #[derive(Clone, Debug, Default)]
        pub struct Efa {
            config: EfaConfig,
        }

        impl Efa {
            /// libfabric with `config` (provider `efa` by default).
            pub fn new(config: EfaConfig) -> Self {
                Efa { config }
            }

            fn add_to(self, parts: &mut Parts) {
                parts.add_fabric(Box::new(move |host| {
                    // The settings the engine completes, before the transport exists.
                    let mut config = self.config;
                    if config.source.is_none() && config.ip_based() {
                        config.source = Some(host.to_string());
                    }
                    if cfg!(feature = "cuda") {
                        config.hmem = true;
                    }
                    Arc::new(EfaTransport::new(config))
                }));
            }
        }

        impl sealed_add::Sealed for Efa {}

        impl AddTransport<NeedsTransport> for Efa {
            type Next = NeedsFallback;
            fn add(self, parts: &mut Parts) {
                self.add_to(parts)
            }
        }

        impl AddTransport<NeedsFallback> for Efa {
            type Next = NeedsFallback;
            fn add(self, parts: &mut Parts) {
                self.add_to(parts)
            }
        }

        impl AddTransport<Ready> for Efa {
            type Next = Ready;
            fn add(self, parts: &mut Parts) {
                self.add_to(parts)
            }
        }
    }
}

/// Fails with the Cargo feature to enable when `protocol` is not compiled in.
pub(crate) fn require_protocol(protocol: Protocol) -> Result<(), Error> {
    if compiled().contains(&protocol) {
        Ok(())
    } else {
        Err(protocol_missing(protocol))
    }
}

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

/// Whether this build can use CUDA device memory, and what the driver reports.
pub fn cuda_status() -> CudaStatus {
    device::status()
}

/// Device memory support: mem-cuda with the `cuda` feature, errors naming it without.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub(crate) mod device {
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
}

/// Device memory support: mem-cuda with the `cuda` feature, errors naming it without.
#[cfg(not(feature = "cuda"))]
#[allow(unsafe_code)]
pub(crate) mod device {
    use std::sync::Arc;

    use ferry_transport_api::{Location, RegionMemory, Staging};

    use crate::{Error, Feature};

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
}
