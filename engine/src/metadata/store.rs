//! The seam every metadata store implements, and what the engine hands a store.

use crate::control::OwnSegment;
use crate::{Result, SegmentError};

/// A peer's descriptor as a store found it.
pub(crate) struct Fetched {
    /// The descriptor, encoded (checked by the engine before use).
    pub(crate) body: Vec<u8>,
    /// Where the peer's TCP lanes go when the store knows better than the descriptor:
    /// peer-to-peer, the address the descriptor came from (a descriptor could name any
    /// address). `None`: the descriptor's TCP endpoint.
    pub(crate) tcp_address: Option<String>,
}

/// How a store keeps this engine's entry.
#[derive(Clone, Debug)]
pub(crate) struct StoreSettings {
    /// How long an entry outlives its last renewal (stores with expiry); the renewal
    /// period is a third of it.
    pub(crate) ttl: std::time::Duration,
    /// The first part of every key: `<namespace>/segments/<name>`, so clusters can share a
    /// server.
    pub(crate) namespace: String,
}

/// Where segment descriptors live.
///
/// Calls come from any thread; none is made under an engine lock. `publish` runs before
/// a registration returns, so peers told about a buffer find it; it must not wait long
/// on an unreachable server (a store leaves what failed to a background retry).
pub(crate) trait MetadataStore: Send + Sync {
    /// What the store is, for logs and errors (`p2p`, `redis://...`).
    fn describe(&self) -> String;

    /// The engine starts as `own`: claim its name (refused when a live other engine holds
    /// it) and publish its descriptor. An error here stops the engine's start.
    fn start(&self, own: &OwnSegment) -> Result<()> {
        self.publish(own);
        Ok(())
    }

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
