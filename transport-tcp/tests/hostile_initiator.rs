//! The initiator against hostile and stalling peers: raw listeners on 127.0.0.1 that
//! speak ferry's frame format by hand and then stop answering, stop reading, stop in the
//! middle of an answer, or die. Every wait is bounded; what is asserted is how tasks end,
//! what lands in local memory, and what the initiator holds afterwards.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_transport_api::testing::warnings;
use ferry_transport_api::{
    CompletionToken, Completions, Connection, ControlPlane, FailReason, Location, Opcode,
    RegionMemory, RemoteKeys, Slice, Transport, TransportContext,
};
use ferry_transport_tcp::{TcpConfig, TcpConnection, TcpStats, TcpTransport};
use rand::RngCore;

/// Bound of every wait in these tests: far beyond the deadlines they use, so a wait that
/// runs into it means the initiator hung.
const LIMIT: Duration = Duration::from_secs(20);
/// A deadline no test reaches.
const FAR: Duration = Duration::from_secs(120);
/// The short deadline the hostile peer makes pass.
const SHORT: Duration = Duration::from_millis(300);

const HEADER_LEN: usize = 16;
const DESC_LEN: usize = 24;
const WRITE: u8 = 1;
const READ: u8 = 2;
const NOTIFY: u8 = 3;
const ACK: u8 = 6;
const READ_DATA: u8 = 7;
const LANE: u8 = 11;

fn header(kind: u8, count: u32, seq: u64) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..2].copy_from_slice(b"FY");
    b[2] = 1;
    b[3] = kind;
    b[4..8].copy_from_slice(&count.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b
}

/// A frame as the hostile peer reads it: kind, count, first sequence number, the
/// descriptors' lengths (requests) and the bytes that followed (payloads, body).
struct Frame {
    kind: u8,
    seq: u64,
    lens: Vec<u64>,
    body: Vec<u8>,
}

fn read_frame(s: &mut TcpStream) -> io::Result<Frame> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h)?;
    assert_eq!(&h[0..2], b"FY", "a ferry frame");
    if h[3] == LANE {
        // A lane's opening frame: the requests follow.
        return read_frame(s);
    }
    let kind = h[3];
    let count = u32::from_le_bytes(h[4..8].try_into().unwrap());
    let seq = u64::from_le_bytes(h[8..16].try_into().unwrap());
    let mut lens = Vec::new();
    let mut body = Vec::new();
    match kind {
        WRITE | READ => {
            let mut d = vec![0u8; count as usize * DESC_LEN];
            s.read_exact(&mut d)?;
            lens = d
                .chunks(DESC_LEN)
                .map(|c| u64::from_le_bytes(c[8..16].try_into().unwrap()))
                .collect();
            if kind == WRITE {
                body = vec![0u8; lens.iter().sum::<u64>() as usize];
                s.read_exact(&mut body)?;
            }
        }
        NOTIFY => {
            body = vec![0u8; count as usize];
            s.read_exact(&mut body)?;
        }
        other => panic!("the initiator sent a frame of kind {other}"),
    }
    Ok(Frame {
        kind,
        seq,
        lens,
        body,
    })
}

/// Reads what is left on `s` until the initiator closes it (true) or `LIMIT` passes
/// without that (false); also returns how many bytes came.
fn drain_until_closed(s: &mut TcpStream) -> (bool, usize) {
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (true, total),
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return (false, total)
            }
            // Reset: closed too.
            Err(_) => return (true, total),
        }
    }
}

type Done = Receiver<(CompletionToken, Result<usize, FailReason>)>;

struct Channel(Sender<(CompletionToken, Result<usize, FailReason>)>);

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

fn initiator(config: TcpConfig) -> (TcpTransport, Done) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let t = TcpTransport::new(config);
    t.start(TransportContext {
        completions: Arc::new(Channel(tx)),
        control: Some(Arc::new(NoControl)),
        staging: None,
    })
    .unwrap();
    (t, rx)
}

