//! Test support for transports: shared stubs and the conformance suite every
//! [`Transport`] must pass. Behind the `__testing` feature, for transports' own tests;
//! not part of ferry's API.
//!
//! A transport's test builds a [`Pair`] (a started target with nothing registered, and a
//! started initiator reporting to a [`Recorder`]) and hands the maker to
//! [`conformance`] with its [`Capabilities`]. Every check makes a fresh pair, so one
//! check's failure never leaks into another.
#![allow(unsafe_code)]

pub mod warnings;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{
    Access, CompletionToken, Completions, Connection, ControlPlane, Endpoint, FailReason, Location,
    Opcode, PeerControl, Protocol, RegionMemory, RemoteKeys, Slice, Staging, StagingBuffer,
    StagingStats, Transport, TransportError,
};

/// One report: the slice's token and its result.
pub type Report = (CompletionToken, Result<usize, FailReason>);

/// How long a check waits for what must happen; reaching it fails the check rather than
/// hanging it.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A [`Completions`] that records every report, for tests to wait on.
#[derive(Default)]
pub struct Recorder {
    reports: Mutex<Vec<Report>>,
    arrived: Condvar,
}

impl Recorder {
    /// An empty recorder, ready to hand to a transport.
    pub fn new() -> Arc<Self> {
        Arc::new(Recorder::default())
    }

    /// Waits until `n` reports for batch slot `slot` have arrived, and takes them out.
    /// Panics when they have not arrived within [`PATIENCE`].
    pub fn take(&self, slot: u32, n: usize) -> Vec<Report> {
        let deadline = Instant::now() + PATIENCE;
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let have = reports.iter().filter(|(t, _)| t.slot == slot).count();
            if have >= n {
                let (mine, rest): (Vec<Report>, Vec<Report>) =
                    reports.drain(..).partition(|(t, _)| t.slot == slot);
                *reports = rest;
                for (_, result) in &mine {
                    if let Err(r) = *result {
                        assert_eq!(
                            FailReason::from_bits(r.to_bits()),
                            Some(r),
                            "a reported reason changed in the word the engine stores"
                        );
                    }
                }
                return mine;
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| {
                    panic!("{have} of {n} reports for slot {slot} arrived within {PATIENCE:?}")
                });
            reports = self
                .arrived
                .wait_timeout(reports, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// How many reports for `slot` arrived and were not taken.
    pub fn pending(&self, slot: u32) -> usize {
        let reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        reports.iter().filter(|(t, _)| t.slot == slot).count()
    }
}

impl Completions for Recorder {
    fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((token, result));
        self.arrived.notify_all();
    }
}

/// A control plane with nothing to serve: data requests need none.
pub struct NoControl;

impl ControlPlane for NoControl {
    fn descriptor(&self) -> Vec<u8> {
        Vec::new()
    }

    fn notification(&self, _from: &str, _body: &[u8]) -> bool {
        false
    }
}

/// `len` random bytes (not cryptographic; different in every call and every run).
pub fn random(len: usize) -> Vec<u8> {
    let mut state = RandomState::new().hash_one(Instant::now()) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn owned(bytes: Vec<u8>, location: Location) -> Arc<RegionMemory> {
    let mut bytes = bytes.into_boxed_slice();
    let len = bytes.len();
    let ptr = NonNull::new(bytes.as_mut_ptr()).unwrap_or(NonNull::dangling());
    // SAFETY: the boxed slice moves into the region as its owner, so the bytes live, at
    // a fixed address, as long as the region; tests read them only through the region.
    Arc::new(unsafe { RegionMemory::from_raw(ptr, len, location, Box::new(bytes)) })
}

/// Host memory holding `bytes`.
pub fn host_region(bytes: Vec<u8>) -> Arc<RegionMemory> {
    owned(bytes, Location::host())
}

/// Host memory holding `bytes`, labelled as device memory (`cuda:0`): a stand-in for a
/// GPU buffer where none exists. Every host accessor of the region refuses it, as for
/// real device memory; only a transport set up to treat it as host memory (a CPU
/// [`CpuStaging`], a test knob) can carry it.
pub fn stand_in_device(bytes: Vec<u8>) -> Arc<RegionMemory> {
    owned(bytes, Location::Cuda { device: 0 })
}

/// What a region holds, whether host memory or a [`stand_in_device`] region.
pub fn contents(r: &RegionMemory) -> Vec<u8> {
    let mut out = vec![0u8; r.len()];
    if r.location().is_host() {
        assert!(r.copy_to_slice_at(0, &mut out));
    } else {
        stand_in_read(r, 0, &mut out);
    }
    out
}

fn stand_in_addr(r: &RegionMemory, offset: usize, len: usize) -> usize {
    assert_eq!(
        r.location(),
        Location::Cuda { device: 0 },
        "only stand-in regions are read this way"
    );
    r.dma_addr(offset, len)
        .unwrap_or_else(|| panic!("{len} bytes at {offset} lie outside the region")) as usize
}

fn stand_in_read(r: &RegionMemory, offset: usize, out: &mut [u8]) {
    let src = stand_in_addr(r, offset, out.len());
    // SAFETY: stand-in regions are host memory owned by the region (`stand_in_device`),
    // alive while `r` is borrowed, and the range is inside it (checked by `dma_addr`).
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, out.as_mut_ptr(), out.len()) }
}

