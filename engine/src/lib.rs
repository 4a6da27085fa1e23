//! ferry: a transfer engine for disaggregated LLM serving.
//!
//! `ferry-engine` is the crate applications depend on. It moves bytes between registered
//! memory on different hosts (the KV-cache blocks a prefill node hands to a decode node,
//! model weights, any buffer) with one-sided READ and WRITE requests, over the transports
//! compiled in with Cargo features. It sits on top of ferry's layers: `transport-api`
//! (vocabulary), `transport-tcp` (always present: the fallback and the handshake port).
//!
//! ```
//! use std::time::Duration;
//! use ferry_engine::{Engine, Location, Tcp, TcpConfig};
//!
//! # fn main() -> Result<(), ferry_engine::Error> {
//! // Two engines; in production they run on different hosts.
//! let target = Engine::builder().transport(Tcp::new(TcpConfig::default())).build()?;
//! let initiator = Engine::builder().transport(Tcp::new(TcpConfig::default())).build()?;
//!
//! let kv = target.allocate(1 << 20, Location::host())?;
//! let local = initiator.allocate(1 << 20, Location::host())?;
//! local.write_at(0, b"layer 0, blocks 0..16")?;
//!
//! // Open the peer's segment by `host:port` and write, then read back.
//! let segment = initiator.open_segment(&target.name())?;
//! let remote = segment.buffer(0)?;
//! let mut batch = initiator.batch();
//! batch.write(&local, 0, &remote, 4096, 21)?;
//! batch.submit()?.wait(Duration::from_secs(5))?;
//!
//! let mut batch = initiator.batch();
//! batch.read(&local, 8192, &remote, 4096, 21)?;
//! let batch = batch.submit()?;
//! batch.wait(Duration::from_secs(5))?;
//! let mut back = [0u8; 21];
//! local.read_at(8192, &mut back)?;
//! assert_eq!(&back, b"layer 0, blocks 0..16");
//! # let _ = kv; Ok(()) }
//! ```
//!
//! Features: `tcp` (default, required). Further transports and GPU memory come as
//! features of this crate; [`compiled`] lists what this build has, and asking for what
//! it lacks is an error that names the feature.
//!
//! What a peer's descriptor decides, and what it does not: it lists the peer's buffers
//! (checked when the segment is opened: ranges that wrap, keys without an endpoint and
//! repeated endpoints are refused), but a segment is this engine's own only when the name
//! opened is this engine's, and TCP lanes connect to the address the segment was opened
//! by, never to one the descriptor names. A WRITE that ended TimedOut or ConnectionLost
//! may still land on the peer later: the remote range is undefined until rewritten.
//!
//! Thread safety: [`Engine`], [`Buffer`] and [`Segment`] are `Send + Sync`; many threads
//! may build and submit batches at once. A [`Batch`] is polled or waited on by its owner.
#![deny(unsafe_code)]

#[cfg(not(feature = "tcp"))]
compile_error!(
    "ferry-engine needs its `tcp` feature: TCP carries the handshake and is every engine's fallback. \
     Enable it (it is a default feature) or add `features = [\"tcp\"]` next to `default-features = false`."
);

// The README's examples are compiled and run with the doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
mod readme {}

mod backends;
mod batch;
mod builder;
mod config;
mod control;
mod engine;
mod error;
mod features;
mod local;
mod memory;
mod metadata;
mod peer;
mod registry;

#[cfg(feature = "rdma")]
pub use backends::rdma_devices;
pub use backends::{
    after_cuda_stream, cuda_status, fabric_devices, fabrics, CudaStatus, FabricDevice,
};
pub use batch::{Batch, BatchBuilder, BatchId, BatchStats, Progress, TaskStatus};
pub use builder::{
    AddTransport, Buildable, EngineBuilder, NeedsFallback, NeedsTransport, Ready, Tcp,
};
pub use config::EngineConfig;
pub use control::Notification;
pub use engine::Engine;
pub use error::{Error, Result, SegmentError};
pub use features::{compiled, protocol_feature, Feature};
pub use memory::Buffer;
pub use metadata::{metadata_stores, Metadata};
pub use peer::{PeerStats, RemoteBuffer, Segment};

pub use ferry_transport_api::{
    Access, BufferDescriptor, Endpoint, ErrorKind, FailReason, Location, Opcode, Protocol,
    RemoteStatus, SegmentDescriptor, StagingStats, TransportKey,
};
pub use ferry_transport_tcp::{SharedSecret, TcpConfig, TcpStats};
