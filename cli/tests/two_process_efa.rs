//! The libfabric transport across two processes: `ferry target --protocol efa` serves,
//! this process drives. `shm` needs each process to open its own provider instance,
//! which is exactly what this exercises.
#![cfg(feature = "efa")]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{random, write_then_read, Target, FERRY};
use ferry_engine::fabrics::{Efa, EfaConfig};
use ferry_engine::{Engine, Error, Location, Protocol, Tcp, TcpConfig};

fn start(provider: &str) -> Target {
    Target::start(&[
        "--listen",
        "127.0.0.1:0",
        "--buffer-size",
        "80M",
        "--protocol",
        "efa",
        "--provider",
        provider,
    ])
}

fn initiator(provider: &str) -> Engine {
    Engine::builder()
        .transport(Efa::new(EfaConfig {
            provider: provider.into(),
            ..EfaConfig::default()
        }))
        .fallback(Tcp::new(TcpConfig::default()))
        .build()
        .unwrap()
}

fn across_processes(provider: &str) {
    let target = start(provider);
    let e = initiator(provider);
    let seg = e.open_segment(&target.name).unwrap();
    assert_eq!(seg.protocol(), Some(Protocol::Efa));
    let remote = seg.buffer_named("bench").unwrap();
    let local = e.allocate(70 << 20, Location::host()).unwrap();
    let back = e.allocate(70 << 20, Location::host()).unwrap();
    write_then_read(
        &e,
        &local,
        &back,
        &remote,
        &[
            (1, 0, 0),
            (4096, 3, 5),
            (1 << 20, 1, 7),
            (64 << 20, 13, 4097),
        ],
    );
    // Several threads at once, each on its own part of the target's buffer.
    std::thread::scope(|s| {
        for t in 0..4usize {
            let (e, remote) = (&e, &remote);
            s.spawn(move || {
                let local = e.allocate(4 << 20, Location::host()).unwrap();
                for round in 0..10usize {
                    let data = random(2 << 20);
                    local.write_at(0, &data).unwrap();
                    let base = (t * (4 << 20)) as u64;
                    let mut b = e.batch();
                    for i in 0..8usize {
                        b.write(&local, i << 18, remote, base + (i << 18) as u64, 1 << 18)
                            .unwrap();
                    }
                    b.submit().unwrap().wait(Duration::from_secs(60)).unwrap();
                    let mut b = e.batch();
                    b.read(&local, 2 << 20, remote, base, 2 << 20).unwrap();
                    b.submit().unwrap().wait(Duration::from_secs(60)).unwrap();
                    let mut got = vec![0u8; 2 << 20];
                    local.read_at(2 << 20, &mut got).unwrap();
                    assert!(got == data, "{provider}: thread {t} round {round}");
                }
            });
        }
    });
}

#[test]
fn tcp_rxm_across_processes() {
    across_processes("tcp;ofi_rxm");
}

#[test]
fn shm_across_processes() {
    across_processes("shm");
}

#[test]
fn a_stopped_fabric_peer_times_tasks_out_by_their_deadline() {
    let target = start("tcp;ofi_rxm");
    let e = initiator("tcp;ofi_rxm");
    let remote = e.open_segment(&target.name).unwrap().buffer(0).unwrap();
    let local = e.allocate(16 << 20, Location::host()).unwrap();
    target.signal("-STOP");
    let mut b = e.batch().timeout(Duration::from_millis(500));
    for i in 0..16usize {
        b.write(&local, i << 20, &remote, (i << 20) as u64, 1 << 20)
            .unwrap();
    }
    let batch = b.submit().unwrap();
    let start = Instant::now();
    let r = batch.wait(Duration::from_secs(30));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "wait took {:?}",
        start.elapsed()
    );
    assert!(matches!(r, Err(Error::TasksFailed { .. })), "{r:?}");
    assert_eq!(batch.poll().pending, 0);
    target.signal("-CONT");
}

#[test]
fn bench_over_both_providers_verifies() {
    for provider in ["tcp;ofi_rxm", "shm"] {
        for op in ["write", "read"] {
            let out = Command::new(FERRY)
                .args([
                    "bench",
                    "--protocol",
                    "efa",
                    "--provider",
                    provider,
                    "--operation",
                    op,
                ])
                .args([
                    "--block-size",
                    "256K",
                    "--batch-size",
                    "8",
                    "--duration",
                    "0.3",
                    "--buffer-size",
                    "8M",
                ])
                .args(["--verify", "--json"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{provider} {op}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["protocol"], "efa");
            assert_eq!(v["errors"], 0);
            assert_eq!(v["verified"], true);
        }
    }
}
