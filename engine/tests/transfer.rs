//! Two engines in one process over real sockets on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{assert_bytes_eq, engine, engine_with, random, WAIT};
use ferry_engine::{
    Access, BatchId, Engine, Error, FailReason, Location, PeerStats, RemoteStatus, TaskStatus, Tcp,
    TcpConfig,
};

/// WRITE random bytes to the peer, check the target's memory, READ them back, compare.
fn round_trip(initiator: &Engine, target: &Engine, len: usize, local_off: usize, remote_off: u64) {
    let cap = len + local_off + 8192;
    let src = initiator.allocate(cap, Location::host()).unwrap();
    let dst = initiator.allocate(cap, Location::host()).unwrap();
    let remote_buf = target
        .allocate(len + remote_off as usize + 4096, Location::host())
        .unwrap();
    // The target registered a buffer after any cached descriptor was fetched (possibly
    // at the address of one it freed): the helper fetches the descriptor again.
    let remote = common::remote_of(initiator, target, &remote_buf);
    common::write_check_read(
        initiator,
        &src,
        &dst,
        &remote,
        &remote_buf,
        len,
        local_off,
        remote_off,
    );
}

#[test]
fn write_then_read_every_size_with_unaligned_offsets() {
    let target = engine();
    let initiator = engine();
    for (len, local_off, remote_off) in [
        (1usize, 0usize, 0u64),
        (1, 7, 13),
        (4096, 0, 0),
        (4096, 1, 4095),
        (65536, 5, 3),
        (1 << 20, 4097, 1),
        ((1 << 20) + 17, 3, 12345),
        (64 << 20, 11, 4099),
    ] {
        round_trip(&initiator, &target, len, local_off, remote_off);
    }
}

#[test]
fn large_requests_are_striped_over_lanes() {
    let config = TcpConfig {
        lanes: 3,
        max_slice: 64 * 1024,
        ..TcpConfig::default()
    };
    let target = engine_with(config.clone());
    let initiator = engine_with(config);
    round_trip(&initiator, &target, 5 << 20, 1, 7);
    // One connection per lane, plus the one that fetched the descriptor.
    assert_eq!(target.tcp_stats().connections, 3 + 1);
}

#[test]
fn many_requests_in_one_batch_mixed_read_and_write() {
    let target = engine();
    let initiator = engine();
    let remote_buf = target.allocate(8 << 20, Location::host()).unwrap();
    let seed = random(4 << 20);
    remote_buf.write_at(4 << 20, &seed).unwrap();
    let local = initiator.allocate(8 << 20, Location::host()).unwrap();
    let data = random(4 << 20);
    local.write_at(0, &data).unwrap();
    let seg = initiator.open_segment(&target.name()).unwrap();
    let remote = seg.buffer(0).unwrap();

    let mut b = initiator.batch();
    // 512 writes of 8 KiB into the lower half, 512 reads of the upper half.
    for i in 0..512usize {
        b.write(&local, i * 8192, &remote, (i * 8192) as u64, 8192)
            .unwrap();
        b.read(
            &local,
            (4 << 20) + i * 8192,
            &remote,
            ((4 << 20) + i * 8192) as u64,
            8192,
        )
        .unwrap();
    }
    assert_eq!(b.len(), 1024);
    let batch = b.submit().unwrap();
    batch.wait(WAIT).unwrap();
    assert!(batch.statuses().iter().all(|s| *s == TaskStatus::Completed));
    let p = batch.poll();
    assert_eq!((p.total, p.completed, p.pending), (1024, 1024, 0));

    let mut got = vec![0u8; 4 << 20];
    remote_buf.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &data, "written half");
    local.read_at(4 << 20, &mut got).unwrap();
    assert_bytes_eq(&got, &seed, "read half");
}

