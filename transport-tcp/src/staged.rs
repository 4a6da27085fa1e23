//! Device memory over a socket: payloads pass through two pinned host buffers of the
//! engine's staging pool, so the copy of one chunk overlaps the socket I/O of the other.
//! Used on both sides: the initiator's WRITE payloads and READ data, the target's
//! likewise. Any device-copy failure is an I/O error that closes the connection (the
//! stream cannot stay in step with a payload half-sent).

use std::io;
use std::sync::Arc;

use ferry_transport_api::{RegionMemory, Staging, StagingBuffer, TransportError};

fn device_error(e: TransportError) -> io::Error {
    io::Error::other(format!("device memory copy failed: {e}"))
}

/// Two staging buffers for `region`'s device, and the chunk size they share.
fn buffers(
    staging: Option<&Arc<dyn Staging>>,
    region: &RegionMemory,
) -> io::Result<([Box<dyn StagingBuffer>; 2], usize)> {
    let staging = staging.ok_or_else(|| {
        io::Error::other(format!(
            "{} memory reached the TCP transport, but this engine has no staging for it \
             (CUDA support or driver missing)",
            region.location()
        ))
    })?;
    let location = region.location();
    let a = staging.buffer(location).map_err(device_error)?;
    let b = staging.buffer(location).map_err(device_error)?;
    let chunk = a.capacity().min(b.capacity());
    if chunk == 0 {
        return Err(io::Error::other("staging buffers of zero bytes"));
    }
    Ok(([a, b], chunk))
}

/// Sends `len` bytes of device memory at `offset` of `region` through `write`: chunk
/// `i + 1` is copied to the host while chunk `i` is written.
pub(crate) fn send(
    staging: Option<&Arc<dyn Staging>>,
    region: &RegionMemory,
    offset: usize,
    len: usize,
    write: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (mut bufs, chunk) = buffers(staging, region)?;
    let pieces = len.div_ceil(chunk);
    let piece = |i: usize| (offset + i * chunk, chunk.min(len - i * chunk));
    let (o, l) = piece(0);
    bufs[0].download(region, o, l).map_err(device_error)?;
    for i in 0..pieces {
        bufs[i % 2].wait().map_err(device_error)?;
        if i + 1 < pieces {
            let (o, l) = piece(i + 1);
            bufs[(i + 1) % 2]
                .download(region, o, l)
                .map_err(device_error)?;
        }
        let l = piece(i).1;
        write(&bufs[i % 2].host()[..l])?;
    }
    Ok(())
}

/// Receives `len` bytes through `read` into device memory at `offset` of `region`:
/// chunk `i` is copied to the device while chunk `i + 1` is read.
pub(crate) fn receive(
    staging: Option<&Arc<dyn Staging>>,
    region: &RegionMemory,
    offset: usize,
    len: usize,
    read: &mut dyn FnMut(&mut [u8]) -> io::Result<()>,
) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (mut bufs, chunk) = buffers(staging, region)?;
    let pieces = len.div_ceil(chunk);
    for i in 0..pieces {
        let (o, l) = (offset + i * chunk, chunk.min(len - i * chunk));
        let b = &mut bufs[i % 2];
        // This buffer's previous upload (chunk i - 2) must be done before it is reused.
        b.wait().map_err(device_error)?;
        read(&mut b.host()[..l])?;
        b.upload(region, o, l).map_err(device_error)?;
    }
    for b in &mut bufs {
        b.wait().map_err(device_error)?;
    }
    Ok(())
}
