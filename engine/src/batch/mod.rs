//! Batches: checked handles ([`handle`]) onto reusable slots ([`table`]). Per task, an
//! atomic count of slices still out and an atomic state; completions from transports
//! update them without blocking, and a poll only reads them. A slot's generation changes
//! when its batch is released, so a late completion for a released batch (or a stale
//! [`BatchId`]) touches nothing. Which path a request travels is the peer's business
//! (`peer.rs`); a batch only slices, posts and counts.

mod handle;
mod table;

pub use handle::{Batch, BatchBuilder};
pub(crate) use table::{progress_of, BatchDefaults, BatchTable};
pub use table::{BatchId, BatchStats, Progress, TaskStatus};
