//! `ferry bench` against its raw baselines on loopback, interleaved round by round:
//! `iperf3` (one stream) for throughput, a two-process TCP ping-pong for a small READ's
//! latency (`pingpong.rs`). With `--plot DIR`, a block-size sweep and the charts; with
//! `--costs`, what each side spends per MiB moved (`costs.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::plot::{line_chart, Chart, Series};
use super::{ferry_json, median, pingpong, stream};
use crate::sh::{apt_install, cargo, have, root, run};

/// A `ferry bench` case: its label, operation, block size, batch size and further flags.
pub(crate) type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
);

/// The table's cases. The 1 MiB and 64 KiB rows are the ones held against iperf3; the
/// depth rows keep two batches in flight (the path does not drain between batches; the
/// memory walked is the same), the 1 MiB ones in batches of 8 (8 MiB walked, nearer the
/// 1 MiB iperf3 walks; 128 MiB is a KV-cache transfer's footprint); the `x1, depth 8`
/// rows are iperf3's own shape, one hot 1 MiB buffer at each end and a stream that never
/// drains (eight 1 MiB batches in flight on the same memory); the thread rows
/// check that more submitting threads do not lower the total (with the same 128 MiB in
/// flight as one thread, so they measure the threads, not a larger working set); the
/// `descending` rows add each batch's blocks from last to first, so that no two travel
/// in one slice (every other row's blocks lie end to end in ascending order, which the
/// engine sends as one slice per MiB): one operation per block over the same memory, as
/// with a fragmented KV cache; the 4 KiB rows are one READ at a time, in each waiting
/// mode.
const CASES: &[Case] = &[
    ("write 1 MiB x128", "write", "1M", "128", &[]),
    ("read  1 MiB x128", "read", "1M", "128", &[]),
    (
        "write 1 MiB x8, depth 2",
        "write",
        "1M",
        "8",
        &["--depth", "2"],
    ),
    (
        "read  1 MiB x8, depth 2",
        "read",
        "1M",
        "8",
        &["--depth", "2"],
    ),
    (
        "write 1 MiB x1, depth 8",
        "write",
        "1M",
        "1",
        &["--depth", "8"],
    ),
    (
        "read  1 MiB x1, depth 8",
        "read",
        "1M",
        "1",
        &["--depth", "8"],
    ),
    ("write 64 KiB x128", "write", "64K", "128", &[]),
    ("read  64 KiB x128", "read", "64K", "128", &[]),
    (
        "write 64 KiB x128, depth 2",
        "write",
        "64K",
        "128",
        &["--depth", "2"],
    ),
    (
        "read  64 KiB x128, depth 2",
        "read",
        "64K",
        "128",
        &["--depth", "2"],
    ),
    (
        "write 64 KiB x128, desc",
        "write",
        "64K",
        "128",
        &["--descending"],
    ),
    (
        "read  64 KiB x128, desc",
        "read",
        "64K",
        "128",
        &["--descending"],
    ),
    (
        "write 1 MiB x64, 2 thr",
        "write",
        "1M",
        "64",
        &["--threads", "2"],
    ),
    (
        "write 1 MiB x32, 4 thr",
        "write",
        "1M",
        "32",
        &["--threads", "4"],
    ),
    (
        "read  4 KiB x1, sleep",
        "read",
        "4K",
        "1",
        &["--busy-poll-us", "0"],
    ),
    ("read  4 KiB x1", "read", "4K", "1", &[]),
    (
        "read  4 KiB x1, poll",
        "read",
        "4K",
        "1",
        &["--busy-poll-us", "1000"],
    ),
];

/// A case's `ferry bench` flags.
pub(crate) fn flags(case: &Case) -> Vec<&'static str> {
    let (_, op, block, batch, extra) = *case;
    let mut f = vec![
        "--operation",
        op,
        "--block-size",
        block,
        "--batch-size",
        batch,
    ];
    f.extend_from_slice(extra);
    f
}

