//! Connections: the queue pairs joining this transport's ports with a peer's, set up
//! through the queue-pair exchange; and the peer's side of it (`accept`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use ferry_transport_api::ops::Link;
use ferry_transport_api::{
    Connection, FailReason, Opcode, PeerControl, Protocol, RemoteStatus, Slice, TransportError,
};

use crate::device::LinkLayer;
use crate::exchange::{FlushWord, Kind, Message, QpAddr};
use crate::nic::{OpenNic, QpSlot, Work};
use crate::plan::{self, Pair};
use crate::Shared;

/// One port of a peer as its endpoint lists it: `device:port/ib` or `device:port/eth`.
pub(crate) fn endpoint_entry(nic: &OpenNic) -> String {
    let layer = match nic.info.link_layer {
        LinkLayer::Infiniband => "ib",
        LinkLayer::Ethernet => "eth",
    };
    format!("{}/{layer}", nic.info.label())
}

/// The link layers of a peer's ports, from its endpoint address.
pub(crate) fn parse_endpoint(address: &str) -> Result<Vec<LinkLayer>, TransportError> {
    let bad = |why: String| {
        TransportError::invalid(format!(
            "RDMA endpoint `{address}`: {why} (expected device:port/ib or /eth, comma-separated)"
        ))
    };
    let mut out = Vec::new();
    for entry in address.split(',') {
        let layer = match entry.rsplit_once('/') {
            Some((_, "ib")) => LinkLayer::Infiniband,
            Some((_, "eth")) => LinkLayer::Ethernet,
            _ => return Err(bad(format!("`{entry}` names no link layer"))),
        };
        out.push(layer);
    }
    if out.len() > crate::exchange::MAX_NICS {
        return Err(bad(format!(
            "{} ports, more than {}",
            out.len(),
            crate::exchange::MAX_NICS
        )));
    }
    Ok(out)
}

/// A connection to one peer.
pub(crate) struct RdmaConnection {
    pub(crate) inner: Arc<ConnInner>,
}

pub(crate) struct ConnInner {
    pub(crate) id: u64,
    shared: Weak<Shared>,
    pairs: Vec<Pair>,
    /// Per pair, its queue pairs.
    qps: Vec<Vec<Arc<QpSlot>>>,
    /// Per peer port, the flush word it lends (WRITEs are followed by a READ of it).
    flush: Vec<Option<FlushWord>>,
    next: AtomicU64,
    link: Arc<Link>,
    /// Posts so far, for the fault knob.
    posts: AtomicU64,
}

impl Drop for RdmaConnection {
    fn drop(&mut self) {
        if !self.inner.link.is_alive() {
            // Dead: whatever its queue pairs still hold (operations past their deadline)
            // completes with a flush error, so their memory is let go.
            for slot in self.inner.qps.iter().flatten() {
                slot.broken.store(true, Ordering::Release);
                slot.qp.fail();
            }
        }
    }
}

impl ConnInner {
    /// A healthy queue pair for slice number `n` of memory preferring `preferred` ports:
    /// the planned one, else the next healthy one in plan order.
    fn choose(&self, preferred: u64, n: u64, qps_per_pair: usize) -> Option<(usize, &Arc<QpSlot>)> {
        let total = self.pairs.len() as u64 * qps_per_pair as u64;
        (0..total.max(1))
            .find_map(|step| {
                let (p, q) =
                    plan::pick(&self.pairs, preferred, qps_per_pair, n.wrapping_add(step))?;
                let slot = self.qps.get(p)?.get(q)?;
                (!slot.broken.load(Ordering::Acquire)).then_some((p, slot))
            })
            .or_else(|| {
                // The preferred ports' queue pairs are all failed: any healthy one.
                self.qps.iter().enumerate().find_map(|(p, v)| {
                    v.iter()
                        .find(|s| !s.broken.load(Ordering::Acquire))
                        .map(|s| (p, s))
                })
            })
    }

