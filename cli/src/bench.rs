//! `ferry bench` and `ferry initiator`: drive batches of READs or WRITEs and report
//! throughput, latency, errors, CPU time and what each process holds (threads, file
//! descriptors, resident memory).
//!
//! `ferry bench` runs one initiator against one or more target processes (`--targets N`:
//! each batch is striped over them), or several initiator processes against one target
//! (`--initiators N`), or measures the memory of idle peers (`--idle-peers N`).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_engine::{Access, Buffer, Engine, EngineConfig, RemoteBuffer};
use rand::RngCore;
use serde::{Deserialize, Serialize};

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
    /// Add each batch's requests from its last block to its first. The blocks lie end to
    /// end on both sides, and in ascending order (the default) the engine sends each run
    /// of them as one slice per transport slice; descending, no request starts where the
    /// one added before it ended, so every block travels alone (one transport operation
    /// per block) over the same memory.
    #[arg(long)]
    descending: bool,
    /// Threads submitting batches.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Batches each thread keeps in flight: it submits the next ones before it waits for
    /// the oldest, so the path does not drain between batches. They all use the thread's
    /// same local and remote memory (the bytes walked do not grow with the depth).
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Seconds to measure (after a short warm-up): above 0, at most a day.
    #[arg(long, default_value_t = 5.0, value_parser = seconds)]
    duration: f64,
    /// Fill sources with random bytes and check every byte at the destination.
    #[arg(long)]
    verify: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Parses `--duration`: a finite number of seconds above 0 and at most a day (a
/// benchmark, not a service; and `inf` or `1e30` would not fit a `Duration`).
fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number of seconds ({e})"))?;
    if v.is_finite() && v > 0.0 && v <= 24.0 * 3600.0 {
        Ok(v)
    } else {
        Err(format!(
            "`{s}`: the measured window is above 0 and at most 86400 seconds"
        ))
    }
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Target processes to start. Each batch is striped over them (consecutive requests
    /// to consecutive targets, each batch starting where the last one stopped), as a
    /// request's KV cache fans out to the ranks that decode it: a batch completes when
    /// its slowest target has answered.
    #[arg(long, default_value_t = 1)]
    targets: usize,
    /// Initiator processes (`ferry initiator`) to start against one target, each with
    /// these flags; the report sums their throughput and takes the worst of their
    /// latencies.
    #[arg(long, default_value_t = 1)]
    initiators: usize,
    /// Measure memory instead of throughput: start N targets and report what one
    /// initiator holds per connected target, and what one target holds per connected
    /// initiator (each with `--lanes` connections), idle and after one batch.
    #[arg(long, value_name = "N", conflicts_with_all = ["targets", "initiators"])]
    idle_peers: Option<usize>,
}

#[derive(Args)]
pub(crate) struct InitiatorArgs {
    /// The target's segment: HOST:PORT.
    #[arg(long)]
    segment: String,
    #[command(flatten)]
    run: RunArgs,
    /// The whole engine configuration as JSON (`EngineConfig`), in place of the engine
    /// flags; `--secret-file` still applies on top. `ferry bench --initiators` hands its
    /// children its own configuration this way.
    #[arg(long, hide = true)]
    config_json: Option<String>,
    /// The first of the target buffer's batch-sized slots this initiator's threads use
    /// (thread t uses slot first + t, wrapping round the buffer): `ferry bench
    /// --initiators` gives each child slots of its own.
    #[arg(long, hide = true, default_value_t = 0)]
    first_slot: usize,
    /// After the warm-up, print `ready` and start the measured window when a line
    /// arrives on standard input: `ferry bench --initiators` starts its children's
    /// windows together, so that their rates add up.
    #[arg(long, hide = true)]
    start_on_stdin: bool,
}

/// What a process holds, from `/proc`: the most seen while the benchmark ran.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct Usage {
    /// `initiator` or `target`.
    role: String,
    pid: u32,
    threads: u64,
    /// Open file descriptors (sockets, epoll instances, event fds, ...).
    fds: u64,
    /// Resident memory (`VmRSS`), KiB.
    rss_kib: u64,
}

