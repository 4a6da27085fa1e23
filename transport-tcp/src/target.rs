//! The target: the listening port (handshake and data share it) and one thread per
//! accepted connection that checks each request, moves the bytes between the socket and
//! registered memory, and answers in request order.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_transport_api::{Opcode, RemoteStatus};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::frame::{Desc, FrameError, Header, Kind, DESC_LEN, HEADER_LEN, MAX_DESCS, MAX_REQUEST};
use crate::pipe::{Pace, Pipe};
use crate::regions::Resolved;
use crate::staged;
use crate::Shared;

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
    shared.wakers.lock().push(waker);
    let shared = shared.clone();
    std::thread::Builder::new()
        .name("ferry-tcp-accept".into())
        .spawn(move || accept_loop(shared, listener, poll))?;
    Ok(local)
}

fn accept_loop(shared: Arc<Shared>, listener: mio::net::TcpListener, mut poll: Poll) {
    let mut events = Events::with_capacity(8);
    while !shared.stopping() {
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(200))) {
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

fn spawn_connection(shared: &Arc<Shared>, stream: mio::net::TcpStream, peer: SocketAddr) {
    let open = shared.stats.open_connections.fetch_add(1, Ordering::AcqRel);
    if open >= shared.config.max_connections as u64 {
        shared.stats.open_connections.fetch_sub(1, Ordering::AcqRel);
        shared
            .stats
            .refused_connections
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, open, "refusing a connection: too many open");
        return; // dropping the stream closes it
    }
    // Counts the connection as open until its thread ends, however it ends.
    struct Open(Arc<Shared>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.stats.open_connections.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let open = Open(shared.clone());
    let pipe = match Pipe::from_mio(stream, Interest::READABLE | Interest::WRITABLE) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot set up accepted connection");
            return;
        }
    };
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    {
        let mut wakers = shared.wakers.lock();
        wakers.retain(|w| Arc::strong_count(w) > 1);
        wakers.push(pipe.waker());
    }
    let shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("ferry-tcp-target".into())
        .spawn(move || {
            let _open = open;
            let span = tracing::debug_span!("target", %peer);
            let _enter = span.enter();
            let mut conn = TargetConn::new(shared.clone(), pipe);
            match conn.serve() {
                Ok(()) => tracing::debug!("connection closed"),
                Err(e) if is_disconnect(&e) => tracing::debug!(error = %e, "peer went away"),
                Err(e) => {
                    shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "closing connection after protocol error");
                }
            }
            conn.pipe.shutdown();
        });
    if let Err(e) = spawned {
        tracing::warn!(%peer, error = %e, "cannot start a thread for the connection");
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
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

struct TargetPace<'a> {
    shared: &'a Shared,
    acks: &'a mut PendingAcks,
    spin: bool,
    mid_frame: bool,
}

impl Pace for TargetPace<'_> {
    fn drained(&mut self, pipe: &mut Pipe) -> io::Result<()> {
        if self.mid_frame {
            // The rest of this frame is on its way; its acknowledgements go out together.
            Ok(())
        } else {
            flush_acks(pipe, self.acks, self.shared)
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
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "shutting down",
            ));
        }
        Ok(Duration::from_millis(200))
    }
}

fn flush_acks(pipe: &mut Pipe, acks: &mut PendingAcks, shared: &Shared) -> io::Result<()> {
    if acks.statuses.is_empty() {
        return Ok(());
    }
    let n = acks.statuses.len();
    let header = Header::new(Kind::Ack, n as u32, acks.first).encode();
    let mut bufs = [IoSlice::new(&header), IoSlice::new(&acks.statuses)];
    let mut pace = crate::pipe::Plain {
        spin: Duration::ZERO,
        stop: &|| shared.stopping(),
    };
    pipe.write_all(&mut bufs, &mut pace)?;
    acks.first += n as u64;
    acks.statuses.clear();
    Ok(())
}

struct TargetConn {
    shared: Arc<Shared>,
    pipe: Pipe,
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
}

impl TargetConn {
    fn new(shared: Arc<Shared>, pipe: Pipe) -> Self {
        TargetConn {
            shared,
            pipe,
            acks: PendingAcks {
                first: 0,
                statuses: Vec::with_capacity(MAX_PENDING_ACKS),
            },
            next_seq: 0,
            last_bytes: 0,
            carry: [0; DESC_LEN],
            carry_at: 0,
            carry_end: 0,
            raw_descs: vec![0; MAX_DESCS * DESC_LEN],
            descs: Vec::with_capacity(MAX_DESCS),
            statuses: Vec::with_capacity(MAX_DESCS),
            resolved: Vec::with_capacity(MAX_DESCS),
            scratch: Vec::new(),
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
            acks: &mut self.acks,
            spin: self.last_bytes <= SPIN_AFTER_BYTES,
            mid_frame,
        };
        self.pipe.read_exact(bufs, &mut pace)
    }

