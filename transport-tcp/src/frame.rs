//! ferry's TCP wire format: plain encode/decode, no I/O.
//!
//! Every message starts with a 16-byte header (little endian):
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..2 | magic | `b"FY"` |
//! | 2 | version | [`VERSION`] |
//! | 3 | kind | [`Kind`] |
//! | 4..8 | count | descriptors, statuses or body bytes, by kind |
//! | 8..16 | seq | sequence number of the first request the message carries |
//!
//! Initiator to target: `Write` (count descriptors, then every payload in order), `Read`
//! (count descriptors), `Notify` (count body bytes), `GetDescriptor`, `Lane` (count 0:
//! sent first on each data lane, so the target keeps an idle lane open for as long as
//! TCP keepalive finds its initiator alive, where a silent connection is closed after
//! the idle limit). A descriptor is
//! 24 bytes: remote address, length, key. Target to initiator: `Ack` (count status
//! bytes), `ReadData` (count status bytes, then the data of every request whose status
//! is 0, in order), `Descriptor` (count body bytes). Sequence numbers count requests per
//! connection; responses come back in request order.
//!
//! Set-up exchanges (a fabric transport's connection state, e.g. RDMA queue pairs, over
//! this one port): the initiator sends `Exchange` (count body bytes: the protocol as one
//! byte, then the transport's message) on a connection of its own; the target answers
//! `Exchanged` (count body bytes: 0 and the transport's answer, or 1 and why it refused,
//! in UTF-8) and goes on serving that connection.
//!
//! Authentication (only when the target has a shared secret; without one these kinds are
//! never sent and a target closes a connection that sends them): the client opens with
//! `Hello` (count 32: its nonce), the target answers `Challenge` (count 64: its nonce,
//! then its proof) and the client sends `Proof` (count 32: its proof) before any other
//! frame. A proof is HMAC-SHA256 of the secret over a label naming the side that proves
//! ([`TARGET_LABEL`], [`CLIENT_LABEL`]), then the client's nonce, then the target's, so
//! neither side's proof can be replayed or reflected as the other's. A target with a
//! secret answers any other first frame with a `Challenge` of count 0 ("a secret is
//! required") and closes.

use ferry_transport_api::Protocol;

/// First two bytes of every header.
pub(crate) const MAGIC: [u8; 2] = *b"FY";
/// Wire format version.
pub(crate) const VERSION: u8 = 1;
/// Header length.
pub(crate) const HEADER_LEN: usize = 16;
/// Request descriptor length.
pub(crate) const DESC_LEN: usize = 24;
/// Most descriptors (and statuses) one message may carry.
pub(crate) const MAX_DESCS: usize = 256;
/// Largest notification body.
pub(crate) const MAX_NOTIFY: usize = 64 * 1024;
/// Largest descriptor document a peer may send.
pub(crate) const MAX_DESCRIPTOR: usize = ferry_transport_api::SegmentDescriptor::MAX_ENCODED_LEN;
/// Largest set-up exchange message or answer (protocol and status bytes included).
pub(crate) const MAX_EXCHANGE: usize = 64 * 1024;
/// Largest single request a target accepts at all; beyond it the stream is treated as
/// hostile and closed (smaller out-of-range requests are refused one by one).
pub(crate) const MAX_REQUEST: u64 = 1 << 30;

/// Length of an authentication nonce and of a proof (an HMAC-SHA256 tag).
pub(crate) const AUTH_LEN: usize = 32;
/// What the target's proof covers before the nonces.
pub(crate) const TARGET_LABEL: &[u8] = b"ferry-tcp v1 target proof";
/// What the client's proof covers before the nonces.
pub(crate) const CLIENT_LABEL: &[u8] = b"ferry-tcp v1 client proof";

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Write = 1,
    Read = 2,
    Notify = 3,
    GetDescriptor = 4,
    Descriptor = 5,
    Ack = 6,
    ReadData = 7,
    Hello = 8,
    Challenge = 9,
    Proof = 10,
    Lane = 11,
    Exchange = 12,
    Exchanged = 13,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Write,
            2 => Kind::Read,
            3 => Kind::Notify,
            4 => Kind::GetDescriptor,
            5 => Kind::Descriptor,
            6 => Kind::Ack,
            7 => Kind::ReadData,
            8 => Kind::Hello,
            9 => Kind::Challenge,
            10 => Kind::Proof,
            11 => Kind::Lane,
            12 => Kind::Exchange,
            13 => Kind::Exchanged,
            _ => return None,
        })
    }
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) kind: Kind,
    pub(crate) count: u32,
    pub(crate) seq: u64,
}

