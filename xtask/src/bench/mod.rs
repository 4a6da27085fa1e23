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
mod stream;
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

/// Set for the copy of xtask that runs in a private network namespace (only to say so
/// in its output).
const NETNS_ENV: &str = "FERRY_BENCH_CONGESTION";
/// Where Linux keeps the congestion control new TCP sockets get (per network namespace).
const CONGESTION: &str = "/proc/sys/net/ipv4/tcp_congestion_control";
/// The congestion controls a network namespace other than the host's may choose.
const ALLOWED: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

/// `cargo xtask bench [--efa | --python | --scale | --costs] [--duration SECS] [--rounds N] [--plot DIR] [--congestion ALG]`:
/// with `--plot`, each family also writes its SVG charts into DIR; with `--congestion`,
/// the whole run happens in a private network namespace whose TCP congestion control is
/// ALG (see [`in_namespace`]).
pub(crate) fn bench(args: &[String]) -> Result<()> {
    if let Some(i) = args.iter().position(|a| a == "--congestion") {
        let alg = args
            .get(i + 1)
            .context("--congestion needs an algorithm (cubic, reno, bbr)")?;
        let mut rest = args.to_vec();
        rest.drain(i..i + 2);
        return in_namespace(alg, &rest);
    }
    let congestion = std::fs::read_to_string(CONGESTION)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    eprintln!(
        "xtask: TCP congestion control {congestion}{}",
        if std::env::var(NETNS_ENV).is_ok_and(|set| set == congestion) {
            " (private network namespace)"
        } else {
            " (this host's default)"
        }
    );
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

/// Runs `cargo xtask bench REST` again in a private network namespace (`unshare --net`)
/// whose loopback uses TCP congestion control `alg`, leaving the host's setting alone:
/// every process of the run (baselines and ferry alike) inherits it. The congestion
/// control decides loopback throughput on some machines: with `bbr` and no `fq` queueing
/// discipline, TCP paces itself with a timer per burst, which costs a virtual machine
/// dearly (on the 2-vCPU machine of the README, iperf3 moved 3.6 GB/s with `bbr` and
/// 7.5 with `cubic`), and the libfabric `tcp` provider's throughput swings by 2x from
/// run to run.
fn in_namespace(alg: &str, rest: &[String]) -> Result<()> {
    let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .context("reading the congestion controls this kernel offers")?;
    if !available.split_whitespace().any(|a| a == alg) {
        bail!(
            "--congestion {alg}: this kernel offers {} (load a module for others)",
            available.trim()
        );
    }
    // A namespace other than the host's may only pick a control the host allows; the
    // kernel refuses any other with EPERM, which would surface as a bare shell error.
    let allowed = std::fs::read_to_string(ALLOWED)
        .context("reading the congestion controls this host allows its namespaces")?;
    if !allowed.split_whitespace().any(|a| a == alg) {
        bail!(
            "--congestion {alg}: the host lets other network namespaces use only {} \
             (`sysctl -w {}=\"{} {alg}\"` adds it without changing the host's own default)",
            allowed.trim(),
            ALLOWED.trim_start_matches("/proc/sys/").replace('/', "."),
            allowed.trim(),
        );
    }
    // The namespace is set up by a shell inside it, before this program starts again
    // there: nothing in xtask itself ever writes the setting, so it cannot reach the
    // host's.
    let status = Command::new("unshare")
        .args(["--net", "--", "sh", "-c"])
        .arg(format!(
            "ip link set lo up && printf %s \"$1\" > {CONGESTION} && shift && exec \"$@\""
        ))
        .arg("sh")
        .arg(alg)
        .arg(std::env::current_exe()?)
        .arg("bench")
        .args(rest)
        .env(NETNS_ENV, alg)
        .status()
        .context("running `unshare --net` (util-linux; needs root or user namespaces)")?;
    if !status.success() {
        bail!("the benchmark in its own network namespace failed ({status})");
    }
    Ok(())
}

/// `xtask __pingpong-serve`: the server process of the ping-pong baseline.
pub(crate) fn pingpong_serve(args: &[String]) -> Result<()> {
    pingpong::serve(args)
}

/// `xtask __stream-serve`: the receiving process of the same-memory stream baseline.
pub(crate) fn stream_serve(args: &[String]) -> Result<()> {
    stream::serve(args)
}

/// Starts this binary with `args` as the server half of a two-process baseline, and
/// returns it with the loopback port it printed.
pub(crate) fn spawn_server(args: &[&str]) -> Result<(std::process::Child, u16)> {
    let mut server = Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", args[0]))?;
    let mut line = String::new();
    let read = server
        .stdout
        .as_mut()
        .context("server stdout")
        .and_then(|out| {
            std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
                .context("reading the server's port")
        });
    match read.and_then(|_| line.trim().parse::<u16>().context("the server's port")) {
        Ok(port) => Ok((server, port)),
        Err(e) => {
            let _ = server.kill();
            let _ = server.wait();
            Err(e)
        }
    }
}

/// The server half's side of [`spawn_server`]: listens on a loopback port, prints it,
/// and returns the one connection it accepts.
pub(crate) fn accept_one() -> Result<std::net::TcpStream> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    std::io::Write::flush(&mut std::io::stdout())?;
    Ok(listener.accept()?.0)
}

/// CPU seconds (user and system) of process `pid`, or of this process.
pub(crate) fn cpu_seconds(pid: Option<u32>) -> Result<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces) start after its `)`.
    let rest = stat.rsplit_once(')').map(|x| x.1).context("parsing stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // USER_HZ is 100 on Linux.
    Ok(ticks / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A congestion control the kernel does not offer is refused before any namespace
    /// is made, naming what it offers.
    #[test]
    fn an_unknown_congestion_control_is_refused_with_the_offered_ones() {
        let err = bench(&["--congestion".into(), "no-such-algorithm".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-algorithm"), "{err}");
        assert!(err.contains("reno"), "the kernel always offers reno: {err}");
        let err = bench(&["--congestion".into()]).unwrap_err().to_string();
        assert!(err.contains("needs an algorithm"), "{err}");
    }
}
