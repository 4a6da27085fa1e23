//! Hostile peers against the TCP target, spoken as raw bytes in ferry's wire format over
//! real sockets on 127.0.0.1: stalled frames, unread answers, idle sockets, half-closes,
//! trickling handshakes, malformed set-up exchanges, and clients without (or with the
//! wrong) shared secret. Every wait is bounded by a deadline; outcomes and counters are
//! asserted, never times.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_transport_api::testing::warnings;
use ferry_transport_api::{
    Access, CompletionToken, Completions, Connection, ControlPlane, FailReason, Location, Opcode,
    Protocol, RegionMemory, RemoteKeys, Slice, Transport, TransportContext, TransportError,
};
use ferry_transport_tcp::{SharedSecret, TcpConfig, TcpStats, TcpTransport};
use rand::RngCore;

const WRITE: u8 = 1;
const READ: u8 = 2;
const GET_DESCRIPTOR: u8 = 4;
const DESCRIPTOR: u8 = 5;
const ACK: u8 = 6;
const READ_DATA: u8 = 7;
const HELLO: u8 = 8;
const CHALLENGE: u8 = 9;
const PROOF: u8 = 10;
const EXCHANGE: u8 = 12;
const EXCHANGED: u8 = 13;

/// The largest `Exchange` body (protocol byte included), as the wire format documents it.
const MAX_EXCHANGE: usize = 64 * 1024;

/// How long any single condition may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

fn header(kind: u8, count: u32, seq: u64) -> Vec<u8> {
    let mut h = b"FY".to_vec();
    h.push(1);
    h.push(kind);
    h.extend_from_slice(&count.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h
}

fn desc(addr: u64, len: u64, key: u64) -> Vec<u8> {
    [addr, len, key]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    if len > 0 && v.iter().all(|&b| b == 0) {
        v[0] = 1;
    }
    v
}

/// Host memory owned by the region.
fn host(len: usize) -> Arc<RegionMemory> {
    let mut bytes = vec![0u8; len].into_boxed_slice();
    let ptr = NonNull::new(bytes.as_mut_ptr()).unwrap();
    // SAFETY: the boxed slice moves into the region as its owner and lives as long as it.
    Arc::new(unsafe { RegionMemory::from_raw(ptr, len, Location::host(), Box::new(bytes)) })
}

fn bytes_of(r: &RegionMemory, offset: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    assert!(r.copy_to_slice_at(offset, &mut v));
    v
}

/// Waits until `cond` holds, failing the test at the deadline.
#[track_caller]
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < give_up, "gave up waiting: {what}");
        std::thread::yield_now();
    }
}

/// Whether the target closed the connection (EOF or reset), draining what it sent.
fn closed_by_target(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Reads one answer frame: (kind, seq, count, the count bytes that follow).
fn answer(s: &mut TcpStream) -> (u8, u64, Vec<u8>) {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..3], b"FY\x01");
    let count = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let seq = u64::from_le_bytes(h[8..16].try_into().unwrap());
    let mut st = vec![0u8; count];
    s.read_exact(&mut st).unwrap();
    (h[3], seq, st)
}

struct Channel(Sender<(CompletionToken, Result<usize, FailReason>)>);

impl Completions for Channel {
    fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
        let _ = self.0.send((token, result));
    }
}

/// Why the test control plane refuses every TCP set-up exchange.
const TCP_REFUSAL: &str =
    "tcp sets nothing up with its peers (refused by the test's control plane)";

/// A control plane that serves a fixed descriptor, counts notifications, answers RDMA and
/// EFA set-up messages with their bytes reversed and refuses TCP ones, recording the
/// protocol and length of every message it was handed.
#[derive(Default)]
struct Control {
    descriptor: Vec<u8>,
    notes: AtomicUsize,
    exchanges: Mutex<Vec<(Protocol, usize)>>,
}

impl Control {
    /// The set-up messages handed over so far: (protocol, body length).
    fn exchanges(&self) -> Vec<(Protocol, usize)> {
        self.exchanges.lock().unwrap().clone()
    }
}

impl ControlPlane for Control {
    fn descriptor(&self) -> Vec<u8> {
        self.descriptor.clone()
    }
    fn notification(&self, _from: &str, _body: &[u8]) -> bool {
        self.notes.fetch_add(1, Ordering::Relaxed);
        true
    }
    fn exchange(&self, protocol: Protocol, body: &[u8]) -> Result<Vec<u8>, String> {
        self.exchanges.lock().unwrap().push((protocol, body.len()));
        match protocol {
            Protocol::Tcp => Err(TCP_REFUSAL.into()),
            _ => Ok(body.iter().rev().copied().collect()),
        }
    }
}

type Done = Receiver<(CompletionToken, Result<usize, FailReason>)>;

struct Target {
    t: TcpTransport,
    addr: String,
    done: Done,
    descriptor: Vec<u8>,
    control: Arc<Control>,
}

impl Target {
    fn stats(&self) -> TcpStats {
        self.t.stats()
    }
}

