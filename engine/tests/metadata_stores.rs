//! Metadata stores with real servers: Redis (`redis-server`) and etcd (`etcd`), started by
//! the test on free loopback ports, and an HTTP server speaking Mooncake's metadata protocol. Engines
//! find each other by name, a live name is not taken twice, a dead or withdrawn entry
//! goes, and a store outage leaves opened peers working.
#![cfg(any(feature = "http", feature = "redis", feature = "etcd"))]

mod common;

use std::time::Duration;

use common::{assert_bytes_eq, random, WAIT};
use ferry_engine::{Engine, Error, ErrorKind, Location, Metadata, Tcp, TcpConfig};

fn engine(metadata: &Metadata, name: &str, ttl: Duration) -> Result<Engine, Error> {
    Engine::builder()
        .transport(Tcp::new(TcpConfig::default()))
        .metadata(metadata.clone())
        .name(name)
        .metadata_ttl(ttl)
        .build()
}

/// Two engines named `prefill-0` and `decode-0` open each other by name and move random
/// bytes both ways.
fn by_name_both_ways(metadata: &Metadata) {
    let ttl = Duration::from_secs(10);
    let prefill = engine(metadata, "prefill-0", ttl).unwrap();
    let decode = engine(metadata, "decode-0", ttl).unwrap();
    assert_eq!(prefill.name(), "prefill-0");
    let kv_p = prefill.allocate(1 << 20, Location::host()).unwrap();
    let kv_d = decode.allocate(1 << 20, Location::host()).unwrap();
    for (from, to, local, remote_name, remote_buf) in [
        (&decode, &prefill, &kv_d, "prefill-0", &kv_p),
        (&prefill, &decode, &kv_p, "decode-0", &kv_d),
    ] {
        let data = random(1 << 20);
        local.write_at(0, &data).unwrap();
        let seg = from.open_segment(remote_name).unwrap();
        assert!(!seg.is_local());
        assert_eq!(
            seg.tcp_address().map(String::from),
            to.descriptor()
                .endpoint(ferry_engine::Protocol::Tcp)
                .map(|e| e.address.clone())
        );
        let (remote, offset) = seg.locate(remote_buf.addr(), 1 << 20).unwrap();
        let mut b = from.batch();
        b.write(local, 0, &remote, offset, 1 << 20).unwrap();
        b.submit().unwrap().wait(WAIT).unwrap();
        let mut got = vec![0u8; 1 << 20];
        remote_buf.read_at(0, &mut got).unwrap();
        assert_bytes_eq(&got, &data, remote_name);
    }
    // Its own name is its own segment.
    assert!(prefill.open_segment("prefill-0").unwrap().is_local());
    // A name nobody publishes fails, naming the store.
    let err = decode.open_segment("nobody").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unreachable);
    assert!(format!("{:?}", err).contains("NotFound"), "{err:?}");
}