impl Usage {
    /// Reads `/proc/PID/status` and `/proc/PID/fd` (this process's when `pid` is `None`).
    fn of(role: &str, pid: Option<u32>) -> Result<Usage> {
        let dir = match pid {
            Some(p) => format!("/proc/{p}"),
            None => "/proc/self".to_string(),
        };
        let status = std::fs::read_to_string(format!("{dir}/status"))
            .with_context(|| format!("reading {dir}/status"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("{dir}/fd"))
            .with_context(|| format!("listing {dir}/fd"))?
            .count() as u64;
        Ok(Usage {
            role: role.to_string(),
            pid: pid.unwrap_or_else(std::process::id),
            threads: field("Threads:"),
            fds,
            rss_kib: field("VmRSS:"),
        })
    }

    /// Raises each figure to `now`'s where that is higher.
    fn peak(&mut self, now: &Usage) {
        self.threads = self.threads.max(now.threads);
        self.fds = self.fds.max(now.fds);
        self.rss_kib = self.rss_kib.max(now.rss_kib);
    }
}

/// Peak usage of a set of processes, sampled while a benchmark runs.
struct Watch {
    peers: Vec<(Option<u32>, Usage)>,
}

impl Watch {
    /// This process as the initiator and `targets` as targets.
    fn new(initiator: bool, targets: &[u32]) -> Watch {
        let mut peers = Vec::new();
        if initiator {
            peers.push((None, Usage::default()));
        }
        peers.extend(targets.iter().map(|&p| (Some(p), Usage::default())));
        let mut w = Watch { peers };
        for (pid, u) in &mut w.peers {
            u.role = if pid.is_some() { "target" } else { "initiator" }.into();
            u.pid = pid.unwrap_or_else(std::process::id);
        }
        w
    }

    /// Samples every process; one that cannot be read (it exited) keeps its last figures.
    fn sample(&mut self) {
        for (pid, u) in &mut self.peers {
            if let Ok(now) = Usage::of(&u.role.clone(), *pid) {
                u.peak(&now);
            }
        }
    }

