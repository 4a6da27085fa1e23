//! The queue-pair exchange: what two RDMA transports tell each other to connect RC queue
//! pairs, carried over the engine's port (`PeerControl::exchange`). Plain encode and
//! decode, no I/O; decoding checks everything, since the bytes come from the network.
//!
//! Layout (little endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `b"FYQP"` |
//! | 4 | version ([`VERSION`]) |
//! | 5 | kind: 1 request (initiator to target), 2 answer |
//! | 6..8 | `q`: queue pairs that follow |
//! | 8..10 | `f`: flush words that follow (0 in a request) |
//! | 10..18 | connection: the initiator's random id for this connection |
//! | 18..26 | replaces: an earlier connection id of the same initiator whose queue pairs the target may drop (0: none) |
//! | then `q` × 30 | queue pair: NIC (u8), peer NIC (u8), QPN (u32, 24 bits), PSN (u32, 24 bits), LID (u16), GID (16), MTU (u8, ibverbs' enum 1..5), READs in flight it accepts (u8, 1..16) |
//! | then `f` × 13 | flush word: NIC (u8), address (u64), rkey (u32) |
//!
//! A queue pair entry speaks for its sender: "my queue pair `QPN` on my NIC `NIC` is for
//! your NIC `peer NIC`". The target answers every requested entry, in order, with its
//! own queue pair for it, and lists for each of its NICs in use a flush word: 8 bytes of
//! its memory the initiator may READ to make earlier WRITEs visible (see the crate docs).

/// First four bytes.
pub const MAGIC: [u8; 4] = *b"FYQP";
/// Format version.
pub const VERSION: u8 = 1;
/// Most queue pairs one message may carry.
pub const MAX_QPS: usize = 1024;
/// Most flush words one answer may carry (one per NIC).
pub const MAX_FLUSH: usize = 64;
/// Most NICs either side may name.
pub const MAX_NICS: usize = 64;

const HEADER: usize = 26;
const QP_LEN: usize = 30;
const FLUSH_LEN: usize = 13;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Initiator to target.
    Request,
    /// Target to initiator.
    Answer,
}

/// One side's queue pair, as the other side needs it to connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpAddr {
    /// The sender's NIC it lives on.
    pub nic: u8,
    /// The receiver's NIC it is for.
    pub peer_nic: u8,
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// First packet sequence number it sends with (24 bits).
    pub psn: u32,
    /// The NIC port's LID (InfiniBand).
    pub lid: u16,
    /// The NIC port's source GID.
    pub gid: [u8; 16],
    /// The NIC port's active MTU (ibverbs' enum).
    pub mtu: u8,
    /// How many RDMA READs in flight it accepts as a responder (1..=16): the other side
    /// keeps no more than this outstanding on it.
    pub rd_atomic: u8,
}

/// Memory a target lends for flushing READs on one of its NICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushWord {
    /// The target's NIC it is registered on.
    pub nic: u8,
    /// Its address.
    pub addr: u64,
    /// Its remote key on that NIC.
    pub rkey: u32,
}

/// A decoded (and checked) message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Request or answer.
    pub kind: Kind,
    /// The connection's id.
    pub connection: u64,
    /// The earlier connection this one replaces (0: none).
    pub replaces: u64,
    /// Queue pairs.
    pub qps: Vec<QpAddr>,
    /// Flush words (answers only).
    pub flush: Vec<FlushWord>,
}

/// Why bytes are not a valid message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed queue-pair exchange: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

