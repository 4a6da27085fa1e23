//! The transport conformance suite (`ferry_transport_api::testing`) over RDMA devices:
//! two transports in one process, connected through the queue-pair exchange as their
//! engines would (`Direct` hands the message to the target's `answer`). A connection is
//! killed by the fault knob (a queue pair failed as a NIC fails one).
//!
//! Needs an RDMA device: `cargo xtask test --hw` runs it, over soft-RoCE where the kernel
//! offers `rdma_rxe`. `FERRY_RDMA_DEVICES` (comma-separated) names the devices to use;
//! unset, every usable one.

use std::sync::Arc;

use ferry_transport_api::testing::{
    conformance, kill_by_fault_knob, warnings, Capabilities, Pair, Recorder, Setup, DIRECT_PEER,
};
use ferry_transport_api::{Transport, TransportContext};
use ferry_transport_rdma::{RdmaConfig, RdmaTransport};

/// The initiator's every `FAULT_EVERY`-th post fails its queue pair: the kill. Every check
/// posts fewer on one pair.
const FAULT_EVERY: u64 = 256;

/// Completions each port withholds when a check asks (at least what it posts).
const HELD: u64 = 1024;

fn pair(setup: &Setup) -> Pair {
    let start = |config: RdmaConfig, reports: Arc<Recorder>| {
        let t = RdmaTransport::new(config);
        let endpoint = t
            .start(TransportContext {
                completions: reports,
                control: None,
                staging: None,
            })
            .unwrap_or_else(|e| panic!("the RDMA transport starts: {e}"));
        (Arc::new(t), endpoint)
    };
    let config = RdmaConfig {
        devices: ferry_transport_rdma::devices_under_test(),
        ..RdmaConfig::default()
    };
    let (target, endpoint) = start(config.clone(), Recorder::new());
    let reports = Recorder::new();
    let (initiator, _) = start(
        RdmaConfig {
            fault_every: FAULT_EVERY,
            lose_completions: if setup.hold_completions { HELD } else { 0 },
            ..config
        },
        reports.clone(),
    );
    Pair {
        target,
        endpoint,
        initiator,
        reports,
        kill: kill_by_fault_knob(FAULT_EVERY),
    }
}

#[test]
#[ignore = "needs an RDMA device"]
fn rdma_passes_the_transport_conformance_suite() {
    warnings::install();
    conformance(
        &Capabilities {
            // Host bytes labelled as device memory register like any host memory.
            device_memory: true,
            refusal_is_remote_status: false,
            holds_completions: true,
            posts_per_pair: FAULT_EVERY as usize - 1,
        },
        &pair,
    );
    // A WRITE through a deregistered key fails at the NIC: the warning names the peer
    // the queue pair was connected to.
    let failed = warnings::starting_with("work completion failed");
    assert!(!failed.is_empty(), "no work completion failed");
    for w in failed {
        assert_eq!(
            w.fields.get("peer").map(String::as_str),
            Some(DIRECT_PEER),
            "{w:?}"
        );
    }
}
