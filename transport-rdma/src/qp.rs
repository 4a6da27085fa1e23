//! An RC queue pair's way from RESET to RTS, as data: each transition's attributes and
//! the mask of those it sets, built by pure functions (tested here) and applied by
//! `verbs.rs` with one `ibv_modify_qp` each.
//!
//! - INIT: port, P_Key index 0, the remote access rights both sides' READs and WRITEs
//!   need (the NIC still checks every request against the memory region's own rights);
//! - RTR: the peer's QPN and first PSN, the path MTU both ports support (the smaller of
//!   the two), the address: a global route (GRH) to the peer's GID on RoCE or across IB
//!   subnets, its LID on one IB subnet; as many incoming READs in flight as the device
//!   allows;
//! - RTS: our first PSN, the ACK timeout and retry counts, and as many outgoing READs in
//!   flight as both devices allow (the peer says how many it accepts).

use rdma_sys::{ibv_access_flags, ibv_qp_attr_mask as attr, ibv_qp_state};

use crate::device::LinkLayer;
use crate::exchange::QpAddr;

/// The settings every queue pair of a transport is brought up with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpSettings {
    /// Local port number.
    pub port: u8,
    /// What the local port's link runs over.
    pub link_layer: LinkLayer,
    /// The local source GID's table index.
    pub gid_index: u8,
    /// The local port's active MTU (ibverbs' enum).
    pub mtu: u8,
    /// READs in flight a queue pair accepts as a responder (`max_qp_rd_atom` of the
    /// device, at most 16).
    pub rd_atomic: u8,
    /// READs in flight a queue pair may have outstanding as a requester
    /// (`max_qp_init_rd_atom` of the device, at most 16).
    pub init_rd_atomic: u8,
    /// ACK timeout exponent: 4.096 µs × 2^timeout (14: about 67 ms).
    pub timeout: u8,
    /// Transport retries before a work request fails (at most 7).
    pub retry_cnt: u8,
    /// Receiver-not-ready retries (7: infinite; ferry posts no receives, so none occur).
    pub rnr_retry: u8,
    /// Traffic class of the GRH (RoCE: the DSCP bits).
    pub traffic_class: u8,
    /// Service level (InfiniBand).
    pub service_level: u8,
}

/// One `ibv_modify_qp`: the state it moves to and every attribute it sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// `IBV_QPS_*`.
    pub state: u32,
    /// `IBV_QP_*` bits of the attributes set.
    pub mask: u32,
    /// Local port (INIT).
    pub port: u8,
    /// Remote access rights (INIT).
    pub access: u32,
    /// Path MTU (RTR).
    pub path_mtu: u32,
    /// The peer's QPN (RTR).
    pub dest_qpn: u32,
    /// The peer's first PSN (RTR).
    pub rq_psn: u32,
    /// Incoming READs in flight (RTR).
    pub max_dest_rd_atomic: u8,
    /// RNR NAK timer (RTR).
    pub min_rnr_timer: u8,
    /// The address of the peer (RTR).
    pub ah: Address,
    /// Our first PSN (RTS).
    pub sq_psn: u32,
    /// ACK timeout (RTS).
    pub timeout: u8,
    /// Retries (RTS).
    pub retry_cnt: u8,
    /// RNR retries (RTS).
    pub rnr_retry: u8,
    /// Outgoing READs in flight (RTS).
    pub max_rd_atomic: u8,
}

/// The peer's address as the RTR transition sets it (`ibv_ah_attr`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Address {
    /// Whether packets carry a global route header (always on RoCE).
    pub is_global: bool,
    /// The peer's LID (InfiniBand).
    pub dlid: u16,
    /// The peer's GID.
    pub dgid: [u8; 16],
    /// Our source GID's table index.
    pub sgid_index: u8,
    /// Hops the packet may cross (GRH).
    pub hop_limit: u8,
    /// Traffic class (GRH).
    pub traffic_class: u8,
    /// Service level.
    pub sl: u8,
    /// Local port.
    pub port: u8,
}

