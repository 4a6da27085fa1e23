//! The batch table against fake connections: accounting, retry, generations, deadlines
//! and reasons, without sockets. A [`Fake`] records what is posted on it; the tests
//! complete slices as a transport would, in the order they choose.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport_api::{
    Access, BufferDescriptor, Completions, Connection, FailReason, Location, Opcode, Protocol,
    RemoteStatus, SegmentDescriptor, Slice, TransportKey,
};
use parking_lot::Mutex;

use super::*;
use crate::control::ControlState;
use crate::peer::{Leg, Path, PeerInner};

/// A connection that keeps what is posted and reports nothing by itself.
#[derive(Default)]
struct Fake {
    posted: Mutex<Vec<Slice>>,
    /// Refuse every post with this reason.
    refuse: Option<FailReason>,
    flushes: Mutex<usize>,
    dead: AtomicBool,
}

impl Fake {
    fn refusing(reason: FailReason) -> Arc<Fake> {
        Arc::new(Fake {
            refuse: Some(reason),
            ..Fake::default()
        })
    }

    fn take(&self) -> Vec<Slice> {
        std::mem::take(&mut *self.posted.lock())
    }
}

impl Connection for Fake {
    fn post(&self, slice: Slice) -> Result<(), FailReason> {
        if let Some(r) = self.refuse {
            return Err(r);
        }
        self.posted.lock().push(slice);
        Ok(())
    }

    fn flush(&self) {
        *self.flushes.lock() += 1;
    }

    fn is_alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
    }
}

const BASE: u64 = 0x10_0000;
const EFA_KEY: u64 = 7;
const TCP_KEY: u64 = 9;
/// The primary path's slice size; the fallback's is twice it.
const STEP: usize = 4096;

fn descriptor() -> SegmentDescriptor {
    SegmentDescriptor {
        name: "peer".into(),
        incarnation: 1,
        endpoints: Vec::new(),
        buffers: vec![
            BufferDescriptor {
                name: "both".into(),
                addr: BASE,
                len: 1 << 20,
                location: Location::host(),
                access: Access::RemoteReadWrite,
                keys: vec![
                    TransportKey {
                        protocol: Protocol::Efa,
                        key: EFA_KEY,
                    },
                    TransportKey {
                        protocol: Protocol::Tcp,
                        key: TCP_KEY,
                    },
                ],
            },
            // Device memory the fabric could not register: a TCP key only.
            BufferDescriptor {
                name: "tcp only".into(),
                addr: BASE << 4,
                len: 1 << 20,
                location: Location::Cuda { device: 0 },
                access: Access::RemoteReadWrite,
                keys: vec![TransportKey {
                    protocol: Protocol::Tcp,
                    key: TCP_KEY + 1,
                }],
            },
            // A buffer that starts where the first ends, with keys of its own.
            BufferDescriptor {
                name: "next".into(),
                addr: BASE + (1 << 20),
                len: 1 << 20,
                location: Location::host(),
                access: Access::RemoteReadWrite,
                keys: vec![
                    TransportKey {
                        protocol: Protocol::Efa,
                        key: EFA_KEY + 2,
                    },
                    TransportKey {
                        protocol: Protocol::Tcp,
                        key: TCP_KEY + 2,
                    },
                ],
            },
        ],
    }
}

/// A peer whose primary path is a fabric on `primary`, with a TCP fallback on
/// `fallback`.
fn peer(primary: &Arc<Fake>, fallback: Option<&Arc<Fake>>) -> Arc<PeerInner> {
    peer_on(
        primary.clone(),
        fallback.map(|f| f.clone() as Arc<dyn Connection>),
    )
}

fn peer_on(primary: Arc<dyn Connection>, fallback: Option<Arc<dyn Connection>>) -> Arc<PeerInner> {
    let d = descriptor();
    let p = Path::new(Some(Protocol::Efa), primary, STEP, &d);
    let f = fallback.map(|f| Path::new(Some(Protocol::Tcp), f, 2 * STEP, &d));
    Arc::new(PeerInner::for_tests(
        d,
        p,
        f,
        Arc::new(ControlState::new(1 << 20)),
    ))
}

