//! The raw libfabric baseline `cargo xtask bench --efa` compares `ferry bench --protocol
//! efa` against, shaped like fabtests' `fi_rma_bw`:
//!
//! ```text
//! cargo run --release -p ferry-transport-efa --example fi_rma_bw -- \
//!     --provider 'tcp;ofi_rxm' --operation write|writedata|read --block-size 1048576 \
//!     [--window 64] [--duration 3] [--span BYTES] [--delivery-complete]
//! ```
//!
//! Two processes: this one (the initiator) starts itself again as the target, which opens
//! its endpoint, registers its buffer and writes its fabric address, the buffer's address
//! and key on its stdout; the initiator reads them from the pipe and keeps `--window`
//! operations of `--block-size` bytes in flight for `--duration` seconds, cycling over
//! `--span` bytes (default 128 blocks, the span of `ferry bench --batch-size 128`), each
//! with its own completion (no selective completion). Every libfabric call goes straight
//! to `libfabric-sys`; nothing of ferry's transport is used. The endpoint, memory
//! registration and `mr_mode` handling are ferry's: an RDM endpoint of the provider's
//! first device with `FI_RMA`, `FI_CONTEXT`, and local descriptors, virtual addresses,
//! provider keys and endpoint binding only where the provider asks for them.
//!
//! - `write`: `fi_write` (with `--delivery-complete`, `fi_writemsg` with
//!   `FI_DELIVERY_COMPLETE`, the completion semantics ferry's WRITEs use);
//! - `writedata`: `fi_writedata` with remote CQ data; the target reads one entry carrying
//!   the data per operation (`FI_RMA_EVENT` asked for where the provider offers it) and
//!   reports how many it saw; any shortfall counts as errors;
//! - `read`: `fi_read`.
//!
//! Both sides poll their completion queues without sleeping. Prints one JSON object:
//! `throughput_gbps` (10^9 bytes per second), `bytes`, `seconds`, `errors`, `provider`,
//! `operation`, `block_size`, `window`, `span`. A failing libfabric call is named on
//! stderr with `fi_strerror`'s text, and the process exits with status 1.

use std::ffi::{c_void, CStr, CString};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfabric_sys as fi;

/// The libfabric API version asked for (ferry's).
const API_VERSION: u32 = fi::make_version(1, 17);
/// Completions read per `fi_cq_read`.
const CQ_BATCH: usize = 64;
/// Longest the first posts wait for a connection, and the target for late entries.
const PATIENCE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    WriteData,
    Read,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::WriteData => "writedata",
            Op::Read => "read",
        }
    }
}

struct Args {
    provider: String,
    op: Op,
    block: usize,
    window: usize,
    duration: f64,
    span: Option<usize>,
    delivery_complete: bool,
    target: bool,
}

fn usage(why: &str) -> ! {
    eprintln!(
        "fi_rma_bw: {why}\nusage: fi_rma_bw --provider P --operation write|writedata|read \
         --block-size BYTES [--window N] [--duration SECS] [--span BYTES] [--delivery-complete]"
    );
    std::process::exit(2)
}

impl Args {
    fn parse() -> Args {
        let mut a = Args {
            provider: "tcp;ofi_rxm".into(),
            op: Op::Write,
            block: 1 << 20,
            window: 64,
            duration: 3.0,
            span: None,
            delivery_complete: false,
            target: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
            };
            let number = |v: String| -> usize {
                v.parse()
                    .unwrap_or_else(|_| usage(&format!("`{v}` is not a number")))
            };
            match flag.as_str() {
                "--provider" => a.provider = value(),
                "--operation" => {
                    a.op = match value().as_str() {
                        "write" => Op::Write,
                        "writedata" => Op::WriteData,
                        "read" => Op::Read,
                        other => usage(&format!("unknown operation `{other}`")),
                    }
                }
                "--block-size" => a.block = number(value()),
                "--window" => a.window = number(value()),
                "--span" => a.span = Some(number(value())),
                "--duration" => {
                    let v = value();
                    a.duration = v
                        .parse()
                        .unwrap_or_else(|_| usage(&format!("`{v}` is not a number of seconds")));
                }
                "--delivery-complete" => a.delivery_complete = true,
                "--target" => a.target = true,
                other => usage(&format!("unknown flag `{other}`")),
            }
        }
        if a.block == 0 || a.window == 0 {
            usage("--block-size and --window must be positive");
        }
        a
    }

    /// The bytes each side cycles over: whole blocks, at least one.
    fn span(&self) -> usize {
        let span = self.span.unwrap_or(self.block * 128).max(self.block);
        span / self.block * self.block
    }

    fn ip_based(&self) -> bool {
        let p = self.provider.to_ascii_lowercase();
        p.contains("tcp") || p.contains("sockets") || p.contains("udp")
    }
}

