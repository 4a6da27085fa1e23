//! Helpers shared by the engine's loopback tests.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use ferry_engine::{Engine, Tcp, TcpConfig};
use rand::RngCore;

pub const WAIT: Duration = Duration::from_secs(30);

/// An engine on 127.0.0.1 with an ephemeral port.
pub fn engine() -> Engine {
    engine_with(TcpConfig::default())
}

pub fn engine_with(config: TcpConfig) -> Engine {
    Engine::builder()
        .transport(Tcp::new(config))
        .build()
        .expect("engine on 127.0.0.1")
}

/// Random bytes (never all zeros).
pub fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    if len > 0 && v.iter().all(|&b| b == 0) {
        v[0] = 1;
    }
    v
}

/// Asserts equality without printing megabytes on failure.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {:#04x} != {:#04x}",
            got[i], want[i]
        );
    }
}

/// Two engines with one buffer each: the target's is published, the initiator has it
/// open as `remote`.
pub struct Pair {
    pub target: Engine,
    pub initiator: Engine,
    pub target_buf: ferry_engine::Buffer,
    pub local: ferry_engine::Buffer,
    pub remote: ferry_engine::RemoteBuffer,
}

pub fn pair(len: usize) -> Pair {
    let target = engine();
    let initiator = engine();
    let target_buf = target
        .allocate(len, ferry_engine::Location::host())
        .unwrap();
    let local = initiator
        .allocate(len, ferry_engine::Location::host())
        .unwrap();
    let remote = initiator
        .open_segment(&target.name())
        .unwrap()
        .buffer(0)
        .unwrap();
    Pair {
        target,
        initiator,
        target_buf,
        local,
        remote,
    }
}
