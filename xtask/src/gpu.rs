//! `cargo xtask gpu-bundle [DIR]`: everything a GPU host needs to run the CUDA tests and
//! the GPU benchmarks without a Rust toolchain, built here.
//!
//! DIR (default `target/gpu-bundle`) receives the `ferry` binary with `cuda`, the
//! staging benchmark, the CUDA test binaries (the engine's `cuda` suite and
//! `ferry-mem-cuda`'s unit tests), all stripped, the Python wheel with `cuda`, and
//! `run.sh`, which runs on the GPU host: the tests with the hardware ones included; the
//! Python package's tests (PyTorch CUDA tensors among them) in the interpreter that has
//! PyTorch; the staging copy rate against the device's; `ferry bench --location cuda:0`
//! against `--location cpu`, interleaved round by round; and, where the host has RDMA
//! NICs, the RDMA tests and `ferry bench --protocol rdma` from host and GPU memory
//! (`ferry-rdma` and the `rdma-*-tests`, built apart because they link libibverbs). It
//! writes its logs under `$OUT` (or `./gpu-out`) and exits non-zero when a test failed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::sh::{apt_install, cargo, root, run, test_binaries, BUILD_PACKAGES};

/// `cargo xtask gpu-bundle [DIR]`.
pub(crate) fn bundle(args: &[String]) -> Result<()> {
    let dir = match args {
        [] => root().join("target/gpu-bundle"),
        [d] if !d.starts_with('-') => PathBuf::from(d),
        _ => bail!("usage: cargo xtask gpu-bundle [DIR]"),
    };
    // The RDMA half builds against the verbs headers (through bindgen). Before the old
    // bundle goes, so a failed install leaves it.
    apt_install(BUILD_PACKAGES)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    place_ferry("cuda", &dir.join("ferry"))?;
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
    // The RDMA side, apart: these link libibverbs, which a GPU host without RDMA may
    // lack, and must not keep the CUDA runs above from starting.
    place_ferry("cuda,rdma", &dir.join("ferry-rdma"))?;
    for (selection, name) in RDMA_TESTS {
        place(&test_binary(selection)?, &dir.join(name))?;
    }
    // The Python package with `cuda`, as a wheel the GPU host installs next to its
    // PyTorch without an index (abi3: any CPython from 3.9 on), and its tests.
    let python = crate::python::venv()?;
    run(Command::new(&python)
        .args([
            "-m",
            "maturin",
            "build",
            "--release",
            "--strip",
            "--features",
            "cuda",
        ])
        .arg("--manifest-path")
        .arg(root().join("python/Cargo.toml"))
        .arg("--out")
        .arg(&dir)
        .env("CARGO_TARGET_DIR", crate::python::target_dir()))?;
    let tests = dir.join("python-tests");
    std::fs::create_dir_all(&tests)?;
    for f in std::fs::read_dir(root().join("python/tests"))? {
        let f = f?.path();
        if f.extension().is_some_and(|e| e == "py") {
            std::fs::copy(&f, tests.join(f.file_name().context("a file name")?))?;
        }
    }
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

/// The RDMA test binaries that need a device, and their names in the bundle: the
/// transport's (its fuzz regressions, which need none and read seed files from the
/// source tree, stay at home) and the engine's RDMA and exchange tests with GPU memory
/// available.
const RDMA_TESTS: &[(&[&str], &str)] = &[
    (
        &["-p", "ferry-transport-rdma", "--lib"],
        "rdma-transport-tests",
    ),
    (
        &["-p", "ferry-transport-rdma", "--test", "conformance"],
        "rdma-conformance-tests",
    ),
    (
        &["-p", "ferry-transport-rdma", "--test", "no_alloc"],
        "rdma-no-alloc-tests",
    ),
    (
        &[
            "-p",
            "ferry-engine",
            "--features",
            "cuda,rdma",
            "--test",
            "rdma",
        ],
        "rdma-engine-tests",
    ),
    (
        &[
            "-p",
            "ferry-engine",
            "--features",
            "cuda,rdma",
            "--test",
            "exchange",
        ],
        "rdma-exchange-tests",
    ),
];

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

/// Builds the `ferry` binary with `features` and places it at `to`.
fn place_ferry(features: &str, to: &Path) -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "ferry-cli",
        "--features",
        features,
    ]))?;
    place(&root().join("target/release/ferry"), to)
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
# Python: the wheel next to the interpreter that has PyTorch, then the package's tests
# (copied into the bundle), the CUDA tensor tests among them, which must run here: a
# wheel without `cuda` or a host whose PyTorch sees no GPU fails instead of skipping.
if python3 -c 'import torch' 2>/dev/null; then
    site=$(mktemp -d)
    if python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$here"/ferry-*.whl > "$out/python.txt" 2>&1 \
        && (cd "$site" && PYTHONPATH="$site" python3 -c 'import ferry, torch; assert ferry.CUDA_COMPILED, "a wheel without cuda"; assert torch.cuda.is_available(), "PyTorch sees no GPU"') >> "$out/python.txt" 2>&1; then
        (cd "$site" && PYTHONPATH="$site" FERRY_REQUIRE_CUDA=1 timeout 300 python3 -m pytest -q -p no:cacheprovider -rs "$here/python-tests") >> "$out/python.txt" 2>&1 || failed=1
    else
        failed=1
    fi
    rm -rf "$site"
    tail -n 12 "$out/python.txt"