fn started(config: TcpConfig) -> Target {
    let (tx, done) = crossbeam_channel::unbounded();
    let descriptor = random(3000);
    let control = Arc::new(Control {
        descriptor: descriptor.clone(),
        ..Control::default()
    });
    let t = TcpTransport::new(config);
    let ep = t
        .start(TransportContext {
            completions: Arc::new(Channel(tx)),
            control: Some(control.clone()),
            staging: None,
        })
        .unwrap();
    Target {
        t,
        addr: ep.address,
        done,
        descriptor,
        control,
    }
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn write_frame(s: &mut TcpStream, seq: u64, addr: u64, key: u64, payload: &[u8]) {
    let mut f = header(WRITE, 1, seq);
    f.extend(desc(addr, payload.len() as u64, key));
    f.extend_from_slice(payload);
    s.write_all(&f).unwrap();
}

#[test]
fn a_stalled_write_frees_its_region_at_the_progress_limit() {
    let target = started(TcpConfig {
        progress_timeout: Duration::from_millis(300),
        ..TcpConfig::default()
    });
    let region = host(1 << 20);
    let key = target.t.register(&region, Access::RemoteReadWrite).unwrap()[0];
    let before = Arc::strong_count(&region);
    let mut s = connect(&target.addr);
    // A WRITE of 64 KiB that sends one payload byte and then nothing.
    let mut f = header(WRITE, 1, 0);
    f.extend(desc(region.addr(), 64 * 1024, key));
    f.push(0xa5);
    s.write_all(&f).unwrap();
    assert!(closed_by_target(&mut s), "a stalled frame must be closed");
    wait_for("the target lets go of the region", || {
        Arc::strong_count(&region) == before
    });
    assert_eq!(target.stats().progress_timeouts, 1);
    // The byte that came was written into the region: the request had been resolved.
    assert_eq!(bytes_of(&region, 0, 1), [0xa5]);
}

#[test]
fn an_unread_read_answer_frees_its_region_at_the_progress_limit() {
    let target = started(TcpConfig {
        progress_timeout: Duration::from_millis(300),
        ..TcpConfig::default()
    });
    let len = 32 << 20;
    let region = host(len);
    let key = target.t.register(&region, Access::RemoteReadWrite).unwrap()[0];
    let before = Arc::strong_count(&region);
    let s = TcpStream::connect(&target.addr).unwrap();
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(4096)
        .unwrap();
    let mut s = s;
    let mut f = header(READ, 1, 0);
    f.extend(desc(region.addr(), len as u64, key));
    s.write_all(&f).unwrap();
    // The answer has begun (the request was resolved and accepted); read no more of it.
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut h = [0u8; 17];
    s.read_exact(&mut h).unwrap();
    assert_eq!((h[3], h[16]), (READ_DATA, 0));
    wait_for("the target gives up on the unread answer", || {
        target.stats().progress_timeouts == 1
    });
    wait_for("the target lets go of the region", || {
        Arc::strong_count(&region) == before
    });
    drop(s);
}

#[test]
fn deregistration_closes_the_connections_that_hold_the_region() {
    // A progress limit far beyond the test's own deadline: only deregistration can
    // release the memory here.
    let target = started(TcpConfig {
        progress_timeout: Duration::from_secs(3600),
        ..TcpConfig::default()
    });
    let len = 32 << 20;
    let held_by_write = host(1 << 20);
    let held_by_read = host(len);
    let other = host(1 << 20);
    let kw = target
        .t
        .register(&held_by_write, Access::RemoteReadWrite)
        .unwrap()[0];
    let kr = target
        .t
        .register(&held_by_read, Access::RemoteReadWrite)
        .unwrap()[0];
    let ko = target.t.register(&other, Access::RemoteReadWrite).unwrap()[0];
    let (bw, br) = (
        Arc::strong_count(&held_by_write),
        Arc::strong_count(&held_by_read),
    );
    let mut w = connect(&target.addr);
    let mut f = header(WRITE, 1, 0);
    f.extend(desc(held_by_write.addr(), 4096, kw));
    f.push(1);
    w.write_all(&f).unwrap();
    let r = TcpStream::connect(&target.addr).unwrap();
    socket2::SockRef::from(&r)
        .set_recv_buffer_size(4096)
        .unwrap();
    let mut r = r;
    let mut f = header(READ, 1, 0);
    f.extend(desc(held_by_read.addr(), len as u64, kr));
    r.write_all(&f).unwrap();
    // A well-behaved connection on another region.
    let mut good = connect(&target.addr);
    let data = random(4096);
    write_frame(&mut good, 0, other.addr(), ko, &data);
    assert_eq!(answer(&mut good), (ACK, 0, vec![0]));
    wait_for("both frames hold their regions", || {
        Arc::strong_count(&held_by_write) > bw && Arc::strong_count(&held_by_read) > br
    });

    target.t.deregister(&held_by_write);
    target.t.deregister(&held_by_read);
    // The table's reference went with the deregistration; the frames' go with their
    // connections.
    wait_for("the regions are released", || {
        Arc::strong_count(&held_by_write) == 1 && Arc::strong_count(&held_by_read) == 1
    });
    assert!(closed_by_target(&mut w));
    assert_eq!(target.stats().closed_on_deregister, 2);
    assert_eq!(target.stats().progress_timeouts, 0);
    // The other connection is still served.
    let data2 = random(4096);
    write_frame(&mut good, 1, other.addr(), ko, &data2);
    assert_eq!(answer(&mut good), (ACK, 1, vec![0]));
    assert_eq!(bytes_of(&other, 0, 4096), data2);
    drop(r);
}

#[test]
fn the_descriptor_fetch_has_one_deadline_for_the_whole_exchange() {
    // A fake target that answers one byte at a time, 100 ms apart: every read returns
    // well within any per-read timeout, but the whole answer would take minutes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let sent = Arc::new(AtomicUsize::new(0));
    let sent2 = sent.clone();
    let trickler = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut req = [0u8; 16];
        s.read_exact(&mut req).unwrap();
        let mut answer = header(DESCRIPTOR, 2000, 0);
        answer.extend(random(2000));
        for b in answer {
            if s.write_all(&[b]).is_err() {
                return;
            }
            sent2.fetch_add(1, Ordering::Relaxed);
            // Paced by a stop signal with a timeout: the pause between bytes.
            if stop_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                return;
            }
        }
    });
    let (tx, rx) = crossbeam_channel::bounded(1);
    let a = addr.clone();
    std::thread::spawn(move || {
        let _ = tx.send(ferry_transport_tcp::fetch_descriptor(
            &a,
            Duration::from_millis(800),
        ));
    });
    let result = rx
        .recv_timeout(WAIT)
        .expect("the fetch must end by its deadline");
    let err = result.expect_err("a trickled answer must fail");
    // The step that failed is the message; the deadline is its cause, and the kind.
    let cause = std::error::Error::source(&err).map(ToString::to_string);
    assert!(
        cause.as_deref().is_some_and(|c| c.contains("deadline")),
        "{err}: {cause:?}"
    );
    assert_eq!(
        err.kind(),
        ferry_transport_api::ErrorKind::TimedOut,
        "{err}"
    );
    assert!(sent.load(Ordering::Relaxed) < 2016);
    let _ = stop_tx.send(());
    trickler.join().unwrap();
}

