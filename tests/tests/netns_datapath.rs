//! The datapath attached to a real veth in a namespace sandbox, with real UDP and TCP
//! traffic over IPv4 and IPv6.

use std::{
    fmt::Write as _,
    net::{SocketAddr, UdpSocket},
};

use datafence::datapath::{Datapath, EventLimits, LoadOptions};
use datafence_common::{CounterKey, Reason};
use integration_tests::{
    MARKED_CLASS_POLICY, TestCgroup,
    frames::{self, Spec},
    netns::{
        NetNs, Sandbox, addr, frames_delivered, frames_delivered_by, send_frames,
        send_frames_from_cgroup, send_from_host, tcp_connects, udp_delivered, udp_delivered_sized,
        udp_delivered_with, udp_delivered_within,
    },
    policy_from_yaml, require_root,
    tun::Tun,
};

const POLICY: &str = r#"
version: 1
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  user-data:
    match:
      protocols: [tcp, udp]
    allow: [eu-west]
    unknown: allow
"#;

/// Packets the datapath counted under the keys `keep` picks.
fn packets_where(dp: &Datapath, keep: impl Fn(&CounterKey) -> bool) -> u64 {
    dp.counters()
        .expect("counters")
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(_, v)| v.packets)
        .sum()
}

/// The policy applied to a datapath of its own, attached to the sandbox's uplink.
fn attached(sandbox: &Sandbox, yaml: &str) -> Datapath {
    let compiled = policy_from_yaml(yaml).compile();
    sandbox.host.run(move || {
        let mut dp = Datapath::load(&LoadOptions::default()).expect("load");
        dp.apply(&compiled, EventLimits::default()).expect("apply");
        dp.attach_tc("up0").expect("attach");
        dp
    })
}

#[test]
fn attached_tc_egress_blocks_unapproved_regions_over_v4_and_v6() {
    require_root();
    let sandbox = Sandbox::new("dp");
    let dp = attached(&sandbox, POLICY);

    for (dst, expected) in [
        (addr::EU_V4, 20),
        (addr::US_V4, 0),
        (addr::EU_V6, 20),
        (addr::US_V6, 0),
    ] {
        let got = udp_delivered(&sandbox, dst, 5353, 20);
        assert_eq!(got, expected, "UDP to {dst}");
    }
    assert!(tcp_connects(&sandbox, addr::EU_V4, 8443));
    assert!(!tcp_connects(&sandbox, addr::US_V4, 8443));
    assert!(tcp_connects(&sandbox, addr::EU_V6, 8443));
    assert!(!tcp_connects(&sandbox, addr::US_V6, 8443));

    let denied = packets_where(&dp, |k| k.verdict == datafence_common::Verdict::Deny as u8);
    // 40 datagrams plus at least one SYN per refused connection.
    assert!(denied >= 42, "denied {denied}");
    drop(dp);
    // Detached: traffic to the unapproved region flows again.
    assert_eq!(udp_delivered(&sandbox, addr::US_V4, 5353, 5), 5);
}

/// User data sent as IP fragments (a 3,000-byte datagram on a 1,500-byte MTU): the kernel
/// fragments it before TC egress, so every fragment is judged on its own.
#[test]
fn fragmented_datagrams_are_judged_whole_over_v4_and_v6() {
    require_root();
    let sandbox = Sandbox::new("fr");
    let dp = attached(&sandbox, MARKED_CLASS_POLICY);
    for (dst, mark, expected, case) in [
        (addr::EU_V4, MARK, 10, "user data to the allowed region"),
        (addr::US_V4, MARK, 0, "user data to a denied region"),
        (addr::US_V4, 0, 10, "other traffic to that region"),
        (addr::EU_V6, MARK, 10, "user data to the allowed region"),
        (addr::US_V6, MARK, 0, "user data to a denied region"),
        (addr::US_V6, 0, 10, "other traffic to that region"),
    ] {
        let got = udp_delivered_sized(&sandbox, dst, 7600, 10, mark, SIZE);
        assert_eq!(got, expected, "{case}: {dst}, mark {mark:#x}");
    }
    // Each allowed user-data datagram went out as three fragments (1,480 + 1,480 + 48
    // bytes over IPv4, 1,448 + 1,448 + 112 over IPv6), each judged and counted as the
    // class's.
    let allowed_user_data = packets_where(&dp, |k| {
        k.class == 0 && k.verdict == datafence_common::Verdict::Allow as u8
    });
    assert_eq!(allowed_user_data, 2 * 10 * 3);
}

/// A class selected by port: a later fragment carries no ports, so only its first
/// fragment can say whether the datagram is user data.
const PORT_CLASS_POLICY: &str = r#"
version: 1
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  user-data:
    match:
      protocols: [udp]
      dst_ports: [5432]
    allow: [eu-west]
"#;

