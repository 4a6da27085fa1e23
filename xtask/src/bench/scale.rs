//! `cargo xtask bench --scale`: `ferry bench` with 1 to 16 peers on loopback, both ways:
//! one initiator striping each batch over N target processes (fan-out, `--targets N`) and
//! N initiator processes against one target (fan-in, `--initiators N`); then what an idle
//! peer and a lane hold (`--idle-peers`).

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use super::plot::{line_chart, Chart, Series};
use super::{ferry_json, median};
use crate::sh::{cargo, root, run};

/// Peer counts, each run both ways.
const PEERS: [usize; 5] = [1, 2, 4, 8, 16];
/// The measured shape: 64 KiB WRITEs (a KV-cache block of a few layers), 128 per batch
/// (but see [`Way::InSmall`]).
const SHAPE: [&str; 4] = ["--operation", "write", "--block-size", "64K"];
const BATCH: &str = "128";
/// Each target serves this much; a batch's 8 MiB fits several times.
const BUFFER: &str = "32M";
/// Peers in the idle-memory measurement, and the lane counts it compares.
const IDLE_PEERS: &str = "16";
const IDLE_LANES: [usize; 2] = [1, 4];

/// Fan-out (`--targets`) or fan-in (`--initiators`).
#[derive(Clone, Copy, PartialEq)]
enum Way {
    Out,
    In,
    /// Fan-in with batches of 8: N x 512 KiB in flight in place of N x 8 MiB, to tell
    /// the cost of more peers from the cost of more bytes in flight.
    InSmall,
}

impl Way {
    fn flag(self) -> &'static str {
        match self {
            Way::Out => "--targets",
            Way::In | Way::InSmall => "--initiators",
        }
    }

    fn batch(self) -> &'static str {
        match self {
            Way::Out | Way::In => BATCH,
            Way::InSmall => "8",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Way::Out => "1 -> N targets",
            Way::In => "N initiators -> 1",
            Way::InSmall => "N init. -> 1, x8",
        }
    }
}

/// One `ferry bench --json` run's figures.
struct Sample {
    gbps: f64,
    p99_us: f64,
    /// CPU seconds of every ferry process per second measured: the cores they kept busy.
    cores: f64,
    /// Per process of the role: (threads, fds, RSS KiB), averaged over its processes.
    initiator: (f64, f64, f64),
    target: (f64, f64, f64),
}

/// The mean (threads, fds, RSS KiB) of the report's processes of `role`.
fn usage(v: &Value, role: &str) -> (f64, f64, f64) {
    let peers: Vec<&Value> = v["peers"]
        .as_array()
        .map(|a| a.iter().filter(|p| p["role"] == role).collect())
        .unwrap_or_default();
    let n = peers.len().max(1) as f64;
    let sum = |f: &str| peers.iter().filter_map(|p| p[f].as_f64()).sum::<f64>() / n;
    (sum("threads"), sum("fds"), sum("rss_kib"))
}

fn sample(ferry: &Path, way: Way, peers: usize, duration: &str) -> Result<Sample> {
    let n = peers.to_string();
    let mut args = vec!["bench", way.flag(), &n, "--duration", duration];
    args.extend(SHAPE);
    args.extend(["--batch-size", way.batch()]);
    args.extend(["--buffer-size", BUFFER]);
    let v = ferry_json(ferry, &args)?;
    let num = |p: &str| v.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
    Ok(Sample {
        gbps: num("/throughput_gbps"),
        p99_us: num("/latency_us/p99"),
        cores: (num("/cpu_seconds/initiator") + num("/cpu_seconds/target"))
            / num("/duration_s").max(1e-9),
        initiator: usage(&v, "initiator"),
        target: usage(&v, "target"),
    })
}

/// The median of one figure of a point's rounds.
fn med(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    median(samples.iter().map(f).collect())
}

