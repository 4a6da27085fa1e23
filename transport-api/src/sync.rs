//! Hand-overs between threads, written once and checked by a model checker.
//!
//! ferry's threads meet in three places: a thread waiting on a batch meets the threads
//! that complete its tasks ([`EndGate`]), threads that queue work for a connection meet
//! the one thread that sends it ([`Doorbell`]), and the threads that report a task's
//! slices meet the one that ends it at its deadline over the batch's count of bytes still
//! to land ([`Landed`]). Each protocol keeps every fact its decision depends on in **one
//! atomic word**, so the total order of operations on that word decides who wakes whom
//! (or who counts what): no store on one location followed by a load of another (the
//! pattern that loses wake-ups under acquire/release ordering).
//!
//! The tests at the bottom run under [loom](https://docs.rs/loom), which explores every
//! interleaving the memory model allows: `RUSTFLAGS="--cfg loom" cargo test -p
//! ferry-transport-api --release --lib sync` (what `cargo xtask test` runs). Without
//! `--cfg loom` the same code uses `std`'s atomics and thread parking.

#[cfg(loom)]
use loom::{
    sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering},
    sync::Mutex,
    thread::{self, Thread},
};
#[cfg(not(loom))]
use std::{
    sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering},
    sync::Mutex,
    thread::{self, Thread},
};

use std::time::Duration;

/// Parks the calling thread for at most `timeout` (loom has no clock: there it parks
/// until unparked, so a lost wake-up shows as a deadlock the checker reports).
fn park_for(timeout: Duration) {
    #[cfg(loom)]
    {
        let _ = timeout;
        thread::park();
    }
    #[cfg(not(loom))]
    thread::park_timeout(timeout);
}

/// How often a second, concurrent waiter on an [`EndGate`] looks at the count.
const POLL_STEP: Duration = Duration::from_millis(1);

/// The bit of [`EndGate`]'s word that says a waiter is registered.
const WAITING: u32 = 1 << 31;
/// The bit of [`EndGate`]'s word that the last task's ender sets when it found a waiter
/// registered: that waiter's wake-up is owed (made, or about to be).
const OWED: u32 = 1 << 30;
/// The bits of [`EndGate`]'s word that count open tasks.
const OPEN: u32 = OWED - 1;

/// A count of open tasks that one thread can wait on while others end them.
///
/// The count and the "someone is waiting" flag share one word. A waiter registers with a
/// read-modify-write of that word; the thread that ends the last task reads the flag in
/// the same read-modify-write that drops the count to zero. Whichever comes second in the
/// word's order sees the other: the waiter sees zero and does not park, or the last ender
/// sees the flag and unparks it. A wake-up cannot be lost. That ender also records in the
/// word that it owes the wake-up ([`owed`](EndGate::owed)), so a waiter the scheduler runs
/// late can tell a late wake-up from a lost one.
#[derive(Debug)]
pub struct EndGate {
    word: AtomicU32,
    waiter: Mutex<Option<Thread>>,
}

impl Default for EndGate {
    fn default() -> Self {
        EndGate::new()
    }
}

impl EndGate {
    /// A gate with nothing open and no waiter.
    pub fn new() -> Self {
        EndGate {
            word: AtomicU32::new(0),
            waiter: Mutex::new(None),
        }
    }

    /// The most tasks one round may count.
    pub const MAX_OPEN: u32 = OPEN;

    /// Starts a new round with `open` tasks (at most [`MAX_OPEN`](Self::MAX_OPEN)) and
    /// forgets any waiter. The caller has the gate to itself (no task of the previous
    /// round can still end on it).
    pub fn reset(&self, open: u32) {
        debug_assert!(open <= OPEN, "{open} tasks on one gate");
        *self.lock_waiter() = None;
        self.word.store(open & OPEN, Ordering::Release);
    }

    /// Tasks not yet ended.
    pub fn open(&self) -> u32 {
        self.word.load(Ordering::Acquire) & OPEN
    }

