//! ferry's libfabric transport: one-sided READ and WRITE over an RDM endpoint.
//!
//! On AWS this is EFA (provider `efa`); on any Linux host the `tcp;ofi_rxm` and `shm`
//! providers run the same code over loopback, which is how it is tested.
//!
//! Layering: implements [`ferry_transport_api::Transport`]; `ferry-engine` adds it with
//! its `efa` feature, always next to the TCP transport (the fallback). It links the
//! system's libfabric through `libfabric-sys`.
//!
//! What it does:
//! - opens one fabric, domain, address vector (`FI_AV_TABLE`), completion queue and RDM
//!   endpoint on the first device the provider lists;
//! - registers regions honouring the `mr_mode` the provider returns (`FI_MR_LOCAL`,
//!   `FI_MR_VIRT_ADDR`, `FI_MR_ALLOCATED`, `FI_MR_PROV_KEY`, `FI_MR_ENDPOINT`), keys kept
//!   64-bit; remote access rights follow the region's [`Access`];
//! - publishes the endpoint's fabric address (hex) and inserts peers' addresses into the
//!   address vector on first use;
//! - posts `fi_read` and `fi_writemsg` with `FI_DELIVERY_COMPLETE` (a WRITE completes when
//!   the data is in the target's memory), serialized per endpoint, retrying `FI_EAGAIN`
//!   after driving progress, a bounded number of times;
//! - a progress thread reads the completion queue (providers with manual progress need
//!   it on the target side too) and maps completion errors to [`FailReason::Fabric`],
//!   logging the provider's message.
//!
//! Thread safety: every libfabric call on the endpoint and its queue is made under one
//! lock, so the provider may run in `FI_THREAD_DOMAIN` mode.
//!
//! ```no_run
//! use ferry_transport_efa::{EfaConfig, EfaTransport};
//! let efa = EfaTransport::new(EfaConfig { provider: "tcp;ofi_rxm".into(), source: Some("127.0.0.1".into()), ..EfaConfig::default() });
//! assert_eq!(efa.config().provider, "tcp;ofi_rxm");
//! ```

mod fabric;
mod rma_loop;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_transport_api::{
    Access, Connection, Endpoint, FailReason, Protocol, RegionMemory, Slice, Transport,
    TransportContext, TransportError,
};
use parking_lot::{Mutex, RwLock};

pub use fabric::{providers, ProviderInfo};
use fabric::{Device, Mr, PostError};
pub use rma_loop::{rma_loop, LoopResult};

/// Settings of the libfabric transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EfaConfig {
    /// libfabric provider: `efa` on AWS; `tcp;ofi_rxm` or `shm` for development.
    pub provider: String,
    /// For IP-based providers (`tcp;ofi_rxm`): the local address to bind (`FI_SOURCE`).
    /// The engine sets it to its listen address when unset.
    pub source: Option<String>,
    /// Largest slice a request is cut into.
    pub max_slice: usize,
    /// How long the progress thread spins on an empty completion queue before it sleeps.
    pub busy_poll: Duration,
    /// Fault injection: every `fault_every`-th post fails with a fabric I/O error instead
    /// of being posted (0, the default: never). Exercises error and retry paths without
    /// faulty hardware.
    pub fault_every: u64,
}

impl Default for EfaConfig {
    fn default() -> Self {
        EfaConfig {
            provider: "efa".into(),
            source: None,
            max_slice: 1 << 20,
            busy_poll: Duration::from_micros(50),
            fault_every: 0,
        }
    }
}

impl EfaConfig {
    /// Whether the provider addresses peers by IP (so `source` matters).
    pub fn ip_based(&self) -> bool {
        let p = self.provider.to_ascii_lowercase();
        p.contains("tcp") || p.contains("sockets") || p.contains("udp")
    }
}

struct Inner {
    config: EfaConfig,
    device: OnceLock<Arc<Device>>,
    regions: RwLock<HashMap<usize, Arc<Mr>>>,
    peers: Mutex<HashMap<String, Arc<EfaConnection>>>,
    stop: Arc<AtomicBool>,
    posts: AtomicU64,
}

/// The libfabric transport. Create it with [`EfaTransport::new`]; the engine starts it.
pub struct EfaTransport {
    inner: Arc<Inner>,
}

