//! The RDMA step of `cargo xtask test --hw`: the tests of `ferry-transport-rdma`, and of
//! the engine and the CLI with `rdma`, ignored ones included, against RDMA devices.
//!
//! Which devices, first that applies:
//! - `FERRY_RDMA_DEVICES` set by the caller: those, as they are;
//! - this host's RDMA devices (`/sys/class/infiniband`, EFA devices left out: they belong
//!   to the `efa` feature), with `FERRY_RDMA_DEVICES` unset so the tests take every one;
//! - two soft-RoCE devices made for the run when the kernel has `rdma_rxe` and iproute2
//!   has `rdma` (see [`SoftRoce`]), removed afterwards, also when the tests fail;
//! - two soft-RoCE devices in a virtual machine that boots Debian's kernel over this
//!   host's files ([`vm`]), where qemu can be installed;
//! - none: a line says the hardware tests were skipped and why, and the tests that need
//!   no device still run.
//!
//! Without `--hw`, `cargo xtask test` runs the RDMA tests in that virtual machine too
//! ([`vm_step`]), so every run of the suite drives the transport over a real verbs stack.
//!
//! The other `--hw` runs leave `rdma` out (`ferry-transport-rdma` from the workspace run,
//! the feature from the engine's feature sets), so its hardware tests run only here.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::sh::{apt_install, as_root, have, render, run};
use crate::test::nextest_or_test;

pub(crate) mod vm;

/// The RDMA transport's package.
pub(crate) const PACKAGE: &str = "ferry-transport-rdma";

/// The variable the RDMA tests read for the devices to use (comma-separated).
const DEVICES_VAR: &str = "FERRY_RDMA_DEVICES";

/// Soft-RoCE's network side, one row per device: the veth end, its address, the RDMA
/// device on it.
const SOFT_ROCE: [(&str, &str, &str); 2] = [
    ("ferry-rxe0", "10.77.0.1/24", "ferry_rxe0"),
    ("ferry-rxe1", "10.77.0.2/24", "ferry_rxe1"),
];

/// Packages the step needs once it runs tests: iproute2's `rdma` and `ip`, and the
/// RDMA stack's base (kernel module loading, udev rules for device names). Not part of
/// the ordinary build: `rdma-core` brings udev and systemd along.
const PACKAGES: &[&str] = &["iproute2", "rdma-core"];

/// Feature list `features` without `rdma`; `None` when nothing is left.
pub(crate) fn without_rdma(features: &str) -> Option<String> {
    let rest: Vec<&str> = features.split(',').filter(|f| *f != "rdma").collect();
    (!rest.is_empty()).then(|| rest.join(","))
}

/// The transport's tests, then the engine's and the CLI's with `rdma`; `ignored`
/// includes the hardware tests. `devices` (when `Some`) goes into `FERRY_RDMA_DEVICES`.
fn run_tests(ignored: bool, devices: Option<&str>) -> Result<()> {
    for (packages, features) in [
        (&[PACKAGE][..], None),
        (&["ferry-engine", "ferry-cli"][..], Some("rdma")),
    ] {
        let mut c = nextest_or_test(packages, features, ignored);
        if let Some(d) = devices {
            c.env(DEVICES_VAR, d);
        }
        run(&mut c)?;
    }
    Ok(())
}

/// The RDMA step of `cargo xtask test --hw` (see the module's documentation).
pub(crate) fn hw() -> Result<()> {
    if let Ok(given) = std::env::var(DEVICES_VAR) {
        eprintln!("xtask: RDMA hardware tests on {DEVICES_VAR}={given}");
        apt_install(PACKAGES)?;
        return run_tests(true, None);
    }
    let host = host_devices();
    if !host.is_empty() {
        eprintln!(
            "xtask: RDMA hardware tests on this host's devices: {}",
            host.join(", ")
        );
        apt_install(PACKAGES)?;
        return run_tests(true, None);
    }
    match soft_roce_unavailable() {
        None => {
            apt_install(PACKAGES)?;
            let devices = SoftRoce::create()?;
            eprintln!(
                "xtask: RDMA hardware tests on soft-RoCE: {}",
                devices.describe()
            );
            // `devices` is dropped (and the devices removed) however the tests end.
            run_tests(true, Some(&SoftRoce::names()))
        }
        Some(why) => {
            run_tests(false, None)?;
            match vm::prepare() {
                Ok(kernel) => {
                    eprintln!(
                        "xtask: this host's kernel cannot make soft-RoCE devices ({why}): \
                         the RDMA hardware tests run in a VM"
                    );
                    vm::run_tests(&kernel)
                }
                Err(no_vm) => {
                    eprintln!(
                        "xtask: skipped: the RDMA hardware tests (this host has no RDMA \
                         device, soft-RoCE cannot be set up: {why}; and no VM: {no_vm}); the \
                         RDMA tests that need no device ran"
                    );
                    Ok(())
                }
            }
        }
    }
}

