//! The bookkeeping of a transport's operations in flight: a table allocated when a
//! device opens, whose entries carry a posted slice from its post until the device gives
//! the operation back. A transport names an entry to its device by [`OpRef`] (its index,
//! or its index and generation packed in a word: an ibverbs `wr_id`), or by memory of its
//! own indexed the same way (libfabric's `fi_context`).
//!
//! Every entry's state lives under one lock, so the thread that reads completions, the
//! deadline sweep and a poster taking back an operation the device refused never race.
//!
//! An entry's life:
//! - `Free` → `InFlight` when a slice is posted;
//! - `InFlight` → `Free` when its completion is read: the slice is reported;
//! - `InFlight` → `Abandoned` when its deadline passes first: reported `TimedOut` there
//!   and then, its connection marked dead. The device may still move bytes into the local
//!   buffer, so the slice (and the `Arc<RegionMemory>` in it) is kept;
//! - `Abandoned` → `Free` when the late completion arrives (not reported again) or the
//!   device is closed;
//! - on close, after the device has let go of everything, `InFlight` entries are reported
//!   `Shutdown` and every entry is freed.
//!
//! So a slice is reported exactly once, and an entry is reused only once the device can
//! no longer touch it. Nothing is allocated per operation: the reports gathered under the
//! lock are delivered after it from a fixed array on the stack.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::{CompletionToken, Completions, FailReason, Slice};

/// Most reports gathered under the lock before they are delivered (one completion
/// queue read at most).
pub const OUTCOMES: usize = 64;

/// No deadline is due (`due_ns`).
const NEVER: u64 = u64::MAX;

/// What an operation holds besides its slice until the device gives it back (the queue
/// pair it was posted on, the registration of its local memory, ...): up to two shared
/// handles, so holding them costs no allocation.
pub type Keep = [Option<Arc<dyn Any + Send + Sync>>; 2];

/// What an operation in flight knows of the connection it was posted on: whether the
/// connection still works (cleared when one of its operations times out, or when the
/// transport finds it broken), and the peer's name, for logs about a failed operation.
#[derive(Debug)]
pub struct Link {
    alive: AtomicBool,
    peer: String,
}

impl Link {
    /// A working connection to `peer` (as the engine names it: the segment's name).
    pub fn new(peer: impl Into<String>) -> Arc<Link> {
        Arc::new(Link {
            alive: AtomicBool::new(true),
            peer: peer.into(),
        })
    }

    /// Whether the connection still works.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Marks the connection broken: the engine replaces it at its next opening.
    pub fn kill(&self) {
        self.alive.store(false, Ordering::Release);
    }

    /// The peer, as logs name it.
    pub fn peer(&self) -> &str {
        &self.peer
    }
}

/// Names one use of an entry: the index and the generation it had when acquired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpRef {
    /// The entry.
    pub index: u32,
    /// Its generation when acquired; a completion naming another is not this use's.
    pub generation: u32,
}

impl OpRef {
    /// The reference as one word (generation in the high half): what a device carries
    /// back with a completion (an ibverbs `wr_id`).
    pub fn to_word(self) -> u64 {
        u64::from(self.generation) << 32 | u64::from(self.index)
    }

    /// The reference [`to_word`](Self::to_word) made.
    pub fn from_word(word: u64) -> Self {
        OpRef {
            index: word as u32,
            generation: (word >> 32) as u32,
        }
    }
}

/// Counters of one table (or of every device's, summed), for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Entries allocated (all of them when the device opened).
    pub capacity: usize,
    /// Table allocations since the device opened (one: never one per operation).
    pub allocations: u64,
    /// Operations posted and not yet reported.
    pub in_flight: usize,
    /// Operations reported (timed out) that the device has not given back.
    pub abandoned: usize,
    /// Operations that acquired an entry.
    pub acquired: u64,
    /// Operations reported from their completion (success or device error).
    pub completed: u64,
    /// Operations reported `TimedOut` by the deadline sweep.
    pub timed_out: u64,
    /// Completions that arrived for an operation already reported, and were ignored.
    pub late: u64,
    /// Operations reported `Shutdown` when the device closed.
    pub shut_down: u64,
    /// Completions held back on purpose (the `lose_completions` test knob).
    pub lost: u64,
    /// Completions naming no operation in flight (ignored; the transport logs them).
    pub stray: u64,
}

