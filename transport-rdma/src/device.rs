//! What ferry knows of a host's RDMA devices, as plain data, and the choice of the ports
//! it drives. Discovery (`discovery.rs`) fills these records from ibverbs and sysfs;
//! everything here is pure, so the choice is tested over recorded attribute sets.

use serde::{Deserialize, Serialize};

use crate::gid::{choose_gid, GidEntry};

/// PCI vendor id of Amazon (EFA devices).
pub const VENDOR_AMAZON: u32 = 0x1d0f;
/// PCI vendor id of Mellanox / NVIDIA networking (ConnectX).
pub const VENDOR_MELLANOX: u32 = 0x02c9;

/// ibverbs' node type of a device (`ibv_node_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeType {
    /// An InfiniBand channel adapter (ConnectX in IB or RoCE mode, soft-RoCE).
    Ca,
    /// An iWARP RNIC.
    Rnic,
    /// A Cisco usNIC.
    Usnic,
    /// Anything else, including "unspecified" (what EFA reports).
    Other,
}

/// ibverbs' transport type of a device (`ibv_transport_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportType {
    /// InfiniBand transport (IB and RoCE).
    Ib,
    /// iWARP.
    Iwarp,
    /// usNIC.
    Usnic,
    /// Unspecified or unknown (EFA reports it).
    Other,
}

/// A port's state (`ibv_port_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortState {
    /// Link down.
    Down,
    /// Link up, not yet configured by the subnet manager.
    Init,
    /// Configured, not yet active.
    Armed,
    /// Active: the only state ferry uses.
    Active,
    /// Anything else.
    Other,
}

/// What a port's link runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkLayer {
    /// InfiniBand: addressed by LID within a subnet.
    Infiniband,
    /// Ethernet: RoCE, addressed by GID.
    Ethernet,
}

impl LinkLayer {
    /// The name `ferry info` prints.
    pub fn name(self) -> &'static str {
        match self {
            LinkLayer::Infiniband => "InfiniBand",
            LinkLayer::Ethernet => "Ethernet (RoCE)",
        }
    }
}

/// One port of a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    /// Port number (from 1).
    pub num: u8,
    /// Its state.
    pub state: PortState,
    /// `None` when ibverbs reports a link layer ferry does not know.
    pub link_layer: Option<LinkLayer>,
    /// Its LID (InfiniBand; 0 on Ethernet).
    pub lid: u16,
    /// The active MTU, as ibverbs' enum (1: 256 B ... 5: 4096 B).
    pub active_mtu: u8,
    /// The GID table's usable entries.
    pub gids: Vec<GidEntry>,
}

/// One RDMA device, as discovery found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Its ibverbs name (`mlx5_0`, `rxe0`, `rdmap16s27`).
    pub name: String,
    /// The kernel driver bound to it, from sysfs (`mlx5_core`, `efa`; `None` for a soft
    /// device such as `rxe`, which has no PCI function).
    pub driver: Option<String>,
    /// ibverbs' node type.
    pub node_type: NodeType,
    /// ibverbs' transport type.
    pub transport: TransportType,
    /// PCI vendor id, from the device's attributes.
    pub vendor_id: u32,
    /// Vendor part id.
    pub vendor_part_id: u32,
    /// NUMA node of its PCI function, when the kernel knows it.
    pub numa_node: Option<u32>,
    /// Its place on the PCI tree: the resolved sysfs path of its PCI function
    /// (`/sys/devices/pci0000:00/0000:00:02.0/0000:03:00.0`), when it has one.
    pub pci_path: Option<String>,
    /// Its ports.
    pub ports: Vec<PortInfo>,
}

impl DeviceInfo {
    /// Why ibverbs RC queue pairs cannot be used on this device, if they cannot: EFA
    /// devices appear in `ibv_get_device_list` but refuse RC queue pairs (`EOPNOTSUPP`),
    /// and iWARP and usNIC devices are not InfiniBand transports. An EFA device is told by
    /// any of its driver (`efa`), its vendor (Amazon) or its unspecified node and
    /// transport types, so a single misreported attribute does not let one through.
    pub fn unusable(&self) -> Option<String> {
        let efa = self.driver.as_deref() == Some("efa")
            || self.vendor_id == VENDOR_AMAZON
            || (self.node_type == NodeType::Other && self.transport == TransportType::Other);
        if efa {
            return Some(
                "an EFA device: ibverbs cannot create RC queue pairs on it (ferry reaches EFA \
                 with protocol `efa`)"
                    .into(),
            );
        }
        match (self.node_type, self.transport) {
            (NodeType::Ca, TransportType::Ib) => None,
            (_, TransportType::Iwarp) | (NodeType::Rnic, _) => {
                Some("an iWARP device: ferry's RDMA transport runs over InfiniBand and RoCE".into())
            }
            (_, TransportType::Usnic) | (NodeType::Usnic, _) => {
                Some("a usNIC device: ferry's RDMA transport runs over InfiniBand and RoCE".into())
            }
            _ => Some(format!(
                "node type {:?} with transport {:?} is not an InfiniBand channel adapter",
                self.node_type, self.transport
            )),
        }
    }
}

