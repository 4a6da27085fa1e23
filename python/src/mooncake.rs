//! `ferry.mooncake.TransferEngine`: Mooncake's Python `TransferEngine`, method for method
//! (names, positional and keyword shapes, 0/-1 returns, batch ids, notifications), on
//! ferry's engine, so a connector written for Mooncake runs unmodified.
//!
//! Where Mooncake trusts its caller, this class checks:
//! - a peer address is the peer's absolute virtual address: it is mapped to a published
//!   buffer and offset through the peer's descriptor (fetched again once when it does not
//!   map: the peer may have registered since), and anything outside is refused;
//! - a local address must lie in memory registered here;
//! - async batch ids are the engine's ids (slot and generation): a stale, reused or
//!   forged id is -1, never a dangling pointer;
//! - `write_bytes_to_buffer`/`read_bytes_from_buffer` copy only inside registered memory.
//!
//! Every call that waits or moves data releases the GIL; every method may be called from
//! any thread.
#![allow(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::{Access, Batch, Buffer, Engine, EngineConfig, Location, Protocol, Segment};
use parking_lot::{Mutex, RwLock};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::api::PyEngine;
use crate::errors::rejected;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TransferEngine>()?;
    m.add_class::<TransferOpcode>()?;
    m.add_class::<TransferNotify>()?;
    Ok(())
}

/// What Mooncake calls the peer-to-peer metadata mode.
const P2P_HANDSHAKE: &str = "P2PHANDSHAKE";
/// Tags a notification that carries a `TransferNotify` name besides its message.
const NOTIFY_TAG: &[u8; 4] = b"MCN1";

/// READ or WRITE, as Mooncake numbers them.
#[pyclass(module = "ferry.mooncake", name = "TransferOpcode", eq, eq_int, frozen)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum TransferOpcode {
    Read = 0,
    Write = 1,
}

/// A notification: sent with `transfer_sync(..., notify=TransferNotify(name, msg))`,
/// received from `get_notifies()`.
#[pyclass(module = "ferry.mooncake", name = "TransferNotify", get_all, set_all)]
#[derive(Clone, Debug)]
pub(crate) struct TransferNotify {
    name: String,
    msg: String,
}

#[pymethods]
impl TransferNotify {
    #[new]
    #[pyo3(signature = (name=String::new(), msg=String::new()))]
    fn new(name: String, msg: String) -> Self {
        TransferNotify { name, msg }
    }

    fn __repr__(&self) -> String {
        format!("TransferNotify(name={:?}, msg={:?})", self.name, self.msg)
    }

    fn __eq__(&self, other: &Self) -> bool {
        self.name == other.name && self.msg == other.msg
    }
}

fn encode_notify(n: &TransferNotify) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + n.name.len() + n.msg.len());
    out.extend_from_slice(NOTIFY_TAG);
    out.extend_from_slice(&(n.name.len() as u32).to_le_bytes());
    out.extend_from_slice(n.name.as_bytes());
    out.extend_from_slice(n.msg.as_bytes());
    out
}

/// A received notification: a tagged one gives back its name and message; any other is
/// named by its sender's segment.
fn decode_notify(from: String, body: &[u8]) -> TransferNotify {
    let tagged = body.strip_prefix(NOTIFY_TAG.as_slice()).and_then(|rest| {
        let (len, rest) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        (rest.len() >= len).then(|| rest.split_at(len))
    });
    match tagged {
        Some((name, msg)) => TransferNotify {
            name: String::from_utf8_lossy(name).into_owned(),
            msg: String::from_utf8_lossy(msg).into_owned(),
        },
        None => TransferNotify {
            name: from,
            msg: String::from_utf8_lossy(body).into_owned(),
        },
    }
}

/// Registered local memory by start address.
struct Local {
    buffer: Buffer,
    /// From `allocate_managed_buffer` (freed by `free_managed_buffer`).
    managed: bool,
    /// One clone per request that names this memory, from mapping to the end of its
    /// transfer (a stream-ordered one may run much later): unregistering waits for them.
    users: Arc<()>,
}

impl Local {
    fn new(buffer: Buffer, managed: bool) -> Self {
        Local {
            buffer,
            managed,
            users: Arc::new(()),
        }
    }
}

/// An async batch, until `get_batch_transfer_status` or `transfer_check_status` ends it.
struct Pending {
    batch: Batch,
}

struct State {
    engine: Arc<Engine>,
    /// The transport used with peers (after any fall back).
    protocol: Protocol,
    local: RwLock<BTreeMap<u64, Local>>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// The engine as `ferry.Engine`, for `get_engine()`.
    py_engine: Py<PyEngine>,
    /// Why stream-ordered transfers failed, not yet reported to the caller.
    stream_failures: Mutex<Vec<String>>,
    /// Peer addresses a descriptor fetched again did not hold either, by segment, and
    /// when: within [`REFETCH_BACKOFF`] of that, the same address is refused without
    /// fetching again (each fetch is a connection to the peer). Other addresses of the
    /// peer still fetch. Expired entries go whenever one is added.
    useless_refetch: Mutex<HashMap<(String, u64), Instant>>,
}

/// How long after a fetch that did not help a peer's descriptor is not fetched again for
/// an address that does not map.
const REFETCH_BACKOFF: Duration = Duration::from_secs(1);

/// Why a request does not map.
enum Unmapped {
    /// The local range is not in memory registered here: the peer has nothing to do with it.
    Local(String),
    /// The peer's range starting at this address is in no buffer of the descriptor at
    /// hand (which may be out of date).
    Remote(u64, String),
}

/// Where a request's two ends are.
struct Request {
    local: Buffer,
    /// Holds off `unregister_memory` of `local` until the request is done.
    _use: Arc<()>,
    local_offset: usize,
    remote: ferry_engine::RemoteBuffer,
    remote_offset: u64,
    len: usize,
}

impl State {
    /// The registered buffer that holds `addr..addr+len`, and the offset of `addr`.
    fn local_at(&self, addr: u64, len: usize) -> Option<(Buffer, usize, Arc<()>)> {
        let local = self.local.read();
        let (&start, l) = local.range(..=addr).next_back()?;
        let offset = (addr - start) as usize;
        l.buffer
            .len()
            .checked_sub(offset)
            .filter(|&room| room >= len)
            .map(|_| (l.buffer.clone(), offset, l.users.clone()))
    }