else
    echo "python: no python3 with torch: skipped" | tee "$out/python.txt"
fi
# RDMA: this host's NICs with a port up, if any, and the verbs library (soft-RoCE runs
# in `cargo xtask test`'s VM instead). Each test in its own process, as nextest runs
# them; then ferry over RDMA from host and from GPU memory (GPUDirect RDMA where the NIC
# can register GPU memory, else staged over TCP, which the line then says).
nics=""
for dev in /sys/class/infiniband/*; do
    name=${dev##*/}
    case "$name" in '*'|efa*|rxe*|ferry_rxe*) continue ;; esac
    if grep -qs ACTIVE "$dev"/ports/*/state; then nics="$nics $name"; fi
done
{
    echo "RDMA NICs with an active port:${nics:- none}"
    for port in /sys/class/infiniband/*/ports/*; do
        [ -e "$port" ] && echo "$port: $(cat "$port/state") $(cat "$port/link_layer")"
    done
    grep -s -e nvidia_peermem -e rdma_rxe -e ib_core /proc/modules || echo "(none of nvidia_peermem, rdma_rxe, ib_core listed as loaded)"
    ldd "$here/ferry-rdma" | grep "not found" || echo "ferry-rdma's libraries: all found"
} > "$out/rdma-host.txt" 2>&1
cat "$out/rdma-host.txt"
if [ -n "$nics" ] && ! ldd "$here/ferry-rdma" | grep -q "not found"; then
    for t in rdma-transport-tests rdma-conformance-tests rdma-no-alloc-tests rdma-engine-tests rdma-exchange-tests; do
        names=$("$here/$t" --list --format terse --include-ignored 2>>"$out/$t.txt" | sed -n 's/: test$//p')
        if [ -z "$names" ]; then
            failed=1
            echo "FAILED: $t lists no tests"
        fi
        for name in $names; do
            if ! timeout 120 "$here/$t" --include-ignored --exact "$name" >> "$out/$t.txt" 2>&1; then
                failed=1
                echo "FAILED: $t $name"
            fi
        done
        echo "$t: $(grep -c '^test .* ok$' "$out/$t.txt") passed"
    done
    for loc in cpu cuda:0; do
        for op in write read; do
            err="$out/rdma-bench-$(echo "$loc" | tr -d :)-$op.err"
            line=$(timeout 60 "$here/ferry-rdma" bench --protocol rdma --location "$loc" --operation "$op" --block-size 1M --batch-size 128 --duration 3 --verify --json 2>"$err") || { failed=1; line="FAILED (see $err)"; }
            if grep -qs "cannot be registered" "$err"; then
                line="$line (staged over TCP: the NIC cannot register this GPU memory)"
            fi
            echo "rdma $loc $op $line"
        done
    done > "$out/rdma-bench.txt"
    cat "$out/rdma-bench.txt"
fi
exit $failed
"#;
