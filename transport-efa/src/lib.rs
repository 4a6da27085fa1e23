//! ferry's libfabric transport: one-sided READ and WRITE over an RDM endpoint.
//!
//! On AWS this is EFA (provider `efa`); on any Linux host the `tcp;ofi_rxm` and `shm`
//! providers run the same code over loopback, which is how it is tested.
//!
//! Layering: implements [`ferry_transport_api::Transport`]; `ferry-engine` adds it with
//! its `efa` feature, always next to the TCP transport (the fallback). It links the
//! system's libfabric through `libfabric-sys`.
//!
//! What it does:
//! - opens one fabric, domain, address vector (`FI_AV_TABLE`), completion queue and RDM
//!   endpoint on every device the provider lists (or the ones [`EfaConfig::devices`]
//!   names): each is a *rail*, with its own progress thread;
//! - stripes a peer's slices over rails round-robin: slice `n` leaves on local rail
//!   `n % L` for remote rail `n % R` (`L`, `R`: the rail counts of the two sides), so a
//!   request larger than one slice uses every device on both hosts (a local rail still
//!   holding operations lost past their deadline is left out of new connections);
//! - registers regions honouring the `mr_mode` the provider returns (`FI_MR_LOCAL`,
//!   `FI_MR_VIRT_ADDR`, `FI_MR_ALLOCATED`, `FI_MR_PROV_KEY`, `FI_MR_ENDPOINT`), keys kept
//!   64-bit; remote access rights follow the region's [`Access`];
//! - publishes every rail's fabric address (hex, comma-separated, rail 0 first) and one
//!   key per rail for each region; inserts peers' addresses into the address vectors on
//!   first use;
//! - posts `fi_read` and `fi_writemsg` with `FI_DELIVERY_COMPLETE` (a WRITE completes when
//!   the data is in the target's memory), serialized per endpoint, retrying `FI_EAGAIN`
//!   after driving progress, a bounded number of times;
//! - a progress thread reads the completion queue (providers with manual progress need
//!   it on the target side too) and maps completion errors to [`FailReason::Device`]
//!   (transport `efa`, the libfabric code), logging the provider's message; it sleeps in
//!   `fi_cq_sread` where the queue has a wait object (IP-based providers), and otherwise
//!   polls without napping while operations are in flight or while its reads move a
//!   peer's data (a passive `shm` target copies it there), backing off once idle;
//! - every slice ends, once: an operation's context comes from a slab allocated when the
//!   rail opens (no allocation per operation), and the progress thread sweeps the
//!   deadlines of the operations in flight. A slice whose completion never comes (a
//!   provider can lose one, e.g. `shm` given a wrong key) is reported
//!   [`FailReason::TimedOut`] at its deadline and its connection marked dead, so the next
//!   [`Transport::connect`] replaces it (over the rails that lost nothing); its context,
//!   and the local memory the provider might still write, are kept until the provider
//!   gives the operation back (a late completion, then ignored) or the endpoint closes;
//! - [`Transport::shutdown`] closes the endpoints, then reports every slice still in
//!   flight [`FailReason::Shutdown`] and frees every context.
//!
//! Thread safety: `FI_THREAD_SAFE` is asked for; a provider that grants less gets every
//! call on a rail's endpoint and queue made under one lock.
//!
//! ```no_run
//! use ferry_transport_efa::{EfaConfig, EfaTransport};
//! let efa = EfaTransport::new(EfaConfig { provider: "tcp;ofi_rxm".into(), source: Some("127.0.0.1".into()), ..EfaConfig::default() });
//! assert_eq!(efa.config().provider, "tcp;ofi_rxm");
//! ```

mod fabric;
mod ops;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_transport_api::{
    Access, Connection, Endpoint, FailReason, PeerControl, Protocol, RegionMemory, Slice,
    Transport, TransportContext, TransportError,
};
use parking_lot::{Mutex, RwLock};

pub use fabric::{providers, ProviderInfo};
use fabric::{Device, Mr, PostError};
use ferry_transport_api::ops::Link;
#[doc(hidden)]
pub use ops::OpStats;

