//! Faults on a real network path. Loopback never loses a packet; a veth pair to a network
//! namespace can. Each test builds its own namespace and pair, runs `ferry target` inside
//! it, and breaks the path with `tc` (drop everything, or a `tbf` rate limit) or by killing
//! the target, then checks that every task ends by its deadline, that nothing stays held,
//! and that the same engine works again once the path is back.
//!
//! These tests need root and iproute2 (`ip`, `tc`). Where a namespace cannot be created
//! they print a line starting with `skipped:` and the reason, and return.
//!
//! Addresses: only 10.213.X.1/30 (root side) and 10.213.X.2/30 (namespace side), X claimed
//! per test so parallel tests never share a subnet, plus 127.0.0.1.

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{random, Target, FERRY};
use ferry_engine::{
    Access, Batch, Buffer, Engine, Error, Location, RemoteBuffer, TaskStatus, Tcp, TcpConfig,
};

const MIB: usize = 1 << 20;

fn initiator() -> Engine {
    Engine::builder()
        .transport(Tcp::new(TcpConfig::default()))
        .build()
        .unwrap()
}

/// Runs a command; `Err` carries its stderr (or why it could not start).
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn stdout_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Namespaces and root-side veths are named `fnf<pid><tag>...`. Removes those whose
/// process is gone (a run killed before its guards ran), so they cannot pile up.
fn remove_stale() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix("fnf") else {
            return false;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    };
    for line in stdout_of("ip", &["netns", "list"]).lines() {
        if let Some(ns) = line.split_whitespace().next().filter(|n| dead(n)) {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
    for line in stdout_of("ip", &["-o", "link", "show"]).lines() {
        // `7: fnf123ah@if6: <...`
        let name = line.split(':').nth(1).map(str::trim).unwrap_or("");
        let name = name.split('@').next().unwrap_or("");
        if dead(name) {
            let _ = run("ip", &["link", "del", name]);
        }
    }
}

/// A namespace joined to the root namespace by a veth pair, with a /30 on it. Dropping it
/// deletes the pair and the namespace, also when the test panics.
struct NetNs {
    ns: String,
    host_if: String,
    ns_if: String,
    host_ip: String,
    ns_ip: String,
    /// Holds the subnet: an abstract socket is released by the kernel however the
    /// process ends, so a crashed run never leaves a subnet claimed.
    _claim: UnixListener,
}

impl NetNs {
    /// Creates the namespace, or says why it cannot be.
    fn create(tag: char) -> Result<NetNs, String> {
        if let Err(e) = run("ip", &["-V"]) {
            return Err(format!("iproute2 is not usable: {e}"));
        }
        remove_stale();
        let pid = std::process::id();
        let (x, claim) = claim_subnet(pid, tag)?;
        let ns = format!("fnf{pid}{tag}");
        run("ip", &["netns", "add", &ns])
            .map_err(|e| format!("cannot create a network namespace: {e}"))?;
        let net = NetNs {
            host_if: format!("fnf{pid}{tag}h"),
            ns_if: format!("fnf{pid}{tag}n"),
            host_ip: format!("10.213.{x}.1"),
            ns_ip: format!("10.213.{x}.2"),
            ns,
            _claim: claim,
        };
        // From here on `net` is dropped (and cleaned) on any error.
        let (h, n, ns) = (net.host_if.clone(), net.ns_if.clone(), net.ns.clone());
        let steps: [&[&str]; 7] = [
            &["link", "add", &h, "type", "veth", "peer", "name", &n],
            &["link", "set", &n, "netns", &ns],
            &["addr", "add", &format!("{}/30", net.host_ip), "dev", &h],
            &["link", "set", &h, "up"],
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/30", net.ns_ip),
                "dev",
                &n,
            ],
            &["-n", &ns, "link", "set", &n, "up"],
            &["-n", &ns, "link", "set", "lo", "up"],
        ];
        for step in steps {
            run("ip", step).map_err(|e| format!("cannot set up the veth pair: {e}"))?;
        }
        // Both ends up: the namespace side answers only once its carrier is on.
        net.wait_carrier()?;
        Ok(net)
    }

    fn wait_carrier(&self) -> Result<(), String> {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let up = |ns: Option<&str>, dev: &str| {
                let mut args = vec![];
                if let Some(ns) = ns {
                    args.extend(["-n", ns]);
                }
                args.extend(["-o", "link", "show", dev]);
                stdout_of("ip", &args).contains("LOWER_UP")
            };
            if up(None, &self.host_if) && up(Some(&self.ns), &self.ns_if) {
                return Ok(());
            }
            if Instant::now() > give_up {
                return Err("the veth pair never came up".into());
            }
            std::thread::yield_now();
        }
    }

    /// Starts `ferry target` inside the namespace, listening on its address.
    fn start_target(&self, buffer_size: &str) -> Target {
        let listen = format!("{}:0", self.ns_ip);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, FERRY, "target"])
            .args(["--listen", &listen, "--buffer-size", buffer_size])
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ip netns exec ferry target starts");
        // `ip netns exec` execs the target, so the child's pid is the target's.
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let name = line
            .strip_prefix("segment ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line from ferry target: {line:?}"))
            .to_string();
        assert!(
            name.starts_with(&format!("{}:", self.ns_ip)),
            "the target serves {name}, not the namespace's address"
        );
        Target { child, name }
    }

    /// `tc qdisc replace ... root QDISC` on both ends, so both directions are affected.
    fn set_qdisc(&self, qdisc: &[&str]) -> Result<(), String> {
        let mut host = vec!["qdisc", "replace", "dev", &self.host_if, "root"];
        host.extend(qdisc);
        run("tc", &host)?;
        let mut inside = vec![
            "-n",
            &self.ns,
            "qdisc",
            "replace",
            "dev",
            &self.ns_if,
            "root",
        ];
        inside.extend(qdisc);
        run("tc", &inside)
    }

    /// Limits both directions to `rate` with a token bucket.
    fn limit_rate(&self, rate: &str) -> Result<(), String> {
        self.set_qdisc(&["tbf", "rate", rate, "burst", "64kb", "latency", "500ms"])
    }

    /// Drops every packet in both directions while the links stay up, as a dead switch
    /// would: a FIFO that holds nothing. Where that qdisc is missing, the links go down.
    /// Returns whether the FIFO is used (its drop counters then show the hole at work).
    fn black_hole(&self) -> bool {
        if self.set_qdisc(&["pfifo", "limit", "0"]).is_ok() {
            return true;
        }
        run("ip", &["link", "set", &self.host_if, "down"]).unwrap();
        run("ip", &["-n", &self.ns, "link", "set", &self.ns_if, "down"]).unwrap();
        false
    }

    /// Packets the root qdiscs of both ends dropped.
    fn dropped(&self) -> u64 {
        let count = |args: &[&str]| -> u64 {
            let text = stdout_of("tc", args);
            text.split("dropped ")
                .skip(1)
                .filter_map(|r| {
                    r.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .sum()
        };
        count(&["-s", "qdisc", "show", "dev", &self.host_if])
            + count(&["-n", &self.ns, "-s", "qdisc", "show", "dev", &self.ns_if])
    }

    /// Undoes [`Self::black_hole`] and [`Self::limit_rate`].
    fn restore(&self) {
        let _ = run("tc", &["qdisc", "del", "dev", &self.host_if, "root"]);
        let _ = run(
            "tc",
            &["-n", &self.ns, "qdisc", "del", "dev", &self.ns_if, "root"],
        );
        run("ip", &["link", "set", &self.host_if, "up"]).unwrap();
        run("ip", &["-n", &self.ns, "link", "set", &self.ns_if, "up"]).unwrap();
        self.wait_carrier().unwrap();
    }

    /// Commands that undo this namespace, for a watchdog that aborts the process.
    fn cleanup_commands(&self) -> Vec<Vec<String>> {
        vec![
            vec![
                "ip".into(),
                "link".into(),
                "del".into(),
                self.host_if.clone(),
            ],
            vec!["ip".into(), "netns".into(), "del".into(), self.ns.clone()],
        ]
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end deletes the pair.
        let _ = run("ip", &["link", "del", &self.host_if]);
        let _ = run("ip", &["netns", "del", &self.ns]);
    }
}

/// Picks X for 10.213.X.0/30: not held by another test (an abstract socket per subnet is
/// the lock) and not on any interface of the root namespace.
fn claim_subnet(pid: u32, tag: char) -> Result<(u8, UnixListener), String> {
    let start = (pid as usize * 7 + tag as usize) % 250;
    for i in 0..250 {
        let x = 1 + (start + i) % 250;
        let name = format!("ferry-netns-faults-10.213.{x}");
        let Ok(addr) = SocketAddr::from_abstract_name(name.as_bytes()) else {
            continue;
        };
        let Ok(claim) = UnixListener::bind_addr(&addr) else {
            continue;
        };
        let prefix = format!("10.213.{x}.0/30");
        if stdout_of("ip", &["-o", "-4", "addr", "show", "to", &prefix])
            .trim()
            .is_empty()
        {
            return Ok((x as u8, claim));
        }
    }
    Err("no free subnet in 10.213.0.0/16".into())
}

/// Creates a namespace for a test, or prints why not (`None`: skip the test).
fn netns_or_skip(tag: char) -> Option<NetNs> {
    match NetNs::create(tag) {
        Ok(n) => Some(n),
        Err(reason) => {
            println!("skipped: {reason}");
            None
        }
    }
}

/// Aborts the process when it is not dropped within `limit`: a hung initiator becomes a
/// failure with a message instead of a stuck test. Before aborting it undoes what the
/// test set up (an abort runs no destructor) and kills the given processes.
struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(limit: Duration, what: &str, cleanup: Vec<Vec<String>>, kill: Vec<u32>) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let what = what.to_string();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "watchdog: {what} still running after {limit:?}: the initiator hangs; aborting"
                );
                for pid in kill {
                    let _ = run("kill", &["-KILL", &pid.to_string()]);
                }
                for c in cleanup {
                    let args: Vec<&str> = c[1..].iter().map(String::as_str).collect();
                    let _ = run(&c[0], &args);
                }
                std::process::abort();
            }
        });
        Watchdog {
            done: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `f` on another thread and fails the test when it has not returned by `limit`
/// (the thread is left behind; the namespace guard still runs).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not return within {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// Waits until `p` holds for the batch's progress, or fails.
fn wait_progress(
    batch: &Batch,
    limit: Duration,
    what: &str,
    p: impl Fn(&ferry_engine::Progress) -> bool,
) {
    let give_up = Instant::now() + limit;
    loop {
        let now = batch.poll();
        if p(&now) {
            return;
        }
        assert!(Instant::now() < give_up, "{what}: never happened ({now:?})");
        // A short, bounded wait on the batch itself rather than a sleep.
        let _ = batch.wait(Duration::from_millis(5));
    }
}

/// WRITEs random bytes to `remote` at each offset, READs them back into a fresh buffer
/// and compares byte for byte. Each batch gets `deadline`.
fn write_read_check(
    e: &Engine,
    remote: &RemoteBuffer,
    offsets: &[u64],
    len: usize,
    deadline: Duration,
) {
    let src = e.allocate(len * offsets.len(), Location::host()).unwrap();
    let back = e.allocate(len * offsets.len(), Location::host()).unwrap();
    let data = random(len * offsets.len());
    src.write_at(0, &data).unwrap();
    let mut b = e.batch().timeout(deadline);
    for (i, &off) in offsets.iter().enumerate() {
        b.write(&src, i * len, remote, off, len).unwrap();
    }
    let batch = b.submit().unwrap();
    let r = batch.wait(deadline + Duration::from_secs(5));
    assert!(r.is_ok(), "WRITE: {r:?} {:?}", batch.statuses());
    let mut b = e.batch().timeout(deadline);
    for (i, &off) in offsets.iter().enumerate() {
        b.read(&back, i * len, remote, off, len).unwrap();
    }
    let batch = b.submit().unwrap();
    let r = batch.wait(deadline + Duration::from_secs(5));
    assert!(r.is_ok(), "READ: {r:?} {:?}", batch.statuses());
    let mut got = vec![0u8; data.len()];
    back.read_at(0, &mut got).unwrap();
    for (i, (g, d)) in got.chunks(len).zip(data.chunks(len)).enumerate() {
        assert!(
            g == d,
            "{len} bytes at remote offset {} came back changed",
            offsets[i]
        );
    }
}

fn assert_all_ended(batch: &Batch) -> (usize, usize) {
    let statuses = batch.statuses();
    let pending = statuses
        .iter()
        .filter(|s| **s == TaskStatus::Pending)
        .count();
    assert_eq!(
        pending, 0,
        "tasks still pending after wait returned: {statuses:?}"
    );
    let completed = statuses
        .iter()
        .filter(|s| **s == TaskStatus::Completed)
        .count();
    (completed, statuses.len() - completed)
}

#[test]
fn black_hole_mid_batch_ends_every_task_and_the_path_recovers() {
    let Some(net) = netns_or_skip('a') else {
        return;
    };
    let target = net.start_target("64M");
    // A connect through the hole gives up after this.
    let e = Engine::builder()
        .transport(Tcp::new(TcpConfig {
            connect_timeout: Duration::from_secs(2),
            ..TcpConfig::default()
        }))
        .build()
        .unwrap();
    let seg = e.open_segment(&target.name).unwrap();
    let remote = seg.buffer(0).unwrap();
    let local = e.allocate(64 * MIB, Location::host()).unwrap();
    local.write_at(0, &random(64 * MIB)).unwrap();

    // The path is slowed first so that the batch is certainly under way, and not yet
    // done, when the hole opens: at 50 Mbit/s each direction carries about 6 MB/s.
    if let Err(e) = net.limit_rate("50mbit") {
        println!("skipped: {e}");
        return;
    }
    // WRITEs of the first half to the remote's first half, READs of the remote's
    // second half into the local second half: both directions carry data.
    let mut b = e.batch().timeout(Duration::from_secs(3));
    for i in 0..32 {
        b.write(&local, i * MIB, &remote, (i * MIB) as u64, MIB)
            .unwrap();
        b.read(
            &local,
            (32 + i) * MIB,
            &remote,
            ((32 + i) * MIB) as u64,
            MIB,
        )
        .unwrap();
    }
    let batch = b.submit().unwrap();
    wait_progress(
        &batch,
        Duration::from_secs(20),
        "a first task completing",
        |p| p.completed > 0 || p.pending == 0,
    );
    assert!(
        batch.poll().pending > 0,
        "the batch ended before the hole opened"
    );
    let dropping = net.black_hole();

    let dog = Watchdog::start(
        Duration::from_secs(40),
        "Batch::wait across a black hole",
        net.cleanup_commands(),
        vec![target.child.id()],
    );
    let r = batch.wait(Duration::from_secs(20));
    drop(dog);
    assert!(
        matches!(r, Err(Error::TasksFailed { .. })),
        "wait across a black hole: {r:?} ({:?})",
        batch.poll()
    );
    let (_, ended_without_completing) = assert_all_ended(&batch);
    assert!(ended_without_completing > 0);
    if dropping {
        assert!(net.dropped() > 0, "the black hole dropped nothing");
    }

    // The hole stays open: the batch handle drops, and a further batch on the same
    // segment handle is accepted and ends by its own deadline too, without blocking in
    // `submit`.
    let dog = Watchdog::start(
        Duration::from_secs(40),
        "a second batch into the black hole",
        net.cleanup_commands(),
        vec![target.child.id()],
    );
    drop(batch);
    let mut b = e.batch().timeout(Duration::from_secs(1));
    for i in 0..8 {
        b.write(&local, i * MIB, &remote, (i * MIB) as u64, MIB)
            .unwrap();
        b.read(
            &local,
            (32 + i) * MIB,
            &remote,
            ((32 + i) * MIB) as u64,
            MIB,
        )
        .unwrap();
    }
    let batch = b.submit().unwrap();
    let r = batch.wait(Duration::from_secs(20));
    assert!(matches!(r, Err(Error::TasksFailed { .. })), "{r:?}");
    let (completed, _) = assert_all_ended(&batch);
    assert_eq!(completed, 0, "a task completed through the black hole");
    drop(batch);
    // Its lanes ended, so the cache must not hand the dead segment out again; opening
    // it anew fails once the connect attempt times out, instead of waiting for the path.
    let reopened = e.open_segment(&target.name);
    assert!(
        matches!(&reopened, Err(Error::OpenSegment { .. })),
        "open_segment through a black hole: {reopened:?}"
    );
    drop(dog);

    // The path returns; neither side restarts. The remote's second half was only read
    // by the failed batch, so no late WRITE of it can land on the bytes checked here.
    net.restore();
    let dog = Watchdog::start(
        Duration::from_secs(60),
        "the batch after the path returned",
        net.cleanup_commands(),
        vec![target.child.id()],
    );
    let seg = e.open_segment(&target.name).unwrap();
    let remote = seg.buffer(0).unwrap();
    let offsets: Vec<u64> = (0..8)
        .map(|i| (33 * MIB + i * 3 * MIB + i) as u64)
        .collect();
    write_read_check(&e, &remote, &offsets, MIB, Duration::from_secs(20));
    drop(dog);
}

#[test]
fn a_rate_limited_transfer_times_out_and_frees_what_it_held() {
    let Some(net) = netns_or_skip('b') else {
        return;
    };
    let target = net.start_target("64M");
    let e = initiator();
    let remote = e.open_segment(&target.name).unwrap().buffer(0).unwrap();
    if let Err(e) = net.limit_rate("1mbit") {
        println!("skipped: {e}");
        return;
    }

    // Memory the test owns, registered: dropping its Buffer waits until no transfer
    // uses it, so the drop returning is the proof that the transport let go. It is
    // leaked until then, so a transport still writing into it cannot touch freed memory.
    let len = 32 * MIB;
    let region = |e: &Engine| -> (Buffer, *mut u8) {
        let mem: &'static mut [u8] = Box::leak(random(len).into_boxed_slice());
        let ptr = mem.as_mut_ptr();
        // SAFETY: `mem` is leaked, so it stays valid for as long as the Buffer (and any
        // transfer the drop waits for); nothing else references it.
        let buf = unsafe { e.register(ptr, len, Location::host(), Access::Local) }.unwrap();
        (buf, ptr)
    };
    let (src, src_ptr) = region(&e);
    let (dst, dst_ptr) = region(&e);

    // 64 MiB at 1 Mbit/s would take nine minutes; the deadline is one second.
    let mut b = e.batch().timeout(Duration::from_secs(1));
    for i in 0..32 {
        b.write(&src, i * MIB, &remote, (i * MIB) as u64, MIB)
            .unwrap();
        b.read(&dst, i * MIB, &remote, ((32 + i) * MIB) as u64, MIB)
            .unwrap();
    }
    let batch = b.submit().unwrap();
    let dog = Watchdog::start(
        Duration::from_secs(40),
        "Batch::wait on a rate-limited path",
        net.cleanup_commands(),
        vec![target.child.id()],
    );
    let r = batch.wait(Duration::from_secs(20));
    drop(dog);
    assert!(
        matches!(r, Err(Error::TasksFailed { total: 64, .. })),
        "{r:?}"
    );
    let statuses = batch.statuses();
    assert!(
        statuses.iter().all(|s| *s == TaskStatus::TimedOut),
        "every task must end TimedOut: {statuses:?}"
    );

    // The rate limit stays in place: what the batch held must be let go now, not when
    // the queued bytes finally drain.
    within(
        Duration::from_secs(10),
        "dropping the timed-out batch",
        move || drop(batch),
    );
    within(
        Duration::from_secs(15),
        "dropping the registered local buffers",
        move || {
            drop(src);
            drop(dst);
        },
    );
    for ptr in [src_ptr, dst_ptr] {
        // SAFETY: the Buffers that registered this memory are dropped, and their drop
        // returned only once no transfer used it; it came from `Box::leak` of `len` bytes.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
    }

    net.restore();
    let dog = Watchdog::start(
        Duration::from_secs(60),
        "the batch after the limit was lifted",
        net.cleanup_commands(),
        vec![target.child.id()],
    );
    let remote = e.open_segment(&target.name).unwrap().buffer(0).unwrap();
    write_read_check(
        &e,
        &remote,
        &[5, (40 * MIB) as u64 + 3],
        64 << 10,
        Duration::from_secs(20),
    );
    drop(dog);
}

/// Rounds of checked WRITE-then-READ finished by each peer thread, and whether one of
/// them failed.
#[derive(Default)]
struct Rounds {
    done: Mutex<([u64; 2], bool)>,
    changed: Condvar,
}

impl Rounds {
    fn add(&self, who: usize) {
        self.done.lock().unwrap().0[who] += 1;
        self.changed.notify_all();
    }

    fn get(&self) -> [u64; 2] {
        self.done.lock().unwrap().0
    }

    /// Waits until every thread has done at least `at_least[i]` rounds; fails at once
    /// when a thread's round failed.
    fn wait_for(&self, at_least: [u64; 2], limit: Duration, what: &str) {
        let give_up = Instant::now() + limit;
        let mut done = self.done.lock().unwrap();
        while done.0.iter().zip(at_least).any(|(d, a)| *d < a) {
            assert!(
                !done.1,
                "{what}: a bystander round failed (its panic is above)"
            );
            let left = give_up.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{what}: rounds {:?}, wanted {at_least:?}",
                done.0
            );
            done = self.changed.wait_timeout(done, left).unwrap().0;
        }
    }
}

