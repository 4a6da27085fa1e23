//! Steady state allocates nothing per request: a counting global allocator watches the
//! whole process (both engines, every transport thread) while batches run.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use common::{engine, random, WAIT};
use ferry_engine::Location;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn no_heap_allocation_per_request_in_steady_state() {
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
            for i in 0..per_batch {
                let off = i * block;
                if i % 2 == 0 {
                    b.write(&local, off, &remote, off as u64, block).unwrap();
                } else {
                    b.read(&local, off, &remote, off as u64, block).unwrap();
                }
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
    let requests = (batches * per_batch) as u64;
    assert_eq!(
        allocations, 0,
        "{allocations} heap allocations during {requests} requests"
    );
}