fn table() -> Arc<BatchTable> {
    BatchTable::new(BatchDefaults {
        timeout: Duration::from_secs(30),
        retry_over_tcp: false,
        busy_poll: Duration::ZERO,
    })
}

fn local(len: usize) -> Arc<RegionMemory> {
    Arc::new(crate::memory::allocate_host(len, Location::host()).expect("allocate"))
}

struct Submitted {
    index: u32,
    slot: Arc<Slot>,
}

impl Submitted {
    fn status(&self, task: usize) -> TaskStatus {
        self.slot.data.read().status(task, Instant::now())
    }

    fn open(&self) -> u32 {
        self.slot.data.read().gate.open()
    }

    /// Bytes the batch still expects to land.
    fn bytes_left(&self) -> u64 {
        self.slot.data.read().bytes_left.load(Ordering::Acquire)
    }

    /// 0 until the task's retry is claimed, 1 after.
    fn attempt(&self, task: usize) -> u8 {
        self.slot.data.read().tasks[task]
            .attempt
            .load(Ordering::Acquire)
    }
}

/// The next `n` slices posted on `conn`, waiting (bounded) for the retry thread to post
/// them.
fn posted_on(conn: &Fake, n: usize) -> Vec<Slice> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if conn.posted.lock().len() >= n {
            return conn.take();
        }
        assert!(Instant::now() < end, "{n} slices were never posted");
        std::thread::yield_now();
    }
}

/// Submits one WRITE of `len` bytes to buffer 0 of `peer` as `BatchBuilder::submit` does.
fn submit(
    table: &BatchTable,
    peer: &Arc<PeerInner>,
    len: usize,
    deadline: Instant,
    retry: bool,
) -> Submitted {
    submit_all(table, peer, &[Req::write(0, 0, len)], deadline, retry)
}

/// One request of a batch: its operation, its offset in the batch's local memory, the
/// remote buffer and the offset in it, its length.
#[derive(Clone, Copy)]
struct Req {
    op: Opcode,
    local_offset: usize,
    buffer: usize,
    remote_offset: u64,
    len: usize,
}

impl Req {
    fn write(local_offset: usize, remote_offset: u64, len: usize) -> Req {
        Req {
            op: Opcode::Write,
            local_offset,
            buffer: 0,
            remote_offset,
            len,
        }
    }
}

/// Submits `reqs`, every one on the peer's primary path and on one local memory, as
/// `BatchBuilder::submit` does.
fn submit_all(
    table: &BatchTable,
    peer: &Arc<PeerInner>,
    reqs: &[Req],
    deadline: Instant,
    retry: bool,
) -> Submitted {
    let (index, slot, _) = table.acquire();
    let leg = Leg::Primary;
    let end = reqs
        .iter()
        .map(|r| r.local_offset + r.len)
        .max()
        .unwrap_or(0);
    let memory = local(end.max(1));
    slot.data.write().pins.push(memory.clone());
    for r in reqs {
        let buffer = &peer.descriptor().buffers[r.buffer];
        let remote_keys = peer.path(leg).keys(r.buffer).cloned().expect("keys");
        slot.data.write().specs.push(TaskSpec {
            op: r.op,
            local: Arc::downgrade(&memory),
            local_offset: r.local_offset,
            peer: peer.clone(),
            buffer: r.buffer,
            remote_addr: buffer.addr + r.remote_offset,
            remote_base: buffer.addr,
            remote_keys,
            len: r.len,
            leg,
        });
    }
    slot.data.write().arm(deadline, retry, false);
    slot.data.read().post_all();
    slot.data.write().pins.clear();
    Submitted { index, slot }
}

fn later() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

fn device_error() -> FailReason {
    // FI_ETRUNC: past the 8 bits an older encoding kept.
    FailReason::Device {
        transport: Protocol::Efa,
        code: 265,
    }
}

