//! Posting and completing slices allocates nothing once a connection is warm: operation
//! contexts come from each rail's slab, reports go out from the stack. Counted with a
//! global allocator over every thread of this test binary (libfabric's own `malloc`s are
//! the provider's business and not counted).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_transport_api::{
    CompletionToken, Completions, Connection, FailReason, NoExchange, Opcode, RegionMemory,
    RemoteKeys, Transport,
};
use ferry_transport_efa::providers;

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

/// Keeps `WINDOW` slices in flight until `total` have been reported, cycling over the
/// buffers.
#[allow(clippy::too_many_arguments)]
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
            let s = slice(
                op,
                local,
                remote,
                keys,
                (posted % pieces) as usize * SLICE,
                SLICE,
                posted as u32,
                Instant::now() + Duration::from_secs(60),
            );
            conn.post(s).expect("posted");
            posted += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

#[test]
fn steady_state_transfers_allocate_nothing_and_shutdown_leaves_no_context() {
    for mut config in providers_under_test() {
        if config.provider == "shm" {
            // Two rails: striping is part of the steady state.
            let shm = providers()
                .into_iter()
                .find(|p| p.provider == "shm")
                .expect("shm is listed")
                .domain;
            config.devices = vec![shm; 2];
        }
        let provider = config.provider.clone();
        let tally = Arc::new(Tally::default());
        let (target, target_ep) = start_with(config.clone(), Arc::new(Tally::default()));
        let (initiator, _) = start_with(config, tally.clone());
        let (remote, keys) = target_region(&target, 4 << 20);
        let source = local_region(&initiator, 4 << 20);
        let back = local_region(&initiator, 4 << 20);
        let conn = initiator.connect(&target_ep, &NoExchange).unwrap();

        // Warm up: connections, provider caches, lazily built state.
        pump(&*conn, &tally, Opcode::Write, &source, &remote, &keys, 256);
        pump(&*conn, &tally, Opcode::Read, &back, &remote, &keys, 256);
        let before = initiator.op_stats();

        COUNTING.store(true, Ordering::SeqCst);
        pump(&*conn, &tally, Opcode::Write, &source, &remote, &keys, 4096);
        pump(&*conn, &tally, Opcode::Read, &back, &remote, &keys, 4096);
        COUNTING.store(false, Ordering::SeqCst);
        let allocations = ALLOCATIONS.swap(0, Ordering::SeqCst);

        let after = initiator.op_stats();
        assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "{provider}");
        assert_eq!(
            allocations, 0,
            "{provider}: allocations while moving 8192 slices"
        );
        assert_eq!(after.acquired - before.acquired, 8192, "{provider}");
        assert_eq!(after.completed - before.completed, 8192, "{provider}");
        assert_eq!(
            (after.allocations, after.capacity),
            (before.allocations, before.capacity),
            "{provider}: the slabs never grow"
        );
        assert_eq!(after.allocations, initiator.rail_posts().len() as u64);
        assert!(
            contents(&remote) == contents(&source),
            "{provider}: written bytes differ"
        );
        assert!(
            contents(&back) == contents(&source),
            "{provider}: read bytes differ"
        );

        // Shutdown with a window in flight: each reported once, no context left.
        let base = tally.done.load(Ordering::Acquire);
        for i in 0..WINDOW {
            conn.post(slice(
                Opcode::Write,
                &source,
                &remote,
                &keys,
                i as usize * SLICE,
                SLICE,
                i as u32,
                Instant::now() + Duration::from_secs(60),
            ))
            .expect("posted");
        }
        initiator.shutdown();
        assert_eq!(
            tally.done.load(Ordering::Acquire) - base,
            WINDOW,
            "{provider}"
        );
        let st = initiator.op_stats();
        assert_eq!((st.in_flight, st.abandoned), (0, 0), "{provider}: {st:?}");
        target.shutdown();
    }
}