/// Fragments of a datagram no class claims pass with their first fragment: before
/// fragment tracking, the later ones (no ports) were claimed by the port class and
/// dropped, and the receiver never had the datagram.
#[test]
fn fragments_follow_their_first_fragment_so_other_traffic_is_not_dropped() {
    require_root();
    let sandbox = Sandbox::new("ff");
    let dp = attached(&sandbox, PORT_CLASS_POLICY);
    for (dst, port, expected, case) in [
        (addr::US_V4, 7600, 10, "other traffic to a denied region"),
        (addr::US_V4, 5432, 0, "user data to a denied region"),
        (addr::EU_V4, 5432, 10, "user data to the allowed region"),
        (addr::US_V6, 7600, 10, "other traffic to a denied region"),
        (addr::US_V6, 5432, 0, "user data to a denied region"),
        (addr::EU_V6, 5432, 10, "user data to the allowed region"),
    ] {
        let got = udp_delivered_sized(&sandbox, dst, port, 10, 0, SIZE);
        assert_eq!(got, expected, "{case}: {dst} port {port}");
    }
    let count = |reason: Reason| packets_where(&dp, |k| k.reason == reason as u8);
    // Each datagram's fragments are counted with its first fragment's reason. The kernel
    // stops sending a datagram once a fragment is dropped, so a denied datagram is one
    // denial: its first fragment. The other traffic's later fragments are not among the
    // denials (they count as unclassified, with the host's neighbour discovery).
    assert_eq!(count(Reason::RegionDenied), 2 * 10, "denied user data");
    assert_eq!(
        count(Reason::RegionAllowed),
        2 * 10 * 3,
        "allowed user data"
    );
    assert_eq!(
        count(Reason::FragmentUnseen),
        0,
        "every first fragment was seen"
    );
}

/// Frames a process with CAP_NET_RAW crafts against the parser, each carrying user data
/// (UDP to 5432) in a way the parser once misread, sent from a packet socket and counted
/// on the wire at the world's end. Before the parser followed the kernel, each reached the
/// denied region: a non-first fragment whose fragment header names ICMPv6 (the kernel
/// ignores that field there) passed as unclassified, and so did a header whose declared
/// length ends before a UDP header to another port, which the receiver never reads.
#[test]
fn crafted_fragments_and_trailers_do_not_reach_a_denied_region() {
    require_root();
    let sandbox = Sandbox::new("cf");
    let lying_fragment = |dst: &str, id: u32| {
        let mut spec = Spec::udp(addr::HOST_V6, dst, 5432);
        spec.protocol = 58;
        spec.payload = vec![0xab; 700];
        spec.ipv6_ext = vec![(44, frames::ipv6_fragment_of(100, false, id))];
        spec.build().bytes
    };
    let trailer = |src: &str, dst: &str, declared: u16, id: u32| {
        let mut spec = Spec::udp(src, dst, 9999);
        if dst.contains(':') {
            spec.ipv6_ext = vec![(44, frames::ipv6_fragment_of(0, true, id))];
        }
        let mut frame = spec.build();
        frame.declare_ip_length(declared);
        frame.bytes
    };
    let cases: [(&str, Vec<Vec<u8>>); 3] = [
        (
            "IPv6 non-first fragments that name ICMPv6",
            (0..20).map(|i| lying_fragment(addr::US_V6, i)).collect(),
        ),
        (
            "IPv6 first fragments that end at their fragment header",
            (0..20)
                .map(|i| trailer(addr::HOST_V6, addr::US_V6, 8, 100 + i))
                .collect(),
        ),
        (
            "IPv4 headers that declare no payload",
            (0..20)
                .map(|i| trailer(addr::HOST_V4, addr::US_V4, 20, i))
                .collect(),
        ),
    ];
    // Without the datapath the frames arrive: the zeros below are its doing.
    for (case, frames) in &cases {
        assert_eq!(frames_delivered(&sandbox, frames), 20, "{case}, before");
    }
    let dp = attached(&sandbox, PORT_CLASS_POLICY);
    for (case, frames) in &cases {
        assert_eq!(frames_delivered(&sandbox, frames), 0, "{case}, attached");
    }
    // A non-first fragment to the approved region is not held up by what it names, and
    // whole user data still arrives where it may.
    let to_eu: Vec<Vec<u8>> = (0..20)
        .map(|i| lying_fragment(addr::EU_V6, 200 + i))
        .collect();
    assert_eq!(
        frames_delivered(&sandbox, &to_eu),
        20,
        "fragments to eu-west"
    );
    assert_eq!(udp_delivered(&sandbox, addr::EU_V6, 5432, 20), 20);
    assert_eq!(udp_delivered(&sandbox, addr::EU_V4, 5432, 20), 20);
    let count = |reason: Reason| packets_where(&dp, |k| k.reason == reason as u8);
    assert_eq!(
        count(Reason::FragmentUnseen),
        20,
        "non-first fragments to us-east"
    );
    assert_eq!(
        count(Reason::MalformedDenied),
        40,
        "trailers, IPv6 and IPv4"
    );
}