#[test]
fn a_retryable_failure_is_retried_on_the_fallback_and_late_reports_of_the_first_attempt_are_ignored(
) {
    let (fabric, tcp) = (Arc::new(Fake::default()), Arc::new(Fake::default()));
    let peer = peer(&fabric, Some(&tcp));
    let table = table();
    let b = submit(&table, &peer, 10_000, later(), true);
    let first = fabric.take();
    assert_eq!(first.len(), 3, "10000 bytes in 4096-byte slices");
    assert!(first.iter().all(|s| s.remote_keys.first() == EFA_KEY));
    assert_eq!(
        *fabric.flushes.lock(),
        1,
        "one doorbell per path per submission"
    );

    table.complete(first[0].token, Err(device_error()));
    table.complete(first[1].token, Ok(first[1].len));
    assert_eq!(
        b.attempt(0),
        0,
        "no retry while a slice of the attempt is out"
    );
    table.complete(first[2].token, Ok(first[2].len));
    assert_eq!(b.attempt(0), 1, "claimed by the last report of the attempt");

    let retry = posted_on(&tcp, 2);
    assert_eq!(retry.len(), 2, "the fallback slices by its own size");
    assert!(retry.iter().all(|s| s.remote_keys.first() == TCP_KEY));
    assert_eq!(retry.iter().map(|s| s.len).sum::<usize>(), 10_000);
    assert_eq!(b.status(0), TaskStatus::Pending);

    // A late (duplicate) report of the abandoned attempt changes nothing.
    table.complete(first[1].token, Ok(first[1].len));
    assert_eq!(b.status(0), TaskStatus::Pending);
    assert_eq!(b.open(), 1);

    table.complete(retry[0].token, Ok(retry[0].len));
    assert_eq!(
        b.status(0),
        TaskStatus::Pending,
        "a slice of the retry is still out (the late report must not count for it)"
    );
    table.complete(retry[1].token, Ok(retry[1].len));
    assert_eq!(b.status(0), TaskStatus::Completed);
    assert_eq!(b.open(), 0);
    table.release(b.index, &b.slot);
}

/// A connection whose posts wait until the test lets them go (as a TCP lane whose queue
/// is full waits for room), saying which thread each post came from.
struct Stalling {
    entered: crossbeam_channel::Sender<std::thread::ThreadId>,
    release: crossbeam_channel::Receiver<()>,
    posted: Mutex<Vec<Slice>>,
}

impl Connection for Stalling {
    fn post(&self, slice: Slice) -> Result<(), FailReason> {
        let _ = self.entered.send(std::thread::current().id());
        let _ = self.release.recv();
        self.posted.lock().push(slice);
        Ok(())
    }

    fn is_alive(&self) -> bool {
        true
    }
}

#[test]
fn a_retry_waiting_for_room_does_not_hold_the_thread_that_reported_the_failure() {
    let fabric = Arc::new(Fake::default());
    let (entered_tx, entered) = crossbeam_channel::unbounded();
    let (release, released) = crossbeam_channel::unbounded();
    let tcp = Arc::new(Stalling {
        entered: entered_tx,
        release: released,
        posted: Mutex::new(Vec::new()),
    });
    let peer = peer_on(fabric.clone(), Some(tcp.clone()));
    let table = table();
    // Two tasks in two batches: the first is retried, the second ends by its report.
    let a = submit(&table, &peer, 100, later(), true);
    let b = submit(&table, &peer, 100, later(), true);
    let (sa, sb) = {
        let mut p = fabric.take();
        (p.remove(0), p.remove(0))
    };
    // The transport's completion thread reports both: the retry's post stalls, and the
    // report after it still goes through at once.
    let t = table.clone();
    let reporter = std::thread::spawn(move || {
        t.complete(sa.token, Err(FailReason::ConnectionLost));
        t.complete(sb.token, Ok(sb.len));
    });
    let limit = Duration::from_secs(20);
    let poster = entered
        .recv_timeout(limit)
        .expect("the retry was never posted");
    assert_ne!(
        poster,
        reporter.thread().id(),
        "the retry was posted on the reporting thread"
    );
    reporter.join().unwrap();
    assert_eq!(b.status(0), TaskStatus::Completed);
    assert_eq!(a.status(0), TaskStatus::Pending);
    // Room again: the retry goes, and its report completes the task.
    release.send(()).unwrap();
    let end = Instant::now() + limit;
    let r = loop {
        if let Some(r) = tcp.posted.lock().pop() {
            break r;
        }
        assert!(Instant::now() < end, "the retry never left");
        std::thread::yield_now();
    };
    table.complete(r.token, Ok(r.len));
    assert_eq!(a.status(0), TaskStatus::Completed);
}

