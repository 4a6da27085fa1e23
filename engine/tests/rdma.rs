//! The engine with the `rdma` feature: what holds on every host (the protocol is honoured
//! exactly, a host without RDMA gives a clear error or TCP when allowed, peers with and
//! without RDMA talk over TCP), and the transfer suite over RDMA devices (`--hw`).
#![cfg(feature = "rdma")]

mod common;

use ferry_engine::fabrics::{Rdma, RdmaConfig};
use ferry_engine::{Engine, EngineConfig, ErrorKind, Location, Protocol, Tcp, TcpConfig};

fn rdma_config() -> RdmaConfig {
    RdmaConfig {
        // The `--hw` tests' devices: `FERRY_RDMA_DEVICES`, else every usable one.
        devices: ferry_engine::fabrics::rdma_devices_under_test(),
        ..RdmaConfig::default()
    }
}

fn host_has_rdma() -> bool {
    let (_, selection) = ferry_engine::rdma_devices(&rdma_config());
    !selection.nics.is_empty()
}

/// The ibverbs device files this process holds open (`/dev/infiniband/uverbs*`): what
/// opening an RDMA device leaves behind.
fn open_verbs_devices() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter(|target| target.to_string_lossy().contains("/dev/infiniband/"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn protocol_rdma_without_devices_is_a_clear_error_or_tcp_when_allowed() {
    let config = EngineConfig {
        protocol: "rdma".into(),
        rdma: Some(rdma_config()),
        ..EngineConfig::default()
    };
    match Engine::from_config(&config) {
        Err(e) => {
            assert!(!host_has_rdma(), "a host with RDMA ports failed: {e}");
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
            // The error names what was found: ENOSYS, no device, or each device and why
            // it cannot be used.
            let (found, _) = ferry_engine::rdma_devices(&rdma_config());
            let msg = e.to_string();
            assert!(msg.contains("RDMA"), "{msg}");
            assert!(
                msg.contains(&found.summary()),
                "{msg} (found: {})",
                found.summary()
            );
            let e = Engine::from_config(&EngineConfig {
                allow_tcp_only: true,
                ..config
            })
            .unwrap();
            assert_eq!(e.protocols(), vec![Protocol::Tcp]);
            assert!(e.descriptor().endpoint(Protocol::Rdma).is_none());
            // And it works, over TCP.
            let target = common::engine();
            let used = common::round_trips_at(
                &e,
                &target,
                Location::host(),
                Location::host(),
                &common::SIZES[..3],
            );
            assert_eq!(used, Some(Protocol::Tcp));
        }
        Ok(e) => {
            assert!(host_has_rdma());
            assert_eq!(e.protocols(), vec![Protocol::Rdma, Protocol::Tcp]);
        }
    }
}

#[test]
fn naming_an_absent_device_says_so() {
    let Err(e) = Engine::from_config(&EngineConfig {
        protocol: "rdma".into(),
        rdma: Some(RdmaConfig {
            devices: vec!["mlx5_99".into()],
            ..RdmaConfig::default()
        }),
        ..EngineConfig::default()
    }) else {
        panic!("an engine started on a device that does not exist");
    };
    let msg = e.to_string();
    let (found, _) = ferry_engine::rdma_devices(&RdmaConfig::default());
    if found.unavailable.is_none() {
        assert!(
            msg.contains("mlx5_99") && msg.contains("not on this host"),
            "{msg}"
        );
    } else {
        assert!(
            msg.contains(found.unavailable.as_deref().unwrap_or_default()),
            "{msg}"
        );
    }
}

#[test]
fn protocol_tcp_in_an_rdma_build_opens_no_rdma_device() {
    let before = open_verbs_devices();
    let e = Engine::from_config(&EngineConfig::default()).unwrap();
    assert_eq!(e.protocols(), vec![Protocol::Tcp]);
    assert!(e.descriptor().endpoint(Protocol::Rdma).is_none());
    let target = common::engine();
    common::round_trips_at(
        &e,
        &target,
        Location::host(),
        Location::host(),
        &common::SIZES[..2],
    );
    assert_eq!(
        open_verbs_devices(),
        before,
        "a TCP engine opened an RDMA device"
    );
}

#[test]
fn the_rdma_config_nests_and_refuses_unknown_fields() {
    let config: EngineConfig =
        serde_json::from_str(r#"{"protocol": "rdma", "rdma": {"devices": ["mlx5_0:1"], "qps_per_pair": 4, "gid_index": 3}}"#)
            .unwrap();
    let rdma = config.rdma.unwrap();
    assert_eq!(
        (rdma.devices, rdma.qps_per_pair, rdma.gid_index),
        (vec!["mlx5_0:1".to_string()], 4, Some(3))
    );
    let err = serde_json::from_str::<EngineConfig>(r#"{"rdma": {"qps": 4}}"#).unwrap_err();
    assert!(err.to_string().contains("qps"), "{err}");
}

/// A peer whose descriptor lists RDMA, and an engine that has none (an RDMA build on a
/// host without devices, running on TCP as allowed): they talk over TCP, both ways.
#[cfg(feature = "http")]
#[test]
fn a_peer_that_publishes_rdma_and_one_that_does_not_talk_over_tcp() {
    use ferry_engine::{BufferDescriptor, Endpoint, TransportKey};

    let len = 1 << 20;
    let store = common::stores::HttpServer::start(false);
    let target = common::engine();
    let buf = target.allocate(len, Location::host()).unwrap();
    // The target's descriptor as an RDMA peer publishes it: an RDMA endpoint, and an RDMA
    // key per buffer beside the TCP one.
    let mut d = target.descriptor();
    d.name = "rdma-peer".into();
    d.endpoints.insert(
        0,
        Endpoint {
            protocol: Protocol::Rdma,
            address: "mlx5_0:1/eth,mlx5_1:1/eth".into(),
        },
    );
    for b in &mut d.buffers {
        let b: &mut BufferDescriptor = b;
        b.keys.push(TransportKey {
            protocol: Protocol::Rdma,
            key: 0x1234,
        });
        b.keys.push(TransportKey {
            protocol: Protocol::Rdma,
            key: 0x5678,
        });
    }
    d.validate().unwrap();
    store.entries.lock().unwrap().insert(
        "ferry/segments/rdma-peer".into(),
        serde_json::to_vec(&d).unwrap(),
    );
    let initiator = Engine::from_config(&EngineConfig {
        protocol: "rdma".into(),
        metadata: store.url(),
        allow_tcp_only: true,
        rdma: Some(rdma_config()),
        ..EngineConfig::default()
    })
    .unwrap();
    if initiator.protocols()[0] == Protocol::Rdma {
        // A host with RDMA: the fake keys would be refused by the NIC; the --hw tests
        // cover this host.
        return;
    }
    let seg = initiator.open_segment("rdma-peer").unwrap();
    assert_eq!(seg.protocol(), Some(Protocol::Tcp));
    let (remote, offset) = seg.locate(buf.addr(), len as u64).unwrap();
    assert_eq!(offset, 0);
    let local = initiator.allocate(len, Location::host()).unwrap();
    let data = common::random(len);
    local.write_at(0, &data).unwrap();
    let mut b = initiator.batch();
    b.write(&local, 0, &remote, 0, len).unwrap();
    b.submit().unwrap().wait(common::WAIT).unwrap();
    let mut got = vec![0u8; data.len()];
    buf.read_at(0, &mut got).unwrap();
    common::assert_bytes_eq(&got, &data, "written over TCP to the RDMA peer");
    // And the other way: the RDMA-publishing side is the target of a READ too.
    let back = initiator.allocate(len, Location::host()).unwrap();
    let mut b = initiator.batch();
    b.read(&back, 0, &remote, 0, len).unwrap();
    b.submit().unwrap().wait(common::WAIT).unwrap();
    let mut got = vec![0u8; data.len()];
    back.read_at(0, &mut got).unwrap();
    common::assert_bytes_eq(&got, &data, "read over TCP from the RDMA peer");
}

fn rdma_engine() -> Engine {
    rdma_engine_at(None)
}

/// An engine over RDMA, listening at `address` when given (a restart at the same port).
fn rdma_engine_at(address: Option<String>) -> Engine {
    rdma_engine_with(rdma_config(), address)
}

fn rdma_engine_with(config: RdmaConfig, address: Option<String>) -> Engine {
    let mut b = Engine::builder()
        .transport(Rdma::new(config))
        .fallback(Tcp::new(TcpConfig::default()));
    if let Some(a) = address {
        b = b.listen(a);
    }
    b.build()
        .unwrap_or_else(|e| panic!("engine over RDMA: {e}"))
}

#[test]
#[ignore = "needs an RDMA device"]
fn rdma_devices_move_every_size_both_ways() {
    let target = rdma_engine();
    let initiator = rdma_engine();
    assert_eq!(initiator.protocols(), vec![Protocol::Rdma, Protocol::Tcp]);
    let host = Location::host();
    let used = common::round_trips_at(&initiator, &target, host, host, common::SIZES);
    assert_eq!(used, Some(Protocol::Rdma));
}

#[test]
#[ignore = "needs an RDMA device"]
fn rdma_and_tcp_only_peers_talk_over_tcp_both_ways() {
    let fabric = rdma_engine();
    let plain = common::engine();
    let host = Location::host();
    assert_eq!(
        common::round_trips_at(&fabric, &plain, host, host, common::SIZES),
        Some(Protocol::Tcp)
    );
    assert_eq!(
        common::round_trips_at(&plain, &fabric, host, host, common::SIZES),
        Some(Protocol::Tcp)
    );
}

#[test]
#[ignore = "needs an RDMA device"]
fn failed_rdma_transfers_are_retried_over_tcp_when_allowed() {
    ferry_transport_api::testing::warnings::install();
    let target = rdma_engine();
    let initiator = Engine::builder()
        .transport(Rdma::new(RdmaConfig {
            fault_every: 5,
            max_slice: 64 * 1024,
            ..rdma_config()
        }))
        .fallback(Tcp::new(TcpConfig::default()))
        .retry_over_tcp(true)
        .build()
        .unwrap();
    let host = Location::host();
    let used = common::round_trips_at(&initiator, &target, host, host, common::SIZES);
    assert!(used.is_some());
    // Counted for the peer, and logged naming it once per batch at most (the 64 MiB
    // batch loses about 200 of its 64 KiB slices).
    common::assert_retries_counted_and_logged(&initiator, &target);
}

/// A target restarted at the same address over RDMA: its old queue pairs are gone (the
/// NIC reports the first batch's operations failed, or its deadline ends it), and a
/// later batch follows the peer to its new descriptor, connects new queue pairs and
/// lands in the new buffer, still over RDMA, without the caller opening anything.
#[test]
#[ignore = "needs an RDMA device"]
fn a_restarted_rdma_peer_is_followed_over_rdma() {
    let used = common::handles_follow_a_restarted_peer(&rdma_engine_at, &rdma_engine());
    assert_eq!(used, (Some(Protocol::Rdma), Some(Protocol::Rdma)));
}

/// A queue-pair request the target refuses (addresses its NIC cannot reach, as soft-RoCE
/// refuses link-local GIDs) changes nothing the target keeps: with room for one queue
/// pair, the connection it already serves is not evicted to make room for the refused
/// one, and the next transfer on that connection lands.
#[test]
#[ignore = "needs an RDMA device"]
fn a_refused_queue_pair_request_evicts_no_connection() {
    let one_port = |max_peer_qps| RdmaConfig {
        devices: rdma_config().devices.into_iter().take(1).collect(),
        qps_per_pair: 1,
        max_peer_qps,
        ..rdma_config()
    };
    let target = rdma_engine_with(one_port(1), None);
    let initiator = rdma_engine_with(one_port(4096), None);
    let len = 64 * 1024;
    let target_buf = target.allocate(len, Location::host()).unwrap();
    let local = initiator.allocate(len, Location::host()).unwrap();
    // `write_check_read` reads back one byte in.
    let back = initiator.allocate(len + 1, Location::host()).unwrap();
    let remote = common::remote_of(&initiator, &target, &target_buf);
    common::write_check_read(&initiator, &local, &back, &remote, &target_buf, len, 0, 0);
    assert_eq!(remote.segment().protocol(), Some(Protocol::Rdma));

    let request = common::link_local_qp_request(0x0bad_0000_0000_0001, 1);
    let answered = ferry_transport_tcp::exchange_with(
        &target.name(),
        Protocol::Rdma,
        &request.encode(),
        common::WAIT,
        None,
    );
    if answered.is_ok() {
        // This NIC can reach those addresses: the request was a good one, and making
        // room for it by dropping the oldest connection is what the limit means.
        eprintln!("skipped: this NIC accepts link-local GIDs, so the request was not refused");
        return;
    }
    common::write_check_read(&initiator, &local, &back, &remote, &target_buf, len, 0, 0);
}
