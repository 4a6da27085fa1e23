//! Every slice ends, once: a slice whose completion never comes ends `TimedOut` at its
//! own deadline (and its connection is replaced), and shutdown ends what is in flight.
//! Over `shm` and `tcp;ofi_rxm` on loopback.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use crossbeam_channel::Receiver;
use ferry_transport_api::{FailReason, NoExchange, Opcode, RemoteKeys, Transport};
use ferry_transport_efa::{providers, EfaConfig, EfaTransport, OpStats};

/// Waits until `cond` holds for the transport's operation counters; fails the test (with
/// the counters) if it does not within a minute.
fn wait_stats(t: &EfaTransport, what: &str, cond: impl Fn(&OpStats) -> bool) -> OpStats {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let st = t.op_stats();
        if cond(&st) {
            return st;
        }
        assert!(Instant::now() < give_up, "{what}: {st:?}");
        std::thread::yield_now();
    }
}

/// Nothing more is reported: every report of the test has been read.
fn no_more_reports(rx: &Receiver<Report>) {
    if let Ok(extra) = rx.try_recv() {
        panic!("a slice was reported twice or from nowhere: {extra:?}");
    }
}

const LOST: u32 = 1000;

#[test]
fn a_lost_completion_ends_its_slice_at_its_deadline_once_and_connect_replaces_the_connection() {
    for config in providers_under_test() {
        let provider = config.provider.clone();
        let (target, target_ep, target_rx) = start(config.clone());
        let (initiator, initiator_ep, rx) = start(EfaConfig {
            lose_completions: 1,
            ..config
        });
        let (remote, keys) = target_region(&target, 1 << 20);
        let source = local_region(&initiator, 1 << 20);
        let back = local_region(&initiator, 1 << 20);

        // The provider's own connection between the two endpoints is set up from the
        // other side first, so the lost slice is not held up by it (its completions
        // are the target's, which loses none).
        let (warm, warm_keys) = target_region(&initiator, 4096);
        let warm_source = local_region(&target, 4096);
        target
            .connect(&initiator_ep, &NoExchange)
            .unwrap()
            .post(slice(
                Opcode::Write,
                &warm_source,
                &warm,
                &warm_keys,
                0,
                4096,
                0,
                Instant::now() + Duration::from_secs(30),
            ))
            .expect("posted");
        assert_eq!(next(&target_rx).1, Ok(4096), "{provider}");
        assert!(contents(&warm) == contents(&warm_source), "{provider}");

        let conn = initiator.connect(&target_ep, &NoExchange).unwrap();
        assert!(conn.is_alive());

        // The first completion is lost: only the slice's own deadline ends it.
        let lost = slice(
            Opcode::Write,
            &source,
            &remote,
            &keys,
            0,
            4096,
            LOST,
            Instant::now() + Duration::from_secs(1),
        );
        conn.post(lost).expect("posted");
        let (token, result) = next(&rx);
        assert_eq!(
            (token.task, result),
            (LOST, Err(FailReason::TimedOut)),
            "{provider}"
        );
        assert!(
            !conn.is_alive(),
            "{provider}: a lost operation marks its connection dead"
        );
        assert_eq!(
            conn.post(slice(
                Opcode::Write,
                &source,
                &remote,
                &keys,
                0,
                4096,
                1,
                Instant::now() + Duration::from_secs(30)
            ))
            .unwrap_err(),
            FailReason::ConnectionLost,
            "{provider}: a dead connection takes no more slices"
        );
        // The held-back completion arrives late: ignored, its context freed.
        let st = wait_stats(&initiator, "the late completion is handed back", |s| {
            s.late == 1
        });
        assert_eq!((st.lost, st.timed_out), (1, 1), "{provider}: {st:?}");
        assert_eq!((st.in_flight, st.abandoned), (0, 0), "{provider}: {st:?}");

        let fresh = initiator.connect(&target_ep, &NoExchange).unwrap();
        assert!(
            !Arc::ptr_eq(&conn, &fresh),
            "{provider}: the dead connection is replaced"
        );
        assert!(fresh.is_alive());
        round_trip(&*fresh, &rx, &source, &back, &remote, &keys, 8);
        assert!(
            Arc::ptr_eq(&fresh, &initiator.connect(&target_ep, &NoExchange).unwrap()),
            "{provider}: a live connection is kept"
        );
        no_more_reports(&rx);
        let st = initiator.op_stats();
        assert_eq!(
            (st.timed_out, st.late, st.completed),
            (1, 1, 16),
            "{provider}: {st:?}"
        );
        initiator.shutdown();
        target.shutdown();
        no_more_reports(&rx);
    }
}