    fn serve(&mut self) -> io::Result<()> {
        loop {
            if self.shared.stopping() {
                return Ok(());
            }
            let mut hb = [0u8; HEADER_LEN];
            match self.read_header(&mut hb) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                r => r?,
            }
            if self.shared.stopping() {
                // Shut down while waiting: serve nothing more.
                return Ok(());
            }
            let header = Header::decode(&hb).map_err(protocol_error)?;
            match header.kind {
                Kind::Write | Kind::Read => self.requests(header)?,
                Kind::Notify => self.notify(header)?,
                Kind::GetDescriptor => {
                    flush_acks(&mut self.pipe, &mut self.acks, &self.shared)?;
                    let body = self
                        .shared
                        .control()
                        .map(|c| c.descriptor())
                        .unwrap_or_default();
                    let h = Header::new(Kind::Descriptor, body.len() as u32, 0).encode();
                    let mut pace = crate::pipe::Plain {
                        spin: Duration::ZERO,
                        stop: &|| self.shared.stopping(),
                    };
                    self.pipe
                        .write_all(&mut [IoSlice::new(&h), IoSlice::new(&body)], &mut pace)?;
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{other:?} frame sent to a target"),
                    ))
                }
            }
        }
    }

    /// Reads a header, and with it as much of the first descriptor as is there: READ and
    /// WRITE frames always carry one, so a one-request frame costs one system call.
    fn read_header(&mut self, hb: &mut [u8; HEADER_LEN]) -> io::Result<()> {
        if self.carry_at < self.carry_end {
            return self.read(&mut [IoSliceMut::new(hb)]);
        }
        let mut ahead = [0u8; DESC_LEN];
        let mut pace = TargetPace {
            shared: &self.shared,
            acks: &mut self.acks,
            spin: self.last_bytes <= SPIN_AFTER_BYTES,
            mid_frame: false,
        };
        let got = self.pipe.read_min(
            &mut [IoSliceMut::new(hb), IoSliceMut::new(&mut ahead)],
            HEADER_LEN,
            &mut pace,
        )?;
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
            let r = self.shared.regions.resolve(
                op,
                d.addr,
                d.len,
                d.key,
                self.shared.staging().is_some(),
            );
            let status = match &r {
                Ok(_) => RemoteStatus::Ok,
                Err(s) => {
                    self.shared
                        .stats
                        .rejected_requests
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(?op, addr = d.addr, len = d.len, status = %s, "refused request");
                    *s
                }
            };
            self.last_bytes += d.len;
            self.descs.push(d);
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
            flush_acks(&mut self.pipe, &mut self.acks, &self.shared)?;
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
            r = self.read(&mut [IoSliceMut::new(&mut scratch[..n])]);
            len -= n as u64;
        }
        self.scratch = scratch;
        r
    }

    /// Answers READs: statuses, then the accepted requests' bytes straight from
    /// registered memory, in one vectored write.
    fn send_read_data(&mut self, seq: u64) -> io::Result<()> {
        // Earlier WRITE acknowledgements go first: responses travel in request order.
        flush_acks(&mut self.pipe, &mut self.acks, &self.shared)?;
        self.acks.first = seq + self.statuses.len() as u64;
        let header = Header::new(Kind::ReadData, self.statuses.len() as u32, seq).encode();
        let shared = &self.shared;
        let mut pace = crate::pipe::Plain {
            spin: Duration::ZERO,
            stop: &|| shared.stopping(),
        };
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
            for (r, len) in accepted {
                // Resolution checked the range against the region.
                match r.memory.io_slice(r.offset, len) {
                    Some(s) => bufs[k] = s,
                    None => return Err(io::Error::other("resolved range out of bounds")),
                }
                k += 1;
            }
            self.pipe.write_all(&mut bufs[..k], &mut pace)
        } else {
            // Device memory is staged through host memory, one request after the other.
            let pipe = &mut self.pipe;
            let mut write = |b: &[u8]| pipe.write_all(&mut [IoSlice::new(b)], &mut pace);
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

fn parse_notification(body: &[u8]) -> Option<(&str, &[u8])> {
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
}
