//! The engine as initiator when its peer stalls: a proxy on 127.0.0.1 between two engines
//! stops forwarding (a stopped or black-holed peer), and the batches, notifications and
//! segment opens of the initiator must still end by their deadlines and recover.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_bytes_eq, random};
use ferry_engine::{Engine, Error, FailReason, Location, Tcp, TcpConfig};
use parking_lot::{Condvar, Mutex};

/// Bound of every wait: far beyond the deadlines used, so reaching it means a hang.
const LIMIT: Duration = Duration::from_secs(20);
/// The engines' deadline for batches and notifications.
const DEADLINE: Duration = Duration::from_millis(500);

/// Stops forwarding on the connections accepted so far, until released, and counts what
/// those connections carry afterwards.
#[derive(Default)]
struct Gate {
    /// Connections with an id below this were open when the peer stalled.
    stalled_below: AtomicU64,
    stalled: Mutex<bool>,
    released: Condvar,
    /// Bytes the stalled connections carried towards the target after the release.
    late_bytes: AtomicU64,
    /// Connections whose initiator-to-target direction has ended.
    ended: Mutex<HashSet<u64>>,
}

impl Gate {
    fn stall(&self, below: u64) {
        self.stalled_below.store(below, Ordering::Release);
        *self.stalled.lock() = true;
    }

    fn release(&self) {
        *self.stalled.lock() = false;
        self.released.notify_all();
    }

    fn is_old(&self, id: u64) -> bool {
        id < self.stalled_below.load(Ordering::Acquire)
    }

    /// Waits while `id` is stalled; says whether `id` is one of the stalled ones.
    fn pass(&self, id: u64) -> bool {
        let mut g = self.stalled.lock();
        while *g && self.is_old(id) {
            self.released.wait(&mut g);
        }
        self.is_old(id)
    }
}

/// Forwards every connection to `to` (until stalled); returns its address, the gate, and
/// the count of connections it accepted.
fn proxy(to: String) -> (String, Arc<Gate>, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let gate = Arc::new(Gate::default());
    let accepted = Arc::new(AtomicU64::new(0));
    let (g, n) = (gate.clone(), accepted.clone());
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { return };
            let id = n.fetch_add(1, Ordering::AcqRel);
            let Ok(server) = TcpStream::connect(&to) else {
                continue;
            };
            let pairs = [
                (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    true,
                ),
                (server, client, false),
            ];
            for (mut from, mut into, towards_target) in pairs {
                let g = g.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let was_stalled = g.pass(id);
                        if towards_target && was_stalled {
                            g.late_bytes.fetch_add(n as u64, Ordering::AcqRel);
                        }
                        if into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = into.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    if towards_target {
                        g.ended.lock().insert(id);
                    }
                });
            }
        }
    });
    (addr, gate, accepted)
}

fn engine() -> Engine {
    Engine::builder()
        .transport(Tcp::new(TcpConfig::default()))
        .timeout(DEADLINE)
        .build()
        .expect("engine on 127.0.0.1")
}

/// Runs `f` on another thread; panics when it does not return within `LIMIT`.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_like::channel();
    std::thread::spawn(move || tx.send(f()));
    rx.recv_timeout(LIMIT)
        .unwrap_or_else(|| panic!("{what} blocked past every deadline"))
}

/// A one-shot channel on std's mpsc (the engine's tests do not depend on crossbeam).
mod crossbeam_like {
    use std::sync::mpsc;
    use std::time::Duration;

    pub(crate) struct Tx<T>(mpsc::SyncSender<T>);
    pub(crate) struct Rx<T>(mpsc::Receiver<T>);

    pub(crate) fn channel<T>() -> (Tx<T>, Rx<T>) {
        let (tx, rx) = mpsc::sync_channel(1);
        (Tx(tx), Rx(rx))
    }

    impl<T> Tx<T> {
        pub(crate) fn send(self, v: T) {
            let _ = self.0.send(v);
        }
    }

    impl<T> Rx<T> {
        pub(crate) fn recv_timeout(&self, d: Duration) -> Option<T> {
            self.0.recv_timeout(d).ok()
        }
    }
}