#[test]
fn idle_sockets_are_closed_and_their_places_freed_while_idle_lanes_stay() {
    let target = started(TcpConfig {
        max_connections: 8,
        idle_timeout: Duration::from_millis(300),
        ..TcpConfig::default()
    });
    let region = host(1 << 16);
    let key = target.t.register(&region, Access::RemoteReadWrite).unwrap()[0];
    // A lane: it has carried a request, then goes quiet.
    let mut lane = connect(&target.addr);
    write_frame(&mut lane, 0, region.addr(), key, &random(100));
    assert_eq!(answer(&mut lane), (ACK, 0, vec![0]));
    // Seven sockets that never send anything hold every other place.
    let mut idle: Vec<TcpStream> = (0..7).map(|_| connect(&target.addr)).collect();
    wait_for("all eight are served", || target.stats().connections == 8);
    for s in &mut idle {
        assert!(closed_by_target(s), "an idle socket must be closed");
    }
    wait_for("their places are free", || {
        target.stats().open_connections == 1
    });
    assert_eq!(target.stats().idle_timeouts, 7);
    assert_eq!(target.stats().refused_connections, 0);
    // A real client is served, and the quiet lane still works.
    let body = ferry_transport_tcp::fetch_descriptor(&target.addr, WAIT).unwrap();
    assert_eq!(body, target.descriptor);
    let data = random(1000);
    write_frame(&mut lane, 1, region.addr(), key, &data);
    assert_eq!(answer(&mut lane), (ACK, 1, vec![0]));
    assert_eq!(bytes_of(&region, 0, 1000), data);
    assert_eq!(target.stats().idle_timeouts, 7);
}

#[test]
fn a_connection_that_only_half_sends_a_header_is_closed() {
    let target = started(TcpConfig {
        progress_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(3600),
        ..TcpConfig::default()
    });
    let mut s = connect(&target.addr);
    s.write_all(&header(GET_DESCRIPTOR, 0, 0)[..5]).unwrap();
    assert!(closed_by_target(&mut s));
    assert_eq!(target.stats().progress_timeouts, 1);
}

/// The kernel's timer state of every IPv4 TCP socket between two ports, seen from
/// `/proc/net/tcp`: (local port, remote port, state, active timer).
fn tcp_sockets() -> Vec<(u16, u16, u8, u8)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            let timer = u8::from_str_radix(f.get(5)?.split(':').next()?, 16).ok()?;
            Some((port(f[1]), port(f[2]), state, timer))
        })
        .collect()
}

#[test]
fn keepalive_watches_lanes_on_both_ends() {
    const ESTABLISHED: u8 = 1;
    const KEEPALIVE_TIMER: u8 = 2;
    let target = started(TcpConfig::default());
    let target_port: u16 = target.addr.rsplit(':').next().unwrap().parse().unwrap();
    let initiator = started(TcpConfig {
        lanes: 3,
        ..TcpConfig::default()
    });
    let _conn = initiator.t.connect_tcp(&target.addr).unwrap();
    // Idle established connections on either end run the keepalive timer (a socket
    // without keepalive runs none): three lanes, three accepted connections.
    wait_for(
        "keepalive armed on every lane and every accepted connection",
        || {
            let socks = tcp_sockets();
            let ends = |initiator_side: bool| {
                socks
                    .iter()
                    .filter(|&&(local, remote, state, _)| {
                        state == ESTABLISHED
                            && if initiator_side {
                                remote == target_port
                            } else {
                                local == target_port
                            }
                    })
                    .map(|s| s.3)
                    .collect::<Vec<_>>()
            };
            let (lanes, accepted) = (ends(true), ends(false));
            lanes.len() == 3
                && accepted.len() == 3
                && lanes.iter().chain(&accepted).all(|&t| t == KEEPALIVE_TIMER)
        },
    );
}

/// The congestion control of every TCP socket of this process connected to or accepted
/// on `port`: (accepted on `port`, algorithm), once per socket however many descriptors
/// name it.
fn congestion_on(port: u16) -> Vec<(bool, String)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !link.starts_with("socket:") || !seen.insert(link) {
            continue;
        }
        // SAFETY: the descriptor is only queried (getsockname, getpeername, getsockopt),
        // never closed; were another thread to close it meanwhile, the calls fail or
        // describe whatever took its number, and the checks below skip both.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let (Ok(local), Ok(peer), Ok(cc)) =
            (sock.local_addr(), sock.peer_addr(), sock.tcp_congestion())
        else {
            continue;
        };
        let (Some(local), Some(peer)) = (local.as_socket(), peer.as_socket()) else {
            continue;
        };
        if local.port() == port || peer.port() == port {
            let name = String::from_utf8_lossy(&cc)
                .trim_end_matches('\0')
                .to_string();
            out.push((local.port() == port, name));
        }
    }
    out.sort();
    out
}

/// Each side gives the connections it holds its own congestion control: the target
/// every connection it accepts, the initiator its lanes; a side that names none leaves
/// the host's.
#[test]
fn each_side_gives_its_connections_its_congestion_control() {
    let host_default = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .unwrap()
        .trim()
        .to_string();
    // Both are built into every kernel: one that is not the host's default, so a side
    // that failed to set it would show the default instead.
    let chosen = if host_default == "cubic" {
        "reno"
    } else {
        "cubic"
    };
    let config = |lanes| TcpConfig {
        lanes,
        congestion_control: Some(chosen.into()),
        ..TcpConfig::default()
    };
    let port_of = |t: &Target| -> u16 { t.addr.rsplit(':').next().unwrap().parse().unwrap() };
    // The initiator's own lanes, and the target's accepted side.
    let target = started(config(1));
    let initiator = started(config(2));
    let _conn = initiator.t.connect_tcp(&target.addr).unwrap();
    let side = |accepted, cc: &str| (accepted, cc.to_string());
    wait_for("two lanes and two accepted connections with it", || {
        congestion_on(port_of(&target))
            == [
                side(false, chosen),
                side(false, chosen),
                side(true, chosen),
                side(true, chosen),
            ]
    });
    // An initiator that names none keeps the host's on its lanes; the target still sets
    // its own on the side it accepts.
    let plain = started(TcpConfig::default());
    let target2 = started(config(1));
    let _conn2 = plain.t.connect_tcp(&target2.addr).unwrap();
    wait_for(
        "the lane keeps the host's, the accepted side is the target's",
        || congestion_on(port_of(&target2)) == [side(false, &host_default), side(true, chosen)],
    );
}