#[test]
fn a_retried_task_that_fails_again_reports_the_second_reason() {
    let (fabric, tcp) = (Arc::new(Fake::default()), Arc::new(Fake::default()));
    let peer = peer(&fabric, Some(&tcp));
    let table = table();
    let b = submit(&table, &peer, 100, later(), true);
    let s = fabric.take().remove(0);
    table.complete(s.token, Err(FailReason::ConnectionLost));
    let r = posted_on(&tcp, 1).remove(0);
    table.complete(r.token, Err(FailReason::Remote(RemoteStatus::AccessDenied)));
    assert_eq!(
        b.status(0),
        TaskStatus::Failed(FailReason::Remote(RemoteStatus::AccessDenied))
    );
    assert!(tcp.take().is_empty(), "a task is retried once");
}

#[test]
fn without_retry_the_first_reason_survives_exactly() {
    let fabric = Arc::new(Fake::default());
    let tcp = Arc::new(Fake::default());
    let peer = peer(&fabric, Some(&tcp));
    let table = table();
    let b = submit(&table, &peer, 3 * STEP, later(), false);
    let posted = fabric.take();
    table.complete(posted[1].token, Err(device_error()));
    table.complete(posted[0].token, Err(FailReason::TimedOut));
    assert_eq!(b.status(0), TaskStatus::Pending, "a slice is still out");
    table.complete(posted[2].token, Ok(STEP));
    assert_eq!(b.status(0), TaskStatus::Failed(device_error()));
    assert!(tcp.take().is_empty(), "retry is off");
    assert_eq!(b.attempt(0), 0, "retry is off");
    assert!(
        !peer.is_stale(),
        "a device error says nothing about the descriptor"
    );
}

#[test]
fn a_refused_post_fails_its_task_at_once_and_non_retryable_reasons_are_not_retried() {
    let fabric = Fake::refusing(FailReason::Shutdown);
    let tcp = Arc::new(Fake::default());
    let peer = peer(&fabric, Some(&tcp));
    let table = table();
    let b = submit(&table, &peer, 2 * STEP, later(), true);
    assert_eq!(b.status(0), TaskStatus::Failed(FailReason::Shutdown));
    assert_eq!(b.open(), 0);
    assert!(tcp.take().is_empty(), "a shutdown is not worth a retry");
    assert_eq!(b.attempt(0), 0, "a shutdown is not worth a retry");
}

#[test]
fn an_access_error_marks_the_peer_stale() {
    let fabric = Arc::new(Fake::default());
    let peer = peer(&fabric, None);
    let table = table();
    let b = submit(&table, &peer, 10, later(), true);
    let s = fabric.take().remove(0);
    table.complete(s.token, Err(FailReason::Remote(RemoteStatus::KeyMismatch)));
    assert_eq!(
        b.status(0),
        TaskStatus::Failed(FailReason::Remote(RemoteStatus::KeyMismatch))
    );
    assert!(
        peer.is_stale(),
        "the next open fetches the descriptor again"
    );
}

