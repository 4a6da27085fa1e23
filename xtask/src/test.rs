//! `cargo xtask test`: formatting, the feature matrix, docs, every test, the
//! micro-benchmarks (built, not run), the loom models, the fuzz targets for a bounded
//! time, and the downstream crate per deployment profile.

use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cross::cross;
use crate::sh::{apt_install, cargo, discard_on_ci, have, render, root, run, BUILD_PACKAGES};
use crate::{fuzz, rdma, reliability};

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
    package: String,
    features: Option<String>,
    expect: Expect,
}

/// The combinations that must fail, with their message: package, feature list (empty: no
/// features at all), what the error must say. Everything else in the matrix comes from
/// the packages' own `[features]`.
const MUST_FAIL: &[(&str, &str, &str)] = &[
    ("ferry-engine", "", "ferry-engine needs its `tcp` feature"),
    ("ferry-cli", "", "ferry-engine needs its `tcp` feature"),
];

/// The feature matrix, checked per package (feature unification in one `--workspace`
/// build would hide gaps), read from `cargo metadata`: every package with its defaults;
/// a package with features also with each feature alone and all of them together; then
/// the rows of [`MUST_FAIL`]. Features whose names start with `__` are test-only hooks
/// and are left out. Packages without features come first: they are the cheap rows.
fn matrix() -> Result<Vec<Combo>> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let mut packages: Vec<(String, Vec<String>)> = meta["packages"]
        .as_array()
        .context("cargo metadata lists no packages")?
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap_or_default().to_string();
            let features = p["features"]
                .as_object()
                .map(|f| {
                    f.keys()
                        .filter(|k| *k != "default" && !k.starts_with("__"))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            (name, features)
        })
        .collect();
    packages.sort_by_key(|(_, features)| !features.is_empty());
    for (package, ..) in MUST_FAIL {
        if !packages.iter().any(|(name, _)| name == package) {
            bail!("the feature matrix names `{package}`, which is not a workspace package");
        }
    }
    let mut m = Vec::new();
    for (package, features) in &packages {
        let mut sets: Vec<Option<String>> = vec![None];
        sets.extend(features.iter().map(|f| Some(f.clone())));
        if features.len() > 1 {
            sets.push(Some(features.join(",")));
        }
        m.extend(sets.into_iter().map(|features| Combo {
            package: package.clone(),
            features,
            expect: Expect::Builds,
        }));
        m.extend(
            MUST_FAIL
                .iter()
                .filter(|(p, ..)| p == package)
                .map(|(_, features, message)| Combo {
                    package: package.clone(),
                    features: Some(features.to_string()),
                    expect: Expect::FailsWith(message),
                }),
        );
    }
    Ok(m)
}

/// Feature sets the engine's and the CLI's tests run with, besides the defaults. `rdma`
/// rides along with the others rather than costing a run of its own (clippy checks it
/// alone).
const TEST_FEATURES: &[&str] = &["efa", FULL_FEATURES];

/// Every optional feature of the engine and the CLI.
pub(crate) const FULL_FEATURES: &str = "efa,rdma,cuda,http,redis,etcd";

/// Deployment profiles of the downstream crate (`tests/downstream`).
const PROFILES: &[&str] = &["tcp", "efa", "efa,cuda", "rdma", "rdma,cuda"];

/// `--no-default-features` and the list for `Some`; nothing for `None` (the defaults).
fn with_features(c: &mut Command, features: Option<&str>) {
    if let Some(f) = features {
        c.arg("--no-default-features");
        if !f.is_empty() {
            c.args(["--features", f]);
        }
    }
}

/// A feature set in words, for error messages.
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
    for combo in &matrix()? {
        match combo.expect {
            Expect::Builds => {
                let mut c = cargo();
                c.args(["clippy", "-p", &combo.package, "--all-targets"]);
                with_features(&mut c, combo.features.as_deref());
                c.args(["--", "-D", "warnings"]);
                run(&mut c)?;
            }
            Expect::FailsWith(message) => {
                let mut c = cargo();
                c.args(["check", "-p", &combo.package]);
                with_features(&mut c, combo.features.as_deref());
                eprintln!("xtask: $ {}   (must fail)", render(&c));
                let out = c.current_dir(root()).output()?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                if out.status.success() || !stderr.contains(message) {
                    bail!(
                        "{} with {} should fail saying `{message}`; it {}:\n{stderr}",
                        combo.package,
                        describe(combo.features.as_deref()),
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

/// The criterion micro-benchmarks (every `[[bench]]` target), built but not run
/// (`cargo bench` runs them): they use the crates' hidden bench modules and internals'
/// public faces, so a change that breaks one fails here rather than for the next person
/// to measure. The test profile reuses the test build's dependencies (a few seconds, or
/// about 40 s on two cores when criterion itself is built); clippy of `--all-targets`
/// in the feature matrix lints them.
fn benches() -> Result<()> {
    run(cargo().args(["test", "--workspace", "--bench", "*", "--no-run"]))
}

/// nextest (or `cargo test` where nextest is missing) of `packages` (none: the workspace)
/// with `features` on top of the defaults; `hw` includes the ignored hardware tests (and
/// leaves the RDMA transport out of the workspace: the RDMA step runs it, see `rdma.rs`).
pub(crate) fn nextest_or_test(packages: &[&str], features: Option<&str>, hw: bool) -> Command {
    let mut c = cargo();
    if have("cargo-nextest") {
        c.args(["nextest", "run", "--no-fail-fast"]);
    } else {
        c.args(["test", "--lib", "--bins", "--tests", "--no-fail-fast"]);
    }
    if packages.is_empty() {
        c.arg("--workspace");
        if hw {
            c.args(["--exclude", rdma::PACKAGE]);
        }
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

/// `cargo xtask test [--hw] [--full]`.
pub(crate) fn test(args: &[String]) -> Result<()> {
    let hw = args.iter().any(|a| a == "--hw");
    let full = args.iter().any(|a| a == "--full");
    if let Some(a) = args.iter().find(|a| *a != "--hw" && *a != "--full") {
        bail!("cargo xtask test: unknown flag `{a}` (expected --hw or --full)");
    }
    apt_install(BUILD_PACKAGES)?;
    // The metadata stores' tests start a real server.
    apt_install(&["redis-server", "etcd-server"])?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    feature_matrix()?;
    docs()?;
    run(&mut nextest_or_test(&[], None, hw))?;
    benches()?;
    reliability::loom()?;
    discard_on_ci(&root().join("target/loom"))?;
    fuzz::ci()?;
    discard_on_ci(&fuzz::target_dir())?;
    for features in TEST_FEATURES {
        // With --hw, `rdma` is the RDMA step's, which sets up devices for it.
        let features = if hw {
            rdma::without_rdma(features)
        } else {
            Some(features.to_string())
        };
        if let Some(features) = features {
            run(&mut nextest_or_test(
                &["ferry-engine", "ferry-cli"],
                Some(&features),
                hw,
            ))?;
        }
    }
    if hw {
        rdma::hw()?;
    } else {
        rdma::vm_step()?;
        discard_on_ci(&root().join("target/rdma-vm"))?;
    }
    run(cargo().args(["test", "--workspace", "--doc"]))?;
    downstream()?;
    crate::python::test()?;
    discard_on_ci(&crate::python::target_dir())?;
    if full {
        cross(&["aarch64".to_string()])?;
    }
    Ok(())
}
