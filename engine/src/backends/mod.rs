//! The one place where Cargo features become code: which transports and memory kinds this
//! build contains. Everything else asks here.

use ferry_transport_api::Protocol;

use crate::features::protocol_feature;
use crate::Error;

pub(crate) mod device;

pub use device::CudaStatus;

/// Runs `f` on a driver thread once all work enqueued on the CUDA stream `stream` (a
/// `CUstream`/`cudaStream_t` as an integer; 0: the default stream of device `device`)
/// before this call is done; work enqueued on the stream after it waits until `f`
/// returns. This orders a transfer after the kernels that produce its data (and before
/// those that consume it). `f` must not call CUDA: work that does (a transfer of device
/// memory over TCP stages through CUDA copies) runs on another thread while `f` waits.
/// Without the `cuda` feature, an error naming it; without a driver, the driver's error.
pub fn after_cuda_stream(
    device: u32,
    stream: usize,
    f: Box<dyn FnOnce() + Send + 'static>,
) -> Result<(), Error> {
    device::after_stream(device, stream, f)
}

/// Why `protocol` is not in this build: its feature is off, or it is not implemented.
pub(crate) fn protocol_missing(protocol: Protocol) -> Error {
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

/// What ferry finds of this host's RDMA devices: every device ibverbs lists (or why it
/// lists none), and the ports an RDMA engine with `config` would drive, with the reason
/// each other one is left out. `None` without the `rdma` feature.
#[cfg(feature = "rdma")]
pub fn rdma_devices(
    config: &fabrics::RdmaConfig,
) -> (fabrics::RdmaDiscovery, fabrics::RdmaSelection) {
    let found = ferry_transport_rdma::discover();
    let selection =
        ferry_transport_rdma::device::select(&found.devices, &config.devices, config.gid_index);
    (found, selection)
}

/// The fabric transports this build contains, as pieces for the engine builder.
pub mod fabrics {
    #[cfg(feature = "efa")]
    pub use efa::Efa;
    #[cfg(feature = "efa")]
    pub use ferry_transport_efa::{providers as efa_providers, EfaConfig, ProviderInfo};
    #[cfg(feature = "rdma")]
    pub use ferry_transport_rdma::{
        device::{DeviceInfo as RdmaDeviceInfo, Nic as RdmaPort, Selection as RdmaSelection},
        devices_under_test as rdma_devices_under_test,
        gid::gid_text,
        Discovery as RdmaDiscovery, RdmaConfig,
    };
    #[cfg(feature = "rdma")]
    pub use rdma::Rdma;

    /// Adds the builder's typestate moves of a fabric piece: a fabric may come first or
    /// after another, and leaves the builder needing its TCP fallback (or `Ready` when
    /// the fallback is there already).
    #[cfg(any(feature = "efa", feature = "rdma"))]
    macro_rules! fabric_piece {
        ($piece:ty) => {
            impl sealed_add::Sealed for $piece {}

            impl AddTransport<NeedsTransport> for $piece {
                type Next = NeedsFallback;
                fn add(self, parts: &mut Parts) {
                    self.add_to(parts)
                }
            }

            impl AddTransport<NeedsFallback> for $piece {
                type Next = NeedsFallback;
                fn add(self, parts: &mut Parts) {
                    self.add_to(parts)
                }
            }

            impl AddTransport<Ready> for $piece {
                type Next = Ready;
                fn add(self, parts: &mut Parts) {
                    self.add_to(parts)
                }
            }
        };
    }

    #[cfg(feature = "rdma")]
    mod rdma {
        use std::sync::Arc;

        use ferry_transport_rdma::{RdmaConfig, RdmaTransport};

        use crate::builder::{
            sealed_add, AddTransport, NeedsFallback, NeedsTransport, Parts, Ready,
        };

        /// The ibverbs transport (InfiniBand, RoCE), as added to a builder. An engine with
        /// it builds only once a TCP fallback is added too.
        #[derive(Clone, Debug, Default)]
        pub struct Rdma {
            config: RdmaConfig,
        }

        impl Rdma {
            /// ibverbs with `config` (every usable port by default).
            pub fn new(config: RdmaConfig) -> Self {
                Rdma { config }
            }

            fn add_to(self, parts: &mut Parts) {
                parts.add_fabric(Box::new(move |_host| {
                    Arc::new(RdmaTransport::new(self.config))
                }));
            }
        }

        fabric_piece!(Rdma);
    }

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

        fabric_piece!(Efa);
    }
}

/// Fails with the Cargo feature to enable when `protocol` is not compiled in.
pub(crate) fn require_protocol(protocol: Protocol) -> Result<(), Error> {
    if crate::features::compiled().contains(&protocol) {
        Ok(())
    } else {
        Err(protocol_missing(protocol))
    }
}

/// Whether this build can use CUDA device memory, and what the driver reports.
pub fn cuda_status() -> CudaStatus {
    device::status()
}
