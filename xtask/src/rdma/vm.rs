//! The RDMA tests over soft-RoCE in a virtual machine: the same on every host, and the
//! way hosts whose kernel cannot make soft-RoCE devices itself (no `rdma_rxe` module:
//! containers, micro-VMs, CI runners) run the RDMA data path at all.
//!
//! What it runs, on the host:
//! - fetches Debian's current kernel package (`linux-image-amd64`'s dependency) into
//!   `target/rdma-vm/kernel/VERSION` once, and indexes its modules (`depmod`); where
//!   that or the packages below cannot be had, [`prepare`] says why and the step is
//!   skipped;
//! - builds the RDMA test binaries (see [`PLAN`]) and the `ferry` binary with `rdma`;
//! - writes a small initramfs (busybox and the virtio and 9p modules) that mounts the
//!   host's root file system read-only over 9p and hands over to the guest step of this
//!   xtask binary, `__rdma-vm-guest`;
//! - boots the kernel under qemu with software emulation (TCG: a nested KVM may only
//!   run kernels built for it) and prints its console; the guest writes its verdict into
//!   `target/rdma-vm/out`, the one folder it may write on the host.
//!
//! In the guest (PID 1): tmpfs over `/tmp`, `/run` and the like; the kernel's module
//! loader pointed at the fetched modules; `rdma_rxe` loaded and the two soft-RoCE devices
//! made as on a host ([`SoftRoce`]); then every test of the planned binaries, ignored
//! (hardware) ones included, each in a process of its own as nextest runs them, and
//! `ferry bench --protocol rdma --verify` both ways between two processes; then it powers
//! the machine off.
//!
//! The user-space side is the host's own: libibverbs and its `rxe` driver
//! (`ibverbs-providers`), iproute2's `rdma`, kmod.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{SoftRoce, DEVICES_VAR, SOFT_ROCE};
use crate::sh::{apt_install, apt_update, have, render, root, run, test_binaries, BUILD_PACKAGES};
use crate::test::FULL_FEATURES;

/// A build whose RDMA tests run in the VM.
struct Suite {
    /// cargo's selection: those `cargo xtask test` builds anyway, so nothing is built
    /// twice.
    selection: &'static [&'static str],
    /// The package folder whose test binaries run.
    package: &'static str,
    /// Its test targets that run; `None`: every one.
    targets: Option<&'static [&'static str]>,
}

/// What runs in the VM: the RDMA transport's tests from the workspace build, and the
/// engine's RDMA and exchange tests from the build with every feature (which also makes
/// the `ferry` binary the guest benchmarks with).
const PLAN: &[Suite] = &[
    Suite {
        selection: &["--workspace"],
        package: "transport-rdma",
        targets: None,
    },
    Suite {
        selection: &[
            "-p",
            "ferry-engine",
            "-p",
            "ferry-cli",
            "--features",
            FULL_FEATURES,
        ],
        package: "engine",
        targets: Some(&["rdma", "exchange"]),
    },
];

/// Host packages: the emulator (Debian's; apt replaces a newer `qemu-utils` from
/// elsewhere with its own when it installs it, which ferry does not use), busybox for the
/// initramfs, kmod for the modules, and the user-space side of RDMA the guest uses.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "iproute2",
    "ibverbs-providers",
];

/// Modules the initramfs loads to reach the host's files (their dependencies come too).
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// kmod's tools, by path: `/usr/sbin` is not on every user's `PATH`.
const MODPROBE: &str = "/usr/sbin/modprobe";
const DEPMOD: &str = "/usr/sbin/depmod";

/// The longest the VM may run before it is stopped and the step fails.
const VM_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The workspace's folder for the VM: kernel cache, initramfs, the guest's plan and
/// verdict.
fn vm_dir() -> PathBuf {
    root().join("target/rdma-vm")
}

/// The kernel the VM boots: its image and the folder whose `lib/modules/VERSION` holds
/// its indexed modules.
pub(crate) struct Kernel {
    image: PathBuf,
    tree: PathBuf,
}