    fn into_usage(self) -> Vec<Usage> {
        self.peers.into_iter().map(|(_, u)| u).collect()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    /// The slowest batch of the measured window.
    max: f64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
struct CpuSeconds {
    initiator: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
struct Report {
    protocol: String,
    operation: String,
    block_size: usize,
    batch_size: usize,
    /// Requests added from the batch's last block to its first (`--descending`).
    descending: bool,
    /// Submitting threads per initiator.
    threads: usize,
    /// Batches each thread keeps in flight.
    depth: usize,
    lanes: usize,
    /// Target processes (each batch striped over them).
    targets: usize,
    /// Initiator processes.
    initiators: usize,
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
    /// Requests that travelled in one slice with the request before them (blocks end to
    /// end), over the whole run, warm-up included.
    merged_requests: u64,
    /// Each process's peak threads, descriptors and resident memory during the run: the
    /// initiators first, then the targets.
    peers: Vec<Usage>,
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

/// Closes a target's standard input, which asks it to shut down (closing its fabric
/// endpoints); one that has not exited after two seconds is killed.
fn stop_target(mut child: Child) {
    drop(child.stdin.take());
    let give_up = Instant::now() + Duration::from_secs(2);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts `n` targets; on failure the ones already started are stopped.
fn spawn_targets(args: &RunArgs, n: usize) -> Result<(Vec<Child>, Vec<String>)> {
    let (mut children, mut names) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        match spawn_target(args) {
            Ok((child, name)) => {
                children.push(child);
                names.push(name);
            }
            Err(e) => {
                children.into_iter().for_each(stop_target);
                return Err(e);
            }
        }
    }
    Ok((children, names))
}

pub(crate) fn run_bench(args: BenchArgs) -> Result<()> {
    if args.targets == 0 || args.initiators == 0 {
        bail!("--targets and --initiators must be positive");
    }
    if args.targets > 1 && args.initiators > 1 {
        bail!("--targets and --initiators cannot both be above 1: choose fan-out or fan-in");
    }
    if let Some(n) = args.idle_peers {
        return idle_peers(&args.run, n);
    }
    if args.initiators > 1 {
        return fan_in(&args.run, args.initiators);
    }
    let (children, segments) = spawn_targets(&args.run, args.targets)?;
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let result = args
        .run
        .engine
        .config("127.0.0.1:0")
        .and_then(|config| run(&args.run, &config, &segments, &pids, Start::default()));
    children.into_iter().for_each(stop_target);
    finish(&args.run, result?)
}

pub(crate) fn run_initiator(args: InitiatorArgs) -> Result<()> {
    let config = match &args.config_json {
        Some(json) => {
            let mut config: EngineConfig =
                serde_json::from_str(json).context("reading --config-json")?;
            // Never serialized: the secret travels by file.
            config.secret = args.run.engine.secret()?;
            config
        }
        None => args.run.engine.config("127.0.0.1:0")?,
    };
    let segments = std::slice::from_ref(&args.segment);
    let start = Start {
        first_slot: args.first_slot,
        on_stdin: args.start_on_stdin,
    };
    let report = run(&args.run, &config, segments, &[], start)?;
    finish(&args.run, report)
}

/// Prints `report` (JSON or the table); an error when requests did not complete.
fn finish(args: &RunArgs, report: Report) -> Result<()> {
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    if report.errors > 0 {
        bail!("{} requests did not complete", report.errors);
    }
    Ok(())
}

/// `--initiators N`: one target, N `ferry initiator --json` children with this run's flags
/// and engine configuration. Throughput, bytes, errors and CPU time add up; each latency
/// figure is the worst initiator's (p99 is then an upper bound of the merged p99).
fn fan_in(args: &RunArgs, n: usize) -> Result<()> {
    let span = args.block_size * args.batch_size;
    if args.verify && span * args.threads * n > args.engine.buffer_size {
        bail!(
            "--verify with --initiators needs each initiator thread's batch in its own part of the target's buffer: raise --buffer-size to at least {}",
            size::format(span * args.threads * n)
        );
    }
    let (target, segment) = spawn_target(args)?;
    let result = fan_in_against(args, n, &segment, target.id());
    stop_target(target);
    finish(args, result?)
}

fn fan_in_against(args: &RunArgs, n: usize, segment: &str, target_pid: u32) -> Result<Report> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let config = args.engine.config("127.0.0.1:0")?;
    let json = serde_json::to_string(&config).context("encoding the initiators' configuration")?;
    let e = &args.engine;
    let mut children = Vec::with_capacity(n);
    for i in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "initiator",
            "--segment",
            segment,
            "--json",
            "--start-on-stdin",
        ])
        .args(["--first-slot", &(i * args.threads).to_string()])
        .args(["--config-json", &json])
        .args(["--location", &e.location])
        .args(["--buffer-size", &e.buffer_size.to_string()])
        .args(["--operation", &args.operation])
        .args(["--block-size", &args.block_size.to_string()])
        .args(["--batch-size", &args.batch_size.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .args(["--depth", &args.depth.to_string()])
        .args(["--duration", &args.duration.to_string()]);
        if let Some(f) = &e.secret_file {
            cmd.arg("--secret-file").arg(f);
        }
        if args.verify {
            cmd.arg("--verify");
        }
        if args.descending {
            cmd.arg("--descending");
        }
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                for mut c in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e).context("starting an initiator process");
            }
        }
    }
    // Each says `ready` after its warm-up; then all start their windows at once.
    let mut outputs = Vec::with_capacity(n);
    for c in &mut children {
        let mut out = BufReader::new(c.stdout.take().context("initiator stdout")?);
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        outputs.push(out);
        if line.trim() != "ready" {
            for mut c in children {
                let _ = c.kill();
                let _ = c.wait();
            }
            bail!("an initiator process did not get ready; its errors are above");
        }
    }
    for c in &mut children {
        if let Some(mut stdin) = c.stdin.take() {
            let _ = stdin.write_all(b"go\n");
        }
    }
    // The target's figures while the initiators run; theirs come in their reports.
    let mut watch = Watch::new(false, &[target_pid]);
    let target_cpu0 = cpu_seconds(Some(target_pid))?;
    while children
        .iter_mut()
        .any(|c| matches!(c.try_wait(), Ok(None)))
    {
        watch.sample();
        std::thread::sleep(Duration::from_millis(100));
    }
    let target_cpu = cpu_seconds(Some(target_pid))? - target_cpu0;
    let mut reports = Vec::with_capacity(n);
    let mut failures = Vec::new();
    for (mut c, mut out) in children.into_iter().zip(outputs) {
        let status = c.wait().context("waiting for an initiator")?;
        let mut json = String::new();
        let _ = out.read_to_string(&mut json);
        match serde_json::from_str::<Report>(&json) {
            Ok(r) => reports.push(r),
            Err(_) => failures.push(status.to_string()),
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {n} initiators reported nothing ({}); their errors are above",
            failures.len(),
            failures.join(", ")
        );
    }
    let mut total = reports[0].clone();
    total.peers.clear();
    total.initiators = n;
    let (mut bytes, mut ops, mut errors, mut cpu, mut late, mut merged) = (0, 0.0, 0, 0.0, 0, 0);
    for r in &reports {
        bytes += r.bytes;
        ops += r.ops_per_sec;
        errors += r.errors;
        cpu += r.cpu_seconds.initiator;
        late += r.late_wakeups;
        merged += r.merged_requests;
        total.duration_s = total.duration_s.max(r.duration_s);
        total.latency_us.p50 = total.latency_us.p50.max(r.latency_us.p50);
        total.latency_us.p99 = total.latency_us.p99.max(r.latency_us.p99);
        total.latency_us.max = total.latency_us.max.max(r.latency_us.max);
        total.peers.extend(r.peers.iter().cloned());
    }
    total.peers.extend(watch.into_usage());
    total.bytes = bytes;
    // Each measured its own window of the same length: the rates add up.
    total.throughput_gbps = reports.iter().map(|r| r.throughput_gbps).sum();
    total.ops_per_sec = ops;
    total.errors = errors;
    total.late_wakeups = late;
    total.merged_requests = merged;
    total.verified = reports.iter().all(|r| r.verified);
    // The target's CPU time spans the initiators' whole run, their start and warm-up
    // included (a little more than their measured windows).
    total.cpu_seconds = CpuSeconds {
        initiator: cpu,
        target: Some(target_cpu),
    };
    let all = cpu + target_cpu;
    total.gb_per_cpu_second = if all > 0.0 {
        bytes as f64 / 1e9 / all
    } else {
        0.0
    };
    Ok(total)
}

