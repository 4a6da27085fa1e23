//! The operation contexts of one rail: a slab allocated when the rail opens, whose
//! entries carry a posted slice from its post until the provider gives it back.
//!
//! An entry has two parts. Its `fi_context` is memory libfabric may use while the
//! operation is in flight (`FI_CONTEXT` mode): it is allocated once, never moves, and its
//! address is how a completion names the operation. Its bookkeeping (the slice, the
//! generation, the phase) lives under one lock, so the threads that read the completion
//! queue, the deadline sweep and a poster taking back an operation the provider refused
//! never race on it.
//!
//! An entry's life:
//! - `Free` → `InFlight` when a slice is posted;
//! - `InFlight` → `Free` when its completion is read: the slice is reported;
//! - `InFlight` → `Abandoned` when its deadline passes first: reported `TimedOut` there
//!   and then, its connection marked dead. The provider may still own the context and
//!   move bytes into the local buffer, so the slice (and the `Arc<RegionMemory>` in it)
//!   is kept;
//! - `Abandoned` → `Free` when the late completion arrives (not reported again) or the
//!   endpoint is closed;
//! - on close, after the endpoint is closed, `InFlight` entries are reported `Shutdown`
//!   and every entry is freed.
//!
//! So a slice is reported exactly once, and a context is reused only once the provider
//! can no longer touch it. Nothing is allocated per operation: the reports gathered under
//! the lock are delivered after it from a fixed array on the stack.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ferry_transport_api::{CompletionToken, Completions, FailReason, Slice};
use libfabric_sys as fi;

/// Most reports gathered under the lock before they are delivered (one completion
/// queue read at most).
pub(crate) const OUTCOMES: usize = 64;

/// No deadline is due (`due_ns`).
const NEVER: u64 = u64::MAX;

/// Names one use of an entry: the index and the generation it had when acquired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OpRef {
    index: u32,
    generation: u32,
}

/// Counters of one slab (or of every rail's, summed), for tests and diagnostics.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Contexts allocated (all of them when the rail opened).
    pub capacity: usize,
    /// Slab allocations since the rail opened (one per rail: never one per operation).
    pub allocations: u64,
    /// Operations posted and not yet reported.
    pub in_flight: usize,
    /// Operations reported (timed out) whose context the provider has not given back.
    pub abandoned: usize,
    /// Operations acquired a context.
    pub acquired: u64,
    /// Operations reported from their completion (success or fabric error).
    pub completed: u64,
    /// Operations reported `TimedOut` by the deadline sweep.
    pub timed_out: u64,
    /// Completions that arrived for an operation already reported, and were ignored.
    pub late: u64,
    /// Operations reported `Shutdown` when the endpoint closed.
    pub shut_down: u64,
    /// Completions held back on purpose (the `lose_completions` test knob).
    pub lost: u64,
    /// Completions naming no operation in flight (ignored).
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
    /// The connection's health flag, cleared when the slice times out.
    alive: Option<Arc<AtomicBool>>,
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
    /// A slice whose memory the provider can no longer touch: dropped after the reports.
    release: Option<Slice>,
}

/// Reports and releases gathered under the slab's lock, delivered outside it (the
/// engine's completion handler must not run under a transport lock). A fixed array:
/// no allocation.
pub(crate) struct Outcomes {
    items: [Option<Outcome>; OUTCOMES],
    len: usize,
}

impl Outcomes {
    pub(crate) fn new() -> Self {
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
        release: Option<Slice>,
    ) {
        debug_assert!(!self.is_full());
        if let Some(item) = self.items.get_mut(self.len) {
            *item = Some(Outcome { report, release });
            self.len += 1;
        }
    }

    /// Reports every outcome to `to`, then drops the released slices; returns how many
    /// were reported.
    pub(crate) fn deliver(&mut self, to: &dyn Completions) -> usize {
        let mut reported = 0;
        for item in &mut self.items[..self.len] {
            if let Some(Outcome { report, release }) = item.take() {
                if let Some((token, result)) = report {
                    to.complete(token, result);
                    reported += 1;
                }
                drop(release);
            }
        }
        self.len = 0;
        reported
    }
}

