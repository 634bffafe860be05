//! The interfaces of the agent's network namespace, asked of the kernel over rtnetlink
//! (`/sys` shows the namespace it was mounted in), and a watch that reports each link
//! change as it happens, so that a new device is attached before it carries traffic.
#![forbid(unsafe_code)]

use std::io;

use ipnetwork::IpNetwork;
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

/// `ARPHRD_LOOPBACK`: the one link type left alone when every interface is attached.
pub const LOOPBACK: u16 = 772;

/// One interface, as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `ARPHRD_*`.
    pub link_type: u16,
}

/// Every interface in this network namespace.
pub fn all() -> io::Result<Vec<Link>> {
    let links = crate::clsact::dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
    Ok(links
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => {
                let name = link.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })?;
                Some(Link {
                    index: link.header.index,
                    name,
                    link_type: u16::from(link.header.link_layer_type),
                })
            }
            _ => None,
        })
        .collect())
}

/// The interfaces TC egress goes on when no list names them: every interface in the
/// namespace but loopback and those `policy` excludes, sorted. Returned apart: the
/// interfaces whose link type has a framing datafence cannot parse.
pub fn every_interface(
    policy: &crate::policy::LoadedPolicy,
) -> io::Result<(Vec<String>, Vec<Link>)> {
    let mut attach = Vec::new();
    let mut unjudgeable = Vec::new();
    for link in all()? {
        if link.link_type == LOOPBACK || policy.excludes_interface(&link.name) {
            continue;
        }
        if crate::datapath::Framing::of_link_type(link.link_type).is_some() {
            attach.push(link.name);
        } else {
            unjudgeable.push(link);
        }
    }
    attach.sort();
    Ok((attach, unjudgeable))
}

/// The link type (`ARPHRD_*`) of the interface with index `ifindex`; None when there is
/// no such interface.
pub fn link_type(ifindex: u32) -> io::Result<Option<u16>> {
    Ok(all()?
        .into_iter()
        .find(|l| l.index == ifindex)
        .map(|l| l.link_type))
}

/// The subnets each interface is connected to, as (ifindex, subnet): what its addresses
/// and their prefix lengths make reachable without a router.
pub fn connected_subnets() -> io::Result<Vec<(u32, IpNetwork)>> {
    let answer = crate::clsact::dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
    let mut out: Vec<(u32, IpNetwork)> = answer
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => {
                // On a point-to-point link `Address` is the peer; otherwise it is the
                // local address. Either way the prefix is what the link reaches.
                let ip = a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })?;
                let net = IpNetwork::new(ip, a.header.prefix_len).ok()?;
                let subnet = IpNetwork::new(net.network(), net.prefix()).ok()?;
                Some((a.header.index, subnet))
            }
            _ => None,
        })
        .collect();
    out.sort_by_key(|(index, net)| (*index, net.is_ipv6(), net.network(), net.prefix()));
    out.dedup();
    Ok(out)
}

/// The host's own unicast addresses in this namespace: each address's local end (on a
/// point-to-point link `Address` is the peer's, and `Local` this end's). Not an IPv6
/// address still in duplicate address detection, or that failed it: the kernel does not
/// take packets in for it.
pub fn host_addresses() -> io::Result<std::collections::BTreeSet<std::net::IpAddr>> {
    use netlink_packet_route::address::AddressHeaderFlags;
    let answer = crate::clsact::dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
    let not_yet = AddressHeaderFlags::Tentative | AddressHeaderFlags::Dadfailed;
    Ok(answer
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) if !a.header.flags.intersects(not_yet) => {
                let local = a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                local.or_else(|| {
                    a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })
            }
            _ => None,
        })
        .filter(|ip| !ip.is_multicast() && !ip.is_unspecified())
        .collect())
}

/// Calls `changed` after each batch of link and address notifications (a device created,
/// renamed, moved into this namespace, brought up, given an address). Runs on its own thread for as long as the
/// process does. The socket subscribes before this returns, so no change made after
/// the call is missed; when the kernel drops notifications (a full socket buffer),
/// `changed` is called all the same, since the caller rereads the links anyway.
pub fn watch(mut changed: impl FnMut() + Send + 'static) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    // Links, and addresses: a new device gets its address after it is created, and the
    // agent checks each connected subnet against the policy.
    for group in [
        libc::RTNLGRP_LINK,
        libc::RTNLGRP_IPV4_IFADDR,
        libc::RTNLGRP_IPV6_IFADDR,
    ] {
        socket.add_membership(group)?;
    }
    std::thread::Builder::new()
        .name("link-watch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match socket.recv(&mut &mut buf[..], 0) {
                    Ok(_) => changed(),
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => changed(),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::error!(error = %e, "the link watch stopped; new interfaces are picked up by the periodic check only");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}
