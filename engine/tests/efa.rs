//! The libfabric transport over the providers that run on any Linux host (`tcp;ofi_rxm`
//! on 127.0.0.1, and `shm`): the same code that runs on EFA.
#![cfg(feature = "efa")]

mod common;

use ferry_engine::fabrics::{Efa, EfaConfig};
use ferry_engine::{Engine, EngineConfig, Location, Protocol, Tcp, TcpConfig};

fn efa_engine(provider: &str) -> Engine {
    Engine::builder()
        .transport(Efa::new(EfaConfig {
            provider: provider.into(),
            ..EfaConfig::default()
        }))
        .fallback(Tcp::new(TcpConfig::default()))
        .build()
        .unwrap_or_else(|e| panic!("engine over {provider}: {e}"))
}

fn round_trips(initiator: &Engine, target: &Engine, protocol: Protocol) {
    let host = Location::host();
    let used = common::round_trips_at(initiator, target, host, host, common::SIZES);
    assert_eq!(used, Some(protocol));
}

#[test]
fn tcp_rxm_provider_moves_every_size_both_ways() {
    let target = efa_engine("tcp;ofi_rxm");
    let initiator = efa_engine("tcp;ofi_rxm");
    assert_eq!(initiator.protocols(), vec![Protocol::Efa, Protocol::Tcp]);
    round_trips(&initiator, &target, Protocol::Efa);
}

#[test]
fn shm_provider_moves_every_size_both_ways() {
    let target = efa_engine("shm");
    let initiator = efa_engine("shm");
    round_trips(&initiator, &target, Protocol::Efa);
}

fn rails_engine(provider: &str, device: &str, rails: usize) -> Engine {
    Engine::from_config(&EngineConfig {
        protocol: "efa".into(),
        efa: Some(EfaConfig {
            provider: provider.into(),
            devices: vec![device.to_string(); rails],
            ..EfaConfig::default()
        }),
        ..EngineConfig::default()
    })
    .unwrap_or_else(|e| panic!("{rails} rails over {provider}: {e}"))
}

/// Engines with several rails (endpoints) publish one address and one key per rail and
/// stripe requests over them; peers with different rail counts still pair up.
#[test]
fn several_rails_publish_every_key_and_move_every_size() {
    for (provider, device) in [("shm", shm_device()), ("tcp;ofi_rxm", "lo".to_string())] {
        let two = rails_engine(provider, &device, 2);
        let one = rails_engine(provider, &device, 1);
        let d = two.descriptor();
        let addresses = d
            .endpoint(Protocol::Efa)
            .unwrap()
            .address
            .split(',')
            .count();
        assert_eq!(addresses, 2, "{provider}");
        let buf = two.allocate(4096, Location::host()).unwrap();
        let efa_keys = two.descriptor().buffers[0].keys_of(Protocol::Efa).unwrap();
        assert_eq!(efa_keys.rails(), 2, "{provider}");
        drop(buf);
        round_trips(&two, &one, Protocol::Efa);
        round_trips(&one, &two, Protocol::Efa);
    }
}

fn shm_device() -> String {
    ferry_engine::fabric_devices()
        .into_iter()
        .find(|d| d.provider == "shm")
        .expect("libfabric's shm provider is present")
        .device
}

#[test]
fn naming_an_absent_fabric_device_is_an_error_that_lists_the_found_ones() {
    let Err(err) = Engine::from_config(&EngineConfig {
        protocol: "efa".into(),
        efa: Some(EfaConfig {
            provider: "shm".into(),
            devices: vec!["nic9".into()],
            ..EfaConfig::default()
        }),
        ..EngineConfig::default()
    }) else {
        panic!("an engine started on a device that does not exist");
    };
    // A device the provider does not list is a configuration error, never "no device",
    // which `allow_tcp_only` would turn into a quiet fall back to TCP.
    assert_eq!(err.kind(), ferry_engine::ErrorKind::InvalidInput, "{err}");
    let err = err.to_string();
    assert!(err.contains("nic9") && err.contains(&shm_device()), "{err}");
}

#[test]
fn efa_and_tcp_only_peers_talk_over_tcp_both_ways() {
    let fabric = efa_engine("tcp;ofi_rxm");
    let plain = Engine::builder()
        .transport(Tcp::new(TcpConfig::default()))
        .build()
        .unwrap();
    round_trips(&fabric, &plain, Protocol::Tcp);
    round_trips(&plain, &fabric, Protocol::Tcp);
}

#[test]
fn protocol_tcp_in_an_efa_build_uses_tcp_only() {
    let e = Engine::from_config(&EngineConfig::default()).unwrap();
    assert_eq!(e.protocols(), vec![Protocol::Tcp]);
    assert!(e.descriptor().endpoint(Protocol::Efa).is_none());
}

#[test]
fn from_config_efa_brings_its_tcp_fallback() {
    let e = Engine::from_config(&EngineConfig {
        protocol: "efa".into(),
        efa: Some(EfaConfig {
            provider: "tcp;ofi_rxm".into(),
            ..EfaConfig::default()
        }),
        ..EngineConfig::default()
    })
    .unwrap();
    assert_eq!(e.protocols(), vec![Protocol::Efa, Protocol::Tcp]);
    let d = e.descriptor();
    assert!(d.endpoint(Protocol::Efa).is_some() && d.endpoint(Protocol::Tcp).is_some());
}

