//! The target: the listening port (handshake and data share it) and one thread per
//! accepted connection that checks each request, moves the bytes between the socket and
//! registered memory, and answers in request order.
//!
//! What a peer can hold, and for how long: a connection that sends no request is closed
//! after the idle limit; once a frame has begun, it must keep moving (the payload keep
//! arriving, the answer keep being read) or the connection is closed after the progress
//! limit; a region that is deregistered closes the connections in the middle of a frame
//! that uses it, so its memory is released at once.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport_api::{LogLimit, Opcode, RemoteStatus};
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::Mutex;

use crate::frame::{
    self, Desc, FrameError, Header, Kind, AUTH_LEN, CLIENT_LABEL, DESC_LEN, HEADER_LEN, MAX_DESCS,
    MAX_REQUEST, TARGET_LABEL,
};
use crate::pipe::{Pace, Pipe, WakeFd, SEND_CALL_SLACK};
use crate::regions::Resolved;
use crate::Shared;
use crate::{staged, SharedSecret};

const LISTENER: Token = Token(0);
const WAKE: Token = Token(1);
/// Coalesced acknowledgements are flushed at the latest when this many are pending.
const MAX_PENDING_ACKS: usize = MAX_DESCS;
/// After a message of at most this many payload bytes, the target spins for the next:
/// small requests come back to back within microseconds; after bulk, the next message
/// waits on the link anyway and spinning would only take CPU from the copy.
const SPIN_AFTER_BYTES: u64 = 256 * 1024;
/// Discarded payload of refused writes goes through this much scratch at a time.
const SCRATCH: usize = 64 * 1024;
/// Answers are written in pieces of at most this many bytes, each of which must leave
/// within the progress limit: a peer that stops reading is found, one that reads slowly
/// but steadily is served.
const WRITE_CHUNK: usize = 1 << 20;
/// Longest sleep between checks of shutdown, deregistration and limits.
const STEP: Duration = Duration::from_millis(200);

/// Why a connection is being closed by the target, carried in the `io::Error` that ends
/// its thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closing {
    /// No request within the idle limit.
    Idle,
    /// A frame stopped moving for the progress limit.
    Stalled,
    /// A region the connection was using was deregistered.
    Deregistered,
    /// The transport is shutting down.
    Shutdown,
    /// The peer did not prove the shared secret.
    Unauthenticated(&'static str),
}

impl std::fmt::Display for Closing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closing::Idle => f.write_str("no request within the idle limit"),
            Closing::Stalled => f.write_str("a frame made no progress within the progress limit"),
            Closing::Deregistered => f.write_str("a region in use was deregistered"),
            Closing::Shutdown => f.write_str("shutting down"),
            Closing::Unauthenticated(why) => write!(f, "authentication failed: {why}"),
        }
    }
}

impl std::error::Error for Closing {}

fn closing(kind: io::ErrorKind, why: Closing) -> io::Error {
    io::Error::new(kind, why)
}

fn closing_of(e: &io::Error) -> Option<Closing> {
    e.get_ref()
        .and_then(|x| x.downcast_ref::<Closing>())
        .copied()
}

/// What other threads need of a connection being served: a way to wake it, a flag to
/// close it, and the keys of the requests its current frame names.
pub(crate) struct ConnHandle {
    waker: Arc<WakeFd>,
    /// Set (by deregistration) to make the connection close at its next wait.
    close: AtomicBool,
    /// The keys of the current frame's requests, published before they are resolved.
    held: [AtomicU64; MAX_DESCS],
    held_n: AtomicUsize,
}

/// The connections being served, by id.
#[derive(Default)]
pub(crate) struct Conns {
    map: Mutex<HashMap<u64, Arc<ConnHandle>>>,
    next: AtomicU64,
}

impl Conns {
    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }

    fn add(&self, handle: Arc<ConnHandle>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.lock().insert(id, handle);
        id
    }

    fn remove(&self, id: u64) {
        self.map.lock().remove(&id);
    }
}

/// Closes the connections whose current frame names `key` (a region just removed from
/// the table). A connection that resolved a request to the region published the key
/// before resolving, and resolving happened before the removal (both under the table's
/// lock), so every holder is found; one that merely named the key may be closed too.
pub(crate) fn close_holders(shared: &Shared, key: u64) {
    for h in shared.conns.map.lock().values() {
        let n = h.held_n.load(Ordering::Acquire).min(MAX_DESCS);
        if h.held[..n].iter().any(|k| k.load(Ordering::Relaxed) == key)
            && !h.close.swap(true, Ordering::AcqRel)
        {
            shared
                .stats
                .closed_on_deregister
                .fetch_add(1, Ordering::Relaxed);
            let _ = h.waker.wake();
        }
    }
}