/// Host memory of `len` random bytes.
fn random_region(len: usize) -> Arc<RegionMemory> {
    let mut bytes = vec![0u8; len].into_boxed_slice();
    rand::rng().fill_bytes(&mut bytes);
    let ptr = NonNull::new(bytes.as_mut_ptr()).unwrap();
    // SAFETY: the boxed slice moves into the region as its owner.
    Arc::new(unsafe { RegionMemory::from_raw(ptr, len, Location::host(), Box::new(bytes)) })
}

fn bytes_of(r: &RegionMemory) -> Vec<u8> {
    let mut v = vec![0u8; r.len()];
    assert!(r.copy_to_slice_at(0, &mut v));
    v
}

fn slice(op: Opcode, local: &Arc<RegionMemory>, len: usize, task: u32, deadline: Instant) -> Slice {
    Slice {
        op,
        local: local.clone(),
        local_offset: 0,
        remote_addr: 0x10_0000,
        remote_base: 0x10_0000,
        remote_keys: RemoteKeys::single(7),
        len,
        token: CompletionToken {
            slot: 0,
            generation: 0,
            task,
        },
        deadline,
    }
}

/// The next `n` completions, or a panic naming how many came when `LIMIT` passed.
fn completions(done: &Done, n: usize) -> Vec<(u32, Result<usize, FailReason>)> {
    let end = Instant::now() + LIMIT;
    (0..n)
        .map(|i| match done.recv_deadline(end) {
            Ok((t, r)) => (t.task, r),
            Err(_) => panic!("only {i} of {n} slices ended; the initiator hangs"),
        })
        .collect()
}

/// Waits (bounded) until `cond` holds.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < end, "never happened: {what}");
        std::thread::yield_now();
    }
}

/// Runs `f` on another thread and returns its result, or panics when it does not return
/// within `LIMIT` (the thread is left behind; the test fails anyway).
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("{what} blocked past every deadline"))
}

fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap().to_string();
    (l, a)
}

#[test]
fn an_unanswered_notification_closes_its_lane_so_later_writes_end_and_stay_unapplied() {
    let (l, addr) = listener();
    let (got_notify, notified) = crossbeam_channel::bounded(1);
    let (release, released) = crossbeam_channel::bounded::<()>(1);
    let peer = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let f = read_frame(&mut c).unwrap();
        let carried = f.body.windows(13).any(|w| w == b"are you there");
        got_notify.send((f.kind, carried)).unwrap();
        // Black hole: no answer, nothing more read, until the test lets the peer return.
        released.recv().unwrap();
        let drained = drain_until_closed(&mut c);
        // The replacement connection.
        l.set_nonblocking(false).unwrap();
        let second = l.accept().map(|(s, _)| s);
        (drained, second)
    });
    let (tcp, done) = initiator(TcpConfig::default());
    let conn = tcp.connect_tcp(&addr).unwrap();
    let c = conn.clone();
    let notify = std::thread::spawn(move || c.notify("initiator", b"are you there", SHORT));
    assert_eq!(notified.recv_timeout(LIMIT).unwrap(), (NOTIFY, true));

    // A batch of WRITEs bigger than every socket buffer, posted while the notification
    // is unanswered: the peer reads none of it.
    let n = 64;
    let len = 1 << 20;
    let local = random_region(len);
    let deadline = Instant::now() + SHORT + Duration::from_millis(200);
    let c = conn.clone();
    let l2 = local.clone();
    let posted = bounded("posting WRITEs to a stalled peer", move || {
        let r: Vec<_> = (0..n)
            .map(|i| c.post(slice(Opcode::Write, &l2, len, i, deadline)))
            .collect();
        c.flush();
        r
    });
    // A post is refused only once the lane has closed (when this thread was slow enough
    // to see the notification's deadline pass first); the others end by the deadline.
    let accepted = posted.iter().filter(|r| r.is_ok()).count();
    assert!(
        posted
            .iter()
            .all(|r| matches!(r, Ok(()) | Err(FailReason::ConnectionLost))),
        "{posted:?}"
    );
    for (task, r) in completions(&done, accepted) {
        assert_eq!(r, Err(FailReason::TimedOut), "WRITE {task}");
    }
    assert_eq!(notify.join().unwrap(), Err(FailReason::TimedOut));
    eventually("the stalled lane closes", || !conn.is_alive());
    eventually("the WRITEs release the local buffer", || {
        Arc::strong_count(&local) == 1
    });

    // The peer returns: it finds the connection closed, and far less than the batch in
    // it (only what the socket buffers held before the deadline).
    release.send(()).unwrap();
    let again = tcp.connect_tcp(&addr).unwrap();
    assert!(
        !Arc::ptr_eq(&again, &conn),
        "the dead connection was handed out again"
    );
    assert!(again.is_alive());
    let ((closed, bytes), second) = peer.join().unwrap();
    assert!(closed, "the initiator kept the stalled connection open");
    assert!(bytes < n as usize * len, "{bytes} bytes reached the peer");
    assert!(second.is_ok());
    tcp.shutdown();
}