#[test]
fn concurrent_batches_from_many_threads_to_one_and_two_peers() {
    let peers = [engine(), engine()];
    let initiator = engine();
    let remotes: Vec<_> = peers
        .iter()
        .map(|p| p.allocate(16 << 20, Location::host()).unwrap())
        .collect();
    std::thread::scope(|s| {
        for t in 0..6usize {
            let initiator = &initiator;
            let peers = &peers;
            s.spawn(move || {
                // Threads 0-2 talk to peer 0 only; threads 3-5 alternate between both.
                let local = initiator.allocate(2 << 20, Location::host()).unwrap();
                for round in 0..20usize {
                    let peer = if t < 3 { 0 } else { round % 2 };
                    let seg = initiator.open_segment(&peers[peer].name()).unwrap();
                    let remote = seg.buffer(0).unwrap();
                    let base = (t * (2 << 20)) as u64;
                    let data = random(1 << 20);
                    local.write_at(0, &data).unwrap();
                    let n = 1 + round % 16;
                    let block = (1 << 20) / n;
                    let mut b = initiator.batch();
                    for i in 0..n {
                        b.write(&local, i * block, &remote, base + (i * block) as u64, block)
                            .unwrap();
                    }
                    b.submit().unwrap().wait(WAIT).unwrap();
                    let mut b = initiator.batch();
                    b.read(&local, 1 << 20, &remote, base, n * block).unwrap();
                    b.submit().unwrap().wait(WAIT).unwrap();
                    let mut back = vec![0u8; n * block];
                    local.read_at(1 << 20, &mut back).unwrap();
                    assert_bytes_eq(
                        &back,
                        &data[..n * block],
                        &format!("thread {t} round {round}"),
                    );
                }
            });
        }
    });
    // Each peer's counters hold exactly what the threads moved with it.
    let mut want = [PeerStats::default(); 2];
    for t in 0..6usize {
        for round in 0..20usize {
            let w = &mut want[if t < 3 { 0 } else { round % 2 }];
            let n = 1 + round % 16;
            let moved = (n * ((1 << 20) / n)) as u64;
            w.completed += n as u64 + 1;
            w.bytes_written += moved;
            w.bytes_read += moved;
        }
    }
    let mut got = initiator.peer_stats();
    got.sort_by_key(|(name, _)| peers.iter().position(|p| p.name() == *name));
    let names: Vec<String> = peers.iter().map(|p| p.name()).collect();
    assert_eq!(
        got,
        vec![(names[0].clone(), want[0]), (names[1].clone(), want[1])]
    );
    drop(remotes);
}

#[test]
fn own_segment_is_a_memory_copy() {
    let e = engine();
    let a = e.allocate(1 << 16, Location::host()).unwrap();
    let b = e.allocate(1 << 16, Location::host()).unwrap();
    let data = random(1 << 16);
    a.write_at(0, &data).unwrap();
    let seg = e.open_segment(&e.name()).unwrap();
    assert!(seg.is_local());
    assert_eq!(seg.protocol(), None);
    let i = seg
        .buffers()
        .iter()
        .position(|d| d.addr == b.addr())
        .unwrap();
    let remote = seg.buffer(i).unwrap();
    let mut batch = e.batch();
    batch.write(&a, 0, &remote, 0, 1 << 16).unwrap();
    batch.submit().unwrap().wait(WAIT).unwrap();
    let mut got = vec![0u8; 1 << 16];
    b.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &data, "local copy");
    // No socket was involved: nobody connected to the engine's port.
    assert_eq!(e.tcp_stats().connections, 0);
}

