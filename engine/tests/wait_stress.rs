//! Many small batches waited on by parked threads: no wait may sleep to its deadline
//! after its tasks ended (a lost wake-up). The count is asserted, not a time.

mod common;

use std::time::Duration;

use common::{assert_bytes_eq, engine_with, random};
use ferry_engine::{Location, TcpConfig};

/// Threads submitting at once; with two vCPUs, completions and waits land on both.
const THREADS: usize = 4;
/// Batches per thread.
const BATCHES: usize = 2500;
const BLOCK: usize = 4096;

#[test]
fn no_wait_outlives_its_completed_tasks() {
    // No spinning: every wait parks, so every completion has to wake its waiter.
    let quiet = TcpConfig {
        busy_poll: Duration::ZERO,
        ..TcpConfig::default()
    };
    let target = engine_with(quiet.clone());
    let initiator = engine_with(quiet);
    let kv = target
        .allocate(THREADS * 4 * BLOCK, Location::host())
        .unwrap();
    let seed = random(THREADS * 4 * BLOCK);
    kv.write_at(0, &seed).unwrap();
    let segment = initiator.open_segment(&target.name()).unwrap();
    let remote = segment.buffer(0).unwrap();

    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (initiator, remote, seed) = (&initiator, &remote, &seed);
            s.spawn(move || {
                let local = initiator.allocate(4 * BLOCK, Location::host()).unwrap();
                let base = (t * 4 * BLOCK) as u64;
                for i in 0..BATCHES {
                    // 1 to 4 READs of one block each; every 16th, a WRITE batch after it.
                    let n = 1 + i % 4;
                    let mut b = initiator.batch().timeout(Duration::from_secs(5));
                    for k in 0..n {
                        b.read(&local, k * BLOCK, remote, base + (k * BLOCK) as u64, BLOCK)
                            .unwrap();
                    }
                    let batch = b.submit().unwrap();
                    batch.wait(Duration::from_secs(60)).unwrap();
                    if i % 16 == 0 {
                        // Writes back the block just read: the target's bytes stay
                        // the seed, and WRITE acknowledgements are waited on too.
                        let mut b = initiator.batch().timeout(Duration::from_secs(5));
                        b.write(&local, 0, remote, base, BLOCK).unwrap();
                        b.submit().unwrap().wait(Duration::from_secs(60)).unwrap();
                    }
                }
                let mut back = vec![0u8; 4 * BLOCK];
                local.read_at(0, &mut back).unwrap();
                let at = t * 4 * BLOCK;
                assert_bytes_eq(&back, &seed[at..at + 4 * BLOCK], "blocks read back");
            });
        }
    });
    assert_eq!(
        initiator.batch_stats().late_wakeups,
        0,
        "waits slept to their deadline although every task had ended"
    );
}
