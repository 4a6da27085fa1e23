//! A store on a key-value server (HTTP, Redis): this engine's descriptor is one key,
//! `<namespace>/segments/<name>`, written at start and after every change, and renewed
//! by a background thread every third of the TTL (a store with expiry forgets a dead
//! engine within the TTL; one without is rewritten, so a restarted server is
//! repopulated). While the server is down the thread retries with back-off and the
//! engine carries on: peers already opened keep working; opening an unknown one fails
//! with an error naming the store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport_api::SegmentDescriptor;
use ferry_transport_tcp::TcpTransport;
use parking_lot::{Condvar, Mutex};

use super::store::{Fetched, MetadataStore, StoreSettings};
use crate::control::OwnSegment;
use crate::{Error, Result, SegmentError};

/// The first retry after a failed write; doubled up to the renewal period.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A key-value server's client.
pub(super) trait Backend: Send + Sync + 'static {
    /// The server, for logs and errors (`redis://host:port`).
    fn describe(&self) -> String;
    /// Writes `value` under `key`, to expire after `ttl` where the server can.
    fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), String>;
    /// The value under `key`; `None` when there is none.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String>;
    /// Removes `key`.
    fn delete(&self, key: &str) -> Result<(), String>;
    /// Whether entries expire on their own: without expiry, an entry may be a dead
    /// engine's.
    fn expires(&self) -> bool;
}

#[derive(Default)]
struct State {
    /// This engine's key, once started.
    key: Option<String>,
    /// The descriptor to write.
    latest: Option<Arc<[u8]>>,
    /// A write is due now (a change, or a failed write to retry).
    dirty: bool,
    stop: bool,
}

struct Shared {
    backend: Box<dyn Backend>,
    settings: StoreSettings,
    state: Mutex<State>,
    wake: Condvar,
    /// One write at a time, each of the newest descriptor: an older one never lands
    /// after a newer.
    writing: Mutex<()>,
    /// The last write failed (the server is down): changes wait for the renewal thread.
    failing: AtomicBool,
}

impl Shared {
    /// Writes the newest descriptor now. A failure leaves it due for the renewal thread.
    fn write_latest(&self) -> Result<(), String> {
        let _one = self.writing.lock();
        let (key, value) = {
            let mut s = self.state.lock();
            s.dirty = false;
            match (s.key.clone(), s.latest.clone()) {
                (Some(k), Some(v)) => (k, v),
                _ => return Ok(()),
            }
        };
        match self.backend.put(&key, &value, self.settings.ttl) {
            Ok(()) => {
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!(store = %self.backend.describe(), "metadata store reachable again; descriptor published");
                }
                Ok(())
            }
            Err(why) => {
                if !self.failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(store = %self.backend.describe(), %why, "cannot publish to the metadata store; retrying with back-off (opened peers keep working)");
                }
                self.state.lock().dirty = true;
                Err(why)
            }
        }
    }

    /// Renews on the period, and retries what failed with back-off.
    fn run(&self) {
        let renew = (self.settings.ttl / 3).max(Duration::from_millis(10));
        let mut backoff = FIRST_BACKOFF;
        let mut next = Instant::now() + renew;
        loop {
            {
                let mut s = self.state.lock();
                while !s.stop && !s.dirty && Instant::now() < next {
                    self.wake.wait_until(&mut s, next);
                }
                if s.stop {
                    return;
                }
            }
            match self.write_latest() {
                Ok(()) => {
                    backoff = FIRST_BACKOFF;
                    next = Instant::now() + renew;
                }
                Err(_) => {
                    let until = Instant::now() + backoff;
                    backoff = (backoff * 2).min(renew);
                    let mut s = self.state.lock();
                    while !s.stop && Instant::now() < until {
                        self.wake.wait_until(&mut s, until);
                    }
                }
            }
        }
    }
}

