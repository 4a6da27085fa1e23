//! A transport's table of operations in flight (`ops::OpTable`): every slice a fabric
//! transport posts takes an entry, and every completion it reads gives one back and
//! reports the slice. Measured per operation, and per completion-queue read of 64.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use ferry_transport_api::ops::{OpTable, Outcomes, OUTCOMES};
use ferry_transport_api::{
    CompletionToken, Completions, FailReason, Location, Opcode, RegionMemory, RemoteKeys, Slice,
};

/// Counts reports, as cheaply as a completion handler can.
#[derive(Default)]
struct Count(AtomicU64);

impl Completions for Count {
    fn complete(&self, _: CompletionToken, result: Result<usize, FailReason>) {
        if result.is_ok() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn region(len: usize) -> Arc<RegionMemory> {
    let mut bytes = vec![0u8; len].into_boxed_slice();
    let ptr = NonNull::new(bytes.as_mut_ptr()).expect("a boxed slice is never null");
    // SAFETY: the boxed slice moves into the region as its owner, so the bytes live at a
    // fixed address as long as the region; the table never reads them.
    Arc::new(unsafe { RegionMemory::from_raw(ptr, len, Location::host(), Box::new(bytes)) })
}

fn slice(local: &Arc<RegionMemory>, keys: &RemoteKeys, task: u32, deadline: Instant) -> Slice {
    Slice {
        op: Opcode::Write,
        local: local.clone(),
        local_offset: 0,
        remote_addr: 0x7f00_0000_0000,
        remote_base: 0x7f00_0000_0000,
        remote_keys: keys.clone(),
        len: 64 * 1024,
        token: CompletionToken {
            slot: 0,
            generation: 0,
            task,
        },
        deadline,
    }
}

fn ops(c: &mut Criterion) {
    let table = OpTable::new(1024, 0);
    let local = region(64 * 1024);
    let keys = RemoteKeys::new(vec![1, 2, 3, 4]).expect("keys");
    let to = Count::default();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut out = Outcomes::new();
    let mut g = c.benchmark_group("op_table");
    g.throughput(Throughput::Elements(1));
    g.bench_function("acquire_finish_deliver/1", |b| {
        b.iter(|| {
            let op = table
                .acquire(slice(&local, &keys, 0, deadline), None, [None, None])
                .map_err(|_| ())
                .expect("a free entry");
            table.finish([(op.index, Some(op.generation), None)], &mut out);
            out.deliver(&to)
        })
    });
    let n = OUTCOMES;
    g.throughput(Throughput::Elements(n as u64));
    let mut posted = Vec::with_capacity(n);
    g.bench_function(format!("acquire_finish_deliver/{n}"), |b| {
        b.iter(|| {
            posted.clear();
            for task in 0..n as u32 {
                let op = table
                    .acquire(slice(&local, &keys, task, deadline), None, [None, None])
                    .map_err(|_| ())
                    .expect("a free entry");
                posted.push((op.index, Some(op.generation), None));
            }
            table.finish(posted.drain(..), &mut out);
            out.deliver(&to)
        })
    });
    g.finish();
    assert!(to.0.load(Ordering::Relaxed) > 0);
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    ops(&mut c);
    c.final_summary();
}