/// Why a transport with congestion control `name` does not start.
fn congestion_start_error(name: &str) -> String {
    let t = TcpTransport::new(TcpConfig {
        congestion_control: Some(name.into()),
        ..TcpConfig::default()
    });
    let (tx, _rx) = crossbeam_channel::unbounded();
    t.start(TransportContext {
        completions: Arc::new(Channel(tx)),
        control: None,
        staging: None,
    })
    .expect_err("a congestion control the kernel refuses fails the start")
    .to_string()
}

/// A congestion control the kernel does not offer fails the start, naming the ones it
/// allows, instead of every connection later.
#[test]
fn an_unknown_congestion_control_fails_the_start_by_name() {
    let err = congestion_start_error("no-such-cc");
    assert!(err.contains("no-such-cc") && err.contains("reno"), "{err}");
    // A name the kernel would cut to another one (it reads 15 bytes, up to a NUL).
    for name in ["", "cubic\0x", "cubic-with-a-long-name"] {
        let err = congestion_start_error(name);
        assert!(
            err.contains("not a congestion control name"),
            "{name:?}: {err}"
        );
    }
}

#[test]
fn closed_connections_leave_no_handles_behind() {
    let target = started(TcpConfig::default());
    for _ in 0..20 {
        let body = ferry_transport_tcp::fetch_descriptor(&target.addr, WAIT).unwrap();
        assert_eq!(body, target.descriptor);
    }
    // No accept happens after the last one: the handles must go with the threads.
    wait_for("every connection's handle is dropped", || {
        let s = target.stats();
        s.open_connections == 0 && s.tracked_connections == 0
    });
    assert_eq!(target.stats().connections, 20);
}

/// A served connection holds two descriptors, its socket and the eventfd its thread's
/// sleeps also wait on (deregistration wakes it with that), and one thread; the
/// connection limit is fitted to the descriptor limit with that cost.
#[test]
fn a_served_connection_costs_two_descriptors_and_one_thread() {
    let target = started(TcpConfig::default());
    let open_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let live_threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let (fds, threads) = (open_fds(), live_threads());
    let n = 4;
    let held: Vec<TcpStream> = (0..n).map(|_| connect(&target.addr)).collect();
    wait_for("every connection is served", || {
        target.stats().open_connections == n as u64
    });
    // `held` adds the client ends.
    assert_eq!(open_fds() - fds, n + 2 * n);
    assert_eq!(live_threads() - threads, n);
    drop(held);
    wait_for("the connections' threads and descriptors are gone", || {
        target.stats().open_connections == 0 && open_fds() == fds && live_threads() == threads
    });
}

/// Acknowledgements of several frames read back to back go out in Ack frames of at most
/// `MAX_DESCS` statuses each, which is what the initiator accepts.
#[test]
fn acknowledgements_of_many_frames_are_split_at_the_frame_limit() {
    let target = started(TcpConfig::default());
    let per_frame = 200usize;
    let frames = 5usize;
    let block = 16usize;
    let region = host(per_frame * block);
    let key = target.t.register(&region, Access::RemoteReadWrite).unwrap()[0];
    let mut s = connect(&target.addr);
    // Every frame in one write, so the target reads them before its socket drains.
    let mut all = Vec::new();
    for f in 0..frames {
        all.extend(header(WRITE, per_frame as u32, (f * per_frame) as u64));
        for i in 0..per_frame {
            all.extend(desc(region.addr() + (i * block) as u64, block as u64, key));
        }
        all.extend(std::iter::repeat_n(f as u8 + 1, per_frame * block));
    }
    s.write_all(&all).unwrap();
    let mut acked = 0usize;
    while acked < per_frame * frames {
        let (kind, seq, statuses) = answer(&mut s);
        assert_eq!(kind, ACK);
        assert_eq!(seq, acked as u64, "acknowledgements arrive in order");
        assert!(
            statuses.len() <= ferry_transport_tcp::fuzzing::MAX_DESCS,
            "an Ack frame of {} statuses",
            statuses.len()
        );
        assert!(statuses.iter().all(|&st| st == 0));
        acked += statuses.len();
    }
    assert_eq!(acked, per_frame * frames);
    assert_eq!(bytes_of(&region, 0, block), vec![frames as u8; block]);
}

#[test]
fn a_half_closed_write_is_still_acknowledged() {
    let target = started(TcpConfig::default());
    let region = host(1 << 16);
    let key = target.t.register(&region, Access::RemoteReadWrite).unwrap()[0];
    for round in 0..50 {
        let mut s = connect(&target.addr);
        let data = random(4096);
        let offset = (round % 16) * 4096;
        write_frame(&mut s, 0, region.addr() + offset as u64, key, &data);
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(answer(&mut s), (ACK, 0, vec![0]), "round {round}");
        assert_eq!(bytes_of(&region, offset, 4096), data, "round {round}");
        assert!(closed_by_target(&mut s));
    }
}

