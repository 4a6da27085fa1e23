//! The engine builder: a typestate that only reaches `build()` with a TCP transport, so a
//! fabric engine always carries its fallback (contract 1), and the run-time path
//! ([`Engine::from_config`]) that goes through the same builder.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use ferry_transport_api::{Protocol, Transport};
use ferry_transport_tcp::{TcpConfig, TcpTransport};
use serde::{Deserialize, Serialize};

use crate::{backends, Engine, Error, Result};

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
    tcp: Option<TcpConfig>,
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
        parts.tcp = Some(self.config);
    }
}

/// How peers find each other's descriptors.
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

/// Builds an [`Engine`]. States: [`NeedsTransport`] → ([`NeedsFallback`] →) [`Ready`].
#[must_use = "an engine builder does nothing until `build()`"]
pub struct EngineBuilder<S> {
    parts: Parts,
    listen: String,
    metadata: Metadata,
    timeout: Duration,
    retry_over_tcp: bool,
    notify_queue_bytes: usize,
    _state: PhantomData<S>,
}

impl EngineBuilder<NeedsTransport> {
    pub(crate) fn new() -> Self {
        EngineBuilder {
            parts: Parts::default(),
            listen: "127.0.0.1:0".into(),
            metadata: Metadata::P2p,
            timeout: Duration::from_secs(30),
            retry_over_tcp: false,
            notify_queue_bytes: crate::engine::NOTIFY_QUEUE_BYTES,
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

    /// Default deadline of a batch, counted from its submission (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts the transports and the engine's port.
    pub fn build(self) -> Result<Engine>
    where
        S: Buildable,
    {
        let Metadata::P2p = self.metadata;
        let tcp = self.parts.tcp.ok_or_else(|| {
            Error::Config("no TCP transport (the builder's state says otherwise)".into())
        })?;
        let host = listen_host(&self.listen);
        let fabrics = self
            .parts
            .fabrics
            .into_iter()
            .map(|make| make(host))
            .collect();
        Engine::start(
            TcpTransport::new(tcp),
            fabrics,
            &self.listen,
            self.timeout,
            self.retry_over_tcp,
            self.notify_queue_bytes,
        )
    }
}

impl EngineBuilder<NeedsFallback> {
    /// Adds the TCP transport a fabric engine falls back to and talks to TCP-only peers
    /// with.
    pub fn fallback(mut self, tcp: Tcp) -> EngineBuilder<Ready> {
        self.parts.tcp = Some(tcp.config);
        self.into_state()
    }
}

/// The host part of `host:port` (`[v6]:port` too).
fn listen_host(listen: &str) -> &str {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Engine settings read at run time (from a file, the environment, a command line).
///
/// `serde` with defaults for every field, so a partial document works: `{"protocol":
/// "efa", "tcp": {"lanes": 4}}`. Engine-wide settings are flat; each transport's own
/// settings nest under its name (`tcp`, and `efa` in builds with the `efa` feature).
/// Durations are integers whose field names carry the unit (`timeout_ms`,
/// `busy_poll_us`). Secrets deserialize from a string and are never serialized.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// `tcp` or `efa` (`rdma` is not implemented yet); honoured exactly. A fabric
    /// protocol brings TCP as its fallback.
    pub protocol: String,
    /// The engine's one port.
    pub listen: String,
    /// The `host:port` peers are told to reach (needed behind NAT, or when listening on
    /// `0.0.0.0`; peers that reached the engine by another name use that name). Set, it
    /// takes the place of `tcp.advertise`.
    pub advertise: Option<String>,
    /// `p2p` (default).
    pub metadata: String,
    /// Default batch deadline, in milliseconds.
    pub timeout_ms: u64,
    /// Retry a task that fails on the fabric once over TCP, within its deadline.
    pub retry_over_tcp: bool,
    /// Most bytes of notifications queued for the application before peers' further
    /// notifications are refused as busy.
    pub notify_queue_bytes: usize,
    /// A secret shared by every engine of the deployment: each connection to the port
    /// then starts with a mutual challenge-response, and peers without it are refused.
    /// `None` (default): anyone who reaches the port is served. Set, it takes the place
    /// of `tcp.secret`.
    #[serde(skip_serializing)]
    pub secret: Option<String>,
    /// With a fabric protocol: when its provider lists no device
    /// ([`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) from the transport),
    /// warn and run on TCP instead of failing. Any other failure still fails.
    pub allow_tcp_only: bool,
    /// The TCP transport: data for TCP-only engines, the fallback of fabric ones.
    pub tcp: TcpConfig,
    /// The libfabric transport, with `protocol = "efa"` (`None`: its defaults, provider
    /// `efa` and every device it lists).
    #[cfg(feature = "efa")]
    pub efa: Option<crate::fabrics::EfaConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            protocol: "tcp".into(),
            listen: "127.0.0.1:0".into(),
            advertise: None,
            metadata: "p2p".into(),
            timeout_ms: 30_000,
            retry_over_tcp: false,
            notify_queue_bytes: crate::engine::NOTIFY_QUEUE_BYTES,
            secret: None,
            allow_tcp_only: false,
            tcp: TcpConfig::default(),
            #[cfg(feature = "efa")]
            efa: None,
        }
    }
}

impl EngineConfig {
    /// The TCP settings this configuration describes: `tcp`, with the engine-wide
    /// `advertise` and `secret` in place of its own when they are set.
    pub fn tcp_config(&self) -> TcpConfig {
        let mut tcp = self.tcp.clone();
        tcp.lanes = tcp.lanes.max(1);
        if self.advertise.is_some() {
            tcp.advertise = self.advertise.clone();
        }
        if let Some(secret) = &self.secret {
            tcp.secret = Some(ferry_transport_tcp::SharedSecret::from(secret.as_str()));
        }
        tcp
    }

    /// The libfabric provider `protocol = "efa"` uses (for messages).
    fn provider(&self) -> String {
        #[cfg(feature = "efa")]
        if let Some(efa) = &self.efa {
            return efa.provider.clone();
        }
        "efa".into()
    }
}

impl Engine {
    /// Builds an engine from run-time configuration, through the same builder. The
    /// protocol is honoured exactly: `tcp` never touches a fabric library, a protocol
    /// this build lacks is an error naming the Cargo feature to enable, and one ferry does
    /// not implement yet says so.
    pub fn from_config(config: &EngineConfig) -> Result<Engine> {
        let protocol = Protocol::parse(&config.protocol)?;
        backends::require_protocol(protocol)?;
        let metadata = Metadata::parse(&config.metadata)?;
        let builder = Engine::builder()
            .listen(config.listen.clone())
            .metadata(metadata)
            .timeout(Duration::from_millis(config.timeout_ms))
            .retry_over_tcp(config.retry_over_tcp)
            .notification_queue_bytes(config.notify_queue_bytes);
        match protocol {
            Protocol::Tcp => builder.transport(Tcp::new(config.tcp_config())).build(),
            fabric => {
                let fallback = Tcp::new(config.tcp_config());
                match backends::fabric_engine(fabric, config, builder, fallback.clone()) {
                    Err(e)
                        if config.allow_tcp_only
                            && e.kind() == ferry_transport_api::ErrorKind::Unsupported =>
                    {
                        tracing::warn!(protocol = %fabric, provider = %config.provider(), error = %e, "no fabric device; running on TCP only");
                        Engine::builder()
                            .listen(config.listen.clone())
                            .timeout(Duration::from_millis(config.timeout_ms))
                            .notification_queue_bytes(config.notify_queue_bytes)
                            .transport(fallback)
                            .build()
                    }
                    r => r,
                }
            }
        }
    }
}
