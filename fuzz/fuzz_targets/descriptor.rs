//! Segment descriptors as an engine decodes a peer's answer to a descriptor request
//! (JSON), and the look-ups the engine then makes on them.
//!
//! Properties: decoding never panics; a descriptor that decodes survives an encode and
//! decode unchanged; every look-up on it answers without panicking; and the check an
//! engine runs before it uses a peer's descriptor (`SegmentDescriptor::validate`)
//! accepts only what its contract allows: ranges that fit in 64 bits (so no offset into
//! a buffer wraps), one endpoint per protocol and a TCP one, concrete locations, keys
//! only for protocols with an endpoint, at most one TCP key and a bounded number of
//! rails per buffer.
#![no_main]

use ferry_transport_api::{Location, Protocol, SegmentDescriptor};
use ferry_transport_tcp::fuzzing::MAX_DESCRIPTOR;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_DESCRIPTOR.min(SegmentDescriptor::MAX_ENCODED_LEN) {
        return;
    }
    let Ok(d) = serde_json::from_slice::<SegmentDescriptor>(data) else {
        return;
    };
    let text = serde_json::to_vec(&d).expect("a decoded descriptor encodes");
    let back: SegmentDescriptor =
        serde_json::from_slice(&text).expect("an encoded descriptor decodes");
    assert_eq!(back, d);
    for p in Protocol::ALL {
        if let Some(e) = d.endpoint(p) {
            assert_eq!(e.protocol, p);
        }
        for b in &d.buffers {
            match (b.key(p), b.keys_of(p)) {
                (None, None) => {}
                (Some(k), Some(keys)) => {
                    assert_eq!(keys.first(), k);
                    assert!(keys.rails() >= 1 && keys.rail(keys.rails()).is_none());
                }
                (k, keys) => panic!("key {k:?} but rail keys {keys:?}"),
            }
            let _ = b.location.is_host();
            let _ = (b.access.remote_read(), b.access.remote_write());
        }
    }
    if d.validate().is_err() {
        return;
    }
    for (i, e) in d.endpoints.iter().enumerate() {
        assert!(
            !d.endpoints[..i].iter().any(|o| o.protocol == e.protocol),
            "accepted two {} endpoints",
            e.protocol
        );
    }
    assert!(d.endpoint(Protocol::Tcp).is_some(), "accepted without TCP");
    for b in &d.buffers {
        let end = b.addr.checked_add(b.len);
        assert!(end.is_some(), "accepted {:#x}+{} that wraps", b.addr, b.len);
        // What a request computes from the buffer: any offset within it.
        let _ = b.addr + b.len / 2;
        assert!(b.location != Location::Auto, "accepted location auto");
        for p in Protocol::ALL {
            let rails = b.keys.iter().filter(|k| k.protocol == p).count();
            if rails > 0 {
                assert!(d.endpoint(p).is_some(), "{p} keys without a {p} endpoint");
            }
            let most = if p == Protocol::Tcp {
                1
            } else {
                SegmentDescriptor::MAX_RAILS
            };
            assert!(rails <= most, "accepted {rails} {p} keys");
        }
    }
});