/// Why bytes are not a valid header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameError {
    BadMagic,
    BadVersion(u8),
    BadKind(u8),
    /// A count beyond what the kind allows.
    TooLong {
        kind: Kind,
        count: u32,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadMagic => f.write_str("not a ferry frame (bad magic)"),
            FrameError::BadVersion(v) => write!(f, "unsupported wire version {v}"),
            FrameError::BadKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::TooLong { kind, count } => {
                write!(f, "{kind:?} frame with count {count} over the limit")
            }
        }
    }
}

impl Header {
    pub(crate) fn new(kind: Kind, count: u32, seq: u64) -> Self {
        Header { kind, count, seq }
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = self.kind as u8;
        b[4..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Decodes and checks a header, including the count limit of its kind.
    pub(crate) fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        if b[0..2] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        if b[2] != VERSION {
            return Err(FrameError::BadVersion(b[2]));
        }
        let kind = Kind::from_u8(b[3]).ok_or(FrameError::BadKind(b[3]))?;
        let count = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let seq = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
        let limit = match kind {
            Kind::Write | Kind::Read | Kind::Ack | Kind::ReadData => MAX_DESCS,
            Kind::Notify => MAX_NOTIFY,
            Kind::GetDescriptor | Kind::Lane => 0,
            Kind::Descriptor => MAX_DESCRIPTOR,
            Kind::Exchange | Kind::Exchanged => MAX_EXCHANGE,
            Kind::Hello | Kind::Proof => AUTH_LEN,
            Kind::Challenge => 2 * AUTH_LEN,
        };
        if count as usize > limit
            || (count == 0
                && matches!(
                    kind,
                    Kind::Write
                        | Kind::Read
                        | Kind::Ack
                        | Kind::ReadData
                        | Kind::Exchange
                        | Kind::Exchanged
                ))
        {
            return Err(FrameError::TooLong { kind, count });
        }
        Ok(Header { kind, count, seq })
    }
}

/// One request as it travels: where on the target, how much, and the region's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Desc {
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) key: u64,
}

impl Desc {
    pub(crate) fn encode_into(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..24].copy_from_slice(&self.key.to_le_bytes());
    }

    pub(crate) fn decode(b: &[u8]) -> Desc {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Desc {
            addr: word(0),
            len: word(8),
            key: word(16),
        }
    }
}

/// A protocol as the first byte of an `Exchange` body.
pub(crate) fn protocol_byte(p: Protocol) -> u8 {
    match p {
        Protocol::Rdma => 1,
        Protocol::Efa => 2,
        Protocol::Tcp => 3,
    }
}

/// The protocol an `Exchange` body names, if any.
pub(crate) fn protocol_of(byte: u8) -> Option<Protocol> {
    Protocol::ALL
        .into_iter()
        .find(|&p| protocol_byte(p) == byte)
}

/// An `Exchanged` body: the transport's answer, or why the target refused.
pub(crate) fn encode_exchanged(answer: &Result<Vec<u8>, String>) -> Vec<u8> {
    const TOO_LARGE: &[u8] = b"the transport's answer is larger than an exchange carries";
    let (status, body) = match answer {
        Ok(a) if a.len() < MAX_EXCHANGE => (0u8, a.as_slice()),
        Ok(_) => (1u8, TOO_LARGE),
        // A reason is text for a person: cut to what fits, on a character boundary.
        Err(why) => {
            let mut end = why.len().min(MAX_EXCHANGE - 1);
            while !why.is_char_boundary(end) {
                end -= 1;
            }
            (1u8, &why.as_bytes()[..end])
        }
    };
    let mut b = Vec::with_capacity(1 + body.len());
    b.push(status);
    b.extend_from_slice(body);
    b
}

/// Reads an `Exchanged` body: `Ok(answer)` or `Err(why the peer refused)`; `None` when
/// the body is malformed.
pub(crate) fn decode_exchanged(body: &[u8]) -> Option<Result<&[u8], String>> {
    match body.split_first()? {
        (0, answer) => Some(Ok(answer)),
        (1, why) => Some(Err(String::from_utf8_lossy(why).into_owned())),
        _ => None,
    }
}

