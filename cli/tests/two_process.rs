//! Target and initiator in two processes: the real `ferry target` binary serves memory,
//! this test process drives it through `ferry-engine`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{random, write_then_read, Target, FERRY};
use ferry_engine::{Access, Engine, Error, Location, Tcp, TcpConfig};

fn initiator() -> Engine {
    Engine::builder()
        .transport(Tcp::new(TcpConfig::default()))
        .build()
        .unwrap()
}

#[test]
fn write_then_read_across_processes() {
    let target = Target::start(&["--listen", "127.0.0.1:0", "--buffer-size", "80M"]);
    let e = initiator();
    let seg = e.open_segment(&target.name).unwrap();
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
            (65536, 4095, 1),
            (1 << 20, 1, 7),
            (64 << 20, 13, 4097),
        ],
    );
}

#[test]
fn target_death_mid_batch_fails_every_task_and_a_new_target_is_reachable() {
    let target = Target::start(&["--listen", "127.0.0.1:0", "--buffer-size", "64M"]);
    let name = target.name.clone();
    let e = initiator();
    let remote = e.open_segment(&name).unwrap().buffer(0).unwrap();
    let local = e.allocate(64 << 20, Location::host()).unwrap();

    // Stop the target so the batch is certainly in flight, then kill it.
    target.signal("-STOP");
    let mut b = e.batch().timeout(Duration::from_secs(20));
    for i in 0..64usize {
        b.write(&local, i << 20, &remote, (i << 20) as u64, 1 << 20)
            .unwrap();
    }
    let batch = b.submit().unwrap();
    // 64 MiB cannot fit in socket buffers: a stopped target leaves the batch in flight.
    assert!(
        batch.poll().pending > 0,
        "the batch must still be in flight"
    );
    drop(target); // SIGKILL
    let start = Instant::now();
    let r = batch.wait(Duration::from_secs(60));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "tasks ended only after {:?}",
        start.elapsed()
    );
    assert!(matches!(r, Err(Error::TasksFailed { .. })), "{r:?}");
    let p = batch.poll();
    assert_eq!(p.pending, 0);
    assert_eq!(p.failed + p.timed_out + p.completed, 64);
    assert!(p.failed > 0);

    // A new target on the same address is reachable after open_segment.
    let again = Target::start(&["--listen", &name, "--buffer-size", "64M"]);
    assert_eq!(again.name, name);
    let remote = e.open_segment(&name).unwrap().buffer(0).unwrap();
    let data = random(1 << 20);
    local.write_at(0, &data).unwrap();
    let mut b = e.batch();
    b.write(&local, 0, &remote, 0, 1 << 20).unwrap();
    b.submit().unwrap().wait(Duration::from_secs(30)).unwrap();
    let mut b = e.batch();
    b.read(&local, 1 << 20, &remote, 0, 1 << 20).unwrap();
    b.submit().unwrap().wait(Duration::from_secs(30)).unwrap();
    let mut got = vec![0u8; 1 << 20];
    local.read_at(1 << 20, &mut got).unwrap();
    assert!(got == data);
}

#[test]
fn a_stopped_target_times_tasks_out_by_their_deadline() {
    let target = Target::start(&["--listen", "127.0.0.1:0", "--buffer-size", "16M"]);
    let e = initiator();
    let remote = e.open_segment(&target.name).unwrap().buffer(0).unwrap();
    let local = e.allocate(16 << 20, Location::host()).unwrap();
    target.signal("-STOP");
    let mut b = e.batch().timeout(Duration::from_millis(500));
    for i in 0..16usize {
        b.read(&local, i << 20, &remote, (i << 20) as u64, 1 << 20)
            .unwrap();
    }
    let batch = b.submit().unwrap();
    let start = Instant::now();
    let r = batch.wait(Duration::from_secs(30));
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "wait took {took:?}");
    assert!(
        matches!(r, Err(Error::TasksFailed { timed_out: 16, .. })),
        "{r:?}"
    );
    target.signal("-CONT");
}

