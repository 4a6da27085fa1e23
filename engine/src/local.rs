//! The engine's own segment as a connection: a request to it is checked against the TCP
//! target's region table (the one check peers' requests get, contract 5) and then copied
//! in memory, through the same post-and-complete path as any transport.

use std::sync::Arc;

use ferry_transport_api::{Completions, Connection, FailReason, Opcode, RemoteStatus, Slice};
use ferry_transport_tcp::TcpTransport;

use crate::memory;

pub(crate) struct LocalConnection {
    /// Its table of registered regions resolves every request.
    tcp: Arc<TcpTransport>,
    completions: Arc<dyn Completions>,
    /// Failed device copies, logged at a bounded rate (a broken device fails them all).
    warns: ferry_transport_api::LogLimit,
}

impl LocalConnection {
    pub(crate) fn new(tcp: Arc<TcpTransport>, completions: Arc<dyn Completions>) -> Self {
        LocalConnection {
            tcp,
            completions,
            warns: ferry_transport_api::LogLimit::new("failed device copies"),
        }
    }

    fn copy(&self, s: &Slice) -> Result<usize, FailReason> {
        // The table's lock is let go before the copy: a large copy must not hold up
        // registration.
        let (region, offset) = self
            .tcp
            .resolve_own(s.op, s.remote_addr, s.len as u64, s.remote_keys.first())
            .map_err(FailReason::Remote)?;
        let (dst, dst_off, src, src_off) = match s.op {
            Opcode::Write => (&*region, offset, &*s.local, s.local_offset),
            Opcode::Read => (&*s.local, s.local_offset, &*region, offset),
        };
        if !s.local.contains(s.local_offset, s.len) {
            return Err(FailReason::Remote(RemoteStatus::OutOfBounds));
        }
        if dst.location().is_host() && src.location().is_host() {
            if dst.copy_within_regions(dst_off, src, src_off, s.len) {
                return Ok(s.len);
            }
            return Err(FailReason::Remote(RemoteStatus::OutOfBounds));
        }
        memory::device_copy(dst, dst_off, src, src_off, s.len)
            .map(|()| s.len)
            .map_err(|e| {
                if let Some(suppressed) = self.warns.admit() {
                    tracing::warn!(error = %e, len = s.len, suppressed, "a copy within this engine's device memory failed");
                }
                FailReason::Unsupported
            })
    }
}

impl Connection for LocalConnection {
    fn post(&self, slice: Slice) -> Result<(), FailReason> {
        let result = self.copy(&slice);
        self.completions.complete(slice.token, result);
        Ok(())
    }

    fn is_alive(&self) -> bool {
        true
    }
}
