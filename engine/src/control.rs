//! What this engine tells the world about itself: its own segment (name, endpoints,
//! published buffers, kept encoded for the port and the metadata store) and the queue of
//! notifications peers send it. Served by the handshake port as its [`ControlPlane`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use crossbeam_channel::{Receiver, Sender};
use ferry_transport_api::{
    BufferDescriptor, ControlPlane, Endpoint, Protocol, SegmentDescriptor, Transport,
};
use parking_lot::{Mutex, RwLock};

use crate::{Error, Result};

/// Notifications queued for the application before new ones are refused as busy.
const NOTIFY_QUEUE: usize = 65536;
/// Bytes of notifications queued for the application, by default, before new ones are
/// refused as busy (an application that never reads them holds at most this much).
pub(crate) const NOTIFY_QUEUE_BYTES: usize = 64 << 20;
/// What a queued notification costs besides its sender's name and its message.
const NOTIFY_OVERHEAD: usize = 64;

/// A small message from a peer (e.g. "KV blocks 12..40 are written").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The sender's segment name, as the sender declares it (not authenticated).
    pub from: String,
    /// The message.
    pub message: Vec<u8>,
}

impl Notification {
    fn cost(&self) -> usize {
        self.from.len() + self.message.len() + NOTIFY_OVERHEAD
    }
}

struct Published {
    descriptor: BufferDescriptor,
    /// The buffer's part of the encoded descriptor.
    encoded: Box<[u8]>,
}

/// The published buffers, in registration order, with the encoded size (the cap).
#[derive(Default)]
struct PublishedSet {
    by_id: BTreeMap<u64, Published>,
    next_id: u64,
    /// Bytes the buffers take in the encoded descriptor, separators included.
    encoded_len: usize,
}

/// This engine's own segment as peers see it: what the port serves and what a metadata
/// store publishes.
pub(crate) struct OwnSegment {
    name: RwLock<String>,
    incarnation: u64,
    endpoints: RwLock<Vec<Endpoint>>,
    published: RwLock<PublishedSet>,
    /// The encoded descriptor, made again only after the published set changed (a
    /// descriptor request costs a copy, not a serialisation of every buffer). Locked
    /// after `published`, never before.
    encoded: Mutex<Option<Arc<[u8]>>>,
}

impl OwnSegment {
    fn new() -> Self {
        OwnSegment {
            name: RwLock::new(String::new()),
            incarnation: rand::random(),
            endpoints: RwLock::new(Vec::new()),
            published: RwLock::new(PublishedSet::default()),
            encoded: Mutex::new(None),
        }
    }

    /// The segment's name (set once the engine's port is bound).
    pub(crate) fn name(&self) -> String {
        self.name.read().clone()
    }

    /// This start of the engine, as its descriptor carries it.
    pub(crate) fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Names the segment and lists where peers reach it.
    pub(crate) fn set_identity(&self, name: String, endpoints: Vec<Endpoint>) {
        *self.name.write() = name;
        *self.endpoints.write() = endpoints;
        // The port serves descriptors from the moment TCP starts: one asked for before the
        // name and endpoints were known must not stay cached.
        *self.encoded.lock() = None;
    }

    /// The descriptor peers receive.
    pub(crate) fn descriptor(&self) -> SegmentDescriptor {
        SegmentDescriptor {
            name: self.name(),
            incarnation: self.incarnation,
            endpoints: self.endpoints.read().clone(),
            buffers: self
                .published
                .read()
                .by_id
                .values()
                .map(|p| p.descriptor.clone())
                .collect(),
        }
    }

    /// The descriptor without buffers, encoded, cut just inside its empty buffer list:
    /// the buffers' encodings go after it, then `]}`.
    fn encoded_head(&self) -> Vec<u8> {
        let empty = SegmentDescriptor {
            name: self.name(),
            incarnation: self.incarnation,
            endpoints: self.endpoints.read().clone(),
            buffers: Vec::new(),
        };
        let mut head = serde_json::to_vec(&empty).unwrap_or_default();
        debug_assert!(head.ends_with(b"[]}"), "buffers must be the last field");
        head.truncate(head.len().saturating_sub(2));
        head
    }

