//! The slot table: every batch's tasks, their accounting, their retry and their
//! deadline. Completions arrive here from any transport thread; a retry over the peer's
//! fallback is posted by a thread of the table's own (see [`Retries`]).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use ferry_transport_api::sync::{EndGate, Landed};
use ferry_transport_api::{
    CompletionToken, Completions, FailReason, Opcode, RegionMemory, RemoteKeys, Slice,
};
use parking_lot::{Mutex, RwLock};

use crate::peer::{Leg, Path, PeerInner, PeerStats};
use crate::{Error, Result};

/// A waiter parked on a batch is woken when this many bytes are left, so it is running
/// (spinning) when the last slice lands instead of paying a cross-core wake-up after it.
/// Only where waiters may spin (`busy_poll` above zero): with zero, a waiter is woken
/// once, when the batch ends.
pub(super) const EARLY_WAKE_BYTES: u64 = 512 * 1024;

const PENDING: u8 = 0;
const DONE: u8 = 1;
const FAILED: u8 = 2;
const TIMED_OUT: u8 = 3;

/// Where one task stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskStatus {
    /// Slices are still out.
    Pending,
    /// Every byte arrived (for a WRITE: acknowledged by the target).
    Completed,
    /// The task ended without completing.
    Failed(FailReason),
    /// The batch's deadline passed first.
    TimedOut,
}

/// Counts of a batch's tasks by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Tasks in the batch.
    pub total: usize,
    /// Completed tasks.
    pub completed: usize,
    /// Failed tasks.
    pub failed: usize,
    /// Tasks whose deadline passed.
    pub timed_out: usize,
    /// Tasks still under way.
    pub pending: usize,
}

impl Progress {
    /// Whether every task has ended, one way or another.
    pub fn is_done(&self) -> bool {
        self.pending == 0
    }
}

/// A batch's identity: slot and generation. Plain data, safe to keep; asking about a
/// released batch is an [`Error::StaleBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchId {
    pub(super) slot: u32,
    pub(super) generation: u32,
}

impl BatchId {
    /// The id as one nonzero integer (generation and slot, plus one), for a language
    /// binding that hands ids out as numbers.
    pub fn to_u64(self) -> u64 {
        ((u64::from(self.generation) << 32) | u64::from(self.slot)).wrapping_add(1)
    }

    /// The id [`to_u64`](Self::to_u64) made; `None` for 0. Any other number is an id, live
    /// or not: asking about one that names no live batch is an [`Error::StaleBatch`].
    pub fn from_u64(bits: u64) -> Option<Self> {
        let bits = bits.checked_sub(1)?;
        Some(BatchId {
            slot: bits as u32,
            generation: (bits >> 32) as u32,
        })
    }
}

/// One request of a batch, checked and routed.
pub(crate) struct TaskSpec {
    pub(crate) op: Opcode,
    /// The local buffer's memory. Weak: once its slices have ended, a batch (finished,
    /// but still held by its owner) must not keep the memory, so that dropping a
    /// caller-owned buffer waits only for transfers really in flight. The slot's `pins`
    /// hold it from `add` until every task is posted; slices in flight hold it after.
    pub(crate) local: Weak<RegionMemory>,
    pub(crate) local_offset: usize,
    pub(crate) peer: Arc<PeerInner>,
    /// The remote buffer's index in the peer's descriptor.
    pub(crate) buffer: usize,
    pub(crate) remote_addr: u64,
    pub(crate) remote_base: u64,
    /// The remote buffer's keys on `leg`.
    pub(crate) remote_keys: RemoteKeys,
    pub(crate) len: usize,
    /// The peer's path the task's first attempt travels.
    pub(crate) leg: Leg,
}

