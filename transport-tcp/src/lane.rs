//! A lane's protocol state without its sockets: what is in flight, in which order, and
//! whether an answer from the peer matches what was asked.
//!
//! The initiator's threads do the I/O and the waiting; everything they decide about the
//! peer's answers is decided here, from plain inputs, so it is tested without a socket:
//! - [`Inflight`], the table of requests sent and not yet answered (behind the lane's
//!   lock, shared by its sender and receiver): [`on_sent`](Inflight::on_sent) when a
//!   frame's requests go in, [`take_answered`](Inflight::take_answered) when an answer
//!   takes them out, and the earliest-deadline bookkeeping that bounds every wait;
//! - [`Answers`], the receiver's side: the sequence number due next and the checks that
//!   an answer's kind, count and sequence match the requests it answers
//!   ([`check_header`](Answers::check_header), [`on_answer`](Answers::on_answer)).
//!
//! A broken rule is a [`Violation`]: the peer is not speaking the protocol, and the lane
//! closes. Nothing here allocates per request.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::time::Instant;

use crossbeam_channel::Sender;
use ferry_transport_api::{Completions, FailReason, Opcode, RemoteStatus, Slice};

use crate::frame::{Header, Kind};

/// One request in flight: a slice, or a notification whose sender waits for its answer.
pub(crate) enum Entry {
    Slice {
        seq: u64,
        /// For the first slice of a READ frame, the frame's size (its answer is one
        /// `ReadData` message of that many statuses); otherwise 0.
        read_frame: u32,
        slice: Slice,
    },
    Notify {
        seq: u64,
        deadline: Instant,
        reply: Sender<Result<(), FailReason>>,
    },
}

impl Entry {
    pub(crate) fn seq(&self) -> u64 {
        match self {
            Entry::Slice { seq, .. } | Entry::Notify { seq, .. } => *seq,
        }
    }

    /// Every entry has one: an entry still unanswered after it closes the lane.
    pub(crate) fn deadline(&self) -> Instant {
        match self {
            Entry::Slice { slice, .. } => slice.deadline,
            Entry::Notify { deadline, .. } => *deadline,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Entry::Slice { slice, .. } => slice.len,
            Entry::Notify { .. } => 0,
        }
    }

    fn is_read(&self) -> bool {
        matches!(self, Entry::Slice { slice, .. } if slice.op == Opcode::Read)
    }

    /// Reports the entry failed (its slice to `completions`, a notification to its
    /// sender).
    pub(crate) fn fail(self, completions: &dyn Completions, reason: FailReason) {
        match self {
            Entry::Slice { slice, .. } => completions.complete(slice.token, Err(reason)),
            Entry::Notify { reply, .. } => {
                let _ = reply.send(Err(reason));
            }
        }
    }

    /// Reports the entry with the status the peer answered.
    pub(crate) fn answer(self, completions: &dyn Completions, status: u8) {
        let status = RemoteStatus::from_u8(status);
        match self {
            Entry::Slice { slice, .. } => {
                let r = if status == RemoteStatus::Ok {
                    Ok(slice.len)
                } else {
                    Err(FailReason::Remote(status))
                };
                completions.complete(slice.token, r);
            }
            Entry::Notify { reply, .. } => {
                let r = if status == RemoteStatus::Ok {
                    Ok(())
                } else {
                    Err(FailReason::Remote(status))
                };
                let _ = reply.send(r);
            }
        }
    }
}

/// The requests a lane has sent and not yet had answered, oldest first.
pub(crate) struct Inflight {
    pub(crate) entries: VecDeque<Entry>,
    /// Payload bytes of the entries.
    pub(crate) bytes: usize,
    /// Set once the lane is dead: nothing more may be added. The first reason given is
    /// the one everything still in flight fails with.
    pub(crate) closed: Option<FailReason>,
    /// No entry's deadline is earlier than this; `None` only when there is no entry.
    /// Answered entries leave without raising it (that would cost a scan per answer), so
    /// it may be early: [`Inflight::earliest`] scans once when it passes.
    earliest: Option<Instant>,
}

