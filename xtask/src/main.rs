//! `cargo xtask`: the commands that check and measure ferry. It shells out to cargo, apt
//! and the benchmark binaries; nothing depends on it.
//!
//! - `cargo xtask test [--hw] [--full]`: formatting; the feature matrix (clippy with `-D
//!   warnings` for every package and feature set that must build, a failing check with
//!   its message for those that must not); docs with warnings denied; every test and doc
//!   test; the loom models of the thread hand-overs; every fuzz target for a bounded time;
//!   the downstream crate per deployment profile. `--hw` also runs the tests that
//!   need hardware (GPU, EFA, RDMA); `--full` adds `cross aarch64`.
//! - `cargo xtask cross aarch64`: the `ferry` binary and the test binaries for
//!   `aarch64-unknown-linux-gnu` with `efa`, and the TCP and EFA loopback tests under
//!   `qemu-user-static`.
//! - `cargo xtask bench [--duration S] [--rounds N]`: `ferry bench` and `iperf3 -l 1M` on
//!   loopback, interleaved in one run, with their ratios.
//! - `cargo xtask bench --efa`: `ferry bench --protocol efa` against a minimal libfabric
//!   RMA loop, for the `tcp;ofi_rxm` and `shm` providers.
//! - `cargo xtask fuzz [TARGET] [--time SECS]`: the libFuzzer targets of `fuzz/` on the
//!   stable toolchain (`cargo xtask test` runs each for a bounded time).
//! - `cargo xtask stall [--runs N] [--duration SECS]`: `ferry bench` N times (200) over
//!   mixed shapes; fails if any run outlived its window (a wait that missed its wake-up).
#![forbid(unsafe_code)]

mod fuzz;
mod reliability;

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = args
        .split_first()
        .map(|(t, r)| (t.as_str(), r))
        .unwrap_or(("help", &[]));
    match task {
        "test" => test(rest),
        "bench" => bench(rest),
        "cross" => cross(rest),
        "stall" => reliability::stall(rest),
        "fuzz" => fuzz::run(rest),
        _ => {
            eprintln!("usage: cargo xtask test [--hw] [--full]\n       cargo xtask bench [--efa] [--duration SECS] [--rounds N]\n       cargo xtask cross aarch64\n       cargo xtask fuzz [TARGET] [--time SECS] [--ci]\n       cargo xtask stall [--runs N] [--duration SECS]");
            if task == "help" || task == "--help" {
                Ok(())
            } else {
                bail!("unknown task `{task}`")
            }
        }
    }
}

fn root() -> std::path::PathBuf {
    let here = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(|p| p.to_path_buf()).unwrap_or(here)
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", render(cmd));
    let start = Instant::now();
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("running {}", render(cmd)))?;
    eprintln!("xtask:   ({:.1} s)", start.elapsed().as_secs_f64());
    if !status.success() {
        bail!("`{}` failed ({status})", render(cmd));
    }
    Ok(())
}

fn render(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| {
            let a = a.to_string_lossy();
            if a.contains(' ') || a.contains(';') {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        }))
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian packages that are missing (needs root, as on CI).
fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let sudo = if Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
    {
        vec![]
    } else {
        vec!["sudo"]
    };
    let apt = |args: &[&str]| {
        let mut c = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut apt(&["update", "-qq"]))?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install)
}

/// Debian packages the full build needs: libfabric and its headers for the `efa`
/// feature, libclang for bindgen.
const BUILD_PACKAGES: &[&str] = &["libfabric-dev", "libfabric-bin", "libclang-dev"];

