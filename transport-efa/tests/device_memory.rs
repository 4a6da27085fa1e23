//! Device memory is posted through the NIC's view of a region (`RegionMemory::dma_addr`),
//! never through the host views, which refuse it. No GPU is needed: host bytes labelled
//! `cuda:0` stand in for device memory, registered as host memory through the
//! transport's test knob. Over `shm` and `tcp;ofi_rxm` on loopback.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_transport_api::{
    Access, Connection, Location, NoExchange, Opcode, RegionMemory, RemoteKeys, Transport,
};
use ferry_transport_efa::EfaConfig;

const LEN: usize = 1 << 20;
const PIECES: usize = 4;

/// Posts `op` of the whole of `local` against `remote` in `PIECES` slices and checks
/// that each is reported once, in full.
fn move_all(
    conn: &dyn Connection,
    rx: &crossbeam_channel::Receiver<Report>,
    op: Opcode,
    local: &Arc<RegionMemory>,
    remote: &RegionMemory,
    keys: &RemoteKeys,
    provider: &str,
) {
    let len = local.len() / PIECES;
    for i in 0..PIECES {
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
        conn.post(s)
            .unwrap_or_else(|e| panic!("{provider}: {op} of {}: {e}", local.location()));
    }
    let mut seen = [false; PIECES];
    for _ in 0..PIECES {
        let (token, result) = next(rx);
        assert_eq!(result, Ok(len), "{provider}: {op} slice {}", token.task);
        assert!(!std::mem::replace(&mut seen[token.task as usize], true));
    }
}

/// What a region holds, whichever location it claims.
fn bytes_of(r: &RegionMemory) -> Vec<u8> {
    match r.location() {
        Location::Cuda { .. } => stand_in_contents(r),
        _ => contents(r),
    }
}

#[test]
fn device_memory_is_written_from_and_read_into_byte_for_byte() {
    for config in providers_under_test() {
        let provider = config.provider.clone();
        let config = EfaConfig {
            device_memory_is_host: true,
            ..config
        };
        let (target, target_ep, _target_rx) = start(config.clone());
        let (initiator, _, rx) = start(config);
        let conn = initiator.connect(&target_ep, &NoExchange).unwrap();

        // Device to host and back into device memory; then device to device.
        let host_remote = region(random(LEN));
        let device_remote = stand_in_device(random(LEN));
        for remote in [host_remote, device_remote] {
            let keys = target
                .register(&remote, Access::RemoteReadWrite)
                .expect("registers");
            let keys = RemoteKeys::new(keys).unwrap();
            let source = stand_in_device(random(LEN));
            let back = stand_in_device(random(LEN));
            for r in [&source, &back] {
                assert!(r.io_slice(0, LEN).is_none(), "the host views refuse it");
                initiator.register(r, Access::Local).expect("registers");
            }
            assert!(bytes_of(&remote) != bytes_of(&source));
            move_all(
                &*conn,
                &rx,
                Opcode::Write,
                &source,
                &remote,
                &keys,
                &provider,
            );
            assert!(
                bytes_of(&remote) == bytes_of(&source),
                "{provider}: written bytes differ ({} target)",
                remote.location()
            );
            move_all(&*conn, &rx, Opcode::Read, &back, &remote, &keys, &provider);
            assert!(
                bytes_of(&back) == bytes_of(&source),
                "{provider}: read bytes differ ({} target)",
                remote.location()
            );
        }
        assert!(conn.is_alive(), "{provider}");
        initiator.shutdown();
        target.shutdown();
    }
}

/// Without the test knob (and without FI_HMEM, which no test provider grants), device
/// memory is refused when registered, with a reason, rather than posted wrongly later.
#[test]
fn device_memory_without_hmem_is_refused_at_registration() {
    for config in providers_under_test() {
        let provider = config.provider.clone();
        let (t, _, _rx) = start(config);
        let err = t
            .register(&stand_in_device(random(4096)), Access::Local)
            .unwrap_err()
            .to_string();
        assert!(err.contains("FI_HMEM"), "{provider}: {err}");
        t.shutdown();
    }
}
