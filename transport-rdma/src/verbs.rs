//! Owned ibverbs objects: each wraps one pointer, frees it once when dropped, and holds
//! its parent (a queue pair its protection domain and completion queue, ...), so
//! objects are always destroyed children first. The only `unsafe` of the crate's data
//! path besides the work requests themselves (`nic.rs`).
//!
//! libibverbs is thread-safe: every verb may be called from any thread, and providers
//! serialize calls on one queue pair or completion queue themselves.

use std::ffi::{c_int, c_void, CStr};
use std::io;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use rdma_sys as ib;

use crate::qp::Transition;

/// ibverbs' link layer codes (an anonymous enum in verbs.h).
pub(crate) const LINK_LAYER_INFINIBAND: u8 = 1;
pub(crate) const LINK_LAYER_ETHERNET: u8 = 2;

/// The error of the verb that just failed. ibverbs returns -1 and sets errno, or returns
/// the errno itself (`ibv_modify_qp`, `ibv_query_*`), by verb.
fn os_error(ret: c_int) -> io::Error {
    if ret > 0 {
        io::Error::from_raw_os_error(ret)
    } else {
        io::Error::last_os_error()
    }
}

/// A failed verb: which one, and the error.
#[derive(Debug)]
pub(crate) struct VerbError {
    pub(crate) verb: &'static str,
    pub(crate) error: io::Error,
}

impl std::fmt::Display for VerbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.verb, self.error)
    }
}

impl std::error::Error for VerbError {}

fn failed(verb: &'static str, ret: c_int) -> VerbError {
    VerbError {
        verb,
        error: os_error(ret),
    }
}

/// The host's device list, while it is needed to open devices (a device not opened
/// before the list is freed cannot be opened later).
pub(crate) struct DeviceList {
    list: NonNull<*mut ib::ibv_device>,
    len: usize,
}

/// One entry of the device list.
#[derive(Clone, Copy)]
pub(crate) struct RawDevice<'a> {
    ptr: NonNull<ib::ibv_device>,
    _list: &'a DeviceList,
}

impl DeviceList {
    /// The devices ibverbs lists. An error means "no RDMA here" in one of its forms:
    /// `ENOSYS` (a kernel without RDMA support), `ENOENT`/no sysfs class, or a library
    /// that failed to start.
    pub(crate) fn get() -> Result<DeviceList, io::Error> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer; the returned list is freed in Drop.
        let list = unsafe { ib::ibv_get_device_list(&mut n) };
        match NonNull::new(list) {
            Some(list) => Ok(DeviceList {
                list,
                len: usize::try_from(n).unwrap_or(0),
            }),
            None => Err(io::Error::last_os_error()),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = RawDevice<'_>> {
        (0..self.len).filter_map(move |i| {
            // SAFETY: the list holds `len` device pointers (NULL-terminated after them).
            let dev = unsafe { *self.list.as_ptr().add(i) };
            NonNull::new(dev).map(|ptr| RawDevice { ptr, _list: self })
        })
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from ibv_get_device_list and is freed once.
        unsafe { ib::ibv_free_device_list(self.list.as_ptr()) }
    }
}

impl RawDevice<'_> {
    pub(crate) fn name(&self) -> String {
        // SAFETY: the device is valid while the list lives; its name is a
        // NUL-terminated string ibverbs owns.
        let name = unsafe { ib::ibv_get_device_name(self.ptr.as_ptr()) };
        if name.is_null() {
            return String::new();
        }
        // SAFETY: non-null and NUL-terminated (above).
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }

    /// `(node type, transport type)`, ibverbs' codes.
    pub(crate) fn types(&self) -> (i32, i32) {
        // SAFETY: the device is valid while the list lives; plain fields.
        let d = unsafe { self.ptr.as_ref() };
        (d.node_type, d.transport_type)
    }

    pub(crate) fn open(&self) -> Result<Arc<Context>, VerbError> {
        // SAFETY: the device is valid while the list lives; the context is closed in
        // Context's Drop.
        let ctx = unsafe { ib::ibv_open_device(self.ptr.as_ptr()) };
        NonNull::new(ctx)
            .map(|ptr| Arc::new(Context { ptr }))
            .ok_or_else(|| failed("ibv_open_device", -1))
    }
}