/// Posts one 4 KiB WRITE to a raw peer that reads its frame and then does `then` with the
/// connection and the frame's first sequence number. Returns how the WRITE ended, whether
/// the initiator closed the lane (as the peer saw it), the transport's stats, and the
/// `peer` fields of the warnings starting with `warning`.
fn one_write_against(
    then: impl FnOnce(&mut TcpStream, u64) + Send + 'static,
    warning: &str,
) -> (
    Result<usize, FailReason>,
    bool,
    TcpStats,
    String,
    Vec<String>,
) {
    warnings::install();
    let (l, addr) = listener();
    let peer = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let f = read_frame(&mut c).unwrap();
        assert_eq!(f.kind, WRITE);
        then(&mut c, f.seq);
        drain_until_closed(&mut c).0
    });
    let (tcp, done) = initiator(TcpConfig::default());
    let conn = tcp.connect_tcp(&addr).unwrap();
    let local = random_region(4096);
    conn.post(slice(Opcode::Write, &local, 4096, 0, Instant::now() + FAR))
        .unwrap();
    conn.flush();
    let ended = completions(&done, 1).remove(0).1;
    let closed = peer.join().unwrap();
    eventually("the lane closes", || !conn.is_alive());
    let named = warnings::starting_with(warning)
        .into_iter()
        .filter_map(|w| w.fields.get("peer").cloned())
        .collect();
    let stats = tcp.stats();
    tcp.shutdown();
    (ended, closed, stats, addr, named)
}

/// A target that acknowledges a WRITE under a sequence number never sent: the lane
/// closes, the WRITE fails at once instead of waiting for its deadline, the transport
/// counts a protocol error, and the warning names the peer.
#[test]
fn an_answer_out_of_turn_closes_the_lane_counts_and_names_the_peer() {
    let (ended, closed, stats, addr, named) = one_write_against(
        |c, seq| {
            let mut answer = header(ACK, 1, seq + 1000).to_vec();
            answer.push(0);
            c.write_all(&answer).unwrap();
        },
        "closing a lane after the peer broke",
    );
    assert_eq!(ended, Err(FailReason::ConnectionLost));
    assert!(closed, "the initiator kept the lane open");
    assert_eq!(stats.protocol_errors, 1);
    assert!(named.contains(&addr), "{named:?} does not name {addr}");
}

/// A target that dies holding a WRITE: the WRITE fails at once, and a warning names the
/// peer the lane went to (no protocol error: a peer may die).
#[test]
fn a_peer_that_dies_with_requests_in_flight_is_named() {
    let (ended, _, stats, addr, named) = one_write_against(
        |c, _| c.shutdown(std::net::Shutdown::Both).unwrap(),
        "a lane to the peer closed with requests in flight",
    );
    assert_eq!(ended, Err(FailReason::ConnectionLost));
    assert_eq!(stats.protocol_errors, 0);
    assert!(named.contains(&addr), "{named:?} does not name {addr}");
}

#[test]
fn read_data_arriving_after_the_deadline_never_lands_in_local_memory() {
    late_read_data(false);
}

/// The same rule when the waiting thread reads the answer itself
/// (`Connection::drive`): it stops at the deadline inside the answer.
#[test]
fn read_data_arriving_after_the_deadline_never_lands_when_the_waiter_drives() {
    late_read_data(true);
}

