//! `cargo xtask bench`: `ferry bench` against `iperf3 -l 1M` on loopback, and with
//! `--efa` against the minimal libfabric RMA loop, in interleaved rounds.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::sh::{apt_install, cargo, have, root, run, BUILD_PACKAGES};

/// The loopback cases: label, operation, block size, batch size.
const CASES: &[(&str, &str, &str, &str)] = &[
    ("write 1 MiB x128", "write", "1M", "128"),
    ("read  1 MiB x128", "read", "1M", "128"),
    ("write 64 KiB x128", "write", "64K", "128"),
    ("read  64 KiB x128", "read", "64K", "128"),
    ("read  4 KiB x1", "read", "4K", "1"),
];

/// The `throughput_gbps` of a benchmark's JSON output (`ferry bench`, `rma_loop`,
/// `python -m ferry.bench` all print it).
fn throughput(out: std::process::Output, what: &str) -> Result<f64> {
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("parsing {what}"))?;
    v.get("throughput_gbps")
        .and_then(|x| x.as_f64())
        .context("no throughput_gbps")
}

/// The middle value of `xs` (the upper one of an even count).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// `cargo xtask bench [--efa] [--duration SECS] [--rounds N]`.
pub(crate) fn bench(args: &[String]) -> Result<()> {
    let mut duration = "3".to_string();
    let mut rounds = 3usize;
    let mut efa = false;
    let mut python = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--duration" => duration = it.next().context("--duration needs seconds")?.clone(),
            "--rounds" => rounds = it.next().context("--rounds needs a number")?.parse()?,
            "--efa" => efa = true,
            "--python" => python = true,
            other => bail!("cargo xtask bench: unknown flag `{other}`"),
        }
    }
    if efa {
        return bench_efa(&duration, rounds);
    }
    if python {
        return bench_python(&duration, rounds);
    }
    if !have("iperf3") {
        apt_install(&["iperf3"])?;
    }
    run(cargo().args(["build", "--release", "-p", "ferry-cli"]))?;
    let ferry = root().join("target/release/ferry");
    // results[case] = (throughput, efficiency, p50 latency) per round; iperf per round.
    let mut results: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); CASES.len()];
    let mut iperf = Vec::new();
    for round in 1..=rounds {
        eprintln!("xtask: round {round}/{rounds}");
        iperf.push(iperf3(&duration)?);
        for (i, (_, operation, block, batch)) in CASES.iter().enumerate() {
            let args = [
                "--operation",
                operation,
                "--block-size",
                block,
                "--batch-size",
                batch,
            ];
            let out = Command::new(&ferry)
                .arg("bench")
                .args(args)
                .args(["--duration", &duration, "--json"])
                .current_dir(root())
                .stderr(Stdio::inherit())
                .output()
                .context("running ferry bench")?;
            if !out.status.success() {
                bail!("ferry bench {} failed ({})", args.join(" "), out.status);
            }
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("parsing ferry bench --json")?;
            let num = |p: &str| v.pointer(p).and_then(|x| x.as_f64()).unwrap_or(0.0);
            results[i].push((
                num("/throughput_gbps"),
                num("/gb_per_cpu_second"),
                num("/latency_us/p50"),
            ));
        }
    }
    let ip_rate = median(iperf.iter().map(|x| x.0).collect());
    let ip_eff = median(iperf.iter().map(|x| x.1).collect());
    println!(
        "loopback, medians of {rounds} interleaved rounds of {duration} s (1 GB = 10^9 bytes)"
    );
    println!(
        "{:<20} {:>9} {:>10} {:>14} {:>12}",
        "case", "GB/s", "vs iperf3", "GB/CPU-second", "p50 latency"
    );
    println!(
        "{:<20} {:>9.2} {:>10} {:>14.2} {:>12}",
        "iperf3 -l 1M", ip_rate, "1.00", ip_eff, "-"
    );
    for ((label, ..), r) in CASES.iter().zip(&results) {
        let rate = median(r.iter().map(|x| x.0).collect());
        let eff = median(r.iter().map(|x| x.1).collect());
        let p50 = median(r.iter().map(|x| x.2).collect());
        println!(
            "{:<20} {:>9.2} {:>10.2} {:>14.2} {:>9.1} us",
            label,
            rate,
            rate / ip_rate,
            eff,
            p50
        );
    }
    Ok(())
}

/// `ferry bench --protocol efa` against the minimal libfabric RMA loop of
/// transport-efa, per provider and operation, 1 MiB blocks, interleaved.
fn bench_efa(duration: &str, rounds: usize) -> Result<()> {
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

/// One `iperf3 -l 1M` run on loopback: (GB/s, GB per CPU-second of both ends).
fn iperf3(duration: &str) -> Result<(f64, f64)> {
    let port = "5299";
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-p", port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let mut out = None;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let o = Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                port,
                "-l",
                "1M",
                "-t",
                duration,
                "-J",
            ])
            .output()
            .context("running iperf3 -c")?;
        if o.status.success() {
            out = Some(o);
            break;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let out = out.context("iperf3 never connected to its server")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(|x| x.as_f64())
        .context("iperf3 output")?;
    let cpu = |p: &str| v.pointer(p).and_then(|x| x.as_f64()).unwrap_or(0.0) / 100.0;
    let cores = cpu("/end/cpu_utilization_percent/host_total")
        + cpu("/end/cpu_utilization_percent/remote_total");
    let rate = bps / 8e9;
    Ok((rate, if cores > 0.0 { rate / cores } else { 0.0 }))
}

/// `python -m ferry.bench` (the Mooncake-compatible `batch_transfer_sync_write`) against
/// `ferry bench`, 64 KiB blocks in batches of 128, interleaved rounds.
fn bench_python(duration: &str, rounds: usize) -> Result<()> {
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
