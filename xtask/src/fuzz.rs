//! `cargo xtask fuzz [TARGET] [--time SECS] [-- LIBFUZZER FLAGS]`: the coverage-guided
//! fuzz targets of `fuzz/`, built and run on the stable toolchain without cargo-fuzz.
//! `cargo xtask fuzz --ci` runs every target for about a minute in all, as `cargo xtask
//! test` does.
//!
//! cargo-fuzz needs nightly only for its sanitizers. The coverage libFuzzer steers by is
//! LLVM's SanitizerCoverage, which stable rustc enables through `-C passes` and
//! `-C llvm-args`; `libfuzzer-sys` compiles libFuzzer itself with the system C++
//! compiler. So this builds the fuzz crate with the flags cargo-fuzz passes for
//! `--sanitizer none` (into `fuzz/target`, apart from the main build) and runs each
//! target binary with libFuzzer's own flags. The committed seeds in `fuzz/corpus/TARGET`
//! are only read; what a run discovers goes to `fuzz/target/corpus/TARGET`, crashes to
//! `fuzz/target/artifacts/TARGET`, the full log to `fuzz/target/logs/TARGET.log`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::sh::{apt_install, cargo, have, render, root, run as run_cmd};

/// Every fuzz target, a binary of the fuzz crate each.
pub(crate) const TARGETS: &[&str] = &[
    "frame",
    "regions",
    "descriptor",
    "notification",
    "target_stream",
    "target_auth",
    "descriptor_reply",
    "initiator_stream",
    "rdma_exchange",
];

/// Seconds per target when none are given.
const DEFAULT_SECS: u64 = 60;
/// Seconds all targets share in `cargo xtask test`.
const CI_TOTAL_SECS: u64 = 60;
/// The least any target gets in `cargo xtask test`: loading the seeds takes a moment.
const CI_MIN_SECS: u64 = 5;

/// What cargo-fuzz gives rustc for `--sanitizer none` in release mode
/// (`project.rs`, `FuzzProject::cargo`): SanitizerCoverage with inline 8-bit counters, a
/// PC table and comparison tracing, as libFuzzer expects; no branch folding, so each
/// branch keeps its own counter; `cfg(fuzzing)`; debug assertions (overflow checks with
/// them); one codegen unit. On Linux it adds stack depth tracking ([`LINUX_RUSTFLAGS`]).
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "--cfg",
    "fuzzing",
    "-Clink-dead-code",
    "-Cdebug-assertions",
    "-Coverflow-checks",
    "-Ccodegen-units=1",
];

/// Added on Linux, as cargo-fuzz does.
const LINUX_RUSTFLAGS: &[&str] = &["-Cllvm-args=-sanitizer-coverage-stack-depth"];

