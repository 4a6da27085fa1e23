//! Finding the host's RDMA devices: ibverbs for what only the device knows (types,
//! vendor, port state, LID, MTU), sysfs for where it sits (driver, NUMA node, PCI path)
//! and its GID table with each entry's RoCE version and network interface.
//!
//! A host without RDMA is an answer, not a failure: `ibv_get_device_list` failing with
//! `ENOSYS` (a kernel without RDMA support) or listing nothing gives an empty
//! [`Discovery`] with the reason.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device::{DeviceInfo, LinkLayer, NodeType, PortInfo, PortState, TransportType};
use crate::gid::{GidEntry, GidKind};
use crate::verbs::{self, DeviceList};

/// Where the kernel lists RDMA devices.
const SYSFS: &str = "/sys/class/infiniband";

/// What discovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    /// Every device ibverbs lists, usable or not (EFA devices included).
    pub devices: Vec<DeviceInfo>,
    /// Why the list is empty, when ibverbs could not list devices at all.
    pub unavailable: Option<String>,
}

impl Discovery {
    /// In words, for errors: what was found or why nothing was.
    pub fn summary(&self) -> String {
        match (&self.unavailable, self.devices.is_empty()) {
            (Some(why), _) => why.clone(),
            (None, true) => "ibverbs lists no RDMA device on this host".into(),
            (None, false) => format!(
                "ibverbs lists {}",
                self.devices
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// Why ibverbs could not list devices, in words.
pub(crate) fn unavailable_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel has no RDMA support (ibverbs: ENOSYS): no RDMA devices \
                              here"
            .into(),
        Some(libc::ENOENT) | Some(libc::ENODEV) => {
            "no RDMA subsystem on this host (ibverbs finds no /sys/class/infiniband)".into()
        }
        _ => format!("ibverbs cannot list RDMA devices: {e}"),
    }
}

/// Lists and describes every RDMA device. Never fails: a device that cannot be opened
/// or queried is left out with a log line.
pub fn discover() -> Discovery {
    let list = match DeviceList::get() {
        Ok(list) => list,
        Err(e) => {
            return Discovery {
                devices: Vec::new(),
                unavailable: Some(unavailable_reason(&e)),
            }
        }
    };
    let mut devices = Vec::new();
    for dev in list.iter() {
        let name = dev.name();
        match describe(&dev, &name) {
            Ok(d) => devices.push(d),
            Err(e) => {
                tracing::warn!(device = %name, error = %e, "cannot query an RDMA device; it is left out")
            }
        }
    }
    Discovery {
        devices,
        unavailable: None,
    }
}

fn describe(dev: &verbs::RawDevice<'_>, name: &str) -> Result<DeviceInfo, verbs::VerbError> {
    let (node, transport) = dev.types();
    let sys = Path::new(SYSFS).join(name);
    let device_dir = sys.join("device");
    // What is known without opening the device: its types from the device list, its
    // driver and PCI vendor from sysfs. A device that cannot be used (EFA above all) is
    // described from that alone and never opened.
    let mut info = DeviceInfo {
        name: name.to_string(),
        driver: std::fs::read_link(device_dir.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())),
        node_type: node_type(node),
        transport: transport_type(transport),
        vendor_id: read_trimmed(&device_dir.join("vendor"))
            .and_then(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0),
        vendor_part_id: 0,
        numa_node: read_trimmed(&device_dir.join("numa_node")).and_then(|s| parse_numa(&s)),
        pci_path: std::fs::canonicalize(&device_dir)
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| p.contains("/pci")),
        ports: Vec::new(),
    };
    if info.unusable().is_some() {
        return Ok(info);
    }
    let ctx = dev.open()?;
    let attr = ctx.query_device()?;
    info.vendor_id = attr.vendor_id;
    info.vendor_part_id = attr.vendor_part_id;
    let mut ports = Vec::new();
    for num in 1..=attr.ports {
        let p = ctx.query_port(num)?;
        let link_layer = match p.link_layer {
            verbs::LINK_LAYER_ETHERNET => Some(LinkLayer::Ethernet),
            // Unspecified is what older drivers report for InfiniBand.
            verbs::LINK_LAYER_INFINIBAND | 0 => Some(LinkLayer::Infiniband),
            _ => None,
        };
        let mut gids = read_gids(&sys, num, link_layer, p.gid_table);
        if gids.is_empty() && p.gid_table > 0 {
            // No sysfs GID table (a container without /sys/class/infiniband): ask the
            // device for index 0. Its kind is unknown; on Ethernet it is taken as RoCE v2,
            // which the peer must match (set gid_index to choose another).
            if let Ok(gid) = ctx.query_gid(num, 0) {
                gids.push(GidEntry {
                    index: 0,
                    gid,
                    kind: match link_layer {
                        Some(LinkLayer::Ethernet) => GidKind::RoceV2,
                        _ => GidKind::Ib,
                    },
                    netdev: None,
                    netdev_up: true,
                });
            }
        }
        ports.push(PortInfo {
            num,
            state: port_state(p.state),
            link_layer,
            lid: p.lid,
            active_mtu: u8::try_from(p.active_mtu).unwrap_or(0),
            gids,
        });
    }
    info.ports = ports;
    Ok(info)
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// A sysfs `numa_node`: `-1` means unknown.
pub(crate) fn parse_numa(text: &str) -> Option<u32> {
    text.trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

/// A sysfs GID: eight groups of four hex digits separated by colons.
pub(crate) fn parse_gid(text: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = text.trim().split(':').collect();
    if groups.len() != 8 {
        return None;
    }
    let mut g = [0u8; 16];
    for (i, group) in groups.iter().enumerate() {
        if group.len() != 4 {
            return None;
        }
        let v = u16::from_str_radix(group, 16).ok()?;
        g[2 * i..2 * i + 2].copy_from_slice(&v.to_be_bytes());
    }
    Some(g)
}

/// A sysfs GID type (`IB/RoCE v1`, `RoCE v2`) on a port of `link_layer`.
pub(crate) fn parse_gid_kind(text: &str, link_layer: Option<LinkLayer>) -> GidKind {
    match (text.trim(), link_layer) {
        ("RoCE v2", _) => GidKind::RoceV2,
        (_, Some(LinkLayer::Ethernet)) => GidKind::RoceV1,
        _ => GidKind::Ib,
    }
}

/// Whether a network interface's `operstate` counts as up (`unknown` is what some
/// virtual interfaces report while passing traffic).
pub(crate) fn operstate_up(text: &str) -> bool {
    matches!(text.trim(), "up" | "unknown")
}

/// The port's GID table from sysfs, empty entries left out.
fn read_gids(sys: &Path, port: u8, link_layer: Option<LinkLayer>, table: u32) -> Vec<GidEntry> {
    let port_dir = sys.join("ports").join(port.to_string());
    let mut out = Vec::new();
    for index in 0..table.min(256) {
        let Ok(index) = u8::try_from(index) else {
            break;
        };
        let Some(gid) = read_trimmed(&port_dir.join("gids").join(index.to_string()))
            .and_then(|t| parse_gid(&t))
        else {
            continue;
        };
        if gid == [0; 16] {
            continue;
        }
        let attr = |what: &str| -> PathBuf {
            port_dir
                .join("gid_attrs")
                .join(what)
                .join(index.to_string())
        };
        let kind = read_trimmed(&attr("types"))
            .map(|t| parse_gid_kind(&t, link_layer))
            .unwrap_or(match link_layer {
                Some(LinkLayer::Ethernet) => GidKind::RoceV1,
                _ => GidKind::Ib,
            });
        let netdev = read_trimmed(&attr("ndevs")).filter(|n| !n.is_empty());
        let netdev_up = match &netdev {
            Some(nd) => read_trimmed(&Path::new("/sys/class/net").join(nd).join("operstate"))
                .is_some_and(|s| operstate_up(&s)),
            // InfiniBand GIDs belong to no interface.
            None => link_layer != Some(LinkLayer::Ethernet),
        };
        out.push(GidEntry {
            index,
            gid,
            kind,
            netdev,
            netdev_up,
        });
    }
    out
}

fn node_type(code: i32) -> NodeType {
    match code {
        rdma_sys::ibv_node_type::IBV_NODE_CA => NodeType::Ca,
        rdma_sys::ibv_node_type::IBV_NODE_RNIC => NodeType::Rnic,
        rdma_sys::ibv_node_type::IBV_NODE_USNIC | rdma_sys::ibv_node_type::IBV_NODE_USNIC_UDP => {
            NodeType::Usnic
        }
        _ => NodeType::Other,
    }
}

fn transport_type(code: i32) -> TransportType {
    match code {
        rdma_sys::ibv_transport_type::IBV_TRANSPORT_IB => TransportType::Ib,
        rdma_sys::ibv_transport_type::IBV_TRANSPORT_IWARP => TransportType::Iwarp,
        rdma_sys::ibv_transport_type::IBV_TRANSPORT_USNIC
        | rdma_sys::ibv_transport_type::IBV_TRANSPORT_USNIC_UDP => TransportType::Usnic,
        _ => TransportType::Other,
    }
}

fn port_state(code: u32) -> PortState {
    match code {
        rdma_sys::ibv_port_state::IBV_PORT_DOWN => PortState::Down,
        rdma_sys::ibv_port_state::IBV_PORT_INIT => PortState::Init,
        rdma_sys::ibv_port_state::IBV_PORT_ARMED => PortState::Armed,
        rdma_sys::ibv_port_state::IBV_PORT_ACTIVE => PortState::Active,
        _ => PortState::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::samples::{link_local, v4};

    #[test]
    fn sysfs_values_parse() {
        assert_eq!(
            parse_gid("fe80:0000:0000:0000:0211:22ff:fe33:4401"),
            Some(link_local(1))
        );
        assert_eq!(
            parse_gid("0000:0000:0000:0000:0000:ffff:c0a8:0701\n"),
            Some(v4(192, 168, 7, 1))
        );
        for bad in [
            "",
            "fe80::1",
            "fe80:0000:0000:0000:0211:22ff:fe33",
            "zz80:0000:0000:0000:0211:22ff:fe33:4401",
        ] {
            assert_eq!(parse_gid(bad), None, "{bad}");
        }
        assert_eq!(
            parse_gid_kind("RoCE v2\n", Some(LinkLayer::Ethernet)),
            GidKind::RoceV2
        );
        assert_eq!(
            parse_gid_kind("IB/RoCE v1", Some(LinkLayer::Ethernet)),
            GidKind::RoceV1
        );
        assert_eq!(
            parse_gid_kind("IB/RoCE v1", Some(LinkLayer::Infiniband)),
            GidKind::Ib
        );
        assert_eq!(parse_numa("-1\n"), None);
        assert_eq!(parse_numa("1"), Some(1));
        assert!(operstate_up("up\n") && operstate_up("unknown") && !operstate_up("down"));
        assert_eq!(
            node_type(rdma_sys::ibv_node_type::IBV_NODE_UNSPECIFIED),
            NodeType::Other
        );
        assert_eq!(
            transport_type(rdma_sys::ibv_transport_type::IBV_TRANSPORT_UNSPECIFIED),
            TransportType::Other
        );
    }

    #[test]
    fn no_rdma_is_explained() {
        let why = unavailable_reason(&io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(
            why.contains("no RDMA support") && why.contains("ENOSYS"),
            "{why}"
        );
        let d = Discovery {
            devices: Vec::new(),
            unavailable: Some(why.clone()),
        };
        assert_eq!(d.summary(), why);
        assert!(Discovery::default().summary().contains("no RDMA device"));
    }

    /// On this host, whatever it has: discovery never panics, and without devices it
    /// says why.
    #[test]
    fn discovery_on_this_host_answers() {
        let d = discover();
        if d.devices.is_empty() {
            assert!(!d.summary().is_empty());
        }
        for dev in &d.devices {
            assert!(!dev.name.is_empty());
        }
    }
}