/// The engine's own segment is checked by the same table as a peer's requests: what a
/// remote initiator is refused, a request to the own segment is refused with the same
/// reason, and nothing is copied.
#[test]
fn the_own_segment_refuses_what_a_peer_is_refused() {
    let e = engine();
    let peer = engine();
    let local = e.allocate(4096, Location::host()).unwrap();
    let peer_local = peer.allocate(4096, Location::host()).unwrap();
    let gone = e
        .allocate_with(4096, Location::host(), Access::RemoteReadWrite, "gone")
        .unwrap();
    let own = e.open_segment(&e.name()).unwrap();
    let from_peer = peer.open_segment(&e.name()).unwrap();
    assert!(own.is_local() && !from_peer.is_local());
    let own_gone = own.buffer_named("gone").unwrap();
    let peer_gone = from_peer.buffer_named("gone").unwrap();
    local.write_at(0, &[7u8; 64]).unwrap();
    drop(gone);

    let reason = |engine: &ferry_engine::Engine, buf: &ferry_engine::Buffer, remote| {
        let mut b = engine.batch();
        b.write(buf, 0, remote, 0, 64).unwrap();
        let batch = b.submit().unwrap();
        let _ = batch.wait(WAIT);
        batch.task(0)
    };
    let refused = Some(TaskStatus::Failed(FailReason::Remote(
        RemoteStatus::NotRegistered,
    )));
    assert_eq!(reason(&peer, &peer_local, &peer_gone), refused);
    assert_eq!(
        reason(&e, &local, &own_gone),
        refused,
        "the same check, the same reason"
    );
}

/// A peer's absolute address finds its buffer and offset; a range no published buffer
/// holds whole finds nothing.
#[test]
fn peer_addresses_locate_their_buffer_and_offset() {
    let target = engine();
    let initiator = engine();
    let sizes = [4096usize, 1 << 16, 12288, 8192];
    let bufs: Vec<_> = sizes
        .iter()
        .map(|&n| target.allocate(n, Location::host()).unwrap())
        .collect();
    let _hidden = target
        .allocate_with(4096, Location::host(), Access::Local, "hidden")
        .unwrap();
    let seg = initiator.open_segment(&target.name()).unwrap();
    for b in &bufs {
        let len = b.len() as u64;
        for (offset, n) in [
            (0, len),
            (1, len - 1),
            (len / 2, 16),
            (len - 1, 1),
            (len, 0),
        ] {
            let (remote, at) = seg.locate(b.addr() + offset, n).expect("inside a buffer");
            assert_eq!(remote.descriptor().addr, b.addr());
            assert_eq!(at, offset);
        }
        assert!(seg.locate(b.addr(), len + 1).is_none(), "runs past the end");
        assert!(
            seg.locate(b.addr() + len - 1, 2).is_none(),
            "runs past the end"
        );
    }
    assert!(seg.locate(0, 1).is_none());
    assert!(seg.locate(u64::MAX, 1).is_none());
    assert!(
        seg.locate(_hidden.addr(), 1).is_none(),
        "local-only memory is not published"
    );
}

#[test]
fn zero_length_requests_complete_at_once() {
    // Every field is bound: one left out of the pattern would be dropped at once.
    let common::Pair {
        target: _target,
        target_buf: _target_buf,
        initiator,
        local,
        remote,
    } = common::pair(4096);
    let mut b = initiator.batch();
    b.write(&local, 0, &remote, 4096, 0).unwrap();
    let batch = b.submit().unwrap();
    assert_eq!(batch.task(0), Some(TaskStatus::Completed));
    assert_eq!(batch.task(1), None);
}

#[test]
fn requests_are_checked_before_submission() {
    let target = engine();
    let initiator = engine();
    let _rw = target.allocate(4096, Location::host()).unwrap();
    let _ro = target
        .allocate_with(4096, Location::host(), Access::RemoteRead, "ro")
        .unwrap();
    let _hidden = target
        .allocate_with(4096, Location::host(), Access::Local, "hidden")
        .unwrap();
    let local = initiator.allocate(4096, Location::host()).unwrap();
    let seg = initiator.open_segment(&target.name()).unwrap();
    // Local-only memory is not published at all.
    assert_eq!(seg.buffers().len(), 2);
    assert!(matches!(
        seg.buffer_named("hidden"),
        Err(Error::InvalidRequest(_))
    ));
    let rw = seg.buffer(0).unwrap();
    let ro = seg.buffer_named("ro").unwrap();
    let mut b = initiator.batch();
    assert!(matches!(
        b.write(&local, 0, &rw, 1, 4096),
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        b.write(&local, 1, &rw, 0, 4096),
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        b.write(&local, 0, &rw, u64::MAX, 2),
        Err(Error::InvalidRequest(_))
    ));
    let e = b.write(&local, 0, &ro, 0, 16).unwrap_err();
    assert!(e.to_string().contains("does not allow"), "{e}");
    b.read(&local, 0, &ro, 0, 16).unwrap();
    assert_eq!(b.len(), 1);
    b.submit().unwrap().wait(WAIT).unwrap();
}

