//! A live TCP target fed a peer's byte stream over loopback: the frame loop, request
//! resolution, payload placement, discarding of refused payloads, READ answers,
//! notifications, descriptor requests and set-up exchanges, exactly as a hostile peer
//! reaches them.
//!
//! The target serves two registered regions cut from one arena, between guard bytes:
//! `RW` (read-write) and `RO` (read-only). Because addresses and keys change every run,
//! the input is ferry's wire format with three fields made relative, and the harness
//! rewrites them before sending: a READ or WRITE descriptor's address is an offset from
//! the arena's start, its key 0 or 1 stands for RW's or RO's key (any other key is sent
//! as it is), and a header's sequence number counts from the one the target expects
//! next (0 is in sequence). Everything else goes out verbatim (an `Exchange` frame's
//! sequence number too: the target ignores it).
//!
//! The control plane answers set-up exchanges by protocol: RDMA messages with their
//! bytes reversed, EFA ones with nothing, TCP ones with a refusal that gives the
//! message's length; a protocol byte the wire format does not define is refused by the
//! target itself.
//!
//! Oracle: a model of the contract predicts, frame by frame, each request's status, the
//! bytes each accepted READ returns, each exchange's answer and the region's bytes after
//! each WRITE; the target's answers must match it (a prefix, when the stream ends in a
//! protocol error), the guard bytes and the read-only region must never change, and the
//! target must close the connection once the stream ends.
#![no_main]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_transport_api::{
    Access, CompletionToken, Completions, ControlPlane, FailReason, Location, Protocol,
    RegionMemory, Transport, TransportContext,
};
use ferry_transport_tcp::fuzzing::{
    decode_desc, decode_header, encode_desc, parse_notification, DESC_LEN, HEADER_LEN,
    MAX_EXCHANGE, MAX_REQUEST,
};
use ferry_transport_tcp::{TcpConfig, TcpTransport};
use libfuzzer_sys::fuzz_target;

const PAGE: u64 = 4096;
/// Guard, RW, RO, guard.
const ARENA: usize = 4 * PAGE as usize;
const RW: (u64, u64) = (PAGE, 2 * PAGE);
const RO: (u64, u64) = (2 * PAGE, 3 * PAGE);

const WRITE: u8 = 1;
const READ: u8 = 2;
const NOTIFY: u8 = 3;
const GET_DESCRIPTOR: u8 = 4;
const DESCRIPTOR: u8 = 5;
const ACK: u8 = 6;
const READ_DATA: u8 = 7;
const LANE: u8 = 11;
const EXCHANGE: u8 = 12;
const EXCHANGED: u8 = 13;

const OK: u8 = 0;
const NOT_REGISTERED: u8 = 1;
const KEY_MISMATCH: u8 = 2;
const OUT_OF_BOUNDS: u8 = 3;
const ACCESS_DENIED: u8 = 4;
const MALFORMED: u8 = 7;

/// What the control plane answers to a descriptor request.
const DESCRIPTOR_BODY: &[u8] = br#"{"name":"fuzz","incarnation":1,"endpoints":[],"buffers":[]}"#;

struct Control;

impl ControlPlane for Control {
    fn descriptor(&self) -> Vec<u8> {
        DESCRIPTOR_BODY.to_vec()
    }
    fn notification(&self, _from: &str, _body: &[u8]) -> bool {
        true
    }
    fn exchange(&self, protocol: Protocol, body: &[u8]) -> Result<Vec<u8>, String> {
        match protocol {
            Protocol::Rdma => Ok(body.iter().rev().copied().collect()),
            Protocol::Efa => Ok(Vec::new()),
            Protocol::Tcp => Err(tcp_refusal(body.len())),
        }
    }
}

/// Why the control plane refuses a TCP set-up message of `len` bytes.
fn tcp_refusal(len: usize) -> String {
    format!("tcp sets nothing up ({len} bytes refused)")
}

/// The `Exchanged` body the target owes for an `Exchange` body (protocol byte first), as
/// the wire format and the control plane above define it; `None` where the target
/// refuses for a reason of its own (a protocol byte it does not know).
fn exchanged(body: &[u8]) -> Option<Vec<u8>> {
    let (&protocol, message) = body.split_first()?;
    let (status, answer) = match protocol {
        1 => (0, message.iter().rev().copied().collect()),
        2 => (0, Vec::new()),
        3 => (1, tcp_refusal(message.len()).into_bytes()),
        _ => return None,
    };
    let mut b = vec![status];
    b.extend(answer);
    assert!(b.len() <= MAX_EXCHANGE, "every answer here fits the frame");
    Some(b)
}