/// A later fragment takes its first fragment's verdict only from the same sender. A
/// process outside the class sent the first fragment of a datagram, and one in the
/// class's cgroup its later fragments (both crafted on packet sockets): the later ones
/// passed with the first to a region the class may not reach.
#[test]
fn a_later_fragment_from_a_class_cgroup_does_not_pass_with_anothers_first() {
    require_root();
    let sandbox = Sandbox::new("fg");
    let cgroup = TestCgroup::new("frag");
    let policy = format!(
        r#"
version: 1
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  api-service:
    match:
      cgroups: [{}]
    allow: [eu-west]
"#,
        cgroup.path
    );
    // The first fragment (offset 0, more to come) of datagram `id` and a later one.
    let datagram = |dst: &str, id: u32| -> Vec<Vec<u8>> {
        [0u16, 185]
            .map(|offset| {
                let mut spec = Spec::udp(
                    if dst.contains(':') {
                        addr::HOST_V6
                    } else {
                        addr::HOST_V4
                    },
                    dst,
                    5432,
                );
                spec.payload = vec![0xab; 400];
                if dst.contains(':') {
                    spec.ipv6_ext = vec![(44, frames::ipv6_fragment_of(offset, offset == 0, id))];
                } else {
                    spec.ipv4_id = id as u16;
                    spec.fragment_offset = offset;
                    spec.more_fragments = offset == 0;
                }
                spec.build().bytes
            })
            .to_vec()
    };
    let from = |cgroup: Option<&TestCgroup>, frames: &[Vec<u8>]| match cgroup {
        Some(c) => send_frames_from_cgroup(&sandbox, &c.procs(), frames),
        None => send_frames(&sandbox, frames),
    };
    // Both fragments delivered, of those the first was sent by this process and the
    // later by `later_from`.
    let delivered = |dst: &str, id: u32, later_from: Option<&TestCgroup>| {
        frames_delivered_by(&sandbox, &datagram(dst, id), |frames| {
            from(None, &frames[..1]);
            from(later_from, &frames[1..]);
        })
    };
    // Without the datapath both arrive: the ones missing below are its doing.
    assert_eq!(delivered(addr::US_V4, 1, Some(&cgroup)), 2, "before");
    assert_eq!(delivered(addr::US_V6, 1, Some(&cgroup)), 2, "before");
    let dp = attached(&sandbox, &policy);
    for (us, eu) in [(addr::US_V4, addr::EU_V4), (addr::US_V6, addr::EU_V6)] {
        assert_eq!(
            delivered(us, 2, Some(&cgroup)),
            1,
            "to {us}, later from the class"
        );
        assert_eq!(
            delivered(us, 3, None),
            2,
            "to {us}, both from outside the class"
        );
        assert_eq!(
            delivered(eu, 4, Some(&cgroup)),
            2,
            "to {eu}, later from the class"
        );
    }
    assert_eq!(
        packets_where(&dp, |k| k.reason == Reason::FragmentUnseen as u8
            && k.verdict == datafence_common::Verdict::Deny as u8),
        2,
        "the later fragments to us-east from the class, IPv4 and IPv6"
    );
}

const MARK: u32 = 0x42;
/// Twice the sandbox veths' MTU, and then some: three fragments.
const SIZE: usize = 3000;

/// A tun device (WireGuard, OpenVPN and ppp links are alike) carries IP packets with no
/// Ethernet header in front. Read as Ethernet, every one was "not IP" and passed; the
/// datapath now reads them from the IP header, as the daemon at the other end does.
#[test]
fn a_device_without_a_link_layer_header_is_judged_from_the_ip_header() {
    require_root();
    let ns = NetNs::new("tun");
    let mut tun = Tun::create(&ns, "dftun0");
    ns.ip("addr add 10.99.0.1/24 dev dftun0");
    ns.ip("-6 addr add 2001:db8:99::1/64 dev dftun0 nodad");
    ns.ip("link set dftun0 up");
    ns.ip("route add default dev dftun0");
    ns.ip("-6 route add default dev dftun0");
    let send = |dst: &'static str| {
        ns.run(move || {
            let dst: SocketAddr = SocketAddr::new(dst.parse().expect("dst"), 5432);
            let unspecified: SocketAddr = if dst.is_ipv4() {
                "0.0.0.0:0".parse().expect("addr")
            } else {
                "[::]:0".parse().expect("addr")
            };
            let sock = UdpSocket::bind(unspecified).expect("bind");
            for i in 0..20u32 {
                // A denied datagram may fail at send time: that is the point.
                let _ = sock.send_to(&i.to_be_bytes(), dst);
            }
        });
        tun.udp_received(dst.parse().expect("dst"), 5432)
    };
    let compiled = policy_from_yaml(POLICY).compile();
    let dp = ns.run(move || {
        let mut dp = Datapath::load(&LoadOptions::default()).expect("load");
        dp.apply(&compiled, EventLimits::default()).expect("apply");
        dp.attach_tc("dftun0").expect("attach");
        dp
    });
    let mut send = send;
    for (dst, expected) in [
        (addr::EU_V4, 20),
        (addr::US_V4, 0),
        (addr::EU_V6, 20),
        (addr::US_V6, 0),
    ] {
        assert_eq!(send(dst), expected, "UDP to {dst} over dftun0");
    }
    let denied = packets_where(&dp, |k| k.verdict == datafence_common::Verdict::Deny as u8);
    assert_eq!(denied, 40, "denied over dftun0");
    drop(dp);
    // Detached: the same datagrams reach the device, so the zeros above were drops.
    assert_eq!(send(addr::US_V4), 20, "UDP to {} after detach", addr::US_V4);
}

/// User data on UDP port 5432, which may reach eu-west and, by its `unknown` rule, hosts in
/// no region, such as the sandbox's next hop.
const SOURCE_ROUTE_POLICY: &str = r#"
version: 1
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  user-data:
    match:
      protocols: [udp]
      dst_ports: [5432]
    allow: [eu-west]
    unknown: allow
"#;

/// Settings of the world namespace's `all` and `dn0` interfaces that make it a relay
/// of routed packets, as a router on the path may be.
const ACCEPT_SOURCE_ROUTE: &str = "net.ipv4.conf.{}.accept_source_route=1";
const SEG6_ENABLED: &str = "net.ipv6.conf.{}.seg6_enabled=1";

fn world_relays(sandbox: &Sandbox, settings: &[&str]) {
    for setting in settings {
        for conf in ["all", "dn0"] {
            let sysctl = setting.replace("{}", conf);
            let out = sandbox.world.exec(&["sysctl", "-qw", &sysctl]);
            assert!(out.status.success(), "sysctl {sysctl}");
        }
    }
}

const LSRR: u8 = 131;
const SSRR: u8 = 137;

