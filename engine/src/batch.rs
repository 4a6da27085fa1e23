//! Batches: checked handles onto reusable slots. Per task, an atomic count of slices
//! still out and an atomic state; completions from transports update them without
//! blocking, and a poll only reads them. A slot's generation changes when its batch is
//! released, so a late completion for a released batch (or a stale [`BatchId`]) touches
//! nothing.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport_api::sync::EndGate;
use ferry_transport_api::{
    CompletionToken, Completions, Connection, FailReason, Opcode, RegionMemory, RemoteKeys, Slice,
};
use parking_lot::{Mutex, RwLock};

use crate::engine::Inner;
use crate::segment::{Route, SegmentInner};
use crate::{Buffer, Error, RemoteBuffer, Result};

/// A waiter parked on a batch is woken when this many bytes are left, so it is running
/// (spinning) when the last slice lands instead of paying a cross-core wake-up after it.
const EARLY_WAKE_BYTES: u64 = 512 * 1024;
/// How long a waiter woken early spins before it parks again.
const EARLY_WAKE_SPIN: Duration = Duration::from_millis(2);

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
    slot: u32,
    generation: u32,
}

pub(crate) struct TaskSpec {
    op: Opcode,
    local: Arc<RegionMemory>,
    local_offset: usize,
    segment: Arc<SegmentInner>,
    /// The remote buffer's index in the segment's descriptor.
    buffer: usize,
    remote_addr: u64,
    remote_base: u64,
    remote_keys: RemoteKeys,
    len: usize,
    /// Travels over the segment's TCP lanes although its route is a fabric: a device
    /// buffer on either side that the fabric could not register.
    via_tcp: bool,
}

impl TaskSpec {
    /// The connection the task's slices go on and their size.
    fn conn<'a>(&'a self, engine: &Inner) -> Option<(&'a dyn Connection, usize)> {
        match &self.segment.route {
            Route::Local => None,
            Route::Remote { tcp, .. } if self.via_tcp => Some((&**tcp, engine.tcp_slice())),
            Route::Remote {
                conn, max_slice, ..
            } => Some((&**conn, *max_slice)),
        }
    }
}

#[derive(Default)]
struct Task {
    remaining: AtomicU32,
    state: AtomicU8,
    /// [`FailReason::to_bits`] of why the task failed (lossless; 0 while none).
    reason: AtomicU64,
    /// 0 for the first attempt, 1 once the task is retried over TCP.
    attempt: AtomicU8,
}

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

struct SlotData {
    index: u32,
    generation: u32,
    /// Retry tasks that fail on a fabric over TCP (set at submission).
    retry_over_tcp: bool,
    /// TCP's slice size, for retries.
    tcp_slice: usize,
    specs: Vec<TaskSpec>,
    tasks: Vec<Task>,
    deadline: Instant,
    /// Tasks not yet ended, and the thread waiting for them (one atomic word: see
    /// [`EndGate`], model-checked with loom).
    gate: EndGate,
    /// Bytes of slices not yet completed.
    bytes_left: AtomicU64,
}

impl SlotData {
    fn ntasks(&self) -> usize {
        self.specs.len()
    }

    fn end_task(&self) {
        self.gate.end_one();
    }

