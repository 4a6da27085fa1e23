use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::{Protocol, RegionMemory, RemoteKeys};

/// One-sided operation, seen from the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// Copy remote memory into local memory.
    Read,
    /// Copy local memory into remote memory.
    Write,
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Opcode::Read => "read",
            Opcode::Write => "write",
        })
    }
}

/// Identifies the task a slice belongs to, so a completion finds its counter. The
/// generation makes a completion for a released batch slot harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CompletionToken {
    /// Batch slot index.
    pub slot: u32,
    /// Generation of the slot when the slice was posted.
    pub generation: u32,
    /// Task index within the batch.
    pub task: u32,
}

/// What a target answered for one request; the same codes travel on every transport that
/// has a software target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RemoteStatus {
    /// Done.
    Ok = 0,
    /// No registered region contains the address.
    NotRegistered = 1,
    /// The key does not match the region's.
    KeyMismatch = 2,
    /// The range runs past the region's end.
    OutOfBounds = 3,
    /// The region does not allow this operation to peers.
    AccessDenied = 4,
    /// The request is larger than the target accepts in one piece.
    TooLarge = 5,
    /// The target is out of room (e.g. its notification queue is full).
    Busy = 6,
    /// The target could not parse the request.
    Malformed = 7,
    /// The region is device memory the target cannot reach.
    Unsupported = 8,
}

impl RemoteStatus {
    /// Decodes a wire status byte; unknown codes are `Malformed`.
    pub fn from_u8(code: u8) -> Self {
        match code {
            0 => RemoteStatus::Ok,
            1 => RemoteStatus::NotRegistered,
            2 => RemoteStatus::KeyMismatch,
            3 => RemoteStatus::OutOfBounds,
            4 => RemoteStatus::AccessDenied,
            5 => RemoteStatus::TooLarge,
            6 => RemoteStatus::Busy,
            8 => RemoteStatus::Unsupported,
            _ => RemoteStatus::Malformed,
        }
    }

    /// Whether the status means the peer's memory layout changed (a restart, a
    /// deregistration), so a cached descriptor should be fetched again.
    pub fn suggests_stale_descriptor(self) -> bool {
        matches!(
            self,
            RemoteStatus::NotRegistered | RemoteStatus::KeyMismatch | RemoteStatus::OutOfBounds
        )
    }
}

impl fmt::Display for RemoteStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemoteStatus::Ok => "ok",
            RemoteStatus::NotRegistered => "address not registered on the target",
            RemoteStatus::KeyMismatch => "wrong region key",
            RemoteStatus::OutOfBounds => "range outside the registered region",
            RemoteStatus::AccessDenied => "region not accessible to peers for this operation",
            RemoteStatus::TooLarge => "request larger than the target accepts",
            RemoteStatus::Busy => "target busy",
            RemoteStatus::Malformed => "malformed request",
            RemoteStatus::Unsupported => "memory not reachable by this transport on the target",
        })
    }
}

/// Why a slice (and so its task) failed. `Copy`, so failing costs no allocation.
///
/// The reasons are the same for every transport: the engine decides what to do with a
/// failure by asking the reason ([`retryable`](Self::retryable),
/// [`suggests_stale_descriptor`](Self::suggests_stale_descriptor)), never by reading a
/// vendor's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailReason {
    /// The target refused the request.
    Remote(RemoteStatus),
    /// The connection broke (peer died, reset, or protocol violation).
    ConnectionLost,
    /// The deadline passed before completion.
    TimedOut,
    /// The engine or transport shut down.
    Shutdown,
    /// The transport cannot carry this request (e.g. device memory without staging).
    Unsupported,
    /// The transport's device or library failed the operation (a NIC error, a refused
    /// post, a provider's error completion).
    Device {
        /// The transport that failed it.
        transport: Protocol,
        /// The transport's own error code (libfabric's `FI_E*` for EFA, an ibverbs work
        /// completion status for RDMA). Only that transport can read it; its message is
        /// logged where the failure happened.
        code: i32,
    },
}

