//! Run-time configuration: the protocol is honoured exactly, and what a build lacks is a
//! clear error naming the Cargo feature.

mod common;

use ferry_engine::{Engine, EngineConfig, Error, ErrorKind, Location, Protocol, TcpConfig};

#[test]
fn from_config_tcp_builds_a_working_engine() {
    let target = Engine::from_config(&EngineConfig::default()).unwrap();
    let initiator = Engine::from_config(&EngineConfig {
        protocol: "TCP".into(),
        tcp: TcpConfig {
            lanes: 2,
            ..TcpConfig::default()
        },
        ..EngineConfig::default()
    })
    .unwrap();
    assert_eq!(target.protocols(), vec![ferry_engine::Protocol::Tcp]);
    let remote_buf = target.allocate(4096, Location::host()).unwrap();
    let local = initiator.allocate(4096, Location::host()).unwrap();
    let data = common::random(4096);
    local.write_at(0, &data).unwrap();
    let seg = initiator.open_segment(&target.name()).unwrap();
    assert_eq!(seg.protocol(), Some(ferry_engine::Protocol::Tcp));
    let mut b = initiator.batch();
    b.write(&local, 0, &seg.buffer(0).unwrap(), 0, 4096)
        .unwrap();
    b.submit().unwrap().wait(common::WAIT).unwrap();
    let mut got = vec![0u8; 4096];
    remote_buf.read_at(0, &mut got).unwrap();
    assert_eq!(got, data);
}

#[test]
fn fabric_protocols_not_compiled_in_name_their_feature() {
    let missing: Vec<Protocol> = Protocol::ALL
        .into_iter()
        .filter(|p| !ferry_engine::compiled().contains(p))
        .collect();
    if !cfg!(feature = "rdma") {
        assert!(missing.contains(&Protocol::Rdma));
    }
    for protocol in missing {
        let err = Engine::from_config(&EngineConfig {
            protocol: protocol.name().into(),
            ..EngineConfig::default()
        })
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        let msg = err.to_string();
        match ferry_engine::protocol_feature(protocol) {
            Some(feature) => {
                assert!(
                    matches!(err, Error::FeatureNotCompiled { feature: f, .. } if f == feature),
                    "{err}"
                );
                assert!(msg.contains(&format!("--features {feature}")), "{msg}");
            }
            // No feature provides it: the message must not name one.
            None => {
                assert!(matches!(err, Error::NotImplemented { .. }), "{err}");
                assert!(
                    msg.contains("not implemented yet") && !msg.contains("--features"),
                    "{msg}"
                );
            }
        }
    }
}