    /// Posts `slice` on a healthy queue pair; `Err` hands it back.
    fn send(&self, slice: Slice, preferred_only: bool) -> Result<(), (FailReason, Slice)> {
        let Some(shared) = self.shared.upgrade() else {
            return Err((FailReason::Shutdown, slice));
        };
        if shared.is_shut() {
            return Err((FailReason::Shutdown, slice));
        }
        let Some(reg) = shared.registration(&slice.local) else {
            return Err((FailReason::Unsupported, slice));
        };
        let preferred = if preferred_only {
            shared.preferred(slice.local.location())
        } else {
            u64::MAX
        };
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let Some((p, slot)) = self.choose(preferred, n, shared.config.qps_per_pair.max(1)) else {
            self.link.kill();
            return Err((FailReason::ConnectionLost, slice));
        };
        let pair = self.pairs[p];
        let Some(rkey) = slice
            .remote_keys
            .rail(pair.remote)
            .and_then(|k| u32::try_from(k).ok())
        else {
            return Err((FailReason::Remote(RemoteStatus::KeyMismatch), slice));
        };
        let Some(&lkey) = reg.lkeys.get(pair.local) else {
            return Err((FailReason::Unsupported, slice));
        };
        let flush = match slice.op {
            Opcode::Write if shared.config.flush_writes => {
                self.flush.get(pair.remote).copied().flatten()
            }
            _ => None,
        };
        let every = shared.config.fault_every;
        if every > 0 && self.posts.fetch_add(1, Ordering::Relaxed) % every == every - 1 {
            // The fault knob: the queue pair fails as a NIC's would.
            slot.broken.store(true, Ordering::Release);
            self.link.kill();
            slot.qp.fail();
            let code = libc::EIO;
            return Err((
                FailReason::Device {
                    transport: Protocol::Rdma,
                    code,
                },
                slice,
            ));
        }
        let nic = slot.nic.clone();
        nic.submit(Work {
            slice,
            qp: slot.clone(),
            reg,
            lkey,
            rkey,
            flush,
        })
    }

    /// Posts a slice that failed on one queue pair again on a healthy one (another port
    /// first, as planned); `Err` hands it back to be reported.
    pub(crate) fn retry(&self, slice: Slice) -> Result<(), Slice> {
        match self.send(slice, false) {
            Ok(()) => {
                tracing::debug!(
                    connection = self.id,
                    "a failed slice is posted again on another queue pair"
                );
                Ok(())
            }
            Err((_, slice)) => Err(slice),
        }
    }
}

impl Connection for RdmaConnection {
    fn post(&self, slice: Slice) -> Result<(), FailReason> {
        self.inner.send(slice, true).map_err(|(reason, _)| reason)
    }

    fn is_alive(&self) -> bool {
        self.inner.link.is_alive() && self.inner.shared.upgrade().is_some_and(|s| !s.is_shut())
    }
}

/// Opens a connection to the peer whose endpoint lists `remote` ports: creates the queue
/// pairs, exchanges them through `peer`, and brings them up.
pub(crate) fn open(
    shared: &Arc<Shared>,
    remote: &[LinkLayer],
    peer: &dyn PeerControl,
    replaces: u64,
    timeout: Duration,
) -> Result<RdmaConnection, TransportError> {
    let nics = shared.nics();
    let local: Vec<LinkLayer> = nics.iter().map(|n| n.info.link_layer).collect();
    let pairs = plan::pair_nics(&local, remote);
    if pairs.is_empty() {
        return Err(TransportError::Unsupported {
            what: "an RDMA connection to this peer".into(),
            why: "no port of ours shares a link layer (InfiniBand or Ethernet) with a port of the peer".into(),
        });
    }
    let id = loop {
        let id = rand::random::<u64>();
        if id != 0 {
            break id;
        }
    };
    let link = Link::new(peer.name());
    let per_pair = shared.config.qps_per_pair.max(1);
    if pairs.len() * per_pair > crate::exchange::MAX_QPS {
        return Err(TransportError::invalid(format!(
            "{} port pairs with {per_pair} queue pairs each: more than the {} one connection may have (lower qps_per_pair)",
            pairs.len(),
            crate::exchange::MAX_QPS
        )));
    }
    let conn_cell: Arc<OnceLock<Weak<ConnInner>>> = Arc::new(OnceLock::new());
    let mut qps: Vec<Vec<Arc<QpSlot>>> = Vec::with_capacity(pairs.len());
    let mut mine: Vec<QpAddr> = Vec::with_capacity(pairs.len() * per_pair);
    let verb = |e: crate::verbs::VerbError| TransportError::Unsupported {
        what: "an RDMA connection".into(),
        why: e.to_string(),
    };
    for pair in &pairs {
        let nic = &nics[pair.local];
        let mut v = Vec::with_capacity(per_pair);
        for _ in 0..per_pair {
            let (slot, addr) = nic
                .new_qp(true, pair.remote, link.clone(), conn_cell.clone())
                .map_err(verb)?;
            v.push(slot);
            mine.push(addr);
        }
        qps.push(v);
    }
    let request = Message {
        kind: Kind::Request,
        connection: id,
        replaces,
        qps: mine.clone(),
        flush: Vec::new(),
    };
    let answer = peer.exchange(Protocol::Rdma, &request.encode(), timeout)?;
    let answer = Message::decode(&answer)
        .map_err(|e| TransportError::handshake("the RDMA peer", e.to_string()))?;
    check_answer(&request, &answer, remote.len())
        .map_err(|why| TransportError::handshake("the RDMA peer", why))?;
    let slots = qps.iter().flatten();
    for ((slot, theirs), ours) in slots.zip(&answer.qps).zip(&mine) {
        slot.nic.connect_qp(slot, theirs, ours.psn).map_err(verb)?;
    }
    let mut flush = vec![None; remote.len()];
    for w in &answer.flush {
        if let Some(f) = flush.get_mut(usize::from(w.nic)) {
            *f = Some(*w);
        }
    }
    if shared.config.flush_writes {
        if let Some(p) = pairs.iter().find(|p| flush[p.remote].is_none()) {
            return Err(TransportError::handshake(
                "the RDMA peer",
                format!(
                    "it lends no flush word on its port {}, so WRITEs could not be made visible",
                    p.remote
                ),
            ));
        }
    }
    let inner = Arc::new(ConnInner {
        id,
        shared: Arc::downgrade(shared),
        pairs,
        qps,
        flush,
        next: AtomicU64::new(0),
        link,
        posts: AtomicU64::new(0),
    });
    let _ = conn_cell.set(Arc::downgrade(&inner));
    tracing::debug!(
        connection = id,
        pairs = inner.pairs.len(),
        "RDMA connection up"
    );
    Ok(RdmaConnection { inner })
}

