//! Hostile peers against an engine's target, through the engine's API: a peer that never
//! reads a READ's answer cannot keep a registered buffer's drop waiting, idle sockets
//! cannot keep real clients out, and a shared secret keeps clients without it out.
//! Raw clients speak ferry's wire format (see transport-tcp's `frame` module) over
//! 127.0.0.1; every wait is bounded by a deadline.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::wire::{closed_by_target, desc, header, wait_for, READ, READ_DATA};
use common::{assert_bytes_eq, engine, engine_with, random, WAIT};
use ferry_engine::{Access, Location, Protocol, TcpConfig};
use ferry_transport_tcp::SharedSecret;

#[test]
fn dropping_a_registered_buffer_returns_while_a_peer_refuses_to_read_its_answer() {
    // Only deregistration can free the memory here: the progress limit is far beyond
    // the test's deadline.
    let target = engine_with(TcpConfig {
        progress_timeout: Duration::from_secs(3600),
        ..TcpConfig::default()
    });
    let len = 32 << 20;
    let mut memory = random(len).into_boxed_slice();
    // SAFETY: `memory` outlives the buffer: the buffer is dropped (and its drop returns,
    // which is what this test checks) before `memory` is.
    let buf = unsafe {
        target.register(
            memory.as_mut_ptr(),
            len,
            Location::host(),
            Access::RemoteReadWrite,
        )
    }
    .unwrap();
    let key = buf.descriptor().key(Protocol::Tcp).unwrap();
    let addr = buf.descriptor().addr;

    // A READ of the whole buffer whose answer the peer stops reading after the header.
    let mut s = TcpStream::connect(target.name()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut f = header(READ, 1, 0);
    f.extend(desc(addr, len as u64, key));
    s.write_all(&f).unwrap();
    let mut h = [0u8; 17];
    s.read_exact(&mut h).unwrap();
    assert_eq!((h[3], h[16]), (READ_DATA, 0), "the READ is being answered");

    let (tx, rx) = crossbeam_channel::bounded(1);
    let dropper = std::thread::spawn(move || {
        drop(buf);
        let _ = tx.send(());
    });
    rx.recv_timeout(WAIT)
        .expect("the buffer's drop must not wait for the stalled peer");
    dropper.join().unwrap();
    assert!(closed_by_target(&mut s));
    assert_eq!(target.tcp_stats().closed_on_deregister, 1);
    drop(memory);
}

#[test]
fn idle_sockets_cannot_keep_a_real_client_from_opening_the_segment() {
    let target = engine_with(TcpConfig {
        max_connections: 6,
        idle_timeout: Duration::from_millis(300),
        ..TcpConfig::default()
    });
    let remote_buf = target.allocate(1 << 16, Location::host()).unwrap();
    let name = target.name();
    let mut idle: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(&name).unwrap()).collect();
    wait_for("the idle sockets take every place", || {
        target.tcp_stats().connections == 6
    });
    for s in &mut idle {
        assert!(closed_by_target(s));
    }
    wait_for("their places are free", || {
        target.tcp_stats().open_connections == 0
    });
    assert_eq!(target.tcp_stats().idle_timeouts, 6);

    let initiator = engine();
    let local = initiator.allocate(1 << 16, Location::host()).unwrap();
    let data = random(1 << 16);
    local.write_at(0, &data).unwrap();
    let remote = initiator.open_segment(&name).unwrap().buffer(0).unwrap();
    let mut b = initiator.batch();
    b.write(&local, 0, &remote, 0, 1 << 16).unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    let mut got = vec![0u8; 1 << 16];
    remote_buf.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &data, "after the idle sockets");
}

fn with_secret(secret: Option<&str>) -> TcpConfig {
    TcpConfig {
        secret: secret.map(SharedSecret::from),
        ..TcpConfig::default()
    }
}

#[test]
fn engines_sharing_a_secret_transfer_and_others_are_refused() {
    let target = engine_with(with_secret(Some("a secret every engine here shares")));
    let remote_buf = target.allocate(1 << 16, Location::host()).unwrap();
    let name = target.name();

    let outsider = engine();
    let Err(err) = outsider.open_segment(&name) else {
        panic!("no secret, no segment")
    };
    assert!(chain(&err).contains("secret"), "{}", chain(&err));
    let wrong = engine_with(with_secret(Some("a secret no engine here shares")));
    let Err(err) = wrong.open_segment(&name) else {
        panic!("wrong secret, no segment")
    };
    assert!(chain(&err).contains("secret"), "{}", chain(&err));
    // The target counts each refusal on its connection's thread, which may finish after
    // the client has its error.
    wait_for("both refusals are counted", || {
        target.tcp_stats().auth_failures >= 2
    });

    let initiator = engine_with(with_secret(Some("a secret every engine here shares")));
    let local = initiator.allocate(1 << 16, Location::host()).unwrap();
    let data = random(1 << 16);
    local.write_at(0, &data).unwrap();
    let remote = initiator.open_segment(&name).unwrap().buffer(0).unwrap();
    let mut b = initiator.batch();
    b.write(&local, 0, &remote, 0, 1 << 16).unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    let mut got = vec![0u8; 1 << 16];
    remote_buf.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &data, "with the secret");
}

#[test]
fn an_initiators_idle_lanes_outlive_the_idle_limit() {
    let target = engine_with(TcpConfig {
        idle_timeout: Duration::from_millis(300),
        ..TcpConfig::default()
    });
    let kv = target.allocate(1 << 16, Location::host()).unwrap();
    let initiator = engine_with(TcpConfig {
        lanes: 2,
        ..TcpConfig::default()
    });
    let segment = initiator.open_segment(&target.name()).unwrap();
    // A silent socket opened after the lanes: once the target has closed it as idle, the
    // lanes have been idle longer still.
    let mut clock = TcpStream::connect(target.name()).unwrap();
    assert!(closed_by_target(&mut clock));
    let local = initiator.allocate(1 << 16, Location::host()).unwrap();
    let data = random(1 << 16);
    local.write_at(0, &data).unwrap();
    let remote = segment.buffer(0).unwrap();
    let mut b = initiator.batch();
    // Two slices' worth of tasks, so both lanes carry one.
    b.write(&local, 0, &remote, 0, 1 << 15).unwrap();
    b.write(&local, 1 << 15, &remote, 1 << 15, 1 << 15).unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    let mut got = vec![0u8; 1 << 16];
    kv.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &data, "written over lanes that sat idle");
    assert_eq!(
        target.tcp_stats().idle_timeouts,
        1,
        "only the silent socket"
    );
}

/// An error and its causes, as `anyhow` prints them with `{:#}`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
