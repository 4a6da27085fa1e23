//! ferry's RDMA transport: one-sided READ and WRITE over ibverbs RC queue pairs, on
//! InfiniBand and RoCE NICs (ConnectX and alike; soft-RoCE for development).
//!
//! Layering: implements [`ferry_transport_api::Transport`]; `ferry-engine` adds it with
//! its `rdma` feature, always next to the TCP transport (the fallback). It links the
//! system's libibverbs through `rdma-sys`.
//!
//! What it does:
//! - **discovery** ([`discover`]): every device ibverbs lists, described from ibverbs and
//!   sysfs. A kernel without RDMA (`ENOSYS`) or no device is an answer with its reason,
//!   never a panic. [`device::select`] chooses the ports to drive: ACTIVE ports of
//!   devices that can create RC queue pairs (**EFA devices never**: they are listed by
//!   ibverbs but refuse RC queue pairs, and are recognised by driver, vendor and types),
//!   admitted by [`RdmaConfig::devices`], each with a source GID ([`gid::choose_gid`]:
//!   on RoCE the v2 GID of an IPv4 address of an interface that is up, or
//!   [`RdmaConfig::gid_index`]);
//! - **registration**: every region on every driven port (`ibv_reg_mr`); device memory
//!   directly (GPUDirect RDMA through nvidia-peermem) or as a dma-buf the engine's device
//!   services export (`ibv_reg_dmabuf_mr`); otherwise the region gets no RDMA key and the
//!   engine moves it over TCP, staged. One key per port, rail order;
//! - **connections**: per (local port, peer port) pair (see [`plan`]) a configurable
//!   number of RC queue pairs, brought up RESET → INIT → RTR → RTS ([`qp`]) with the
//!   peer's queue pair numbers, LID/GID and the smaller MTU. The queue-pair exchange
//!   ([`exchange`]) travels over the engine's one port (`PeerControl`), never a
//!   listener of this transport's own;
//! - **data path**: slices posted as RDMA READ and WRITE work requests, striped over the
//!   ports preferred for the local memory ([`topology`]: NUMA node for host memory, PCI
//!   distance for GPU memory) and over their queue pairs. Each port has a table of
//!   operations in flight allocated when it opens, queues sized so that neither send
//!   queue nor completion queue can overflow, a backlog for slices that find the table
//!   full, and a progress thread that reads the completion queue (busy-polling for
//!   [`RdmaConfig::busy_poll_us`], then sleeping on the completion channel). Nothing is
//!   allocated per slice in steady state;
//! - **failures**: a failed work completion fails its queue pair (RC queue pairs enter
//!   the error state) and marks the connection for replacement: the engine's next
//!   request reconnects with fresh queue pairs (telling the peer which ones they replace).
//!   The slice is posted again on a healthy queue pair of the same connection (another
//!   port first) while its deadline allows, else reported failed with a reason the
//!   engine can retry over TCP. A peer's key refusal reads as a stale descriptor. Every
//!   slice ends by its deadline: the progress thread times out what the NIC has not
//!   completed and what waits in the backlog;
//! - **completed means visible**: an RC WRITE completes at the initiator when the peer's
//!   NIC has acknowledged it; the data may still be on its way over the peer's PCIe
//!   fabric to memory. With [`RdmaConfig::flush_writes`] (the default) every WRITE is
//!   chained with an 8-byte READ, on the same queue pair, of a word the peer lends on
//!   that port, and the slice completes with the READ. An RC responder executes requests
//!   in order, and the PCIe read that serves the READ is ordered behind the NIC's earlier
//!   posted writes to host memory, so a completed WRITE is in the peer's host memory,
//!   visible to its CPU. For a peer's GPU memory the writes travel peer-to-peer to the GPU
//!   and are ordered behind the READ only where the PCIe fabric orders them (the same
//!   switch); a GPU kernel consuming them should follow the peer's notification, not
//!   poll the memory. Turning it off saves one READ per WRITE slice.
//!
//! Hardware: this crate's logic (device choice, GID choice, locality, striping, the
//! exchange, queue-pair transitions) is tested everywhere; the data path runs only where
//! a device exists (the `--hw` tests, over soft-RoCE where the kernel offers `rdma_rxe`).

