//! Posting and completing slices allocates nothing once a connection is warm: operations
//! come from each port's table, reports go out from the stack. Counted with a global
//! allocator over every thread of this test binary (the provider library's own `malloc`s
//! are not counted).
//!
//! Needs an RDMA device (`cargo xtask test --hw`); `FERRY_RDMA_DEVICES` names them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_transport_api::testing::{
    contents, host_region, pump, random, slice, CountingAllocator, Direct, Tally,
};
use ferry_transport_api::{Access, Completions, Opcode, RemoteKeys, Transport, TransportContext};
use ferry_transport_rdma::{RdmaConfig, RdmaTransport};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const SLICE: usize = 64 * 1024;
const WINDOW: u64 = 16;

fn start(completions: Arc<dyn Completions>) -> (Arc<RdmaTransport>, ferry_transport_api::Endpoint) {
    let t = Arc::new(RdmaTransport::new(RdmaConfig {
        devices: ferry_transport_rdma::devices_under_test(),
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

    let run = |op, local, total| {
        pump(
            &*conn, &tally, op, local, &remote, &keys, SLICE, WINDOW, total,
        )
    };
    run(Opcode::Write, &source, 256);
    run(Opcode::Read, &back, 256);
    let before = initiator.op_stats();
    let allocations = CountingAllocator::count_while(|| {
        run(Opcode::Write, &source, 4096);
        run(Opcode::Read, &back, 4096);
    });
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
