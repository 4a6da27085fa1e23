//! NIC choice by locality: which of the driven ports a buffer's slices should leave
//! from. Pure: a function over where each NIC and GPU sits.
//!
//! - host memory on NUMA node N: the NICs on node N (all of them when none is there, or
//!   when the node is unknown);
//! - device memory of GPU N: the NICs closest to it on the PCI tree, counted in hops
//!   through the bridges their sysfs paths share (a NIC behind the same PCIe switch as
//!   the GPU wins over one behind the same root port, which wins over one on another
//!   socket); when the GPU's PCI path is unknown, the NICs on its NUMA node.

use ferry_transport_api::Location;

/// Where a device sits on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Place {
    /// NUMA node, when known.
    pub numa: Option<u32>,
    /// Resolved sysfs path of its PCI function, when it has one.
    pub pci: Option<String>,
}

/// The PCI bridges and functions on the way from the root to a device.
fn hops(path: &str) -> Vec<&str> {
    path.split('/')
        .filter(|c| c.starts_with("pci") || is_pci_function(c))
        .collect()
}

/// `dddd:bb:dd.f`.
fn is_pci_function(c: &str) -> bool {
    let b = c.as_bytes();
    b.len() == 12 && b[4] == b':' && b[7] == b':' && b[10] == b'.'
}

/// Hops between two devices on the PCI tree: up from one to the deepest bridge they
/// share, down to the other. Different root complexes are farther than any path within
/// one.
pub fn pci_distance(a: &str, b: &str) -> usize {
    let (a, b) = (hops(a), hops(b));
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common == 0 {
        // Another root complex (another socket, usually): beyond any shared bridge.
        return 2 * (a.len() + b.len()) + 2;
    }
    (a.len() - common) + (b.len() - common)
}

/// A set of NICs as a bit mask (bit `i`: NIC `i`); at most 64 NICs are driven.
pub type NicSet = u64;

/// Every NIC of `count`.
pub fn all(count: usize) -> NicSet {
    if count >= 64 {
        u64::MAX
    } else {
        (1u64 << count) - 1
    }
}

/// The NICs (indices into `nics`) slices of memory at `location` should use; never empty
/// when `nics` is not. `gpu` is where the GPU of a device location sits, when known.
pub fn preferred(nics: &[Place], location: Location, gpu: Option<&Place>) -> NicSet {
    let everything = all(nics.len());
    let on_node = |node: u32| -> NicSet {
        let set = nics
            .iter()
            .enumerate()
            .filter(|(i, n)| *i < 64 && n.numa == Some(node))
            .fold(0, |m, (i, _)| m | 1 << i);
        if set == 0 {
            everything
        } else {
            set
        }
    };
    match location {
        Location::Host { numa: Some(node) } => on_node(u32::from(node)),
        Location::Host { numa: None } | Location::Auto => everything,
        Location::Cuda { .. } => {
            let Some(gpu) = gpu else {
                return everything;
            };
            if let Some(gpu_pci) = &gpu.pci {
                let distances: Vec<Option<usize>> = nics
                    .iter()
                    .map(|n| n.pci.as_deref().map(|p| pci_distance(p, gpu_pci)))
                    .collect();
                if let Some(best) = distances.iter().flatten().min().copied() {
                    return distances
                        .iter()
                        .enumerate()
                        .filter(|(i, d)| *i < 64 && **d == Some(best))
                        .fold(0, |m, (i, _)| m | 1 << i);
                }
            }
            match gpu.numa {
                Some(node) => on_node(node),
                None => everything,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(numa: u32, pci: &str) -> Place {
        Place {
            numa: Some(numa),
            pci: Some(pci.into()),
        }
    }

    /// A two-socket GPU server: each socket has two PCIe switches, each switch a NIC and
    /// two GPUs behind it.
    fn dgx_like() -> (Vec<Place>, Vec<Place>) {
        let mut nics = Vec::new();
        let mut gpus = Vec::new();
        for socket in 0..2u32 {
            let root = format!("/sys/devices/pci0000:{:02x}", socket * 0x80);
            for sw in 0..2u32 {
                let bus = socket * 0x80 + sw * 0x10 + 1;
                let port = format!("{root}/0000:{:02x}:01.{sw}", socket * 0x80);
                let up = format!("{port}/0000:{bus:02x}:00.0");
                let down = |d: u32| format!("{up}/0000:{:02x}:{d:02x}.0", bus + 1);
                nics.push(place(
                    socket,
                    &format!("{}/0000:{:02x}:00.0", down(0), bus + 2),
                ));
                for g in 1..3 {
                    gpus.push(place(
                        socket,
                        &format!("{}/0000:{:02x}:00.0", down(g), bus + 2 + g),
                    ));
                }
            }
        }
        (nics, gpus)
    }

    #[test]
    fn each_gpu_prefers_the_nic_behind_its_switch() {
        let (nics, gpus) = dgx_like();
        for (g, gpu) in gpus.iter().enumerate() {
            let set = preferred(&nics, Location::Cuda { device: g as u32 }, Some(gpu));
            assert_eq!(set, 1 << (g / 2), "gpu {g}");
        }
    }

    #[test]
    fn distances_order_switch_root_port_and_socket() {
        let (nics, gpus) = dgx_like();
        let gpu = gpus[0].pci.as_deref().unwrap();
        let d: Vec<usize> = nics
            .iter()
            .map(|n| pci_distance(n.pci.as_deref().unwrap(), gpu))
            .collect();
        assert!(
            d[0] < d[1],
            "{d:?}: same switch before the same root complex"
        );
        assert!(
            d[1] < d[2] && d[2] == d[3],
            "{d:?}: another socket is farthest"
        );
        assert_eq!(pci_distance(gpu, gpu), 0);
    }

    #[test]
    fn host_memory_prefers_its_numa_node() {
        let (nics, _) = dgx_like();
        assert_eq!(
            preferred(&nics, Location::Host { numa: Some(0) }, None),
            0b0011
        );
        assert_eq!(
            preferred(&nics, Location::Host { numa: Some(1) }, None),
            0b1100
        );
        assert_eq!(preferred(&nics, Location::host(), None), 0b1111);
        // A node with no NIC: every NIC.
        assert_eq!(
            preferred(&nics, Location::Host { numa: Some(3) }, None),
            0b1111
        );
    }

    #[test]
    fn unknown_places_fall_back_to_numa_then_everything() {
        let nics = vec![
            Place {
                numa: Some(0),
                pci: None,
            },
            Place {
                numa: Some(1),
                pci: None,
            },
        ];
        let gpu_on_1 = Place {
            numa: Some(1),
            pci: Some("/sys/devices/pci0000:80/0000:80:01.0".into()),
        };
        assert_eq!(
            preferred(&nics, Location::Cuda { device: 0 }, Some(&gpu_on_1)),
            0b10
        );
        assert_eq!(preferred(&nics, Location::Cuda { device: 0 }, None), 0b11);
        let nowhere = Place::default();
        assert_eq!(
            preferred(&nics, Location::Cuda { device: 0 }, Some(&nowhere)),
            0b11
        );
        // Soft-RoCE has neither: every NIC.
        let soft = vec![Place::default(); 2];
        assert_eq!(
            preferred(&soft, Location::Host { numa: Some(0) }, None),
            0b11
        );
        assert_eq!(preferred(&[], Location::host(), None), 0);
        assert_eq!(all(64), u64::MAX);
    }
}