#[test]
fn reports_for_a_released_batch_touch_nothing_in_the_slot_s_next_batch() {
    let fabric = Arc::new(Fake::default());
    let peer = peer(&fabric, None);
    let table = table();
    let old = submit(&table, &peer, 10, later(), false);
    let old_slice = fabric.take().remove(0);
    table.release(old.index, &old.slot);

    let new = submit(&table, &peer, 10, later(), false);
    assert_eq!(new.index, old.index, "the slot is reused");
    let new_slice = fabric.take().remove(0);
    assert_ne!(new_slice.token.generation, old_slice.token.generation);

    table.complete(old_slice.token, Err(FailReason::ConnectionLost));
    assert_eq!(new.status(0), TaskStatus::Pending);
    table.complete(new_slice.token, Ok(10));
    assert_eq!(new.status(0), TaskStatus::Completed);

    // Tokens naming a slot or a task that does not exist are dropped.
    let mut bogus = new_slice.token;
    bogus.task = 99;
    table.complete(bogus, Err(FailReason::ConnectionLost));
    bogus.slot = 1234;
    table.complete(bogus, Err(FailReason::ConnectionLost));
    assert_eq!(new.status(0), TaskStatus::Completed);
}

/// The deadline ends a task whose slices are still out, once, and counts off the batch
/// what it had not landed, once: slices that report after it change nothing.
#[test]
fn the_deadline_ends_a_task_whose_slices_never_report() {
    let fabric = Arc::new(Fake::default());
    let peer = peer(&fabric, None);
    let table = table();
    let b = submit(&table, &peer, 3 * STEP, Instant::now(), false);
    let posted = fabric.take();
    assert_eq!(posted.len(), 3);
    assert!(posted
        .iter()
        .all(|s| s.deadline == b.slot.data.read().deadline));
    table.complete(posted[0].token, Ok(STEP));
    assert_eq!(b.bytes_left(), 2 * STEP as u64);
    let p = b.slot.data.read().progress();
    assert_eq!((p.timed_out, p.pending), (1, 0));
    assert_eq!(b.open(), 0, "the timed-out task ended the gate once");
    assert_eq!(b.bytes_left(), 0, "its missing bytes were counted off");
    // The slices that report after the deadline change nothing (their bytes were
    // counted by the deadline, not again).
    table.complete(posted[1].token, Ok(STEP));
    table.complete(posted[2].token, Ok(STEP));
    assert_eq!(b.status(0), TaskStatus::TimedOut);
    assert_eq!(b.open(), 0);
    assert_eq!(b.bytes_left(), 0);
}

/// A dropped batch adds its tasks to their peers' counters by outcome, per peer; a task
/// still open past the deadline counts as timed out, one still open before it not at
/// all.
#[test]
fn a_batch_s_tasks_are_counted_for_their_peers_by_outcome() {
    let (one, two) = (Arc::new(Fake::default()), Arc::new(Fake::default()));
    let (p1, p2) = (peer(&one, None), peer(&two, None));
    let table = table();
    // Three tasks to peer one (completed, failed, never reported) and one to peer two.
    let b = submit_all(
        &table,
        &p1,
        &[
            Req::write(0, 0, STEP),
            Req::write(2 * STEP, 2 * STEP as u64, STEP),
            Req::write(4 * STEP, 4 * STEP as u64, STEP),
        ],
        later(),
        false,
    );
    let posted = one.take();
    table.complete(posted[0].token, Ok(STEP));
    table.complete(posted[1].token, Err(FailReason::ConnectionLost));
    b.slot.data.read().account();
    let s = p1.counters.snapshot();
    assert_eq!(
        (s.completed, s.failed, s.timed_out, s.bytes_written),
        (1, 1, 0, STEP as u64),
        "an open task before its deadline is not counted"
    );
    table.release(b.index, &b.slot);
    let b = submit_all(
        &table,
        &p2,
        &[Req::write(0, 0, STEP)],
        Instant::now(),
        false,
    );
    assert_eq!(two.take().len(), 1);
    b.slot.data.read().account();
    let s = p2.counters.snapshot();
    assert_eq!(
        (s.completed, s.timed_out),
        (0, 1),
        "past its deadline: timed out"
    );
    assert_eq!(p1.counters.snapshot().timed_out, 0, "each peer its own");
}