/// [`FailReason::to_bits`]'s tag of each reason (bits 32..40 of the word).
const TAG_REMOTE: u64 = 1;
const TAG_CONNECTION_LOST: u64 = 2;
const TAG_TIMED_OUT: u64 = 3;
const TAG_SHUTDOWN: u64 = 4;
const TAG_UNSUPPORTED: u64 = 5;
const TAG_DEVICE: u64 = 6;

/// A protocol as one byte of [`FailReason::to_bits`]'s word (never 0).
fn protocol_bits(p: Protocol) -> u64 {
    match p {
        Protocol::Rdma => 1,
        Protocol::Efa => 2,
        Protocol::Tcp => 3,
    }
}

fn protocol_from_bits(bits: u64) -> Option<Protocol> {
    Protocol::ALL
        .into_iter()
        .find(|&p| protocol_bits(p) == bits)
}

impl FailReason {
    /// The reason as one word, losslessly, for storage in an atomic (a task's failure
    /// reason is written by a transport thread and read by a poll). Never 0, so 0 can
    /// mean "no reason yet"; [`from_bits`](Self::from_bits) inverts it.
    ///
    /// Layout: the payload (a remote status, a device's code) in bits 0..32, the tag of
    /// the variant in bits 32..40, the transport of a [`Device`](Self::Device) failure
    /// in bits 40..48.
    pub fn to_bits(self) -> u64 {
        let (tag, transport, payload): (u64, u64, u32) = match self {
            FailReason::Remote(s) => (TAG_REMOTE, 0, s as u8 as u32),
            FailReason::ConnectionLost => (TAG_CONNECTION_LOST, 0, 0),
            FailReason::TimedOut => (TAG_TIMED_OUT, 0, 0),
            FailReason::Shutdown => (TAG_SHUTDOWN, 0, 0),
            FailReason::Unsupported => (TAG_UNSUPPORTED, 0, 0),
            FailReason::Device { transport, code } => {
                (TAG_DEVICE, protocol_bits(transport), code as u32)
            }
        };
        transport << 40 | tag << 32 | u64::from(payload)
    }

    /// The reason [`to_bits`](Self::to_bits) encoded; `None` for a word it cannot have
    /// produced.
    pub fn from_bits(bits: u64) -> Option<FailReason> {
        let payload = bits as u32;
        let tag = bits >> 32 & 0xff;
        let transport = bits >> 40;
        if tag != TAG_DEVICE && transport != 0 {
            return None;
        }
        let plain = |reason| (payload == 0).then_some(reason);
        match tag {
            TAG_REMOTE => Some(FailReason::Remote(RemoteStatus::from_u8(
                u8::try_from(payload).ok()?,
            ))),
            TAG_CONNECTION_LOST => plain(FailReason::ConnectionLost),
            TAG_TIMED_OUT => plain(FailReason::TimedOut),
            TAG_SHUTDOWN => plain(FailReason::Shutdown),
            TAG_UNSUPPORTED => plain(FailReason::Unsupported),
            TAG_DEVICE => Some(FailReason::Device {
                transport: protocol_from_bits(transport)?,
                code: payload as i32,
            }),
            _ => None,
        }
    }

    /// Whether another transport may succeed where this one failed: the transport's
    /// device failed the operation, or its connection broke. False for what any path
    /// would meet again: the target's refusal, a passed deadline, a shutdown, memory no
    /// transport was set up to carry. The engine asks this to decide whether a task that
    /// failed on a fabric is retried over its fallback.
    pub fn retryable(self) -> bool {
        match self {
            FailReason::Device { .. } | FailReason::ConnectionLost => true,
            FailReason::Remote(_)
            | FailReason::TimedOut
            | FailReason::Shutdown
            | FailReason::Unsupported => false,
        }
    }

    /// Whether the failure suggests the cached descriptor of the peer is out of date.
    pub fn suggests_stale_descriptor(self) -> bool {
        match self {
            FailReason::Remote(s) => s.suggests_stale_descriptor(),
            FailReason::ConnectionLost => true,
            _ => false,
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::Remote(s) => write!(f, "rejected by peer: {s}"),
            FailReason::ConnectionLost => f.write_str("connection to peer lost"),
            FailReason::TimedOut => f.write_str("deadline passed"),
            FailReason::Shutdown => f.write_str("transport shut down"),
            FailReason::Unsupported => f.write_str("transport cannot carry this memory"),
            FailReason::Device { transport, code } => {
                write!(
                    f,
                    "{transport} device error {code} (its message is in the log)"
                )
            }
        }
    }
}

