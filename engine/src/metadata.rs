//! Naming: how a segment name becomes a peer's descriptor, and how this engine's own
//! descriptor reaches those who look for it. A [`MetadataStore`] is the seam, in the
//! style of `Staging`: the engine publishes on every change, fetches by name, withdraws
//! on shutdown, and never learns how the store does it. Peer-to-peer ([`P2p`], the
//! default) is the first store; etcd, Redis and HTTP stores are further implementations.
//!
//! A store hands back the descriptor's bytes; the engine parses and checks them (one
//! parser, one validation, whatever the store), so a store is trusted with availability,
//! never with memory safety.

use std::net::SocketAddr;
use std::sync::Arc;

use ferry_transport_tcp::TcpTransport;

use crate::control::OwnSegment;
use crate::{Error, Result, SegmentError};

/// How peers find each other's descriptors: which metadata store the engine runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Metadata {
    /// Fetched from the peer's own port; segment names are `host:port`.
    #[default]
    P2p,
}

impl Metadata {
    /// Parses `p2p`; `etcd://...` and `redis://...` are not implemented yet.
    pub fn parse(text: &str) -> Result<Metadata> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("p2p") || t.is_empty() {
            return Ok(Metadata::P2p);
        }
        let scheme = t.split("://").next().unwrap_or(t).to_ascii_lowercase();
        match scheme.as_str() {
            "etcd" | "redis" => Err(Error::NotImplemented {
                what: format!("the `{scheme}` metadata backend"),
            }),
            _ => Err(Error::Config(format!(
                "unknown metadata backend `{t}` (expected p2p)"
            ))),
        }
    }
}

/// A peer's descriptor as a store found it.
pub(crate) struct Fetched {
    /// The descriptor, encoded (checked by the engine before use).
    pub(crate) body: Vec<u8>,
    /// Where the peer's TCP lanes go when the store knows better than the descriptor:
    /// peer-to-peer, the address the descriptor came from (a descriptor could name any
    /// address). `None`: the descriptor's TCP endpoint.
    pub(crate) tcp_address: Option<String>,
}

/// Where segment descriptors live.
///
/// Calls come from any thread; none is made under an engine lock. `publish` must not
/// block on the network for long (a store that talks to a server queues the change and
/// retries it in the background): registration waits for it.
pub(crate) trait MetadataStore: Send + Sync {
    /// What the store is, for logs and errors (`p2p`, `etcd://...`).
    fn describe(&self) -> String;

    /// This engine's segment changed (it started, or a published buffer was registered
    /// or deregistered): from now on `fetch(own.name())` must return `own`'s descriptor.
    fn publish(&self, own: &OwnSegment);

    /// The descriptor of the segment named `name`.
    fn fetch(&self, name: &str) -> Result<Fetched, SegmentError>;

    /// This engine is going away: its descriptor should no longer be found.
    fn withdraw(&self, own: &OwnSegment);

    /// Whether `name` reaches this engine by another name than its own (peer-to-peer:
    /// the address its port is bound to). Decided from what the engine knows of itself,
    /// never from anything a peer sends.
    fn names_self(&self, _name: &str) -> bool {
        false
    }
}

/// Peer-to-peer metadata: a segment's name is its engine's `host:port`, and its
/// descriptor is fetched from that port. Nothing to run; publishing is a no-op because
/// the port serves the live descriptor on every request.
pub(crate) struct P2p {
    tcp: Arc<TcpTransport>,
}

impl P2p {
    pub(crate) fn new(tcp: Arc<TcpTransport>) -> Self {
        P2p { tcp }
    }
}

impl MetadataStore for P2p {
    fn describe(&self) -> String {
        "p2p".into()
    }

    fn publish(&self, _own: &OwnSegment) {}

    fn fetch(&self, name: &str) -> Result<Fetched, SegmentError> {
        let body = self
            .tcp
            .fetch_descriptor(name)
            .map_err(SegmentError::Fetch)?;
        Ok(Fetched {
            body,
            // Contract: the lanes go where the descriptor came from. The advertised
            // address could send them (and the data) anywhere.
            tcp_address: Some(name.to_string()),
        })
    }

    fn withdraw(&self, _own: &OwnSegment) {}

    fn names_self(&self, name: &str) -> bool {
        let (Some(bound), Ok(asked)) = (self.tcp.local_addr(), name.parse::<SocketAddr>()) else {
            return false;
        };
        asked.port() == bound.port()
            && (asked.ip() == bound.ip()
                || (bound.ip().is_unspecified() && asked.ip().is_loopback()))
    }
}