/// An open device.
pub(crate) struct Context {
    ptr: NonNull<ib::ibv_context>,
}

// SAFETY: ibverbs contexts may be used from any thread (the library is thread-safe).
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: opened by ibv_open_device, closed once, after every child (each holds
        // an Arc of its context).
        unsafe { ib::ibv_close_device(self.ptr.as_ptr()) };
    }
}

/// What ferry reads of a device's attributes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceAttr {
    pub(crate) vendor_id: u32,
    pub(crate) vendor_part_id: u32,
    pub(crate) ports: u8,
    pub(crate) max_qp_wr: u32,
    pub(crate) max_cqe: u32,
    pub(crate) max_qp_rd_atom: u8,
    pub(crate) max_qp_init_rd_atom: u8,
}

/// What ferry reads of a port's attributes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PortAttr {
    pub(crate) state: u32,
    pub(crate) active_mtu: u32,
    pub(crate) lid: u16,
    pub(crate) link_layer: u8,
    pub(crate) gid_table: u32,
}

impl Context {
    pub(crate) fn query_device(&self) -> Result<DeviceAttr, VerbError> {
        // SAFETY: a plain C struct; all-zero is a valid value.
        let mut a: ib::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-pointer.
        let ret = unsafe { ib::ibv_query_device(self.ptr.as_ptr(), &mut a) };
        if ret != 0 {
            return Err(failed("ibv_query_device", ret));
        }
        Ok(DeviceAttr {
            vendor_id: a.vendor_id,
            vendor_part_id: a.vendor_part_id,
            ports: a.phys_port_cnt,
            max_qp_wr: u32::try_from(a.max_qp_wr).unwrap_or(0),
            max_cqe: u32::try_from(a.max_cqe).unwrap_or(0),
            max_qp_rd_atom: u8::try_from(a.max_qp_rd_atom.clamp(0, 16)).unwrap_or(0),
            max_qp_init_rd_atom: u8::try_from(a.max_qp_init_rd_atom.clamp(0, 16)).unwrap_or(0),
        })
    }

    pub(crate) fn query_port(&self, port: u8) -> Result<PortAttr, VerbError> {
        // SAFETY: a plain C struct; all-zero is a valid value.
        let mut a: ib::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-pointer of the full (non-compat) struct, which
        // is what ___ibv_query_port passes on with its size.
        let ret = unsafe { ib::___ibv_query_port(self.ptr.as_ptr(), port, &mut a) };
        if ret != 0 {
            return Err(failed("ibv_query_port", ret));
        }
        Ok(PortAttr {
            state: a.state,
            active_mtu: a.active_mtu,
            lid: a.lid,
            link_layer: a.link_layer,
            gid_table: u32::try_from(a.gid_tbl_len).unwrap_or(0),
        })
    }

    /// The GID at `index` of `port`'s table.
    pub(crate) fn query_gid(&self, port: u8, index: u8) -> Result<[u8; 16], VerbError> {
        // SAFETY: a plain C union of bytes.
        let mut gid: ib::ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-pointer.
        let ret =
            unsafe { ib::ibv_query_gid(self.ptr.as_ptr(), port, c_int::from(index), &mut gid) };
        if ret != 0 {
            return Err(failed("ibv_query_gid", ret));
        }
        // SAFETY: every bit pattern is a valid `raw`.
        Ok(unsafe { gid.raw })
    }
}

/// A protection domain.
pub(crate) struct Pd {
    ptr: NonNull<ib::ibv_pd>,
    _ctx: Arc<Context>,
}

// SAFETY: see Context.
unsafe impl Send for Pd {}
// SAFETY: see Context.
unsafe impl Sync for Pd {}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd, freed once after its MRs and QPs (they
        // hold an Arc of it).
        unsafe { ib::ibv_dealloc_pd(self.ptr.as_ptr()) };
    }
}