fn stand_in_write(r: &RegionMemory, offset: usize, data: &[u8]) {
    let dst = stand_in_addr(r, offset, data.len());
    // SAFETY: as in `stand_in_read`; registered memory is shared memory, written here as
    // a device's copy engine would.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, data.len()) }
}

/// Largest copy of one [`CpuStaging`] buffer.
pub const STAGING_CHUNK: usize = 64 * 1024;

/// A [`Staging`] whose "device" is [`stand_in_device`] memory, copied with the CPU: the
/// staging pipeline of a transport runs without a GPU.
#[derive(Default)]
pub struct CpuStaging {
    leased: Arc<std::sync::atomic::AtomicUsize>,
    created: std::sync::atomic::AtomicUsize,
}

struct CpuBuffer {
    host: Vec<u8>,
    leased: Arc<std::sync::atomic::AtomicUsize>,
}

impl Staging for CpuStaging {
    fn buffer(&self, location: Location) -> Result<Box<dyn StagingBuffer>, TransportError> {
        use std::sync::atomic::Ordering::Relaxed;
        if location != (Location::Cuda { device: 0 }) {
            return Err(TransportError::invalid(format!(
                "the CPU stand-in stages cuda:0 only, not {location}"
            )));
        }
        self.created.fetch_add(1, Relaxed);
        self.leased.fetch_add(1, Relaxed);
        Ok(Box::new(CpuBuffer {
            host: vec![0; STAGING_CHUNK],
            leased: self.leased.clone(),
        }))
    }

    fn stats(&self) -> StagingStats {
        use std::sync::atomic::Ordering::Relaxed;
        StagingStats {
            leased: self.leased.load(Relaxed),
            created: vec![(0, self.created.load(Relaxed))],
        }
    }
}

impl StagingBuffer for CpuBuffer {
    fn capacity(&self) -> usize {
        self.host.len()
    }

    fn download(
        &mut self,
        region: &RegionMemory,
        offset: usize,
        len: usize,
    ) -> Result<(), TransportError> {
        stand_in_read(region, offset, &mut self.host[..len]);
        Ok(())
    }

