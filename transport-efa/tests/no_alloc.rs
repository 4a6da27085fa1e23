//! Posting and completing slices allocates nothing once a connection is warm: operation
//! contexts come from each rail's slab, reports go out from the stack. Counted with a
//! global allocator over every thread of this test binary (libfabric's own `malloc`s are
//! the provider's business and not counted).

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_transport_api::testing::{pump, CountingAllocator, Tally};
use ferry_transport_api::{NoExchange, Opcode, Transport};
use ferry_transport_efa::providers;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const SLICE: usize = 64 * 1024;
const WINDOW: u64 = 16;

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

        let run = |op, local, total| {
            pump(
                &*conn, &tally, op, local, &remote, &keys, SLICE, WINDOW, total,
            )
        };
        // Warm up: connections, provider caches, lazily built state.
        run(Opcode::Write, &source, 256);
        run(Opcode::Read, &back, 256);
        let before = initiator.op_stats();
        let allocations = CountingAllocator::count_while(|| {
            run(Opcode::Write, &source, 4096);
            run(Opcode::Read, &back, 4096);
        });

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