/// Gets what the VM needs (packages, a kernel), or says why it cannot run here: not an
/// x86_64 Linux host with Debian's apt, packages that do not install, no kernel package
/// (no network, another distribution), or paths qemu cannot take.
pub(crate) fn prepare() -> Result<Kernel, String> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err("the soft-RoCE VM is set up for x86_64 Linux hosts only".into());
    }
    if !have("apt-get") {
        return Err("no apt-get to install qemu and fetch a kernel with".into());
    }
    // The paths go into qemu's `-virtfs` options (commas separate them) and the kernel's
    // command line (spaces and quotes separate words).
    let unsafe_char = |c: char| c.is_whitespace() || matches!(c, ',' | '"' | '\'' | '\\');
    for p in [Some(root()), std::env::current_exe().ok()]
        .into_iter()
        .flatten()
    {
        if p.to_string_lossy().contains(unsafe_char) {
            return Err(format!(
                "{} holds a space, comma or quote, which qemu's options cannot take",
                p.display()
            ));
        }
    }
    apt_install(PACKAGES).map_err(|e| format!("cannot install {}: {e:#}", PACKAGES.join(" ")))?;
    kernel().map_err(|e| format!("no Debian kernel to boot: {e:#}"))
}

/// Builds what the guest runs, boots the VM on `kernel` and fails unless every test in it
/// passed.
pub(crate) fn run_tests(kernel: &Kernel) -> Result<()> {
    apt_install(BUILD_PACKAGES)?;
    let dir = vm_dir();
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let mut plan = String::new();
    let mut ferry = None;
    for suite in PLAN {
        for b in test_binaries(suite.selection)? {
            if !b.test {
                if b.name == "ferry" {
                    ferry = Some(b.path);
                }
                continue;
            }
            if b.package_dir.ends_with(suite.package)
                && suite.targets.is_none_or(|k| k.contains(&b.name.as_str()))
            {
                plan.push_str(&format!(
                    "test\t{}\t{}\n",
                    b.package_dir.display(),
                    b.path.display()
                ));
            }
        }
    }
    let ferry = ferry.context("the builds made no `ferry` binary")?;
    plan.push_str(&format!("bench\t{}\n", ferry.display()));
    // Folders the guest must still see where it mounts a tmpfs (a workspace or a target
    // folder under /tmp): the workspace, and where every program it runs lies.
    let xtask = std::env::current_exe().context("finding this xtask binary")?;
    let mut keep = vec![root()];
    let programs = plan
        .lines()
        .filter_map(|l| l.rsplit('\t').next())
        .map(PathBuf::from);
    for p in programs.chain([xtask.clone()]) {
        if let Some(d) = p
            .parent()
            .filter(|d| !keep.iter().any(|k| d.starts_with(k)))
        {
            keep.push(d.to_path_buf());
        }
    }
    let keep: String = keep
        .iter()
        .map(|k| format!("keep\t{}\n", k.display()))
        .collect();
    plan.insert_str(0, &keep);
    let initrd = dir.join("initrd.cpio");
    write_initramfs(&initrd, &kernel.tree)?;
    let out = dir.join("out");
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    std::fs::create_dir_all(&out)?;
    let plan_file = dir.join("plan.tsv");
    std::fs::write(&plan_file, &plan)?;
    eprintln!(
        "xtask: RDMA tests over soft-RoCE in a VM (kernel {}, built in {:.0} s)",
        kernel.image.display(),
        started.elapsed().as_secs_f64()
    );
    // Through `setpriv --pdeathsig`, which execs qemu with a parent-death signal: if
    // xtask itself is killed, the kernel ends the VM too instead of leaving it running.
    let mut qemu = Command::new("setpriv");
    qemu.args(["--pdeathsig", "KILL", "qemu-system-x86_64"])
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-no-reboot", "-nic", "none", "-kernel"])
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet ferry.guest={} ferry.plan={} ferry.modules={} \
             ferry.out={}",
            xtask.display(),
            plan_file.display(),
            kernel.tree.display(),
            out.display()
        ))
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=out,security_model=none",
            out.display()
        ))
        .stdin(Stdio::null());
    eprintln!("xtask: $ {}", render(&qemu));
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let boot = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if boot.elapsed() > VM_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the soft-RoCE VM ran past {} minutes and was stopped",
                VM_LIMIT.as_secs() / 60
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "xtask:   (VM: {:.1} s, {status})",
        boot.elapsed().as_secs_f64()
    );
    let verdict = std::fs::read_to_string(out.join("verdict")).unwrap_or_default();
    match verdict.lines().next() {
        Some("passed") => Ok(()),
        Some(_) => bail!("RDMA tests in the soft-RoCE VM failed:\n{verdict}"),
        None => bail!("the soft-RoCE VM ended ({status}) without a verdict; see its console above"),
    }
}