impl Pd {
    pub(crate) fn new(ctx: &Arc<Context>) -> Result<Arc<Pd>, VerbError> {
        // SAFETY: valid context.
        let pd = unsafe { ib::ibv_alloc_pd(ctx.ptr.as_ptr()) };
        NonNull::new(pd)
            .map(|ptr| {
                Arc::new(Pd {
                    ptr,
                    _ctx: ctx.clone(),
                })
            })
            .ok_or_else(|| failed("ibv_alloc_pd", -1))
    }

    /// Registers `len` bytes at `addr` with `access` (`IBV_ACCESS_*`).
    ///
    /// # Safety
    /// `addr..addr+len` must stay valid (mapped) until the region is dropped.
    pub(crate) unsafe fn register(
        self: &Arc<Self>,
        addr: u64,
        len: usize,
        access: u32,
    ) -> Result<Mr, VerbError> {
        // SAFETY: the caller keeps the memory mapped while the MR lives; access flags
        // are plain bits.
        let mr =
            unsafe { ib::ibv_reg_mr(self.ptr.as_ptr(), addr as *mut c_void, len, access as c_int) };
        NonNull::new(mr)
            .map(|ptr| Mr {
                ptr,
                _pd: self.clone(),
            })
            .ok_or_else(|| failed("ibv_reg_mr", -1))
    }

    /// Registers `len` bytes of a dma-buf (device memory exported by its driver) at
    /// `offset` into it, addressed by peers as `iova`.
    ///
    /// # Safety
    /// The dma-buf behind `fd` must hold `offset + len` bytes and stay exported until
    /// the region is dropped (the kernel keeps its own reference once registered).
    pub(crate) unsafe fn register_dmabuf(
        self: &Arc<Self>,
        fd: c_int,
        offset: u64,
        len: usize,
        iova: u64,
        access: u32,
    ) -> Result<Mr, VerbError> {
        // SAFETY: as the caller promises.
        let mr = unsafe {
            ib::ibv_reg_dmabuf_mr(self.ptr.as_ptr(), offset, len, iova, fd, access as c_int)
        };
        NonNull::new(mr)
            .map(|ptr| Mr {
                ptr,
                _pd: self.clone(),
            })
            .ok_or_else(|| failed("ibv_reg_dmabuf_mr", -1))
    }
}

/// A registered memory region.
pub(crate) struct Mr {
    ptr: NonNull<ib::ibv_mr>,
    _pd: Arc<Pd>,
}

// SAFETY: see Context; the MR's keys are read-only after registration.
unsafe impl Send for Mr {}
// SAFETY: see Context.
unsafe impl Sync for Mr {}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by ibv_reg_mr / ibv_reg_dmabuf_mr, deregistered once.
        unsafe { ib::ibv_dereg_mr(self.ptr.as_ptr()) };
    }
}

impl Mr {
    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: a field of a live MR, never written after registration.
        unsafe { self.ptr.as_ref().lkey }
    }

    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.ptr.as_ref().rkey }
    }
}

/// A completion channel: the file descriptor a completion queue's events arrive on.
pub(crate) struct Channel {
    ptr: NonNull<ib::ibv_comp_channel>,
    _ctx: Arc<Context>,
}

// SAFETY: see Context.
unsafe impl Send for Channel {}
// SAFETY: see Context.
unsafe impl Sync for Channel {}

impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_comp_channel, destroyed once after its CQ (the
        // CQ holds an Arc of it).
        unsafe { ib::ibv_destroy_comp_channel(self.ptr.as_ptr()) };
    }
}

impl Channel {
    pub(crate) fn new(ctx: &Arc<Context>) -> Result<Arc<Channel>, VerbError> {
        // SAFETY: valid context.
        let ch = unsafe { ib::ibv_create_comp_channel(ctx.ptr.as_ptr()) };
        NonNull::new(ch)
            .map(|ptr| {
                Arc::new(Channel {
                    ptr,
                    _ctx: ctx.clone(),
                })
            })
            .ok_or_else(|| failed("ibv_create_comp_channel", -1))
    }

    pub(crate) fn fd(&self) -> c_int {
        // SAFETY: a field of a live channel, fixed at creation.
        unsafe { self.ptr.as_ref().fd }
    }
}