/// A port ferry drives: a device, one of its ports and the address it is reached by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// The device's ibverbs name.
    pub device: String,
    /// The port number.
    pub port: u8,
    /// What the link runs over.
    pub link_layer: LinkLayer,
    /// Its LID (InfiniBand).
    pub lid: u16,
    /// The GID table index used as the source GID.
    pub gid_index: u8,
    /// That GID.
    pub gid: [u8; 16],
    /// The active MTU (ibverbs' enum).
    pub mtu: u8,
    /// NUMA node of the device.
    pub numa_node: Option<u32>,
    /// PCI path of the device.
    pub pci_path: Option<String>,
}

impl Nic {
    /// `device:port`, as the allow-list and logs name it.
    pub fn label(&self) -> String {
        format!("{}:{}", self.device, self.port)
    }
}

/// A device or port left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// `device` or `device:port`.
    pub what: String,
    /// Why it is not used.
    pub why: String,
}

/// The outcome of choosing ports: what ferry drives, and what it left out with reasons
/// (`ferry info` prints both; an engine that finds no port names them in its error).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// The ports to drive, in device order then port order: rail 0 first.
    pub nics: Vec<Nic>,
    /// Everything left out.
    pub skipped: Vec<Skipped>,
}

impl Selection {
    /// One line per port left out, for errors.
    pub fn explain(&self) -> String {
        if self.skipped.is_empty() {
            return "no device was found".into();
        }
        self.skipped
            .iter()
            .map(|s| format!("{}: {}", s.what, s.why))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Whether the allow-list admits `device:port`: an entry names a device (`mlx5_0`, all
/// its ports) or one port (`mlx5_0:1`). An empty list admits everything.
fn allowed(allow: &[String], device: &str, port: u8) -> bool {
    allow.is_empty()
        || allow.iter().any(|a| match a.split_once(':') {
            Some((d, p)) => d == device && p.parse::<u8>().ok() == Some(port),
            None => a == device,
        })
}

/// Chooses the ports to drive among `devices`: every ACTIVE port of a device that can
/// create RC queue pairs, on a link layer ferry knows, with a usable source GID (see
/// [`choose_gid`]; `gid_index` overrides the automatic choice), admitted by `allow`.
/// Entries of `allow` that match nothing are reported as skipped, so a typo is visible.
pub fn select(devices: &[DeviceInfo], allow: &[String], gid_index: Option<u8>) -> Selection {
    let mut out = Selection::default();
    for d in devices {
        if !allow.is_empty() && !d.ports.iter().any(|p| allowed(allow, &d.name, p.num)) {
            out.skipped.push(Skipped {
                what: d.name.clone(),
                why: "not named in the device list of the configuration".into(),
            });
            continue;
        }
        if let Some(why) = d.unusable() {
            out.skipped.push(Skipped {
                what: d.name.clone(),
                why,
            });
            continue;
        }
        if d.ports.is_empty() {
            out.skipped.push(Skipped {
                what: d.name.clone(),
                why: "it reports no ports".into(),
            });
        }
        for p in &d.ports {
            let what = format!("{}:{}", d.name, p.num);
            let skip = |why: String| Skipped {
                what: what.clone(),
                why,
            };
            if !allowed(allow, &d.name, p.num) {
                out.skipped.push(skip(
                    "not named in the device list of the configuration".into(),
                ));
                continue;
            }
            if p.state != PortState::Active {
                out.skipped
                    .push(skip(format!("the port is {:?}, not Active", p.state)));
                continue;
            }
            let Some(link_layer) = p.link_layer else {
                out.skipped.push(skip(
                    "the port's link layer is neither InfiniBand nor Ethernet".into(),
                ));
                continue;
            };
            if link_layer == LinkLayer::Infiniband && p.lid == 0 {
                out.skipped.push(skip(
                    "the InfiniBand port has no LID (no subnet manager?)".into(),
                ));
                continue;
            }
            match choose_gid(link_layer, &p.gids, gid_index) {
                Ok(g) => out.nics.push(Nic {
                    device: d.name.clone(),
                    port: p.num,
                    link_layer,
                    lid: p.lid,
                    gid_index: g.index,
                    gid: g.gid,
                    mtu: p.active_mtu,
                    numa_node: d.numa_node,
                    pci_path: d.pci_path.clone(),
                }),
                Err(why) => out.skipped.push(skip(why)),
            }
        }
    }
    for a in allow {
        let (dev, port) = match a.split_once(':') {
            Some((d, p)) => (d, p.parse::<u8>().ok()),
            None => (a.as_str(), None),
        };
        let found = devices
            .iter()
            .any(|d| d.name == dev && port.is_none_or(|n| d.ports.iter().any(|p| p.num == n)));
        if !found {
            out.skipped.push(Skipped {
                what: a.clone(),
                why: "named in the device list of the configuration, but not on this host".into(),
            });
        }
    }
    out
}

/// Recorded attribute sets of real devices, for tests here and in the engine.
#[doc(hidden)]
pub mod samples {
    use super::*;
    use crate::gid::{GidEntry, GidKind};

    fn gid(bytes: [u8; 16], index: u8, kind: GidKind, netdev: Option<&str>) -> GidEntry {
        GidEntry {
            index,
            gid: bytes,
            kind,
            netdev: netdev.map(str::to_string),
            netdev_up: netdev.is_some(),
        }
    }

    /// `fe80::...` link-local GID of an interface.
    pub fn link_local(tail: u8) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[0] = 0xfe;
        g[1] = 0x80;
        g[8..16].copy_from_slice(&[0x02, 0x11, 0x22, 0xff, 0xfe, 0x33, 0x44, tail]);
        g
    }

    /// The IPv4-mapped GID `::ffff:a.b.c.d`.
    pub fn v4(a: u8, b: u8, c: u8, d: u8) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..16].copy_from_slice(&[a, b, c, d]);
        g
    }

