//! The raw baseline for a small READ's latency: two processes on loopback, one TCP
//! connection with `TCP_NODELAY`, the client sending a request the size of ferry's READ
//! frame (header and one descriptor, 40 bytes) and the server answering with the block
//! (what a READ's answer carries), one at a time. Each round trip is timed.
//!
//! Two ways of waiting, like ferry's: blocking reads (the thread sleeps in the kernel
//! until the bytes arrive), or busy-polling a non-blocking socket on both sides.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{cpu_seconds, spawn_server};

/// The request: a frame header (16 bytes) and one descriptor (24 bytes).
const REQUEST: usize = 40;

/// Round trips timed before measuring (connection set-up, caches).
const WARM_UP: usize = 2000;

/// What one run measured: round-trip percentiles in microseconds, and CPU seconds of
/// both processes per round trip.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PingPong {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) cpu_us_per_op: f64,
}

/// Reads exactly `buf.len()` bytes, spinning on `WouldBlock` when `spin`.
fn read_exact(s: &mut TcpStream, buf: &mut [u8], spin: bool) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if spin && e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf`, spinning on `WouldBlock` when `spin`.
fn write_all(s: &mut TcpStream, buf: &[u8], spin: bool) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match s.write(&buf[at..]) {
            Ok(n) => at += n,
            Err(e) if spin && e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `xtask __pingpong-serve SIZE spin|block`: prints its port, answers one connection
/// until it closes.
pub(crate) fn serve(args: &[String]) -> Result<()> {
    let size: usize = args.first().context("size")?.parse()?;
    let spin = args.get(1).map(String::as_str) == Some("spin");
    let mut s = super::accept_one()?;
    s.set_nodelay(true)?;
    s.set_nonblocking(spin)?;
    let mut request = [0u8; REQUEST];
    let answer = vec![0x5au8; size];
    loop {
        match read_exact(&mut s, &mut request, spin) {
            Ok(()) => write_all(&mut s, &answer, spin)?,
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// One run: a server process (this binary, `__pingpong-serve`) and this process as the
/// client, for `duration` after the warm-up.
pub(crate) fn run(size: usize, spin: bool, duration: Duration) -> Result<PingPong> {
    let (mut server, port) = spawn_server(&[
        "__pingpong-serve",
        &size.to_string(),
        if spin { "spin" } else { "block" },
    ])?;
    let result = (|| {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_nonblocking(spin)?;
        let request = [0u8; REQUEST];
        let mut answer = vec![0u8; size];
        let mut trip = |s: &mut TcpStream| -> Result<Duration> {
            let t = Instant::now();
            write_all(s, &request, spin)?;
            read_exact(s, &mut answer, spin)?;
            Ok(t.elapsed())
        };
        for _ in 0..WARM_UP {
            trip(&mut s)?;
        }
        let cpu0 = cpu_seconds(None)? + cpu_seconds(Some(server.id()))?;
        let mut times = Vec::with_capacity(1 << 20);
        let end = Instant::now() + duration;
        while Instant::now() < end {
            times.push(trip(&mut s)?);
        }
        let cpu = cpu_seconds(None)? + cpu_seconds(Some(server.id()))? - cpu0;
        drop(s);
        if times.is_empty() {
            bail!("no round trip completed");
        }
        times.sort();
        let at = |q: f64| {
            let i = ((times.len() as f64 * q) as usize).min(times.len() - 1);
            times[i].as_secs_f64() * 1e6
        };
        Ok(PingPong {
            p50: at(0.50),
            p99: at(0.99),
            cpu_us_per_op: cpu * 1e6 / times.len() as f64,
        })
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}
