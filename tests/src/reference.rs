//! A reference model of what a policy does to a packet, written from the policy contract
//! (agent/src/policy/mod.rs) rather than from the datapath.
//!
//! It deliberately shares nothing with the code it checks: no `datafence_common::decide`,
//! no compiled policy, no longest-prefix tables. Prefixes are scanned linearly and classes
//! are matched field by field on the validated policy, so a slip in the compiler's
//! bitmaps, masks or sort orders shows up as a disagreement instead of being reproduced.

use std::net::IpAddr;

use datafence::policy::{Class, LoadedPolicy, Mode, Region, UnknownRule};
use ipnetwork::IpNetwork;

/// One packet, as far as the policy can see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub dst: IpAddr,
    /// `None` stands for the unspecified address of the destination's family, which is
    /// what `datafence explain` puts in its crafted frame.
    pub src: Option<IpAddr>,
    pub protocol: u8,
    pub dst_port: u16,
    pub mark: u32,
    pub dscp: u8,
    /// cgroup ids of the sending socket's cgroup and all its ancestors; empty when the
    /// sender is unknown.
    pub cgroup_ids: Vec<u64>,
}

/// The outcome, with the same strings `explain` and the metrics use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub verdict: &'static str,
    pub reason: &'static str,
    pub class: Option<String>,
    pub region: Option<String>,
    /// The deciding class's mode, or the policy's when no class decided.
    pub mode: &'static str,
}

/// Every reason this model can give, so a test can hold them to the datapath's list.
pub const REASONS: [&str; 8] = [
    "exempt_builtin",
    "exempt_host_essential",
    "exempt_policy",
    "unclassified",
    "region_allowed",
    "region_denied",
    "unknown_allowed",
    "unknown_denied",
];

pub fn evaluate(policy: &LoadedPolicy, packet: &Packet) -> Answer {
    let passes = |reason| Answer {
        verdict: "allow",
        reason,
        class: None,
        region: None,
        mode: mode_str(policy.mode),
    };
    if is_loopback_or_link_local(packet.dst) {
        return passes("exempt_builtin");
    }
    if is_host_essential(policy, packet) {
        return passes("exempt_host_essential");
    }
    if policy.exempt.iter().any(|n| contains(n, packet.dst)) {
        return passes("exempt_policy");
    }
    let src = packet.src.unwrap_or(match packet.dst {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u8; 16]),
    });
    let Some(class) = policy.classes.iter().find(|c| matches(c, packet, src)) else {
        return passes("unclassified");
    };
    let region = region_of(policy, packet.dst);
    let (denied, allowed_reason, denied_reason) = match region {
        Some(r) => (
            !class.allow.contains(&r.id),
            "region_allowed",
            "region_denied",
        ),
        None => (
            class.unknown == UnknownRule::Deny,
            "unknown_allowed",
            "unknown_denied",
        ),
    };
    let (verdict, reason) = match (denied, class.mode) {
        (false, _) => ("allow", allowed_reason),
        (true, Mode::Enforce) => ("deny", denied_reason),
        (true, Mode::Audit) => ("audit", denied_reason),
    };
    Answer {
        verdict,
        reason,
        class: Some(class.name.clone()),
        region: region.map(|r| r.name.clone()),
        mode: mode_str(class.mode),
    }
}

fn mode_str(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    }
}

/// The host's own link traffic, as docs/policy.md's `host_essentials` table has it.
fn is_host_essential(policy: &LoadedPolicy, packet: &Packet) -> bool {
    const UDP: u8 = 17;
    const ICMPV6: u8 = 58;
    let on = policy.host_essentials;
    let udp_to = |port| packet.protocol == UDP && packet.dst_port == port;
    match packet.dst {
        IpAddr::V4(a) => {
            let [first, second, third, _] = a.octets();
            (on.link_multicast && (first, second, third) == (224, 0, 0))
                || (on.dhcp && a.is_broadcast() && udp_to(67))
        }
        IpAddr::V6(a) => {
            let scope = a.octets()[1] & 0x0f;
            if !a.is_multicast() || !(scope == 1 || scope == 2) {
                return false;
            }
            let dhcp_relays: std::net::Ipv6Addr = "ff02::1:2".parse().expect("address");
            let link = if a == dhcp_relays {
                on.dhcp && udp_to(547)
            } else {
                on.link_multicast
            };
            link || (on.neighbor_discovery && packet.protocol == ICMPV6)
        }
    }
}

fn is_loopback_or_link_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_loopback() || a.is_link_local(),
        IpAddr::V6(a) => a.is_loopback() || a.is_unicast_link_local(),
    }
}

/// The address as 128 bits, left-aligned, and its width, so both families share one
/// containment test.
fn bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

/// Written out by hand instead of `IpNetwork::contains`, which the agent itself uses.
fn contains(net: &IpNetwork, addr: IpAddr) -> bool {
    let (net_bits, net_width) = bits(net.network());
    let (addr_bits, addr_width) = bits(addr);
    if net_width != addr_width {
        return false;
    }
    let len = u32::from(net.prefix());
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    net_bits & mask == addr_bits & mask
}

/// The region owning the longest listed prefix that contains `dst`.
fn region_of(policy: &LoadedPolicy, dst: IpAddr) -> Option<&Region> {
    let mut best: Option<(u8, &Region)> = None;
    for region in &policy.regions {
        let prefixes = region
            .v4
            .iter()
            .map(|&n| IpNetwork::V4(n))
            .chain(region.v6.iter().map(|&n| IpNetwork::V6(n)));
        for net in prefixes {
            // Strictly longer only: validation keeps an exact prefix in one region, so a
            // tie cannot decide anything.
            if contains(&net, dst) && best.is_none_or(|(len, _)| net.prefix() > len) {
                best = Some((net.prefix(), region));
            }
        }
    }
    best.map(|(_, r)| r)
}

fn matches(class: &Class, packet: &Packet, src: IpAddr) -> bool {
    let class = &class.selectors;
    let has_ports = matches!(packet.protocol, 6 | 17 | 132);
    // (listed, matched) per selector; an empty list is a selector the class does not use.
    let selectors = [
        (
            !class.cgroups.is_empty(),
            class
                .cgroups
                .iter()
                .any(|(_, id)| packet.cgroup_ids.contains(id)),
        ),
        (
            !class.marks.is_empty(),
            class.marks.iter().any(|m| packet.mark & m.mask == m.value),
        ),
        (!class.dscp.is_empty(), class.dscp.contains(&packet.dscp)),
        (
            !class.protocols.is_empty(),
            class.protocols.contains(&packet.protocol),
        ),
        (
            !class.port_ranges.is_empty(),
            has_ports
                && class
                    .port_ranges
                    .iter()
                    .any(|&(first, last)| (first..=last).contains(&packet.dst_port)),
        ),
        (
            !class.src_cidrs.is_empty(),
            class.src_cidrs.iter().any(|n| contains(n, src)),
        ),
    ];
    // A class that lists nothing must not swallow all traffic; validation refuses one,
    // and the datapath never matches one either.
    selectors.iter().any(|(listed, _)| *listed)
        && selectors
            .iter()
            .all(|(listed, matched)| !listed || *matched)
}
