//! The engine builder: a typestate that only reaches `build()` with a TCP transport, so a
//! fabric engine always carries its fallback (contract 1), and the run-time path
//! ([`Engine::from_config`]) that goes through the same builder.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use ferry_transport_api::Transport;
use ferry_transport_tcp::{TcpConfig, TcpTransport};

use crate::control::NOTIFY_QUEUE_BYTES;
use crate::engine::Start;
use crate::metadata::{Metadata, StoreSettings};
use crate::{Engine, Result};

/// Builder state: no transport yet.
#[derive(Debug)]
pub struct NeedsTransport;
/// Builder state: a fabric transport without its TCP fallback.
#[derive(Debug)]
pub struct NeedsFallback;
/// Builder state: ready to build.
#[derive(Debug)]
pub struct Ready;

/// Builder states from which an engine can be built (only [`Ready`]).
#[diagnostic::on_unimplemented(
    message = "an engine in state `{Self}` cannot be built: it has no TCP transport",
    label = "`build()` needs the builder in state `Ready`",
    note = "add `.transport(Tcp::new(TcpConfig::default()))`, or for a fabric engine its fallback: `.fallback(Tcp::new(TcpConfig::default()))`"
)]
pub trait Buildable: sealed::Sealed {}
impl Buildable for Ready {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Ready {}
    impl Sealed for super::NeedsTransport {}
    impl Sealed for super::NeedsFallback {}
}

/// A transport to add to an engine, and the builder state it leads to from state `S`.
pub trait AddTransport<S>: sealed_add::Sealed {
    /// The state after adding this transport.
    type Next;
    #[doc(hidden)]
    fn add(self, parts: &mut Parts);
}

pub(crate) mod sealed_add {
    pub trait Sealed {}
    impl Sealed for super::Tcp {}
}

/// Makes a fabric transport once the engine's listen address is known.
pub(crate) type FabricFactory = Box<dyn FnOnce(&str) -> Arc<dyn Transport> + Send>;

#[doc(hidden)]
#[derive(Default)]
pub struct Parts {
    /// TCP's settings: the caller's once the builder reached `Ready` (the only state
    /// that builds), the default until then.
    tcp: TcpConfig,
    fabrics: Vec<FabricFactory>,
}

impl Parts {
    #[allow(dead_code)] // used by the fabric transports of backends.rs, when compiled in
    pub(crate) fn add_fabric(&mut self, factory: FabricFactory) {
        self.fabrics.push(factory);
    }
}

/// The TCP transport, as added to a builder.
#[derive(Clone, Debug, Default)]
pub struct Tcp {
    config: TcpConfig,
}

impl Tcp {
    /// TCP with `config`.
    pub fn new(config: TcpConfig) -> Self {
        Tcp { config }
    }
}

impl<S> AddTransport<S> for Tcp {
    type Next = Ready;
    fn add(self, parts: &mut Parts) {
        parts.tcp = self.config;
    }
}

/// Builds an [`Engine`]. States: [`NeedsTransport`] → ([`NeedsFallback`] →) [`Ready`].
#[must_use = "an engine builder does nothing until `build()`"]
pub struct EngineBuilder<S> {
    parts: Parts,
    listen: String,
    metadata: Metadata,
    name: Option<String>,
    store: StoreSettings,
    timeout: Duration,
    retry_over_tcp: bool,
    notify_queue_bytes: usize,
    _state: PhantomData<S>,
}

/// How long a metadata store keeps an entry after its last renewal, by default.
pub(crate) const METADATA_TTL: Duration = Duration::from_secs(10);
/// The first part of every metadata key, by default.
pub(crate) const METADATA_NAMESPACE: &str = "ferry";

impl Engine {
    /// Starts building an engine; add a transport next.
    pub fn builder() -> EngineBuilder<NeedsTransport> {
        EngineBuilder::new()
    }
}

impl EngineBuilder<NeedsTransport> {
    fn new() -> Self {
        EngineBuilder {
            parts: Parts::default(),
            listen: "127.0.0.1:0".into(),
            metadata: Metadata::P2p,
            name: None,
            store: StoreSettings {
                ttl: METADATA_TTL,
                namespace: METADATA_NAMESPACE.into(),
            },
            timeout: Duration::from_secs(30),
            retry_over_tcp: false,
            notify_queue_bytes: NOTIFY_QUEUE_BYTES,
            _state: PhantomData,
        }
    }
}