#[derive(Default)]
pub(super) struct Task {
    remaining: AtomicU32,
    state: AtomicU8,
    /// [`FailReason::to_bits`] of why the task failed (lossless; 0 while none).
    reason: AtomicU64,
    /// 0 for the first attempt, 1 once the task is retried on the peer's other path.
    attempt: AtomicU8,
    /// Bytes the current attempt's slices reported landed (counted off the slot's
    /// `bytes_left`), so a failed attempt gives back exactly what it counted, and sealed
    /// when the task ends without completing (see [`SlotData::seal`]).
    landed: Landed,
}

/// A wait that slept to its limit after the batch ended counts as a lost wake-up only
/// when the batch ended at least this long before that limit: a waiter woken just
/// before its limit may be run after it on a busy machine.
pub(super) const LOST_WAKE_SLACK: Duration = Duration::from_millis(10);

/// What one slice's report means for its task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reported {
    /// Slices of the attempt are still out.
    Pending,
    /// Every slice of the attempt succeeded.
    Completed,
    /// Every slice of the attempt has reported and one failed (the first reason).
    Failed(FailReason),
}

impl Task {
    /// Records one slice's result for the current attempt. The outcome is known only once
    /// every slice of the attempt has reported: a task never ends while one of its
    /// slices may still write into its buffer (each transport ends every slice by its
    /// deadline, so this stays bounded).
    fn report(&self, result: Result<usize, FailReason>) -> Reported {
        if let Err(reason) = result {
            // The first failure is the task's reason.
            let _ = self.reason.compare_exchange(
                0,
                reason.to_bits(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Reported::Pending;
        }
        match FailReason::from_bits(self.reason.load(Ordering::Acquire)) {
            None => Reported::Completed,
            Some(reason) => Reported::Failed(reason),
        }
    }

    /// Ends a pending task in state `to`; false when it had ended already (its deadline
    /// passed first).
    fn finish(&self, to: u8) -> bool {
        self.state
            .compare_exchange(PENDING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Completion tokens carry a task's attempt in the top bit of the task index, so
/// completions of an abandoned attempt are told apart and ignored.
const RETRY_BIT: u32 = 1 << 31;

pub(super) struct SlotData {
    index: u32,
    pub(super) generation: u32,
    /// Retry tasks that fail on a fabric over the peer's fallback (set at submission).
    retry: bool,
    /// Where retries go to be posted.
    retries: Arc<Retries>,
    pub(super) specs: Vec<TaskSpec>,
    /// The local memory of the specs, held strongly from `add` to the end of `submit`
    /// (capacity kept between batches).
    pub(super) pins: Vec<Arc<RegionMemory>>,
    tasks: Vec<Task>,
    /// How many tasks the first attempt's slice starting at each task covers: 1 for a
    /// task posted on its own (cut into slices as its length needs), n > 1 where it heads
    /// a run of n contiguous tasks posted as one slice, 0 inside such a run (see
    /// [`SlotData::joins`]). Set by `arm` (capacity kept between batches).
    runs: Vec<u32>,
    pub(super) deadline: Instant,
    /// Tasks not yet ended, and the thread waiting for them (one atomic word: see
    /// [`EndGate`], model-checked with loom).
    pub(super) gate: EndGate,
    /// Bytes the batch still expects to land: each open task's length less what its
    /// current attempt has landed (an ended task counts nothing, a retry its every byte).
    pub(super) bytes_left: AtomicU64,
    /// When the slot was armed, and nanoseconds after it plus one at which its last task
    /// ended (0 while tasks are open, or before the thread that ended the last one has
    /// stored it): tells a lost wake-up from a waiter that was merely run late.
    armed_at: Instant,
    ended_at: AtomicU64,
    /// Nudge the waiter when [`EARLY_WAKE_BYTES`] are left, and let it spin then (set at
    /// submission: the engine's waiters may spin).
    pub(super) early_wake: bool,
    /// The table's count of those nudges.
    early_wakes: Arc<AtomicU64>,
    /// The table's count of requests that travelled in a run's slice behind its first.
    merged: Arc<AtomicU64>,
    /// Whether a retry of this batch has been logged as a warning (later ones go to
    /// debug: a fabric fault fails many tasks at once).
    retry_warned: AtomicBool,
}

impl SlotData {
    pub(super) fn ntasks(&self) -> usize {
        self.specs.len()
    }

    fn end_task(&self) {
        if self.gate.end_one() {
            let nanos = self
                .armed_at
                .elapsed()
                .as_nanos()
                .min(u128::from(u64::MAX - 1));
            self.ended_at.store(nanos as u64 + 1, Ordering::Release);
        }
    }

    /// Adds the batch's ended tasks to their peers' counters, one addition per run of
    /// tasks to the same peer (when the submitted batch is dropped), each by its
    /// [`status`](Self::status): so a task still open past the deadline is timed out,
    /// and one still open before it is left out (its outcome is not known).
    pub(super) fn account(&self) {
        let now = Instant::now();
        let mut tally = PeerStats::default();
        let mut peer: Option<&Arc<PeerInner>> = None;
        for (task, spec) in self.specs.iter().enumerate() {
            if let Some(p) = peer.filter(|p| !Arc::ptr_eq(p, &spec.peer)) {
                p.counters.add(&std::mem::take(&mut tally));
            }
            peer = Some(&spec.peer);
            match self.status(task, now) {
                TaskStatus::Completed => {
                    tally.completed += 1;
                    match spec.op {
                        Opcode::Write => tally.bytes_written += spec.len as u64,
                        Opcode::Read => tally.bytes_read += spec.len as u64,
                    }
                }
                TaskStatus::Failed(_) => tally.failed += 1,
                TaskStatus::TimedOut => tally.timed_out += 1,
                TaskStatus::Pending => {}
            }
        }
        if let Some(p) = peer {
            p.counters.add(&tally);
        }
    }

    /// When the batch's last task ended, once the thread that ended it has said so.
    pub(super) fn ended_at(&self) -> Option<Instant> {
        match self.ended_at.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.armed_at + Duration::from_nanos(n - 1)),
        }
    }

    /// Counts off the batch what task `t` (number `task`) had not landed when it ended
    /// without completing, and seals its count: slices of it that report landing after
    /// this are not counted again.
    fn seal(&self, task: usize, t: &Task) {
        let landed = t.landed.seal();
        self.count_down((self.specs[task].len as u64).saturating_sub(landed));
    }

    /// Readies the slot's tasks for submission with `deadline`; `early_wake` when its
    /// waiter may spin (see [`EARLY_WAKE_BYTES`]).
    pub(super) fn arm(&mut self, deadline: Instant, retry: bool, early_wake: bool) {
        let n = self.specs.len();
        if self.tasks.len() < n {
            self.tasks.resize_with(n, Task::default);
        }
        self.deadline = deadline;
        self.retry = retry;
        self.early_wake = early_wake;
        self.armed_at = Instant::now();
        self.ended_at.store(0, Ordering::Relaxed);
        self.retry_warned.store(false, Ordering::Relaxed);
        self.runs.clear();
        let (mut head, mut run_len, mut merged) = (0, 0, 0);
        for i in 0..n {
            if i > 0 && self.joins(head, run_len, i) {
                self.runs[head] += 1;
                self.runs.push(0);
                run_len += self.specs[i].len;
                merged += 1;
            } else {
                (head, run_len) = (i, self.specs[i].len);
                self.runs.push(1);
            }
        }
        if merged > 0 {
            self.merged.fetch_add(merged, Ordering::Relaxed);
        }
        let mut open = 0;
        for (spec, t) in self.specs.iter().zip(&self.tasks) {
            let slices = spec.len.div_ceil(spec.peer.path(spec.leg).max_slice());
            t.reason.store(0, Ordering::Relaxed);
            t.attempt.store(0, Ordering::Relaxed);
            t.landed.reset();
            t.remaining.store(slices as u32, Ordering::Relaxed);
            if slices == 0 {
                t.state.store(DONE, Ordering::Relaxed);
            } else {
                t.state.store(PENDING, Ordering::Relaxed);
                open += 1;
            }
        }
        self.bytes_left.store(
            self.specs.iter().map(|s| s.len as u64).sum(),
            Ordering::Relaxed,
        );
        self.gate.reset(open);
    }

    /// Whether task `next` extends the run of contiguous tasks that starts at `head`
    /// (every task from `head` to `next - 1` in it, `run_len` bytes), so that one slice
    /// can carry them all: the same operation on the same local memory and the same remote buffer over
    /// the same path, each task's bytes following the previous one's on both sides, and
    /// the run no longer than a slice of that path. A batch of blocks laid end to end
    /// (a KV cache's consecutive pages, an object cut into chunks) then costs one
    /// operation per slice rather than one per block.
    fn joins(&self, head: usize, run_len: usize, next: usize) -> bool {
        let (first, prev, spec) = (&self.specs[head], &self.specs[next - 1], &self.specs[next]);
        prev.len > 0
            && spec.len > 0
            && spec.op == first.op
            && spec.leg == first.leg
            && spec.buffer == first.buffer
            && Arc::ptr_eq(&spec.peer, &first.peer)
            && Weak::ptr_eq(&spec.local, &first.local)
            && prev.local_offset.checked_add(prev.len) == Some(spec.local_offset)
            && prev.remote_addr.checked_add(prev.len as u64) == Some(spec.remote_addr)
            && run_len
                .checked_add(spec.len)
                .is_some_and(|total| total <= first.peer.path(first.leg).max_slice())
    }

    /// Posts every task of an armed slot on its path, then rings each peer's doorbell
    /// once (small batches go out on this thread). A run of contiguous tasks goes out as
    /// one slice (see [`joins`](Self::joins)).
    pub(super) fn post_all(&self) {
        for (task, spec) in self.specs.iter().enumerate() {
            let run = self.runs[task] as usize;
            if spec.len == 0 || run == 0 {
                continue;
            }
            let token = CompletionToken {
                slot: self.index,
                generation: self.generation,
                task: task as u32,
            };
            let path = spec.peer.path(spec.leg);
            let Some(local) = spec.local.upgrade() else {
                // Pinned by the slot until every task is posted: not reached.
                self.fail_unposted(spec, path.max_slice(), token);
                continue;
            };
            // A run's bytes follow its first task's: they go out as one slice (no longer
            // than a slice, so never cut).
            let len = self.specs[task..task + run].iter().map(|s| s.len).sum();
            self.post_task(spec, len, &local, path, &spec.remote_keys, token);
        }
        let mut last: Option<&Arc<PeerInner>> = None;
        for spec in &self.specs {
            if last.is_some_and(|l| Arc::ptr_eq(l, &spec.peer)) {
                continue;
            }
            spec.peer.flush();
            last = Some(&spec.peer);
        }
    }

    /// Applies one slice's report. A first attempt's slice that carried a run of
    /// contiguous tasks reports for each of them: each gets its own length, or the
    /// slice's failure (a task's retry goes out on its own).
    fn apply(&self, word: u32, result: Result<usize, FailReason>) {
        let task = (word & !RETRY_BIT) as usize;
        let run = match self.runs.get(task) {
            Some(&run) if word & RETRY_BIT == 0 && run > 1 && task < self.ntasks() => run as usize,
            _ => return self.apply_one(word, result),
        };
        for t in task..(task + run).min(self.ntasks()) {
            let mine = result.map(|_| self.specs[t].len);
            self.apply_one(t as u32, mine);
        }
    }

    /// Counts `bytes` off what the batch still expects to land, and wakes a waiter that
    /// may spin when that falls to [`EARLY_WAKE_BYTES`].
    fn count_down(&self, bytes: u64) {
        let before = self.bytes_left.fetch_sub(bytes, Ordering::AcqRel);
        if self.early_wake
            && before > EARLY_WAKE_BYTES
            && before.saturating_sub(bytes) <= EARLY_WAKE_BYTES
        {
            self.early_wakes.fetch_add(1, Ordering::Relaxed);
            self.gate.nudge();
        }
    }

    /// Applies one report to the task `word` names.
    fn apply_one(&self, word: u32, result: Result<usize, FailReason>) {
        let task = (word & !RETRY_BIT) as usize;
        let attempt = u8::from(word & RETRY_BIT != 0);
        let Some(t) = self.tasks.get(task).filter(|_| task < self.ntasks()) else {
            return;
        };
        if t.attempt.load(Ordering::Acquire) != attempt {
            return; // a completion of an abandoned attempt
        }
        if let Ok(bytes) = result {
            // A task that has ended and been sealed counted these bytes off already.
            if t.landed.land(bytes as u64) {
                self.count_down(bytes as u64);
            }
        }
        match t.report(result) {
            Reported::Pending => {}
            Reported::Completed => {
                if t.finish(DONE) {
                    self.end_task();
                }
            }
            Reported::Failed(reason)
                if reason.retryable()
                    && attempt == 0
                    && self.retry
                    && self.retry(task, t, reason) => {}
            Reported::Failed(reason) => {
                let to = if reason == FailReason::TimedOut {
                    TIMED_OUT
                } else {
                    FAILED
                };
                if t.finish(to) {
                    // What its slices did not land will not land: off the batch's count.
                    self.seal(task, t);
                    if reason.suggests_stale_descriptor() {
                        self.specs[task].peer.mark_stale();
                    }
                    self.end_task();
                }
            }
        }
    }

    /// Starts attempt 1 of a task on the peer's retry path: claims it here and hands its
    /// posting to the retry thread (a post may wait for room until the deadline, which
    /// must not hold the transport thread reporting this failure: it also ends other
    /// operations at their deadlines). Returns false when the task cannot be retried (no
    /// other path, no key on it, already retried, no retry thread); true when it was
    /// claimed, including when its deadline ended it in the meantime (then nothing is
    /// posted; a deadline that ends it just after that check leaves the retry's slices
    /// to be refused as past their deadline, their reports ignored).
    fn retry(&self, task: usize, t: &Task, reason: FailReason) -> bool {
        let spec = &self.specs[task];
        let Some(leg) = spec.peer.retry_leg(spec.leg, spec.buffer) else {
            return false;
        };
        let path = spec.peer.path(leg);
        if path.keys(spec.buffer).is_none() {
            return false;
        }
        // Its owner dropped the local buffer once the first attempt ended: nothing to
        // retry from or into.
        let Some(local) = spec.local.upgrade() else {
            return false;
        };
        let Some(queue) = self.retries.sender() else {
            return false;
        };
        if t.state.load(Ordering::Acquire) != PENDING
            || t.attempt
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return false;
        }
        // Every slice of attempt 0 has reported: attempt 1 starts with a clean record.
        t.reason.store(0, Ordering::Release);
        t.remaining.store(
            spec.len.div_ceil(path.max_slice()) as u32,
            Ordering::Release,
        );
        // The failed attempt counted off what it landed; the retry moves every byte
        // again (unless the deadline ended the task meanwhile: then its seal counted
        // off what had not landed, and that stands).
        t.landed.restart(&self.bytes_left);
        // The deadline may have ended the task between the check above and the claim:
        // its end stands, and a retry would only post slices past their deadline.
        if t.state.load(Ordering::Acquire) != PENDING {
            return true;
        }
        spec.peer.counters.retried();
        let peer = spec.peer.name();
        if self.retry_warned.swap(true, Ordering::Relaxed) {
            tracing::debug!(peer, task, %reason, "fabric transfer failed; retrying it over TCP");
        } else {
            tracing::warn!(peer, batch = self.index, task, %reason, "fabric transfer failed; retrying it over TCP (this batch's further retries are logged at debug level)");
        }
        let token = CompletionToken {
            slot: self.index,
            generation: self.generation,
            task: task as u32 | RETRY_BIT,
        };
        if let Err(back) = queue.send(Retry { token, leg, local }) {
            // The retry thread has gone (the engine is being dropped).
            self.post_retry(back.into_inner());
        }
        true
    }

    /// Posts a claimed retry on its path (on the retry thread).
    fn post_retry(&self, retry: Retry) {
        let task = (retry.token.task & !RETRY_BIT) as usize;
        let spec = &self.specs[task];
        let path = spec.peer.path(retry.leg);
        match path.keys(spec.buffer) {
            Some(keys) => {
                self.post_task(spec, spec.len, &retry.local, path, keys, retry.token);
                path.conn().flush();
            }
            None => self.fail_unposted(spec, path.max_slice(), retry.token),
        }
    }

    /// Fails every slice of a task that cannot be posted (a token that heads a run
    /// stands for the run's one slice).
    fn fail_unposted(&self, spec: &TaskSpec, step: usize, token: CompletionToken) {
        for _ in 0..spec.len.div_ceil(step) {
            self.apply(token.task, Err(FailReason::Unsupported));
        }
    }

    /// Cuts the `total` bytes from `spec`'s start (the task's length, or a run's) into
    /// slices of `path`'s size and posts them on it with `keys`; a slice the connection
    /// refuses fails at once.
    fn post_task(
        &self,
        spec: &TaskSpec,
        total: usize,
        local: &Arc<RegionMemory>,
        path: &Path,
        keys: &RemoteKeys,
        token: CompletionToken,
    ) {
        let (conn, step) = (path.conn(), path.max_slice());
        let mut off = 0;
        while off < total {
            let len = step.min(total - off);
            let slice = Slice {
                op: spec.op,
                local: local.clone(),
                local_offset: spec.local_offset + off,
                remote_addr: spec.remote_addr + off as u64,
                remote_base: spec.remote_base,
                remote_keys: keys.clone(),
                len,
                token,
                deadline: self.deadline,
            };
            if let Err(reason) = conn.post(slice) {
                self.apply(token.task, Err(reason));
            }
            off += len;
        }
    }

    pub(super) fn status(&self, task: usize, now: Instant) -> TaskStatus {
        let t = &self.tasks[task];
        let mut state = t.state.load(Ordering::Acquire);
        if state == PENDING && now >= self.deadline {
            if t.state
                .compare_exchange(PENDING, TIMED_OUT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                t.reason
                    .store(FailReason::TimedOut.to_bits(), Ordering::Release);
                self.seal(task, t);
                self.end_task();
            }
            state = t.state.load(Ordering::Acquire);
        }
        match state {
            PENDING => TaskStatus::Pending,
            DONE => TaskStatus::Completed,
            TIMED_OUT => TaskStatus::TimedOut,
            _ => TaskStatus::Failed(
                FailReason::from_bits(t.reason.load(Ordering::Acquire))
                    .unwrap_or(FailReason::ConnectionLost),
            ),
        }
    }

    pub(super) fn progress(&self) -> Progress {
        let now = Instant::now();
        let mut p = Progress {
            total: self.ntasks(),
            ..Progress::default()
        };
        for i in 0..self.ntasks() {
            match self.status(i, now) {
                TaskStatus::Pending => p.pending += 1,
                TaskStatus::Completed => p.completed += 1,
                TaskStatus::Failed(_) => p.failed += 1,
                TaskStatus::TimedOut => p.timed_out += 1,
            }
        }
        p
    }
}

pub(crate) struct Slot {
    pub(super) data: RwLock<SlotData>,
}

/// A claimed retry on its way to the retry thread: the task's attempt-1 token, the path
/// it takes and its local memory (held from the claim to the post).
struct Retry {
    token: CompletionToken,
    leg: Leg,
    local: Arc<RegionMemory>,
}

/// The table's retry thread, started at the first retry. It posts each claimed retry on
/// the peer's fallback and rings its doorbell; it ends when the table is dropped.
struct Retries {
    table: Weak<BatchTable>,
    queue: OnceLock<Option<crossbeam_channel::Sender<Retry>>>,
}

impl Retries {
    /// The retry thread's queue, starting the thread on first use; `None` when it
    /// could not start.
    fn sender(&self) -> Option<&crossbeam_channel::Sender<Retry>> {
        self.queue
            .get_or_init(|| {
                let (tx, rx) = crossbeam_channel::unbounded::<Retry>();
                let table = self.table.clone();
                let started = std::thread::Builder::new()
                    .name("ferry-retry".into())
                    .spawn(move || {
                        for retry in rx {
                            let Some(table) = table.upgrade() else {
                                return;
                            };
                            table.post_retry(retry);
                        }
                    });
                match started {
                    Ok(_) => Some(tx),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start the retry thread; failed fabric transfers will not be retried over TCP");
                        None
                    }
                }
            })
            .as_ref()
    }
}

/// What a batch gets unless its builder says otherwise.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BatchDefaults {
    /// The deadline, counted from submission.
    pub(crate) timeout: Duration,
    /// Whether a task that fails on a fabric is retried over TCP.
    pub(crate) retry_over_tcp: bool,
    /// How long a waiter spins before it parks.
    pub(crate) busy_poll: Duration,
}

