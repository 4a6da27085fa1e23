//! `ferry bench --protocol efa` against a raw two-process libfabric baseline
//! (`transport-efa/examples/fi_rma_bw.rs`, shaped like fabtests' `fi_rma_bw`) on the
//! same provider, interleaved.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use super::plot::{line_chart, Chart, Series};
use super::{median, throughput};
use crate::sh::{apt_install, cargo, root, run, BUILD_PACKAGES};

/// The providers that run on any Linux host.
const PROVIDERS: &[&str] = &["tcp;ofi_rxm", "shm"];
/// Block sizes: `ferry bench`'s spelling and bytes (the TCP table's 64 KiB and 1 MiB).
const BLOCKS: &[(&str, u64)] = &[("64K", 64 << 10), ("1M", 1 << 20)];
/// The baseline's runs: label, `fi_rma_bw` flags, and the `ferry bench` operation each is
/// compared with. `fi_writemsg` with `FI_DELIVERY_COMPLETE` is the completion ferry's
/// WRITEs wait for (the data is in the target's memory), which plain `fi_write` on
/// `tcp;ofi_rxm` does not promise.
const OPERATIONS: &[(&str, &[&str], &str)] = &[
    ("fi_write", &["--operation", "write"], "write"),
    ("fi_writedata", &["--operation", "writedata"], "write"),
    (
        "fi_writemsg DC",
        &["--operation", "write", "--delivery-complete"],
        "write",
    ),
    ("fi_read", &["--operation", "read"], "read"),
];
/// Operations the baseline keeps in flight.
const WINDOW: &str = "64";
/// `ferry bench --depth`: one batch in flight (the pipeline drains at the end of each),
/// and two (the next is queued while one finishes, as the baseline's window never
/// drains).
const DEPTHS: [&str; 2] = ["1", "2"];

/// `ferry bench`'s runs per operation: [`DEPTHS`] with the blocks added in ascending
/// order (end to end, which the engine sends as one slice per MiB), then depth 2 with
/// them added in descending order (`--descending`: every block is its own operation, as
/// each of the baseline's is, over the same memory).
const FERRY_RUNS: usize = DEPTHS.len() + 1;

/// One round's figures for a provider and block size.
#[derive(Clone, Copy, Default)]
struct Round {
    /// The baseline per entry of [`OPERATIONS`].
    baseline: [f64; OPERATIONS.len()],
    /// `ferry bench` WRITE and READ, per run (see [`FERRY_RUNS`]).
    ferry_write: [f64; FERRY_RUNS],
    ferry_read: [f64; FERRY_RUNS],
}

impl Round {
    fn ferry(&self, op: &str, run: usize) -> f64 {
        if op == "read" {
            self.ferry_read[run]
        } else {
            self.ferry_write[run]
        }
    }
}

fn baseline(exe: &Path, provider: &str, flags: &[&str], block: u64, duration: &str) -> Result<f64> {
    let out = Command::new(exe)
        .args(["--provider", provider])
        .args(flags)
        .args(["--block-size", &block.to_string(), "--window", WINDOW])
        .args(["--duration", duration])
        .stderr(Stdio::inherit())
        .output()
        .context("running fi_rma_bw")?;
    throughput(
        out,
        &format!("fi_rma_bw {provider} {} {block}", flags.join(" ")),
    )
}

/// `ferry bench` with `block`-byte requests, added last to first when `descending`.
fn ferry(
    exe: &Path,
    provider: &str,
    op: &str,
    (block, descending): (u64, bool),
    depth: &str,
    duration: &str,
) -> Result<f64> {
    let order: &[&str] = if descending { &["--descending"] } else { &[] };
    let out = Command::new(exe)
        .args(["bench", "--protocol", "efa", "--provider", provider])
        .args([
            "--operation",
            op,
            "--block-size",
            &block.to_string(),
            "--batch-size",
            "128",
            "--depth",
            depth,
        ])
        .args(order)
        .args(["--duration", duration, "--json"])
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .context("running ferry bench")?;
    throughput(
        out,
        &format!(
            "ferry bench {provider} {op} {block} --depth {depth} {}",
            order.join(" ")
        ),
    )
}