impl std::ops::AddAssign for OpStats {
    fn add_assign(&mut self, o: OpStats) {
        self.capacity += o.capacity;
        self.allocations += o.allocations;
        self.in_flight += o.in_flight;
        self.abandoned += o.abandoned;
        self.acquired += o.acquired;
        self.completed += o.completed;
        self.timed_out += o.timed_out;
        self.late += o.late;
        self.shut_down += o.shut_down;
        self.lost += o.lost;
        self.stray += o.stray;
    }
}

/// A posted slice and what the slab needs to end it.
struct Pending {
    slice: Slice,
    /// What must outlive the device's use of the operation besides the slice (e.g. the
    /// registration of its local memory); dropped when the slice is.
    keep: Keep,
    /// The connection, marked dead when the slice times out.
    link: Option<Arc<Link>>,
    /// Its completion was read but held back (test knob): it arrives as soon as the
    /// slice has been timed out.
    held: bool,
}

enum Phase {
    Free,
    InFlight(Pending),
    Abandoned(Pending),
}

struct Entry {
    generation: u32,
    phase: Phase,
}

struct State {
    entries: Vec<Entry>,
    /// Indices of free entries; its capacity is the slab's, so pushing never allocates.
    free: Vec<u32>,
    /// Completions still to hold back (test knob).
    lose: u64,
    stats: OpStats,
}

/// One report or release decided under the lock, delivered after it.
struct Outcome {
    report: Option<(CompletionToken, Result<usize, FailReason>)>,
    /// A slice whose memory the device can no longer touch: dropped after the reports.
    release: Option<Pending>,
}

/// Reports and releases gathered under the slab's lock, delivered outside it (the
/// engine's completion handler must not run under a transport lock). A fixed array:
/// no allocation.
pub struct Outcomes {
    items: [Option<Outcome>; OUTCOMES],
    len: usize,
}

impl Outcomes {
    /// Empty.
    pub fn new() -> Self {
        Outcomes {
            items: [const { None }; OUTCOMES],
            len: 0,
        }
    }

    fn is_full(&self) -> bool {
        self.len == OUTCOMES
    }

    fn push(
        &mut self,
        report: Option<(CompletionToken, Result<usize, FailReason>)>,
        release: Option<Pending>,
    ) {
        debug_assert!(!self.is_full());
        if let Some(item) = self.items.get_mut(self.len) {
            *item = Some(Outcome { report, release });
            self.len += 1;
        }
    }

    /// Like [`deliver`](Self::deliver), but a failed slice is first offered to
    /// `redirect` with its reason and what the table kept for it: `Ok(())` means it was
    /// posted again elsewhere (that post reports it), `Err(slice)` hands it back to be
    /// reported as failed. Returns how many were reported.
    pub fn deliver_or(
        &mut self,
        to: &dyn Completions,
        mut redirect: impl FnMut(Slice, FailReason, &Keep) -> Result<(), Slice>,
    ) -> usize {
        let mut reported = 0;
        for item in &mut self.items[..self.len] {
            let Some(Outcome { report, release }) = item.take() else {
                continue;
            };
            match (report, release) {
                (Some((token, Err(reason))), Some(p)) => {
                    let Pending { slice, keep, .. } = p;
                    match redirect(slice, reason, &keep) {
                        Ok(()) => {}
                        Err(slice) => {
                            to.complete(token, Err(reason));
                            reported += 1;
                            drop(slice);
                        }
                    }
                }
                (report, release) => {
                    if let Some((token, result)) = report {
                        to.complete(token, result);
                        reported += 1;
                    }
                    drop(release);
                }
            }
        }
        self.len = 0;
        reported
    }

    /// Reports every outcome to `to`, then drops the released slices; returns how many
    /// were reported.
    pub fn deliver(&mut self, to: &dyn Completions) -> usize {
        self.deliver_or(to, |slice, _, _| Err(slice))
    }
}

impl Default for Outcomes {
    fn default() -> Self {
        Self::new()
    }
}

/// The operations in flight on one device.
pub struct OpTable {
    capacity: usize,
    /// std's mutex (a futex) rather than parking_lot's: a thread's first wait on a
    /// parking_lot lock allocates its parking data, which would put an allocation on
    /// the steady-state path of whichever thread first contends here.
    state: Mutex<State>,
    /// When the earliest deadline of the operations in flight passes (nanoseconds since
    /// `epoch`), or `NEVER` when none is in flight; it may be early (that operation
    /// completed already), never late. Lets the completion thread skip the sweep without
    /// taking the lock. Written only under the lock.
    due_ns: AtomicU64,
    epoch: Instant,
}

