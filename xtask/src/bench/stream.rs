//! The raw baseline for throughput with ferry's memory footprint: iperf3's loop (one
//! TCP stream on loopback, 1 MiB `write`s and `read`s, blocking sockets), except that
//! each side walks a buffer as large as the bytes a `ferry bench` case keeps in flight
//! (block size x batch size) instead of reusing one 1 MiB buffer. iperf3's buffer stays
//! in the caches; a batch of 128 x 1 MiB does not, and neither does this loop's. Held
//! beside iperf3, it separates what the transport costs from what touching that much
//! memory costs on the machine.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{cpu_seconds, spawn_server};

/// Bytes per `write` and `read` call, as `iperf3 -l 1M`.
const CALL: usize = 1 << 20;

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stream {
    pub(crate) gbps: f64,
    /// GB moved per CPU-second of both processes.
    pub(crate) gb_per_cpu: f64,
}

/// A buffer of `bytes` (at least one call's worth), every page touched, so page faults
/// are not measured.
fn buffer(bytes: usize) -> Vec<u8> {
    vec![0x5a; bytes.max(CALL)]
}

/// `xtask __stream-serve BYTES`: prints its port, reads one connection until it closes
/// into a buffer of BYTES, call after call, wrapping around at its end.
pub(crate) fn serve(args: &[String]) -> Result<()> {
    let bytes: usize = args.first().context("bytes")?.parse()?;
    let mut buf = buffer(bytes);
    let mut s = super::accept_one()?;
    let mut at = 0;
    loop {
        let end = (at + CALL).min(buf.len());
        match s.read(&mut buf[at..end]) {
            Ok(0) => return Ok(()),
            Ok(n) => at = if at + n == buf.len() { 0 } else { at + n },
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// One run: a receiving process (this binary, `__stream-serve`) and this process
/// sending, each walking `bytes` of memory; one pass over it warms up, then `duration`
/// is measured.
pub(crate) fn run(bytes: usize, duration: Duration) -> Result<Stream> {
    let (mut server, port) = spawn_server(&["__stream-serve", &bytes.to_string()])?;
    let result = (|| -> Result<Stream> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        let buf = buffer(bytes);
        let mut at = 0;
        let mut send = |s: &mut TcpStream| -> Result<usize> {
            let end = (at + CALL).min(buf.len());
            s.write_all(&buf[at..end])?;
            let n = end - at;
            at = if end == buf.len() { 0 } else { end };
            Ok(n)
        };
        let mut warm = 0;
        while warm < buf.len() {
            warm += send(&mut s)?;
        }
        let cpu0 = cpu_seconds(None)? + cpu_seconds(Some(server.id()))?;
        let start = Instant::now();
        let mut sent = 0usize;
        while start.elapsed() < duration {
            sent += send(&mut s)?;
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds(None)? + cpu_seconds(Some(server.id()))? - cpu0;
        s.shutdown(std::net::Shutdown::Write)?;
        let gb = sent as f64 / 1e9;
        Ok(Stream {
            gbps: gb / secs,
            gb_per_cpu: if cpu > 0.0 { gb / cpu } else { 0.0 },
        })
    })();
    if result.is_err() {
        let _ = server.kill();
    }
    let status = server.wait()?;
    let r = result?;
    anyhow::ensure!(status.success(), "the stream's receiver failed ({status})");
    Ok(r)
}