/// Marks the rounds failed when the thread holding it unwinds.
struct FailOnPanic(Arc<Rounds>);

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.done.lock().unwrap().1 = true;
            self.0.changed.notify_all();
        }
    }
}

/// Tells the peer threads to stop when the test ends, also by a panic.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[test]
fn killing_a_target_mid_batch_leaves_a_third_peer_unaffected() {
    let Some(net) = netns_or_skip('c') else {
        return;
    };
    let victim = net.start_target("64M");
    let bystander = Target::start(&["--listen", "127.0.0.1:0", "--buffer-size", "16M"]);
    let e = Arc::new(initiator());
    let other = Arc::new(initiator());
    let seg = e.open_segment(&victim.name).unwrap();
    let remote = seg.buffer(0).unwrap();
    let local = e.allocate(64 * MIB, Location::host()).unwrap();
    local.write_at(0, &random(64 * MIB)).unwrap();

    // Two threads keep the bystander busy with checked rounds: one on the same engine
    // as the doomed batch, one on an engine of its own.
    let rounds = Arc::new(Rounds::default());
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_exit = StopOnDrop(stop.clone());
    let peers: Vec<_> = [e.clone(), other.clone()]
        .into_iter()
        .enumerate()
        .map(|(who, engine)| {
            let (rounds, stop, name) = (rounds.clone(), stop.clone(), bystander.name.clone());
            std::thread::spawn(move || {
                let _fail = FailOnPanic(rounds.clone());
                let remote = engine.open_segment(&name).unwrap().buffer(0).unwrap();
                let base = (who * 8 * MIB) as u64;
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let len = [4096, 64 << 10, 1 << 20][(n % 3) as usize] + n as usize % 7;
                    let offsets = [base + n % 13, base + 2 * MIB as u64 + n % 17];
                    write_read_check(&engine, &remote, &offsets, len, Duration::from_secs(20));
                    rounds.add(who);
                    n += 1;
                }
            })
        })
        .collect();
    rounds.wait_for(
        [1, 1],
        Duration::from_secs(30),
        "the bystander's first rounds",
    );

    // Slow the namespace path so the batch to the victim is under way when it dies.
    if let Err(err) = net.limit_rate("50mbit") {
        stop.store(true, Ordering::Release);
        for p in peers {
            p.join().unwrap();
        }
        println!("skipped: {err}");
        return;
    }
    // 64 MiB at 50 Mbit/s needs more than the deadline: the batch cannot end before
    // the kill, and must end (Failed or TimedOut) by its deadline after it.
    let mut b = e.batch().timeout(Duration::from_secs(10));
    for i in 0..32 {
        b.write(&local, i * MIB, &remote, (i * MIB) as u64, MIB)
            .unwrap();
        b.read(
            &local,
            (32 + i) * MIB,
            &remote,
            ((32 + i) * MIB) as u64,
            MIB,
        )
        .unwrap();
    }
    let batch = b.submit().unwrap();
    let at_submit = rounds.get();
    // The bystander is served while the batch to the victim is under way.
    rounds.wait_for(
        [at_submit[0] + 1, at_submit[1] + 1],
        Duration::from_secs(30),
        "the bystander's rounds during the batch",
    );
    wait_progress(
        &batch,
        Duration::from_secs(20),
        "a first task completing",
        |p| p.completed > 0 || p.pending == 0,
    );
    assert!(batch.poll().pending > 0, "the batch ended before the kill");
    let mut victim = victim;
    victim.child.kill().unwrap(); // SIGKILL
    victim.child.wait().unwrap();
    let at_kill = rounds.get();

    let dog = Watchdog::start(
        Duration::from_secs(40),
        "Batch::wait on a killed target",
        net.cleanup_commands(),
        vec![bystander.child.id()],
    );
    let r = batch.wait(Duration::from_secs(20));
    drop(dog);
    assert!(matches!(r, Err(Error::TasksFailed { .. })), "{r:?}");
    let (_, ended_without_completing) = assert_all_ended(&batch);
    assert!(ended_without_completing > 0);
    drop(batch);

    // The bystander went on throughout: rounds kept finishing after the kill, each
    // checked byte for byte (a failed or changed round panics its thread).
    rounds.wait_for(
        [at_kill[0] + 3, at_kill[1] + 3],
        Duration::from_secs(60),
        "the bystander's rounds after the kill",
    );
    stop.store(true, Ordering::Release);
    for p in peers {
        p.join().expect("a bystander round failed");
    }
}
