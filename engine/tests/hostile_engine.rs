//! Hostile peers against the initiator side of an engine: descriptors that lie (about
//! whose segment it is, where the lanes should go, where buffers lie), a flood of
//! notifications, dead peers left in the cache, many opens at once, and an owner that
//! publishes more than a descriptor can carry. Hostile targets are hand-written
//! listeners on 127.0.0.1 that speak ferry's documented wire format.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::wire::{header, DESCRIPTOR, GET_DESCRIPTOR, LANE, WRITE};
use common::{assert_bytes_eq, engine, random, WAIT};
use crossbeam_channel::{Receiver, Sender};
use ferry_engine::{
    Access, Engine, Error, FailReason, Location, Protocol, RemoteStatus, SegmentDescriptor,
    TaskStatus,
};
use ferry_transport_api::{BufferDescriptor, Endpoint, TransportKey};

/// Fetches an engine's descriptor bytes from its port, as any client can.
fn fetch_raw(name: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(name).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&header(GET_DESCRIPTOR, 0, 0)).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[3], DESCRIPTOR);
    let mut body = vec![0u8; u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize];
    s.read_exact(&mut body).unwrap();
    body
}

/// The first frame a hostile target read on a data connection.
struct Frame {
    kind: u8,
    /// (address, length, key) per request.
    requests: Vec<(u64, u64, u64)>,
    /// A WRITE's payload.
    payload: Vec<u8>,
}

/// A hostile target: answers every descriptor request with `body` and, on any other
/// connection, reads the first frame, reports it and hangs up.
struct Hostile {
    name: String,
    frames: Receiver<Frame>,
}

fn hostile(body: Vec<u8>) -> Hostile {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let name = listener.local_addr().unwrap().to_string();
    let (tx, frames) = crossbeam_channel::unbounded();
    // The accept thread lives as long as the test process; nothing joins it.
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let (body, tx) = (body.clone(), tx.clone());
            std::thread::spawn(move || serve_hostile(s, &body, &tx));
        }
    });
    Hostile { name, frames }
}

fn serve_hostile(mut s: TcpStream, body: &[u8], tx: &Sender<Frame>) {
    let _ = s.set_read_timeout(Some(WAIT));
    let mut h = [0u8; 16];
    if s.read_exact(&mut h).is_err() {
        return;
    }
    // A data lane opens with a header-only `Lane` frame; the request comes next.
    if h[3] == LANE && s.read_exact(&mut h).is_err() {
        return;
    }
    let count = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    if h[3] == GET_DESCRIPTOR {
        let mut answer = header(DESCRIPTOR, body.len() as u32, 0);
        answer.extend_from_slice(body);
        let _ = s.write_all(&answer);
        return;
    }
    let mut raw = vec![0u8; count.min(256) * 24];
    if s.read_exact(&mut raw).is_err() {
        return;
    }
    let requests: Vec<(u64, u64, u64)> = raw
        .chunks(24)
        .map(|c| {
            let w = |i: usize| u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().unwrap());
            (w(0), w(1), w(2))
        })
        .collect();
    let mut payload = Vec::new();
    if h[3] == WRITE {
        let total: u64 = requests.iter().map(|r| r.1).sum();
        payload = vec![0u8; total.min(16 << 20) as usize];
        if s.read_exact(&mut payload).is_err() {
            return;
        }
    }
    let _ = tx.send(Frame {
        kind: h[3],
        requests,
        payload,
    });
}

fn tcp_endpoint(address: &str) -> Endpoint {
    Endpoint {
        protocol: Protocol::Tcp,
        address: address.into(),
    }
}

fn buffer(addr: u64, len: u64, key: u64) -> BufferDescriptor {
    BufferDescriptor {
        name: "kv".into(),
        addr,
        len,
        location: Location::host(),
        access: Access::RemoteReadWrite,
        keys: vec![TransportKey {
            protocol: Protocol::Tcp,
            key,
        }],
    }
}

