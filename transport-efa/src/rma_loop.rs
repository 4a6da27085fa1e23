//! The baseline for the transport's throughput: a minimal libfabric RMA loop. Two
//! endpoints of one provider (in this process), a window of outstanding `fi_writemsg`
//! or `fi_read` operations of one block size, refilled as completions arrive. No engine,
//! no batches, no slicing: what the provider itself moves.
#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport_api::{
    Access, CompletionToken, Completions, FailReason, Location, Opcode, RegionMemory, RemoteKeys,
    Slice, TransportError,
};

use crate::fabric::open_rails;
use crate::EfaConfig;

/// What one run of the loop moved.
#[derive(Clone, Copy, Debug)]
pub struct LoopResult {
    /// Bytes completed.
    pub bytes: u64,
    /// Seconds measured.
    pub seconds: f64,
    /// Operations that failed.
    pub errors: u64,
}

impl LoopResult {
    /// 10^9 bytes per second.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }
}

#[derive(Default)]
struct Count {
    done: AtomicU64,
    failed: AtomicU64,
}

impl Completions for Count {
    fn complete(&self, _token: CompletionToken, result: Result<usize, FailReason>) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.done.fetch_add(1, Ordering::Release);
    }
}

pub(crate) fn region(len: usize) -> Arc<RegionMemory> {
    let mut bytes = vec![0x5au8; len].into_boxed_slice();
    let ptr = NonNull::new(bytes.as_mut_ptr()).expect("a boxed slice is not null");
    // SAFETY: the boxed slice moves into the region as its owner and lives as long.
    Arc::new(unsafe { RegionMemory::from_raw(ptr, len, Location::host(), Box::new(bytes)) })
}

/// Runs the loop for `duration` with `window` operations of `block` bytes outstanding,
/// cycling over `span` bytes of the target's buffer.
pub fn rma_loop(
    config: &EfaConfig,
    op: Opcode,
    block: usize,
    window: usize,
    span: usize,
    duration: Duration,
) -> Result<LoopResult, TransportError> {
    let stop = Arc::new(AtomicBool::new(false));
    let sink: Arc<Count> = Arc::new(Count::default());
    let idle: Arc<Count> = Arc::new(Count::default());
    let open = |completions: Arc<dyn Completions>| {
        open_rails(config, 1, &completions, &stop).map(|mut rails| rails.remove(0))
    };
    let target = open(idle)?;
    let initiator = open(sink.clone())?;
    let span = span.max(block);
    let remote = region(span);
    let local = region(span);
    let remote_mr = target.register(&remote, Access::RemoteReadWrite)?;
    let local_mr = initiator.register(&local, Access::Local)?;
    let peer = initiator.insert_peer(&target.address_hex())?;
    let blocks = (span / block).max(1);
    let deadline = Instant::now() + duration + Duration::from_secs(60);
    let mut posted = 0u64;
    let post = |i: u64| {
        let off = (i as usize % blocks) * block;
        let slice = Slice {
            op,
            local: local.clone(),
            local_offset: off,
            remote_addr: remote.addr() + off as u64,
            remote_base: remote.addr(),
            remote_keys: RemoteKeys::single(remote_mr.key()),
            len: block,
            token: CompletionToken {
                slot: 0,
                generation: 0,
                task: 0,
            },
            deadline,
        };
        initiator
            .post(peer, &local_mr, remote_mr.key(), slice, None)
            .is_ok()
    };
    // Warm up (connections, caches), then measure.
    for i in 0..window as u64 {
        if post(i) {
            posted += 1;
        }
    }
    while sink.done.load(Ordering::Acquire) < posted {
        std::hint::spin_loop();
    }
    let base = sink.done.load(Ordering::Acquire);
    let start = Instant::now();
    let end = start + duration;
    while Instant::now() < end {
        let done = sink.done.load(Ordering::Acquire);
        if posted - done < window as u64 {
            if post(posted) {
                posted += 1;
            }
        } else {
            std::hint::spin_loop();
        }
    }
    while sink.done.load(Ordering::Acquire) < posted && Instant::now() < deadline {
        std::hint::spin_loop();
    }
    let seconds = start.elapsed().as_secs_f64();
    let completed = sink.done.load(Ordering::Acquire) - base;
    stop.store(true, Ordering::Release);
    drop(remote_mr);
    drop(local_mr);
    initiator.stop_progress();
    target.stop_progress();
    Ok(LoopResult {
        bytes: completed * block as u64,
        seconds,
        errors: sink.failed.load(Ordering::Relaxed),
    })
}