fn shm_device() -> String {
    providers()
        .into_iter()
        .find(|p| p.provider == "shm")
        .expect("libfabric's shm provider is present")
        .domain
}

/// `shm` given a wrong key on one rail reports no completion at all (libfabric 1.17):
/// the slice on that rail ends by its deadline, the other rail's completes, and a new
/// connection with the right keys moves every byte on both rails. The lost operation's
/// context is freed when the endpoint closes, without a second report.
#[test]
fn a_wrong_key_on_one_shm_rail_ends_by_the_deadline_and_shutdown_frees_the_context() {
    let config = EfaConfig {
        provider: "shm".into(),
        devices: vec![shm_device(); 2],
        ..EfaConfig::default()
    };
    let (target, target_ep, _target_rx) = start(config.clone());
    let (initiator, _, rx) = start(config);
    let (remote, keys) = target_region(&target, 1 << 20);
    assert_eq!(keys.rails(), 2);
    let source = local_region(&initiator, 1 << 20);
    let back = local_region(&initiator, 1 << 20);
    let conn = initiator.connect(&target_ep, &NoExchange).unwrap();

    let bad = RemoteKeys::new(vec![
        keys.rail(0).unwrap(),
        keys.rail(1).unwrap() ^ 0x5a5a_5a5a,
    ])
    .unwrap();
    // Slice 0 leaves on rail 0 (right key), slice 1 on rail 1 (wrong key).
    let deadline = Instant::now() + Duration::from_secs(1);
    for task in 0..2u32 {
        let offset = task as usize * 4096;
        conn.post(slice(
            Opcode::Write,
            &source,
            &remote,
            &bad,
            offset,
            4096,
            task,
            deadline,
        ))
        .expect("posted");
    }
    let mut reports: HashMap<u32, Result<usize, FailReason>> = HashMap::new();
    for _ in 0..2 {
        let (token, result) = next(&rx);
        assert!(
            reports.insert(token.task, result).is_none(),
            "reported twice"
        );
    }
    assert_eq!(reports[&0], Ok(4096));
    assert_eq!(reports[&1], Err(FailReason::TimedOut));
    assert!(!conn.is_alive());
    assert_eq!(initiator.rail_posts(), vec![1, 1]);
    let st = initiator.op_stats();
    assert_eq!(
        (st.timed_out, st.abandoned, st.in_flight),
        (1, 1, 0),
        "shm never gives the operation back: {st:?}"
    );

    // The replacement leaves out the rail whose provider kept the lost operation (shm
    // stops answering on that endpoint) and still reaches both of the target's rails.
    let fresh = initiator.connect(&target_ep, &NoExchange).unwrap();
    round_trip(&*fresh, &rx, &source, &back, &remote, &keys, 16);
    assert_eq!(initiator.rail_posts(), vec![1 + 32, 1]);

    initiator.shutdown();
    let st = initiator.op_stats();
    assert_eq!(
        (st.abandoned, st.in_flight, st.shut_down),
        (0, 0, 0),
        "{st:?}"
    );
    no_more_reports(&rx);
    target.shutdown();
}

