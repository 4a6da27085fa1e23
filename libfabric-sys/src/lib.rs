//! Raw bindings to libfabric (OpenFabrics Interfaces), generated from the system's headers
//! at build time. No logic: `ferry-transport-efa` owns every handle and all `unsafe`.
//!
//! The headers' `static inline` calls (`fi_write`, `fi_read`, `fi_cq_read`, `fi_mr_reg`,
//! `fi_endpoint`, ...) are exported through generated C wrappers under their own names.
//! Macros that bindgen cannot translate are defined below.
//!
//! Needs libfabric 1.17 or newer with its headers (Debian: `libfabric-dev`). Override the
//! locations with `LIBFABRIC_INCLUDE_DIR` and `LIBFABRIC_LIB_DIR`.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// `FI_VERSION(major, minor)` (the function `fi_version()` is the library's own).
pub const fn make_version(major: u32, minor: u32) -> u32 {
    (major << 16) | minor
}

/// `FI_ADDR_UNSPEC`.
pub const FI_ADDR_UNSPEC: fi_addr_t = u64::MAX;

/// `FI_KEY_NOTAVAIL`.
pub const FI_KEY_NOTAVAIL: u64 = u64::MAX;
