//! The target's table of registered regions: every request is resolved here (address,
//! length, key, access) before a byte moves.

use std::sync::Arc;

use ferry_transport_api::{Access, Opcode, RegionMemory, RemoteStatus};
use parking_lot::RwLock;

struct Entry {
    start: u64,
    end: u64,
    key: u64,
    access: Access,
    memory: Arc<RegionMemory>,
}

/// Registered regions sorted by start address.
#[derive(Default)]
pub(crate) struct Regions {
    entries: RwLock<Vec<Entry>>,
}

/// A checked request: the region and the offset into it.
pub(crate) struct Resolved {
    pub(crate) memory: Arc<RegionMemory>,
    pub(crate) offset: usize,
}

impl Regions {
    /// Adds a region with a fresh random key, returned.
    pub(crate) fn insert(&self, memory: &Arc<RegionMemory>, access: Access) -> u64 {
        let key = loop {
            let k: u64 = rand::random();
            if k != 0 {
                break k;
            }
        };
        let start = memory.addr();
        let entry = Entry {
            start,
            end: start + memory.len() as u64,
            key,
            access,
            memory: memory.clone(),
        };
        let mut entries = self.entries.write();
        // A region registered again replaces the old entry (and its key).
        entries.retain(|e| !Arc::ptr_eq(&e.memory, memory));
        let at = entries.partition_point(|e| e.start < start);
        entries.insert(at, entry);
        key
    }

    /// Removes a region; later requests naming it are refused.
    pub(crate) fn remove(&self, memory: &RegionMemory) {
        self.entries
            .write()
            .retain(|e| !std::ptr::eq(Arc::as_ptr(&e.memory), memory));
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
        let entries = self.entries.read();
        // Regions may overlap (the same memory registered twice); the key picks the one.
        let upto = entries.partition_point(|e| e.start <= addr);
        let mut found_any = false;
        for e in entries[..upto].iter().rev() {
            if addr >= e.end {
                continue;
            }
            found_any = true;
            if e.key != key {
                continue;
            }
            let allowed = match op {
                Opcode::Read => e.access.remote_read(),
                Opcode::Write => e.access.remote_write(),
            };
            if !allowed {
                return Err(RemoteStatus::AccessDenied);
            }
            if addr.checked_add(len).is_none_or(|end| end > e.end) {
                return Err(RemoteStatus::OutOfBounds);
            }
            if !staging && !e.memory.location().is_host() {
                return Err(RemoteStatus::Unsupported);
            }
            return Ok(Resolved {
                memory: e.memory.clone(),
                offset: (addr - e.start) as usize,
            });
        }
        Err(if found_any {
            RemoteStatus::KeyMismatch
        } else {
            RemoteStatus::NotRegistered
        })
    }
}