/// Waits for a batch and returns every task's status.
fn statuses(batch: &ferry_engine::Batch, tasks: usize) -> Vec<TaskStatus> {
    let _ = batch.wait(WAIT);
    (0..tasks).map(|i| batch.task(i).unwrap()).collect()
}

/// A peer that serves the initiator's own descriptor is still that peer: a WRITE goes
/// to it (not into the initiator's own memory) and a READ does not return local bytes.
#[test]
fn a_peer_serving_our_own_descriptor_is_not_our_segment() {
    let initiator = engine();
    let own = initiator
        .allocate_with(4096, Location::host(), Access::RemoteReadWrite, "own")
        .unwrap();
    let own_bytes = random(4096);
    own.write_at(0, &own_bytes).unwrap();
    let local = initiator
        .allocate_with(8192, Location::host(), Access::Local, "")
        .unwrap();
    let data = random(4096);
    local.write_at(0, &data).unwrap();
    let untouched = random(4096);
    local.write_at(4096, &untouched).unwrap();

    let peer = hostile(fetch_raw(&initiator.name()));
    let segment = initiator.open_segment(&peer.name).unwrap();
    assert!(!segment.is_local(), "a peer's segment became the local one");
    assert_eq!(segment.tcp_address(), Some(peer.name.as_str()));
    assert_eq!(segment.name(), peer.name);

    let remote = segment.buffer_named("own").unwrap();
    let mut b = initiator.batch();
    b.write(&local, 0, &remote, 0, 4096).unwrap();
    let batch = b.submit().unwrap();
    // The peer reads the WRITE and hangs up without answering: the task must not
    // complete, and the payload reached the peer the segment was opened by.
    let frame = peer
        .frames
        .recv_timeout(WAIT)
        .expect("the WRITE reached the peer");
    assert_eq!(frame.kind, WRITE);
    assert_eq!(frame.requests[0].0, own.addr());
    assert_bytes_eq(&frame.payload, &data, "payload at the peer");
    assert_ne!(statuses(&batch, 1)[0], TaskStatus::Completed);
    drop(batch);

    // A READ goes to the peer too (opened again: the last connection died), and no
    // local byte is copied into the destination.
    let segment = initiator.open_segment(&peer.name).unwrap();
    assert!(!segment.is_local());
    let mut b = initiator.batch();
    b.read(&local, 4096, &segment.buffer_named("own").unwrap(), 0, 4096)
        .unwrap();
    let batch = b.submit().unwrap();
    let frame = peer
        .frames
        .recv_timeout(WAIT)
        .expect("the READ reached the peer");
    assert_ne!(frame.kind, WRITE);
    assert_ne!(statuses(&batch, 1)[0], TaskStatus::Completed);
    drop(batch);

    let mut got = vec![0u8; 4096];
    own.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &own_bytes, "the initiator's own published buffer");
    local.read_at(4096, &mut got).unwrap();
    assert_bytes_eq(&got, &untouched, "the READ's destination");
    // Its own name still opens the local segment.
    assert!(initiator
        .open_segment(&initiator.name())
        .unwrap()
        .is_local());
}

