//! A non-blocking TCP socket with readiness waits: the one place that turns "would block"
//! into spinning briefly (a blocked thread on another core costs tens of microseconds to
//! wake) and then sleeping in `poll` until the socket is ready, a deadline check is due,
//! or the transport is shutting down.
//!
//! A wait is a `poll(2)` of the socket itself (and of the pipe's [`WakeFd`] when it has
//! one), for the one readiness the caller is waiting for, so the pipes of one connection
//! (an initiator lane's sending and receiving halves) share its single descriptor and
//! hold no `epoll` instance of their own. Shutting the socket down wakes every thread
//! polling it, whatever it waits for.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a blocked read or write is paced. The defaults spin for nothing and wait in
/// 100 ms steps forever.
pub(crate) trait Pace {
    /// The socket has no more bytes right now. The target flushes coalesced
    /// acknowledgements here; the callee may write on `pipe`.
    fn drained(&mut self, _pipe: &mut Pipe) -> io::Result<()> {
        Ok(())
    }
    /// How long to spin before sleeping.
    fn spin(&self) -> Duration {
        Duration::ZERO
    }
    /// Called before every sleep: how long to sleep at most, or an error to give up
    /// (deadline passed, shutting down).
    fn before_sleep(&mut self) -> io::Result<Duration> {
        Ok(Duration::from_millis(100))
    }
    /// Called by [`Pipe::read_min`] before every read system call, with the bytes this
    /// call has filled so far: an error stops the read before another byte lands in the
    /// buffers (the initiator uses it to stop writing into memory whose transfer ended).
    fn before_read(&mut self, _filled: usize) -> io::Result<()> {
        Ok(())
    }
}

/// Most bytes handed to one send call. The socket's lock is held for the whole copy of a
/// call, so the peer's acknowledgements queue behind a long one and the send buffer looks
/// full for longer: on loopback, 16 MiB per call moved 1.1-1.8 GB/s where 1 MiB calls
/// moved 2.4-2.9 (a raw two-process stream walking 128 MiB; 4 MiB calls 1.7-2.7, 256 KiB
/// calls 1.4-1.5).
pub(crate) const SEND_CALL_BYTES: usize = 1 << 20;

/// How far one send call may run past [`SEND_CALL_BYTES`] when that finishes what it
/// sends: a frame's header, descriptors or statuses go with the megabyte of payload next
/// to them instead of in a call (and a segment) of their own.
pub(crate) const SEND_CALL_SLACK: usize = 8 * 1024;

/// Most buffers handed to one send call when the call is cut at [`SEND_CALL_BYTES`]
/// (a frame's header, its descriptors and its payloads fit).
const SEND_CALL_BUFS: usize = 264;

/// Sends at most [`SEND_CALL_BYTES`] of `bufs` in one call; returns the bytes sent and
/// the bytes asked for (a short send is one that sent fewer than asked: the socket is
/// full).
fn send_some(socket: &impl std::os::fd::AsFd, bufs: &[IoSlice<'_>]) -> io::Result<(usize, usize)> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    if total <= SEND_CALL_BYTES + SEND_CALL_SLACK {
        return send(socket, bufs).map(|n| (n, total));
    }
    // A prefix of at most SEND_CALL_BYTES, its last buffer cut to fit.
    let mut call = [IoSlice::new(&[]); SEND_CALL_BUFS];
    let (mut k, mut want) = (0, 0);
    for b in bufs.iter().take(SEND_CALL_BUFS) {
        let take = b.len().min(SEND_CALL_BYTES - want);
        call[k] = IoSlice::new(&b[..take]);
        k += 1;
        want += take;
        if want == SEND_CALL_BYTES {
            break;
        }
    }
    send(socket, &call[..k]).map(|n| (n, want))
}

/// Sends on a socket like `writev`, but a peer that has gone is an `EPIPE` error rather
/// than a SIGPIPE, which would kill a host process that does not ignore the signal (a C
/// or C++ program embedding ferry; Rust and Python ignore it).
pub(crate) fn send(socket: &impl std::os::fd::AsFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    socket2::SockRef::from(socket).send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL)
}

/// An eventfd that interrupts a [`Pipe`]'s sleeps without touching its socket (the
/// target's deregistration asks its connection threads to look at their flags this way).
#[derive(Debug)]
pub(crate) struct WakeFd(std::fs::File);

