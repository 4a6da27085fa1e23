//! Loopback helpers shared by the transport's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_transport_api::testing;
use ferry_transport_api::{
    Access, CompletionToken, Completions, Connection, Endpoint, FailReason, Location, Opcode,
    RegionMemory, RemoteKeys, Slice, Transport, TransportContext,
};
use ferry_transport_efa::{providers, EfaConfig, EfaTransport};

/// The providers the tests run over, with the config that reaches loopback.
pub fn providers_under_test() -> Vec<EfaConfig> {
    let listed = providers();
    let mut out = Vec::new();
    for name in ["shm", "tcp;ofi_rxm"] {
        assert!(
            listed.iter().any(|p| p.provider == name),
            "libfabric provider `{name}` is missing (install libfabric1)"
        );
        let mut c = EfaConfig {
            provider: name.into(),
            ..EfaConfig::default()
        };
        if c.ip_based() {
            c.source = Some("127.0.0.1".into());
        }
        out.push(c);
    }
    out
}

pub type Report = (CompletionToken, Result<usize, FailReason>);

/// Every report, in order, on a channel.
pub struct Channel(pub Sender<Report>);

impl Completions for Channel {
    fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
        let _ = self.0.send((token, result));
    }
}

/// A started transport with `config`, reporting to `completions`.
pub fn start_with(
    config: EfaConfig,
    completions: Arc<dyn Completions>,
) -> (EfaTransport, Endpoint) {
    let t = EfaTransport::new(config.clone());
    let ep = t
        .start(TransportContext {
            completions,
            control: None,
            staging: None,
        })
        .unwrap_or_else(|e| panic!("{} transport starts: {e}", config.provider));
    (t, ep)
}

/// A started transport whose reports arrive on the returned channel.
pub fn start(config: EfaConfig) -> (EfaTransport, Endpoint, Receiver<Report>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (t, ep) = start_with(config, Arc::new(Channel(tx)));
    (t, ep, rx)
}

/// Host memory holding `bytes`.
pub fn region(bytes: Vec<u8>) -> Arc<RegionMemory> {
    testing::host_region(bytes)
}

pub fn random(len: usize) -> Vec<u8> {
    testing::random(len)
}

pub fn contents(r: &RegionMemory) -> Vec<u8> {
    testing::contents(r)
}

/// A slice of `len` bytes at `offset` on both sides.
#[allow(clippy::too_many_arguments)]
pub fn slice(
    op: Opcode,
    local: &Arc<RegionMemory>,
    remote: &RegionMemory,
    keys: &RemoteKeys,
    offset: usize,
    len: usize,
    task: u32,
    deadline: Instant,
) -> Slice {
    Slice {
        op,
        local: local.clone(),
        local_offset: offset,
        remote_addr: remote.addr() + offset as u64,
        remote_base: remote.addr(),
        remote_keys: keys.clone(),
        len,
        token: CompletionToken {
            slot: 0,
            generation: 0,
            task,
        },
        deadline,
    }
}

/// A target region of random bytes, registered, and its keys.
pub fn target_region(t: &EfaTransport, len: usize) -> (Arc<RegionMemory>, RemoteKeys) {
    let r = region(random(len));
    let keys = t.register(&r, Access::RemoteReadWrite).expect("registers");
    (r.clone(), RemoteKeys::new(keys).expect("one key per rail"))
}

/// A local region of random bytes, registered.
pub fn local_region(t: &EfaTransport, len: usize) -> Arc<RegionMemory> {
    let r = region(random(len));
    t.register(&r, Access::Local).expect("registers");
    r
}

/// Waits for the next report; a lost report fails the test instead of hanging it.
pub fn next(rx: &Receiver<Report>) -> Report {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("a report within a minute")
}

/// Writes `source` over `remote` and reads it back into `back`, in `pieces` slices,
/// checking every report and every byte.
pub fn round_trip(
    conn: &dyn Connection,
    rx: &Receiver<Report>,
    source: &Arc<RegionMemory>,
    back: &Arc<RegionMemory>,
    remote: &RegionMemory,
    keys: &RemoteKeys,
    pieces: usize,
) {
    let len = source.len() / pieces;
    for (op, local) in [(Opcode::Write, source), (Opcode::Read, back)] {
        for i in 0..pieces {
            let s = slice(
                op,
                local,
                remote,
                keys,
                i * len,
                len,
                i as u32,
                Instant::now() + Duration::from_secs(30),
            );
            conn.post(s).expect("posted");
        }
        let mut seen = vec![false; pieces];
        for _ in 0..pieces {
            let (token, result) = next(rx);
            assert_eq!(result, Ok(len), "{op} slice {}", token.task);
            assert!(
                !std::mem::replace(&mut seen[token.task as usize], true),
                "reported twice"
            );
        }
    }
    assert!(contents(remote) == contents(source), "written bytes differ");
    assert!(contents(back) == contents(source), "read bytes differ");
}

/// Host memory holding `bytes`, labelled as device memory (`cuda:0`): a stand-in for a
/// GPU buffer where none exists. Only a transport started with
/// [`EfaConfig::device_memory_is_host`] registers it (as host memory); every host
/// accessor of the region refuses it, as for real device memory.
pub fn stand_in_device(bytes: Vec<u8>) -> Arc<RegionMemory> {
    testing::stand_in_device(bytes)
}

/// The bytes of a [`stand_in_device`] region, read from the host memory behind it.
pub fn stand_in_contents(r: &RegionMemory) -> Vec<u8> {
    assert_eq!(r.location(), Location::Cuda { device: 0 });
    contents(r)
}
