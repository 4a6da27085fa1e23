//! The one place where Cargo features become code: which transports and memory kinds this
//! build contains. Everything else asks here.

use ferry_transport_api::{Location, Protocol};

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
            .transport(fabrics::Efa::new(fabrics::EfaConfig {
                provider: config.provider.clone(),
                devices: config.fabric_devices.clone(),
                max_slice: config.max_slice,
                ..fabrics::EfaConfig::default()
            }))
            .fallback(fallback)
            .build(),
        other => {
            let _ = (config, builder, fallback);
            Err(Error::FeatureNotCompiled {
                what: format!("protocol `{other}`"),
                feature: other.feature(),
            })
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
                    let mut t = EfaTransport::new(self.config);
                    t.set_default_source(host);
                    Arc::new(t)
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

/// Whether device memory can be registered in this build.
pub(crate) const CUDA: bool = false;

/// Fails with the Cargo feature to enable when `protocol` is not compiled in.
pub(crate) fn require_protocol(protocol: Protocol) -> Result<(), Error> {
    if compiled().contains(&protocol) {
        Ok(())
    } else {
        Err(Error::FeatureNotCompiled {
            what: format!("protocol `{protocol}`"),
            feature: protocol.feature(),
        })
    }
}

/// Fails with the Cargo feature to enable when memory at `location` cannot be registered
/// in this build.
pub(crate) fn require_location(location: Location) -> Result<(), Error> {
    match location {
        Location::Host { .. } => Ok(()),
        Location::Cuda { .. } if CUDA => Ok(()),
        Location::Cuda { .. } => Err(Error::FeatureNotCompiled {
            what: format!("device memory ({location}) needs CUDA support, which"),
            feature: "cuda",
        }),
    }
}