    fn upload(
        &mut self,
        region: &RegionMemory,
        offset: usize,
        len: usize,
    ) -> Result<(), TransportError> {
        stand_in_write(region, offset, &self.host[..len]);
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
        self.leased
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A slice of `len` bytes at `offset` of both `local` and `remote`, reported under
/// (`slot`, `task`).
#[allow(clippy::too_many_arguments)]
pub fn slice(
    op: Opcode,
    local: &Arc<RegionMemory>,
    remote: &RegionMemory,
    keys: &RemoteKeys,
    offset: usize,
    len: usize,
    slot: u32,
    task: u32,
) -> Slice {
    Slice {
        op,
        local: local.clone(),
        local_offset: offset,
        remote_addr: remote.addr() + offset as u64,
        remote_base: remote.addr(),
        remote_keys: keys.clone(),
        len,
        token: CompletionToken {
            slot,
            generation: 0,
            task,
        },
        deadline: Instant::now() + PATIENCE,
    }
}

/// Makes a connection dead by whatever means its transport offers. It may post through
/// `post` (one small WRITE per call, already reported when it returns `Ok`) until the
/// transport refuses one. The suite then waits until `is_alive()` is false.
pub type Kill = Box<dyn Fn(&dyn Connection, &mut dyn FnMut() -> Result<(), FailReason>)>;

/// The kill of a transport with a fault knob that refuses every `every`-th post: posts
/// until one is refused (at most `every` of them).
pub fn kill_by_fault_knob(every: u64) -> Kill {
    Box::new(move |_, post| {
        for _ in 0..every {
            if post().is_err() {
                return;
            }
        }
        panic!("the fault knob never refused a post");
    })
}

/// What one check works on: two started transports of the same kind.
pub struct Pair {
    /// Started, nothing registered; serves `endpoint`.
    pub target: Arc<dyn Transport>,
    /// The target's endpoint.
    pub endpoint: Endpoint,
    /// Started, nothing registered, reporting to `reports`.
    pub initiator: Arc<dyn Transport>,
    /// Where the initiator's reports go.
    pub reports: Arc<Recorder>,
    /// How to make the initiator's connection to `endpoint` dead.
    pub kill: Kill,
}

/// What a check asks of the pair it makes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Setup {
    /// The initiator withholds its first completions (as if the device were slow), so
    /// work is surely in flight when the check shuts the transport down. A transport
    /// without such a knob ignores it and says so in
    /// [`Capabilities::holds_completions`].
    pub hold_completions: bool,
}

/// Where transports differ, so the suite asks instead of matching names.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities {
    /// The pair carries [`stand_in_device`] memory on both sides (TCP with a
    /// [`CpuStaging`], a fabric with a test knob that registers it as host memory).
    pub device_memory: bool,
    /// A request that names a deregistered region is refused by the target with a
    /// [`FailReason::Remote`] status (a software target); otherwise it fails with any
    /// reason (a NIC's error completion).
    pub refusal_is_remote_status: bool,
    /// The pair honours [`Setup::hold_completions`]: every slice posted before shutdown
    /// must then end with [`FailReason::Shutdown`].
    pub holds_completions: bool,
    /// The most slices a check may post on one pair before the kill knob (if the
    /// transport's kill uses one) trips.
    pub posts_per_pair: usize,
}

/// Runs every check of the transport contract, each on a fresh pair from `make`; a
/// check says in [`Setup`] what it needs of its pair.
pub fn conformance(caps: &Capabilities, make: &dyn Fn(&Setup) -> Pair) {
    every_posted_slice_completes_exactly_once(caps, make);
    a_dead_connection_is_replaced_on_connect(caps, make);
    shutdown_fails_in_flight_work_and_later_posts(caps, make);
    register_deregister_round_trips(caps, make);
    if caps.device_memory {
        device_memory_is_posted_through_the_device_address_view(caps, make);
    }
    failure_reasons_survive_the_word_round_trip();
}

const LEN: usize = 1 << 20;

/// Registers `bytes` on the target for remote access and returns the region and keys.
fn exposed(t: &dyn Transport, r: Arc<RegionMemory>) -> (Arc<RegionMemory>, RemoteKeys) {
    let keys = t
        .register(&r, Access::RemoteReadWrite)
        .unwrap_or_else(|e| panic!("{} target registers {}: {e}", t.protocol(), r.location()));
    (
        r,
        RemoteKeys::new(keys).expect("register returns one key per rail, never none"),
    )
}

fn local(t: &dyn Transport, r: Arc<RegionMemory>) -> Arc<RegionMemory> {
    t.register(&r, Access::Local)
        .unwrap_or_else(|e| panic!("{} initiator registers {}: {e}", t.protocol(), r.location()));
    r
}

/// Posts `op` over the whole of `local` in `pieces` slices under `slot` and checks that
/// each is reported exactly once, in full.
#[allow(clippy::too_many_arguments)]
fn move_all(
    pair: &Pair,
    conn: &dyn Connection,
    op: Opcode,
    local: &Arc<RegionMemory>,
    remote: &RegionMemory,
    keys: &RemoteKeys,
    pieces: usize,
    slot: u32,
) {
    let proto = pair.initiator.protocol();
    // At least `pieces`, none larger than the transport takes; the last one may be short.
    let len = local
        .len()
        .div_ceil(pieces)
        .min(pair.initiator.max_slice())
        .max(1);
    let pieces = local.len().div_ceil(len);
    let len_of = |i: usize| len.min(local.len() - i * len);
    for i in 0..pieces {
        conn.post(slice(
            op,
            local,
            remote,
            keys,
            i * len,
            len_of(i),
            slot,
            i as u32,
        ))
        .unwrap_or_else(|e| panic!("{proto}: {op} slice {i} of {}: {e}", local.location()));
    }
    conn.flush();
    let mut seen = vec![false; pieces];
    for (token, result) in pair.reports.take(slot, pieces) {
        let i = token.task as usize;
        assert_eq!(result, Ok(len_of(i)), "{proto}: {op} slice {i}");
        assert!(
            !std::mem::replace(&mut seen[i], true),
            "{proto}: slice {i} reported twice"
        );
    }
}

