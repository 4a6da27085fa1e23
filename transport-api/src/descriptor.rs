use serde::{Deserialize, Serialize};
use std::fmt;

use crate::{Access, Location, TransportError};

/// A transport protocol. The order of the variants is the priority order: when two peers
/// share several transports, the one listed first wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// ibverbs RC queue pairs (InfiniBand, RoCE).
    Rdma,
    /// libfabric RDM endpoints (AWS EFA).
    Efa,
    /// TCP, the universal fallback.
    Tcp,
}

impl Protocol {
    /// Every protocol ferry knows, in priority order.
    pub const ALL: [Protocol; 3] = [Protocol::Rdma, Protocol::Efa, Protocol::Tcp];

    /// The name used in configuration and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Rdma => "rdma",
            Protocol::Efa => "efa",
            Protocol::Tcp => "tcp",
        }
    }

    /// The Cargo feature of `ferry-engine` that compiles this protocol in.
    pub const fn feature(self) -> &'static str {
        self.name()
    }

    /// Parses a protocol name (case-insensitive). This is the one place names from
    /// configuration, environment and command line are turned into protocols.
    pub fn parse(name: &str) -> Result<Self, TransportError> {
        let lower = name.trim().to_ascii_lowercase();
        Protocol::ALL
            .into_iter()
            .find(|p| p.name() == lower)
            .ok_or_else(|| {
                TransportError::invalid(format!(
                    "unknown protocol `{name}`: expected one of tcp, efa, rdma"
                ))
            })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How peers reach one transport of a segment's owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The transport.
    pub protocol: Protocol,
    /// Transport-specific address: `host:port` for TCP, a hex fabric address for EFA.
    pub address: String,
}

/// A registered region's key for one transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportKey {
    /// The transport that issued the key.
    pub protocol: Protocol,
    /// The key, 64 bits (never truncated: EFA's provider keys use all of them).
    pub key: u64,
}

/// A remotely accessible buffer as published in its owner's descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferDescriptor {
    /// Name given at registration (may be empty).
    pub name: String,
    /// Start address in the owner's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where the memory lives on the owner.
    pub location: Location,
    /// What peers may do.
    pub access: Access,
    /// One key per transport the buffer is registered with.
    pub keys: Vec<TransportKey>,
}

impl BufferDescriptor {
    /// The key issued by `protocol`, if the buffer is registered with it.
    pub fn key(&self, protocol: Protocol) -> Option<u64> {
        self.keys
            .iter()
            .find(|k| k.protocol == protocol)
            .map(|k| k.key)
    }
}

/// What a segment's owner publishes: every endpoint it speaks and every buffer peers may
/// touch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentDescriptor {
    /// The segment's name (`host:port` with peer-to-peer metadata).
    pub name: String,
    /// A number that changes every time the owner starts, so a restarted peer's
    /// descriptor is told apart from a stale cached one.
    pub incarnation: u64,
    /// One endpoint per transport, in priority order.
    pub endpoints: Vec<Endpoint>,
    /// Remotely accessible buffers.
    pub buffers: Vec<BufferDescriptor>,
}

impl SegmentDescriptor {
    /// The endpoint for `protocol`, if the owner speaks it.
    pub fn endpoint(&self, protocol: Protocol) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.protocol == protocol)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::parse(p.name()).unwrap(), p);
        }
        let err = Protocol::parse("ucx").unwrap_err().to_string();
        assert!(err.contains("ucx") && err.contains("tcp"), "{err}");
        assert!(Protocol::Rdma < Protocol::Efa && Protocol::Efa < Protocol::Tcp);
    }

    #[test]
    fn descriptor_serializes() {
        let d = SegmentDescriptor {
            name: "127.0.0.1:1".into(),
            incarnation: 7,
            endpoints: vec![Endpoint {
                protocol: Protocol::Tcp,
                address: "127.0.0.1:1".into(),
            }],
            buffers: vec![BufferDescriptor {
                name: "kv".into(),
                addr: 0x1000,
                len: 4096,
                location: Location::host(),
                access: Access::RemoteRead,
                keys: vec![TransportKey {
                    protocol: Protocol::Tcp,
                    key: u64::MAX,
                }],
            }],
        };
        let text = serde_json::to_string(&d).unwrap();
        let back: SegmentDescriptor = serde_json::from_str(&text).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.buffers[0].key(Protocol::Tcp), Some(u64::MAX));
        assert_eq!(back.buffers[0].key(Protocol::Efa), None);
    }
}
