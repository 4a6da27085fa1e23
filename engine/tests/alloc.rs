//! Steady state allocates nothing per request: a counting global allocator watches the
//! whole process (both engines, every transport thread) while batches run. The same
//! allocator keeps the live heap bytes, which bound what an idle peer and a lane cost.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use common::{engine, engine_with, random, WAIT};
use ferry_engine::{Location, TcpConfig};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Heap bytes allocated and not yet freed.
static LIVE: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls and bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(new_size as u64, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Heap bytes that each connection of `lanes` lanes adds to the process (initiator and
/// target sides together): one initiator engine opens `peers` target engines and moves
/// one block over each, which proves both sides of it set up.
fn heap_per_connection(lanes: usize, peers: usize) -> u64 {
    let config = TcpConfig {
        lanes,
        ..TcpConfig::default()
    };
    let targets: Vec<_> = (0..=peers).map(|_| engine_with(config.clone())).collect();
    let buffers: Vec<_> = targets
        .iter()
        .map(|t| t.allocate(64 << 10, Location::host()).unwrap())
        .collect();
    let initiator = engine_with(config);
    let local = initiator.allocate(64 << 10, Location::host()).unwrap();
    let touch = |t: &ferry_engine::Engine| {
        let segment = initiator.open_segment(&t.name()).unwrap();
        let remote = segment.buffer(0).unwrap();
        let mut b = initiator.batch();
        b.write(&local, 0, &remote, 0, 4096).unwrap();
        b.submit().unwrap().wait(WAIT).unwrap();
        segment
    };
    // The first peer starts what an engine starts once (threads, tables).
    let first = touch(&targets[0]);
    let before = LIVE.load(Ordering::Relaxed);
    let segments: Vec<_> = targets[1..].iter().map(touch).collect();
    let after = LIVE.load(Ordering::Relaxed);
    drop((segments, first, buffers));
    after.saturating_sub(before) / peers as u64
}

/// An idle peer costs under 64 KiB of heap, and so does each lane past the first
/// (initiator and target together). The lane's queue once held 4096 slots (384 KiB).
#[test]
fn an_idle_peer_and_a_lane_cost_under_64_kib() {
    let _alone = SERIAL.lock();
    let one = heap_per_connection(1, 4);
    let four = heap_per_connection(4, 4);
    let per_lane = four.saturating_sub(one) / 3;
    eprintln!("heap per idle peer: {one} bytes with 1 lane, {four} with 4; per lane {per_lane}");
    assert!(one < 64 << 10, "an idle peer holds {one} heap bytes");
    assert!(per_lane < 64 << 10, "a lane holds {per_lane} heap bytes");
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The tests of this file watch the whole process: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn no_heap_allocation_per_request_in_steady_state() {
    let _alone = SERIAL.lock();
    let target = engine();
    let initiator = engine();
    let remote_buf = target.allocate(4 << 20, Location::host()).unwrap();
    remote_buf.write_at(0, &random(4 << 20)).unwrap();
    let local = initiator.allocate(4 << 20, Location::host()).unwrap();
    let remote = initiator
        .open_segment(&target.name())
        .unwrap()
        .buffer(0)
        .unwrap();

    let block = 16 * 1024;
    let per_batch = 32;
    let run = |batches: usize| {
        for _ in 0..batches {
            let mut b = initiator.batch();
            // Half the requests alternate READ and WRITE, so each travels alone; the
            // other half are WRITEs laid end to end, which travel as one slice.
            for i in 0..per_batch / 2 {
                let off = i * block;
                if i % 2 == 0 {
                    b.write(&local, off, &remote, off as u64, block).unwrap();
                } else {
                    b.read(&local, off, &remote, off as u64, block).unwrap();
                }
            }
            for i in per_batch / 2..per_batch {
                let off = i * block;
                b.write(&local, off, &remote, off as u64, block).unwrap();
            }
            b.submit().unwrap().wait(WAIT).unwrap();
        }
    };
    // Warm-up: connections, thread-locals, buffers reach their steady sizes. parking_lot
    // allocates its global wait table the first time any thread parks (a contended lock);
    // a timed wait creates it now rather than at a random point of the measurement.
    run(200);
    let m = parking_lot::Mutex::new(());
    parking_lot::Condvar::new().wait_for(&mut m.lock(), std::time::Duration::from_millis(1));
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let batches = 2000;
    run(batches);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(
        initiator.batch_stats().merged_requests,
        (200 + batches as u64) * (per_batch as u64 / 2 - 1),
        "the second half of each batch travels as one slice"
    );
    let requests = (batches * per_batch) as u64;
    assert_eq!(
        allocations, 0,
        "{allocations} heap allocations during {requests} requests"
    );
}