/// What a feature combination must do.
#[derive(Clone, Copy)]
enum Expect {
    /// Builds, with clippy `-D warnings` clean.
    Builds,
    /// Fails to build, saying this.
    FailsWith(&'static str),
}

/// One package with one feature set: `None` is its default features; `Some(list)` is
/// `--no-default-features` with that list (empty: no features at all).
struct Combo {
    package: &'static str,
    features: Option<&'static str>,
    expect: Expect,
}

/// The feature matrix, checked per package (feature unification in one `--workspace`
/// build would hide gaps). `ferry-engine` and `ferry-cli`: their defaults, every feature
/// alone, all together, and no features at all, which must fail naming `tcp`. The other
/// crates have no features.
fn matrix() -> Vec<Combo> {
    let builds = |package, features| Combo {
        package,
        features,
        expect: Expect::Builds,
    };
    let mut m: Vec<Combo> = [
        "ferry-transport-api",
        "ferry-transport-tcp",
        "libfabric-sys",
        "ferry-transport-efa",
        "ferry-mem-cuda",
        "xtask",
    ]
    .into_iter()
    .map(|p| builds(p, None))
    .collect();
    for package in ["ferry-engine", "ferry-cli"] {
        for features in [
            None,
            Some("tcp"),
            Some("efa"),
            Some("cuda"),
            Some("tcp,efa,cuda"),
        ] {
            m.push(builds(package, features));
        }
        m.push(Combo {
            package,
            features: Some(""),
            expect: Expect::FailsWith("ferry-engine needs its `tcp` feature"),
        });
    }
    m
}

/// Feature sets the engine's and the CLI's tests run with, besides the defaults.
const TEST_FEATURES: &[&str] = &["efa", "efa,cuda"];

/// Deployment profiles of the downstream crate (`tests/downstream`).
const PROFILES: &[&str] = &["tcp", "efa", "efa,cuda"];

fn with_features(c: &mut Command, features: Option<&str>) {
    if let Some(f) = features {
        c.arg("--no-default-features");
        if !f.is_empty() {
            c.args(["--features", f]);
        }
    }
}

fn describe(features: Option<&str>) -> String {
    match features {
        None => "default features".into(),
        Some("") => "no features".into(),
        Some(f) => format!("features {f}"),
    }
}

/// Clippy for every combination that must build; a check of every one that must not,
/// which must fail with its message.
fn feature_matrix() -> Result<()> {
    for combo in &matrix() {
        match combo.expect {
            Expect::Builds => {
                let mut c = cargo();
                c.args(["clippy", "-p", combo.package, "--all-targets"]);
                with_features(&mut c, combo.features);
                c.args(["--", "-D", "warnings"]);
                run(&mut c)?;
            }
            Expect::FailsWith(message) => {
                let mut c = cargo();
                c.args(["check", "-p", combo.package]);
                with_features(&mut c, combo.features);
                eprintln!("xtask: $ {}   (must fail)", render(&c));
                let out = c.current_dir(root()).output()?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                if out.status.success() || !stderr.contains(message) {
                    bail!(
                        "{} with {} should fail saying `{message}`; it {}:\n{stderr}",
                        combo.package,
                        describe(combo.features),
                        if out.status.success() {
                            "built"
                        } else {
                            "failed otherwise"
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

/// `cargo doc` of every package with all its features, warnings denied.
fn docs() -> Result<()> {
    let mut c = cargo();
    c.args(["doc", "--workspace", "--no-deps", "--all-features"])
        .env("RUSTDOCFLAGS", "-D warnings");
    run(&mut c)
}

/// The downstream crate: built and run (a transfer on loopback) for each profile.
fn downstream() -> Result<()> {
    let manifest = root().join("tests/downstream/Cargo.toml");
    for profile in PROFILES {
        let mut c = cargo();
        c.args(["run", "--locked", "--manifest-path"])
            .arg(&manifest)
            .args(["--no-default-features", "--features", profile])
            .args(["--", "tcp;ofi_rxm"])
            // Shares the workspace's build directory: the same dependencies, built once.
            .env("CARGO_TARGET_DIR", root().join("target"));
        run(&mut c)?;
    }
    Ok(())
}

fn nextest_or_test(packages: &[&str], features: Option<&str>, hw: bool) -> Command {
    let mut c = cargo();
    if have("cargo-nextest") {
        c.args(["nextest", "run", "--no-fail-fast"]);
    } else {
        c.args(["test", "--lib", "--bins", "--tests", "--no-fail-fast"]);
    }
    if packages.is_empty() {
        c.arg("--workspace");
    }
    for p in packages {
        c.args(["-p", p]);
    }
    if let Some(f) = features {
        c.args(["--features", f]);
    }
    if hw {
        if have("cargo-nextest") {
            c.args(["--run-ignored", "all"]);
        } else {
            c.args(["--", "--include-ignored"]);
        }
    }
    c
}

fn test(args: &[String]) -> Result<()> {
    let hw = args.iter().any(|a| a == "--hw");
    let full = args.iter().any(|a| a == "--full");
    if let Some(a) = args.iter().find(|a| *a != "--hw" && *a != "--full") {
        bail!("cargo xtask test: unknown flag `{a}` (expected --hw or --full)");
    }
    apt_install(BUILD_PACKAGES)?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    feature_matrix()?;
    docs()?;
    run(&mut nextest_or_test(&[], None, hw))?;
    reliability::loom()?;
    fuzz::ci()?;
    for features in TEST_FEATURES {
        run(&mut nextest_or_test(
            &["ferry-engine", "ferry-cli"],
            Some(features),
            hw,
        ))?;
    }
    run(cargo().args(["test", "--workspace", "--doc"]))?;
    downstream()?;
    if full {
        cross(&["aarch64".to_string()])?;
    }
    Ok(())
}

struct Case {
    label: &'static str,
    args: Vec<&'static str>,
}

fn bench(args: &[String]) -> Result<()> {
    let mut duration = "3".to_string();
    let mut rounds = 3usize;
    let mut efa = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--duration" => duration = it.next().context("--duration needs seconds")?.clone(),
            "--rounds" => rounds = it.next().context("--rounds needs a number")?.parse()?,
            "--efa" => efa = true,
            other => bail!("cargo xtask bench: unknown flag `{other}`"),
        }
    }
    if efa {
        return bench_efa(&duration, rounds);
    }
    if !have("iperf3") {
        apt_install(&["iperf3"])?;
    }
    run(cargo().args(["build", "--release", "-p", "ferry-cli"]))?;
    let ferry = root().join("target/release/ferry");
    let cases = [
        Case {
            label: "write 1 MiB x128",
            args: vec![
                "--operation",
                "write",
                "--block-size",
                "1M",
                "--batch-size",
                "128",
            ],
        },
        Case {
            label: "read  1 MiB x128",
            args: vec![
                "--operation",
                "read",
                "--block-size",
                "1M",
                "--batch-size",
                "128",
            ],
        },
        Case {
            label: "write 64 KiB x128",
            args: vec![
                "--operation",
                "write",
                "--block-size",
                "64K",
                "--batch-size",
                "128",
            ],
        },
        Case {
            label: "read  64 KiB x128",
            args: vec![
                "--operation",
                "read",
                "--block-size",
                "64K",
                "--batch-size",
                "128",
            ],
        },
        Case {
            label: "read  4 KiB x1",
            args: vec![
                "--operation",
                "read",
                "--block-size",
                "4K",
                "--batch-size",
                "1",
            ],
        },
    ];
    // results[case] = (throughput, efficiency, p50 latency) per round; iperf per round.
    let mut results: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); cases.len()];
    let mut iperf = Vec::new();
    for round in 1..=rounds {
        eprintln!("xtask: round {round}/{rounds}");
        iperf.push(iperf3(&duration)?);
        for (i, case) in cases.iter().enumerate() {
            let out = Command::new(&ferry)
                .arg("bench")
                .args(&case.args)
                .args(["--duration", &duration, "--json"])
                .current_dir(root())
                .stderr(Stdio::inherit())
                .output()
                .context("running ferry bench")?;
            if !out.status.success() {
                bail!(
                    "ferry bench {} failed ({})",
                    case.args.join(" "),
                    out.status
                );
            }
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("parsing ferry bench --json")?;
            let num = |p: &str| v.pointer(p).and_then(|x| x.as_f64()).unwrap_or(0.0);
            results[i].push((
                num("/throughput_gbps"),
                num("/gb_per_cpu_second"),
                num("/latency_us/p50"),
            ));
        }
    }
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(|a, b| a.total_cmp(b));
        xs[xs.len() / 2]
    };
    let ip_rate = median(iperf.iter().map(|x: &(f64, f64)| x.0).collect());
    let ip_eff = median(iperf.iter().map(|x| x.1).collect());
    println!(
        "loopback, medians of {rounds} interleaved rounds of {duration} s (1 GB = 10^9 bytes)"
    );
    println!(
        "{:<20} {:>9} {:>10} {:>14} {:>12}",
        "case", "GB/s", "vs iperf3", "GB/CPU-second", "p50 latency"
    );
    println!(
        "{:<20} {:>9.2} {:>10} {:>14.2} {:>12}",
        "iperf3 -l 1M", ip_rate, "1.00", ip_eff, "-"
    );
    for (case, r) in cases.iter().zip(&results) {
        let rate = median(r.iter().map(|x| x.0).collect());
        let eff = median(r.iter().map(|x| x.1).collect());
        let p50 = median(r.iter().map(|x| x.2).collect());
        println!(
            "{:<20} {:>9.2} {:>10.2} {:>14.2} {:>9.1} us",
            case.label,
            rate,
            rate / ip_rate,
            eff,
            p50
        );
    }
    Ok(())
}

/// `ferry bench --protocol efa` against the minimal libfabric RMA loop of
/// transport-efa, per provider and operation, 1 MiB blocks, interleaved.
fn bench_efa(duration: &str, rounds: usize) -> Result<()> {
    apt_install(BUILD_PACKAGES)?;
    run(cargo().args(["build", "--release", "-p", "ferry-cli", "--features", "efa"]))?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "ferry-transport-efa",
        "--example",
        "rma_loop",
    ]))?;
    let ferry = root().join("target/release/ferry");
    let rma_loop = root().join("target/release/examples/rma_loop");
    let json = |out: std::process::Output, what: &str| -> Result<f64> {
        if !out.status.success() {
            bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| format!("parsing {what}"))?;
        v.get("throughput_gbps")
            .and_then(|x| x.as_f64())
            .context("no throughput_gbps")
    };
    let cases: Vec<(&str, &str)> = ["tcp;ofi_rxm", "shm"]
        .into_iter()
        .flat_map(|p| ["write", "read"].into_iter().map(move |o| (p, o)))
        .collect();
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); cases.len()];
    for round in 1..=rounds {
        eprintln!("xtask: round {round}/{rounds}");
        for (i, (provider, op)) in cases.iter().enumerate() {
            let base = Command::new(&rma_loop)
                .args([provider, op, "1048576", duration])
                .output()?;
            results[i].0.push(json(base, "rma_loop")?);
            let out = Command::new(&ferry)
                .args([
                    "bench",
                    "--protocol",
                    "efa",
                    "--provider",
                    provider,
                    "--operation",
                    op,
                ])
                .args([
                    "--block-size",
                    "1M",
                    "--batch-size",
                    "128",
                    "--duration",
                    duration,
                    "--json",
                ])
                .output()?;
            results[i].1.push(json(out, "ferry bench")?);
        }
    }
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(|a, b| a.total_cmp(b));
        xs[xs.len() / 2]
    };
    println!("libfabric, 1 MiB blocks, medians of {rounds} interleaved rounds of {duration} s (1 GB = 10^9 bytes)");
    println!(
        "{:<24} {:>14} {:>14} {:>8}",
        "provider, operation", "RMA loop GB/s", "ferry GB/s", "ratio"
    );
    for ((provider, op), (base, ferry)) in cases.iter().zip(results) {
        let (b, f) = (median(base), median(ferry));
        println!(
            "{:<24} {:>14.2} {:>14.2} {:>8.2}",
            format!("{provider} {op}"),
            b,
            f,
            f / b
        );
    }
    Ok(())
}