#[test]
fn descriptor_is_refreshed_after_an_access_error() {
    let target = engine();
    let initiator = engine();
    let old = target.allocate(1 << 16, Location::host()).unwrap();
    let local = initiator.allocate(1 << 16, Location::host()).unwrap();
    let seg = initiator.open_segment(&target.name()).unwrap();
    let remote = seg.buffer(0).unwrap();
    // The target replaces its buffer: the cached descriptor now names memory that is gone.
    drop(old);
    let new = target.allocate(1 << 16, Location::host()).unwrap();

    let mut b = initiator.batch();
    b.write(&local, 0, &remote, 0, 1024).unwrap();
    let batch = b.submit().unwrap();
    let err = batch.wait(WAIT).unwrap_err();
    assert!(
        matches!(
            batch.task(0),
            Some(TaskStatus::Failed(FailReason::Remote(
                RemoteStatus::NotRegistered | RemoteStatus::KeyMismatch
            )))
        ),
        "{err}"
    );
    assert!(target.tcp_stats().rejected_requests >= 1);

    // The first access error made the cache stale; opening again fetches the new layout.
    let seg2 = initiator.open_segment(&target.name()).unwrap();
    assert_eq!(seg2.buffer(0).unwrap().descriptor().addr, new.addr());
    let data = random(1024);
    local.write_at(0, &data).unwrap();
    let mut b = initiator.batch();
    b.write(&local, 0, &seg2.buffer(0).unwrap(), 0, 1024)
        .unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    let mut got = vec![0u8; 1024];
    new.read_at(0, &mut got).unwrap();
    assert_bytes_eq(&got, &data, "after refresh");
    // The refused task and the one after the peer was opened again, on one name.
    drop(batch);
    let stats = seg2.stats();
    assert_eq!(stats, seg.stats());
    assert_eq!(
        (
            stats.failed,
            stats.completed,
            stats.bytes_written,
            stats.reopened
        ),
        (1, 1, 1024, 1),
        "{stats:?}"
    );
}

#[test]
fn stale_batch_ids_are_errors() {
    // Every field is bound: one left out of the pattern would be dropped at once.
    let common::Pair {
        target: _target,
        target_buf: _target_buf,
        initiator,
        local,
        remote,
    } = common::pair(4096);
    let mut b = initiator.batch();
    b.write(&local, 0, &remote, 0, 4096).unwrap();
    let batch = b.submit().unwrap();
    let id = batch.id();
    batch.wait(WAIT).unwrap();
    assert_eq!(initiator.batch_progress(id).unwrap().completed, 1);
    // As a number (what a language binding hands out), the id round-trips and is never 0.
    assert_ne!(id.to_u64(), 0);
    assert_eq!(BatchId::from_u64(id.to_u64()), Some(id));
    assert_eq!(BatchId::from_u64(0), None);
    assert!(matches!(
        initiator.batch_progress(BatchId::from_u64(id.to_u64() + (1 << 32)).unwrap()),
        Err(Error::StaleBatch)
    ));
    drop(batch);
    assert!(matches!(
        initiator.batch_progress(id),
        Err(Error::StaleBatch)
    ));
    // The slot is reused by the next batch; the old id still does not name it.
    let mut b = initiator.batch();
    b.read(&local, 0, &remote, 0, 4096).unwrap();
    let next = b.submit().unwrap();
    next.wait(WAIT).unwrap();
    assert!(matches!(
        initiator.batch_progress(id),
        Err(Error::StaleBatch)
    ));
    assert_eq!(initiator.batch_progress(next.id()).unwrap().completed, 1);
}

