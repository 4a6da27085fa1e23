//! The TCP transport's staging pipeline for device memory, without a GPU: regions tagged
//! `cuda:0` whose bytes are host memory the test owns, and a staging implementation that
//! copies them with the CPU. The pipeline under test (chunking, two buffers, device
//! payloads mixed with host payloads in one frame, on both sides, READ and WRITE) is the
//! transport's; `ferry-mem-cuda`'s real staging is tested on GPU hosts.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_transport_api::{
    Access, CompletionToken, Completions, Connection, ControlPlane, FailReason, Location, Opcode,
    RegionMemory, RemoteKeys, Slice, Staging, StagingBuffer, StagingStats, Transport,
    TransportContext, TransportError,
};
use ferry_transport_tcp::{TcpConfig, TcpTransport};

const CHUNK: usize = 64 * 1024;

/// Bytes standing in for device memory: owned here, addressed through the region.
fn stand_in_device(len: usize) -> Arc<RegionMemory> {
    let mut bytes = vec![0u8; len].into_boxed_slice();
    let ptr = NonNull::new(bytes.as_mut_ptr()).unwrap();
    // SAFETY: the boxed slice moves into the region as its owner.
    Arc::new(unsafe {
        RegionMemory::from_raw(ptr, len, Location::Cuda { device: 0 }, Box::new(bytes))
    })
}

fn host(len: usize) -> Arc<RegionMemory> {
    let mut bytes = vec![0u8; len].into_boxed_slice();
    let ptr = NonNull::new(bytes.as_mut_ptr()).unwrap();
    // SAFETY: as above.
    Arc::new(unsafe { RegionMemory::from_raw(ptr, len, Location::host(), Box::new(bytes)) })
}

/// Copies out of a stand-in device region.
fn device_read(r: &RegionMemory, offset: usize, out: &mut [u8]) {
    assert!(r.contains(offset, out.len()));
    // SAFETY: stand-in regions are host memory owned by the region (see above), in
    // bounds (checked); the transport copies one staging buffer at a time.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (r.addr() as usize as *const u8).add(offset),
            out.as_mut_ptr(),
            out.len(),
        )
    }
}

/// Copies into a stand-in device region.
fn device_write(r: &RegionMemory, offset: usize, data: &[u8]) {
    assert!(r.contains(offset, data.len()));
    // SAFETY: as in `device_read`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            data.as_ptr(),
            (r.addr() as usize as *mut u8).add(offset),
            data.len(),
        )
    }
}

fn bytes_of(r: &RegionMemory) -> Vec<u8> {
    let mut v = vec![0u8; r.len()];
    if r.location().is_host() {
        assert!(r.copy_to_slice_at(0, &mut v));
    } else {
        device_read(r, 0, &mut v);
    }
    v
}

fn fill(r: &RegionMemory, seed: u8) -> Vec<u8> {
    let v: Vec<u8> = (0..r.len())
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect();
    if r.location().is_host() {
        assert!(r.copy_from_slice_at(0, &v));
    } else {
        device_write(r, 0, &v);
    }
    v
}

#[derive(Default)]
struct CpuStaging {
    leased: Arc<AtomicUsize>,
    created: AtomicUsize,
}

struct CpuBuffer {
    host: Vec<u8>,
    leased: Arc<AtomicUsize>,
}

impl Staging for CpuStaging {
    fn buffer(&self, location: Location) -> Result<Box<dyn StagingBuffer>, TransportError> {
        assert_eq!(location, Location::Cuda { device: 0 });
        self.created.fetch_add(1, Ordering::Relaxed);
        self.leased.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(CpuBuffer {
            host: vec![0; CHUNK],
            leased: self.leased.clone(),
        }))
    }

    fn stats(&self) -> StagingStats {
        StagingStats {
            leased: self.leased.load(Ordering::Relaxed),
            created: vec![(0, self.created.load(Ordering::Relaxed))],
        }
    }
}

impl StagingBuffer for CpuBuffer {
    fn capacity(&self) -> usize {
        self.host.len()
    }
    fn download(
        &mut self,
        r: &RegionMemory,
        offset: usize,
        len: usize,
    ) -> Result<(), TransportError> {
        assert!(r.contains(offset, len) && len <= CHUNK);
        device_read(r, offset, &mut self.host[..len]);
        Ok(())
    }
    fn upload(
        &mut self,
        r: &RegionMemory,
        offset: usize,
        len: usize,
    ) -> Result<(), TransportError> {
        assert!(r.contains(offset, len) && len <= CHUNK);
        device_write(r, offset, &self.host[..len]);
        Ok(())
    }
    fn wait(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
    fn host(&mut self) -> &mut [u8] {
        &mut self.host
    }
}

impl Drop for CpuBuffer {
    fn drop(&mut self) {
        self.leased.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Channel(Sender<(CompletionToken, Result<usize, FailReason>)>);

impl Completions for Channel {
    fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
        let _ = self.0.send((token, result));
    }
}

/// Data requests need no control plane.
struct NoControl;

impl ControlPlane for NoControl {
    fn descriptor(&self) -> Vec<u8> {
        Vec::new()
    }
    fn notification(&self, _from: &str, _body: &[u8]) -> bool {
        false
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
                    stand_in_device(size)
                } else {
                    host(size)
                }
            };
            let (local, remote, back) = (mk(local_dev), mk(remote_dev), mk(local_dev));
            let key = target.register(&remote, Access::RemoteReadWrite).unwrap()[0];
            (local, remote, back, key)
        })
        .collect();
    let conn = initiator
        .connect(&ferry_transport_api::Endpoint {
            protocol: ferry_transport_api::Protocol::Tcp,
            address,
        })
        .unwrap();
    let wants: Vec<Vec<u8>> = regions
        .iter()
        .enumerate()
        .map(|(i, (local, ..))| fill(local, i as u8))
        .collect();
    let writes: Vec<_> = regions.iter().map(|(l, r, _, k)| (l, r, *k)).collect();
    transfer(&*conn, &done, Opcode::Write, &writes, len);
    for ((_, remote, ..), want) in regions.iter().zip(&wants) {
        assert!(
            bytes_of(remote)[3..3 + len] == want[1..1 + len],
            "{:?} target bytes",
            remote.location()
        );
    }
    let reads: Vec<_> = regions.iter().map(|(_, r, b, k)| (b, r, *k)).collect();
    transfer(&*conn, &done, Opcode::Read, &reads, len);
    for ((.., back, _), want) in regions.iter().zip(&wants) {
        assert!(
            bytes_of(back)[1..1 + len] == want[1..1 + len],
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