/// Bytes of a flag such as `4K` or `1M`.
fn size_bytes(flag: &str) -> usize {
    let (n, unit) = flag.split_at(flag.len() - 1);
    let n: usize = n.parse().unwrap_or(0);
    match unit {
        "K" => n << 10,
        "M" => n << 20,
        _ => 0,
    }
}

/// The bytes a throughput case walks (block x batch x threads: more batches in flight
/// reuse the same memory), which the same-memory stream walks too; `None` for the 4 KiB
/// latency rows.
fn walked(case: &Case) -> Option<usize> {
    let (_, _, block, batch, extra) = *case;
    let batch: usize = batch.parse().ok()?;
    let threads: usize = extra
        .iter()
        .position(|f| *f == "--threads")
        .and_then(|i| extra.get(i + 1)?.parse().ok())
        .unwrap_or(1);
    let bytes = size_bytes(block) * batch * threads;
    (bytes >= 1 << 20).then_some(bytes)
}

/// The block sizes of the sweep behind the throughput chart.
const SWEEP: &[usize] = &[4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];

/// What one `ferry bench` run reported.
#[derive(Clone, Copy, Default)]
pub(crate) struct Run {
    pub(crate) gbps: f64,
    pub(crate) gb_per_cpu: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    /// CPU microseconds of both processes per request.
    pub(crate) cpu_us_per_op: f64,
}

/// Builds `ferry` in release mode and returns its path.
pub(crate) fn build_ferry() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "ferry-cli"]))?;
    Ok(root().join("target/release/ferry"))
}

/// One `ferry bench --json` run with `args` for `duration` seconds.
pub(crate) fn ferry(ferry: &Path, args: &[&str], duration: &str) -> Result<Run> {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--duration", duration]);
    let v = ferry_json(ferry, &all)?;
    let num = |p: &str| v.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
    let ops = num("/ops_per_sec") * num("/duration_s");
    let cpu = num("/cpu_seconds/initiator") + num("/cpu_seconds/target");
    Ok(Run {
        gbps: num("/throughput_gbps"),
        gb_per_cpu: num("/gb_per_cpu_second"),
        p50: num("/latency_us/p50"),
        p99: num("/latency_us/p99"),
        cpu_us_per_op: if ops > 0.0 { cpu * 1e6 / ops } else { 0.0 },
    })
}

/// The median of each field over `runs`.
fn medians(runs: &[Run]) -> Run {
    let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    Run {
        gbps: m(|r| r.gbps),
        gb_per_cpu: m(|r| r.gb_per_cpu),
        p50: m(|r| r.p50),
        p99: m(|r| r.p99),
        cpu_us_per_op: m(|r| r.cpu_us_per_op),
    }
}

/// Bytes as the sweep's flag: 4K, 1M.
fn size_flag(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes >> 10)
    }
}

/// The sweep's batch for `block`: 128 requests, fewer where that would pass the target's
/// 256 MiB buffer.
fn sweep_batch(block: usize) -> usize {
    (128usize).min((128 << 20) / block).max(1)
}