    fn apply(&self, word: u32, result: Result<usize, FailReason>) {
        let task = (word & !RETRY_BIT) as usize;
        let attempt = u8::from(word & RETRY_BIT != 0);
        let Some(t) = self.tasks.get(task).filter(|_| task < self.ntasks()) else {
            return;
        };
        if t.attempt.load(Ordering::Acquire) != attempt {
            return; // a completion of an abandoned attempt
        }
        if let Ok(bytes) = result {
            let before = self.bytes_left.fetch_sub(bytes as u64, Ordering::AcqRel);
            if before > EARLY_WAKE_BYTES && before.saturating_sub(bytes as u64) <= EARLY_WAKE_BYTES
            {
                self.gate.nudge();
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
                    && self.retry_over_tcp
                    && self.retry(task, t) =>
            {
                tracing::warn!(task, %reason, "fabric transfer failed; retrying it over TCP");
            }
            Reported::Failed(reason) => {
                let to = if reason == FailReason::TimedOut {
                    TIMED_OUT
                } else {
                    FAILED
                };
                if t.finish(to) {
                    if reason.suggests_stale_descriptor() {
                        self.specs[task].segment.mark_stale();
                    }
                    self.end_task();
                }
            }
        }
    }

    /// Starts attempt 1 of a task over the segment's TCP lanes. Returns false when the
    /// task cannot be retried (not on a fabric route, no TCP key, already retried).
    fn retry(&self, task: usize, t: &Task) -> bool {
        let spec = &self.specs[task];
        let Route::Remote { protocol, tcp, .. } = &spec.segment.route else {
            return false;
        };
        if *protocol == ferry_transport_api::Protocol::Tcp || spec.via_tcp {
            return false;
        }
        let Some(key) = spec.segment.keys(spec.buffer, true).cloned() else {
            return false;
        };
        if t.state.load(Ordering::Acquire) != PENDING
            || t.attempt
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return false;
        }
        let step = self.tcp_slice.max(1);
        // Every slice of attempt 0 has reported: attempt 1 starts with a clean record.
        t.reason.store(0, Ordering::Release);
        t.remaining
            .store(spec.len.div_ceil(step) as u32, Ordering::Release);
        self.bytes_left.fetch_add(spec.len as u64, Ordering::AcqRel);
        let token = CompletionToken {
            slot: self.index,
            generation: self.generation,
            task: task as u32 | RETRY_BIT,
        };
        self.post_task(spec, &**tcp, step, &key, token);
        tcp.flush();
        true
    }

