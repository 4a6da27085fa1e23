//! The initiator: persistent connection lanes to one peer. Each lane has a sender thread
//! that gathers queued slices into vectored frames (many small requests share one system
//! call) and a receiver thread that completes them in order, reading READ data straight
//! into registered memory.
//!
//! Every task ends by its deadline, whatever the peer does. Each step that can wait
//! (room in the queue, room in flight, the socket) waits until the deadline of what it
//! carries at most; what ended while queued is not sent; and everything in flight,
//! notifications included, has a deadline: a lane still owing an answer past one is
//! closed, so its connection reports it is not alive and is replaced on the next
//! connect. READ data lands in local memory only while its slice is live (see
//! `Receiver_`).

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;
use std::thread::Thread;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};
use ferry_transport_api::sync::Doorbell;
use ferry_transport_api::{
    Completions, Connection, FailReason, Opcode, RegionMemory, RemoteStatus, Slice,
};

use parking_lot::{Condvar, Mutex};

use crate::frame::{Desc, Header, Kind, DESC_LEN, HEADER_LEN, MAX_DESCS, MAX_NOTIFY};
use crate::lane::{Answers, Entry, Inflight};
use crate::pipe::{Pace, Pipe};
use crate::staged;
use crate::Shared;

/// Most payload bytes gathered into one WRITE frame (a larger request goes alone).
const MAX_FRAME_BYTES: usize = 16 << 20;
/// Most bytes one READ frame asks for (a larger request goes alone). The target answers
/// frame by frame, so a large READ batch comes back as a train of answers of this size,
/// each completed as it lands, and the target reads the next request between two of
/// them. Measured on loopback in runs side by side (READ 1 MiB x128, one batch in
/// flight): 16 MiB frames moved 2.9-3.0 GB/s with about 210 segments retransmitted per
/// GB (this VM's loopback reorders segments between its two CPUs), 2 MiB 4.0 (95-125),
/// 1 MiB 4.0-4.3 (35-45), 512 KiB 3.8. READ 64 KiB x128 went from 3.5 to 4.4-5.0, and
/// 1 MiB x8 at depth 2 from 4.1-4.3 to 5.0-5.2. A request costs 24 bytes, so the extra
/// frames cost next to nothing.
const MAX_READ_FRAME_BYTES: usize = 1 << 20;
/// Slices queued per lane before `post` waits: one frame's worth. The queue only hands
/// slices to whichever thread sends; what bounds the pipeline is the in-flight table
/// (`max_inflight`). Its slots are allocated and touched when the lane opens (96 bytes
/// each), so this is most of an idle lane's memory: 24 KiB.
const QUEUE_DEPTH: usize = MAX_DESCS;
/// Bytes a submitting thread sends itself before it leaves the rest to the lane's
/// sender thread: small submissions skip a thread hand-off, large ones do not block.
const INLINE_BYTES: usize = 256 * 1024;
/// In flight below this many bytes, the receiver spins for answers (they come back in
/// microseconds); above it, it sleeps (they come back at link speed).
const SPIN_INFLIGHT_BYTES: usize = 256 * 1024;
/// Longest sleep of a blocked lane thread between checks of shutdown and deadlines.
const STEP: Duration = Duration::from_millis(100);
/// How long a submitting thread sending inline waits for the socket or for room in flight
/// before it leaves the frame to the sender thread: long enough for a healthy peer (no
/// thread hand-off), short enough that a stalled peer does not hold the submission.
const INLINE_WAIT: Duration = Duration::from_millis(2);

enum Item {
    Slice(Slice),
    Notify {
        body: Vec<u8>,
        /// When the caller stops waiting for the answer.
        deadline: Instant,
        reply: Sender<Result<(), FailReason>>,
    },
}

impl Item {
    fn deadline(&self) -> Instant {
        match self {
            Item::Slice(s) => s.deadline,
            Item::Notify { deadline, .. } => *deadline,
        }
    }
}

struct LaneState {
    dead: AtomicBool,
    inflight: Mutex<Inflight>,
    not_full: Condvar,
    /// The lane's one socket, shared by both halves and the receiver thread's wait:
    /// shutting it down wakes every thread polling it.
    socket: Arc<TcpStream>,
    /// Waiting threads receiving on this lane, and the receiver thread's wait.
    drivers: Drivers,
}

/// Why a lane's I/O error ends what the lane carries: the transport shutting down (its
/// workers stop and sockets close under them, whichever thread notices first), a
/// deadline, or the connection itself.
fn lane_failure(shared: &Shared, e: &io::Error) -> FailReason {
    if shared.stopping() {
        FailReason::Shutdown
    } else if e.kind() == io::ErrorKind::TimedOut {
        FailReason::TimedOut
    } else {
        FailReason::ConnectionLost
    }
}

impl LaneState {
    /// Closes the lane: nothing more is sent or received on it, and everything queued or
    /// in flight fails with the first reason given.
    fn kill(&self, peer: &str, reason: FailReason, why: &dyn std::fmt::Display) {
        self.inflight.lock().closed.get_or_insert(reason);
        if !self.dead.swap(true, Ordering::AcqRel) {
            tracing::debug!(%peer, %reason, %why, "lane closed");
            let _ = self.socket.shutdown(std::net::Shutdown::Both);
            // Polls of the socket end with the shutdown; the receiver thread's wait gets
            // the socket back if waiting threads had taken it out.
            self.drivers.restore(&self.socket);
            self.not_full.notify_all();
        }
    }

    /// Closes the in-flight table and fails everything in it, after `taken` (entries
    /// the receiver had taken out), with the reason the lane closed for.
    /// `before` is told how many requests are about to fail, and why, before any of
    /// them is reported (so what it logs comes before what the caller of the batch sees).
    fn drain(
        &self,
        completions: &dyn Completions,
        taken: &mut Vec<Entry>,
        reason: FailReason,
        before: impl FnOnce(usize, FailReason),
    ) {
        let (entries, reason): (Vec<Entry>, FailReason) = {
            let mut g = self.inflight.lock();
            let reason = *g.closed.get_or_insert(reason);
            (g.drain_all().collect(), reason)
        };
        self.not_full.notify_all();
        before(taken.len() + entries.len(), reason);
        for e in taken.drain(..).chain(entries) {
            e.fail(completions, reason);
        }
    }
}