/// The target never initiates, so nothing completes.
struct NoCompletions;

impl Completions for NoCompletions {
    fn complete(&self, _token: CompletionToken, _result: Result<usize, FailReason>) {}
}

struct Harness {
    /// Kept alive (and listening) for the whole run.
    _tcp: TcpTransport,
    addr: SocketAddr,
    /// The whole arena, unregistered: how the harness looks at and resets the bytes.
    arena: Arc<RegionMemory>,
    base: u64,
    rw_key: u64,
    ro_key: u64,
}

fn pattern() -> Vec<u8> {
    (0..ARENA)
        .map(|i| (i as u8).wrapping_mul(131).wrapping_add(7))
        .collect()
}

/// Ignores SIGPIPE, as the Rust runtime does before `main` in every Rust program:
/// libFuzzer's `main` does not, and ferry's vectored socket writes (`writev`) to a peer
/// that has gone would otherwise kill the fuzzer instead of returning `EPIPE`.
fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to "ignore" installs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        ignore_sigpipe();
        let tcp = TcpTransport::new(TcpConfig::default());
        let ep = tcp
            .start(TransportContext {
                completions: Arc::new(NoCompletions),
                // The port's transport is the one given the control plane.
                control: (Arc::new(Control) as Arc<dyn ControlPlane>).into(),
                staging: None,
            })
            .expect("the target starts on loopback");
        let bytes: Box<[u8]> = pattern().into_boxed_slice();
        let owner = Arc::new(bytes);
        let ptr = NonNull::new(owner.as_ptr() as *mut u8).expect("non-null");
        let sub = |(start, end): (u64, u64)| {
            // SAFETY: inside the arena, which `owner` keeps alive for the region's life;
            // the target and this harness never touch it at the same time (the harness
            // looks only between connections, after the target closed the last one).
            Arc::new(unsafe {
                RegionMemory::from_raw(
                    ptr.add(start as usize),
                    (end - start) as usize,
                    Location::host(),
                    Box::new(owner.clone()),
                )
            })
        };
        let arena = sub((0, ARENA as u64));
        let rw_key = tcp.register(&sub(RW), Access::RemoteReadWrite).unwrap()[0];
        let ro_key = tcp.register(&sub(RO), Access::RemoteRead).unwrap()[0];
        Harness {
            addr: ep.address.parse().expect("a socket address"),
            base: arena.addr(),
            arena,
            rw_key,
            ro_key,
            _tcp: tcp,
        }
    })
}

/// One answer the target owes, in order.
#[derive(Debug, PartialEq)]
enum Due {
    /// A WRITE's or a notification's status (acknowledgements are coalesced).
    Ack {
        seq: u64,
        status: u8,
    },
    /// A READ frame's statuses, then the bytes of its accepted requests.
    ReadData {
        seq: u64,
        statuses: Vec<u8>,
        data: Vec<u8>,
    },
    Descriptor,
    /// An exchange's answer: the `Exchanged` body, or `None` for a refusal with a reason
    /// the target words itself.
    Exchanged(Option<Vec<u8>>),
}

impl Harness {
    /// The status the contract gives a request (absolute address, real key).
    fn status(&self, op: u8, addr: u64, len: u64, key: u64) -> u8 {
        let abs = |(s, e): (u64, u64)| (self.base + s, self.base + e);
        let regions = [(abs(RW), self.rw_key, true), (abs(RO), self.ro_key, false)];
        let holds = |(s, e): (u64, u64)| s <= addr && addr < e;
        let Some(&((_, end), _, writable)) = regions
            .iter()
            .find(|(range, k, _)| *k == key && holds(*range))
        else {
            return if regions.iter().any(|(r, ..)| holds(*r)) {
                KEY_MISMATCH
            } else {
                NOT_REGISTERED
            };
        };
        if op == WRITE && !writable {
            ACCESS_DENIED
        } else if addr.checked_add(len).is_none_or(|e| e > end) {
            OUT_OF_BOUNDS
        } else {
            OK
        }
    }

