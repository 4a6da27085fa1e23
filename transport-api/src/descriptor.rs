use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

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

/// A registered region's key for one transport, on one rail.
///
/// A transport that drives several devices (rails) issues one key per rail; they are
/// published as several entries with the same protocol, rail 0 first.
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
    /// The keys of every transport the buffer is registered with: one per transport
    /// and rail, a transport's rails in order.
    pub keys: Vec<TransportKey>,
}

impl BufferDescriptor {
    /// The key issued by `protocol` (its rail 0), if the buffer is registered with it.
    pub fn key(&self, protocol: Protocol) -> Option<u64> {
        self.keys
            .iter()
            .find(|k| k.protocol == protocol)
            .map(|k| k.key)
    }

    /// Every rail's key issued by `protocol`, if the buffer is registered with it.
    pub fn keys_of(&self, protocol: Protocol) -> Option<RemoteKeys> {
        let keys: Vec<u64> = self
            .keys
            .iter()
            .filter(|k| k.protocol == protocol)
            .map(|k| k.key)
            .collect();
        RemoteKeys::new(keys)
    }
}

/// A remote region's keys for one transport, one per rail of its owner, rail 0 first.
/// Never empty; cloning shares them (no allocation), so a slice can carry them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteKeys(Arc<[u64]>);

impl RemoteKeys {
    /// The keys, rail 0 first; `None` when there are none.
    pub fn new(keys: impl Into<Arc<[u64]>>) -> Option<Self> {
        let keys = keys.into();
        (!keys.is_empty()).then_some(RemoteKeys(keys))
    }

    /// A single key (a transport with one rail).
    pub fn single(key: u64) -> Self {
        RemoteKeys(Arc::new([key]))
    }

    /// Rail 0's key: the only one of a single-rail transport such as TCP.
    pub fn first(&self) -> u64 {
        self.0[0]
    }

    /// The key for `rail`, if the owner has that many rails.
    pub fn rail(&self, rail: usize) -> Option<u64> {
        self.0.get(rail).copied()
    }