/// Settings of the libfabric transport.
///
/// `serde`, with every field defaulted so a partial document works; `busy_poll` is
/// `busy_poll_us`, in microseconds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EfaConfig {
    /// libfabric provider: `efa` on AWS; `tcp;ofi_rxm` or `shm` for development.
    pub provider: String,
    /// For IP-based providers (`tcp;ofi_rxm`): the local address to bind (`FI_SOURCE`).
    /// The engine sets it to its listen address when unset.
    pub source: Option<String>,
    /// Devices (libfabric domain names, as `ferry info` lists them) to open as rails, in
    /// order; empty (the default): every device the provider lists (for IP-based
    /// providers, whose devices are network interfaces, the first). A name may repeat:
    /// each entry opens its own endpoint on that device.
    pub devices: Vec<String>,
    /// Largest slice a request is cut into.
    pub max_slice: usize,
    /// How long the progress thread spins on an empty completion queue before it sleeps.
    #[serde(rename = "busy_poll_us", with = "busy_poll_micros")]
    pub busy_poll: Duration,
    /// Ask the provider for device-memory registration (`FI_HMEM`, CUDA), settling for
    /// host memory only when it has none. The engine sets it in builds with `cuda`.
    pub hmem: bool,
    /// Fault injection: every `fault_every`-th post fails as if the provider had refused
    /// it with an I/O error (`FI_EIO`) instead of being posted (0, the default: never):
    /// the slice fails [`FailReason::Device`] and its connection is marked dead, as with
    /// a real refusal. Exercises error, retry and reconnect paths without faulty hardware.
    pub fault_every: u64,
    /// Test only: registers device memory (`cuda:N` regions) with libfabric's host
    /// interface (`FI_HMEM_SYSTEM`) instead of `FI_HMEM_CUDA`, so host bytes labelled as
    /// device memory stand in for it where no GPU exists. The stand-in must really be
    /// host memory; never set it for real device memory.
    #[doc(hidden)]
    pub device_memory_is_host: bool,
    /// Fault injection for tests: the first `lose_completions` completions each rail
    /// reads are held back as if the provider had lost them, and handed over only once
    /// their slice has passed its deadline (so the deadline sweep and the late-completion
    /// path both run). 0, the default: none.
    #[doc(hidden)]
    pub lose_completions: u64,
}

impl Default for EfaConfig {
    fn default() -> Self {
        EfaConfig {
            provider: "efa".into(),
            source: None,
            devices: Vec::new(),
            max_slice: 1 << 20,
            busy_poll: Duration::from_micros(50),
            hmem: false,
            fault_every: 0,
            device_memory_is_host: false,
            lose_completions: 0,
        }
    }
}

/// `serde` for [`EfaConfig::busy_poll`] as an integer count of microseconds.
mod busy_poll_micros {
    use std::time::Duration;

    pub(crate) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        <u64 as serde::Deserialize>::deserialize(d).map(Duration::from_micros)
    }
}

impl EfaConfig {
    /// Whether the provider addresses peers by IP (so `source` matters).
    pub fn ip_based(&self) -> bool {
        let p = self.provider.to_ascii_lowercase();
        p.contains("tcp") || p.contains("sockets") || p.contains("udp")
    }
}

struct Inner {
    config: EfaConfig,
    rails: OnceLock<Vec<Arc<Device>>>,
    /// Per registered region, its registration on each rail.
    regions: RwLock<HashMap<usize, Arc<[Mr]>>>,
    peers: Mutex<HashMap<String, Arc<EfaConnection>>>,
    stop: Arc<AtomicBool>,
    posts: AtomicU64,
}

/// The libfabric transport. Create it with [`EfaTransport::new`]; the engine starts it.
pub struct EfaTransport {
    inner: Arc<Inner>,
}