/// Locks the in-flight table once it has room for `n` more entries, waiting until
/// `give_up` at most ([`NoRoom::Full`]) and never past `deadline`, the earliest of the
/// entries to add ([`NoRoom::TimedOut`]: they cannot end in time any more, and nothing of
/// them was sent). A closed lane is [`NoRoom::Closed`].
fn reserve(
    state: &LaneState,
    cap: usize,
    n: usize,
    deadline: Instant,
    give_up: Instant,
) -> Result<parking_lot::MutexGuard<'_, Inflight>, NoRoom> {
    let cap = cap.max(MAX_DESCS);
    let mut g = state.inflight.lock();
    loop {
        if let Some(reason) = g.closed {
            return Err(NoRoom::Closed(reason));
        }
        if g.entries.len() + n <= cap {
            return Ok(g);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(NoRoom::TimedOut);
        }
        if now >= give_up {
            return Err(NoRoom::Full);
        }
        // Bounded so a missed wake-up costs a step, not the whole wait.
        state
            .not_full
            .wait_until(&mut g, deadline.min(give_up).min(now + STEP));
    }
}

/// Everything one lane shares between the threads that use it.
struct Lane {
    state: Arc<LaneState>,
    tx: Sender<Item>,
    rx: Receiver<Item>,
    /// Who drains the queue: at most one thread at a time (a submitter inline, or the
    /// lane's sender thread), and nothing queued is left waiting for a timer. The
    /// protocol is model-checked in `ferry_transport_api::sync`.
    bell: Doorbell,
    /// The sending half; only the runner the doorbell chose touches it (and the sender
    /// thread once the connection is gone).
    send: Mutex<SendState>,
    /// The lane's sender thread, woken only when the doorbell hands it work.
    sender: OnceLock<Thread>,
    /// Cleared when the connection is dropped: the sender thread then exits.
    open: AtomicBool,
    /// The receiving half: whoever holds it reads answers, one whole answer at a time
    /// (the lane's receiver thread, or a waiting thread driving the connection).
    recv: Mutex<Receiver_>,
}

impl Lane {
    /// Makes sure what is queued gets sent without the caller sending it: rings, and if
    /// nobody was draining, hands the role to the sender thread.
    fn wake_sender(&self) {
        if self.bell.ring() {
            self.hand_over();
        }
    }

    fn hand_over(&self) {
        self.bell.hand();
        if let Some(t) = self.sender.get() {
            t.unpark();
        }
    }

    /// Sends what is queued on the calling thread, up to `budget` bytes, unless another
    /// thread is already sending (it then sends this too); hands whatever is left past
    /// the budget to the sender thread.
    fn pump(&self, budget: usize) {
        if self.bell.ring() {
            self.run(budget);
        }
    }

    /// Drains the queue as the doorbell's runner until it is empty and nobody rang
    /// meanwhile, or `budget` bytes went out (the rest goes to the sender thread).
    fn run(&self, budget: usize) {
        loop {
            let finished = self.send.lock().pump(self, budget);
            if !finished {
                self.hand_over();
                return;
            }
            if !self.bell.done() {
                return;
            }
        }
    }

    fn sender_loop(self: Arc<Self>) {
        let span = tracing::debug_span!("lane-send");
        let _enter = span.enter();
        loop {
            if self.bell.take() {
                self.run(usize::MAX);
                continue;
            }
            if !self.open.load(Ordering::Acquire) {
                // No connection handle is left, so nothing more can be posted.
                let s = self.send.lock();
                while let Ok(item) = self.rx.try_recv() {
                    s.fail_item(item, FailReason::Shutdown);
                }
                return;
            }
            std::thread::park();
        }
    }

    /// The receiver thread: reads the answers that arrive (spinning briefly while small
    /// requests are in flight, then sleeping until the socket is readable). It ends when
    /// the lane closes.
    fn receiver_loop(self: Arc<Self>) {
        let span = tracing::debug_span!("lane-recv", peer = %self.recv.lock().peer);
        let _enter = span.enter();
        let mut spin_until = None;
        loop {
            if let Err(e) = self.receiver_step(&mut spin_until) {
                self.recv.lock().fail(&e);
                return;
            }
        }
    }

    /// Reads what has arrived, then spins (a yield) while small requests are in flight
    /// and no waiting thread drives the lane, or sleeps until the socket is readable or a
    /// deadline check is due (while waiting threads drive, until the last one leaves).
    fn receiver_step(&self, spin_until: &mut Option<Instant>) -> io::Result<()> {
        let drivers = &self.state.drivers;
        let mut r = self.recv.lock();
        // Answer by answer; a waiting thread that comes to drive takes over between two.
        let mut got = false;
        while !drivers.present() && r.receive()? {
            got = true;
        }
        if got {
            *spin_until = None;
        }
        let now = Instant::now();
        if !drivers.present() && now < *spin_until.get_or_insert_with(|| now + r.pace().spin()) {
            drop(r);
            std::thread::yield_now();
            return Ok(());
        }
        let timeout = r.pace().before_sleep()?;
        drop(r);
        *spin_until = None;
        drivers.sleep(timeout)
    }