impl EfaTransport {
    /// A transport with `config`, not yet opened.
    pub fn new(config: EfaConfig) -> Self {
        EfaTransport {
            inner: Arc::new(Inner {
                config,
                device: OnceLock::new(),
                regions: RwLock::new(HashMap::new()),
                peers: Mutex::new(HashMap::new()),
                stop: Arc::new(AtomicBool::new(false)),
                posts: AtomicU64::new(0),
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &EfaConfig {
        &self.inner.config
    }

    /// Sets the source address for IP-based providers when none was configured.
    pub fn set_default_source(&mut self, host: &str) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            if inner.config.source.is_none() && inner.config.ip_based() {
                inner.config.source = Some(host.to_string());
            }
        }
    }

    fn device(&self) -> Result<&Arc<Device>, TransportError> {
        self.inner.device.get().ok_or(TransportError::Closed)
    }
}

fn key_of(region: &RegionMemory) -> usize {
    region as *const RegionMemory as usize
}

impl Transport for EfaTransport {
    fn protocol(&self) -> Protocol {
        Protocol::Efa
    }

    fn start(&self, ctx: TransportContext) -> Result<Endpoint, TransportError> {
        let device = Device::open(
            &self.inner.config,
            ctx.completions.clone(),
            self.inner.stop.clone(),
        )?;
        let address = device.address_hex();
        tracing::info!(provider = %self.inner.config.provider, domain = %device.domain_name(), mr_mode = device.mr_mode(), "libfabric transport open");
        self.inner
            .device
            .set(device)
            .map_err(|_| TransportError::invalid("the libfabric transport was started twice"))?;
        Ok(Endpoint {
            protocol: Protocol::Efa,
            address,
        })
    }

    fn register(&self, region: &Arc<RegionMemory>, access: Access) -> Result<u64, TransportError> {
        let device = self.device()?;
        let mr = device.register(region, access)?;
        let key = mr.key();
        self.inner
            .regions
            .write()
            .insert(key_of(region), Arc::new(mr));
        Ok(key)
    }

    fn deregister(&self, region: &RegionMemory) {
        self.inner.regions.write().remove(&key_of(region));
    }

    fn connect(&self, endpoint: &Endpoint) -> Result<Arc<dyn Connection>, TransportError> {
        if endpoint.protocol != Protocol::Efa {
            return Err(TransportError::invalid(format!(
                "{} endpoint given to the libfabric transport",
                endpoint.protocol
            )));
        }
        let mut peers = self.inner.peers.lock();
        if let Some(c) = peers.get(&endpoint.address) {
            return Ok(c.clone());
        }
        let device = self.device()?.clone();
        let peer = device.insert_peer(&endpoint.address)?;
        let conn = Arc::new(EfaConnection {
            inner: self.inner.clone(),
            device,
            peer,
            alive: AtomicBool::new(true),
        });
        peers.insert(endpoint.address.clone(), conn.clone());
        Ok(conn)
    }

    fn max_slice(&self) -> usize {
        self.inner.config.max_slice.max(4096)
    }

    fn shutdown(&self) {
        if self.inner.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        for (_, c) in self.inner.peers.lock().drain() {
            c.alive.store(false, Ordering::Release);
        }
        if let Some(d) = self.inner.device.get() {
            d.stop_progress();
        }
    }
}

impl Drop for EfaTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A peer reached through the local endpoint (an address-vector entry).
struct EfaConnection {
    inner: Arc<Inner>,
    device: Arc<Device>,
    peer: libfabric_sys::fi_addr_t,
    alive: AtomicBool,
}

impl Connection for EfaConnection {
    fn post(&self, slice: Slice) -> Result<(), FailReason> {
        if !self.alive.load(Ordering::Acquire) || self.inner.stop.load(Ordering::Acquire) {
            return Err(FailReason::Shutdown);
        }
        let every = self.inner.config.fault_every;
        if every > 0 && self.inner.posts.fetch_add(1, Ordering::Relaxed) % every == every - 1 {
            return Err(FailReason::Fabric(libfabric_sys::FI_EIO as i32));
        }
        let local = self
            .inner
            .regions
            .read()
            .get(&key_of(&slice.local))
            .cloned();
        let Some(local) = local else {
            tracing::warn!("local region is not registered with the libfabric transport");
            return Err(FailReason::Unsupported);
        };
        match self.device.post(self.peer, &local, slice) {
            Ok(()) => Ok(()),
            Err(PostError::Fatal(code)) => {
                self.alive.store(false, Ordering::Release);
                Err(FailReason::Fabric(code))
            }
            Err(PostError::Busy) => Err(FailReason::Fabric(libfabric_sys::FI_EAGAIN as i32)),
        }
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.inner.stop.load(Ordering::Acquire)
    }
}