mod conn;
pub mod device;
mod discovery;
pub mod exchange;
pub mod gid;
mod nic;
pub mod plan;
pub mod qp;
pub mod topology;
mod verbs;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_transport_api::{
    Access, Completions, Connection, Endpoint, Location, PeerControl, Protocol, RegionMemory,
    Staging, Transport, TransportContext, TransportError,
};
use parking_lot::{Mutex, RwLock};

pub use device::{DeviceInfo, Nic, Selection};
pub use discovery::{discover, Discovery};

use conn::{Accepted, RdmaConnection};
use nic::OpenNic;
use qp::QpSettings;
use topology::{NicSet, Place};

/// Settings of the RDMA transport.
///
/// `serde`, with every field defaulted so a partial document works; durations in
/// milliseconds (`connect_timeout_ms`), busy polling in microseconds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RdmaConfig {
    /// Devices or ports to drive (`mlx5_0`, or `mlx5_0:1` for one port); empty: every
    /// usable one. Names that match nothing are reported.
    pub devices: Vec<String>,
    /// The GID table index of every port's source GID; `None`: chosen per port (RoCE v2,
    /// IPv4-mapped, interface up).
    pub gid_index: Option<u8>,
    /// RC queue pairs per (local port, peer port) pair.
    pub qps_per_pair: usize,
    /// Operations in flight per port (bounded by the device's queue limits).
    pub ops_per_port: u32,
    /// Largest slice, in bytes.
    pub max_slice: usize,
    /// Follow every WRITE with a READ of the peer's flush word on the same queue pair,
    /// so that a completed WRITE is in the peer's memory (see the crate docs).
    pub flush_writes: bool,
    /// ACK timeout exponent (4.096 µs × 2^n; 14 is about 67 ms).
    pub ack_timeout: u8,
    /// Transport retries before a work request fails (at most 7).
    pub retry_count: u8,
    /// Traffic class of RoCE packets (DSCP in its upper six bits).
    pub traffic_class: u8,
    /// InfiniBand service level.
    pub service_level: u8,
    /// How long the queue-pair exchange with a peer may take, in milliseconds.
    #[serde(rename = "connect_timeout_ms", with = "millis")]
    pub connect_timeout: Duration,
    /// Microseconds a progress thread keeps polling its completion queue after the last
    /// completion before it sleeps (lower latency, one core's share while busy).
    pub busy_poll_us: u64,
    /// Most queue pairs peers may have connected to this transport; beyond it the
    /// connections accepted longest ago are dropped.
    pub max_peer_qps: usize,
    /// Fault injection: every `fault_every`-th post fails its queue pair as a NIC would
    /// (0, the default: never): the post is refused with [`FailReason::Device`]
    /// (`EIO`), the queue pair enters the error state and the connection is marked for
    /// replacement. Exercises the error, retry and reconnect paths without faulty
    /// hardware.
    ///
    /// [`FailReason::Device`]: ferry_transport_api::FailReason::Device
    pub fault_every: u64,
    /// Fault injection for tests: the first `lose_completions` completions each port
    /// reads are held back as if lost, and handed over only once their slice has passed
    /// its deadline. 0, the default: none.
    #[doc(hidden)]
    pub lose_completions: u64,
}

mod millis {
    use std::time::Duration;

    pub(crate) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        let ms: u64 = serde::Deserialize::deserialize(d)?;
        Ok(Duration::from_millis(ms))
    }
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            devices: Vec::new(),
            gid_index: None,
            qps_per_pair: 2,
            ops_per_port: 1024,
            max_slice: 256 * 1024,
            flush_writes: true,
            ack_timeout: 14,
            retry_count: 7,
            traffic_class: 0,
            service_level: 0,
            connect_timeout: Duration::from_secs(5),
            busy_poll_us: 20,
            max_peer_qps: 4096,
            fault_every: 0,
            lose_completions: 0,
        }
    }
}