    /// A waiting thread's turn at receiving (see `Connection::drive`): reads what has
    /// arrived unless another thread holds the receiving half. It reads whatever answer
    /// comes next, of any size and for whichever thread: while waiters drive, the
    /// receiver thread stays out.
    fn drive(&self) {
        if self.state.dead.load(Ordering::Acquire) || self.state.inflight.lock().entries.is_empty()
        {
            return;
        }
        if let Some(mut r) = self.recv.try_lock() {
            match r.receive() {
                Ok(true) => {
                    r.shared
                        .stats
                        .answers_read_by_waiters
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(e) => r.fail(&e),
            }
        }
    }
}

/// The waiting threads receiving on a lane ([`Connection::start_driving`]), and the
/// receiver thread's sleep between answers: an `epoll` instance of its own holding the
/// lane's socket, so a thread holding the receiving half (which polls the socket within
/// an answer) never takes its readiness.
///
/// While any waiting thread is present, the socket is taken out of that instance, so
/// arriving answers wake only the thread that reads them, and the receiver thread sleeps
/// on, without being woken, and does not spin. The last one to leave puts the socket
/// back: adding a socket that is already readable wakes the sleeper at once, so whatever
/// arrived and was not read meanwhile wakes the receiver thread (nothing is left unread).
/// Changing the instance's set never wakes the sleeper otherwise, which is why the
/// receiver sleeps on an instance of its own and not in a poll of the socket.
struct Drivers {
    count: Mutex<DriverCount>,
    /// Some are present, for the receiver thread's spinning to look at without the lock.
    present: AtomicBool,
    idle: OwnedFd,
}

impl Drivers {
    /// The receiver's wait, holding `socket`.
    fn new(socket: &TcpStream) -> io::Result<Drivers> {
        let idle = crate::sockopt::epoll()?;
        crate::sockopt::epoll_add(idle.as_fd(), socket.as_fd())?;
        Ok(Drivers {
            count: Mutex::new(DriverCount {
                present: 0,
                registered: true,
                closed: false,
            }),
            present: AtomicBool::new(false),
            idle,
        })
    }

    fn present(&self) -> bool {
        self.present.load(Ordering::Acquire)
    }

    /// The receiver thread's sleep: until the socket (when no waiting thread drives) is
    /// readable or closed, or `timeout`.
    fn sleep(&self, timeout: Duration) -> io::Result<()> {
        crate::sockopt::epoll_sleep(self.idle.as_fd(), timeout)
    }

    /// One more is present. The socket stays in the receiver's wait if it cannot be
    /// taken out (the receiver thread then wakes for answers it does not read: slower,
    /// not wrong).
    fn enter(&self, socket: &TcpStream) {
        let mut c = self.count.lock();
        c.present += 1;
        self.present.store(true, Ordering::Release);
        if c.registered
            && !c.closed
            && crate::sockopt::epoll_remove(self.idle.as_fd(), socket.as_fd()).is_ok()
        {
            c.registered = false;
        }
    }

    /// One fewer. An error means the socket could not be put back into the receiver's
    /// wait: answers would go unread, so the caller closes the lane.
    fn leave(&self, socket: &TcpStream) -> io::Result<()> {
        let mut c = self.count.lock();
        c.present = c.present.saturating_sub(1);
        if c.present > 0 {
            return Ok(());
        }
        self.present.store(false, Ordering::Release);
        if !c.registered {
            crate::sockopt::epoll_add(self.idle.as_fd(), socket.as_fd())?;
            c.registered = true;
        }
        Ok(())
    }

