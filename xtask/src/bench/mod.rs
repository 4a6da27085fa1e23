//! `cargo xtask bench`: ferry's benchmarks beside their raw baselines, interleaved in one
//! run: `ferry bench` against `iperf3` on loopback (`tcp`), the EFA transport against a
//! two-process libfabric loop (`efa`), the Mooncake-compatible Python API against
//! `ferry bench` (`python`).

mod costs;
mod efa;
mod pingpong;
mod plot;
mod python;
mod scale;
mod tcp;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::sh::root;

/// The `throughput_gbps` of a benchmark's JSON output (`ferry bench`, `fi_rma_bw`,
/// `python -m ferry.bench` all print it).
pub(crate) fn throughput(out: std::process::Output, what: &str) -> Result<f64> {
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("parsing {what}"))?;
    v.get("throughput_gbps")
        .and_then(|x| x.as_f64())
        .context("no throughput_gbps")
}

/// Runs `ferry ARGS --json` and returns its JSON report.
pub(crate) fn ferry_json(ferry: &Path, args: &[&str]) -> Result<Value> {
    let out = Command::new(ferry)
        .args(args)
        .arg("--json")
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .context("running ferry")?;
    if !out.status.success() {
        bail!("ferry {} failed ({})", args.join(" "), out.status);
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing ferry {}", args.join(" ")))
}

/// The middle value of `xs` (the upper one of an even count).
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// `cargo xtask bench [--efa | --python | --scale | --costs] [--duration SECS] [--rounds N] [--plot DIR]`:
/// with `--plot`, each family also writes its SVG charts into DIR.
pub(crate) fn bench(args: &[String]) -> Result<()> {
    let mut duration = "3".to_string();
    let mut rounds = 3usize;
    let mut fabric = false;
    let mut python = false;
    let mut scale = false;
    let mut costs = false;
    let mut plot: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--duration" => duration = it.next().context("--duration needs seconds")?.clone(),
            "--rounds" => rounds = it.next().context("--rounds needs a number")?.parse()?,
            "--efa" => fabric = true,
            "--python" => python = true,
            "--scale" => scale = true,
            "--costs" => costs = true,
            "--plot" => plot = Some(it.next().context("--plot needs a directory")?.into()),
            other => bail!("cargo xtask bench: unknown flag `{other}`"),
        }
    }
    if let Some(dir) = &plot {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let plot = plot.as_deref();
    if fabric {
        return efa::bench(&duration, rounds, plot);
    }
    if python {
        return python::bench(&duration, rounds);
    }
    if costs {
        return costs::bench(&tcp::build_ferry()?, &duration);
    }
    if scale {
        return scale::bench(&duration, rounds, plot);
    }
    tcp::bench(&duration, rounds, plot)
}

/// `xtask __pingpong-serve`: the server process of the ping-pong baseline.
pub(crate) fn pingpong_serve(args: &[String]) -> Result<()> {
    pingpong::serve(args)
}
