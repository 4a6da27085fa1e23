//! The one place where Cargo features become code: which transports and memory kinds this
//! build contains. Everything else asks here.

use ferry_transport_api::{Location, Protocol};

use crate::Error;

/// Protocols compiled into this build, in priority order (best first).
pub fn compiled() -> &'static [Protocol] {
    &[Protocol::Tcp]
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
