//! Arbitrary bytes as an Ethernet frame, through the parser the eBPF programs run, then
//! through classification and verdicts against a small compiled policy.
//!
//! Besides "no panic", checks what the datapath relies on: a frame is `Ip` only with its
//! family, addresses and IP fields read; ports are `Known` only for TCP, UDP and SCTP; a
//! frame is `NotIp` exactly when its (VLAN-unwrapped) ethertype is neither IP, VLAN, MPLS
//! nor PPPoE, or it is a PPPoE session frame of PPP's own control;
//! bytes past the IP length never change what is parsed; the same bytes read as a packet
//! without a link-layer header (tun, WireGuard, ipip) parse exactly as they do behind an
//! Ethernet header of the family their version field names; and fields the parser could
//! not read only ever make classification match more.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::OnceLock;

use datafence::policy::{CompiledPolicy, LoadOptions, parse_policy_str};
use datafence_common::decide::{PacketFacts, PortInfo, judge_malformed};
use datafence_common::parse::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_MC, ETH_P_MPLS_UC,
    ETH_P_PPP_SES, FrameKind, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, MAX_VLAN_DEPTH, ParsedFrame,
    parse_frame, parse_ip_packet,
};
use datafence_common::{
    CLASS_NONE, FAMILY_V4, FAMILY_V6, MODE_AUDIT, REGION_NONE, Reason, RegionId, Verdict, classify,
    judge,
};
use libfuzzer_sys::fuzz_target;

/// Every selector the policy file offers except cgroups (which need a cgroup2 tree), in
/// both modes, with overlapping classes so first-match order matters.
const POLICY: &str = r#"
version: 1
mode: enforce
exempt: [10.0.0.0/8, "fd00::/8"]
regions:
  eu: {cidrs: [198.51.100.0/24, "2001:db8:100::/48", 0.0.0.0/1]}
  us: {cidrs: [203.0.113.0/24, 198.51.100.128/25, "2001:db8::/32"]}
data_classes:
  marked:
    match: {marks: [{value: 0x10, mask: 0xf0}]}
    allow: [eu]
  web:
    match: {protocols: [tcp, sctp], dst_ports: [80, 443, "8000-8999"], dscp: [0, 10, 46]}
    allow: [eu, us]
    mode: audit
  internal:
    match: {src_cidrs: [192.0.2.0/25, "2001:db8:1::/64"], protocols: [udp, 1, 58]}
    allow: [us]
    unknown: allow
  any-port:
    match: {dst_ports: ["0-65535"]}
"#;

fn policy() -> &'static CompiledPolicy {
    static POLICY_CELL: OnceLock<CompiledPolicy> = OnceLock::new();
    POLICY_CELL.get_or_init(|| {
        let opts = LoadOptions {
            cgroup_root: std::env::temp_dir(),
            ..LoadOptions::default()
        };
        parse_policy_str(POLICY, Path::new("/nonexistent/fuzz-policy.yaml"), &opts)
            .expect("the fuzz target's policy is valid")
            .compile()
    })
}

fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

fn be16(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*data.get(at)?, *data.get(at + 1)?]))
}

/// The ethertype and L3 offset, found independently of the parser: `None` when the
/// Ethernet or VLAN headers are cut short.
fn reference_ethertype(data: &[u8], offloaded: usize) -> Option<(u16, usize)> {
    let mut ethertype = be16(data, 12)?;
    let mut l3 = ETH_HLEN;
    let mut tags = offloaded;
    while is_vlan(ethertype) && tags < MAX_VLAN_DEPTH {
        ethertype = be16(data, l3 + 2)?;
        l3 += 4;
        tags += 1;
    }
    Some((ethertype, l3))
}

/// Ethertypes whose payload the parser unwraps to find IP: MPLS and PPPoE sessions.
fn carries_ip(ethertype: u16) -> bool {
    matches!(ethertype, ETH_P_MPLS_UC | ETH_P_MPLS_MC | ETH_P_PPP_SES)
}

/// A PPPoE session frame at `l3` whose whole header is there and whose PPP protocol is
/// PPP's own control (0x8000 and up), found independently of the parser.
fn ppp_control(data: &[u8], l3: usize) -> bool {
    data.get(l3..l3 + 2) == Some(&[0x11, 0][..]) && be16(data, l3 + 6).is_some_and(|p| p >= 0x8000)
}