#[test]
fn unknown_protocol_and_metadata_are_errors() {
    let err = Engine::from_config(&EngineConfig {
        protocol: "ucx".into(),
        ..EngineConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("unknown protocol `ucx`"), "{err}");
    // A store this build lacks names its feature; one it has but cannot reach says so,
    // naming the store.
    for (url, feature, compiled) in [
        ("etcd://127.0.0.1:1", "etcd", cfg!(feature = "etcd")),
        ("redis://127.0.0.1:1", "redis", cfg!(feature = "redis")),
        (
            "http://127.0.0.1:1/metadata",
            "http",
            cfg!(feature = "http"),
        ),
    ] {
        let err = Engine::from_config(&EngineConfig {
            metadata: url.into(),
            ..EngineConfig::default()
        })
        .unwrap_err();
        let msg = err.to_string();
        if compiled {
            assert_eq!(err.kind(), ErrorKind::Unreachable, "{msg}");
            assert!(msg.contains("127.0.0.1:1"), "{msg}");
        } else {
            assert_eq!(err.kind(), ErrorKind::Unsupported, "{msg}");
            assert!(msg.contains(&format!("--features {feature}")), "{msg}");
        }
    }
    let err = Engine::from_config(&EngineConfig {
        metadata: "zookeeper://x".into(),
        ..EngineConfig::default()
    })
    .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

#[test]
#[cfg(not(feature = "cuda"))]
fn device_memory_is_rejected_at_registration_without_cuda() {
    let e = common::engine();
    let err = e.allocate(4096, Location::Cuda { device: 0 }).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("cuda:0") && msg.contains("--features cuda"),
        "{msg}"
    );
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let mut host = vec![0u8; 64];
    // SAFETY: registration is refused, so the pointer is never used.
    let err = unsafe {
        e.register(
            host.as_mut_ptr(),
            host.len(),
            Location::Cuda { device: 1 },
            ferry_engine::Access::Local,
        )
    }
    .unwrap_err();
    assert!(err.to_string().contains("--features cuda"), "{err}");
    // Without CUDA support the engine cannot tell device from host memory.
    // SAFETY: registration is refused, so the pointer is never used.
    let err = unsafe {
        e.register(
            host.as_mut_ptr(),
            host.len(),
            Location::Auto,
            ferry_engine::Access::Local,
        )
    }
    .unwrap_err();
    assert!(
        err.to_string().contains("Location::Auto") && err.to_string().contains("--features cuda"),
        "{err}"
    );
    // Nothing was published.
    assert!(e.descriptor().buffers.is_empty());
}

#[test]
fn listening_twice_on_one_port_is_a_clear_error() {
    let a = common::engine();
    let err = Engine::builder()
        .transport(ferry_engine::Tcp::default())
        .listen(a.name())
        .build()
        .unwrap_err();
    assert!(err.to_string().contains(&a.name()), "{err}");
}

#[test]
fn registered_caller_memory_is_served_to_peers() {
    let target = common::engine();
    let initiator = common::engine();
    let mut tensor = common::random(8192);
    let want = tensor.clone();
    // SAFETY: `tensor` outlives `buf` (dropped below, before `tensor`), and this test
    // does not touch `tensor` while transfers run.
    let buf = unsafe {
        target.register(
            tensor.as_mut_ptr(),
            tensor.len(),
            Location::host(),
            ferry_engine::Access::RemoteRead,
        )
    }
    .unwrap();
    let local = initiator.allocate(8192, Location::host()).unwrap();
    let remote = initiator
        .open_segment(&target.name())
        .unwrap()
        .buffer(0)
        .unwrap();
    let mut b = initiator.batch();
    b.read(&local, 0, &remote, 0, 8192).unwrap();
    b.submit().unwrap().wait(common::WAIT).unwrap();
    let mut got = vec![0u8; 8192];
    local.read_at(0, &mut got).unwrap();
    assert_eq!(got, want);
    drop(buf);
    assert!(target.descriptor().buffers.is_empty());
}

/// A target listening on all interfaces without an advertised address tells peers
/// 127.0.0.1; a peer that reached it by another address keeps using that address for
/// data (as one on another host must).
#[test]
fn peers_reach_an_unadvertised_wildcard_listener_by_the_name_they_used() {
    let target = Engine::from_config(&EngineConfig {
        listen: "0.0.0.0:0".into(),
        ..EngineConfig::default()
    })
    .unwrap();
    let port = target.name().rsplit_once(':').unwrap().1.to_string();
    assert_eq!(target.name(), format!("127.0.0.1:{port}"));
    let buf = target.allocate(4096, Location::host()).unwrap();
    buf.write_at(0, b"reached").unwrap();
    let initiator = common::engine();
    let name = format!("127.0.0.2:{port}");
    let segment = initiator.open_segment(&name).unwrap();
    assert_eq!(segment.tcp_address(), Some(name.as_str()));
    let local = initiator.allocate(4096, Location::host()).unwrap();
    let mut b = initiator.batch();
    b.read(&local, 0, &segment.buffer(0).unwrap(), 0, 7)
        .unwrap();
    b.submit().unwrap().wait(common::WAIT).unwrap();
    let mut got = [0u8; 7];
    local.read_at(0, &mut got).unwrap();
    assert_eq!(&got, b"reached");
}

#[test]
fn a_partial_nested_document_configures_the_engine_and_the_secret_never_leaves() {
    let config: EngineConfig = serde_json::from_str(
        r#"{"protocol": "tcp", "timeout_ms": 1234, "secret": "s3cret-value",
            "tcp": {"lanes": 3, "busy_poll_us": 7, "keepalive_ms": null, "secret": "other"}}"#,
    )
    .unwrap();
    assert_eq!(config.timeout_ms, 1234);
    assert_eq!(config.listen, EngineConfig::default().listen);
    assert_eq!(config.tcp.lanes, 3);
    assert_eq!(config.tcp.busy_poll, std::time::Duration::from_micros(7));
    assert_eq!(config.tcp.keepalive, None);
    assert_eq!(
        config.tcp.max_slice,
        TcpConfig::default().max_slice,
        "an absent field keeps its default"
    );
    // The engine-wide secret takes the place of the transport's.
    assert_eq!(
        config.tcp_config().secret,
        Some(ferry_engine::SharedSecret::from("s3cret-value"))
    );
    let text = serde_json::to_string(&config).unwrap();
    assert!(
        !text.contains("s3cret") && !text.contains("other") && !text.contains("secret"),
        "{text}"
    );
    // What is written reads back as the same configuration, secrets aside.
    let back: EngineConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(
        back,
        EngineConfig {
            secret: None,
            tcp: TcpConfig {
                secret: None,
                ..config.tcp.clone()
            },
            ..config
        }
    );
    let err = serde_json::from_str::<EngineConfig>(r#"{"tcp": {"secret": ""}}"#).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
}

/// A misspelt setting is an error that names it, at any depth, instead of a default
/// silently taking its place.
#[test]
fn unknown_settings_are_refused_by_name() {
    for (doc, field) in [
        (r#"{"protcol": "tcp"}"#, "protcol"),
        (r#"{"tcp": {"lane": 4}}"#, "lane"),
    ] {
        let err = serde_json::from_str::<EngineConfig>(doc).unwrap_err();
        assert!(err.to_string().contains(field), "{doc}: {err}");
    }
}

/// A finished batch that its owner still holds does not keep caller-owned memory: the
/// buffer's drop (which waits for transfers in flight) returns at once, on both the
/// initiator's side and the target's.
#[test]
fn a_finished_batch_does_not_hold_caller_memory() {
    let target = common::engine();
    let initiator = common::engine();
    let mut theirs = common::random(8192);
    let mut ours = vec![0u8; 8192];
    // SAFETY: both vectors outlive the buffers (dropped below, first), and the test does
    // not touch them while transfers run.
    let (remote_buf, local) = unsafe {
        (
            target
                .register(
                    theirs.as_mut_ptr(),
                    8192,
                    Location::host(),
                    ferry_engine::Access::RemoteRead,
                )
                .unwrap(),
            initiator
                .register(
                    ours.as_mut_ptr(),
                    8192,
                    Location::host(),
                    ferry_engine::Access::Local,
                )
                .unwrap(),
        )
    };
    let remote = initiator
        .open_segment(&target.name())
        .unwrap()
        .buffer(0)
        .unwrap();
    let mut b = initiator.batch();
    b.read(&local, 0, &remote, 0, 8192).unwrap();
    let batch = b.submit().unwrap();
    batch.wait(common::WAIT).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let dropper = std::thread::spawn(move || {
        drop(local);
        drop(remote_buf);
        done_tx.send(()).unwrap();
    });
    assert!(
        done_rx.recv_timeout(common::WAIT).is_ok(),
        "dropping the buffers waited on a batch that had ended"
    );
    dropper.join().unwrap();
    assert_eq!(batch.statuses(), vec![ferry_engine::TaskStatus::Completed]);
    drop(batch);
    assert_eq!(ours, theirs);
    theirs.clear();
}

/// Work ordered after a CUDA stream runs once the stream gets there where a device is;
/// elsewhere the call is an `Unsupported` error that says what is missing (the feature,
/// or the driver or device).
#[test]
fn stream_ordered_work_runs_after_the_stream_or_says_what_is_missing() {
    let (tx, rx) = std::sync::mpsc::channel();
    let r = ferry_engine::after_cuda_stream(0, 0, Box::new(move || tx.send(()).unwrap()));
    let status = ferry_engine::cuda_status();
    if status.compiled && !status.devices.is_empty() {
        r.unwrap();
        assert!(
            rx.recv_timeout(common::WAIT).is_ok(),
            "the callback never ran"
        );
        return;
    }
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ferry_engine::ErrorKind::Unsupported, "{e}");
    if !status.compiled {
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }
    assert!(rx.try_recv().is_err(), "nothing ran");
}