/// The proof of knowing `secret` that the side named by `label` gives for one exchange.
pub(crate) fn auth_proof(
    secret: &[u8],
    label: &[u8],
    client_nonce: &[u8; AUTH_LEN],
    target_nonce: &[u8; AUTH_LEN],
) -> [u8; AUTH_LEN] {
    use hmac::Mac;
    auth_mac(secret, label, client_nonce, target_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a proof in constant time.
pub(crate) fn auth_verify(
    secret: &[u8],
    label: &[u8],
    client_nonce: &[u8; AUTH_LEN],
    target_nonce: &[u8; AUTH_LEN],
    proof: &[u8],
) -> bool {
    use hmac::Mac;
    auth_mac(secret, label, client_nonce, target_nonce)
        .verify_slice(proof)
        .is_ok()
}

fn auth_mac(
    secret: &[u8],
    label: &[u8],
    client_nonce: &[u8; AUTH_LEN],
    target_nonce: &[u8; AUTH_LEN],
) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(secret)
        .expect("HMAC takes keys of any length");
    mac.update(label);
    mac.update(client_nonce);
    mac.update(target_nonce);
    mac
}

/// A fresh random nonce.
pub(crate) fn nonce() -> [u8; AUTH_LEN] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchanged_bodies_never_exceed_the_limit() {
        let big = vec![7u8; MAX_EXCHANGE];
        let b = encode_exchanged(&Ok(big));
        assert!(b.len() <= MAX_EXCHANGE);
        assert!(matches!(decode_exchanged(&b), Some(Err(why)) if why.contains("larger")));
        let fits = vec![7u8; MAX_EXCHANGE - 1];
        assert_eq!(
            decode_exchanged(&encode_exchanged(&Ok(fits.clone()))),
            Some(Ok(&fits[..]))
        );
        let long_reason = "é".repeat(MAX_EXCHANGE);
        let b = encode_exchanged(&Err(long_reason));
        assert!(b.len() <= MAX_EXCHANGE);
        assert!(matches!(decode_exchanged(&b), Some(Err(why)) if why.chars().all(|c| c == 'é')));
    }

    use rand::{Rng, RngCore};

    #[test]
    fn header_round_trips() {
        let h = Header::new(Kind::Write, 17, u64::MAX - 3);
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn header_rejects_what_it_must() {
        let mut b = Header::new(Kind::Read, 1, 0).encode();
        b[0] = b'X';
        assert_eq!(Header::decode(&b), Err(FrameError::BadMagic));
        let mut b = Header::new(Kind::Read, 1, 0).encode();
        b[2] = 9;
        assert_eq!(Header::decode(&b), Err(FrameError::BadVersion(9)));
        let mut b = Header::new(Kind::Read, 1, 0).encode();
        b[3] = 200;
        assert_eq!(Header::decode(&b), Err(FrameError::BadKind(200)));
        let b = Header::new(Kind::Write, MAX_DESCS as u32 + 1, 0).encode();
        assert!(matches!(
            Header::decode(&b),
            Err(FrameError::TooLong { .. })
        ));
        let b = Header::new(Kind::Write, 0, 0).encode();
        assert!(matches!(
            Header::decode(&b),
            Err(FrameError::TooLong { .. })
        ));
        let b = Header::new(Kind::Notify, u32::MAX, 0).encode();
        assert!(matches!(
            Header::decode(&b),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn random_bytes_never_panic_and_rarely_decode() {
        let mut rng = rand::rng();
        let mut accepted = 0;
        for _ in 0..100_000 {
            let mut b = [0u8; HEADER_LEN];
            rng.fill_bytes(&mut b);
            if rng.random_bool(0.5) {
                b[0..2].copy_from_slice(&MAGIC);
                b[2] = VERSION;
            }
            if let Ok(h) = Header::decode(&b) {
                accepted += 1;
                assert_eq!(Header::decode(&h.encode()), Ok(h));
            }
        }
        assert!(accepted < 100_000 / 2);
    }

    #[test]
    fn proofs_bind_secret_side_and_nonces() {
        let (c, t) = (nonce(), nonce());
        let p = auth_proof(b"secret", TARGET_LABEL, &c, &t);
        assert!(auth_verify(b"secret", TARGET_LABEL, &c, &t, &p));
        assert!(!auth_verify(b"secreT", TARGET_LABEL, &c, &t, &p));
        assert!(!auth_verify(b"secret", CLIENT_LABEL, &c, &t, &p));
        assert!(!auth_verify(b"secret", TARGET_LABEL, &t, &c, &p));
        assert!(!auth_verify(b"secret", TARGET_LABEL, &c, &t, &p[..31]));
        let b = Header::new(Kind::Challenge, 0, 0).encode();
        assert_eq!(Header::decode(&b).unwrap().count, 0);
        let b = Header::new(Kind::Hello, 33, 0).encode();
        assert!(Header::decode(&b).is_err());
    }

    #[test]
    fn desc_round_trips() {
        let d = Desc {
            addr: 0xdead_beef_0000,
            len: 65536,
            key: 0x0123_4567_89ab_cdef,
        };
        let mut b = [0u8; DESC_LEN];
        d.encode_into(&mut b);
        assert_eq!(Desc::decode(&b), d);
    }
}
