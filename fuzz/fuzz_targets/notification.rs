//! Notification bodies as the target parses them: sender name length (u16 LE), sender
//! name (UTF-8), message.
//!
//! Properties: parsing never panics; what parses re-encodes to the same bytes; what the
//! initiator encodes parses back to the same sender and message.
#![no_main]

use ferry_transport_tcp::fuzzing::{encode_notification, parse_notification};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((from, message)) = parse_notification(data) {
        assert!(from.len() <= usize::from(u16::MAX));
        assert_eq!(encode_notification(from, message), data);
    }
    // The input as a (sender, message) pair the initiator would send.
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (from, message) = data.split_at(split);
    let from = String::from_utf8_lossy(from);
    let body = encode_notification(&from, message);
    assert_eq!(parse_notification(&body), Some((&*from, message)));
});