/// A socket option: level, name, and what `setsockopt` errors are reported as.
type SocketOption = (libc::c_int, libc::c_int, &'static str);

/// Sends `count` datagrams to `dst:port` from a socket bound to `bind` whose socket
/// option `option` holds `value`. Returns how many `dst` received.
fn delivered_with_option(
    sandbox: &Sandbox,
    bind: &'static str,
    option: SocketOption,
    value: Vec<u8>,
    dst: &str,
    port: u16,
    count: u32,
) -> u32 {
    udp_delivered_with(sandbox, dst, port, count, |dst_addr| {
        sandbox.host.run(move || {
            use std::os::fd::AsRawFd as _;
            let sock = UdpSocket::bind(bind).expect("bind sender");
            let (level, name, label) = option;
            // SAFETY: setsockopt with a valid fd and a buffer of the length given.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    level,
                    name,
                    value.as_ptr().cast(),
                    value.len() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "{label}: {}", std::io::Error::last_os_error());
            for i in 0..count {
                // A denied datagram may fail at send time: that is the point.
                let _ = sock.send_to(&i.to_be_bytes(), dst_addr);
            }
        });
    })
}

/// Sends `count` datagrams to `dst:port` from an unprivileged-style socket whose
/// `IP_OPTIONS` carry a source route of `kind` through `relay`: the kernel puts the relay
/// in the header's destination and `dst` in the route. Returns how many `dst` received.
fn source_routed(
    sandbox: &Sandbox,
    kind: u8,
    relay: &'static str,
    dst: &str,
    port: u16,
    count: u32,
) -> u32 {
    let relay: std::net::Ipv4Addr = relay.parse().expect("relay");
    // A NOP, then the route: type, length, pointer and the first hop, which the kernel
    // moves to the header (the final destination takes its place).
    let mut options = vec![1u8, kind, 7, 4];
    options.extend_from_slice(&relay.octets());
    let option = (libc::IPPROTO_IP, libc::IP_OPTIONS, "IP_OPTIONS");
    delivered_with_option(sandbox, "0.0.0.0:0", option, options, dst, port, count)
}

/// IPv4 loose and strict source routes, set with `IP_OPTIONS` (no privilege needed),
/// through a relay the class may reach to a region it may not. The world namespace is the
/// relay and the final host, and accepts source routes as a router may. Before, the
/// datapath judged only the relay: 20 of 20 arrived.
#[test]
fn ipv4_source_routes_through_an_allowed_relay_do_not_reach_a_denied_region() {
    require_root();
    let sandbox = Sandbox::new("sr");
    world_relays(&sandbox, &[ACCEPT_SOURCE_ROUTE]);
    // Without datafence the routes work, so the zeros below are the datapath's doing.
    // A strict route's first hop must be on the link: the sandbox's next hop.
    let routes = [
        (LSRR, addr::EU_V4, "loose, through eu-west"),
        (SSRR, addr::WORLD_V4, "strict, through the next hop"),
    ];
    for (kind, relay, case) in routes {
        let got = source_routed(&sandbox, kind, relay, addr::US_V4, 5432, 20);
        assert_eq!(got, 20, "{case}, before the datapath is attached");
    }

    let dp = attached(&sandbox, SOURCE_ROUTE_POLICY);
    for (kind, relay, case) in routes {
        let got = source_routed(&sandbox, kind, relay, addr::US_V4, 5432, 20);
        assert_eq!(got, 0, "user data, {case}, to us-east");
        // Traffic of no class is not held up by its route.
        let got = source_routed(&sandbox, kind, relay, addr::US_V4, 7000, 20);
        assert_eq!(got, 20, "other traffic, {case}, to us-east");
    }
    // Unrouted user data still reaches the allowed region, and no more than that.
    assert_eq!(udp_delivered(&sandbox, addr::EU_V4, 5432, 20), 20);
    assert_eq!(udp_delivered(&sandbox, addr::US_V4, 5432, 20), 0);

    let routed_denied = packets_where(&dp, |k| k.reason == Reason::RoutingHeaderDenied as u8);
    assert_eq!(routed_denied, 40, "each routed datagram, denied as routed");
}

/// Sends `count` datagrams to `dst:port` from a socket whose `IPV6_RTHDR` is a segment
/// routing header (type 4, which needs no privilege) through `relay`: the kernel puts the
/// relay in the header's destination and `dst` in the segment list. Returns how many
/// `dst` received.
fn segment_routed(sandbox: &Sandbox, relay: &'static str, dst: &str, port: u16, count: u32) -> u32 {
    let relay: std::net::Ipv6Addr = relay.parse().expect("relay");
    // Next header (the kernel's), length in 8-byte units past the first, type 4, segments
    // left 1, last entry 1, flags, tag; then the segments, last first: the kernel fills
    // segment 0 with the socket's destination.
    let mut srh = vec![0u8, 4, 4, 1, 1, 0, 0, 0];
    srh.extend_from_slice(&[0; 16]);
    srh.extend_from_slice(&relay.octets());
    let option = (libc::IPPROTO_IPV6, libc::IPV6_RTHDR, "IPV6_RTHDR");
    delivered_with_option(sandbox, "[::]:0", option, srh, dst, port, count)
}

/// An SRv6 routing header set by an unprivileged socket, through a relay in eu-west to
/// us-east. The world namespace is the relay and the final host, with segment routing
/// enabled as a router of the path may have it. Before, with `unknown: allow`, 20 of 20
/// arrived.
#[test]
fn segment_routes_through_an_allowed_relay_do_not_reach_a_denied_region() {
    require_root();
    let sandbox = Sandbox::new("sg");
    world_relays(&sandbox, &[SEG6_ENABLED]);
    let got = segment_routed(&sandbox, addr::EU_V6, addr::US_V6, 5432, 20);
    assert_eq!(got, 20, "before the datapath is attached");

    let dp = attached(&sandbox, SOURCE_ROUTE_POLICY);
    let got = segment_routed(&sandbox, addr::EU_V6, addr::US_V6, 5432, 20);
    assert_eq!(got, 0, "user data, through eu-west, to us-east");
    let got = segment_routed(&sandbox, addr::EU_V6, addr::US_V6, 7000, 20);
    assert_eq!(got, 20, "other traffic on the same route");
    assert_eq!(udp_delivered(&sandbox, addr::EU_V6, 5432, 20), 20);

    let routed_denied = packets_where(&dp, |k| k.reason == Reason::RoutingHeaderDenied as u8);
    assert_eq!(routed_denied, 20, "each routed datagram, denied as routed");
}

