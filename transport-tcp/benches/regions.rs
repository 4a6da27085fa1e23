//! The target's region table: every request a peer sends is resolved here (key, bounds,
//! access) before a byte moves, under the table's read lock. Measured with 10 regions
//! (a small engine) and 100,000 (a KV cache registered block by block).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput};
use ferry_transport_api::testing::host_region;
use ferry_transport_api::{Access, Opcode, RegionMemory};
use ferry_transport_tcp::bench::Regions;

const REGION: usize = 256;

struct Table {
    regions: Regions,
    /// Keeps the regions' memory.
    _memory: Vec<Arc<RegionMemory>>,
    /// Requests to resolve, in a scattered order: (address, length, key).
    requests: Vec<(u64, u64, u64)>,
}

/// A table of `n` regions and `n.min(4096)` requests into them, visited out of order
/// (consecutive requests land in unrelated regions, as a frame of blocks from all over a
/// cache does).
fn table(n: usize) -> Table {
    let regions = Regions::default();
    let memory: Vec<_> = (0..n).map(|_| host_region(vec![0u8; REGION])).collect();
    let keys: Vec<u64> = memory
        .iter()
        .map(|m| regions.insert(m, Access::RemoteReadWrite))
        .collect();
    let mut at = 1usize;
    let requests = (0..n.min(4096))
        .map(|_| {
            // Multiplicative stepping: a fixed, scattered walk over the regions.
            at = (at * 48_271) % 2_147_483_647;
            let i = at % n;
            (memory[i].addr() + 64, 128, keys[i])
        })
        .collect();
    Table {
        regions,
        _memory: memory,
        requests,
    }
}

fn resolve(c: &mut Criterion) {
    let mut g = c.benchmark_group("regions");
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 100_000] {
        let t = table(n);
        g.bench_with_input(BenchmarkId::new("resolve", n), &t, |b, t| {
            let mut i = 0;
            b.iter(|| {
                let (addr, len, key) = t.requests[i % t.requests.len()];
                i += 1;
                let r = t
                    .regions
                    .resolve(Opcode::Write, black_box(addr), len, key, false);
                debug_assert!(r.is_ok());
                r
            })
        });
        // A stale key: the refused path also walks the address index to tell a wrong key
        // from an unregistered address.
        g.bench_with_input(BenchmarkId::new("refuse_stale_key", n), &t, |b, t| {
            let mut i = 0;
            b.iter(|| {
                let (addr, len, key) = t.requests[i % t.requests.len()];
                i += 1;
                t.regions
                    .resolve(Opcode::Write, black_box(addr), len, key ^ 1, false)
            })
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    resolve(&mut c);
    c.final_summary();
}