fn late_read_data(drive: bool) {
    let (l, addr) = listener();
    let len = 4096;
    let first = 1000;
    let (send_rest, rest) = crossbeam_channel::bounded::<()>(1);
    let (sent_first, first_sent) = crossbeam_channel::bounded(1);
    let peer = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let f = read_frame(&mut c).unwrap();
        assert_eq!((f.kind, f.lens.as_slice()), (READ, &[len as u64][..]));
        let mut data = vec![0u8; len];
        rand::rng().fill_bytes(&mut data);
        sent_first.send(data[..first].to_vec()).unwrap();
        c.write_all(&header(READ_DATA, 1, f.seq)).unwrap();
        c.write_all(&[0]).unwrap();
        c.write_all(&data[..first]).unwrap();
        // The answer stalls past the deadline, then the rest comes.
        rest.recv().unwrap();
        let _ = c.write_all(&data[first..]);
        let _ = c.flush();
        drain_until_closed(&mut c).0
    });
    // Waiting threads may drive only where busy polling is on.
    let config = TcpConfig {
        busy_poll: if drive {
            Duration::from_micros(50)
        } else {
            Duration::ZERO
        },
        ..TcpConfig::default()
    };
    let (tcp, done) = initiator(config);
    let conn = tcp.connect_tcp(&addr).unwrap();
    let local = random_region(len);
    let deadline = Instant::now() + SHORT;
    conn.post(slice(Opcode::Read, &local, len, 0, deadline))
        .unwrap();
    conn.flush();
    assert_eq!(conn.start_driving(), drive);
    // The part of the answer that came in time lands (it is not what is checked here).
    let head = first_sent.recv_timeout(LIMIT).unwrap();
    while bytes_of(&local)[..first] != head[..] && Instant::now() < deadline {
        if drive {
            conn.drive();
        }
        std::thread::yield_now();
    }
    // The application waits until the deadline, as a batch does, then reuses its buffer.
    let early = if drive {
        let early = loop {
            if let Ok(ended) = done.try_recv() {
                break Some(ended);
            }
            if Instant::now() >= deadline {
                break None;
            }
            conn.drive();
            std::thread::yield_now();
        };
        conn.stop_driving();
        early
    } else {
        done.recv_deadline(deadline).ok()
    };
    let mut reused = vec![0u8; len];
    rand::rng().fill_bytes(&mut reused);
    assert!(local.copy_from_slice_at(0, &reused));
    send_rest.send(()).unwrap();
    let (_, result) = early.unwrap_or_else(|| {
        done.recv_timeout(LIMIT)
            .expect("the READ never ended; the initiator hangs")
    });
    assert_eq!(result, Err(FailReason::TimedOut));
    assert!(
        peer.join().unwrap(),
        "the initiator kept the stalled lane open"
    );
    assert!(!conn.is_alive());
    eventually("the READ releases the local buffer", || {
        Arc::strong_count(&local) == 1
    });
    let now = bytes_of(&local);
    let landed = now.iter().zip(&reused).filter(|(a, b)| a != b).count();
    assert_eq!(landed, 0, "bytes landed after the task ended");
    tcp.shutdown();
}

/// The bytes an honest peer returns for the request with sequence number `seq`.
fn pattern(seq: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq as usize * 131 + i) as u8).collect()
}

