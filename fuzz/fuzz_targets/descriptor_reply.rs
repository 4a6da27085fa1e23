//! What an engine reads when it fetches a peer's descriptor
//! (`ferry_transport_tcp::fetch_descriptor_with`) or sends it a set-up exchange
//! (`ferry_transport_tcp::exchange_with`): a fake target answers the request, or the
//! authentication hello, with the input and closes. The first input byte says whether
//! the client holds a shared secret (bit 0) and whether it exchanges rather than fetches
//! (bit 1); the rest is the reply.
//!
//! Oracle: without a secret the fetch returns a body exactly when the reply opens with a
//! valid `Descriptor` header and holds all the bytes it announces, and the body is those
//! bytes; the exchange returns an answer exactly when the reply opens with a valid
//! `Exchanged` header, holds all its bytes and the first is 0 (accepted), and the answer
//! is the rest; a status of 1 is an error carrying the peer's reason. With a secret
//! neither ever succeeds (the reply cannot prove the secret). Neither panics nor waits
//! past its deadline.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_transport_api::Protocol;
use ferry_transport_tcp::fuzzing::{decode_header, HEADER_LEN};
use ferry_transport_tcp::{exchange_with, fetch_descriptor_with, SharedSecret};
use libfuzzer_sys::fuzz_target;

const DESCRIPTOR: u8 = 5;
const EXCHANGED: u8 = 13;
const DEADLINE: Duration = Duration::from_secs(5);

struct Fake {
    addr: String,
    reply: &'static Mutex<Vec<u8>>,
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

fn fake() -> &'static Fake {
    static F: OnceLock<Fake> = OnceLock::new();
    static REPLY: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    F.get_or_init(|| {
        ignore_sigpipe();
        let listener = TcpListener::bind("127.0.0.1:0").expect("loopback listener");
        let addr = listener.local_addr().expect("bound").to_string();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let reply = REPLY.lock().expect("reply").clone();
                std::thread::spawn(move || {
                    let _ = conn.write_all(&reply);
                    let _ = conn.shutdown(Shutdown::Write);
                    let _ = conn.set_read_timeout(Some(DEADLINE));
                    let mut sink = [0u8; 1024];
                    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                });
            }
        });
        Fake {
            addr,
            reply: &REPLY,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, reply)) = data.split_first() else {
        return;
    };
    let f = fake();
    *f.reply.lock().expect("reply") = reply.to_vec();
    let secret = (mode & 1 == 1).then(|| SharedSecret::new("the client's secret"));
    let exchange = mode & 2 == 2;
    let start = Instant::now();
    let got = if exchange {
        exchange_with(
            &f.addr,
            Protocol::Rdma,
            b"a set-up message",
            DEADLINE,
            secret.as_ref(),
        )
    } else {
        fetch_descriptor_with(&f.addr, DEADLINE, secret.as_ref())
    };
    assert!(
        start.elapsed() < DEADLINE + Duration::from_secs(2),
        "the request outlived its deadline"
    );
    if secret.is_some() {
        assert!(
            got.is_err(),
            "a reply without the secret's proof was accepted"
        );
        return;
    }
    let want_kind = if exchange { EXCHANGED } else { DESCRIPTOR };
    let framed = reply
        .get(..HEADER_LEN)
        .and_then(|h| decode_header(h.try_into().expect("header length")).ok())
        .filter(|(kind, ..)| *kind == want_kind)
        .and_then(|(_, count, _)| reply.get(HEADER_LEN..HEADER_LEN + count as usize));
    // What the client returns for a whole frame: a descriptor's body as it is; an
    // exchange's answer after status 0, an error after status 1, an error otherwise.
    let want = match framed {
        Some(body) if exchange => match body.split_first() {
            Some((0, answer)) => Some(Ok(answer)),
            Some((1, why)) => Some(Err(String::from_utf8_lossy(why).into_owned())),
            _ => Some(Err(String::new())),
        },
        Some(body) => Some(Ok(body)),
        None => None,
    };
    match (got, want) {
        (Ok(body), Some(Ok(want))) => assert_eq!(body, want),
        (Err(e), Some(Err(why))) => {
            assert!(
                e.to_string().contains(&why),
                "`{e}` lost the reason `{why}`"
            );
        }
        (Err(_), None) => {}
        (Ok(body), None | Some(Err(_))) => {
            panic!("accepted a {} byte body from a bad reply", body.len())
        }
        (Err(e), Some(Ok(_))) => panic!("refused a well-formed reply: {e}"),
    }
});