impl Inflight {
    /// An empty table with room for `capacity` entries before it grows.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Inflight {
            entries: VecDeque::with_capacity(capacity),
            bytes: 0,
            closed: None,
            earliest: None,
        }
    }

    fn push(&mut self, entry: Entry) {
        let d = entry.deadline();
        self.earliest = Some(self.earliest.map_or(d, |e| e.min(d)));
        self.entries.push_back(entry);
    }

    /// A frame of `op` requests goes out with sequence numbers from `first_seq`: every
    /// slice of `frame` (taken out of it) enters the table. Before the bytes leave, as
    /// the answer may come back at once.
    pub(crate) fn on_sent(&mut self, op: Opcode, first_seq: u64, frame: &mut Vec<Slice>) {
        let n = frame.len();
        self.bytes += frame.iter().map(|s| s.len).sum::<usize>();
        let read_frame = if op == Opcode::Read { n as u32 } else { 0 };
        for (i, slice) in frame.drain(..).enumerate() {
            self.push(Entry::Slice {
                seq: first_seq + i as u64,
                read_frame: if i == 0 { read_frame } else { 0 },
                slice,
            });
        }
    }

    /// A notification goes out as request `seq`.
    pub(crate) fn on_sent_notify(
        &mut self,
        seq: u64,
        deadline: Instant,
        reply: Sender<Result<(), FailReason>>,
    ) {
        self.push(Entry::Notify {
            seq,
            deadline,
            reply,
        });
    }

    /// The size of the READ frame the oldest request starts (its answer must be a
    /// `ReadData` of that many statuses), or 0 when the oldest request is anything else.
    pub(crate) fn read_answer_due(&self) -> usize {
        match self.entries.front() {
            Some(Entry::Slice { read_frame, .. }) => *read_frame as usize,
            _ => 0,
        }
    }

    /// An answer of `n` statuses arrived: the `n` oldest requests leave the table for
    /// `batch`, in order. Whether they match the answer is [`Answers::on_answer`]'s
    /// question.
    pub(crate) fn take_answered(
        &mut self,
        n: usize,
        batch: &mut Vec<Entry>,
    ) -> Result<(), Violation> {
        if self.entries.len() < n {
            return Err(Violation::NeverSent);
        }
        batch.extend(self.entries.drain(..n));
        if self.entries.is_empty() {
            self.earliest = None;
        }
        let done: usize = batch.iter().map(Entry::len).sum();
        self.bytes = self.bytes.saturating_sub(done);
        Ok(())
    }

    /// Empties the table (the lane closed): its entries, oldest first.
    pub(crate) fn drain_all(&mut self) -> std::collections::vec_deque::Drain<'_, Entry> {
        self.bytes = 0;
        self.earliest = None;
        self.entries.drain(..)
    }

    /// The earliest deadline of the entries, exact whenever it is at or before `now`.
    pub(crate) fn earliest(&mut self, now: Instant) -> Option<Instant> {
        if self.earliest.is_some_and(|e| e <= now) {
            self.earliest = self.entries.iter().map(Entry::deadline).min();
        }
        self.earliest
    }
}

/// The receiver's view of the answers: which sequence number is due next.
#[derive(Debug, Default)]
pub(crate) struct Answers {
    expected: u64,
}

impl Answers {
    /// Checks an answer's header before its statuses are read. `read_due` is
    /// [`Inflight::read_answer_due`] (read before the header, to read header and
    /// statuses in one call).
    pub(crate) fn check_header(&self, header: &Header, read_due: usize) -> Result<(), Violation> {
        if read_due > 0 && (header.kind != Kind::ReadData || header.count as usize != read_due) {
            return Err(Violation::NotTheReadAnswer {
                kind: header.kind,
                count: header.count,
                due: read_due,
            });
        }
        if !matches!(header.kind, Kind::Ack | Kind::ReadData) || header.seq != self.expected {
            return Err(Violation::Unexpected {
                kind: header.kind,
                seq: header.seq,
                expected: self.expected,
            });
        }
        Ok(())
    }

    /// Checks that the requests `batch` (taken by [`Inflight::take_answered`]) are the
    /// ones `header` answers: the same sequence numbers, and READs answered by
    /// `ReadData`, everything else by `Ack`. On success the next answer is due after them.
    pub(crate) fn on_answer(&mut self, header: &Header, batch: &[Entry]) -> Result<(), Violation> {
        for (i, e) in batch.iter().enumerate() {
            if e.seq() != header.seq + i as u64 || e.is_read() != (header.kind == Kind::ReadData) {
                return Err(Violation::Mismatch);
            }
        }
        self.expected += batch.len() as u64;
        Ok(())
    }
}