/// The devices tests run on: `FERRY_RDMA_DEVICES` (comma-separated names as
/// [`RdmaConfig::devices`] takes them), else none named (every usable one). What
/// `cargo xtask test --hw` sets for its soft-RoCE devices.
#[doc(hidden)]
pub fn devices_under_test() -> Vec<String> {
    std::env::var("FERRY_RDMA_DEVICES")
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A registered region's keys on every port. Operations in flight hold it, so a region
/// deregistered while they run keeps its keys until they end.
pub(crate) struct Registration {
    lkeys: Vec<u32>,
    _mrs: Vec<verbs::Mr>,
}

/// What the transport's connections and progress threads share.
pub(crate) struct Shared {
    config: RdmaConfig,
    nics: OnceLock<Vec<Arc<OpenNic>>>,
    places: OnceLock<Vec<Place>>,
    /// By the address of the `RegionMemory` (slices carry the registered `Arc`).
    regions: RwLock<HashMap<usize, Arc<Registration>>>,
    /// NIC preference per memory location, computed on first use.
    prefs: RwLock<HashMap<Location, NicSet>>,
    device_services: OnceLock<Option<Arc<dyn Staging>>>,
    accepted: Mutex<Accepted>,
    shut: AtomicBool,
}

impl Shared {
    fn nics(&self) -> &[Arc<OpenNic>] {
        self.nics.get().map(Vec::as_slice).unwrap_or(&[])
    }

    fn is_shut(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }

    fn registration(&self, memory: &Arc<RegionMemory>) -> Option<Arc<Registration>> {
        self.regions
            .read()
            .get(&(Arc::as_ptr(memory) as usize))
            .cloned()
    }

    /// The ports memory at `location` should leave from.
    fn preferred(&self, location: Location) -> NicSet {
        if let Some(&set) = self.prefs.read().get(&location) {
            return set;
        }
        let places = self.places.get().map(Vec::as_slice).unwrap_or(&[]);
        let gpu = match location {
            Location::Cuda { device } => self.gpu_place(device),
            _ => None,
        };
        let set = topology::preferred(places, location, gpu.as_ref());
        self.prefs.write().insert(location, set);
        set
    }

    /// Where GPU `device` sits, from its PCI bus id (asked of the engine's device
    /// services) and sysfs.
    fn gpu_place(&self, device: u32) -> Option<Place> {
        let services = self.device_services.get()?.as_ref()?;
        let bus_id = services.pci_bus_id(device)?.to_ascii_lowercase();
        let dir = std::path::Path::new("/sys/bus/pci/devices").join(&bus_id);
        Some(Place {
            numa: std::fs::read_to_string(dir.join("numa_node"))
                .ok()
                .and_then(|s| discovery::parse_numa(&s)),
            pci: std::fs::canonicalize(&dir)
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
        })
    }
}

/// The RDMA transport.
pub struct RdmaTransport {
    shared: Arc<Shared>,
    /// Live connections by the peer's endpoint address.
    connections: Mutex<HashMap<String, Arc<RdmaConnection>>>,
}

impl RdmaTransport {
    /// A transport with `config`; nothing is opened until [`Transport::start`].
    pub fn new(mut config: RdmaConfig) -> Self {
        // Longer than the clock can add is forever.
        config.connect_timeout = ferry_transport_api::at_most_forever(config.connect_timeout);
        RdmaTransport {
            shared: Arc::new(Shared {
                config,
                nics: OnceLock::new(),
                places: OnceLock::new(),
                regions: RwLock::new(HashMap::new()),
                prefs: RwLock::new(HashMap::new()),
                device_services: OnceLock::new(),
                accepted: Mutex::new(Accepted::default()),
                shut: AtomicBool::new(false),
            }),
            connections: Mutex::new(HashMap::new()),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &RdmaConfig {
        &self.shared.config
    }

    /// The ports it drives (empty before [`Transport::start`]).
    pub fn ports(&self) -> Vec<Nic> {
        self.shared.nics().iter().map(|n| n.info.clone()).collect()
    }

    /// The operation tables' counters, summed over the ports (for tests and
    /// diagnostics).
    pub fn op_stats(&self) -> ferry_transport_api::ops::OpStats {
        let mut all = ferry_transport_api::ops::OpStats::default();
        for n in self.shared.nics() {
            all += n.ops.stats();
        }
        all
    }

    /// Queue pairs peers have connected to this transport.
    pub fn accepted_qps(&self) -> usize {
        self.shared.accepted.lock().len()
    }

    fn settings(&self, nic: &Nic, attr: &verbs::DeviceAttr) -> QpSettings {
        let c = &self.shared.config;
        QpSettings {
            port: nic.port,
            link_layer: nic.link_layer,
            gid_index: nic.gid_index,
            mtu: nic.mtu,
            rd_atomic: attr.max_qp_rd_atom.clamp(1, 16),
            init_rd_atomic: attr.max_qp_init_rd_atom.clamp(1, 16),
            timeout: c.ack_timeout.min(31),
            retry_cnt: c.retry_count.min(7),
            rnr_retry: 7,
            traffic_class: c.traffic_class,
            service_level: c.service_level.min(15),
        }
    }

    /// Opens every selected port; `Err` names what was found when nothing can be used.
    fn open_ports(
        &self,
        completions: Arc<dyn Completions>,
    ) -> Result<Vec<Arc<OpenNic>>, TransportError> {
        let c = &self.shared.config;
        let found = discover();
        let selection = device::select(&found.devices, &c.devices, c.gid_index);
        for s in &selection.skipped {
            tracing::info!(what = %s.what, why = %s.why, "RDMA port not used");
        }
        if selection.nics.is_empty() {
            return Err(no_device(&found, &selection));
        }
        let list = verbs::DeviceList::get().map_err(|e| TransportError::Unsupported {
            what: "RDMA".into(),
            why: discovery::unavailable_reason(&e),
        })?;
        let mut contexts: HashMap<String, (Arc<verbs::Context>, verbs::DeviceAttr)> =
            HashMap::new();
        let mut open = Vec::with_capacity(selection.nics.len());
        let failed = |what: &str, e: &dyn std::fmt::Display| TransportError::Unsupported {
            what: "RDMA".into(),
            why: format!("cannot open {what}: {e}"),
        };
        for info in selection.nics {
            if !contexts.contains_key(&info.device) {
                let dev = list
                    .iter()
                    .find(|d| d.name() == info.device)
                    .ok_or_else(|| failed(&info.device, &"it left the device list"))?;
                let ctx = dev.open().map_err(|e| failed(&info.device, &e))?;
                let attr = ctx.query_device().map_err(|e| failed(&info.device, &e))?;
                contexts.insert(info.device.clone(), (ctx, attr));
            }
            let (ctx, attr) = &contexts[&info.device];
            let settings = self.settings(&info, attr);
            let sizes = nic::Sizes {
                ops: c.ops_per_port.max(1),
                lose: c.lose_completions,
                busy_poll: Duration::from_micros(c.busy_poll_us),
                max_qp_wr: attr.max_qp_wr,
                max_cqe: attr.max_cqe,
            };
            let label = info.label();
            let nic = OpenNic::open(open.len(), ctx, info, settings, &sizes, completions.clone())
                .map_err(|e| failed(&label, &e))?;
            open.push(nic);
        }
        Ok(open)
    }
}

/// The error of a host where no port can be used: what was found, and why each was left.
fn no_device(found: &Discovery, selection: &Selection) -> TransportError {
    let why = if found.devices.is_empty() {
        found.summary()
    } else {
        format!(
            "{}; none can be used: {}",
            found.summary(),
            selection.explain()
        )
    };
    TransportError::Unsupported {
        what: "RDMA".into(),
        why,
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `IBV_ACCESS_*` for a region with `access`.
fn access_flags(access: Access) -> u32 {
    use rdma_sys::ibv_access_flags as f;
    let mut flags = f::IBV_ACCESS_LOCAL_WRITE;
    if access.remote_read() {
        flags |= f::IBV_ACCESS_REMOTE_READ;
    }
    if access.remote_write() {
        flags |= f::IBV_ACCESS_REMOTE_WRITE;
    }
    flags.0
}

impl Transport for RdmaTransport {
    fn protocol(&self) -> Protocol {
        Protocol::Rdma
    }

    fn start(&self, ctx: TransportContext) -> Result<Endpoint, TransportError> {
        if self.shared.nics.get().is_some() {
            return Err(TransportError::invalid(
                "the RDMA transport is already started",
            ));
        }
        let nics = self.open_ports(ctx.completions.clone())?;
        for (i, n) in nics.iter().enumerate() {
            if let Err(e) = n.start() {
                for started in &nics[..i] {
                    started.stop();
                }
                return Err(TransportError::Unsupported {
                    what: "RDMA".into(),
                    why: format!(
                        "cannot start the progress thread of {}: {e}",
                        n.info.label()
                    ),
                });
            }
        }
        let address = nics
            .iter()
            .map(|n| conn::endpoint_entry(n))
            .collect::<Vec<_>>()
            .join(",");
        let places = nics
            .iter()
            .map(|n| Place {
                numa: n.info.numa_node,
                pci: n.info.pci_path.clone(),
            })
            .collect();
        tracing::info!(ports = %address, "RDMA transport started");
        let _ = self.shared.places.set(places);
        let _ = self.shared.device_services.set(ctx.staging.clone());
        let _ = self.shared.nics.set(nics);
        Ok(Endpoint {
            protocol: Protocol::Rdma,
            address,
        })
    }

    fn register(
        &self,
        region: &Arc<RegionMemory>,
        access: Access,
    ) -> Result<Vec<u64>, TransportError> {
        let nics = self.shared.nics();
        if nics.is_empty() {
            return Err(TransportError::invalid("the RDMA transport is not started"));
        }
        let flags = access_flags(access);
        let len = region.len();
        let Some(addr) = region.dma_addr(0, len) else {
            return Err(TransportError::register_region(
                region.addr(),
                len as u64,
                "no device address",
            ));
        };
        let mut mrs = Vec::with_capacity(nics.len());
        for nic in nics {
            // SAFETY: the region's memory stays valid while the registration lives: the
            // registration is dropped at deregistration, which the engine calls before it
            // lets the region's owner go (slices in flight hold the memory itself).
            let direct = unsafe { nic.pd().register(addr, len, flags) };
            let mr = match direct {
                Ok(mr) => mr,
                Err(e) if !region.location().is_host() => self
                    .register_device(nic, region, flags)
                    .map_err(|d| TransportError::Unsupported {
                        what: format!("RDMA registration of {} memory", region.location()),
                        why: format!("{e} (no GPUDirect RDMA through nvidia-peermem), and {d}"),
                    })?,
                Err(e) => {
                    return Err(TransportError::register_region(
                        region.addr(),
                        len as u64,
                        e.to_string(),
                    ))
                }
            };
            mrs.push(mr);
        }
        let keys = mrs.iter().map(|m| u64::from(m.rkey())).collect();
        let lkeys = mrs.iter().map(|m| m.lkey()).collect();
        self.shared.regions.write().insert(
            Arc::as_ptr(region) as usize,
            Arc::new(Registration { lkeys, _mrs: mrs }),
        );
        Ok(keys)
    }

    fn deregister(&self, region: &RegionMemory) {
        self.shared
            .regions
            .write()
            .remove(&(region as *const RegionMemory as usize));
    }

    fn connect(
        &self,
        endpoint: &Endpoint,
        peer: &dyn PeerControl,
    ) -> Result<Arc<dyn Connection>, TransportError> {
        if self.shared.is_shut() {
            return Err(TransportError::Closed);
        }
        if endpoint.protocol != Protocol::Rdma {
            return Err(TransportError::invalid(format!(
                "a {} endpoint given to RDMA",
                endpoint.protocol
            )));
        }
        let remote = conn::parse_endpoint(&endpoint.address)?;
        let replaces = match self.connections.lock().get(&endpoint.address) {
            Some(c) if c.is_alive() => return Ok(c.clone()),
            Some(c) => c.inner.id,
            None => 0,
        };
        let c = Arc::new(conn::open(
            &self.shared,
            &remote,
            peer,
            replaces,
            self.shared.config.connect_timeout,
        )?);
        let mut all = self.connections.lock();
        all.retain(|_, c| c.is_alive());
        all.insert(endpoint.address.clone(), c.clone());
        Ok(c)
    }

    fn answer(&self, body: &[u8]) -> Result<Vec<u8>, TransportError> {
        if self.shared.is_shut() {
            return Err(TransportError::Closed);
        }
        conn::accept(&self.shared, body)
    }

    fn max_slice(&self) -> usize {
        self.shared.config.max_slice.clamp(4096, 1 << 30)
    }

    fn shutdown(&self) {
        if self.shared.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        let nics = self.shared.nics();
        for n in nics {
            n.stop();
        }
        for n in nics {
            n.close(Duration::from_secs(2));
        }
        self.connections.lock().clear();
        self.shared.accepted.lock().clear();
        self.shared.regions.write().clear();
    }
}

impl RdmaTransport {
    /// Registers device memory as a dma-buf exported by the engine's device services.
    fn register_device(
        &self,
        nic: &OpenNic,
        region: &RegionMemory,
        flags: u32,
    ) -> Result<verbs::Mr, String> {
        let services = self
            .shared
            .device_services
            .get()
            .and_then(Option::as_ref)
            .ok_or("this engine has no device services (feature cuda) to export it as a dma-buf")?;
        let (fd, offset) = services.export_dmabuf(region).map_err(|e| e.to_string())?;
        use std::os::fd::AsRawFd;
        // SAFETY: the dma-buf covers the region from `offset` (the device services say
        // so); the kernel holds its own reference to it once registered, so closing our
        // descriptor after registration is fine.
        unsafe {
            nic.pd()
                .register_dmabuf(fd.as_raw_fd(), offset, region.len(), region.addr(), flags)
        }
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_maps_to_verbs_flags() {
        use rdma_sys::ibv_access_flags as f;
        assert_eq!(access_flags(Access::Local), f::IBV_ACCESS_LOCAL_WRITE.0);
        assert_eq!(
            access_flags(Access::RemoteRead),
            (f::IBV_ACCESS_LOCAL_WRITE | f::IBV_ACCESS_REMOTE_READ).0
        );
        assert_eq!(
            access_flags(Access::RemoteReadWrite),
            (f::IBV_ACCESS_LOCAL_WRITE | f::IBV_ACCESS_REMOTE_READ | f::IBV_ACCESS_REMOTE_WRITE).0
        );
    }

    #[test]
    fn config_documents_round_trip_and_refuse_unknown_fields() {
        let c = RdmaConfig {
            devices: vec!["mlx5_0".into()],
            gid_index: Some(3),
            ..RdmaConfig::default()
        };
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains("connect_timeout_ms"), "{text}");
        assert_eq!(serde_json::from_str::<RdmaConfig>(&text).unwrap(), c);
        let partial: RdmaConfig = serde_json::from_str(r#"{"qps_per_pair": 4}"#).unwrap();
        assert_eq!(partial.qps_per_pair, 4);
        assert!(partial.flush_writes);
        let err = serde_json::from_str::<RdmaConfig>(r#"{"device": "mlx5_0"}"#).unwrap_err();
        assert!(err.to_string().contains("device"), "{err}");
    }

    /// Without a usable port the error names what was found and why each was left.
    #[test]
    fn no_device_errors_name_what_was_found() {
        let none = Discovery {
            devices: Vec::new(),
            unavailable: Some("this kernel has no RDMA support (ibverbs: ENOSYS)".into()),
        };
        let e = no_device(&none, &Selection::default());
        assert_eq!(e.kind(), ferry_transport_api::ErrorKind::Unsupported);
        assert!(e.to_string().contains("ENOSYS"), "{e}");
        let efa_only = Discovery {
            devices: vec![device::samples::efa("rdmap16s27")],
            unavailable: None,
        };
        let sel = device::select(&efa_only.devices, &[], None);
        let e = no_device(&efa_only, &sel).to_string();
        assert!(e.contains("rdmap16s27") && e.contains("EFA"), "{e}");
    }

    /// On a host without RDMA (this one, in CI), starting fails with the reason, and
    /// nothing else is opened.
    #[test]
    fn start_without_devices_says_why() {
        if !discover().devices.is_empty() {
            return;
        }
        let t = RdmaTransport::new(RdmaConfig::default());
        let ctx = TransportContext {
            completions: ferry_transport_api::testing::Recorder::new(),
            control: None,
            staging: None,
        };
        let e = t.start(ctx).unwrap_err();
        assert_eq!(e.kind(), ferry_transport_api::ErrorKind::Unsupported);
        assert!(e.to_string().contains("RDMA"), "{e}");
        assert!(t.ports().is_empty());
        t.shutdown();
    }
}