/// Wakes every connection's thread (the transport is stopping).
pub(crate) fn close_all(shared: &Shared) {
    for h in shared.conns.map.lock().values() {
        let _ = h.waker.wake();
    }
}

/// Binds the listener and starts the accept thread. Returns the bound address.
pub(crate) fn listen(shared: &Arc<Shared>, addr: &str) -> io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    let mut listener = mio::net::TcpListener::from_std(std_listener);
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
    *shared.accept_waker.lock() = Some(waker);
    let for_thread = shared.clone();
    let thread = std::thread::Builder::new()
        .name("ferry-tcp-accept".into())
        .spawn(move || accept_loop(for_thread, listener, poll))?;
    *shared.accept_thread.lock() = Some(thread);
    Ok(local)
}

fn accept_loop(shared: Arc<Shared>, listener: mio::net::TcpListener, mut poll: Poll) {
    let mut events = Events::with_capacity(8);
    while !shared.stopping() {
        if let Err(e) = poll.poll(&mut events, Some(STEP)) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "listener poll failed; the target stops accepting");
                return;
            }
        }
        loop {
            match listener.accept() {
                Ok((stream, peer)) => spawn_connection(&shared, stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors and the like: keep serving the connections we have.
                    tracing::warn!(error = %e, "accept failed");
                    break;
                }
            }
        }
    }
}

/// Counts a connection as open until its thread ends, however it ends, and forgets its
/// handle then.
struct Open {
    shared: Arc<Shared>,
    id: Option<u64>,
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shared.conns.remove(id);
        }
        self.shared
            .stats
            .open_connections
            .fetch_sub(1, Ordering::AcqRel);
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: mio::net::TcpStream, peer: SocketAddr) {
    let open = shared.stats.open_connections.fetch_add(1, Ordering::AcqRel);
    if open >= shared.max_connections.load(Ordering::Relaxed) as u64 {
        shared.stats.open_connections.fetch_sub(1, Ordering::AcqRel);
        shared
            .stats
            .refused_connections
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, open, "refusing a connection: too many open");
        return; // dropping the stream closes it
    }
    let mut open = Open {
        shared: shared.clone(),
        id: None,
    };
    if let Err(e) = crate::set_connection_options(&stream, &shared.config) {
        tracing::warn!(%peer, error = %e, "cannot set the connection's keepalive or congestion control");
    }
    // The connection's thread sleeps on its socket and this eventfd, which
    // deregistration uses to make it look at its flags.
    let (pipe, waker) = match WakeFd::new().and_then(|wake| {
        let waker = Arc::new(wake);
        Pipe::new(Arc::new(stream.into()), Some(waker.clone())).map(|p| (p, waker))
    }) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot set up accepted connection");
            return;
        }
    };
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    let handle = Arc::new(ConnHandle {
        waker,
        close: AtomicBool::new(false),
        held: std::array::from_fn(|_| AtomicU64::new(0)),
        held_n: AtomicUsize::new(0),
    });
    open.id = Some(shared.conns.add(handle.clone()));
    let shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("ferry-tcp-target".into())
        .spawn(move || {
            let _open = open;
            let span = tracing::debug_span!("target", %peer);
            let _enter = span.enter();
            let mut conn = TargetConn::new(shared.clone(), pipe, handle, peer);
            let result = conn.serve();
            conn.ended(result);
            conn.pipe.shutdown();
        });
    if let Err(e) = spawned {
        tracing::warn!(%peer, error = %e, "cannot start a thread for the connection");
    }
}

/// Whether the peer went away (closed, reset, or found dead by keepalive).
fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::TimedOut
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn protocol_error(e: FrameError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Acknowledgements waiting to be sent: statuses of consecutive requests from `first`.
struct PendingAcks {
    first: u64,
    statuses: Vec<u8>,
}

/// What bounds a wait.
#[derive(Clone, Copy)]
enum Limit {
    /// Give up at this instant (the idle limit, or the handshake's deadline).
    Until(Instant, Closing),
    /// Give up when nothing has moved for the progress limit.
    Progress,
    /// Wait as long as the peer is alive (an initiator's idle lane: keepalive decides).
    Alive,
}

struct TargetPace<'a> {
    shared: &'a Shared,
    handle: &'a ConnHandle,
    /// Acknowledgements to flush when the socket drains, outside a frame.
    acks: Option<&'a mut PendingAcks>,
    spin: bool,
    mid_frame: bool,
    limit: Limit,
    /// When bytes last moved, once a wait began (read lazily: no clock read while the
    /// socket keeps up).
    since: Option<Instant>,
}

