//! Metadata servers for the store tests: a real `redis-server` on a free loopback port,
//! and a small HTTP server speaking Mooncake's HTTP metadata protocol.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a server gets to come up, or an expectation to come true.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A free loopback port (bound, then let go).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `redis-server` on `port`, no persistence, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    _dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::on(free_port())
    }

    pub fn on(port: u16) -> RedisServer {
        let dir = TempDir::new("redis");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                // Key events, so tests wait for a key to come or go instead of polling.
                "--notify-keyspace-events",
                "KA",
            ])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::piped())
            .spawn()
            .expect(
                "redis-server (Debian: apt-get install redis-server; cargo xtask test installs it)",
            );
        let mut child = child;
        wait_for_line(
            child.stdout.take(),
            "Ready to accept connections",
            "redis-server",
        );
        RedisServer {
            port,
            child,
            _dir: dir,
        }
    }

    /// Waits until `key` exists (`present`) or not: on the server's key events, each
    /// followed by a look at the key, until `PATIENCE` runs out.
    pub fn wait_key(&self, key: &str, present: bool) {
        let mut sub = TcpStream::connect(("127.0.0.1", self.port)).expect("subscribe");
        let channel = format!("__keyspace@0__:{key}");
        let req = format!(
            "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{channel}\r\n",
            channel.len()
        );
        sub.write_all(req.as_bytes()).expect("subscribe");
        let mut reader = BufReader::new(sub.try_clone().expect("clone"));
        // The subscription's confirmation: 3 elements, 6 lines after the array header.
        let mut line = String::new();
        for _ in 0..7 {
            line.clear();
            reader.read_line(&mut line).expect("subscribed");
        }
        let end = Instant::now() + PATIENCE;
        while self.has(key) != present {
            let left = end
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| {
                    panic!("`{key}` present={present} not reached within {PATIENCE:?}")
                });
            sub.set_read_timeout(Some(left)).expect("timeout");
            line.clear();
            reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("waiting for `{key}`: {e}"));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One command over RESP; the reply's first line (`$-1` for a missing key), or
    /// `None` when the server does not answer.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        Some(line.trim_end().to_string())
    }

    /// Whether `key` exists.
    pub fn has(&self, key: &str) -> bool {
        self.command(&["EXISTS", key]).as_deref() == Some(":1")
    }

    /// Stops the server as a crash would.
    pub fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to `PATIENCE`) until a server's log says `ready`; the rest of the log is
/// drained in the background so the server never blocks on it.
fn wait_for_line<R: Read + Send + 'static>(log: Option<R>, ready: &str, what: &str) {
    let log = log.expect("the server's log is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = ready.to_string();
    std::thread::spawn(move || {
        let mut seen = false;
        for line in BufReader::new(log).lines() {
            let Ok(line) = line else { return };
            if !seen && line.contains(&ready) {
                seen = true;
                let _ = tx.send(());
            }
        }
    });
    assert!(
        rx.recv_timeout(PATIENCE).is_ok(),
        "{what} did not say it is ready within {PATIENCE:?}"
    );
}

/// A temporary directory, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "ferry-{what}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An HTTP server with Mooncake's metadata protocol: `GET`/`PUT`/`DELETE
/// /metadata?key=<key>`. With `refuse_overwrite`, a `PUT` to an existing key is answered
/// 400, as one of Mooncake's servers does.
pub struct HttpServer {
    pub port: u16,
    pub entries: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    /// `PUT`s answered 400.
    pub refused: Arc<Mutex<u64>>,
}

impl HttpServer {
    pub fn start(refuse_overwrite: bool) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        let entries: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let refused: Arc<Mutex<u64>> = Arc::default();
        let (e, r) = (entries.clone(), refused.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (e, r) = (e.clone(), r.clone());
                std::thread::spawn(move || serve(conn, &e, &r, refuse_overwrite));
            }
        });
        HttpServer {
            port,
            entries,
            refused,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/metadata", self.port)
    }
}

fn serve(
    conn: TcpStream,
    entries: &Mutex<HashMap<String, Vec<u8>>>,
    refused: &Mutex<u64>,
    refuse_overwrite: bool,
) {
    let mut out = conn.try_clone().expect("clone");
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let key = target
            .split_once("?key=")
            .map(|(_, k)| percent_decode(k))
            .unwrap_or_default();
        let (status, reply) = {
            let mut map = entries.lock().unwrap();
            match method {
                "GET" => match map.get(&key) {
                    Some(v) => (200, v.clone()),
                    None => (404, Vec::new()),
                },
                "PUT" if refuse_overwrite && map.contains_key(&key) => {
                    *refused.lock().unwrap() += 1;
                    (400, b"exists".to_vec())
                }
                "PUT" => {
                    map.insert(key, body);
                    (200, Vec::new())
                }
                "DELETE" => {
                    map.remove(&key);
                    (200, Vec::new())
                }
                _ => (405, Vec::new()),
            }
        };
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n",
            reply.len()
        );
        if out
            .write_all(head.as_bytes())
            .and_then(|()| out.write_all(&reply))
            .is_err()
        {
            return;
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An `etcd` member on free loopback ports with a fresh data directory, stopped when
/// dropped.
pub struct EtcdServer {
    pub port: u16,
    child: Child,
    _dir: TempDir,
}

impl EtcdServer {
    pub fn start() -> EtcdServer {
        Self::on(free_port())
    }

    pub fn on(port: u16) -> EtcdServer {
        let dir = TempDir::new("etcd");
        let peer = free_port();
        let client = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.0.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etcd (Debian: apt-get install etcd-server; cargo xtask test installs it)");
        let mut child = child;
        wait_for_line(
            child.stderr.take(),
            "ready to serve client requests",
            "etcd",
        );
        EtcdServer {
            port,
            child,
            _dir: dir,
        }
    }

    /// Waits until `key` exists (`present`) or not: on a watch of the key (etcd's
    /// streaming watch through its gateway), each event followed by a look at the key,
    /// until `PATIENCE` runs out.
    pub fn wait_key(&self, key: &str, present: bool) {
        let body = format!(
            "{{\"create_request\": {{\"key\": \"{}\"}}}}",
            base64(key.as_bytes())
        );
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("watch");
        let req = format!(
            "POST /v3/watch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("watch");
        let mut reader = BufReader::new(s.try_clone().expect("clone"));
        // Events after this line are changes after the watch began.
        let mut line = String::new();
        while !line.contains("\"created\"") {
            line.clear();
            assert!(
                reader.read_line(&mut line).expect("watch created") > 0,
                "the watch ended"
            );
        }
        let end = Instant::now() + PATIENCE;
        while self.has(key) != present {
            let left = end
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| {
                    panic!("`{key}` present={present} not reached within {PATIENCE:?}")
                });
            s.set_read_timeout(Some(left)).expect("timeout");
            line.clear();
            reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("waiting for `{key}`: {e}"));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The gateway's answer to a range request for `key` (`None`: no answer).
    fn get(&self, key: &str) -> Option<String> {
        let body = format!("{{\"key\": \"{}\"}}", base64(key.as_bytes()));
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let req = format!(
            "POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.starts_with("HTTP/1.1 200").then_some(out)
    }

    /// Whether `key` exists.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some_and(|r| r.contains("\"kvs\""))
    }

    /// Stops the member as a crash would.
    pub fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