    /// Checks and maps one request; `Err` says why it is refused.
    fn request(
        &self,
        segment: &Segment,
        local_addr: u64,
        peer_addr: u64,
        len: usize,
    ) -> Result<Request, Unmapped> {
        let (local, local_offset, _use) = self.local_at(local_addr, len).ok_or_else(|| {
            Unmapped::Local(format!("local range {local_addr:#x}+{len} is not inside memory registered with this engine"))
        })?;
        let (remote, remote_offset) = segment.locate(peer_addr, len as u64).ok_or_else(|| {
            Unmapped::Remote(
                peer_addr,
                format!(
                    "peer range {peer_addr:#x}+{len} is not inside a buffer segment `{}` publishes",
                    segment.name()
                ),
            )
        })?;
        Ok(Request {
            local,
            _use,
            local_offset,
            remote,
            remote_offset,
            len,
        })
    }

    /// Opens `target` and maps every request, fetching the descriptor again once when a
    /// peer address does not map (the peer may have registered memory since), unless a
    /// fetch made within [`REFETCH_BACKOFF`] did not hold that same address either: a
    /// caller that keeps naming a wrong address costs no connection per request. A local
    /// address that does not map fetches nothing.
    fn prepare(
        &self,
        target: &str,
        locals: &[u64],
        peers: &[u64],
        lens: &[usize],
    ) -> Result<(Segment, Vec<Request>), String> {
        if locals.len() != peers.len() || locals.len() != lens.len() {
            return Err(format!(
                "{} local addresses, {} peer addresses and {} lengths: the lists must be as long as each other",
                locals.len(),
                peers.len(),
                lens.len()
            ));
        }
        let mut segment = self
            .engine
            .open_segment(target)
            .map_err(|e| format!("cannot open segment `{target}`: {}", chain(&e)))?;
        // Every local address first: one that is not registered here is refused before
        // any peer address sends for the peer's descriptor.
        for (&l, &n) in locals.iter().zip(lens) {
            if self.local_at(l, n).is_none() {
                return Err(format!(
                    "local range {l:#x}+{n} is not inside memory registered with this engine"
                ));
            }
        }
        let mut refreshed = false;
        loop {
            let mapped: Result<Vec<Request>, Unmapped> = locals
                .iter()
                .zip(peers)
                .zip(lens)
                .map(|((&l, &p), &n)| self.request(&segment, l, p, n))
                .collect();
            match mapped {
                Ok(requests) => return Ok((segment, requests)),
                Err(Unmapped::Local(why)) => return Err(why),
                Err(Unmapped::Remote(addr, why)) if refreshed => {
                    let mut useless = self.useless_refetch.lock();
                    useless.retain(|_, at| at.elapsed() < REFETCH_BACKOFF);
                    useless.insert((target.to_string(), addr), Instant::now());
                    return Err(why);
                }
                Err(Unmapped::Remote(addr, why)) => {
                    let recent = self
                        .useless_refetch
                        .lock()
                        .get(&(target.to_string(), addr))
                        .is_some_and(|t| t.elapsed() < REFETCH_BACKOFF);
                    if recent {
                        return Err(format!(
                            "{why} (a descriptor fetched again less than {} s ago did not hold it either)",
                            REFETCH_BACKOFF.as_secs()
                        ));
                    }
                    refreshed = true;
                    segment = self
                        .engine
                        .refresh_segment(target)
                        .map_err(|e| format!("cannot open segment `{target}`: {}", chain(&e)))?;
                }
            }
        }
    }

    /// Submits one batch of `requests` with the compat deadline.
    fn submit(
        &self,
        requests: &[Request],
        op: TransferOpcode,
        timeout: Duration,
    ) -> Result<Batch, String> {
        let bytes: u64 = requests.iter().map(|r| r.len as u64).sum();
        // Mooncake's deadline: the transfer timeout plus 1 ns per byte.
        let mut b = self
            .engine
            .batch()
            .timeout(timeout + Duration::from_nanos(bytes));
        for r in requests {
            let added = match op {
                TransferOpcode::Write => {
                    b.write(&r.local, r.local_offset, &r.remote, r.remote_offset, r.len)
                }
                TransferOpcode::Read => {
                    b.read(&r.local, r.local_offset, &r.remote, r.remote_offset, r.len)
                }
            };
            added.map_err(|e| chain(&e))?;
        }
        b.submit().map_err(|e| chain(&e))
    }