/// Largest input per target, where libFuzzer's default (4096 bytes) is too small.
fn max_len(target: &str) -> Option<usize> {
    match target {
        // A few frames with payloads.
        "target_stream" | "target_auth" => Some(16 * 1024),
        // A descriptor with a few dozen buffers.
        "descriptor" => Some(16 * 1024),
        _ => None,
    }
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// The fuzz build, its corpora, crash artifacts and logs.
pub(crate) fn target_dir() -> PathBuf {
    fuzz_dir().join("target")
}

/// The host's target triple. Building with an explicit `--target` keeps the coverage
/// flags off build scripts and proc macros, which run inside the build, not the fuzzer.
fn host_triple() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .with_context(|| format!("running {rustc} -vV"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_string())
        .context("`rustc -vV` names no host triple")
}

/// Builds every fuzz target; returns the directory holding the binaries.
pub(crate) fn build() -> Result<PathBuf> {
    let triple = host_triple()?;
    let target_dir = target_dir();
    if !have("c++") {
        // libfuzzer-sys compiles libFuzzer (C++) in its build script.
        apt_install(&["g++"])?;
    }
    // `rdma_exchange` links ferry-transport-rdma: rdma-sys runs bindgen (libclang) over
    // the ibverbs and rdmacm headers and links both libraries.
    apt_install(&["libibverbs-dev", "librdmacm-dev", "libclang-dev"])?;
    let mut flags = RUSTFLAGS.join(" ");
    if triple.contains("-linux-") {
        flags.push(' ');
        flags.push_str(&LINUX_RUSTFLAGS.join(" "));
    }
    if let Ok(extra) = std::env::var("RUSTFLAGS") {
        flags.push(' ');
        flags.push_str(&extra);
    }
    let mut c = cargo();
    c.args(["build", "--release", "--bins", "--manifest-path"])
        .arg(fuzz_dir().join("Cargo.toml"))
        .args(["--target", &triple])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", flags)
        // These would override RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS");
    // Not `--locked`: a dependency added to a ferry crate must not break this build
    // until someone refreshes `fuzz/Cargo.lock`; what is pinned there stays pinned.
    run_cmd(&mut c).context("building the fuzz targets")?;
    Ok(target_dir.join(triple).join("release"))
}

/// What one run of a target reached.
struct Outcome {
    target: String,
    secs: u64,
    /// libFuzzer's last status line (`#N DONE cov: .. ft: .. corp: ..`).
    status: String,
    execs: Option<u64>,
    exec_per_sec: Option<u64>,
    /// The input that crashed it, when it crashed.
    crash: Option<String>,
    ok: bool,
}

fn stat(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(&format!("stat::{name}:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs one target for `secs` seconds over its seeds; its output goes to its log.
fn fuzz_one(bins: &Path, target: &str, secs: u64, extra: &[String]) -> Result<Outcome> {
    let bin = bins.join(target);
    if !bin.exists() {
        bail!("no fuzz target binary {}", bin.display());
    }
    let work = target_dir();
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    let logs = work.join("logs");
    for d in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let seeds = fuzz_dir().join("corpus").join(target);
    let log_path = logs.join(format!("{target}.log"));
    let mut c = Command::new(&bin);
    c.arg(format!("-max_total_time={secs}"))
        .arg("-rss_limit_mb=2048")
        .arg("-timeout=20")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()));
    if let Some(n) = max_len(target) {
        c.arg(format!("-max_len={n}"));
    }
    let dict = fuzz_dir().join("dict").join(format!("{target}.dict"));
    if dict.exists() {
        c.arg(format!("-dict={}", dict.display()));
    }
    c.args(extra);
    // New inputs go to the first directory; the committed seeds are only read.
    c.arg(&corpus);
    if seeds.is_dir() {
        c.arg(&seeds);
    }
    eprintln!("xtask: $ {}", render(&c));
    eprintln!("xtask:   (log: {})", log_path.display());
    let start = Instant::now();
    let mut child = c
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut log = Vec::new();
    let (mut status, mut execs, mut exec_per_sec, mut crash) = (String::new(), None, None, None);
    for line in BufReader::new(child.stderr.take().context("fuzzer stderr")?).lines() {
        let line = line.context("reading the fuzzer's output")?;
        if line.starts_with('#') && line.contains(" cov: ") {
            status = line.clone();
        }
        if let Some(n) = stat(&line, "number_of_executed_units") {
            execs = Some(n);
        }
        if let Some(n) = stat(&line, "average_exec_per_sec") {
            exec_per_sec = Some(n);
        }
        if let Some(p) = line.split("Test unit written to ").nth(1) {
            crash = Some(p.trim().to_string());
        }
        log.push(line);
    }
    let exit = child.wait()?;
    std::fs::write(&log_path, log.join("\n") + "\n")
        .with_context(|| format!("writing {}", log_path.display()))?;
    let ok = exit.success() && crash.is_none();
    if !ok {
        eprintln!("xtask: {target} failed ({exit}); the end of its log:");
        for line in &log[log.len().saturating_sub(60)..] {
            eprintln!("  {line}");
        }
    }
    eprintln!("xtask:   ({:.1} s)", start.elapsed().as_secs_f64());
    Ok(Outcome {
        target: target.to_string(),
        secs,
        status,
        execs,
        exec_per_sec,
        crash,
        ok,
    })
}

/// Runs `targets` for `secs` each and prints what each reached; fails if any crashed.
fn fuzz(targets: &[&str], secs: u64, extra: &[String]) -> Result<()> {
    let bins = build()?;
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(fuzz_one(&bins, target, secs, extra)?);
    }
    println!(
        "{:<16} {:>6} {:>12} {:>8}  libFuzzer's last status",
        "target", "secs", "executions", "exec/s"
    );
    let show = |n: Option<u64>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
    for o in &outcomes {
        println!(
            "{:<16} {:>6} {:>12} {:>8}  {}",
            o.target,
            o.secs,
            show(o.execs),
            show(o.exec_per_sec),
            o.status.trim()
        );
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    for o in &failed {
        match &o.crash {
            Some(path) => eprintln!(
                "xtask: fuzz target `{}` crashed on {path}\n       replay it with: {} {path}",
                o.target,
                bins.join(&o.target).display()
            ),
            None => eprintln!(
                "xtask: fuzz target `{}` failed without writing an input; see its log",
                o.target
            ),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} fuzz targets failed; add each crashing input as a regression test",
            failed.len(),
            outcomes.len()
        );
    }
    Ok(())
}

/// `cargo xtask fuzz [TARGET] [--time SECS] [-- LIBFUZZER FLAGS]`: one target, or every
/// target one after the other, for `SECS` seconds each (default 60).
pub(crate) fn run(args: &[String]) -> Result<()> {
    let usage = || {
        format!(
            "usage: cargo xtask fuzz [TARGET] [--time SECS] [-- LIBFUZZER FLAGS]\n       \
             cargo xtask fuzz --ci   (every target, about a minute in all)\n\
             targets: {}",
            TARGETS.join(", ")
        )
    };
    let (ours, extra) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let mut secs = DEFAULT_SECS;
    let mut chosen: Option<&str> = None;
    let mut it = ours.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => {
                let v = it.next().with_context(usage)?;
                secs = v
                    .parse()
                    .with_context(|| format!("--time takes whole seconds, not `{v}`"))?;
            }
            "--ci" => return ci(),
            "-h" | "--help" => {
                eprintln!("{}", usage());
                return Ok(());
            }
            t if chosen.is_none() && TARGETS.contains(&t) => chosen = Some(t),
            other => bail!("cargo xtask fuzz: unexpected `{other}`\n{}", usage()),
        }
    }
    if secs == 0 {
        bail!("--time must be at least one second");
    }
    match chosen {
        Some(t) => fuzz(&[t], secs, extra),
        None => fuzz(TARGETS, secs, extra),
    }
}

/// Every target for a bounded time, about a minute in all: the fuzzing step of
/// `cargo xtask test`.
pub(crate) fn ci() -> Result<()> {
    let each = (CI_TOTAL_SECS / TARGETS.len() as u64).max(CI_MIN_SECS);
    fuzz(TARGETS, each, &[])
}