/// A descriptor whose TCP endpoint names a third engine does not send the lanes (and
/// the data) there: they go to the address the segment was opened by.
#[test]
fn descriptor_endpoints_do_not_redirect_the_lanes() {
    let third = engine();
    let victim = third.allocate(4096, Location::host()).unwrap();
    let victim_bytes = random(4096);
    victim.write_at(0, &victim_bytes).unwrap();
    // The hostile descriptor points at the third engine's port and names its buffer
    // with its real key, so a redirected WRITE would be accepted there.
    let lure = SegmentDescriptor {
        name: third.name(),
        incarnation: 1,
        endpoints: vec![tcp_endpoint(&third.name())],
        buffers: vec![buffer(
            victim.addr(),
            4096,
            victim.descriptor().key(Protocol::Tcp).unwrap(),
        )],
    };
    let peer = hostile(serde_json::to_vec(&lure).unwrap());

    let initiator = engine();
    let local = initiator.allocate(4096, Location::host()).unwrap();
    let data = random(4096);
    local.write_at(0, &data).unwrap();
    let segment = initiator.open_segment(&peer.name).unwrap();
    assert_eq!(segment.tcp_address(), Some(peer.name.as_str()));
    assert_eq!(segment.name(), peer.name, "the name it was opened by");
    let mut b = initiator.batch();
    b.write(&local, 0, &segment.buffer(0).unwrap(), 0, 4096)
        .unwrap();
    let batch = b.submit().unwrap();
    let frame = peer
        .frames
        .recv_timeout(WAIT)
        .expect("the WRITE reached the peer");
    assert_bytes_eq(&frame.payload, &data, "payload at the peer");
    assert_ne!(statuses(&batch, 1)[0], TaskStatus::Completed);

    assert_eq!(
        third.tcp_stats().connections,
        0,
        "the third engine was contacted"
    );
    let mut got = vec![0u8; 4096];
    victim.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &victim_bytes, "the third engine's buffer");
}

/// A buffer at 2^64-4096 of 4096 bytes (its end wraps to 0) and other impossible
/// descriptors are refused when the segment is opened, naming the peer.
#[test]
fn impossible_descriptors_are_refused_at_open() {
    let initiator = engine();
    let cases: Vec<(SegmentDescriptor, &str)> = vec![
        (
            SegmentDescriptor {
                name: "x".into(),
                incarnation: 1,
                endpoints: vec![tcp_endpoint("127.0.0.1:1")],
                buffers: vec![buffer(u64::MAX - 4095, 4096, 7)],
            },
            "address space",
        ),
        (
            SegmentDescriptor {
                name: "x".into(),
                incarnation: 1,
                endpoints: vec![tcp_endpoint("127.0.0.1:1")],
                buffers: vec![buffer(0x1000, u64::MAX, 7)],
            },
            "address space",
        ),
        (
            SegmentDescriptor {
                name: "x".into(),
                incarnation: 1,
                endpoints: vec![tcp_endpoint("127.0.0.1:1")],
                buffers: vec![BufferDescriptor {
                    keys: vec![TransportKey {
                        protocol: Protocol::Efa,
                        key: 1,
                    }],
                    ..buffer(0x1000, 4096, 7)
                }],
            },
            "no efa endpoint",
        ),
    ];
    for (descriptor, why) in cases {
        let peer = hostile(serde_json::to_vec(&descriptor).unwrap());
        let err = initiator.open_segment(&peer.name).unwrap_err();
        let msg = chain(&err);
        assert!(
            matches!(err, Error::OpenSegment { ref segment, .. } if *segment == peer.name),
            "{msg}"
        );
        assert!(msg.contains(why) && msg.contains("refused"), "{msg}");
        // The peer answered, with something unusable: not a reachability problem.
        assert_eq!(err.kind(), ferry_engine::ErrorKind::Rejected, "{msg}");
    }
    assert_eq!(initiator.cached_segments(), 0);
}

