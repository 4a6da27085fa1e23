//! Set-up exchanges sent to an engine's port (`Exchange` frames, as a peer's fabric
//! transport sends them through `ferry_transport_tcp::exchange_with`): a protocol the
//! engine runs no transport for is refused with a reason that names it, its TCP transport
//! refuses because it sets nothing up, a secret guards the exchange as it guards every
//! frame, and the port goes on serving descriptors and transfers afterwards.

mod common;

use common::{engine_with, pair, random, write_check_read, Pair, WAIT};
use ferry_engine::{Location, Protocol, SharedSecret, TcpConfig};
use ferry_transport_tcp::exchange_with;

/// A set-up message as a peer's RDMA transport might open one (any bytes do: an engine
/// without the transport must refuse before reading them).
const MESSAGE: &[u8] = b"FYQP\x01\x01 queue pairs for NIC 0, please";

#[test]
fn an_engine_without_an_rdma_transport_refuses_an_rdma_exchange_and_keeps_serving() {
    let Pair {
        target,
        initiator,
        target_buf,
        local,
        remote,
    } = pair(1 << 20);
    let back = initiator.allocate(1 << 20, Location::host()).unwrap();
    assert_eq!(target.protocols(), [Protocol::Tcp]);
    // A transfer before, so the one after shows the same connections still work.
    write_check_read(&initiator, &local, &back, &remote, &target_buf, 4096, 0, 0);
    for protocol in [Protocol::Rdma, Protocol::Efa] {
        let err = exchange_with(&target.name(), protocol, MESSAGE, WAIT, None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("this engine has no {protocol} transport")),
            "{protocol}: {msg}"
        );
        assert!(
            msg.contains(&format!("refused the {protocol} set-up")),
            "{protocol}: {msg}"
        );
    }
    // The engine's TCP transport is asked, and refuses: TCP sets nothing up.
    let err = exchange_with(&target.name(), Protocol::Tcp, &random(64), WAIT, None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("sets nothing up"), "{msg}");
    assert!(!msg.contains("has no tcp transport"), "{msg}");

    // The port still serves: a transfer on the open segment, a fresh descriptor fetch
    // and a new peer opening the segment.
    write_check_read(
        &initiator,
        &local,
        &back,
        &remote,
        &target_buf,
        (1 << 20) - 7,
        3,
        5,
    );
    let fetched = ferry_transport_tcp::fetch_descriptor(&target.name(), WAIT).unwrap();
    let d: ferry_engine::SegmentDescriptor = serde_json::from_slice(&fetched).unwrap();
    assert_eq!(d.name, target.name());
    assert_eq!(d.buffers.len(), 1);
    let late = common::engine();
    let late_local = late.allocate(1 << 20, Location::host()).unwrap();
    let late_back = late.allocate(1 << 20, Location::host()).unwrap();
    let late_remote = common::remote_of(&late, &target, &target_buf);
    write_check_read(
        &late,
        &late_local,
        &late_back,
        &late_remote,
        &target_buf,
        65536 + 17,
        1,
        11,
    );
}

#[test]
fn an_engines_secret_guards_its_exchanges() {
    let secret = SharedSecret::from("an engine secret for exchanges");
    let target = engine_with(TcpConfig {
        secret: Some(secret.clone()),
        ..TcpConfig::default()
    });
    let err = exchange_with(&target.name(), Protocol::Rdma, MESSAGE, WAIT, None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("secret"), "{msg}");
    assert!(!msg.contains("no rdma transport"), "{msg}");
    // With the secret, the engine's own answer comes back.
    let err =
        exchange_with(&target.name(), Protocol::Rdma, MESSAGE, WAIT, Some(&secret)).unwrap_err();
    assert!(
        err.to_string()
            .contains("this engine has no rdma transport"),
        "{err}"
    );
}

/// An RDMA build on a host without RDMA devices, running on TCP as allowed: a real
/// queue-pair request is refused by the engine (no RDMA transport started), not handed
/// to a transport that is not there. Where a device exists the transport answers, and a
/// request it cannot use is refused as malformed or for its NICs.
#[cfg(feature = "rdma")]
#[test]
fn an_rdma_build_answers_a_queue_pair_request_only_with_a_started_rdma_transport() {
    use ferry_transport_rdma::exchange::{Kind, Message};

    let e = ferry_engine::Engine::from_config(&ferry_engine::EngineConfig {
        protocol: "rdma".into(),
        allow_tcp_only: true,
        ..ferry_engine::EngineConfig::default()
    })
    .unwrap();
    let request = common::link_local_qp_request(0x5eed_0000_0000_0001, 4);
    let answered = exchange_with(&e.name(), Protocol::Rdma, &request.encode(), WAIT, None);
    if e.protocols().contains(&Protocol::Rdma) {
        // A well-formed request gets a queue pair of this side's for each one asked, or,
        // where the NIC cannot reach the made-up addresses (soft-RoCE with IPv4 GIDs
        // refuses these link-local ones), a refusal that says so.
        match answered {
            Ok(bytes) => {
                let answer = Message::decode(&bytes).unwrap();
                assert_eq!(answer.kind, Kind::Answer);
                assert_eq!(answer.connection, request.connection);
                assert_eq!(answer.qps.len(), request.qps.len());
                for (ours, theirs) in answer.qps.iter().zip(&request.qps) {
                    assert_eq!(
                        ours.peer_nic, theirs.nic,
                        "each answer names its pair's NIC"
                    );
                }
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(
                        "exchange refused: could not connect queue pair 0 to the peer's address"
                    ),
                    "{msg}"
                );
            }
        }
        // The transport decodes what it is given: garbage is refused as malformed.
        let err = exchange_with(&e.name(), Protocol::Rdma, b"not FYQP", WAIT, None).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    } else {
        let err = answered.unwrap_err();
        assert!(
            err.to_string()
                .contains("this engine has no rdma transport"),
            "{err}"
        );
    }
    // Either way the port keeps serving.
    let target = common::engine();
    common::round_trips_at(
        &e,
        &target,
        Location::host(),
        Location::host(),
        &common::SIZES[..2],
    );
    let fetched = ferry_transport_tcp::fetch_descriptor(&e.name(), WAIT).unwrap();
    assert!(!fetched.is_empty());
}