    /// A whole synchronous transfer: 0, or -1 with the reason logged. A failure that
    /// suggests the peer changed (restarted, deregistered) is tried once more with its
    /// descriptor fetched again, within the same deadline.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &self,
        target: &str,
        locals: &[u64],
        peers: &[u64],
        lens: &[usize],
        op: TransferOpcode,
        notify: Option<&TransferNotify>,
        timeout: Duration,
    ) -> i32 {
        let start = std::time::Instant::now();
        let mut retried = false;
        loop {
            let (segment, requests) = match self.prepare(target, locals, peers, lens) {
                Ok(prepared) => prepared,
                Err(why) => {
                    tracing::warn!(peer = %target, %why, "transfer refused");
                    return -1;
                }
            };
            let left = timeout.saturating_sub(start.elapsed());
            let outcome = self
                .submit(&requests, op, left)
                .map_err(|why| (why, None))
                .and_then(|batch| {
                    batch
                        .wait(Duration::from_secs(u32::MAX as u64))
                        .map_err(|e| (chain(&e), first_reason(&e)))
                });
            match outcome {
                Ok(()) => {
                    if let Some(n) = notify {
                        if let Err(e) = self.engine.notify(&segment, &encode_notify(n)) {
                            tracing::warn!(peer = %target, error = %chain(&e), "transfer done; its notification failed");
                            return -1;
                        }
                    }
                    return 0;
                }
                // The peer restarted or changed its memory: its descriptor is fetched
                // again and the transfer tried once more, within the same deadline.
                Err((why, Some(reason)))
                    if !retried
                        && reason.suggests_stale_descriptor()
                        && start.elapsed() < timeout =>
                {
                    retried = true;
                    tracing::info!(peer = %target, %why, "transfer failed; trying once more with the peer's descriptor fetched again");
                }
                Err((why, _)) => {
                    tracing::warn!(peer = %target, %why, "transfer failed");
                    return -1;
                }
            }
        }
    }

    fn register(&self, addr: u64, len: usize, location: &str) -> Result<(), String> {
        if addr == 0 || len == 0 {
            return Err(format!("cannot register {len} bytes at {addr:#x}"));
        }
        let location = compat_location(location)?;
        let end = addr.checked_add(len as u64).ok_or("the range wraps")?;
        // The check and the insert under one lock: two registrations cannot both pass.
        let mut local = self.local.write();
        if let Some((&start, l)) = local.range(..end).next_back() {
            if start + l.buffer.len() as u64 > addr {
                return Err(format!(
                    "{addr:#x}+{len} overlaps memory registered at {start:#x}+{}",
                    l.buffer.len()
                ));
            }
        }
        // SAFETY: Mooncake's contract, which this method keeps: the caller registers
        // memory it owns and keeps it valid until it unregisters it.
        let buffer = unsafe {
            self.engine
                .register(addr as *mut u8, len, location, Access::RemoteReadWrite)
        }
        .map_err(|e| chain(&e))?;
        local.insert(addr, Local::new(buffer, false));
        Ok(())
    }

    /// Deregisters the memory at `addr` once no transfer names it any more (each ends by
    /// its deadline; a stream-ordered one once its stream reaches it and it has run).
    fn unregister(&self, addr: u64) -> Result<(), String> {
        let removed = self.local.write().remove(&addr);
        let Some(l) = removed else {
            return Err(format!("nothing is registered at {addr:#x}"));
        };
        let start = std::time::Instant::now();
        let mut warned = false;
        while Arc::strong_count(&l.users) > 1 {
            if !warned && start.elapsed() >= Duration::from_secs(5) {
                warned = true;
                tracing::warn!(
                    addr,
                    "unregistering waits for transfers still naming the memory"
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // Outside the lock: the drop waits for slices still in flight.
        drop(l);
        Ok(())
    }
}

/// Why the first failed task of a batch failed.
fn first_reason(e: &ferry_engine::Error) -> Option<ferry_engine::FailReason> {
    match e {
        ferry_engine::Error::TasksFailed { first_reason, .. } => Some(*first_reason),
        _ => None,
    }
}

/// The message of an error with its causes.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Mooncake's location strings: `*` (find out), `cpu`, `cpu:N`, `cuda:N`.
fn compat_location(text: &str) -> Result<Location, String> {
    if text == "*" || text.is_empty() {
        // Without CUDA support no device memory can be told apart: the address is
        // taken as host memory, as Mooncake's CPU builds take it.
        return Ok(if ferry_engine::cuda_status().compiled {
            Location::Auto
        } else {
            Location::host()
        });
    }
    Location::parse(text).map_err(|e| e.to_string())
}

/// `host` and, when given, `port` of a Mooncake `local_hostname` (`ip`, `ip:port`,
/// `[v6]:port`, bare v6).
fn split_host(text: &str) -> (String, Option<u16>) {
    if let Some(rest) = text.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
            return (host.to_string(), port);
        }
    }
    if text.matches(':').count() > 1 {
        // A bare IPv6 address (anything else is refused by `initialize`).
        return (text.to_string(), None);
    }
    match text.rsplit_once(':') {
        Some((host, port)) => match port.parse() {
            Ok(p) => (host.to_string(), Some(p)),
            Err(_) => (text.to_string(), None),
        },
        None => (text.to_string(), None),
    }
}

/// This host's address on its default route (no packet is sent), or 127.0.0.1.
fn primary_ip() -> String {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into())
}

