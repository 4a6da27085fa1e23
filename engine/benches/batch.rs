//! A batch's life through the public API, against the engine's own segment (requests
//! become memory copies checked like a peer's, through the same post-and-complete path as
//! any transport): take a batch slot, add the requests (each checked and routed), arm and
//! post them, complete every slice, wait, release the slot. With 64-byte requests the
//! copies are negligible and what is left is the engine's own cost per task; with 64 KiB
//! blocks the copies dominate. Blocks laid end to end and added in ascending order travel
//! as one slice per 1 MiB (`submit_wait_128`); added in descending order, each travels
//! alone (`submit_wait_128_desc`): the difference is what travelling together saves.
//!
//! `slicing` writes 1 MiB as slices of 4 KiB to 1 MiB (the TCP transport's `max_slice`):
//! the difference is the cost of cutting a request into slices and completing each.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use ferry_engine::{Access, Buffer, Engine, Location, RemoteBuffer, Tcp, TcpConfig};

const TASKS: usize = 128;

struct Setup {
    engine: Engine,
    src: Buffer,
    dst: RemoteBuffer,
    /// The destination's registration, kept for as long as requests name it.
    _dst: Buffer,
}

fn setup(max_slice: usize, len: usize) -> Setup {
    let engine = Engine::builder()
        .transport(Tcp::new(TcpConfig {
            max_slice,
            ..TcpConfig::default()
        }))
        .build()
        .expect("engine");
    let src = engine.allocate(len, Location::host()).expect("source");
    let dst_buffer = engine
        .allocate_with(len, Location::host(), Access::RemoteReadWrite, "dst")
        .expect("destination");
    let segment = engine.open_segment(&engine.name()).expect("own segment");
    let dst = segment.buffer_named("dst").expect("destination buffer");
    Setup {
        engine,
        src,
        dst,
        _dst: dst_buffer,
    }
}

/// Writes `tasks` requests of `block` bytes each, laid end to end and added first to last
/// (or last to first when `descending`), and waits for all of them.
fn write_batch(s: &Setup, tasks: usize, block: usize, descending: bool) {
    let mut batch = s.engine.batch();
    for i in 0..tasks {
        let off = if descending { tasks - 1 - i } else { i } * block;
        batch
            .write(&s.src, off, &s.dst, off as u64, block)
            .expect("a valid request");
    }
    let batch = batch.submit().expect("submitted");
    batch.wait(Duration::from_secs(10)).expect("completed");
}

fn batches(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    for block in [64usize, 64 * 1024] {
        let s = setup(1 << 20, TASKS * block);
        g.throughput(Throughput::Elements(TASKS as u64));
        for (name, descending) in [("submit_wait_128", false), ("submit_wait_128_desc", true)] {
            g.bench_function(BenchmarkId::new(name, format!("{block}B")), |b| {
                b.iter(|| write_batch(&s, TASKS, black_box(block), descending))
            });
        }
        s.engine.shutdown();
    }
    let s = setup(1 << 20, 64);
    g.throughput(Throughput::Elements(1));
    g.bench_function("submit_wait_1/64B", |b| {
        b.iter(|| write_batch(&s, 1, black_box(64), false))
    });
    s.engine.shutdown();
    g.finish();
}

fn slicing(c: &mut Criterion) {
    let mut g = c.benchmark_group("slicing");
    let len = 1 << 20;
    g.throughput(Throughput::Bytes(len as u64));
    for max_slice in [4 << 10, 64 << 10, 1 << 20] {
        let s = setup(max_slice, len);
        g.bench_function(
            BenchmarkId::new("write_1MiB", format!("{}KiB", max_slice >> 10)),
            |b| b.iter(|| write_batch(&s, 1, black_box(len), false)),
        );
        s.engine.shutdown();
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    batches(&mut c);
    slicing(&mut c);
    c.final_summary();
}
