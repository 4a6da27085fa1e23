//! `cargo xtask gpu-bundle [DIR]`: everything a GPU host needs to run the CUDA tests and
//! the GPU benchmarks without a Rust toolchain, built here.
//!
//! DIR (default `target/gpu-bundle`) receives the `ferry` binary with `cuda`, the
//! staging benchmark, the CUDA test binaries (the engine's `cuda` suite and
//! `ferry-mem-cuda`'s unit tests), all stripped, and `run.sh`, which runs on the GPU
//! host: the tests with the hardware ones included, the staging copy rate against the
//! device's, `ferry bench --location cuda:0` against `--location cpu` interleaved round
//! by round, and whether the host has RDMA devices. It writes its logs under `$OUT` (or
//! `./gpu-out`) and exits non-zero when a test failed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::sh::{cargo, root, run, test_binaries};

/// `cargo xtask gpu-bundle [DIR]`.
pub(crate) fn bundle(args: &[String]) -> Result<()> {
    let dir = match args {
        [] => root().join("target/gpu-bundle"),
        [d] if !d.starts_with('-') => PathBuf::from(d),
        _ => bail!("usage: cargo xtask gpu-bundle [DIR]"),
    };
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "ferry-cli",
        "--features",
        "cuda",
    ]))?;
    place(&root().join("target/release/ferry"), &dir.join("ferry"))?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "ferry-mem-cuda",
        "--example",
        "staging_bench",
    ]))?;
    place(
        &root().join("target/release/examples/staging_bench"),
        &dir.join("staging_bench"),
    )?;
    let engine = test_binary(&["-p", "ferry-engine", "--features", "cuda", "--test", "cuda"])?;
    place(&engine, &dir.join("engine-cuda-tests"))?;
    let mem = test_binary(&["-p", "ferry-mem-cuda", "--lib"])?;
    place(&mem, &dir.join("mem-cuda-tests"))?;
    let script = dir.join("run.sh");
    std::fs::write(&script, RUN_SH)?;
    let size: u64 = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "xtask: {} ({:.1} MiB); on the GPU host: bash {}/run.sh",
        dir.display(),
        size as f64 / f64::from(1 << 20),
        dir.strip_prefix(root()).unwrap_or(&dir).display()
    );
    Ok(())
}

/// Builds one test binary (release, so the GPU host runs optimised code) and returns its
/// path.
fn test_binary(selection: &[&str]) -> Result<PathBuf> {
    let mut args = vec!["--release"];
    args.extend_from_slice(selection);
    let tests: Vec<_> = test_binaries(&args)?
        .into_iter()
        .filter(|b| b.test)
        .collect();
    match tests.as_slice() {
        [one] => Ok(one.path.clone()),
        found => bail!(
            "`cargo test --no-run {}` built {} test binaries, where one was expected",
            args.join(" "),
            found.len()
        ),
    }
}

/// Copies a binary into the bundle without its debug information (the bundle travels).
fn place(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    run(Command::new("strip").arg(to))
}

/// What runs on the GPU host, from the bundle's folder.
const RUN_SH: &str = r#"#!/bin/sh
# ferry on a GPU host: CUDA tests, then GPU benchmarks. Logs under $OUT (or ./gpu-out).
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-gpu-out}
mkdir -p "$out"
failed=0
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    echo "RDMA devices:"; ibv_devices 2>&1 || echo "(no ibv_devices)"
    "$here/ferry" info 2>&1
} > "$out/host.txt"
for t in mem-cuda-tests engine-cuda-tests; do
    if ! "$here/$t" --include-ignored --test-threads 1 > "$out/$t.txt" 2>&1; then
        failed=1
    fi
    tail -n 3 "$out/$t.txt"
done
"$here/staging_bench" 0 256 > "$out/staging.txt" 2>&1 || failed=1
cat "$out/staging.txt"
# A round is one run per location, interleaved so drift hits both alike.
"$here/ferry" bench --location cuda:0 --block-size 1M --batch-size 128 --duration 2 --verify > "$out/verify.txt" 2>&1 || failed=1
for round in 1 2 3; do
    for loc in cpu cuda:0; do
        for op in write read; do
            printf '%s %s %s ' "$round" "$loc" "$op"
            "$here/ferry" bench --location "$loc" --operation "$op" --block-size 1M --batch-size 128 --duration 3 --json 2>>"$out/bench.err" || { failed=1; echo; }
        done
    done
done > "$out/bench.txt"
cat "$out/bench.txt"
exit $failed
"#;