fn join_host(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The transport for Mooncake's `protocol`, falling back to TCP (with a warning) when
/// this build or host lacks it, as Mooncake does; `MC_FORCE_TCP` forces TCP.
fn choose_protocol(asked: &str) -> Protocol {
    if std::env::var_os("MC_FORCE_TCP").is_some() {
        return Protocol::Tcp;
    }
    match Protocol::parse(asked) {
        Ok(p) if ferry_engine::compiled().contains(&p) => p,
        Ok(p) => {
            tracing::warn!(protocol = %p, "this build has no such transport; using TCP");
            Protocol::Tcp
        }
        Err(_) => {
            tracing::warn!(protocol = asked, "ferry has no such transport; using TCP");
            Protocol::Tcp
        }
    }
}

/// `MC_TRANSFER_TIMEOUT` (seconds, at least 5, default 30).
fn transfer_timeout() -> Duration {
    let secs = std::env::var("MC_TRANSFER_TIMEOUT")
        .ok()
        .map(|v| v.trim().parse::<i64>().unwrap_or(0).max(5) as u64)
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// Mooncake's `TransferEngine` on ferry. See the module documentation of
/// `ferry.mooncake` for where it is stricter than Mooncake.
#[pyclass(module = "ferry.mooncake", name = "TransferEngine", frozen)]
pub(crate) struct TransferEngine {
    state: RwLock<Option<Arc<State>>>,
    timeout: Duration,
    /// One `initialize` at a time.
    init: Mutex<()>,
}

impl Drop for TransferEngine {
    fn drop(&mut self) {
        // Shutting the engine down ends what is in flight and waits for nothing long, but
        // deregistering caller memory waits for transfers: without the GIL.
        if let Some(state) = self.state.get_mut().take() {
            Python::attach(|py| py.detach(move || drop(state)));
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // First the engine: what is in flight fails now (Shutdown) instead of holding
        // the registered memory below until its deadline.
        self.engine.shutdown();
    }
}

impl TransferEngine {
    fn state(&self) -> Option<Arc<State>> {
        self.state.read().clone()
    }

    fn opcode(op: &Bound<'_, PyAny>) -> PyResult<TransferOpcode> {
        if let Ok(op) = op.extract::<TransferOpcode>() {
            return Ok(op);
        }
        match op.extract::<i64>() {
            Ok(0) => Ok(TransferOpcode::Read),
            Ok(1) => Ok(TransferOpcode::Write),
            _ => Err(crate::errors::invalid(
                "opcode must be TransferOpcode.Read or TransferOpcode.Write",
            )),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn sync(
        &self,
        py: Python<'_>,
        target: &str,
        locals: Vec<u64>,
        peers: Vec<u64>,
        lens: Vec<usize>,
        op: TransferOpcode,
        notify: Option<TransferNotify>,
    ) -> i32 {
        let Some(state) = self.state() else {
            tracing::error!("transfer before initialize");
            return -1;
        };
        let timeout = self.timeout;
        let target = target.to_string();
        py.detach(move || {
            state.transfer(
                &target,
                &locals,
                &peers,
                &lens,
                op,
                notify.as_ref(),
                timeout,
            )
        })
    }

    /// A transfer ordered on a CUDA stream: checked and mapped now (a refusal raises),
    /// run once the stream reaches it, with later work on the stream waiting for it. A
    /// failure of the transfer itself is kept and raised by the next stream-ordered
    /// call or by `check_stream_transfers()`; the process is never ended.
    #[allow(clippy::too_many_arguments)]
    fn on_stream(
        &self,
        py: Python<'_>,
        target: &str,
        locals: Vec<u64>,
        peers: Vec<u64>,
        lens: Vec<usize>,
        op: TransferOpcode,
        stream: usize,
    ) -> PyResult<()> {
        let state = self
            .state()
            .ok_or_else(|| rejected("a stream-ordered transfer before initialize"))?;
        self.check_stream_transfers()?;
        let target = target.to_string();
        let (_, requests) = py
            .detach(|| state.prepare(&target, &locals, &peers, &lens))
            .map_err(rejected)?;
        let device = requests
            .iter()
            .find_map(|r| match r.local.location() {
                Location::Cuda { device } => Some(device),
                _ => None,
            })
            .unwrap_or(0);
        let timeout = self.timeout;
        let job_state = state.clone();
        let job = Box::new(move || {
            // On a driver thread, where CUDA may not be called: the transfer (which may
            // stage device memory through CUDA copies) runs on its own thread while this
            // callback holds the stream.
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let worker_state = job_state.clone();
            let spawned = std::thread::Builder::new()
                .name("ferry-stream-transfer".into())
                .spawn(move || {
                    let outcome = worker_state.submit(&requests, op, timeout).and_then(|b| {
                        b.wait(Duration::from_secs(u32::MAX as u64))
                            .map_err(|e| chain(&e))
                    });
                    let _ = done_tx.send(outcome);
                });
            let outcome = match spawned {
                Ok(_) => done_rx
                    .recv()
                    .unwrap_or_else(|_| Err("the transfer thread ended without an outcome".into())),
                Err(e) => Err(format!("cannot start the transfer thread: {e}")),
            };
            if let Err(why) = outcome {
                tracing::error!(target = %target, %why, "stream-ordered transfer failed");
                job_state.stream_failures.lock().push(why);
            }
        });
        ferry_engine::after_cuda_stream(device, stream, job)
            .map_err(|e| crate::errors::to_py(py, &e))
    }

    /// Raises the first stream-ordered failure not yet reported (and forgets them all).
    fn check_stream_transfers(&self) -> PyResult<()> {
        let Some(state) = self.state() else {
            return Ok(());
        };
        let failures = std::mem::take(&mut *state.stream_failures.lock());
        match failures.first() {
            None => Ok(()),
            Some(first) => Err(rejected(format!(
                "{} stream-ordered transfer(s) failed; the first: {first}",
                failures.len()
            ))),
        }
    }

    fn submit_async(
        &self,
        py: Python<'_>,
        target: &str,
        locals: Vec<u64>,
        peers: Vec<u64>,
        lens: Vec<usize>,
        op: TransferOpcode,
    ) -> u64 {
        let Some(state) = self.state() else {
            tracing::error!("transfer before initialize");
            return 0;
        };
        let timeout = self.timeout;
        let target = target.to_string();
        py.detach(move || {
            let submitted = state
                .prepare(&target, &locals, &peers, &lens)
                .and_then(|(_, requests)| state.submit(&requests, op, timeout));
            match submitted {
                Ok(batch) => {
                    let id = batch.id().to_u64();
                    state.pending.lock().insert(id, Pending { batch });
                    id
                }
                Err(why) => {
                    tracing::warn!(peer = %target, %why, "async transfer refused");
                    0
                }
            }
        })
    }
}

#[pymethods]
impl TransferEngine {
    #[new]
    fn new() -> Self {
        TransferEngine {
            state: RwLock::new(None),
            timeout: transfer_timeout(),
            init: Mutex::new(()),
        }
    }

    /// Starts the engine: `local_hostname` (`ip` or `ip:port`; with a port that port is
    /// bound and the name is exactly what was given), `metadata_server`
    /// (`P2PHANDSHAKE`), `protocol` (`tcp`, `efa`, `rdma`: a transport this build or host
    /// lacks falls back to TCP), `device_name` (comma-separated fabric devices, or "").
    /// 0 on success, -1 on failure (logged).
    fn initialize(
        &self,
        py: Python<'_>,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: Option<&str>,
    ) -> i32 {
        let (kind, server) = match metadata_server.split_once("://") {
            Some((kind, server)) => (kind.to_string(), server.to_string()),
            None if metadata_server == P2P_HANDSHAKE => (String::new(), metadata_server.into()),
            None => ("etcd".to_string(), metadata_server.to_string()),
        };
        self.initialize_ext(py, local_hostname, &server, protocol, device_name, &kind)
    }

    /// As `initialize`, with the metadata type (`etcd`, `redis`, `http`) given apart
    /// from the server; `metadata_type` comes last, as in Mooncake.
    fn initialize_ext(
        &self,
        py: Python<'_>,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: Option<&str>,
        metadata_type: &str,
    ) -> i32 {
        let _one_at_a_time = self.init.lock();
        if self.state.read().is_some() {
            tracing::error!("initialize: this TransferEngine is already initialized");
            return -1;
        }
        // Mooncake's metadata strings: P2PHANDSHAKE, or a server of `metadata_type`.
        let store = if metadata_server == P2P_HANDSHAKE {
            None
        } else {
            let url = if metadata_server.contains("://") {
                metadata_server.to_string()
            } else {
                format!("{metadata_type}://{metadata_server}")
            };
            if let Err(e) = ferry_engine::Metadata::parse(&url) {
                tracing::error!(metadata = %url, error = %chain(&e), "initialize: this metadata store cannot be used");
                return -1;
            }
            Some(url)
        };
        let protocol = choose_protocol(protocol);
        let (host, port) = split_host(local_hostname);
        if host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
            tracing::error!(
                local_hostname,
                "initialize: expected host, host:port, an IPv6 address or [v6]:port (Ascend's ip:port:npu_N is not supported)"
            );
            return -1;
        }
        let mut config = EngineConfig {
            protocol: protocol.name().to_string(),
            listen: join_host(&host, port.unwrap_or(0)),
            allow_tcp_only: true,
            ..EngineConfig::default()
        };
        if port.is_some() {
            config.advertise = Some(local_hostname.to_string());
        }
        if let Some(url) = store {
            // With a store, the segment is named by `local_hostname` as given, which need
            // not be a host: the port is then bound where `MC_TCP_BIND_ADDRESS` says, or
            // on this host's primary address, as Mooncake does.
            config.metadata = url;
            config.name = Some(local_hostname.to_string());
            config.advertise = None;
            if std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), 0)).is_err() {
                let ip = std::env::var("MC_TCP_BIND_ADDRESS")
                    .ok()
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(primary_ip);
                config.listen = join_host(&ip, port.unwrap_or(0));
            }
        }
        let devices: Vec<String> = device_name
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect();
        if let Err(why) = apply_devices(&mut config, protocol, devices) {
            tracing::error!(%why, "initialize");
            return -1;
        }
        let engine = match py.detach(|| Engine::from_config(&config)) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                tracing::error!(error = %chain(&e), "initialize: cannot start the engine");
                return -1;
            }
        };
        let used = engine.protocols().first().copied().unwrap_or(Protocol::Tcp);
        if used != protocol {
            tracing::warn!(asked = %protocol, used = %used, "initialize: no device for the asked transport; using TCP");
        }
        let py_engine = match Py::new(
            py,
            PyEngine {
                inner: engine.clone(),
            },
        ) {
            Ok(p) => p,
            Err(_) => return -1,
        };
        *self.state.write() = Some(Arc::new(State {
            engine,
            protocol: used,
            local: RwLock::new(BTreeMap::new()),
            pending: Mutex::new(HashMap::new()),
            py_engine,
            stream_failures: Mutex::new(Vec::new()),
            useless_refetch: Mutex::new(HashMap::new()),
        }));
        0
    }

    /// The port peers reach this engine on (its segment name is `host:port`); -1 before
    /// `initialize`.
    fn get_rpc_port(&self) -> i64 {
        self.state()
            .and_then(|s| {
                let address = s
                    .engine
                    .descriptor()
                    .endpoint(Protocol::Tcp)
                    .map(|e| e.address.clone())?;
                address
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<i64>().ok())
            })
            .unwrap_or(-1)
    }

    /// The transport in use with peers ("tcp", "efa", "rdma"), after any fall back; `None`
    /// before `initialize`.
    fn get_protocol(&self) -> Option<&'static str> {
        self.state().map(|s| s.protocol.name())
    }

    /// This engine's segment name; `None` before `initialize`.
    fn get_local_segment_name(&self) -> Option<String> {
        self.state().map(|s| s.engine.name())
    }

    /// Allocates and registers `length` bytes of host memory; its address, or 0.
    fn allocate_managed_buffer(&self, py: Python<'_>, length: usize) -> u64 {
        let Some(s) = self.state() else { return 0 };
        match py.detach(|| s.engine.allocate(length.max(1), Location::host())) {
            Ok(buffer) => {
                let addr = buffer.addr();
                s.local.write().insert(addr, Local::new(buffer, true));
                addr
            }
            Err(e) => {
                tracing::warn!(length, error = %chain(&e), "allocate_managed_buffer");
                0
            }
        }
    }

    /// Frees a managed buffer; 0, or -1 when `buffer_addr` is not one.
    fn free_managed_buffer(&self, py: Python<'_>, buffer_addr: u64, length: usize) -> i32 {
        let _ = length;
        let Some(s) = self.state() else { return -1 };
        let managed = s.local.read().get(&buffer_addr).is_some_and(|l| l.managed);
        if !managed {
            tracing::warn!(
                addr = buffer_addr,
                "free_managed_buffer: not a managed buffer"
            );
            return -1;
        }
        py.detach(|| s.unregister(buffer_addr)).map_or(-1, |()| 0)
    }

    /// One WRITE of `length` bytes from local `buffer` to the peer's address
    /// `peer_buffer_address` on segment `target_hostname`; 0, or -1 (logged).
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint=""))]
    fn transfer_sync_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: usize,
        transport_hint: &str,
    ) -> i32 {
        let _ = transport_hint;
        self.sync(
            py,
            target_hostname,
            vec![buffer],
            vec![peer_buffer_address],
            vec![length],
            TransferOpcode::Write,
            None,
        )
    }

    /// One READ of `length` bytes from the peer's address `peer_buffer_address` on
    /// segment `target_hostname` into local `buffer`; 0, or -1 (logged).
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint=""))]
    fn transfer_sync_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: usize,
        transport_hint: &str,
    ) -> i32 {
        let _ = transport_hint;
        self.sync(
            py,
            target_hostname,
            vec![buffer],
            vec![peer_buffer_address],
            vec![length],
            TransferOpcode::Read,
            None,
        )
    }

    /// One transfer, then (when `notify` is given) a notification to the peer. 0 or -1.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, opcode, notify=None, transport_hint=""))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_sync(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: usize,
        opcode: &Bound<'_, PyAny>,
        notify: Option<TransferNotify>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        let op = Self::opcode(opcode)?;
        Ok(self.sync(
            py,
            target_hostname,
            vec![buffer],
            vec![peer_buffer_address],
            vec![length],
            op,
            notify,
        ))
    }

    /// WRITEs of `lengths[i]` bytes from `buffers[i]` to the peer's
    /// `peer_buffer_addresses[i]`, as one batch; 0 when every one completed, else -1.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""))]
    fn batch_transfer_sync_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<usize>,
        transport_hint: &str,
    ) -> i32 {
        let _ = transport_hint;
        self.sync(
            py,
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            TransferOpcode::Write,
            None,
        )
    }

    /// READs of `lengths[i]` bytes from the peer's `peer_buffer_addresses[i]` into
    /// `buffers[i]`, as one batch; 0 when every one completed, else -1.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""))]
    fn batch_transfer_sync_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<usize>,
        transport_hint: &str,
    ) -> i32 {
        let _ = transport_hint;
        self.sync(
            py,
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            TransferOpcode::Read,
            None,
        )
    }

    /// READs or WRITEs (`opcode`) as one batch, then (when `notify` is given) a
    /// notification to the peer; 0 when every one completed, else -1.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, opcode, notify=None, transport_hint=""))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_sync(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<usize>,
        opcode: &Bound<'_, PyAny>,
        notify: Option<TransferNotify>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        let op = Self::opcode(opcode)?;
        Ok(self.sync(
            py,
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            op,
            notify,
        ))
    }

    /// Submits WRITEs as `batch_transfer_sync_write` does, without waiting: the batch id
    /// (nonzero) for `get_batch_transfer_status`, or 0 when refused.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""))]
    fn batch_transfer_async_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<usize>,
        transport_hint: &str,
    ) -> u64 {
        let _ = transport_hint;
        self.submit_async(
            py,
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            TransferOpcode::Write,
        )
    }

    /// Submits READs as `batch_transfer_sync_read` does, without waiting: the batch id
    /// (nonzero), or 0 when refused.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""))]
    fn batch_transfer_async_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<usize>,
        transport_hint: &str,
    ) -> u64 {
        let _ = transport_hint;
        self.submit_async(
            py,
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            TransferOpcode::Read,
        )
    }

    /// Submits a batch and returns its id (nonzero), or 0 when it was refused (logged).
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, opcode, transport_hint=""))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_async(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<usize>,
        opcode: &Bound<'_, PyAny>,
        transport_hint: &str,
    ) -> PyResult<u64> {
        let _ = transport_hint;
        let op = Self::opcode(opcode)?;
        Ok(self.submit_async(
            py,
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            op,
        ))
    }

    /// Waits for every batch in `batch_ids` (each ends by its deadline) and releases them:
    /// 0 when all completed, -1 when one failed, timed out, or is not a live id.
    fn get_batch_transfer_status(&self, py: Python<'_>, batch_ids: Vec<u64>) -> i32 {
        let Some(s) = self.state() else { return -1 };
        py.detach(|| {
            let mut waiting = Vec::with_capacity(batch_ids.len());
            {
                let mut pending = s.pending.lock();
                for id in &batch_ids {
                    match pending.remove(id) {
                        Some(p) => waiting.push((*id, p)),
                        None => {
                            tracing::warn!(id, "get_batch_transfer_status: not a live batch id");
                            return -1;
                        }
                    }
                }
            }
            // Until every batch completed, or the first failed (the rest are released,
            // as Mooncake does). Each ends by its deadline.
            while let Some((id, first)) = waiting.first() {
                match first.batch.wait(Duration::from_millis(1)) {
                    Ok(()) => {
                        waiting.remove(0);
                    }
                    Err(ferry_engine::Error::WaitTimedOut { .. }) => {
                        let failed = waiting.iter().find_map(|(id, p)| {
                            let progress = p.batch.poll();
                            (progress.failed + progress.timed_out > 0).then_some(*id)
                        });
                        if let Some(id) = failed {
                            tracing::warn!(id, "batch failed");
                            return -1;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(id, error = %chain(&e), "batch failed");
                        return -1;
                    }
                }
            }
            0
        })
    }

    /// Submits one WRITE; its id, or 0 when refused.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint=""))]
    fn transfer_submit_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: usize,
        transport_hint: &str,
    ) -> u64 {
        let _ = transport_hint;
        self.submit_async(
            py,
            target_hostname,
            vec![buffer],
            vec![peer_buffer_address],
            vec![length],
            TransferOpcode::Write,
        )
    }

    /// Without waiting: 1 completed, 0 pending, -1 failed (or not a live id), -2 timed
    /// out. A completed or failed batch is released (asking again is -1); a timed-out one
    /// is kept, as in Mooncake.
    fn transfer_check_status(&self, batch_id: u64) -> i32 {
        let Some(s) = self.state() else { return -1 };
        let mut pending = s.pending.lock();
        let Some(p) = pending.get(&batch_id) else {
            return -1;
        };
        let progress = p.batch.poll();
        let status = if !progress.is_done() {
            return 0;
        } else if progress.completed == progress.total {
            1
        } else if progress.timed_out > 0 {
            // Kept, as Mooncake keeps it: asking again says -2 again.
            return -2;
        } else {
            -1
        };
        pending.remove(&batch_id);
        status
    }

    /// Copies `length` bytes of `src_ptr` (bytes or str) to `dest_address`, which must lie
    /// in registered memory: 0, or -1.
    fn write_bytes_to_buffer(
        &self,
        py: Python<'_>,
        dest_address: u64,
        src_ptr: &Bound<'_, PyAny>,
        length: usize,
    ) -> PyResult<i32> {
        let data: Vec<u8> = if let Ok(b) = src_ptr.cast::<PyBytes>() {
            b.as_bytes().to_vec()
        } else if let Ok(s) = src_ptr.cast::<PyString>() {
            s.extract::<String>()?.into_bytes()
        } else {
            return Err(crate::errors::invalid("src_ptr must be bytes or str"));
        };
        let Some(s) = self.state() else { return Ok(-1) };
        if length > data.len() {
            tracing::warn!(
                length,
                have = data.len(),
                "write_bytes_to_buffer: length is past the data"
            );
            return Ok(-1);
        }
        let Some((buffer, offset, _use)) = s.local_at(dest_address, length) else {
            tracing::warn!(
                dest_address,
                length,
                "write_bytes_to_buffer: not inside registered memory"
            );
            return Ok(-1);
        };
        Ok(py
            .detach(|| buffer.write_at(offset, &data[..length]))
            .map_or(-1, |()| 0))
    }

    /// `length` bytes at `source_address`, which must lie in registered memory.
    fn read_bytes_from_buffer<'py>(
        &self,
        py: Python<'py>,
        source_address: u64,
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let s = self
            .state()
            .ok_or_else(|| crate::errors::invalid("read_bytes_from_buffer before initialize"))?;
        let (buffer, offset, _use) = s.local_at(source_address, length).ok_or_else(|| {
            crate::errors::invalid(format!(
                "{source_address:#x}+{length} is not inside memory registered with this engine"
            ))
        })?;
        let mut out = vec![0u8; length];
        py.detach(|| buffer.read_at(offset, &mut out))
            .map_err(|e| Python::attach(|py| crate::errors::to_py(py, &e)))?;
        Ok(PyBytes::new(py, &out))
    }

    /// Registers caller memory (`location`: "*" finds out, or "cpu", "cuda:N"); 0 or -1.
    #[pyo3(signature = (buffer_addr, capacity, location="*"))]
    fn register_memory(
        &self,
        py: Python<'_>,
        buffer_addr: u64,
        capacity: usize,
        location: &str,
    ) -> i32 {
        let Some(s) = self.state() else { return -1 };
        match py.detach(|| s.register(buffer_addr, capacity, location)) {
            Ok(()) => 0,
            Err(why) => {
                tracing::warn!(addr = buffer_addr, capacity, %why, "register_memory");
                -1
            }
        }
    }

    /// Deregisters memory registered at `buffer_addr`; 0, or -1 when nothing is.
    fn unregister_memory(&self, py: Python<'_>, buffer_addr: u64) -> i32 {
        let Some(s) = self.state() else { return -1 };
        match py.detach(|| s.unregister(buffer_addr)) {
            Ok(()) => 0,
            Err(why) => {
                tracing::warn!(addr = buffer_addr, %why, "unregister_memory");
                -1
            }
        }
    }

    /// Registers every `(address, capacity)` pair, or none: 0, or -1.
    #[pyo3(signature = (buffer_addresses, capacities, location="*"))]
    fn batch_register_memory(
        &self,
        py: Python<'_>,
        buffer_addresses: Vec<u64>,
        capacities: Vec<usize>,
        location: &str,
    ) -> i32 {
        let Some(s) = self.state() else { return -1 };
        if buffer_addresses.len() != capacities.len() {
            tracing::warn!("batch_register_memory: the lists differ in length");
            return -1;
        }
        py.detach(|| {
            for (i, (&addr, &cap)) in buffer_addresses.iter().zip(&capacities).enumerate() {
                if let Err(why) = s.register(addr, cap, location) {
                    tracing::warn!(addr, cap, %why, "batch_register_memory: undoing this call's registrations");
                    for &done in &buffer_addresses[..i] {
                        let _ = s.unregister(done);
                    }
                    return -1;
                }
            }
            0
        })
    }

    /// Deregisters every address; 0, or -1 when one was not registered (the others are
    /// deregistered all the same).
    fn batch_unregister_memory(&self, py: Python<'_>, buffer_addresses: Vec<u64>) -> i32 {
        let Some(s) = self.state() else { return -1 };
        py.detach(|| {
            let mut status = 0;
            for addr in buffer_addresses {
                if s.unregister(addr).is_err() {
                    status = -1;
                }
            }
            status
        })
    }

    /// The address of the first buffer `segment_name` publishes (its descriptor fetched
    /// anew); 0 when it cannot be opened or publishes none.
    fn get_first_buffer_address(&self, py: Python<'_>, segment_name: &str) -> u64 {
        let Some(s) = self.state() else { return 0 };
        py.detach(|| match s.engine.refresh_segment(segment_name) {
            Ok(seg) => seg.buffers().first().map_or(0, |b| b.addr),
            Err(e) => {
                tracing::warn!(segment = segment_name, error = %chain(&e), "get_first_buffer_address");
                0
            }
        })
    }

    /// Every notification received since the last call, oldest first.
    fn get_notifies(&self) -> Vec<TransferNotify> {
        let Some(s) = self.state() else {
            return Vec::new();
        };
        std::iter::from_fn(|| s.engine.try_recv_notification())
            .map(|n| decode_notify(n.from, &n.message))
            .collect()
    }

    /// 0 when `peer_server_name` answers (its descriptor is fetched), non-zero when it is
    /// unknown or unreachable; fails fast (a refused connection, the connect timeout).
    fn send_probe(&self, py: Python<'_>, peer_server_name: &str) -> i32 {
        let Some(s) = self.state() else { return -1 };
        py.detach(|| match s.engine.refresh_segment(peer_server_name) {
            Ok(_) => 0,
            Err(e) => {
                tracing::info!(peer = peer_server_name, error = %chain(&e), "probe failed");
                -1
            }
        })
    }

    /// The devices ferry can use on this host, as JSON in Mooncake's shape
    /// (`{"cpu:0": {"preferred_hca": [...], "avail_hca": [...]}}`), plus what ferry
    /// itself reports under `"ferry"` (transports compiled in, fabric devices, CUDA).
    #[pyo3(signature = (device_name=None))]
    fn get_local_topology(&self, py: Python<'_>, device_name: Option<&str>) -> String {
        let filter: Vec<String> = device_name
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect();
        py.detach(|| {
            let devices: Vec<ferry_engine::FabricDevice> = ferry_engine::fabric_devices()
                .into_iter()
                .filter(|d| filter.is_empty() || filter.contains(&d.device))
                .collect();
            #[allow(unused_mut)]
            let mut names: Vec<String> = devices.iter().map(|d| d.device.clone()).collect();
            // RDMA ports by NUMA node, for the `cpu:N` entries' preferred HCAs.
            #[allow(unused_mut)]
            let mut by_numa: Vec<(Option<u32>, String)> = Vec::new();
            #[cfg(feature = "rdma")]
            {
                let (_, selection) =
                    ferry_engine::rdma_devices(&ferry_engine::fabrics::RdmaConfig {
                        devices: filter.clone(),
                        ..Default::default()
                    });
                for n in selection.nics {
                    if !names.contains(&n.device) {
                        names.push(n.device.clone());
                    }
                    by_numa.push((n.numa_node, n.device));
                }
            }
            let cuda = ferry_engine::cuda_status();
            let mut top = serde_json::Map::new();
            let mut nodes: Vec<u32> = by_numa.iter().filter_map(|(n, _)| *n).collect();
            nodes.sort_unstable();
            nodes.dedup();
            if nodes.is_empty() {
                nodes.push(0);
            }
            for node in nodes {
                let mut preferred: Vec<&String> = by_numa
                    .iter()
                    .filter(|(n, _)| *n == Some(node))
                    .map(|(_, d)| d)
                    .collect();
                preferred.dedup();
                let preferred: Vec<&String> = if preferred.is_empty() {
                    names.iter().collect()
                } else {
                    preferred
                };
                top.insert(
                    format!("cpu:{node}"),
                    serde_json::json!({"preferred_hca": preferred, "avail_hca": names}),
                );
            }
            for (ordinal, _, _) in &cuda.devices {
                top.insert(
                    format!("cuda:{ordinal}"),
                    serde_json::json!({"preferred_hca": names, "avail_hca": names}),
                );
            }
            top.insert(
                "ferry".into(),
                serde_json::json!({
                    "protocols": ferry_engine::compiled().iter().map(|p| p.name()).collect::<Vec<_>>(),
                    "fabric_devices": devices.iter().map(|d| serde_json::json!({
                        "protocol": d.protocol.name(), "provider": d.provider, "device": d.device,
                    })).collect::<Vec<_>>(),
                    "cuda_devices": cuda.devices.iter().map(|(o, n, b)| serde_json::json!({
                        "ordinal": o, "name": n, "bytes": b,
                    })).collect::<Vec<_>>(),
                }),
            );
            serde_json::Value::Object(top).to_string()
        })
    }

    /// A WRITE ordered on CUDA stream `stream_ptr` (0: the default stream): it starts
    /// once the work enqueued before it is done, and work enqueued after it waits for it.
    /// Returns at once. A request that cannot be valid raises now; a transfer that fails
    /// later is raised by the next stream-ordered call or `check_stream_transfers()`.
    /// Builds without the `cuda` feature raise `Unsupported`.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, stream_ptr=0, transport_hint=""))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_write_on_cuda(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: usize,
        stream_ptr: usize,
        transport_hint: &str,
    ) -> PyResult<()> {
        let _ = transport_hint;
        self.on_stream(
            py,
            target_hostname,
            vec![buffer],
            vec![peer_buffer_address],
            vec![length],
            TransferOpcode::Write,
            stream_ptr,
        )
    }

    /// A READ ordered on CUDA stream `stream_ptr`, as `transfer_write_on_cuda`.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, stream_ptr=0, transport_hint=""))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_read_on_cuda(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: usize,
        stream_ptr: usize,
        transport_hint: &str,
    ) -> PyResult<()> {
        let _ = transport_hint;
        self.on_stream(
            py,
            target_hostname,
            vec![buffer],
            vec![peer_buffer_address],
            vec![length],
            TransferOpcode::Read,
            stream_ptr,
        )
    }

    /// A batch of WRITEs ordered on CUDA stream `stream_ptr`, as
    /// `transfer_write_on_cuda`.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, stream_ptr=0, transport_hint=""))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_write_on_cuda(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<usize>,
        stream_ptr: usize,
        transport_hint: &str,
    ) -> PyResult<()> {
        let _ = transport_hint;
        self.on_stream(
            py,
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            TransferOpcode::Write,
            stream_ptr,
        )
    }

    /// A batch of READs ordered on CUDA stream `stream_ptr`, as
    /// `transfer_write_on_cuda`.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, stream_ptr=0, transport_hint=""))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_read_on_cuda(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<usize>,
        stream_ptr: usize,
        transport_hint: &str,
    ) -> PyResult<()> {
        let _ = transport_hint;
        self.on_stream(
            py,
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            TransferOpcode::Read,
            stream_ptr,
        )
    }

    /// Raises `Rejected` for stream-ordered transfers that failed since the last check
    /// (and forgets them); returns `None` when none did.
    #[pyo3(name = "check_stream_transfers")]
    fn py_check_stream_transfers(&self) -> PyResult<()> {
        self.check_stream_transfers()
    }

    /// Mooncake connects EFA paths ahead of time here; ferry connects a peer on first use
    /// and keeps it: nothing to do, 0.
    fn warmup_efa_segment(&self, segment_name: &str) -> i32 {
        let _ = segment_name;
        0
    }

    /// Mooncake's raw engine pointer; ferry has no such object to point at: 0.
    fn get_engine_ptr(&self) -> u64 {
        0
    }

    /// `TransferEngine.TransferOpcode`, as Mooncake attaches it to the class.
    #[classattr]
    #[pyo3(name = "TransferOpcode")]
    fn transfer_opcode_class(py: Python<'_>) -> Py<pyo3::types::PyType> {
        py.get_type::<TransferOpcode>().unbind()
    }

    /// The underlying `ferry.Engine` (shared, not copied); `None` before `initialize`.
    fn get_engine(&self, py: Python<'_>) -> Option<Py<PyEngine>> {
        self.state().map(|s| s.py_engine.clone_ref(py))
    }
}

/// Puts Mooncake's `device_name` filter into the configuration of the transport that
/// takes one.
fn apply_devices(
    config: &mut EngineConfig,
    protocol: Protocol,
    devices: Vec<String>,
) -> Result<(), String> {
    if devices.is_empty() || protocol == Protocol::Tcp {
        return Ok(());
    }
    #[cfg(feature = "efa")]
    if protocol == Protocol::Efa {
        let mut efa = config.efa.clone().unwrap_or_default();
        efa.devices = devices;
        config.efa = Some(efa);
        return Ok(());
    }
    #[cfg(feature = "rdma")]
    if protocol == Protocol::Rdma {
        let mut rdma = config.rdma.clone().unwrap_or_default();
        rdma.devices = devices;
        config.rdma = Some(rdma);
        return Ok(());
    }
    let _ = config;
    Err(format!("{protocol} takes no device list here"))
}