/// Per provider, block size and operation, `rounds` interleaved rounds of the baseline
/// and `ferry bench`; prints medians and the median of each round's ratio.
pub(crate) fn bench(duration: &str, rounds: usize, plot: Option<&Path>) -> Result<()> {
    apt_install(BUILD_PACKAGES)?;
    // Each program is copied as soon as it is built: another build in the same target
    // directory (a ferry without `efa`) cannot replace it halfway through the run.
    let dir = root().join("target/bench-efa");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ferry_exe = dir.join("ferry");
    let raw = dir.join("fi_rma_bw");
    let builds: [(&[&str], &str, &Path); 2] = [
        (
            &["-p", "ferry-cli", "--features", "efa"],
            "target/release/ferry",
            &ferry_exe,
        ),
        (
            &["-p", "ferry-transport-efa", "--example", "fi_rma_bw"],
            "target/release/examples/fi_rma_bw",
            &raw,
        ),
    ];
    for (args, built, copy) in builds {
        run(cargo().args(["build", "--release"]).args(args))?;
        std::fs::copy(root().join(built), copy)
            .with_context(|| format!("copying {built} to {}", copy.display()))?;
    }
    // results[provider][block] = one Round per round.
    let mut results = vec![vec![Vec::<Round>::new(); BLOCKS.len()]; PROVIDERS.len()];
    for round in 1..=rounds {
        eprintln!("xtask: round {round}/{rounds}");
        for (p, provider) in PROVIDERS.iter().enumerate() {
            for (b, (_, bytes)) in BLOCKS.iter().enumerate() {
                let mut r = Round::default();
                for (o, (_, flags, _)) in OPERATIONS.iter().enumerate() {
                    r.baseline[o] = baseline(&raw, provider, flags, *bytes, duration)?;
                }
                let runs = DEPTHS.iter().map(|d| (*d, false)).chain([("2", true)]);
                for (i, (depth, descending)) in runs.enumerate() {
                    let shape = (*bytes, descending);
                    r.ferry_write[i] =
                        ferry(&ferry_exe, provider, "write", shape, depth, duration)?;
                    r.ferry_read[i] = ferry(&ferry_exe, provider, "read", shape, depth, duration)?;
                }
                results[p][b].push(r);
            }
        }
    }
    println!(
        "libfabric, medians of {rounds} interleaved rounds of {duration} s (1 GB = 10^9 bytes); \
         baseline: fi_rma_bw, two processes, {WINDOW} operations in flight, a completion each; \
         DC: with FI_DELIVERY_COMPLETE, as ferry's WRITEs; ferry: ferry bench --batch-size 128, \
         --depth 1 and 2 (d2), blocks end to end in ascending order (one slice per MiB); desc: depth 2, \
         added in descending order (one operation per block); ratio: median of each round's ferry / baseline"
    );
    println!(
        "{:<12} {:<24} {:>6} {:>14} {:>7} {:>7} {:>8} {:>7} {:>7} {:>7}",
        "provider",
        "ferry op vs baseline",
        "block",
        "baseline GB/s",
        "ferry",
        "ratio",
        "ferry d2",
        "ratio",
        "desc",
        "ratio"
    );
    let mut chart = Chart {
        title: "EFA transport over loopback providers: WRITE".into(),
        x_label: "block size".into(),
        y_label: "GB/s (10^9 bytes/s)".into(),
        log2_x: true,
        series: Vec::new(),
    };
    for (p, provider) in PROVIDERS.iter().enumerate() {
        let mut ferry_points = Vec::new();
        let mut ferry_d2_points = Vec::new();
        let mut desc_points = Vec::new();
        let mut base_points = Vec::new();
        for (o, (label, _, ferry_op)) in OPERATIONS.iter().enumerate() {
            for (b, (block, bytes)) in BLOCKS.iter().enumerate() {
                let rs = &results[p][b];
                let base = median(rs.iter().map(|r| r.baseline[o]).collect());
                let ours = |d: usize| median(rs.iter().map(|r| r.ferry(ferry_op, d)).collect());
                let ratio = |d: usize| {
                    median(
                        rs.iter()
                            .map(|r| r.ferry(ferry_op, d) / r.baseline[o])
                            .collect(),
                    )
                };
                println!(
                    "{:<12} {:<24} {:>6} {:>14.2} {:>7.2} {:>7.2} {:>8.2} {:>7.2} {:>7.2} {:>7.2}",
                    provider,
                    format!("{} vs {label}", ferry_op.to_uppercase()),
                    block,
                    base,
                    ours(0),
                    ratio(0),
                    ours(1),
                    ratio(1),
                    ours(2),
                    ratio(2)
                );
                if *label == "fi_write" {
                    ferry_points.push((*bytes as f64, ours(0)));
                    ferry_d2_points.push((*bytes as f64, ours(1)));
                    desc_points.push((*bytes as f64, ours(2)));
                    base_points.push((*bytes as f64, base));
                }
            }
        }
        chart.series.push(Series {
            label: format!("{provider}: ferry WRITE"),
            points: ferry_points,
        });
        chart.series.push(Series {
            label: format!("{provider}: ferry WRITE, depth 2"),
            points: ferry_d2_points,
        });
        chart.series.push(Series {
            label: format!("{provider}: ferry WRITE, depth 2, one operation per block"),
            points: desc_points,
        });
        chart.series.push(Series {
            label: format!("{provider}: fi_write baseline"),
            points: base_points,
        });
    }
    if let Some(dir) = plot {
        let path = dir.join("efa-throughput.svg");
        line_chart(&path, &chart)?;
        eprintln!("xtask: wrote {}", path.display());
    }
    Ok(())
}