/// Counts the target's "refused request" warnings.
#[test]
fn refusals_are_counted_every_one_and_logged_at_a_bounded_rate() {
    warnings::install();
    let target = started(TcpConfig::default());
    // Many regions: refused requests must not cost a scan of them all.
    let regions: Vec<_> = (0..5000).map(|_| host(64)).collect();
    let keys: Vec<u64> = regions
        .iter()
        .map(|r| target.t.register(r, Access::RemoteReadWrite).unwrap()[0])
        .collect();
    let mut s = connect(&target.addr);
    let me = s.local_addr().unwrap().to_string();
    let mut seq = 0;
    for frame in 0..40 {
        let mut f = header(READ, 256, seq);
        for i in 0..256usize {
            let r = &regions[(frame * 256 + i) % regions.len()];
            // Wrong key, beyond the end, or nowhere.
            let d = match i % 3 {
                0 => desc(r.addr(), 8, keys[(frame + i + 1) % keys.len()] ^ 1),
                1 => desc(r.addr(), 4096, keys[(frame * 256 + i) % keys.len()]),
                _ => desc(8 + i as u64, 8, 12345),
            };
            f.extend(d);
        }
        s.write_all(&f).unwrap();
        let (kind, got_seq, statuses) = answer(&mut s);
        assert_eq!((kind, got_seq), (READ_DATA, seq));
        assert!(statuses.iter().all(|&st| st != 0));
        seq += 256;
    }
    // Valid requests to random regions among them still resolve to the right bytes.
    for i in (0..regions.len()).step_by(97) {
        let data = random(64);
        assert!(regions[i].copy_from_slice_at(0, &data));
        let mut f = header(READ, 1, seq);
        f.extend(desc(regions[i].addr(), 64, keys[i]));
        s.write_all(&f).unwrap();
        let (kind, _, statuses) = answer(&mut s);
        assert_eq!((kind, statuses), (READ_DATA, vec![0]));
        let mut got = vec![0u8; 64];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, data);
        seq += 1;
    }
    assert_eq!(target.stats().rejected_requests, 40 * 256);
    let logged = warnings::starting_with("refused request")
        .iter()
        .filter(|w| w.fields.get("peer") == Some(&me))
        .count();
    assert!(logged >= 1, "refusals must still be logged");
    assert!(
        logged <= 64,
        "{logged} warnings for 10240 refusals: not rate-limited"
    );
}

/// A refused request, a refused set-up exchange and a broken frame each come from a
/// different connection; each warning names the connection it is about, in its own
/// fields, so an operator can find the peer at the default log level.
#[test]
fn warnings_about_a_connection_name_its_peer() {
    warnings::install();
    let target = started(TcpConfig::default());
    let region = host(64);
    let key = target.t.register(&region, Access::RemoteReadWrite).unwrap()[0];

    let mut refused = connect(&target.addr);
    let mut f = header(READ, 1, 0);
    f.extend(desc(region.addr(), 8, key ^ 1));
    refused.write_all(&f).unwrap();
    let (kind, _, statuses) = answer(&mut refused);
    assert_eq!(kind, READ_DATA);
    assert_ne!(statuses, vec![0], "a wrong key is refused");

    let mut exchange = connect(&target.addr);
    exchange.write_all(&exchange_frame(200, b"set-up")).unwrap();
    let (kind, _, body) = answer(&mut exchange);
    assert_eq!(kind, EXCHANGED);
    assert!(refusal(&body).contains("unknown protocol byte 200"));

    let mut broken = connect(&target.addr);
    broken.write_all(&header(ACK, 0, 0)).unwrap();
    assert!(closed_by_target(&mut broken));

    for (message, s) in [
        ("refused request", &refused),
        ("refused a set-up exchange", &exchange),
        ("closing connection after protocol error", &broken),
    ] {
        let me = s.local_addr().unwrap().to_string();
        let peers = || -> Vec<Option<String>> {
            warnings::starting_with(message)
                .into_iter()
                .map(|w| w.fields.get("peer").cloned())
                .collect()
        };
        wait_for(&format!("a warning `{message}` naming {me}"), || {
            peers().contains(&Some(me.clone()))
        });
        assert!(
            !peers().contains(&None),
            "a warning `{message}` names no peer"
        );
    }
}

/// Set-up exchanges come each on a connection of its own, so their refusals are limited
/// for the whole transport: a peer that keeps asking cannot flood the log.
#[test]
fn refused_exchanges_are_logged_at_a_bounded_rate_across_connections() {
    warnings::install();
    let target = started(TcpConfig::default());
    let mut askers = Vec::new();
    let began = std::time::Instant::now();
    for _ in 0..100 {
        let mut s = connect(&target.addr);
        s.write_all(&exchange_frame(200, b"again")).unwrap();
        let (kind, _, body) = answer(&mut s);
        assert_eq!(kind, EXCHANGED);
        assert!(refusal(&body).contains("unknown protocol byte 200"));
        askers.push(s.local_addr().unwrap().to_string());
    }
    let logged = warnings::starting_with("refused a set-up exchange")
        .iter()
        .filter(|w| w.fields.get("peer").is_some_and(|p| askers.contains(p)))
        .count();
    // At most the limit's lines for each second (begun) the loop took.
    let windows = began.elapsed().as_secs() + 1;
    assert!(
        logged >= 1 && logged as u64 <= u64::from(ferry_transport_api::LINES_PER_SECOND) * windows,
        "{logged} warnings for 100 refused exchanges over {windows} s"
    );
}

fn secret_target() -> Target {
    started(TcpConfig {
        secret: Some(SharedSecret::from("correct horse battery staple")),
        ..TcpConfig::default()
    })
}

#[test]
fn a_client_without_the_secret_is_refused_before_any_frame_is_served() {
    let target = secret_target();
    let region = host(1 << 16);
    let key = target.t.register(&region, Access::RemoteReadWrite).unwrap()[0];
    let original = random(1 << 16);
    assert!(region.copy_from_slice_at(0, &original));

    // A descriptor fetch without a secret gets an error that names the secret.
    let err = ferry_transport_tcp::fetch_descriptor(&target.addr, WAIT).unwrap_err();
    assert!(err.to_string().contains("secret"), "{err}");
    // A raw WRITE with the right key changes nothing.
    let mut s = connect(&target.addr);
    write_frame(&mut s, 0, region.addr(), key, &random(4096));
    assert!(closed_by_target(&mut s));
    // So does a READ: no byte of the region comes back.
    let mut s = connect(&target.addr);
    let mut f = header(READ, 1, 0);
    f.extend(desc(region.addr(), 4096, key));
    s.write_all(&f).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.len() <= 16, "{} bytes came back", got.len());
    assert!(got.is_empty() || got[3] == CHALLENGE);
    // A hello followed by a made-up proof.
    let mut s = connect(&target.addr);
    let mut f = header(HELLO, 32, 0);
    f.extend(random(32));
    s.write_all(&f).unwrap();
    let (kind, _, body) = answer(&mut s);
    assert_eq!((kind, body.len()), (CHALLENGE, 64));
    let mut f = header(PROOF, 32, 0);
    f.extend(random(32));
    f.extend(header(GET_DESCRIPTOR, 0, 0));
    s.write_all(&f).unwrap();
    assert!(closed_by_target(&mut s));

    wait_for("every failure is counted", || {
        target.stats().auth_failures == 4
    });
    assert_eq!(bytes_of(&region, 0, 1 << 16), original);
    assert_eq!(target.stats().rejected_requests, 0);
}

