//! Hostile input on the engine's port, spoken as raw bytes in ferry's documented wire
//! format (see transport-tcp's `frame` module), while a well-behaved client keeps
//! transferring. Every bad request is refused, nothing outside what a request may touch
//! changes, and the good client is served correctly throughout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::wire::{closed_by_target, desc, header, ACK, NOTIFY, READ, READ_DATA, WRITE};
use common::{assert_bytes_eq, engine, random, WAIT};
use ferry_engine::{Access, Location, Protocol};

fn connect(name: &str) -> TcpStream {
    let s = TcpStream::connect(name).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads one answer: (kind, seq, statuses).
fn answer(s: &mut TcpStream) -> (u8, u64, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..3], b"FY\x01");
    let count = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let seq = u64::from_le_bytes(h[8..16].try_into().unwrap());
    let mut st = vec![0u8; count];
    s.read_exact(&mut st).unwrap();
    (h[3], seq, st)
}

#[test]
fn hostile_input_is_refused_and_good_clients_keep_being_served() {
    let target = engine();
    let len = 64 * 1024;
    let a = target
        .allocate_with(len, Location::host(), Access::RemoteReadWrite, "a")
        .unwrap();
    let b = target
        .allocate_with(len, Location::host(), Access::Local, "b")
        .unwrap();
    let c = target
        .allocate_with(len, Location::host(), Access::RemoteRead, "c")
        .unwrap();
    let _good = target
        .allocate_with(1 << 20, Location::host(), Access::RemoteReadWrite, "good")
        .unwrap();
    let (pa, pb, pc) = (random(len), random(len), random(len));
    a.write_at(0, &pa).unwrap();
    b.write_at(0, &pb).unwrap();
    c.write_at(0, &pc).unwrap();
    let key_a = a.descriptor().key(Protocol::Tcp).unwrap();
    let key_b = b.descriptor().key(Protocol::Tcp).unwrap();
    let key_c = c.descriptor().key(Protocol::Tcp).unwrap();
    let name = target.name();

    // A good client transfers and verifies in a loop for the whole test.
    let good = engine();
    let done = AtomicBool::new(false);
    let rounds = AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let local = good.allocate(2 << 20, Location::host()).unwrap();
            let remote = good
                .open_segment(&name)
                .unwrap()
                .buffer_named("good")
                .unwrap();
            while !done.load(Ordering::Relaxed) || rounds.load(Ordering::Relaxed) < 3 {
                let data = random(1 << 20);
                local.write_at(0, &data).unwrap();
                let mut batch = good.batch();
                batch.write(&local, 0, &remote, 0, 1 << 20).unwrap();
                batch
                    .submit()
                    .unwrap()
                    .wait(WAIT)
                    .expect("good client's WRITE");
                let mut batch = good.batch();
                batch.read(&local, 1 << 20, &remote, 0, 1 << 20).unwrap();
                batch
                    .submit()
                    .unwrap()
                    .wait(WAIT)
                    .expect("good client's READ");
                let mut back = vec![0u8; 1 << 20];
                local.read_at(1 << 20, &mut back).unwrap();
                assert_bytes_eq(&back, &data, "good client");
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        });

        let before = target.tcp_stats();

        // 1. Garbage bytes: the connection is closed.
        let mut s1 = connect(&name);
        s1.write_all(&random(4096)).unwrap();
        assert!(
            closed_by_target(&mut s1),
            "garbage must close the connection"
        );

        // 2. A truncated frame: half a descriptor, then the client goes away.
        let mut s2 = connect(&name);
        let mut f = header(WRITE, 1, 0);
        f.extend_from_slice(&desc(a.addr(), 16, key_a)[..12]);
        s2.write_all(&f).unwrap();
        drop(s2);

        // 3. Huge lengths: a request of 2^62 bytes, a notification of 4 GiB.
        let mut s3 = connect(&name);
        let mut f = header(WRITE, 1, 0);
        f.extend_from_slice(&desc(a.addr(), 1 << 62, key_a));
        s3.write_all(&f).unwrap();
        assert!(
            closed_by_target(&mut s3),
            "a huge request must close the connection"
        );
        let mut s3b = connect(&name);
        s3b.write_all(&header(NOTIFY, u32::MAX, 0)).unwrap();
        assert!(
            closed_by_target(&mut s3b),
            "a huge notification must close the connection"
        );

        // 4-7 on one connection: each bad request is refused, the stream stays in step,
        // and a good request after them on the same connection is served.
        let mut s4 = connect(&name);
        let mut f = header(WRITE, 4, 0);
        f.extend(desc(a.addr() + len as u64 - 10, 100, key_a)); // out of bounds
        f.extend(desc(a.addr() + 100, 100, key_a ^ 1)); // wrong key
        f.extend(desc(b.addr(), 100, key_b)); // registered, not remote-writable
        f.extend(desc(c.addr(), 100, key_c)); // remote read-only
        f.extend(vec![0xEE; 400]);
        s4.write_all(&f).unwrap();
        let (kind, seq, st) = answer(&mut s4);
        assert_eq!((kind, seq), (ACK, 0));
        assert_eq!(
            st,
            vec![3, 2, 4, 4],
            "out of bounds, key mismatch, access denied x2"
        );

        let mut f = header(READ, 3, 4);
        f.extend(desc(b.addr(), 64, key_b)); // not remote-readable
        f.extend(desc(0x1000, 64, key_a)); // not registered at all
        f.extend(desc(a.addr() + 5, 64, key_a)); // fine
        s4.write_all(&f).unwrap();
        let (kind, seq, st) = answer(&mut s4);
        assert_eq!((kind, seq), (READ_DATA, 4));
        assert_eq!(st, vec![4, 1, 0]);
        // Only the accepted request's bytes follow.
        let mut data = vec![0u8; 64];
        s4.read_exact(&mut data).unwrap();
        assert_bytes_eq(&data, &pa[5..69], "the one accepted READ");

        let mut f = header(WRITE, 1, 7);
        f.extend(desc(a.addr() + 1000, 8, key_a));
        f.extend(b"accepted");
        s4.write_all(&f).unwrap();
        let (kind, seq, st) = answer(&mut s4);
        assert_eq!((kind, seq, st), (ACK, 7, vec![0]));

        // 8. A sequence number out of step closes the connection.
        let mut f = header(READ, 1, 99);
        f.extend(desc(a.addr(), 8, key_a));
        s4.write_all(&f).unwrap();
        assert!(
            closed_by_target(&mut s4),
            "a sequence violation must close the connection"
        );

        let after = target.tcp_stats();
        assert!(
            after.rejected_requests - before.rejected_requests >= 6,
            "{before:?} -> {after:?}"
        );
        assert!(
            after.protocol_errors - before.protocol_errors >= 4,
            "{before:?} -> {after:?}"
        );
        done.store(true, Ordering::Relaxed);
    });
    assert!(rounds.load(Ordering::Relaxed) >= 3);

    // Nothing was written that no accepted request named.
    let mut got = vec![0u8; len];
    let mut want = pa.clone();
    want[1000..1008].copy_from_slice(b"accepted");
    a.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &want, "buffer a");
    b.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &pb, "local-only buffer b");
    c.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &pc, "read-only buffer c");
}