    /// Puts the (closed) socket back in the receiver's wait whoever is present, so the
    /// receiver thread wakes to the lane closing; waiting threads that enter later leave
    /// it there.
    fn restore(&self, socket: &TcpStream) {
        let mut c = self.count.lock();
        c.closed = true;
        if crate::sockopt::epoll_add(self.idle.as_fd(), socket.as_fd()).is_ok() {
            c.registered = true;
        }
    }
}

/// [`Drivers`]' count, and where the socket is.
struct DriverCount {
    /// Waiting threads present.
    present: usize,
    /// The socket is in the receiver's wait.
    registered: bool,
    /// The lane is closed: the socket stays in the receiver's wait.
    closed: bool,
}

/// A set of persistent lanes to one peer. Slices are spread over the lanes round-robin;
/// notifications always take lane 0, so they arrive in the order they were sent.
pub struct TcpConnection {
    peer: String,
    lanes: Vec<Arc<Lane>>,
    next: AtomicUsize,
    /// Waiting threads may receive on the lanes ([`Connection::start_driving`]): only
    /// when busy polling is on (a thread that sleeps at once gains nothing).
    drivable: bool,
}

impl TcpConnection {
    pub(crate) fn open(
        shared: &Arc<Shared>,
        peer: &str,
        addr: SocketAddr,
    ) -> io::Result<TcpConnection> {
        let completions = shared
            .ctx
            .get()
            .map(|c| c.completions.clone())
            .ok_or_else(|| io::Error::other("transport not started"))?;
        // Built in place: when a later lane fails to connect, dropping the connection
        // closes the lanes already open and ends their threads.
        let mut conn = TcpConnection {
            peer: peer.to_string(),
            lanes: Vec::with_capacity(shared.config.lanes.max(1)),
            next: AtomicUsize::new(0),
            drivable: !shared.config.busy_poll.is_zero(),
        };
        // One deadline for every lane's connect and proof, however many lanes there are.
        let deadline = Instant::now() + shared.config.connect_timeout;
        for index in 0..shared.config.lanes.max(1) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connect timeout passed while opening the lanes",
                ));
            }
            let mut stream = TcpStream::connect_timeout(&addr, left)?;
            // Keepalive, and the shared secret's proof when one is set.
            crate::prepare_client(&mut stream, &shared.config, deadline)?;
            // Says "data lane": the target keeps it through idle spells (keepalive
            // decides), where it closes a connection that never speaks.
            crate::write_all_by(
                &mut stream,
                &Header::new(Kind::Lane, 0, 0).encode(),
                deadline,
                "while announcing the lane",
            )?;
            // One descriptor for the whole lane: both halves and the receiver thread's
            // wait share it.
            let socket = Arc::new(stream);
            let send_pipe = Pipe::new(socket.clone(), None)?;
            let recv_pipe = Pipe::new(socket.clone(), None)?;
            let state = Arc::new(LaneState {
                dead: AtomicBool::new(false),
                // Like the frame's vectors below, it grows with use to what the traffic
                // needs (up to `max_inflight`) and keeps that size, so steady state does
                // not allocate and an idle lane holds no room for a full pipeline.
                inflight: Mutex::new(Inflight::with_capacity(0)),
                not_full: Condvar::new(),
                drivers: Drivers::new(&socket)?,
                socket,
            });
            let (tx, rx) = crossbeam_channel::bounded(QUEUE_DEPTH);
            let lane = Arc::new(Lane {
                state: state.clone(),
                tx,
                rx,
                bell: Doorbell::new(),
                send: Mutex::new(SendState {
                    shared: shared.clone(),
                    completions: completions.clone(),
                    state: state.clone(),
                    pipe: send_pipe,
                    peer: peer.to_string(),
                    seq: 0,
                    held: None,
                    raw: vec![0; HEADER_LEN + MAX_DESCS * DESC_LEN],
                    frame: Vec::new(),
                    unsent: None,
                    regions: Vec::new(),
                    spans: Vec::new(),
                    body: Vec::new(),
                    partial: None,
                }),
                sender: OnceLock::new(),
                open: AtomicBool::new(true),
                recv: Mutex::new(Receiver_ {
                    shared: shared.clone(),
                    completions: completions.clone(),
                    state,
                    pipe: recv_pipe,
                    peer: peer.to_string(),
                    answers: Answers::default(),
                    batch: Vec::new(),
                    guard: Vec::new(),
                }),
            });
            conn.lanes.push(lane.clone());
            let runner = lane.clone();
            let handle = std::thread::Builder::new()
                .name(format!("ferry-tcp-send-{index}"))
                .spawn(move || runner.sender_loop())?;
            let _ = lane.sender.set(handle.thread().clone());
            let receiver = lane.clone();
            std::thread::Builder::new()
                .name(format!("ferry-tcp-recv-{index}"))
                .spawn(move || receiver.receiver_loop())?;
        }
        tracing::debug!(%peer, lanes = conn.lanes.len(), "connected");
        Ok(conn)
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends a small message to the peer's engine and waits until the peer has queued it.
    /// Messages to one peer arrive in the order they were sent.
    ///
    /// `timeout` is the message's deadline like a slice's: a peer that has not answered
    /// by then gets its lane closed (the connection then reports it is not alive).
    pub fn notify(&self, from: &str, message: &[u8], timeout: Duration) -> Result<(), FailReason> {
        let deadline = ferry_transport_api::instant_after(Instant::now(), timeout);
        let body = crate::target::encode_notification(from, message);
        if body.len() > MAX_NOTIFY {
            return Err(FailReason::Remote(RemoteStatus::TooLarge));
        }
        let (reply, done) = crossbeam_channel::bounded(1);
        let lane = &self.lanes[0];
        if lane.state.dead.load(Ordering::Acquire) {
            return Err(FailReason::ConnectionLost);
        }
        enqueue(
            lane,
            Item::Notify {
                body,
                deadline,
                reply,
            },
        )?;
        lane.pump(INLINE_BYTES);
        match done.recv_deadline(deadline) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(FailReason::TimedOut),
            Err(RecvTimeoutError::Disconnected) => Err(FailReason::ConnectionLost),
        }
    }

    /// Fails everything queued or in flight with `reason` and closes the lanes.
    pub(crate) fn close(&self, reason: FailReason) {
        for lane in &self.lanes {
            lane.state.kill(&self.peer, reason, &"closed locally");
            lane.wake_sender();
            // Also when another thread holds the doorbell: the sender thread must see
            // the lane closed (and, after a drop, exit).
            if let Some(t) = lane.sender.get() {
                t.unpark();
            }
        }
    }
}

/// Queues an item, waking the sender thread if the queue is full. A full queue is waited
/// on until the item's deadline at most: then the item fails with
/// [`FailReason::TimedOut`], unsent and unqueued.
fn enqueue(lane: &Lane, item: Item) -> Result<(), FailReason> {
    match lane.tx.try_send(item) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(item)) => {
            lane.wake_sender();
            let deadline = item.deadline();
            // The sender drains the queue (failing what it takes) once the lane closes.
            lane.tx.send_deadline(item, deadline).map_err(|e| match e {
                SendTimeoutError::Timeout(_) => FailReason::TimedOut,
                SendTimeoutError::Disconnected(_) => FailReason::ConnectionLost,
            })
        }
        Err(TrySendError::Disconnected(_)) => Err(FailReason::ConnectionLost),
    }
}

impl Connection for TcpConnection {
    fn post(&self, slice: Slice) -> Result<(), FailReason> {
        let lane = &self.lanes[self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len()];
        if lane.state.dead.load(Ordering::Acquire) {
            return Err(FailReason::ConnectionLost);
        }
        enqueue(lane, Item::Slice(slice))
    }

    fn flush(&self) {
        for lane in &self.lanes {
            lane.pump(INLINE_BYTES);
        }
    }

    fn start_driving(&self) -> bool {
        if !self.drivable {
            return false;
        }
        for lane in &self.lanes {
            let s = &lane.state;
            s.drivers.enter(&s.socket);
        }
        true
    }

    fn drive(&self) {
        for lane in &self.lanes {
            lane.drive();
        }
    }

    fn stop_driving(&self) {
        for lane in &self.lanes {
            let s = &lane.state;
            // A socket the receiver thread can no longer wait on would leave answers
            // unread: the lane closes instead.
            if let Err(e) = s.drivers.leave(&s.socket) {
                s.kill(&self.peer, FailReason::ConnectionLost, &e);
            }
        }
    }

    fn is_alive(&self) -> bool {
        self.lanes
            .iter()
            .all(|l| !l.state.dead.load(Ordering::Acquire))
    }
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        for lane in &self.lanes {
            lane.open.store(false, Ordering::Release);
        }
        self.close(FailReason::Shutdown);
    }
}

