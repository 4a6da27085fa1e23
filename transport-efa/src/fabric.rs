//! The libfabric edge: every `unsafe` call of the transport, each handle with one owner.

use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_transport_api::ops::Link;
use ferry_transport_api::{
    Access, Completions, Location, Opcode, RegionMemory, Slice, TransportError,
};
use libfabric_sys as fi;
use parking_lot::{Mutex, RwLock};

use crate::ops::{OpSlab, OpStats, Outcomes, OUTCOMES};
use crate::EfaConfig;

/// The libfabric API version ferry asks for (Debian 12 ships 1.17).
const API_VERSION: u32 = fi::make_version(1, 17);
/// Longest a post keeps retrying `FI_EAGAIN` (draining the queue in between), within
/// the slice's own deadline. A first post to a peer may wait here while a provider such
/// as `tcp;ofi_rxm` connects.
const MAX_EAGAIN: Duration = Duration::from_secs(10);
/// Completions read per `fi_cq_read`: as many as the slab handles under one lock.
const CQ_BATCH: usize = OUTCOMES;
/// Bounds on the operation contexts of a rail (the provider's transmit queue size,
/// within these).
const MIN_OPS: usize = 256;
const MAX_OPS: usize = 16384;
/// How long the progress thread keeps polling an empty queue while operations are in
/// flight (at least; `EfaConfig::busy_poll` when longer).
const IN_FLIGHT_SPIN: Duration = Duration::from_millis(2);
/// A queue read that takes at least this long did a peer's work (copied its data): the
/// progress thread stays awake as after a completion.
const BUSY_PASS: Duration = Duration::from_micros(5);
/// The first and the longest sleep between reads of a queue without a wait object.
const MIN_NAP: Duration = Duration::from_micros(20);
const MAX_NAP: Duration = Duration::from_millis(1);
/// Longest closing the endpoints waits for their operations in flight to complete.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

pub(crate) fn strerror(code: i32) -> String {
    // SAFETY: fi_strerror returns a pointer to a static, NUL-terminated string.
    unsafe { CStr::from_ptr(fi::fi_strerror(code)) }
        .to_string_lossy()
        .into_owned()
}

/// A libfabric call that failed while opening a device: the device exists, so this is
/// never "no device" (`ErrorKind::Unsupported`).
fn failed(call: &'static str, rc: i32) -> TransportError {
    TransportError::Open {
        call,
        code: -rc,
        message: strerror(-rc),
    }
}

/// Why a post did not happen.
pub(crate) enum PostError {
    /// The provider kept answering `FI_EAGAIN`.
    Busy,
    /// The provider refused the operation (libfabric error code).
    Fatal(i32),
    /// The endpoint is closed (the transport shut down).
    Closed,
}

/// The raw handles, closed in reverse order of opening. The endpoint is here only while
/// the device opens; then [`Device::ep`] owns it.
struct Handles {
    info: *mut fi::fi_info,
    fabric: *mut fi::fid_fabric,
    domain: *mut fi::fid_domain,
    cq: *mut fi::fid_cq,
    av: *mut fi::fid_av,
    ep: *mut fi::fid_ep,
}

// SAFETY: with FI_THREAD_SAFE the provider serializes concurrent calls itself; with a
// weaker threading level every call is made under `Device::gate`.
unsafe impl Send for Handles {}
// SAFETY: as above.
unsafe impl Sync for Handles {}

impl Drop for Handles {
    fn drop(&mut self) {
        // SAFETY: each pointer is null or a live object opened by `Device::open`, closed
        // once, children before parents.
        unsafe {
            if !self.ep.is_null() {
                fi::fi_close(&mut (*self.ep).fid);
            }
            if !self.av.is_null() {
                fi::fi_close(&mut (*self.av).fid);
            }
            if !self.cq.is_null() {
                fi::fi_close(&mut (*self.cq).fid);
            }
            if !self.domain.is_null() {
                fi::fi_close(&mut (*self.domain).fid);
            }
            if !self.fabric.is_null() {
                fi::fi_close(&mut (*self.fabric).fid);
            }
            if !self.info.is_null() {
                fi::fi_freeinfo(self.info);
            }
        }
    }
}

/// The endpoint handle; null once closed.
struct Ep(*mut fi::fid_ep);

// SAFETY: as for `Handles`; the pointer is read under `Device::ep`'s lock, and closed
// (then nulled) under its write lock.
unsafe impl Send for Ep {}
// SAFETY: as above.
unsafe impl Sync for Ep {}