    /// Cuts a task into slices of `step` bytes and posts them on `conn` with `keys`; a
    /// slice the connection refuses fails at once.
    fn post_task(
        &self,
        spec: &TaskSpec,
        conn: &dyn Connection,
        step: usize,
        keys: &RemoteKeys,
        token: CompletionToken,
    ) {
        let mut off = 0;
        while off < spec.len {
            let len = step.min(spec.len - off);
            let slice = Slice {
                op: spec.op,
                local: spec.local.clone(),
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

    fn status(&self, task: usize, now: Instant) -> TaskStatus {
        let t = &self.tasks[task];
        let mut state = t.state.load(Ordering::Acquire);
        if state == PENDING && now >= self.deadline {
            if t.state
                .compare_exchange(PENDING, TIMED_OUT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                t.reason
                    .store(FailReason::TimedOut.to_bits(), Ordering::Release);
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

    fn progress(&self) -> Progress {
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
    data: RwLock<SlotData>,
}

/// Every batch slot of an engine; the engine's [`Completions`].
pub(crate) struct BatchTable {
    slots: RwLock<Vec<Arc<Slot>>>,
    free: Mutex<Vec<u32>>,
    /// Waits that slept to their limit although every task had ended (a lost wake-up).
    late_wakeups: AtomicU64,
}

/// Counters of an engine's batch waits, for tests and monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Waits that slept until their deadline or timeout although every task of the batch
    /// had already ended: a lost wake-up. Always zero unless the wait protocol is broken.
    pub late_wakeups: u64,
}

impl BatchTable {
    pub(crate) fn new() -> Self {
        BatchTable {
            slots: RwLock::new(Vec::new()),
            free: Mutex::new(Vec::new()),
            late_wakeups: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> BatchStats {
        BatchStats {
            late_wakeups: self.late_wakeups.load(Ordering::Relaxed),
        }
    }

    fn acquire(&self) -> (u32, Arc<Slot>, u32) {
        if let Some(index) = self.free.lock().pop() {
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
                retry_over_tcp: false,
                tcp_slice: 1 << 20,
                specs: Vec::new(),
                tasks: Vec::new(),
                deadline: Instant::now(),
                gate: EndGate::new(),
                bytes_left: AtomicU64::new(0),
            }),
        });
        slots.push(slot.clone());
        (index, slot, 0)
    }

    fn release(&self, index: u32, slot: &Slot) {
        {
            let mut d = slot.data.write();
            d.generation = d.generation.wrapping_add(1);
            d.specs.clear();
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

/// Collects requests for one batch; [`submit`](Self::submit) posts them all.
///
/// Requests are checked as they are added (bounds on both sides, the peer's access
/// rights), so a batch that submits only carries requests that can succeed.
///
/// It owns a handle on the engine's state, so it may be stored (by a language binding,
/// say) apart from the [`Engine`](crate::Engine) it came from.
pub struct BatchBuilder {
    engine: Arc<Inner>,
    index: u32,
    slot: Option<Arc<Slot>>,
    generation: u32,
    timeout: Duration,
    retry_over_tcp: bool,
}

impl BatchBuilder {
    pub(crate) fn new(engine: &Arc<Inner>) -> Self {
        let (index, slot, generation) = engine.batches.acquire();
        BatchBuilder {
            engine: Arc::clone(engine),
            index,
            slot: Some(slot),
            generation,
            timeout: engine.timeout,
            retry_over_tcp: engine.retry_over_tcp,
        }
    }

    /// Sets the batch's deadline, counted from `submit` (default: the engine's).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether a task that fails on a fabric (EFA) is retried once over the TCP fallback
    /// before its deadline (default: the engine's setting).
    pub fn retry_over_tcp(mut self, retry: bool) -> Self {
        self.retry_over_tcp = retry;
        self
    }

    /// Adds a WRITE of `len` bytes from `local` at `local_offset` to `remote` at
    /// `remote_offset`.
    pub fn write(
        &mut self,
        local: &Buffer,
        local_offset: usize,
        remote: &RemoteBuffer,
        remote_offset: u64,
        len: usize,
    ) -> Result<&mut Self> {
        self.add(
            Opcode::Write,
            local,
            local_offset,
            remote,
            remote_offset,
            len,
        )
    }

    /// Adds a READ of `len` bytes from `remote` at `remote_offset` into `local` at
    /// `local_offset`.
    pub fn read(
        &mut self,
        local: &Buffer,
        local_offset: usize,
        remote: &RemoteBuffer,
        remote_offset: u64,
        len: usize,
    ) -> Result<&mut Self> {
        self.add(
            Opcode::Read,
            local,
            local_offset,
            remote,
            remote_offset,
            len,
        )
    }

    /// Number of requests added so far.
    pub fn len(&self) -> usize {
        self.slot.as_ref().map_or(0, |s| s.data.read().specs.len())
    }

    /// Whether no request was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn add(
        &mut self,
        op: Opcode,
        local: &Buffer,
        local_offset: usize,
        remote: &RemoteBuffer,
        remote_offset: u64,
        len: usize,
    ) -> Result<&mut Self> {
        if !Arc::ptr_eq(&local.inner.engine, &self.engine) {
            return Err(Error::InvalidRequest(
                "the local buffer belongs to another engine".into(),
            ));
        }
        if !local.memory().contains(local_offset, len) {
            return Err(Error::InvalidRequest(format!(
                "local range {local_offset}+{len} runs past the local buffer's {} bytes",
                local.len()
            )));
        }
        let desc = remote.descriptor();
        if remote_offset
            .checked_add(len as u64)
            .is_none_or(|end| end > desc.len)
        {
            return Err(Error::InvalidRequest(format!(
                "remote range {remote_offset}+{len} runs past the remote buffer's {} bytes",
                desc.len
            )));
        }
        let allowed = match op {
            Opcode::Read => desc.access.remote_read(),
            Opcode::Write => desc.access.remote_write(),
        };
        if !allowed {
            return Err(Error::InvalidRequest(format!(
                "the remote buffer does not allow peers to {op} it ({:?})",
                desc.access
            )));
        }
        // Descriptors are checked when a segment is opened; this keeps the sum honest
        // whatever the descriptor says.
        let remote_addr = desc
            .addr
            .checked_add(remote_offset)
            .filter(|a| a.checked_add(len as u64).is_some())
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "remote range {remote_offset}+{len} of the buffer at {:#x} runs past the end of the address space",
                    desc.addr
                ))
            })?;
        let segment = remote.segment.inner.clone();
        let protocol = match &segment.route {
            Route::Local => ferry_transport_api::Protocol::Tcp,
            Route::Remote { protocol, .. } => *protocol,
        };
        // A fabric route carries the task only when both buffers are registered with
        // the fabric; device memory it could not register goes over TCP, staged.
        let tcp = ferry_transport_api::Protocol::Tcp;
        let via_tcp = protocol != tcp
            && (local.descriptor().key(protocol).is_none() || remote.keys(false).is_none());
        let protocol = if via_tcp { tcp } else { protocol };
        let remote_keys = remote.keys(via_tcp).cloned().ok_or_else(|| {
            Error::InvalidRequest(format!(
                "the remote buffer has no {protocol} key in its descriptor"
            ))
        })?;
        let slot = self.slot.as_ref().ok_or(Error::StaleBatch)?;
        slot.data.write().specs.push(TaskSpec {
            op,
            local: local.memory().clone(),
            local_offset,
            segment,
            buffer: remote.index(),
            remote_addr,
            remote_base: desc.addr,
            remote_keys,
            len,
            via_tcp,
        });
        Ok(self)
    }

    /// Posts every request and returns the batch's handle. The deadline starts now.
    pub fn submit(mut self) -> Result<Batch> {
        let slot = self.slot.take().ok_or(Error::StaleBatch)?;
        let engine = self.engine.clone();
        if engine.is_shut_down() {
            engine.batches.release(self.index, &slot);
            return Err(Error::Shutdown);
        }
        let now = Instant::now();
        let deadline = now + self.timeout;
        {
            let mut d = slot.data.write();
            let n = d.specs.len();
            if d.tasks.len() < n {
                d.tasks.resize_with(n, Task::default);
            }
            d.deadline = deadline;
            d.retry_over_tcp = self.retry_over_tcp;
            d.tcp_slice = engine.tcp_slice();
            let d = &*d;
            let mut open = 0;
            for (spec, t) in d.specs.iter().zip(&d.tasks) {
                let step = spec
                    .conn(&engine)
                    .map_or_else(|| engine.max_slice(&spec.segment.route), |(_, s)| s);
                let slices = spec.len.div_ceil(step);
                t.reason.store(0, Ordering::Relaxed);
                t.attempt.store(0, Ordering::Relaxed);
                t.remaining.store(slices as u32, Ordering::Relaxed);
                if slices == 0 {
                    t.state.store(DONE, Ordering::Relaxed);
                } else {
                    t.state.store(PENDING, Ordering::Relaxed);
                    open += 1;
                }
            }
            d.bytes_left.store(
                d.specs.iter().map(|s| s.len as u64).sum(),
                Ordering::Relaxed,
            );
            d.gate.reset(open);
        }
        let d = slot.data.read();
        for (task, spec) in d.specs.iter().enumerate() {
            if spec.len == 0 {
                continue;
            }
            let token = CompletionToken {
                slot: self.index,
                generation: self.generation,
                task: task as u32,
            };
            match &spec.segment.route {
                Route::Local => {
                    let r = engine.local_copy(
                        spec.op,
                        &spec.local,
                        spec.local_offset,
                        spec.remote_addr,
                        spec.remote_keys.first(),
                        spec.len,
                    );
                    // One completion per slice keeps the accounting uniform.
                    let step = engine.max_slice(&spec.segment.route);
                    let mut off = 0;
                    while off < spec.len {
                        let len = step.min(spec.len - off);
                        d.apply(task as u32, r.map(|()| len));
                        off += len;
                    }
                }
                Route::Remote { .. } => {
                    if let Some((conn, step)) = spec.conn(&engine) {
                        d.post_task(spec, conn, step, &spec.remote_keys, token);
                    }
                }
            }
        }
        // Ring each connection's doorbell once: small batches go out on this thread.
        let mut last: Option<&Arc<SegmentInner>> = None;
        for spec in &d.specs {
            if last.is_some_and(|l| Arc::ptr_eq(l, &spec.segment)) {
                continue;
            }
            if let Route::Remote {
                conn,
                tcp,
                protocol,
                ..
            } = &spec.segment.route
            {
                conn.flush();
                // Tasks staged over TCP on a fabric route.
                if *protocol != ferry_transport_api::Protocol::Tcp {
                    tcp.flush();
                }
            }
            last = Some(&spec.segment);
        }
        drop(d);
        tracing::trace!(batch = self.index, "submitted");
        Ok(Batch {
            engine,
            index: self.index,
            slot,
            generation: self.generation,
        })
    }
}

impl std::fmt::Debug for BatchBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchBuilder")
            .field("requests", &self.len())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Drop for BatchBuilder {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.engine.batches.release(self.index, &slot);
        }
    }
}

/// A submitted batch. Dropping it releases its slot at once (transfers still in flight
/// finish in the background and are ignored).
pub struct Batch {
    engine: Arc<Inner>,
    index: u32,
    slot: Arc<Slot>,
    generation: u32,
}

impl Batch {
    /// The batch's id, for [`crate::Engine::batch_progress`].
    pub fn id(&self) -> BatchId {
        BatchId {
            slot: self.index,
            generation: self.generation,
        }
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.slot.data.read().ntasks()
    }

