//! The TCP transport's staging pipeline for device memory, without a GPU: regions tagged
//! `cuda:0` whose bytes are host memory the test owns, and a staging implementation that
//! copies them with the CPU. The pipeline under test (chunking, two buffers, device
//! payloads mixed with host payloads in one frame, on both sides, READ and WRITE) is the
//! transport's; `ferry-mem-cuda`'s real staging is tested on GPU hosts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_transport_api::testing::{
    contents, host_region, random, stand_in_device, CpuStaging, NoControl,
};
use ferry_transport_api::{
    Access, CompletionToken, Completions, Connection, FailReason, NoExchange, Opcode, RegionMemory,
    RemoteKeys, Slice, Staging, Transport, TransportContext,
};
use ferry_transport_tcp::{TcpConfig, TcpTransport};

struct Channel(Sender<(CompletionToken, Result<usize, FailReason>)>);

impl Completions for Channel {
    fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
        let _ = self.0.send((token, result));
    }
}

type Done = Receiver<(CompletionToken, Result<usize, FailReason>)>;

fn started(staging: &Arc<CpuStaging>) -> (TcpTransport, String, Done) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let t = TcpTransport::new(TcpConfig {
        max_slice: 256 * 1024,
        ..TcpConfig::default()
    });
    let ep = t
        .start(TransportContext {
            completions: Arc::new(Channel(tx)),
            control: Some(Arc::new(NoControl)),
            staging: Some(staging.clone() as Arc<dyn Staging>),
        })
        .unwrap();
    (t, ep.address, rx)
}

/// Posts `op` for every (local, remote) pair in one submission (one frame) and waits.
fn transfer(
    conn: &dyn Connection,
    done: &Done,
    op: Opcode,
    pairs: &[(&Arc<RegionMemory>, &Arc<RegionMemory>, u64)],
    len: usize,
) {
    for (i, (local, remote, key)) in pairs.iter().enumerate() {
        conn.post(Slice {
            op,
            local: (*local).clone(),
            local_offset: 1,
            remote_addr: remote.addr() + 3,
            remote_base: remote.addr(),
            remote_keys: RemoteKeys::single(*key),
            len,
            token: CompletionToken {
                slot: 0,
                generation: 0,
                task: i as u32,
            },
            deadline: Instant::now() + Duration::from_secs(30),
        })
        .unwrap();
    }
    conn.flush();
    for _ in pairs {
        let (t, r) = done
            .recv_timeout(Duration::from_secs(30))
            .expect("completion");
        assert_eq!(r, Ok(len), "task {}", t.task);
    }
}

#[test]
fn device_payloads_are_staged_on_both_sides_mixed_with_host_ones() {
    let staging = Arc::new(CpuStaging::default());
    let (target, address, _) = started(&staging);
    let (initiator, _, done) = started(&staging);
    let len = 200_003; // several chunks and a partial one, one slice
    let size = len + 8;
    let kinds = [(true, false), (false, true), (true, true), (false, false)];
    let regions: Vec<_> = kinds
        .iter()
        .map(|&(local_dev, remote_dev)| {
            let mk = |dev| {
                if dev {
                    stand_in_device(random(size))
                } else {
                    host_region(random(size))
                }
            };
            let (local, remote, back) = (mk(local_dev), mk(remote_dev), mk(local_dev));
            let key = target.register(&remote, Access::RemoteReadWrite).unwrap()[0];
            (local, remote, back, key)
        })
        .collect();
    let conn = initiator
        .connect(
            &ferry_transport_api::Endpoint {
                protocol: ferry_transport_api::Protocol::Tcp,
                address,
            },
            &NoExchange,
        )
        .unwrap();
    let wants: Vec<Vec<u8>> = regions.iter().map(|(local, ..)| contents(local)).collect();
    let writes: Vec<_> = regions.iter().map(|(l, r, _, k)| (l, r, *k)).collect();
    transfer(&*conn, &done, Opcode::Write, &writes, len);
    for ((_, remote, ..), want) in regions.iter().zip(&wants) {
        assert!(
            contents(remote)[3..3 + len] == want[1..1 + len],
            "{:?} target bytes",
            remote.location()
        );
    }
    let reads: Vec<_> = regions.iter().map(|(_, r, b, k)| (b, r, *k)).collect();
    transfer(&*conn, &done, Opcode::Read, &reads, len);
    for ((.., back, _), want) in regions.iter().zip(&wants) {
        assert!(
            contents(back)[1..1 + len] == want[1..1 + len],
            "{:?} read back",
            back.location()
        );
    }
    // Every staging buffer went back.
    assert_eq!(staging.stats().leased, 0);
    assert!(staging.stats().created[0].1 > 0);
    initiator.shutdown();
    target.shutdown();
}