/// An answer that breaks the protocol: the lane closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// The oldest request starts a READ frame, and this is not its `ReadData`.
    NotTheReadAnswer { kind: Kind, count: u32, due: usize },
    /// Not an answer, or not the one due next.
    Unexpected { kind: Kind, seq: u64, expected: u64 },
    /// More statuses than requests in flight.
    NeverSent,
    /// The answered requests are not the ones the answer names.
    Mismatch,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NotTheReadAnswer { kind, count, due } => write!(
                f,
                "{kind:?} of {count} where the answer to a READ frame of {due} was due"
            ),
            Violation::Unexpected {
                kind,
                seq,
                expected,
            } => write!(
                f,
                "unexpected {kind:?} frame for sequence {seq} (expected {expected})"
            ),
            Violation::NeverSent => f.write_str("answer for requests never sent"),
            Violation::Mismatch => f.write_str("answer does not match the request"),
        }
    }
}

impl From<Violation> for io::Error {
    fn from(v: Violation) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use ferry_transport_api::testing::host_region;
    use ferry_transport_api::{CompletionToken, RemoteKeys};

    use super::*;

    fn slices(op: Opcode, lens: &[usize], first_task: u32, deadline: Instant) -> Vec<Slice> {
        let local = host_region(vec![0; 1 << 16]);
        lens.iter()
            .enumerate()
            .map(|(i, &len)| Slice {
                op,
                local: local.clone(),
                local_offset: 0,
                remote_addr: 0x1000,
                remote_base: 0x1000,
                remote_keys: RemoteKeys::single(7),
                len,
                token: CompletionToken {
                    slot: 0,
                    generation: 0,
                    task: first_task + i as u32,
                },
                deadline,
            })
            .collect()
    }

    fn header(kind: Kind, count: u32, seq: u64) -> Header {
        Header { kind, count, seq }
    }

    #[derive(Default)]
    struct Log(Mutex<Vec<(u32, Result<usize, FailReason>)>>);