/// Writes `source` over `remote` and reads it back into `back`; every byte checked.
#[allow(clippy::too_many_arguments)]
fn round_trip(
    pair: &Pair,
    conn: &dyn Connection,
    source: &Arc<RegionMemory>,
    back: &Arc<RegionMemory>,
    remote: &RegionMemory,
    keys: &RemoteKeys,
    pieces: usize,
    slot: u32,
) {
    let proto = pair.initiator.protocol();
    assert!(
        contents(remote) != contents(source),
        "random regions differ"
    );
    move_all(
        pair,
        conn,
        Opcode::Write,
        source,
        remote,
        keys,
        pieces,
        slot,
    );
    assert!(
        contents(remote) == contents(source),
        "{proto}: written bytes differ ({} to {})",
        source.location(),
        remote.location()
    );
    move_all(
        pair,
        conn,
        Opcode::Read,
        back,
        remote,
        keys,
        pieces,
        slot + 1,
    );
    assert!(
        contents(back) == contents(source),
        "{proto}: read bytes differ ({} from {})",
        back.location(),
        remote.location()
    );
}

fn stop(pair: &Pair, slots: &[u32]) {
    pair.initiator.shutdown();
    pair.target.shutdown();
    for &slot in slots {
        assert_eq!(
            pair.reports.pending(slot),
            0,
            "{}: a slice of slot {slot} was reported more than once",
            pair.initiator.protocol()
        );
    }
}

/// A [`PeerControl`] that hands a set-up message straight to the peer transport's
/// [`Transport::answer`], as the peer's engine does when the message arrives on its port.
pub struct Direct(pub Arc<dyn Transport>);

impl PeerControl for Direct {
    fn exchange(
        &self,
        protocol: Protocol,
        body: &[u8],
        _timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        assert_eq!(
            protocol,
            self.0.protocol(),
            "an exchange for another transport"
        );
        self.0.answer(body)
    }

    fn name(&self) -> &str {
        DIRECT_PEER
    }
}

/// How [`Direct`] names the peer it reaches, for tests of what logs say.
pub const DIRECT_PEER: &str = "the conformance suite's target";

fn connect(pair: &Pair) -> Arc<dyn Connection> {
    pair.initiator
        .connect(&pair.endpoint, &Direct(pair.target.clone()))
        .unwrap_or_else(|e| panic!("{} connects: {e}", pair.initiator.protocol()))
}

/// Many slices, WRITE then READ, each reported once with its length, data byte for byte.
fn every_posted_slice_completes_exactly_once(caps: &Capabilities, make: &dyn Fn(&Setup) -> Pair) {
    let pair = make(&Setup::default());
    let pieces = 32.min(caps.posts_per_pair / 4).max(1);
    let (remote, keys) = exposed(&*pair.target, host_region(random(LEN)));
    let source = local(&*pair.initiator, host_region(random(LEN)));
    let back = local(&*pair.initiator, host_region(random(LEN)));
    let conn = connect(&pair);
    round_trip(&pair, &*conn, &source, &back, &remote, &keys, pieces, 1);
    // Again on the same connection, with fresh bytes: nothing of the first round lingers.
    let (remote2, keys2) = exposed(&*pair.target, host_region(random(LEN)));
    round_trip(&pair, &*conn, &source, &back, &remote2, &keys2, pieces, 3);
    assert!(conn.is_alive(), "{}", pair.initiator.protocol());
    stop(&pair, &[1, 2, 3, 4]);
}

/// The deadline of a request a transport may never hear back about.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(5);

const KILL_SLOT: u32 = 0xdead;