impl<S> EngineBuilder<S> {
    fn into_state<T>(self) -> EngineBuilder<T> {
        EngineBuilder {
            parts: self.parts,
            listen: self.listen,
            metadata: self.metadata,
            name: self.name,
            store: self.store,
            timeout: self.timeout,
            retry_over_tcp: self.retry_over_tcp,
            notify_queue_bytes: self.notify_queue_bytes,
            _state: PhantomData,
        }
    }

    /// Adds a transport. TCP leads to [`Ready`]; a fabric transport to
    /// [`NeedsFallback`] until TCP is added.
    pub fn transport<T: AddTransport<S>>(mut self, transport: T) -> EngineBuilder<T::Next> {
        transport.add(&mut self.parts);
        self.into_state()
    }

    /// The address of the engine's one port (handshake and TCP data), default
    /// `127.0.0.1:0` (any free port).
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = addr.into();
        self
    }

    /// How descriptors are found (default peer-to-peer).
    pub fn metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// The segment name peers open this engine by (`"prefill-0"`); with a metadata
    /// store, the key it is published under. Default: the `host:port` of its port.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// How long a metadata store keeps this engine's entry after its last renewal
    /// (renewed every third of it); a dead engine's entry goes within this time (stores
    /// with expiry). Default 10 s; a longer one than the clock can add (`Duration::MAX`)
    /// is taken as [`FOREVER`](ferry_transport_api::FOREVER).
    pub fn metadata_ttl(mut self, ttl: Duration) -> Self {
        self.store.ttl = ferry_transport_api::at_most_forever(ttl);
        self
    }

    /// The first part of every metadata key (`<namespace>/segments/<name>`), so clusters
    /// can share one store. Default `ferry`.
    pub fn metadata_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.store.namespace = namespace.into();
        self
    }

    /// Whether tasks that fail on a fabric (EFA) are retried once over the TCP fallback,
    /// within their deadline (default false; per batch with
    /// [`BatchBuilder::retry_over_tcp`](crate::BatchBuilder::retry_over_tcp)).
    pub fn retry_over_tcp(mut self, retry: bool) -> Self {
        self.retry_over_tcp = retry;
        self
    }

    /// Most bytes of notifications queued for the application (default 64 MiB, at most
    /// 65536 notifications either way). Once full, peers' notifications are refused as
    /// busy and counted ([`Engine::refused_notifications`]) until the application reads
    /// some.
    pub fn notification_queue_bytes(mut self, bytes: usize) -> Self {
        self.notify_queue_bytes = bytes;
        self
    }

    /// Default deadline of a batch or a notification, counted from its submission
    /// (default 30 s); a longer one than the clock can add (`Duration::MAX`) is taken as
    /// [`FOREVER`](ferry_transport_api::FOREVER).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = ferry_transport_api::at_most_forever(timeout);
        self
    }

    /// Starts the transports and the engine's port.
    pub fn build(self) -> Result<Engine>
    where
        S: Buildable,
    {
        // `Ready` is reached only by adding TCP, so `parts.tcp` is the caller's.
        let tcp = self.parts.tcp;
        let host = listen_host(&self.listen);
        let fabrics = self
            .parts
            .fabrics
            .into_iter()
            .map(|make| make(host))
            .collect();
        Engine::start(Start {
            tcp: TcpTransport::new(tcp),
            fabrics,
            listen: self.listen,
            timeout: self.timeout,
            retry_over_tcp: self.retry_over_tcp,
            notify_queue_bytes: self.notify_queue_bytes,
            metadata: self.metadata,
            name: self.name,
            store: self.store,
        })
    }
}

impl EngineBuilder<NeedsFallback> {
    /// Adds the TCP transport a fabric engine falls back to and talks to TCP-only peers
    /// with.
    pub fn fallback(mut self, tcp: Tcp) -> EngineBuilder<Ready> {
        self.parts.tcp = tcp.config;
        self.into_state()
    }
}

/// The host part of `host:port` (`[v6]:port` too).
fn listen_host(listen: &str) -> &str {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}