/// Completions still outstanding when the transport shuts down end `Shutdown`, once each,
/// and no context is left.
#[test]
fn shutdown_ends_operations_in_flight_once_and_frees_their_contexts() {
    for config in providers_under_test() {
        let provider = config.provider.clone();
        let (target, target_ep, _target_rx) = start(config.clone());
        // Their completions are held back: the slices stay in flight until shutdown.
        let (initiator, _, rx) = start(EfaConfig {
            lose_completions: 8,
            ..config
        });
        let (remote, keys) = target_region(&target, 1 << 20);
        let local = local_region(&initiator, 1 << 20);
        let conn = initiator.connect(&target_ep, &NoExchange).unwrap();
        for task in 0..8u32 {
            let op = if task % 2 == 0 {
                Opcode::Write
            } else {
                Opcode::Read
            };
            conn.post(slice(
                op,
                &local,
                &remote,
                &keys,
                task as usize * 65536,
                65536,
                task,
                Instant::now() + Duration::from_secs(120),
            ))
            .expect("posted");
        }
        wait_stats(&initiator, "every completion was read and held", |s| {
            s.lost == 8
        });
        assert!(rx.try_recv().is_err(), "{provider}: nothing reported yet");
        assert_eq!(initiator.op_stats().in_flight, 8);

        initiator.shutdown();
        let mut seen = [false; 8];
        for _ in 0..8 {
            let (token, result) = next(&rx);
            assert_eq!(result, Err(FailReason::Shutdown), "{provider}");
            assert!(
                !std::mem::replace(&mut seen[token.task as usize], true),
                "twice"
            );
        }
        no_more_reports(&rx);
        let st = initiator.op_stats();
        assert_eq!(
            (st.in_flight, st.abandoned, st.shut_down),
            (0, 0, 8),
            "{provider}: {st:?}"
        );
        assert_eq!(
            conn.post(slice(
                Opcode::Write,
                &local,
                &remote,
                &keys,
                0,
                4096,
                9,
                Instant::now() + Duration::from_secs(30),
            ))
            .unwrap_err(),
            FailReason::Shutdown
        );
        target.shutdown();
    }
}

/// Shutting down with real transfers under way: every posted slice is reported exactly
/// once (done, or `Shutdown`), and no context is left.
#[test]
fn shutdown_under_load_reports_every_slice_once() {
    for config in providers_under_test() {
        let provider = config.provider.clone();
        let (target, target_ep, _target_rx) = start(config.clone());
        let (initiator, _, rx) = start(config);
        let (remote, keys) = target_region(&target, 16 << 20);
        let local = local_region(&initiator, 16 << 20);
        let conn = initiator.connect(&target_ep, &NoExchange).unwrap();
        let pieces = 64u32;
        let len = (16 << 20) / pieces as usize;
        let mut posted = 0;
        for task in 0..pieces {
            let op = if task % 2 == 0 {
                Opcode::Write
            } else {
                Opcode::Read
            };
            let s = slice(
                op,
                &local,
                &remote,
                &keys,
                task as usize * len,
                len,
                task,
                Instant::now() + Duration::from_secs(60),
            );
            if conn.post(s).is_ok() {
                posted += 1;
            }
        }
        initiator.shutdown();
        let mut seen = vec![false; pieces as usize];
        let mut shut_down = 0;
        for _ in 0..posted {
            let (token, result) = next(&rx);
            match result {
                Ok(n) => assert_eq!(n, len),
                Err(FailReason::Shutdown) => shut_down += 1,
                other => panic!("{provider}: slice {} ended {other:?}", token.task),
            }
            assert!(
                !std::mem::replace(&mut seen[token.task as usize], true),
                "twice"
            );
        }
        no_more_reports(&rx);
        let st = initiator.op_stats();
        assert_eq!((st.in_flight, st.abandoned), (0, 0), "{provider}: {st:?}");
        assert_eq!(st.shut_down, shut_down, "{provider}: {st:?}");
        target.shutdown();
    }
}