fn strerror(code: i32) -> String {
    // SAFETY: fi_strerror returns a pointer to a static, NUL-terminated string.
    unsafe { CStr::from_ptr(fi::fi_strerror(code)) }
        .to_string_lossy()
        .into_owned()
}

/// Exits naming the libfabric call that failed and why (`rc` is a negative error code).
fn die(call: &str, rc: isize) -> ! {
    let code = i32::try_from(-rc).unwrap_or(i32::MAX);
    eprintln!(
        "fi_rma_bw: {call} failed: {} (error {code})",
        strerror(code)
    );
    std::process::exit(1)
}

fn check(call: &str, rc: i32) {
    if rc != 0 {
        die(call, rc as isize);
    }
}

/// Page-aligned memory, filled, so every page is present before it is registered.
struct Buffer {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Buffer {
    fn new(len: usize, fill: u8) -> Buffer {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096)
            .unwrap_or_else(|_| usage("the span is too large"));
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            eprintln!("fi_rma_bw: cannot allocate {len} bytes");
            std::process::exit(1);
        }
        // SAFETY: `ptr` points to `layout.size()` writable bytes just allocated.
        unsafe { ptr.write_bytes(fill, layout.size()) };
        Buffer { ptr, layout }
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once, after every MR on it
        // is closed (the `Fabric` is dropped first).
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// One endpoint and its objects, closed children first.
struct Fabric {
    info: *mut fi::fi_info,
    fabric: *mut fi::fid_fabric,
    domain: *mut fi::fid_domain,
    cq: *mut fi::fid_cq,
    av: *mut fi::fid_av,
    ep: *mut fi::fid_ep,
    mr: *mut fi::fid_mr,
    mr_mode: u64,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        // SAFETY: each handle is null or open, closed once, children before parents.
        unsafe {
            for fid in [
                (!self.mr.is_null()).then(|| &mut (*self.mr).fid as *mut fi::fid),
                (!self.ep.is_null()).then(|| &mut (*self.ep).fid as *mut fi::fid),
                (!self.av.is_null()).then(|| &mut (*self.av).fid as *mut fi::fid),
                (!self.cq.is_null()).then(|| &mut (*self.cq).fid as *mut fi::fid),
                (!self.domain.is_null()).then(|| &mut (*self.domain).fid as *mut fi::fid),
                (!self.fabric.is_null()).then(|| &mut (*self.fabric).fid as *mut fi::fid),
            ]
            .into_iter()
            .flatten()
            {
                fi::fi_close(fid);
            }
            if !self.info.is_null() {
                fi::fi_freeinfo(self.info);
            }
        }
    }
}

/// A registered buffer: its key, and the descriptor local operations pass.
struct Registered {
    key: u64,
    desc: *mut c_void,
}

