//! One driven port: its device context, protection domain, completion queue, the table of
//! operations in flight, the flush word peers read, and the progress thread.
//!
//! Every queue pair of the port sends on its one completion queue, sized for three
//! completions per operation of the table (a failed WRITE and its flushing READ each
//! complete, and the second may still be unread when the entry serves again), and every
//! queue pair's send queue holds two work requests per operation of the table: so
//! neither can overflow, and the table is the only limit. A slice that
//! finds the table full waits in the port's backlog (in order) until operations
//! complete; the progress thread posts it then, or reports it `TimedOut` at its deadline.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_transport_api::ops::{Keep, Link, OpRef, OpTable, Outcomes, OUTCOMES};
use ferry_transport_api::{Completions, FailReason, Opcode, Protocol, RemoteStatus, Slice};
use parking_lot::{Mutex, RwLock};
use rdma_sys as ib;

use crate::device;
use crate::exchange::{FlushWord, QpAddr};
use crate::qp::{self, QpSettings};
use crate::verbs::{Channel, Context, Cq, Mr, Pd, Qp, VerbError};

/// Completions read per poll (on the progress thread's stack).
const POLL_BATCH: usize = 32;
const _: () = assert!(POLL_BATCH <= OUTCOMES / 2);
/// Longest sleep of an idle progress thread between deadline sweeps.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// An open port.
pub(crate) struct OpenNic {
    /// Its index among the transport's ports (its rail).
    pub(crate) index: usize,
    pub(crate) info: device::Nic,
    pub(crate) settings: QpSettings,
    pd: Arc<Pd>,
    cq: Arc<Cq>,
    pub(crate) ops: OpTable,
    /// Send queue depth of every queue pair.
    depth: u32,
    /// 64 bytes registered for READs: peers read its first word to flush, this side's
    /// flushing READs land in its second. Its content means nothing.
    flush: FlushBuf,
    backlog: Mutex<VecDeque<Work>>,
    backlogged: AtomicBool,
    /// The queue pairs of the port by number, to mark one broken when it fails.
    qps: RwLock<HashMap<u32, Weak<QpSlot>>>,
    wake: OwnedFd,
    stop: AtomicBool,
    /// Set while the transport shuts down: failures then report `Shutdown`.
    shutting: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    completions: Arc<dyn Completions>,
    busy_poll: Duration,
}

/// Fields drop in order: the registration goes before the memory it covers. Atomics:
/// the NIC writes the memory behind the program's back (its content means nothing).
struct FlushBuf {
    mr: Mr,
    mem: Box<[std::sync::atomic::AtomicU64; 8]>,
}

/// One RC queue pair of a connection (or one a peer connected to).
pub(crate) struct QpSlot {
    pub(crate) qp: Qp,
    pub(crate) nic: Arc<OpenNic>,
    /// Failed: it is in the error state and takes no more work.
    pub(crate) broken: AtomicBool,
    /// Its connection's health, marked dead when this queue pair fails so the engine
    /// reconnects (fresh queue pairs) on its next use; and whom it connects to, as
    /// warnings name it.
    pub(crate) link: Arc<Link>,
    /// Its connection (set once the connection exists; never for a queue pair a peer
    /// connected to), to retry a failed slice on another queue pair.
    pub(crate) conn: Arc<OnceLock<Weak<crate::conn::ConnInner>>>,
}

impl Drop for QpSlot {
    fn drop(&mut self) {
        self.nic.qps.write().remove(&self.qp.num());
    }
}

/// A slice ready to post: where, and with which keys.
pub(crate) struct Work {
    pub(crate) slice: Slice,
    pub(crate) qp: Arc<QpSlot>,
    /// The local memory's registration, held until the operation ends.
    pub(crate) reg: Arc<crate::Registration>,
    pub(crate) lkey: u32,
    pub(crate) rkey: u32,
    /// Where to READ after a WRITE so that it is visible (see the crate docs).
    pub(crate) flush: Option<FlushWord>,
}