    /// Whether the batch has no task.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts tasks by state, without waiting.
    pub fn poll(&self) -> Progress {
        self.slot.data.read().progress()
    }

    /// The status of task `index` (in the order requests were added).
    pub fn task(&self, index: usize) -> Option<TaskStatus> {
        let d = self.slot.data.read();
        (index < d.ntasks()).then(|| d.status(index, Instant::now()))
    }

    /// The status of every task, in order.
    pub fn statuses(&self) -> Vec<TaskStatus> {
        let d = self.slot.data.read();
        let now = Instant::now();
        (0..d.ntasks()).map(|i| d.status(i, now)).collect()
    }

    /// Waits until every task has ended or `timeout` passes. `Ok` when every task
    /// completed; [`Error::TasksFailed`] when some failed or timed out;
    /// [`Error::WaitTimedOut`] when tasks are still pending after `timeout` (the batch
    /// goes on; wait again or drop it).
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let end = start + timeout;
        let d = self.slot.data.read();
        let mut spin_until = start + self.engine.busy_poll;
        loop {
            if d.gate.open() == 0 {
                break;
            }
            let now = Instant::now();
            if now >= d.deadline {
                // Marks overdue tasks timed out; each ends the gate once.
                d.progress();
                continue;
            }
            if now >= end {
                return Err(Error::WaitTimedOut {
                    pending: d.gate.open() as usize,
                });
            }
            if now < spin_until {
                std::thread::yield_now();
                continue;
            }
            // Sleep until the last task ends (the gate cannot lose that wake-up), the
            // batch's deadline, the caller's timeout, or an early nudge when little is
            // left, which is followed by a short spin.
            let mut first = true;
            let mut parked_until = None;
            let ended = d.gate.wait(|| {
                if !std::mem::take(&mut first)
                    && d.bytes_left.load(Ordering::Acquire) <= EARLY_WAKE_BYTES
                {
                    return None;
                }
                let now = Instant::now();
                let until = end.min(d.deadline);
                parked_until = Some(until);
                (now < until).then(|| until - now)
            });
            if ended && parked_until.is_some_and(|u| Instant::now() >= u) {
                // Every task had ended, yet the sleep ran to its limit: the wake-up was
                // lost. The gate's protocol rules this out; the count proves it in use.
                self.engine
                    .batches
                    .late_wakeups
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    batch = self.index,
                    "a batch wait slept to its deadline after its tasks ended"
                );
            }
            spin_until = Instant::now() + EARLY_WAKE_SPIN;
        }
        self.outcome(&d)
    }

    fn outcome(&self, d: &SlotData) -> Result<()> {
        let now = Instant::now();
        let mut first = None;
        let (mut failed, mut timed_out) = (0, 0);
        for i in 0..d.ntasks() {
            match d.status(i, now) {
                TaskStatus::Failed(r) => {
                    failed += 1;
                    first.get_or_insert((i, r));
                }
                TaskStatus::TimedOut => {
                    timed_out += 1;
                    first.get_or_insert((i, FailReason::TimedOut));
                }
                _ => {}
            }
        }
        match first {
            None => Ok(()),
            Some((first_task, first_reason)) => Err(Error::TasksFailed {
                total: d.ntasks(),
                failed,
                timed_out,
                first_task,
                first_reason,
            }),
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.engine.batches.release(self.index, &self.slot);
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("id", &self.id())
            .field("progress", &self.poll())
            .finish()
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
mod tests {
    use super::*;
    use ferry_transport_api::Protocol;

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
        let device = FailReason::Device {
            transport: Protocol::Efa,
            code: 265,
        };
        assert_eq!(
            t.report(Err(device)),
            Reported::Failed(FailReason::ConnectionLost)
        );

        let t = task(2);
        assert_eq!(t.report(Err(device)), Reported::Pending);
        assert_eq!(
            t.report(Err(FailReason::TimedOut)),
            Reported::Failed(device)
        );

        let t = task(2);
        assert_eq!(t.report(Ok(1)), Reported::Pending);
        assert_eq!(t.report(Ok(1)), Reported::Completed);
        assert!(t.finish(DONE));
        assert!(!t.finish(FAILED), "a task ends once");
    }
}