/// A class that denies destinations in no region (`unknown: deny`), and an exemption for
/// the relay, as a management network would be.
const EXEMPT_RELAY_POLICY: &str = r#"
version: 1
exempt: [192.0.2.2/32, "2001:db8:1::2/128"]
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  user-data:
    match:
      protocols: [udp]
      dst_ports: [5432]
    allow: [eu-west]
    unknown: deny
"#;

/// Routes whose first hop is exempt: the exemption was checked first, on the header's
/// destination, and let the packet out before the route was looked at. Before, 40 of 40
/// arrived through the relay. An exemption covers the hop, not where the route goes on
/// to. (A link-local first hop, exempt in the datapath itself, is a `prog_test_run` case.)
#[test]
fn an_exempt_first_hop_does_not_exempt_the_rest_of_a_route() {
    require_root();
    let sandbox = Sandbox::new("sx");
    world_relays(&sandbox, &[SEG6_ENABLED, ACCEPT_SOURCE_ROUTE]);
    let routed = |port| {
        [
            segment_routed(&sandbox, addr::WORLD_V6, addr::US_V6, port, 20),
            source_routed(&sandbox, LSRR, addr::WORLD_V4, addr::US_V4, port, 20),
        ]
    };
    assert_eq!(routed(5432), [20, 20], "before the datapath is attached");

    let dp = attached(&sandbox, EXEMPT_RELAY_POLICY);
    assert_eq!(
        routed(5432),
        [0, 0],
        "user data through an exempt relay to us-east"
    );
    assert_eq!(routed(7000), [20, 20], "other traffic on the same routes");
    // The exemption itself still holds, and the allowed region is still reachable.
    assert_eq!(udp_delivered(&sandbox, addr::WORLD_V6, 5432, 20), 20);
    assert_eq!(udp_delivered(&sandbox, addr::WORLD_V4, 5432, 20), 20);
    assert_eq!(udp_delivered(&sandbox, addr::EU_V6, 5432, 20), 20);
    let routed_denied = packets_where(&dp, |k| k.reason == Reason::RoutingHeaderDenied as u8);
    assert_eq!(routed_denied, 40, "each routed datagram, denied as routed");
}

/// Whether this kernel can make tunnel devices of `kind`: built in, or a module it ships.
/// The matrix's Debian kernels have ipip and gre as modules; the host kernel of these
/// machines has neither.
fn kernel_has_tunnel(kind: &str) -> bool {
    let (dir, module) = match kind {
        "ipip" => ("kernel/net/ipv4", "ipip"),
        "ip6tnl" => ("kernel/net/ipv6", "ip6_tunnel"),
        _ => ("kernel/net/ipv4", "ip_gre"),
    };
    kernel_has_module(dir, module)
}

/// Whether this kernel ships `module` under `dir` of its modules, or has it built in.
fn kernel_has_module(dir: &str, module: &str) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let modules = std::path::Path::new("/lib/modules").join(release.trim());
    let shipped = [dir].iter().any(|dir| {
        std::fs::read_dir(modules.join(dir)).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{module}.ko"))
            })
        })
    });
    let built_in = std::fs::read_to_string(modules.join("modules.builtin"))
        .is_ok_and(|list| list.contains(&format!("/{module}.ko")));
    shipped || built_in
}

/// Makes a tunnel device `name` of `kind` in `ns`, from `local` to `remote`, holding
/// `address`/30.
fn tunnel_device(ns: &NetNs, kind: &str, name: &str, local: &str, remote: &str, address: &str) {
    ns.ip(&format!(
        "link add {name} type {kind} remote {remote} local {local}"
    ));
    ns.ip(&format!("addr add {address}/30 dev {name}"));
    ns.ip(&format!("link set {name} up"));
}

/// User data through the kernel's own tunnel devices (IP in IP, GRE) whose far end is in
/// a denied region. Inside, the destination is in no region, which the class's `unknown`
/// rule allows; on the uplink, the outer packet goes to us-east, and it is judged by the
/// user data it carries. Before, the outer packet (protocol 4 or 47, no ports) was no
/// class's: 20 of 20 arrived. A tunnel to eu-west still carries it.
#[test]
fn user_data_in_kernel_tunnels_to_a_denied_region_stops_at_the_uplink() {
    require_root();
    let kinds: Vec<&str> = ["ipip", "gre"]
        .into_iter()
        .filter(|kind| kernel_has_tunnel(kind))
        .collect();
    if kinds.is_empty() {
        eprintln!("note: this kernel has no ipip or gre devices: run on the kernel matrix");
        return;
    }
    let sandbox = Sandbox::new("kt");
    let mut dp = None;
    for (i, kind) in kinds.iter().enumerate() {
        let (to_us, to_eu) = (format!("kt{i}u"), format!("kt{i}e"));
        let (us_inner, eu_inner) = (format!("10.99.{i}.2"), format!("10.98.{i}.2"));
        for (name, far, inner) in [(&to_us, addr::US_V4, i), (&to_eu, addr::EU_V4, i)] {
            let subnet = if far == addr::US_V4 { 99 } else { 98 };
            tunnel_device(
                &sandbox.host,
                kind,
                name,
                addr::HOST_V4,
                far,
                &format!("10.{subnet}.{inner}.1"),
            );
            tunnel_device(
                &sandbox.world,
                kind,
                name,
                far,
                addr::HOST_V4,
                &format!("10.{subnet}.{inner}.2"),
            );
        }
        if dp.is_none() {
            // Without the datapath the tunnel carries it: the zero below is datafence's.
            let got = udp_delivered(&sandbox, &us_inner, 5432, 20);
            assert_eq!(got, 20, "{kind}: before the datapath is attached");
            dp = Some(attached(&sandbox, POLICY));
        }
        let got = udp_delivered(&sandbox, &us_inner, 5432, 20);
        assert_eq!(got, 0, "{kind}: user data through a tunnel to us-east");
        let got = udp_delivered(&sandbox, &eu_inner, 5432, 20);
        assert_eq!(got, 20, "{kind}: user data through a tunnel to eu-west");
        eprintln!("{kind}: tried");
    }
}

