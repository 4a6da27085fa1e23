//! A connection the provider failed is replaced: a fatal post error marks it dead, and
//! the next `connect` returns a new, working one. The failure comes from the fault knob,
//! which takes the path of a real refusal. Over `shm` and `tcp;ofi_rxm` on loopback.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_transport_api::{FailReason, NoExchange, Opcode, Protocol, Transport};
use ferry_transport_efa::EfaConfig;

/// Posts before the knob fails one: two round trips of two slices each.
const FAULT_EVERY: u64 = 5;

#[test]
fn a_fatal_post_error_marks_the_connection_dead_and_connect_replaces_it() {
    for config in providers_under_test() {
        let provider = config.provider.clone();
        let (target, target_ep, _target_rx) = start(config.clone());
        let (initiator, _, rx) = start(EfaConfig {
            fault_every: FAULT_EVERY,
            ..config
        });
        let (remote, keys) = target_region(&target, 1 << 20);
        let source = local_region(&initiator, 1 << 20);
        let back = local_region(&initiator, 1 << 20);

        let conn = initiator.connect(&target_ep, &NoExchange).unwrap();
        // Posts 1 to 4 go through.
        round_trip(&*conn, &rx, &source, &back, &remote, &keys, 2);
        assert!(conn.is_alive(), "{provider}");

        // Post 5 is refused as the provider refuses one: nothing is reported for it, and
        // the connection is dead.
        let refused = conn
            .post(slice(
                Opcode::Write,
                &source,
                &remote,
                &keys,
                0,
                4096,
                99,
                Instant::now() + Duration::from_secs(30),
            ))
            .unwrap_err();
        assert_eq!(
            refused,
            FailReason::Device {
                transport: Protocol::Efa,
                code: libfabric_sys::FI_EIO as i32
            },
            "{provider}"
        );
        assert!(refused.retryable(), "another transport may carry it");
        assert!(
            !conn.is_alive(),
            "{provider}: a refused post marks its connection dead"
        );
        assert_eq!(
            conn.post(slice(
                Opcode::Write,
                &source,
                &remote,
                &keys,
                0,
                4096,
                98,
                Instant::now() + Duration::from_secs(30),
            ))
            .unwrap_err(),
            FailReason::ConnectionLost,
            "{provider}: a dead connection takes no more slices"
        );

        // The next connect replaces it, and the new connection carries every byte.
        let fresh = initiator.connect(&target_ep, &NoExchange).unwrap();
        assert!(
            !Arc::ptr_eq(&conn, &fresh),
            "{provider}: the dead connection is replaced"
        );
        assert!(fresh.is_alive(), "{provider}");
        assert!(source.copy_from_slice_at(0, &random(source.len())));
        round_trip(&*fresh, &rx, &source, &back, &remote, &keys, 2);
        assert!(
            Arc::ptr_eq(&fresh, &initiator.connect(&target_ep, &NoExchange).unwrap()),
            "{provider}: a live connection is kept"
        );
        assert!(rx.try_recv().is_err(), "{provider}: nothing reported twice");
        initiator.shutdown();
        target.shutdown();
    }
}