/// The sending half of a lane.
///
/// A submitting thread that sends inline (with a byte budget) waits [`INLINE_WAIT`] at
/// most: when the in-flight table has no room or the socket takes no more by then, it
/// leaves the frame where it is (`unsent` or `partial`) and returns, and the lane's
/// sender thread, which sends with no budget, finishes it, waiting up to the frame's
/// deadline at most. So a submission never waits on another batch's frame with a later
/// deadline.
struct SendState {
    shared: Arc<Shared>,
    completions: Arc<dyn Completions>,
    state: Arc<LaneState>,
    pipe: Pipe,
    peer: String,
    seq: u64,
    /// An item taken off the queue that did not fit the frame being built.
    held: Option<Item>,
    /// The encoded header and descriptors of the frame being sent.
    raw: Vec<u8>,
    /// Slices gathered for a frame; left here between calls when an inline sender found
    /// no room in flight (then `unsent` says so).
    frame: Vec<Slice>,
    /// `frame` waits for the sender thread: (operation, earliest deadline).
    unsent: Option<(Opcode, Instant)>,
    /// The payloads of the frame being written: WRITE slices' memory, or a notification
    /// body (`body`).
    regions: Vec<Arc<RegionMemory>>,
    spans: Vec<(usize, usize)>,
    body: Vec<u8>,
    /// A frame partly written by an inline sender, for the sender thread to finish.
    partial: Option<Partial>,
}

/// Where a frame's write stopped.
#[derive(Clone, Copy)]
struct Partial {
    /// Bytes of `raw` that lead the frame.
    head: usize,
    /// Bytes of the frame already written.
    written: usize,
    deadline: Instant,
    /// Some payload is device memory, staged through host memory (never partial).
    staged: bool,
}

/// Why [`reserve`] gave no room.
enum NoRoom {
    /// The lane closed.
    Closed(FailReason),
    /// The deadline passed while waiting.
    TimedOut,
    /// No room by the time the caller gives up waiting.
    Full,
}