impl EfaTransport {
    /// A transport with `config`, not yet opened.
    pub fn new(mut config: EfaConfig) -> Self {
        // Longer than the clock can add is forever.
        config.busy_poll = ferry_transport_api::at_most_forever(config.busy_poll);
        EfaTransport {
            inner: Arc::new(Inner {
                config,
                rails: OnceLock::new(),
                regions: RwLock::new(HashMap::new()),
                peers: Mutex::new(HashMap::new()),
                stop: Arc::new(AtomicBool::new(false)),
                posts: AtomicU64::new(0),
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &EfaConfig {
        &self.inner.config
    }

    fn rails(&self) -> Result<&[Arc<Device>], TransportError> {
        self.inner
            .rails
            .get()
            .map(Vec::as_slice)
            .ok_or(TransportError::Closed)
    }

    /// Operations posted on each rail so far, rail 0 first (empty before start).
    pub fn rail_posts(&self) -> Vec<u64> {
        self.inner
            .rails
            .get()
            .map_or_else(Vec::new, |r| r.iter().map(|d| d.posts()).collect())
    }

    /// The operation contexts of every rail, summed (for tests and diagnostics).
    #[doc(hidden)]
    pub fn op_stats(&self) -> OpStats {
        let mut all = OpStats::default();
        for d in self.inner.rails.get().into_iter().flatten() {
            all += d.op_stats();
        }
        all
    }
}

/// A libfabric error code as a failure reason of this transport.
pub(crate) fn fabric_error(code: i32) -> FailReason {
    FailReason::Device {
        transport: Protocol::Efa,
        code,
    }
}

fn key_of(region: &RegionMemory) -> usize {
    region as *const RegionMemory as usize
}

impl Transport for EfaTransport {
    fn protocol(&self) -> Protocol {
        Protocol::Efa
    }

    fn start(&self, ctx: TransportContext) -> Result<Endpoint, TransportError> {
        let rails = fabric::open_rails(
            &self.inner.config,
            usize::MAX,
            &ctx.completions,
            &self.inner.stop,
        )?;
        for d in &rails {
            tracing::info!(provider = %self.inner.config.provider, domain = %d.domain_name(), mr_mode = d.mr_mode(), "libfabric rail open");
        }
        let address = rails
            .iter()
            .map(|d| d.address_hex())
            .collect::<Vec<_>>()
            .join(",");
        self.inner
            .rails
            .set(rails)
            .map_err(|_| TransportError::invalid("the libfabric transport was started twice"))?;
        Ok(Endpoint {
            protocol: Protocol::Efa,
            address,
        })
    }

    fn register(
        &self,
        region: &Arc<RegionMemory>,
        access: Access,
    ) -> Result<Vec<u64>, TransportError> {
        let mrs = self
            .rails()?
            .iter()
            .map(|d| d.register(region, access))
            .collect::<Result<Vec<Mr>, _>>()?;
        let keys = mrs.iter().map(Mr::key).collect();
        self.inner
            .regions
            .write()
            .insert(key_of(region), mrs.into());
        Ok(keys)
    }

    fn deregister(&self, region: &RegionMemory) {
        self.inner.regions.write().remove(&key_of(region));
    }

    fn connect(
        &self,
        endpoint: &Endpoint,
        peer: &dyn PeerControl,
    ) -> Result<Arc<dyn Connection>, TransportError> {
        if endpoint.protocol != Protocol::Efa {
            return Err(TransportError::invalid(format!(
                "{} endpoint given to the libfabric transport",
                endpoint.protocol
            )));
        }
        let mut peers = self.inner.peers.lock();
        // A connection marked dead (an operation on it was lost) is replaced.
        if let Some(c) = peers.get(&endpoint.address) {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        let rails = self.rails()?;
        let remote: Vec<&str> = endpoint.address.split(',').collect();
        // Rails still holding operations lost past their deadline are left out.
        let healthy: Vec<usize> = (0..rails.len()).filter(|&r| rails[r].healthy()).collect();
        if healthy.is_empty() {
            return Err(TransportError::ConnectPeer {
                peer: endpoint.address.clone(),
                source: std::io::Error::other(
                    "every libfabric rail holds operations whose completion never came; \
                     restart the engine to reopen them",
                ),
            });
        }
        if healthy.len() < rails.len() {
            tracing::warn!(
                healthy = healthy.len(),
                rails = rails.len(),
                "connecting over the libfabric rails that completed every operation only"
            );
        }
        // Pair local rail p % L with remote rail p % R, for as many pairs as the side
        // with more rails has: every rail on both hosts carries traffic.
        let paths = (0..healthy.len().max(remote.len()))
            .map(|p| {
                let local = healthy[p % healthy.len()];
                let remote_rail = p % remote.len();
                let device = rails[local].clone();
                let peer = device.insert_peer(remote[remote_rail])?;
                Ok(Path {
                    local,
                    device,
                    peer,
                    remote_rail,
                })
            })
            .collect::<Result<Vec<_>, TransportError>>()?;
        let conn = Arc::new(EfaConnection {
            inner: self.inner.clone(),
            paths,
            next: AtomicUsize::new(0),
            link: Link::new(peer.name()),
        });
        peers.insert(endpoint.address.clone(), conn.clone());
        Ok(conn)
    }

    fn max_slice(&self) -> usize {
        self.inner.config.max_slice.max(4096)
    }

    fn shutdown(&self) {
        if self.inner.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        for (_, c) in self.inner.peers.lock().drain() {
            c.link.kill();
        }
        let rails = self
            .inner
            .rails
            .get()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut stopped = true;
        for d in rails {
            stopped &= d.stop_progress();
        }
        // Closing the endpoints ends (Shutdown) what is in flight and frees its contexts.
        // Not from a progress thread (shutdown called from a completion): the device
        // closes when dropped instead.
        if stopped {
            // One grace period for every rail's operations to finish.
            let grace = std::time::Instant::now() + fabric::CLOSE_GRACE;
            for d in rails {
                d.close(grace);
            }
        }
    }
}

impl Drop for EfaTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A pairing of one local rail with one of the peer's rails.
struct Path {
    /// Index of the local rail (and of the region's registration on it).
    local: usize,
    device: Arc<Device>,
    /// The remote rail's entry in the local rail's address vector.
    peer: libfabric_sys::fi_addr_t,
    remote_rail: usize,
}

/// A peer reached through the local rails (address-vector entries).
struct EfaConnection {
    inner: Arc<Inner>,
    paths: Vec<Path>,
    /// Round-robin position over `paths`.
    next: AtomicUsize,
    /// Marked dead when an operation on it is lost (its deadline passed without a
    /// completion) or the provider refuses a post: `connect` then replaces it. Names the
    /// peer for warnings; each operation in flight holds a clone.
    link: Arc<Link>,
}

impl Connection for EfaConnection {
    fn post(&self, slice: Slice) -> Result<(), FailReason> {
        if self.inner.stop.load(Ordering::Acquire) {
            return Err(FailReason::Shutdown);
        }
        // Marked dead (a lost operation, a refused post): the engine reconnects.
        if !self.link.is_alive() {
            return Err(FailReason::ConnectionLost);
        }
        let local = self
            .inner
            .regions
            .read()
            .get(&key_of(&slice.local))
            .cloned();
        let Some(local) = local else {
            tracing::warn!("local region is not registered with the libfabric transport");
            return Err(FailReason::Unsupported);
        };
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.paths.len();
        let path = &self.paths[n];
        // A peer whose descriptor has fewer keys than rails is reached on rail 0 only.
        let (path, key) = match slice.remote_keys.rail(path.remote_rail) {
            Some(key) => (path, key),
            None => (&self.paths[0], slice.remote_keys.first()),
        };
        let every = self.inner.config.fault_every;
        let posted =
            if every > 0 && self.inner.posts.fetch_add(1, Ordering::Relaxed) % every == every - 1 {
                // The fault knob: a refusal, handled below like the provider's own.
                Err(PostError::Fatal(libfabric_sys::FI_EIO as i32))
            } else {
                path.device
                    .post(path.peer, &local[path.local], key, slice, Some(&self.link))
            };
        match posted {
            Ok(()) => Ok(()),
            Err(PostError::Closed) => Err(FailReason::Shutdown),
            Err(PostError::Fatal(code)) => {
                self.link.kill();
                if let Some(suppressed) = path.device.post_warns.admit() {
                    tracing::warn!(peer = %self.link.peer(), error = %fabric::strerror(code), suppressed, "libfabric refused a post; the connection is replaced");
                }
                Err(fabric_error(code))
            }
            Err(PostError::Busy) => Err(fabric_error(libfabric_sys::FI_EAGAIN as i32)),
        }
    }

    fn is_alive(&self) -> bool {
        self.link.is_alive() && !self.inner.stop.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crossbeam_channel::{Receiver, Sender};
    use ferry_transport_api::{
        CompletionToken, Completions, Opcode, RegionMemory, RemoteKeys, Slice,
    };

    use super::*;

    struct Channel(Sender<Result<usize, FailReason>>);

    impl Completions for Channel {
        fn complete(&self, _token: CompletionToken, result: Result<usize, FailReason>) {
            let _ = self.0.send(result);
        }
    }

    fn shm_device() -> String {
        providers()
            .into_iter()
            .find(|p| p.provider == "shm")
            .expect("libfabric's shm provider is present")
            .domain
    }

    fn started(rails: usize) -> (EfaTransport, Endpoint, Receiver<Result<usize, FailReason>>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let t = EfaTransport::new(EfaConfig {
            provider: "shm".into(),
            devices: vec![shm_device(); rails],
            ..EfaConfig::default()
        });
        let endpoint = t
            .start(TransportContext {
                completions: Arc::new(Channel(tx)),
                control: None,
                staging: None,
            })
            .expect("shm transport starts");
        (t, endpoint, rx)
    }

    fn filled(len: usize, seed: u8) -> Arc<RegionMemory> {
        ferry_transport_api::testing::host_region(
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect(),
        )
    }

    fn contents(r: &RegionMemory) -> Vec<u8> {
        let mut out = vec![0u8; r.len()];
        assert!(r.copy_to_slice_at(0, &mut out));
        out
    }

    const SLICE: usize = 1 << 20;

    /// Posts `local` to or from `remote` in 1 MiB slices; returns how many.
    fn post_slices(
        conn: &dyn Connection,
        op: Opcode,
        local: &Arc<RegionMemory>,
        remote: &RegionMemory,
        keys: &RemoteKeys,
    ) -> usize {
        let slices = local.len() / SLICE;
        for i in 0..slices {
            let slice = Slice {
                op,
                local: local.clone(),
                local_offset: i * SLICE,
                remote_addr: remote.addr() + (i * SLICE) as u64,
                remote_base: remote.addr(),
                remote_keys: keys.clone(),
                len: SLICE,
                token: CompletionToken {
                    slot: 0,
                    generation: 0,
                    task: i as u32,
                },
                deadline: Instant::now() + Duration::from_secs(30),
            };
            conn.post(slice).expect("posted");
        }
        slices
    }

    /// Moves `local` to or from `remote` and waits for every completion.
    fn transfer(
        conn: &dyn Connection,
        rx: &Receiver<Result<usize, FailReason>>,
        op: Opcode,
        local: &Arc<RegionMemory>,
        remote: &RegionMemory,
        keys: &RemoteKeys,
    ) {
        let slices = post_slices(conn, op, local, remote, keys);
        for _ in 0..slices {
            let r = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("completion");
            assert_eq!(r, Ok(SLICE));
        }
    }

    /// Two rails on either side: slices alternate between them, every byte lands, and
    /// each rail issues its own key for a region.
    #[test]
    fn slices_are_striped_over_every_rail() {
        for (initiator_rails, target_rails) in [(2, 2), (1, 2), (2, 1)] {
            let (target, target_ep, _target_rx) = started(target_rails);
            let (initiator, _, rx) = started(initiator_rails);
            assert_eq!(target_ep.address.split(',').count(), target_rails);
            let len = 16 << 20;
            let remote = filled(len, 0);
            let keys = target.register(&remote, Access::RemoteReadWrite).unwrap();
            assert_eq!(keys.len(), target_rails);
            if target_rails == 2 {
                assert_ne!(keys[0], keys[1], "each rail issues its own key");
            }
            let keys = RemoteKeys::new(keys).unwrap();
            let source = filled(len, 7);
            let back = filled(len, 99);
            initiator.register(&source, Access::Local).unwrap();
            initiator.register(&back, Access::Local).unwrap();
            let conn = initiator
                .connect(&target_ep, &ferry_transport_api::NoExchange)
                .unwrap();

            transfer(&*conn, &rx, Opcode::Write, &source, &remote, &keys);
            assert!(
                contents(&remote) == contents(&source),
                "written bytes differ"
            );
            transfer(&*conn, &rx, Opcode::Read, &back, &remote, &keys);
            assert!(contents(&back) == contents(&source), "read bytes differ");

            let posts = initiator.rail_posts();
            assert_eq!(posts.len(), initiator_rails);
            assert_eq!(posts.iter().sum::<u64>(), 32);
            initiator.shutdown();
            target.shutdown();
        }
    }

    #[test]
    fn an_unknown_device_is_named_in_the_error() {
        let (tx, _rx) = crossbeam_channel::unbounded();
        let t = EfaTransport::new(EfaConfig {
            provider: "shm".into(),
            devices: vec!["no-such-device".into()],
            ..EfaConfig::default()
        });
        let err = t
            .start(TransportContext {
                completions: Arc::new(Channel(tx)),
                control: None,
                staging: None,
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-device") && err.contains(&shm_device()),
            "{err}"
        );
    }
}