fn check_frame(data: &[u8], offloaded: usize, f: &ParsedFrame) {
    let reference = reference_ethertype(data, offloaded);
    let not_ip_type = match reference {
        Some((ETH_P_PPP_SES, l3)) => ppp_control(data, l3),
        Some((t, _)) => t != ETH_P_IP && t != ETH_P_IPV6 && !is_vlan(t) && !carries_ip(t),
        None => false,
    };
    assert_eq!(
        f.kind == FrameKind::NotIp,
        not_ip_type,
        "NotIp iff the ethertype is readable and neither IP, VLAN, MPLS nor PPPoE, or PPPoE carrying PPP's control: {f:?} {reference:?}"
    );
    if reference.is_some_and(|(t, _)| carries_ip(t)) && f.kind == FrameKind::Ip {
        assert!(f.carried, "{f:?}");
    }
    match f.kind {
        FrameKind::Ip => {
            assert!(f.family == FAMILY_V4 || f.family == FAMILY_V6, "{f:?}");
            assert!(f.dst_known && f.ip_known, "{f:?}");
        }
        FrameKind::NotIp => {
            assert_eq!(f.family, 0, "{f:?}");
            assert!(!f.ip_known && !f.dst_known && !f.routed, "{f:?}");
        }
        FrameKind::Malformed => {
            assert_eq!(f.ports, PortInfo::Unknown, "{f:?}");
        }
    }
    if f.ports == PortInfo::Known {
        assert_eq!(f.kind, FrameKind::Ip, "{f:?}");
        assert!(
            matches!(f.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP),
            "{f:?}"
        );
    } else {
        assert_eq!((f.src_port, f.dst_port), (0, 0), "{f:?}");
    }
    if f.ip_known {
        assert!(f.dst_known, "{f:?}");
    }
    if f.protocol_known {
        assert!(f.ip_known, "{f:?}");
    } else if f.kind == FrameKind::Ip {
        // Only an IPv6 non-first fragment (or a tunnel's inner one) is whole yet of
        // unknown protocol, and then its ports are unknown too.
        assert!(f.family == FAMILY_V6 || f.encapsulated, "{f:?}");
        assert_eq!(f.ports, PortInfo::Unknown, "{f:?}");
    }
    if f.dst_known {
        assert!(f.family == FAMILY_V4 || f.family == FAMILY_V6, "{f:?}");
        // The addresses are the bytes at the L3 offset the reference walk found, or, under
        // MPLS labels or in PPPoE, where the IP header the parser found under them starts.
        let (ethertype, l3) = reference.expect("an address was read, so the ethertype was");
        let (ethertype, l3) = if f.carried {
            assert!(carries_ip(ethertype), "{f:?}");
            assert!(usize::from(f.network_at) > l3, "{f:?}");
            let family = if f.family == FAMILY_V4 {
                ETH_P_IP
            } else {
                ETH_P_IPV6
            };
            (family, usize::from(f.network_at))
        } else {
            (ethertype, l3)
        };
        match f.family {
            FAMILY_V4 => {
                assert_eq!(ethertype, ETH_P_IP);
                assert_eq!(data[l3] >> 4, 4);
                assert_eq!(&f.src[..4], &data[l3 + 12..l3 + 16]);
                assert_eq!(&f.dst[..4], &data[l3 + 16..l3 + 20]);
                assert_eq!(&f.src[4..], &[0; 12]);
                assert_eq!(&f.dst[4..], &[0; 12]);
                // Only a source route in the options routes an IPv4 packet.
                assert!(!f.routed || f.ipv4_options_len > 0, "{f:?}");
            }
            _ => {
                assert_eq!(ethertype, ETH_P_IPV6);
                assert_eq!(data[l3] >> 4, 6);
                assert_eq!(&f.src, &data[l3 + 8..l3 + 24]);
                assert_eq!(&f.dst, &data[l3 + 24..l3 + 40]);
            }
        }
    }
    if f.family == 0 {
        assert_ne!(f.kind, FrameKind::Ip);
    }
    assert!(f.dscp < 64, "{f:?}");
}