#[test]
fn a_large_read_batch_asks_for_at_most_a_mebibyte_per_frame_and_lands_whole() {
    // The initiator's limit on the bytes one READ frame asks for (one larger request
    // still goes, alone in its frame).
    const READ_FRAME_BYTES: u64 = 1 << 20;
    // Requests larger than the limit, between runs of small ones that share frames.
    let lens: Vec<usize> = (0..40)
        .map(|i| match i % 10 {
            0 => 3 << 19,
            _ => 64 << 10,
        })
        .collect();
    let n = lens.len();
    let (l, addr) = listener();
    let peer = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut asked = Vec::new();
        let mut answered = 0;
        while answered < n {
            let f = read_frame(&mut c).unwrap();
            assert_eq!(f.kind, READ);
            let mut answer = header(READ_DATA, f.lens.len() as u32, f.seq).to_vec();
            answer.resize(answer.len() + f.lens.len(), 0);
            for (i, &len) in f.lens.iter().enumerate() {
                answer.extend(pattern(f.seq + i as u64, len as usize));
            }
            c.write_all(&answer).unwrap();
            answered += f.lens.len();
            asked.push(f.lens);
        }
        asked
    });
    let (tcp, done) = initiator(TcpConfig::default());
    let conn = tcp.connect_tcp(&addr).unwrap();
    let local = random_region(lens.iter().sum());
    let far = Instant::now() + FAR;
    let mut offset = 0;
    for (i, &len) in lens.iter().enumerate() {
        let mut s = slice(Opcode::Read, &local, len, i as u32, far);
        s.local_offset = offset;
        offset += len;
        conn.post(s).unwrap();
    }
    conn.flush();
    for (task, r) in completions(&done, n) {
        assert_eq!(r, Ok(lens[task as usize]), "READ {task}");
    }
    let asked = peer.join().unwrap();
    for frame in &asked {
        let bytes: u64 = frame.iter().sum();
        assert!(
            bytes <= READ_FRAME_BYTES || frame.len() == 1,
            "a READ frame asked for {} requests, {bytes} bytes",
            frame.len()
        );
    }
    // The small requests still share frames.
    assert!(asked.len() < n, "{} frames for {n} requests", asked.len());
    // Each request's bytes landed where it asked (sequence numbers start at 0 and follow
    // the posting order on a fresh lane).
    let got = bytes_of(&local);
    let mut offset = 0;
    for (seq, &len) in lens.iter().enumerate() {
        assert!(
            got[offset..offset + len] == pattern(seq as u64, len)[..],
            "READ {seq} landed wrong bytes"
        );
        offset += len;
    }
    tcp.shutdown();
}

/// A peer that reads every frame and answers none.
fn silent_peer() -> (String, std::thread::JoinHandle<()>) {
    let (l, addr) = listener();
    let h = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        while read_frame(&mut c).is_ok() {}
    });
    (addr, h)
}

/// A lane whose in-flight table is full of READs the peer will not answer before `FAR`.
fn full_table() -> (
    TcpTransport,
    Done,
    Arc<TcpConnection>,
    std::thread::JoinHandle<()>,
) {
    let (addr, peer) = silent_peer();
    let (tcp, done) = initiator(TcpConfig {
        max_inflight: 256,
        ..TcpConfig::default()
    });
    let conn = tcp.connect_tcp(&addr).unwrap();
    let local = random_region(4096);
    let far = Instant::now() + FAR;
    for i in 0..256 {
        conn.post(slice(Opcode::Read, &local, 64, i, far)).unwrap();
    }
    conn.flush();
    (tcp, done, conn, peer)
}

#[test]
fn a_slice_waiting_for_room_in_flight_ends_by_its_deadline() {
    let (tcp, done, conn, peer) = full_table();
    let local = random_region(4096);
    conn.post(slice(
        Opcode::Read,
        &local,
        64,
        1000,
        Instant::now() + SHORT,
    ))
    .unwrap();
    let c = conn.clone();
    bounded("flushing onto a full lane", move || c.flush());
    let got = completions(&done, 1);
    assert_eq!(got, vec![(1000, Err(FailReason::TimedOut))]);
    // Nothing of it was sent and nothing in flight is overdue: the lane stays.
    assert!(conn.is_alive());
    tcp.shutdown();
    peer.join().unwrap();
}

#[test]
fn posting_to_a_full_queue_ends_by_the_deadline() {
    let (tcp, done, conn, peer) = full_table();
    let local = random_region(4096);
    // This one takes the sending half into a wait for room that lasts until `FAR` (a
    // WRITE, so no READ queued behind it joins its frame and shortens that wait).
    conn.post(slice(Opcode::Write, &local, 64, 1000, Instant::now() + FAR))
        .unwrap();
    let c = conn.clone();
    std::thread::spawn(move || c.flush());
    let c = conn.clone();
    let l = local.clone();
    let refused = bounded("posting to a full queue", move || {
        let deadline = Instant::now() + SHORT;
        (0..100_000)
            .map(|i| c.post(slice(Opcode::Read, &l, 64, 2000 + i, deadline)))
            .find_map(Result::err)
    });
    assert_eq!(refused, Some(FailReason::TimedOut));
    tcp.shutdown();
    peer.join().unwrap();
    drop(done);
}

