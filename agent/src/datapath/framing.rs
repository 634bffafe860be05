//! How an interface's frames start: with an Ethernet header, or at the IP header. The
//! programs read the answer from `L3_LINKS`, which the agent writes before it attaches
//! to an interface. Reading an IP packet as Ethernet would find "not IP" and let it pass,
//! so a link type that is neither is refused rather than guessed.

#![forbid(unsafe_code)]

use aya::maps::HashMap;
use datafence_common::map_names;

use super::{Datapath, DatapathError, Result, if_index, maps::removed_if_absent};

/// Where a frame's network header starts on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// An Ethernet header first (with VLAN tags, if any).
    Ethernet,
    /// The IP header first: no link-layer header at TC egress or XDP.
    Ip,
}

impl Framing {
    /// The framing of a link type (`ARPHRD_*`, `/sys/class/net/<interface>/type`), or
    /// None for one datafence cannot parse.
    pub const fn of_link_type(link_type: u16) -> Option<Self> {
        match link_type {
            // ARPHRD_ETHER (veth, bridges, bonds, VLANs, macvlan, tap, gretap, VXLAN) and
            // ARPHRD_LOOPBACK, which has Ethernet header ops.
            1 | 772 => Some(Self::Ethernet),
            // ARPHRD_NONE (tun, WireGuard), RAWIP, PPP, TUNNEL (ipip), TUNNEL6 (ip6tnl),
            // SIT, IPGRE and IP6GRE. A GRE device without a fixed remote builds its outer
            // header before TC egress; that header is IP too.
            65534 | 519 | 512 | 768 | 769 | 776 | 778 | 823 => Some(Self::Ip),
            _ => None,
        }
    }

    /// The framing of an interface, from the link type the kernel reports.
    pub fn of_interface(interface: &str) -> Result<Self> {
        let unknown = || DatapathError::UnknownInterface(interface.to_owned());
        let index = if_index(interface).ok_or_else(unknown)?;
        let link_type = crate::links::link_type(index)
            .map_err(|e| DatapathError::LinkType {
                interface: interface.to_owned(),
                detail: format!("asking the kernel for its link type: {e}"),
            })?
            .ok_or_else(unknown)?;
        Self::of_link_type(link_type).ok_or_else(|| DatapathError::LinkType {
            interface: interface.to_owned(),
            detail: format!(
                "link type {link_type} has neither an Ethernet header nor the IP header first; datafence cannot judge its frames"
            ),
        })
    }
}

impl Datapath {
    /// Records how `interface`'s frames start, for the programs to read, before anything
    /// is attached there. An ifindex the kernel gave to a removed interface and then to a
    /// new one is rewritten here too.
    pub(super) fn record_framing(&mut self, interface: &str) -> Result<Framing> {
        let framing = Framing::of_interface(interface)?;
        let index = if_index(interface)
            .ok_or_else(|| DatapathError::UnknownInterface(interface.to_owned()))?;
        let name = map_names::L3_LINKS;
        let map = self.map_mut(name)?;
        let mut links: HashMap<_, u32, u32> =
            HashMap::try_from(map).map_err(|source| DatapathError::Map { map: name, source })?;
        let written = match framing {
            Framing::Ip => links.insert(index, 1, 0),
            Framing::Ethernet => removed_if_absent(links.remove(&index)),
        };
        written.map_err(|source| DatapathError::Map { map: name, source })?;
        Ok(framing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_types_map_to_their_framing() {
        for (link_type, want) in [
            (1, Some(Framing::Ethernet)),
            (772, Some(Framing::Ethernet)),
            (65534, Some(Framing::Ip)),
            (768, Some(Framing::Ip)),
            (776, Some(Framing::Ip)),
            (778, Some(Framing::Ip)),
            (512, Some(Framing::Ip)),
            // InfiniBand (IPoIB) has a 4-byte header of its own; CAN is not IP.
            (32, None),
            (280, None),
        ] {
            assert_eq!(Framing::of_link_type(link_type), want, "type {link_type}");
        }
    }

    #[test]
    fn the_loopback_interface_is_ethernet_framed() {
        assert_eq!(Framing::of_interface("lo").expect("lo"), Framing::Ethernet);
    }

    #[test]
    fn a_missing_interface_is_named() {
        let err = Framing::of_interface("df-no-such-if").expect_err("missing");
        assert!(err.to_string().contains("df-no-such-if"), "{err}");
    }
}
