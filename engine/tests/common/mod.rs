//! Helpers shared by the engine's loopback tests.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use ferry_engine::{Engine, Tcp, TcpConfig};
use rand::RngCore;

pub mod stores;
pub mod wire;

pub const WAIT: Duration = Duration::from_secs(30);

/// An engine on 127.0.0.1 with an ephemeral port.
pub fn engine() -> Engine {
    engine_with(TcpConfig::default())
}

pub fn engine_with(config: TcpConfig) -> Engine {
    Engine::builder()
        .transport(Tcp::new(config))
        .build()
        .expect("engine on 127.0.0.1")
}

/// Random bytes (never all zeros).
pub fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    if len > 0 && v.iter().all(|&b| b == 0) {
        v[0] = 1;
    }
    v
}

/// Asserts equality without printing megabytes on failure.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {:#04x} != {:#04x}",
            got[i], want[i]
        );
    }
}

/// Two engines with one buffer each: the target's is published, the initiator has it
/// open as `remote`.
pub struct Pair {
    pub target: Engine,
    pub initiator: Engine,
    pub target_buf: ferry_engine::Buffer,
    pub local: ferry_engine::Buffer,
    pub remote: ferry_engine::RemoteBuffer,
}

pub fn pair(len: usize) -> Pair {
    let target = engine();
    let initiator = engine();
    let target_buf = target
        .allocate(len, ferry_engine::Location::host())
        .unwrap();
    let local = initiator
        .allocate(len, ferry_engine::Location::host())
        .unwrap();
    let remote = initiator
        .open_segment(&target.name())
        .unwrap()
        .buffer(0)
        .unwrap();
    Pair {
        target,
        initiator,
        target_buf,
        local,
        remote,
    }
}

/// WRITEs random bytes from `local` to `remote`, checks they are in the target's memory
/// (`remote_buf`) once the WRITE completed, READs them back into `back` one byte further
/// on, and compares.
#[allow(clippy::too_many_arguments)]
pub fn write_check_read(
    initiator: &Engine,
    local: &ferry_engine::Buffer,
    back: &ferry_engine::Buffer,
    remote: &ferry_engine::RemoteBuffer,
    remote_buf: &ferry_engine::Buffer,
    len: usize,
    local_off: usize,
    remote_off: u64,
) {
    let data = random(len);
    local.write_at(local_off, &data).unwrap();
    let mut b = initiator.batch();
    b.write(local, local_off, remote, remote_off, len).unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    let mut on_target = vec![0u8; len];
    remote_buf
        .read_at(remote_off as usize, &mut on_target)
        .unwrap();
    assert_bytes_eq(
        &on_target,
        &data,
        &format!("target memory after a WRITE of {len} bytes"),
    );
    let mut b = initiator.batch();
    b.read(back, local_off + 1, remote, remote_off, len)
        .unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    let mut got = vec![0u8; len];
    back.read_at(local_off + 1, &mut got).unwrap();
    assert_bytes_eq(&got, &data, &format!("READ back of {len} bytes"));
}

/// Opens `target`'s segment afresh and returns the published buffer at `buf`'s address.
pub fn remote_of(
    initiator: &Engine,
    target: &Engine,
    buf: &ferry_engine::Buffer,
) -> ferry_engine::RemoteBuffer {
    let seg = initiator.refresh_segment(&target.name()).unwrap();
    let i = seg
        .buffers()
        .iter()
        .position(|b| b.addr == buf.addr())
        .expect("buffer published");
    seg.buffer(i).unwrap()
}

/// Sizes and offsets (`len`, local offset, remote offset) the suites move: 1 B to
/// 64 MiB, unaligned.
pub const SIZES: &[(usize, usize, u64)] = &[
    (1, 0, 0),
    (4096, 3, 5),
    (65536 + 17, 4095, 1),
    ((1 << 20) + 3, 1, 7),
    (64 << 20, 13, 4097),
];

/// Allocates buffers at `local_at` on `initiator` and `remote_at` on `target` and runs
/// [`write_check_read`] for every entry of `sizes`. Returns the route's protocol.
pub fn round_trips_at(
    initiator: &Engine,
    target: &Engine,
    local_at: ferry_engine::Location,
    remote_at: ferry_engine::Location,
    sizes: &[(usize, usize, u64)],
) -> Option<ferry_engine::Protocol> {
    let span = sizes
        .iter()
        .map(|&(len, l, r)| len + l.max(r as usize) + 1)
        .max()
        .unwrap_or(1);
    let remote_buf = target.allocate(span, remote_at).unwrap();
    let local = initiator.allocate(span, local_at).unwrap();
    let back = initiator.allocate(span, local_at).unwrap();
    assert_eq!(remote_buf.location(), remote_at);
    let remote = remote_of(initiator, target, &remote_buf);
    for &(len, local_off, remote_off) in sizes {
        write_check_read(
            initiator,
            &local,
            &back,
            &remote,
            &remote_buf,
            len,
            local_off,
            remote_off,
        );
    }
    remote.segment().protocol()
}

