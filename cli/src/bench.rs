//! `ferry bench` and `ferry initiator`: drive batches of READs or WRITEs and report
//! throughput, latency, errors and CPU time.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_engine::{Access, Buffer, Engine, RemoteBuffer};
use rand::RngCore;
use serde::Serialize;

use crate::{size, EngineArgs};

/// Flags of a measurement run.
#[derive(Args, Clone, Debug)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// read or write.
    #[arg(long, default_value = "write")]
    operation: String,
    /// Bytes per request (K, M, G suffixes are powers of two).
    #[arg(long, default_value = "64K", value_parser = size::parse)]
    block_size: usize,
    /// Requests per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Threads submitting batches.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds to measure (after a short warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Fill sources with random bytes and check every byte at the destination.
    #[arg(long)]
    verify: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
pub(crate) struct InitiatorArgs {
    /// The target's segment: HOST:PORT.
    #[arg(long)]
    segment: String,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    /// The slowest batch of the measured window.
    max: f64,
}

#[derive(Serialize)]
struct CpuSeconds {
    initiator: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    protocol: String,
    operation: String,
    block_size: usize,
    batch_size: usize,
    threads: usize,
    lanes: usize,
    location: String,
    duration_s: f64,
    bytes: u64,
    throughput_gbps: f64,
    ops_per_sec: f64,
    /// Per batch, submit to completion, microseconds.
    latency_us: Latency,
    errors: u64,
    cpu_seconds: CpuSeconds,
    /// GB moved per CPU-second of both processes (or the initiator alone).
    gb_per_cpu_second: f64,
    verified: bool,
    /// Batch waits that slept to their deadline after their tasks had ended (always 0
    /// unless the wait protocol is broken).
    late_wakeups: u64,
}

/// Starts `ferry target` as a child on 127.0.0.1 and returns it with its segment name.
fn spawn_target(args: &RunArgs) -> Result<(Child, String)> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let e = &args.engine;
    let mut cmd = Command::new(exe);
    // The target runs the initiator's own configuration (all but the port), so a
    // setting added later reaches both sides without being copied flag by flag. The
    // secret is never serialized: it goes by file.
    let config = e.config("127.0.0.1:0")?;
    let json = serde_json::to_string(&config).context("encoding the target's configuration")?;
    cmd.args(["target", "--listen", "127.0.0.1:0", "--exit-on-stdin-eof"])
        .args(["--config-json", &json])
        .args([
            "--location",
            &e.location,
            "--buffer-size",
            &e.buffer_size.to_string(),
        ]);
    if let Some(f) = &e.secret_file {
        cmd.arg("--secret-file").arg(f);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the target process")?;
    let stdout = child.stdout.take().context("target stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the target's address")?;
    let name = line
        .strip_prefix("segment ")
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string);
    match name {
        Some(n) => Ok((child, n)),
        None => {
            let _ = child.kill();
            let status = child.wait()?;
            bail!("the target process did not start ({status}); its output: {line:?}")
        }
    }
}

