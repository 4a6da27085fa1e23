//! A `ferry target` process publishing to Redis or etcd by name: peers open it by that name, and
//! once the process is killed (no withdrawal, no more renewals) its entry expires within
//! its TTL, freeing the name.
#![cfg(any(feature = "redis", feature = "etcd"))]

mod common;
#[path = "../../engine/tests/common/stores.rs"]
#[allow(dead_code, unreachable_pub)]
mod stores;

use common::Target;
use ferry_engine::{Engine, Metadata, Tcp, TcpConfig};

/// Starts a target named `victim` on `metadata` (`url` in `EngineConfig::metadata`),
/// kills it, and waits until `gone()` says its entry expired; then the name is free.
fn killed_target_expires(
    url: &str,
    metadata: Metadata,
    has: &dyn Fn() -> bool,
    wait_gone: &dyn Fn(),
) {
    let config = format!(r#"{{"metadata": "{url}", "name": "victim", "metadata_ttl_ms": 900}}"#);
    let target = Target::start(&["--buffer-size", "64K", "--config-json", &config]);
    assert_eq!(target.name, "victim");
    assert!(has());
    let peer = Engine::builder()
        .transport(Tcp::new(TcpConfig::default()))
        .metadata(metadata.clone())
        .name("peer")
        .build()
        .unwrap();
    let seg = peer.open_segment("victim").unwrap();
    assert_eq!(seg.buffer_named("bench").unwrap().len(), 64 << 10);

    target.signal("-KILL");
    // On the store's own key events: its entry goes when its TTL runs out.
    wait_gone();
    assert!(!has());
    let heir = Engine::builder()
        .transport(Tcp::new(TcpConfig::default()))
        .metadata(metadata)
        .name("victim")
        .build()
        .expect("a dead engine's name is free once its entry expired");
    assert_eq!(heir.name(), "victim");
}

#[cfg(feature = "redis")]
#[test]
fn a_killed_targets_redis_entry_expires_within_its_ttl() {
    let redis = stores::RedisServer::start();
    killed_target_expires(
        &redis.url(),
        Metadata::Redis { url: redis.url() },
        &|| redis.has("ferry/segments/victim"),
        &|| redis.wait_key("ferry/segments/victim", false),
    );
}

#[cfg(feature = "etcd")]
#[test]
fn a_killed_targets_etcd_entry_goes_with_its_lease() {
    let etcd = stores::EtcdServer::start();
    killed_target_expires(
        &format!("etcd://{}", etcd.endpoint()),
        Metadata::Etcd {
            endpoints: vec![etcd.endpoint()],
        },
        &|| etcd.has("ferry/segments/victim"),
        &|| etcd.wait_key("ferry/segments/victim", false),
    );
}