#[test]
fn a_path_is_chosen_by_the_keys_both_buffers_have() {
    let fabric = Arc::new(Fake::default());
    let tcp = Arc::new(Fake::default());
    let peer = peer(&fabric, Some(&tcp));
    let mut local = descriptor().buffers.remove(0);
    assert_eq!(peer.path_for(&local, 0).ok(), Some(Leg::Primary));
    assert_eq!(
        peer.path_for(&local, 1).ok(),
        Some(Leg::Fallback),
        "a remote buffer the fabric could not register goes over TCP"
    );
    local.keys.retain(|k| k.protocol == Protocol::Tcp);
    assert_eq!(
        peer.path_for(&local, 0).ok(),
        Some(Leg::Fallback),
        "so does a local one"
    );
    assert_eq!(peer.retry_leg(Leg::Primary, 0), Some(Leg::Fallback));
    assert_eq!(peer.retry_leg(Leg::Fallback, 0), None);

    let alone = self::peer(&fabric, None);
    assert!(alone.path_for(&local, 0).is_err(), "no path has the keys");
    assert_eq!(alone.retry_leg(Leg::Primary, 0), None);
}

/// Requests laid end to end on both sides travel as one slice per run, a run no longer
/// than the path's slice; each task still ends by its own account.
#[test]
fn contiguous_requests_travel_as_one_slice_per_run() {
    let fabric = Arc::new(Fake::default());
    let peer = peer(&fabric, None);
    let table = table();
    // Ten 1000-byte requests: a 4096-byte slice carries four of them, so 4 + 4 + 2.
    let reqs: Vec<Req> = (0..10)
        .map(|i| Req::write(i * 1000, i as u64 * 1000, 1000))
        .collect();
    let b = submit_all(&table, &peer, &reqs, later(), false);
    let posted = fabric.take();
    let shape = |f: fn(&Slice) -> u64| posted.iter().map(f).collect::<Vec<_>>();
    assert_eq!(shape(|s| s.len as u64), [4000, 4000, 2000]);
    assert_eq!(shape(|s| u64::from(s.token.task)), [0, 4, 8]);
    assert_eq!(shape(|s| s.local_offset as u64), [0, 4000, 8000]);
    assert_eq!(shape(|s| s.remote_addr - BASE), [0, 4000, 8000]);
    assert!(posted.iter().all(|s| s.remote_keys.first() == EFA_KEY));
    assert_eq!(b.open(), 10);
    assert_eq!(
        table.stats().merged_requests,
        7,
        "ten requests in three slices"
    );

    table.complete(posted[1].token, Ok(4000));
    let status = |range: std::ops::Range<usize>| range.map(|t| b.status(t)).collect::<Vec<_>>();
    assert_eq!(status(4..8), [TaskStatus::Completed; 4]);
    assert_eq!(status(0..4), [TaskStatus::Pending; 4]);
    assert_eq!(status(8..10), [TaskStatus::Pending; 2]);
    assert_eq!(b.open(), 6);
    assert_eq!(b.bytes_left(), 6000);

    table.complete(posted[0].token, Ok(4000));
    table.complete(posted[2].token, Ok(2000));
    assert_eq!(status(0..10), [TaskStatus::Completed; 10]);
    assert_eq!(b.open(), 0);
    assert_eq!(b.bytes_left(), 0);
    table.release(b.index, &b.slot);
}