/// One `iperf3 -l 1M` run on loopback: (GB/s, GB per CPU-second of both ends).
fn iperf3(duration: &str) -> Result<(f64, f64)> {
    let port = "5299";
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-p", port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let mut out = None;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let o = Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                port,
                "-l",
                "1M",
                "-t",
                duration,
                "-J",
            ])
            .output()
            .context("running iperf3 -c")?;
        if o.status.success() {
            out = Some(o);
            break;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let out = out.context("iperf3 never connected to its server")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(|x| x.as_f64())
        .context("iperf3 output")?;
    let cpu = |p: &str| v.pointer(p).and_then(|x| x.as_f64()).unwrap_or(0.0) / 100.0;
    let cores = cpu("/end/cpu_utilization_percent/host_total")
        + cpu("/end/cpu_utilization_percent/remote_total");
    let rate = bps / 8e9;
    Ok((rate, if cores > 0.0 { rate / cores } else { 0.0 }))
}

/// Debian packages for the aarch64 cross build (arm64 multiarch for libfabric).
const CROSS_PACKAGES: &[&str] = &[
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user-static",
    "libfabric-dev:arm64",
    "libgcc-s1:arm64",
    "file",
];

/// `cargo xtask cross aarch64`: installs the Rust target and Debian's cross toolchain
/// and arm64 libfabric, builds `ferry` and the engine's tests for
/// `aarch64-unknown-linux-gnu` with `efa`, and runs the TCP and `tcp;ofi_rxm` loopback
/// tests under `qemu-aarch64-static`.
fn cross(args: &[String]) -> Result<()> {
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
        run(Command::new("dpkg").args(["--add-architecture", "arm64"]))?;
        // The package lists must now include arm64.
        run(Command::new("apt-get").args(["update", "-qq"]))?;
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
        "efa",
    ]))?;
    run(&mut cross_cargo(&[
        "test",
        "--no-run",
        "-p",
        "ferry-engine",
        "-p",
        "ferry-cli",
        "--features",
        "efa",
    ]))?;
    // The loopback suites: TCP (transfer) and libfabric over tcp;ofi_rxm (efa). Tests
    // that start the `ferry` binary as a child need binfmt support and run natively only.
    run(&mut cross_cargo(&[
        "test",
        "-p",
        "ferry-engine",
        "--features",
        "efa",
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