/// Every batch slot of an engine; the engine's [`Completions`].
pub(crate) struct BatchTable {
    slots: RwLock<Vec<Arc<Slot>>>,
    retries: Arc<Retries>,
    free: Mutex<Vec<u32>>,
    pub(super) defaults: BatchDefaults,
    /// Waits that slept to their limit although every task had ended (a lost wake-up).
    pub(super) late_wakeups: AtomicU64,
    /// Waits woken in time that ran only after their limit (see [`BatchStats`]).
    pub(super) woken_late: AtomicU64,
    /// Waiters nudged early (see [`EARLY_WAKE_BYTES`]).
    early_wakes: Arc<AtomicU64>,
    /// Requests carried in the slice of the run they follow (see [`SlotData::joins`]).
    merged: Arc<AtomicU64>,
}

/// Counters of an engine's batches and their waits, for tests and monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Waits that slept until their deadline or timeout although every task of the batch
    /// had ended at least 10 ms before it, and whose wake-up the last task's ender did not
    /// owe (it found no waiter registered): a lost wake-up, which the gate's protocol
    /// rules out (its loom models check that, and that the owed wake-up is made). (A
    /// second thread waiting on the same batch at once polls every millisecond instead of
    /// being woken; kept off the CPU for 10 ms as its batch ends, it can be counted.)
    pub late_wakeups: u64,
    /// Waits like those, whose wake-up was owed: woken in time, the waiter was kept off
    /// the CPU past its limit (a busy machine). Not a fault of the engine; a count that
    /// grows says the waiting threads lack CPU. (A second, polling waiter that oversleeps
    /// while the first is registered lands here too.)
    pub woken_late: u64,
    /// Waiters woken early, with a batch's last 512 KiB still to land, to spin for the
    /// rest: at most one per batch larger than 512 KiB (counted whether or not a waiter
    /// was parked), and one more each time a retry puts a failed attempt's landed bytes
    /// back and the batch comes down to 512 KiB again. Zero when `busy_poll` is zero:
    /// such waiters never spin and are woken only when their batch ends.
    pub early_wakes: u64,
    /// Requests that travelled in one slice with the request before them, because their
    /// bytes follow its bytes on both sides (same operation, local memory, remote buffer
    /// and path): a batch of `n` such requests within one slice's length counts `n - 1`.
    pub merged_requests: u64,
}