impl<'a> TargetPace<'a> {
    /// Pacing for a write (an answer): no flushing, the progress limit.
    fn write(shared: &'a Shared, handle: &'a ConnHandle) -> Self {
        TargetPace {
            shared,
            handle,
            acks: None,
            spin: false,
            mid_frame: false,
            limit: Limit::Progress,
            since: None,
        }
    }
}

impl Pace for TargetPace<'_> {
    fn drained(&mut self, pipe: &mut Pipe) -> io::Result<()> {
        // A read drains the socket after every run of bytes: bytes moved just now.
        if matches!(self.limit, Limit::Progress) {
            self.since = Some(Instant::now());
        }
        match &mut self.acks {
            // Mid-frame, the rest of the frame is on its way; its acknowledgements go out
            // together.
            Some(acks) if !self.mid_frame => flush_acks(pipe, acks, self.shared, self.handle),
            _ => Ok(()),
        }
    }
    fn spin(&self) -> Duration {
        if self.spin {
            self.shared.config.busy_poll
        } else {
            Duration::ZERO
        }
    }
    fn before_sleep(&mut self) -> io::Result<Duration> {
        if self.shared.stopping() {
            return Err(closing(io::ErrorKind::ConnectionAborted, Closing::Shutdown));
        }
        if self.handle.close.load(Ordering::Acquire) {
            if self.handle.held_n.load(Ordering::Acquire) > 0 {
                return Err(closing(
                    io::ErrorKind::ConnectionAborted,
                    Closing::Deregistered,
                ));
            }
            // The frame that held the region ended before this wait (its answer may have
            // been what let the application drop the region): nothing is held now, so
            // the connection goes on.
            self.handle.close.store(false, Ordering::Release);
        }
        let now = Instant::now();
        let until = match self.limit {
            Limit::Alive => return Ok(STEP),
            Limit::Until(t, why) => (t, why),
            Limit::Progress => (
                *self.since.get_or_insert(now) + self.shared.config.progress_timeout,
                Closing::Stalled,
            ),
        };
        if now >= until.0 {
            return Err(closing(io::ErrorKind::TimedOut, until.1));
        }
        Ok(STEP.min(until.0 - now + Duration::from_millis(1)))
    }
}

fn flush_acks(
    pipe: &mut Pipe,
    acks: &mut PendingAcks,
    shared: &Shared,
    handle: &ConnHandle,
) -> io::Result<()> {
    // Statuses pile up across frames (several WRITE frames read before the socket
    // drains), but one Ack frame carries at most `MAX_DESCS`, as the initiator checks:
    // past that they go out as several frames.
    for chunk in acks.statuses.chunks(MAX_DESCS) {
        let n = chunk.len();
        let header = Header::new(Kind::Ack, n as u32, acks.first).encode();
        let mut bufs = [IoSlice::new(&header), IoSlice::new(chunk)];
        pipe.write_all(&mut bufs, &mut TargetPace::write(shared, handle))?;
        acks.first += n as u64;
    }
    acks.statuses.clear();
    Ok(())
}