impl WakeFd {
    pub(crate) fn new() -> io::Result<WakeFd> {
        crate::sockopt::eventfd().map(|fd| WakeFd(fd.into()))
    }

    /// Wakes the pipe's sleep, or the next one if it is not asleep: the descriptor stays
    /// readable until the sleeper drains it.
    pub(crate) fn wake(&self) -> io::Result<()> {
        match (&self.0).write(&1u64.to_ne_bytes()) {
            // The counter is at its maximum: the descriptor is readable already.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Resets the counter (after a sleep it ended), so the next sleep waits again.
    fn drain(&self) {
        // Nothing to drain (WouldBlock) is as good as drained.
        let _ = (&self.0).read(&mut [0u8; 8]);
    }
}

/// Sleeps until `socket` reports `events` (`POLLIN` or `POLLOUT`; a hang-up or an error
/// always ends the sleep), `wake` is woken, or `timeout` passes. An interrupted sleep
/// just returns: every caller looks again.
fn wait(
    socket: &impl AsFd,
    events: libc::c_short,
    wake: Option<&WakeFd>,
    timeout: Duration,
) -> io::Result<()> {
    let fds = [
        (Some(socket.as_fd()), events),
        (wake.map(|w| w.0.as_fd()), libc::POLLIN),
    ];
    let [_, woken] = crate::sockopt::poll(fds, timeout)?;
    if let Some(w) = wake {
        if woken != 0 {
            w.drain();
        }
    }
    Ok(())
}

/// One direction (or both) of a TCP connection. The socket may be shared with other
/// pipes (an initiator's lane has one for sending and one for receiving) and with
/// whoever shuts it down.
pub(crate) struct Pipe {
    stream: Arc<TcpStream>,
    wake: Option<Arc<WakeFd>>,
    /// The socket's receive low-water mark as this pipe last set it (1, the kernel's
    /// default, outside [`Pipe::read_min`]).
    mark: usize,
    /// How often this pipe slept in a read, and set the mark (what the tests count).
    #[cfg(test)]
    mark_calls: (usize, usize),
}

/// The most a sleeping reader asks the kernel to gather before waking it
/// (`SO_RCVLOWAT`): a reader that needs the rest of a large payload sleeps until this
/// much has arrived, not until the next segment, and copies it while the rest arrives.
/// Each wake-up costs the sending side as much as copying tens of KiB (on a VM, an
/// interrupt to the sleeping CPU), so waking once per 512 KiB instead of once per
/// segment or two frees the sender for the data. Measured on loopback (WRITE 1 MiB x8,
/// two in flight): no mark 3.2 GB/s, 128 KiB 4.1-4.6, 256 KiB 5.0-5.2, 512 KiB 5.2, 1 MiB
/// 4.9-5.3; the kernel caps the mark at half the receive buffer.
const WAKE_AFTER_BYTES: usize = 512 * 1024;
/// A reader that needs less than this sleeps with the mark at one byte: a segment or two
/// brings it anyway, and two `setsockopt` calls per sleep would be the larger cost.
const RAISE_MARK_FROM: usize = 64 * 1024;

impl Pipe {
    /// Takes a connected socket (which it makes non-blocking, without Nagle's delay) and
    /// the eventfd, if any, that may interrupt its sleeps.
    pub(crate) fn new(stream: Arc<TcpStream>, wake: Option<Arc<WakeFd>>) -> io::Result<Pipe> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        Ok(Pipe {
            stream,
            wake,
            mark: 1,
            #[cfg(test)]
            mark_calls: (0, 0),
        })
    }

    /// Closes both directions; the peer and every thread polling this socket see it.
    pub(crate) fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn sleep(&mut self, events: libc::c_short, timeout: Duration) -> io::Result<()> {
        wait(&*self.stream, events, self.wake.as_deref(), timeout)
    }

    /// Sleeps until `need` more bytes have arrived (at most [`WAKE_AFTER_BYTES`], and only
    /// from [`RAISE_MARK_FROM`]; the kernel also wakes it for the peer closing, an error,
    /// or its own memory pressure), or `timeout`.
    ///
    /// The mark stays where it is after the sleep: a read that sleeps again for at least
    /// as much (the middle of a large payload) pays no system call for it, and only a
    /// smaller need lowers it. [`Pipe::read_min`] puts it back at one byte when it
    /// returns, so every other wait on the socket wakes for any data. A read that does
    /// not wait returns what is there whatever the mark.
    fn sleep_for(&mut self, need: usize, timeout: Duration) -> io::Result<()> {
        let mark = if need < RAISE_MARK_FROM {
            1
        } else {
            need.min(WAKE_AFTER_BYTES)
        };
        // Setting the mark re-checks what is queued already (the kernel raises readiness
        // at once when that is enough), so no arrival is missed. A mark that could not be
        // raised leaves a lower one, which only wakes the reader sooner; one that could
        // not be lowered might not wake it at all, so that is an error.
        if mark != self.mark {
            if let Err(e) = self.set_mark(mark) {
                if mark < self.mark {
                    return Err(e);
                }
            }
        }
        #[cfg(test)]
        {
            self.mark_calls.0 += 1;
        }
        self.sleep(libc::POLLIN, timeout)
    }

    fn set_mark(&mut self, mark: usize) -> io::Result<()> {
        #[cfg(test)]
        {
            self.mark_calls.1 += 1;
        }
        crate::sockopt::set_rcvlowat(&self.stream, mark)?;
        self.mark = mark;
        Ok(())
    }

    /// One read that does not wait: the bytes read, 0 when none have arrived; the peer
    /// closing is an error.
    pub(crate) fn try_read(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        loop {
            match (&*self.stream).read_vectored(bufs) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection",
                    ))
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads until every buffer is full. Empty buffers are skipped.
    pub(crate) fn read_exact(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        pace: &mut dyn Pace,
    ) -> io::Result<()> {
        let total = bufs.iter().map(|b| b.len()).sum();
        self.read_min(bufs, total, pace).map(|_| ())
    }

    /// Reads at least `min` bytes into `bufs` (more if they are already there, up to the
    /// buffers' size) and returns how many.
    ///
    /// A read that returns fewer bytes than asked drained the socket, so the reader goes
    /// straight to spinning or sleeping instead of spending a system call on `EAGAIN`
    /// (the sleep's poll returns at once if more arrived meanwhile).
    pub(crate) fn read_min(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        min: usize,
        pace: &mut dyn Pace,
    ) -> io::Result<usize> {
        let read = self.read_min_marked(bufs, min, pace);
        if self.mark == 1 {
            return read;
        }
        let reset = self.set_mark(1);
        let filled = read?;
        reset.map(|()| filled)
    }

    /// [`Pipe::read_min`], leaving the mark where its last sleep set it.
    fn read_min_marked(
        &mut self,
        mut bufs: &mut [IoSliceMut<'_>],
        min: usize,
        pace: &mut dyn Pace,
    ) -> io::Result<usize> {
        IoSliceMut::advance_slices(&mut bufs, 0);
        let mut filled = 0;
        let mut idle = Idle::default();
        while filled < min && !bufs.is_empty() {
            let want: usize = bufs.iter().map(|b| b.len()).sum();
            pace.before_read(filled)?;
            match self.try_read(bufs)? {
                0 => idle.wait(self, pace, min - filled)?,
                n => {
                    IoSliceMut::advance_slices(&mut bufs, n);
                    filled += n;
                    idle = Idle::default();
                    if n < want && filled < min {
                        idle.wait(self, pace, min - filled)?;
                    }
                }
            }
        }
        Ok(filled)
    }

    /// Writes what the socket takes until `until`, waiting for room in between (paced by
    /// `pace`), and returns how many bytes of `bufs` went.
    pub(crate) fn write_until(
        &mut self,
        mut bufs: &mut [IoSlice<'_>],
        pace: &mut dyn Pace,
        until: Instant,
    ) -> io::Result<usize> {
        IoSlice::advance_slices(&mut bufs, 0);
        let mut sent = 0;
        while !bufs.is_empty() {
            let full = match send_some(&self.stream, bufs) {
                Ok((0, _)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok((n, want)) => {
                    IoSlice::advance_slices(&mut bufs, n);
                    sent += n;
                    n < want
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                Err(e) => return Err(e),
            };
            if full {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                let timeout = pace.before_sleep()?.min(until - now);
                self.sleep(libc::POLLOUT, timeout)?;
            }
        }
        Ok(sent)
    }

    /// Writes every buffer. Empty buffers are skipped. A short write means the send
    /// buffer is full: wait for room without asking again first.
    pub(crate) fn write_all(
        &mut self,
        mut bufs: &mut [IoSlice<'_>],
        pace: &mut dyn Pace,
    ) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match send_some(&self.stream, bufs) {
                Ok((0, _)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok((n, want)) => {
                    IoSlice::advance_slices(&mut bufs, n);
                    if n < want {
                        let timeout = pace.before_sleep()?;
                        self.sleep(libc::POLLOUT, timeout)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let timeout = pace.before_sleep()?;
                    self.sleep(libc::POLLOUT, timeout)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// What a reader does while its socket has nothing: tell the pace once, spin for the
/// pace's budget (retrying the read), then sleep until readable.
#[derive(Default)]
struct Idle {
    spin_until: Option<Instant>,
}

impl Idle {
    /// One turn of waiting for the `need` bytes the reader still has to read.
    fn wait(&mut self, pipe: &mut Pipe, pace: &mut dyn Pace, need: usize) -> io::Result<()> {
        let now = Instant::now();
        match self.spin_until {
            None => {
                pace.drained(pipe)?;
                let spin = pace.spin();
                self.spin_until = Some(now + spin);
                if spin.is_zero() {
                    let timeout = pace.before_sleep()?;
                    pipe.sleep_for(need, timeout)?;
                }
            }
            Some(t) if now < t => std::thread::yield_now(),
            Some(_) => {
                let timeout = pace.before_sleep()?;
                pipe.sleep_for(need, timeout)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// Pacing with no hooks: wait in 100 ms steps until `stop` says to give up.
    struct Plain<'a> {
        spin: Duration,
        stop: &'a dyn Fn() -> bool,
    }

    impl Pace for Plain<'_> {
        fn spin(&self) -> Duration {
            self.spin
        }
        fn before_sleep(&mut self) -> io::Result<Duration> {
            if (self.stop)() {
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "shutting down",
                ))
            } else {
                Ok(Duration::from_millis(100))
            }
        }
    }

    #[test]
    fn moves_vectored_bytes_and_sees_eof() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let mut wa = Pipe::new(Arc::new(a), None).unwrap();
        let mut rb = Pipe::new(Arc::new(b), None).unwrap();
        let stop = || false;
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let writer = std::thread::spawn(move || {
            let mut bufs = [
                IoSlice::new(&[]),
                IoSlice::new(&payload[..10]),
                IoSlice::new(&payload[10..]),
            ];
            wa.write_all(
                &mut bufs,
                &mut Plain {
                    spin: Duration::ZERO,
                    stop: &|| false,
                },
            )
            .unwrap();
            wa.shutdown();
            payload
        });
        let mut got = vec![0u8; 3_000_000];
        let (x, y) = got.split_at_mut(1234);
        let mut bufs = [
            IoSliceMut::new(x),
            IoSliceMut::new(&mut []),
            IoSliceMut::new(y),
        ];
        rb.read_exact(
            &mut bufs,
            &mut Plain {
                spin: Duration::from_micros(10),
                stop: &stop,
            },
        )
        .unwrap();
        let payload = writer.join().unwrap();
        assert_eq!(got, payload);
        let mut one = [0u8; 1];
        let err = rb
            .read_exact(
                &mut [IoSliceMut::new(&mut one)],
                &mut Plain {
                    spin: Duration::ZERO,
                    stop: &stop,
                },
            )
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A reader that needs more than has arrived sleeps with the socket's low-water mark
    /// raised to what it needs (from `RAISE_MARK_FROM`, at most `WAKE_AFTER_BYTES`): it
    /// must still be woken by exactly the bytes it needs, at and around both bounds, and
    /// leave the mark at one byte so every other wait on the socket wakes for any data.
    /// Between its sleeps the mark stays up: a read sets it at most once per sleep (only
    /// when what it still needs calls for another mark) and once more to put it back,
    /// where setting it up and back around every sleep took two calls per sleep; a read
    /// of less than `RAISE_MARK_FROM` never sets it. (How often a read sleeps depends on
    /// the scheduler, so the counts are bounded, not fixed; the writer trickles, so the
    /// large reads sleep several times.)
    /// Its sleeps are an hour long: a wake-up the kernel withheld would leave the read
    /// unfinished (the test waits 60 s).
    #[test]
    fn a_sleeping_reader_wakes_for_exactly_what_it_needs() {
        struct Sleepy;
        impl Pace for Sleepy {
            fn spin(&self) -> Duration {
                Duration::ZERO
            }
            fn before_sleep(&mut self) -> io::Result<Duration> {
                Ok(Duration::from_secs(3600))
            }
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let mut rb = Pipe::new(Arc::new(b), None).unwrap();
        let sizes = [
            1,
            RAISE_MARK_FROM - 1,
            RAISE_MARK_FROM,
            WAKE_AFTER_BYTES - 1,
            WAKE_AFTER_BYTES,
            WAKE_AFTER_BYTES + 1,
            3 * WAKE_AFTER_BYTES + 5,
        ];
        let total: usize = sizes.iter().sum();
        let payload: Vec<u8> = (0..total as u32).map(|i| (i * 31 + 7) as u8).collect();
        let sent = payload.clone();
        let writer = std::thread::spawn(move || {
            let mut a = a;
            // In pieces with pauses between, so the reader sleeps part way through.
            for piece in sent.chunks(40_000) {
                std::io::Write::write_all(&mut a, piece).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            a
        });
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut marks = Vec::new();
            let mut calls = Vec::new();
            for &n in &sizes {
                let mut buf = vec![0u8; n];
                rb.mark_calls = (0, 0);
                rb.read_exact(&mut [IoSliceMut::new(&mut buf)], &mut Sleepy)
                    .unwrap();
                got.extend_from_slice(&buf);
                marks.push(crate::sockopt::rcvlowat(&rb.stream).unwrap());
                calls.push(rb.mark_calls);
            }
            done_tx.send(()).unwrap();
            (got, marks, calls)
        });
        done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the reader was woken for every byte it needed");
        let (got, marks, calls) = reader.join().unwrap();
        drop(writer.join().unwrap());
        assert!(got == payload, "the bytes arrive whole and in order");
        assert_eq!(marks, vec![1; sizes.len()], "the mark is back at one byte");
        for (&n, &(sleeps, sets)) in sizes.iter().zip(&calls) {
            assert!(
                sets <= sleeps + 1,
                "a read of {n} bytes slept {sleeps} times and set the mark {sets} times"
            );
            if n < RAISE_MARK_FROM {
                assert_eq!(sets, 0, "a read of {n} bytes never raises the mark");
            }
        }
    }

    /// One send call asks for at most `SEND_CALL_BYTES` (or all, when that is at most
    /// `SEND_CALL_SLACK` more), cutting the last buffer it takes, and at most
    /// `SEND_CALL_BUFS` buffers; what it sends is the buffers' prefix, in order.
    #[test]
    fn one_send_call_takes_a_prefix_of_at_most_its_cap() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        let payload: Vec<u8> = (0..4_000_000u32).map(|i| (i * 13 + 1) as u8).collect();
        let cases: [(Vec<std::ops::Range<usize>>, usize); 6] = [
            // Under the cap: all of it.
            (vec![0..10, 10..300_000], 300_000),
            // Past the cap by at most the slack: all of it too.
            (vec![0..17, 17..SEND_CALL_BYTES + 17], SEND_CALL_BYTES + 17),
            // Past it by more: cut at the cap.
            (
                vec![0..16, 16..SEND_CALL_BYTES + SEND_CALL_SLACK + 1],
                SEND_CALL_BYTES,
            ),
            // A buffer crossing the cap is cut.
            (vec![0..16, 16..3_000_000], SEND_CALL_BYTES),
            // Many small buffers reaching the cap.
            (
                (0..400).map(|i| i * 4096..(i + 1) * 4096).collect(),
                SEND_CALL_BYTES,
            ),
            // More buffers than one call takes, under the cap in bytes: the first ones.
            (
                (0..400).map(|i| i * 3000..(i + 1) * 3000).collect(),
                SEND_CALL_BUFS * 3000,
            ),
        ];
        for (ranges, asked) in cases {
            let bufs: Vec<IoSlice<'_>> = ranges
                .iter()
                .map(|r| IoSlice::new(&payload[r.clone()]))
                .collect();
            let (sent, want) = send_some(&a, &bufs).unwrap();
            assert_eq!(want, asked);
            assert!(sent > 0 && sent <= want);
            let mut got = vec![0u8; sent];
            b.read_exact(&mut got).unwrap();
            assert_eq!(got, payload[..sent]);
        }
    }
}