impl std::error::Error for FailReason {}

/// A piece of a request no larger than the transport's `max_slice`, ready to post.
#[derive(Debug)]
pub struct Slice {
    /// READ or WRITE.
    pub op: Opcode,
    /// Local registered memory (source of a WRITE, destination of a READ).
    pub local: Arc<RegionMemory>,
    /// Offset into `local`.
    pub local_offset: usize,
    /// Absolute address in the peer's address space.
    pub remote_addr: u64,
    /// Start address of the peer's buffer that contains `remote_addr` (transports whose
    /// keys address memory by offset, e.g. libfabric without `FI_MR_VIRT_ADDR`, need it).
    pub remote_base: u64,
    /// The peer region's keys for this transport, one per rail of the peer (a
    /// single-rail transport uses the first).
    pub remote_keys: RemoteKeys,
    /// Length in bytes.
    pub len: usize,
    /// Where to report completion.
    pub token: CompletionToken,
    /// When the task's deadline passes; a transport may fail the slice after it.
    pub deadline: Instant,
}

/// Receives per-slice completions. Implemented by the engine; called from transport
/// threads, so it must be cheap and must not block.
pub trait Completions: Send + Sync {
    /// Reports one slice: `Ok(bytes)` or why it failed. Called exactly once per posted
    /// slice, while the transport still holds the slice (and so its `local` memory): the
    /// engine may post a retry from inside this call, and the caller's memory must still
    /// be there when it does.
    fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason survives the word encoding, libfabric's own codes (256 and up),
    /// negative codes and every transport included; no reason encodes to 0.
    #[test]
    fn fail_reasons_round_trip_through_bits() {
        let mut reasons = vec![
            FailReason::ConnectionLost,
            FailReason::TimedOut,
            FailReason::Shutdown,
            FailReason::Unsupported,
        ];
        reasons.extend((0..=8).map(|c| FailReason::Remote(RemoteStatus::from_u8(c))));
        // FI_EOTHER, FI_ETRUNC, FI_ENOKEY, a small errno, extremes.
        for transport in Protocol::ALL {
            reasons.extend(
                [256, 265, 266, 11, 0, -5, i32::MAX, i32::MIN]
                    .map(|code| FailReason::Device { transport, code }),
            );
        }
        let mut words = std::collections::HashSet::new();
        for r in &reasons {
            let bits = r.to_bits();
            assert_ne!(bits, 0, "{r:?}");
            assert!(words.insert(bits), "{r:?} shares its word");
            assert_eq!(FailReason::from_bits(bits), Some(*r), "{r:?}");
        }
        assert_eq!(FailReason::from_bits(0), None);
        assert_eq!(FailReason::from_bits(7 << 32), None);
        assert_eq!(FailReason::from_bits(1 << 32 | 300), None);
        // A transport byte on a reason that has none, an unknown transport, a payload
        // on a reason without one: never produced, so refused.
        assert_eq!(FailReason::from_bits(2 << 40 | 2 << 32), None);
        assert_eq!(FailReason::from_bits(9 << 40 | 6 << 32 | 5), None);
        assert_eq!(FailReason::from_bits(6 << 32 | 5), None);
        assert_eq!(FailReason::from_bits(3 << 32 | 1), None);
    }

    /// Device failures and broken connections may succeed elsewhere; what the target or
    /// the clock decided would be met again on any path.
    #[test]
    fn only_transport_level_failures_are_retryable() {
        for transport in Protocol::ALL {
            assert!(FailReason::Device { transport, code: 5 }.retryable());
        }
        assert!(FailReason::ConnectionLost.retryable());
        assert!(!FailReason::TimedOut.retryable());
        assert!(!FailReason::Shutdown.retryable());
        assert!(!FailReason::Unsupported.retryable());
        for c in 0..=8 {
            assert!(!FailReason::Remote(RemoteStatus::from_u8(c)).retryable());
        }
    }
}