    /// Rewrites the input into the stream to send, and predicts the answers and the
    /// arena afterwards. Modelling stops where the target must close the connection.
    fn model(&self, data: &[u8]) -> (Vec<u8>, VecDeque<Due>, Vec<u8>) {
        let mut out = Vec::with_capacity(data.len());
        let mut due = VecDeque::new();
        let mut arena = pattern();
        let mut next_seq = 0u64;
        let mut pos = 0;
        while let Some(head) = data
            .get(pos..pos + HEADER_LEN)
            .map(|h| <[u8; HEADER_LEN]>::try_from(h).expect("header length"))
        {
            let Ok((kind, count, rel_seq)) = decode_header(&head) else {
                break;
            };
            let seq = next_seq.wrapping_add(rel_seq);
            let mut head = head;
            if !matches!(kind, GET_DESCRIPTOR | LANE | EXCHANGE) {
                head[8..16].copy_from_slice(&seq.to_le_bytes());
            }
            out.extend_from_slice(&head);
            pos += HEADER_LEN;
            match kind {
                WRITE | READ => {
                    let n = count as usize;
                    let Some(raw) = data.get(pos..pos + n * DESC_LEN) else {
                        break;
                    };
                    pos += n * DESC_LEN;
                    let mut descs = Vec::with_capacity(n);
                    for d in raw.chunks_exact(DESC_LEN) {
                        let (rel, len, key) = decode_desc(d.try_into().expect("desc length"));
                        let addr = self.base.wrapping_add(rel);
                        let key = match key {
                            0 => self.rw_key,
                            1 => self.ro_key,
                            k => k,
                        };
                        out.extend_from_slice(&encode_desc(addr, len, key));
                        descs.push((addr, len, key));
                    }
                    if rel_seq != 0 || descs.iter().any(|d| d.1 > MAX_REQUEST) {
                        break; // out of sequence, or hostile size: the target closes
                    }
                    next_seq += n as u64;
                    let statuses: Vec<u8> = descs
                        .iter()
                        .map(|&(a, l, k)| self.status(kind, a, l, k))
                        .collect();
                    let accepted = descs
                        .iter()
                        .zip(&statuses)
                        .filter(|(_, s)| **s == OK)
                        .map(|(d, _)| ((d.0 - self.base) as usize, d.1 as usize));
                    if kind == READ {
                        let mut bytes = Vec::new();
                        for (at, len) in accepted {
                            bytes.extend_from_slice(&arena[at..at + len]);
                        }
                        due.push_back(Due::ReadData {
                            seq,
                            statuses,
                            data: bytes,
                        });
                        continue;
                    }
                    // WRITE: every payload follows, refused ones too; accepted bytes land
                    // as they arrive, even when the stream ends mid-payload.
                    let mut complete = true;
                    for ((addr, len, _), status) in descs.iter().zip(&statuses) {
                        let avail = data.len() - pos;
                        let take = (*len).min(avail as u64) as usize;
                        let payload = &data[pos..pos + take];
                        if *status == OK {
                            let at = (addr - self.base) as usize;
                            arena[at..at + take].copy_from_slice(payload);
                        }
                        out.extend_from_slice(payload);
                        pos += take;
                        if take as u64 != *len {
                            complete = false;
                            break;
                        }
                    }
                    if !complete {
                        break;
                    }
                    for (i, status) in statuses.into_iter().enumerate() {
                        due.push_back(Due::Ack {
                            seq: seq + i as u64,
                            status,
                        });
                    }
                }
                NOTIFY => {
                    let Some(body) = data.get(pos..pos + count as usize) else {
                        break;
                    };
                    out.extend_from_slice(body);
                    pos += body.len();
                    if rel_seq != 0 {
                        break;
                    }
                    next_seq += 1;
                    let status = if parse_notification(body).is_some() {
                        OK
                    } else {
                        MALFORMED
                    };
                    due.push_back(Due::Ack { seq, status });
                }
                GET_DESCRIPTOR => due.push_back(Due::Descriptor),
                // Answered at once, after the acknowledgements before it; no sequence
                // number. The header's count (1 to 64 KiB) was checked with it.
                EXCHANGE => {
                    let Some(body) = data.get(pos..pos + count as usize) else {
                        break;
                    };
                    out.extend_from_slice(body);
                    pos += body.len();
                    due.push_back(Due::Exchanged(exchanged(body)));
                }
                // Opens a data lane: no answer, no sequence number.
                LANE => {}
                // Anything else is not for a target: it closes.
                _ => break,
            }
        }
        // Whatever follows the point where the target closes is sent too.
        out.extend_from_slice(&data[pos.min(data.len())..]);
        (out, due, arena)
    }