#[test]
fn bench_verifies_and_reports_json() {
    for op in ["write", "read"] {
        let out = Command::new(FERRY)
            .args([
                "bench",
                "--operation",
                op,
                "--block-size",
                "64K",
                "--batch-size",
                "8",
                "--threads",
                "2",
            ])
            .args([
                "--duration",
                "0.3",
                "--buffer-size",
                "8M",
                "--verify",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        for field in [
            "protocol",
            "operation",
            "block_size",
            "batch_size",
            "threads",
            "duration_s",
            "bytes",
            "throughput_gbps",
            "ops_per_sec",
            "errors",
        ] {
            assert!(v.get(field).is_some(), "missing {field} in {text}");
        }
        assert_eq!(v["operation"], op);
        assert_eq!(v["errors"], 0);
        assert_eq!(v["verified"], true);
        assert!(v["bytes"].as_u64().unwrap() > 0);
        assert!(v["latency_us"]["p50"].as_f64().unwrap() > 0.0);
        assert!(v["cpu_seconds"]["target"].as_f64().is_some());
    }
}

#[test]
fn unknown_protocols_and_missing_features_are_clear_errors() {
    for bad in ["inf", "NaN", "-1", "0", "1e30", "five"] {
        let out = Command::new(FERRY)
            .args(["bench", &format!("--duration={bad}")])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--duration {bad} was taken");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--duration") && err.contains(bad), "{err}");
    }
    let out = Command::new(FERRY)
        .args(["bench", "--protocol", "efa", "--duration", "0.1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "efa") {
        // Compiled in, but the `efa` provider finds no device on a host without EFA.
        assert!(err.contains("`efa`") && err.contains("no device"), "{err}");
    } else {
        assert!(err.contains("--features efa"), "{err}");
    }
    let out = Command::new(FERRY)
        .args(["bench", "--protocol", "rdma", "--duration", "0.1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "rdma") {
        // Compiled in; on a host without RDMA the error says what was found.
        if !out.status.success() {
            assert!(err.contains("RDMA"), "{err}");
        }
    } else {
        assert!(!out.status.success());
        assert!(err.contains("--features rdma"), "{err}");
    }
    let out = Command::new(FERRY)
        .args([
            "bench",
            "--protocol",
            "tcp",
            "--rdma-devices",
            "mlx5_0",
            "--duration",
            "0.1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--rdma-devices applies to --protocol rdma only"));
    let out = Command::new(FERRY)
        .args(["bench", "--protocol", "ucx", "--duration", "0.1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown protocol `ucx`"));
    let out = Command::new(FERRY)
        .args(["bench", "--location", "cuda:0", "--duration", "0.1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !cfg!(feature = "cuda") {
        assert!(!out.status.success());
    }
    if !out.status.success() {
        // Without CUDA support the error names the feature; a CUDA build on a host
        // without the driver names the driver (on a GPU host the bench runs).
        assert!(
            err.contains("--features cuda") || err.contains("libcuda.so"),
            "{err}"
        );
    }
    let out = Command::new(FERRY).arg("info").output().unwrap();
    assert!(out.status.success());
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains("tcp   usable"), "{info}");
    if cfg!(feature = "efa") {
        assert!(info.contains("provider shm"), "{info}");
    } else {
        assert!(info.contains("efa   not compiled in"), "{info}");
    }
    if cfg!(feature = "rdma") {
        // Every device and port, or exactly why there are none.
        assert!(info.contains("RDMA devices (ibverbs):"), "{info}");
        let rdma = info
            .split("RDMA devices (ibverbs):")
            .nth(1)
            .unwrap_or_default();
        assert!(
            rdma.contains("none: ") || rdma.contains("port 1:"),
            "{info}"
        );
    } else {
        assert!(
            info.contains("rdma  not compiled in; rebuild with `--features rdma`"),
            "{info}"
        );
    }
    if cfg!(feature = "redis") {
        assert!(info.contains("redis compiled in"), "{info}");
    } else {
        assert!(
            info.contains("redis not compiled in; rebuild with `--features redis`"),
            "{info}"
        );
    }
    // A store that does not answer is reported, naming it; the command still succeeds.
    let out = Command::new(FERRY)
        .args(["info", "--metadata", "etcd://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains("etcd://127.0.0.1:1: "), "{info}");
    assert!(!info.contains("etcd://127.0.0.1:1: reachable"), "{info}");
}

/// `ferry target --config-json` (how `ferry bench` starts its target) runs the document it
/// is given, not its own flags' defaults.
#[test]
fn a_target_runs_the_configuration_it_is_handed() {
    let run = |json: &str| {
        Command::new(FERRY)
            .args(["target", "--listen", "127.0.0.1:0", "--config-json", json])
            .output()
            .unwrap()
    };
    // The flags say TCP; the document says RDMA, on a device no host has.
    let out = run(if cfg!(feature = "rdma") {
        r#"{"protocol": "rdma", "rdma": {"devices": ["ferry_absent0"]}, "tcp": {"lanes": 2}}"#
    } else {
        r#"{"protocol": "rdma", "tcp": {"lanes": 2}}"#
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "rdma") {
        assert!(err.contains("RDMA"), "{err}");
    } else {
        assert!(
            err.contains("`rdma`") && err.contains("--features rdma"),
            "{err}"
        );
    }
    let out = run(r#"{"protocol": "tcp", "tcp": {"lanes": "two"}}"#);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--config-json") && err.contains("\"two\""),
        "{err}"
    );
}

/// A run whose warm-up fails (here: WRITEs to the one buffer its target publishes, which
/// is read-only) reports that error and exits, instead of waiting at its start barriers
/// for the worker that gave up.
#[test]
fn a_bench_whose_warm_up_fails_reports_it_and_exits() {
    let target = initiator();
    let _read_only = target
        .allocate_with(1 << 20, Location::host(), Access::RemoteRead, "ro")
        .unwrap();
    let child = Command::new(FERRY)
        .args([
            "initiator",
            "--segment",
            &target.name(),
            "--operation",
            "write",
        ])
        .args([
            "--block-size",
            "4K",
            "--batch-size",
            "4",
            "--duration",
            "1",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = Command::new("kill").args(["-9", &pid]).status();
        panic!("the run hung after its warm-up failed");
    };
    let out = out.unwrap();
    let status = out.status;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "a failed warm-up exited 0: {err}");
    assert!(
        err.contains("does not allow peers to write it"),
        "the warm-up's error is reported: {err}"
    );
}
