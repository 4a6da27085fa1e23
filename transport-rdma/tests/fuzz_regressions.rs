//! The queue-pair exchange decoder against messages shaped like real ones and against
//! inputs the `rdma_exchange` fuzz target (`fuzz/`) found: requests and answers as two
//! transports with two NICs each send them decode to themselves, byte for byte. With
//! `FERRY_WRITE_FUZZ_SEEDS=1` the realistic messages are written out as the fuzz
//! target's seed corpus (`fuzz/corpus/rdma_exchange/`).

use std::path::PathBuf;

use ferry_transport_rdma::exchange::{FlushWord, Kind, Message, QpAddr, MAX_NICS, MAX_QPS};
use rand::Rng;

/// A RoCE v2 GID: the IPv4-mapped address of the port's interface.
fn roce_gid(ip: [u8; 4]) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[10] = 0xff;
    g[11] = 0xff;
    g[12..].copy_from_slice(&ip);
    g
}

/// An InfiniBand GID: the subnet prefix, then the port's GUID.
fn ib_gid(guid: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&0xfe80_0000_0000_0000u64.to_be_bytes());
    g[8..].copy_from_slice(&guid.to_be_bytes());
    g
}

/// Queue pairs from `nics` local NICs to `peer_nics` of the peer, `per_pair` each, as a
/// side with those NICs offers them (QPNs counting from `first_qpn`).
fn qps(
    nics: u8,
    peer_nics: u8,
    per_pair: u32,
    first_qpn: u32,
    gid: impl Fn(u8) -> [u8; 16],
    lid: impl Fn(u8) -> u16,
    mtu: u8,
) -> Vec<QpAddr> {
    let mut out = Vec::new();
    let mut qpn = first_qpn;
    for nic in 0..nics {
        for peer_nic in 0..peer_nics {
            for _ in 0..per_pair {
                out.push(QpAddr {
                    nic,
                    peer_nic,
                    qpn,
                    psn: (qpn.wrapping_mul(0x9e37_79b9)) & 0xff_ffff,
                    lid: lid(nic),
                    gid: gid(nic),
                    mtu,
                    rd_atomic: 16,
                });
                qpn += 1;
            }
        }
    }
    out
}