/// A connection made dead is no longer alive, a live one is kept, and the next connect
/// returns a new connection that carries every byte.
fn a_dead_connection_is_replaced_on_connect(_caps: &Capabilities, make: &dyn Fn(&Setup) -> Pair) {
    let pair = make(&Setup::default());
    let proto = pair.initiator.protocol();
    let (remote, keys) = exposed(&*pair.target, host_region(random(LEN)));
    let source = local(&*pair.initiator, host_region(random(LEN)));
    let back = local(&*pair.initiator, host_region(random(LEN)));
    let conn = connect(&pair);
    round_trip(&pair, &*conn, &source, &back, &remote, &keys, 2, 10);
    assert!(
        Arc::ptr_eq(&conn, &connect(&pair)),
        "{proto}: a live connection is kept"
    );

    let mut fillers = 0u32;
    let mut post = || {
        let s = slice(
            Opcode::Write,
            &source,
            &remote,
            &keys,
            0,
            64,
            KILL_SLOT,
            fillers,
        );
        fillers += 1;
        conn.post(s)?;
        conn.flush();
        pair.reports.take(KILL_SLOT, 1);
        Ok(())
    };
    (pair.kill)(&*conn, &mut post);
    let deadline = Instant::now() + PATIENCE;
    while conn.is_alive() {
        assert!(
            Instant::now() < deadline,
            "{proto}: the killed connection still says it is alive"
        );
        std::thread::yield_now();
    }

    let fresh = connect(&pair);
    assert!(
        !Arc::ptr_eq(&conn, &fresh),
        "{proto}: a dead connection is replaced on connect"
    );
    assert!(fresh.is_alive(), "{proto}: the replacement is alive");
    let source2 = local(&*pair.initiator, host_region(random(LEN)));
    round_trip(&pair, &*fresh, &source2, &back, &remote, &keys, 2, 12);
    assert!(
        Arc::ptr_eq(&fresh, &connect(&pair)),
        "{proto}: the replacement is kept while it lives"
    );
    stop(&pair, &[10, 11, 12, 13, KILL_SLOT]);
}

/// Shutdown ends everything in flight: every slice is reported exactly once, as done or
/// as [`FailReason::Shutdown`]; later posts fail and are never reported.
fn shutdown_fails_in_flight_work_and_later_posts(
    caps: &Capabilities,
    make: &dyn Fn(&Setup) -> Pair,
) {
    let pair = make(&Setup {
        hold_completions: true,
    });
    let proto = pair.initiator.protocol();
    let pieces = 64.min(caps.posts_per_pair - 1).max(1);
    let big = 4 << 20;
    let (remote, keys) = exposed(&*pair.target, host_region(random(big)));
    let source = local(&*pair.initiator, host_region(random(big)));
    let conn = connect(&pair);
    let len = (big / pieces).min(pair.initiator.max_slice());
    let mut posted = 0;
    for i in 0..pieces {
        let s = slice(
            Opcode::Write,
            &source,
            &remote,
            &keys,
            i * len,
            len,
            20,
            i as u32,
        );
        if conn.post(s).is_ok() {
            posted += 1;
        }
    }
    conn.flush();
    pair.initiator.shutdown();
    let mut seen = vec![false; pieces];
    for (token, result) in pair.reports.take(20, posted) {
        assert!(
            (!caps.holds_completions && matches!(result, Ok(n) if n == len))
                || result == Err(FailReason::Shutdown),
            "{proto}: slice {} in flight at shutdown ended with {result:?}",
            token.task
        );
        assert!(
            !std::mem::replace(&mut seen[token.task as usize], true),
            "{proto}: slice {} reported twice",
            token.task
        );
    }
    let after = conn.post(slice(Opcode::Write, &source, &remote, &keys, 0, 64, 21, 0));
    assert!(after.is_err(), "{proto}: a post after shutdown is refused");
    assert!(
        !conn.is_alive(),
        "{proto}: a shut-down connection is not alive"
    );
    // A shut-down transport opens no working connection: connect fails, or what it
    // returns is not alive and refuses work.
    if let Ok(late) = pair
        .initiator
        .connect(&pair.endpoint, &Direct(pair.target.clone()))
    {
        assert!(!late.is_alive(), "{proto}: connected after shutdown");
        let refused = late.post(slice(Opcode::Write, &source, &remote, &keys, 0, 64, 21, 1));
        assert!(refused.is_err(), "{proto}: posted after shutdown");
    }
    pair.target.shutdown();
    assert_eq!(pair.reports.pending(20), 0, "{proto}: reported twice");
    assert_eq!(
        pair.reports.pending(21),
        0,
        "{proto}: a refused post was reported"
    );
}

