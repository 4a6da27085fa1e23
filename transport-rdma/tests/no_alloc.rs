//! Posting and completing slices allocates nothing once a connection is warm: operations
//! come from each port's table, reports go out from the stack. Counted with a global
//! allocator over every thread of this test binary (the provider library's own `malloc`s
//! are not counted).
//!
//! Needs an RDMA device (`cargo xtask test --hw`); `FERRY_RDMA_DEVICES` names them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport_api::testing::{contents, host_region, random, slice, Direct};
use ferry_transport_api::{
    Access, CompletionToken, Completions, Connection, FailReason, Opcode, RegionMemory, RemoteKeys,
    Transport, TransportContext,
};
use ferry_transport_rdma::{RdmaConfig, RdmaTransport};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

fn count() {
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches
// only atomics (no allocation, no panic).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Counts reports without allocating.
#[derive(Default)]
struct Tally {
    done: AtomicU64,
    failed: AtomicU64,
}

impl Completions for Tally {
    fn complete(&self, _token: CompletionToken, result: Result<usize, FailReason>) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.done.fetch_add(1, Ordering::Release);
    }
}

const SLICE: usize = 64 * 1024;
const WINDOW: u64 = 16;

fn devices() -> Vec<String> {
    std::env::var("FERRY_RDMA_DEVICES")
        .map(|v| {
            v.split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn start(completions: Arc<dyn Completions>) -> (Arc<RdmaTransport>, ferry_transport_api::Endpoint) {
    let t = Arc::new(RdmaTransport::new(RdmaConfig {
        devices: devices(),
        busy_poll_us: 0,
        ..RdmaConfig::default()
    }));
    let ep = t
        .start(TransportContext {
            completions,
            control: None,
            staging: None,
        })
        .expect("the RDMA transport starts");
    (t, ep)
}

/// Keeps `WINDOW` slices in flight until `total` have been reported.
fn pump(
    conn: &dyn Connection,
    tally: &Tally,
    op: Opcode,
    local: &Arc<RegionMemory>,
    remote: &RegionMemory,
    keys: &RemoteKeys,
    total: u64,
) {
    let pieces = (local.len() / SLICE) as u64;
    let base = tally.done.load(Ordering::Acquire);
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut posted = 0u64;
    while tally.done.load(Ordering::Acquire) - base < total {
        assert!(Instant::now() < give_up, "the transfers stalled");
        let done = tally.done.load(Ordering::Acquire) - base;
        if posted < total && posted - done < WINDOW {
            let offset = (posted % pieces) as usize * SLICE;
            conn.post(slice(
                op,
                local,
                remote,
                keys,
                offset,
                SLICE,
                0,
                posted as u32,
            ))
            .expect("posted");
            posted += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

#[test]
#[ignore = "needs an RDMA device"]
fn steady_state_transfers_allocate_nothing_and_shutdown_leaves_nothing_in_flight() {
    let tally = Arc::new(Tally::default());
    let (target, target_ep) = start(Arc::new(Tally::default()));
    let (initiator, _) = start(tally.clone());
    let len = 4 << 20;
    let remote = host_region(vec![0; len]);
    let rkeys = target.register(&remote, Access::RemoteReadWrite).unwrap();
    let keys = RemoteKeys::new(rkeys).unwrap();
    let source = host_region(random(len));
    initiator.register(&source, Access::Local).unwrap();
    let back = host_region(vec![0; len]);
    initiator.register(&back, Access::Local).unwrap();
    let conn = initiator
        .connect(&target_ep, &Direct(target.clone()))
        .unwrap();

    pump(&*conn, &tally, Opcode::Write, &source, &remote, &keys, 256);
    pump(&*conn, &tally, Opcode::Read, &back, &remote, &keys, 256);
    let before = initiator.op_stats();
    COUNTING.store(true, Ordering::SeqCst);
    pump(&*conn, &tally, Opcode::Write, &source, &remote, &keys, 4096);
    pump(&*conn, &tally, Opcode::Read, &back, &remote, &keys, 4096);
    COUNTING.store(false, Ordering::SeqCst);
    let allocations = ALLOCATIONS.swap(0, Ordering::SeqCst);
    let after = initiator.op_stats();
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0);
    assert_eq!(allocations, 0, "allocations while moving 8192 slices");
    assert_eq!(after.acquired - before.acquired, 8192);
    assert_eq!(
        after.allocations, before.allocations,
        "the tables never grow"
    );
    assert!(
        contents(&remote) == contents(&source),
        "written bytes differ"
    );
    assert!(contents(&back) == contents(&source), "read bytes differ");

    let base = tally.done.load(Ordering::Acquire);
    for i in 0..WINDOW {
        conn.post(slice(
            Opcode::Write,
            &source,
            &remote,
            &keys,
            i as usize * SLICE,
            SLICE,
            0,
            i as u32,
        ))
        .expect("posted");
    }
    initiator.shutdown();
    assert_eq!(
        tally.done.load(Ordering::Acquire) - base,
        WINDOW,
        "each reported once"
    );
    let st = initiator.op_stats();
    assert_eq!((st.in_flight, st.abandoned), (0, 0), "{st:?}");
    target.shutdown();
}
