//! A live TCP target that requires a shared secret, fed the byte stream of a peer that
//! does not know it: malformed hellos, hellos followed by replayed or forged proofs, data
//! frames sent without authenticating.
//!
//! Oracle: nothing but the authentication exchange is ever answered. The target sends
//! only `Challenge` frames (a refusal of count 0, or one challenge of 64 bytes answering a
//! well-formed hello), then closes; the registered region never changes, although the
//! harness follows every input with a WRITE that names the region's real key.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_transport_api::{
    Access, CompletionToken, Completions, ControlPlane, FailReason, Location, RegionMemory,
    Transport, TransportContext,
};
use ferry_transport_tcp::fuzzing::{decode_header, encode_desc, encode_header, HEADER_LEN};
use ferry_transport_tcp::{SharedSecret, TcpConfig, TcpTransport};
use libfuzzer_sys::fuzz_target;

const LEN: usize = 4096;
const WRITE: u8 = 1;
const HELLO: u8 = 8;
const CHALLENGE: u8 = 9;
/// A nonce's and a proof's length.
const AUTH_LEN: usize = 32;

struct Control;

impl ControlPlane for Control {
    fn descriptor(&self) -> Vec<u8> {
        b"{}".to_vec()
    }
    fn notification(&self, _from: &str, _body: &[u8]) -> bool {
        true
    }
}

struct NoCompletions;

impl Completions for NoCompletions {
    fn complete(&self, _token: CompletionToken, _result: Result<usize, FailReason>) {}
}

struct Harness {
    _tcp: TcpTransport,
    addr: SocketAddr,
    region: Arc<RegionMemory>,
    key: u64,
}

fn pattern() -> Vec<u8> {
    (0..LEN)
        .map(|i| (i as u8).wrapping_mul(37) ^ 0x5a)
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
        let tcp = TcpTransport::new(TcpConfig {
            secret: Some(SharedSecret::new("fuzzing secret, never sent")),
            ..TcpConfig::default()
        });
        let ep = tcp
            .start(TransportContext {
                completions: Arc::new(NoCompletions),
                // The port's transport is the one given the control plane.
                control: (Arc::new(Control) as Arc<dyn ControlPlane>).into(),
                staging: None,
            })
            .expect("the target starts on loopback");
        let owner: Box<[u8]> = pattern().into_boxed_slice();
        let ptr = NonNull::new(owner.as_ptr() as *mut u8).expect("non-null");
        // SAFETY: the boxed bytes move into the region as its owner; the harness reads
        // them only after the target closed the connection.
        let region = Arc::new(unsafe {
            RegionMemory::from_raw(ptr, LEN, Location::host(), Box::new(owner))
        });
        let key = tcp.register(&region, Access::RemoteReadWrite).unwrap()[0];
        Harness {
            _tcp: tcp,
            addr: ep.address.parse().expect("a socket address"),
            region,
            key,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    // A WRITE that would land if the target ever served this peer.
    let mut tail = encode_header(WRITE, 1, 0)
        .expect("WRITE is a kind")
        .to_vec();
    tail.extend_from_slice(&encode_desc(h.region.addr(), 8, h.key));
    tail.extend_from_slice(&[0xee; 8]);
    let out = [data, &tail[..]].concat();
    let mut s = TcpStream::connect(h.addr).expect("connecting to the target");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut writer = s.try_clone().expect("socket clone");
    let mut answers = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = writer.write_all(&out);
            let _ = writer.shutdown(Shutdown::Write);
        });
        let mut buf = [0u8; 4096];
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
                Err(_) => break,
            }
        }
    });
    // What the target read first: the input, or the input followed by the WRITE (which
    // may complete a short hello's nonce).
    let sent = [data, &tail[..]].concat();
    let hello = sent
        .get(..HEADER_LEN)
        .and_then(|b| decode_header(b.try_into().expect("header length")).ok())
        .is_some_and(|(kind, count, _)| kind == HELLO && count as usize == AUTH_LEN)
        && sent.len() >= HEADER_LEN + AUTH_LEN;
    let mut p = 0;
    let mut frames = 0;
    while let Some(head) = answers.get(p..p + HEADER_LEN) {
        let (kind, count, _) = decode_header(head.try_into().expect("header length"))
            .expect("the target sent a header it cannot decode itself");
        assert_eq!(kind, CHALLENGE, "an unauthenticated peer was answered");
        assert!(
            count == 0 || (hello && count as usize == 2 * AUTH_LEN),
            "challenge of {count} bytes (hello: {hello})"
        );
        frames += 1;
        p += HEADER_LEN + count as usize;
    }
    assert!(frames <= 1, "{frames} frames to an unauthenticated peer");
    let mut now = vec![0u8; LEN];
    assert!(h.region.copy_to_slice_at(0, &mut now));
    assert!(
        now == pattern(),
        "an unauthenticated peer changed registered memory"
    );
});