impl Transition {
    fn to(state: u32, mask: u32) -> Self {
        Transition {
            state,
            mask,
            port: 0,
            access: 0,
            path_mtu: 0,
            dest_qpn: 0,
            rq_psn: 0,
            max_dest_rd_atomic: 0,
            min_rnr_timer: 0,
            ah: Address::default(),
            sq_psn: 0,
            timeout: 0,
            retry_cnt: 0,
            rnr_retry: 0,
            max_rd_atomic: 0,
        }
    }
}

/// RESET → INIT.
pub fn init(s: &QpSettings) -> Transition {
    let m = attr::IBV_QP_STATE
        | attr::IBV_QP_PKEY_INDEX
        | attr::IBV_QP_PORT
        | attr::IBV_QP_ACCESS_FLAGS;
    let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
        | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
        | ibv_access_flags::IBV_ACCESS_REMOTE_READ;
    Transition {
        port: s.port,
        access: access.0,
        ..Transition::to(ibv_qp_state::IBV_QPS_INIT, m.0)
    }
}

/// INIT → RTR, towards the peer's queue pair `peer`.
pub fn ready_to_receive(s: &QpSettings, peer: &QpAddr) -> Transition {
    let m = attr::IBV_QP_STATE
        | attr::IBV_QP_AV
        | attr::IBV_QP_PATH_MTU
        | attr::IBV_QP_DEST_QPN
        | attr::IBV_QP_RQ_PSN
        | attr::IBV_QP_MAX_DEST_RD_ATOMIC
        | attr::IBV_QP_MIN_RNR_TIMER;
    // A GRH on Ethernet always; on InfiniBand only for a peer without a LID (in another
    // subnet, reached through a router).
    let is_global = s.link_layer == LinkLayer::Ethernet || peer.lid == 0;
    Transition {
        path_mtu: u32::from(s.mtu.min(peer.mtu).max(1)),
        dest_qpn: peer.qpn,
        rq_psn: peer.psn,
        max_dest_rd_atomic: s.rd_atomic,
        min_rnr_timer: 12,
        ah: Address {
            is_global,
            dlid: if s.link_layer == LinkLayer::Infiniband {
                peer.lid
            } else {
                0
            },
            dgid: peer.gid,
            sgid_index: s.gid_index,
            hop_limit: if is_global { 64 } else { 0 },
            traffic_class: s.traffic_class,
            sl: s.service_level,
            port: s.port,
        },
        ..Transition::to(ibv_qp_state::IBV_QPS_RTR, m.0)
    }
}

/// RTR → RTS, sending from `psn` to a peer that accepts `peer_rd_atomic` READs in flight.
pub fn ready_to_send(s: &QpSettings, psn: u32, peer_rd_atomic: u8) -> Transition {
    let m = attr::IBV_QP_STATE
        | attr::IBV_QP_TIMEOUT
        | attr::IBV_QP_RETRY_CNT
        | attr::IBV_QP_RNR_RETRY
        | attr::IBV_QP_SQ_PSN
        | attr::IBV_QP_MAX_QP_RD_ATOMIC;
    Transition {
        sq_psn: psn & 0xff_ffff,
        timeout: s.timeout,
        retry_cnt: s.retry_cnt.min(7),
        rnr_retry: s.rnr_retry.min(7),
        max_rd_atomic: s.init_rd_atomic.min(peer_rd_atomic).max(1),
        ..Transition::to(ibv_qp_state::IBV_QPS_RTS, m.0)
    }
}

/// Any state → RESET: what a queue pair that failed goes through before it is reused
/// or destroyed.
pub fn reset() -> Transition {
    Transition::to(ibv_qp_state::IBV_QPS_RESET, attr::IBV_QP_STATE.0)
}