    /// A ConnectX-6 in InfiniBand mode: one active port, LID 7.
    pub fn mlx5_ib(name: &str, numa: u32, pci: &str) -> DeviceInfo {
        let mut g0 = [0u8; 16];
        g0[0] = 0xfe;
        g0[1] = 0x80;
        g0[8..16].copy_from_slice(&[0x0c, 0x42, 0xa1, 0x03, 0x00, 0x9b, 0x1e, 0x5a]);
        DeviceInfo {
            name: name.into(),
            driver: Some("mlx5_core".into()),
            node_type: NodeType::Ca,
            transport: TransportType::Ib,
            vendor_id: VENDOR_MELLANOX,
            vendor_part_id: 4123,
            numa_node: Some(numa),
            pci_path: Some(pci.into()),
            ports: vec![PortInfo {
                num: 1,
                state: PortState::Active,
                link_layer: Some(LinkLayer::Infiniband),
                lid: 7,
                active_mtu: 5,
                gids: vec![gid(g0, 0, GidKind::Ib, None)],
            }],
        }
    }

    /// A ConnectX-6 Dx in Ethernet mode (RoCE): the usual four GIDs of an interface
    /// with an IPv4 address (v1 and v2 of the link-local and of the IPv4-mapped one).
    pub fn mlx5_roce(name: &str, numa: u32, pci: &str, ip: [u8; 4]) -> DeviceInfo {
        let netdev = Some("ens1f0np0");
        let v4 = v4(ip[0], ip[1], ip[2], ip[3]);
        DeviceInfo {
            name: name.into(),
            driver: Some("mlx5_core".into()),
            node_type: NodeType::Ca,
            transport: TransportType::Ib,
            vendor_id: VENDOR_MELLANOX,
            vendor_part_id: 4125,
            numa_node: Some(numa),
            pci_path: Some(pci.into()),
            ports: vec![PortInfo {
                num: 1,
                state: PortState::Active,
                link_layer: Some(LinkLayer::Ethernet),
                lid: 0,
                active_mtu: 3,
                gids: vec![
                    gid(link_local(1), 0, GidKind::RoceV1, netdev),
                    gid(link_local(1), 1, GidKind::RoceV2, netdev),
                    gid(v4, 2, GidKind::RoceV1, netdev),
                    gid(v4, 3, GidKind::RoceV2, netdev),
                ],
            }],
        }
    }