#[test]
fn a_wrong_secret_fails_both_ways_with_errors_that_name_it() {
    let target = secret_target();
    let wrong = SharedSecret::from("correct horse battery stapler");
    let err =
        ferry_transport_tcp::fetch_descriptor_with(&target.addr, WAIT, Some(&wrong)).unwrap_err();
    assert!(err.to_string().contains("secret"), "{err}");
    wait_for("the target counts it", || target.stats().auth_failures == 1);

    // A target without a secret: the client with one is told so.
    let open = started(TcpConfig::default());
    let err =
        ferry_transport_tcp::fetch_descriptor_with(&open.addr, WAIT, Some(&wrong)).unwrap_err();
    assert!(err.to_string().contains("secret"), "{err}");

    // A fake target that does not know the secret: the client refuses it (mutual).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 48];
        s.read_exact(&mut hello).unwrap();
        let mut f = header(CHALLENGE, 64, 0);
        f.extend(random(64));
        s.write_all(&f).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest
    });
    let right = SharedSecret::from("correct horse battery staple");
    let err = ferry_transport_tcp::fetch_descriptor_with(&addr, WAIT, Some(&right)).unwrap_err();
    assert!(err.to_string().contains("secret"), "{err}");
    // The client sent no proof of its own to a target that failed to prove itself.
    assert!(fake.join().unwrap().is_empty());
}

#[test]
fn with_the_secret_descriptors_lanes_and_data_work() {
    let secret = SharedSecret::from("correct horse battery staple");
    let target = secret_target();
    let region = host(1 << 20);
    let key = target.t.register(&region, Access::RemoteReadWrite).unwrap()[0];
    let body =
        ferry_transport_tcp::fetch_descriptor_with(&target.addr, WAIT, Some(&secret)).unwrap();
    assert_eq!(body, target.descriptor);
    assert_eq!(target.t.fetch_descriptor(&target.addr).unwrap(), body);

    // Lanes of an initiator with the same secret move data both ways.
    let initiator = started(TcpConfig {
        lanes: 2,
        secret: Some(secret),
        ..TcpConfig::default()
    });
    let local = host(1 << 20);
    initiator
        .t
        .register(&local, Access::RemoteReadWrite)
        .unwrap();
    let conn = initiator.t.connect_tcp(&target.addr).unwrap();
    let data = random(1 << 20);
    assert!(local.copy_from_slice_at(0, &data));
    let post = |op, token| {
        conn.post(Slice {
            op,
            local: local.clone(),
            local_offset: 0,
            remote_addr: region.addr(),
            remote_base: region.addr(),
            remote_keys: RemoteKeys::single(key),
            len: 1 << 20,
            token,
            deadline: Instant::now() + WAIT,
        })
        .unwrap();
        conn.flush();
        let (t, r) = initiator.done.recv_timeout(WAIT).unwrap();
        assert_eq!(t, token);
        assert_eq!(r, Ok(1 << 20));
    };
    post(
        Opcode::Write,
        CompletionToken {
            slot: 1,
            generation: 0,
            task: 0,
        },
    );
    assert_eq!(bytes_of(&region, 0, 1 << 20), data);
    assert!(region.copy_from_slice_at(0, &random(1 << 20)));
    let want = bytes_of(&region, 0, 1 << 20);
    post(
        Opcode::Read,
        CompletionToken {
            slot: 2,
            generation: 0,
            task: 0,
        },
    );
    assert_eq!(bytes_of(&local, 0, 1 << 20), want);
    assert_eq!(target.stats().auth_failures, 0);
    drop(target.done);
}

#[test]
fn the_connection_limit_fits_the_descriptor_limit() {
    // Changes the process's descriptor limit: runs in a child process of its own.
    const CHILD: &str = "FERRY_TEST_FD_LIMIT_CHILD";
    if let Ok(which) = std::env::var(CHILD) {
        use rlimit::Resource;
        let (_, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap();
        if which == "lower" {
            // A hard limit too low for the default 1024 connections.
            rlimit::setrlimit(Resource::NOFILE, 600, 600).unwrap();
            let target = started(TcpConfig::default());
            let fit = target.t.max_connections();
            assert!((50..1024).contains(&fit), "{fit}");
            assert_eq!(rlimit::getrlimit(Resource::NOFILE).unwrap().0, 600);
            // Idle sockets beyond the fitted limit are refused, not served.
            let held: Vec<TcpStream> = (0..fit + 3).map(|_| connect(&target.addr)).collect();
            wait_for("the extra sockets are refused", || {
                target.stats().refused_connections == 3
            });
            assert_eq!(target.stats().open_connections as usize, fit);
            drop(held);
        } else {
            // A low soft limit under a high hard one is raised to fit.
            rlimit::setrlimit(Resource::NOFILE, 300, hard).unwrap();
            let target = started(TcpConfig::default());
            let need = 1024 * 2 + 256;
            if hard >= need {
                assert_eq!(target.t.max_connections(), 1024);
                assert!(rlimit::getrlimit(Resource::NOFILE).unwrap().0 >= need);
            } else {
                assert!(target.t.max_connections() < 1024);
            }
        }
        return;
    }
    for which in ["lower", "raise"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "the_connection_limit_fits_the_descriptor_limit",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, which)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{which}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The child ran the test (not zero tests).
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{which}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// An `Exchange` frame: the protocol byte, then the body.
fn exchange_frame(protocol: u8, body: &[u8]) -> Vec<u8> {
    let mut f = header(EXCHANGE, body.len() as u32 + 1, 0);
    f.push(protocol);
    f.extend_from_slice(body);
    f
}

/// Everything the target sends until it closes the connection (EOF or reset).
fn rest_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the target neither answered nor closed: {e}"),
        }
    }
}

