//! The choice of a port's source GID: pure, over the GID table discovery reads.
//!
//! On InfiniBand a port is addressed by its LID and GID index 0 is its GID. On Ethernet
//! (RoCE) every packet carries GIDs, and the table holds one entry per address of the
//! port's network interface and RoCE version. Both sides must pick entries of the same
//! RoCE version that are routable between them; the usual choice, and ferry's, is the
//! RoCE v2 entry of an IPv4 address (the IPv4-mapped GID `::ffff:a.b.c.d`), routable
//! across L3, of an interface that is up.

use serde::{Deserialize, Serialize};

use crate::device::LinkLayer;

/// What kind of address a GID table entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GidKind {
    /// An InfiniBand GID.
    Ib,
    /// RoCE v1 (Ethernet, not routable).
    RoceV1,
    /// RoCE v2 (UDP/IP, routable).
    RoceV2,
}

/// One entry of a port's GID table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GidEntry {
    /// Its index in the table.
    pub index: u8,
    /// The GID.
    pub gid: [u8; 16],
    /// Its kind.
    pub kind: GidKind,
    /// The network interface the entry belongs to (RoCE).
    pub netdev: Option<String>,
    /// Whether that interface is up.
    pub netdev_up: bool,
}

impl GidEntry {
    /// The GID as text: an IPv4 address for an IPv4-mapped GID, else IPv6 notation.
    pub fn text(&self) -> String {
        gid_text(&self.gid)
    }
}

/// A GID as text: an IPv4 address for an IPv4-mapped GID, else IPv6 notation.
pub fn gid_text(gid: &[u8; 16]) -> String {
    let ip = std::net::Ipv6Addr::from(*gid);
    match ip.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => ip.to_string(),
    }
}

/// Whether a GID is the IPv4-mapped form of an IPv4 address.
pub fn is_ipv4_mapped(gid: &[u8; 16]) -> bool {
    std::net::Ipv6Addr::from(*gid).to_ipv4_mapped().is_some()
}

fn is_link_local(gid: &[u8; 16]) -> bool {
    gid[0] == 0xfe && gid[1] & 0xc0 == 0x80
}

/// The chosen source GID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChosenGid {
    /// Its table index.
    pub index: u8,
    /// The GID.
    pub gid: [u8; 16],
}

