//! The transport conformance suite (`ferry_transport_api::testing`) over libfabric's
//! `shm` and `tcp;ofi_rxm` providers on loopback: device memory through the test knob
//! that registers a CPU stand-in as host memory, a connection killed by the fault knob
//! (a refused post, as the provider refuses one).

mod common;

use std::sync::Arc;

use ferry_transport_api::testing::{
    conformance, kill_by_fault_knob, Capabilities, Pair, Recorder, Setup,
};
use ferry_transport_api::{Transport, TransportContext};
use ferry_transport_efa::{EfaConfig, EfaTransport};

/// The initiator's every `FAULT_EVERY`-th post is refused: the kill. Every check posts
/// fewer on one pair.
const FAULT_EVERY: u64 = 256;

/// Completions each rail withholds when a check asks (at least what it posts).
const HELD: u64 = 1024;

fn pair(config: &EfaConfig, setup: &Setup) -> Pair {
    let config = EfaConfig {
        device_memory_is_host: true,
        ..config.clone()
    };
    let start = |config: EfaConfig, reports: Arc<Recorder>| {
        let t = EfaTransport::new(config);
        let endpoint = t
            .start(TransportContext {
                completions: reports,
                control: None,
                staging: None,
            })
            .unwrap_or_else(|e| panic!("{} transport starts: {e}", t.config().provider));
        (Arc::new(t), endpoint)
    };
    let (target, endpoint) = start(config.clone(), Recorder::new());
    let reports = Recorder::new();
    let (initiator, _) = start(
        EfaConfig {
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
fn efa_passes_the_transport_conformance_suite_over_shm_and_tcp() {
    for config in common::providers_under_test() {
        conformance(
            &Capabilities {
                device_memory: true,
                refusal_is_remote_status: false,
                holds_completions: true,
                posts_per_pair: FAULT_EVERY as usize - 1,
            },
            &|setup| pair(&config, setup),
        );
    }
}
