//! `ferry._ferry`: the native half of the `ferry` Python package. The Pythonic API
//! (`Engine`, `Buffer`, `Segment`, batches) is in [`api`]; the Mooncake-compatible
//! `TransferEngine` in [`mooncake`]; the mapping of engine errors to Python exceptions in
//! [`errors`]. Every call that waits or moves data releases the GIL.

use pyo3::prelude::*;

mod api;
mod errors;
mod mooncake;

/// Sends the engine's logs to stderr, filtered by `FERRY_LOG` (default `warn`), once per
/// process; a host application that installed its own subscriber keeps it.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[pymodule]
fn _ferry(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "COMPILED_PROTOCOLS",
        ferry_engine::compiled()
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>(),
    )?;
    m.add("CUDA_COMPILED", cfg!(feature = "cuda"))?;
    api::register(m)?;
    mooncake::register(m)?;
    Ok(())
}