/// Whether `answer` answers `request`: the same connection, one queue pair per requested
/// one on the port it was asked for, and (when WRITEs are flushed) a flush word for every
/// peer port in use.
pub(crate) fn check_answer(
    request: &Message,
    answer: &Message,
    remote_ports: usize,
) -> Result<(), String> {
    if answer.kind != Kind::Answer || answer.connection != request.connection {
        return Err("the answer is not for this connection".into());
    }
    if answer.qps.len() != request.qps.len() {
        return Err(format!(
            "{} queue pairs answered for {} asked",
            answer.qps.len(),
            request.qps.len()
        ));
    }
    for (i, (a, r)) in answer.qps.iter().zip(&request.qps).enumerate() {
        if a.nic != r.peer_nic || a.peer_nic != r.nic || usize::from(a.nic) >= remote_ports {
            return Err(format!("queue pair {i} is answered on another port"));
        }
    }
    Ok(())
}

/// The queue pairs peers connected to this transport, by their connection id.
#[derive(Default)]
pub(crate) struct Accepted {
    by_connection: HashMap<u64, (Instant, Vec<Arc<QpSlot>>)>,
    qps: usize,
}

impl Accepted {
    /// Room for `n` more queue pairs within `limit`: the connections accepted longest ago
    /// are dropped (a live peer whose queue pairs go reconnects on its next failure).
    fn make_room(&mut self, n: usize, limit: usize) {
        while self.qps + n > limit {
            let Some((&oldest, _)) = self.by_connection.iter().min_by_key(|(_, (at, _))| *at)
            else {
                return;
            };
            if let Some((_, v)) = self.by_connection.remove(&oldest) {
                self.qps -= v.len();
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.by_connection.clear();
        self.qps = 0;
    }

    pub(crate) fn len(&self) -> usize {
        self.qps
    }
}

/// The peer's side of the exchange: checks the request, creates and brings up one queue
/// pair per requested one, and answers with them and this side's flush words.
pub(crate) fn accept(shared: &Arc<Shared>, body: &[u8]) -> Result<Vec<u8>, TransportError> {
    let refuse =
        |why: String| TransportError::invalid(format!("RDMA queue-pair exchange refused: {why}"));
    let request = Message::decode(body).map_err(|e| refuse(e.to_string()))?;
    if request.kind != Kind::Request {
        return Err(refuse("not a request".into()));
    }
    let nics = shared.nics();
    for (i, q) in request.qps.iter().enumerate() {
        if usize::from(q.peer_nic) >= nics.len() {
            return Err(refuse(format!(
                "queue pair {i} asks for port {} of {}",
                q.peer_nic,
                nics.len()
            )));
        }
    }
    let limit = shared.config.max_peer_qps.max(1);
    if request.qps.len() > limit {
        return Err(refuse(format!(
            "{} queue pairs, more than the {limit} this side keeps",
            request.qps.len()
        )));
    }
    // Nothing this side keeps changes until every new queue pair is up: a request refused
    // half-way tears down no connection and evicts nobody's.
    let verb = |e: crate::verbs::VerbError| TransportError::Unsupported {
        what: "accepting an RDMA connection".into(),
        why: e.to_string(),
    };
    let no_conn = Arc::new(OnceLock::new());
    // Set up through the control port, which does not say who asked: the peer's own
    // connection id names it (these queue pairs only answer, and never post).
    let asker = Link::new(format!(
        "the peer of accepted connection {:x}",
        request.connection
    ));
    let mut slots = Vec::with_capacity(request.qps.len());
    let mut answer = Vec::with_capacity(request.qps.len());
    let mut ports = Vec::new();
    for (i, q) in request.qps.iter().enumerate() {
        let nic = &nics[usize::from(q.peer_nic)];
        let (slot, mut addr) = nic
            .new_qp(false, usize::from(q.nic), asker.clone(), no_conn.clone())
            .map_err(verb)?;
        // Connecting to the addresses the peer sent (a GID of another kind, a LID on
        // Ethernet) can fail: a refusal that names the queue pair, not "unsupported".
        nic.connect_qp(&slot, q, addr.psn).map_err(|e| {
            refuse(format!(
                "could not connect queue pair {i} to the peer's address ({e})"
            ))
        })?;
        addr.peer_nic = q.nic;
        if !ports.contains(&nic.index) {
            ports.push(nic.index);
        }
        slots.push(slot);
        answer.push(addr);
    }
    let mut accepted = shared.accepted.lock();
    if request.replaces != 0 {
        if let Some((_, v)) = accepted.by_connection.remove(&request.replaces) {
            accepted.qps -= v.len();
        }
    }
    if let Some((_, v)) = accepted.by_connection.remove(&request.connection) {
        accepted.qps -= v.len();
    }
    accepted.make_room(slots.len(), limit);
    accepted.qps += slots.len();
    accepted
        .by_connection
        .insert(request.connection, (Instant::now(), slots));
    drop(accepted);
    let flush = ports.iter().map(|&p| nics[p].flush_word()).collect();
    Ok(Message {
        kind: Kind::Answer,
        connection: request.connection,
        replaces: 0,
        qps: answer,
        flush,
    }
    .encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qp(nic: u8, peer_nic: u8) -> QpAddr {
        QpAddr {
            nic,
            peer_nic,
            qpn: 5,
            psn: 1,
            lid: 0,
            gid: [0; 16],
            mtu: 3,
            rd_atomic: 16,
        }
    }

    #[test]
    fn endpoints_round_trip_their_link_layers() {
        assert_eq!(
            parse_endpoint("mlx5_0:1/ib,mlx5_1:1/eth").unwrap(),
            [LinkLayer::Infiniband, LinkLayer::Ethernet]
        );
        for bad in ["", "mlx5_0:1", "mlx5_0:1/fddi", "a/ib,,b/ib"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
        let many = vec!["x:1/ib"; 65].join(",");
        assert!(parse_endpoint(&many)
            .unwrap_err()
            .to_string()
            .contains("65 ports"));
    }

    #[test]
    fn answers_must_match_their_request() {
        let request = Message {
            kind: Kind::Request,
            connection: 9,
            replaces: 0,
            qps: vec![qp(0, 1), qp(1, 0)],
            flush: Vec::new(),
        };
        let good = Message {
            kind: Kind::Answer,
            connection: 9,
            replaces: 0,
            qps: vec![qp(1, 0), qp(0, 1)],
            flush: Vec::new(),
        };
        assert_eq!(check_answer(&request, &good, 2), Ok(()));
        let mut other = good.clone();
        other.connection = 8;
        assert!(check_answer(&request, &other, 2).is_err());
        let mut short = good.clone();
        short.qps.pop();
        assert!(check_answer(&request, &short, 2)
            .unwrap_err()
            .contains("1 queue pairs answered for 2"));
        let mut moved = good.clone();
        moved.qps[0].nic = 0;
        assert!(check_answer(&request, &moved, 2)
            .unwrap_err()
            .contains("another port"));
        assert!(
            check_answer(&request, &good, 1).is_err(),
            "a port the peer does not list"
        );
        let mut request_back = good.clone();
        request_back.kind = Kind::Request;
        assert!(check_answer(&request, &request_back, 2).is_err());
    }
}