/// A transport whose every rail lost an operation (`shm` loses a WRITE to a wrong key;
/// it does not check a READ's) refuses new connections (the engine
/// then reaches the peer over its fallback) instead of handing out one that cannot
/// complete anything.
#[test]
fn connect_fails_when_every_rail_lost_an_operation() {
    let config = EfaConfig {
        provider: "shm".into(),
        ..EfaConfig::default()
    };
    let (target, target_ep, _target_rx) = start(config.clone());
    let (initiator, _, rx) = start(config);
    let (remote, keys) = target_region(&target, 1 << 16);
    let local = local_region(&initiator, 1 << 16);
    let conn = initiator.connect(&target_ep, &NoExchange).unwrap();
    let wrong = RemoteKeys::single(keys.first() ^ 0x5a5a_5a5a);
    conn.post(slice(
        Opcode::Write,
        &local,
        &remote,
        &wrong,
        0,
        4096,
        3,
        Instant::now() + Duration::from_secs(1),
    ))
    .expect("posted");
    assert_eq!(next(&rx), (token(3), Err(FailReason::TimedOut)));
    let err = initiator
        .connect(&target_ep, &NoExchange)
        .err()
        .expect("no rail left to connect over");
    assert!(err.to_string().contains(&target_ep.address), "{err}");
    initiator.shutdown();
    let st = initiator.op_stats();
    assert_eq!(
        (st.abandoned, st.in_flight, st.timed_out),
        (0, 0, 1),
        "{st:?}"
    );
    no_more_reports(&rx);
    target.shutdown();
}

fn token(task: u32) -> ferry_transport_api::CompletionToken {
    ferry_transport_api::CompletionToken {
        slot: 0,
        generation: 0,
        task,
    }
}

/// A slice the provider never completes and whose deadline is far off: shutdown waits
/// for it only briefly, then closes the endpoint and reports it `Shutdown`, once.
#[test]
fn shutdown_ends_a_slice_the_provider_never_completes() {
    let config = EfaConfig {
        provider: "shm".into(),
        ..EfaConfig::default()
    };
    let (target, target_ep, _target_rx) = start(config.clone());
    let (initiator, _, rx) = start(config);
    let (remote, keys) = target_region(&target, 1 << 16);
    let local = local_region(&initiator, 1 << 16);
    let conn = initiator.connect(&target_ep, &NoExchange).unwrap();
    let wrong = RemoteKeys::single(keys.first() ^ 0x5a5a_5a5a);
    conn.post(slice(
        Opcode::Write,
        &local,
        &remote,
        &wrong,
        0,
        4096,
        5,
        Instant::now() + Duration::from_secs(600),
    ))
    .expect("posted");
    initiator.shutdown();
    assert_eq!(next(&rx), (token(5), Err(FailReason::Shutdown)));
    no_more_reports(&rx);
    let st = initiator.op_stats();
    assert_eq!(
        (st.in_flight, st.abandoned, st.shut_down, st.timed_out),
        (0, 0, 1, 0),
        "{st:?}"
    );
    target.shutdown();
}

/// A WRITE through a key the target no longer has ends with the provider's error
/// completion over `tcp;ofi_rxm` (the target refuses it), and the warning about the
/// failed operation names the peer the connection was opened to, not only the device.
#[test]
fn a_failed_operation_is_logged_naming_its_peer() {
    use ferry_transport_api::testing::{warnings, Direct, DIRECT_PEER};
    warnings::install();
    let config = providers_under_test()
        .into_iter()
        .find(|c| c.provider == "tcp;ofi_rxm")
        .expect("tcp;ofi_rxm is under test");
    let (target, target_ep, _target_rx) = start(config.clone());
    let target = Arc::new(target);
    let (initiator, _, rx) = start(config);
    let (gone, keys) = target_region(&target, 4096);
    target.deregister(&gone);
    let source = local_region(&initiator, 4096);
    let conn = initiator
        .connect(&target_ep, &Direct(target.clone()))
        .expect("connects");
    let deadline = Instant::now() + Duration::from_secs(20);
    conn.post(slice(
        Opcode::Write,
        &source,
        &gone,
        &keys,
        0,
        4096,
        1,
        deadline,
    ))
    .expect("posted");
    conn.flush();
    let (_, result) = next(&rx);
    assert!(
        matches!(result, Err(ref r) if *r != FailReason::TimedOut),
        "a refused WRITE ends with the provider's error: {result:?}"
    );
    let failed = warnings::starting_with("libfabric operation failed");
    assert!(!failed.is_empty(), "the failure is logged");
    for w in &failed {
        assert_eq!(
            w.fields.get("peer").map(String::as_str),
            Some(DIRECT_PEER),
            "{w:?}"
        );
    }
}