/// A region works while registered, and again once registered anew; once deregistered
/// its key is refused (by the target's status where the transport has a software
/// target), and nothing is written through it.
fn register_deregister_round_trips(caps: &Capabilities, make: &dyn Fn(&Setup) -> Pair) {
    let pair = make(&Setup::default());
    let proto = pair.initiator.protocol();
    let source = local(&*pair.initiator, host_region(random(LEN)));
    let back = local(&*pair.initiator, host_region(random(LEN)));
    let conn = connect(&pair);

    // Registered, deregistered, registered again: the new keys work.
    let (again, keys) = exposed(&*pair.target, host_region(random(LEN)));
    round_trip(&pair, &*conn, &source, &back, &again, &keys, 2, 30);
    pair.target.deregister(&again);
    let (again, again_keys) = exposed(&*pair.target, again);
    assert!(source.copy_from_slice_at(0, &random(LEN)));
    round_trip(&pair, &*conn, &source, &back, &again, &again_keys, 2, 32);

    // Deregistered: a WRITE and a READ naming it fail, and move no byte. (A fabric may
    // never hear back, and end the slice by its deadline.)
    let (gone, keys) = exposed(&*pair.target, host_region(random(LEN)));
    pair.target.deregister(&gone);
    let (gone_before, back_before) = (contents(&gone), contents(&back));
    let fresh = local(&*pair.initiator, host_region(random(LEN)));
    for (i, (op, l)) in [(Opcode::Write, &fresh), (Opcode::Read, &back)]
        .into_iter()
        .enumerate()
    {
        if !conn.is_alive() {
            // The first refusal took the connection down (a NIC's error): enough.
            assert!(
                !caps.refusal_is_remote_status,
                "{proto}: a refusal killed the connection"
            );
            break;
        }
        let mut refused = slice(op, l, &gone, &keys, 0, 4096, 34, i as u32);
        // A transport that never hears back still ends the slice by its deadline.
        refused.deadline = Instant::now() + REFUSAL_DEADLINE;
        match conn.post(refused) {
            Ok(()) => {
                conn.flush();
                let (_, result) = pair.reports.take(34, 1).remove(0);
                let reason = result
                    .err()
                    .unwrap_or_else(|| panic!("{proto}: {op} with a deregistered key succeeded"));
                if caps.refusal_is_remote_status {
                    assert!(
                        matches!(reason, FailReason::Remote(_)),
                        "{proto}: {op} with a deregistered key failed with {reason:?}, not a \
                         status from the target"
                    );
                }
            }
            Err(reason) => assert!(
                !caps.refusal_is_remote_status,
                "{proto}: {op} refused at post ({reason}) instead of by the target"
            ),
        }
    }
    assert!(
        contents(&gone) == gone_before,
        "{proto}: a write through a deregistered key landed"
    );
    assert!(
        contents(&back) == back_before,
        "{proto}: a read through a deregistered key landed"
    );
    if caps.refusal_is_remote_status {
        // A refusal is an answer, not a fault: the connection carries on.
        assert!(
            conn.is_alive(),
            "{proto}: a refused request killed its connection"
        );
        round_trip(&pair, &*conn, &fresh, &back, &again, &again_keys, 2, 36);
    }
    stop(&pair, &[30, 31, 32, 33, 34, 36, 37]);
}

/// Device memory (a CPU stand-in) moves byte for byte, as source and destination, to
/// host and to device memory. The host views refuse it, so a transport that reached it
/// through them would fail here; it must use the device-address view or its staging.
fn device_memory_is_posted_through_the_device_address_view(
    _caps: &Capabilities,
    make: &dyn Fn(&Setup) -> Pair,
) {
    let pair = make(&Setup::default());
    let conn = connect(&pair);
    let mut slot = 40;
    for remote in [host_region(random(LEN)), stand_in_device(random(LEN))] {
        let (remote, keys) = exposed(&*pair.target, remote);
        let source = local(&*pair.initiator, stand_in_device(random(LEN)));
        let back = local(&*pair.initiator, stand_in_device(random(LEN)));
        for r in [&source, &back] {
            assert!(r.io_slice(0, LEN).is_none(), "the host views refuse it");
            assert_eq!(r.dma_addr(0, LEN), Some(r.addr()));
        }
        round_trip(&pair, &*conn, &source, &back, &remote, &keys, 4, slot);
        slot += 2;
    }
    // Host memory into device memory on the target too.
    let (remote, keys) = exposed(&*pair.target, stand_in_device(random(LEN)));
    let source = local(&*pair.initiator, host_region(random(LEN)));
    let back = local(&*pair.initiator, host_region(random(LEN)));
    round_trip(&pair, &*conn, &source, &back, &remote, &keys, 4, slot);
    assert!(conn.is_alive(), "{}", pair.initiator.protocol());
    stop(&pair, &(40..slot + 2).collect::<Vec<_>>());
}

