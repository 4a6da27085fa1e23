use serde::{Deserialize, Serialize};
use std::fmt;

use crate::TransportError;

/// Where a registered region lives. Recorded at registration and never guessed later, so
/// a transport knows whether it may hand the memory to a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Location {
    /// Host memory, optionally on a known NUMA node.
    Host {
        /// NUMA node the pages were placed on, when known.
        numa: Option<u16>,
    },
    /// Memory of a CUDA device.
    Cuda {
        /// CUDA device ordinal.
        device: u32,
    },
    /// Only when registering caller memory: let the engine find out from the pointer
    /// (CUDA pointer attributes; needs the `cuda` feature). A registered region always
    /// has a real location.
    Auto,
}

impl Location {
    /// Host memory on no particular NUMA node.
    pub const fn host() -> Self {
        Location::Host { numa: None }
    }

    /// Whether the CPU can address this memory directly (sockets may touch it).
    pub const fn is_host(&self) -> bool {
        matches!(self, Location::Host { .. })
    }

    /// Parses `cpu`, `cpu:NUMA`, `host`, `cuda:N` (and `cuda` for device 0), `auto`.
    pub fn parse(text: &str) -> Result<Self, TransportError> {
        let text = text.trim().to_ascii_lowercase();
        let (kind, index) = match text.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None => (text.as_str(), None),
        };
        let number = |i: &str| {
            i.parse::<u32>().map_err(|_| {
                TransportError::invalid(format!(
                    "location `{text}`: `{i}` is not a number (expected cpu, cpu:NUMA or cuda:N)"
                ))
            })
        };
        match kind {
            "cpu" | "host" => Ok(Location::Host {
                numa: index
                    .map(|i| number(i).map(|n| n.min(u16::MAX as u32) as u16))
                    .transpose()?,
            }),
            "cuda" | "gpu" => Ok(Location::Cuda {
                device: index.map(number).transpose()?.unwrap_or(0),
            }),
            "auto" if index.is_none() => Ok(Location::Auto),
            _ => Err(TransportError::invalid(format!(
                "unknown location `{text}` (expected cpu, cpu:NUMA or cuda:N)"
            ))),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Host { numa: None } => f.write_str("cpu"),
            Location::Host { numa: Some(n) } => write!(f, "cpu:{n}"),
            Location::Cuda { device } => write!(f, "cuda:{device}"),
            Location::Auto => f.write_str("auto"),
        }
    }
}

/// What peers may do with a registered region. Local use (as the source or destination
/// of this engine's own requests) is always allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Peers may neither read nor write it; it is not published.
    Local,
    /// Peers may read it.
    RemoteRead,
    /// Peers may read and write it.
    #[default]
    RemoteReadWrite,
}

impl Access {
    /// Whether a peer may read the region.
    pub const fn remote_read(self) -> bool {
        matches!(self, Access::RemoteRead | Access::RemoteReadWrite)
    }

    /// Whether a peer may write the region.
    pub const fn remote_write(self) -> bool {
        matches!(self, Access::RemoteReadWrite)
    }

    /// Whether a peer may do `op` on the region (contract 5's access check, the one
    /// every target and the engine's own copy path apply).
    pub const fn allows(self, op: crate::Opcode) -> bool {
        match op {
            crate::Opcode::Read => self.remote_read(),
            crate::Opcode::Write => self.remote_write(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(Location::parse("cpu").unwrap(), Location::host());
        assert_eq!(
            Location::parse("cpu:1").unwrap(),
            Location::Host { numa: Some(1) }
        );
        assert_eq!(
            Location::parse("cuda:3").unwrap(),
            Location::Cuda { device: 3 }
        );
        assert_eq!(
            Location::parse("cuda").unwrap(),
            Location::Cuda { device: 0 }
        );
        assert!(Location::parse("tpu:0").is_err());
        assert!(Location::parse("cuda:x").is_err());
        assert_eq!(Location::Cuda { device: 2 }.to_string(), "cuda:2");
    }

    #[test]
    fn access_rights() {
        assert!(!Access::Local.remote_read());
        assert!(Access::RemoteRead.remote_read() && !Access::RemoteRead.remote_write());
        assert!(Access::RemoteReadWrite.remote_write());
    }
}