/// A completion queue, with its channel.
pub(crate) struct Cq {
    ptr: NonNull<ib::ibv_cq>,
    channel: Arc<Channel>,
    /// Events taken from the channel and not yet acknowledged (acknowledged in batches
    /// and before destruction, which waits for them).
    unacked: std::sync::atomic::AtomicU32,
}

// SAFETY: see Context; one thread polls a CQ (the NIC's progress thread).
unsafe impl Send for Cq {}
// SAFETY: see Context.
unsafe impl Sync for Cq {}

impl Drop for Cq {
    fn drop(&mut self) {
        let n = self.unacked.swap(0, std::sync::atomic::Ordering::AcqRel);
        // SAFETY: events taken from this CQ's channel are acknowledged before it is
        // destroyed (ibv_destroy_cq waits for that); created by ibv_create_cq,
        // destroyed once after its QPs (they hold an Arc of it).
        unsafe {
            if n > 0 {
                ib::ibv_ack_cq_events(self.ptr.as_ptr(), n);
            }
            ib::ibv_destroy_cq(self.ptr.as_ptr());
        }
    }
}

impl Cq {
    pub(crate) fn new(
        ctx: &Arc<Context>,
        entries: u32,
        channel: &Arc<Channel>,
    ) -> Result<Arc<Cq>, VerbError> {
        // SAFETY: valid context and channel of that context.
        let cq = unsafe {
            ib::ibv_create_cq(
                ctx.ptr.as_ptr(),
                c_int::try_from(entries).unwrap_or(c_int::MAX),
                ptr::null_mut(),
                channel.ptr.as_ptr(),
                0,
            )
        };
        NonNull::new(cq)
            .map(|ptr| {
                Arc::new(Cq {
                    ptr,
                    channel: channel.clone(),
                    unacked: std::sync::atomic::AtomicU32::new(0),
                })
            })
            .ok_or_else(|| failed("ibv_create_cq", -1))
    }

    /// Reads up to `wc.len()` completions; returns how many.
    pub(crate) fn poll(&self, wc: &mut [ib::ibv_wc]) -> Result<usize, VerbError> {
        let n = c_int::try_from(wc.len()).unwrap_or(c_int::MAX);
        // SAFETY: valid CQ; `wc` has room for `n` entries.
        let got = unsafe { ib::ibv_poll_cq(self.ptr.as_ptr(), n, wc.as_mut_ptr()) };
        usize::try_from(got).map_err(|_| failed("ibv_poll_cq", got))
    }

    /// Asks for an event on the channel at the next completion.
    pub(crate) fn arm(&self) -> Result<(), VerbError> {
        // SAFETY: valid CQ.
        let ret = unsafe { ib::ibv_req_notify_cq(self.ptr.as_ptr(), 0) };
        if ret != 0 {
            return Err(failed("ibv_req_notify_cq", ret));
        }
        Ok(())
    }

    /// Takes one event from the channel (call only once its fd is readable); it is
    /// acknowledged later, in a batch.
    pub(crate) fn take_event(&self) -> Result<(), VerbError> {
        let mut cq: *mut ib::ibv_cq = ptr::null_mut();
        let mut ctx: *mut c_void = ptr::null_mut();
        // SAFETY: valid channel and out-pointers.
        let ret = unsafe { ib::ibv_get_cq_event(self.channel.ptr.as_ptr(), &mut cq, &mut ctx) };
        if ret != 0 {
            return Err(failed("ibv_get_cq_event", ret));
        }
        let n = self
            .unacked
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        if n >= 64 {
            let n = self.unacked.swap(0, std::sync::atomic::Ordering::AcqRel);
            // SAFETY: acknowledges events taken from this CQ's channel.
            unsafe { ib::ibv_ack_cq_events(self.ptr.as_ptr(), n) };
        }
        Ok(())
    }

    pub(crate) fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }
}

/// An RC queue pair.
pub(crate) struct Qp {
    ptr: NonNull<ib::ibv_qp>,
    _pd: Arc<Pd>,
    _cq: Arc<Cq>,
}

// SAFETY: see Context: posting to one QP from several threads is serialized by the
// provider.
unsafe impl Send for Qp {}
// SAFETY: see Context.
unsafe impl Sync for Qp {}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp, destroyed once, before its PD and CQ.
        unsafe { ib::ibv_destroy_qp(self.ptr.as_ptr()) };
    }
}