/// CPU seconds of the target processes together.
fn targets_cpu(pids: &[u32]) -> Result<Option<f64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut sum = 0.0;
    for &p in pids {
        sum += cpu_seconds(Some(p))?;
    }
    Ok(Some(sum))
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
    /// One buffer per target, each batch striped over them.
    remotes: Vec<RemoteBuffer>,
    remote_base: u64,
    /// The target the next batch's first request goes to: it moves on by the batch size
    /// after each batch, so that batches smaller than the target count reach them all.
    next_first: usize,
    /// The target the last batch's first request went to.
    last_first: usize,
    source: Vec<u8>,
}

/// `count` requests of `block` bytes striped over `remotes`: request `i` moves block `k`,
/// `local[k * block..]`, to or from `remotes[(first + i) % len]` at `base + k * block`,
/// where `k` is `i`, or `count - 1 - i` when `descending`.
struct Stripe<'a> {
    remotes: &'a [RemoteBuffer],
    first: usize,
    base: u64,
    block: usize,
    count: usize,
    descending: bool,
}

impl Stripe<'_> {
    /// Adds the requests to `b`: WRITEs from `local`, or READs into it.
    fn add(&self, b: &mut ferry_engine::BatchBuilder, write: bool, local: &Buffer) -> Result<()> {
        for i in 0..self.count {
            let k = if self.descending {
                self.count - 1 - i
            } else {
                i
            };
            let off = k * self.block;
            let remote = &self.remotes[(self.first + i) % self.remotes.len()];
            let at = self.base + off as u64;
            if write {
                b.write(local, off, remote, at, self.block)?;
            } else {
                b.read(local, off, remote, at, self.block)?;
            }
        }
        Ok(())
    }
}

