//! The public handles: [`BatchBuilder`] checks and routes requests into a slot,
//! [`Batch`] polls and waits on it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport_api::sync::EndGate;
use ferry_transport_api::{Connection, FailReason, Opcode};

use super::table::{
    BatchId, BatchTable, Progress, Slot, SlotData, TaskSpec, TaskStatus, EARLY_WAKE_BYTES,
    LOST_WAKE_SLACK,
};
use crate::memory::Buffer;
use crate::peer::{Peers, RemoteBuffer};
use crate::registry::Registry;
use crate::{Error, Result};

use ferry_transport_api::instant_after as after;

/// Most connections one waiter drives (the first distinct ones of its batch's tasks): a
/// fixed array, so that waiting allocates nothing.
const MAX_DRIVEN: usize = 8;

/// The connections the waiting thread receives answers on while it spins (see
/// [`Connection::start_driving`]); dropping it hands receiving back to the transports.
struct Driving<'a> {
    conns: [Option<&'a dyn Connection>; MAX_DRIVEN],
}

impl<'a> Driving<'a> {
    /// Starts driving the paths of the batch's tasks (each connection once, at most
    /// [`MAX_DRIVEN`]), where their transports allow it.
    fn start(d: &'a SlotData) -> Self {
        let mut conns: [Option<&'a dyn Connection>; MAX_DRIVEN] = [None; MAX_DRIVEN];
        let mut seen: [Option<&'a dyn Connection>; MAX_DRIVEN] = [None; MAX_DRIVEN];
        let mut n = 0;
        for spec in &d.specs {
            let conn = spec.peer.path(spec.leg).conn();
            let known = seen[..n].iter().flatten().any(|c| {
                std::ptr::addr_eq(*c as *const dyn Connection, conn as *const dyn Connection)
            });
            if known {
                continue;
            }
            seen[n] = Some(conn);
            if conn.start_driving() {
                conns[n] = Some(conn);
            }
            n += 1;
            if n == MAX_DRIVEN {
                break;
            }
        }
        Driving { conns }
    }

    fn drive(&self) {
        for conn in self.conns.iter().flatten() {
            conn.drive();
        }
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        for conn in self.conns.iter_mut().filter_map(Option::take) {
            conn.stop_driving();
        }
    }
}

/// How long a waiter woken early spins before it parks again.
const EARLY_WAKE_SPIN: Duration = Duration::from_millis(2);

/// Collects requests for one batch; [`submit`](Self::submit) posts them all.
///
/// Requests are checked as they are added (bounds on both sides, the peer's access
/// rights), so a batch that submits only carries requests that can succeed.
///
/// It owns a handle on the engine's state, so it may be stored (by a language binding,
/// say) apart from the [`Engine`](crate::Engine) it came from.
pub struct BatchBuilder {
    table: Arc<BatchTable>,
    registry: Arc<Registry>,
    peers: Arc<Peers>,
    index: u32,
    slot: Option<Arc<Slot>>,
    generation: u32,
    timeout: Duration,
    retry_over_tcp: bool,
}

impl BatchBuilder {
    pub(crate) fn new(
        table: &Arc<BatchTable>,
        registry: &Arc<Registry>,
        peers: &Arc<Peers>,
    ) -> Self {
        let (index, slot, generation) = table.acquire();
        BatchBuilder {
            table: Arc::clone(table),
            registry: Arc::clone(registry),
            peers: Arc::clone(peers),
            index,
            slot: Some(slot),
            generation,
            timeout: table.defaults.timeout,
            retry_over_tcp: table.defaults.retry_over_tcp,
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
        if !Arc::ptr_eq(&local.inner.registry, &self.registry) {
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
        // A peer that went away (restarted, or its descriptor out of date) is opened
        // again by name, and the buffer found again in what it publishes now: a handle
        // the caller kept follows the peer across restarts.
        let (peer, buffer) = match self.peers.current(&remote.segment.inner, remote.index())? {
            Some(found) => found,
            None => (remote.segment.inner.clone(), remote.index()),
        };
        let desc = &peer.descriptor().buffers[buffer];
        if remote_offset
            .checked_add(len as u64)
            .is_none_or(|end| end > desc.len)
        {
            return Err(Error::InvalidRequest(format!(
                "remote range {remote_offset}+{len} runs past the remote buffer's {} bytes",
                desc.len
            )));
        }
        if !desc.access.allows(op) {
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
        let remote_base = desc.addr;
        let leg = peer.path_for(local.descriptor(), buffer)?;
        let remote_keys = peer
            .path(leg)
            .keys(buffer)
            .cloned()
            .ok_or_else(|| Error::InvalidRequest("the remote buffer has no key".into()))?;
        let slot = self.slot.as_ref().ok_or(Error::StaleBatch)?;
        let mut d = slot.data.write();
        if d.specs.len() >= EndGate::MAX_OPEN as usize {
            return Err(Error::InvalidRequest(format!(
                "a batch holds at most {} requests",
                EndGate::MAX_OPEN
            )));
        }
        d.pins.push(local.memory().clone());
        d.specs.push(TaskSpec {
            op,
            local: Arc::downgrade(local.memory()),
            local_offset,
            peer,
            buffer,
            remote_addr,
            remote_base,
            remote_keys,
            len,
            leg,
        });
        drop(d);
        Ok(self)
    }

    /// Posts every request and returns the batch's handle. The deadline starts now.
    pub fn submit(mut self) -> Result<Batch> {
        let slot = self.slot.take().ok_or(Error::StaleBatch)?;
        if self.registry.is_shut_down() {
            self.table.release(self.index, &slot);
            return Err(Error::Shutdown);
        }
        let deadline = after(Instant::now(), self.timeout);
        let spins = !self.table.defaults.busy_poll.is_zero();
        slot.data.write().arm(deadline, self.retry_over_tcp, spins);
        slot.data.read().post_all();
        // Posted: the slices in flight hold the memory now, and a finished batch none.
        slot.data.write().pins.clear();
        tracing::trace!(batch = self.index, "submitted");
        Ok(Batch {
            table: self.table.clone(),
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
            self.table.release(self.index, &slot);
        }
    }
}

/// A submitted batch. Dropping it releases its slot at once (transfers still in flight
/// finish in the background and are ignored).
pub struct Batch {
    table: Arc<BatchTable>,
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
        let end = after(start, timeout);
        let d = self.slot.data.read();
        let mut spin_until = after(start, self.table.defaults.busy_poll);
        // While it spins, the waiter receives its answers itself where the transport
        // lets it (and stops before it sleeps).
        let mut driving: Option<Driving<'_>> = None;
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
                driving.get_or_insert_with(|| Driving::start(&d)).drive();
                std::thread::yield_now();
                continue;
            }
            driving = None;
            // Sleep until the last task ends (the gate cannot lose that wake-up), the
            // batch's deadline, the caller's timeout, or an early nudge when little is
            // left, which is followed by a short spin. A waiter that may not spin
            // (`busy_poll` zero) is not nudged, and sleeps on through any other early
            // wake-up.
            let mut first = true;
            let mut parked_until = None;
            let ended = d.gate.wait(|| {
                if !std::mem::take(&mut first)
                    && d.early_wake
                    && d.bytes_left.load(Ordering::Acquire) <= EARLY_WAKE_BYTES
                {
                    return None;
                }
                let now = Instant::now();
                let until = end.min(d.deadline);
                parked_until = Some(until);
                (now < until).then(|| until - now)
            });
            let overslept = parked_until
                .filter(|&u| Instant::now() >= u)
                .is_some_and(|u| d.ended_at().is_some_and(|at| at + LOST_WAKE_SLACK <= u));
            // A wake-up the last task's ender owed this waiter came late (the scheduler
            // ran it after its limit): counted apart, not lost.
            if ended && overslept && d.gate.owed() {
                self.table.woken_late.fetch_add(1, Ordering::Relaxed);
            } else if ended && overslept {
                // Every task had ended well before the sleep's limit, yet the sleep ran
                // to it: the wake-up was lost. The gate's protocol rules this out; the
                // count proves it in use.
                self.table.late_wakeups.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    batch = self.index,
                    "a batch wait slept to its deadline after its tasks ended"
                );
            }
            if d.early_wake {
                spin_until = Instant::now() + EARLY_WAKE_SPIN;
            }
        }
        outcome(&d)
    }
}

fn outcome(d: &SlotData) -> Result<()> {
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

impl Drop for Batch {
    fn drop(&mut self) {
        self.slot.data.read().account();
        self.table.release(self.index, &self.slot);
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