#[test]
fn a_stalled_peer_ends_batches_by_their_deadline_and_its_segment_is_opened_afresh() {
    let chunk = 1 << 20;
    let chunks = 64; // more than the sockets on the way hold (tens of MiB at most)
    let target = engine();
    let initiator = Arc::new(engine());
    let target_buf = target.allocate(chunks * chunk, Location::host()).unwrap();
    let before = random(chunks * chunk);
    target_buf.write_at(0, &before).unwrap();
    let (addr, gate, accepted) = proxy(target.name());
    let seg = initiator.open_segment(&addr).unwrap();
    let remote = seg.buffer(0).unwrap();
    let local = initiator
        .allocate(chunks * chunk, Location::host())
        .unwrap();
    let stalled = random(chunks * chunk);
    local.write_at(0, &stalled).unwrap();

    // The peer stops: nothing more passes on the connections open now.
    let old = accepted.load(Ordering::Acquire);
    gate.stall(old);
    let r = initiator.notify(&seg, b"are you there");
    assert!(
        matches!(
            r,
            Err(Error::Notify {
                reason: FailReason::TimedOut,
                ..
            })
        ),
        "{r:?}"
    );
    let (i, l, rb) = (initiator.clone(), local.clone(), remote.clone());
    let outcome = bounded("submitting and waiting on a stalled peer", move || {
        let mut b = i.batch().timeout(DEADLINE);
        for c in 0..chunks {
            b.write(&l, c * chunk, &rb, (c * chunk) as u64, chunk)
                .unwrap();
        }
        let batch = b.submit().unwrap();
        let r = batch.wait(LIMIT);
        (r, batch.poll())
    });
    let (r, p) = outcome;
    // Every task ended, by its deadline at the latest. Either the requests went to the
    // wedged connection and failed, or (once the closed notification lane showed it
    // dead) the segment was opened afresh through the proxy and they completed there.
    assert_eq!(p.pending, 0);
    match r {
        Err(Error::TasksFailed { .. }) => assert!(p.completed < chunks, "{p:?}"),
        Ok(()) => assert!(
            accepted.load(Ordering::Acquire) > old,
            "completed without a fresh connection: {p:?}"
        ),
        other => panic!("{other:?}"),
    }

    // The wedged connection is not handed out again: the segment opens afresh (through
    // the proxy, which forwards new connections) and carries data.
    let end = Instant::now() + LIMIT;
    let fresh = loop {
        let s = initiator.open_segment(&addr).unwrap();
        if accepted.load(Ordering::Acquire) > old {
            break s;
        }
        assert!(
            Instant::now() < end,
            "the stalled segment keeps being handed out"
        );
        std::thread::yield_now();
    };
    let remote2 = fresh.buffer(0).unwrap();
    let probe = random(4096);
    let scratch = initiator.allocate(8192, Location::host()).unwrap();
    scratch.write_at(0, &probe).unwrap();
    let last = ((chunks - 1) * chunk) as u64;
    let mut b = initiator.batch().timeout(LIMIT);
    b.write(&scratch, 0, &remote2, last, 4096).unwrap();
    b.submit().unwrap().wait(LIMIT).unwrap();
    let mut b = initiator.batch().timeout(LIMIT);
    b.read(&scratch, 4096, &remote2, last, 4096).unwrap();
    b.submit().unwrap().wait(LIMIT).unwrap();
    let mut back = vec![0u8; 4096];
    scratch.read_at(4096, &mut back).unwrap();
    assert_bytes_eq(&back, &probe, "read back over the fresh connection");

    // The peer returns: what the old connections still held reaches it (a WRITE reported
    // timed out may land, as documented), and then they end, for the initiator closed
    // them: far from the whole timed-out batch comes through.
    gate.release();
    let end = Instant::now() + LIMIT;
    while !(0..old).all(|id| gate.ended.lock().contains(&id)) {
        assert!(
            Instant::now() < end,
            "the stalled connections were never closed"
        );
        std::thread::yield_now();
    }
    let late = gate.late_bytes.load(Ordering::Acquire);
    assert!(
        late < (chunks * chunk) as u64,
        "{late} bytes of timed-out WRITEs went on to the peer"
    );
}