/// Debian's current kernel for the VM, fetched and unpacked once. Missing or old
/// package lists name no kernel, or one the archive no longer has: then they are
/// refreshed and the kernel looked up again, once.
fn kernel() -> Result<Kernel> {
    fetch_kernel().or_else(|first| {
        apt_update()?;
        fetch_kernel().with_context(|| format!("also before refreshing the lists: {first:#}"))
    })
}

/// The kernel the package lists name: the one unpacked before, or fetched (without
/// privilege), unpacked and indexed now, in place of any other.
fn fetch_kernel() -> Result<Kernel> {
    let package = kernel_package()?;
    let version = package
        .strip_prefix("linux-image-")
        .context("kernel package name")?
        .to_string();
    let kernels = vm_dir().join("kernel");
    let tree = kernels.join(&version);
    let kernel = Kernel {
        image: tree.join(format!("boot/vmlinuz-{version}")),
        tree: tree.clone(),
    };
    let index = tree.join(format!("lib/modules/{version}/modules.dep.bin"));
    if kernel.image.exists() && index.exists() {
        return Ok(kernel);
    }
    let download = vm_dir().join("download");
    if download.exists() {
        std::fs::remove_dir_all(&download)?;
    }
    std::fs::create_dir_all(&download)?;
    run(Command::new("apt-get")
        .args(["download", "-qq", &package])
        .current_dir(&download))?;
    let deb = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    // One kernel is kept: an older one (about 400 MB unpacked) goes.
    if kernels.exists() {
        std::fs::remove_dir_all(&kernels)?;
    }
    std::fs::create_dir_all(&tree)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    run(Command::new(DEPMOD).arg("-b").arg(&tree).arg(&version))?;
    std::fs::remove_dir_all(&download)?;
    Ok(kernel)
}

/// The package `linux-image-amd64` stands for (`linux-image-6.1.0-57-amd64`).
fn kernel_package() -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .context("running apt-cache")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .context("apt-cache names no kernel behind linux-image-amd64")
}