impl SendState {
    /// Sends queued items until the queue is empty (returns true), or `budget` bytes went
    /// out, or (when `budget` is not `usize::MAX`: a submitting thread sending inline) the
    /// socket or the in-flight table stays full for [`INLINE_WAIT`] (returns false: the
    /// sender thread takes over from where this left).
    fn pump(&mut self, lane: &Lane, budget: usize) -> bool {
        let inline = budget != usize::MAX;
        if !self.finish_unfinished(inline) {
            return false;
        }
        let mut sent = 0usize;
        loop {
            if sent >= budget {
                return self.held.is_none() && lane.rx.is_empty();
            }
            let first = match self.held.take() {
                Some(item) => item,
                None => match lane.rx.try_recv() {
                    Ok(item) => item,
                    Err(_) => return true,
                },
            };
            if self.state.dead.load(Ordering::Acquire) {
                let reason = self.closed_reason();
                self.fail_item(first, reason);
                continue;
            }
            // What ended while it waited in the queue is not sent: a WRITE reported
            // timed out must not land later because the queue was long.
            let now = Instant::now();
            if first.deadline() <= now {
                self.fail_item(first, FailReason::TimedOut);
                continue;
            }
            let result = match first {
                Item::Notify {
                    body,
                    deadline,
                    reply,
                } => {
                    sent += body.len();
                    self.send_notify(body, deadline, reply, inline)
                }
                Item::Slice(slice) => {
                    let op = slice.op;
                    // A WRITE's payload travels now; a READ costs only its descriptor.
                    let limit = match op {
                        Opcode::Write => MAX_FRAME_BYTES.min(budget - sent),
                        Opcode::Read => MAX_READ_FRAME_BYTES,
                    };
                    let mut bytes = slice.len;
                    let mut deadline = slice.deadline;
                    self.frame.push(slice);
                    while self.frame.len() < MAX_DESCS && bytes < limit {
                        match lane.rx.try_recv() {
                            Ok(Item::Slice(s)) if s.deadline <= now => {
                                self.completions
                                    .complete(s.token, Err(FailReason::TimedOut));
                            }
                            // A frame takes requests while their bytes fit the limit
                            // (one larger request goes alone).
                            Ok(Item::Slice(s)) if s.op == op && bytes + s.len <= limit => {
                                bytes += s.len;
                                deadline = deadline.min(s.deadline);
                                self.frame.push(s);
                            }
                            Ok(other) => {
                                self.held = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    sent += match op {
                        Opcode::Write => bytes.max(1),
                        Opcode::Read => self.frame.len() * DESC_LEN,
                    };
                    self.send_frame(op, deadline, inline)
                }
            };
            match result {
                Ok(true) => {}
                Ok(false) => return false,
                Err(e) => self.kill(&e),
            }
        }
    }

    /// Closes the lane after a failed write.
    fn kill(&self, e: &io::Error) {
        self.state
            .kill(&self.peer, lane_failure(&self.shared, e), e);
    }

    /// Finishes a frame an inline sender left. Returns false when there is one and the
    /// caller is inline (the sender thread finishes it).
    fn finish_unfinished(&mut self, inline: bool) -> bool {
        if self.unsent.is_none() && self.partial.is_none() {
            return true;
        }
        if inline {
            return false;
        }
        if let Some((op, mut deadline)) = self.unsent.take() {
            let now = Instant::now();
            if deadline <= now {
                // What ended while it waited is not sent.
                let completions = &self.completions;
                self.frame.retain(|s| {
                    let live = s.deadline > now;
                    if !live {
                        completions.complete(s.token, Err(FailReason::TimedOut));
                    }
                    live
                });
                deadline = self.frame.iter().map(|s| s.deadline).min().unwrap_or(now);
            }
            if self.state.dead.load(Ordering::Acquire) {
                self.fail_frame(self.closed_reason());
            } else if !self.frame.is_empty() {
                if let Err(e) = self.send_frame(op, deadline, false) {
                    self.kill(&e);
                }
            }
        }
        if let Some(p) = self.partial.take() {
            // Its entries are in flight: a closed lane fails them there. Half a frame
            // cannot be taken back, so one whose deadline passed closes the lane rather
            // than land late.
            if p.deadline <= Instant::now() {
                self.kill(&io::Error::new(
                    io::ErrorKind::TimedOut,
                    "a frame was not sent before its deadline",
                ));
            } else if !self.state.dead.load(Ordering::Acquire) {
                if let Err(e) = self.write_frame(p, false) {
                    self.kill(&e);
                }
            }
            self.clear_payloads();
        }
        true
    }

    fn closed_reason(&self) -> FailReason {
        self.state
            .inflight
            .lock()
            .closed
            .unwrap_or(FailReason::ConnectionLost)
    }

    fn fail_item(&self, item: Item, reason: FailReason) {
        match item {
            Item::Slice(s) => self.completions.complete(s.token, Err(reason)),
            Item::Notify { reply, .. } => {
                let _ = reply.send(Err(reason));
            }
        }
    }

    fn fail_frame(&mut self, reason: FailReason) {
        for s in self.frame.drain(..) {
            self.completions.complete(s.token, Err(reason));
        }
    }

    fn clear_payloads(&mut self) {
        self.regions.clear();
        self.spans.clear();
        // A notification's body goes with its frame (slices leave it unallocated).
        self.body = Vec::new();
    }

    /// Sends the gathered slices as one frame. `deadline` is the earliest of theirs: the
    /// frame waits for room in flight and for the socket until then at most, and an
    /// inline sender waits `INLINE_WAIT` at most (then returns false, leaving the frame).
    fn send_frame(&mut self, op: Opcode, deadline: Instant, inline: bool) -> io::Result<bool> {
        let n = self.frame.len();
        let first_seq = self.seq;
        let kind = if op == Opcode::Write {
            Kind::Write
        } else {
            Kind::Read
        };
        let mut host = true;
        self.raw[..HEADER_LEN].copy_from_slice(&Header::new(kind, n as u32, first_seq).encode());
        for (i, s) in self.frame.iter().enumerate() {
            let d = Desc {
                addr: s.remote_addr,
                len: s.len as u64,
                key: s.remote_keys.first(),
            };
            d.encode_into(
                &mut self.raw[HEADER_LEN + i * DESC_LEN..HEADER_LEN + (i + 1) * DESC_LEN],
            );
            if op == Opcode::Write {
                host &= s.local.location().is_host();
                self.regions.push(s.local.clone());
                self.spans.push((s.local_offset, s.len));
            }
        }
        // Device payloads are staged chunk by chunk, which cannot stop halfway: they go
        // from the sender thread.
        if inline && !host {
            self.clear_payloads();
            self.unsent = Some((op, deadline));
            return Ok(false);
        }
        // Entries go in before the bytes leave: the answer may come back at once.
        let cap = self.shared.config.max_inflight;
        let give_up = if inline {
            Instant::now() + INLINE_WAIT
        } else {
            deadline
        };
        let refused = match reserve(&self.state, cap, n, deadline, give_up) {
            Ok(mut g) => {
                g.on_sent(op, first_seq, &mut self.frame);
                None
            }
            Err(no_room) => Some(no_room),
        };
        if let Some(no_room) = refused {
            self.clear_payloads();
            match no_room {
                NoRoom::Full => {
                    self.unsent = Some((op, deadline));
                    return Ok(false);
                }
                NoRoom::Closed(reason) => self.fail_frame(reason),
                NoRoom::TimedOut => self.fail_frame(FailReason::TimedOut),
            }
            return Ok(true);
        }
        self.seq += n as u64;
        let frame = Partial {
            head: HEADER_LEN + n * DESC_LEN,
            written: 0,
            deadline,
            staged: !host,
        };
        let r = self.write_frame(frame, inline);
        if !matches!(r, Ok(false)) {
            self.clear_payloads();
        }
        r
    }

    /// Writes `raw[..head]` and the payloads from byte `written` on. Inline, it writes
    /// what the socket takes now and, if that is not all, keeps the rest for the sender
    /// thread (returns false); otherwise it waits for the socket until the deadline.
    fn write_frame(&mut self, mut frame: Partial, inline: bool) -> io::Result<bool> {
        let head = &self.raw[..frame.head];
        if frame.staged {
            // Device payloads are staged through host memory, one after the other (only
            // the sender thread gets here, from the start of the frame).
            let mut pace = SendPace {
                shared: &self.shared,
                state: &self.state,
                deadline: frame.deadline,
            };
            let staging = self.shared.staging();
            let pipe = &mut self.pipe;
            let mut write = |b: &[u8]| pipe.write_all(&mut [IoSlice::new(b)], &mut pace);
            write(head)?;
            for (region, &(offset, len)) in self.regions.iter().zip(&self.spans) {
                match region.io_slice(offset, len) {
                    Some(s) => write(&s)?,
                    None => staged::send(staging, region, offset, len, &mut write)?,
                }
            }
            return Ok(true);
        }
        // One vectored write: header, descriptors, every payload.
        let mut bufs: [IoSlice<'_>; MAX_DESCS + 1] = std::array::from_fn(|_| IoSlice::new(&[]));
        bufs[0] = IoSlice::new(head);
        let mut k = 1;
        if !self.body.is_empty() {
            bufs[1] = IoSlice::new(&self.body);
            k = 2;
        }
        // Offsets and lengths were checked by the engine against the region.
        for (region, &(offset, len)) in self.regions.iter().zip(&self.spans) {
            if let Some(s) = region.io_slice(offset, len) {
                bufs[k] = s;
                k += 1;
            }
        }
        let mut rest = &mut bufs[..k];
        IoSlice::advance_slices(&mut rest, frame.written);
        let mut pace = SendPace {
            shared: &self.shared,
            state: &self.state,
            deadline: frame.deadline,
        };
        if inline {
            let left: usize = rest.iter().map(|b| b.len()).sum();
            let until = Instant::now() + INLINE_WAIT;
            let n = self.pipe.write_until(rest, &mut pace, until)?;
            if n < left {
                frame.written += n;
                self.partial = Some(frame);
                return Ok(false);
            }
            return Ok(true);
        }
        self.pipe.write_all(rest, &mut pace).map(|()| true)
    }

    fn send_notify(
        &mut self,
        body: Vec<u8>,
        deadline: Instant,
        reply: Sender<Result<(), FailReason>>,
        inline: bool,
    ) -> io::Result<bool> {
        let seq = self.seq;
        let cap = self.shared.config.max_inflight;
        let give_up = if inline {
            Instant::now() + INLINE_WAIT
        } else {
            deadline
        };
        match reserve(&self.state, cap, 1, deadline, give_up) {
            Ok(mut g) => g.on_sent_notify(seq, deadline, reply),
            Err(NoRoom::Full) => {
                self.held = Some(Item::Notify {
                    body,
                    deadline,
                    reply,
                });
                return Ok(false);
            }
            Err(NoRoom::Closed(reason)) => {
                let _ = reply.send(Err(reason));
                return Ok(true);
            }
            Err(NoRoom::TimedOut) => {
                let _ = reply.send(Err(FailReason::TimedOut));
                return Ok(true);
            }
        }
        self.seq += 1;
        self.raw[..HEADER_LEN]
            .copy_from_slice(&Header::new(Kind::Notify, body.len() as u32, seq).encode());
        self.body = body;
        let frame = Partial {
            head: HEADER_LEN,
            written: 0,
            deadline,
            staged: false,
        };
        let r = self.write_frame(frame, inline);
        if !matches!(r, Ok(false)) {
            self.clear_payloads();
        }
        r
    }
}

impl Drop for SendState {
    /// What never left fails (what is in flight fails with the lane's receiver).
    fn drop(&mut self) {
        let reason = self
            .state
            .inflight
            .lock()
            .closed
            .unwrap_or(FailReason::Shutdown);
        if let Some(item) = self.held.take() {
            self.fail_item(item, reason);
        }
        self.fail_frame(reason);
    }
}

/// Pacing of a frame's write: it gives up when the lane closes or at the frame's
/// deadline. A frame cut off midway leaves the stream out of step, so the caller then
/// closes the lane; the peer may still apply what it received (see the crate docs).
struct SendPace<'a> {
    shared: &'a Shared,
    state: &'a LaneState,
    deadline: Instant,
}

impl Pace for SendPace<'_> {
    fn before_sleep(&mut self) -> io::Result<Duration> {
        if self.shared.stopping() || self.state.dead.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "lane closed",
            ));
        }
        let now = Instant::now();
        if now >= self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer took no more data before the deadline",
            ));
        }
        Ok(STEP.min(self.deadline - now + Duration::from_millis(1)))
    }
}