#[test]
fn a_submitter_does_not_wait_on_a_frame_of_a_later_deadline() {
    // A peer that takes the connection and reads nothing.
    let (l, addr) = listener();
    let (release, released) = crossbeam_channel::bounded::<()>(1);
    let peer = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let _ = released.recv();
        drop(c);
    });
    let (tcp, done) = initiator(TcpConfig::default());
    let conn = tcp.connect_tcp(&addr).unwrap();
    // Another batch's WRITE, far bigger than the sockets hold and due only at `FAR`,
    // queued but not yet sent ...
    let len = 64 << 20;
    let big = random_region(len);
    conn.post(slice(Opcode::Write, &big, len, 0, Instant::now() + FAR))
        .unwrap();
    // ... when a small submission with a short deadline rings the doorbell: it may send
    // what the socket takes, but not wait for the peer until `FAR`.
    let small = random_region(64);
    let c = conn.clone();
    let s = small.clone();
    bounded("a short submission behind a long one", move || {
        c.post(slice(Opcode::Write, &s, 64, 100, Instant::now() + SHORT))
            .unwrap();
        c.flush();
    });
    tcp.shutdown();
    let ended = completions(&done, 2);
    assert!(ended.iter().all(|(_, r)| r.is_err()), "{ended:?}");
    release.send(()).unwrap();
    peer.join().unwrap();
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn live_threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn connections_that_fail_to_open_or_lose_their_peer_release_threads_and_fds() {
    let (l1, addr1) = listener();
    // Fill the listener's accept queue, then make room for exactly one connection: the
    // first lane connects, the second cannot.
    let target: SocketAddr = addr1.parse().unwrap();
    let mut probes = Vec::new();
    while let Ok(s) = TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
        probes.push(s);
        assert!(probes.len() < 100_000, "the accept queue never filled");
    }
    drop(l1.accept().unwrap());
    let (l2, addr2) = listener();
    let fds = open_fds();
    let threads = live_threads();
    // A peer that accepts every lane and dies at once.
    let rounds = 3;
    let lanes = 2;
    let peer = std::thread::spawn(move || {
        for _ in 0..rounds * lanes {
            drop(l2.accept().unwrap());
        }
        l2
    });

    let (tcp, _done) = initiator(TcpConfig {
        lanes,
        connect_timeout: Duration::from_millis(300),
        ..TcpConfig::default()
    });
    assert!(
        tcp.connect_tcp(&addr1).is_err(),
        "the second lane connected"
    );
    for _ in 0..rounds {
        let conn = tcp.connect_tcp(&addr2).unwrap();
        eventually("the lanes see their peer die", || !conn.is_alive());
    }
    drop(tcp);
    let l2 = peer.join().unwrap();

    eventually("threads and descriptors return to what they were", || {
        live_threads() == threads && open_fds() == fds
    });
    drop((l1, l2, probes));
}

/// An initiator's lane holds two descriptors whatever its threads wait on: its socket,
/// which the sending and the receiving half poll, and the `epoll` instance the receiver
/// thread sleeps on between answers. Two threads per lane. What the peer accepted is
/// counted apart (it holds the other ends in this process).
#[test]
fn a_lane_costs_two_descriptors_and_two_threads() {
    let (l, addr) = listener();
    let lanes = 3;
    let (before_fds, before_threads) = (open_fds(), live_threads());
    let (tcp, _done) = initiator(TcpConfig {
        lanes,
        ..TcpConfig::default()
    });
    let fds = open_fds();
    let threads = live_threads();
    let peer = std::thread::spawn(move || {
        let held: Vec<TcpStream> = (0..lanes).map(|_| l.accept().unwrap().0).collect();
        (l, held)
    });
    let conn = tcp.connect_tcp(&addr).unwrap();
    let (l, held) = peer.join().unwrap();
    assert!(conn.is_alive());
    assert_eq!(
        open_fds() - fds,
        2 * lanes + held.len(),
        "descriptors for {lanes} lanes"
    );
    assert_eq!(
        live_threads() - threads,
        2 * lanes,
        "threads for {lanes} lanes"
    );
    // The peer going away ends the lanes, and with them their threads and descriptors.
    drop(held);
    eventually("the lanes see their peer go", || !conn.is_alive());
    drop((conn, tcp));
    eventually("threads and descriptors return to what they were", || {
        live_threads() == before_threads && open_fds() == before_fds
    });
    drop(l);
}

