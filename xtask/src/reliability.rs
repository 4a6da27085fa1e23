//! Reliability checks: the loom models of the thread hand-overs, and the stall hunt
//! (`cargo xtask stall`), which runs the README's benchmark many times in a row and
//! reports any run that outlived its window.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::sh::{cargo, root, run};

/// The loom models of `ferry_transport_api::sync` (batch waits, lane hand-off), built
/// with `--cfg loom` in a build directory of their own so the main build is not redone.
pub(crate) fn loom() -> Result<()> {
    let mut c = cargo();
    c.args([
        "test",
        "-p",
        "ferry-transport-api",
        "--release",
        "--lib",
        "sync::loom_tests",
    ])
    .env("RUSTFLAGS", "--cfg loom")
    .env("CARGO_TARGET_DIR", root().join("target/loom"));
    run(&mut c)
}

/// Benchmark shapes the stall hunt cycles through: operation, block size, batch size,
/// threads.
const SHAPES: &[(&str, &str, &str, &str)] = &[
    ("read", "4K", "1", "1"),
    ("write", "4K", "1", "1"),
    ("read", "64K", "32", "1"),
    ("write", "64K", "32", "2"),
    ("read", "1M", "32", "1"),
    ("write", "1M", "8", "2"),
    ("read", "4K", "16", "2"),
    ("write", "16K", "4", "1"),
];

/// `cargo xtask stall [--runs N] [--duration SECS]`: `ferry bench --duration SECS --json`
/// N times (default 200) over mixed shapes. A run stalls when its measured window is more
/// than a second longer than asked, or the whole process (start, warm-up, window,
/// teardown) takes more than 10 seconds beyond it, or it reports a lost wake-up.
pub(crate) fn stall(args: &[String]) -> Result<()> {
    let mut runs = 200usize;
    let mut duration = 1.0f64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs needs a number")?.parse()?,
            "--duration" => {
                duration = it.next().context("--duration needs seconds")?.parse()?;
            }
            other => bail!("cargo xtask stall: unknown flag `{other}`"),
        }
    }
    run(cargo().args(["build", "--release", "-p", "ferry-cli"]))?;
    let ferry = root().join("target/release/ferry");
    let secs = duration.to_string();
    let (mut stalls, mut worst_window, mut worst_wall, mut worst_batch) = (0, 0f64, 0f64, 0f64);
    let started = Instant::now();
    for i in 0..runs {
        let (op, block, batch, threads) = SHAPES[i % SHAPES.len()];
        let shape = format!("{op} {block} x{batch}, {threads} thread(s)");
        let t0 = Instant::now();
        let out = Command::new(&ferry)
            .args(["bench", "--operation", op, "--block-size", block])
            .args(["--batch-size", batch, "--threads", threads])
            .args(["--duration", &secs, "--json"])
            .current_dir(root())
            .stderr(Stdio::inherit())
            .output()
            .context("running ferry bench")?;
        let wall = t0.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("run {}: ferry bench {shape} failed ({})", i + 1, out.status);
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing ferry bench --json")?;
        let num = |p: &str| v.pointer(p).and_then(|x| x.as_f64()).unwrap_or(0.0);
        let window = num("/duration_s");
        let max_batch = num("/latency_us/max") / 1e6;
        let late = num("/late_wakeups");
        worst_window = worst_window.max(window);
        worst_wall = worst_wall.max(wall);
        worst_batch = worst_batch.max(max_batch);
        if window > duration + 1.0 || wall > duration + 10.0 || late > 0.0 {
            stalls += 1;
            eprintln!(
                "xtask: run {}: STALL ({shape}): window {window:.2} s, process {wall:.2} s, slowest batch {max_batch:.3} s, lost wake-ups {late}",
                i + 1
            );
        }
    }
    println!(
        "stall hunt: {runs} runs of ferry bench --duration {secs} (mixed shapes) in {:.0} s; stalls {stalls}; longest window {worst_window:.2} s; longest process {worst_wall:.2} s; slowest batch {:.1} ms",
        started.elapsed().as_secs_f64(),
        worst_batch * 1e3
    );
    if stalls > 0 {
        bail!("{stalls} of {runs} runs stalled");
    }
    Ok(())
}