impl Message {
    /// The encoded message. Fields out of range (more than [`MAX_QPS`] queue pairs, a
    /// QPN over 24 bits) are the caller's bug: the peer refuses them.
    pub fn encode(&self) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(HEADER + self.qps.len() * QP_LEN + self.flush.len() * FLUSH_LEN);
        b.extend_from_slice(&MAGIC);
        b.push(VERSION);
        b.push(match self.kind {
            Kind::Request => 1,
            Kind::Answer => 2,
        });
        b.extend_from_slice(&(self.qps.len().min(u16::MAX as usize) as u16).to_le_bytes());
        b.extend_from_slice(&(self.flush.len().min(u16::MAX as usize) as u16).to_le_bytes());
        b.extend_from_slice(&self.connection.to_le_bytes());
        b.extend_from_slice(&self.replaces.to_le_bytes());
        for q in &self.qps {
            b.push(q.nic);
            b.push(q.peer_nic);
            b.extend_from_slice(&q.qpn.to_le_bytes());
            b.extend_from_slice(&q.psn.to_le_bytes());
            b.extend_from_slice(&q.lid.to_le_bytes());
            b.extend_from_slice(&q.gid);
            b.push(q.mtu);
            b.push(q.rd_atomic);
        }
        for f in &self.flush {
            b.push(f.nic);
            b.extend_from_slice(&f.addr.to_le_bytes());
            b.extend_from_slice(&f.rkey.to_le_bytes());
        }
        b
    }

    /// Decodes and checks a message: exact length, known version and kind, counts within
    /// limits, 24-bit QPNs and PSNs, a known MTU, NIC indices below [`MAX_NICS`], a
    /// connection id that is not 0, no flush words in a request.
    pub fn decode(b: &[u8]) -> Result<Message, Malformed> {
        let bad = |why: String| Err(Malformed(why));
        if b.len() < HEADER {
            return bad(format!("{} bytes, shorter than the header", b.len()));
        }
        if b[0..4] != MAGIC {
            return bad("bad magic".into());
        }
        if b[4] != VERSION {
            return bad(format!("version {} (this side speaks {VERSION})", b[4]));
        }
        let kind = match b[5] {
            1 => Kind::Request,
            2 => Kind::Answer,
            k => return bad(format!("unknown kind {k}")),
        };
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as usize;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let (q, f) = (u16_at(6), u16_at(8));
        if q == 0 || q > MAX_QPS {
            return bad(format!("{q} queue pairs (1 to {MAX_QPS} are possible)"));
        }
        if f > MAX_FLUSH {
            return bad(format!("{f} flush words (at most {MAX_FLUSH})"));
        }
        if kind == Kind::Request && f != 0 {
            return bad("a request with flush words".into());
        }
        let want = HEADER + q * QP_LEN + f * FLUSH_LEN;
        if b.len() != want {
            return bad(format!("{} bytes where its counts say {want}", b.len()));
        }
        let connection = u64_at(10);
        if connection == 0 {
            return bad("connection id 0".into());
        }
        let replaces = u64_at(18);
        let mut qps = Vec::with_capacity(q);
        for i in 0..q {
            let o = HEADER + i * QP_LEN;
            let mut gid = [0u8; 16];
            gid.copy_from_slice(&b[o + 12..o + 28]);
            let qp = QpAddr {
                nic: b[o],
                peer_nic: b[o + 1],
                qpn: u32_at(o + 2),
                psn: u32_at(o + 6),
                lid: u16_at(o + 10) as u16,
                gid,
                mtu: b[o + 28],
                rd_atomic: b[o + 29],
            };
            if usize::from(qp.nic) >= MAX_NICS || usize::from(qp.peer_nic) >= MAX_NICS {
                return bad(format!(
                    "queue pair {i} names NIC {} for NIC {}",
                    qp.nic, qp.peer_nic
                ));
            }
            if qp.qpn > 0xff_ffff || qp.qpn == 0 || qp.psn > 0xff_ffff {
                return bad(format!(
                    "queue pair {i} has QPN {:#x} and PSN {:#x}",
                    qp.qpn, qp.psn
                ));
            }
            if !(1..=5).contains(&qp.mtu) {
                return bad(format!("queue pair {i} has MTU code {}", qp.mtu));
            }
            if !(1..=16).contains(&qp.rd_atomic) {
                return bad(format!(
                    "queue pair {i} accepts {} READs in flight",
                    qp.rd_atomic
                ));
            }
            qps.push(qp);
        }
        let mut flush = Vec::with_capacity(f);
        for i in 0..f {
            let o = HEADER + q * QP_LEN + i * FLUSH_LEN;
            let w = FlushWord {
                nic: b[o],
                addr: u64_at(o + 1),
                rkey: u32_at(o + 9),
            };
            if usize::from(w.nic) >= MAX_NICS {
                return bad(format!("flush word {i} names NIC {}", w.nic));
            }
            flush.push(w);
        }
        Ok(Message {
            kind,
            connection,
            replaces,
            qps,
            flush,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qp(nic: u8, peer_nic: u8, qpn: u32) -> QpAddr {
        QpAddr {
            nic,
            peer_nic,
            qpn,
            psn: 0xabcdef,
            lid: 7,
            gid: [9; 16],
            mtu: 5,
            rd_atomic: 16,
        }
    }

    fn answer() -> Message {
        Message {
            kind: Kind::Answer,
            connection: 0x1234_5678_9abc_def0,
            replaces: 0,
            qps: vec![qp(0, 1, 0x11), qp(1, 0, 0xff_ffff)],
            flush: vec![FlushWord {
                nic: 1,
                addr: u64::MAX - 7,
                rkey: 0xdead_beef,
            }],
        }
    }

    #[test]
    fn messages_round_trip() {
        let a = answer();
        assert_eq!(Message::decode(&a.encode()), Ok(a));
        let r = Message {
            kind: Kind::Request,
            connection: 5,
            replaces: 4,
            qps: (0..MAX_QPS as u32).map(|i| qp(0, 0, i + 1)).collect(),
            flush: Vec::new(),
        };
        assert_eq!(Message::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn hostile_messages_are_refused() {
        let good = answer().encode();
        let refuse = |b: &[u8], what: &str| {
            let e = Message::decode(b).unwrap_err().to_string();
            assert!(e.contains(what), "{e} (expected {what})");
        };
        refuse(&good[..10], "shorter");
        let mut b = good.clone();
        b[0] = b'X';
        refuse(&b, "magic");
        let mut b = good.clone();
        b[4] = 2;
        refuse(&b, "version 2");
        let mut b = good.clone();
        b[5] = 3;
        refuse(&b, "kind 3");
        let mut b = good.clone();
        b[6..8].copy_from_slice(&0u16.to_le_bytes());
        refuse(&b, "0 queue pairs");
        let mut b = good.clone();
        b[6..8].copy_from_slice(&(MAX_QPS as u16 + 1).to_le_bytes());
        refuse(&b, "1025 queue pairs");
        let mut b = good.clone();
        b[8..10].copy_from_slice(&65u16.to_le_bytes());
        refuse(&b, "65 flush words");
        let mut b = good.clone();
        b.push(0);
        refuse(&b, "counts say");
        refuse(&good[..good.len() - 1], "counts say");
        let mut b = good.clone();
        b[10..18].copy_from_slice(&0u64.to_le_bytes());
        refuse(&b, "connection id 0");
        // Queue pair fields.
        let qp0 = HEADER;
        let mut b = good.clone();
        b[qp0] = 64;
        refuse(&b, "NIC 64");
        let mut b = good.clone();
        b[qp0 + 2..qp0 + 6].copy_from_slice(&0x0100_0000u32.to_le_bytes());
        refuse(&b, "QPN");
        let mut b = good.clone();
        b[qp0 + 2..qp0 + 6].copy_from_slice(&0u32.to_le_bytes());
        refuse(&b, "QPN 0x0");
        let mut b = good.clone();
        b[qp0 + 6..qp0 + 10].copy_from_slice(&0x0100_0000u32.to_le_bytes());
        refuse(&b, "PSN");
        let mut b = good.clone();
        b[qp0 + 28] = 6;
        refuse(&b, "MTU code 6");
        let mut b = good.clone();
        b[qp0 + 29] = 0;
        refuse(&b, "accepts 0 READs");
        let mut b = good.clone();
        b[qp0 + 29] = 17;
        refuse(&b, "accepts 17 READs");
        let mut b = good.clone();
        b[HEADER + 2 * QP_LEN] = 99;
        refuse(&b, "flush word 0 names NIC 99");
        // A request may not carry flush words.
        let mut b = good;
        b[5] = 1;
        refuse(&b, "request with flush words");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let good = answer().encode();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut b = good.clone();
            let i = (seed % b.len() as u64) as usize;
            b[i] = (seed >> 32) as u8;
            let cut = (seed >> 40) as usize % (b.len() + 1);
            let _ = Message::decode(&b[..cut]);
            let _ = Message::decode(&b);
        }
    }
}