/// Each pair of requests below follows the other except in one respect, which keeps them
/// apart: one slice each (a request longer than a slice is cut as always).
#[test]
fn requests_that_do_not_follow_each_other_on_both_sides_travel_apart() {
    let read = |local_offset, remote_offset, len| Req {
        op: Opcode::Read,
        ..Req::write(local_offset, remote_offset, len)
    };
    let w = Req::write;
    let next_buffer = Req {
        buffer: 2,
        ..w(100, 0, 100)
    };
    let cases: [(&str, Vec<Req>, &[usize]); 8] = [
        (
            "a gap in local memory",
            vec![w(0, 0, 100), w(200, 100, 100)],
            &[100, 100],
        ),
        (
            "a gap in remote memory",
            vec![w(0, 0, 100), w(100, 200, 100)],
            &[100, 100],
        ),
        (
            "the other operation",
            vec![w(0, 0, 100), read(100, 100, 100)],
            &[100, 100],
        ),
        (
            "another remote buffer at the next address",
            vec![w(0, (1 << 20) - 100, 100), next_buffer],
            &[100, 100],
        ),
        (
            "longer than a slice together",
            vec![w(0, 0, 4000), w(4000, 4000, 100)],
            &[4000, 100],
        ),
        (
            "one longer than a slice",
            vec![w(0, 0, 100), w(100, 100, 5000)],
            &[100, 4096, 904],
        ),
        (
            "an empty request between",
            vec![w(0, 0, 100), w(100, 100, 0), w(100, 100, 100)],
            &[100, 100],
        ),
        (
            "in reverse order",
            vec![w(100, 100, 100), w(0, 0, 100)],
            &[100, 100],
        ),
    ];
    for (why, reqs, lens) in cases {
        let fabric = Arc::new(Fake::default());
        let peer = peer(&fabric, None);
        let table = table();
        let b = submit_all(&table, &peer, &reqs, later(), false);
        let posted = fabric.take();
        assert_eq!(
            posted.iter().map(|s| s.len).collect::<Vec<_>>(),
            lens,
            "{why}"
        );
        for s in &posted {
            table.complete(s.token, Ok(s.len));
        }
        assert_eq!(b.open(), 0, "{why}: every task ended");
        assert_eq!(table.stats().merged_requests, 0, "{why}");
        for t in 0..reqs.len() {
            assert_eq!(b.status(t), TaskStatus::Completed, "{why}: task {t}");
        }
        table.release(b.index, &b.slot);
    }
}

/// A run's slice that fails fails each of its tasks, each with the reason; retried, each
/// goes out on its own (the fallback's tokens name one task).
#[test]
fn a_failed_run_fails_each_of_its_tasks_and_each_is_retried_on_its_own() {
    let (fabric, tcp) = (Arc::new(Fake::default()), Arc::new(Fake::default()));
    let peer = peer(&fabric, Some(&tcp));
    let table = table();
    let reqs: Vec<Req> = (0..3)
        .map(|i| Req::write(i * 1000, i as u64 * 1000, 1000))
        .collect();
    let b = submit_all(&table, &peer, &reqs, later(), true);
    let run = fabric.take();
    assert_eq!(run.len(), 1);
    table.complete(run[0].token, Err(device_error()));
    let mut retry = posted_on(&tcp, 3);
    retry.sort_by_key(|s| s.token.task);
    assert_eq!(
        retry.iter().map(|s| s.token.task).collect::<Vec<_>>(),
        [RETRY_BIT, 1 | RETRY_BIT, 2 | RETRY_BIT]
    );
    assert!(retry
        .iter()
        .all(|s| s.len == 1000 && s.remote_keys.first() == TCP_KEY));
    assert_eq!(b.open(), 3);
    for s in &retry {
        table.complete(s.token, Ok(s.len));
    }
    assert_eq!(b.open(), 0);
    assert!((0..3).all(|t| b.status(t) == TaskStatus::Completed));
    // A late report of the run's abandoned attempt changes nothing.
    table.complete(run[0].token, Ok(3000));
    assert_eq!(b.open(), 0);
    assert!((0..3).all(|t| b.status(t) == TaskStatus::Completed));
    table.release(b.index, &b.slot);

    // Without a retry, the run's failure is each task's.
    let b = submit_all(&table, &peer, &reqs, later(), false);
    let run = fabric.take();
    table.complete(run[0].token, Err(device_error()));
    assert_eq!(b.open(), 0);
    assert!((0..3).all(|t| b.status(t) == TaskStatus::Failed(device_error())));
    table.release(b.index, &b.slot);

    // A post the connection refuses fails the run's every task at once.
    let refusing = peer_on(Fake::refusing(FailReason::ConnectionLost), None);
    let b = submit_all(&table, &refusing, &reqs, later(), false);
    assert_eq!(b.open(), 0);
    assert!((0..3).all(|t| b.status(t) == TaskStatus::Failed(FailReason::ConnectionLost)));
    table.release(b.index, &b.slot);
}

