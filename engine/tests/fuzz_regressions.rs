//! Segment descriptors as peers receive them, and inputs the fuzz targets (`fuzz/`)
//! found. A real engine's descriptor, fetched over its port as a peer fetches it,
//! decodes to what the engine publishes and passes the check a peer runs; with
//! `FERRY_WRITE_FUZZ_SEEDS=1` those documents are written out as the `descriptor` fuzz
//! target's seed corpus (`fuzz/corpus/descriptor/`).

mod common;

use std::path::PathBuf;

use common::{engine, WAIT};
use ferry_engine::{Access, Location, Protocol, SegmentDescriptor};
use ferry_transport_api::{Endpoint, TransportKey};

/// The descriptor body a peer receives from `engine`'s port.
fn fetched(name: &str) -> Vec<u8> {
    ferry_transport_tcp::fetch_descriptor(name, WAIT).expect("descriptor over the port")
}

#[test]
fn engine_descriptors_decode_validate_and_seed_the_fuzzer() {
    let e = engine();
    let mut documents = vec![fetched(&e.name())];
    let mut buffers = Vec::new();
    for (len, access, name) in [
        (4096, Access::RemoteReadWrite, "kv-cache"),
        (1 << 20, Access::RemoteRead, ""),
        (1, Access::RemoteReadWrite, "tiny \"quoted\" \u{e9}"),
    ] {
        buffers.push(
            e.allocate_with(len, Location::host(), access, name)
                .expect("host buffer"),
        );
        documents.push(fetched(&e.name()));
    }
    for (i, body) in documents.iter().enumerate() {
        let d: SegmentDescriptor = serde_json::from_slice(body).expect("a descriptor");
        d.validate()
            .expect("an engine's own descriptor passes the peer check");
        assert_eq!(
            d.buffers.len(),
            i,
            "buffers published after {i} allocations"
        );
        let back = serde_json::to_vec(&d).unwrap();
        assert_eq!(
            serde_json::from_slice::<SegmentDescriptor>(&back).unwrap(),
            d
        );
    }
    let last: SegmentDescriptor = serde_json::from_slice(documents.last().unwrap()).unwrap();
    assert_eq!(last, e.descriptor());
    for (b, d) in buffers.iter().zip(&last.buffers) {
        assert_eq!((d.addr, d.len), (b.addr(), b.len() as u64));
    }
    // What an engine with EFA rails and device memory publishes, from the same encoder.
    let mut rails = last.clone();
    rails.endpoints.push(Endpoint {
        protocol: Protocol::Efa,
        address: "fe80000000000000020000fffe000001".into(),
    });
    rails.buffers[0].location = Location::Cuda { device: 3 };
    rails.buffers[0]
        .keys
        .extend((1..=4).map(|key| TransportKey {
            protocol: Protocol::Efa,
            key,
        }));
    rails.validate().expect("rails and device memory are valid");
    documents.push(serde_json::to_vec(&rails).unwrap());
    if std::env::var_os("FERRY_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/descriptor");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, body) in documents.iter().enumerate() {
        std::fs::write(dir.join(format!("engine-{i}")), body).unwrap();
    }
}
