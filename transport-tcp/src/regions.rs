//! The target's table of registered regions: every request is resolved here (address,
//! length, key, access) before a byte moves.
//!
//! A request names its region by key, so resolving it is one hash lookup by key plus a
//! bounds check, whatever the number of regions; only a refused request looks at the
//! address index (O(log n)), to tell a wrong key from an unregistered address.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use ferry_transport_api::{Access, Opcode, RegionMemory, RemoteStatus};
use parking_lot::RwLock;

struct Entry {
    start: u64,
    end: u64,
    access: Access,
    memory: Arc<RegionMemory>,
}

/// How many regions just below an address a refused request inspects to tell "wrong key"
/// from "not registered". Regions overlap only when the same memory is registered more
/// than once, so the nearest few decide; past them the answer is "not registered", which
/// a peer treats exactly like a wrong key (its descriptor is stale either way).
const OVERLAP_PROBE: usize = 4;

/// Hashes a region key to itself. Keys are drawn at random by this table (never chosen
/// by a peer, which can only look them up), so they are already uniform: no hashing
/// work is needed and no peer can steer entries into one bucket.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed (`write_u64`); any other input is folded in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

#[derive(Default)]
struct Table {
    /// Key -> region. Keys are random, unique, never 0. A hash map rather than a tree:
    /// with a KV cache registered block by block (100,000 regions and more) a tree's
    /// lookup misses cache at every level, a hash map's once.
    by_key: HashMap<u64, Entry, BuildHasherDefault<KeyHasher>>,
    /// (start, key) -> end: the address index.
    by_start: BTreeMap<(u64, u64), u64>,
    /// Region identity (the address of its `RegionMemory`) -> key, for replacement and
    /// removal.
    by_region: BTreeMap<usize, u64>,
}

impl Table {
    fn remove_key(&mut self, key: u64) -> Option<Entry> {
        let e = self.by_key.remove(&key)?;
        self.by_start.remove(&(e.start, key));
        self.by_region.remove(&identity(&e.memory));
        Some(e)
    }

    /// Whether any region contains `addr` (looking at the nearest few below it).
    fn covers(&self, addr: u64) -> bool {
        self.by_start
            .range(..=(addr, u64::MAX))
            .rev()
            .take(OVERLAP_PROBE)
            .any(|(_, &end)| addr < end)
    }
}

fn identity(memory: &RegionMemory) -> usize {
    memory as *const RegionMemory as usize
}

/// Registered regions, indexed by key and by start address.
#[derive(Default)]
pub(crate) struct Regions {
    table: RwLock<Table>,
}

/// A checked request: the region and the offset into it.
pub(crate) struct Resolved {
    pub(crate) memory: Arc<RegionMemory>,
    pub(crate) offset: usize,
}

impl Regions {
    /// Adds a region with a fresh random key, returned.
    pub(crate) fn insert(&self, memory: &Arc<RegionMemory>, access: Access) -> u64 {
        let start = memory.addr();
        let end = start.saturating_add(memory.len() as u64);
        let mut t = self.table.write();
        // A region registered again replaces the old entry (and its key).
        if let Some(old) = t.by_region.get(&identity(memory)).copied() {
            t.remove_key(old);
        }
        let key = loop {
            let k: u64 = rand::random();
            if k != 0 && !t.by_key.contains_key(&k) {
                break k;
            }
        };
        t.by_key.insert(
            key,
            Entry {
                start,
                end,
                access,
                memory: memory.clone(),
            },
        );
        t.by_start.insert((start, key), end);
        t.by_region.insert(identity(memory), key);
        key
    }

    /// Removes a region; later requests naming it are refused. Returns the key it had,
    /// so connections that hold the region can be found.
    pub(crate) fn remove(&self, memory: &RegionMemory) -> Option<u64> {
        let mut t = self.table.write();
        let key = t.by_region.get(&identity(memory)).copied()?;
        // The entry's `Arc` is dropped after the lock is released.
        let entry = t.remove_key(key);
        drop(t);
        drop(entry);
        Some(key)
    }

    /// Checks one request from a peer. Device memory is served only when the engine
    /// staged it (`staging`); otherwise it is refused as unsupported.
    pub(crate) fn resolve(
        &self,
        op: Opcode,
        addr: u64,
        len: u64,
        key: u64,
        staging: bool,
    ) -> Result<Resolved, RemoteStatus> {
        let t = self.table.read();
        let e = match t.by_key.get(&key) {
            Some(e) if addr >= e.start && addr < e.end => e,
            _ => {
                return Err(if t.covers(addr) {
                    RemoteStatus::KeyMismatch
                } else {
                    RemoteStatus::NotRegistered
                })
            }
        };
        if !e.access.allows(op) {
            return Err(RemoteStatus::AccessDenied);
        }
        if addr.checked_add(len).is_none_or(|end| end > e.end) {
            return Err(RemoteStatus::OutOfBounds);
        }
        if !staging && !e.memory.location().is_host() {
            return Err(RemoteStatus::Unsupported);
        }
        Ok(Resolved {
            memory: e.memory.clone(),
            offset: (addr - e.start) as usize,
        })
    }
}