/// What a batch still expects to land counts a failed attempt's landed bytes back in when
/// the task is retried, and an ended task's missing bytes out: it falls to 0 when the
/// batch ends, however its tasks ended.
#[test]
fn bytes_left_counts_what_is_still_to_land_across_failures_and_retries() {
    let (fabric, tcp) = (Arc::new(Fake::default()), Arc::new(Fake::default()));
    let peer = peer(&fabric, Some(&tcp));
    let table = table();
    // 10000 bytes in slices of 4096: 4096 + 4096 + 1808.
    let reqs = [Req::write(0, 0, 10_000)];
    for retry in [true, false] {
        let b = submit_all(&table, &peer, &reqs, later(), retry);
        let first = fabric.take();
        assert_eq!(first.len(), 3);
        table.complete(first[0].token, Ok(4096));
        assert_eq!(b.bytes_left(), 10_000 - 4096);
        table.complete(first[1].token, Err(device_error()));
        assert_eq!(
            b.bytes_left(),
            10_000 - 4096,
            "a failed slice lands nothing"
        );
        table.complete(first[2].token, Ok(1808));
        if retry {
            assert_eq!(b.bytes_left(), 10_000, "the retry moves every byte again");
            let again = posted_on(&tcp, 2); // the fallback's slices are twice as long
            for s in &again {
                table.complete(s.token, Ok(s.len));
            }
            assert_eq!(b.status(0), TaskStatus::Completed);
        } else {
            assert_eq!(b.status(0), TaskStatus::Failed(device_error()));
        }
        assert_eq!(b.open(), 0);
        assert_eq!(b.bytes_left(), 0, "retry {retry}");
        table.release(b.index, &b.slot);
    }
}

#[test]
fn the_instant_a_batch_ends_is_kept_for_its_waiter() {
    let fabric = Arc::new(Fake::default());
    let peer = peer(&fabric, None);
    let table = table();
    let before = Instant::now();
    let b = submit_all(
        &table,
        &peer,
        &[Req::write(0, 0, 100), Req::write(1000, 1000, 100)],
        later(),
        false,
    );
    let posted = fabric.take();
    assert_eq!(posted.len(), 2, "the two requests do not follow each other");
    table.complete(posted[0].token, Ok(100));
    assert_eq!(b.slot.data.read().ended_at(), None, "a task is still open");
    table.complete(posted[1].token, Ok(100));
    let at = b.slot.data.read().ended_at().expect("the batch has ended");
    assert!(before <= at && at <= Instant::now());
    table.release(b.index, &b.slot);
    // The slot's next batch starts with no end.
    let again = submit(&table, &peer, 100, later(), false);
    assert_eq!(again.slot.data.read().ended_at(), None);
}

/// Kept from the batch's first tests: the task's state machine alone.
mod task {
    use super::*;

    fn task(slices: u32) -> Task {
        let t = Task::default();
        t.remaining.store(slices, Ordering::Relaxed);
        t
    }

    /// A failed slice does not end its task while the task's other slices are out: they
    /// may still write into the buffer. The first failure is the reason.
    #[test]
    fn a_task_ends_only_when_every_slice_has_reported() {
        let t = task(3);
        assert_eq!(t.report(Err(FailReason::ConnectionLost)), Reported::Pending);
        assert_eq!(t.report(Ok(4096)), Reported::Pending);
        assert_eq!(
            t.report(Err(device_error())),
            Reported::Failed(FailReason::ConnectionLost)
        );

        let t = task(2);
        assert_eq!(t.report(Err(device_error())), Reported::Pending);
        assert_eq!(
            t.report(Err(FailReason::TimedOut)),
            Reported::Failed(device_error())
        );

        let t = task(2);
        assert_eq!(t.report(Ok(1)), Reported::Pending);
        assert_eq!(t.report(Ok(1)), Reported::Completed);
        assert!(t.finish(DONE));
        assert!(!t.finish(FAILED), "a task ends once");
    }
}