    /// An AWS EFA device as ibverbs lists it: unspecified node and transport types,
    /// Amazon's vendor id, driver `efa`; its one port looks active.
    pub fn efa(name: &str) -> DeviceInfo {
        DeviceInfo {
            name: name.into(),
            driver: Some("efa".into()),
            node_type: NodeType::Other,
            transport: TransportType::Other,
            vendor_id: VENDOR_AMAZON,
            vendor_part_id: 0xefa1,
            numa_node: Some(0),
            pci_path: Some("/sys/devices/pci0000:00/0000:00:1d.0".into()),
            ports: vec![PortInfo {
                num: 1,
                state: PortState::Active,
                link_layer: Some(LinkLayer::Infiniband),
                lid: 0,
                active_mtu: 4,
                gids: vec![gid(link_local(9), 0, GidKind::Ib, None)],
            }],
        }
    }

    /// Soft-RoCE (`rxe`) over a veth: no PCI function, no driver link, RoCE v2 GIDs.
    pub fn rxe(name: &str, netdev: &str, ip: [u8; 4]) -> DeviceInfo {
        let nd = Some(netdev);
        DeviceInfo {
            name: name.into(),
            driver: None,
            node_type: NodeType::Ca,
            transport: TransportType::Ib,
            vendor_id: 0xffffff,
            vendor_part_id: 0,
            numa_node: None,
            pci_path: None,
            ports: vec![PortInfo {
                num: 1,
                state: PortState::Active,
                link_layer: Some(LinkLayer::Ethernet),
                lid: 0,
                active_mtu: 3,
                gids: vec![
                    gid(link_local(2), 0, GidKind::RoceV2, nd),
                    gid(v4(ip[0], ip[1], ip[2], ip[3]), 1, GidKind::RoceV2, nd),
                ],
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::samples::*;
    use super::*;

    const PCI0: &str = "/sys/devices/pci0000:00/0000:00:02.0/0000:03:00.0";
    const PCI1: &str = "/sys/devices/pci0000:80/0000:80:02.0/0000:83:00.0";

    #[test]
    fn efa_devices_are_never_selected() {
        let efa = efa("rdmap16s27");
        assert!(efa.unusable().unwrap().contains("EFA"));
        // Any one of the three signs is enough.
        let mut by_driver = mlx5_ib("x", 0, PCI0);
        by_driver.driver = Some("efa".into());
        assert!(by_driver.unusable().is_some());
        let mut by_vendor = mlx5_ib("x", 0, PCI0);
        by_vendor.vendor_id = VENDOR_AMAZON;
        assert!(by_vendor.unusable().is_some());
        let mut by_types = mlx5_ib("x", 0, PCI0);
        by_types.driver = None;
        by_types.node_type = NodeType::Other;
        by_types.transport = TransportType::Other;
        assert!(by_types.unusable().unwrap().contains("EFA"));
        // An EFA host with a ConnectX too: only the ConnectX is driven, even when the
        // allow-list names the EFA device.
        let devices = [efa.clone(), mlx5_ib("mlx5_0", 0, PCI0)];
        let s = select(&devices, &[], None);
        assert_eq!(s.nics.len(), 1);
        assert_eq!(s.nics[0].device, "mlx5_0");
        assert_eq!(s.skipped[0].what, "rdmap16s27");
        let s = select(&devices, &["rdmap16s27".into()], None);
        assert!(s.nics.is_empty());
        assert!(s.explain().contains("EFA"), "{}", s.explain());
    }

    #[test]
    fn mlx5_ib_and_roce_and_rxe_are_selected_with_their_addresses() {
        let devices = [
            mlx5_ib("mlx5_0", 0, PCI0),
            mlx5_roce("mlx5_1", 1, PCI1, [10, 0, 0, 5]),
            rxe("rxe0", "veth0", [192, 168, 7, 1]),
        ];
        let s = select(&devices, &[], None);
        assert!(s.skipped.is_empty(), "{:?}", s.skipped);
        let ib = &s.nics[0];
        assert_eq!(
            (ib.link_layer, ib.lid, ib.gid_index, ib.mtu),
            (LinkLayer::Infiniband, 7, 0, 5)
        );
        let roce = &s.nics[1];
        assert_eq!(roce.link_layer, LinkLayer::Ethernet);
        assert_eq!(
            (roce.gid_index, roce.gid),
            (3, v4(10, 0, 0, 5)),
            "RoCE v2, IPv4-mapped"
        );
        assert_eq!(roce.numa_node, Some(1));
        assert_eq!(s.nics[2].gid, v4(192, 168, 7, 1));
        assert_eq!(s.nics[2].pci_path, None);
        assert_eq!(s.nics[1].label(), "mlx5_1:1");
    }

    #[test]
    fn ports_that_are_down_or_unaddressable_are_skipped_with_a_reason() {
        let mut down = mlx5_ib("mlx5_0", 0, PCI0);
        down.ports[0].state = PortState::Down;
        let mut no_lid = mlx5_ib("mlx5_1", 0, PCI0);
        no_lid.ports[0].lid = 0;
        let mut no_gid = mlx5_roce("mlx5_2", 0, PCI0, [10, 0, 0, 1]);
        for g in &mut no_gid.ports[0].gids {
            g.netdev_up = false;
        }
        let mut unknown = mlx5_ib("mlx5_3", 0, PCI0);
        unknown.ports[0].link_layer = None;
        let s = select(&[down, no_lid, no_gid, unknown], &[], None);
        assert!(s.nics.is_empty());
        let whys: Vec<&str> = s.skipped.iter().map(|k| k.why.as_str()).collect();
        assert!(whys[0].contains("Down"), "{whys:?}");
        assert!(whys[1].contains("LID"), "{whys:?}");
        assert!(whys[2].contains("GID"), "{whys:?}");
        assert!(whys[3].contains("link layer"), "{whys:?}");
        assert_eq!(s.skipped[0].what, "mlx5_0:1");
    }

    #[test]
    fn the_allow_list_names_devices_or_ports_and_reports_what_it_misses() {
        let mut two_ports = mlx5_ib("mlx5_0", 0, PCI0);
        let mut p2 = two_ports.ports[0].clone();
        p2.num = 2;
        p2.lid = 8;
        two_ports.ports.push(p2);
        let devices = [two_ports, mlx5_ib("mlx5_1", 1, PCI1)];
        let all = select(&devices, &[], None);
        assert_eq!(all.nics.len(), 3);
        let one_device = select(&devices, &["mlx5_1".into()], None);
        assert_eq!(one_device.nics.len(), 1);
        assert_eq!(one_device.nics[0].device, "mlx5_1");
        let one_port = select(&devices, &["mlx5_0:2".into()], None);
        assert_eq!(one_port.nics.len(), 1);
        assert_eq!((one_port.nics[0].port, one_port.nics[0].lid), (2, 8));
        let typo = select(&devices, &["mlx5_9".into(), "mlx5_0:3".into()], None);
        assert!(typo.nics.is_empty());
        let missing: Vec<&str> = typo
            .skipped
            .iter()
            .filter(|k| k.why.contains("not on this host"))
            .map(|k| k.what.as_str())
            .collect();
        assert_eq!(missing, ["mlx5_9", "mlx5_0:3"]);
    }

    #[test]
    fn no_devices_is_explained() {
        let s = select(&[], &[], None);
        assert!(s.nics.is_empty());
        assert_eq!(s.explain(), "no device was found");
    }

    #[test]
    fn iwarp_and_usnic_are_refused() {
        let mut iwarp = mlx5_roce("iw0", 0, PCI0, [10, 0, 0, 1]);
        iwarp.node_type = NodeType::Rnic;
        iwarp.transport = TransportType::Iwarp;
        iwarp.driver = Some("iw_cxgb4".into());
        iwarp.vendor_id = 0x1425;
        assert!(iwarp.unusable().unwrap().contains("iWARP"));
        let mut usnic = iwarp.clone();
        usnic.node_type = NodeType::Usnic;
        usnic.transport = TransportType::Usnic;
        assert!(usnic.unusable().unwrap().contains("usNIC"));
    }

    #[test]
    fn records_serialize() {
        let d = mlx5_roce("mlx5_1", 1, PCI1, [10, 0, 0, 5]);
        let text = serde_json::to_string(&d).unwrap();
        let back: DeviceInfo = serde_json::from_str(&text).unwrap();
        assert_eq!(back, d);
    }
}
