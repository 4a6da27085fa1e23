//! The one socket option the crate sets that `socket2` does not offer, `SO_RCVLOWAT`:
//! the only `unsafe` in this crate, one `setsockopt` call on a descriptor it borrows.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Sets the socket's receive low-water mark: readiness (and a blocking read) waits for
/// this many bytes, or for the peer closing, an error, or memory pressure. Linux caps it
/// at half the receive buffer, growing an unfixed buffer to fit.
pub(crate) fn set_rcvlowat(socket: &impl AsFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let fd = socket.as_fd();
    // SAFETY: `fd` is an open descriptor borrowed for the duration of the call; `value`
    // is a live `c_int` and its exact size is passed, so the kernel reads only it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    checked(rc)
}

/// A socket call's return code as a result.
fn checked(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The socket's receive low-water mark (for tests).
#[cfg(test)]
pub(crate) fn rcvlowat(socket: &impl AsFd) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let fd = socket.as_fd();
    // SAFETY: as above; the kernel writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    checked(rc).map(|()| value.max(0) as usize)
}
