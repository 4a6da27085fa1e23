//! `ferry bench --protocol efa` against the libfabric RMA loop on the same provider.

use std::process::Command;

use std::path::Path;

use anyhow::Result;

use super::{median, throughput};
use crate::sh::{apt_install, cargo, root, run, BUILD_PACKAGES};

/// `ferry bench --protocol efa` against the minimal libfabric RMA loop of
/// transport-efa, per provider and operation, 1 MiB blocks, interleaved.
pub(crate) fn bench(duration: &str, rounds: usize, plot: Option<&Path>) -> Result<()> {
    let _ = plot;
    apt_install(BUILD_PACKAGES)?;
    run(cargo().args(["build", "--release", "-p", "ferry-cli", "--features", "efa"]))?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "ferry-transport-efa",
        "--example",
        "rma_loop",
    ]))?;
    let ferry = root().join("target/release/ferry");
    let rma_loop = root().join("target/release/examples/rma_loop");
    let cases: Vec<(&str, &str)> = ["tcp;ofi_rxm", "shm"]
        .into_iter()
        .flat_map(|p| ["write", "read"].into_iter().map(move |o| (p, o)))
        .collect();
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); cases.len()];
    for round in 1..=rounds {
        eprintln!("xtask: round {round}/{rounds}");
        for (i, (provider, op)) in cases.iter().enumerate() {
            let base = Command::new(&rma_loop)
                .args([provider, op, "1048576", duration])
                .output()?;
            results[i].0.push(throughput(base, "rma_loop")?);
            let out = Command::new(&ferry)
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
                    "1M",
                    "--batch-size",
                    "128",
                    "--duration",
                    duration,
                    "--json",
                ])
                .output()?;
            results[i].1.push(throughput(out, "ferry bench")?);
        }
    }
    println!("libfabric, 1 MiB blocks, medians of {rounds} interleaved rounds of {duration} s (1 GB = 10^9 bytes)");
    println!(
        "{:<24} {:>14} {:>14} {:>8}",
        "provider, operation", "RMA loop GB/s", "ferry GB/s", "ratio"
    );
    for ((provider, op), (base, ferry)) in cases.iter().zip(results) {
        let (b, f) = (median(base), median(ferry));
        println!(
            "{:<24} {:>14.2} {:>14.2} {:>8.2}",
            format!("{provider} {op}"),
            b,
            f,
            f / b
        );
    }
    Ok(())
}