/// Every reason a transport can report survives the word the engine stores it in.
fn failure_reasons_survive_the_word_round_trip() {
    let mut reasons = vec![
        FailReason::ConnectionLost,
        FailReason::TimedOut,
        FailReason::Shutdown,
        FailReason::Unsupported,
    ];
    reasons.extend((0..=u8::MAX).map(|c| FailReason::Remote(crate::RemoteStatus::from_u8(c))));
    for transport in crate::Protocol::ALL {
        for code in [
            0,
            1,
            5,
            255,
            256,
            257,
            265,
            4096,
            -1,
            -265,
            i32::MAX,
            i32::MIN,
        ] {
            reasons.push(FailReason::Device { transport, code });
        }
    }
    for r in reasons {
        let bits = r.to_bits();
        assert_ne!(bits, 0, "{r:?} encodes to 0, which means no reason");
        assert_eq!(
            FailReason::from_bits(bits),
            Some(r),
            "{r:?} changed in the word"
        );
    }
}

/// A global allocator that counts allocations while counting is on, for tests that
/// prove a path allocates nothing. A test binary installs it with
/// `#[global_allocator] static GLOBAL: CountingAllocator = CountingAllocator;` and reads
/// [`CountingAllocator::count_while`].
pub struct CountingAllocator;

static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl CountingAllocator {
    fn count() {
        if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Runs `f` and returns how many allocations every thread of the process made
    /// meanwhile (with this allocator installed; 0 otherwise).
    pub fn count_while(f: impl FnOnce()) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        ALLOCATIONS.store(0, SeqCst);
        COUNTING.store(true, SeqCst);
        f();
        COUNTING.store(false, SeqCst);
        ALLOCATIONS.swap(0, SeqCst)
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches
// only atomics (no allocation, no panic).
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::count();
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::count();
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        Self::count();
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

/// Counts reports without allocating (for the allocation-counting tests).
#[derive(Default)]
pub struct Tally {
    /// Slices reported.
    pub done: std::sync::atomic::AtomicU64,
    /// Of those, failed.
    pub failed: std::sync::atomic::AtomicU64,
}

impl Completions for Tally {
    fn complete(&self, _token: CompletionToken, result: Result<usize, FailReason>) {
        use std::sync::atomic::Ordering;
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.done.fetch_add(1, Ordering::Release);
    }
}

/// Keeps `window` slices of `piece` bytes in flight on `conn` until `total` more have been
/// reported to `tally`, cycling over `local` (and the same offsets of `remote`).
#[allow(clippy::too_many_arguments)]
pub fn pump(
    conn: &dyn Connection,
    tally: &Tally,
    op: Opcode,
    local: &Arc<RegionMemory>,
    remote: &RegionMemory,
    keys: &RemoteKeys,
    piece: usize,
    window: u64,
    total: u64,
) {
    use std::sync::atomic::Ordering;
    let pieces = (local.len() / piece) as u64;
    let base = tally.done.load(Ordering::Acquire);
    let give_up = Instant::now() + PATIENCE;
    let mut posted = 0u64;
    while tally.done.load(Ordering::Acquire) - base < total {
        assert!(Instant::now() < give_up, "the transfers stalled");
        let done = tally.done.load(Ordering::Acquire) - base;
        if posted < total && posted - done < window {
            let offset = (posted % pieces) as usize * piece;
            conn.post(slice(
                op,
                local,
                remote,
                keys,
                offset,
                piece,
                0,
                posted as u32,
            ))
            .expect("posted");
            posted += 1;
        } else {
            std::thread::yield_now();
        }
    }
}