/// Every transition from RESET to RTS towards `peer`, in order.
pub fn bring_up(s: &QpSettings, peer: &QpAddr, psn: u32) -> [Transition; 3] {
    [
        init(s),
        ready_to_receive(s, peer),
        ready_to_send(s, psn, peer.rd_atomic),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(link_layer: LinkLayer) -> QpSettings {
        QpSettings {
            port: 1,
            link_layer,
            gid_index: 3,
            mtu: 5,
            rd_atomic: 16,
            init_rd_atomic: 16,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            traffic_class: 0,
            service_level: 0,
        }
    }

    fn peer(lid: u16, mtu: u8) -> QpAddr {
        QpAddr {
            nic: 0,
            peer_nic: 0,
            qpn: 0x1234,
            psn: 0x42,
            lid,
            gid: [7; 16],
            mtu,
            rd_atomic: 8,
        }
    }

    #[test]
    fn the_states_follow_reset_init_rtr_rts() {
        let s = settings(LinkLayer::Infiniband);
        let steps = bring_up(&s, &peer(9, 5), 0x0100_0077);
        let states: Vec<u32> = steps.iter().map(|t| t.state).collect();
        assert_eq!(
            states,
            [
                ibv_qp_state::IBV_QPS_INIT,
                ibv_qp_state::IBV_QPS_RTR,
                ibv_qp_state::IBV_QPS_RTS
            ]
        );
        for t in &steps {
            assert_ne!(
                t.mask & attr::IBV_QP_STATE.0,
                0,
                "every step sets the state"
            );
        }
        assert_eq!(steps[2].sq_psn, 0x77, "PSNs are 24 bits");
        assert_eq!(reset().state, ibv_qp_state::IBV_QPS_RESET);
        assert_eq!(reset().mask, attr::IBV_QP_STATE.0);
    }

    #[test]
    fn init_grants_what_reads_and_writes_need() {
        let t = init(&settings(LinkLayer::Ethernet));
        assert_eq!(t.port, 1);
        let want = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        assert_eq!(t.access, want.0);
        assert_eq!(t.access & ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC.0, 0);
        let m = attr::IBV_QP_STATE
            | attr::IBV_QP_PKEY_INDEX
            | attr::IBV_QP_PORT
            | attr::IBV_QP_ACCESS_FLAGS;
        assert_eq!(t.mask, m.0);
    }

    #[test]
    fn rtr_addresses_roce_by_gid_and_infiniband_by_lid() {
        let roce = ready_to_receive(&settings(LinkLayer::Ethernet), &peer(0, 3));
        assert!(roce.ah.is_global);
        assert_eq!(
            (roce.ah.dgid, roce.ah.sgid_index, roce.ah.dlid),
            ([7; 16], 3, 0)
        );
        assert!(roce.ah.hop_limit > 1, "RoCE v2 crosses routers");
        assert_eq!(roce.path_mtu, 3, "the smaller MTU of the two ports");
        assert_eq!((roce.dest_qpn, roce.rq_psn), (0x1234, 0x42));
        assert_ne!(roce.mask & attr::IBV_QP_AV.0, 0);
        assert_ne!(roce.mask & attr::IBV_QP_MAX_DEST_RD_ATOMIC.0, 0);
        let ib = ready_to_receive(&settings(LinkLayer::Infiniband), &peer(9, 5));
        assert!(!ib.ah.is_global);
        assert_eq!((ib.ah.dlid, ib.path_mtu, ib.ah.port), (9, 5, 1));
        let routed = ready_to_receive(&settings(LinkLayer::Infiniband), &peer(0, 4));
        assert!(
            routed.ah.is_global,
            "an IB peer without a LID is reached by GID"
        );
    }

    #[test]
    fn rts_bounds_retries() {
        let mut s = settings(LinkLayer::Infiniband);
        s.retry_cnt = 9;
        s.rnr_retry = 200;
        let t = ready_to_send(&s, 5, 16);
        assert_eq!(
            (t.retry_cnt, t.rnr_retry, t.timeout, t.max_rd_atomic),
            (7, 7, 14, 16)
        );
        assert_eq!(
            ready_to_send(&s, 5, 4).max_rd_atomic,
            4,
            "no more than the peer accepts"
        );
        let steps = bring_up(&s, &peer(9, 5), 1);
        assert_eq!(
            (steps[1].max_dest_rd_atomic, steps[2].max_rd_atomic),
            (16, 8)
        );
        assert_ne!(t.mask & attr::IBV_QP_SQ_PSN.0, 0);
        assert_eq!(
            t.mask & attr::IBV_QP_AV.0,
            0,
            "RTS does not touch the address"
        );
    }
}