/// The operation contexts of one rail.
pub(crate) struct OpSlab {
    /// `capacity` contexts from one leaked `Box<[fi_context]>`, freed in `Drop`. Written by
    /// the slab only while their entry is `Free` (under the lock), by the provider
    /// only while it is not; never read by ferry.
    contexts: NonNull<fi::fi_context>,
    capacity: usize,
    /// std's mutex (a futex) rather than parking_lot's: a thread's first wait on a
    /// parking_lot lock allocates its parking data, which would put an allocation on
    /// the steady-state path of whichever thread first contends here.
    state: Mutex<State>,
    /// When the earliest deadline of the operations in flight passes (nanoseconds since
    /// `epoch`), or `NEVER` when none is in flight; it may be early (that operation
    /// completed already), never late. Lets the progress thread skip the sweep without
    /// taking the lock. Written only under the lock.
    due_ns: AtomicU64,
    epoch: Instant,
}

// SAFETY: the contexts are plain memory handed to the provider by address; the slab
// writes one only under `state`'s lock while its entry is Free (the provider does not
// hold it then) and never reads them. Everything else is behind the lock or atomic.
unsafe impl Send for OpSlab {}
// SAFETY: as above.
unsafe impl Sync for OpSlab {}

impl Drop for OpSlab {
    fn drop(&mut self) {
        // SAFETY: `contexts` came from Box::leak of a boxed slice of `capacity`
        // contexts and is freed once; the slab is dropped with its device, after the
        // endpoint is closed, so the provider holds none of them.
        drop(unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.contexts.as_ptr(),
                self.capacity,
            ))
        });
    }
}

impl OpSlab {
    /// A slab of `capacity` contexts (at least one); the first `lose` completions it is
    /// given are held back until their slice has timed out (0 outside tests).
    pub(crate) fn new(capacity: usize, lose: u64) -> OpSlab {
        let capacity = capacity.clamp(1, u32::MAX as usize);
        let contexts: Box<[fi::fi_context]> =
            (0..capacity).map(|_| fi::fi_context::default()).collect();
        let contexts = NonNull::from(Box::leak(contexts)).cast::<fi::fi_context>();
        let entries = (0..capacity)
            .map(|_| Entry {
                generation: 0,
                phase: Phase::Free,
            })
            .collect();
        // Popped from the end: index 0 first.
        let free = (0..capacity as u32).rev().collect();
        OpSlab {
            contexts,
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

    /// The bookkeeping. Nothing under the lock panics; were it poisoned anyway, the
    /// state is still consistent between statements, so it is used as is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn context(&self, index: u32) -> *mut c_void {
        debug_assert!((index as usize) < self.capacity);
        // SAFETY: index < capacity, so the result stays inside the contexts allocation.
        unsafe { self.contexts.as_ptr().add(index as usize) }.cast()
    }

    /// The entry whose context is at `ctx`, if it is one of this slab's: a completion's
    /// context is checked by address, never dereferenced.
    fn index_of(&self, ctx: *mut c_void) -> Option<u32> {
        let size = std::mem::size_of::<fi::fi_context>();
        let offset = (ctx as usize).checked_sub(self.contexts.as_ptr() as usize)?;
        let index = offset / size;
        (offset % size == 0 && index < self.capacity).then_some(index as u32)
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch)
            .as_nanos()
            .min(u128::from(NEVER - 1)) as u64
    }

    /// Takes a free context for `slice` and marks it in flight; returns the context to
    /// pass to libfabric, or the slice back when every context is in use.
    pub(crate) fn acquire(
        &self,
        slice: Slice,
        alive: Option<Arc<AtomicBool>>,
    ) -> Result<(OpRef, *mut c_void), Slice> {
        let deadline = self.nanos(slice.deadline);
        let mut s = self.state();
        let Some(index) = s.free.pop() else {
            return Err(slice);
        };
        let ctx = self.context(index);
        // SAFETY: the entry was Free, so the provider does not hold this context; it is
        // in bounds and aligned (an element of the contexts allocation).
        unsafe {
            ctx.cast::<fi::fi_context>()
                .write(fi::fi_context::default())
        };
        s.stats.acquired += 1;
        s.stats.in_flight += 1;
        let entry = &mut s.entries[index as usize];
        entry.phase = Phase::InFlight(Pending {
            slice,
            alive,
            held: false,
        });
        let op = OpRef {
            index,
            generation: entry.generation,
        };
        self.due_ns.fetch_min(deadline, Ordering::AcqRel);
        Ok((op, ctx))
    }