/// Notifications nobody reads are bounded in bytes: once 64 MiB are queued, further
/// ones are refused as busy and counted, and reading makes room again.
#[test]
fn unread_notifications_are_bounded_in_bytes() {
    let target = engine();
    let sender = engine();
    let segment = sender.open_segment(&target.name()).unwrap();
    let first = random(60 * 1024);
    let mut accepted = 0usize;
    let mut refused = false;
    // Twice the default budget: without a byte bound every one would be queued.
    for i in 0..(128usize << 20) / first.len() {
        let msg = if i == 0 {
            first.clone()
        } else {
            random(first.len())
        };
        match sender.notify(&segment, &msg) {
            Ok(()) => accepted += 1,
            Err(Error::Notify {
                reason: FailReason::Remote(RemoteStatus::Busy),
                ..
            }) => {
                refused = true;
                break;
            }
            Err(e) => panic!("notification {i}: {e}"),
        }
    }
    assert!(
        refused,
        "{accepted} notifications of 60 KiB were all queued"
    );
    assert!(accepted * first.len() <= 64 << 20, "{accepted} queued");
    assert!(accepted * first.len() > 60 << 20, "only {accepted} queued");
    assert_eq!(target.refused_notifications(), 1);
    let n = target.try_recv_notification().unwrap();
    assert_eq!(n.from, sender.name());
    assert_bytes_eq(&n.message, &first, "first notification");
    // One read made room for one more.
    sender.notify(&segment, &random(first.len())).unwrap();
    let mut drained = 1;
    while target.try_recv_notification().is_some() {
        drained += 1;
    }
    assert_eq!(drained, accepted + 1);
}

#[test]
fn the_notification_budget_is_configurable() {
    let target = Engine::builder()
        .transport(ferry_engine::Tcp::default())
        .notification_queue_bytes(256 * 1024)
        .build()
        .unwrap();
    let sender = engine();
    let segment = sender.open_segment(&target.name()).unwrap();
    let msg = random(60 * 1024);
    for _ in 0..4 {
        sender.notify(&segment, &msg).unwrap();
    }
    let err = sender.notify(&segment, &msg).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Notify {
                reason: FailReason::Remote(RemoteStatus::Busy),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(target.refused_notifications(), 1);
}

/// Segments whose connection died leave the cache when another segment is opened.
#[test]
fn dead_peers_leave_the_segment_cache() {
    let initiator = engine();
    let dying = engine();
    let _dying_buf = dying.allocate(4096, Location::host()).unwrap();
    let healthy = engine();
    let _healthy_buf = healthy.allocate(4096, Location::host()).unwrap();
    let local = initiator.allocate(4096, Location::host()).unwrap();
    let segment = initiator.open_segment(&dying.name()).unwrap();
    assert_eq!(initiator.cached_segments(), 1);
    drop(dying);
    // The connection is dead once a transfer on it fails.
    let remote = segment.buffer(0).unwrap();
    let give_up = Instant::now() + WAIT;
    loop {
        let mut b = initiator.batch();
        b.write(&local, 0, &remote, 0, 4096).unwrap();
        if b.submit().unwrap().wait(WAIT).is_err() {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "writes to a dead peer kept completing"
        );
    }
    drop((remote, segment));
    initiator.open_segment(&healthy.name()).unwrap();
    assert_eq!(
        initiator.cached_segments(),
        1,
        "the dead peer is still cached"
    );
}

/// Many opens of one name at once fetch its descriptor and connect once.
#[test]
fn opens_of_one_name_at_once_connect_once() {
    let target = engine();
    let target_buf = target.allocate(4096, Location::host()).unwrap();
    let initiator = engine();
    let threads = 8;
    let barrier = Barrier::new(threads);
    let segments: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    initiator.open_segment(&target.name()).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let local = initiator.allocate(4096, Location::host()).unwrap();
    let data = random(4096);
    local.write_at(0, &data).unwrap();
    let mut b = initiator.batch();
    b.write(
        &local,
        0,
        &segments[threads - 1].buffer(0).unwrap(),
        0,
        4096,
    )
    .unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    let mut got = vec![0u8; 4096];
    target_buf.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &data, "after concurrent opens");
    // Every connection made so far was accepted by now: the fetches were answered and
    // the lane carried the WRITE. One descriptor fetch and one lane.
    assert_eq!(target.tcp_stats().connections, 2);
}

