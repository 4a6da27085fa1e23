//! Device memory (feature `cuda`). Without a driver (this machine, CI) every CUDA path
//! must be a clear error; with an NVIDIA GPU (`cargo xtask test --hw`) data moves between
//! GPU and host memory over TCP on loopback, byte for byte.
#![cfg(feature = "cuda")]

mod common;

use ferry_engine::{Access, Engine, ErrorKind, Location};

/// The GPU's ordinal for the hardware tests, or why they cannot run here.
fn gpu() -> Result<u32, String> {
    let status = ferry_engine::cuda_status();
    match (status.unavailable, status.devices.last()) {
        (None, Some((ordinal, _, _))) => Ok(*ordinal),
        (why, _) => Err(why.unwrap_or_else(|| "no CUDA device".into())),
    }
}

macro_rules! gpu_or_skip {
    () => {
        match gpu() {
            Ok(d) => d,
            Err(why) => {
                eprintln!("skipped: needs an NVIDIA GPU ({why})");
                return;
            }
        }
    };
}

#[test]
fn without_a_driver_every_cuda_path_is_a_clear_error() {
    if let Ok(d) = gpu() {
        eprintln!("skipped: this host has a GPU (cuda:{d}); the GPU tests cover it");
        return;
    }
    let status = ferry_engine::cuda_status();
    assert!(status.compiled);
    let why = status.unavailable.expect("no driver here");
    let e = common::engine();
    assert_eq!(e.staging_stats(), None);
    let err = e.allocate(4096, Location::Cuda { device: 0 }).unwrap_err();
    assert!(err.to_string().contains("libcuda.so"), "{err}");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(why.contains("libcuda.so"), "{why}");
    let mut host = vec![7u8; 4096];
    // SAFETY: `host` outlives the buffer (dropped first below).
    let err = unsafe {
        e.register(
            host.as_mut_ptr(),
            host.len(),
            Location::Cuda { device: 1 },
            Access::RemoteReadWrite,
        )
    }
    .unwrap_err();
    assert!(err.to_string().contains("libcuda.so"), "{err}");
    // Without a driver no device memory exists: `Auto` is host memory.
    // SAFETY: as above.
    let buf = unsafe {
        e.register(
            host.as_mut_ptr(),
            host.len(),
            Location::Auto,
            Access::RemoteReadWrite,
        )
    }
    .unwrap();
    assert_eq!(buf.location(), Location::host());
    assert_eq!(e.descriptor().buffers.len(), 1);
    drop(buf);
}

fn engines() -> (Engine, Engine) {
    (common::engine(), common::engine())
}

/// WRITE then READ back, every size from 1 B to 256 MiB, between buffers at `local_at`
/// and `remote_at`, random data, byte for byte.
fn round_trips(local_at: Location, remote_at: Location) {
    let (initiator, target) = engines();
    let mut sizes = common::SIZES.to_vec();
    sizes.push((256 << 20, 0, 0));
    common::round_trips_at(&initiator, &target, local_at, remote_at, &sizes);
    // Every staging buffer went back; none was made for a device not in use.
    for e in [&initiator, &target] {
        let stats = e.staging_stats().expect("a driver is present");
        assert_eq!(stats.leased, 0, "{stats:?}");
        let used: Vec<u32> = [local_at, remote_at]
            .into_iter()
            .filter_map(|l| match l {
                Location::Cuda { device } => Some(device),
                _ => None,
            })
            .collect();
        assert!(
            stats.created.iter().all(|(d, _)| used.contains(d)),
            "{stats:?} (devices in use: {used:?})"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_to_gpu_over_tcp() {
    let d = gpu_or_skip!();
    round_trips(Location::Cuda { device: d }, Location::Cuda { device: d });
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn host_to_gpu_over_tcp() {
    let d = gpu_or_skip!();
    round_trips(Location::host(), Location::Cuda { device: d });
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_to_host_over_tcp() {
    let d = gpu_or_skip!();
    round_trips(Location::Cuda { device: d }, Location::host());
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn registration_finds_where_memory_is() {
    let d = gpu_or_skip!();
    let e = common::engine();
    let device = e.allocate(1 << 20, Location::Cuda { device: d }).unwrap();
    let ptr = device.addr() as usize as *mut u8;
    // SAFETY: the device allocation outlives these registrations (dropped last).
    let found = unsafe { e.register(ptr, 4096, Location::Auto, Access::Local) }.unwrap();
    assert_eq!(found.location(), Location::Cuda { device: d });
    // SAFETY: refused, never used.
    let err = unsafe { e.register(ptr, 4096, Location::host(), Access::Local) }.unwrap_err();
    assert!(err.to_string().contains("registered as cpu"), "{err}");
    let mut host = vec![0u8; 4096];
    // SAFETY: `host` outlives the buffer.
    let h = unsafe { e.register(host.as_mut_ptr(), 4096, Location::Auto, Access::Local) }.unwrap();
    assert_eq!(h.location(), Location::host());
    // SAFETY: refused, never used.
    let err = unsafe {
        e.register(
            host.as_mut_ptr(),
            4096,
            Location::Cuda { device: d },
            Access::Local,
        )
    }
    .unwrap_err();
    assert!(err.to_string().contains("is cpu memory"), "{err}");
    drop((found, h));
}