/// Writes `bufs` in pieces of at most [`WRITE_CHUNK`] bytes, each under the progress
/// limit; a last piece of at most [`SEND_CALL_SLACK`] bytes goes with the one before it.
fn write_chunked(
    pipe: &mut Pipe,
    bufs: &mut [IoSlice<'_>],
    shared: &Shared,
    handle: &ConnHandle,
) -> io::Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    if next_piece(total) == total {
        return pipe.write_all(bufs, &mut TargetPace::write(shared, handle));
    }
    let mut piece: [IoSlice<'_>; MAX_DESCS + 2] = std::array::from_fn(|_| IoSlice::new(&[]));
    let mut k = 0;
    let mut bytes = 0;
    let mut left = total;
    let mut cap = next_piece(total);
    for b in bufs.iter() {
        let mut rest: &[u8] = b;
        while !rest.is_empty() {
            let take = rest.len().min(cap - bytes);
            piece[k] = IoSlice::new(&rest[..take]);
            rest = &rest[take..];
            k += 1;
            bytes += take;
            left -= take;
            if bytes == cap || k == piece.len() {
                pipe.write_all(&mut piece[..k], &mut TargetPace::write(shared, handle))?;
                k = 0;
                bytes = 0;
                cap = next_piece(left);
            }
        }
    }
    if k > 0 {
        pipe.write_all(&mut piece[..k], &mut TargetPace::write(shared, handle))?;
    }
    Ok(())
}

/// The size of the next piece of an answer with `left` bytes still to write.
fn next_piece(left: usize) -> usize {
    if left <= WRITE_CHUNK + SEND_CALL_SLACK {
        left
    } else {
        WRITE_CHUNK
    }
}

/// What the target logs at a bounded rate, one limit per kind, for the whole transport
/// (each line names its peer and how many went unlogged before it).
pub(crate) struct Warns {
    /// Refused requests.
    requests: LogLimit,
    /// Refused set-up exchanges (each on a connection of its own).
    exchanges: LogLimit,
    /// Connections closed because the peer broke the protocol.
    protocol_errors: LogLimit,
}

impl Warns {
    pub(crate) fn new() -> Self {
        Warns {
            requests: LogLimit::new("refused requests"),
            exchanges: LogLimit::new("refused set-up exchanges"),
            protocol_errors: LogLimit::new("connections that broke the protocol"),
        }
    }
}

struct TargetConn {
    shared: Arc<Shared>,
    /// Where the connection comes from: every warning about it names it, whatever
    /// spans the subscriber records.
    peer: SocketAddr,
    pipe: Pipe,
    handle: Arc<ConnHandle>,
    acks: PendingAcks,
    next_seq: u64,
    /// Payload bytes of the last message, for the spin decision.
    last_bytes: u64,
    /// Bytes read ahead with a header (at most one descriptor's worth), served before
    /// the socket.
    carry: [u8; DESC_LEN],
    carry_at: usize,
    carry_end: usize,
    raw_descs: Vec<u8>,
    descs: Vec<Desc>,
    statuses: Vec<u8>,
    resolved: Vec<Option<Resolved>>,
    scratch: Vec<u8>,
    /// Whether the peer has sent a request (READ, WRITE, notification): an initiator's
    /// lane, kept while idle as long as keepalive finds the peer.
    active: bool,
    /// Since when the peer has sent nothing, while it is not `active`.
    idle_since: Instant,
}

impl TargetConn {
    fn new(shared: Arc<Shared>, pipe: Pipe, handle: Arc<ConnHandle>, peer: SocketAddr) -> Self {
        TargetConn {
            shared,
            peer,
            pipe,
            handle,
            acks: PendingAcks {
                first: 0,
                statuses: Vec::new(),
            },
            next_seq: 0,
            last_bytes: 0,
            carry: [0; DESC_LEN],
            carry_at: 0,
            carry_end: 0,
            raw_descs: vec![0; MAX_DESCS * DESC_LEN],
            descs: Vec::new(),
            statuses: Vec::new(),
            resolved: Vec::new(),
            scratch: Vec::new(),
            active: false,
            idle_since: Instant::now(),
        }
    }

    /// Counts and logs how the connection ended.
    fn ended(&mut self, result: io::Result<()>) {
        let stats = &self.shared.stats;
        let e = match result {
            Ok(()) => return tracing::debug!("connection closed"),
            Err(e) => e,
        };
        match closing_of(&e) {
            Some(Closing::Idle) => {
                stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("closing an idle connection");
            }
            Some(Closing::Stalled) => {
                stats.progress_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("closing a connection whose frame stopped moving");
            }
            Some(Closing::Unauthenticated(why)) => {
                stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(why, "closing an unauthenticated connection");
            }
            Some(Closing::Deregistered) => {
                tracing::debug!("closing a connection that held a deregistered region")
            }
            Some(Closing::Shutdown) => tracing::debug!("closing at shutdown"),
            None if is_disconnect(&e) => tracing::debug!(error = %e, "peer went away"),
            None => {
                stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                // Each broken connection is its own: the transport's limit bounds them.
                if let Some(suppressed) = self.shared.warns.protocol_errors.admit() {
                    tracing::warn!(peer = %self.peer, error = %e, suppressed, "closing connection after protocol error");
                }
            }
        }
    }

    fn read(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.read_in_frame(bufs, false)
    }

    /// Reads; `mid_frame` holds acknowledgements back while a frame's payloads arrive.
    fn read_in_frame(
        &mut self,
        mut bufs: &mut [IoSliceMut<'_>],
        mid_frame: bool,
    ) -> io::Result<()> {
        if self.carry_at < self.carry_end {
            let mut taken = 0;
            for b in bufs.iter_mut() {
                let n = b.len().min(self.carry_end - self.carry_at);
                b[..n].copy_from_slice(&self.carry[self.carry_at..self.carry_at + n]);
                self.carry_at += n;
                taken += n;
                if self.carry_at == self.carry_end {
                    break;
                }
            }
            IoSliceMut::advance_slices(&mut bufs, taken);
        }
        let mut pace = TargetPace {
            shared: &self.shared,
            handle: &self.handle,
            acks: Some(&mut self.acks),
            spin: self.last_bytes <= SPIN_AFTER_BYTES,
            mid_frame,
            limit: Limit::Progress,
            since: None,
        };
        self.pipe.read_exact(bufs, &mut pace)
    }

    fn serve(&mut self) -> io::Result<()> {
        if let Some(secret) = self.shared.config.secret.clone() {
            self.authenticate(&secret)?;
            self.idle_since = Instant::now();
        }
        loop {
            if self.shared.stopping() {
                return Ok(());
            }
            let mut hb = [0u8; HEADER_LEN];
            match self.read_header(&mut hb) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // The peer is done sending (perhaps only half-closed): what it sent
                    // was served; its answers go out before the connection closes.
                    return flush_acks(&mut self.pipe, &mut self.acks, &self.shared, &self.handle);
                }
                r => r?,
            }
            if self.shared.stopping() {
                // Shut down while waiting: serve nothing more.
                return Ok(());
            }
            let header = Header::decode(&hb).map_err(protocol_error)?;
            let served = match header.kind {
                Kind::Write | Kind::Read => {
                    self.active = true;
                    self.requests(header)
                }
                Kind::Notify => {
                    self.active = true;
                    self.notify(header)
                }
                Kind::GetDescriptor => self.send_descriptor(),
                Kind::Exchange => self.exchange(header),
                Kind::Lane => {
                    // An initiator's data lane: idle until it has work, kept while
                    // keepalive says its peer is alive.
                    self.active = true;
                    Ok(())
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{other:?} frame sent to a target"),
                    ))
                }
            };
            match served {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // Closed mid-frame: earlier frames' answers still go out.
                    let _ = flush_acks(&mut self.pipe, &mut self.acks, &self.shared, &self.handle);
                    return Err(e);
                }
                r => r?,
            }
            if !self.active {
                self.idle_since = Instant::now();
            }
        }
    }

    fn send_descriptor(&mut self) -> io::Result<()> {
        flush_acks(&mut self.pipe, &mut self.acks, &self.shared, &self.handle)?;
        let body = self
            .shared
            .control()
            .map(|c| c.descriptor())
            .unwrap_or_default();
        let h = Header::new(Kind::Descriptor, body.len() as u32, 0).encode();
        write_chunked(
            &mut self.pipe,
            &mut [IoSlice::new(&h), IoSlice::new(&body)],
            &self.shared,
            &self.handle,
        )
    }

    /// A peer's set-up message for one of this engine's transports: handed to the
    /// control plane, whose answer (or refusal) goes back at once.
    fn exchange(&mut self, header: Header) -> io::Result<()> {
        let mut body = vec![0u8; header.count as usize];
        self.read(&mut [IoSliceMut::new(&mut body)])?;
        flush_acks(&mut self.pipe, &mut self.acks, &self.shared, &self.handle)?;
        let answer = match frame::protocol_of(body[0]) {
            None => Err(format!("unknown protocol byte {}", body[0])),
            Some(p) => match self.shared.control() {
                Some(c) => c.exchange(p, &body[1..]),
                None => Err("this target serves no control plane".into()),
            },
        };
        if let Err(why) = &answer {
            // Every exchange comes on a connection of its own: the transport's limit.
            if let Some(suppressed) = self.shared.warns.exchanges.admit() {
                tracing::warn!(peer = %self.peer, %why, suppressed, "refused a set-up exchange");
            }
        }
        let body = frame::encode_exchanged(&answer);
        let h = Header::new(Kind::Exchanged, body.len() as u32, 0).encode();
        write_chunked(
            &mut self.pipe,
            &mut [IoSlice::new(&h), IoSlice::new(&body)],
            &self.shared,
            &self.handle,
        )
    }

    /// The target's half of the challenge-response (see the `frame` module), within the
    /// idle limit from accept.
    fn authenticate(&mut self, secret: &SharedSecret) -> io::Result<()> {
        let deadline = self.idle_since + self.shared.config.idle_timeout;
        let timeout = Limit::Until(deadline, Closing::Unauthenticated("no proof in time"));
        let fail = |why| {
            closing(
                io::ErrorKind::PermissionDenied,
                Closing::Unauthenticated(why),
            )
        };
        let mut hb = [0u8; HEADER_LEN];
        let mut client_nonce = [0u8; AUTH_LEN];
        self.read_auth(&mut hb, timeout)?;
        match Header::decode(&hb) {
            Ok(h) if h.kind == Kind::Hello && h.count as usize == AUTH_LEN => {}
            _ => {
                // Tell a client without the secret why it is closed.
                let refusal = Header::new(Kind::Challenge, 0, 0).encode();
                let _ = write_chunked(
                    &mut self.pipe,
                    &mut [IoSlice::new(&refusal)],
                    &self.shared,
                    &self.handle,
                );
                return Err(fail("the first frame was not an authentication hello"));
            }
        }
        self.read_auth(&mut client_nonce, timeout)?;
        let target_nonce = frame::nonce();
        let proof = frame::auth_proof(secret.bytes(), TARGET_LABEL, &client_nonce, &target_nonce);
        let h = Header::new(Kind::Challenge, 2 * AUTH_LEN as u32, 0).encode();
        write_chunked(
            &mut self.pipe,
            &mut [
                IoSlice::new(&h),
                IoSlice::new(&target_nonce),
                IoSlice::new(&proof),
            ],
            &self.shared,
            &self.handle,
        )?;
        let mut answer = [0u8; HEADER_LEN + AUTH_LEN];
        self.read_auth(&mut answer, timeout)?;
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&answer[..HEADER_LEN]);
        let proved = matches!(Header::decode(&hb), Ok(h) if h.kind == Kind::Proof && h.count as usize == AUTH_LEN)
            && frame::auth_verify(
                secret.bytes(),
                CLIENT_LABEL,
                &client_nonce,
                &target_nonce,
                &answer[HEADER_LEN..],
            );
        if proved {
            Ok(())
        } else {
            Err(fail("wrong proof of the shared secret"))
        }
    }

    /// Reads handshake bytes; the peer closing counts as a failed authentication.
    fn read_auth(&mut self, buf: &mut [u8], limit: Limit) -> io::Result<()> {
        let mut pace = TargetPace {
            shared: &self.shared,
            handle: &self.handle,
            acks: None,
            spin: false,
            mid_frame: false,
            limit,
            since: None,
        };
        match self.pipe.read_exact(&mut [IoSliceMut::new(buf)], &mut pace) {
            Err(e) if closing_of(&e).is_none() && is_disconnect(&e) => Err(closing(
                io::ErrorKind::PermissionDenied,
                Closing::Unauthenticated("closed before proving the secret"),
            )),
            r => r,
        }
    }

    /// Reads a header, and with it as much of the first descriptor as is there: READ and
    /// WRITE frames always carry one, so a one-request frame costs one system call.
    ///
    /// Until the first byte the connection is idle (the idle limit applies unless it is
    /// an initiator's lane); from then on the frame has begun and must keep moving.
    fn read_header(&mut self, hb: &mut [u8; HEADER_LEN]) -> io::Result<()> {
        if self.carry_at < self.carry_end {
            return self.read(&mut [IoSliceMut::new(hb)]);
        }
        let limit = if self.active {
            Limit::Alive
        } else {
            Limit::Until(
                self.idle_since + self.shared.config.idle_timeout,
                Closing::Idle,
            )
        };
        let mut ahead = [0u8; DESC_LEN];
        let mut pace = TargetPace {
            shared: &self.shared,
            handle: &self.handle,
            acks: Some(&mut self.acks),
            spin: self.last_bytes <= SPIN_AFTER_BYTES,
            mid_frame: false,
            limit,
            since: None,
        };
        let mut got = self.pipe.read_min(
            &mut [IoSliceMut::new(hb), IoSliceMut::new(&mut ahead)],
            1,
            &mut pace,
        )?;
        if got < HEADER_LEN {
            pace.limit = Limit::Progress;
            got += self.pipe.read_min(
                &mut [IoSliceMut::new(&mut hb[got..]), IoSliceMut::new(&mut ahead)],
                HEADER_LEN - got,
                &mut pace,
            )?;
        }
        self.carry = ahead;
        self.carry_at = 0;
        self.carry_end = got - HEADER_LEN;
        Ok(())
    }

    /// Checks that a request frame continues the connection's sequence.
    fn take_seq(&mut self, header: &Header, requests: u64) -> io::Result<()> {
        if header.seq != self.next_seq {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("sequence {} where {} was due", header.seq, self.next_seq),
            ));
        }
        if self.acks.statuses.is_empty() {
            self.acks.first = header.seq;
        }
        self.next_seq += requests;
        Ok(())
    }

    fn requests(&mut self, header: Header) -> io::Result<()> {
        let r = self.requests_inner(header);
        // The frame holds nothing any more (or the connection is closing).
        self.handle.held_n.store(0, Ordering::Release);
        r
    }

    fn requests_inner(&mut self, header: Header) -> io::Result<()> {
        let op = if header.kind == Kind::Write {
            Opcode::Write
        } else {
            Opcode::Read
        };
        let n = header.count as usize;
        let mut raw = std::mem::take(&mut self.raw_descs);
        let r = self.read(&mut [IoSliceMut::new(&mut raw[..n * DESC_LEN])]);
        self.raw_descs = raw;
        r?;
        self.take_seq(&header, n as u64)?;
        self.last_bytes = 0;
        self.descs.clear();
        self.statuses.clear();
        self.resolved.clear();
        for i in 0..n {
            let d = Desc::decode(&self.raw_descs[i * DESC_LEN..(i + 1) * DESC_LEN]);
            if d.len > MAX_REQUEST {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "request of {} bytes over the {} byte limit",
                        d.len, MAX_REQUEST
                    ),
                ));
            }
            // Published before resolving, so a deregistration finds this frame.
            self.handle.held[i].store(d.key, Ordering::Relaxed);
            self.descs.push(d);
        }
        self.handle.held_n.store(n, Ordering::Release);
        let staging = self.shared.staging().is_some();
        for i in 0..n {
            let d = self.descs[i];
            let r = self
                .shared
                .regions
                .resolve(op, d.addr, d.len, d.key, staging);
            let status = match &r {
                Ok(_) => RemoteStatus::Ok,
                Err(s) => {
                    self.shared
                        .stats
                        .rejected_requests
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = self.shared.warns.requests.admit() {
                        tracing::warn!(peer = %self.peer, ?op, addr = d.addr, len = d.len, status = %s, suppressed, "refused request");
                    }
                    *s
                }
            };
            self.last_bytes += d.len;
            self.statuses.push(status as u8);
            self.resolved.push(r.ok());
        }
        match op {
            Opcode::Write => self.write_payloads(),
            Opcode::Read => self.send_read_data(header.seq),
        }
    }

    /// Reads each WRITE's payload straight into registered memory; refused ones are
    /// read into scratch and dropped so the stream stays in step.
    fn write_payloads(&mut self) -> io::Result<()> {
        let resolved = std::mem::take(&mut self.resolved);
        let result = (|| -> io::Result<()> {
            let mut i = 0;
            while i < resolved.len() {
                // Gather the run of accepted requests from i.
                let mut j = i;
                while j < resolved.len()
                    && resolved[j]
                        .as_ref()
                        .is_some_and(|r| r.memory.location().is_host())
                {
                    j += 1;
                }
                if j > i {
                    let mut bufs: [IoSliceMut<'_>; MAX_DESCS] =
                        std::array::from_fn(|_| IoSliceMut::new(&mut []));
                    for (k, r) in resolved[i..j].iter().enumerate() {
                        let r = r.as_ref().expect("run holds accepted requests");
                        let len = self.descs[i + k].len as usize;
                        bufs[k] = r
                            .memory
                            .io_slice_mut(r.offset, len)
                            .expect("resolved request lies inside host memory");
                    }
                    self.read_in_frame(&mut bufs[..j - i], true)?;
                }
                if j < resolved.len() {
                    let len = self.descs[j].len;
                    match &resolved[j] {
                        // Device memory: staged through host memory.
                        Some(r) => {
                            let shared = self.shared.clone();
                            staged::receive(
                                shared.staging(),
                                &r.memory,
                                r.offset,
                                len as usize,
                                &mut |b| self.read_in_frame(&mut [IoSliceMut::new(b)], true),
                            )?;
                        }
                        None => self.discard(len)?,
                    }
                    j += 1;
                }
                i = j;
            }
            Ok(())
        })();
        let mut resolved = resolved;
        resolved.clear();
        self.resolved = resolved;
        result?;
        self.acks.statuses.extend_from_slice(&self.statuses);
        if self.acks.statuses.len() >= MAX_PENDING_ACKS {
            flush_acks(&mut self.pipe, &mut self.acks, &self.shared, &self.handle)?;
        }
        Ok(())
    }

    fn discard(&mut self, mut len: u64) -> io::Result<()> {
        if self.scratch.is_empty() {
            self.scratch = vec![0; SCRATCH];
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut r = Ok(());
        while len > 0 && r.is_ok() {
            let n = len.min(SCRATCH as u64) as usize;
            r = self.read_in_frame(&mut [IoSliceMut::new(&mut scratch[..n])], true);
            len -= n as u64;
        }
        self.scratch = scratch;
        r
    }

    /// Answers READs: statuses, then the accepted requests' bytes straight from
    /// registered memory, in vectored writes.
    fn send_read_data(&mut self, seq: u64) -> io::Result<()> {
        // Earlier WRITE acknowledgements go first: responses travel in request order.
        flush_acks(&mut self.pipe, &mut self.acks, &self.shared, &self.handle)?;
        self.acks.first = seq + self.statuses.len() as u64;
        let header = Header::new(Kind::ReadData, self.statuses.len() as u32, seq).encode();
        let shared = &*self.shared;
        let handle = &*self.handle;
        let accepted = self
            .resolved
            .iter()
            .zip(&self.descs)
            .filter_map(|(r, d)| r.as_ref().map(|r| (r, d.len as usize)));
        let r = if self
            .resolved
            .iter()
            .flatten()
            .all(|r| r.memory.location().is_host())
        {
            let mut bufs: [IoSlice<'_>; MAX_DESCS + 2] = std::array::from_fn(|_| IoSlice::new(&[]));
            bufs[0] = IoSlice::new(&header);
            bufs[1] = IoSlice::new(&self.statuses);
            let mut k = 2;
            let mut bad = false;
            for (r, len) in accepted {
                // Resolution checked the range against the region.
                match r.memory.io_slice(r.offset, len) {
                    Some(s) => bufs[k] = s,
                    None => {
                        bad = true;
                        break;
                    }
                }
                k += 1;
            }
            if bad {
                Err(io::Error::other("resolved range out of bounds"))
            } else {
                write_chunked(&mut self.pipe, &mut bufs[..k], shared, handle)
            }
        } else {
            // Device memory is staged through host memory, one request after the other.
            let pipe = &mut self.pipe;
            let mut write = |b: &[u8]| write_chunked(pipe, &mut [IoSlice::new(b)], shared, handle);
            write(&header)
                .and_then(|()| write(&self.statuses))
                .and_then(|()| {
                    for (r, len) in accepted {
                        match r.memory.io_slice(r.offset, len) {
                            Some(s) => write(&s)?,
                            None => staged::send(
                                shared.staging(),
                                &r.memory,
                                r.offset,
                                len,
                                &mut write,
                            )?,
                        }
                    }
                    Ok(())
                })
        };
        self.resolved.clear();
        r
    }

    fn notify(&mut self, header: Header) -> io::Result<()> {
        let mut body = vec![0u8; header.count as usize];
        self.read(&mut [IoSliceMut::new(&mut body)])?;
        self.take_seq(&header, 1)?;
        let status = match parse_notification(&body) {
            Some((from, message)) => match self.shared.control() {
                Some(c) if c.notification(from, message) => RemoteStatus::Ok,
                _ => RemoteStatus::Busy,
            },
            None => RemoteStatus::Malformed,
        };
        self.acks.statuses.push(status as u8);
        Ok(())
    }
}

/// A notification body: sender name length (u16 LE), sender name (UTF-8), message.
pub(crate) fn encode_notification(from: &str, message: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + from.len() + message.len());
    b.extend_from_slice(&(from.len() as u16).to_le_bytes());
    b.extend_from_slice(from.as_bytes());
    b.extend_from_slice(message);
    b
}

pub(crate) fn parse_notification(body: &[u8]) -> Option<(&str, &[u8])> {
    let n = u16::from_le_bytes([*body.first()?, *body.get(1)?]) as usize;
    let from = std::str::from_utf8(body.get(2..2 + n)?).ok()?;
    Some((from, &body[2 + n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_bodies_parse() {
        let b = encode_notification("10.0.0.1:5000", b"blocks 3..9 ready");
        assert_eq!(
            parse_notification(&b),
            Some(("10.0.0.1:5000", &b"blocks 3..9 ready"[..]))
        );
        assert_eq!(parse_notification(&[5, 0, b'a']), None);
        assert_eq!(parse_notification(&[]), None);
        assert_eq!(parse_notification(&[1, 0, 0xff]), None);
    }

    /// An answer goes in pieces of `WRITE_CHUNK`, except that a tail of at most
    /// `SEND_CALL_SLACK` (a header and statuses) rides with the piece before it.
    #[test]
    fn answers_are_cut_into_megabytes_without_a_small_tail() {
        const MIB: usize = 1 << 20;
        let mut sixteen = vec![MIB; 15];
        sixteen.push(MIB + 32);
        let cases = [
            (17, vec![17]),
            (MIB + 17, vec![MIB + 17]),
            (MIB + SEND_CALL_SLACK, vec![MIB + SEND_CALL_SLACK]),
            (MIB + SEND_CALL_SLACK + 1, vec![MIB, SEND_CALL_SLACK + 1]),
            (3 * MIB / 2, vec![MIB, MIB / 2]),
            (16 * MIB + 32, sixteen),
        ];
        for (total, want) in cases {
            let mut left = total;
            let mut pieces = Vec::new();
            while left > 0 {
                let p = next_piece(left);
                pieces.push(p);
                left -= p;
            }
            assert_eq!(pieces, want, "an answer of {total} bytes");
        }
    }
}