/// VXLAN on UDP 8472, Linux's default port and Flannel's and Cilium's, was classified by
/// its outer headers: UDP to 8472, which a class of the Postgres port does not claim, so
/// the Postgres traffic inside reached us-east. It is read as VXLAN now, as on 4789.
#[test]
fn vxlan_on_linuxs_default_port_is_classified_by_what_it_carries() {
    require_root();
    if !kernel_has_module("kernel/drivers/net/vxlan", "vxlan") {
        eprintln!("note: this kernel has no vxlan devices: run on the kernel matrix");
        return;
    }
    let sandbox = Sandbox::new("vx");
    for (name, vni, far, subnet) in [("vxu", 42, addr::US_V4, 95), ("vxe", 43, addr::EU_V4, 94)] {
        for (ns, local, remote, end) in [
            (&sandbox.host, addr::HOST_V4, far, 1),
            (&sandbox.world, far, addr::HOST_V4, 2),
        ] {
            ns.ip(&format!(
                "link add {name} type vxlan id {vni} local {local} remote {remote} dstport 8472"
            ));
            ns.ip(&format!("addr add 10.{subnet}.0.{end}/30 dev {name}"));
            ns.ip(&format!("link set {name} up"));
        }
    }
    // Without the datapath the tunnel carries it: the zero below is datafence's.
    assert_eq!(udp_delivered(&sandbox, "10.95.0.2", 5432, 20), 20);
    let _dp = attached(&sandbox, POSTGRES_POLICY);
    assert_eq!(
        udp_delivered(&sandbox, "10.95.0.2", 5432, 20),
        0,
        "Postgres through VXLAN on 8472 to us-east"
    );
    assert_eq!(
        udp_delivered(&sandbox, "10.94.0.2", 5432, 20),
        20,
        "Postgres through VXLAN on 8472 to eu-west"
    );
}

/// A class of the Postgres port alone, allowed to eu-west.
const POSTGRES_POLICY: &str = r#"
version: 1
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  postgres:
    match:
      dst_ports: [5432]
    allow: [eu-west]
    unknown: allow
"#;

/// Linux's ip6tnl puts a destination options header, holding the encapsulation limit,
/// between the IPv6 header and the tunnel unless made with `encaplimit none`. That header
/// made every packet of such a tunnel malformed, so a class that could claim it denied
/// it: the tunnel to eu-west carried nothing of the class's. Now the inner headers are
/// read behind it, and the outer destination decides as for any tunnel.
#[test]
fn ipv6_tunnels_are_read_behind_the_encapsulation_limit_linux_adds() {
    require_root();
    if !kernel_has_tunnel("ip6tnl") {
        eprintln!("note: this kernel has no ip6tnl devices: run on the kernel matrix");
        return;
    }
    let sandbox = Sandbox::new("k6");
    for (name, far, subnet) in [("k6u", addr::US_V6, 97), ("k6e", addr::EU_V6, 96)] {
        for (ns, local, remote, end) in [
            (&sandbox.host, addr::HOST_V6, far, 1),
            (&sandbox.world, far, addr::HOST_V6, 2),
        ] {
            ns.ip(&format!(
                "-6 link add {name} type ip6tnl mode ipip6 remote {remote} local {local}"
            ));
            ns.ip(&format!("addr add 10.{subnet}.0.{end}/30 dev {name}"));
            ns.ip(&format!("link set {name} up"));
        }
    }
    let _dp = attached(&sandbox, POLICY);
    assert_eq!(
        udp_delivered(&sandbox, "10.96.0.2", 5432, 20),
        20,
        "user data through an ip6tnl tunnel to eu-west"
    );
    assert_eq!(
        udp_delivered(&sandbox, "10.97.0.2", 5432, 20),
        0,
        "user data through an ip6tnl tunnel to us-east"
    );
}

