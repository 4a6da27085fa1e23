//! Shell helpers every task shares: the workspace root, running a command with its line
//! and time printed, cargo, and Debian packages.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of this crate).
pub(crate) fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(|p| p.to_path_buf()).unwrap_or(here)
}

/// Runs `cmd` in the workspace root (unless it names a folder of its own), printing its
/// line and how long it took; fails unless it exits successfully.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", render(cmd));
    let start = Instant::now();
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {}", render(cmd)))?;
    eprintln!("xtask:   ({:.1} s)", start.elapsed().as_secs_f64());
    if !status.success() {
        bail!("`{}` failed ({status})", render(cmd));
    }
    Ok(())
}

/// `cmd` as a shell line, quoting arguments with spaces or `;` (libfabric providers such
/// as `tcp;ofi_rxm`) so the line can be pasted.
pub(crate) fn render(cmd: &Command) -> String {
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

/// On CI (`CI` set), removes `dir`, a build folder that only the step just finished
/// uses, so that a fresh machine's disk holds one such folder at a time. Elsewhere it is
/// kept: it is what makes the next run quick.
pub(crate) fn discard_on_ci(dir: &Path) -> Result<()> {
    if std::env::var_os("CI").is_none() || !dir.exists() {
        return Ok(());
    }
    eprintln!("xtask: CI: removing {}", dir.display());
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// The cargo that runs this xtask (so its toolchain builds everything else).
pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Whether `program` is on the `PATH`.
pub(crate) fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `program` as root: itself when this process is root (as on CI), else through `sudo`.
pub(crate) fn as_root(program: &str) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

/// Installs Debian packages that are missing (needs root, as on CI).
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
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
    apt_update()?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install)
}

/// Refreshes apt's package lists (needs root, as on CI).
pub(crate) fn apt_update() -> Result<()> {
    run(&mut apt(&["update", "-qq"]))
}

/// `apt-get ARGS` as root, without questions.
fn apt(args: &[&str]) -> Command {
    let mut c = as_root("apt-get");
    c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Debian packages the full build needs: libfabric and its headers for the `efa`
/// feature; libibverbs and librdmacm with their headers (found by pkg-config) for `rdma`,
/// and the user-space drivers of ibverbs (soft-RoCE's `rxe` among them) its tests load;
/// libclang for bindgen.
pub(crate) const BUILD_PACKAGES: &[&str] = &[
    "libfabric-dev",
    "libfabric-bin",
    "libibverbs-dev",
    "librdmacm-dev",
    "ibverbs-providers",
    "libclang-dev",
];

/// An executable cargo built: where it is, and the folder of its package's manifest (the
/// working directory `cargo test` gives a test binary).
pub(crate) struct Built {
    pub(crate) path: PathBuf,
    pub(crate) package_dir: PathBuf,
    /// The target's name (`conformance`; the crate's for unit tests; `ferry`).
    pub(crate) name: String,
    /// A test binary (else a program the tests run, such as `ferry`).
    pub(crate) test: bool,
}

/// Builds what `cargo test --no-run` builds with `selection` (packages, features,
/// targets, profile) and lists its executables, from cargo's JSON messages.
pub(crate) fn test_binaries(selection: &[&str]) -> Result<Vec<Built>> {
    let mut c = cargo();
    c.args(["test", "--no-run", "--message-format=json"])
        .args(selection)
        .current_dir(root())
        .stderr(Stdio::inherit());
    eprintln!("xtask: $ {}", render(&c));
    let out = c.output().context("running cargo")?;
    if !out.status.success() {
        bail!("`{}` failed", render(&c));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| {
            let path = PathBuf::from(m["executable"].as_str()?);
            let manifest = PathBuf::from(m["manifest_path"].as_str()?);
            Some(Built {
                path,
                package_dir: manifest.parent()?.to_path_buf(),
                name: m["target"]["name"].as_str()?.to_string(),
                test: m["profile"]["test"] == true,
            })
        })
        .collect())
}