/// The receiving half of a lane.
///
/// # When READ data may land
///
/// Once a slice has ended, no byte may land in its local memory: the application may
/// already be using that memory for something else. A slice ends at the latest at its
/// deadline ([`Slice::deadline`], the same instant the engine's batch uses to report it
/// timed out), so the receiver writes READ data into a slice's memory only before that
/// deadline: it checks, before every read call into local memory, that neither the slice
/// being filled nor any later one of the answer has passed its deadline (the
/// `guard`), and when one has, it closes the lane instead of reading on, so the rest of
/// the answer is never read at all. Data of a slice already filled stays (it landed while
/// the slice was live). Staged device memory is checked again after each chunk is read
/// and before it is copied to the device.
///
/// What this leaves open: the check and the read call are two steps, so a read call that
/// started just before the deadline may still be copying (a socket's worth of bytes at
/// most) while a waiter that saw the deadline reports the task timed out, and a staged
/// chunk whose device copy started before the deadline may finish after it. Closing that
/// window would take the engine asking the transport before it reports a timeout.
///
/// The same rule closes the lane whenever anything in flight, answered or not, is still
/// unfinished at its deadline (notifications included): a peer that stops answering, or
/// stops in the middle of an answer, costs its lane, and the connection reports it is no
/// longer alive so the next connect opens a fresh one.
struct Receiver_ {
    shared: Arc<Shared>,
    completions: Arc<dyn Completions>,
    state: Arc<LaneState>,
    pipe: Pipe,
    peer: String,
    /// Which answer is due next, and whether one matches its requests.
    answers: Answers,
    /// Entries whose answer is being read (out of the in-flight table).
    batch: Vec<Entry>,
    /// For the READ answer being read, per accepted slice in order: where its bytes end
    /// in the answer's data, and the earliest deadline of it and every slice after it.
    guard: Vec<(usize, Instant)>,
}

struct ReceiverPace<'a> {
    shared: &'a Shared,
    state: &'a LaneState,
    /// The earliest deadline of what the receiver has taken out of the table and is
    /// still reading, if anything.
    own: Option<Instant>,
}

impl Pace for ReceiverPace<'_> {
    fn spin(&self) -> Duration {
        let g = self.state.inflight.lock();
        if g.entries.is_empty() || g.bytes > SPIN_INFLIGHT_BYTES {
            Duration::ZERO
        } else {
            self.shared.config.busy_poll
        }
    }

    fn before_sleep(&mut self) -> io::Result<Duration> {
        if self.shared.stopping() || self.state.dead.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "lane closed",
            ));
        }
        let now = Instant::now();
        let table = self.state.inflight.lock().earliest(now);
        let earliest = match (table, self.own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match earliest {
            // The peer holds a request past its deadline: treat it as gone, so nothing
            // waits on it forever and nothing of it lands later.
            Some(deadline) if now >= deadline => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer did not answer before the deadline",
            )),
            Some(deadline) => Ok(STEP.min(deadline - now + Duration::from_millis(1))),
            None => Ok(STEP),
        }
    }
}

/// Pacing while READ data is read into local memory: see [`Receiver_`] for the rule.
struct DataPace<'a> {
    inner: ReceiverPace<'a>,
    guard: &'a [(usize, Instant)],
    /// The first entry of `guard` not yet filled.
    next: usize,
}

fn late_data() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "READ data still arriving at its deadline",
    )
}