/// One opened device: fabric, domain, completion queue, address vector, RDM endpoint.
pub(crate) struct Device {
    handles: Handles,
    /// The endpoint: posts hold the read lock for as long as they use it, closing takes
    /// the write lock, so no post runs on a closed endpoint.
    ep: RwLock<Ep>,
    /// The context of every operation in flight on the endpoint.
    ops: OpSlab,
    /// Taken around every call when the provider did not grant FI_THREAD_SAFE.
    gate: Mutex<()>,
    serialize: bool,
    /// The completion queue has a working wait object: the progress thread can sleep in
    /// `fi_cq_sread`, during which the provider still progresses incoming RMA. Cleared
    /// if the provider turns out not to support waiting after all.
    waitable: AtomicBool,
    mr_mode: u64,
    /// The provider registers device memory (FI_HMEM granted).
    hmem: bool,
    /// Test knob ([`EfaConfig::device_memory_is_host`]): device memory is host memory
    /// standing in for it, registered as host memory.
    device_is_host: bool,
    address: Vec<u8>,
    domain_name: String,
    /// Keys this domain accepts when ferry chooses them (without `FI_MR_PROV_KEY`):
    /// random, so a peer cannot guess another region's key.
    key_mask: u64,
    /// Operations posted on this device (striping is visible in it).
    posts: AtomicU64,
    completions: Arc<dyn Completions>,
    stop: Arc<AtomicBool>,
    progress: Mutex<Option<JoinHandle<()>>>,
    /// Failed operations (a fault fails every one in flight), logged at a bounded rate.
    op_warns: ferry_transport_api::LogLimit,
    /// Posts the provider refused, logged at a bounded rate.
    pub(crate) post_warns: ferry_transport_api::LogLimit,
}

impl Device {
    fn serial(&self) -> Option<parking_lot::MutexGuard<'_, ()>> {
        self.serialize.then(|| self.gate.lock())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Before the handles (fields) close: the endpoint goes first, then the contexts
        // of whatever it still held are released.
        self.close(Instant::now() + CLOSE_GRACE);
    }
}

/// A registered memory region; closed before its device (it holds the device).
pub(crate) struct Mr {
    mr: *mut fi::fid_mr,
    key: u64,
    desc: *mut c_void,
    device: Arc<Device>,
}

// SAFETY: the MR handle is used only under the device's lock; `desc` is an opaque token.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl Mr {
    pub(crate) fn key(&self) -> u64 {
        self.key
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        let _serial = self.device.serial();
        // SAFETY: `mr` was opened by fi_mr_reg on the device's domain, which `device`
        // keeps open; closed once.
        unsafe { fi::fi_close(&mut (*self.mr).fid) };
    }
}

fn opened(what: &'static str, rc: i32) -> Result<(), TransportError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(failed(what, rc))
    }
}

/// The list `fi_getinfo` returned, freed when dropped.
struct InfoList(*mut fi::fi_info);

impl Drop for InfoList {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the list came from fi_getinfo and is freed once.
            unsafe { fi::fi_freeinfo(self.0) };
        }
    }
}

fn c_text(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: libfabric's strings are NUL-terminated and outlive this call.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl InfoList {
    /// What the provider offers for RDM endpoints with one-sided RMA.
    fn get(config: &EfaConfig) -> Result<InfoList, TransportError> {
        let provider = CString::new(config.provider.as_str())
            .map_err(|_| TransportError::invalid("provider name has a NUL byte"))?;
        let node = config
            .source
            .as_deref()
            .map(CString::new)
            .transpose()
            .map_err(|_| TransportError::invalid("source address has a NUL byte"))?;
        // With device memory wanted, ask for FI_HMEM first and settle for less.
        if config.hmem {
            if let Ok(list) = Self::get_with(config, &provider, node.as_ref(), true) {
                return Ok(list);
            }
        }
        Self::get_with(config, &provider, node.as_ref(), false)
    }

    fn get_with(
        config: &EfaConfig,
        provider: &CString,
        node: Option<&CString>,
        hmem: bool,
    ) -> Result<InfoList, TransportError> {
        let mut info: *mut fi::fi_info = null_mut();
        // SAFETY: the hints are allocated by libfabric and freed after the call; every
        // pointer passed is null where libfabric allows it or points to a live local.
        let rc = unsafe {
            let hints = fi::fi_dupinfo(null());
            if hints.is_null() {
                return Err(TransportError::invalid("fi_dupinfo failed (out of memory)"));
            }
            (*hints).caps = u64::from(
                fi::FI_RMA | fi::FI_READ | fi::FI_WRITE | fi::FI_REMOTE_READ | fi::FI_REMOTE_WRITE,
            ) | if hmem { fi::FI_HMEM } else { 0 };
            (*hints).mode = fi::FI_CONTEXT;
            (*(*hints).ep_attr).type_ = fi::fi_ep_type_FI_EP_RDM;
            (*(*hints).domain_attr).mr_mode = (fi::FI_MR_LOCAL
                | if hmem { fi::FI_MR_HMEM } else { 0 }
                | fi::FI_MR_VIRT_ADDR
                | fi::FI_MR_ALLOCATED
                | fi::FI_MR_PROV_KEY
                | fi::FI_MR_ENDPOINT) as i32;
            (*(*hints).domain_attr).threading = fi::fi_threading_FI_THREAD_SAFE;
            // fi_freeinfo frees this string with the hints.
            (*(*hints).fabric_attr).prov_name = libc::strdup(provider.as_ptr());
            let (node_ptr, flags) = match node {
                Some(n) => (n.as_ptr(), fi::FI_SOURCE),
                None => (null(), 0),
            };
            let rc = fi::fi_getinfo(API_VERSION, node_ptr, null(), flags, hints, &mut info);
            fi::fi_freeinfo(hints);
            rc
        };
        if rc != 0 || info.is_null() {
            return Err(TransportError::Unsupported {
                what: format!("libfabric provider `{}`", config.provider),
                why: format!(
                    "it found no device that supports RDM endpoints with one-sided RMA here ({}); \
                     `ferry info` lists the providers and devices found",
                    strerror(-rc)
                ),
            });
        }
        Ok(InfoList(info))
    }

    /// One entry per device (domain), in the provider's order: the first entry of each.
    fn devices(&self) -> Vec<(String, *mut fi::fi_info)> {
        let mut out: Vec<(String, *mut fi::fi_info)> = Vec::new();
        let mut cur = self.0;
        while !cur.is_null() {
            // SAFETY: `cur` is an entry of the live list.
            let (name, next) = unsafe { (c_text((*(*cur).domain_attr).name), (*cur).next) };
            if !out.iter().any(|(n, _)| *n == name) {
                out.push((name, cur));
            }
            cur = next;
        }
        out
    }
}