    impl Completions for Log {
        fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
            self.0.lock().unwrap().push((token.task, result));
        }
    }

    /// A WRITE frame, a READ frame and a notification, answered in order: each answer
    /// passes its checks, takes exactly its requests, and reports each once with the
    /// status the peer gave.
    #[test]
    fn answers_in_order_take_their_requests_and_report_each_once() {
        let later = Instant::now() + Duration::from_secs(60);
        let mut table = Inflight::with_capacity(8);
        let mut answers = Answers::default();
        table.on_sent(
            Opcode::Write,
            0,
            &mut slices(Opcode::Write, &[10, 20], 0, later),
        );
        table.on_sent(
            Opcode::Read,
            2,
            &mut slices(Opcode::Read, &[30, 40, 50], 2, later),
        );
        let (reply, replied) = crossbeam_channel::bounded(1);
        table.on_sent_notify(5, later, reply);
        assert_eq!(table.bytes, 150);
        assert_eq!(table.read_answer_due(), 0, "a WRITE frame is oldest");

        let log = Log::default();
        let mut batch = Vec::new();
        let ack = header(Kind::Ack, 2, 0);
        answers.check_header(&ack, table.read_answer_due()).unwrap();
        table.take_answered(2, &mut batch).unwrap();
        answers.on_answer(&ack, &batch).unwrap();
        for (e, st) in batch.drain(..).zip([0, RemoteStatus::KeyMismatch as u8]) {
            e.answer(&log, st);
        }
        assert_eq!(table.bytes, 120);

        assert_eq!(table.read_answer_due(), 3, "the READ frame is oldest now");
        let data = header(Kind::ReadData, 3, 2);
        answers.check_header(&data, 3).unwrap();
        table.take_answered(3, &mut batch).unwrap();
        answers.on_answer(&data, &batch).unwrap();
        for e in batch.drain(..) {
            e.answer(&log, 0);
        }

        let notify_ack = header(Kind::Ack, 1, 5);
        answers
            .check_header(&notify_ack, table.read_answer_due())
            .unwrap();
        table.take_answered(1, &mut batch).unwrap();
        answers.on_answer(&notify_ack, &batch).unwrap();
        batch.pop().unwrap().answer(&log, 0);
        assert_eq!(replied.try_recv().unwrap(), Ok(()));
        assert!(table.entries.is_empty());
        assert_eq!(table.bytes, 0);
        assert_eq!(
            table.earliest(Instant::now() + Duration::from_secs(3600)),
            None
        );

        assert_eq!(
            *log.0.lock().unwrap(),
            vec![
                (0, Ok(10)),
                (1, Err(FailReason::Remote(RemoteStatus::KeyMismatch))),
                (2, Ok(30)),
                (3, Ok(40)),
                (4, Ok(50)),
            ]
        );
        // The next answer is due at sequence 6: a repeat of an old one is refused.
        assert_eq!(
            answers.check_header(&header(Kind::Ack, 1, 5), 0),
            Err(Violation::Unexpected {
                kind: Kind::Ack,
                seq: 5,
                expected: 6
            })
        );
    }

    /// Every way an answer can break the protocol is a violation, with the message the
    /// lane closes with.
    #[test]
    fn answers_that_break_the_protocol_are_violations() {
        let later = Instant::now() + Duration::from_secs(60);
        let answers = Answers::default();
        // A READ frame of 2 is oldest: only a ReadData of 2 answers it.
        for wrong in [header(Kind::Ack, 2, 0), header(Kind::ReadData, 1, 0)] {
            let v = answers.check_header(&wrong, 2).unwrap_err();
            assert_eq!(
                v,
                Violation::NotTheReadAnswer {
                    kind: wrong.kind,
                    count: wrong.count,
                    due: 2
                }
            );
        }
        // Requests and other kinds are not answers; a skipped sequence is not due.
        for wrong in [
            header(Kind::Write, 1, 0),
            header(Kind::Descriptor, 1, 0),
            header(Kind::Ack, 1, 1),
        ] {
            assert!(matches!(
                answers.check_header(&wrong, 0),
                Err(Violation::Unexpected { .. })
            ));
        }
        assert_eq!(
            io::Error::from(Violation::Unexpected {
                kind: Kind::Ack,
                seq: 1,
                expected: 0
            })
            .to_string(),
            "unexpected Ack frame for sequence 1 (expected 0)"
        );

        // More statuses than requests: nothing leaves the table.
        let mut table = Inflight::with_capacity(4);
        table.on_sent(Opcode::Write, 0, &mut slices(Opcode::Write, &[8], 0, later));
        let mut batch = Vec::new();
        assert_eq!(
            table.take_answered(2, &mut batch),
            Err(Violation::NeverSent)
        );
        assert!(batch.is_empty());
        assert_eq!(table.entries.len(), 1);

        // A WRITE answered by ReadData (as a READ frame of 1 would be) does not match.
        let mut answers = Answers::default();
        table.take_answered(1, &mut batch).unwrap();
        assert_eq!(
            answers.on_answer(&header(Kind::ReadData, 1, 0), &batch),
            Err(Violation::Mismatch)
        );
        // A READ answered by an Ack does not match either.
        let mut reads = Inflight::with_capacity(4);
        reads.on_sent(Opcode::Read, 0, &mut slices(Opcode::Read, &[8], 0, later));
        let mut batch = Vec::new();
        reads.take_answered(1, &mut batch).unwrap();
        assert_eq!(
            answers.on_answer(&header(Kind::Ack, 1, 0), &batch),
            Err(Violation::Mismatch)
        );
        assert_eq!(
            Violation::Mismatch.to_string(),
            "answer does not match the request"
        );
    }

    /// The earliest deadline is exact once it passes, though answered entries leave
    /// without raising it; a closed table fails everything it held once.
    #[test]
    fn earliest_deadline_and_drain() {
        let now = Instant::now();
        let soon = now + Duration::from_secs(1);
        let later = now + Duration::from_secs(60);
        let mut table = Inflight::with_capacity(4);
        table.on_sent(Opcode::Write, 0, &mut slices(Opcode::Write, &[1], 0, soon));
        table.on_sent(
            Opcode::Write,
            1,
            &mut slices(Opcode::Write, &[2, 3], 1, later),
        );
        assert_eq!(table.earliest(now), Some(soon));
        let mut batch = Vec::new();
        table.take_answered(1, &mut batch).unwrap();
        // Still the answered one's deadline until it passes: then a scan finds the rest.
        assert_eq!(table.earliest(now), Some(soon));
        assert_eq!(table.earliest(soon), Some(later));

        let log = Arc::new(Log::default());
        for e in batch.drain(..).chain(table.drain_all()) {
            e.fail(&*log, FailReason::ConnectionLost);
        }
        assert_eq!(table.bytes, 0);
        assert_eq!(table.earliest(later), None);
        let tasks: Vec<u32> = log.0.lock().unwrap().iter().map(|(t, _)| *t).collect();
        assert_eq!(tasks, vec![0, 1, 2], "each failed once, in order");
    }
}