/// The step of `cargo xtask test` without `--hw`: the RDMA tests over soft-RoCE in a
/// virtual machine ([`vm`]) on any host, so that every run drives the verbs path the same
/// way whatever the host has; or a line saying why they cannot run here.
pub(crate) fn vm_step() -> Result<()> {
    match vm::prepare() {
        Ok(kernel) => vm::run_tests(&kernel),
        Err(why) => {
            eprintln!("xtask: skipped: the RDMA tests over soft-RoCE in a VM ({why})");
            Ok(())
        }
    }
}

/// This host's RDMA devices, EFA's and leftovers of a soft-RoCE run left out.
fn host_devices() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/infiniband") else {
        return vec![];
    };
    let mut devices: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let driver = std::fs::read_link(e.path().join("device/driver")).ok();
            driver.is_none_or(|d| d.file_name().is_none_or(|n| n != "efa"))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !SOFT_ROCE.iter().any(|(.., d)| d == name))
        .collect();
    devices.sort();
    devices
}

/// Why soft-RoCE cannot be set up here, or `None` when it can: the kernel module
/// `rdma_rxe` loaded (or loadable) and iproute2's `rdma` present.
fn soft_roce_unavailable() -> Option<String> {
    if !Path::new("/sys/module/rdma_rxe").exists() {
        if let Err(e) = apt_install(&["kmod"]) {
            return Some(format!("cannot install kmod for modprobe: {e:#}"));
        }
        let mut c = as_root("modprobe");
        c.arg("rdma_rxe").stdin(Stdio::null());
        match c.output() {
            Err(e) => return Some(format!("cannot run `{}`: {e}", render(&c))),
            Ok(o) if !o.status.success() => {
                return Some(format!(
                    "`{}` failed: {}",
                    render(&c),
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Ok(_) => {}
        }
    }
    if let Err(e) = apt_install(&["iproute2"]) {
        return Some(format!("cannot install iproute2: {e:#}"));
    }
    if !have("rdma") {
        return Some("iproute2 has no `rdma` tool".into());
    }
    None
}

/// Two soft-RoCE devices on a veth pair, made for one run; dropping it removes them.
///
/// The pair `ferry-rxe0` / `ferry-rxe1` stays in this network namespace, one address per
/// end (10.77.0.1/24, 10.77.0.2/24), so each device has an IPv4 RoCE v2 GID of its own,
/// the kind ferry picks on Ethernet; `ferry_rxe0` sits on one end, `ferry_rxe1` on the
/// other. rxe hands a queue pair's packets to a peer on the same device inside the
/// driver; between the two devices the kernel routes them over `lo` (both addresses are
/// local here), where rxe drops them. Engines that both list the two devices pair NIC
/// `k` with NIC `k`, so every queue pair stays on one device.
struct SoftRoce;

impl SoftRoce {
    /// Removes leftovers of a run that was killed, then makes the pair and the devices
    /// and waits until each device's port is active with its IPv4 GID.
    fn create() -> Result<SoftRoce> {
        remove_soft_roce();
        // Made before the first device exists, so a failure half-way removes the rest.
        let made = SoftRoce;
        let [(a, ..), (b, ..)] = SOFT_ROCE;
        run(as_root("ip").args(["link", "add", a, "type", "veth", "peer", "name", b]))?;
        for (netdev, address, _) in SOFT_ROCE {
            run(as_root("ip").args(["addr", "add", address, "dev", netdev]))?;
            run(as_root("ip").args(["link", "set", netdev, "up"]))?;
        }
        for (netdev, _, device) in SOFT_ROCE {
            run(as_root("rdma").args(["link", "add", device, "type", "rxe", "netdev", netdev]))?;
        }
        for (_, address, device) in SOFT_ROCE {
            wait_until_ready(device, address)?;
        }
        let _ = run(Command::new("rdma").args(["link", "show"]));
        Ok(made)
    }

    /// The devices' names as `FERRY_RDMA_DEVICES` takes them.
    fn names() -> String {
        SOFT_ROCE.map(|(.., d)| d).join(",")
    }

    /// The devices in words, for the log.
    fn describe(&self) -> String {
        SOFT_ROCE
            .map(|(netdev, address, device)| format!("{device} on {netdev} ({address})"))
            .join(", ")
    }
}

impl Drop for SoftRoce {
    fn drop(&mut self) {
        remove_soft_roce();
    }
}

/// Deletes the soft-RoCE devices and the veth pair where they exist (deleting one end
/// deletes both). Failures are printed, never raised: this runs from `Drop`.
fn remove_soft_roce() {
    let mut steps: Vec<Command> = vec![];
    for (.., device) in SOFT_ROCE {
        if Path::new("/sys/class/infiniband").join(device).exists() {
            let mut c = as_root("rdma");
            c.args(["link", "delete", device]);
            steps.push(c);
        }
    }
    let (first, ..) = SOFT_ROCE[0];
    if Path::new("/sys/class/net").join(first).exists() {
        let mut c = as_root("ip");
        c.args(["link", "delete", first]);
        steps.push(c);
    }
    for mut c in steps {
        if let Err(e) = run(&mut c) {
            eprintln!("xtask: soft-RoCE teardown: {e:#}");
        }
    }
}

/// Waits (10 s at most) until `device`'s port 1 is ACTIVE and its GID table holds the
/// IPv4-mapped GID of `address` (the kernel fills both shortly after `rdma link add`).
fn wait_until_ready(device: &str, address: &str) -> Result<()> {
    let port = Path::new("/sys/class/infiniband")
        .join(device)
        .join("ports/1");
    let gid = ipv4_mapped_gid(address);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = std::fs::read_to_string(port.join("state")).unwrap_or_default();
        let has_gid = std::fs::read_dir(port.join("gids")).is_ok_and(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|g| g.trim() == gid))
        });
        if state.contains("ACTIVE") && has_gid {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "soft-RoCE device {device} is not ready after 10 s (port state `{}`, GID \
                 {gid} {}; see `rdma link show`)",
                state.trim(),
                if has_gid { "present" } else { "missing" }
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The GID table's text for the IPv4-mapped GID of `address` (`a.b.c.d/len`), as sysfs
/// writes it: `0000:0000:0000:0000:0000:ffff:0a4d:0001` for 10.77.0.1.
fn ipv4_mapped_gid(address: &str) -> String {
    let ip = address.split('/').next().unwrap_or(address);
    let o: Vec<u8> = ip.split('.').filter_map(|x| x.parse().ok()).collect();
    let word = |hi: u8, lo: u8| format!("{:04x}", u16::from_be_bytes([hi, lo]));
    match o[..] {
        [a, b, c, d] => format!(
            "0000:0000:0000:0000:0000:ffff:{}:{}",
            word(a, b),
            word(c, d)
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_leaves_feature_lists() {
        assert_eq!(
            without_rdma("efa,rdma,cuda,http").as_deref(),
            Some("efa,cuda,http")
        );
        assert_eq!(without_rdma("efa").as_deref(), Some("efa"));
        assert_eq!(without_rdma("rdma"), None);
    }

    #[test]
    fn gid_text_matches_sysfs() {
        assert_eq!(
            ipv4_mapped_gid("10.77.0.1/24"),
            "0000:0000:0000:0000:0000:ffff:0a4d:0001"
        );
        assert_eq!(
            ipv4_mapped_gid("192.168.255.2"),
            "0000:0000:0000:0000:0000:ffff:c0a8:ff02"
        );
    }
}
