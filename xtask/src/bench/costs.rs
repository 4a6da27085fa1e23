//! `cargo xtask bench --costs`: what each side spends per MiB moved, for ferry's TCP
//! WRITE and READ at 1 MiB (with 128 MiB and with 8 MiB in flight) and for
//! `iperf3 -l 1M`, side by side. Timings drift on
//! shared machines; these counts do not (much), so the README keeps them per release:
//!
//! - syscalls, context switches and CPU milliseconds per MiB, from `perf stat`'s
//!   software events (`raw_syscalls:sys_enter`, `context-switches`, `task-clock`);
//! - user-space instructions per MiB, from `perf stat -e instructions` where the machine
//!   has hardware counters, else from `valgrind --tool=callgrind`. Either way they are
//!   the difference between a short and a long run divided by the difference in bytes,
//!   so start-up and warm-up cancel out.
//!
//! ferry runs with `--busy-poll-us 0` here: a spinning wait executes instructions for
//! as long as it waits, which would make the count depend on timing.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::tcp::flags;
use crate::sh::{apt_install, have};

/// The two processes of one run: (initiator or client, target or server).
type Sides<T> = (T, T);

/// One side's counts over a run.
#[derive(Clone, Copy, Default, Debug)]
struct Counts {
    syscalls: f64,
    switches: f64,
    cpu_ms: f64,
    instructions: f64,
}

/// What a subject is: ferry with an operation, or iperf3.
#[derive(Clone, Copy)]
enum Subject {
    /// Operation, block size, requests per batch, further `ferry bench` flags.
    Ferry(
        &'static str,
        &'static str,
        &'static str,
        &'static [&'static str],
    ),
    Iperf,
}

/// How a process is watched.
#[derive(Clone, Copy, PartialEq)]
enum Probe {
    /// `perf stat` with the software events (and `instructions` when `hw`).
    Perf { hw: bool },
    /// `valgrind --tool=callgrind`: instructions only.
    Callgrind,
}

const SOFTWARE: &str = "raw_syscalls:sys_enter,context-switches,task-clock";

/// Wraps `program args` in `probe`, writing its report to `out`.
fn probed(probe: Probe, out: &Path, program: &Path, args: &[&str]) -> Command {
    let mut c = match probe {
        Probe::Perf { hw } => {
            let mut c = Command::new("perf");
            let events = if hw {
                format!("{SOFTWARE},instructions:u")
            } else {
                SOFTWARE.to_string()
            };
            c.args(["stat", "-x,", "-e", &events, "-o"])
                .arg(out)
                .arg("--");
            c
        }
        Probe::Callgrind => {
            let mut c = Command::new("valgrind");
            c.args(["--tool=callgrind", "-q"])
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg("--");
            c
        }
    };
    c.arg(program).args(args);
    c
}

/// Reads a probe's report.
fn read_counts(probe: Probe, path: &Path) -> Result<Counts> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut c = Counts::default();
    match probe {
        Probe::Perf { .. } => {
            for line in text.lines() {
                let f: Vec<&str> = line.split(',').collect();
                if f.len() < 3 {
                    continue;
                }
                let Ok(v) = f[0].parse::<f64>() else { continue };
                match f[2] {
                    "raw_syscalls:sys_enter" => c.syscalls = v,
                    "context-switches" => c.switches = v,
                    "task-clock" => c.cpu_ms = v,
                    e if e.starts_with("instructions") => c.instructions = v,
                    _ => {}
                }
            }
        }
        Probe::Callgrind => {
            let total = text
                .lines()
                .find_map(|l| {
                    l.strip_prefix("summary:")
                        .or_else(|| l.strip_prefix("totals:"))
                })
                .context("no totals in the callgrind output")?;
            c.instructions = total.split_whitespace().next().unwrap_or("0").parse()?;
        }
    }
    Ok(c)
}

