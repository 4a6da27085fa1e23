//! `cargo xtask`: the commands that check and measure ferry. It shells out to cargo, apt
//! and the benchmark binaries; nothing depends on it.
//!
//! - `cargo xtask test [--hw] [--full]`: formatting; the feature matrix (clippy with `-D
//!   warnings` for every package and feature set that must build, a failing check with
//!   its message for those that must not); docs with warnings denied; every test and doc
//!   test; the loom models of the thread hand-overs; every fuzz target for a bounded time;
//!   the downstream crate per deployment profile; the Python package, installed with pip
//!   into `target/pyvenv` and tested with pytest. `--hw` also runs the tests that
//!   need hardware (GPU, EFA, RDMA; the RDMA ones on soft-RoCE devices it makes where
//!   the host has none, see `rdma.rs`); `--full` adds `cross aarch64`.
//! - `cargo xtask cross aarch64`: the `ferry` binary and the test binaries for
//!   `aarch64-unknown-linux-gnu` with `efa` and `rdma`, and the TCP and EFA loopback
//!   tests under `qemu-user-static`.
//! - `cargo xtask bench [--duration S] [--rounds N] [--plot DIR]`: `ferry bench` against
//!   `iperf3` (throughput) and a two-process TCP ping-pong (4 KiB READ latency) on
//!   loopback, interleaved in one run, with their ratios; `--plot` adds a block-size
//!   sweep and writes SVG charts into DIR (every family below takes it too);
//!   `--congestion ALG` runs the whole benchmark in a private network namespace whose
//!   TCP congestion control is ALG (`cubic`, `reno`, `bbr`), leaving the host's alone.
//! - `cargo xtask bench --costs`: syscalls, context switches, CPU time and instructions
//!   per MiB on each side, ferry's TCP path beside iperf3's.
//! - `cargo xtask bench --efa`: `ferry bench --protocol efa` against a two-process raw
//!   libfabric RMA baseline, for the `tcp;ofi_rxm` and `shm` providers.
//! - `cargo xtask bench --scale`: 1 to 16 peers both ways (fan-out and fan-in) with each
//!   process's threads, descriptors and memory, and the memory of an idle peer and lane.
//! - `cargo xtask bench --python`: `python -m ferry.bench` (the Mooncake-compatible API)
//!   against `ferry bench`, interleaved.
//! - `cargo xtask fuzz [TARGET] [--time SECS]`: the libFuzzer targets of `fuzz/` on the
//!   stable toolchain (`cargo xtask test` runs each for a bounded time).
//! - `cargo xtask stall [--runs N] [--duration SECS]`: `ferry bench` N times (200) over
//!   mixed shapes; fails if any run outlived its window (a wait that missed its wake-up).
//! - `cargo xtask rdma-vm`: the RDMA tests, hardware ones included, over two soft-RoCE
//!   devices in a virtual machine (qemu, Debian's kernel, this host's files), for hosts
//!   whose kernel has no `rdma_rxe`; `cargo xtask test` runs it too.
//! - `cargo xtask gpu-bundle [DIR]`: the CUDA tests, the `ferry` binary and the staging
//!   benchmark, built here and stripped, with a `run.sh` that runs the tests and the GPU
//!   benchmarks on a GPU host that has no Rust toolchain.
#![forbid(unsafe_code)]

mod bench;
mod cross;
mod fuzz;
mod gpu;
mod python;
mod rdma;
mod reliability;
mod sh;
mod test;

use anyhow::{bail, Result};

const HELP: &str = "\
usage: cargo xtask test [--hw] [--full]
       cargo xtask bench [--efa | --scale | --costs | --python] [--duration SECS] [--rounds N] [--plot DIR] [--congestion ALG]
       cargo xtask cross aarch64
       cargo xtask fuzz [TARGET] [--time SECS] [--ci]
       cargo xtask stall [--runs N] [--duration SECS]
       cargo xtask gpu-bundle [DIR]
       cargo xtask rdma-vm";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = args
        .split_first()
        .map(|(t, r)| (t.as_str(), r))
        .unwrap_or(("help", &[]));
    match task {
        "test" => test::test(rest),
        "bench" => bench::bench(rest),
        "cross" => cross::cross(rest),
        "stall" => reliability::stall(rest),
        "fuzz" => fuzz::run(rest),
        "gpu-bundle" => gpu::bundle(rest),
        "rdma-vm" => match rest {
            [] => rdma::vm_step(),
            _ => bail!("usage: cargo xtask rdma-vm"),
        },
        // PID 1 of `rdma-vm`'s virtual machine (see `rdma/vm.rs`).
        "__rdma-vm-guest" => rdma::vm::guest(rest),
        // The server half of `bench`'s ping-pong baseline, started by `bench` itself.
        "__pingpong-serve" => bench::pingpong_serve(rest),
        // The receiving half of `bench`'s same-memory stream baseline.
        "__stream-serve" => bench::stream_serve(rest),
        _ => {
            eprintln!("{HELP}");
            if task == "help" || task == "--help" {
                Ok(())
            } else {
                bail!("unknown task `{task}`")
            }
        }
    }
}
