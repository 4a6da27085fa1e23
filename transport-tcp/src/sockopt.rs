//! The system calls the crate makes that `std` and `socket2` do not offer: the socket
//! option `SO_RCVLOWAT`, `ppoll` on borrowed descriptors, creating an eventfd, and a
//! level-triggered `epoll` instance for one socket. The only `unsafe` in this crate.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

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

/// A new non-blocking eventfd with its counter at zero: readable while the counter is
/// not zero, written and read as 8-byte integers.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened by this call and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sleeps until one of `fds` reports one of its `events` (a hang-up or an error always
/// counts), or `timeout` passes; a `None` is skipped. Returns each one's reported events
/// (0 for those that reported none). An interrupted sleep reports nothing.
pub(crate) fn poll(
    fds: [(Option<BorrowedFd<'_>>, libc::c_short); 2],
    timeout: Duration,
) -> io::Result<[libc::c_short; 2]> {
    let mut polled = fds.map(|(fd, events)| libc::pollfd {
        // A negative descriptor is skipped by poll.
        fd: fd.map_or(-1, |fd| fd.as_raw_fd()),
        events,
        revents: 0,
    });
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `polled` is a local array of initialised pollfd whose length is passed, its
    // descriptors borrowed for the duration of the call; `ts` is a local timespec; the
    // signal mask may be null (no change).
    let rc = unsafe {
        libc::ppoll(
            polled.as_mut_ptr(),
            polled.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([0; 2]);
        }
        return Err(e);
    }
    Ok(polled.map(|p| p.revents))
}

/// A new epoll instance.
pub(crate) fn epoll() -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes no pointers.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened by this call and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Puts `fd` in `epoll` for readability, level-triggered (a hang-up or an error also
/// wakes its sleeper). Adding it while it is readable wakes a sleeper at once. An `fd`
/// already there is left as it is.
pub(crate) fn epoll_add(epoll: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
        u64: 0,
    };
    // SAFETY: both descriptors are borrowed for the call; `event` is a live local the
    // kernel only reads.
    let rc = unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd.as_raw_fd(),
            &mut event,
        )
    };
    match checked(rc) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// Takes `fd` out of `epoll`; one not there is fine.
pub(crate) fn epoll_remove(epoll: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: both descriptors are borrowed for the call; the event may be null for a
    // removal.
    let rc = unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_DEL,
            fd.as_raw_fd(),
            std::ptr::null_mut(),
        )
    };
    match checked(rc) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Sleeps until a descriptor in `epoll` is ready or `timeout` (rounded up to a whole
/// millisecond) passes. An interrupted sleep just returns.
pub(crate) fn epoll_sleep(epoll: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let ms = timeout
        .as_nanos()
        .div_ceil(1_000_000)
        .min(libc::c_int::MAX as u128) as libc::c_int;
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
    // SAFETY: `events` is a local array whose length is passed; the descriptor is
    // borrowed for the call.
    let rc = unsafe {
        libc::epoll_wait(
            epoll.as_raw_fd(),
            events.as_mut_ptr(),
            events.len() as libc::c_int,
            ms,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
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
