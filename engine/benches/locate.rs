//! Finding the published buffer that holds a peer's address (`Segment::locate`): how an
//! absolute virtual address (a KV block's pointer) becomes a request. Measured with 10
//! buffers and with 100,000 (a cache registered block by block).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use ferry_engine::{Access, Buffer, Engine, Location, Segment, Tcp, TcpConfig};

const BLOCK: usize = 256;

struct Setup {
    engine: Engine,
    segment: Segment,
    /// Addresses to look up, in a scattered order.
    addrs: Vec<u64>,
    /// Registered blocks: deregistered before `arena` is freed.
    blocks: Vec<Buffer>,
    arena: Vec<u8>,
}

fn setup(n: usize) -> Setup {
    let engine = Engine::builder()
        .transport(Tcp::new(TcpConfig::default()))
        .build()
        .expect("engine");
    let mut arena = vec![0u8; n * BLOCK];
    let base = arena.as_mut_ptr();
    let blocks: Vec<Buffer> = (0..n)
        .map(|i| {
            // SAFETY: each block lies inside `arena`, which outlives every `Buffer` (they
            // are dropped first, in `Setup::end`); nothing reads or writes the blocks.
            unsafe {
                engine.register(
                    base.add(i * BLOCK),
                    BLOCK,
                    Location::host(),
                    Access::RemoteReadWrite,
                )
            }
            .expect("register")
        })
        .collect();
    let segment = engine.open_segment(&engine.name()).expect("own segment");
    assert_eq!(segment.buffers().len(), n);
    let mut at = 1usize;
    let addrs = (0..n.min(4096))
        .map(|_| {
            at = (at * 48_271) % 2_147_483_647;
            blocks[at % n].addr() + 16
        })
        .collect();
    Setup {
        engine,
        segment,
        addrs,
        blocks,
        arena,
    }
}

impl Setup {
    fn end(self) {
        self.engine.shutdown();
        drop(self.segment);
        drop(self.blocks);
        drop(self.arena);
    }
}

fn locate(c: &mut Criterion) {
    let mut g = c.benchmark_group("segment");
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 100_000] {
        let s = setup(n);
        g.bench_function(BenchmarkId::new("locate", n), |b| {
            let mut i = 0;
            b.iter(|| {
                let addr = s.addrs[i % s.addrs.len()];
                i += 1;
                s.segment.locate(black_box(addr), 64).map(|(_, off)| off)
            })
        });
        s.end();
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    locate(&mut c);
    c.final_summary();
}