#[test]
fn notifications_arrive_in_order() {
    let target = engine();
    let initiator = engine();
    let seg = initiator.open_segment(&target.name()).unwrap();
    for i in 0..500u32 {
        initiator
            .notify(&seg, format!("kv blocks {i} ready").as_bytes())
            .unwrap();
    }
    for i in 0..500u32 {
        let n = target.recv_notification(WAIT).expect("notification");
        assert_eq!(n.from, initiator.name());
        assert_eq!(n.message, format!("kv blocks {i} ready").as_bytes());
    }
    assert!(target.try_recv_notification().is_none());
    let too_big = vec![7u8; 70 * 1024];
    assert!(matches!(
        initiator.notify(&seg, &too_big),
        Err(Error::Notify { .. })
    ));
}

#[test]
fn a_hung_peer_times_tasks_out_by_their_deadline() {
    // A listener that accepts and never answers stands in for a peer that hangs.
    let target = engine();
    let initiator = engine();
    let _r = target.allocate(1 << 20, Location::host()).unwrap();
    let seg = initiator.open_segment(&target.name()).unwrap();
    let remote = seg.buffer(0).unwrap();
    let local = initiator.allocate(1 << 20, Location::host()).unwrap();
    // Shutting the target's transport down leaves its sockets open but unserved.
    target.shutdown();
    let mut b = initiator.batch().timeout(Duration::from_millis(300));
    for i in 0..16 {
        b.write(&local, i * 65536, &remote, (i * 65536) as u64, 65536)
            .unwrap();
    }
    let batch = b.submit().unwrap();
    let start = std::time::Instant::now();
    let r = batch.wait(Duration::from_secs(20));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "wait returned after {:?}",
        start.elapsed()
    );
    assert!(matches!(r, Err(Error::TasksFailed { .. })), "{r:?}");
    let p = batch.poll();
    assert_eq!(p.pending, 0);
    assert_eq!(p.completed + p.failed + p.timed_out, 16);
    assert!(p.completed < 16);
    // The peer's counters say the same once the batch is dropped.
    drop(batch);
    let stats = seg.stats();
    assert_eq!(
        (stats.completed, stats.failed, stats.timed_out),
        (p.completed as u64, p.failed as u64, p.timed_out as u64)
    );
}

/// Deadlines, waits and settings of any length are taken (capped), never an overflow:
/// `Duration::MAX`, as a caller might write for "never", as a batch's deadline and wait,
/// in every duration of the TCP configuration, as the engine's default deadline (which
/// notifications use) and as the metadata TTL, and a keepalive longer than the kernel
/// takes (taken as its longest): data moves both ways and a notification arrives, with
/// the engine's waiters, lanes and target threads all under those settings, and nothing
/// panics or is refused.
#[test]
fn huge_timeouts_are_capped_not_overflowed() {
    let common::Pair {
        target: _target,
        target_buf: _target_buf,
        initiator,
        local,
        remote,
    } = common::pair(4096);
    let mut b = initiator.batch().timeout(Duration::MAX);
    b.write(&local, 0, &remote, 0, 4096).unwrap();
    let batch = b.submit().unwrap();
    batch.wait(Duration::MAX).unwrap();
    assert_eq!(batch.task(0), Some(TaskStatus::Completed));
    let config = TcpConfig {
        busy_poll: Duration::MAX,
        connect_timeout: Duration::MAX,
        idle_timeout: Duration::MAX,
        progress_timeout: Duration::MAX,
        keepalive: Some(Duration::MAX),
        ..TcpConfig::default()
    };
    let make = || {
        Engine::builder()
            .transport(Tcp::new(config.clone()))
            .timeout(Duration::MAX)
            .metadata_ttl(Duration::MAX)
            .build()
            .expect("engine on 127.0.0.1")
    };
    let (target, initiator) = (make(), make());
    round_trip(&initiator, &target, 1 << 20, 3, 5);
    round_trip(&initiator, &target, 4096, 0, 0);
    // A notification under the engine's never-ending default deadline.
    let segment = initiator.open_segment(&target.name()).unwrap();
    initiator.notify(&segment, b"never late").unwrap();
    let got = target
        .recv_notification(Duration::MAX)
        .expect("a notification");
    assert_eq!(got.message, b"never late");
}

