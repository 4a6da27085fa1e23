//! The libfabric transport across two processes: `ferry target --protocol efa` serves,
//! this process drives. `shm` needs each process to open its own provider instance,
//! which is exactly what this exercises.
#![cfg(feature = "efa")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_engine::fabrics::{Efa, EfaConfig};
use ferry_engine::{Engine, Error, Location, Protocol, Tcp, TcpConfig};
use rand::RngCore;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

struct Target {
    child: Child,
    name: String,
}

impl Target {
    fn start(provider: &str) -> Target {
        let mut child = Command::new(FERRY)
            .args([
                "target",
                "--listen",
                "127.0.0.1:0",
                "--buffer-size",
                "80M",
                "--exit-on-stdin-eof",
            ])
            .args(["--protocol", "efa", "--provider", provider])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ferry target starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let name = line
            .strip_prefix("segment ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line from ferry target: {line:?}"))
            .to_string();
        Target { child, name }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

fn across_processes(provider: &str) {
    let target = Target::start(provider);
    let e = initiator(provider);
    let seg = e.open_segment(&target.name).unwrap();
    assert_eq!(seg.protocol(), Some(Protocol::Efa));
    let remote = seg.buffer_named("bench").unwrap();
    let local = e.allocate(70 << 20, Location::host()).unwrap();
    let back = e.allocate(70 << 20, Location::host()).unwrap();
    for (len, local_off, remote_off) in [
        (1usize, 0usize, 0u64),
        (4096, 3, 5),
        (1 << 20, 1, 7),
        (64 << 20, 13, 4097),
    ] {
        let data = random(len);
        local.write_at(local_off, &data).unwrap();
        let mut b = e.batch();
        b.write(&local, local_off, &remote, remote_off, len)
            .unwrap();
        b.submit().unwrap().wait(Duration::from_secs(60)).unwrap();
        let mut b = e.batch();
        b.read(&back, local_off + 1, &remote, remote_off, len)
            .unwrap();
        b.submit().unwrap().wait(Duration::from_secs(60)).unwrap();
        let mut got = vec![0u8; len];
        back.read_at(local_off + 1, &mut got).unwrap();
        assert!(
            got == data,
            "{provider}: {len} bytes did not come back intact"
        );
    }
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
    let target = Target::start("tcp;ofi_rxm");
    let e = initiator("tcp;ofi_rxm");
    let remote = e.open_segment(&target.name).unwrap().buffer(0).unwrap();
    let local = e.allocate(16 << 20, Location::host()).unwrap();
    assert!(Command::new("kill")
        .args(["-STOP", &target.child.id().to_string()])
        .status()
        .unwrap()
        .success());
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
    let _ = Command::new("kill")
        .args(["-CONT", &target.child.id().to_string()])
        .status();
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
