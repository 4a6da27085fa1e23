//! `ferry bench` against `iperf3` on loopback, interleaved.

use std::process::{Command, Stdio};

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::median;
use crate::sh::{apt_install, cargo, have, root, run};

/// The loopback cases: label, operation, block size, batch size.
const CASES: &[(&str, &str, &str, &str)] = &[
    ("write 1 MiB x128", "write", "1M", "128"),
    ("read  1 MiB x128", "read", "1M", "128"),
    ("write 64 KiB x128", "write", "64K", "128"),
    ("read  64 KiB x128", "read", "64K", "128"),
    ("read  4 KiB x1", "read", "4K", "1"),
];

/// The TCP cases and iperf3, `rounds` interleaved rounds of `duration` seconds.
pub(crate) fn bench(duration: &str, rounds: usize, plot: Option<&Path>) -> Result<()> {
    let _ = plot;
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
        iperf.push(iperf3(duration)?);
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
                .args(["--duration", duration, "--json"])
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
