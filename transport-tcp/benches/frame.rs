//! The TCP wire format's per-frame work: encoding a WRITE frame's header and request
//! descriptors on the initiator, decoding and checking them on the target. A frame of
//! 128 requests is a batch of 128 KV-cache blocks posted at once.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput};
use ferry_transport_tcp::bench::{self, Request, DESC, HEADER};

/// Requests of a frame: 64 KiB blocks at spread addresses under one region key.
fn requests(n: usize) -> Vec<Request> {
    (0..n as u64)
        .map(|i| {
            (
                0x7f00_0000_0000 + i * 0x1_0000,
                64 * 1024,
                0x9e37_79b9_7f4a_7c15,
            )
        })
        .collect()
}

fn header(c: &mut Criterion) {
    let mut g = c.benchmark_group("header");
    g.bench_function("encode", |b| {
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            bench::encode_header(black_box(128), seq)
        })
    });
    let encoded = bench::encode_header(128, 42);
    g.bench_function("decode", |b| {
        b.iter(|| bench::decode_header(black_box(&encoded)))
    });
    g.finish();
}

fn frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for n in [1usize, 128] {
        let reqs = requests(n);
        let mut buf = vec![0u8; HEADER + n * DESC];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("encode/{n}"), |b| {
            b.iter(|| bench::encode_write_frame(black_box(&reqs), 7, &mut buf))
        });
        let mut wire = vec![0u8; HEADER + n * DESC];
        bench::encode_write_frame(&reqs, 7, &mut wire);
        let mut out = Vec::with_capacity(n);
        g.bench_function(format!("decode/{n}"), |b| {
            b.iter(|| bench::decode_frame(black_box(&wire), &mut out))
        });
        assert_eq!(out, reqs, "the frame decodes to what was encoded");
        // Decoding into a fresh vector: what a target that did not keep its buffer pays.
        g.bench_function(format!("decode_alloc/{n}"), |b| {
            b.iter_batched(
                Vec::new,
                |mut v| {
                    bench::decode_frame(black_box(&wire), &mut v);
                    v
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    header(&mut c);
    frame(&mut c);
    c.final_summary();
}