/// A [`MetadataStore`] on a key-value server.
pub(crate) struct Leased {
    shared: Arc<Shared>,
    tcp: Arc<TcpTransport>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Leased {
    pub(super) fn new(
        backend: Box<dyn Backend>,
        tcp: Arc<TcpTransport>,
        settings: StoreSettings,
    ) -> Self {
        Leased {
            shared: Arc::new(Shared {
                backend,
                settings,
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                writing: Mutex::new(()),
                failing: AtomicBool::new(false),
            }),
            tcp,
            worker: Mutex::new(None),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}/segments/{name}", self.shared.settings.namespace)
    }

    fn store_error(&self, message: String) -> Error {
        Error::MetadataStore {
            store: self.shared.backend.describe(),
            message,
        }
    }

    /// Whether the engine an entry describes is alive: it answers on its TCP endpoint
    /// with the same incarnation.
    fn alive(&self, entry: &SegmentDescriptor) -> bool {
        let Some(ep) = entry.endpoint(ferry_transport_api::Protocol::Tcp) else {
            return false;
        };
        self.tcp
            .fetch_descriptor(&ep.address)
            .ok()
            .and_then(|body| serde_json::from_slice::<SegmentDescriptor>(&body).ok())
            .is_some_and(|d| d.incarnation == entry.incarnation)
    }
}

impl MetadataStore for Leased {
    fn describe(&self) -> String {
        self.shared.backend.describe()
    }

    fn start(&self, own: &OwnSegment) -> Result<()> {
        let name = own.name();
        let key = self.key(&name);
        let existing = self
            .shared
            .backend
            .get(&key)
            .map_err(|m| self.store_error(m))?;
        if let Some(body) = existing {
            // An entry that does not parse is nobody's: it is overwritten.
            if let Ok(entry) = serde_json::from_slice::<SegmentDescriptor>(&body) {
                let other = entry.incarnation != own.incarnation();
                if other && (self.shared.backend.expires() || self.alive(&entry)) {
                    return Err(Error::NameTaken {
                        name,
                        store: self.describe(),
                    });
                }
            }
        }
        let value = own.encoded();
        self.shared
            .backend
            .put(&key, &value, self.shared.settings.ttl)
            .map_err(|m| self.store_error(m))?;
        {
            let mut s = self.shared.state.lock();
            s.key = Some(key);
            s.latest = Some(value);
        }
        let shared = self.shared.clone();
        let worker = std::thread::Builder::new()
            .name("ferry-metadata".into())
            .spawn(move || shared.run())
            .map_err(|e| self.store_error(format!("cannot start the renewal thread: {e}")))?;
        *self.worker.lock() = Some(worker);
        tracing::info!(store = %self.describe(), segment = %name, "descriptor published");
        Ok(())
    }

    /// Written before the registration returns, so a peer told about the new buffer
    /// finds it; while the server is down, left to the renewal thread (registration does
    /// not wait on an outage).
    fn publish(&self, own: &OwnSegment) {
        {
            let mut s = self.shared.state.lock();
            if s.key.is_none() {
                return;
            }
            s.latest = Some(own.encoded());
            s.dirty = true;
        }
        if self.shared.failing.load(Ordering::Acquire) || self.shared.write_latest().is_err() {
            self.shared.wake.notify_all();
        }
    }

    fn fetch(&self, name: &str) -> Result<Fetched, SegmentError> {
        match self.shared.backend.get(&self.key(name)) {
            Ok(Some(body)) => Ok(Fetched {
                body,
                tcp_address: None,
            }),
            Ok(None) => Err(SegmentError::NotFound {
                store: self.describe(),
            }),
            Err(message) => Err(SegmentError::Store {
                store: self.describe(),
                message,
            }),
        }
    }

    fn withdraw(&self, own: &OwnSegment) {
        let key = {
            let mut s = self.shared.state.lock();
            s.stop = true;
            self.shared.wake.notify_all();
            s.key.take()
        };
        if let Some(w) = self.worker.lock().take() {
            let _ = w.join();
        }
        if let Some(key) = key {
            if let Err(why) = self.shared.backend.delete(&key) {
                tracing::warn!(store = %self.describe(), segment = %own.name(), %why, "cannot withdraw the descriptor (a store with expiry forgets it within its TTL)");
            }
        }
    }
}
