//! The libfabric edge: every `unsafe` call of the transport, each handle with one owner.

use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_transport_api::{
    Access, Completions, FailReason, Opcode, RegionMemory, Slice, TransportError,
};
use libfabric_sys as fi;
use parking_lot::Mutex;

use crate::EfaConfig;

/// The libfabric API version ferry asks for (Debian 12 ships 1.17).
const API_VERSION: u32 = fi::make_version(1, 17);
/// Longest a post keeps retrying `FI_EAGAIN` (draining the queue in between), within
/// the slice's own deadline. A first post to a peer may wait here while a provider such
/// as `tcp;ofi_rxm` connects.
const MAX_EAGAIN: Duration = Duration::from_secs(10);
/// Completions read per `fi_cq_read`.
const CQ_BATCH: usize = 64;

fn strerror(code: i32) -> String {
    // SAFETY: fi_strerror returns a pointer to a static, NUL-terminated string.
    unsafe { CStr::from_ptr(fi::fi_strerror(code)) }
        .to_string_lossy()
        .into_owned()
}

fn failed(what: &str, rc: i32) -> TransportError {
    TransportError::Unsupported {
        what: format!("libfabric {what}"),
        why: format!("{} (error {})", strerror(-rc), -rc),
    }
}

/// Why a post did not happen.
pub(crate) enum PostError {
    /// The provider kept answering `FI_EAGAIN`.
    Busy,
    /// The provider refused the operation (libfabric error code).
    Fatal(i32),
}

/// An operation in flight: the context libfabric writes into, then what to report.
#[repr(C)]
struct Op {
    ctx: fi::fi_context,
    slice: Slice,
}

/// The raw handles, closed in reverse order of opening.
struct Handles {
    info: *mut fi::fi_info,
    fabric: *mut fi::fid_fabric,
    domain: *mut fi::fid_domain,
    cq: *mut fi::fid_cq,
    av: *mut fi::fid_av,
    ep: *mut fi::fid_ep,
}

// SAFETY: the handles are only used under `Device::handles`' lock (FI_THREAD_DOMAIN: the
// caller serializes access to a domain's objects).
unsafe impl Send for Handles {}

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

/// One opened device: fabric, domain, completion queue, address vector, RDM endpoint.
pub(crate) struct Device {
    handles: Mutex<Handles>,
    mr_mode: u64,
    address: Vec<u8>,
    domain_name: String,
    next_key: AtomicU64,
    completions: Arc<dyn Completions>,
    stop: Arc<AtomicBool>,
    progress: Mutex<Option<JoinHandle<()>>>,
}

// SAFETY: all FFI state is in `handles`, behind a lock.
unsafe impl Sync for Device {}

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
        let _guard = self.device.handles.lock();
        // SAFETY: `mr` was opened by fi_mr_reg on the device's domain, which `device`
        // keeps open; closed once.
        unsafe { fi::fi_close(&mut (*self.mr).fid) };
    }
}

fn opened(what: &str, rc: i32) -> Result<(), TransportError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(failed(what, rc))
    }
}