    fn encode(&self, set: &PublishedSet) -> Arc<[u8]> {
        let mut out = self.encoded_head();
        out.reserve(set.encoded_len + 2);
        for (i, p) in set.by_id.values().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&p.encoded);
        }
        out.extend_from_slice(b"]}");
        out.into()
    }

    /// The descriptor, encoded as peers receive it (made once per change).
    pub(crate) fn encoded(&self) -> Arc<[u8]> {
        let set = self.published.read();
        let mut cache = self.encoded.lock();
        cache.get_or_insert_with(|| self.encode(&set)).clone()
    }

    /// Adds a buffer to the descriptor, unless that would take the descriptor past what
    /// peers accept. Returns its id.
    pub(crate) fn publish(&self, descriptor: BufferDescriptor) -> Result<u64> {
        let encoded: Box<[u8]> = serde_json::to_vec(&descriptor)
            .map_err(Error::EncodeDescriptor)?
            .into();
        let head = self.encoded_head().len() + 2;
        let mut set = self.published.write();
        let total = head + set.encoded_len + encoded.len() + usize::from(!set.by_id.is_empty());
        let cap = SegmentDescriptor::MAX_ENCODED_LEN;
        if total > cap {
            return Err(Error::DescriptorFull {
                total,
                cap,
                buffers: set.by_id.len(),
            });
        }
        let id = set.next_id;
        set.next_id += 1;
        set.encoded_len += encoded.len() + usize::from(!set.by_id.is_empty());
        set.by_id.insert(
            id,
            Published {
                descriptor,
                encoded,
            },
        );
        *self.encoded.lock() = None;
        Ok(id)
    }

    /// Takes a buffer out of the descriptor.
    pub(crate) fn withdraw(&self, id: u64) {
        let mut set = self.published.write();
        let Some(p) = set.by_id.remove(&id) else {
            return;
        };
        set.encoded_len -= p.encoded.len() + usize::from(!set.by_id.is_empty());
        *self.encoded.lock() = None;
    }
}

/// What the handshake port serves: this engine's segment and its notification queue.
pub(crate) struct ControlState {
    pub(crate) own: OwnSegment,
    notify_tx: Sender<Notification>,
    notify_rx: Receiver<Notification>,
    notify_bytes: AtomicUsize,
    notify_cap: usize,
    notify_refused: AtomicU64,
    /// The transports that answer peers' set-up exchanges. Weak: the TCP transport holds
    /// this state as its control plane.
    answerers: RwLock<Vec<Weak<dyn Transport>>>,
}

impl ControlState {
    /// A fresh segment with no name yet and a queue of at most `notify_cap` bytes.
    pub(crate) fn new(notify_cap: usize) -> Self {
        let (notify_tx, notify_rx) = crossbeam_channel::bounded(NOTIFY_QUEUE);
        ControlState {
            own: OwnSegment::new(),
            notify_tx,
            notify_rx,
            notify_bytes: AtomicUsize::new(0),
            notify_cap,
            notify_refused: AtomicU64::new(0),
            answerers: RwLock::new(Vec::new()),
        }
    }

    /// Notifications refused as busy so far.
    pub(crate) fn refused(&self) -> u64 {
        self.notify_refused.load(Ordering::Relaxed)
    }

    /// Takes a notification's place in the queue's byte budget, or says it is full.
    fn take_notify_budget(&self, cost: usize) -> bool {
        let before = self.notify_bytes.fetch_add(cost, Ordering::AcqRel);
        if before + cost > self.notify_cap {
            self.notify_bytes.fetch_sub(cost, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// The transports whose peers' set-up exchanges this engine answers.
    pub(crate) fn answer_with(&self, transports: &[Arc<dyn Transport>]) {
        *self.answerers.write() = transports.iter().map(Arc::downgrade).collect();
    }

    /// The next notification, waiting up to `timeout` (`None`: do not wait).
    pub(crate) fn next(&self, timeout: Option<std::time::Duration>) -> Option<Notification> {
        let n = match timeout {
            Some(t) => self.notify_rx.recv_timeout(t).ok(),
            None => self.notify_rx.try_recv().ok(),
        };
        if let Some(n) = &n {
            self.notify_bytes.fetch_sub(n.cost(), Ordering::AcqRel);
        }
        n
    }
}

impl ControlPlane for ControlState {
    fn descriptor(&self) -> Vec<u8> {
        self.own.encoded().to_vec()
    }

    fn notification(&self, from: &str, body: &[u8]) -> bool {
        let n = Notification {
            from: from.to_string(),
            message: body.to_vec(),
        };
        let cost = n.cost();
        let queued = self.take_notify_budget(cost)
            && match self.notify_tx.try_send(n) {
                Ok(()) => true,
                Err(_) => {
                    self.notify_bytes.fetch_sub(cost, Ordering::AcqRel);
                    false
                }
            };
        if !queued {
            let refused = self.notify_refused.fetch_add(1, Ordering::Relaxed);
            if (refused + 1).is_power_of_two() {
                tracing::warn!(
                    refused = refused + 1,
                    "notification queue full; refusing notifications as busy (read them with recv_notification)"
                );
            }
        }
        queued
    }

    fn exchange(&self, protocol: Protocol, body: &[u8]) -> Result<Vec<u8>, String> {
        let transport = self
            .answerers
            .read()
            .iter()
            .filter_map(Weak::upgrade)
            .find(|t| t.protocol() == protocol);
        match transport {
            Some(t) => t.answer(body).map_err(|e| e.to_string()),
            None => Err(format!("this engine has no {protocol} transport")),
        }
    }
}