/// How a work completion's status reads as a slice's failure.
pub(crate) fn wc_reason(status: u32) -> FailReason {
    match status {
        // A consequence of an earlier failure on the queue pair.
        ib::ibv_wc_status::IBV_WC_WR_FLUSH_ERR => FailReason::ConnectionLost,
        // The peer's NIC refused the key or the range: most often a key of a region
        // the peer no longer has (it restarted or deregistered).
        ib::ibv_wc_status::IBV_WC_REM_ACCESS_ERR => FailReason::Remote(RemoteStatus::KeyMismatch),
        code => FailReason::Device {
            transport: Protocol::Rdma,
            code: i32::try_from(code).unwrap_or(i32::MAX),
        },
    }
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned by the returned OwnedFd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_nonblocking(fd: i32) {
    // SAFETY: fcntl on a descriptor the channel owns; flags only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// The limits of one port's queues.
pub(crate) struct Sizes {
    /// Operations in flight on the port.
    pub(crate) ops: u32,
    /// Completions to hold back (test knob).
    pub(crate) lose: u64,
    /// Busy polling before the progress thread sleeps.
    pub(crate) busy_poll: Duration,
    /// The device's limit on work requests per queue.
    pub(crate) max_qp_wr: u32,
    /// The device's limit on completion queue entries.
    pub(crate) max_cqe: u32,
}

impl OpenNic {
    /// Opens the port `info` of the device `ctx`.
    pub(crate) fn open(
        index: usize,
        ctx: &Arc<Context>,
        info: device::Nic,
        settings: QpSettings,
        sizes: &Sizes,
        completions: Arc<dyn Completions>,
    ) -> Result<Arc<OpenNic>, VerbError> {
        // Two work requests and up to two completions per operation.
        let ops = sizes
            .ops
            .min(sizes.max_qp_wr / 2)
            .min(sizes.max_cqe / 3)
            .max(1);
        let pd = Pd::new(ctx)?;
        let channel = Channel::new(ctx)?;
        set_nonblocking(channel.fd());
        let cq = Cq::new(ctx, 3 * ops, &channel)?;
        let mem: Box<[std::sync::atomic::AtomicU64; 8]> = Box::default();
        let access = ib::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ib::ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        // SAFETY: the box moves into the FlushBuf with the MR, which drops (deregisters)
        // before the box is freed; the heap memory does not move.
        let mr = unsafe {
            pd.register(
                mem.as_ptr() as u64,
                std::mem::size_of::<[u64; 8]>(),
                access.0,
            )?
        };
        let wake = eventfd().map_err(|error| VerbError {
            verb: "eventfd",
            error,
        })?;
        Ok(Arc::new(OpenNic {
            index,
            info,
            settings,
            pd,
            cq,
            ops: OpTable::new(ops as usize, sizes.lose),
            depth: 2 * ops,
            flush: FlushBuf { mr, mem },
            backlog: Mutex::new(VecDeque::with_capacity(ops as usize)),
            backlogged: AtomicBool::new(false),
            qps: RwLock::new(HashMap::new()),
            wake,
            stop: AtomicBool::new(false),
            shutting: AtomicBool::new(false),
            thread: Mutex::new(None),
            completions,
            busy_poll: sizes.busy_poll,
        }))
    }

    /// Starts the progress thread.
    pub(crate) fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let me = self.clone();
        let t = std::thread::Builder::new()
            .name(format!("ferry-rdma-{}", self.info.label()))
            .spawn(move || me.progress())?;
        *self.thread.lock() = Some(t);
        Ok(())
    }

    pub(crate) fn pd(&self) -> &Arc<Pd> {
        &self.pd
    }

    /// The flush word peers read on this port.
    pub(crate) fn flush_word(&self) -> FlushWord {
        FlushWord {
            nic: self.index as u8,
            addr: self.flush.mem.as_ptr() as u64,
            rkey: self.flush.mr.rkey(),
        }
    }

    /// A new queue pair in RESET, with what the peer needs to connect to it. One that
    /// only answers a peer (`sending` false: the peer connected to this side) gets a
    /// send queue of one entry, as it never sends.
    pub(crate) fn new_qp(
        self: &Arc<Self>,
        sending: bool,
        peer_nic: usize,
        link: Arc<Link>,
        conn: Arc<OnceLock<Weak<crate::conn::ConnInner>>>,
    ) -> Result<(Arc<QpSlot>, QpAddr), VerbError> {
        let qp = Qp::new(&self.pd, &self.cq, if sending { self.depth } else { 1 })?;
        let psn = rand::random::<u32>() & 0xff_ffff;
        let addr = QpAddr {
            nic: self.index as u8,
            peer_nic: peer_nic as u8,
            qpn: qp.num(),
            psn,
            lid: self.info.lid,
            gid: self.info.gid,
            mtu: self.info.mtu,
            rd_atomic: self.settings.rd_atomic,
        };
        let slot = Arc::new(QpSlot {
            qp,
            nic: self.clone(),
            broken: AtomicBool::new(false),
            link,
            conn,
        });
        self.qps.write().insert(addr.qpn, Arc::downgrade(&slot));
        Ok((slot, addr))
    }

    /// Brings a queue pair from RESET to RTS towards `peer`, sending from `psn`.
    pub(crate) fn connect_qp(
        &self,
        slot: &QpSlot,
        peer: &QpAddr,
        psn: u32,
    ) -> Result<(), VerbError> {
        for t in qp::bring_up(&self.settings, peer, psn) {
            slot.qp.modify(&t)?;
        }
        Ok(())
    }

    /// Takes `work` on: posts it now, or queues it behind the backlog. `Err` hands the
    /// slice back unposted (nothing will report it).
    pub(crate) fn submit(&self, work: Work) -> Result<(), (FailReason, Slice)> {
        if self.stop.load(Ordering::Acquire) {
            return Err((FailReason::Shutdown, work.slice));
        }
        if self.backlogged.load(Ordering::Acquire) {
            return self.queue(work);
        }
        match self.post(work) {
            Posted::Yes => Ok(()),
            Posted::Full(work) => self.queue(work),
            Posted::No(reason, slice) => Err((reason, slice)),
        }
    }

    /// Puts `work` behind the backlog, unless the port is stopping (checked under the
    /// backlog's lock, which `close` drains under: nothing is queued after it).
    fn queue(&self, work: Work) -> Result<(), (FailReason, Slice)> {
        let mut b = self.backlog.lock();
        if self.stop.load(Ordering::Acquire) {
            return Err((FailReason::Shutdown, work.slice));
        }
        b.push_back(work);
        self.backlogged.store(true, Ordering::Release);
        drop(b);
        self.wake();
        Ok(())
    }

    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Posts one slice on its queue pair.
    fn post(&self, work: Work) -> Posted {
        let Work {
            slice,
            qp,
            reg,
            lkey,
            rkey,
            flush,
        } = work;
        if qp.broken.load(Ordering::Acquire) {
            return Posted::No(FailReason::ConnectionLost, slice);
        }
        let Some(addr) = slice.local.dma_addr(slice.local_offset, slice.len) else {
            return Posted::No(FailReason::Unsupported, slice);
        };
        let Ok(len) = u32::try_from(slice.len) else {
            return Posted::No(FailReason::Unsupported, slice);
        };
        let (op, remote) = (slice.op, slice.remote_addr);
        // The operation holds its queue pair (never destroyed with work on it) and the
        // registration of its memory (its keys stay valid until it ends).
        let keep: Keep = [Some(qp.clone()), Some(reg.clone())];
        let op_ref = match self.ops.acquire(slice, Some(qp.link.clone()), keep) {
            Ok(r) => r,
            Err(slice) => {
                return Posted::Full(Work {
                    slice,
                    qp,
                    reg,
                    lkey,
                    rkey,
                    flush,
                })
            }
        };
        if self.stop.load(Ordering::Acquire) {
            // Shutting down since the check in `submit`: `close` may have swept the table
            // already, and nobody reads completions any more. Take it back unposted.
            return match self.ops.reclaim(op_ref) {
                Some((slice, false)) => Posted::No(FailReason::Shutdown, slice),
                // Reported by the sweep or by `close` already.
                _ => Posted::Yes,
            };
        }
        let word = op_ref.to_word();
        let mut sge = ib::ibv_sge {
            addr,
            length: len,
            lkey,
        };
        let mut flush_sge = ib::ibv_sge {
            addr: self.flush.mem.as_ptr() as u64 + 8,
            length: 8,
            lkey: self.flush.mr.lkey(),
        };
        // SAFETY: plain C structs; all-zero is valid.
        let mut read: ib::ibv_send_wr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut wr: ib::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = word;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.wr.rdma = ib::rdma_t {
            remote_addr: remote,
            rkey,
        };
        let chained = match (op, flush) {
            (Opcode::Write, Some(f)) => {
                read.wr_id = word;
                read.sg_list = &mut flush_sge;
                read.num_sge = 1;
                read.opcode = ib::ibv_wr_opcode::IBV_WR_RDMA_READ;
                read.send_flags = ib::ibv_send_flags::IBV_SEND_SIGNALED.0;
                read.wr.rdma = ib::rdma_t {
                    remote_addr: f.addr,
                    rkey: f.rkey,
                };
                true
            }
            _ => false,
        };
        wr.opcode = match op {
            Opcode::Write => ib::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            Opcode::Read => ib::ibv_wr_opcode::IBV_WR_RDMA_READ,
        };
        if chained {
            // Unsignaled: the READ behind it completes only after it (an RC queue pair
            // executes in order), and an error completes it anyway.
            wr.next = &mut read;
        } else {
            wr.send_flags = ib::ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        // SAFETY: the local range is registered on this port (`lkey`, looked up from
        // the region's registration) and the slice (with its memory) stays in the
        // operation table until the completion or the queue pair's end; the flush sink is
        // ours and registered; both work requests and their lists live until
        // ibv_post_send returns (it copies them).
        match unsafe { qp.qp.post(&mut wr) } {
            Ok(()) => Posted::Yes,
            Err((error, nothing)) => {
                tracing::warn!(peer = %qp.link.peer(), nic = %self.info.label(), %error, "ibv_post_send refused a work request; the queue pair is failed");
                qp.broken.store(true, Ordering::Release);
                qp.link.kill();
                if nothing {
                    match self.ops.reclaim(op_ref) {
                        Some((slice, false)) => {
                            return Posted::No(
                                FailReason::Device {
                                    transport: Protocol::Rdma,
                                    code: error.raw_os_error().unwrap_or(-1),
                                },
                                slice,
                            )
                        }
                        // Timed out meanwhile: reported already.
                        _ => return Posted::Yes,
                    }
                }
                // Half a chain was posted: the unsignaled WRITE may have completed
                // already, silently. A signaled marker with the operation's id, posted
                // once the queue pair is in the error state, completes with a flush
                // error and ends the operation either way.
                qp.qp.fail();
                // SAFETY: a plain C struct; all-zero is valid.
                let mut marker: ib::ibv_send_wr = unsafe { std::mem::zeroed() };
                marker.wr_id = word;
                marker.opcode = ib::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                marker.send_flags = ib::ibv_send_flags::IBV_SEND_SIGNALED.0;
                // SAFETY: no memory is named (no scatter list); the request lives until
                // ibv_post_send returns.
                if unsafe { qp.qp.post(&mut marker) }.is_err() {
                    if let Some((slice, false)) = self.ops.reclaim(op_ref) {
                        let code = error.raw_os_error().unwrap_or(-1);
                        let reason = FailReason::Device {
                            transport: Protocol::Rdma,
                            code,
                        };
                        return Posted::No(reason, slice);
                    }
                }
                Posted::Yes
            }
        }
    }

    /// The progress thread: reads completions, posts the backlog, sweeps deadlines, and
    /// sleeps on the completion channel when there is nothing to do.
    fn progress(self: Arc<Self>) {
        // SAFETY: plain C structs; all-zero is valid.
        let mut wc: [ib::ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
        let mut idle_since: Option<Instant> = None;
        let mut armed = false;
        while !self.stop.load(Ordering::Acquire) {
            let n = match self.cq.poll(&mut wc) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(nic = %self.info.label(), error = %e, "cannot read the completion queue");
                    0
                }
            };
            if n > 0 {
                self.handle(&wc[..n]);
                idle_since = None;
                armed = false;
            }
            if self.backlogged.load(Ordering::Acquire) {
                self.drain_backlog(Instant::now());
            }
            let now = Instant::now();
            if self.ops.due(now) {
                let mut out = Outcomes::new();
                // A timed-out operation's queue pair is failed before its task hears of
                // it: in the error state the NIC moves no more bytes for it (contract 7:
                // nothing lands after a task ended).
                let stop_qp = |keep: &Keep| {
                    if let Some(slot) = qp_of(keep) {
                        slot.broken.store(true, Ordering::Release);
                        slot.link.kill();
                        slot.qp.fail();
                    }
                };
                while self.ops.expire_with(now, &mut out, stop_qp) {
                    out.deliver(&*self.completions);
                }
                out.deliver(&*self.completions);
            }
            if n > 0 {
                continue;
            }
            let since = *idle_since.get_or_insert(now);
            if now.duration_since(since) < self.busy_poll {
                std::hint::spin_loop();
                continue;
            }
            if !armed {
                // Arm, then poll once more: a completion between the last poll and the
                // arming raises no event.
                if let Err(e) = self.cq.arm() {
                    tracing::error!(nic = %self.info.label(), error = %e, "cannot arm the completion queue");
                }
                armed = true;
                continue;
            }
            self.sleep();
            armed = false;
            idle_since = None;
        }
    }

    /// Waits for a completion event, a wake-up or the next deadline.
    fn sleep(&self) {
        let mut fds = [
            libc::pollfd {
                fd: self.cq.channel().fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let wait = if self.ops.busy() || self.backlogged.load(Ordering::Acquire) {
            Duration::from_millis(10)
        } else {
            IDLE_WAIT
        };
        // SAFETY: two valid pollfds.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait.as_millis() as i32) };
        if ret <= 0 {
            return;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let _ = self.cq.take_event();
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a valid u64 from our eventfd.
            unsafe { libc::read(self.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
    }

    /// Ends the operations `wc` names, retrying failed slices on another queue pair of
    /// their connection when one is healthy and their deadline allows.
    fn handle(&self, wc: &[ib::ibv_wc]) {
        let shutting = self.shutting.load(Ordering::Acquire);
        for w in wc
            .iter()
            .filter(|w| w.status != ib::ibv_wc_status::IBV_WC_SUCCESS)
        {
            let slot = self.qps.read().get(&w.qp_num).and_then(Weak::upgrade);
            if w.status != ib::ibv_wc_status::IBV_WC_WR_FLUSH_ERR {
                let peer = slot
                    .as_ref()
                    .map_or("a queue pair already dropped", |s| s.link.peer());
                tracing::warn!(peer, nic = %self.info.label(), status = w.status, vendor_error = w.vendor_err, qp = w.qp_num, "work completion failed; its queue pair is failed");
            }
            if let Some(slot) = slot {
                slot.broken.store(true, Ordering::Release);
                slot.link.kill();
            }
        }
        let done = wc.iter().map(|w| {
            let op = OpRef::from_word(w.wr_id);
            let error = (w.status != ib::ibv_wc_status::IBV_WC_SUCCESS).then(|| {
                if shutting {
                    FailReason::Shutdown
                } else {
                    wc_reason(w.status)
                }
            });
            (op.index, Some(op.generation), error)
        });
        let mut out = Outcomes::new();
        let stray = self.ops.finish(done, &mut out);
        if stray > 0 {
            // A failed WRITE and its flushing READ both complete; the second is stray.
            tracing::debug!(nic = %self.info.label(), stray, "completions of operations already ended");
        }
        out.deliver_or(&*self.completions, |slice, reason, keep| {
            if shutting || !reason.retryable() || Instant::now() >= slice.deadline {
                return Err(slice);
            }
            let Some(conn) = qp_of(keep).and_then(|slot| slot.conn.get().and_then(Weak::upgrade))
            else {
                return Err(slice);
            };
            conn.retry(slice)
        });
    }

    fn drain_backlog(&self, now: Instant) {
        loop {
            let work = {
                let mut b = self.backlog.lock();
                let w = b.pop_front();
                if b.is_empty() {
                    self.backlogged.store(false, Ordering::Release);
                }
                w
            };
            let Some(work) = work else { return };
            if now >= work.slice.deadline {
                self.completions
                    .complete(work.slice.token, Err(FailReason::TimedOut));
                continue;
            }
            match self.post(work) {
                Posted::Yes => {}
                Posted::Full(work) => {
                    let mut b = self.backlog.lock();
                    b.push_front(work);
                    self.backlogged.store(true, Ordering::Release);
                    drop(b);
                    self.expire_backlog(now);
                    return;
                }
                Posted::No(reason, slice) => self.completions.complete(slice.token, Err(reason)),
            }
        }
    }

    /// Reports every slice waiting in the backlog whose deadline passed by `now`, not
    /// only those at its head (which may wait on a table full of slower operations).
    fn expire_backlog(&self, now: Instant) {
        loop {
            let expired = {
                let mut b = self.backlog.lock();
                let at = b.iter().position(|w| now >= w.slice.deadline);
                let w = at.and_then(|i| b.remove(i));
                if b.is_empty() {
                    self.backlogged.store(false, Ordering::Release);
                }
                w
            };
            let Some(work) = expired else { return };
            self.completions
                .complete(work.slice.token, Err(FailReason::TimedOut));
        }
    }

    /// Stops the progress thread (first half of shutdown).
    pub(crate) fn stop(&self) {
        self.shutting.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        self.wake();
        let t = self.thread.lock().take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// Second half of shutdown, once no thread posts any more: fails every queue pair
    /// (their work completes with a flush error, reported `Shutdown`), reads those
    /// completions for up to `patience`, then reports whatever is left `Shutdown` and
    /// releases it, and the backlog with it.
    pub(crate) fn close(&self, patience: Duration) {
        let slots: Vec<Arc<QpSlot>> = self.qps.read().values().filter_map(Weak::upgrade).collect();
        for s in &slots {
            s.broken.store(true, Ordering::Release);
            s.qp.fail();
        }
        drop(slots);
        // SAFETY: plain C structs; all-zero is valid.
        let mut wc: [ib::ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
        let until = Instant::now() + patience;
        while self.ops.awaiting() > 0 && Instant::now() < until {
            match self.cq.poll(&mut wc) {
                Ok(0) => std::thread::sleep(Duration::from_millis(1)),
                Ok(n) => self.handle(&wc[..n]),
                Err(_) => break,
            }
        }
        let mut out = Outcomes::new();
        while self.ops.close(&mut out) {
            out.deliver(&*self.completions);
        }
        out.deliver(&*self.completions);
        let backlog: Vec<Work> = self.backlog.lock().drain(..).collect();
        self.backlogged.store(false, Ordering::Release);
        for w in backlog {
            self.completions
                .complete(w.slice.token, Err(FailReason::Shutdown));
        }
    }
}

/// The queue pair an operation was posted on, from what it keeps.
fn qp_of(keep: &Keep) -> Option<&QpSlot> {
    keep[0].as_ref()?.downcast_ref::<QpSlot>()
}

enum Posted {
    Yes,
    /// The operation table is full: queue it.
    Full(Work),
    /// Not posted and not reported.
    No(FailReason, Slice),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_completion_statuses_read_as_reasons() {
        assert_eq!(
            wc_reason(ib::ibv_wc_status::IBV_WC_WR_FLUSH_ERR),
            FailReason::ConnectionLost
        );
        let remote = wc_reason(ib::ibv_wc_status::IBV_WC_REM_ACCESS_ERR);
        assert!(
            remote.suggests_stale_descriptor(),
            "a refused key refetches the descriptor"
        );
        let retry = wc_reason(ib::ibv_wc_status::IBV_WC_RETRY_EXC_ERR);
        assert_eq!(
            retry,
            FailReason::Device {
                transport: Protocol::Rdma,
                code: ib::ibv_wc_status::IBV_WC_RETRY_EXC_ERR as i32
            }
        );
        assert!(
            retry.retryable(),
            "a NIC failure may succeed over another path"
        );
        assert_eq!(FailReason::from_bits(retry.to_bits()), Some(retry));
    }
}