/// Runs `subject` for `seconds` under `probe`: the counts of both sides and the bytes
/// moved.
fn measure(
    ferry: &Path,
    subject: Subject,
    probe: Probe,
    seconds: &str,
    dir: &Path,
) -> Result<(Sides<Counts>, f64)> {
    let (near_out, far_out) = (dir.join("near"), dir.join("far"));
    let _ = std::fs::remove_file(&near_out);
    let _ = std::fs::remove_file(&far_out);
    let bytes = match subject {
        Subject::Ferry(op, block, batch, extra) => {
            let mut target = probed(
                probe,
                &far_out,
                ferry,
                &[
                    "target",
                    "--listen",
                    "127.0.0.1:0",
                    "--exit-on-stdin-eof",
                    "--busy-poll-us",
                    "0",
                ],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting ferry target")?;
            let result = (|| {
                let segment = first_word_after(&mut target, "segment")?;
                let mut args = vec!["initiator", "--segment", &segment];
                args.extend(flags(&("", op, block, batch, extra)));
                args.extend(["--duration", seconds, "--json"]);
                let out = probed(probe, &near_out, ferry, &args).output()?;
                if !out.status.success() {
                    bail!("ferry initiator: {}", String::from_utf8_lossy(&out.stderr));
                }
                let v: Value = serde_json::from_slice(&out.stdout)?;
                v.get("bytes").and_then(Value::as_f64).context("bytes")
            })();
            // Closing its input ends the target, and then its probe reports.
            drop(target.stdin.take());
            let _ = target.wait();
            result?
        }
        Subject::Iperf => {
            let port = "5298";
            let mut server = probed(
                probe,
                &far_out,
                Path::new("iperf3"),
                &["-s", "-1", "-p", port],
            )
            .stdout(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
            let mut bytes = None;
            for _ in 0..100 {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let out = probed(
                    probe,
                    &near_out,
                    Path::new("iperf3"),
                    &[
                        "-c",
                        "127.0.0.1",
                        "-p",
                        port,
                        "-l",
                        "1M",
                        "-t",
                        seconds,
                        "-J",
                    ],
                )
                .output()?;
                if out.status.success() {
                    let v: Value = serde_json::from_slice(&out.stdout)?;
                    bytes = v.pointer("/end/sum_received/bytes").and_then(Value::as_f64);
                    break;
                }
            }
            if bytes.is_none() {
                let _ = server.kill();
            }
            let _ = server.wait();
            bytes.context("iperf3 never connected to its server")?
        }
    };
    Ok((
        (
            read_counts(probe, &near_out)?,
            read_counts(probe, &far_out)?,
        ),
        bytes,
    ))
}

/// The word after `prefix` on the first line `child` prints.
fn first_word_after(child: &mut Child, prefix: &str) -> Result<String> {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    line.strip_prefix(prefix)
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_string)
        .with_context(|| format!("unexpected first line `{line}`"))
}

/// Whether this machine's perf counts instructions.
fn hardware_counters() -> bool {
    Command::new("perf")
        .args(["stat", "-x,", "-e", "instructions:u", "true"])
        .output()
        .is_ok_and(|o| {
            let err = String::from_utf8_lossy(&o.stderr);
            o.status.success() && !err.contains("not supported") && !err.contains("not counted")
        })
}

/// `cargo xtask bench --costs`.
pub(crate) fn bench(ferry: &Path, duration: &str) -> Result<()> {
    if !have("perf") {
        apt_install(&["linux-perf"])?;
    }
    if !have("valgrind") {
        apt_install(&["valgrind"])?;
    }
    let hw = hardware_counters();
    let dir: PathBuf = std::env::temp_dir().join(format!("ferry-costs-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let long: f64 = duration.parse().context("--duration")?;
    let short = format!("{}", (long / 3.0).max(0.5));
    // Waiters sleep (no spinning), so what is counted is the work.
    const SLEEP: &[&str] = &["--busy-poll-us", "0"];
    let subjects = [
        (
            "ferry WRITE 1 MiB x128",
            Subject::Ferry("write", "1M", "128", SLEEP),
        ),
        (
            "ferry READ 1 MiB x128",
            Subject::Ferry("read", "1M", "128", SLEEP),
        ),
        // 8 MiB in flight instead of 128: what a smaller working set saves in the copies.
        (
            "ferry WRITE 1 MiB x8",
            Subject::Ferry("write", "1M", "8", SLEEP),
        ),
        // The same 8 MiB in 64 KiB requests laid end to end (one slice per MiB), and the
        // same added last to first (one operation per block): what the request size
        // costs.
        (
            "ferry WRITE 64 KiB x128",
            Subject::Ferry("write", "64K", "128", SLEEP),
        ),
        (
            "ferry WRITE 64 KiB desc",
            Subject::Ferry(
                "write",
                "64K",
                "128",
                &["--busy-poll-us", "0", "--descending"],
            ),
        ),
        ("iperf3 -l 1M", Subject::Iperf),
    ];
    println!(
        "per MiB moved, each side (1 MiB = 2^20 bytes); instructions are user space only, from {}",
        if hw { "perf stat" } else { "callgrind" }
    );
    println!(
        "{:<24} {:<10} {:>10} {:>10} {:>8} {:>14}",
        "subject", "side", "syscalls", "switches", "CPU ms", "instructions"
    );
    for (label, subject) in subjects {
        let (sides, bytes) = measure(ferry, subject, Probe::Perf { hw }, duration, &dir)?;
        let mib = bytes / f64::from(1 << 20);
        // Instructions: long run minus short run, so set-up and warm-up cancel.
        let per_mib_instr = |probe: Probe| -> Result<Sides<f64>> {
            let (a, ab) = measure(ferry, subject, probe, &short, &dir)?;
            let (b, bb) = measure(ferry, subject, probe, duration, &dir)?;
            let d = (bb - ab) / f64::from(1 << 20);
            if d <= 0.0 {
                bail!("{label}: the long run moved no more than the short one");
            }
            Ok((
                (b.0.instructions - a.0.instructions) / d,
                (b.1.instructions - a.1.instructions) / d,
            ))
        };
        let instr = if hw {
            per_mib_instr(Probe::Perf { hw })?
        } else {
            per_mib_instr(Probe::Callgrind)?
        };
        let names = match subject {
            Subject::Ferry(..) => ("initiator", "target"),
            Subject::Iperf => ("client", "server"),
        };
        for (name, c, i) in [(names.0, sides.0, instr.0), (names.1, sides.1, instr.1)] {
            println!(
                "{:<24} {:<10} {:>10.1} {:>10.2} {:>8.3} {:>14.0}",
                label,
                name,
                c.syscalls / mib,
                c.switches / mib,
                c.cpu_ms / mib,
                i
            );
        }
        std::io::stdout().flush()?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