impl Device {
    /// Opens the first device the provider lists, and starts its progress thread.
    pub(crate) fn open(
        config: &EfaConfig,
        completions: Arc<dyn Completions>,
        stop: Arc<AtomicBool>,
    ) -> Result<Arc<Device>, TransportError> {
        let provider = CString::new(config.provider.as_str())
            .map_err(|_| TransportError::invalid("provider name has a NUL byte"))?;
        let node = config
            .source
            .as_deref()
            .map(CString::new)
            .transpose()
            .map_err(|_| TransportError::invalid("source address has a NUL byte"))?;
        let mut h = Handles {
            info: null_mut(),
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
            let hints = fi::fi_dupinfo(null());
            if hints.is_null() {
                return Err(TransportError::invalid("fi_dupinfo failed (out of memory)"));
            }
            (*hints).caps = u64::from(
                fi::FI_RMA | fi::FI_READ | fi::FI_WRITE | fi::FI_REMOTE_READ | fi::FI_REMOTE_WRITE,
            );
            (*hints).mode = fi::FI_CONTEXT;
            (*(*hints).ep_attr).type_ = fi::fi_ep_type_FI_EP_RDM;
            (*(*hints).domain_attr).mr_mode = (fi::FI_MR_LOCAL
                | fi::FI_MR_VIRT_ADDR
                | fi::FI_MR_ALLOCATED
                | fi::FI_MR_PROV_KEY
                | fi::FI_MR_ENDPOINT) as i32;
            (*(*hints).domain_attr).threading = fi::fi_threading_FI_THREAD_DOMAIN;
            // fi_freeinfo frees this string with the hints.
            (*(*hints).fabric_attr).prov_name = libc::strdup(provider.as_ptr());
            let (node_ptr, flags) = match &node {
                Some(n) => (n.as_ptr(), fi::FI_SOURCE),
                None => (null(), 0),
            };
            let rc = fi::fi_getinfo(API_VERSION, node_ptr, null(), flags, hints, &mut h.info);
            fi::fi_freeinfo(hints);
            if rc != 0 || h.info.is_null() {
                h.info = null_mut();
                return Err(TransportError::Unsupported {
                    what: format!("libfabric provider `{}`", config.provider),
                    why: format!(
                        "it found no device that supports RDM endpoints with one-sided RMA here ({}); \
                         `ferry info` lists the providers and devices found",
                        strerror(-rc)
                    ),
                });
            }
            let info = h.info;
            opened(
                "fi_fabric",
                fi::fi_fabric((*info).fabric_attr, &mut h.fabric, null_mut()),
            )?;
            opened(
                "fi_domain",
                fi::fi_domain(h.fabric, info, &mut h.domain, null_mut()),
            )?;
            let mut cq_attr = fi::fi_cq_attr {
                format: fi::fi_cq_format_FI_CQ_FORMAT_CONTEXT,
                wait_obj: fi::fi_wait_obj_FI_WAIT_NONE,
                ..Default::default()
            };
            opened(
                "fi_cq_open",
                fi::fi_cq_open(h.domain, &mut cq_attr, &mut h.cq, null_mut()),
            )?;
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
                "binding the address vector",
                fi::fi_ep_bind(h.ep, &mut (*h.av).fid, 0),
            )?;
            opened(
                "binding the completion queue",
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
            let domain_name = if (*(*info).domain_attr).name.is_null() {
                String::new()
            } else {
                CStr::from_ptr((*(*info).domain_attr).name)
                    .to_string_lossy()
                    .into_owned()
            };
            let device = Arc::new(Device {
                handles: Mutex::new(h),
                mr_mode,
                address,
                domain_name,
                next_key: AtomicU64::new(1),
                completions,
                stop,
                progress: Mutex::new(None),
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

    fn has(&self, bit: u32) -> bool {
        self.mr_mode & u64::from(bit) != 0
    }

    /// Registers a host region with the access peers get.
    pub(crate) fn register(
        self: &Arc<Self>,
        region: &RegionMemory,
        access: Access,
    ) -> Result<Mr, TransportError> {
        if !region.location().is_host() {
            return Err(TransportError::Unsupported {
                what: format!("registering {} memory with libfabric", region.location()),
                why: "device memory registration (FI_HMEM) is not available in this build".into(),
            });
        }
        let mut flags = u64::from(fi::FI_READ | fi::FI_WRITE);
        if access.remote_read() {
            flags |= u64::from(fi::FI_REMOTE_READ);
        }
        if access.remote_write() {
            flags |= u64::from(fi::FI_REMOTE_WRITE);
        }
        let requested_key = if self.has(fi::FI_MR_PROV_KEY) {
            0
        } else {
            self.next_key.fetch_add(1, Ordering::Relaxed)
        };
        let mut h = self.handles.lock();
        let mut mr: *mut fi::fid_mr = null_mut();
        let reg_err = |rc: i32| TransportError::RegisterRegion {
            addr: region.addr(),
            len: region.len() as u64,
            reason: format!("{} (error {})", strerror(-rc), -rc),
        };
        // SAFETY: the region's memory is valid for its whole life (RegionMemory's
        // contract) and the MR is closed (Mr::drop) before the domain.
        unsafe {
            let rc = fi::fi_mr_reg(
                h.domain,
                region.addr() as usize as *const c_void,
                region.len().max(1),
                flags,
                0,
                requested_key,
                0,
                &mut mr,
                null_mut(),
            );
            if rc != 0 {
                return Err(reg_err(rc));
            }
            if self.has(fi::FI_MR_ENDPOINT) {
                let rc = fi::fi_mr_bind(mr, &mut (*h.ep).fid, 0);
                let rc = if rc == 0 { fi::fi_mr_enable(mr) } else { rc };
                if rc != 0 {
                    fi::fi_close(&mut (*mr).fid);
                    return Err(reg_err(rc));
                }
            }
            let key = fi::fi_mr_key(mr);
            if key == fi::FI_KEY_NOTAVAIL {
                fi::fi_close(&mut (*mr).fid);
                return Err(TransportError::RegisterRegion {
                    addr: region.addr(),
                    len: region.len() as u64,
                    reason: "the provider uses raw keys (FI_MR_RAW), which ferry does not support"
                        .into(),
                });
            }
            let desc = fi::fi_mr_desc(mr);
            drop(h);
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
        let h = self.handles.lock();
        // SAFETY: `bytes` holds one address of the provider's format (from the peer's
        // fi_getname); `addr` receives one entry.
        let rc =
            unsafe { fi::fi_av_insert(h.av, bytes.as_ptr().cast(), 1, &mut addr, 0, null_mut()) };
        if rc != 1 {
            return Err(TransportError::Handshake {
                peer: hex.to_string(),
                reason: format!(
                    "fi_av_insert: {}",
                    if rc < 0 {
                        strerror(-rc)
                    } else {
                        "address rejected".into()
                    }
                ),
            });
        }
        Ok(addr)
    }

    /// Posts one slice; on success libfabric owns it until its completion.
    pub(crate) fn post(
        &self,
        peer: fi::fi_addr_t,
        local: &Mr,
        slice: Slice,
    ) -> Result<(), PostError> {
        let remote = if self.has(fi::FI_MR_VIRT_ADDR) {
            slice.remote_addr
        } else {
            slice.remote_addr - slice.remote_base
        };
        let Some(buf) = slice
            .local
            .io_slice(slice.local_offset, slice.len)
            .map(|s| s.as_ptr() as *mut c_void)
        else {
            return Err(PostError::Fatal(fi::FI_EINVAL as i32));
        };
        let desc = if self.has(fi::FI_MR_LOCAL) {
            local.desc
        } else {
            null_mut()
        };
        let (op_kind, len, key) = (slice.op, slice.len, slice.remote_key);
        let give_up = slice.deadline.min(Instant::now() + MAX_EAGAIN);
        let op = Box::into_raw(Box::new(Op {
            ctx: fi::fi_context::default(),
            slice,
        }));
        loop {
            let rc = {
                let h = self.handles.lock();
                // SAFETY: `buf..buf+len` is registered host memory kept alive by the
                // slice inside `op`; `op` stays valid until its completion is read
                // (progress_once frees it); the endpoint is open.
                unsafe {
                    match op_kind {
                        Opcode::Read => {
                            fi::fi_read(h.ep, buf, len, desc, peer, remote, key, op.cast())
                        }
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
                                context: op.cast(),
                                data: 0,
                            };
                            fi::fi_writemsg(
                                h.ep,
                                &msg,
                                u64::from(fi::FI_DELIVERY_COMPLETE | fi::FI_COMPLETION),
                            )
                        }
                    }
                }
            };
            if rc == 0 {
                return Ok(());
            }
            if rc != -(fi::FI_EAGAIN as isize) {
                // SAFETY: the provider did not take `op`.
                drop(unsafe { Box::from_raw(op) });
                tracing::warn!(error = %strerror(-rc as i32), "libfabric refused a post");
                return Err(PostError::Fatal(-rc as i32));
            }
            // The queue is full or the peer not yet connected: reap completions (which
            // also drives the provider's progress), then try again.
            if Instant::now() >= give_up {
                // SAFETY: the provider did not take `op`.
                drop(unsafe { Box::from_raw(op) });
                return Err(PostError::Busy);
            }
            if self.progress_once() == 0 {
                std::thread::yield_now();
            }
        }
    }

    /// Reads completions once; returns how many were handled.
    fn progress_once(&self) -> usize {
        let mut entries = [fi::fi_cq_entry::default(); CQ_BATCH];
        let h = self.handles.lock();
        // SAFETY: `entries` has room for CQ_BATCH entries of the CQ's format (CONTEXT).
        let rc = unsafe { fi::fi_cq_read(h.cq, entries.as_mut_ptr().cast(), CQ_BATCH) };
        if rc > 0 {
            drop(h);
            let n = rc as usize;
            for e in &entries[..n] {
                // SAFETY: every operation is posted with a leaked Box<Op> as its context;
                // its completion is reported exactly once.
                let op = unsafe { Box::from_raw(e.op_context as *mut Op) };
                self.completions.complete(op.slice.token, Ok(op.slice.len));
            }
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
            drop(h);
            tracing::warn!(error = %strerror(err.err), provider_error = %message, "libfabric operation failed");
            if !err.op_context.is_null() {
                // SAFETY: as for successful completions.
                let op = unsafe { Box::from_raw(err.op_context as *mut Op) };
                self.completions
                    .complete(op.slice.token, Err(FailReason::Fabric(err.err)));
            }
            return 1;
        }
        0
    }

    fn progress_loop(self: Arc<Self>, busy_poll: Duration) {
        let mut idle_since: Option<Instant> = None;
        let mut nap = Duration::from_micros(20);
        while !self.stop.load(Ordering::Acquire) {
            if self.progress_once() > 0 {
                idle_since = None;
                nap = Duration::from_micros(20);
                continue;
            }
            let now = Instant::now();
            match idle_since {
                None => idle_since = Some(now),
                Some(t) if now.duration_since(t) < busy_poll => std::thread::yield_now(),
                Some(_) => {
                    // Manual-progress providers need the queue read even when this side
                    // posted nothing (a peer's RMA lands through it); back off slowly.
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(1));
                }
            }
        }
    }

    pub(crate) fn stop_progress(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.progress.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
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
        let text = |p: *const std::ffi::c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
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