/// Opens the devices `config` selects (every device the provider lists, or the named
/// ones in their order), at most `max`, rail 0 first, each with its progress thread.
pub(crate) fn open_rails(
    config: &EfaConfig,
    max: usize,
    completions: &Arc<dyn Completions>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<Arc<Device>>, TransportError> {
    let list = InfoList::get(config)?;
    let found = list.devices();
    let chosen: Vec<*mut fi::fi_info> = if config.devices.is_empty() {
        // An IP provider's "devices" are interfaces (loopback among them): one, the
        // source's, unless named.
        let all = if config.ip_based() { 1 } else { found.len() };
        found.iter().take(all).map(|(_, info)| *info).collect()
    } else {
        config
            .devices
            .iter()
            .map(|want| {
                found
                    .iter()
                    .find(|(name, _)| name == want)
                    .map(|(_, info)| *info)
                    .ok_or_else(|| {
                        // The provider has devices, just not this one: a configuration
                        // error, not "no device" (which falling back to TCP would hide).
                        TransportError::invalid(format!(
                            "libfabric device `{want}` is not listed by provider `{}`, which \
                             lists {}; name one of those (`ferry info` lists them)",
                            config.provider,
                            found
                                .iter()
                                .map(|(n, _)| format!("`{n}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })
            })
            .collect::<Result<_, _>>()?
    };
    chosen
        .into_iter()
        .take(max.max(1))
        .map(|info| {
            // SAFETY: `info` is an entry of the live list; fi_dupinfo copies that one
            // entry, which the device then owns.
            let own = unsafe { fi::fi_dupinfo(info) };
            if own.is_null() {
                return Err(TransportError::invalid("fi_dupinfo failed (out of memory)"));
            }
            Device::open(own, config, completions.clone(), stop.clone())
        })
        .collect()
}

impl Device {
    /// Opens the device `info` describes (owned from here on) and starts its progress
    /// thread.
    fn open(
        info: *mut fi::fi_info,
        config: &EfaConfig,
        completions: Arc<dyn Completions>,
        stop: Arc<AtomicBool>,
    ) -> Result<Arc<Device>, TransportError> {
        let mut h = Handles {
            info,
            fabric: null_mut(),
            domain: null_mut(),
            cq: null_mut(),
            av: null_mut(),
            ep: null_mut(),
        };
        // SAFETY: every pointer passed is either null where libfabric allows it or points
        // to a live local; objects are stored in `h` as soon as they exist, so an early
        // return closes them (Handles::drop).
        unsafe {
            let info = h.info;
            opened(
                "fi_fabric",
                fi::fi_fabric((*info).fabric_attr, &mut h.fabric, null_mut()),
            )?;
            opened(
                "fi_domain",
                fi::fi_domain(h.fabric, info, &mut h.domain, null_mut()),
            )?;
            let serialize = (*(*info).domain_attr).threading != fi::fi_threading_FI_THREAD_SAFE;
            // IP-based providers move a peer's RMA only while the queue is read: a queue
            // the progress thread can sleep on (the provider progresses during the wait)
            // saves spinning. Others (EFA's hardware, shm) are polled: shm's wait blocks
            // other endpoints of the same process.
            let mut waitable = !serialize && config.ip_based();
            let mut cq_attr = fi::fi_cq_attr {
                format: fi::fi_cq_format_FI_CQ_FORMAT_CONTEXT,
                wait_obj: if waitable {
                    fi::fi_wait_obj_FI_WAIT_UNSPEC
                } else {
                    fi::fi_wait_obj_FI_WAIT_NONE
                },
                ..Default::default()
            };
            if waitable && fi::fi_cq_open(h.domain, &mut cq_attr, &mut h.cq, null_mut()) != 0 {
                h.cq = null_mut();
                waitable = false;
                cq_attr.wait_obj = fi::fi_wait_obj_FI_WAIT_NONE;
            }
            if h.cq.is_null() {
                opened(
                    "fi_cq_open",
                    fi::fi_cq_open(h.domain, &mut cq_attr, &mut h.cq, null_mut()),
                )?;
            }
            let mut av_attr = fi::fi_av_attr {
                type_: fi::fi_av_type_FI_AV_TABLE,
                ..Default::default()
            };
            opened(
                "fi_av_open",
                fi::fi_av_open(h.domain, &mut av_attr, &mut h.av, null_mut()),
            )?;
            opened(
                "fi_endpoint",
                fi::fi_endpoint(h.domain, info, &mut h.ep, null_mut()),
            )?;
            opened(
                "fi_ep_bind (address vector)",
                fi::fi_ep_bind(h.ep, &mut (*h.av).fid, 0),
            )?;
            opened(
                "fi_ep_bind (completion queue)",
                fi::fi_ep_bind(
                    h.ep,
                    &mut (*h.cq).fid,
                    u64::from(fi::FI_TRANSMIT | fi::FI_RECV),
                ),
            )?;
            opened("fi_enable", fi::fi_enable(h.ep))?;
            let mut address = vec![0u8; 256];
            let mut len = address.len();
            opened(
                "fi_getname",
                fi::fi_getname(&mut (*h.ep).fid, address.as_mut_ptr().cast(), &mut len),
            )?;
            address.truncate(len);
            let mr_mode = (*(*info).domain_attr).mr_mode as u32 as u64;
            let hmem = (*info).caps & fi::FI_HMEM != 0;
            let key_size = (*(*info).domain_attr).mr_key_size;
            let key_mask = if key_size == 0 || key_size >= 8 {
                u64::MAX
            } else {
                (1u64 << (8 * key_size)) - 1
            };
            let domain_name = c_text((*(*info).domain_attr).name);
            // Never more operations in flight than the transmit queue holds (beyond it
            // the provider answers FI_EAGAIN), plus the ones it lost.
            let tx_size = if (*info).tx_attr.is_null() {
                0
            } else {
                (*(*info).tx_attr).size
            };
            let ops = OpSlab::new(tx_size.clamp(MIN_OPS, MAX_OPS), config.lose_completions);
            let ep = Ep(std::mem::replace(&mut h.ep, null_mut()));
            let device = Arc::new(Device {
                handles: h,
                ep: RwLock::new(ep),
                ops,
                gate: Mutex::new(()),
                serialize,
                waitable: AtomicBool::new(waitable),
                mr_mode,
                hmem,
                device_is_host: config.device_memory_is_host,
                address,
                domain_name,
                key_mask,
                posts: AtomicU64::new(0),
                completions,
                stop,
                progress: Mutex::new(None),
                op_warns: ferry_transport_api::LogLimit::new("failed libfabric operations"),
                post_warns: ferry_transport_api::LogLimit::new("refused libfabric posts"),
            });
            let runner = device.clone();
            let busy_poll = config.busy_poll;
            let thread = std::thread::Builder::new()
                .name("ferry-efa-progress".into())
                .spawn(move || runner.progress_loop(busy_poll))
                .map_err(|e| {
                    TransportError::invalid(format!("cannot start the progress thread: {e}"))
                })?;
            *device.progress.lock() = Some(thread);
            Ok(device)
        }
    }

    pub(crate) fn address_hex(&self) -> String {
        self.address.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn domain_name(&self) -> &str {
        &self.domain_name
    }

    pub(crate) fn mr_mode(&self) -> u64 {
        self.mr_mode
    }

    pub(crate) fn posts(&self) -> u64 {
        self.posts.load(Ordering::Relaxed)
    }

    fn has(&self, bit: u32) -> bool {
        self.mr_mode & u64::from(bit) != 0
    }

    /// Registers a region (host memory, or device memory where the provider granted
    /// FI_HMEM) with the access peers get.
    pub(crate) fn register(
        self: &Arc<Self>,
        region: &RegionMemory,
        access: Access,
    ) -> Result<Mr, TransportError> {
        let (iface, cuda_device) = match region.location() {
            Location::Cuda { .. } if self.device_is_host => (fi::fi_hmem_iface_FI_HMEM_SYSTEM, 0),
            Location::Cuda { device } if self.hmem => (fi::fi_hmem_iface_FI_HMEM_CUDA, device),
            Location::Host { .. } => (fi::fi_hmem_iface_FI_HMEM_SYSTEM, 0),
            other => {
                return Err(TransportError::Unsupported {
                    what: format!("registering {other} memory with libfabric"),
                    why: format!(
                        "device `{}` does not register device memory (no FI_HMEM)",
                        self.domain_name
                    ),
                })
            }
        };
        let mut flags = u64::from(fi::FI_READ | fi::FI_WRITE);
        if access.remote_read() {
            flags |= u64::from(fi::FI_REMOTE_READ);
        }
        if access.remote_write() {
            flags |= u64::from(fi::FI_REMOTE_WRITE);
        }
        // The endpoint's lock before the gate, as in `post`.
        let ep = self.ep.read();
        if ep.0.is_null() {
            return Err(TransportError::Closed);
        }
        let serial = self.serial();
        let h = &self.handles;
        let mut mr: *mut fi::fid_mr = null_mut();
        let reg_err = |rc: i32| {
            TransportError::register_region(
                region.addr(),
                region.len() as u64,
                format!(
                    "fi_mr_regattr failed with error {} ({})",
                    -rc,
                    strerror(-rc)
                ),
            )
        };
        // SAFETY: the region's memory is valid for its whole life (RegionMemory's
        // contract) and the MR is closed (Mr::drop) before the domain; the endpoint is
        // open (checked under its read lock, held here).
        unsafe {
            let mut attempts = 0;
            let rc = loop {
                let requested_key = if self.has(fi::FI_MR_PROV_KEY) {
                    0
                } else {
                    (rand::random::<u64>() & self.key_mask).max(1)
                };
                let iov = fi::iovec {
                    iov_base: region.addr() as usize as *mut c_void,
                    iov_len: region.len().max(1),
                };
                let mut attr = fi::fi_mr_attr {
                    mr_iov: &iov,
                    iov_count: 1,
                    access: flags,
                    offset: 0,
                    requested_key,
                    context: null_mut(),
                    auth_key_size: 0,
                    auth_key: null_mut(),
                    iface,
                    device: Default::default(),
                };
                attr.device.cuda = cuda_device as i32;
                let rc = fi::fi_mr_regattr(h.domain, &attr, 0, &mut mr);
                // A chosen key that is taken already: draw another.
                attempts += 1;
                if rc != -(fi::FI_ENOKEY as i32) || attempts == 8 {
                    break rc;
                }
            };
            if rc != 0 {
                return Err(reg_err(rc));
            }
            if self.has(fi::FI_MR_ENDPOINT) {
                let rc = fi::fi_mr_bind(mr, &mut (*ep.0).fid, 0);
                let rc = if rc == 0 { fi::fi_mr_enable(mr) } else { rc };
                if rc != 0 {
                    fi::fi_close(&mut (*mr).fid);
                    return Err(reg_err(rc));
                }
            }
            let key = fi::fi_mr_key(mr);
            if key == fi::FI_KEY_NOTAVAIL {
                fi::fi_close(&mut (*mr).fid);
                return Err(TransportError::Unsupported {
                    what: format!("registering memory with device `{}`", self.domain_name),
                    why: "the provider uses raw keys (FI_MR_RAW), which ferry does not support"
                        .into(),
                });
            }
            let desc = fi::fi_mr_desc(mr);
            drop(serial);
            drop(ep);
            Ok(Mr {
                mr,
                key,
                desc,
                device: self.clone(),
            })
        }
    }

    /// Adds a peer's endpoint address (hex) to the address vector.
    pub(crate) fn insert_peer(&self, hex: &str) -> Result<fi::fi_addr_t, TransportError> {
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| TransportError::invalid(format!("`{hex}` is not a fabric address")))?;
        let mut addr: fi::fi_addr_t = fi::FI_ADDR_UNSPEC;
        let _serial = self.serial();
        let h = &self.handles;
        // SAFETY: `bytes` holds one address of the provider's format (from the peer's
        // fi_getname); `addr` receives one entry.
        let rc =
            unsafe { fi::fi_av_insert(h.av, bytes.as_ptr().cast(), 1, &mut addr, 0, null_mut()) };
        if rc != 1 {
            let reason = if rc < 0 {
                format!("fi_av_insert failed with error {} ({})", -rc, strerror(-rc))
            } else {
                "fi_av_insert rejected its address".to_string()
            };
            return Err(TransportError::handshake(hex, reason));
        }
        Ok(addr)
    }

    /// Posts one slice to `peer` with the remote region's `key` on this device. On
    /// `Ok` the slice will be reported exactly once: by its completion, by the deadline
    /// sweep (then `link` is marked dead), or when the endpoint closes. On `Err` nothing was
    /// posted and nothing will be reported.
    pub(crate) fn post(
        &self,
        peer: fi::fi_addr_t,
        local: &Mr,
        key: u64,
        slice: Slice,
        link: Option<&Arc<Link>>,
    ) -> Result<(), PostError> {
        let remote = if self.has(fi::FI_MR_VIRT_ADDR) {
            slice.remote_addr
        } else {
            slice.remote_addr - slice.remote_base
        };
        // The NIC's view of the local memory: host or device (registered with FI_HMEM),
        // handed to the provider, never dereferenced here.
        let Some(buf) = slice
            .local
            .dma_addr(slice.local_offset, slice.len)
            .map(|a| a as usize as *mut c_void)
        else {
            return Err(PostError::Fatal(fi::FI_EINVAL as i32));
        };
        // Local descriptors: required under FI_MR_LOCAL, and for device memory under
        // FI_MR_HMEM.
        let desc = if self.has(fi::FI_MR_LOCAL) || self.has(fi::FI_MR_HMEM) {
            local.desc
        } else {
            null_mut()
        };
        let (op_kind, len) = (slice.op, slice.len);
        let give_up = slice.deadline.min(Instant::now() + MAX_EAGAIN);
        // Held until the post is decided: closing the endpoint waits for it.
        let ep = self.ep.read();
        if ep.0.is_null() {
            return Err(PostError::Closed);
        }
        // Every context taken is like a full queue: drive progress until one frees.
        let mut waiting = slice;
        let (op, ctx) = loop {
            match self.ops.acquire(waiting, link.cloned()) {
                Ok(taken) => break taken,
                Err(back) => waiting = back,
            }
            if Instant::now() >= give_up {
                return Err(PostError::Busy);
            }
            if self.stop.load(Ordering::Acquire) {
                return Err(PostError::Closed);
            }
            if self.progress_once(None) == 0 {
                std::thread::yield_now();
            }
        };
        loop {
            let rc = {
                let _serial = self.serial();
                // SAFETY: `buf..buf+len` is registered memory kept alive by the slice
                // the slab holds for `ctx` until the provider has given `ctx` back (or
                // the endpoint is closed); `ctx` is a slab context, stable memory not
                // otherwise used while the operation is in flight; the endpoint is open
                // (read lock held).
                unsafe {
                    match op_kind {
                        Opcode::Read => fi::fi_read(ep.0, buf, len, desc, peer, remote, key, ctx),
                        Opcode::Write => {
                            let iov = fi::iovec {
                                iov_base: buf,
                                iov_len: len,
                            };
                            let rma = fi::fi_rma_iov {
                                addr: remote,
                                len,
                                key,
                            };
                            let mut descs = [desc];
                            let msg = fi::fi_msg_rma {
                                msg_iov: &iov,
                                desc: descs.as_mut_ptr(),
                                iov_count: 1,
                                addr: peer,
                                rma_iov: &rma,
                                rma_iov_count: 1,
                                context: ctx,
                                data: 0,
                            };
                            fi::fi_writemsg(
                                ep.0,
                                &msg,
                                u64::from(fi::FI_DELIVERY_COMPLETE | fi::FI_COMPLETION),
                            )
                        }
                    }
                }
            };
            if rc == 0 {
                self.posts.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            // The queue is full or the peer not yet connected: reap completions (which
            // also drives the provider's progress), then try again, within bounds.
            let failure = if rc != -(fi::FI_EAGAIN as isize) {
                // The caller logs it, naming the peer.
                Some(PostError::Fatal(-rc as i32))
            } else if Instant::now() >= give_up {
                Some(PostError::Busy)
            } else if self.stop.load(Ordering::Acquire) {
                Some(PostError::Closed)
            } else {
                None
            };
            if let Some(failure) = failure {
                // The provider did not take `ctx`: the slab takes it back. If the sweep
                // timed the slice out meanwhile, it has been reported: the post stands.
                return match self.ops.reclaim(op) {
                    Some((_, false)) => Err(failure),
                    Some((_, true)) | None => Ok(()),
                };
            }
            if self.progress_once(None) == 0 {
                std::thread::yield_now();
            }
        }
    }

    /// Reads completions once, waiting up to `wait_ms` when given (a sleep in which the
    /// provider keeps progressing); returns how many were handled.
    fn progress_once(&self, wait_ms: Option<i32>) -> usize {
        let mut entries = [fi::fi_cq_entry::default(); CQ_BATCH];
        let serial = self.serial();
        let h = &self.handles;
        // SAFETY: `entries` has room for CQ_BATCH entries of the CQ's format (CONTEXT);
        // sread is used only on a queue opened with a wait object.
        let rc = unsafe {
            match wait_ms {
                Some(ms) if self.waitable.load(Ordering::Relaxed) => {
                    fi::fi_cq_sread(h.cq, entries.as_mut_ptr().cast(), CQ_BATCH, null(), ms)
                }
                _ => fi::fi_cq_read(h.cq, entries.as_mut_ptr().cast(), CQ_BATCH),
            }
        };
        if wait_ms.is_some()
            && rc < 0
            && rc != -(fi::FI_EAGAIN as isize)
            && rc != -(fi::FI_EAVAIL as isize)
            && self.waitable.swap(false, Ordering::Relaxed)
        {
            tracing::info!(error = %strerror(-rc as i32), "the provider cannot wait on its completion queue; polling it instead");
        }
        if rc > 0 {
            drop(serial);
            let n = (rc as usize).min(CQ_BATCH);
            let mut out = Outcomes::new();
            // Contexts are matched against the slab by address, never dereferenced.
            self.ops
                .finish(entries[..n].iter().map(|e| (e.op_context, None)), &mut out);
            out.deliver(&*self.completions);
            return n;
        }
        if rc == -(fi::FI_EAVAIL as isize) {
            let mut err = fi::fi_cq_err_entry::default();
            // SAFETY: reads one error entry into a local of the right type.
            let n = unsafe { fi::fi_cq_readerr(h.cq, &mut err, 0) };
            if n != 1 {
                return 0;
            }
            let mut text = [0 as std::ffi::c_char; 256];
            // SAFETY: the provider formats into `text` (len given) and returns a C string.
            let message = unsafe {
                let p = fi::fi_cq_strerror(
                    h.cq,
                    err.prov_errno,
                    err.err_data,
                    text.as_mut_ptr(),
                    text.len(),
                );
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            drop(serial);
            // A fault fails every operation in flight at once: a few lines a second.
            if let Some(suppressed) = self.op_warns.admit() {
                // The operation's connection names the peer (an error entry without a
                // context, or one for an operation already ended, names none).
                let link = self.ops.link_of(err.op_context);
                let peer = link
                    .as_ref()
                    .map_or("unknown (an operation no longer in flight)", |l| l.peer());
                tracing::warn!(peer, domain = %self.domain_name, error = %strerror(err.err), provider_error = %message, suppressed, "libfabric operation failed");
            }
            if !err.op_context.is_null() {
                let mut out = Outcomes::new();
                self.ops.finish([(err.op_context, Some(err.err))], &mut out);
                out.deliver(&*self.completions);
            }
            return 1;
        }
        0
    }

    /// Ends the operations whose deadline passed without a completion (a provider that
    /// lost one reports nothing): each is reported `TimedOut` and its connection marked
    /// dead, so the next connect replaces it.
    fn sweep(&self, now: Instant) {
        if !self.ops.due(now) {
            return;
        }
        let mut out = Outcomes::new();
        let mut timed_out = 0;
        loop {
            let more = self.ops.expire(now, &mut out);
            timed_out += out.deliver(&*self.completions);
            if !more {
                break;
            }
        }
        if timed_out > 0 {
            tracing::warn!(domain = %self.domain_name, timed_out, "operations passed their deadline without a completion; their connections will be replaced");
        }
    }

    fn progress_loop(self: Arc<Self>, busy_poll: Duration) {
        let mut idle_since: Option<Instant> = None;
        let mut nap = MIN_NAP;
        while !self.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            self.sweep(now);
            let waitable = self.waitable.load(Ordering::Relaxed);
            let in_flight = self.ops.busy();
            // A queue without a wait object is polled for longer while operations are in
            // flight: their completions are close, and a nap delays each of them (a
            // queue that can wait wakes when one arrives).
            let spin_for = if in_flight && !waitable {
                busy_poll.max(IN_FLIGHT_SPIN)
            } else {
                busy_poll
            };
            let spinning = idle_since.is_none_or(|t| now.duration_since(t) < spin_for);
            // With operations in flight, wake often enough to sweep their deadlines.
            let wait_ms = if in_flight { 10 } else { 100 };
            let wait = (!spinning && waitable).then_some(wait_ms);
            let handled = self.progress_once(wait);
            // A passive target's RMA completes nothing on its queue, yet a read of a
            // queue without a wait object that took this long moved a peer's data (shm
            // copies it there): as busy as a completion, so no nap follows.
            let worked = !waitable && now.elapsed() >= BUSY_PASS;
            if handled > 0 || worked {
                idle_since = None;
                nap = MIN_NAP;
                continue;
            }
            if idle_since.is_none() {
                idle_since = Some(now);
            } else if spinning {
                std::thread::yield_now();
            } else if !waitable {
                // Without a wait object, a manual-progress provider only moves a peer's
                // RMA while the queue is read: back off slowly.
                std::thread::sleep(nap);
                nap = (nap * 2).min(MAX_NAP);
            }
        }
    }

    /// Closes the endpoint, then fails every operation still in flight with
    /// [`FailReason::Shutdown`] and frees every context: once the endpoint is closed the
    /// provider touches neither them nor the memory they name. Waits for posts under
    /// way (they stop retrying once the transport is stopped), and until `grace` for
    /// the operations in flight to complete. Call after
    /// [`stop_progress`](Self::stop_progress); idempotent.
    pub(crate) fn close(&self, grace: Instant) {
        // An endpoint closed under its operations can break the peer's provider (`shm`
        // peers in one process use each other's queues directly, and one was seen to
        // crash): let what is in flight finish first, briefly. Operations already timed
        // out are not waited for (they may never come back). Not under the endpoint's
        // lock: the completions delivered here may call back into the transport.
        if !self.ep.read().0.is_null() {
            while self.ops.awaiting() > 0 && Instant::now() < grace {
                if self.progress_once(None) == 0 {
                    std::thread::yield_now();
                }
            }
        }
        let mut ep = self.ep.write();
        if !ep.0.is_null() {
            let _serial = self.serial();
            // SAFETY: the endpoint is open (not null) and no post is using it (write
            // lock held); it is closed once and nulled.
            let rc = unsafe { fi::fi_close(&mut (*ep.0).fid) };
            if rc != 0 {
                tracing::warn!(domain = %self.domain_name, error = %strerror(-rc), "closing the libfabric endpoint failed");
            }
            ep.0 = null_mut();
        }
        drop(ep);
        let mut out = Outcomes::new();
        let mut shut_down = 0;
        loop {
            let more = self.ops.close(&mut out);
            shut_down += out.deliver(&*self.completions);
            if !more {
                break;
            }
        }
        if shut_down > 0 {
            tracing::info!(domain = %self.domain_name, shut_down, "operations in flight ended by shutdown");
        }
    }

    /// Whether the provider gave back every operation that passed its deadline: a rail
    /// that did not may have stopped completing anything (`shm` after a wrong key stops
    /// answering on that endpoint), so new connections leave it out.
    pub(crate) fn healthy(&self) -> bool {
        self.ops.stats().abandoned == 0
    }

    pub(crate) fn op_stats(&self) -> OpStats {
        self.ops.stats()
    }

    /// Stops the progress thread; returns false when called from it (it ends after
    /// the current pass).
    pub(crate) fn stop_progress(&self) -> bool {
        self.stop.store(true, Ordering::Release);
        let Some(t) = self.progress.lock().take() else {
            return true;
        };
        if t.thread().id() == std::thread::current().id() {
            return false;
        }
        let _ = t.join();
        true
    }
}

/// A provider and device that libfabric lists for RDM endpoints with RMA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderInfo {
    /// Provider name (`efa`, `tcp;ofi_rxm`, `shm`, ...).
    pub provider: String,
    /// Domain (device) name.
    pub domain: String,
    /// Fabric name.
    pub fabric: String,
}

/// Every provider and device usable for ferry's RDM RMA on this host.
pub fn providers() -> Vec<ProviderInfo> {
    let mut out = Vec::new();
    // SAFETY: hints and the returned list are allocated and freed by libfabric; the list
    // is only read.
    unsafe {
        let hints = fi::fi_dupinfo(null());
        if hints.is_null() {
            return out;
        }
        (*hints).caps = u64::from(fi::FI_RMA);
        (*(*hints).ep_attr).type_ = fi::fi_ep_type_FI_EP_RDM;
        let mut info: *mut fi::fi_info = null_mut();
        let rc = fi::fi_getinfo(API_VERSION, null(), null(), 0, hints, &mut info);
        fi::fi_freeinfo(hints);
        if rc != 0 {
            return out;
        }
        let text = c_text;
        let mut cur = info;
        while !cur.is_null() {
            out.push(ProviderInfo {
                provider: text((*(*cur).fabric_attr).prov_name),
                domain: text((*(*cur).domain_attr).name),
                fabric: text((*(*cur).fabric_attr).name),
            });
            cur = (*cur).next;
        }
        fi::fi_freeinfo(info);
    }
    out
}