/// Requests and answers of the kinds two transports exchange: over RoCE (two NICs each,
/// two queue pairs per pair of NICs), over InfiniBand (LIDs, 4096-byte MTU), a
/// reconnection that replaces an earlier connection, and the smallest request. Fixed
/// values, so regenerating the seeds leaves them as they are.
fn realistic() -> Vec<(&'static str, Message)> {
    let roce = |host: u8| move |nic: u8| roce_gid([10, 0, host, 1 + nic]);
    let no_lid = |_: u8| 0u16;
    let request = Message {
        kind: Kind::Request,
        connection: 0x3f2a_9c01_77d4_e815,
        replaces: 0,
        qps: qps(2, 2, 2, 0x00_0211, roce(1), no_lid, 3),
        flush: Vec::new(),
    };
    let answer = Message {
        kind: Kind::Answer,
        connection: request.connection,
        replaces: 0,
        // The target's queue pairs, one for each requested entry, in order.
        qps: request
            .qps
            .iter()
            .enumerate()
            .map(|(i, q)| QpAddr {
                nic: q.peer_nic,
                peer_nic: q.nic,
                qpn: 0x00_1a40 + i as u32,
                psn: 0x00_5eed + 97 * i as u32,
                lid: 0,
                gid: roce_gid([10, 0, 2, 1 + q.peer_nic]),
                mtu: 3,
                rd_atomic: 16,
            })
            .collect(),
        flush: vec![
            FlushWord {
                nic: 0,
                addr: 0x7f3a_b800_1000,
                rkey: 0x0012_4a07,
            },
            FlushWord {
                nic: 1,
                addr: 0x7f3a_b800_2000,
                rkey: 0x0033_1c11,
            },
        ],
    };
    let infiniband = Message {
        kind: Kind::Request,
        connection: 0x0000_0001_0000_0002,
        replaces: 0,
        qps: qps(
            2,
            1,
            4,
            0x00_0c01,
            |nic| ib_gid(0x0002_c903_00a1_b2c0 + u64::from(nic)),
            |nic| 0x0011 + u16::from(nic),
            5,
        ),
        flush: Vec::new(),
    };
    let infiniband_answer = Message {
        kind: Kind::Answer,
        connection: infiniband.connection,
        replaces: 0,
        qps: qps(
            1,
            2,
            4,
            0xff_fff0,
            |_| ib_gid(0x0002_c903_00ff_0010),
            |_| 0x0042,
            5,
        ),
        flush: vec![FlushWord {
            nic: 0,
            addr: 0x5555_5555_a000,
            rkey: 0xffff_ffff,
        }],
    };
    let reconnect = Message {
        kind: Kind::Request,
        connection: 0x3f2a_9c01_77d4_e816,
        replaces: request.connection,
        qps: qps(1, 2, 2, 0x00_0311, roce(1), no_lid, 1),
        flush: Vec::new(),
    };
    let smallest = Message {
        kind: Kind::Request,
        connection: 1,
        replaces: 0,
        qps: qps(1, 1, 1, 1, roce(3), no_lid, 2),
        flush: Vec::new(),
    };
    vec![
        ("roce-request", request),
        ("roce-answer", answer),
        ("ib-request", infiniband),
        ("ib-answer", infiniband_answer),
        ("reconnect-request", reconnect),
        ("smallest-request", smallest),
    ]
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
fn realistic_messages_round_trip_and_seed_the_fuzzer() {
    let messages = realistic();
    for (name, m) in &messages {
        let bytes = m.encode();
        assert_eq!(
            bytes.len(),
            26 + 30 * m.qps.len() + 13 * m.flush.len(),
            "{name}"
        );
        assert_eq!(Message::decode(&bytes).as_ref(), Ok(m), "{name}");
        // The length must be exact: one byte more or less is refused.
        assert!(
            Message::decode(&bytes[..bytes.len() - 1]).is_err(),
            "{name}"
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Message::decode(&longer).is_err(), "{name}");
    }
    // The request's queue pairs span both NICs on both sides.
    let request = &messages[0].1;
    assert_eq!(request.qps.len(), 8);
    for (nic, peer_nic) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        assert!(request
            .qps
            .iter()
            .any(|q| q.nic == nic && q.peer_nic == peer_nic));
    }
    if std::env::var_os("FERRY_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    let dir = seeds("rdma_exchange");
    for (name, m) in &messages {
        std::fs::write(dir.join(name), m.encode()).unwrap();
    }
}

#[test]
fn random_messages_within_the_limits_round_trip() {
    let mut rng = rand::rng();
    for _ in 0..2000 {
        let kind = if rng.random_bool(0.5) {
            Kind::Request
        } else {
            Kind::Answer
        };
        let q = if rng.random_bool(0.01) {
            MAX_QPS
        } else {
            rng.random_range(1..=32)
        };
        let f = match kind {
            Kind::Request => 0,
            Kind::Answer => rng.random_range(0..=ferry_transport_rdma::exchange::MAX_FLUSH),
        };
        let nic = |rng: &mut rand::rngs::ThreadRng| rng.random_range(0..MAX_NICS as u8);
        let m = Message {
            kind,
            connection: rng.random_range(1..=u64::MAX),
            replaces: rng.random(),
            qps: (0..q)
                .map(|_| QpAddr {
                    nic: nic(&mut rng),
                    peer_nic: nic(&mut rng),
                    qpn: rng.random_range(1..=0xff_ffff),
                    psn: rng.random_range(0..=0xff_ffff),
                    lid: rng.random(),
                    gid: rng.random(),
                    mtu: rng.random_range(1..=5),
                    rd_atomic: rng.random_range(1..=16),
                })
                .collect(),
            flush: (0..f)
                .map(|_| FlushWord {
                    nic: nic(&mut rng),
                    addr: rng.random(),
                    rkey: rng.random(),
                })
                .collect(),
        };
        let bytes = m.encode();
        assert_eq!(Message::decode(&bytes), Ok(m.clone()));
        assert_eq!(Message::decode(&bytes).unwrap().encode(), bytes);
    }
}
