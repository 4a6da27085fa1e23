//! The wire decoders against real traffic and against inputs the fuzz targets (`fuzz/`)
//! found: the traffic of a real initiator and target, recorded through a loopback proxy,
//! decodes frame by frame and re-encodes to the same bytes. With `FERRY_WRITE_FUZZ_SEEDS=1`
//! the recording is also written out as the fuzz targets' seed corpora
//! (`fuzz/corpus/<target>/`).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use ferry_transport_api::{
    Access, CompletionToken, Completions, Connection, ControlPlane, Endpoint, FailReason, Location,
    NoExchange, Opcode, Protocol, RegionMemory, RemoteKeys, Slice, Transport, TransportContext,
};
use ferry_transport_tcp::fuzzing::{
    decode_desc, decode_header, encode_desc, encode_header, encode_notification,
    parse_notification, DESC_LEN, HEADER_LEN,
};
use ferry_transport_tcp::{SharedSecret, TcpConfig, TcpTransport};
use rand::RngCore;

const WAIT: Duration = Duration::from_secs(20);
const WRITE: u8 = 1;
const READ: u8 = 2;
const NOTIFY: u8 = 3;
const READ_DATA: u8 = 7;
const HELLO: u8 = 8;
const CHALLENGE: u8 = 9;
const PROOF: u8 = 10;
const EXCHANGE: u8 = 12;
const EXCHANGED: u8 = 13;

fn host(len: usize) -> Arc<RegionMemory> {
    let mut bytes = vec![0u8; len].into_boxed_slice();
    rand::rng().fill_bytes(&mut bytes);
    let ptr = NonNull::new(bytes.as_mut_ptr()).unwrap();
    // SAFETY: the boxed slice moves into the region as its owner.
    Arc::new(unsafe { RegionMemory::from_raw(ptr, len, Location::host(), Box::new(bytes)) })
}

struct Channel(crossbeam_channel::Sender<(CompletionToken, Result<usize, FailReason>)>);

impl Completions for Channel {
    fn complete(&self, token: CompletionToken, result: Result<usize, FailReason>) {
        let _ = self.0.send((token, result));
    }
}

/// Answers descriptor requests with a fixed document and accepts every notification.
struct Control;

const DESCRIPTOR: &[u8] = br#"{"name":"127.0.0.1:1","incarnation":9,"endpoints":[{"protocol":"tcp","address":"127.0.0.1:1"}],"buffers":[]}"#;

impl ControlPlane for Control {
    fn descriptor(&self) -> Vec<u8> {
        DESCRIPTOR.to_vec()
    }
    fn notification(&self, _from: &str, _body: &[u8]) -> bool {
        true
    }
}

type Done = Receiver<(CompletionToken, Result<usize, FailReason>)>;

fn started(config: TcpConfig) -> (TcpTransport, String, Done) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let t = TcpTransport::new(config);
    let ep = t
        .start(TransportContext {
            completions: Arc::new(Channel(tx)),
            control: Some(Arc::new(Control)),
            staging: None,
        })
        .unwrap();
    (t, ep.address, rx)
}

/// One proxied connection: what the client sent and what the server answered.
#[derive(Default)]
struct Recorded {
    to_target: Vec<u8>,
    to_client: Vec<u8>,
}

/// Every connection a proxy passed on, in the order they came.
type Recordings = Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>>;

/// A loopback proxy to `target` that records every connection's bytes both ways.
fn recording_proxy(target: String) -> (String, Recordings) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let all: Recordings = Arc::default();
    let conns = all.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&target) else {
                return;
            };
            let rec = Arc::new(Mutex::new(Recorded::default()));
            conns.lock().unwrap().push(rec.clone());
            let pump = |mut from: TcpStream, mut to: TcpStream, to_target: bool| {
                let rec = rec.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        // Recorded before it is passed on: whatever an end has seen is
                        // in the recording.
                        {
                            let mut r = rec.lock().unwrap();
                            let side = if to_target {
                                &mut r.to_target
                            } else {
                                &mut r.to_client
                            };
                            side.extend_from_slice(&buf[..n]);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                })
            };
            pump(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                true,
            );
            pump(server, client, false);
        }
    });
    (addr, all)
}