pub(crate) fn run_bench(args: BenchArgs) -> Result<()> {
    let (mut child, segment) = spawn_target(&args.run)?;
    let pid = child.id();
    let result = run(&args.run, &segment, Some(pid));
    // Closing its standard input asks the target to shut down (closing its fabric
    // endpoints); one that has not exited after two seconds is killed.
    drop(child.stdin.take());
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < give_up {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

pub(crate) fn run_initiator(args: InitiatorArgs) -> Result<()> {
    run(&args.run, &args.segment, None)
}

/// CPU seconds (user + system, all threads) of a process, from `/proc/PID/stat`.
fn cpu_seconds(pid: Option<u32>) -> Result<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("parsing /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    const USER_HZ: f64 = 100.0;
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

struct Worker {
    local: Buffer,
    remote: RemoteBuffer,
    remote_base: u64,
    source: Vec<u8>,
}

fn run(args: &RunArgs, segment: &str, target_pid: Option<u32>) -> Result<()> {
    let write = match args.operation.to_ascii_lowercase().as_str() {
        "write" => true,
        "read" => false,
        other => bail!("--operation {other}: expected read or write"),
    };
    if args.block_size == 0 || args.batch_size == 0 || args.threads == 0 {
        bail!("--block-size, --batch-size and --threads must be positive");
    }
    let engine =
        Engine::from_config(&args.engine.config("127.0.0.1:0")?).context("starting the engine")?;
    let location = args.engine.location()?;
    let seg = engine
        .open_segment(segment)
        .with_context(|| format!("opening segment {segment}"))?;
    let remote = seg.buffer(0).context("the target publishes no buffer")?;
    let span = args.block_size * args.batch_size;
    let remote_len = remote.len();
    if span > remote_len {
        bail!(
            "one batch ({} x {}) does not fit the target's {} buffer; raise --buffer-size",
            args.batch_size,
            size::format(args.block_size),
            size::format(remote_len)
        );
    }
    if args.verify && span * args.threads > remote_len {
        bail!("--verify needs each thread's batch in its own part of the target's buffer: raise --buffer-size to at least {}", size::format(span * args.threads));
    }
    let mut workers = Vec::with_capacity(args.threads);
    for t in 0..args.threads {
        let local = engine
            .allocate_with(span, location, Access::Local, "")
            .context("allocating the local buffer")?;
        let remote_base = ((t * span) % (remote_len - span + 1)) as u64;
        let mut source = Vec::new();
        if args.verify {
            source = vec![0u8; span];
            rand::rng().fill_bytes(&mut source);
            if write {
                local.write_at(0, &source)?;
            } else {
                // The target's bytes are what READs fetch: put the random data there.
                let stage = engine.allocate_with(span, location, Access::Local, "")?;
                stage.write_at(0, &source)?;
                let mut b = engine.batch();
                b.write(&stage, 0, &remote, remote_base, span)?;
                b.submit()?
                    .wait(Duration::from_secs(60))
                    .context("seeding the target for --verify")?;
            }
        }
        workers.push(Worker {
            local,
            remote: remote.clone(),
            remote_base,
            source,
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(args.threads + 1));
    let engine = Arc::new(engine);
    let mut handles = Vec::new();
    for w in workers {
        let (engine, stop, moved, barrier) =
            (engine.clone(), stop.clone(), moved.clone(), barrier.clone());
        let (block, batch) = (args.block_size, args.batch_size);
        handles.push(std::thread::spawn(
            move || -> Result<(Worker, Vec<u32>, u64)> {
                // Returns the bytes the batch moved: only completed tasks count.
                let one = |lat: &mut Vec<u32>, errors: &mut u64| -> Result<u64> {
                    let start = Instant::now();
                    let mut b = engine.batch();
                    for i in 0..batch {
                        let off = i * block;
                        if write {
                            b.write(&w.local, off, &w.remote, w.remote_base + off as u64, block)?;
                        } else {
                            b.read(&w.local, off, &w.remote, w.remote_base + off as u64, block)?;
                        }
                    }
                    let handle = b.submit()?;
                    let mut completed = batch;
                    if let Err(e) = handle.wait(Duration::from_secs(60)) {
                        let p = handle.poll();
                        *errors += (p.failed + p.timed_out + p.pending) as u64;
                        completed = p.completed;
                        tracing::warn!(error = %e, "batch did not complete");
                    }
                    lat.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    Ok((block * completed) as u64)
                };
                let mut warm = Vec::new();
                let mut errors = 0;
                for _ in 0..3 {
                    one(&mut warm, &mut errors)?;
                }
                errors = 0;
                let mut lat = Vec::with_capacity(1 << 16);
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    let bytes = one(&mut lat, &mut errors)?;
                    moved.fetch_add(bytes, Ordering::Relaxed);
                }
                Ok((w, lat, errors))
            },
        ));
    }

    let progress = indicatif::ProgressBar::new_spinner();
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .expect("static template"),
    );
    barrier.wait();
    let cpu0 = (
        cpu_seconds(None)?,
        target_pid.map(|p| cpu_seconds(Some(p))).transpose()?,
    );
    let start = Instant::now();
    let duration = Duration::from_secs_f64(args.duration.max(0.1));
    let mut last = (start, 0u64);
    while start.elapsed() < duration {
        std::thread::sleep(
            Duration::from_millis(100).min(duration.saturating_sub(start.elapsed())),
        );
        let now = Instant::now();
        let bytes = moved.load(Ordering::Relaxed);
        if now.duration_since(last.0) >= Duration::from_millis(500) {
            let rate = (bytes - last.1) as f64 / now.duration_since(last.0).as_secs_f64() / 1e9;
            progress.set_message(format!(
                "{} {}: {rate:.2} GB/s",
                args.engine.protocol, args.operation
            ));
            progress.tick();
            last = (now, bytes);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut done_workers = Vec::new();
    for h in handles {
        let (w, lat, e) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))??;
        latencies.extend(lat);
        errors += e;
        done_workers.push(w);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = (
        cpu_seconds(None)?,
        target_pid.map(|p| cpu_seconds(Some(p))).transpose()?,
    );
    progress.finish_and_clear();
    let bytes = moved.load(Ordering::Relaxed);

    let verified = if args.verify {
        verify(&engine, &done_workers, write, span)?;
        true
    } else {
        false
    };

    latencies.sort_unstable();
    let pct = |q: f64| -> f64 {
        if latencies.is_empty() {
            0.0
        } else {
            latencies[((latencies.len() - 1) as f64 * q).round() as usize] as f64
        }
    };
    let cpu = CpuSeconds {
        initiator: cpu1.0 - cpu0.0,
        target: cpu1.1.zip(cpu0.1).map(|(b, a)| b - a),
    };
    let total_cpu = cpu.initiator + cpu.target.unwrap_or(0.0);
    let report = Report {
        protocol: args.engine.protocol.clone(),
        operation: args.operation.to_ascii_lowercase(),
        block_size: args.block_size,
        batch_size: args.batch_size,
        threads: args.threads,
        lanes: args.engine.lanes,
        location: args.engine.location.clone(),
        duration_s: elapsed,
        bytes,
        throughput_gbps: bytes as f64 / elapsed / 1e9,
        ops_per_sec: (bytes / args.block_size as u64) as f64 / elapsed,
        latency_us: Latency {
            p50: pct(0.5),
            p99: pct(0.99),
            max: pct(1.0),
        },
        errors,
        gb_per_cpu_second: if total_cpu > 0.0 {
            bytes as f64 / 1e9 / total_cpu
        } else {
            0.0
        },
        cpu_seconds: cpu,
        verified,
        late_wakeups: engine.batch_stats().late_wakeups,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    if errors > 0 {
        bail!("{errors} requests did not complete");
    }
    Ok(())
}

fn verify(engine: &Engine, workers: &[Worker], write: bool, span: usize) -> Result<()> {
    for (t, w) in workers.iter().enumerate() {
        let mut got = vec![0u8; span];
        if write {
            let back = engine.allocate_with(span, w.local.location(), Access::Local, "")?;
            let mut b = engine.batch();
            b.read(&back, 0, &w.remote, w.remote_base, span)?;
            b.submit()?
                .wait(Duration::from_secs(60))
                .context("reading back for --verify")?;
            back.read_at(0, &mut got)?;
        } else {
            w.local.read_at(0, &mut got)?;
        }
        if let Some(i) = got.iter().zip(&w.source).position(|(a, b)| a != b) {
            bail!(
                "--verify: thread {t}: byte {i} differs at the destination ({:#04x} != {:#04x})",
                got[i],
                w.source[i]
            );
        }
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "ferry bench: {} {}, {} blocks, batch {}, {} thread(s), {} lane(s), {} memory, {:.1} s",
        r.protocol,
        r.operation,
        size::format(r.block_size),
        r.batch_size,
        r.threads,
        r.lanes,
        r.location,
        r.duration_s
    );
    println!(
        "  throughput   {:>9.3} GB/s   {:>12.0} ops/s",
        r.throughput_gbps, r.ops_per_sec
    );
    println!(
        "  latency      p50 {:>9.1} us   p99 {:>9.1} us   (per batch)",
        r.latency_us.p50, r.latency_us.p99
    );
    println!("  errors       {}", r.errors);
    let gb = r.bytes as f64 / 1e9;
    let per_gb = |s: f64| if gb > 0.0 { s / gb } else { 0.0 };
    print!(
        "  cpu          initiator {:.2} s ({:.3} s/GB)",
        r.cpu_seconds.initiator,
        per_gb(r.cpu_seconds.initiator)
    );
    if let Some(t) = r.cpu_seconds.target {
        print!("   target {t:.2} s ({:.3} s/GB)", per_gb(t));
    }
    println!();
    println!(
        "  efficiency   {:.2} GB per CPU-second",
        r.gb_per_cpu_second
    );
    if r.verified {
        println!("  verified     every byte");
    }
}