/// The initramfs: busybox, the modules that reach the host's files (in load order) and
/// an `init` that mounts the host's root over 9p and hands over to the guest step.
fn write_initramfs(path: &Path, modules: &Path) -> Result<()> {
    let version = modules
        .file_name()
        .context("kernel folder")?
        .to_string_lossy()
        .into_owned();
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![(
        "bin/busybox".into(),
        std::fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?,
        0o755,
    )];
    let mut order = vec![];
    for m in BOOT_MODULES {
        let out = Command::new(MODPROBE)
            .arg("-d")
            .arg(modules)
            .args(["-S", &version, "--show-depends", m])
            .output()
            .context("running modprobe --show-depends")?;
        if !out.status.success() {
            bail!(
                "modprobe cannot resolve {m}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `insmod /path/to/module.ko [options]` (or `builtin name`, which needs
            // nothing).
            let mut words = line.split_whitespace();
            if let (Some("insmod"), Some(ko)) = (words.next(), words.next()) {
                let ko = Path::new(ko);
                let name = ko.file_name().context("module path")?.to_string_lossy();
                if !order.contains(&name.to_string()) {
                    order.push(name.to_string());
                    files.push((format!("modules/{name}"), std::fs::read(ko)?, 0o644));
                }
            }
        }
    }
    let init = INIT.replace("@MODULES@", &order.join(" "));
    files.push(("init".into(), init.into_bytes(), 0o755));
    let mut cpio = vec![];
    for d in ["bin", "modules", "proc", "dev", "newroot"] {
        newc_entry(&mut cpio, d, 0o040_755, &[]);
    }
    for (name, data, mode) in &files {
        newc_entry(&mut cpio, name, 0o100_000 | mode, data);
    }
    newc_entry(&mut cpio, "TRAILER!!!", 0, &[]);
    std::fs::File::create(path)?.write_all(&cpio)?;
    Ok(())
}

/// One entry of a `newc` cpio archive (the initramfs format): header, name and data, each
/// padded to 4 bytes.
fn newc_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let ino = out.len() as u32;
    let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// The initramfs's `init` (busybox sh): load the modules, mount the host's root, hand
/// over to `ferry.guest` with the plan, the modules and the verdict folder.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
for m in @MODULES@; do insmod /modules/$m || echo "init: insmod $m failed"; done
arg() { sed -n "s/.*ferry\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
guest=$(arg guest); plan=$(arg plan); modules=$(arg modules); out=$(arg out)
halt() {
    echo "init: $1"
    echo o > /proc/sysrq-trigger
    while :; do sleep 60; done
}
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /newroot ||
    halt "cannot mount the host's root over 9p"
[ -x "/newroot$guest" ] || halt "no guest program at $guest"
umount /proc /dev
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1
exec switch_root /newroot "$guest" __rdma-vm-guest "$plan" "$modules" "$out"
"#;

/// `xtask __rdma-vm-guest PLAN MODULES OUT`: PID 1 of the VM. Sets the machine up, runs
/// the plan, writes the verdict into OUT and powers off; never returns.
pub(crate) fn guest(args: &[String]) -> Result<()> {
    let verdict = match args {
        [plan, modules, out] => {
            // PID 1 must not end, not even by a panic: catch it and report it.
            let ran =
                std::panic::catch_unwind(|| guest_run(Path::new(plan), Path::new(modules), out));
            match ran {
                Ok(Ok(failed)) if failed.is_empty() => "passed\n".to_string(),
                Ok(Ok(failed)) => format!("failed\n{}\n", failed.join("\n")),
                Ok(Err(e)) => format!("failed\nsetting up the VM: {e:#}\n"),
                Err(_) => "failed\nthe guest panicked (see the console)\n".to_string(),
            }
        }
        _ => "failed\nusage: xtask __rdma-vm-guest PLAN MODULES OUT\n".to_string(),
    };
    eprintln!("guest: {}", verdict.trim().replace('\n', ": "));
    if let Some(out) = args.get(2) {
        let _ = std::fs::write(Path::new(out).join("verdict"), &verdict);
    }
    let _ = Command::new("sync").status();
    // PID 1 must not exit: power the machine off instead.
    let _ = std::fs::write("/proc/sysrq-trigger", "o");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// The guest's work; returns what failed (empty: everything passed).
fn guest_run(plan: &Path, modules: &Path, out: &str) -> Result<Vec<String>> {
    // Read before any tmpfs can hide it.
    let plan = std::fs::read_to_string(plan)?;
    let keep: Vec<&Path> = plan
        .lines()
        .filter_map(|l| l.strip_prefix("keep\t"))
        .map(Path::new)
        .collect();
    // Every command here runs from `/`: a workspace under a folder about to get a tmpfs
    // is not there while it is being put back.
    let mount = |args: &[&str]| {
        let mut c = Command::new("mount");
        c.args(args).current_dir("/");
        run(&mut c)
    };
    mount(&["-t", "proc", "proc", "/proc"])?;
    mount(&["-t", "sysfs", "sys", "/sys"])?;
    mount(&["-t", "devtmpfs", "dev", "/dev"])?;
    for d in ["/dev/pts", "/dev/shm"] {
        std::fs::create_dir_all(d)?;
    }
    mount(&["-t", "devpts", "devpts", "/dev/pts"])?;
    mount(&["-t", "tmpfs", "shm", "/dev/shm"])?;
    // The host's root stays reachable here while tmpfs covers parts of it.
    let host = "/dev/shm/host";
    std::fs::create_dir_all(host)?;
    mount(&["--bind", "/", host])?;
    for writable in ["/tmp", "/run", "/var/tmp", "/root"] {
        mount(&["-t", "tmpfs", "tmpfs", writable])?;
        for k in keep.iter().filter(|k| k.starts_with(writable)) {
            std::fs::create_dir_all(k)?;
            let from = Path::new(host).join(k.strip_prefix("/")?);
            mount(&["--bind", &from.to_string_lossy(), &k.to_string_lossy()])?;
        }
    }
    mount(&[
        "-t",
        "9p",
        "-o",
        "trans=virtio,version=9p2000.L",
        "out",
        out,
    ])?;
    // The kernel loads modules on demand (veth, crc32 for rxe, ...) through this program.
    let loader = "/run/modprobe";
    std::fs::write(
        loader,
        format!(
            "#!/bin/sh\nexec {MODPROBE} -d {} \"$@\"\n",
            modules.display()
        ),
    )?;
    run(Command::new("chmod").args(["755", loader]))?;
    std::fs::write("/proc/sys/kernel/modprobe", loader)?;
    run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    run(Command::new(loader).arg("rdma_rxe"))?;
    let devices = SoftRoce::create()?;
    eprintln!("guest: soft-RoCE: {}", devices.describe());
    let names = SoftRoce::names();
    let mut failed = vec![];
    for line in plan.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let mut steps: Vec<Command> = vec![];
        match fields[..] {
            ["test", dir, binary] => {
                // One process per test, as nextest runs them: some tests count what the
                // whole process holds open.
                for test in list_tests(binary)? {
                    let mut c = Command::new(binary);
                    c.args(["--include-ignored", "--exact", &test])
                        .current_dir(dir);
                    steps.push(c);
                }
            }
            ["bench", ferry] => {
                for op in ["write", "read"] {
                    let mut c = Command::new(ferry);
                    c.args(["bench", "--protocol", "rdma", "--rdma-devices"])
                        .arg(SOFT_ROCE[0].2)
                        .args(["--operation", op, "--verify", "--duration", "1"])
                        .args(["--block-size", "256K", "--batch-size", "16"])
                        .args(["--buffer-size", "16M"]);
                    steps.push(c);
                }
            }
            ["keep", _] => {}
            _ => bail!("unreadable plan line `{line}`"),
        }
        for mut c in steps {
            c.env(DEVICES_VAR, &names);
            if let Err(e) = run(&mut c) {
                eprintln!("guest: {e:#}");
                failed.push(render(&c));
            }
        }
    }
    drop(devices);
    Ok(failed)
}

/// The tests a libtest binary holds, ignored ones included.
fn list_tests(binary: &str) -> Result<Vec<String>> {
    let out = Command::new(binary)
        .args(["--list", "--format", "terse", "--include-ignored"])
        .output()
        .with_context(|| format!("listing the tests of {binary}"))?;
    if !out.status.success() {
        bail!("`{binary} --list` failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_padded_headers_names_and_data() {
        let mut a = vec![];
        newc_entry(&mut a, "init", 0o100_755, b"#!/bin/sh\n");
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        // 110-byte header; the name and its NUL padded to 4 (116); the data padded (128).
        assert_eq!(a.len(), 128);
        let field = |i: usize| field_at(&a, 0, i);
        assert_eq!(field(1), 0o100_755, "mode");
        assert_eq!(field(6), 10, "file size");
        assert_eq!(field(11), 5, "name size, NUL included");
        assert_eq!(&a[110..115], b"init\0");
        assert_eq!(&a[116..126], b"#!/bin/sh\n");
        let before = a.len();
        newc_entry(&mut a, "bin", 0o040_755, &[]);
        assert_eq!(field_at(&a, before, 4), 2, "a folder has two links");
    }

    fn field_at(a: &[u8], entry: usize, i: usize) -> u32 {
        let at = entry + 6 + 8 * i;
        u32::from_str_radix(std::str::from_utf8(&a[at..at + 8]).unwrap(), 16).unwrap()
    }
}