/// A target made by `make` (listening at the address it is given, when one is) is
/// written to, dropped, and started again at its address (a new incarnation, new
/// buffers and keys). The caller's old handles follow it: the first batch after the
/// restart finds the old connection gone, opens the peer again by name, finds the buffer
/// by its name in the new descriptor, and lands there, without the caller opening
/// anything. Returns the protocol the handle's segment used before and after.
pub fn handles_follow_a_restarted_peer(
    make: &dyn Fn(Option<String>) -> Engine,
    initiator: &Engine,
) -> (
    Option<ferry_engine::Protocol>,
    Option<ferry_engine::Protocol>,
) {
    use ferry_engine::{Access, Location};
    let target = make(None);
    let address = target.name();
    let kv = target
        .allocate_with(8192, Location::host(), Access::RemoteReadWrite, "kv")
        .unwrap();
    let local = initiator.allocate(8192, Location::host()).unwrap();
    let segment = initiator.open_segment(&address).unwrap();
    let remote = segment.buffer_named("kv").unwrap();
    let mut b = initiator.batch();
    b.write(&local, 0, &remote, 0, 8192).unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    let before = remote.segment().protocol();
    let old_incarnation = segment.descriptor().incarnation;

    drop(kv);
    drop(target);
    let restarted = make(Some(address.clone()));
    let _pad = restarted.allocate(4096, Location::host()).unwrap();
    let kv = restarted
        .allocate_with(8192, Location::host(), Access::RemoteReadWrite, "kv")
        .unwrap();
    write_to_restarted_peer(initiator, &local, &remote, &kv, 8192);
    let now = initiator.open_segment(&address).unwrap();
    assert_ne!(now.descriptor().incarnation, old_incarnation);
    (before, remote.segment().protocol())
}

/// A well-formed RDMA queue-pair request for `n` queue pairs (alternating the sender's
/// NIC 0 and 1, all for the receiver's NIC 0) whose addresses are made-up link-local
/// GIDs: a NIC with IPv4 GIDs (soft-RoCE) cannot connect to them.
#[cfg(feature = "rdma")]
pub fn link_local_qp_request(connection: u64, n: u8) -> ferry_transport_rdma::exchange::Message {
    use ferry_transport_rdma::exchange::{Kind, Message, QpAddr};
    Message {
        kind: Kind::Request,
        connection,
        replaces: 0,
        qps: (0..n)
            .map(|i| QpAddr {
                nic: i % 2,
                peer_nic: 0,
                qpn: 0x1200 + u32::from(i),
                psn: 0x00ab_cdef,
                lid: 0,
                gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0xff, 0xfe, 0, 0, i],
                mtu: 3,
                rd_atomic: 16,
            })
            .collect(),
        flush: Vec::new(),
    }
}

/// Writes random bytes from `local` to `remote` (both `len` long) until a batch
/// completes, then checks they are in `landed_in`, the restarted peer's buffer. The old
/// connection may not know yet that it died: a batch on it fails (by its deadline at
/// the latest), and a later one follows the peer to its new descriptor.
pub fn write_to_restarted_peer(
    initiator: &Engine,
    local: &ferry_engine::Buffer,
    remote: &ferry_engine::RemoteBuffer,
    landed_in: &ferry_engine::Buffer,
    len: usize,
) {
    let data = random(len);
    local.write_at(0, &data).unwrap();
    let landed = (0..3).any(|_| {
        let mut b = initiator.batch().timeout(Duration::from_secs(5));
        b.write(local, 0, remote, 0, len).unwrap();
        b.submit().unwrap().wait(WAIT).is_ok()
    });
    assert!(landed, "no batch reached the restarted peer");
    let mut got = vec![0u8; len];
    landed_in.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &data, "the restarted peer's buffer");
}

/// After [`round_trips_at`] over a fabric that failed some posts, with retries over TCP
/// allowed: the retries are counted in the target's [`ferry_engine::PeerStats`] and
/// logged naming it, one warning per batch at most (recorded since
/// `ferry_transport_api::testing::warnings::install`), and no task failed.
pub fn assert_retries_counted_and_logged(initiator: &Engine, target: &Engine) {
    let name = target.name();
    let stats = initiator
        .peer_stats()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| s)
        .expect("the target has counters");
    let warned = ferry_transport_api::testing::warnings::starting_with("fabric transfer failed")
        .iter()
        .filter(|w| w.fields.get("peer") == Some(&name))
        .count();
    let batches = 2 * SIZES.len();
    assert!(
        stats.retried_over_tcp >= 1 && stats.failed == 0 && stats.timed_out == 0,
        "{stats:?}"
    );
    assert!(
        warned >= 1 && warned <= batches,
        "{warned} retry warnings naming the target for {batches} batches"
    );
}
