//! `ferry bench` with several processes: one initiator striping over several targets
//! (`--targets`), several initiator processes against one target (`--initiators`), and the
//! memory of idle peers (`--idle-peers`), each reporting what every process holds; and
//! several batches in flight per thread (`--depth`).

use std::process::Command;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// Runs `ferry bench ARGS --json` with a small buffer and returns its JSON report.
fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(FERRY)
        .arg("bench")
        .args(args)
        .args(["--buffer-size", "4M", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ferry bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The report's `peers`: each process's role, with threads, fds and RSS present and
/// positive, and distinct process ids.
fn roles(v: &serde_json::Value) -> Vec<String> {
    let peers = v["peers"].as_array().expect("peers is a list");
    let mut pids: Vec<u64> = Vec::new();
    for p in peers {
        for field in ["pid", "threads", "fds", "rss_kib"] {
            assert!(p[field].as_u64().unwrap_or(0) > 0, "{field} of {p} in {v}");
        }
        pids.push(p["pid"].as_u64().unwrap());
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), peers.len(), "one entry per process: {v}");
    peers
        .iter()
        .map(|p| p["role"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn one_initiator_stripes_over_several_targets_and_verifies() {
    // Each batch starts where the last one stopped, and the read-back finds every block
    // where the last batch put it: with batches of 2 over 4 targets, a thread's block
    // reaches only half of the targets.
    for (op, targets, batch) in [
        ("write", "2", "8"),
        ("read", "2", "8"),
        ("write", "4", "2"),
        ("read", "4", "2"),
    ] {
        let v = bench(&[
            "--targets",
            targets,
            "--batch-size",
            batch,
            "--threads",
            "2",
            "--operation",
            op,
            "--duration",
            "0.3",
            "--verify",
        ]);
        assert_eq!(v["targets"].to_string(), targets);
        assert_eq!(v["initiators"], 1);
        assert_eq!(v["errors"], 0);
        assert_eq!(v["verified"], true, "striped batches land byte for byte");
        assert!(v["bytes"].as_u64().unwrap() > 0);
        assert!(v["cpu_seconds"]["target"].as_f64().is_some());
        let mut expected = vec!["initiator"];
        expected.extend(std::iter::repeat_n("target", targets.parse().unwrap()));
        assert_eq!(roles(&v), expected);
    }
}

#[test]
fn two_initiator_processes_against_one_target_add_up_and_verify() {
    let v = bench(&[
        "--initiators",
        "2",
        "--batch-size",
        "8",
        "--duration",
        "0.3",
        "--verify",
    ]);
    assert_eq!(
        v["verified"], true,
        "each initiator's bytes land in its own slots"
    );
    assert_eq!(v["initiators"], 2);
    assert_eq!(v["targets"], 1);
    assert_eq!(v["errors"], 0);
    assert!(v["bytes"].as_u64().unwrap() > 0);
    assert!(v["latency_us"]["p99"].as_f64().unwrap() > 0.0);
    assert!(v["cpu_seconds"]["target"].as_f64().is_some());
    assert_eq!(roles(&v), ["initiator", "initiator", "target"]);
}

#[test]
fn several_batches_in_flight_per_thread_verify() {
    // `--depth`: each thread submits the next batches before it waits for the oldest;
    // the bytes land as with one batch at a time, in one process and through the
    // initiator children of `--initiators` (which get the flag too).
    for extra in [&["--threads", "2"][..], &["--initiators", "2"][..]] {
        for op in ["write", "read"] {
            let mut args = vec![
                "--depth",
                "3",
                "--batch-size",
                "8",
                "--operation",
                op,
                "--duration",
                "0.3",
                "--verify",
            ];
            args.extend_from_slice(extra);
            let v = bench(&args);
            assert_eq!(v["depth"], 3, "{v}");
            assert_eq!(v["errors"], 0);
            assert_eq!(
                v["verified"], true,
                "{op} {extra:?} with 3 batches in flight"
            );
            assert!(v["bytes"].as_u64().unwrap() > 0);
        }
    }
    let out = Command::new(FERRY)
        .args(["bench", "--depth", "0", "--duration", "0.1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "--depth 0 ran");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--depth"));
}

#[test]
fn bad_peer_counts_are_refused() {
    for args in [
        // 4 initiators x 8 MiB batches do not fit a 16 MiB buffer apart.
        &[
            "bench",
            "--initiators",
            "4",
            "--verify",
            "--buffer-size",
            "16M",
            "--batch-size",
            "128",
        ][..],
        &["bench", "--initiators", "2", "--targets", "2"][..],
        &["bench", "--targets", "0"][..],
    ] {
        let out = Command::new(FERRY)
            .args(args)
            .args(["--duration", "0.1"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} ran");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--initiators") || err.contains("--targets"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn idle_peers_reports_what_each_connection_holds() {
    let v = bench(&["--idle-peers", "2", "--lanes", "2", "--batch-size", "8"]);
    assert_eq!(v["peers"], 2);
    assert_eq!(v["lanes"], 2);
    for side in ["initiator", "target"] {
        let s = &v[side];
        for stage in ["alone", "connected", "used"] {
            assert!(
                s[stage]["rss_kib"].as_u64().unwrap() > 0,
                "{side} {stage}: {v}"
            );
        }
        // Connected peers hold sockets: the descriptor count rises.
        assert!(
            s["connected"]["fds"].as_u64() > s["alone"]["fds"].as_u64(),
            "{side}: {v}"
        );
    }
    for per in ["initiator_per_target", "target_per_initiator"] {
        assert!(
            v[per]["fds"].as_f64().unwrap() >= 2.0,
            "{per}: two lanes, {v}"
        );
        assert!(v[per]["connected_kib"].as_f64().is_some());
    }
}