impl Pace for DataPace<'_> {
    fn spin(&self) -> Duration {
        self.inner.spin()
    }

    fn before_sleep(&mut self) -> io::Result<Duration> {
        self.inner.own = self.guard.get(self.next).map(|&(_, until)| until);
        self.inner.before_sleep()
    }

    fn before_read(&mut self, filled: usize) -> io::Result<()> {
        while self
            .guard
            .get(self.next)
            .is_some_and(|&(end, _)| end <= filled)
        {
            self.next += 1;
        }
        match self.guard.get(self.next) {
            Some(&(_, until)) if Instant::now() >= until => Err(late_data()),
            _ => Ok(()),
        }
    }
}

impl Receiver_ {
    /// Closes the lane for `err` and fails everything it carries (the receiver thread
    /// then ends).
    fn fail(&mut self, err: &io::Error) {
        let reason = lane_failure(&self.shared, err);
        let broke =
            err.kind() == io::ErrorKind::InvalidData && !self.state.dead.load(Ordering::Acquire);
        if broke {
            // The peer's answers broke the protocol.
            self.shared
                .stats
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %self.peer, error = %err, "closing a lane after the peer broke the protocol");
        }
        self.state.kill(&self.peer, reason, err);
        let peer = &self.peer;
        self.state
            .drain(&*self.completions, &mut self.batch, reason, |failed, reason| {
                // A lane that closes idle (a peer restarting between transfers) is not
                // news; one that takes requests with it is.
                if failed > 0 && !broke && reason != FailReason::Shutdown {
                    tracing::warn!(peer = %peer, requests = failed, %reason, error = %err, "a lane to the peer closed with requests in flight; they fail");
                }
            });
    }

    fn pace(&self) -> ReceiverPace<'_> {
        ReceiverPace {
            shared: &self.shared,
            state: &self.state,
            own: None,
        }
    }

    fn read(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let mut pace = ReceiverPace {
            shared: &self.shared,
            state: &self.state,
            own: None,
        };
        self.pipe.read_exact(bufs, &mut pace)
    }

    /// Reads and completes one answer, if one has started to arrive (false when none
    /// has); waits for the rest of one that has.
    fn receive(&mut self) -> io::Result<bool> {
        // When the oldest request starts a READ frame, its answer is known to be a
        // ReadData with that many statuses: read header and statuses in one call.
        let expect = self.state.inflight.lock().read_answer_due();
        let mut hb = [0u8; HEADER_LEN];
        let mut statuses = [0u8; MAX_DESCS];
        let mut first = [
            IoSliceMut::new(&mut hb),
            IoSliceMut::new(&mut statuses[..expect]),
        ];
        let n = self.pipe.try_read(&mut first)?;
        if n == 0 {
            return Ok(false);
        }
        let mut rest = &mut first[..];
        IoSliceMut::advance_slices(&mut rest, n);
        self.read(rest)?;
        let header = Header::decode(&hb)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        self.answers.check_header(&header, expect)?;
        let n = header.count as usize;
        if expect == 0 {
            self.read(&mut [IoSliceMut::new(&mut statuses[..n])])?;
        }
        self.state
            .inflight
            .lock()
            .take_answered(n, &mut self.batch)?;
        self.state.not_full.notify_one();
        self.answers.on_answer(&header, &self.batch)?;
        if header.kind == Kind::ReadData {
            self.read_data(&statuses[..n])?;
        }
        for (e, &st) in self.batch.drain(..).zip(&statuses[..n]) {
            e.answer(&*self.completions, st);
        }
        Ok(true)
    }

    /// Reads the data of a READ answer into the local memory of the accepted slices of
    /// `self.batch`, only while they are live (see [`Receiver_`]).
    fn read_data(&mut self, statuses: &[u8]) -> io::Result<()> {
        let accepted = || {
            self.batch
                .iter()
                .zip(statuses)
                .filter_map(|(e, &st)| match (e, st) {
                    (Entry::Slice { slice, .. }, 0) => Some(slice),
                    _ => None,
                })
        };
        self.guard.clear();
        let mut end = 0;
        for slice in accepted() {
            end += slice.len;
            self.guard.push((end, slice.deadline));
        }
        for i in (1..self.guard.len()).rev() {
            self.guard[i - 1].1 = self.guard[i - 1].1.min(self.guard[i].1);
        }
        let inner = || ReceiverPace {
            shared: &self.shared,
            state: &self.state,
            own: None,
        };
        if accepted().all(|slice| slice.local.location().is_host()) {
            let mut bufs: [IoSliceMut<'_>; MAX_DESCS] =
                std::array::from_fn(|_| IoSliceMut::new(&mut []));
            let mut k = 0;
            for slice in accepted() {
                bufs[k] = slice
                    .local
                    .io_slice_mut(slice.local_offset, slice.len)
                    .ok_or_else(|| io::Error::other("local READ destination out of bounds"))?;
                k += 1;
            }
            let mut pace = DataPace {
                inner: inner(),
                guard: &self.guard,
                next: 0,
            };
            self.pipe.read_exact(&mut bufs[..k], &mut pace)
        } else {
            // Device destinations are staged through host memory, one after the other.
            let pipe = &mut self.pipe;
            for (slice, &(_, until)) in accepted().zip(&self.guard) {
                let mut read = |b: &mut [u8]| {
                    let mut pace = DataPace {
                        inner: inner(),
                        guard: &[(b.len(), until)],
                        next: 0,
                    };
                    pipe.read_exact(&mut [IoSliceMut::new(b)], &mut pace)?;
                    // A staged chunk goes to the device after this returns.
                    if Instant::now() >= until {
                        return Err(late_data());
                    }
                    Ok(())
                };
                match slice.local.io_slice_mut(slice.local_offset, slice.len) {
                    Some(mut b) => read(&mut b)?,
                    None => staged::receive(
                        self.shared.staging(),
                        &slice.local,
                        slice.local_offset,
                        slice.len,
                        &mut read,
                    )?,
                }
            }
            Ok(())
        }
    }
}