    /// Takes back an operation the provider refused (it never held the context): its
    /// slice, and whether the deadline sweep reported it already (then the slice has
    /// ended, and the post must count as done). `None` for a stale reference.
    pub(crate) fn reclaim(&self, op: OpRef) -> Option<(Slice, bool)> {
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

    /// Handles completions read from the queue: `(context, None)` for a success,
    /// `(context, Some(code))` for a fabric error. At most [`OUTCOMES`].
    pub(crate) fn finish(
        &self,
        done: impl IntoIterator<Item = (*mut c_void, Option<i32>)>,
        out: &mut Outcomes,
    ) {
        let mut s = self.state();
        let s = &mut *s;
        for (ctx, error) in done {
            if out.is_full() {
                debug_assert!(false, "more completions than one queue read returns");
                break;
            }
            let Some(index) = self.index_of(ctx) else {
                s.stats.stray += 1;
                tracing::warn!("a libfabric completion names no ferry operation; ignored");
                continue;
            };
            let entry = &mut s.entries[index as usize];
            if s.lose > 0 && !matches!(entry.phase, Phase::Free) {
                // Test knob: as if the provider never reported it. It arrives late, once
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
                        Some(code) => Err(crate::fabric_error(code)),
                    };
                    s.stats.in_flight -= 1;
                    s.stats.completed += 1;
                    out.push(Some((p.slice.token, result)), Some(p.slice));
                }
                Phase::Abandoned(p) => {
                    // Reported when it timed out: now the provider has let go of it.
                    s.stats.abandoned -= 1;
                    s.stats.late += 1;
                    out.push(None, Some(p.slice));
                }
                Phase::Free => {
                    s.stats.stray += 1;
                    tracing::warn!(
                        "a libfabric completion names a free operation context; ignored"
                    );
                    continue;
                }
            }
            entry.generation = entry.generation.wrapping_add(1);
            s.free.push(index);
        }
        if s.stats.in_flight == 0 {
            // Nothing left whose deadline could pass (posts lower it under this lock).
            self.due_ns.store(NEVER, Ordering::Release);
        }
    }

    /// Whether a deadline of an operation in flight may have passed by `now` (cheap: no
    /// lock).
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.due_ns.load(Ordering::Acquire) <= self.nanos(now)
    }

    /// Whether any operation is in flight (not yet reported).
    pub(crate) fn busy(&self) -> bool {
        self.due_ns.load(Ordering::Acquire) != NEVER
    }

    /// Ends the operations in flight whose deadline passed by `now`: each is reported
    /// `TimedOut` and its connection marked dead; the context stays with the provider.
    /// Returns true when `out` filled up before the scan ended (call again after
    /// delivering).
    pub(crate) fn expire(&self, now: Instant, out: &mut Outcomes) -> bool {
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
            if let Some(alive) = &p.alive {
                alive.store(false, Ordering::Release);
            }
            s.stats.in_flight -= 1;
            s.stats.timed_out += 1;
            let report = Some((p.slice.token, Err(FailReason::TimedOut)));
            if p.held {
                // The held-back completion arrives now: late, so not reported again.
                s.stats.late += 1;
                out.push(report, Some(p.slice));
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

    /// After the endpoint is closed (the provider holds no context any more): reports
    /// every operation still in flight `Shutdown` and frees every entry. Returns true
    /// when `out` filled up first (call again after delivering).
    pub(crate) fn close(&self, out: &mut Outcomes) -> bool {
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
                    out.push(
                        Some((p.slice.token, Err(FailReason::Shutdown))),
                        Some(p.slice),
                    );
                }
                Phase::Abandoned(p) => {
                    s.stats.abandoned -= 1;
                    out.push(None, Some(p.slice));
                }
                Phase::Free => {}
            }
            entry.generation = entry.generation.wrapping_add(1);
            s.free.push(index as u32);
        }
        self.due_ns.store(NEVER, Ordering::Release);
        false
    }

    /// Operations in flight whose completion the provider may still deliver (not timed
    /// out, not held back by the test knob).
    pub(crate) fn awaiting(&self) -> usize {
        self.state()
            .entries
            .iter()
            .filter(|e| matches!(&e.phase, Phase::InFlight(p) if !p.held))
            .count()
    }

    pub(crate) fn stats(&self) -> OpStats {
        self.state().stats
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use ferry_transport_api::{Opcode, RemoteKeys};

    use super::*;

    #[derive(Default)]
    struct Record(parking_lot::Mutex<HashMap<u32, Vec<Result<usize, FailReason>>>>);

    impl Completions for Record {
        fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
            self.0.lock().entry(token.task).or_default().push(result);
        }
    }

    impl Record {
        fn of(&self, task: u32) -> Vec<Result<usize, FailReason>> {
            self.0.lock().get(&task).cloned().unwrap_or_default()
        }
    }

    fn slice(task: u32, deadline: Instant) -> Slice {
        let local = crate::rma_loop::region(4096);
        Slice {
            op: Opcode::Write,
            local,
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

    fn finish_one(slab: &OpSlab, ctx: *mut c_void, error: Option<i32>, to: &Record) {
        let mut out = Outcomes::new();
        slab.finish([(ctx, error)], &mut out);
        out.deliver(to);
    }

    fn expire(slab: &OpSlab, now: Instant, to: &Record) {
        let mut out = Outcomes::new();
        while slab.expire(now, &mut out) {
            out.deliver(to);
        }
        out.deliver(to);
    }

    #[test]
    fn a_completion_reports_once_and_frees_the_context() {
        let slab = OpSlab::new(2, 0);
        let rec = Record::default();
        let later = Instant::now() + Duration::from_secs(60);
        let (_, a) = slab.acquire(slice(1, later), None).unwrap();
        let (_, b) = slab.acquire(slice(2, later), None).unwrap();
        assert_ne!(a, b);
        assert!(slab.acquire(slice(3, later), None).is_err(), "slab is full");
        assert!(slab.busy());
        finish_one(&slab, a, None, &rec);
        finish_one(&slab, b, Some(5), &rec);
        assert!(!slab.busy(), "nothing left to sweep");
        // A duplicate completion for a freed context changes nothing.
        finish_one(&slab, a, None, &rec);
        assert_eq!(rec.of(1), vec![Ok(101)]);
        assert_eq!(rec.of(2), vec![Err(crate::fabric_error(5))]);
        let st = slab.stats();
        assert_eq!((st.in_flight, st.completed, st.stray), (0, 2, 1));
        // The same contexts serve the next operations.
        let (_, c) = slab.acquire(slice(4, later), None).unwrap();
        assert!(c == a || c == b);
        assert_eq!(slab.stats().allocations, 1);
    }

    #[test]
    fn a_foreign_context_is_ignored() {
        let slab = OpSlab::new(2, 0);
        let rec = Record::default();
        let mut other = fi::fi_context::default();
        finish_one(
            &slab,
            (&mut other as *mut fi::fi_context).cast(),
            None,
            &rec,
        );
        let (_, a) = slab
            .acquire(slice(1, Instant::now() + Duration::from_secs(60)), None)
            .unwrap();
        // Inside the slab but not at an entry's start.
        finish_one(&slab, a.cast::<u8>().wrapping_add(8).cast(), None, &rec);
        assert_eq!(slab.stats().stray, 2);
        assert!(rec.0.lock().is_empty());
    }

    #[test]
    fn a_slice_past_its_deadline_times_out_once_and_its_late_completion_is_ignored() {
        let slab = OpSlab::new(4, 0);
        let rec = Record::default();
        let now = Instant::now();
        let alive = Arc::new(AtomicBool::new(true));
        let (_, late) = slab
            .acquire(slice(1, now + Duration::from_secs(1)), Some(alive.clone()))
            .unwrap();
        let (_, fine) = slab
            .acquire(slice(2, now + Duration::from_secs(60)), None)
            .unwrap();
        assert!(!slab.due(now));
        assert!(slab.due(now + Duration::from_secs(2)));
        expire(&slab, now + Duration::from_secs(2), &rec);
        expire(&slab, now + Duration::from_secs(3), &rec);
        assert_eq!(rec.of(1), vec![Err(FailReason::TimedOut)]);
        assert!(
            !alive.load(Ordering::Acquire),
            "the connection is marked dead"
        );
        let st = slab.stats();
        assert_eq!((st.in_flight, st.abandoned, st.timed_out), (1, 1, 1));
        // The abandoned context is not handed out again while the provider holds it.
        let (_, c) = slab
            .acquire(slice(3, now + Duration::from_secs(60)), None)
            .unwrap();
        let (_, d) = slab
            .acquire(slice(4, now + Duration::from_secs(60)), None)
            .unwrap();
        assert!(![c, d].contains(&late) && ![c, d].contains(&fine));
        assert!(slab.acquire(slice(5, now), None).is_err());
        finish_one(&slab, late, None, &rec);
        finish_one(&slab, fine, None, &rec);
        assert_eq!(rec.of(1), vec![Err(FailReason::TimedOut)], "reported once");
        assert_eq!(rec.of(2), vec![Ok(102)]);
        let st = slab.stats();
        assert_eq!((st.abandoned, st.late, st.in_flight), (0, 1, 2));
    }

    #[test]
    fn close_reports_in_flight_operations_shutdown_and_frees_everything() {
        let slab = OpSlab::new(OUTCOMES * 2 + 3, 0);
        let rec = Record::default();
        let now = Instant::now();
        let n = OUTCOMES as u32 * 2 + 3;
        for task in 0..n {
            let deadline = now + Duration::from_secs(if task == 0 { 1 } else { 60 });
            slab.acquire(slice(task, deadline), None).unwrap();
        }
        expire(&slab, now + Duration::from_secs(2), &rec);
        let mut out = Outcomes::new();
        while slab.close(&mut out) {
            out.deliver(&rec);
        }
        out.deliver(&rec);
        assert_eq!(rec.of(0), vec![Err(FailReason::TimedOut)]);
        for task in 1..n {
            assert_eq!(rec.of(task), vec![Err(FailReason::Shutdown)], "task {task}");
        }
        let st = slab.stats();
        assert_eq!(
            (st.in_flight, st.abandoned, st.shut_down),
            (0, 0, n as u64 - 1)
        );
        assert!(!slab.busy());
    }

    #[test]
    fn a_refused_post_is_taken_back_unless_already_timed_out() {
        let slab = OpSlab::new(2, 0);
        let rec = Record::default();
        let now = Instant::now();
        let (op, _) = slab
            .acquire(slice(1, now + Duration::from_secs(60)), None)
            .unwrap();
        assert!(
            matches!(slab.reclaim(op), Some((_, false))),
            "not reported: returned"
        );
        assert!(
            slab.reclaim(op).is_none(),
            "a stale reference changes nothing"
        );
        let (op, _) = slab
            .acquire(slice(2, now + Duration::from_secs(1)), None)
            .unwrap();
        expire(&slab, now + Duration::from_secs(2), &rec);
        assert!(
            matches!(slab.reclaim(op), Some((_, true))),
            "reported by the sweep: not again"
        );
        assert_eq!(rec.of(2), vec![Err(FailReason::TimedOut)]);
        let st = slab.stats();
        assert_eq!((st.in_flight, st.abandoned), (0, 0));
        assert!(rec.of(1).is_empty());
    }

    #[test]
    fn a_held_back_completion_arrives_after_the_timeout() {
        let slab = OpSlab::new(2, 1);
        let rec = Record::default();
        let now = Instant::now();
        let (_, a) = slab
            .acquire(slice(1, now + Duration::from_secs(1)), None)
            .unwrap();
        let (_, b) = slab
            .acquire(slice(2, now + Duration::from_secs(1)), None)
            .unwrap();
        finish_one(&slab, a, None, &rec);
        finish_one(&slab, b, None, &rec);
        assert!(rec.of(1).is_empty(), "held back");
        assert_eq!(rec.of(2), vec![Ok(102)]);
        expire(&slab, now + Duration::from_secs(2), &rec);
        assert_eq!(rec.of(1), vec![Err(FailReason::TimedOut)]);
        let st = slab.stats();
        assert_eq!((st.lost, st.late, st.in_flight, st.abandoned), (1, 1, 0, 0));
    }
}