/// Linux routes IP into MPLS with `encap mpls`: the packets leave with MPLS's ethertype,
/// and passed as not IP, whatever they carried. The datapath now reads the IP packet
/// under the labels; the world namespace pops them and delivers it.
#[test]
fn ip_that_routes_push_into_mpls_is_judged_by_the_packet_under_the_labels() {
    require_root();
    if !mpls_routing() {
        eprintln!("note: this kernel has no MPLS routing: run on the kernel matrix");
        return;
    }
    let sandbox = Sandbox::new("mp");
    sandbox
        .world
        .exec(&["sysctl", "-q", "-w", "net.mpls.platform_labels=1000"]);
    // The world pops the labels, the last onto its loopback, which delivers the packet.
    for device in ["dn0", "lo"] {
        sandbox.world.exec(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.mpls.conf.{device}.input=1"),
        ]);
    }
    for (dst, label) in [
        (addr::EU_V4, 100),
        (addr::US_V4, 101),
        (addr::EU_V6, 102),
        (addr::US_V6, 103),
    ] {
        let (family, bits, via) = if dst.contains(':') {
            ("-6", 128, addr::WORLD_V6)
        } else {
            ("-4", 32, addr::WORLD_V4)
        };
        // Two labels: the stack is walked, not just its first entry.
        sandbox.host.ip(&format!(
            "{family} route replace {dst}/{bits} encap mpls {label}/200 via {via} dev up0"
        ));
        sandbox
            .world
            .ip(&format!("-f mpls route add {label} dev lo"));
        sandbox.world.ip("-f mpls route replace 200 dev lo");
    }
    let dp = attached(&sandbox, POLICY);
    for (dst, want) in [
        (addr::EU_V4, 20),
        (addr::US_V4, 0),
        (addr::EU_V6, 20),
        (addr::US_V6, 0),
    ] {
        assert_eq!(
            udp_delivered(&sandbox, dst, 5432, 20),
            want,
            "user data routed into MPLS to {dst}"
        );
    }
    let not_ip = packets_where(&dp, |k| k.reason == Reason::NotIp as u8);
    assert_eq!(not_ip, 0, "frames the datapath passed as not IP");
}

/// On a device without a link-layer header, an MPLS packet starts with its labels, which
/// say nothing of the family: the kernel's protocol for the packet says it is MPLS.
#[test]
fn ip_pushed_into_mpls_on_a_device_without_a_link_layer_header_is_judged() {
    require_root();
    if !mpls_routing() {
        eprintln!("note: this kernel has no MPLS routing: run on the kernel matrix");
        return;
    }
    let ns = NetNs::new("tunm");
    let mut tun = Tun::create(&ns, "dftun1");
    ns.ip("addr add 10.98.0.1/24 dev dftun1");
    ns.ip("-6 addr add 2001:db8:98::1/64 dev dftun1 nodad");
    ns.ip("link set dftun1 up");
    for (dst, bits) in [
        (addr::EU_V4, 32),
        (addr::US_V4, 32),
        (addr::EU_V6, 128),
        (addr::US_V6, 128),
    ] {
        ns.ip(&format!(
            "route add {dst}/{bits} encap mpls 100/200 dev dftun1"
        ));
    }
    let compiled = policy_from_yaml(POLICY).compile();
    let dp = ns.run(move || {
        let mut dp = Datapath::load(&LoadOptions::default()).expect("load");
        dp.apply(&compiled, EventLimits::default()).expect("apply");
        dp.attach_tc("dftun1").expect("attach");
        dp
    });
    for (dst, expected) in [
        (addr::EU_V4, 20),
        (addr::US_V4, 0),
        (addr::EU_V6, 20),
        (addr::US_V6, 0),
    ] {
        ns.run(move || {
            let dst = SocketAddr::new(dst.parse().expect("dst"), 5432);
            let unspecified: SocketAddr = if dst.is_ipv4() {
                "0.0.0.0:0".parse().expect("addr")
            } else {
                "[::]:0".parse().expect("addr")
            };
            let sock = UdpSocket::bind(unspecified).expect("bind");
            for i in 0..20u32 {
                // A denied datagram may fail at send time: that is the point.
                let _ = sock.send_to(&i.to_be_bytes(), dst);
            }
        });
        // Two label stack entries of four bytes each.
        let got = tun.udp_received_behind(8, dst.parse().expect("dst"), 5432);
        assert_eq!(got, expected, "UDP to {dst} in MPLS over dftun1");
    }
    let not_ip = packets_where(&dp, |k| k.reason == Reason::NotIp as u8);
    assert_eq!(not_ip, 0, "packets the datapath passed as not IP");
    drop(dp);
}

/// Loads the kernel's MPLS routing, and says whether it has it.
fn mpls_routing() -> bool {
    for module in ["mpls_router", "mpls_iptunnel"] {
        let _ = std::process::Command::new("modprobe").arg(module).output();
    }
    std::path::Path::new("/proc/sys/net/mpls").exists()
        && kernel_has_module("kernel/net/mpls", "mpls_iptunnel")
}

/// A class that claims all of the host's UDP and ICMPv6, allowed only to eu-west (which
/// holds the uplink's on-link /64, so a neighbour there is reachable) and denied
/// everything in no region; `{switches}` is its `host_essentials`.
fn all_udp_policy(switches: &str) -> String {
    format!(
        r#"
version: 1
host_essentials: {switches}
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48", "2001:db8:1::/64"]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  everything:
    match:
      protocols: [udp, icmpv6]
    allow: [eu-west]
    unknown: deny
"#
    )
}