impl BatchTable {
    pub(crate) fn new(defaults: BatchDefaults) -> Arc<Self> {
        Arc::new_cyclic(|me| BatchTable {
            slots: RwLock::new(Vec::new()),
            retries: Arc::new(Retries {
                table: me.clone(),
                queue: OnceLock::new(),
            }),
            free: Mutex::new(Vec::new()),
            defaults,
            late_wakeups: AtomicU64::new(0),
            woken_late: AtomicU64::new(0),
            early_wakes: Arc::new(AtomicU64::new(0)),
            merged: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Posts a retry the retry thread took, if its batch is still the slot's. The post
    /// may wait (for room, until the deadline): the table's own lock is not held for it,
    /// so batches are still submitted meanwhile.
    fn post_retry(&self, retry: Retry) {
        let Some(slot) = self.slots.read().get(retry.token.slot as usize).cloned() else {
            return;
        };
        let d = slot.data.read_recursive();
        if d.generation == retry.token.generation {
            d.post_retry(retry);
        }
    }

    pub(crate) fn stats(&self) -> BatchStats {
        BatchStats {
            late_wakeups: self.late_wakeups.load(Ordering::Relaxed),
            woken_late: self.woken_late.load(Ordering::Relaxed),
            early_wakes: self.early_wakes.load(Ordering::Relaxed),
            merged_requests: self.merged.load(Ordering::Relaxed),
        }
    }

    pub(super) fn acquire(&self) -> (u32, Arc<Slot>, u32) {
        // The free list's lock is let go before the slots' (a growing table waits on
        // completions in flight; releases must not wait behind it).
        let reused = self.free.lock().pop();
        if let Some(index) = reused {
            let slot = self.slots.read()[index as usize].clone();
            let generation = slot.data.read().generation;
            return (index, slot, generation);
        }
        let mut slots = self.slots.write();
        let index = slots.len() as u32;
        let slot = Arc::new(Slot {
            data: RwLock::new(SlotData {
                index,
                generation: 0,
                retry: false,
                retries: self.retries.clone(),
                specs: Vec::new(),
                pins: Vec::new(),
                tasks: Vec::new(),
                runs: Vec::new(),
                deadline: Instant::now(),
                gate: EndGate::new(),
                bytes_left: AtomicU64::new(0),
                armed_at: Instant::now(),
                ended_at: AtomicU64::new(0),
                early_wake: false,
                early_wakes: self.early_wakes.clone(),
                merged: self.merged.clone(),
                retry_warned: AtomicBool::new(false),
            }),
        });
        slots.push(slot.clone());
        (index, slot, 0)
    }

    pub(super) fn release(&self, index: u32, slot: &Slot) {
        {
            let mut d = slot.data.write();
            d.generation = d.generation.wrapping_add(1);
            d.specs.clear();
            d.pins.clear();
            d.gate.reset(0);
        }
        self.free.lock().push(index);
    }

    fn slot(&self, id: BatchId) -> Option<Arc<Slot>> {
        let slot = self.slots.read().get(id.slot as usize)?.clone();
        let live = slot.data.read().generation == id.generation;
        live.then_some(slot)
    }
}

impl Completions for BatchTable {
    fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
        let slots = self.slots.read_recursive();
        let Some(slot) = slots.get(token.slot as usize) else {
            return;
        };
        let d = slot.data.read_recursive();
        if d.generation == token.generation {
            d.apply(token.task, result);
        }
    }
}

pub(crate) fn progress_of(table: &BatchTable, id: BatchId) -> Result<Progress> {
    let slot = table.slot(id).ok_or(Error::StaleBatch)?;
    let d = slot.data.read();
    if d.generation != id.generation {
        return Err(Error::StaleBatch);
    }
    Ok(d.progress())
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