impl Fabric {
    /// `fi_getinfo` with ferry's hints (plus `FI_RMA_EVENT` when `rma_event`); the
    /// first entry, as ferry's single-rail default takes it.
    fn info(args: &Args, rma_event: bool) -> Result<*mut fi::fi_info, isize> {
        let provider =
            CString::new(args.provider.as_str()).unwrap_or_else(|_| usage("bad provider"));
        let node = CString::new("127.0.0.1").unwrap_or_else(|_| usage("bad address"));
        let mut info: *mut fi::fi_info = null_mut();
        // SAFETY: the hints are allocated by libfabric and freed after the call (with the
        // provider name strdup'ed into them); the node is a live C string.
        let rc = unsafe {
            let hints = fi::fi_dupinfo(null());
            if hints.is_null() {
                die("fi_dupinfo", -(fi::FI_ENOMEM as isize));
            }
            (*hints).caps = u64::from(
                fi::FI_RMA | fi::FI_READ | fi::FI_WRITE | fi::FI_REMOTE_READ | fi::FI_REMOTE_WRITE,
            ) | if rma_event { fi::FI_RMA_EVENT } else { 0 };
            (*hints).mode = fi::FI_CONTEXT;
            (*(*hints).ep_attr).type_ = fi::fi_ep_type_FI_EP_RDM;
            (*(*hints).domain_attr).mr_mode = (fi::FI_MR_LOCAL
                | fi::FI_MR_VIRT_ADDR
                | fi::FI_MR_ALLOCATED
                | fi::FI_MR_PROV_KEY
                | fi::FI_MR_ENDPOINT) as i32;
            (*(*hints).domain_attr).threading = fi::fi_threading_FI_THREAD_SAFE;
            (*(*hints).fabric_attr).prov_name = libc::strdup(provider.as_ptr());
            let (node_ptr, flags) = if args.ip_based() {
                (node.as_ptr(), fi::FI_SOURCE)
            } else {
                (null(), 0)
            };
            let rc = fi::fi_getinfo(API_VERSION, node_ptr, null(), flags, hints, &mut info);
            fi::fi_freeinfo(hints);
            rc
        };
        if rc != 0 {
            return Err(rc as isize);
        }
        if info.is_null() {
            return Err(-(fi::FI_ENODATA as isize));
        }
        // Keep the first entry only.
        // SAFETY: `info` is a live list; the copy is owned by the caller.
        unsafe {
            let own = fi::fi_dupinfo(info);
            fi::fi_freeinfo(info);
            if own.is_null() {
                die("fi_dupinfo", -(fi::FI_ENOMEM as isize));
            }
            Ok(own)
        }
    }

    /// Opens fabric, domain, completion queue (`format`), address vector and endpoint.
    fn open(args: &Args, rma_event: bool, format: fi::fi_cq_format) -> Fabric {
        let info = match Fabric::info(args, rma_event) {
            Ok(info) => info,
            Err(rc) => die("fi_getinfo", rc),
        };
        let mut f = Fabric {
            info,
            fabric: null_mut(),
            domain: null_mut(),
            cq: null_mut(),
            av: null_mut(),
            ep: null_mut(),
            mr: null_mut(),
            mr_mode: 0,
        };
        // SAFETY: every pointer passed is null where libfabric allows it or points to a
        // live local or handle; handles are stored in `f` as they open.
        unsafe {
            check(
                "fi_fabric",
                fi::fi_fabric((*info).fabric_attr, &mut f.fabric, null_mut()),
            );
            check(
                "fi_domain",
                fi::fi_domain(f.fabric, info, &mut f.domain, null_mut()),
            );
            let mut cq_attr = fi::fi_cq_attr {
                format,
                wait_obj: fi::fi_wait_obj_FI_WAIT_NONE,
                size: 0,
                ..Default::default()
            };
            check(
                "fi_cq_open",
                fi::fi_cq_open(f.domain, &mut cq_attr, &mut f.cq, null_mut()),
            );
            let mut av_attr = fi::fi_av_attr {
                type_: fi::fi_av_type_FI_AV_TABLE,
                ..Default::default()
            };
            check(
                "fi_av_open",
                fi::fi_av_open(f.domain, &mut av_attr, &mut f.av, null_mut()),
            );
            check(
                "fi_endpoint",
                fi::fi_endpoint(f.domain, info, &mut f.ep, null_mut()),
            );
            check(
                "fi_ep_bind (address vector)",
                fi::fi_ep_bind(f.ep, &mut (*f.av).fid, 0),
            );
            // Every operation completes (no FI_SELECTIVE_COMPLETION); remote CQ data
            // arrives on the receive side.
            check(
                "fi_ep_bind (completion queue)",
                fi::fi_ep_bind(
                    f.ep,
                    &mut (*f.cq).fid,
                    u64::from(fi::FI_TRANSMIT | fi::FI_RECV),
                ),
            );
            check("fi_enable", fi::fi_enable(f.ep));
            f.mr_mode = (*(*info).domain_attr).mr_mode as u32 as u64;
        }
        f
    }

