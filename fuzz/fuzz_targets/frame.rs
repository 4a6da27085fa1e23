//! The TCP frame header and request descriptor decoders, as both ends of a connection
//! run them on a peer's bytes. Input: a 16-byte header, then request descriptors.
//!
//! Properties: decoding never panics; a header that decodes re-encodes to the same
//! bytes and respects its kind's count limit; a header the encoder makes from valid
//! fields decodes to those fields; descriptors round-trip.
#![no_main]

use ferry_transport_tcp::fuzzing::{
    decode_desc, decode_header, encode_desc, encode_header, DESC_LEN, HEADER_LEN, MAX_DESCRIPTOR,
    MAX_DESCS, MAX_EXCHANGE, MAX_NOTIFY,
};
use libfuzzer_sys::fuzz_target;

/// The count a data-plane or set-up kind may carry: (least, most); `None` for other
/// kinds.
fn count_limits(kind: u8) -> Option<(u32, usize)> {
    Some(match kind {
        1 | 2 | 6 | 7 => (1, MAX_DESCS),
        3 => (0, MAX_NOTIFY),
        4 | 11 => (0, 0),
        5 => (0, MAX_DESCRIPTOR),
        // Exchange, Exchanged: a protocol or status byte at least.
        12 | 13 => (1, MAX_EXCHANGE),
        _ => return None,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<HEADER_LEN>() else {
        return;
    };
    match decode_header(head) {
        Ok((kind, count, seq)) => {
            let (least, most) = count_limits(kind).unwrap_or((0, MAX_DESCRIPTOR));
            assert!(
                count >= least && count as usize <= most,
                "kind {kind} accepted with count {count}"
            );
            assert_eq!(
                encode_header(kind, count, seq).as_ref(),
                Some(head),
                "a decoded header does not re-encode to its bytes"
            );
        }
        Err(message) => assert!(!message.is_empty()),
    }
    // decode(encode(x)) == x for the fields the input names, whenever they are valid.
    let (kind, count) = (
        head[3],
        u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
    );
    let seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    match (encode_header(kind, count, seq), count_limits(kind)) {
        (Some(bytes), Some((least, most))) => {
            let valid = count >= least && count as usize <= most;
            assert_eq!(
                decode_header(&bytes).ok(),
                valid.then_some((kind, count, seq))
            );
        }
        // A kind this target does not know the limits of: it decodes to itself or not at
        // all.
        (Some(bytes), None) => {
            if let Ok(h) = decode_header(&bytes) {
                assert_eq!(h, (kind, count, seq));
            }
        }
        (None, None) => {}
        (None, Some(_)) => panic!("the encoder refuses kind {kind}"),
    }
    for chunk in rest.chunks_exact(DESC_LEN) {
        let chunk: &[u8; DESC_LEN] = chunk.try_into().expect("exact chunk");
        let (addr, len, key) = decode_desc(chunk);
        assert_eq!(&encode_desc(addr, len, key), chunk);
    }
});
