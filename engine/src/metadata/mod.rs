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
use crate::features::Feature;
use crate::{Error, Result, SegmentError};

mod store;

pub(crate) use store::{Fetched, MetadataStore, StoreSettings};

#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "http")]
mod http;
#[cfg(any(feature = "http", feature = "redis", feature = "etcd"))]
mod leased;
#[cfg(feature = "redis")]
mod redis_store;

/// How peers find each other's descriptors: which metadata store the engine runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Metadata {
    /// Fetched from the peer's own port; segment names are `host:port`.
    #[default]
    P2p,
    /// An HTTP key-value server speaking Mooncake's HTTP metadata protocol
    /// (`GET`/`PUT`/`DELETE <url>?key=<key>`); feature `http`.
    Http {
        /// The server's URL, `http://host:port/path`.
        url: String,
    },
    /// A Redis server, descriptors as keys with an expiry; feature `redis`.
    Redis {
        /// `redis://host:port[/db]`.
        url: String,
    },
    /// An etcd cluster, descriptors as keys held by a lease; feature `etcd`.
    Etcd {
        /// `host:port` of each member, tried in order.
        endpoints: Vec<String>,
    },
}

impl Metadata {
    /// Parses `p2p` (or Mooncake's `P2PHANDSHAKE`), `http://host:port/path` (feature
    /// `http`), `redis://host:port` (feature `redis`), or `etcd://host:port[,host:port]`
    /// and a bare `host:port[,...]` (etcd, as Mooncake reads it; feature `etcd`).
    pub fn parse(text: &str) -> Result<Metadata> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("p2p") || t.eq_ignore_ascii_case("P2PHANDSHAKE") || t.is_empty() {
            return Ok(Metadata::P2p);
        }
        let missing = |what: &str, feature| Error::FeatureNotCompiled {
            what: what.to_string(),
            feature,
        };
        match t.split_once("://").map(|(s, _)| s.to_ascii_lowercase()) {
            Some(s) if s == "http" => {
                if cfg!(feature = "http") {
                    Ok(Metadata::Http { url: t.to_string() })
                } else {
                    Err(missing("the HTTP metadata store", Feature::Http))
                }
            }
            Some(s) if s == "redis" => {
                if cfg!(feature = "redis") {
                    Ok(Metadata::Redis { url: t.to_string() })
                } else {
                    Err(missing("the Redis metadata store", Feature::Redis))
                }
            }
            Some(s) if s == "etcd" => etcd(t.split_once("://").map_or("", |(_, r)| r)),
            // A bare `host:port[,host:port]` names etcd, as Mooncake reads it.
            None if t.contains(':') => etcd(t),
            _ => Err(Error::Config(format!(
                "unknown metadata store `{t}` (expected p2p, http://host:port/path, redis://host:port or etcd://host:port)"
            ))),
        }
    }
}

/// The metadata stores this build contains, as `ferry info` lists them, each with the
/// Cargo feature it needs (`None`: always there).
pub fn metadata_stores() -> Vec<(&'static str, Option<Feature>, bool)> {
    vec![
        ("p2p", None, true),
        ("http", Some(Feature::Http), cfg!(feature = "http")),
        ("redis", Some(Feature::Redis), cfg!(feature = "redis")),
        ("etcd", Some(Feature::Etcd), cfg!(feature = "etcd")),
    ]
}

impl Metadata {
    /// Asks the store's server once (a read of a key nobody writes): `Ok` when it
    /// answers, the error naming the store otherwise. Peer-to-peer has no server: `Ok`.
    pub fn check(&self) -> Result<()> {
        let backend: Option<Box<dyn leased_backend::Probe>> = match self {
            Metadata::P2p => None,
            #[cfg(feature = "http")]
            Metadata::Http { url } => Some(Box::new(http::Http::new(url))),
            #[cfg(feature = "redis")]
            Metadata::Redis { url } => Some(Box::new(redis_store::Redis::new(url)?)),
            #[cfg(feature = "etcd")]
            Metadata::Etcd { endpoints } => Some(Box::new(etcd::Etcd::new(endpoints))),
            #[allow(unreachable_patterns)]
            other => return Err(Error::Config(format!("{other:?} is not in this build"))),
        };
        let Some(backend) = backend else {
            return Ok(());
        };
        backend.probe().map_err(|message| Error::MetadataStore {
            store: backend.name(),
            message,
        })
    }
}

/// What `Metadata::check` needs of a store's client.
mod leased_backend {
    /// A store's client that can be asked once.
    pub(super) trait Probe {
        fn name(&self) -> String;
        fn probe(&self) -> Result<(), String>;
    }

    #[cfg(any(feature = "http", feature = "redis", feature = "etcd"))]
    impl<B: super::leased::Backend> Probe for B {
        fn name(&self) -> String {
            self.describe()
        }

        fn probe(&self) -> Result<(), String> {
            self.get("ferry/health-probe").map(|_| ())
        }
    }
}

/// `host:port[,host:port]` as etcd endpoints, when the feature is in.
fn etcd(list: &str) -> Result<Metadata> {
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect();
    if endpoints.is_empty() {
        return Err(Error::Config("an etcd store needs host:port".into()));
    }
    if cfg!(feature = "etcd") {
        Ok(Metadata::Etcd { endpoints })
    } else {
        Err(Error::FeatureNotCompiled {
            what: "the etcd metadata store".into(),
            feature: Feature::Etcd,
        })
    }
}

/// The store `metadata` names.
pub(crate) fn open(
    metadata: &Metadata,
    tcp: Arc<TcpTransport>,
    settings: &StoreSettings,
) -> Result<Arc<dyn MetadataStore>> {
    let _ = settings;
    Ok(match metadata {
        Metadata::P2p => Arc::new(P2p::new(tcp)),
        #[cfg(feature = "http")]
        Metadata::Http { url } => Arc::new(leased::Leased::new(
            Box::new(http::Http::new(url)),
            tcp,
            settings.clone(),
        )),
        #[cfg(feature = "redis")]
        Metadata::Redis { url } => Arc::new(leased::Leased::new(
            Box::new(redis_store::Redis::new(url)?),
            tcp,
            settings.clone(),
        )),
        #[cfg(feature = "etcd")]
        Metadata::Etcd { endpoints } => Arc::new(leased::Leased::new(
            Box::new(etcd::Etcd::new(endpoints)),
            tcp,
            settings.clone(),
        )),
        #[allow(unreachable_patterns)]
        other => return Err(Error::Config(format!("{other:?} is not in this build"))),
    })
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
