//! The initiator's side of a lane fed a hostile target's answers: acknowledgements,
//! READ data, sequence numbers and statuses as a fake target on loopback sends them.
//!
//! Input: one byte (bits 0-1: `n - 1`, one to four requests; bit 2: the waiting thread
//! drives the connection, reading the answers itself through `Connection::drive`,
//! instead of leaving them to the lane's receiver thread), then three bytes per request (bit 0
//! of the first: READ or WRITE; the next two, little endian: the length less one, up to
//! 4096), then the bytes the fake target answers with before it closes. A fresh lane
//! starts its sequence at 0, so recorded answers replay as they are.
//!
//! Oracle: every request posted completes exactly once, by its deadline (the answers
//! end, so none may wait for it); a READ completes `Ok` only with its full length; local
//! memory outside the READ destinations never changes, and neither do WRITE sources.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_transport_api::{
    CompletionToken, Completions, ControlPlane, Endpoint, FailReason, Location, NoExchange, Opcode,
    Protocol, RegionMemory, RemoteKeys, Slice, Transport, TransportContext,
};
use ferry_transport_tcp::{TcpConfig, TcpTransport};
use libfuzzer_sys::fuzz_target;

/// Local memory: four request areas of 4096 bytes with 64 guard bytes around each.
const GUARD: usize = 64;
const AREA: usize = 4096 + GUARD;
const LOCAL: usize = GUARD + 4 * AREA;
const DEADLINE: Duration = Duration::from_secs(5);

type Done = (CompletionToken, Result<usize, FailReason>);

struct Channel(Sender<Done>);

impl Completions for Channel {
    fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
        let _ = self.0.send((token, result));
    }
}

struct NoControl;

impl ControlPlane for NoControl {
    fn descriptor(&self) -> Vec<u8> {
        Vec::new()
    }
    fn notification(&self, _from: &str, _body: &[u8]) -> bool {
        false
    }
}

struct Harness {
    tcp: TcpTransport,
    done: Receiver<Done>,
    local: Arc<RegionMemory>,
}

fn pattern() -> Vec<u8> {
    (0..LOCAL)
        .map(|i| (i as u8).wrapping_mul(73) ^ 0xa5)
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
        let (tx, rx) = crossbeam_channel::unbounded();
        let tcp = TcpTransport::new(TcpConfig::default());
        tcp.start(TransportContext {
            completions: Arc::new(Channel(tx)),
            control: (Arc::new(NoControl) as Arc<dyn ControlPlane>).into(),
            staging: None,
        })
        .expect("the initiator starts on loopback");
        let owner: Box<[u8]> = pattern().into_boxed_slice();
        let ptr = NonNull::new(owner.as_ptr() as *mut u8).expect("non-null");
        // SAFETY: the boxed bytes move into the region as its owner; the harness reads
        // them only once every request that touches them has completed.
        let local = Arc::new(unsafe {
            RegionMemory::from_raw(ptr, LOCAL, Location::host(), Box::new(owner))
        });
        Harness {
            tcp,
            done: rx,
            local,
        }
    })
}

/// A fresh loopback address for each input's fake target, on a port the system picks.
/// Each input leaves its fake target's port in TIME_WAIT (the fake target closes
/// first); spread over 65,536 addresses of 127.0.0.0/8, hundreds of inputs a second
/// never use up one address's ephemeral ports.
fn loopback_address() -> (std::net::Ipv4Addr, u16) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let [_, _, hi, lo] = n.to_be_bytes();
    (std::net::Ipv4Addr::new(127, 1, hi, lo), 0)
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let drive = n & 4 != 0;
    let n = usize::from(n & 3) + 1;
    let Some((specs, reply)) = rest.split_at_checked(3 * n) else {
        return;
    };
    let requests: Vec<(Opcode, usize)> = specs
        .chunks_exact(3)
        .map(|c| {
            let op = if c[0] & 1 == 1 {
                Opcode::Read
            } else {
                Opcode::Write
            };
            (op, usize::from(u16::from_le_bytes([c[1], c[2]]) % 4096) + 1)
        })
        .collect();
    let h = harness();
    // The fake target: answers with the input once the lane connects, then closes.
    let listener = TcpListener::bind(loopback_address()).expect("loopback listener");
    let address = listener.local_addr().expect("bound").to_string();
    let reply = reply.to_vec();
    let fake = std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let _ = s.write_all(&reply);
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.set_read_timeout(Some(DEADLINE));
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    let conn = h
        .tcp
        .connect(
            &Endpoint {
                protocol: Protocol::Tcp,
                address,
            },
            &NoExchange,
        )
        .expect("connecting to the fake target");
    let start = Instant::now();
    let mut posted = Vec::new();
    for (i, &(op, len)) in requests.iter().enumerate() {
        let token = CompletionToken {
            slot: 0,
            generation: 0,
            task: i as u32,
        };
        let slice = Slice {
            op,
            local: h.local.clone(),
            local_offset: GUARD + i * AREA,
            remote_addr: 0x1000_0000 + (i as u64) * 0x1_0000,
            remote_base: 0x1000_0000,
            remote_keys: RemoteKeys::single(0x5eed),
            len,
            token,
            deadline: start + DEADLINE,
        };
        // A refused post completes nothing and will not be reported.
        posted.push(conn.post(slice).is_ok());
    }
    conn.flush();
    let mut results: Vec<Option<Result<usize, FailReason>>> = vec![None; requests.len()];
    let expected = posted.iter().filter(|p| **p).count();
    let driving = drive && conn.start_driving();
    let give_up = start + DEADLINE + Duration::from_secs(5);
    for _ in 0..expected {
        let (token, result) = if driving {
            loop {
                if let Ok(done) = h.done.try_recv() {
                    break done;
                }
                assert!(Instant::now() < give_up, "a request never completed");
                conn.drive();
                std::thread::yield_now();
            }
        } else {
            h.done
                .recv_deadline(give_up)
                .expect("a request never completed")
        };
        let i = token.task as usize;
        assert!(
            posted[i],
            "request {i} completed though its post was refused"
        );
        assert!(results[i].is_none(), "request {i} completed twice");
        results[i] = Some(result);
    }
    if driving {
        conn.stop_driving();
    }
    fake.join().expect("fake target");
    assert!(
        h.done.try_recv().is_err(),
        "a completion arrived for nothing"
    );
    let mut now = vec![0u8; LOCAL];
    assert!(h.local.copy_to_slice_at(0, &mut now));
    let initial = pattern();
    for (i, (&(op, len), result)) in requests.iter().zip(&results).enumerate() {
        if let Some(Ok(done)) = result {
            assert_eq!(
                *done, len,
                "request {i} completed with {done} of {len} bytes"
            );
        }
        let at = GUARD + i * AREA;
        let writable = op == Opcode::Read;
        if !writable {
            assert!(
                now[at..at + len] == initial[at..at + len],
                "WRITE source {i} changed"
            );
        }
        // Everything past the request's own bytes, up to the next area.
        assert!(
            now[at + len..at + AREA] == initial[at + len..at + AREA],
            "bytes after request {i} changed"
        );
    }
    assert!(
        now[..GUARD] == initial[..GUARD],
        "bytes before the first request changed"
    );
    let used = GUARD + requests.len() * AREA;
    assert!(
        now[used..] == initial[used..],
        "bytes of unused areas changed"
    );
    // The next input starts from the same bytes.
    assert!(h.local.copy_from_slice_at(0, &initial));
});