    fn has(&self, bit: u32) -> bool {
        self.mr_mode & u64::from(bit) != 0
    }

    fn address(&self) -> Vec<u8> {
        let mut address = vec![0u8; 256];
        let mut len = address.len();
        // SAFETY: the endpoint is open; `address` has room for `len` bytes.
        check("fi_getname", unsafe {
            fi::fi_getname(&mut (*self.ep).fid, address.as_mut_ptr().cast(), &mut len)
        });
        address.truncate(len);
        address
    }

    /// Registers `buf` as ferry does: `fi_mr_regattr` with the system interface, a key
    /// of ferry's choosing unless the provider chooses it, bound to the endpoint under
    /// `FI_MR_ENDPOINT`.
    fn register(&mut self, buf: &Buffer, remote: bool) -> Registered {
        let mut access = u64::from(fi::FI_READ | fi::FI_WRITE);
        if remote {
            access |= u64::from(fi::FI_REMOTE_READ | fi::FI_REMOTE_WRITE);
        }
        let key_size = {
            // SAFETY: `info` is live.
            unsafe { (*(*self.info).domain_attr).mr_key_size }
        };
        let key_mask = if key_size == 0 || key_size >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * key_size)) - 1
        };
        let requested_key = if self.has(fi::FI_MR_PROV_KEY) {
            0
        } else {
            (rand::random::<u64>() & key_mask).max(1)
        };
        let iov = fi::iovec {
            iov_base: buf.ptr.cast(),
            iov_len: buf.layout.size(),
        };
        let attr = fi::fi_mr_attr {
            mr_iov: &iov,
            iov_count: 1,
            access,
            offset: 0,
            requested_key,
            context: null_mut(),
            auth_key_size: 0,
            auth_key: null_mut(),
            iface: fi::fi_hmem_iface_FI_HMEM_SYSTEM,
            device: Default::default(),
        };
        // SAFETY: the buffer outlives the MR (closed in Fabric::drop, before the buffer
        // is freed); the domain and endpoint are open.
        unsafe {
            check(
                "fi_mr_regattr",
                fi::fi_mr_regattr(self.domain, &attr, 0, &mut self.mr),
            );
            if self.has(fi::FI_MR_ENDPOINT) {
                check(
                    "fi_mr_bind",
                    fi::fi_mr_bind(self.mr, &mut (*self.ep).fid, 0),
                );
                check("fi_mr_enable", fi::fi_mr_enable(self.mr));
            }
            let key = fi::fi_mr_key(self.mr);
            if key == fi::FI_KEY_NOTAVAIL {
                die("fi_mr_key", -(fi::FI_ENOKEY as isize));
            }
            Registered {
                key,
                desc: fi::fi_mr_desc(self.mr),
            }
        }
    }

    fn insert(&self, address: &[u8]) -> fi::fi_addr_t {
        let mut addr: fi::fi_addr_t = fi::FI_ADDR_UNSPEC;
        // SAFETY: `address` holds one address of the provider's format.
        let rc = unsafe {
            fi::fi_av_insert(
                self.av,
                address.as_ptr().cast(),
                1,
                &mut addr,
                0,
                null_mut(),
            )
        };
        if rc != 1 {
            die(
                "fi_av_insert",
                if rc < 0 {
                    rc as isize
                } else {
                    -(fi::FI_EINVAL as isize)
                },
            );
        }
        addr
    }

    /// The next error entry of the queue, as its error code and the provider's message.
    fn read_error(&self) -> (i32, *mut c_void) {
        let mut err = fi::fi_cq_err_entry::default();
        // SAFETY: reads one error entry into a local of the right type.
        let n = unsafe { fi::fi_cq_readerr(self.cq, &mut err, 0) };
        if n != 1 {
            die(
                "fi_cq_readerr",
                if n < 0 { n } else { -(fi::FI_EIO as isize) },
            );
        }
        let mut text = [0 as std::ffi::c_char; 256];
        // SAFETY: the provider formats into `text` (length given) and returns a C string.
        let message = unsafe {
            let p = fi::fi_cq_strerror(
                self.cq,
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
        eprintln!(
            "fi_rma_bw: operation failed: {} ({message})",
            strerror(err.err)
        );
        (err.err, err.op_context)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

/// The target: registers its span for remote access, says where it is, and polls its
/// queue (manual-progress providers move RMA only then), counting remote CQ data,
/// until the initiator says how many to expect.
fn target(args: &Args) {
    let writedata = args.op == Op::WriteData;
    // Remote CQ data needs FI_RMA_EVENT on some providers; others deliver it without.
    let rma_event = writedata
        && Fabric::info(args, true).is_ok_and(|i| {
            // SAFETY: `i` came from Fabric::info and is freed once.
            unsafe { fi::fi_freeinfo(i) };
            true
        });
    let buf = Buffer::new(args.span(), 0);
    let mut f = Fabric::open(args, rma_event, fi::fi_cq_format_FI_CQ_FORMAT_DATA);
    let reg = f.register(&buf, true);
    let base = if f.has(fi::FI_MR_VIRT_ADDR) {
        buf.addr()
    } else {
        0
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{} {base} {}", hex(&f.address()), reg.key);
    let _ = out.flush();
    // The initiator's word arrives on stdin: "done N" (N remote CQ data entries sent).
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let told = Arc::new(AtomicBool::new(false));
    {
        let (expected, told) = (expected.clone(), told.clone());
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            let n = line
                .strip_prefix("done ")
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            expected.store(n, Ordering::Relaxed);
            told.store(true, Ordering::Release);
        });
    }
    let mut entries = [fi::fi_cq_data_entry::default(); CQ_BATCH];
    let (mut seen, mut errors) = (0u64, 0u64);
    let mut told_at: Option<Instant> = None;
    loop {
        // SAFETY: `entries` has room for CQ_BATCH entries of the queue's format (DATA).
        let rc = unsafe { fi::fi_cq_read(f.cq, entries.as_mut_ptr().cast(), CQ_BATCH) };
        if rc > 0 {
            seen += entries[..rc as usize]
                .iter()
                .filter(|e| e.flags & u64::from(fi::FI_REMOTE_CQ_DATA) != 0)
                .count() as u64;
        } else if rc == -(fi::FI_EAVAIL as isize) {
            f.read_error();
            errors += 1;
        } else if rc != -(fi::FI_EAGAIN as isize) {
            die("fi_cq_read", rc);
        }
        if told_at.is_none() && told.load(Ordering::Acquire) {
            told_at = Some(Instant::now());
        }
        if let Some(t) = told_at {
            if seen >= expected.load(Ordering::Relaxed) || t.elapsed() > PATIENCE {
                break;
            }
        }
    }
    let _ = writeln!(out, "{seen} {errors}");
    let _ = out.flush();
    drop(f);
    drop(buf);
}

/// The operation contexts (`FI_CONTEXT` mode): one per slot of the window.
struct Contexts {
    all: Box<[fi::fi_context]>,
    free: Vec<usize>,
}

impl Contexts {
    fn new(n: usize) -> Contexts {
        Contexts {
            all: (0..n).map(|_| fi::fi_context::default()).collect(),
            free: (0..n).rev().collect(),
        }
    }

    fn ptr(&mut self, i: usize) -> *mut c_void {
        (&mut self.all[i] as *mut fi::fi_context).cast()
    }

    fn index(&self, ctx: *mut c_void) -> Option<usize> {
        let base = self.all.as_ptr() as usize;
        let off = (ctx as usize).checked_sub(base)?;
        let i = off / std::mem::size_of::<fi::fi_context>();
        (i < self.all.len()).then_some(i)
    }
}

struct Initiator {
    f: Fabric,
    local: Buffer,
    desc: *mut c_void,
    peer: fi::fi_addr_t,
    base: u64,
    key: u64,
    blocks: usize,
    ctx: Contexts,
    posted: u64,
    completed: u64,
    errors: u64,
}

impl Initiator {
    /// Posts operation number `posted`, retrying `FI_EAGAIN` after reading completions.
    fn post(&mut self, args: &Args) {
        let Some(slot) = self.ctx.free.pop() else {
            return;
        };
        let ctx = self.ctx.ptr(slot);
        let offset = (self.posted as usize % self.blocks) * args.block;
        // SAFETY: `offset + block` lies within the local buffer.
        let buf: *mut c_void = unsafe { self.local.ptr.add(offset) }.cast();
        let remote = self.base + offset as u64;
        let give_up = Instant::now() + PATIENCE;
        loop {
            // SAFETY: `buf..buf+block` is registered local memory that outlives the
            // operation; `ctx` is a context no other operation in flight holds; the
            // remote range lies within the target's registered span.
            let rc = unsafe {
                match args.op {
                    Op::Write if args.delivery_complete => {
                        let iov = fi::iovec {
                            iov_base: buf,
                            iov_len: args.block,
                        };
                        let rma = fi::fi_rma_iov {
                            addr: remote,
                            len: args.block,
                            key: self.key,
                        };
                        let mut desc = [self.desc];
                        let msg = fi::fi_msg_rma {
                            msg_iov: &iov,
                            desc: desc.as_mut_ptr(),
                            iov_count: 1,
                            addr: self.peer,
                            rma_iov: &rma,
                            rma_iov_count: 1,
                            context: ctx,
                            data: 0,
                        };
                        fi::fi_writemsg(
                            self.f.ep,
                            &msg,
                            u64::from(fi::FI_DELIVERY_COMPLETE | fi::FI_COMPLETION),
                        )
                    }
                    Op::Write => fi::fi_write(
                        self.f.ep, buf, args.block, self.desc, self.peer, remote, self.key, ctx,
                    ),
                    Op::WriteData => fi::fi_writedata(
                        self.f.ep,
                        buf,
                        args.block,
                        self.desc,
                        self.posted,
                        self.peer,
                        remote,
                        self.key,
                        ctx,
                    ),
                    Op::Read => fi::fi_read(
                        self.f.ep, buf, args.block, self.desc, self.peer, remote, self.key, ctx,
                    ),
                }
            };
            if rc == 0 {
                self.posted += 1;
                return;
            }
            if rc != -(fi::FI_EAGAIN as isize) {
                die(
                    match args.op {
                        Op::Write if args.delivery_complete => "fi_writemsg",
                        Op::Write => "fi_write",
                        Op::WriteData => "fi_writedata",
                        Op::Read => "fi_read",
                    },
                    rc,
                );
            }
            if Instant::now() > give_up {
                die("posting (FI_EAGAIN for too long)", rc);
            }
            self.poll();
        }
    }

    /// Reads completions once; returns how many.
    fn poll(&mut self) -> usize {
        let mut entries = [fi::fi_cq_entry::default(); CQ_BATCH];
        // SAFETY: `entries` has room for CQ_BATCH entries of the queue's format
        // (CONTEXT).
        let rc = unsafe { fi::fi_cq_read(self.f.cq, entries.as_mut_ptr().cast(), CQ_BATCH) };
        if rc > 0 {
            for e in &entries[..rc as usize] {
                match self.ctx.index(e.op_context) {
                    Some(i) => self.ctx.free.push(i),
                    None => die(
                        "fi_cq_read (a context that is no operation's)",
                        -(fi::FI_EINVAL as isize),
                    ),
                }
            }
            self.completed += rc as u64;
            return rc as usize;
        }
        if rc == -(fi::FI_EAVAIL as isize) {
            let (_, ctx) = self.f.read_error();
            self.errors += 1;
            if let Some(i) = self.ctx.index(ctx) {
                self.ctx.free.push(i);
            }
            return 1;
        }
        if rc != -(fi::FI_EAGAIN as isize) {
            die("fi_cq_read", rc);
        }
        0
    }

    fn in_flight(&self) -> usize {
        self.ctx.all.len() - self.ctx.free.len()
    }

    fn drain(&mut self) {
        let give_up = Instant::now() + PATIENCE;
        while self.in_flight() > 0 {
            if self.poll() == 0 && Instant::now() > give_up {
                eprintln!("fi_rma_bw: {} operations never completed", self.in_flight());
                std::process::exit(1);
            }
        }
    }
}

fn initiator(args: &Args) {
    let exe = std::env::current_exe().unwrap_or_else(|e| {
        eprintln!("fi_rma_bw: cannot find this program to start the target: {e}");
        std::process::exit(1)
    });
    let mut child = Command::new(exe)
        .args(std::env::args().skip(1))
        .arg("--target")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            eprintln!("fi_rma_bw: cannot start the target process: {e}");
            std::process::exit(1)
        });
    let mut from_target = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut to_target = child.stdin.take().expect("stdin is piped");
    let mut line = String::new();
    let _ = from_target.read_line(&mut line);
    let mut words = line.split_whitespace();
    let (Some(address), Some(base), Some(key)) = (
        words.next().and_then(unhex),
        words.next().and_then(|b| b.parse::<u64>().ok()),
        words.next().and_then(|k| k.parse::<u64>().ok()),
    ) else {
        let _ = child.wait();
        eprintln!(
            "fi_rma_bw: the target did not say where its buffer is (got `{}`)",
            line.trim()
        );
        std::process::exit(1)
    };

    let span = args.span();
    let local = Buffer::new(span, 0x5a);
    let mut f = Fabric::open(args, false, fi::fi_cq_format_FI_CQ_FORMAT_CONTEXT);
    let reg = f.register(&local, false);
    // Local descriptors only where the provider asks for them, as ferry passes them.
    let desc = if f.has(fi::FI_MR_LOCAL) {
        reg.desc
    } else {
        null_mut()
    };
    let peer = f.insert(&address);
    let mut it = Initiator {
        f,
        local,
        desc,
        peer,
        base,
        key,
        blocks: span / args.block,
        ctx: Contexts::new(args.window),
        posted: 0,
        completed: 0,
        errors: 0,
    };
    // Warm up: one window (connections, registration caches), then measure.
    while it.posted < args.window as u64 {
        it.post(args);
    }
    it.drain();
    let done_before = it.completed;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    while Instant::now() < end {
        while it.in_flight() < args.window {
            it.post(args);
        }
        it.poll();
    }
    it.drain();
    let seconds = start.elapsed().as_secs_f64();
    let completed = it.completed - done_before;
    let mut errors = it.errors;

    // The target counts the remote CQ data it saw.
    let expected = if args.op == Op::WriteData {
        it.posted
    } else {
        0
    };
    let _ = writeln!(to_target, "done {expected}");
    let _ = to_target.flush();
    line.clear();
    let _ = from_target.read_line(&mut line);
    let mut words = line.split_whitespace().map(|w| w.parse::<u64>().ok());
    match (words.next().flatten(), words.next().flatten()) {
        (Some(seen), Some(target_errors)) => {
            errors += expected.saturating_sub(seen) + target_errors;
        }
        _ => {
            eprintln!(
                "fi_rma_bw: the target did not report (got `{}`)",
                line.trim()
            );
            errors += 1;
        }
    }
    let status = child.wait();
    if !status.as_ref().is_ok_and(|s| s.success()) {
        eprintln!("fi_rma_bw: the target process failed: {status:?}");
        errors += 1;
    }
    drop(it);

    let bytes = completed * args.block as u64;
    let provider = args.provider.replace('"', "");
    println!(
        "{{\"provider\":\"{provider}\",\"operation\":\"{}\",\"delivery_complete\":{},\"block_size\":{},\"window\":{},\"span\":{span},\"bytes\":{bytes},\"seconds\":{seconds:.3},\"throughput_gbps\":{:.3},\"errors\":{errors}}}",
        args.op.name(),
        args.delivery_complete,
        args.block,
        args.window,
        bytes as f64 / seconds / 1e9,
    );
    if errors > 0 {
        std::process::exit(1);
    }
}

fn main() {
    let args = Args::parse();
    if args.target {
        target(&args);
    } else {
        initiator(&args);
    }
}