/// Sends `count` datagrams from the host namespace to the link-scope multicast group or
/// broadcast address `dst`, out of the uplink, and returns how many a receiver in the
/// world namespace (a member of the group) got.
fn link_scope_delivered(sandbox: &Sandbox, dst: &str, port: u16, count: u32) -> (u32, String) {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};
    let dst: IpAddr = dst.parse().expect("dst");
    if dst.is_ipv6() {
        until_no_tentative_addresses(sandbox);
    }
    let receiver = sandbox.world.run(move || {
        let sock = match dst {
            IpAddr::V4(group) => {
                let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
                if group.is_multicast() {
                    let on: Ipv4Addr = addr::WORLD_V4.parse().expect("address");
                    sock.join_multicast_v4(&group, &on).expect("join");
                }
                sock
            }
            IpAddr::V6(group) => {
                let sock = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)).expect("bind");
                let dn0 = datafence::datapath::if_index("dn0").expect("dn0");
                sock.join_multicast_v6(&group, dn0).expect("join");
                sock
            }
        };
        sock.set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .expect("timeout");
        sock
    });
    let send_error = sandbox.host.run(move || {
        let (sock, to) = match dst {
            IpAddr::V4(_) => {
                // Bound to the uplink's address: the route to a broadcast or link-scope
                // group is the interface that owns the source.
                let sock = UdpSocket::bind((addr::HOST_V4, 0)).expect("bind");
                sock.set_broadcast(true).expect("broadcast");
                (sock, SocketAddr::new(dst, port))
            }
            IpAddr::V6(group) => {
                let up0 = datafence::datapath::if_index("up0").expect("up0");
                let sock = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).expect("bind");
                (sock, SocketAddr::V6(SocketAddrV6::new(group, port, 0, up0)))
            }
        };
        // A denied datagram may be an error on send: what counts is what arrived; the
        // first error is kept for the failure message.
        (0..count)
            .filter_map(|_| sock.send_to(b"host", to).err())
            .map(|e| e.to_string())
            .next()
            .unwrap_or_default()
    });
    let mut got = 0;
    let mut buf = [0u8; 16];
    while got < count && receiver.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    (got, send_error)
}

/// Waits until neither end of the veth has an IPv6 address still in duplicate address
/// detection: until then the kernel may pick no usable source for link-scope traffic.
fn until_no_tentative_addresses(sandbox: &Sandbox) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for (ns, dev) in [(&sandbox.host, "up0"), (&sandbox.world, "dn0")] {
        while !ns
            .ip(&format!("-6 addr show dev {dev} tentative"))
            .stdout
            .is_empty()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Waits, up to five seconds, until `dev` in `ns` has joined multicast `group`.
fn until_joined(ns: &NetNs, dev: &str, group: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !String::from_utf8_lossy(&ns.ip(&format!("-6 maddr show dev {dev}")).stdout)
        .split_whitespace()
        .any(|word| word == group)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// What reaches the world from the host under [`all_udp_policy`] with `switches`: DHCPv4,
/// DHCPv6, mDNS over both families, and whether the host can resolve a new on-link
/// neighbour's address (neighbour discovery) to send it UDP.
fn host_link_traffic(label: &str, switches: &str) -> ([u32; 5], u32, u64, String) {
    let sandbox = Sandbox::new(label);
    let dp = attached(&sandbox, &all_udp_policy(switches));
    let mut delivered = [0; 5];
    let mut notes = String::new();
    for (i, (dst, port)) in [
        ("255.255.255.255", 67),
        ("ff02::1:2", 547),
        ("224.0.0.251", 5353),
        ("ff02::fb", 5353),
        // NetBIOS datagrams: broadcast, but what a router's UDP helper forwards.
        ("255.255.255.255", 138),
    ]
    .into_iter()
    .enumerate()
    {
        let (got, send_error) = link_scope_delivered(&sandbox, dst, port, 5);
        delivered[i] = got;
        if !send_error.is_empty() {
            write!(notes, "{dst}: {send_error}; ").expect("write");
        }
    }
    // No static neighbour for this address: the host must solicit it. The world joins
    // the address's solicited-node group from addrconf's work queue, after `ip` has
    // returned; a solicitation that comes first goes unanswered, and the kernel's next
    // is a second later, so the receiver waits out two retries.
    sandbox
        .world
        .ip("-6 addr add 2001:db8:1::3/64 dev dn0 nodad");
    until_joined(&sandbox.world, "dn0", "ff02::1:ff00:3");
    let to_new_neighbour = udp_delivered_within(
        &sandbox,
        "2001:db8:1::3",
        7700,
        5,
        std::time::Duration::from_secs(3),
        |to| send_from_host(&sandbox, to, 5, 0, 4),
    );
    let exempt = packets_where(&dp, |k| k.reason == Reason::ExemptHostEssential as u8);
    let neighbours = sandbox.host.ip("-6 neigh show dev up0").stdout;
    write!(
        notes,
        "host neighbours: {}; counters: {:?}",
        String::from_utf8_lossy(&neighbours).trim(),
        dp.counters().expect("counters")
    )
    .expect("write");
    (delivered, to_new_neighbour, exempt, notes)
}

/// The host's DHCP, neighbour discovery and link-scope multicast keep working under a
/// class that claims all of its UDP and ICMPv6 and denies every destination in no
/// region; with the policy's switches off, the same class stops all of it.
#[test]
fn dhcp_neighbour_discovery_and_multicast_from_the_host_pass_a_class_of_all_udp() {
    require_root();
    let (delivered, to_new_neighbour, exempt, notes) = host_link_traffic("he", "{}");
    assert_eq!(
        delivered,
        [5, 5, 5, 5, 0],
        "DHCPv4, DHCPv6, mDNS over IPv4 and IPv6, and no other broadcast: {notes}"
    );
    assert!(
        to_new_neighbour > 0,
        "the new neighbour was never resolved: {notes}"
    );
    // 20 datagrams, and at least one neighbour solicitation.
    assert!(
        exempt >= 21,
        "{exempt} packets counted as exempt_host_essential"
    );

    let off = "{dhcp: false, neighbor_discovery: false, link_multicast: false}";
    let (delivered, to_new_neighbour, exempt, _) = host_link_traffic("hf", off);
    assert_eq!(
        delivered, [0; 5],
        "switched off: DHCP and mDNS are the class's"
    );
    assert_eq!(
        to_new_neighbour, 0,
        "switched off: neighbour solicitations are denied"
    );
    assert_eq!(exempt, 0);
}