    /// Ends one task; the thread that ends the last one wakes the waiter. Returns whether
    /// this was the last. Calls beyond the count are a bug of the caller (each task ends
    /// once) and are ignored.
    pub fn end_one(&self) -> bool {
        let mut cur = self.word.load(Ordering::Relaxed);
        loop {
            if cur & OPEN == 0 {
                return false;
            }
            let owes = cur & OPEN == 1 && cur & WAITING != 0;
            let next = (cur - 1) | if owes { OWED } else { 0 };
            match self
                .word
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        let last = cur & OPEN == 1;
        if last && cur & WAITING != 0 {
            self.unpark();
        }
        last
    }

    /// Whether the thread that ended the last task found a waiter registered, and so owes
    /// (or has made) its wake-up. A waiter that slept to its limit after every task ended
    /// with this set was woken late by the scheduler; without it, a wake-up was lost.
    pub fn owed(&self) -> bool {
        self.word.load(Ordering::Acquire) & OWED != 0
    }

    /// Wakes the registered waiter early, if there is one (a hint that the end is near;
    /// correctness never depends on it).
    pub fn nudge(&self) {
        if self.word.load(Ordering::Acquire) & WAITING != 0 {
            self.unpark();
        }
    }

    /// Waits until every task has ended. Before each sleep it asks `budget` how long it
    /// may sleep; `None` gives up. Returns whether every task has ended. Spurious
    /// wake-ups are absorbed here. One thread at a time is woken by the last `end_one`;
    /// another thread waiting at the same time polls the count every millisecond.
    pub fn wait(&self, mut budget: impl FnMut() -> Option<Duration>) -> bool {
        if self.open() == 0 {
            return true;
        }
        {
            let me = thread::current();
            let mut slot = self.lock_waiter();
            if slot.as_ref().is_some_and(|t| t.id() != me.id()) {
                drop(slot);
                return self.poll(budget);
            }
            *slot = Some(me);
        }
        // Register in the word itself: after this, the last `end_one` sees the flag.
        if self.word.fetch_or(WAITING, Ordering::AcqRel) & OPEN == 0 {
            return true;
        }
        loop {
            if self.open() == 0 {
                return true;
            }
            match budget() {
                Some(timeout) => park_for(timeout),
                None => return self.open() == 0,
            }
        }
    }

    /// A second thread waiting at once: the slot has its first waiter, so this one
    /// checks the count in short sleeps instead of being woken.
    fn poll(&self, mut budget: impl FnMut() -> Option<Duration>) -> bool {
        loop {
            if self.open() == 0 {
                return true;
            }
            match budget() {
                Some(timeout) => park_for(timeout.min(POLL_STEP)),
                None => return self.open() == 0,
            }
        }
    }

    fn unpark(&self) {
        if let Some(t) = self.lock_waiter().as_ref() {
            t.unpark();
        }
    }

    fn lock_waiter(&self) -> impl std::ops::DerefMut<Target = Option<Thread>> + '_ {
        // A panic while holding this lock cannot leave the slot half-written.
        self.waiter.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Nobody is draining the queue.
const IDLE: u8 = 0;
/// A thread is draining the queue (the runner).
const RUNNING: u8 = 1;
/// Work was queued while the runner was draining: it must look again before it stops.
const RUNG: u8 = 2;
/// The runner handed its role to the service thread, which has not taken it yet.
const HANDED: u8 = 4;

/// Decides which thread drains a queue that many threads fill: at most one drains at a
/// time, and work queued at any moment is drained without waiting for a timer.
///
/// Protocol: a producer queues its item and then [`ring`](Self::ring)s. If nobody is
/// draining, the ring makes the producer the runner; otherwise it leaves a mark the
/// runner finds in [`done`](Self::done), which then tells the runner to drain again. A
/// runner that must stop early (its budget is spent) [`hand`](Self::hand)s the role to a
/// service thread, which takes it in [`take`](Self::take). Every decision is a
/// read-modify-write of one byte, so each ring is seen either as "become the runner" or
/// by the runner's next `done`.
#[derive(Debug, Default)]
pub struct Doorbell {
    state: AtomicU8,
}

impl Doorbell {
    /// A doorbell with nobody draining.
    pub fn new() -> Self {
        Doorbell {
            state: AtomicU8::new(IDLE),
        }
    }

    /// Called after queueing work. Returns true when the caller is now the runner and must
    /// drain the queue (then call [`done`](Self::done) or [`hand`](Self::hand)).
    pub fn ring(&self) -> bool {
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let next = if cur & RUNNING == 0 {
                RUNNING
            } else {
                cur | RUNG
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return cur & RUNNING == 0,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Called by the runner after it found the queue empty. Returns true when work was
    /// queued meanwhile (the runner must drain again and call `done` again); false when
    /// the runner has let go.
    pub fn done(&self) -> bool {
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let next = if cur & RUNG != 0 { RUNNING } else { IDLE };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return cur & RUNG != 0,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Called by the runner to pass its role to the service thread, which the caller then
    /// unparks. The caller is no longer the runner.
    pub fn hand(&self) {
        self.state.fetch_or(HANDED, Ordering::AcqRel);
    }

    /// Called by the service thread: true when the role was handed to it (it is now the
    /// runner). False means it may park until unparked.
    pub fn take(&self) -> bool {
        self.state.fetch_and(!HANDED, Ordering::AcqRel) & HANDED != 0
    }
}

/// The bit of a [`Landed`] word that says its task was sealed.
const SEALED: u64 = 1 << 63;

/// What one task's current attempt has landed, so that a batch's total of bytes still to
/// land has each byte counted off exactly once: by the slice that landed it, or by the
/// seal that ends the task without completing and counts off everything not yet landed.
///
/// Slices landing and the seal are read-modify-writes of one word: a slice that lands
/// before the seal counts its own bytes (and the seal leaves them out), one that lands
/// after it counts nothing (the seal counted them).
#[derive(Debug, Default)]
pub struct Landed {
    word: AtomicU64,
}

impl Landed {
    /// Nothing landed, not sealed.
    pub fn new() -> Self {
        Landed {
            word: AtomicU64::new(0),
        }
    }

    /// Starts over for a new batch (the caller has the task to itself).
    pub fn reset(&self) {
        self.word.store(0, Ordering::Release);
    }

    /// Records `bytes` landed by one slice. True when the caller counts them off the
    /// total; false when the task was sealed first (the seal counted them).
    pub fn land(&self, bytes: u64) -> bool {
        self.word.fetch_add(bytes, Ordering::AcqRel) & SEALED == 0
    }

    /// Seals the task as it ends without completing: returns what had landed, and the
    /// caller counts the rest of the task's length off the total. Called at most once
    /// per task (by whoever ends it).
    pub fn seal(&self) -> u64 {
        self.word.fetch_or(SEALED, Ordering::AcqRel) & !SEALED
    }

    /// Starts a second attempt, which moves every byte again: gives what the first
    /// attempt landed back to `total` and counts from zero. When the task was sealed
    /// meanwhile (it ended at its deadline), the seal's count stands and nothing changes.
    /// Every slice of the first attempt must have reported before this.
    pub fn restart(&self, total: &AtomicU64) {
        let landed = self.word.load(Ordering::Acquire);
        if landed & SEALED != 0 {
            return;
        }
        // Given back before the word is cleared, so the total never dips below what a
        // seal in between subtracts; taken back when that seal came first.
        total.fetch_add(landed, Ordering::AcqRel);
        if self
            .word
            .compare_exchange(landed, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            total.fetch_sub(landed, Ordering::AcqRel);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// The owed flag is what tells a waiter run late from a lost wake-up: set when the
    /// last end found a waiter registered, clear when it found none, and cleared again by
    /// the next round.
    #[test]
    fn the_last_end_records_whether_it_owed_a_wake_up() {
        let gate = std::sync::Arc::new(EndGate::new());
        gate.reset(1);
        assert!(gate.end_one());
        assert!(!gate.owed(), "nobody waited: nothing owed");

        gate.reset(1);
        let g = gate.clone();
        let (asked, slept) = std::sync::mpsc::channel();
        let waiter = thread::spawn(move || {
            g.wait(|| {
                let _ = asked.send(());
                Some(Duration::from_secs(30))
            })
        });
        // The waiter asked for its sleep: it is registered.
        slept.recv().unwrap();
        assert!(gate.end_one());
        assert!(waiter.join().unwrap());
        assert!(gate.owed(), "a registered waiter's wake-up was owed");

        gate.reset(2);
        assert!(!gate.owed(), "a new round owes nothing");
        assert_eq!(gate.open(), 2);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;

    /// Runs `f` under the model checker with a preemption bound that keeps every test
    /// to seconds (loom's own advice: bugs need few preemptions to show).
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(f);
    }

    /// Waits on the gate in a thread of its own (loom's `join` shares the parking slot
    /// with `park`, so the main thread never parks on the gate). A waiter that went to
    /// sleep (it asked its budget) must find its wake-up owed: the last ender saw it.
    fn spawn_waiter(gate: &Arc<EndGate>) -> thread::JoinHandle<()> {
        let g = gate.clone();
        thread::spawn(move || {
            let mut slept = false;
            assert!(g.wait(|| {
                slept = true;
                Some(Duration::from_secs(30))
            }));
            assert_eq!(g.open(), 0);
            assert!(!slept || g.owed(), "a waiter slept and no wake-up was owed");
        })
    }

    /// Two threads end the gate's two tasks while a third waits: the waiter always
    /// returns (a lost wake-up would leave it parked and loom would report a deadlock).
    #[test]
    fn gate_waiter_is_always_woken() {
        model(|| {
            let gate = Arc::new(EndGate::new());
            gate.reset(2);
            let waiter = spawn_waiter(&gate);
            let g = gate.clone();
            let ender = thread::spawn(move || {
                g.end_one();
            });
            gate.end_one();
            ender.join().unwrap();
            waiter.join().unwrap();
        });
    }

    /// An early nudge racing the last end neither loses the final wake-up nor ends the
    /// wait before the count reaches zero.
    #[test]
    fn gate_nudge_and_end_race() {
        model(|| {
            let gate = Arc::new(EndGate::new());
            gate.reset(1);
            let waiter = spawn_waiter(&gate);
            let g = gate.clone();
            let nudger = thread::spawn(move || g.nudge());
            assert!(gate.end_one());
            nudger.join().unwrap();
            waiter.join().unwrap();
        });
    }

    /// The protocol the gate replaces, kept as a witness that the checker finds the bug:
    /// the waiter stores "waiting" then loads the count; the ender decrements the count
    /// then loads "waiting". With acquire/release on two locations both loads may miss
    /// the other's store, the waiter parks for good, and loom reports the deadlock.
    #[test]
    fn two_word_protocol_loses_a_wake_up() {
        // loom reports the deadlock by panicking, and its cleanup then aborts the
        // process: run the model in a child and read its verdict.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "sync::loom_tests::two_word_protocol_model",
                "--test-threads=1",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "the checker missed the lost wake-up");
        assert!(text.contains("deadlock"), "{text}");
    }

    #[test]
    #[ignore = "run by two_word_protocol_loses_a_wake_up in a child process"]
    fn two_word_protocol_model() {
        model(|| {
            struct TwoWords {
                open: loom::sync::atomic::AtomicU32,
                waiting: AtomicBool,
                waiter: Mutex<Option<Thread>>,
            }
            let g = Arc::new(TwoWords {
                open: loom::sync::atomic::AtomicU32::new(1),
                waiting: AtomicBool::new(false),
                waiter: Mutex::new(None),
            });
            let w = g.clone();
            let waiter = thread::spawn(move || {
                *w.waiter.lock().unwrap() = Some(thread::current());
                w.waiting.store(true, Ordering::Release);
                while w.open.load(Ordering::Acquire) != 0 {
                    thread::park();
                }
            });
            if g.open.fetch_sub(1, Ordering::AcqRel) == 1 && g.waiting.load(Ordering::Acquire) {
                if let Some(t) = g.waiter.lock().unwrap().as_ref() {
                    t.unpark();
                }
            }
            waiter.join().unwrap();
        });
    }

    /// Ending more often than the count is ignored, and exactly one ender sees "last".
    #[test]
    fn gate_exactly_one_last() {
        model(|| {
            let gate = Arc::new(EndGate::new());
            gate.reset(1);
            let lasts = Arc::new(loom::sync::atomic::AtomicUsize::new(0));
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let (g, l) = (gate.clone(), lasts.clone());
                    thread::spawn(move || {
                        if g.end_one() {
                            l.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            assert_eq!(lasts.load(Ordering::Relaxed), 1);
            assert_eq!(gate.open(), 0);
        });
    }

    /// A lane in miniature: producers queue items and ring; a runner drains with a budget
    /// of one item and then hands the rest to the service thread. Every item is drained
    /// exactly once, and nobody waits for a timer.
    #[test]
    fn doorbell_drains_everything_once() {
        model(|| {
            struct Lane {
                bell: Doorbell,
                queue: Mutex<Vec<u32>>,
                drained: Mutex<Vec<u32>>,
                closed: AtomicBool,
                service: Mutex<Option<Thread>>,
            }
            impl Lane {
                /// Drains up to `budget` items; true when the queue was found empty.
                fn drain(&self, budget: usize) -> bool {
                    for _ in 0..budget {
                        let item = self.queue.lock().unwrap().pop();
                        match item {
                            Some(i) => self.drained.lock().unwrap().push(i),
                            None => return true,
                        }
                    }
                    self.queue.lock().unwrap().is_empty()
                }
                fn run(&self, budget: usize) {
                    loop {
                        if !self.drain(budget) {
                            self.bell.hand();
                            if let Some(t) = self.service.lock().unwrap().as_ref() {
                                t.unpark();
                            }
                            return;
                        }
                        if !self.bell.done() {
                            return;
                        }
                    }
                }
                fn produce(&self, item: u32) {
                    self.queue.lock().unwrap().push(item);
                    if self.bell.ring() {
                        self.run(1);
                    }
                }
            }
            let lane = Arc::new(Lane {
                bell: Doorbell::new(),
                queue: Mutex::new(Vec::new()),
                drained: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                service: Mutex::new(None),
            });
            let l = lane.clone();
            let service = thread::spawn(move || loop {
                if l.bell.take() {
                    l.run(usize::MAX);
                    continue;
                }
                if l.closed.load(Ordering::Acquire) {
                    return;
                }
                thread::park();
            });
            *lane.service.lock().unwrap() = Some(service.thread().clone());
            let l = lane.clone();
            let producer = thread::spawn(move || {
                l.produce(1);
                l.produce(2);
            });
            lane.produce(3);
            producer.join().unwrap();
            // Quiesce: once the bell is idle (nobody running, nothing handed), every item
            // must have been drained; an item stranded by a lost ring stays queued.
            loop {
                let s = lane.bell.state.load(Ordering::Acquire);
                if s == IDLE {
                    break;
                }
                thread::yield_now();
            }
            lane.closed.store(true, Ordering::Release);
            service.thread().unpark();
            service.join().unwrap();
            let mut drained = lane.drained.lock().unwrap().clone();
            drained.sort_unstable();
            assert_eq!(drained, vec![1, 2, 3]);
            assert!(lane.queue.lock().unwrap().is_empty());
        });
    }

    /// Counts `n` off `total`, failing the model if that would take it below zero.
    fn take(total: &AtomicU64, n: u64) {
        let before = total.fetch_sub(n, Ordering::AcqRel);
        assert!(before >= n, "the total fell below zero: {before} - {n}");
    }

    /// A task of 10 bytes in two slices (4 and 6) that a second thread seals at its
    /// deadline: whatever the order, the batch's total ends at zero, never below.
    #[test]
    fn landed_bytes_are_counted_once_by_the_slice_or_the_seal() {
        model(|| {
            let total = Arc::new(AtomicU64::new(10));
            let task = Arc::new(Landed::new());
            let (t, l) = (total.clone(), task.clone());
            let reporter = thread::spawn(move || {
                for bytes in [4, 6] {
                    if l.land(bytes) {
                        take(&t, bytes);
                    }
                }
            });
            let landed = task.seal();
            take(&total, 10 - landed);
            reporter.join().unwrap();
            assert_eq!(total.load(Ordering::Acquire), 0);
        });
    }

    /// A first attempt landed 4 of 10 bytes and failed; its retry (restart, then one
    /// slice of 10) races the deadline's seal: the total ends at zero, never below.
    #[test]
    fn a_restart_racing_the_seal_leaves_the_total_exact() {
        model(|| {
            let total = Arc::new(AtomicU64::new(10));
            let task = Arc::new(Landed::new());
            assert!(task.land(4));
            take(&total, 4);
            let (t, l) = (total.clone(), task.clone());
            let retry = thread::spawn(move || {
                l.restart(&t);
                if l.land(10) {
                    take(&t, 10);
                }
            });
            let landed = task.seal();
            take(&total, 10 - landed);
            retry.join().unwrap();
            assert_eq!(total.load(Ordering::Acquire), 0);
        });
    }
}