fn addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// Classifies and judges the frame the way the datapath does, with the socket-side facts
/// (mark, cgroup classes) taken from the frame's last bytes.
fn check_decision(data: &[u8], f: &ParsedFrame) {
    let compiled = policy();
    let p = &compiled.policy;
    let tail = |n: usize| data.len().checked_sub(n).map_or(0, |i| data[i]);
    let mark = u32::from_le_bytes([tail(1), tail(2), tail(3), tail(4)]);
    let src_classes = if f.ip_known && f.family != 0 {
        compiled.src_classes(addr(f.family, &f.src))
    } else {
        u32::from(tail(5))
    };
    let facts = PacketFacts {
        mark,
        cgroup_classes: u32::from(tail(6)),
        src_classes,
        dscp: f.dscp,
        protocol: f.protocol,
        dst_port: f.dst_port,
        ports: f.ports,
        ip_known: f.ip_known,
        protocol_known: f.protocol_known,
    };
    let class = classify(p, &facts);
    assert!(
        class == CLASS_NONE || u32::from(class) < p.header.n_classes,
        "class {class} of {}",
        p.header.n_classes
    );
    // Fail closed: not knowing a field can only make a class match, never stop one.
    let unknown_ip = classify(
        p,
        &PacketFacts {
            ip_known: false,
            ..facts
        },
    );
    let unknown_ports = classify(
        p,
        &PacketFacts {
            ports: PortInfo::Unknown,
            ..facts
        },
    );
    let unknown_protocol = classify(
        p,
        &PacketFacts {
            protocol_known: false,
            ..facts
        },
    );
    assert!(
        unknown_ip <= class && unknown_ports <= class && unknown_protocol <= class,
        "{facts:?}"
    );
    if class == CLASS_NONE {
        return;
    }
    let spec = &p.classes[usize::from(class)];
    let audit = spec.mode == MODE_AUDIT;
    let mut regions: [RegionId; 3] = [RegionId::from(REGION_NONE), 256, u32::MAX];
    if f.dst_known {
        regions[0] = compiled.region_of(addr(f.family, &f.dst));
    }
    for region in regions {
        let d = judge(spec, region, f.routed);
        match d.verdict {
            Verdict::Allow => {}
            Verdict::Deny => assert!(!audit, "{d:?}"),
            Verdict::Audit => assert!(audit, "{d:?}"),
        }
        if f.routed {
            assert!(matches!(
                d.reason,
                Reason::RoutingHeaderAllowed | Reason::RoutingHeaderDenied
            ));
        } else if region == RegionId::from(REGION_NONE) || region > 255 {
            assert!(matches!(
                d.reason,
                Reason::UnknownAllowed | Reason::UnknownDenied
            ));
        }
        assert_eq!(
            d.verdict == Verdict::Allow,
            matches!(
                d.reason,
                Reason::RegionAllowed | Reason::UnknownAllowed | Reason::RoutingHeaderAllowed
            ),
            "{d:?}"
        );
    }
    let d = judge_malformed(spec);
    assert_eq!(d.reason, Reason::MalformedDenied);
    assert_eq!(d.verdict == Verdict::Audit, audit);
}

/// Where the IP packet ends by its own length field, found independently of the parser:
/// `None` when the length is unreadable, 0 (a BIG TCP packet, bounded by the frame), or
/// shorter than the IPv4 header it belongs to (malformed whatever follows).
fn reference_ip_end(data: &[u8], offloaded: usize) -> Option<usize> {
    let (ethertype, l3) = reference_ethertype(data, offloaded)?;
    match ethertype {
        ETH_P_IP => {
            let total = usize::from(be16(data, l3 + 2)?);
            let header = usize::from(*data.get(l3)? & 0x0f) * 4;
            (total >= header.max(20)).then_some(l3 + total)
        }
        ETH_P_IPV6 => {
            let payload = usize::from(be16(data, l3 + 4)?);
            (payload > 0).then_some(l3 + 40 + payload)
        }
        _ => None,
    }
}

/// Bytes past the IP length are never headers: cutting them off changes nothing.
fn check_trailer_ignored(data: &[u8], offloaded: usize, f: &ParsedFrame) {
    let Some(end) = reference_ip_end(data, offloaded) else {
        return;
    };
    if end < data.len() {
        assert_eq!(
            &parse_frame(&data[..end], offloaded),
            f,
            "trailer of {}",
            data.len() - end
        );
    }
}

/// A packet without a link-layer header parses as it would behind an Ethernet header whose
/// ethertype is the family its version field names; any other version is not IP.
fn check_ip_packet(data: &[u8]) -> ParsedFrame {
    let f = parse_ip_packet(data);
    let ethertype = match data.first().map(|b| b >> 4) {
        _ if data.len() < 2 => {
            assert_eq!(f.kind, FrameKind::Malformed, "{f:?}");
            return f;
        }
        Some(4) => ETH_P_IP,
        Some(6) => ETH_P_IPV6,
        _ => {
            assert_eq!(f.kind, FrameKind::NotIp, "{f:?}");
            return f;
        }
    };
    let mut framed = vec![0u8; ETH_HLEN];
    framed[12..14].copy_from_slice(&ethertype.to_be_bytes());
    framed.extend_from_slice(data);
    assert_eq!(
        without_offsets(parse_frame(framed.as_slice(), 0)),
        without_offsets(f),
        "as Ethernet {ethertype:#06x}"
    );
    f
}

/// The frame with where its headers sit in the buffer left out: what it says about the
/// packet, which is the same with or without a link-layer header in front.
fn without_offsets(f: ParsedFrame) -> ParsedFrame {
    ParsedFrame {
        network_at: 0,
        ip_end: 0,
        ..f
    }
}

fuzz_target!(|data: &[u8]| {
    let l3 = check_ip_packet(data);
    check_decision(data, &l3);
    let untagged = parse_frame(data, 0);
    let offloaded = parse_frame(data, 1);
    check_frame(data, 0, &untagged);
    check_frame(data, 1, &offloaded);
    check_trailer_ignored(data, 0, &untagged);
    check_trailer_ignored(data, 1, &offloaded);
    // One offloaded tag only changes frames that carry tags of their own.
    if !matches!(be16(data, 12), Some(t) if is_vlan(t)) {
        assert_eq!(untagged, offloaded);
    }
    check_decision(data, &untagged);
    check_decision(data, &offloaded);
});