/// An owner refuses, at registration, a buffer that would make its descriptor larger
/// than peers accept, saying what to do; what it did publish stays openable.
#[test]
fn registration_past_the_descriptor_cap_is_refused() {
    let owner = engine();
    let long_name = "n".repeat(1 << 20);
    let mut kept = Vec::new();
    let err = loop {
        match owner.allocate_with(4096, Location::host(), Access::RemoteRead, &long_name) {
            Ok(b) => kept.push(b),
            Err(e) => break e,
        }
        assert!(kept.len() <= 16, "a 17 MiB descriptor was published");
    };
    let msg = err.to_string();
    assert!(
        msg.contains("16 MiB") && msg.contains("fewer, larger buffers"),
        "{msg}"
    );
    assert_eq!(kept.len(), 15);
    // A buffer that fits is still accepted.
    let small = owner.allocate(4096, Location::host()).unwrap();
    let data = random(4096);
    small.write_at(0, &data).unwrap();
    // Withdrawn buffers free their part: another long one fits again.
    kept.remove(3);
    kept.push(
        owner
            .allocate_with(4096, Location::host(), Access::RemoteRead, &long_name)
            .unwrap(),
    );
    // The encoded descriptor a peer fetches is the owner's descriptor.
    let served: SegmentDescriptor = serde_json::from_slice(&fetch_raw(&owner.name())).unwrap();
    assert_eq!(served, owner.descriptor());
    assert_eq!(served.buffers.len(), 16);

    let peer = engine();
    let segment = peer.open_segment(&owner.name()).unwrap();
    assert_eq!(segment.buffers().len(), 16);
    let i = segment
        .buffers()
        .iter()
        .position(|d| d.addr == small.addr())
        .unwrap();
    let local = peer.allocate(4096, Location::host()).unwrap();
    let mut b = peer.batch();
    b.read(&local, 0, &segment.buffer(i).unwrap(), 0, 4096)
        .unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    let mut got = vec![0u8; 4096];
    local.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &data, "read from the owner");
}

/// A peer whose port stops accepting after it served its descriptor, so the lanes'
/// connect hangs until its timeout: opening another, healthy segment meanwhile is not
/// held up by it.
#[test]
fn a_hanging_connect_does_not_hold_up_other_opens() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let name = listener.local_addr().unwrap().to_string();
    let lure = SegmentDescriptor {
        name: name.clone(),
        incarnation: 1,
        endpoints: vec![tcp_endpoint(&name)],
        buffers: vec![buffer(0x10000, 4096, 7)],
    };
    let body = serde_json::to_vec(&lure).unwrap();
    let (answered_tx, answered) = crossbeam_channel::bounded(1);
    let (end_tx, end) = crossbeam_channel::bounded::<()>(1);
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        // Fill the accept queue: further connects get no answer until they time out.
        let mut fillers = Vec::new();
        while let Ok(f) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(f);
            assert!(fillers.len() < 100_000);
        }
        let mut answer = header(DESCRIPTOR, body.len() as u32, 0);
        answer.extend_from_slice(&body);
        s.write_all(&answer).unwrap();
        answered_tx.send(()).unwrap();
        let _ = end.recv();
        drop((fillers, listener));
    });

    let healthy = engine();
    let _buf = healthy.allocate(4096, Location::host()).unwrap();
    let initiator = common::engine_with(ferry_engine::TcpConfig {
        connect_timeout: Duration::from_secs(3),
        ..ferry_engine::TcpConfig::default()
    });
    let hanging_done = AtomicBool::new(false);
    let opened_meanwhile = std::thread::scope(|s| {
        s.spawn(|| {
            let r = initiator.open_segment(&name);
            hanging_done.store(true, Ordering::SeqCst);
            assert!(r.is_err(), "the lanes could not have connected");
        });
        answered.recv_timeout(WAIT).unwrap();
        let mut opened = 0;
        while !hanging_done.load(Ordering::SeqCst) {
            initiator.refresh_segment(&healthy.name()).unwrap();
            if !hanging_done.load(Ordering::SeqCst) {
                opened += 1;
            }
        }
        opened
    });
    drop(end_tx);
    assert!(
        opened_meanwhile >= 3,
        "only {opened_meanwhile} opens of a healthy segment completed while a connect hung"
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