#[test]
fn many_garbage_connections_at_once_do_not_stop_the_target() {
    let target = engine();
    let name = target.name();
    let remote_buf = target.allocate(1 << 16, Location::host()).unwrap();
    std::thread::scope(|s| {
        for i in 0..16 {
            let name = name.clone();
            s.spawn(move || {
                let mut c = connect(&name);
                // Valid magic and version, then nonsense: bad kinds and zero counts.
                let mut f = header(9 + (i % 3) as u8, 0, 0);
                f.extend(random(64));
                let _ = c.write_all(&f);
                assert!(closed_by_target(&mut c));
            });
        }
    });
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
    assert_bytes_eq(&got, &data, "after garbage");
    assert!(target.tcp_stats().protocol_errors >= 16);
}

#[test]
fn connections_beyond_the_limit_are_refused_and_others_served() {
    let target = common::engine_with(ferry_engine::TcpConfig {
        max_connections: 4,
        ..ferry_engine::TcpConfig::default()
    });
    let name = target.name();
    let remote_buf = target.allocate(4096, Location::host()).unwrap();
    // Four idle connections hold every place.
    let idle: Vec<TcpStream> = (0..4).map(|_| connect(&name)).collect();
    let mut extra = connect(&name);
    assert!(
        closed_by_target(&mut extra),
        "the fifth connection must be closed"
    );
    assert_eq!(target.tcp_stats().refused_connections, 1);
    // Once the idle ones go, a real client is served.
    drop(idle);
    let initiator = common::engine();
    let local = initiator.allocate(4096, Location::host()).unwrap();
    let data = random(4096);
    local.write_at(0, &data).unwrap();
    // The target lets go of the idle connections as their threads see them close.
    let give_up = std::time::Instant::now() + WAIT;
    while target.tcp_stats().open_connections > 0 {
        assert!(
            std::time::Instant::now() < give_up,
            "idle connections never closed"
        );
        std::thread::yield_now();
    }
    let remote = initiator.open_segment(&name).unwrap().buffer(0).unwrap();
    let mut b = initiator.batch();
    b.write(&local, 0, &remote, 0, 4096).unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    let mut got = vec![0u8; 4096];
    remote_buf.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &data, "after the limit");
}
