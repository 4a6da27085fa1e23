//! `python -m ferry.bench` (the Mooncake-compatible API) against `ferry bench`.

use std::process::Command;

use anyhow::Result;

use super::{median, throughput};
use crate::sh::{cargo, root, run};

/// `python -m ferry.bench` (the Mooncake-compatible `batch_transfer_sync_write`) against
/// `ferry bench`, 64 KiB blocks in batches of 128, interleaved rounds.
pub(crate) fn bench(duration: &str, rounds: usize) -> Result<()> {
    let python = crate::python::venv()?;
    crate::python::install(&python)?;
    run(cargo().args(["build", "--release", "-p", "ferry-cli"]))?;
    let ferry = root().join("target/release/ferry");
    let shape = [
        "--block-size",
        "64K",
        "--batch-size",
        "128",
        "--duration",
        duration,
        "--json",
    ];
    let (mut native, mut compat) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        eprintln!("xtask: round {round}/{rounds}");
        let out = Command::new(&ferry).arg("bench").args(shape).output()?;
        native.push(throughput(out, "ferry bench")?);
        let out = Command::new(&python)
            .args(["-m", "ferry.bench"])
            .args(shape)
            .current_dir(root().join("target"))
            .output()?;
        compat.push(throughput(out, "python -m ferry.bench")?);
    }
    let (n, c) = (median(native), median(compat));
    println!("WRITE, 64 KiB x 128, medians of {rounds} interleaved rounds of {duration} s (1 GB = 10^9 bytes)");
    println!("{:<50} {:>8.2} GB/s", "ferry bench (Rust API)", n);
    println!(
        "{:<50} {:>8.2} GB/s",
        "python -m ferry.bench (batch_transfer_sync_write)", c
    );
    println!("{:<50} {:>8.2}", "ratio", c / n);
    Ok(())
}