#[test]
fn a_provider_without_devices_is_a_clear_error_or_tcp_when_allowed() {
    // The `efa` provider lists nothing without EFA hardware.
    let config = EngineConfig {
        protocol: "efa".into(),
        ..EngineConfig::default()
    };
    match Engine::from_config(&config) {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("`efa`") && msg.contains("no device"), "{msg}");
            assert_eq!(e.kind(), ferry_engine::ErrorKind::Unsupported, "{msg}");
            let e = Engine::from_config(&EngineConfig {
                allow_tcp_only: true,
                ..config
            })
            .unwrap();
            assert_eq!(e.protocols(), vec![Protocol::Tcp]);
        }
        Ok(e) => {
            // A host with EFA devices: the engine runs on them.
            assert_eq!(e.protocols()[0], Protocol::Efa);
        }
    }
}

#[test]
#[ignore = "needs an EFA device"]
fn efa_devices_move_every_size_both_ways() {
    let target = efa_engine("efa");
    let initiator = efa_engine("efa");
    round_trips(&initiator, &target, Protocol::Efa);
}

fn faulty_engine(retry: bool) -> Engine {
    Engine::builder()
        .transport(Efa::new(EfaConfig {
            provider: "tcp;ofi_rxm".into(),
            max_slice: 64 * 1024,
            fault_every: 5,
            ..EfaConfig::default()
        }))
        .fallback(Tcp::new(TcpConfig::default()))
        .retry_over_tcp(retry)
        .build()
        .unwrap()
}

#[test]
fn failed_fabric_transfers_are_retried_over_tcp_when_allowed() {
    ferry_transport_api::testing::warnings::install();
    let target = efa_engine("tcp;ofi_rxm");
    let initiator = faulty_engine(true);
    // Every fifth EFA post fails; each affected task is retried over TCP and the data
    // still arrives byte for byte.
    round_trips(&initiator, &target, Protocol::Efa);
    // Counted for the peer, and logged naming it once per batch at most.
    common::assert_retries_counted_and_logged(&initiator, &target);
}

/// A refused post kills the fabric connection, so every later task of the batch fails
/// and is retried over TCP: one batch, many retries, each counted, one warning.
#[test]
fn a_batch_with_many_retries_warns_once() {
    ferry_transport_api::testing::warnings::install();
    let target = efa_engine("tcp;ofi_rxm");
    let initiator = faulty_engine(true);
    let remote_buf = target.allocate(1 << 20, Location::host()).unwrap();
    let local = initiator.allocate(1 << 20, Location::host()).unwrap();
    let remote = common::remote_of(&initiator, &target, &remote_buf);
    let mut b = initiator.batch().retry_over_tcp(true);
    for i in 0..10 {
        b.write(&local, i << 16, &remote, (i << 16) as u64, 1 << 16)
            .unwrap();
    }
    b.submit().unwrap().wait(common::WAIT).unwrap();
    let stats = remote.segment().stats();
    assert!(
        stats.retried_over_tcp >= 2 && stats.completed == 10,
        "{stats:?}"
    );
    let name = target.name();
    let warned = ferry_transport_api::testing::warnings::starting_with("fabric transfer failed")
        .into_iter()
        .filter(|w| w.fields.get("peer") == Some(&name))
        .count();
    assert_eq!(warned, 1, "{} retries in one batch", stats.retried_over_tcp);
}

#[test]
fn without_retry_a_failed_fabric_transfer_fails_its_task_and_reopening_reconnects() {
    use ferry_engine::{FailReason, TaskStatus};
    let target = efa_engine("tcp;ofi_rxm");
    let initiator = faulty_engine(false);
    let remote_buf = target.allocate(1 << 20, Location::host()).unwrap();
    let local = initiator.allocate(1 << 20, Location::host()).unwrap();
    let remote = common::remote_of(&initiator, &target, &remote_buf);
    let batch_of = |remote: &ferry_engine::RemoteBuffer, retry: bool, tasks: usize| {
        let mut b = initiator.batch().retry_over_tcp(retry);
        for i in 0..tasks {
            b.write(&local, i << 16, remote, (i << 16) as u64, 1 << 16)
                .unwrap();
        }
        b.submit().unwrap()
    };
    let batch = batch_of(&remote, false, 10);
    let r = batch.wait(common::WAIT);
    // The fifth post is refused as a provider refuses one: its task fails with the
    // fabric's reason and the connection is dead, so every task after it fails too.
    assert!(
        matches!(r, Err(ferry_engine::Error::TasksFailed { failed: 6, .. })),
        "{r:?}"
    );
    let statuses = batch.statuses();
    assert!(
        statuses[..4].iter().all(|s| *s == TaskStatus::Completed),
        "{statuses:?}"
    );
    assert!(
        matches!(
            statuses[4],
            TaskStatus::Failed(FailReason::Device {
                transport: Protocol::Efa,
                ..
            })
        ),
        "{statuses:?}"
    );
    assert!(
        statuses[5..]
            .iter()
            .all(|s| *s == TaskStatus::Failed(FailReason::ConnectionLost)),
        "{statuses:?}"
    );
    // The same batch with retries allowed completes (over TCP: the segment's fabric
    // connection is dead).
    batch_of(&remote, true, 10).wait(common::WAIT).unwrap();
    // Opening the segment again connects over the fabric afresh: without retries, the
    // next four posts (the knob fails the fifth) all complete on the new connection.
    let remote = common::remote_of(&initiator, &target, &remote_buf);
    assert_eq!(remote.segment().protocol(), Some(Protocol::Efa));
    let data = common::random(4 << 16);
    local.write_at(0, &data).unwrap();
    batch_of(&remote, false, 4).wait(common::WAIT).unwrap();
    let mut on_target = vec![0u8; data.len()];
    remote_buf.read_at(0, &mut on_target).unwrap();
    common::assert_bytes_eq(&on_target, &data, "target memory after the reconnect");
}