    /// Sends the stream and collects everything the target answers until it closes.
    fn exchange(&self, out: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(self.addr).expect("connecting to the target");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut writer = s.try_clone().expect("socket clone");
        let mut answers = Vec::new();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                // The target may close early (a protocol error): the rest is refused.
                let _ = writer.write_all(out);
                let _ = writer.shutdown(Shutdown::Write);
            });
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => answers.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        panic!("the target neither answered nor closed within 10 s")
                    }
                    // A reset after a protocol error: what arrived before it counts.
                    Err(_) => break,
                }
            }
        });
        answers
    }
}

/// Checks the answers against the model: each must be the next one due; the last may
/// be cut short where the connection was reset.
fn check_answers(answers: &[u8], mut due: VecDeque<Due>) {
    let mut p = 0;
    while let Some(head) = answers.get(p..p + HEADER_LEN) {
        let (kind, count, seq) = decode_header(head.try_into().expect("header length"))
            .expect("the target sent a header it cannot decode itself");
        p += HEADER_LEN;
        let body = &answers[p..answers.len().min(p + count as usize)];
        p += body.len();
        let whole = body.len() == count as usize;
        match kind {
            ACK => {
                for (i, &status) in body.iter().enumerate() {
                    let want = due.pop_front();
                    assert_eq!(
                        want,
                        Some(Due::Ack {
                            seq: seq + i as u64,
                            status
                        }),
                        "acknowledgement {i} of frame {seq}"
                    );
                }
            }
            READ_DATA => {
                let Some(Due::ReadData {
                    seq: want_seq,
                    statuses,
                    data,
                }) = due.pop_front()
                else {
                    panic!("READ data for {seq} that nothing asked for");
                };
                assert_eq!(seq, want_seq);
                assert_eq!(body, &statuses[..body.len()], "READ statuses of {seq}");
                if !whole {
                    return;
                }
                let got = &answers[p..answers.len().min(p + data.len())];
                assert!(got == &data[..got.len()], "READ data of {seq} differs");
                p += got.len();
            }
            DESCRIPTOR => {
                assert_eq!(due.pop_front(), Some(Due::Descriptor));
                assert_eq!(body, &DESCRIPTOR_BODY[..body.len()]);
            }
            EXCHANGED => match due.pop_front() {
                Some(Due::Exchanged(Some(want))) => {
                    assert_eq!(count as usize, want.len(), "exchange answer length");
                    assert!(body == &want[..body.len()], "exchange answer differs");
                }
                // Refused by the target: status 1 and a UTF-8 reason.
                Some(Due::Exchanged(None)) => {
                    assert!(count >= 2, "a refusal without a reason");
                    assert_eq!(body.first(), Some(&1), "an unknown protocol was answered");
                    if whole {
                        assert!(std::str::from_utf8(&body[1..]).is_ok(), "reason not UTF-8");
                    }
                }
                other => panic!("an exchange answer where {other:?} was due"),
            },
            other => panic!("the target sent a frame of kind {other}"),
        }
        if !whole {
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let (out, due, want) = h.model(data);
    let answers = h.exchange(&out);
    check_answers(&answers, due);
    // The target closed the connection, so it is done with the arena.
    let mut now = vec![0u8; ARENA];
    assert!(h.arena.copy_to_slice_at(0, &mut now));
    let initial = pattern();
    let (rw, ro) = (RW.0 as usize..RW.1 as usize, RO.0 as usize..RO.1 as usize);
    assert!(
        now[..rw.start] == initial[..rw.start],
        "bytes below RW changed"
    );
    assert!(
        now[ro.clone()] == initial[ro.clone()],
        "read-only region changed"
    );
    assert!(now[ro.end..] == initial[ro.end..], "bytes above RO changed");
    assert!(
        now[rw.clone()] == want[rw.clone()],
        "RW differs from the model"
    );
    // The next input starts from the same bytes.
    assert!(h.arena.copy_from_slice_at(rw.start, &initial[rw]));
});