/// A peer restarted at the same address is followed by the caller's old handles
/// (`common::handles_follow_a_restarted_peer`).
#[test]
fn handles_follow_a_restarted_peer_without_reopening() {
    let tcp = |at: Option<String>| {
        let b = Engine::builder().transport(Tcp::new(TcpConfig::default()));
        match at {
            Some(address) => b.listen(address),
            None => b,
        }
        .build()
        .expect("an engine, at the same port again when restarted")
    };
    let used = common::handles_follow_a_restarted_peer(&tcp, &engine());
    assert_eq!(
        used,
        (
            Some(ferry_engine::Protocol::Tcp),
            Some(ferry_engine::Protocol::Tcp)
        )
    );
}

/// A thread waiting on a batch while it busy-polls reads its answers over TCP itself
/// (no hand-off from the lane's receiver thread, counted in
/// `TcpStats::answers_read_by_waiters`), and gets the right bytes; with busy polling off
/// it sleeps at once and never does. A READ of 64 MiB comes back in several answers, and
/// the waiter spins through all of them: the receiver thread may read the first ones
/// before the waiter starts, and then hands over between two answers.
#[test]
fn a_busy_polling_waiter_reads_its_own_answers() {
    for (busy_poll, by_waiters) in [(Duration::ZERO, false), (Duration::from_secs(60), true)] {
        let target = engine();
        let initiator = engine_with(TcpConfig {
            busy_poll,
            ..TcpConfig::default()
        });
        let len = 64 << 20;
        let remote_buf = target.allocate(len, Location::host()).unwrap();
        let remote = common::remote_of(&initiator, &target, &remote_buf);
        let local = initiator.allocate(len, Location::host()).unwrap();
        for _ in 0..2 {
            let data = random(len);
            remote_buf.write_at(0, &data).unwrap();
            let mut b = initiator.batch();
            b.read(&local, 0, &remote, 0, len).unwrap();
            b.submit().unwrap().wait(WAIT).unwrap();
            let mut got = vec![0u8; len];
            local.read_at(0, &mut got).unwrap();
            assert_bytes_eq(&got, &data, "READ");
        }
        let read = initiator.tcp_stats().answers_read_by_waiters;
        assert_eq!(
            read > 0,
            by_waiters,
            "busy poll {busy_poll:?}: {read} answers"
        );
    }
}

/// A waiter that may spin (`busy_poll` above zero) is woken early once per batch, when
/// the batch's last 512 KiB are still to land, so it is running when they do; one that
/// may not (`busy_poll` zero: the least CPU) is never woken early, since it would only
/// spin, and sleeps until its batch ends. Each batch here moves 4 MiB in 1 MiB WRITEs.
#[test]
fn only_a_waiter_that_may_spin_is_woken_before_its_batch_ends() {
    let batches = 3;
    for (busy_poll, early) in [(Duration::ZERO, 0), (Duration::from_micros(50), batches)] {
        let target = engine();
        let initiator = engine_with(TcpConfig {
            busy_poll,
            ..TcpConfig::default()
        });
        let len = 4 << 20;
        let remote_buf = target.allocate(len, Location::host()).unwrap();
        let remote = common::remote_of(&initiator, &target, &remote_buf);
        let local = initiator.allocate(len, Location::host()).unwrap();
        for _ in 0..batches {
            let data = random(len);
            local.write_at(0, &data).unwrap();
            let mut b = initiator.batch();
            for k in 0..4 {
                let at = k << 20;
                b.write(&local, at, &remote, at as u64, 1 << 20).unwrap();
            }
            b.submit().unwrap().wait(WAIT).unwrap();
            let mut got = vec![0u8; len];
            remote_buf.read_at(0, &mut got).unwrap();
            assert_bytes_eq(&got, &data, "WRITE");
        }
        let stats = initiator.batch_stats();
        assert_eq!(stats.early_wakes, early, "busy poll {busy_poll:?}");
        assert_eq!(stats.late_wakeups, 0);
    }
}

