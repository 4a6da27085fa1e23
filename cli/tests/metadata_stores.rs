//! A `ferry target` process publishing to Redis by name: peers open it by that name, and
//! once the process is killed (no withdrawal, no more renewals) its entry expires within
//! its TTL, freeing the name.
#![cfg(feature = "redis")]

mod common;
#[path = "../../engine/tests/common/stores.rs"]
#[allow(dead_code, unreachable_pub)]
mod stores;

use std::time::{Duration, Instant};

use common::Target;
use ferry_engine::{Engine, Metadata, Tcp, TcpConfig};
use stores::{RedisServer, PATIENCE};

#[test]
fn a_killed_targets_entry_expires_within_its_ttl() {
    let redis = RedisServer::start();
    let config = format!(
        r#"{{"metadata": "{}", "name": "victim", "metadata_ttl_ms": 900}}"#,
        redis.url()
    );
    let target = Target::start(&["--buffer-size", "64K", "--config-json", &config]);
    assert_eq!(target.name, "victim");
    assert!(redis.has("ferry/segments/victim"));
    let peer = Engine::builder()
        .transport(Tcp::new(TcpConfig::default()))
        .metadata(Metadata::Redis { url: redis.url() })
        .name("peer")
        .build()
        .unwrap();
    let seg = peer.open_segment("victim").unwrap();
    assert_eq!(seg.buffer_named("bench").unwrap().len(), 64 << 10);

    target.signal("-KILL");
    let start = Instant::now();
    while redis.has("ferry/segments/victim") {
        assert!(
            start.elapsed() < PATIENCE,
            "the dead target's entry did not expire"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The name is free again.
    let heir = Engine::builder()
        .transport(Tcp::new(TcpConfig::default()))
        .metadata(Metadata::Redis { url: redis.url() })
        .name("victim")
        .build()
        .expect("a dead engine's name is free once its entry expired");
    assert_eq!(heir.name(), "victim");
}
