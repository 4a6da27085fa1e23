//! ferry's wire format written out by hand, for tests that play a raw peer (a second
//! encoding, so a mistake in the crate's own encoder cannot hide behind itself), and
//! the waits such tests need.

use std::io::Read;
use std::net::TcpStream;
use std::time::Instant;

use super::WAIT;

pub const WRITE: u8 = 1;
pub const READ: u8 = 2;
pub const NOTIFY: u8 = 3;
pub const GET_DESCRIPTOR: u8 = 4;
pub const DESCRIPTOR: u8 = 5;
pub const ACK: u8 = 6;
pub const READ_DATA: u8 = 7;
/// Opens an initiator's data lane (header only).
pub const LANE: u8 = 11;

/// A 16-byte frame header: magic, version 1, kind, count, sequence number.
pub fn header(kind: u8, count: u32, seq: u64) -> Vec<u8> {
    let mut h = b"FY".to_vec();
    h.push(1);
    h.push(kind);
    h.extend_from_slice(&count.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h
}

/// A 24-byte request descriptor: address, length, key.
pub fn desc(addr: u64, len: u64, key: u64) -> Vec<u8> {
    [addr, len, key]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// Whether the target closed the connection (EOF or reset) within [`WAIT`], draining
/// what it sent meanwhile.
pub fn closed_by_target(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Waits for `cond`, failing the test after [`WAIT`].
#[track_caller]
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < give_up, "gave up waiting: {what}");
        std::thread::yield_now();
    }
}