/// Completions that say which thread delivered them.
struct OnThread(Sender<(u32, Result<usize, FailReason>, std::thread::ThreadId)>);

impl Completions for OnThread {
    fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
        let _ = self
            .0
            .send((token.task, result, std::thread::current().id()));
    }
}

/// A thread waiting on its READ and driving the connection reads the answer itself (the
/// completion comes on that thread, which without driving never happens: the lane's
/// receiver thread reads every answer), with the right bytes, exactly once.
#[test]
fn a_waiting_thread_driving_the_connection_reads_its_answers_itself() {
    let (l, addr) = listener();
    let rounds = 200u32;
    let len = 4096;
    // A well-behaved peer: each READ is answered with fresh random bytes, sent to the
    // test as well.
    let (sent, answers) = crossbeam_channel::unbounded::<Vec<u8>>();
    let peer = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        for _ in 0..2 * rounds {
            let f = read_frame(&mut c).unwrap();
            assert_eq!((f.kind, f.lens.as_slice()), (READ, &[len as u64][..]));
            let mut data = vec![0u8; len];
            rand::rng().fill_bytes(&mut data);
            let mut answer = header(READ_DATA, 1, f.seq).to_vec();
            answer.push(0);
            answer.extend_from_slice(&data);
            c.write_all(&answer).unwrap();
            sent.send(data).unwrap();
        }
        drain_until_closed(&mut c).0
    });
    let (tx, done) = crossbeam_channel::unbounded();
    let tcp = TcpTransport::new(TcpConfig {
        lanes: 1,
        ..TcpConfig::default()
    });
    tcp.start(TransportContext {
        completions: Arc::new(OnThread(tx)),
        control: Some(Arc::new(NoControl)),
        staging: None,
    })
    .unwrap();
    let conn = tcp.connect_tcp(&addr).unwrap();
    let local = random_region(len);
    let me = std::thread::current().id();
    let mut on_this_thread = [0u32; 2];
    for drive in [false, true] {
        for task in 0..rounds {
            // Driving starts before the post: on a busy machine the peer's answer may
            // otherwise come before this thread runs again, and the receiver thread,
            // woken by it, rightly reads it.
            let driving = drive && conn.start_driving();
            assert_eq!(driving, drive);
            conn.post(slice(Opcode::Read, &local, len, task, Instant::now() + FAR))
                .unwrap();
            conn.flush();
            let end = Instant::now() + LIMIT;
            let (t, result, thread) = loop {
                if let Ok(ended) = done.try_recv() {
                    break ended;
                }
                assert!(Instant::now() < end, "READ {task} never ended");
                if driving {
                    conn.drive();
                }
                std::thread::yield_now();
            };
            if driving {
                conn.stop_driving();
            }
            assert_eq!((t, result), (task, Ok(len)));
            assert_eq!(bytes_of(&local), answers.recv_timeout(LIMIT).unwrap());
            on_this_thread[usize::from(drive)] += u32::from(thread == me);
        }
    }
    assert!(done.try_recv().is_err(), "a READ ended twice");
    assert_eq!(
        on_this_thread[0], 0,
        "a completion came on a thread not driving"
    );
    assert!(
        on_this_thread[1] > 0,
        "no answer was read by the thread driving the connection"
    );
    assert!(conn.is_alive());
    tcp.shutdown();
    assert!(peer.join().unwrap(), "the initiator kept the lane open");
}
