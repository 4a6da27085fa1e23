//! `cargo run --release -p ferry-mem-cuda --example staging_bench -- [DEVICE] [MIB]`
//!
//! The staging copy rate against the device's own host-device copy rate: first one large
//! copy between device memory and a pinned buffer of the same size (what the device can
//! do), then the same bytes through the staging pool's 256 KiB buffers, two at a time, the
//! way the TCP transport moves device memory (minus the socket). Prints one JSON object.

use std::ptr::NonNull;
use std::time::Instant;

use ferry_mem_cuda::{cuda, StagingPool};
use ferry_transport_api::{Location, RegionMemory, Staging, StagingBuffer};

const CHUNK: usize = 256 * 1024;
const REPS: usize = 5;

fn gbps(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 * REPS as f64 / seconds / 1e9
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let device: u32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(0);
    let len = args
        .get(1)
        .and_then(|a| a.parse::<usize>().ok())
        .unwrap_or(256)
        << 20;
    let c = match cuda() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("staging_bench: {e}");
            std::process::exit(1);
        }
    };
    let memory = c.alloc(device, len).unwrap_or_else(|e| {
        eprintln!("staging_bench: {e}");
        std::process::exit(1);
    });
    let ptr = NonNull::new(memory.ptr()).expect("device pointer");
    // SAFETY: `len` bytes of device memory owned by `memory`, moved into the region.
    let region =
        unsafe { RegionMemory::from_raw(ptr, len, Location::Cuda { device }, Box::new(memory)) };
    let at = Location::Cuda { device };
    let run = |b: &mut dyn StagingBuffer, down: bool, off: usize, n: usize| {
        if down {
            b.download(&region, off, n).unwrap();
        } else {
            b.upload(&region, off, n).unwrap();
        }
    };

    // The device's rate: one copy of the whole range.
    let whole = StagingPool::new(c, len);
    let mut big = whole.buffer(at).unwrap();
    let mut device_rate = [0.0; 2];
    for (i, down) in [true, false].into_iter().enumerate() {
        run(&mut *big, down, 0, len);
        big.wait().unwrap();
        let t = Instant::now();
        for _ in 0..REPS {
            run(&mut *big, down, 0, len);
            big.wait().unwrap();
        }
        device_rate[i] = gbps(len, t.elapsed().as_secs_f64());
    }

    // Through the pool: CHUNK-sized copies, two buffers in turn.
    let pool = StagingPool::new(c, CHUNK);
    let mut bufs = [pool.buffer(at).unwrap(), pool.buffer(at).unwrap()];
    let mut staged_rate = [0.0; 2];
    for (i, down) in [true, false].into_iter().enumerate() {
        let t = Instant::now();
        for _ in 0..REPS {
            for (k, off) in (0..len).step_by(CHUNK).enumerate() {
                let b = &mut bufs[k % 2];
                b.wait().unwrap();
                run(&mut **b, down, off, CHUNK.min(len - off));
            }
            for b in &mut bufs {
                b.wait().unwrap();
            }
        }
        staged_rate[i] = gbps(len, t.elapsed().as_secs_f64());
    }
    println!(
        "{{\"device\":{device},\"bytes\":{len},\"chunk\":{CHUNK},\
         \"device_d2h_gbps\":{:.2},\"device_h2d_gbps\":{:.2},\
         \"staged_d2h_gbps\":{:.2},\"staged_h2d_gbps\":{:.2},\
         \"ratio_d2h\":{:.2},\"ratio_h2d\":{:.2}}}",
        device_rate[0],
        device_rate[1],
        staged_rate[0],
        staged_rate[1],
        staged_rate[0] / device_rate[0],
        staged_rate[1] / device_rate[1]
    );
}