/// The reason in an `Exchanged` body that refuses.
#[track_caller]
fn refusal(body: &[u8]) -> String {
    assert_eq!(
        body.first(),
        Some(&1),
        "an Exchanged body that does not refuse"
    );
    String::from_utf8(body[1..].to_vec()).expect("a UTF-8 reason")
}

#[test]
fn an_exchange_reaches_the_control_plane_as_its_protocol_and_the_answer_comes_back() {
    let target = started(TcpConfig::default());
    // Bodies from empty to the largest that fits with the protocol byte.
    let cases = [
        (Protocol::Rdma, 1000),
        (Protocol::Efa, 37),
        (Protocol::Rdma, 0),
        (Protocol::Efa, MAX_EXCHANGE - 1),
    ];
    for (protocol, len) in cases {
        let body = random(len);
        let got =
            ferry_transport_tcp::exchange_with(&target.addr, protocol, &body, WAIT, None).unwrap();
        let want: Vec<u8> = body.iter().rev().copied().collect();
        assert!(got == want, "{protocol}, {len} bytes: the answer differs");
    }
    assert_eq!(target.control.exchanges(), cases);
    // The transport's own method (no secret here) does the same.
    let initiator = started(TcpConfig::default());
    let body = random(300);
    let got = initiator
        .t
        .exchange(&target.addr, Protocol::Rdma, &body, WAIT)
        .unwrap();
    assert!(got.iter().eq(body.iter().rev()));
    // A message too large for the frame is refused before anything is sent.
    let before = target.stats().connections;
    let err = ferry_transport_tcp::exchange_with(
        &target.addr,
        Protocol::Rdma,
        &random(MAX_EXCHANGE),
        WAIT,
        None,
    )
    .unwrap_err();
    assert_eq!(
        err.kind(),
        ferry_transport_api::ErrorKind::InvalidInput,
        "{err}"
    );
    assert_eq!(target.stats().connections, before);
    assert_eq!(target.control.exchanges().len(), cases.len() + 1);
    assert_eq!(target.stats().protocol_errors, 0);
}

#[test]
fn a_refused_exchange_is_an_error_that_carries_the_targets_reason() {
    let target = started(TcpConfig::default());
    let err =
        ferry_transport_tcp::exchange_with(&target.addr, Protocol::Tcp, &random(64), WAIT, None)
            .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Refused {
                protocol: Protocol::Tcp,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ferry_transport_api::ErrorKind::Rejected);
    let msg = err.to_string();
    assert!(msg.contains(TCP_REFUSAL), "{msg}");
    assert!(msg.contains("tcp set-up"), "{msg}");
    assert_eq!(target.control.exchanges(), [(Protocol::Tcp, 64)]);

    // A control plane that does not answer exchanges refuses with the trait's reason.
    struct Plain;
    impl ControlPlane for Plain {
        fn descriptor(&self) -> Vec<u8> {
            b"{}".to_vec()
        }
        fn notification(&self, _from: &str, _body: &[u8]) -> bool {
            true
        }
    }
    let (tx, _done) = crossbeam_channel::unbounded();
    let plain = TcpTransport::new(TcpConfig::default());
    let ep = plain
        .start(TransportContext {
            completions: Arc::new(Channel(tx)),
            control: Some(Arc::new(Plain)),
            staging: None,
        })
        .unwrap();
    let err = ferry_transport_tcp::exchange_with(&ep.address, Protocol::Efa, b"qp", WAIT, None)
        .unwrap_err();
    assert!(
        err.to_string().contains("no efa transport to answer"),
        "{err}"
    );
    // The connection is still served after a refusal: a descriptor fetch on it works.
    let mut s = connect(&target.addr);
    s.write_all(&exchange_frame(3, &random(10))).unwrap();
    let (kind, seq, body) = answer(&mut s);
    assert_eq!((kind, seq), (EXCHANGED, 0));
    assert_eq!(refusal(&body), TCP_REFUSAL);
    s.write_all(&header(GET_DESCRIPTOR, 0, 0)).unwrap();
    assert_eq!(answer(&mut s), (DESCRIPTOR, 0, target.descriptor.clone()));
}

#[test]
fn an_exchange_goes_out_after_the_acknowledgements_before_it_and_the_connection_goes_on() {
    let target = started(TcpConfig::default());
    let region = host(1 << 16);
    let key = target.t.register(&region, Access::RemoteReadWrite).unwrap()[0];
    let mut s = connect(&target.addr);
    let data = random(4096);
    // A WRITE, then an exchange, sent together: the WRITE's acknowledgement comes first.
    let mut f = header(WRITE, 1, 0);
    f.extend(desc(region.addr(), 4096, key));
    f.extend_from_slice(&data);
    let body = random(200);
    f.extend(exchange_frame(1, &body));
    s.write_all(&f).unwrap();
    assert_eq!(answer(&mut s), (ACK, 0, vec![0]));
    let (kind, _, answered) = answer(&mut s);
    assert_eq!(kind, EXCHANGED);
    assert_eq!(answered[0], 0);
    assert!(answered[1..].iter().eq(body.iter().rev()));
    assert_eq!(bytes_of(&region, 0, 4096), data);
    // The data requests go on in sequence on the same connection, and so do exchanges.
    let data2 = random(512);
    write_frame(&mut s, 1, region.addr() + 4096, key, &data2);
    assert_eq!(answer(&mut s), (ACK, 1, vec![0]));
    s.write_all(&exchange_frame(2, &body[..5])).unwrap();
    let (kind, _, answered) = answer(&mut s);
    assert_eq!((kind, answered[0]), (EXCHANGED, 0));
    assert!(answered[1..].iter().eq(body[..5].iter().rev()));
    assert_eq!(bytes_of(&region, 4096, 512), data2);
    assert_eq!(
        target.control.exchanges(),
        [(Protocol::Rdma, 200), (Protocol::Efa, 5)]
    );
}