/// A peer restarted under the same name (new port, incarnation, buffers, keys): the
/// caller's old buffer handle follows it through the store, without opening anything.
fn restarted_peer_is_followed(metadata: &Metadata) {
    let ttl = Duration::from_secs(10);
    let target = engine(metadata, "restarting", ttl).unwrap();
    let kv = target
        .allocate_with(
            8192,
            Location::host(),
            ferry_engine::Access::RemoteReadWrite,
            "kv",
        )
        .unwrap();
    let initiator = engine(metadata, "follower", ttl).unwrap();
    let local = initiator.allocate(8192, Location::host()).unwrap();
    let remote = initiator
        .open_segment("restarting")
        .unwrap()
        .buffer_named("kv")
        .unwrap();
    let mut b = initiator.batch();
    b.write(&local, 0, &remote, 0, 8192).unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    drop(kv);
    drop(target);

    let target = engine(metadata, "restarting", ttl).expect("the name is free again");
    let kv = target
        .allocate_with(
            8192,
            Location::host(),
            ferry_engine::Access::RemoteReadWrite,
            "kv",
        )
        .unwrap();
    common::write_to_restarted_peer(&initiator, &local, &remote, &kv, 8192);
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use common::stores::RedisServer;

    #[test]
    fn engines_find_each_other_by_name() {
        let server = RedisServer::start();
        by_name_both_ways(&Metadata::Redis { url: server.url() });
        assert!(
            !server.has("ferry/segments/prefill-0"),
            "a stopped engine withdraws its entry"
        );
    }

    #[test]
    fn a_restarted_peer_is_followed_by_name() {
        let server = RedisServer::start();
        restarted_peer_is_followed(&Metadata::Redis { url: server.url() });
    }

    #[test]
    fn a_live_name_is_not_taken_twice() {
        let server = RedisServer::start();
        let m = Metadata::Redis { url: server.url() };
        let first = engine(&m, "kv-store", Duration::from_secs(10)).unwrap();
        let second = engine(&m, "kv-store", Duration::from_secs(10)).unwrap_err();
        assert!(matches!(second, Error::NameTaken { .. }), "{second}");
        assert_eq!(second.kind(), ErrorKind::Rejected);
        drop(first);
        engine(&m, "kv-store", Duration::from_secs(10)).expect("free once the holder stopped");
    }

    #[test]
    fn a_store_outage_leaves_opened_peers_working_and_the_entries_come_back() {
        let server = RedisServer::start();
        let m = Metadata::Redis { url: server.url() };
        let ttl = Duration::from_millis(900);
        let target = engine(&m, "target", ttl).unwrap();
        let initiator = engine(&m, "initiator", ttl).unwrap();
        let kv = target.allocate(65536, Location::host()).unwrap();
        let local = initiator.allocate(65536, Location::host()).unwrap();
        let seg = initiator.open_segment("target").unwrap();
        let remote = seg.buffer(0).unwrap();
        let port = server.kill();
        // Opened peers keep transferring.
        let data = random(65536);
        local.write_at(0, &data).unwrap();
        let mut b = initiator.batch();
        b.write(&local, 0, &remote, 0, 65536).unwrap();
        b.submit().unwrap().wait(WAIT).unwrap();
        let mut got = vec![0u8; 65536];
        kv.read_at(0, &mut got).unwrap();
        assert_bytes_eq(&got, &data, "during the outage");
        // A new open fails, naming the store.
        let err = initiator.refresh_segment("target").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unreachable);
        assert!(
            format!("{err:?}").contains(&format!("127.0.0.1:{port}")),
            "{err:?}"
        );
        // The store comes back empty; the renewals fill it again.
        let server = RedisServer::on(port);
        server.wait_key("ferry/segments/target", true);
        server.wait_key("ferry/segments/initiator", true);
        assert!(initiator.refresh_segment("target").is_ok());
    }

    /// An entry lives only as long as it is renewed: one expired under a live engine
    /// (as after a store restart) is written again by the next renewal.
    #[test]
    fn an_expired_entry_is_renewed_while_its_engine_lives() {
        let server = RedisServer::start();
        let m = Metadata::Redis { url: server.url() };
        let e = engine(&m, "short-lived", Duration::from_millis(600)).unwrap();
        assert!(server.has("ferry/segments/short-lived"));
        server.command(&["PEXPIRE", "ferry/segments/short-lived", "1"]);
        server.wait_key("ferry/segments/short-lived", false);
        server.wait_key("ferry/segments/short-lived", true);
        drop(e);
        assert!(
            !server.has("ferry/segments/short-lived"),
            "withdrawn on shutdown"
        );
    }
}

#[cfg(feature = "http")]
mod http {
    use super::*;
    use common::stores::HttpServer;

    #[test]
    fn engines_find_each_other_by_name() {
        let server = HttpServer::start(false);
        by_name_both_ways(&Metadata::Http { url: server.url() });
        assert!(
            server.entries.lock().unwrap().is_empty(),
            "stopped engines withdraw"
        );
    }

    #[test]
    fn a_restarted_peer_is_followed_by_name() {
        let server = HttpServer::start(false);
        restarted_peer_is_followed(&Metadata::Http { url: server.url() });
    }

    #[test]
    fn a_server_that_refuses_overwrites_is_coped_with() {
        let server = HttpServer::start(true);
        let m = Metadata::Http { url: server.url() };
        let target = engine(&m, "t", Duration::from_millis(300)).unwrap();
        let initiator = engine(&m, "i", Duration::from_secs(10)).unwrap();
        // A registration republishes the descriptor: the server says 400, the engine
        // deletes and writes again.
        let kv = target.allocate(4096, Location::host()).unwrap();
        // Written before the registration returned.
        let seen = initiator.refresh_segment("t").unwrap();
        assert!(seen.buffers().iter().any(|b| b.addr == kv.addr()));
        assert!(
            *server.refused.lock().unwrap() > 0,
            "the server refused an overwrite"
        );
    }

    #[test]
    fn a_dead_engines_entry_is_taken_over_and_a_live_ones_is_not() {
        let server = HttpServer::start(false);
        let m = Metadata::Http { url: server.url() };
        let live = engine(&m, "decode-1", Duration::from_secs(10)).unwrap();
        let refused = engine(&m, "decode-1", Duration::from_secs(10)).unwrap_err();
        assert!(matches!(refused, Error::NameTaken { .. }), "{refused}");
        // An entry left by an engine that no longer answers (HTTP has no expiry).
        let mut stale = live.descriptor();
        stale.incarnation ^= 1;
        stale
            .endpoints
            .iter_mut()
            .for_each(|e| e.address = "127.0.0.1:1".into());
        server.entries.lock().unwrap().insert(
            "ferry/segments/decode-2".into(),
            serde_json::to_vec(&stale).unwrap(),
        );
        let taker =
            engine(&m, "decode-2", Duration::from_secs(10)).expect("a dead engine's name is free");
        assert_eq!(taker.name(), "decode-2");
    }