/// Chooses a port's source GID.
///
/// - `wanted` (the configuration's `gid_index`) is taken as is when the table has it, and
///   refused when it does not;
/// - InfiniBand: index 0 (the port GID);
/// - Ethernet, best first: RoCE v2 with an IPv4-mapped GID; RoCE v2 with a global IPv6
///   GID; RoCE v2 link-local; RoCE v1 (IPv4-mapped first). Only entries of an interface
///   that is up count; ties go to the lowest index.
pub fn choose_gid(
    link_layer: LinkLayer,
    gids: &[GidEntry],
    wanted: Option<u8>,
) -> Result<ChosenGid, String> {
    let chosen = |e: &GidEntry| ChosenGid {
        index: e.index,
        gid: e.gid,
    };
    if let Some(index) = wanted {
        return gids
            .iter()
            .find(|e| e.index == index)
            .map(chosen)
            .ok_or_else(|| {
                format!("the configured GID index {index} is not in the port's GID table")
            });
    }
    match link_layer {
        LinkLayer::Infiniband => gids
            .iter()
            .find(|e| e.index == 0)
            .map(chosen)
            .ok_or_else(|| "the InfiniBand port has no GID at index 0".into()),
        LinkLayer::Ethernet => {
            let rank = |e: &GidEntry| -> Option<u8> {
                if !e.netdev_up || e.gid == [0; 16] {
                    return None;
                }
                let v4 = is_ipv4_mapped(&e.gid);
                let ll = is_link_local(&e.gid);
                Some(match (e.kind, v4, ll) {
                    (GidKind::RoceV2, true, _) => 0,
                    (GidKind::RoceV2, false, false) => 1,
                    (GidKind::RoceV2, false, true) => 2,
                    (GidKind::RoceV1, true, _) => 3,
                    (GidKind::RoceV1, false, _) => 4,
                    (GidKind::Ib, ..) => return None,
                })
            };
            gids.iter()
                .filter_map(|e| rank(e).map(|r| (r, e.index, e)))
                .min_by_key(|&(r, index, _)| (r, index))
                .map(|(_, _, e)| chosen(e))
                .ok_or_else(|| {
                    "the RoCE port has no GID of an interface that is up (give its interface \
                     an IP address, or set gid_index)"
                        .into()
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::samples::{link_local, v4};

    fn e(index: u8, gid: [u8; 16], kind: GidKind, up: bool) -> GidEntry {
        GidEntry {
            index,
            gid,
            kind,
            netdev: Some("eth0".into()),
            netdev_up: up,
        }
    }

    fn global_v6() -> [u8; 16] {
        let mut g = [0u8; 16];
        g[0] = 0x20;
        g[1] = 0x01;
        g[2] = 0x0d;
        g[3] = 0xb8;
        g[15] = 9;
        g
    }

    #[test]
    fn roce_prefers_v2_ipv4_then_v2_ipv6_then_v1() {
        let ip = v4(10, 1, 2, 3);
        let table = vec![
            e(0, link_local(1), GidKind::RoceV1, true),
            e(1, link_local(1), GidKind::RoceV2, true),
            e(2, ip, GidKind::RoceV1, true),
            e(3, ip, GidKind::RoceV2, true),
            e(4, global_v6(), GidKind::RoceV2, true),
        ];
        let pick = |t: &[GidEntry]| choose_gid(LinkLayer::Ethernet, t, None).map(|c| c.index);
        assert_eq!(pick(&table), Ok(3));
        assert_eq!(pick(&table[..3]), Ok(1), "v2 link-local over any v1");
        let no_v4v2: Vec<_> = table.iter().filter(|g| g.index != 3).cloned().collect();
        assert_eq!(pick(&no_v4v2), Ok(4), "a global IPv6 v2 GID next");
        assert_eq!(
            pick(&[table[0].clone(), table[2].clone()]),
            Ok(2),
            "v1, IPv4 first"
        );
        // An interface that is down does not count.
        let mut down = table.clone();
        down[3].netdev_up = false;
        assert_eq!(pick(&down), Ok(4));
        let all_down: Vec<_> = table
            .iter()
            .map(|g| GidEntry {
                netdev_up: false,
                ..g.clone()
            })
            .collect();
        assert!(pick(&all_down).unwrap_err().contains("up"));
        // Ties go to the lowest index.
        let twice = vec![
            e(7, ip, GidKind::RoceV2, true),
            e(5, v4(10, 9, 9, 9), GidKind::RoceV2, true),
        ];
        assert_eq!(pick(&twice), Ok(5));
    }

    #[test]
    fn an_override_is_taken_when_present() {
        let table = vec![
            e(0, link_local(1), GidKind::RoceV1, true),
            e(3, v4(10, 1, 2, 3), GidKind::RoceV2, true),
        ];
        let c = choose_gid(LinkLayer::Ethernet, &table, Some(0)).unwrap();
        assert_eq!((c.index, c.gid), (0, link_local(1)));
        let err = choose_gid(LinkLayer::Ethernet, &table, Some(9)).unwrap_err();
        assert!(err.contains("9"), "{err}");
    }

    #[test]
    fn infiniband_uses_index_zero() {
        let table = vec![
            e(0, link_local(4), GidKind::Ib, false),
            e(1, link_local(5), GidKind::Ib, false),
        ];
        assert_eq!(
            choose_gid(LinkLayer::Infiniband, &table, None)
                .unwrap()
                .index,
            0
        );
        assert!(choose_gid(LinkLayer::Infiniband, &table[1..], None).is_err());
    }

    #[test]
    fn gids_print_as_addresses() {
        assert_eq!(gid_text(&v4(192, 168, 7, 1)), "192.168.7.1");
        assert_eq!(gid_text(&link_local(1)), "fe80::211:22ff:fe33:4401");
    }
}
