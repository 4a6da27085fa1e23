//! Helpers for the two-process tests: a `ferry target` child and a write-then-read check.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_engine::{Buffer, Engine, RemoteBuffer};
use rand::RngCore;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// A `ferry target` process, killed when dropped.
pub struct Target {
    pub child: Child,
    pub name: String,
}

impl Target {
    /// Starts `ferry target` with `args` and reads its segment name.
    pub fn start(args: &[&str]) -> Target {
        let mut child = Command::new(FERRY)
            .arg("target")
            .args(args)
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ferry target starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let name = line
            .strip_prefix("segment ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line from ferry target: {line:?}"))
            .to_string();
        Target { child, name }
    }

    /// Sends a signal (`-STOP`, `-CONT`, ...).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
        if sig == "-STOP" {
            self.wait_stopped();
        }
    }

    /// `kill` returns once the signal is queued; the target may run on for a moment on
    /// another core. Wait until every thread of it is stopped.
    fn wait_stopped(&self) {
        let tasks = format!("/proc/{}/task", self.child.id());
        let give_up = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let all_stopped = std::fs::read_dir(&tasks).unwrap().all(|t| {
                let stat =
                    std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the command name, which is in parentheses.
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next());
                matches!(state, Some("T") | Some("t"))
            });
            if all_stopped {
                return;
            }
            assert!(
                std::time::Instant::now() < give_up,
                "the target never stopped"
            );
            std::thread::yield_now();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed process cannot close its libfabric `shm` endpoint, whose file is named
        // after its pid (`/dev/shm/PID:...`); a later process given the same pid would
        // fail to open one (EBUSY). Remove what the killed target left.
        if let Ok(entries) = std::fs::read_dir("/dev/shm") {
            let prefix = format!("{pid}:");
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

pub fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

/// For each `(len, local offset, remote offset)`: WRITE random bytes from `local`, READ
/// them back into `back` one byte further on, and compare.
pub fn write_then_read(
    e: &Engine,
    local: &Buffer,
    back: &Buffer,
    remote: &RemoteBuffer,
    cases: &[(usize, usize, u64)],
) {
    for &(len, local_off, remote_off) in cases {
        let data = random(len);
        local.write_at(local_off, &data).unwrap();
        let mut b = e.batch();
        b.write(local, local_off, remote, remote_off, len).unwrap();
        b.submit().unwrap().wait(Duration::from_secs(60)).unwrap();
        let mut b = e.batch();
        b.read(back, local_off + 1, remote, remote_off, len)
            .unwrap();
        b.submit().unwrap().wait(Duration::from_secs(60)).unwrap();
        let mut got = vec![0u8; len];
        back.read_at(local_off + 1, &mut got).unwrap();
        assert!(
            got == data,
            "{len} bytes at {remote_off} did not come back intact"
        );
    }
}