    /// A descriptor whose keys its owner refuses (forged, or published by a faulty
    /// owner) fails every task with an access error. The first one makes the engine
    /// fetch the descriptor again; found unchanged, it is not fetched again for a second
    /// (`reopened` would otherwise count one fetch per batch). `refresh_segment` fetches
    /// regardless, and old handles follow what it found.
    #[test]
    fn a_peer_refusing_its_published_keys_is_fetched_again_once_a_second_at_most() {
        use ferry_engine::{FailReason, RemoteStatus, TaskStatus};
        let server = HttpServer::start(false);
        let m = Metadata::Http { url: server.url() };
        let ttl = Duration::from_secs(10);
        let target = engine(&m, "kv-0", ttl).unwrap();
        let kv = target.allocate(1 << 16, Location::host()).unwrap();
        let initiator = engine(&m, "client-0", ttl).unwrap();
        let local = initiator.allocate(4096, Location::host()).unwrap();
        let publish = |descriptor: &ferry_engine::SegmentDescriptor| {
            server.entries.lock().unwrap().insert(
                "ferry/segments/kv-forged".into(),
                serde_json::to_vec(descriptor).unwrap(),
            );
        };
        let mut forged = target.descriptor();
        forged
            .buffers
            .iter_mut()
            .flat_map(|b| b.keys.iter_mut())
            .for_each(|k| k.key ^= 1);
        publish(&forged);
        let seg = initiator.open_segment("kv-forged").unwrap();
        let remote = seg.buffer(0).unwrap();

        const BATCHES: u64 = 40;
        let start = std::time::Instant::now();
        for _ in 0..BATCHES {
            let mut b = initiator.batch();
            b.write(&local, 0, &remote, 0, 16).unwrap();
            let batch = b.submit().unwrap();
            assert!(batch.wait(WAIT).is_err());
            let status = batch.task(0);
            assert!(
                matches!(
                    status,
                    Some(TaskStatus::Failed(FailReason::Remote(
                        RemoteStatus::KeyMismatch | RemoteStatus::NotRegistered
                    )))
                ),
                "{status:?}"
            );
        }
        let seconds = start.elapsed().as_secs();
        let stats = seg.stats();
        assert_eq!((stats.failed, stats.completed), (BATCHES, 0), "{stats:?}");
        // One fetch after the first refusal, then at most one a second; on a machine
        // that ran the loop within a second, exactly one.
        assert!(
            (1..=2 + seconds).contains(&stats.reopened),
            "{} fetches in {seconds} s over {BATCHES} batches",
            stats.reopened
        );

        // The owner's real descriptor: an explicit refresh finds it at once.
        publish(&target.descriptor());
        initiator.refresh_segment("kv-forged").unwrap();
        let data = random(16);
        local.write_at(0, &data).unwrap();
        let mut b = initiator.batch();
        b.write(&local, 0, &remote, 0, 16).unwrap();
        b.submit().unwrap().wait(WAIT).unwrap();
        let mut got = vec![0u8; 16];
        kv.read_at(0, &mut got).unwrap();
        assert_bytes_eq(&got, &data, "after the refresh");
    }
}

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;
    use common::stores::EtcdServer;

    #[test]
    fn engines_find_each_other_by_name() {
        let server = EtcdServer::start();
        by_name_both_ways(&Metadata::Etcd {
            endpoints: vec![server.endpoint()],
        });
        assert!(
            !server.has("ferry/segments/prefill-0"),
            "a stopped engine withdraws its entry"
        );
    }

    #[test]
    fn a_restarted_peer_is_followed_by_name() {
        let server = EtcdServer::start();
        restarted_peer_is_followed(&Metadata::Etcd {
            endpoints: vec![server.endpoint()],
        });
    }

    #[test]
    fn a_live_name_is_not_taken_twice_and_is_free_once_its_holder_stopped() {
        let server = EtcdServer::start();
        let m = Metadata::Etcd {
            endpoints: vec!["127.0.0.1:1".into(), server.endpoint()],
        };
        let first = engine(&m, "kv-store", Duration::from_secs(5)).unwrap();
        let second = engine(&m, "kv-store", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(second, Error::NameTaken { .. }), "{second}");
        drop(first);
        engine(&m, "kv-store", Duration::from_secs(5)).expect("free once the holder stopped");
    }

    #[test]
    fn a_restarted_empty_etcd_is_filled_again_by_the_renewals() {
        let server = EtcdServer::start();
        let m = Metadata::Etcd {
            endpoints: vec![server.endpoint()],
        };
        let target = engine(&m, "target", Duration::from_secs(2)).unwrap();
        let initiator = engine(&m, "initiator", Duration::from_secs(2)).unwrap();
        let _kv = target.allocate(4096, Location::host()).unwrap();
        let seg = initiator.open_segment("target").unwrap();
        assert_eq!(seg.buffers().len(), 1);
        let port = server.kill();
        let err = initiator.refresh_segment("target").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unreachable);
        // A new member with nothing in it: the lapsed leases are granted anew.
        let server = EtcdServer::on(port);
        server.wait_key("ferry/segments/target", true);
        server.wait_key("ferry/segments/initiator", true);
        assert_eq!(
            initiator.refresh_segment("target").unwrap().buffers().len(),
            1
        );
    }
}