impl OpTable {
    /// A table of `capacity` entries (at least one, at most 2^32); the first `lose`
    /// completions it is given are held back until their slice has timed out (0 outside
    /// tests).
    pub fn new(capacity: usize, lose: u64) -> OpTable {
        let capacity = capacity.clamp(1, u32::MAX as usize);
        let entries = (0..capacity)
            .map(|_| Entry {
                generation: 0,
                phase: Phase::Free,
            })
            .collect();
        // Popped from the end: index 0 first.
        let free = (0..capacity as u32).rev().collect();
        OpTable {
            capacity,
            state: Mutex::new(State {
                entries,
                free,
                lose,
                stats: OpStats {
                    capacity,
                    allocations: 1,
                    ..OpStats::default()
                },
            }),
            due_ns: AtomicU64::new(NEVER),
            epoch: Instant::now(),
        }
    }

    /// How many entries the table has.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The bookkeeping. Nothing under the lock panics; were it poisoned anyway, the
    /// state is still consistent between statements, so it is used as is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch)
            .as_nanos()
            .min(u128::from(NEVER - 1)) as u64
    }

    /// Takes a free entry for `slice` and marks it in flight; returns the reference to
    /// hand the device, or the slice back when every entry is in use. `link` is the
    /// connection, marked dead if the slice times out; `keep` is held until
    /// the device gives the operation back.
    pub fn acquire(
        &self,
        slice: Slice,
        link: Option<Arc<Link>>,
        keep: Keep,
    ) -> Result<OpRef, Slice> {
        let deadline = self.nanos(slice.deadline);
        let mut s = self.state();
        let Some(index) = s.free.pop() else {
            return Err(slice);
        };
        s.stats.acquired += 1;
        s.stats.in_flight += 1;
        let entry = &mut s.entries[index as usize];
        entry.phase = Phase::InFlight(Pending {
            slice,
            keep,
            link,
            held: false,
        });
        let op = OpRef {
            index,
            generation: entry.generation,
        };
        self.due_ns.fetch_min(deadline, Ordering::AcqRel);
        Ok(op)
    }

    /// The connection of the operation at entry `index`, while the device holds it (in
    /// flight or abandoned): for naming the peer when the device reports it failed. Takes
    /// the lock; for error paths.
    pub fn link_of(&self, index: u32) -> Option<Arc<Link>> {
        let s = self.state();
        match &s.entries.get(index as usize)?.phase {
            Phase::InFlight(p) | Phase::Abandoned(p) => p.link.clone(),
            Phase::Free => None,
        }
    }

    /// Takes back an operation the device refused (it never held it): its slice, and
    /// whether the deadline sweep reported it already (then the slice has ended, and the
    /// post must count as done). `None` for a stale reference.
    pub fn reclaim(&self, op: OpRef) -> Option<(Slice, bool)> {
        let mut s = self.state();
        let s = &mut *s;
        let entry = s.entries.get_mut(op.index as usize)?;
        if entry.generation != op.generation {
            return None;
        }
        let taken = match std::mem::replace(&mut entry.phase, Phase::Free) {
            Phase::InFlight(p) => {
                s.stats.in_flight -= 1;
                (p.slice, false)
            }
            Phase::Abandoned(p) => {
                s.stats.abandoned -= 1;
                (p.slice, true)
            }
            Phase::Free => return None,
        };
        entry.generation = entry.generation.wrapping_add(1);
        s.free.push(op.index);
        if s.stats.in_flight == 0 {
            self.due_ns.store(NEVER, Ordering::Release);
        }
        Some(taken)
    }

    /// Handles completions read from the device, at most [`OUTCOMES`]: each names its
    /// entry by index, with the generation when the device carries it back (a completion
    /// naming another generation is stray), and says `None` for a success or why the
    /// operation failed. Returns how many completions were stray (named no operation in
    /// flight); the caller logs them.
    pub fn finish(
        &self,
        done: impl IntoIterator<Item = (u32, Option<u32>, Option<FailReason>)>,
        out: &mut Outcomes,
    ) -> usize {
        let mut s = self.state();
        let s = &mut *s;
        let mut stray = 0;
        for (index, generation, error) in done {
            if out.is_full() {
                debug_assert!(false, "more completions than one queue read returns");
                break;
            }
            let Some(entry) = s.entries.get_mut(index as usize) else {
                stray += 1;
                continue;
            };
            if generation.is_some_and(|g| g != entry.generation) {
                stray += 1;
                continue;
            }
            if s.lose > 0 && !matches!(entry.phase, Phase::Free) {
                // Test knob: as if the device never reported it. It arrives late, once
                // the sweep has timed the slice out (now, if that happened already).
                s.lose -= 1;
                s.stats.lost += 1;
                if let Phase::InFlight(p) = &mut entry.phase {
                    p.held = true;
                    continue;
                }
            }
            match std::mem::replace(&mut entry.phase, Phase::Free) {
                Phase::InFlight(p) => {
                    let result = match error {
                        None => Ok(p.slice.len),
                        Some(reason) => Err(reason),
                    };
                    s.stats.in_flight -= 1;
                    s.stats.completed += 1;
                    out.push(Some((p.slice.token, result)), Some(p));
                }
                Phase::Abandoned(p) => {
                    // Reported when it timed out: now the device has let go of it.
                    s.stats.abandoned -= 1;
                    s.stats.late += 1;
                    out.push(None, Some(p));
                }
                Phase::Free => {
                    stray += 1;
                    continue;
                }
            }
            entry.generation = entry.generation.wrapping_add(1);
            s.free.push(index);
        }
        s.stats.stray += stray as u64;
        if s.stats.in_flight == 0 {
            // Nothing left whose deadline could pass (posts lower it under this lock).
            self.due_ns.store(NEVER, Ordering::Release);
        }
        stray
    }

    /// Whether a deadline of an operation in flight may have passed by `now` (cheap: no
    /// lock).
    pub fn due(&self, now: Instant) -> bool {
        self.due_ns.load(Ordering::Acquire) <= self.nanos(now)
    }

    /// Whether any operation is in flight (not yet reported).
    pub fn busy(&self) -> bool {
        self.due_ns.load(Ordering::Acquire) != NEVER
    }

    /// Ends the operations in flight whose deadline passed by `now`: each is reported
    /// `TimedOut` and its connection marked dead; the entry stays with the device.
    /// Returns true when `out` filled up before the scan ended (call again after
    /// delivering).
    pub fn expire(&self, now: Instant, out: &mut Outcomes) -> bool {
        self.expire_with(now, out, |_| {})
    }

    /// [`expire`](Self::expire), calling `stop` with what each expired operation keeps
    /// before its report is queued (under the table's lock: keep it short), so the
    /// transport can stop the device from touching the slice's memory (fail its queue
    /// pair) before the task is told it ended.
    pub fn expire_with(
        &self,
        now: Instant,
        out: &mut Outcomes,
        mut stop: impl FnMut(&Keep),
    ) -> bool {
        let now_ns = self.nanos(now);
        let mut s = self.state();
        let s = &mut *s;
        let mut earliest = NEVER;
        let mut more = false;
        for (index, entry) in s.entries.iter_mut().enumerate() {
            let Phase::InFlight(p) = &entry.phase else {
                continue;
            };
            let deadline = self.nanos(p.slice.deadline);
            if deadline > now_ns {
                earliest = earliest.min(deadline);
                continue;
            }
            if out.is_full() {
                more = true;
                break;
            }
            let Phase::InFlight(p) = std::mem::replace(&mut entry.phase, Phase::Free) else {
                continue;
            };
            if let Some(link) = &p.link {
                link.kill();
            }
            stop(&p.keep);
            s.stats.in_flight -= 1;
            s.stats.timed_out += 1;
            let report = Some((p.slice.token, Err(FailReason::TimedOut)));
            if p.held {
                // The held-back completion arrives now: late, so not reported again.
                s.stats.late += 1;
                out.push(report, Some(p));
                entry.generation = entry.generation.wrapping_add(1);
                s.free.push(index as u32);
            } else {
                out.push(report, None);
                entry.phase = Phase::Abandoned(p);
                s.stats.abandoned += 1;
            }
        }
        // Posts lower it under this lock, so nothing is lost by storing it here; with
        // entries left unscanned the sweep stays due.
        self.due_ns
            .store(if more { 0 } else { earliest }, Ordering::Release);
        more
    }

    /// After the device is closed (it holds no operation any more): reports
    /// every operation still in flight `Shutdown` and frees every entry. Returns true
    /// when `out` filled up first (call again after delivering).
    pub fn close(&self, out: &mut Outcomes) -> bool {
        let mut s = self.state();
        let s = &mut *s;
        for (index, entry) in s.entries.iter_mut().enumerate() {
            if matches!(entry.phase, Phase::Free) {
                continue;
            }
            if out.is_full() {
                return true;
            }
            match std::mem::replace(&mut entry.phase, Phase::Free) {
                Phase::InFlight(p) => {
                    s.stats.in_flight -= 1;
                    s.stats.shut_down += 1;
                    out.push(Some((p.slice.token, Err(FailReason::Shutdown))), Some(p));
                }
                Phase::Abandoned(p) => {
                    s.stats.abandoned -= 1;
                    out.push(None, Some(p));
                }
                Phase::Free => {}
            }
            entry.generation = entry.generation.wrapping_add(1);
            s.free.push(index as u32);
        }
        self.due_ns.store(NEVER, Ordering::Release);
        false
    }

    /// Operations in flight whose completion the device may still deliver (not timed
    /// out, not held back by the test knob).
    pub fn awaiting(&self) -> usize {
        self.state()
            .entries
            .iter()
            .filter(|e| matches!(&e.phase, Phase::InFlight(p) if !p.held))
            .count()
    }

    /// The table's counters.
    pub fn stats(&self) -> OpStats {
        self.state().stats
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::{Location, Opcode, RegionMemory, RemoteKeys};

    #[derive(Default)]
    struct Record(Mutex<HashMap<u32, Vec<Result<usize, FailReason>>>>);

    impl Completions for Record {
        fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
            self.0
                .lock()
                .unwrap()
                .entry(token.task)
                .or_default()
                .push(result);
        }
    }

    impl Record {
        fn of(&self, task: u32) -> Vec<Result<usize, FailReason>> {
            self.0
                .lock()
                .unwrap()
                .get(&task)
                .cloned()
                .unwrap_or_default()
        }
    }

    #[allow(unsafe_code)]
    fn region() -> Arc<RegionMemory> {
        let mut bytes = vec![0u8; 4096].into_boxed_slice();
        let ptr = std::ptr::NonNull::new(bytes.as_mut_ptr()).unwrap();
        // SAFETY: the boxed bytes move into the region as its owner: they live, at a
        // fixed address, as long as the region, and nothing else refers to them.
        Arc::new(unsafe { RegionMemory::from_raw(ptr, 4096, Location::host(), Box::new(bytes)) })
    }

    fn slice(task: u32, deadline: Instant) -> Slice {
        Slice {
            op: Opcode::Write,
            local: region(),
            local_offset: 0,
            remote_addr: 0,
            remote_base: 0,
            remote_keys: RemoteKeys::single(1),
            len: 100 + task as usize,
            token: CompletionToken {
                slot: 0,
                generation: 0,
                task,
            },
            deadline,
        }
    }

    const DEVICE_ERROR: FailReason = FailReason::Device {
        transport: crate::Protocol::Rdma,
        code: 5,
    };

    fn finish_one(t: &OpTable, op: OpRef, error: Option<FailReason>, to: &Record) -> usize {
        let mut out = Outcomes::new();
        let stray = t.finish([(op.index, Some(op.generation), error)], &mut out);
        out.deliver(to);
        stray
    }

    fn expire(t: &OpTable, now: Instant, to: &Record) {
        let mut out = Outcomes::new();
        while t.expire(now, &mut out) {
            out.deliver(to);
        }
        out.deliver(to);
    }

    #[test]
    fn words_round_trip() {
        let op = OpRef {
            index: 7,
            generation: u32::MAX,
        };
        assert_eq!(OpRef::from_word(op.to_word()), op);
    }

    #[test]
    fn a_completion_reports_once_and_frees_the_entry() {
        let t = OpTable::new(2, 0);
        let rec = Record::default();
        let later = Instant::now() + Duration::from_secs(60);
        let a = t.acquire(slice(1, later), None, [None, None]).unwrap();
        let b = t.acquire(slice(2, later), None, [None, None]).unwrap();
        assert_ne!(a, b);
        assert!(
            t.acquire(slice(3, later), None, [None, None]).is_err(),
            "full"
        );
        assert!(t.busy());
        assert_eq!(finish_one(&t, a, None, &rec), 0);
        assert_eq!(finish_one(&t, b, Some(DEVICE_ERROR), &rec), 0);
        assert!(!t.busy(), "nothing left to sweep");
        // A duplicate completion (the old generation) changes nothing.
        assert_eq!(finish_one(&t, a, None, &rec), 1);
        assert_eq!(rec.of(1), vec![Ok(101)]);
        assert_eq!(rec.of(2), vec![Err(DEVICE_ERROR)]);
        let st = t.stats();
        assert_eq!((st.in_flight, st.completed, st.stray), (0, 2, 1));
        // The same entries serve the next operations, with a new generation.
        let c = t.acquire(slice(4, later), None, [None, None]).unwrap();
        assert!(c.index == a.index || c.index == b.index);
        assert_ne!(c, a);
        assert_ne!(c, b);
        assert_eq!(t.stats().allocations, 1);
    }

    #[test]
    fn foreign_and_stale_references_are_ignored() {
        let t = OpTable::new(2, 0);
        let rec = Record::default();
        let mut out = Outcomes::new();
        assert_eq!(t.finish([(9, None, None)], &mut out), 1, "out of range");
        let a = t
            .acquire(
                slice(1, Instant::now() + Duration::from_secs(60)),
                None,
                [None, None],
            )
            .unwrap();
        let stale = OpRef {
            generation: a.generation.wrapping_add(1),
            ..a
        };
        assert_eq!(finish_one(&t, stale, None, &rec), 1, "another generation");
        assert!(rec.0.lock().unwrap().is_empty());
        assert_eq!(t.stats().in_flight, 1);
        assert_eq!(finish_one(&t, a, None, &rec), 0);
        assert_eq!(rec.of(1), vec![Ok(101)]);
    }

    #[test]
    fn a_slice_past_its_deadline_times_out_once_and_its_late_completion_is_ignored() {
        let t = OpTable::new(4, 0);
        let rec = Record::default();
        let now = Instant::now();
        let link = Link::new("peer");
        let kept = Arc::new(());
        let late = t
            .acquire(
                slice(1, now + Duration::from_secs(1)),
                Some(link.clone()),
                [Some(kept.clone()), None],
            )
            .unwrap();
        let fine = t
            .acquire(slice(2, now + Duration::from_secs(60)), None, [None, None])
            .unwrap();
        assert!(!t.due(now));
        assert!(t.due(now + Duration::from_secs(2)));
        expire(&t, now + Duration::from_secs(2), &rec);
        expire(&t, now + Duration::from_secs(3), &rec);
        assert_eq!(rec.of(1), vec![Err(FailReason::TimedOut)]);
        assert!(!link.is_alive(), "the connection is marked dead");
        assert_eq!(
            Arc::strong_count(&kept),
            2,
            "kept while the device may use it"
        );
        let st = t.stats();
        assert_eq!((st.in_flight, st.abandoned, st.timed_out), (1, 1, 1));
        // Its connection is still named while the device holds the operation; the
        // entry without a connection names none.
        assert_eq!(
            t.link_of(late.index).map(|l| l.peer().to_string()),
            Some("peer".into())
        );
        assert!(t.link_of(fine.index).is_none());
        // The abandoned entry is not handed out again while the device holds it.
        let c = t
            .acquire(slice(3, now + Duration::from_secs(60)), None, [None, None])
            .unwrap();
        let d = t
            .acquire(slice(4, now + Duration::from_secs(60)), None, [None, None])
            .unwrap();
        for x in [c, d] {
            assert!(x.index != late.index && x.index != fine.index);
        }
        assert!(t.acquire(slice(5, now), None, [None, None]).is_err());
        finish_one(&t, late, None, &rec);
        finish_one(&t, fine, None, &rec);
        assert_eq!(rec.of(1), vec![Err(FailReason::TimedOut)], "reported once");
        assert!(
            t.link_of(late.index).is_none(),
            "a free entry names no connection"
        );
        assert_eq!(rec.of(2), vec![Ok(102)]);
        assert_eq!(
            Arc::strong_count(&kept),
            1,
            "released with the late completion"
        );
        let st = t.stats();
        assert_eq!((st.abandoned, st.late, st.in_flight), (0, 1, 2));
    }

    #[test]
    fn close_reports_in_flight_operations_shutdown_and_frees_everything() {
        let t = OpTable::new(OUTCOMES * 2 + 3, 0);
        let rec = Record::default();
        let now = Instant::now();
        let n = OUTCOMES as u32 * 2 + 3;
        for task in 0..n {
            let deadline = now + Duration::from_secs(if task == 0 { 1 } else { 60 });
            t.acquire(slice(task, deadline), None, [None, None])
                .unwrap();
        }
        expire(&t, now + Duration::from_secs(2), &rec);
        let mut out = Outcomes::new();
        while t.close(&mut out) {
            out.deliver(&rec);
        }
        out.deliver(&rec);
        assert_eq!(rec.of(0), vec![Err(FailReason::TimedOut)]);
        for task in 1..n {
            assert_eq!(rec.of(task), vec![Err(FailReason::Shutdown)], "task {task}");
        }
        let st = t.stats();
        assert_eq!(
            (st.in_flight, st.abandoned, st.shut_down),
            (0, 0, n as u64 - 1)
        );
        assert!(!t.busy());
    }

    #[test]
    fn a_refused_post_is_taken_back_unless_already_timed_out() {
        let t = OpTable::new(2, 0);
        let rec = Record::default();
        let now = Instant::now();
        let op = t
            .acquire(slice(1, now + Duration::from_secs(60)), None, [None, None])
            .unwrap();
        assert!(matches!(t.reclaim(op), Some((_, false))), "returned");
        assert!(t.reclaim(op).is_none(), "a stale reference changes nothing");
        let op = t
            .acquire(slice(2, now + Duration::from_secs(1)), None, [None, None])
            .unwrap();
        expire(&t, now + Duration::from_secs(2), &rec);
        assert!(
            matches!(t.reclaim(op), Some((_, true))),
            "reported by the sweep: not again"
        );
        assert_eq!(rec.of(2), vec![Err(FailReason::TimedOut)]);
        let st = t.stats();
        assert_eq!((st.in_flight, st.abandoned), (0, 0));
        assert!(rec.of(1).is_empty());
    }

    #[test]
    fn a_held_back_completion_arrives_after_the_timeout() {
        let t = OpTable::new(2, 1);
        let rec = Record::default();
        let now = Instant::now();
        let a = t
            .acquire(slice(1, now + Duration::from_secs(1)), None, [None, None])
            .unwrap();
        let b = t
            .acquire(slice(2, now + Duration::from_secs(1)), None, [None, None])
            .unwrap();
        finish_one(&t, a, None, &rec);
        finish_one(&t, b, None, &rec);
        assert!(rec.of(1).is_empty(), "held back");
        assert_eq!(rec.of(2), vec![Ok(102)]);
        expire(&t, now + Duration::from_secs(2), &rec);
        assert_eq!(rec.of(1), vec![Err(FailReason::TimedOut)]);
        let st = t.stats();
        assert_eq!((st.lost, st.late, st.in_flight, st.abandoned), (1, 1, 0, 0));
    }

    /// The transport is told what each expired operation keeps, before its report is
    /// delivered, so it can stop the device first.
    #[test]
    fn expiry_hands_the_kept_handles_over_before_the_report() {
        let t = OpTable::new(2, 0);
        let rec = Record::default();
        let now = Instant::now();
        let qp: Arc<dyn Any + Send + Sync> = Arc::new(7u32);
        t.acquire(
            slice(1, now + Duration::from_secs(1)),
            None,
            [Some(qp.clone()), None],
        )
        .unwrap();
        t.acquire(slice(2, now + Duration::from_secs(60)), None, [None, None])
            .unwrap();
        let mut stopped = Vec::new();
        let mut out = Outcomes::new();
        t.expire_with(now + Duration::from_secs(2), &mut out, |keep| {
            stopped.push(
                keep[0]
                    .as_ref()
                    .and_then(|k| k.downcast_ref::<u32>().copied()),
            );
        });
        assert_eq!(stopped, [Some(7)], "only the expired one, with its handle");
        assert!(
            rec.of(1).is_empty(),
            "not reported before the hook ran and out is delivered"
        );
        out.deliver(&rec);
        assert_eq!(rec.of(1), vec![Err(FailReason::TimedOut)]);
    }
}
