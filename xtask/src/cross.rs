//! `cargo xtask cross aarch64`: the `ferry` binary and the engine's tests for
//! `aarch64-unknown-linux-gnu`, with the loopback suites run under qemu.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::sh::{apt_install, as_root, cargo, root, run, BUILD_PACKAGES};

/// Debian packages for the aarch64 cross build (arm64 multiarch for libfabric, libibverbs
/// and librdmacm).
const CROSS_PACKAGES: &[&str] = &[
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user-static",
    "libfabric-dev:arm64",
    "libibverbs-dev:arm64",
    "librdmacm-dev:arm64",
    "libgcc-s1:arm64",
    "file",
];

/// The fabric features the cross build compiles in.
const FEATURES: &str = "efa,rdma";

/// `cargo xtask cross aarch64`: installs the Rust target and Debian's cross toolchain
/// and arm64 libfabric and ibverbs, builds `ferry` and the engine's tests for
/// `aarch64-unknown-linux-gnu` with `efa` and `rdma`, and runs the TCP and `tcp;ofi_rxm`
/// loopback tests under `qemu-aarch64-static`.
pub(crate) fn cross(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("aarch64") if args.len() == 1 => {}
        _ => bail!("usage: cargo xtask cross aarch64"),
    }
    let target = "aarch64-unknown-linux-gnu";
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup (the cross build needs a rustup toolchain)")?;
    if !String::from_utf8_lossy(&installed.stdout).contains(target) {
        run(Command::new("rustup").args(["target", "add", target]))?;
    }
    let foreign = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()?;
    if !String::from_utf8_lossy(&foreign.stdout).contains("arm64") {
        run(as_root("dpkg").args(["--add-architecture", "arm64"]))?;
        // The package lists must now include arm64.
        run(as_root("apt-get").args(["update", "-qq"]))?;
    }
    apt_install(BUILD_PACKAGES)?;
    apt_install(CROSS_PACKAGES)?;
    // Only libfabric's own headers: the C library comes from the cross sysroot.
    let include = root().join("target/cross-include");
    std::fs::create_dir_all(&include)?;
    let rdma = include.join("rdma");
    if !rdma.exists() {
        std::os::unix::fs::symlink("/usr/include/rdma", &rdma)?;
    }
    let env: Vec<(&str, String)> = vec![
        (
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc".into(),
        ),
        (
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
            "qemu-aarch64-static".into(),
        ),
        (
            "CC_aarch64_unknown_linux_gnu",
            "aarch64-linux-gnu-gcc".into(),
        ),
        (
            "BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu",
            "--sysroot=/usr/aarch64-linux-gnu".into(),
        ),
        ("LIBFABRIC_INCLUDE_DIR", include.display().to_string()),
        ("LIBFABRIC_LIB_DIR", "/usr/lib/aarch64-linux-gnu".into()),
        // rdma-sys finds libibverbs and librdmacm with pkg-config: the arm64 `.pc` files
        // only (their paths are the multiarch ones, no sysroot to prepend). Scoped to
        // the target, so build scripts' own host probes are untouched.
        (
            "PKG_CONFIG_ALLOW_CROSS_aarch64_unknown_linux_gnu",
            "1".into(),
        ),
        (
            "PKG_CONFIG_LIBDIR_aarch64_unknown_linux_gnu",
            "/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig".into(),
        ),
    ];
    let cross_cargo = |args: &[&str]| {
        let mut c = cargo();
        // `--target` right after the subcommand, before any `--` for the test harness.
        c.args(&args[..1])
            .args(["--target", target])
            .args(&args[1..]);
        for (k, v) in &env {
            c.env(k, v);
        }
        c
    };
    run(&mut cross_cargo(&[
        "build",
        "--release",
        "-p",
        "ferry-cli",
        "--features",
        FEATURES,
    ]))?;
    run(&mut cross_cargo(&[
        "test",
        "--no-run",
        "-p",
        "ferry-engine",
        "-p",
        "ferry-cli",
        "--features",
        FEATURES,
    ]))?;
    // The loopback suites: TCP (transfer) and libfabric over tcp;ofi_rxm (efa), in the
    // build above (ibverbs loaded, no RDMA device under qemu). Tests that start the
    // `ferry` binary as a child need binfmt support and run natively only.
    run(&mut cross_cargo(&[
        "test",
        "-p",
        "ferry-engine",
        "--features",
        FEATURES,
        "--test",
        "transfer",
        "--test",
        "efa",
        "--",
        "--skip",
        "shm",
    ]))?;
    let binary = root().join(format!("target/{target}/release/ferry"));
    let file = Command::new("file").arg(&binary).output();
    if let Ok(out) = file {
        eprint!("xtask: {}", String::from_utf8_lossy(&out.stdout));
    }
    println!("aarch64 ferry binary: {}", binary.display());
    Ok(())
}
