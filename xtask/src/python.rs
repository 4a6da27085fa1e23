//! The Python package (`python/`): a virtual environment in `target/pyvenv` with maturin,
//! pytest and numpy from PyPI; the binding's Rust through fmt and clippy (with and without
//! the fabric and CUDA features); `pip install ./python`, exactly as the README tells a
//! user; then its pytest suites. `cargo xtask bench --python` compares `python -m
//! ferry.bench` with `ferry bench`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::sh::{apt_install, cargo, root, run};

/// What a fresh Debian 12 needs to make a virtual environment.
const PACKAGES: &[&str] = &["python3", "python3-venv", "python3-pip"];
/// What the tests and the build backend need from PyPI.
const PIP: &[&str] = &["maturin>=1.5,<2", "pytest>=7", "numpy"];

/// The environment's interpreter, made (and its packages installed) when missing.
pub(crate) fn venv() -> Result<PathBuf> {
    let dir = root().join("target/pyvenv");
    let python = dir.join("bin/python");
    if !python.exists() {
        apt_install(PACKAGES)?;
        let system = if Command::new("python3").arg("--version").output().is_ok() {
            "python3"
        } else {
            "/usr/bin/python3"
        };
        run(Command::new(system).args(["-m", "venv"]).arg(&dir))?;
    }
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PIP))?;
    Ok(python)
}

/// The binding's own target directory (it is a workspace of its own).
pub(crate) fn target_dir() -> PathBuf {
    root().join("target/python")
}

/// Builds and installs the package into the environment, as `pip install ./python`.
pub(crate) fn install(python: &PathBuf) -> Result<()> {
    run(Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "./python",
        ])
        .env("CARGO_TARGET_DIR", target_dir()))
}

/// Lints, builds, installs and tests the Python package.
pub(crate) fn test() -> Result<()> {
    let python = venv()?;
    let manifest = root().join("python/Cargo.toml");
    run(cargo()
        .args(["fmt", "--check", "--manifest-path"])
        .arg(&manifest))?;
    for features in ["", "efa,rdma,cuda"] {
        let mut c = cargo();
        c.args(["clippy", "--locked", "--all-targets", "--manifest-path"])
            .arg(&manifest)
            .args(["--features", features, "--", "-D", "warnings"])
            .env("PYO3_PYTHON", &python)
            .env("CARGO_TARGET_DIR", target_dir());
        run(&mut c)?;
    }
    install(&python)?;
    run(Command::new(&python).args(["-m", "pytest", "-q", "python/tests"]))
}