/// `cargo xtask bench --scale [--duration S] [--rounds N] [--plot DIR]`.
pub(crate) fn bench(duration: &str, rounds: usize, plot: Option<&Path>) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "ferry-cli"]))?;
    let ferry = root().join("target/release/ferry");
    let ways = [Way::Out, Way::In, Way::InSmall];
    // samples[way][peer index]: one per round, rounds interleaved over every point.
    let mut samples: Vec<Vec<Vec<Sample>>> = ways
        .iter()
        .map(|_| PEERS.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 1..=rounds {
        eprintln!("xtask: scale round {round}/{rounds}");
        for (p, &peers) in PEERS.iter().enumerate() {
            for (w, &way) in ways.iter().enumerate() {
                samples[w][p].push(sample(&ferry, way, peers, duration)?);
            }
        }
    }

    println!(
        "loopback scale: 64 KiB WRITE x{BATCH} per batch (x8 where marked), 1 submitting thread per initiator, medians of {rounds} interleaved rounds of {duration} s"
    );
    println!("(cores: CPU seconds of all ferry processes per second; threads, fds and RSS: peak per process during the run, with N of a role the mean of the N)");
    println!(
        "{:>5}  {:<18} {:>7} {:>10} {:>6}  {:>16} {:>5} {:>8}  {:>16} {:>5} {:>8}",
        "peers",
        "direction",
        "GB/s",
        "p99 ms",
        "cores",
        "initiator thr",
        "fds",
        "RSS MiB",
        "target thr",
        "fds",
        "RSS MiB"
    );
    for (p, &peers) in PEERS.iter().enumerate() {
        for (w, &way) in ways.iter().enumerate() {
            let s = &samples[w][p];
            println!(
                "{:>5}  {:<18} {:>7.2} {:>10.2} {:>6.2}  {:>16.0} {:>5.0} {:>8.1}  {:>16.0} {:>5.0} {:>8.1}",
                peers,
                way.label(),
                med(s, |x| x.gbps),
                med(s, |x| x.p99_us) / 1e3,
                med(s, |x| x.cores),
                med(s, |x| x.initiator.0),
                med(s, |x| x.initiator.1),
                med(s, |x| x.initiator.2) / 1024.0,
                med(s, |x| x.target.0),
                med(s, |x| x.target.1),
                med(s, |x| x.target.2) / 1024.0,
            );
        }
    }
    for (w, &way) in ways.iter().enumerate() {
        let rates: Vec<f64> = samples[w].iter().map(|s| med(s, |x| x.gbps)).collect();
        let best = (0..PEERS.len())
            .max_by(|&a, &b| rates[a].total_cmp(&rates[b]))
            .unwrap_or(0);
        println!(
            "{}: most throughput at {} peer(s), {:.2} GB/s ({:.2}x the 1-peer figure)",
            way.label(),
            PEERS[best],
            rates[best],
            if rates[0] > 0.0 {
                rates[best] / rates[0]
            } else {
                0.0
            }
        );
    }

    idle_memory(&ferry)?;

    if let Some(dir) = plot {
        // The latency chart keeps to 8 MiB batches: p99 of a 512 KiB batch is another scale.
        let series = |f: &dyn Fn(&Sample) -> f64, small: bool| -> Vec<Series> {
            ways.iter()
                .enumerate()
                .filter(|&(_, &way)| small || way != Way::InSmall)
                .map(|(w, way)| Series {
                    label: match way {
                        Way::InSmall => "N initiators -> 1, batches of 8".to_string(),
                        _ => way.label().to_string(),
                    },
                    points: PEERS
                        .iter()
                        .zip(&samples[w])
                        .map(|(&n, s)| (n as f64, med(s, f)))
                        .collect(),
                })
                .collect()
        };
        let throughput = dir.join("scale-throughput.svg");
        line_chart(
            &throughput,
            &Chart {
                title: "Loopback scale: aggregate throughput, 64 KiB WRITEs".into(),
                x_label: "peers".into(),
                y_label: "GB/s".into(),
                log2_x: true,
                series: series(&|x| x.gbps, true),
            },
        )?;
        let latency = dir.join("scale-latency.svg");
        line_chart(
            &latency,
            &Chart {
                title: "Loopback scale: p99 latency of 8 MiB batches".into(),
                x_label: "peers".into(),
                y_label: "p99 latency, ms".into(),
                log2_x: true,
                series: series(&|x| x.p99_us / 1e3, false),
            },
        )?;
        eprintln!(
            "xtask: wrote {} and {}",
            throughput.display(),
            latency.display()
        );
    }
    Ok(())
}

/// `ferry bench --idle-peers 16` with 1 and 4 lanes: KiB, threads and fds per idle peer,
/// and per lane from the difference.
fn idle_memory(ferry: &Path) -> Result<()> {
    let mut per = Vec::new();
    for lanes in IDLE_LANES {
        let l = lanes.to_string();
        let mut args = vec!["bench", "--idle-peers", IDLE_PEERS, "--lanes", &l];
        args.extend(SHAPE);
        args.extend(["--batch-size", BATCH]);
        args.extend(["--buffer-size", "16M"]);
        per.push(ferry_json(ferry, &args)?);
    }
    println!(
        "idle peers ({IDLE_PEERS} of them; 'used' = after one 8 MiB batch over each connection, idle again)"
    );
    println!(
        "{:<24} {:>5} {:>15} {:>11} {:>8} {:>6}",
        "", "lanes", "KiB connected", "KiB used", "threads", "fds"
    );
    let field = |v: &Value, side: &str, f: &str| v[side][f].as_f64().unwrap_or(0.0);
    for (side, label) in [
        ("initiator_per_target", "initiator, per target"),
        ("target_per_initiator", "target, per initiator"),
    ] {
        for (v, lanes) in per.iter().zip(IDLE_LANES) {
            println!(
                "{:<24} {:>5} {:>15.0} {:>11.0} {:>8.2} {:>6.2}",
                label,
                lanes,
                field(v, side, "connected_kib"),
                field(v, side, "used_kib"),
                field(v, side, "threads"),
                field(v, side, "fds")
            );
        }
        let extra = (IDLE_LANES[1] - IDLE_LANES[0]) as f64;
        let lane = |f: &str| (field(&per[1], side, f) - field(&per[0], side, f)) / extra;
        println!(
            "{:<24} {:>5} {:>15.0} {:>11.0} {:>8.2} {:>6.2}",
            format!("{}, per lane", label.split(',').next().unwrap_or(label)),
            "",
            lane("connected_kib"),
            lane("used_kib"),
            lane("threads"),
            lane("fds")
        );
    }
    Ok(())
}
