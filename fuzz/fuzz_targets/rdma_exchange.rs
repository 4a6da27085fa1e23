//! The RDMA transport's queue-pair exchange (`ferry_transport_rdma::exchange`), as a
//! target's transport decodes a peer's request and an initiator's decodes the answer:
//! the message a peer sends through the engine's port in an `Exchange` frame.
//!
//! Properties: decoding never panics; whatever decodes re-encodes to exactly the input
//! bytes, and every decoded field lies within the documented limits (1 to `MAX_QPS`
//! queue pairs, at most `MAX_FLUSH` flush words and none in a request, NIC indices below
//! `MAX_NICS`, QPNs nonzero and of 24 bits, PSNs of 24 bits, MTU codes 1 to 5, 1 to 16 READs in flight, a nonzero
//! connection id). The other way round, the input also builds a message with every
//! field in range, which must encode to the documented length and decode to itself.
#![no_main]

use ferry_transport_rdma::exchange::{
    FlushWord, Kind, Message, QpAddr, MAGIC, MAX_FLUSH, MAX_NICS, MAX_QPS, VERSION,
};
use libfuzzer_sys::fuzz_target;

/// Header, queue pair and flush word lengths, as the format's table gives them.
const HEADER: usize = 26;
const QP_LEN: usize = 30;
const FLUSH_LEN: usize = 13;
const MAX_24: u32 = 0xff_ffff;

/// The properties of a message that decoded from `bytes`.
fn check_decoded(m: &Message, bytes: &[u8]) {
    assert!(
        m.encode() == bytes,
        "a decoded message does not re-encode to its bytes"
    );
    assert_eq!(&bytes[..4], &MAGIC);
    assert_eq!(bytes[4], VERSION);
    assert_eq!(
        bytes.len(),
        HEADER + m.qps.len() * QP_LEN + m.flush.len() * FLUSH_LEN
    );
    assert!(
        (1..=MAX_QPS).contains(&m.qps.len()),
        "{} queue pairs",
        m.qps.len()
    );
    assert!(m.flush.len() <= MAX_FLUSH, "{} flush words", m.flush.len());
    if m.kind == Kind::Request {
        assert!(m.flush.is_empty(), "a request with flush words");
    }
    assert_ne!(m.connection, 0, "connection id 0");
    for q in &m.qps {
        assert!(usize::from(q.nic) < MAX_NICS, "NIC {}", q.nic);
        assert!(
            usize::from(q.peer_nic) < MAX_NICS,
            "peer NIC {}",
            q.peer_nic
        );
        assert!(q.qpn != 0 && q.qpn <= MAX_24, "QPN {:#x}", q.qpn);
        assert!(q.psn <= MAX_24, "PSN {:#x}", q.psn);
        assert!((1..=5).contains(&q.mtu), "MTU code {}", q.mtu);
        assert!(
            (1..=16).contains(&q.rd_atomic),
            "{} READs in flight",
            q.rd_atomic
        );
    }
    for w in &m.flush {
        assert!(usize::from(w.nic) < MAX_NICS, "flush word NIC {}", w.nic);
    }
}

/// Reads fields off the input, wrapping around it (zeros when it is empty).
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Fields<'_> {
    fn byte(&mut self) -> u8 {
        if self.bytes.is_empty() {
            return 0;
        }
        let b = self.bytes[self.at % self.bytes.len()];
        self.at += 1;
        b
    }
    fn word<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.byte())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.word())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.word())
    }
    fn nic(&mut self) -> u8 {
        self.byte() % MAX_NICS as u8
    }
}

/// A message with every field in range, its values taken from the input.
fn valid_message(bytes: &[u8]) -> Message {
    let mut f = Fields { bytes, at: 0 };
    let kind = if f.byte() & 1 == 0 {
        Kind::Request
    } else {
        Kind::Answer
    };
    // Mostly few queue pairs (as real connections have), sometimes up to the limit.
    let q = match f.byte() {
        0xff => 1 + usize::from(u16::from_le_bytes(f.word())) % MAX_QPS,
        n => 1 + usize::from(n) % 16,
    };
    let flush = match kind {
        Kind::Request => 0,
        Kind::Answer => usize::from(f.byte()) % (MAX_FLUSH + 1),
    };
    Message {
        kind,
        connection: f.u64().max(1),
        replaces: f.u64(),
        qps: (0..q)
            .map(|_| QpAddr {
                nic: f.nic(),
                peer_nic: f.nic(),
                qpn: (f.u32() & MAX_24).max(1),
                psn: f.u32() & MAX_24,
                lid: u16::from_le_bytes(f.word()),
                gid: f.word(),
                mtu: 1 + f.byte() % 5,
                rd_atomic: 1 + f.byte() % 16,
            })
            .collect(),
        flush: (0..flush)
            .map(|_| FlushWord {
                nic: f.nic(),
                addr: f.u64(),
                rkey: f.u32(),
            })
            .collect(),
    }
}

fuzz_target!(|data: &[u8]| {
    match Message::decode(data) {
        Ok(m) => check_decoded(&m, data),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let m = valid_message(data);
    let bytes = m.encode();
    assert_eq!(
        bytes.len(),
        HEADER + m.qps.len() * QP_LEN + m.flush.len() * FLUSH_LEN
    );
    match Message::decode(&bytes) {
        Ok(back) => assert!(back == m, "a valid message decodes to another"),
        Err(e) => panic!("a valid message is refused: {e}"),
    }
    check_decoded(&m, &bytes);
});
