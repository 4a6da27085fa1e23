//! Run-time configuration: [`EngineConfig`] (serde, nested per transport) and
//! [`Engine::from_config`], which turns it into an engine through the same builder as
//! code does.

use std::time::Duration;

use ferry_transport_api::{ErrorKind, Protocol};
use ferry_transport_tcp::TcpConfig;
use serde::{Deserialize, Serialize};

use crate::backends;
use crate::builder::{EngineBuilder, NeedsTransport, Tcp};
use crate::control::NOTIFY_QUEUE_BYTES;
use crate::metadata::Metadata;
use crate::{Engine, Result};

/// Engine settings read at run time (from a file, the environment, a command line).
///
/// `serde` with defaults for every field, so a partial document works: `{"protocol":
/// "efa", "tcp": {"lanes": 4}}`. Engine-wide settings are flat; each transport's own
/// settings nest under its name (`tcp`, and `efa` in builds with the `efa` feature).
/// Durations are integers whose field names carry the unit (`timeout_ms`,
/// `busy_poll_us`). Secrets deserialize from a string and are never serialized.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// `tcp`, `efa` or `rdma`; honoured exactly. A fabric protocol brings TCP as its
    /// fallback.
    pub protocol: String,
    /// The engine's one port.
    pub listen: String,
    /// The `host:port` peers are told to reach (needed behind NAT, or when listening on
    /// `0.0.0.0`; peers that reached the engine by another name use that name). Set, it
    /// takes the place of `tcp.advertise`.
    pub advertise: Option<String>,
    /// Where descriptors are found: `p2p` (default), `http://host:port/path` (feature
    /// `http`), `redis://host:port` (feature `redis`), `etcd://host:port[,host:port]`
    /// (feature `etcd`).
    pub metadata: String,
    /// The segment name peers open this engine by; `None`: its `host:port`. With a
    /// metadata store, the key it is published under.
    pub name: Option<String>,
    /// How long a metadata store keeps this engine's entry after its last renewal, in
    /// milliseconds (renewed every third of it).
    pub metadata_ttl_ms: u64,
    /// The first part of every metadata key: `<namespace>/segments/<name>`.
    pub metadata_namespace: String,
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
    /// The ibverbs transport, with `protocol = "rdma"` (`None`: its defaults, every usable
    /// port).
    #[cfg(feature = "rdma")]
    pub rdma: Option<crate::fabrics::RdmaConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            protocol: "tcp".into(),
            listen: "127.0.0.1:0".into(),
            advertise: None,
            metadata: "p2p".into(),
            name: None,
            metadata_ttl_ms: crate::builder::METADATA_TTL.as_millis() as u64,
            metadata_namespace: crate::builder::METADATA_NAMESPACE.into(),
            timeout_ms: 30_000,
            retry_over_tcp: false,
            notify_queue_bytes: NOTIFY_QUEUE_BYTES,
            secret: None,
            allow_tcp_only: false,
            tcp: TcpConfig::default(),
            #[cfg(feature = "efa")]
            efa: None,
            #[cfg(feature = "rdma")]
            rdma: None,
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

    /// What a fabric protocol runs on, for messages: the libfabric provider of `efa`,
    /// the device list of `rdma`.
    fn fabric(&self, protocol: Protocol) -> String {
        match protocol {
            #[cfg(feature = "efa")]
            Protocol::Efa => match &self.efa {
                Some(efa) => format!("provider {}", efa.provider),
                None => "provider efa".into(),
            },
            #[cfg(feature = "rdma")]
            Protocol::Rdma => match &self.rdma {
                Some(r) if !r.devices.is_empty() => format!("devices {}", r.devices.join(",")),
                _ => "every RDMA device".into(),
            },
            p => p.to_string(),
        }
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
        // Every engine-wide setting, the same whichever transports the engine ends with.
        let builder = || {
            let b = Engine::builder()
                .listen(config.listen.clone())
                .metadata(metadata.clone())
                .metadata_ttl(Duration::from_millis(config.metadata_ttl_ms))
                .metadata_namespace(config.metadata_namespace.clone());
            let b = match &config.name {
                Some(n) => b.name(n.clone()),
                None => b,
            };
            b.timeout(Duration::from_millis(config.timeout_ms))
                .retry_over_tcp(config.retry_over_tcp)
                .notification_queue_bytes(config.notify_queue_bytes)
        };
        let tcp = Tcp::new(config.tcp_config());
        match protocol {
            Protocol::Tcp => builder().transport(tcp).build(),
            fabric => match fabric_engine(fabric, config, builder(), tcp.clone()) {
                Err(e) if config.allow_tcp_only && e.kind() == ErrorKind::Unsupported => {
                    tracing::warn!(protocol = %fabric, on = %config.fabric(fabric), error = %e, "no fabric device; running on TCP only");
                    builder().transport(tcp).build()
                }
                r => r,
            },
        }
    }
}

/// Builds an engine for a fabric protocol with its TCP fallback.
fn fabric_engine(
    protocol: Protocol,
    config: &EngineConfig,
    builder: EngineBuilder<NeedsTransport>,
    fallback: Tcp,
) -> Result<Engine> {
    match protocol {
        #[cfg(feature = "efa")]
        Protocol::Efa => builder
            .transport(backends::fabrics::Efa::new(
                config.efa.clone().unwrap_or_default(),
            ))
            .fallback(fallback)
            .build(),
        #[cfg(feature = "rdma")]
        Protocol::Rdma => builder
            .transport(backends::fabrics::Rdma::new(
                config.rdma.clone().unwrap_or_default(),
            ))
            .fallback(fallback)
            .build(),
        other => {
            let _ = (config, builder, fallback);
            Err(backends::protocol_missing(other))
        }
    }
}