/// Where and when an initiator's measurement starts.
#[derive(Clone, Copy, Default)]
struct Start {
    /// Thread t uses the batch-sized slot `first_slot + t` of the targets' buffers.
    first_slot: usize,
    /// Print `ready` after the warm-up, then wait for a line on standard input.
    on_stdin: bool,
}

/// Drives batches from `args.threads` threads, each batch striped over `segments`;
/// `target_pids` are the targets' processes when this one started them (their CPU time
/// and usage are reported).
fn run(
    args: &RunArgs,
    config: &EngineConfig,
    segments: &[String],
    target_pids: &[u32],
    start: Start,
) -> Result<Report> {
    let first_slot = start.first_slot;
    let write = match args.operation.to_ascii_lowercase().as_str() {
        "write" => true,
        "read" => false,
        other => bail!("--operation {other}: expected read or write"),
    };
    if args.block_size == 0 || args.batch_size == 0 || args.threads == 0 || args.depth == 0 {
        bail!("--block-size, --batch-size, --threads and --depth must be positive");
    }
    let engine = Engine::from_config(config).context("starting the engine")?;
    let location = args.engine.location()?;
    let mut remotes = Vec::with_capacity(segments.len());
    for segment in segments {
        let seg = engine
            .open_segment(segment)
            .with_context(|| format!("opening segment {segment}"))?;
        remotes.push(seg.buffer(0).context("the target publishes no buffer")?);
    }
    let span = args.block_size * args.batch_size;
    let remote_len = remotes.iter().map(RemoteBuffer::len).min().unwrap_or(0);
    if span > remote_len {
        bail!(
            "one batch ({} x {}) does not fit the target's {} buffer; raise --buffer-size",
            args.batch_size,
            size::format(args.block_size),
            size::format(remote_len)
        );
    }
    if args.verify && span * (first_slot + args.threads) > remote_len {
        bail!("--verify needs each thread's batch in its own part of the target's buffer: raise --buffer-size to at least {}", size::format(span * args.threads));
    }
    let mut workers = Vec::with_capacity(args.threads);
    for t in 0..args.threads {
        let local = engine
            .allocate_with(span, location, Access::Local, "")
            .context("allocating the local buffer")?;
        let remote_base = (((first_slot + t) * span) % (remote_len - span + 1)) as u64;
        let mut source = Vec::new();
        if args.verify {
            source = vec![0u8; span];
            rand::rng().fill_bytes(&mut source);
            if write {
                local.write_at(0, &source)?;
            } else {
                // The targets' bytes are what READs fetch: put the random data in each, so
                // that every stripe reads it.
                let stage = engine.allocate_with(span, location, Access::Local, "")?;
                stage.write_at(0, &source)?;
                let mut b = engine.batch();
                for remote in &remotes {
                    b.write(&stage, 0, remote, remote_base, span)?;
                }
                b.submit()?
                    .wait(Duration::from_secs(60))
                    .context("seeding the target for --verify")?;
            }
        }
        workers.push(Worker {
            local,
            remotes: remotes.clone(),
            remote_base,
            next_first: t % remotes.len(),
            last_first: 0,
            source,
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    // Every thread has warmed up at `ready`; the measured window opens at `go`.
    let ready = Arc::new(Barrier::new(args.threads + 1));
    let go = Arc::new(Barrier::new(args.threads + 1));
    let engine = Arc::new(engine);
    let mut handles = Vec::new();
    for w in workers {
        let (engine, stop, moved) = (engine.clone(), stop.clone(), moved.clone());
        let (ready, go) = (ready.clone(), go.clone());
        let (block, batch, depth) = (args.block_size, args.batch_size, args.depth);
        let descending = args.descending;
        handles.push(std::thread::spawn(
            move || -> Result<(Worker, Vec<u32>, u64)> {
                let mut w = w;
                let submit = |w: &mut Worker| -> Result<(ferry_engine::Batch, Instant)> {
                    let start = Instant::now();
                    let mut b = engine.batch();
                    let stripe = Stripe {
                        remotes: &w.remotes,
                        first: w.next_first,
                        base: w.remote_base,
                        block,
                        count: batch,
                        descending,
                    };
                    stripe.add(&mut b, write, &w.local)?;
                    w.last_first = w.next_first;
                    w.next_first = (w.next_first + batch) % w.remotes.len();
                    Ok((b.submit()?, start))
                };
                // Waits for a batch; returns the bytes it moved (only completed tasks
                // count) and records its latency, submission to completion.
                let finish = |(handle, start): (ferry_engine::Batch, Instant),
                              lat: &mut Vec<u32>,
                              errors: &mut u64|
                 -> u64 {
                    let mut completed = batch;
                    if let Err(e) = handle.wait(Duration::from_secs(60)) {
                        let p = handle.poll();
                        *errors += (p.failed + p.timed_out + p.pending) as u64;
                        completed = p.completed;
                        tracing::warn!(error = %e, "batch did not complete");
                    }
                    lat.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    (block * completed) as u64
                };
                let mut inflight = std::collections::VecDeque::with_capacity(depth);
                let mut errors = 0;
                let warmed = (|| -> Result<()> {
                    let mut warm = Vec::new();
                    for _ in 0..depth + 2 {
                        if inflight.len() == depth {
                            let b = inflight.pop_front().expect("in flight");
                            finish(b, &mut warm, &mut errors);
                        }
                        inflight.push_back(submit(&mut w)?);
                    }
                    while let Some(b) = inflight.pop_front() {
                        finish(b, &mut warm, &mut errors);
                    }
                    Ok(())
                })();
                errors = 0;
                let mut lat = Vec::with_capacity(1 << 16);
                // Through both barriers even after a failed warm-up, so the main thread
                // does not wait for this one forever; the error is reported at the end.
                ready.wait();
                go.wait();
                warmed?;
                while !stop.load(Ordering::Relaxed) {
                    if inflight.len() == depth {
                        let b = inflight.pop_front().expect("in flight");
                        moved.fetch_add(finish(b, &mut lat, &mut errors), Ordering::Relaxed);
                    }
                    inflight.push_back(submit(&mut w)?);
                }
                while let Some(b) = inflight.pop_front() {
                    moved.fetch_add(finish(b, &mut lat, &mut errors), Ordering::Relaxed);
                }
                Ok((w, lat, errors))
            },
        ));
    }

    // A JSON run is read by a program (or is one of `--initiators`' children): no spinner.
    let progress = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .expect("static template"),
    );
    ready.wait();
    if start.on_stdin {
        println!("ready");
        std::io::stdout().flush()?;
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("waiting for the start signal")?;
    }
    go.wait();
    let mut watch = Watch::new(true, target_pids);
    watch.sample();
    let cpu0 = (cpu_seconds(None)?, targets_cpu(target_pids)?);
    let start = Instant::now();
    let duration = Duration::from_secs_f64(args.duration.max(0.1));
    let mut last = (start, 0u64);
    while start.elapsed() < duration {
        std::thread::sleep(
            Duration::from_millis(100).min(duration.saturating_sub(start.elapsed())),
        );
        watch.sample();
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
    watch.sample();
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
    let cpu1 = (cpu_seconds(None)?, targets_cpu(target_pids)?);
    progress.finish_and_clear();
    let bytes = moved.load(Ordering::Relaxed);

    let verified = if args.verify {
        verify(&engine, &done_workers, write, args)?;
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
        protocol: config.protocol.clone(),
        operation: args.operation.to_ascii_lowercase(),
        block_size: args.block_size,
        batch_size: args.batch_size,
        descending: args.descending,
        threads: args.threads,
        depth: args.depth,
        lanes: config.tcp.lanes,
        targets: segments.len(),
        initiators: 1,
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
        merged_requests: engine.batch_stats().merged_requests,
        peers: watch.into_usage(),
    };
    Ok(report)
}

fn verify(engine: &Engine, workers: &[Worker], write: bool, args: &RunArgs) -> Result<()> {
    let span = args.block_size * args.batch_size;
    for (t, w) in workers.iter().enumerate() {
        let mut got = vec![0u8; span];
        if write {
            let back = engine.allocate_with(span, w.local.location(), Access::Local, "")?;
            let mut b = engine.batch();
            // Where the last batch put each block (every batch wrote the same bytes).
            let stripe = Stripe {
                remotes: &w.remotes,
                first: w.last_first,
                base: w.remote_base,
                block: args.block_size,
                count: args.batch_size,
                descending: args.descending,
            };
            stripe.add(&mut b, false, &back)?;
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
    let order = if r.descending { ", descending" } else { "" };
    println!(
        "ferry bench: {} {}, {} blocks{order}, batch {}, {} thread(s), {} in flight each, {} lane(s), {} memory, {:.1} s",
        r.protocol,
        r.operation,
        size::format(r.block_size),
        r.batch_size,
        r.threads,
        r.depth,
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
    println!(
        "  merged       {} requests travelled with the one before (blocks end to end)",
        r.merged_requests
    );
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
    println!(
        "  peers        {} initiator(s), {} target(s); per process, peak:",
        r.initiators, r.targets
    );
    for u in &r.peers {
        println!(
            "    {:<9} pid {:<7} threads {:>4}   fds {:>5}   rss {:>9} KiB",
            u.role, u.pid, u.threads, u.fds, u.rss_kib
        );
    }
}

/// `--idle-peers N`: what a connected but idle peer costs. Figures of one process at
/// three moments.
#[derive(Serialize)]
struct Stages {
    /// The engine started (and the initiator's send buffer written), no peer.
    alone: Usage,
    /// N peers connected (segments opened: descriptors fetched, lanes open), nothing sent.
    connected: Usage,
    /// After one batch over each connection, idle again.
    used: Usage,
}

/// The cost of one peer: the change from `alone` divided by the number of peers.
#[derive(Serialize)]
struct PerPeer {
    connected_kib: f64,
    used_kib: f64,
    threads: f64,
    fds: f64,
}

impl Stages {
    fn per_peer(&self, n: usize) -> PerPeer {
        let d = |a: u64, b: u64| (b as f64 - a as f64) / n as f64;
        PerPeer {
            connected_kib: d(self.alone.rss_kib, self.connected.rss_kib),
            used_kib: d(self.alone.rss_kib, self.used.rss_kib),
            threads: d(self.alone.threads, self.connected.threads),
            fds: d(self.alone.fds, self.connected.fds),
        }
    }
}

#[derive(Serialize)]
struct IdleReport {
    peers: usize,
    lanes: usize,
    /// Bytes of the one batch sent over each connection.
    batch_bytes: usize,
    /// This process as an initiator with a segment open on each of N targets.
    initiator: Stages,
    /// One target with N initiators (engines of this process) connected to it.
    target: Stages,
    initiator_per_target: PerPeer,
    target_per_initiator: PerPeer,
}

/// Waits for threads the peers start on connect (the target's per-connection threads)
/// before `/proc` is read.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

/// One batch of `batch` blocks from `local` to `remote`, waited for.
fn one_batch(engine: &Engine, local: &Buffer, remote: &RemoteBuffer, args: &RunArgs) -> Result<()> {
    let mut b = engine.batch();
    let stripe = Stripe {
        remotes: std::slice::from_ref(remote),
        first: 0,
        base: 0,
        block: args.block_size,
        count: args.batch_size,
        descending: args.descending,
    };
    stripe.add(&mut b, true, local)?;
    b.submit()?
        .wait(Duration::from_secs(60))
        .context("the batch to an idle peer")?;
    Ok(())
}

fn idle_peers(args: &RunArgs, n: usize) -> Result<()> {
    if n == 0 || args.block_size == 0 || args.batch_size == 0 {
        bail!("--idle-peers, --block-size and --batch-size must be positive");
    }
    // N targets for the initiator's side, one more that N initiators connect to.
    let (children, segments) = spawn_targets(args, n + 1)?;
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let result = idle_peers_against(args, n, &segments, &pids);
    children.into_iter().for_each(stop_target);
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "ferry bench --idle-peers {n}: {} lane(s) per connection, one {} batch per connection once used",
        report.lanes,
        size::format(report.batch_bytes)
    );
    for (what, s, p) in [
        (
            "initiator, per target",
            &report.initiator,
            &report.initiator_per_target,
        ),
        (
            "target, per initiator",
            &report.target,
            &report.target_per_initiator,
        ),
    ] {
        println!(
            "  {what:<22} rss {:>8.1} KiB connected, {:>8.1} KiB used; threads {:>5.2}; fds {:>5.2}   (alone: {} KiB, {} threads, {} fds)",
            p.connected_kib, p.used_kib, p.threads, p.fds, s.alone.rss_kib, s.alone.threads, s.alone.fds
        );
    }
    Ok(())
}

fn idle_peers_against(
    args: &RunArgs,
    n: usize,
    segments: &[String],
    pids: &[u32],
) -> Result<IdleReport> {
    let config = args.engine.config("127.0.0.1:0")?;
    let location = args.engine.location()?;
    let span = args.block_size * args.batch_size;
    let start = || -> Result<(Engine, Buffer)> {
        let engine = Engine::from_config(&config).context("starting the engine")?;
        let local = engine
            .allocate_with(span, location, Access::Local, "")
            .context("allocating the local buffer")?;
        // Written once, so that the first batch does not bring its pages in.
        local.write_at(0, &vec![0x5a; span])?;
        Ok((engine, local))
    };
    let (hub_pid, hub) = (pids[n], &segments[n]);

    let (engine, local) = start()?;
    settle();
    let initiator_alone = Usage::of("initiator", None)?;
    let target_alone = Usage::of("target", Some(hub_pid))?;
    let mut remotes = Vec::with_capacity(n);
    for segment in &segments[..n] {
        let seg = engine
            .open_segment(segment)
            .with_context(|| format!("opening segment {segment}"))?;
        remotes.push(seg.buffer(0).context("the target publishes no buffer")?);
    }
    settle();
    let initiator_connected = Usage::of("initiator", None)?;
    for remote in &remotes {
        one_batch(&engine, &local, remote, args)?;
    }
    settle();
    let initiator_used = Usage::of("initiator", None)?;

    // N initiators of the one target: engines of this process (whose own figures are
    // taken above).
    let mut initiators = Vec::with_capacity(n);
    for _ in 0..n {
        let (e, l) = start()?;
        let remote = e
            .open_segment(hub)
            .with_context(|| format!("opening segment {hub}"))?
            .buffer(0)
            .context("the target publishes no buffer")?;
        initiators.push((e, l, remote));
    }
    settle();
    let target_connected = Usage::of("target", Some(hub_pid))?;
    for (e, l, remote) in &initiators {
        one_batch(e, l, remote, args)?;
    }
    settle();
    let target_used = Usage::of("target", Some(hub_pid))?;

    let initiator = Stages {
        alone: initiator_alone,
        connected: initiator_connected,
        used: initiator_used,
    };
    let target = Stages {
        alone: target_alone,
        connected: target_connected,
        used: target_used,
    };
    Ok(IdleReport {
        peers: n,
        lanes: config.tcp.lanes,
        batch_bytes: span,
        initiator_per_target: initiator.per_peer(n),
        target_per_initiator: target.per_peer(n),
        initiator,
        target,
    })
}