/// The TCP table (and with `plot`, the sweep and charts), `rounds` interleaved rounds of
/// `duration` seconds.
pub(crate) fn bench(duration: &str, rounds: usize, plot: Option<&Path>) -> Result<()> {
    if !have("iperf3") {
        apt_install(&["iperf3"])?;
    }
    let ferry_bin = build_ferry()?;
    let seconds: f64 = duration.parse().context("--duration")?;
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); CASES.len()];
    let mut iperf = Vec::new();
    let mut ping: [Vec<pingpong::PingPong>; 2] = [Vec::new(), Vec::new()];
    // The same-memory stream, once per distinct footprint of the throughput cases.
    let mut footprints: Vec<usize> = CASES.iter().filter_map(walked).collect();
    footprints.sort_unstable();
    footprints.dedup();
    let mut streams: Vec<Vec<stream::Stream>> = vec![Vec::new(); footprints.len()];
    // sweep[size] = (write, read, iperf3 -l size, write in descending order) per round.
    let mut sweep: Vec<[Vec<f64>; 4]> = vec![Default::default(); SWEEP.len()];
    for round in 1..=rounds {
        eprintln!("xtask: round {round}/{rounds}");
        iperf.push(iperf3(duration, "1M")?);
        for (i, &bytes) in footprints.iter().enumerate() {
            streams[i].push(stream::run(bytes, Duration::from_secs_f64(seconds))?);
        }
        for (i, case) in CASES.iter().enumerate() {
            results[i].push(ferry(&ferry_bin, &flags(case), duration)?);
        }
        for (k, spin) in [false, true].into_iter().enumerate() {
            ping[k].push(pingpong::run(4096, spin, Duration::from_secs_f64(seconds))?);
        }
        if plot.is_some() {
            for (i, &block) in SWEEP.iter().enumerate() {
                let size = size_flag(block);
                let batch = sweep_batch(block).to_string();
                for (k, op) in ["write", "read"].into_iter().enumerate() {
                    let args = [
                        "--operation",
                        op,
                        "--block-size",
                        &size,
                        "--batch-size",
                        &batch,
                    ];
                    sweep[i][k].push(ferry(&ferry_bin, &args, duration)?.gbps);
                }
                let args = [
                    "--operation",
                    "write",
                    "--block-size",
                    &size,
                    "--batch-size",
                    &batch,
                    "--descending",
                ];
                sweep[i][3].push(ferry(&ferry_bin, &args, duration)?.gbps);
                // iperf3 writes and reads at most 1 MiB per call.
                if block <= 1 << 20 {
                    sweep[i][2].push(iperf3(duration, &size)?.0);
                }
            }
        }
    }
    let ip_rate = median(iperf.iter().map(|x| x.0).collect());
    let ip_eff = median(iperf.iter().map(|x| x.1).collect());
    println!(
        "loopback, medians of {rounds} interleaved rounds of {duration} s (1 GB = 10^9 bytes)"
    );
    let stream_rate: Vec<(usize, f64, f64)> = footprints
        .iter()
        .zip(&streams)
        .map(|(&b, r)| {
            let m = |f: fn(&stream::Stream) -> f64| median(r.iter().map(f).collect());
            (b, m(|x| x.gbps), m(|x| x.gb_per_cpu))
        })
        .collect();
    println!(
        "{:<26} {:>7} {:>9} {:>9} {:>8} {:>10} {:>10} {:>10}",
        "case", "GB/s", "vs iperf3", "vs stream", "GB/CPU-s", "p50 us", "p99 us", "CPU us/op"
    );
    println!(
        "{:<26} {:>7.2} {:>9} {:>9} {:>8.2} {:>10} {:>10} {:>10}",
        "iperf3 -l 1M", ip_rate, "1.00", "-", ip_eff, "-", "-", "-"
    );
    for &(bytes, rate, eff) in &stream_rate {
        println!(
            "{:<26} {:>7.2} {:>9.2} {:>9} {:>8.2} {:>10} {:>10} {:>10}",
            format!("stream, {} MiB walked", bytes >> 20),
            rate,
            rate / ip_rate,
            "1.00",
            eff,
            "-",
            "-",
            "-"
        );
    }
    let rows: Vec<(&str, Run)> = CASES
        .iter()
        .zip(&results)
        .map(|(c, r)| (c.0, medians(r)))
        .collect();
    for (case, (label, r)) in CASES.iter().zip(&rows) {
        let vs_stream = walked(case)
            .and_then(|b| stream_rate.iter().find(|s| s.0 == b))
            .map_or("-".to_string(), |s| format!("{:.2}", r.gbps / s.1));
        println!(
            "{:<26} {:>7.2} {:>9.2} {:>9} {:>8.2} {:>10.1} {:>10.1} {:>10.1}",
            label,
            r.gbps,
            r.gbps / ip_rate,
            vs_stream,
            r.gb_per_cpu,
            r.p50,
            r.p99,
            r.cpu_us_per_op
        );
    }
    let pp: Vec<Run> = ping
        .iter()
        .map(|runs| {
            medians(
                &runs
                    .iter()
                    .map(|p| Run {
                        p50: p.p50,
                        p99: p.p99,
                        cpu_us_per_op: p.cpu_us_per_op,
                        ..Run::default()
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    for (label, r) in ["ping-pong 4 KiB, sleep", "ping-pong 4 KiB, poll"]
        .iter()
        .zip(&pp)
    {
        println!(
            "{:<26} {:>7} {:>9} {:>9} {:>8} {:>10.1} {:>10.1} {:>10.1}",
            label, "-", "-", "-", "-", r.p50, r.p99, r.cpu_us_per_op
        );
    }
    // The latency goal: ferry's 4 KiB READ against the ping-pong that waits the same way.
    let by = |l: &str| rows.iter().find(|(x, _)| *x == l).map(|x| x.1);
    if let (Some(sleep), Some(poll)) = (by("read  4 KiB x1, sleep"), by("read  4 KiB x1, poll")) {
        println!(
            "4 KiB READ p50 vs ping-pong: {:.2}x sleeping, {:.2}x polling",
            sleep.p50 / pp[0].p50,
            poll.p50 / pp[1].p50
        );
    }
    if let Some(dir) = plot {
        charts(dir, &sweep, &rows, &pp)?;
    }
    Ok(())
}

/// Writes `tcp-throughput.svg` (GB/s against block size) and `tcp-latency.svg` (4 KiB
/// round-trip percentiles) into `dir`.
fn charts(dir: &Path, sweep: &[[Vec<f64>; 4]], rows: &[(&str, Run)], pp: &[Run]) -> Result<()> {
    let line = |label: &str, k: usize| Series {
        label: label.into(),
        points: SWEEP
            .iter()
            .zip(sweep)
            .filter(|(_, s)| !s[k].is_empty())
            .map(|(&b, s)| (b as f64, median(s[k].clone())))
            .collect(),
    };
    line_chart(
        &dir.join("tcp-throughput.svg"),
        &Chart {
            title: "TCP on loopback: throughput by block size".into(),
            x_label: "block size".into(),
            y_label: "GB/s".into(),
            log2_x: true,
            series: vec![
                line("ferry WRITE", 0),
                line("ferry READ", 1),
                line("ferry WRITE, one operation per block", 3),
                line("iperf3, 1 stream", 2),
            ],
        },
    )?;
    let percentiles = |label: &str, r: &Run| Series {
        label: label.into(),
        points: vec![(50.0, r.p50), (99.0, r.p99)],
    };
    let mut series: Vec<Series> = rows
        .iter()
        .filter(|(l, _)| l.starts_with("read  4 KiB"))
        .map(|(l, r)| percentiles(&format!("ferry {}", l.replace("  ", " ")), r))
        .collect();
    series.push(percentiles("ping-pong, sleep", &pp[0]));
    series.push(percentiles("ping-pong, poll", &pp[1]));
    line_chart(
        &dir.join("tcp-latency.svg"),
        &Chart {
            title: "4 KiB READ round trip on loopback".into(),
            x_label: "percentile".into(),
            y_label: "microseconds".into(),
            log2_x: false,
            series,
        },
    )
}

/// One `iperf3 -l LEN` run on loopback: (GB/s, GB per CPU-second of both ends).
pub(crate) fn iperf3(duration: &str, len: &str) -> Result<(f64, f64)> {
    let port = "5299";
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-p", port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let mut out = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let o = Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                port,
                "-l",
                len,
                "-t",
                duration,
                "-J",
            ])
            .output()
            .context("running iperf3 -c")?;
        if o.status.success() {
            out = Some(o);
            break;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let out = out.context("iperf3 never connected to its server")?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3 output")?;
    let cpu = |p: &str| v.pointer(p).and_then(Value::as_f64).unwrap_or(0.0) / 100.0;
    let cores = cpu("/end/cpu_utilization_percent/host_total")
        + cpu("/end/cpu_utilization_percent/remote_total");
    let rate = bps / 8e9;
    Ok((rate, if cores > 0.0 { rate / cores } else { 0.0 }))
}