    /// How many rails the owner registered the region on.
    pub fn rails(&self) -> usize {
        self.0.len()
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
    /// The largest encoded descriptor a peer accepts (and a target serves). An owner
    /// refuses to publish a buffer that would take its descriptor past it.
    pub const MAX_ENCODED_LEN: usize = 16 * 1024 * 1024;

    /// Most keys one buffer may carry for one protocol (one per rail).
    pub const MAX_RAILS: usize = 64;

    /// The endpoint for `protocol`, if the owner speaks it.
    pub fn endpoint(&self, protocol: Protocol) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.protocol == protocol)
    }

    /// Checks a descriptor received from a peer before anything is taken from it: every
    /// buffer's range fits in 64 bits (`addr + len` does not overflow, so no offset into
    /// it can wrap), each protocol has at most one endpoint and TCP has one, and every
    /// buffer's keys belong to a protocol the owner has an endpoint for, with at most
    /// [`MAX_RAILS`](Self::MAX_RAILS) rails per protocol and one TCP key. The error says
    /// what is wrong; the caller names the peer.
    pub fn validate(&self) -> Result<(), TransportError> {
        let bad = |what: String| Err(TransportError::invalid(what));
        for (i, e) in self.endpoints.iter().enumerate() {
            if self.endpoints[..i].iter().any(|o| o.protocol == e.protocol) {
                return bad(format!("it lists two {} endpoints", e.protocol));
            }
            // A fabric endpoint lists one address per rail, comma-separated.
            if e.address.split(',').count() > Self::MAX_RAILS {
                return bad(format!(
                    "its {} endpoint lists more than {} rails",
                    e.protocol,
                    Self::MAX_RAILS
                ));
            }
        }
        if self.endpoint(Protocol::Tcp).is_none() {
            return bad("it lists no TCP endpoint".into());
        }
        for (i, b) in self.buffers.iter().enumerate() {
            if b.addr.checked_add(b.len).is_none() || b.len > i64::MAX as u64 {
                return bad(format!(
                    "buffer {i} at {:#x} with {} bytes runs past the end of the address space",
                    b.addr, b.len
                ));
            }
            if b.location == Location::Auto {
                return bad(format!(
                    "buffer {i} has no concrete location (auto); expected host or cuda:N"
                ));
            }
            for p in Protocol::ALL {
                let rails = b.keys.iter().filter(|k| k.protocol == p).count();
                if rails == 0 {
                    continue;
                }
                if self.endpoint(p).is_none() {
                    return bad(format!(
                        "buffer {i} carries {p} keys but the descriptor lists no {p} endpoint"
                    ));
                }
                let most = if p == Protocol::Tcp {
                    1
                } else {
                    Self::MAX_RAILS
                };
                if rails > most {
                    return bad(format!(
                        "buffer {i} carries {rails} {p} keys; at most {most} are possible"
                    ));
                }
            }
        }
        Ok(())
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
        assert_eq!(back.buffers[0].keys_of(Protocol::Efa), None);
    }

    fn peer(buffers: Vec<BufferDescriptor>) -> SegmentDescriptor {
        SegmentDescriptor {
            name: "127.0.0.1:1".into(),
            incarnation: 1,
            endpoints: vec![Endpoint {
                protocol: Protocol::Tcp,
                address: "127.0.0.1:1".into(),
            }],
            buffers,
        }
    }

    fn buffer(addr: u64, len: u64, keys: &[(Protocol, u64)]) -> BufferDescriptor {
        BufferDescriptor {
            name: String::new(),
            addr,
            len,
            location: Location::host(),
            access: Access::RemoteReadWrite,
            keys: keys
                .iter()
                .map(|&(protocol, key)| TransportKey { protocol, key })
                .collect(),
        }
    }

    #[test]
    fn hostile_descriptors_are_refused() {
        let tcp = [(Protocol::Tcp, 7)];
        let ok = peer(vec![
            buffer(0x1000, 4096, &tcp),
            buffer(u64::MAX - 4096, 4096, &tcp),
        ]);
        ok.validate().unwrap();
        // 2^64 - 4096 + 4096 wraps to 0.
        let wraps = peer(vec![buffer(u64::MAX - 4095, 4096, &tcp)]);
        let err = wraps.validate().unwrap_err().to_string();
        assert!(
            err.contains("buffer 0") && err.contains("address space"),
            "{err}"
        );
        let huge = peer(vec![buffer(0, u64::MAX, &tcp)]);
        assert!(huge.validate().is_err());
        let mut auto = buffer(0x1000, 1, &tcp);
        auto.location = Location::Auto;
        assert!(peer(vec![auto]).validate().is_err());
        let two_tcp = peer(vec![buffer(
            0x1000,
            1,
            &[(Protocol::Tcp, 1), (Protocol::Tcp, 2)],
        )]);
        assert!(two_tcp
            .validate()
            .unwrap_err()
            .to_string()
            .contains("2 tcp keys"));
        let no_efa_endpoint = peer(vec![buffer(0x1000, 1, &[(Protocol::Efa, 1)])]);
        assert!(no_efa_endpoint
            .validate()
            .unwrap_err()
            .to_string()
            .contains("no efa endpoint"));
        let rails: Vec<_> = (0..=SegmentDescriptor::MAX_RAILS as u64)
            .map(|k| (Protocol::Efa, k))
            .collect();
        let mut many_rails = peer(vec![buffer(0x1000, 1, &rails)]);
        many_rails.endpoints.push(Endpoint {
            protocol: Protocol::Efa,
            address: "00".into(),
        });
        assert!(many_rails.validate().is_err());
        let mut many_addresses = peer(Vec::new());
        many_addresses.endpoints.push(Endpoint {
            protocol: Protocol::Efa,
            address: vec!["00"; SegmentDescriptor::MAX_RAILS + 1].join(","),
        });
        assert!(many_addresses
            .validate()
            .unwrap_err()
            .to_string()
            .contains("more than 64 rails"));
        let mut no_tcp = peer(Vec::new());
        no_tcp.endpoints.clear();
        assert!(no_tcp.validate().is_err());
        let mut twice = peer(Vec::new());
        twice.endpoints.push(twice.endpoints[0].clone());
        assert!(twice.validate().is_err());
    }

    #[test]
    fn rail_keys_keep_their_order() {
        let b = BufferDescriptor {
            name: String::new(),
            addr: 0,
            len: 1,
            location: Location::host(),
            access: Access::RemoteReadWrite,
            keys: [(Protocol::Tcp, 9), (Protocol::Efa, 1), (Protocol::Efa, 2)]
                .into_iter()
                .map(|(protocol, key)| TransportKey { protocol, key })
                .collect(),
        };
        let efa = b.keys_of(Protocol::Efa).unwrap();
        assert_eq!(
            (efa.rails(), efa.first(), efa.rail(1), efa.rail(2)),
            (2, 1, Some(2), None)
        );
        assert_eq!(b.keys_of(Protocol::Tcp).unwrap().first(), 9);
        assert_eq!(b.key(Protocol::Efa), Some(1));
        assert!(RemoteKeys::new(Vec::new()).is_none());
    }
}
