//! Segment descriptors as peers exchange them: encoded (JSON) when the owner publishes,
//! decoded and checked when a peer opens the segment, then read for each buffer's keys.
//! Sizes: a GPU host's descriptor (8 buffers, a TCP key and 4 EFA rails each) and a KV
//! cache registered block by block (4,096 buffers).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use ferry_transport_api::{
    Access, BufferDescriptor, Endpoint, Location, Protocol, SegmentDescriptor, TransportKey,
};

const RAILS: u64 = 4;

fn descriptor(buffers: usize) -> SegmentDescriptor {
    SegmentDescriptor {
        name: "10.0.12.7:17800".into(),
        incarnation: 0x1d2c_3b4a_5968_7786,
        endpoints: vec![
            Endpoint {
                protocol: Protocol::Efa,
                address: (0..RAILS)
                    .map(|r| format!("fe80000000000000{r:02x}a1b2c3d4e5f6a7b8c9d0e1f2"))
                    .collect::<Vec<_>>()
                    .join(","),
            },
            Endpoint {
                protocol: Protocol::Tcp,
                address: "10.0.12.7:17800".into(),
            },
        ],
        buffers: (0..buffers as u64)
            .map(|i| BufferDescriptor {
                name: format!("kv-layer-{i}"),
                addr: 0x7f3a_0000_0000 + i * (64 << 20),
                len: 64 << 20,
                location: if i % 2 == 0 {
                    Location::host()
                } else {
                    Location::Cuda {
                        device: (i % 8) as u32,
                    }
                },
                access: Access::RemoteReadWrite,
                keys: (0..RAILS)
                    .map(|r| TransportKey {
                        protocol: Protocol::Efa,
                        key: 0xa5a5_0000_0000_0000 | (i << 8) | r,
                    })
                    .chain([TransportKey {
                        protocol: Protocol::Tcp,
                        key: 0x5a5a_0000_0000_0000 | i,
                    }])
                    .collect(),
            })
            .collect(),
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("descriptor");
    for n in [8usize, 4096] {
        let d = descriptor(n);
        let encoded = serde_json::to_vec(&d).expect("encode");
        g.throughput(Throughput::Bytes(encoded.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", n), &d, |b, d| {
            b.iter(|| serde_json::to_vec(black_box(d)).expect("encode"))
        });
        g.bench_with_input(
            BenchmarkId::new("decode_validate", n),
            &encoded,
            |b, bytes| {
                b.iter(|| {
                    let d: SegmentDescriptor =
                        serde_json::from_slice(black_box(bytes)).expect("decode");
                    d.validate().expect("valid");
                    d
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("validate", n), &d, |b, d| {
            b.iter(|| black_box(d).validate())
        });
    }
    g.finish();
}

/// Each buffer's keys for one transport: what opening a segment does for every buffer
/// and path.
fn keys(c: &mut Criterion) {
    let d = descriptor(8);
    let b0 = &d.buffers[0];
    let mut g = c.benchmark_group("buffer_keys");
    g.bench_function("keys_of/efa_4_rails", |b| {
        b.iter(|| black_box(b0).keys_of(Protocol::Efa))
    });
    g.bench_function("key/tcp", |b| b.iter(|| black_box(b0).key(Protocol::Tcp)));
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    codec(&mut c);
    keys(&mut c);
    c.final_summary();
}