impl Qp {
    /// A new RC queue pair sending on `cq`, with room for `depth` outstanding work
    /// requests; it receives nothing (one-sided operations only).
    pub(crate) fn new(pd: &Arc<Pd>, cq: &Arc<Cq>, depth: u32) -> Result<Qp, VerbError> {
        // SAFETY: a plain C struct; all-zero is a valid value.
        let mut init: ib::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.ptr.as_ptr();
        init.recv_cq = cq.ptr.as_ptr();
        init.qp_type = ib::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = depth;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: valid PD and CQ of the same context; `init` is filled.
        let qp = unsafe { ib::ibv_create_qp(pd.ptr.as_ptr(), &mut init) };
        NonNull::new(qp)
            .map(|ptr| Qp {
                ptr,
                _pd: pd.clone(),
                _cq: cq.clone(),
            })
            .ok_or_else(|| failed("ibv_create_qp", -1))
    }

    pub(crate) fn num(&self) -> u32 {
        // SAFETY: a field of a live QP, fixed at creation.
        unsafe { self.ptr.as_ref().qp_num }
    }

    /// Applies one transition (see `qp.rs`).
    pub(crate) fn modify(&self, t: &Transition) -> Result<(), VerbError> {
        // SAFETY: a plain C struct; all-zero is a valid value.
        let mut a: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = t.state;
        a.port_num = t.port;
        a.pkey_index = 0;
        a.qp_access_flags = t.access;
        a.path_mtu = t.path_mtu;
        a.dest_qp_num = t.dest_qpn;
        a.rq_psn = t.rq_psn;
        a.max_dest_rd_atomic = t.max_dest_rd_atomic;
        a.min_rnr_timer = t.min_rnr_timer;
        a.ah_attr.is_global = u8::from(t.ah.is_global);
        a.ah_attr.dlid = t.ah.dlid;
        a.ah_attr.sl = t.ah.sl;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = t.ah.port;
        a.ah_attr.grh.dgid = ib::ibv_gid { raw: t.ah.dgid };
        a.ah_attr.grh.sgid_index = t.ah.sgid_index;
        a.ah_attr.grh.hop_limit = t.ah.hop_limit;
        a.ah_attr.grh.traffic_class = t.ah.traffic_class;
        a.sq_psn = t.sq_psn;
        a.timeout = t.timeout;
        a.retry_cnt = t.retry_cnt;
        a.rnr_retry = t.rnr_retry;
        a.max_rd_atomic = t.max_rd_atomic;
        // SAFETY: valid QP; `a` is filled for every bit of the mask.
        let ret = unsafe { ib::ibv_modify_qp(self.ptr.as_ptr(), &mut a, t.mask as c_int) };
        if ret != 0 {
            return Err(failed("ibv_modify_qp", ret));
        }
        Ok(())
    }

    /// Moves the queue pair to the error state: every work request still queued
    /// completes with a flush error, so nothing stays in flight.
    pub(crate) fn fail(&self) {
        let mut t = crate::qp::reset();
        t.state = ib::ibv_qp_state::IBV_QPS_ERR;
        if let Err(e) = self.modify(&t) {
            tracing::debug!(error = %e, "could not move a queue pair to the error state");
        }
    }

    /// Posts a chain of work requests. On failure, says whether none of them was
    /// posted (`true`) or only a tail of the chain was refused.
    ///
    /// # Safety
    /// Every request of the chain must name memory registered on this queue pair's
    /// device that stays valid until its completion (or the queue pair's destruction).
    pub(crate) unsafe fn post(&self, wr: &mut ib::ibv_send_wr) -> Result<(), (io::Error, bool)> {
        let first: *mut ib::ibv_send_wr = wr;
        let mut bad: *mut ib::ibv_send_wr = ptr::null_mut();
        // SAFETY: valid QP and chain, as the caller promises.
        let ret = unsafe { ib::ibv_post_send(self.ptr.as_ptr(), first, &mut bad) };
        if ret != 0 {
            return Err((os_error(ret), bad.is_null() || bad == first));
        }
        Ok(())
    }
}