/// Requests whose bytes follow each other on both sides travel as one slice per run (up
/// to the transport's slice size), and each lands exactly where it asked; requests with
/// gaps between them travel one by one. Both ways, over real sockets.
#[test]
fn contiguous_requests_travel_together_and_land_where_each_asked() {
    let target = engine();
    let initiator = engine();
    let (block, n) = (4096, 64);
    let len = 2 * n * block;
    let remote_buf = target.allocate(len, Location::host()).unwrap();
    let remote = common::remote_of(&initiator, &target, &remote_buf);
    let local = initiator.allocate(len, Location::host()).unwrap();
    for (stride, merged) in [(block, n as u64 - 1), (2 * block, 0)] {
        let before = initiator.batch_stats().merged_requests;
        let data = random(len);
        // Each request's bytes where it asked; the gaps between them stay zero.
        let mut want = vec![0u8; len];
        for i in 0..n {
            let at = i * stride;
            want[at..at + block].copy_from_slice(&data[at..at + block]);
        }

        local.write_at(0, &data).unwrap();
        remote_buf.write_at(0, &vec![0; len]).unwrap();
        let mut b = initiator.batch();
        for i in 0..n {
            let at = i * stride;
            b.write(&local, at, &remote, at as u64, block).unwrap();
        }
        b.submit().unwrap().wait(WAIT).unwrap();
        let mut got = vec![0u8; len];
        remote_buf.read_at(0, &mut got).unwrap();
        assert_bytes_eq(&got, &want, "WRITE");

        local.write_at(0, &vec![0; len]).unwrap();
        let mut b = initiator.batch();
        for i in 0..n {
            let at = i * stride;
            b.read(&local, at, &remote, at as u64, block).unwrap();
        }
        b.submit().unwrap().wait(WAIT).unwrap();
        local.read_at(0, &mut got).unwrap();
        assert_bytes_eq(&got, &want, "READ");

        assert_eq!(
            initiator.batch_stats().merged_requests - before,
            2 * merged,
            "requests {stride} bytes apart"
        );
    }
}

/// A waiter drives every connection of its batch, not only its first task's: here the
/// first task is a small READ from one target and the bulk comes from another, whose
/// answers the spinning waiter reads itself.
#[test]
fn a_busy_polling_waiter_reads_the_answers_of_every_peer_of_its_batch() {
    let small = engine();
    let big = engine();
    let initiator = engine_with(TcpConfig {
        busy_poll: Duration::from_secs(60),
        ..TcpConfig::default()
    });
    let len = 64 << 20;
    let small_buf = small.allocate(4096, Location::host()).unwrap();
    let big_buf = big.allocate(len, Location::host()).unwrap();
    let small_remote = common::remote_of(&initiator, &small, &small_buf);
    let big_remote = common::remote_of(&initiator, &big, &big_buf);
    let local = initiator.allocate(4096 + len, Location::host()).unwrap();
    let data = random(len);
    big_buf.write_at(0, &data).unwrap();
    let mut b = initiator.batch();
    b.read(&local, 0, &small_remote, 0, 4096).unwrap();
    b.read(&local, 4096, &big_remote, 0, len).unwrap();
    b.submit().unwrap().wait(WAIT).unwrap();
    let mut got = vec![0u8; len];
    local.read_at(4096, &mut got).unwrap();
    assert_bytes_eq(&got, &data, "READ");
    // The bulk comes back as answers of at most 1 MiB: 64 of them. Read by the lane's
    // own receiver thread, the waiter would have read one answer or two.
    let read = initiator.tcp_stats().answers_read_by_waiters;
    assert!(read > 32, "the waiter read {read} answers");
}
