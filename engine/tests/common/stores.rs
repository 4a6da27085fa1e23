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
            ])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::null())
            .spawn()
            .expect(
                "redis-server (Debian: apt-get install redis-server; cargo xtask test installs it)",
            );
        let server = RedisServer {
            port,
            child,
            _dir: dir,
        };
        let start = Instant::now();
        while server.command(&["PING"]).as_deref() != Some("+PONG") {
            assert!(start.elapsed() < PATIENCE, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
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
