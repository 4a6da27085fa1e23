//! The operation contexts of one rail: transport-api's operation table, plus the
//! `fi_context` each entry lends libfabric.
//!
//! An entry's `fi_context` is memory libfabric may use while the operation is in flight
//! (`FI_CONTEXT` mode): it is allocated once, never moves, and its address is how a
//! completion names the operation (checked by address, never dereferenced). The
//! bookkeeping (the slice, the generation, the phase, the deadline sweep) is
//! [`OpTable`]'s.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Instant;

pub use ferry_transport_api::ops::OpStats;
use ferry_transport_api::ops::{Link, OpRef, OpTable};
pub(crate) use ferry_transport_api::ops::{Outcomes, OUTCOMES};
use ferry_transport_api::Slice;
use libfabric_sys as fi;

/// The operation contexts of one rail.
pub(crate) struct OpSlab {
    table: OpTable,
    /// `capacity` contexts from one leaked `Box<[fi_context]>`, freed in `Drop`. Written by
    /// the slab only while their entry is free (before the provider is handed it), by
    /// the provider only while it is not; never read by ferry.
    contexts: NonNull<fi::fi_context>,
    capacity: usize,
}

// SAFETY: the contexts are plain memory handed to the provider by address; the slab
// writes one only while its entry is free (the provider does not hold it then) and never
// reads them. Everything else is the table's, which is Send and Sync.
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
        let table = OpTable::new(capacity, lose);
        let capacity = table.capacity();
        let contexts: Box<[fi::fi_context]> =
            (0..capacity).map(|_| fi::fi_context::default()).collect();
        let contexts = NonNull::from(Box::leak(contexts)).cast::<fi::fi_context>();
        OpSlab {
            table,
            contexts,
            capacity,
        }
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

    /// Takes a free context for `slice` and marks it in flight; returns the context to
    /// pass to libfabric, or the slice back when every context is in use.
    pub(crate) fn acquire(
        &self,
        slice: Slice,
        link: Option<Arc<Link>>,
    ) -> Result<(OpRef, *mut c_void), Slice> {
        let op = self.table.acquire(slice, link, [None, None])?;
        let ctx = self.context(op.index);
        // SAFETY: the entry was free, so the provider does not hold this context; it is
        // in bounds and aligned (an element of the contexts allocation).
        unsafe {
            ctx.cast::<fi::fi_context>()
                .write(fi::fi_context::default())
        };
        Ok((op, ctx))
    }

    /// The connection of the operation whose context is `ctx`, while the provider holds
    /// it (for naming the peer of a failed operation).
    pub(crate) fn link_of(&self, ctx: *mut c_void) -> Option<Arc<Link>> {
        self.table.link_of(self.index_of(ctx)?)
    }

    /// Takes back an operation the provider refused: see [`OpTable::reclaim`].
    pub(crate) fn reclaim(&self, op: OpRef) -> Option<(Slice, bool)> {
        self.table.reclaim(op)
    }

    /// Handles completions read from the queue: `(context, None)` for a success,
    /// `(context, Some(code))` for a fabric error. At most [`OUTCOMES`].
    pub(crate) fn finish(
        &self,
        done: impl IntoIterator<Item = (*mut c_void, Option<i32>)>,
        out: &mut Outcomes,
    ) {
        // A context that is not one of the slab's names an entry out of range: stray.
        let named = done.into_iter().map(|(ctx, error)| {
            let index = self.index_of(ctx).unwrap_or(u32::MAX);
            (index, None, error.map(crate::fabric_error))
        });
        let stray = self.table.finish(named, out);
        if stray > 0 {
            tracing::warn!(
                completions = stray,
                "libfabric completions name no ferry operation in flight; ignored"
            );
        }
    }

    /// Whether a deadline of an operation in flight may have passed by `now`.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.table.due(now)
    }

    /// Whether any operation is in flight (not yet reported).
    pub(crate) fn busy(&self) -> bool {
        self.table.busy()
    }

    /// Ends the operations in flight whose deadline passed: see [`OpTable::expire`].
    pub(crate) fn expire(&self, now: Instant, out: &mut Outcomes) -> bool {
        self.table.expire(now, out)
    }

    /// After the endpoint is closed: see [`OpTable::close`].
    pub(crate) fn close(&self, out: &mut Outcomes) -> bool {
        self.table.close(out)
    }

    /// Operations in flight whose completion the provider may still deliver.
    pub(crate) fn awaiting(&self) -> usize {
        self.table.awaiting()
    }

    pub(crate) fn stats(&self) -> OpStats {
        self.table.stats()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_transport_api::testing::Recorder;
    use ferry_transport_api::{CompletionToken, Opcode, RemoteKeys};

    use super::*;

    fn slice(task: u32, deadline: Instant) -> Slice {
        Slice {
            op: Opcode::Write,
            local: ferry_transport_api::testing::host_region(vec![0; 4096]),
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

    fn finish_one(slab: &OpSlab, ctx: *mut c_void, error: Option<i32>, to: &Recorder) {
        let mut out = Outcomes::new();
        slab.finish([(ctx, error)], &mut out);
        out.deliver(to);
    }

    /// Contexts name operations by address; the table's bookkeeping behind them is
    /// tested in transport-api.
    #[test]
    fn contexts_name_operations_and_are_reused() {
        let slab = OpSlab::new(2, 0);
        let rec = Recorder::new();
        let later = Instant::now() + Duration::from_secs(60);
        let (_, a) = slab.acquire(slice(1, later), None).unwrap();
        let (_, b) = slab.acquire(slice(2, later), None).unwrap();
        assert_ne!(a, b);
        assert!(slab.acquire(slice(3, later), None).is_err(), "slab is full");
        finish_one(&slab, a, None, &rec);
        finish_one(&slab, b, Some(5), &rec);
        // A duplicate completion for a freed context changes nothing.
        finish_one(&slab, a, None, &rec);
        let got: Vec<_> = rec
            .take(0, 2)
            .into_iter()
            .map(|(t, r)| (t.task, r))
            .collect();
        assert!(got.contains(&(1, Ok(101))), "{got:?}");
        assert!(got.contains(&(2, Err(crate::fabric_error(5)))), "{got:?}");
        let st = slab.stats();
        assert_eq!((st.in_flight, st.completed, st.stray), (0, 2, 1));
        let (_, c) = slab.acquire(slice(4, later), None).unwrap();
        assert!(c == a || c == b);
        assert_eq!(slab.stats().allocations, 1);
    }

    #[test]
    fn a_foreign_context_is_ignored() {
        let slab = OpSlab::new(2, 0);
        let rec = Recorder::new();
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
        assert_eq!(rec.pending(0), 0);
    }
}