/// Copies of the first `n` connections a proxy recorded, once it has seen them all.
fn recordings(all: &Recordings, n: usize) -> Vec<Recorded> {
    let deadline = Instant::now() + WAIT;
    loop {
        {
            let all = all.lock().unwrap();
            let ready = all.len() >= n
                && all.iter().all(|c| {
                    let c = c.lock().unwrap();
                    !c.to_target.is_empty() && !c.to_client.is_empty()
                });
            if ready {
                return all
                    .iter()
                    .take(n)
                    .map(|c| {
                        let c = c.lock().unwrap();
                        Recorded {
                            to_target: c.to_target.clone(),
                            to_client: c.to_client.clone(),
                        }
                    })
                    .collect();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the proxy saw too little traffic"
        );
        std::thread::yield_now();
    }
}

fn token(task: u32) -> CompletionToken {
    CompletionToken {
        slot: 0,
        generation: 0,
        task,
    }
}

/// Posts `requests` (op, local offset, remote address, key, length) as one submission and
/// waits for every completion; returns them in task order.
fn submit(
    conn: &dyn Connection,
    done: &Done,
    local: &Arc<RegionMemory>,
    remote_base: u64,
    requests: &[(Opcode, usize, u64, u64, usize)],
) -> Vec<Result<usize, FailReason>> {
    for (i, &(op, local_offset, remote_addr, key, len)) in requests.iter().enumerate() {
        conn.post(Slice {
            op,
            local: local.clone(),
            local_offset,
            remote_addr,
            remote_base,
            remote_keys: RemoteKeys::single(key),
            len,
            token: token(i as u32),
            deadline: Instant::now() + WAIT,
        })
        .unwrap();
    }
    conn.flush();
    let mut results = vec![None; requests.len()];
    for _ in requests {
        let (t, r) = done.recv_timeout(WAIT).expect("a completion");
        results[t.task as usize] = Some(r);
    }
    results.into_iter().map(Option::unwrap).collect()
}

/// Where each frame of a recorded stream ends: (kind, header and descriptors or body,
/// end of the frame). Payloads of WRITEs follow their descriptors; the data of a READ
/// answer follows its statuses, as long as the accepted requests of `reads` (the
/// lengths of each READ frame's requests, in order) say.
fn frames(stream: &[u8], mut reads: Vec<Vec<u64>>) -> Vec<(u8, Vec<u8>, usize)> {
    reads.reverse();
    let mut out = Vec::new();
    let mut p = 0;
    while p < stream.len() {
        let head: [u8; HEADER_LEN] = stream[p..p + HEADER_LEN].try_into().unwrap();
        let (kind, count, seq) = decode_header(&head).expect("recorded header decodes");
        assert_eq!(encode_header(kind, count, seq), Some(head));
        let start = p;
        p += HEADER_LEN;
        let body_len = match kind {
            WRITE | READ => count as usize * DESC_LEN,
            _ => count as usize,
        };
        let body = &stream[p..p + body_len];
        p += body_len;
        match kind {
            WRITE => {
                for d in body.chunks_exact(DESC_LEN) {
                    p += decode_desc(d.try_into().unwrap()).1 as usize;
                }
            }
            READ_DATA => {
                let lens = reads.pop().expect("READ data answers a READ");
                assert_eq!(lens.len(), body.len());
                for (len, status) in lens.iter().zip(body) {
                    if *status == 0 {
                        p += *len as usize;
                    }
                }
            }
            _ => {}
        }
        out.push((
            kind,
            stream[start..start + HEADER_LEN + body_len].to_vec(),
            p,
        ));
    }
    assert_eq!(p, stream.len(), "the recording ends mid-frame");
    out
}

/// The request lengths of every READ frame in a stream sent to a target.
fn read_lengths(stream: &[u8]) -> Vec<Vec<u64>> {
    frames(stream, Vec::new())
        .into_iter()
        .filter(|(kind, ..)| *kind == READ)
        .map(|(_, frame, _)| {
            frame[HEADER_LEN..]
                .chunks_exact(DESC_LEN)
                .map(|d| decode_desc(d.try_into().unwrap()).1)
                .collect()
        })
        .collect()
}

/// The fuzz crate's seed directory for `target`.
fn seeds(target: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn real_traffic_decodes_frame_by_frame_and_seeds_the_fuzzers() {
    let (target, target_addr, _) = started(TcpConfig::default());
    let (initiator, _, done) = started(TcpConfig::default());
    let rw = host(4096);
    let ro = host(4096);
    let rw_key = target.register(&rw, Access::RemoteReadWrite).unwrap()[0];
    let ro_key = target.register(&ro, Access::RemoteRead).unwrap()[0];
    let (proxy, recorded) = recording_proxy(target_addr);
    let conn = initiator
        .connect(
            &Endpoint {
                protocol: Protocol::Tcp,
                address: proxy.clone(),
            },
            &NoExchange,
        )
        .unwrap();
    let local = host(3 * 4096);
    let (w, r) = (Opcode::Write, Opcode::Read);
    let (a, b) = (rw.addr(), ro.addr());
    // Accepted writes and reads, alone and several to a frame.
    let ok = submit(&*conn, &done, &local, a, &[(w, 0, a + 16, rw_key, 100)]);
    assert_eq!(ok, [Ok(100)]);
    let ok = submit(
        &*conn,
        &done,
        &local,
        a,
        &[(w, 7, a, rw_key, 33), (w, 50, a + 4000, rw_key, 96)],
    );
    assert_eq!(ok, [Ok(33), Ok(96)]);
    let ok = submit(
        &*conn,
        &done,
        &local,
        b,
        &[(r, 4096, b + 1, ro_key, 64), (r, 8192, b + 200, ro_key, 8)],
    );
    assert_eq!(ok, [Ok(64), Ok(8)]);
    let ok = submit(&*conn, &done, &local, a, &[(r, 100, a, rw_key, 4096)]);
    assert_eq!(ok, [Ok(4096)]);
    // Refused ones: wrong key, out of bounds, read-only, unregistered.
    let refused = submit(
        &*conn,
        &done,
        &local,
        a,
        &[
            (w, 0, a, rw_key ^ 1, 8),
            (w, 0, a + 4090, rw_key, 16),
            (w, 0, b, ro_key, 8),
            (r, 0, a + 4096 * 64, rw_key, 8),
        ],
    );
    assert!(refused.iter().all(|r| r.is_err()), "{refused:?}");
    conn.flush();
    let tcp = initiator.connect_tcp(&proxy).unwrap();
    tcp.notify("127.0.0.1:7000", b"blocks 3..9 ready", WAIT)
        .unwrap();
    tcp.notify("", b"", WAIT).unwrap();
    let descriptor = ferry_transport_tcp::fetch_descriptor(&proxy, WAIT).unwrap();
    assert_eq!(descriptor, DESCRIPTOR);
    initiator.shutdown();
    let recorded = recordings(&recorded, 2);
    target.shutdown();

    let mut frame_seeds: Vec<(String, Vec<u8>)> = Vec::new();
    let mut notify_seeds = Vec::new();
    let mut stream_seeds: Vec<(String, Vec<u8>)> = Vec::new();
    let mut kinds_seen = Vec::new();
    for (c, rec) in recorded.iter().enumerate() {
        let requests = frames(&rec.to_target, Vec::new());
        let answers = frames(&rec.to_client, read_lengths(&rec.to_target));
        for (dir, list) in [("req", &requests), ("ans", &answers)] {
            for (i, (kind, frame, _)) in list.iter().enumerate() {
                kinds_seen.push(*kind);
                let seed = frame[..frame.len().min(HEADER_LEN + 4 * DESC_LEN)].to_vec();
                frame_seeds.push((format!("{dir}-{c}-{i}-kind{kind}"), seed));
                if *kind == NOTIFY {
                    let body = &frame[HEADER_LEN..];
                    let (from, message) = parse_notification(body).expect("recorded body");
                    assert_eq!(encode_notification(from, message), body);
                    notify_seeds.push(body.to_vec());
                }
            }
        }
        // The requests as the target_stream harness takes them: addresses as offsets
        // into its arena (RW at 4096, RO at 8192), keys 0 and 1 for RW's and RO's,
        // sequence numbers relative to the next one due (0: the initiator keeps in step).
        let mut start = 0;
        let mut conn_seed = Vec::new();
        for (kind, frame, end) in &requests {
            let mut rel = frame.clone();
            if *kind != 4 {
                rel[8..16].fill(0);
            }
            if *kind == WRITE || *kind == READ {
                for d in rel[HEADER_LEN..].chunks_exact_mut(DESC_LEN) {
                    let (addr, len, key) = decode_desc(&(&*d).try_into().unwrap());
                    let (base, at, k) = if addr >= b && addr < b + 4096 {
                        (b, 8192, if key == ro_key { 1 } else { key })
                    } else {
                        (a, 4096, if key == rw_key { 0 } else { key })
                    };
                    d.copy_from_slice(&encode_desc(addr.wrapping_sub(base) + at, len, k));
                }
            }
            // Payloads (WRITE) follow the descriptors unchanged.
            rel.extend_from_slice(&rec.to_target[start + frame.len()..*end]);
            conn_seed.extend_from_slice(&rel);
            stream_seeds.push((
                format!("connection-{c}-frame-{}-kind{kind}", stream_seeds.len()),
                rel,
            ));
            start = *end;
        }
        stream_seeds.push((format!("connection-{c}"), conn_seed));
    }
    // The lane's answers to each submission above, as the initiator_stream target takes
    // them: the requests (READ or WRITE, length), then the target's frames, with sequence
    // numbers counted from the submission's first request as on a fresh lane.
    let submissions: [&[(Opcode, usize)]; 5] = [
        &[(w, 100)],
        &[(w, 33), (w, 96)],
        &[(r, 64), (r, 8)],
        &[(r, 4096)],
        &[(w, 8), (w, 16), (w, 8), (r, 8)],
    ];
    let lane = &recorded[0];
    let mut answers = frames(&lane.to_client, read_lengths(&lane.to_target)).into_iter();
    let (mut at, mut base) = (0, 0u64);
    let mut initiator_seeds = Vec::new();
    for requests in submissions {
        let mut seed = vec![requests.len() as u8 - 1];
        for &(op, len) in requests {
            seed.push(u8::from(op == Opcode::Read));
            seed.extend_from_slice(&(len as u16 - 1).to_le_bytes());
        }
        let mut covered = 0;
        while covered < requests.len() {
            let (kind, head, end) = answers.next().expect("an answer for every request");
            assert!(kind == 6 || kind == READ_DATA, "answer of kind {kind}");
            let (_, count, seq) = decode_header(&head[..HEADER_LEN].try_into().unwrap()).unwrap();
            let mut frame = lane.to_client[at..end].to_vec();
            frame[8..16].copy_from_slice(&(seq - base).to_le_bytes());
            seed.extend_from_slice(&frame);
            covered += count as usize;
            at = end;
        }
        assert_eq!(
            covered,
            requests.len(),
            "answers cover their submission exactly"
        );
        base += requests.len() as u64;
        initiator_seeds.push(seed);
    }
    for kind in [WRITE, READ, NOTIFY, 4, 5, 6, 7] {
        assert!(
            kinds_seen.contains(&kind),
            "no frame of kind {kind} recorded"
        );
    }
    if std::env::var_os("FERRY_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    let write = |target: &str, name: &str, bytes: &[u8]| {
        std::fs::write(seeds(target).join(name), bytes).unwrap();
    };
    for (name, seed) in &frame_seeds {
        write("frame", name, seed);
    }
    for (i, body) in notify_seeds.iter().enumerate() {
        write("notification", &format!("recorded-{i}"), body);
    }
    for (name, stream) in &stream_seeds {
        write("target_stream", name, stream);
    }
    for (i, seed) in initiator_seeds.iter().enumerate() {
        write("initiator_stream", &format!("submission-{i}"), seed);
    }
    // The reply to the descriptor request, as the descriptor_reply target takes it (a
    // leading 0: the client holds no secret).
    let mut reply = vec![0u8];
    reply.extend_from_slice(&recorded[1].to_client);
    write("descriptor_reply", "plain", &reply);
    // The request validation's input is unstructured; the recorded descriptors give it
    // realistic lengths and offsets to start from.
    for (i, (_, seed)) in frame_seeds.iter().enumerate().take(4) {
        write("regions", &format!("recorded-{i}"), seed);
    }
}

#[test]
fn authenticated_traffic_decodes_and_seeds_the_fuzzers() {
    let secret = SharedSecret::new("a secret both ends share, 32 bytes");
    let config = TcpConfig {
        secret: Some(secret.clone()),
        ..TcpConfig::default()
    };
    let (target, target_addr, _) = started(config.clone());
    let (initiator, _, done) = started(config);
    let rw = host(4096);
    let rw_key = target.register(&rw, Access::RemoteReadWrite).unwrap()[0];
    let (proxy, recorded) = recording_proxy(target_addr);
    let conn = initiator
        .connect(
            &Endpoint {
                protocol: Protocol::Tcp,
                address: proxy.clone(),
            },
            &NoExchange,
        )
        .unwrap();
    let local = host(4096);
    let a = rw.addr();
    let ok = submit(
        &*conn,
        &done,
        &local,
        a,
        &[(Opcode::Write, 0, a + 8, rw_key, 64)],
    );
    assert_eq!(ok, [Ok(64)]);
    let descriptor =
        ferry_transport_tcp::fetch_descriptor_with(&proxy, WAIT, Some(&secret)).unwrap();
    assert_eq!(descriptor, DESCRIPTOR);
    let recorded = recordings(&recorded, 2);
    initiator.shutdown();
    target.shutdown();
    for rec in &recorded {
        // hello (nonce), proof; challenge (nonce, proof); then the data-plane frames.
        let requests = frames(&rec.to_target, Vec::new());
        let answers = frames(&rec.to_client, read_lengths(&rec.to_target));
        let kinds = |f: &[(u8, Vec<u8>, usize)]| f.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(kinds(&requests)[..2], [HELLO, PROOF]);
        assert_eq!(kinds(&answers)[0], CHALLENGE);
        assert_eq!(requests[0].1.len(), HEADER_LEN + 32);
        assert_eq!(answers[0].1.len(), HEADER_LEN + 64);
    }
    if std::env::var_os("FERRY_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    let write = |target: &str, name: &str, bytes: &[u8]| {
        std::fs::write(seeds(target).join(name), bytes).unwrap();
    };
    // Replayed to a target with the same secret, each is an old proof for a new nonce.
    for (i, rec) in recorded.iter().enumerate() {
        let s = &rec.to_target;
        write("target_auth", &format!("replay-{i}"), s);
        write(
            "target_auth",
            &format!("replay-{i}-hello"),
            &s[..HEADER_LEN + 32],
        );
        write(
            "target_auth",
            &format!("replay-{i}-hello-proof"),
            &s[..2 * (HEADER_LEN + 32)],
        );
    }
    // What a client with a secret reads: challenge, then the descriptor (leading 1).
    let mut reply = vec![1u8];
    reply.extend_from_slice(&recorded[1].to_client);
    write("descriptor_reply", "with-secret", &reply);
}

/// Answers RDMA set-up messages (with a queue-pair answer of its own making) and refuses
/// every other protocol, as an engine with an RDMA transport does.
struct Exchanging;

impl ControlPlane for Exchanging {
    fn descriptor(&self) -> Vec<u8> {
        DESCRIPTOR.to_vec()
    }
    fn notification(&self, _from: &str, _body: &[u8]) -> bool {
        true
    }
    fn exchange(&self, protocol: Protocol, body: &[u8]) -> Result<Vec<u8>, String> {
        match protocol {
            // The request's header turned into an answer's, then queue pairs of its own.
            Protocol::Rdma if body.len() >= 26 => {
                let mut answer = body.to_vec();
                answer[5] = 2;
                answer[26..].iter_mut().for_each(|b| *b ^= 0x5a);
                Ok(answer)
            }
            Protocol::Rdma => Err("malformed queue-pair exchange: too short".into()),
            other => Err(format!("this engine has no {other} transport")),
        }
    }
}

/// A queue-pair request as the RDMA transport's exchange format lays it out (magic,
/// version, kind 1, two queue pairs, no flush words, a connection id, nothing replaced,
/// then each queue pair: NIC, peer NIC, QPN, PSN, LID, GID, MTU code, pad).
fn queue_pair_request() -> Vec<u8> {
    let mut b = b"FYQP\x01\x01".to_vec();
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&0x7e57_c0de_0000_0001u64.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    for (nic, qpn) in [(0u8, 0x00_0123u32), (1, 0x00_0456)] {
        b.extend_from_slice(&[nic, nic]);
        b.extend_from_slice(&qpn.to_le_bytes());
        b.extend_from_slice(&0x00ab_cdefu32.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        // A RoCE v2 GID: the IPv4-mapped address of the port's interface.
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1 + nic]);
        b.extend_from_slice(&[5, 0]);
    }
    b
}

#[test]
fn exchange_traffic_decodes_and_seeds_the_fuzzers() {
    let (tx, _done) = crossbeam_channel::unbounded();
    let target = TcpTransport::new(TcpConfig::default());
    let ep = target
        .start(TransportContext {
            completions: Arc::new(Channel(tx)),
            control: Some(Arc::new(Exchanging)),
            staging: None,
        })
        .unwrap();
    let (proxy, recorded) = recording_proxy(ep.address);
    let request = queue_pair_request();
    // An answered exchange, and a refused one: each on a connection of its own.
    let answer =
        ferry_transport_tcp::exchange_with(&proxy, Protocol::Rdma, &request, WAIT, None).unwrap();
    assert_eq!(answer.len(), request.len());
    assert_eq!(answer[5], 2);
    let err = ferry_transport_tcp::exchange_with(&proxy, Protocol::Efa, b"endpoint", WAIT, None)
        .unwrap_err();
    assert!(err.to_string().contains("no efa transport"), "{err}");
    // A connection that goes on after its exchanges: a descriptor request, a protocol
    // byte the target does not know, and a short RDMA message it refuses.
    let mut s = TcpStream::connect(&proxy).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let frame = |protocol: u8, body: &[u8]| {
        let mut f = encode_header(EXCHANGE, body.len() as u32 + 1, 0)
            .unwrap()
            .to_vec();
        f.push(protocol);
        f.extend_from_slice(body);
        f
    };
    let mut stream = frame(1, &request);
    stream.extend_from_slice(&encode_header(4, 0, 0).unwrap());
    stream.extend(frame(9, b"unknown"));
    stream.extend(frame(1, b"FYQP"));
    s.write_all(&stream).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut answers = Vec::new();
    s.read_to_end(&mut answers).unwrap();
    let recorded = recordings(&recorded, 3);
    target.shutdown();

    let mut frame_seeds = Vec::new();
    let mut stream_seeds = Vec::new();
    for (c, rec) in recorded.iter().enumerate() {
        let requests = frames(&rec.to_target, Vec::new());
        let answers = frames(&rec.to_client, Vec::new());
        for (dir, list) in [("req", &requests), ("ans", &answers)] {
            // The descriptor request and answer are seeds already (above).
            for (i, (kind, frame, _)) in list.iter().enumerate() {
                if *kind == EXCHANGE || *kind == EXCHANGED {
                    let seed = frame[..frame.len().min(HEADER_LEN + 4 * DESC_LEN)].to_vec();
                    frame_seeds.push((format!("{dir}-exchange-{c}-{i}-kind{kind}"), seed));
                }
            }
        }
        let kinds = |f: &[(u8, Vec<u8>, usize)]| f.iter().map(|x| x.0).collect::<Vec<_>>();
        // Every exchange is answered, in order, and the descriptor request between them.
        let want: &[u8] = if c == 2 {
            &[EXCHANGED, 5, EXCHANGED, EXCHANGED]
        } else {
            &[EXCHANGED]
        };
        assert_eq!(kinds(&answers), want, "connection {c}");
        let statuses: Vec<u8> = answers
            .iter()
            .filter(|a| a.0 == EXCHANGED)
            .map(|a| a.1[HEADER_LEN])
            .collect();
        let want: &[u8] = match c {
            0 => &[0],
            1 => &[1],
            _ => &[0, 1, 1],
        };
        assert_eq!(statuses, want, "connection {c}");
        assert!(requests.iter().all(|r| r.0 == EXCHANGE || r.0 == 4));
        stream_seeds.push((format!("exchange-{c}"), rec.to_target.clone()));
    }
    assert_eq!(answers, recorded[2].to_client);
    if std::env::var_os("FERRY_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    let write = |target: &str, name: &str, bytes: &[u8]| {
        std::fs::write(seeds(target).join(name), bytes).unwrap();
    };
    for (name, seed) in &frame_seeds {
        write("frame", name, seed);
    }
    // Sequence numbers are 0 already (an exchange carries none), addresses and keys are
    // none: the requests are the target_stream target's input as they are.
    for (name, stream) in &stream_seeds {
        write("target_stream", name, stream);
    }
    // The replies as the descriptor_reply target takes them (2: an exchange, no secret).
    for (name, rec) in [
        ("exchange-answered", &recorded[0]),
        ("exchange-refused", &recorded[1]),
    ] {
        let mut reply = vec![2u8];
        reply.extend_from_slice(&rec.to_client);
        write("descriptor_reply", name, &reply);
    }
}