#[test]
fn malformed_exchanges_are_refused_and_the_target_keeps_serving() {
    let target = started(TcpConfig {
        progress_timeout: Duration::from_millis(300),
        ..TcpConfig::default()
    });
    let region = host(1 << 16);
    let key = target.t.register(&region, Access::RemoteReadWrite).unwrap()[0];

    // Unknown protocol bytes: refused with a reason, the control plane never asked, and
    // the connection goes on.
    let mut s = connect(&target.addr);
    for byte in [0u8, 4, 255] {
        s.write_all(&exchange_frame(byte, &random(40))).unwrap();
        let (kind, seq, body) = answer(&mut s);
        assert_eq!((kind, seq), (EXCHANGED, 0));
        let why = refusal(&body);
        assert!(
            why.contains(&format!("unknown protocol byte {byte}")),
            "{why}"
        );
    }
    // The protocol byte alone is a well-formed (empty) message.
    s.write_all(&exchange_frame(4, &[])).unwrap();
    let (kind, _, body) = answer(&mut s);
    assert_eq!(kind, EXCHANGED);
    assert!(refusal(&body).contains("unknown protocol byte 4"));
    s.write_all(&header(GET_DESCRIPTOR, 0, 0)).unwrap();
    assert_eq!(answer(&mut s), (DESCRIPTOR, 0, target.descriptor.clone()));
    assert!(target.control.exchanges().is_empty());

    // Frames the target closes on at once, answering nothing.
    let mut over = header(EXCHANGE, MAX_EXCHANGE as u32 + 1, 0);
    over.push(1);
    over.extend(random(4096));
    let closing = [
        ("an Exchange of count 0", header(EXCHANGE, 0, 0)),
        ("an Exchange over the limit", over),
        (
            "an Exchange of count 2^32 - 1",
            header(EXCHANGE, u32::MAX, 0),
        ),
        ("an Exchanged frame", {
            let mut f = header(EXCHANGED, 1, 0);
            f.push(0);
            f
        }),
    ];
    for (what, frame) in &closing {
        let mut s = connect(&target.addr);
        // The target may close before it has read everything: the rest is refused.
        let _ = s.write_all(frame);
        let got = rest_until_closed(&mut s);
        assert!(got.is_empty(), "{what}: {} bytes came back", got.len());
    }
    wait_for("each is counted as a protocol error", || {
        target.stats().protocol_errors == closing.len() as u64
    });

    // A body cut short by the peer's close, and one that stops coming: no answer, and
    // nothing reaches the control plane.
    let mut f = header(EXCHANGE, 100, 0);
    f.push(1);
    f.extend(random(10));
    let mut cut = connect(&target.addr);
    cut.write_all(&f).unwrap();
    cut.shutdown(Shutdown::Write).unwrap();
    assert!(rest_until_closed(&mut cut).is_empty());
    let mut stalled = connect(&target.addr);
    stalled.write_all(&f).unwrap();
    assert!(rest_until_closed(&mut stalled).is_empty());
    wait_for("the stalled body is closed at the progress limit", || {
        target.stats().progress_timeouts == 1
    });
    // The largest count is accepted when its body is whole.
    let mut s = connect(&target.addr);
    let body = random(MAX_EXCHANGE - 1);
    s.write_all(&exchange_frame(1, &body)).unwrap();
    let (kind, _, answered) = answer(&mut s);
    assert_eq!((kind, answered.len()), (EXCHANGED, MAX_EXCHANGE));
    assert!(answered[1..].iter().eq(body.iter().rev()));
    assert_eq!(
        target.control.exchanges(),
        [(Protocol::Rdma, MAX_EXCHANGE - 1)]
    );

    // Other clients are served throughout: a descriptor fetch, an exchange, a WRITE.
    let fetched = ferry_transport_tcp::fetch_descriptor(&target.addr, WAIT).unwrap();
    assert_eq!(fetched, target.descriptor);
    let got =
        ferry_transport_tcp::exchange_with(&target.addr, Protocol::Efa, b"ok", WAIT, None).unwrap();
    assert_eq!(got, b"ko");
    let mut w = connect(&target.addr);
    let data = random(4096);
    write_frame(&mut w, 0, region.addr(), key, &data);
    assert_eq!(answer(&mut w), (ACK, 0, vec![0]));
    assert_eq!(bytes_of(&region, 0, 4096), data);
    assert_eq!(target.stats().protocol_errors, closing.len() as u64);
}

#[test]
fn with_a_secret_only_a_client_that_proves_it_gets_an_exchange_answered() {
    let secret = SharedSecret::from("correct horse battery staple");
    let target = secret_target();
    let body = random(128);
    let want: Vec<u8> = body.iter().rev().copied().collect();

    // A raw Exchange as the first frame: told a secret is required, and closed.
    let mut s = connect(&target.addr);
    s.write_all(&exchange_frame(1, &body)).unwrap();
    let got = rest_until_closed(&mut s);
    assert!(got.len() <= 16, "{} bytes came back", got.len());
    assert!(got.is_empty() || got == header(CHALLENGE, 0, 0), "{got:?}");
    // The client without the secret, and the one with the wrong secret, are told so.
    let err = ferry_transport_tcp::exchange_with(&target.addr, Protocol::Rdma, &body, WAIT, None)
        .unwrap_err();
    assert!(err.to_string().contains("secret"), "{err}");
    let wrong = SharedSecret::from("correct horse battery stapler");
    let err =
        ferry_transport_tcp::exchange_with(&target.addr, Protocol::Rdma, &body, WAIT, Some(&wrong))
            .unwrap_err();
    assert!(err.to_string().contains("secret"), "{err}");
    wait_for("every failure is counted", || {
        target.stats().auth_failures == 3
    });
    assert!(target.control.exchanges().is_empty());

    // The right secret gets the answer, through the function and the transport's method.
    let got = ferry_transport_tcp::exchange_with(
        &target.addr,
        Protocol::Rdma,
        &body,
        WAIT,
        Some(&secret),
    )
    .unwrap();
    assert_eq!(got, want);
    let initiator = started(TcpConfig {
        secret: Some(secret),
        ..TcpConfig::default()
    });
    let got = initiator
        .t
        .exchange(&target.addr, Protocol::Efa, &body, WAIT)
        .unwrap();
    assert_eq!(got, want);
    assert_eq!(
        target.control.exchanges(),
        [(Protocol::Rdma, 128), (Protocol::Efa, 128)]
    );
    assert_eq!(target.stats().auth_failures, 3);
}
