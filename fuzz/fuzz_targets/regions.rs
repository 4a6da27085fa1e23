//! The target's request validation: random requests against a few random registered
//! regions (overlapping, re-registered, deregistered, host or device memory, any access).
//!
//! Oracle: the table answers exactly what its contract says. A request is accepted only
//! when a live region holds the key, contains the whole range, allows the operation and
//! is host memory (or staging is on); the offset it returns lies inside that region.
//! Otherwise the status names the first rule broken.
#![no_main]

use std::ptr::NonNull;
use std::sync::Arc;

use ferry_transport_api::{Access, Location, Opcode, RegionMemory, RemoteStatus};
use ferry_transport_tcp::fuzzing::Regions;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const ARENA: usize = 4096;

/// Two arenas the regions are cut from, so regions can overlap or be adjacent.
struct Arenas([Box<[u8]>; 2]);

/// What the table should hold for one region.
struct Model {
    memory: Arc<RegionMemory>,
    start: u64,
    end: u64,
    key: u64,
    access: Access,
    live: bool,
}

fn region(u: &mut Unstructured<'_>, arenas: &Arc<Arenas>) -> Result<Arc<RegionMemory>> {
    let arena = &arenas.0[usize::from(u.arbitrary::<bool>()?)];
    let offset = u.int_in_range(0..=ARENA)?;
    let len = u.int_in_range(0..=ARENA - offset)?;
    let location = if u.ratio(1, 4)? {
        Location::Cuda { device: 0 }
    } else {
        Location::host()
    };
    let ptr = NonNull::new(arena.as_ptr().wrapping_add(offset) as *mut u8).expect("non-null");
    // SAFETY: `ptr..ptr+len` lies inside an arena the region's owner keeps alive. The
    // table only compares addresses; nothing reads or writes through the region here.
    Ok(Arc::new(unsafe {
        RegionMemory::from_raw(ptr, len, location, Box::new(arenas.clone()))
    }))
}

fn access(u: &mut Unstructured<'_>) -> Result<Access> {
    Ok(*u.choose(&[Access::Local, Access::RemoteRead, Access::RemoteReadWrite])?)
}

/// The contract, written out plainly.
fn expected(
    model: &[Model],
    op: Opcode,
    addr: u64,
    len: u64,
    key: u64,
    staging: bool,
) -> std::result::Result<(usize, u64), RemoteStatus> {
    let live = || model.iter().enumerate().filter(|(_, m)| m.live);
    let holds = |m: &Model| m.start <= addr && addr < m.end;
    let Some((i, m)) = live().find(|(_, m)| m.key == key && holds(m)) else {
        return Err(if live().any(|(_, m)| holds(m)) {
            RemoteStatus::KeyMismatch
        } else {
            RemoteStatus::NotRegistered
        });
    };
    let allowed = match op {
        Opcode::Read => m.access.remote_read(),
        Opcode::Write => m.access.remote_write(),
    };
    if !allowed {
        Err(RemoteStatus::AccessDenied)
    } else if addr.checked_add(len).is_none_or(|end| end > m.end) {
        Err(RemoteStatus::OutOfBounds)
    } else if !staging && !m.memory.location().is_host() {
        Err(RemoteStatus::Unsupported)
    } else {
        Ok((i, addr - m.start))
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let arenas = Arc::new(Arenas([
        vec![0u8; ARENA].into_boxed_slice(),
        vec![0u8; ARENA].into_boxed_slice(),
    ]));
    let table = Regions::default();
    let mut model: Vec<Model> = Vec::new();
    for _ in 0..u.int_in_range(1..=4)? {
        let memory = region(u, &arenas)?;
        let access = access(u)?;
        let key = table.insert(&memory, access);
        model.push(Model {
            start: memory.addr(),
            end: memory.addr() + memory.len() as u64,
            memory,
            key,
            access,
            live: true,
        });
    }
    // Re-register (a fresh key replaces the old) or deregister some of them.
    for _ in 0..u.int_in_range(0..=2)? {
        let i = u.choose_index(model.len())?;
        if u.arbitrary::<bool>()? {
            let memory = model[i].memory.clone();
            table.remove(&memory);
            for m in model.iter_mut().filter(|m| Arc::ptr_eq(&m.memory, &memory)) {
                m.live = false;
            }
        } else if model[i].live {
            let access = access(u)?;
            let memory = model[i].memory.clone();
            model[i].live = false;
            let key = table.insert(&memory, access);
            model.push(Model {
                start: memory.addr(),
                end: memory.addr() + memory.len() as u64,
                memory,
                key,
                access,
                live: true,
            });
        }
    }
    let live_keys: Vec<u64> = model.iter().filter(|m| m.live).map(|m| m.key).collect();
    let mut unique = live_keys.clone();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != live_keys.len() {
        // Two random 64-bit keys collided: the model assumes they never do.
        return Ok(());
    }
    while !u.is_empty() {
        let op = if u.arbitrary::<bool>()? {
            Opcode::Read
        } else {
            Opcode::Write
        };
        let m = &model[u.choose_index(model.len())?];
        let addr = match u.int_in_range(0u8..=2)? {
            0 => m.start.wrapping_add(u.int_in_range(0..=ARENA as u64 + 8)?),
            1 => m.start.wrapping_sub(u.int_in_range(0..=8)?),
            _ => u.arbitrary()?,
        };
        let len = match u.int_in_range(0u8..=2)? {
            0 => u.int_in_range(0..=ARENA as u64 + 8)?,
            1 => m
                .end
                .wrapping_sub(addr)
                .wrapping_add(u.int_in_range(0..=2)?),
            _ => u.arbitrary()?,
        };
        let key = match u.int_in_range(0u8..=2)? {
            0 => m.key,
            1 => *u.choose(&live_keys).unwrap_or(&m.key),
            _ => u.arbitrary()?,
        };
        let staging = u.ratio(1, 4)?;
        let got = table.resolve(op, addr, len, key, staging);
        let want = expected(&model, op, addr, len, key, staging);
        match (&got, want) {
            (Ok((memory, offset)), Ok((i, want_offset))) => {
                assert!(
                    Arc::ptr_eq(memory, &model[i].memory),
                    "accepted against the wrong region"
                );
                assert_eq!(*offset as u64, want_offset);
                assert!(
                    memory.contains(*offset, len as usize),
                    "range outside the region"
                );
            }
            (Err(s), Err(w)) => assert_eq!(*s, w, "{op} {addr:#x}+{len} key {key:#x}"),
            (got, want) => panic!(
                "{op} {addr:#x}+{len} key {key:#x} staging {staging}: got {:?}, want {want:?}",
                got.as_ref().map(|(m, o)| (m.addr(), *o))
            ),
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
