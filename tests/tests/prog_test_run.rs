//! The real programs on crafted frames through `BPF_PROG_TEST_RUN`: each test asserts the
//! verdict, the counters and the ring-buffer events.

use std::net::{IpAddr, Ipv6Addr};

use datafence::datapath::{Datapath, EventLimits};
use datafence_common::{CLASS_NONE, Hook, REGION_NONE, Reason, Verdict, ViolationEvent, stat};
use integration_tests::{
    datapath_with,
    frames::{self, Frame, Spec},
};

const POLICY: &str = r#"
version: 1
mode: enforce
exempt: [10.0.0.0/8, "fd00:aaaa::/32"]
nat64: ["2001:db8:64::/96"]
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
  eu-north:
    cidrs: [198.51.100.128/25, "2001:db8:100:8000::/49"]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  marked:
    match:
      marks: [{value: 0x10, mask: 0xff}]
    allow: [eu-west]
    unknown: deny
  https:
    match:
      protocols: [tcp]
      dst_ports: [443, "8000-8100"]
    allow: [eu-west, eu-north]
    unknown: allow
  dscp-audit:
    match:
      dscp: [10]
    allow: [eu-west]
    unknown: deny
    mode: audit
  dns-from-range:
    match:
      src_cidrs: [192.0.2.0/25, "2001:db8:1::/64"]
      protocols: [udp]
      dst_ports: [53]
    allow: [eu-west]
    unknown: deny
  open:
    match:
      protocols: [tcp]
      dst_ports: [9999]
    allow: [eu-west, eu-north, us-east]
    unknown: allow
"#;

const MARKED: u8 = 0;
const HTTPS: u8 = 1;
const DSCP_AUDIT: u8 = 2;
const DNS: u8 = 3;
const OPEN: u8 = 4;
const EU_WEST: u16 = 1;
const EU_NORTH: u16 = 2;
const US_EAST: u16 = 3;

const SRC4: &str = "192.0.2.1";
const SRC6: &str = "2001:db8:1::1";
const EU4: &str = "198.51.100.10";
const EU_NORTH4: &str = "198.51.100.200";
const US4: &str = "203.0.113.10";
const NOWHERE4: &str = "192.0.2.99";
const EU6: &str = "2001:db8:100::10";
const US6: &str = "2001:db8:300::10";

fn setup() -> Datapath {
    datapath_with(POLICY, EventLimits::default()).0
}

/// What one frame did: verdict from the program, plus the counter and event it left.
struct Outcome {
    passed: bool,
    class: u8,
    region: u16,
    verdict: Verdict,
    reason: Reason,
    packets: u64,
    bytes: u64,
    events: Vec<ViolationEvent>,
}

/// Runs one frame and reads back the counter it created. Counters accumulate per
/// datapath, so each call diffs against the counters before it.
fn run(dp: &mut Datapath, hook: Hook, frame: &[u8], mark: u32) -> Outcome {
    let before = dp.counters().expect("counters");
    let passed = dp.test_run(hook, frame, mark).expect("test run");
    let after = dp.counters().expect("counters");
    let changed: Vec<_> = after
        .into_iter()
        .filter(|(k, v)| {
            k.hook == hook as u8
                && before
                    .iter()
                    .find(|(bk, _)| bk == k)
                    .is_none_or(|(_, bv)| bv.packets != v.packets)
        })
        .collect();
    assert_eq!(
        changed.len(),
        1,
        "exactly one counter moves per frame: {changed:?}"
    );
    let (key, value) = changed[0];
    let prior = before
        .iter()
        .find(|(bk, _)| *bk == key)
        .map(|(_, v)| *v)
        .unwrap_or_default();
    Outcome {
        passed,
        class: key.class,
        region: key.region,
        verdict: Verdict::from_u8(key.verdict).expect("verdict"),
        reason: Reason::from_u8(key.reason).expect("reason"),
        packets: value.packets - prior.packets,
        bytes: value.bytes - prior.bytes,
        events: dp.drain_events().expect("events"),
    }
}

fn tc(dp: &mut Datapath, frame: &Frame) -> Outcome {
    run(dp, Hook::TcEgress, &frame.bytes, 0)
}

const TC: Hook = Hook::TcEgress;
const XDP: Hook = Hook::Xdp;

/// What the datapath must make of a frame: whether it passes, and the counter it moves.
#[derive(Clone, Copy, Debug)]
struct Want {
    passed: bool,
    class: u8,
    region: u16,
    verdict: Verdict,
    reason: Reason,
}

const fn allow(class: u8, region: u16, reason: Reason) -> Want {
    Want {
        passed: true,
        class,
        region,
        verdict: Verdict::Allow,
        reason,
    }
}

const fn deny(class: u8, region: u16, reason: Reason) -> Want {
    Want {
        passed: false,
        class,
        region,
        verdict: Verdict::Deny,
        reason,
    }
}

/// An audit hit: a denial that passes.
const fn audit(class: u8, region: u16) -> Want {
    Want {
        passed: true,
        class,
        region,
        verdict: Verdict::Audit,
        reason: Reason::RegionDenied,
    }
}

#[track_caller]
fn assert_outcome(o: &Outcome, want: Want) {
    check(o, want, "");
}

#[track_caller]
fn check(o: &Outcome, want: Want, case: &str) {
    let Want {
        passed,
        class,
        region,
        verdict,
        reason,
    } = want;
    assert_eq!(
        (o.passed, o.class, o.region, o.verdict, o.reason),
        (passed, class, region, verdict, reason),
        "{case}"
    );
    assert_eq!(o.packets, 1, "{case}");
    let expect_event = verdict != Verdict::Allow;
    assert_eq!(
        o.events.len(),
        usize::from(expect_event),
        "{case} events: {:?}",
        o.events
    );
}

/// Runs a table of (hook, frame, mark, outcome) cases in order and checks each; returns
/// the outcomes, for the checks a table cannot hold (event fields).
#[track_caller]
fn assert_cases(dp: &mut Datapath, cases: &[(Hook, Vec<u8>, u32, Want)]) -> Vec<Outcome> {
    cases
        .iter()
        .enumerate()
        .map(|(i, (hook, frame, mark, want))| {
            let o = run(dp, *hook, frame, *mark);
            check(&o, *want, &format!("case {i}:"));
            o
        })
        .collect()
}

#[test]
fn ipv4_allowed_denied_and_counted() {
    let mut dp = setup();
    let allowed = Spec::tcp(SRC4, EU4, 443).build();
    let o = tc(&mut dp, &allowed);
    assert_outcome(&o, allow(HTTPS, EU_WEST, Reason::RegionAllowed));
    assert_eq!(o.bytes, allowed.bytes.len() as u64);

    let denied = Spec::tcp(SRC4, US4, 443).build();
    let o = tc(&mut dp, &denied);
    assert_outcome(&o, deny(HTTPS, US_EAST, Reason::RegionDenied));
    let ev = o.events[0];
    assert_eq!(ev.hook, Hook::TcEgress as u8);
    assert_eq!(ev.family, 4);
    assert_eq!(ev.protocol, frames::TCP);
    assert_eq!(&ev.src_addr[..4], &[192, 0, 2, 1]);
    assert_eq!(&ev.dst_addr[..4], &[203, 0, 113, 10]);
    assert_eq!((ev.src_port, ev.dst_port), (40000, 443));
    assert_eq!(ev.packet_len, denied.bytes.len() as u32);
    assert_eq!((ev.class, ev.region), (HTTPS, US_EAST));
    assert_eq!(ev.reason, Reason::RegionDenied as u8);
    assert_eq!(ev.verdict, Verdict::Deny as u8);
    assert_ne!(ev.timestamp_ns, 0);
    assert_eq!(ev.policy_generation, 1);

    // The most specific prefix wins: eu-north sits inside eu-west's /24.
    let o = tc(&mut dp, &Spec::tcp(SRC4, EU_NORTH4, 8080).build());
    assert_outcome(&o, allow(HTTPS, EU_NORTH, Reason::RegionAllowed));
}

#[test]
fn ipv6_allowed_and_denied() {
    let mut dp = setup();
    let o = assert_cases(
        &mut dp,
        &[
            (
                TC,
                Spec::tcp(SRC6, EU6, 443).build().bytes,
                0,
                allow(HTTPS, EU_WEST, Reason::RegionAllowed),
            ),
            (
                TC,
                Spec::tcp(SRC6, US6, 443).build().bytes,
                0,
                deny(HTTPS, US_EAST, Reason::RegionDenied),
            ),
        ],
    );
    let o = &o[1];
    assert_eq!(o.events[0].family, 6);
    assert_eq!(
        o.events[0].dst_addr,
        US6.parse::<Ipv6Addr>().unwrap().octets()
    );
}

#[test]
fn vlan_and_qinq_frames_are_judged_like_untagged_ones() {
    let mut dp = setup();
    for (vlans, qinq) in [
        (vec![100], false),
        (vec![100, 200], true),
        (vec![100, 200], false),
    ] {
        for (dst, passed) in [(EU4, true), (US4, false), (EU6, true), (US6, false)] {
            let src = if dst.contains(':') { SRC6 } else { SRC4 };
            let mut spec = Spec::tcp(src, dst, 443);
            spec.vlans = vlans.clone();
            spec.qinq = qinq;
            let o = tc(&mut dp, &spec.build());
            assert_eq!(o.passed, passed, "{vlans:?} qinq={qinq} to {dst}");
            assert_eq!(o.class, HTTPS);
        }
    }
    // A third tag is more than the parser walks: the payload could be user data, so the
    // frame is judged malformed and dropped (fail closed).
    let mut spec = Spec::tcp(SRC4, EU4, 443);
    spec.vlans = vec![1, 2, 3];
    let o = tc(&mut dp, &spec.build());
    assert_outcome(&o, deny(HTTPS, REGION_NONE, Reason::MalformedDenied));
}

#[test]
fn ipv4_options_are_skipped_to_reach_the_ports() {
    let mut dp = setup();
    for options in [vec![1u8; 4], vec![1u8; 40]] {
        let mut spec = Spec::tcp(SRC4, US4, 443);
        spec.ipv4_options = options;
        let o = tc(&mut dp, &spec.build());
        assert_outcome(&o, deny(HTTPS, US_EAST, Reason::RegionDenied));
        assert_eq!(o.events[0].dst_port, 443);
    }
}

/// A first fragment (offset 0, more to come) of a datagram with `id`, and a later one.
fn fragments(mut spec: Spec, id: u32) -> [Frame; 2] {
    let v4 = spec.dst.is_ipv4();
    [0u16, 185].map(|offset| {
        if v4 {
            spec.ipv4_id = id as u16;
            spec.fragment_offset = offset;
            spec.more_fragments = offset == 0;
        } else {
            spec.ipv6_ext = vec![(44, frames::ipv6_fragment_of(offset, offset == 0, id))];
        }
        spec.build()
    })
}

#[test]
fn later_fragments_take_the_verdict_of_their_first_fragment() {
    let mut dp = setup();
    for (n, (src, dst, port, want)) in [
        // A datagram no class claims passes whole: its later fragments carry no ports,
        // and without the first fragment's verdict the DNS class would claim them.
        (
            SRC4,
            US4,
            9999,
            allow(CLASS_NONE, REGION_NONE, Reason::Unclassified),
        ),
        (SRC4, US4, 53, deny(DNS, US_EAST, Reason::RegionDenied)),
        (SRC4, EU4, 53, allow(DNS, EU_WEST, Reason::RegionAllowed)),
        (
            SRC6,
            US6,
            9999,
            allow(CLASS_NONE, REGION_NONE, Reason::Unclassified),
        ),
        (SRC6, US6, 53, deny(DNS, US_EAST, Reason::RegionDenied)),
        (SRC6, EU6, 53, allow(DNS, EU_WEST, Reason::RegionAllowed)),
    ]
    .into_iter()
    .enumerate()
    {
        let [first, later] = fragments(Spec::udp(src, dst, port), 0x100 + n as u32);
        check(
            &tc(&mut dp, &first),
            want,
            &format!("first fragment to {dst}:{port}"),
        );
        for i in 0..2 {
            check(
                &tc(&mut dp, &later),
                want,
                &format!("later fragment {i} to {dst}:{port}"),
            );
        }
    }
}

#[test]
fn a_later_fragment_whose_first_was_not_seen_fails_closed() {
    let mut dp = setup();
    // Seen: the first fragment of datagram 7 to an unclassified port.
    let [first, _] = fragments(Spec::udp(SRC4, US4, 9999), 7);
    tc(&mut dp, &first);
    for (case, spec, id, want) in [
        // Another datagram: the first fragment of datagram 7 says nothing about it. Its
        // ports are unknown, so the DNS class claims it (over IPv6 its protocol is
        // unknown too, and the HTTPS class comes first), and may not reach us-east.
        (
            "v4 other id",
            Spec::udp(SRC4, US4, 9999),
            8,
            deny(DNS, US_EAST, Reason::FragmentUnseen),
        ),
        (
            "v6 other id",
            Spec::udp(SRC6, US6, 9999),
            8,
            deny(HTTPS, US_EAST, Reason::FragmentUnseen),
        ),
        // The class may reach eu-west: unseen or not, it passes.
        (
            "v4 allowed",
            Spec::udp(SRC4, EU4, 9999),
            9,
            allow(DNS, EU_WEST, Reason::RegionAllowed),
        ),
    ] {
        let [_, later] = fragments(spec, id);
        check(&tc(&mut dp, &later), want, case);
    }
    // An IPv6 first fragment whose fragment header follows another extension header is
    // not recorded (docs/architecture.md, "The decision"): its later fragments are
    // judged as unseen, which fails closed.
    let deeper = |offset: u16| {
        let mut spec = Spec::udp(SRC6, US6, 9999);
        spec.ipv6_ext = vec![
            (60, frames::ipv6_options_body()),
            (44, frames::ipv6_fragment_of(offset, offset == 0, 11)),
        ];
        spec.build()
    };
    check(
        &tc(&mut dp, &deeper(0)),
        allow(CLASS_NONE, REGION_NONE, Reason::Unclassified),
        "v6 first fragment behind destination options",
    );
    check(
        &tc(&mut dp, &deeper(185)),
        deny(HTTPS, US_EAST, Reason::FragmentUnseen),
        "its later fragment",
    );
    let mut tcp = Spec::tcp(SRC4, US4, 9999);
    tcp.ipv4_id = 7;
    tcp.fragment_offset = 185;
    // The addresses and id of datagram 7 with another protocol: IPv4 reassembles by
    // protocol too, so this is another datagram. The HTTPS class (tcp) claims it.
    check(
        &tc(&mut dp, &tcp.build()),
        deny(HTTPS, US_EAST, Reason::FragmentUnseen),
        "v4 other protocol",
    );
}

/// A later fragment takes its first fragment's verdict only when the same sender sent it
/// through the same hook. A sender the policy does not claim could otherwise send a first
/// fragment that passes, and one a class claims (by mark, DSCP or cgroup, which a later
/// fragment carries as well as the first) later fragments of that datagram, which would
/// pass with it to a region the class may not reach.
#[test]
fn a_later_fragment_from_another_sender_does_not_take_the_first_ones_verdict() {
    let mut dp = setup();
    let unclaimed = allow(CLASS_NONE, REGION_NONE, Reason::Unclassified);
    // Unmarked, to a port no class names: the first fragment passes.
    let [first, later] = fragments(Spec::udp(SRC4, US4, 9999), 0x51);
    check(
        &run(&mut dp, TC, &first.bytes, 0),
        unclaimed,
        "first fragment",
    );
    check(
        &run(&mut dp, TC, &later.bytes, 0x10),
        deny(MARKED, US_EAST, Reason::FragmentUnseen),
        "later fragment, marked",
    );
    check(
        &run(&mut dp, TC, &later.bytes, 0),
        unclaimed,
        "later fragment, as its first",
    );
    // The same datagram with another DSCP is another sender's: the DSCP class claims it.
    let mut spec = Spec::udp("192.0.2.200", US4, 9999);
    let [first, _] = fragments(spec.clone(), 0x52);
    spec.dscp = 10;
    let [_, later] = fragments(spec, 0x52);
    check(
        &run(&mut dp, TC, &first.bytes, 0),
        unclaimed,
        "first fragment, DSCP 0",
    );
    let o = run(&mut dp, TC, &later.bytes, 0);
    assert_eq!(
        (o.class, o.reason),
        (DSCP_AUDIT, Reason::FragmentUnseen),
        "later fragment, DSCP 10"
    );
    // A first fragment a gateway's XDP program judged says nothing of a later fragment
    // the host itself sends.
    let [first, later] = fragments(Spec::udp(SRC4, US4, 9999), 0x53);
    check(
        &run(&mut dp, XDP, &first.bytes, 0),
        unclaimed,
        "first fragment at XDP",
    );
    check(
        &run(&mut dp, TC, &later.bytes, 0),
        deny(DNS, US_EAST, Reason::FragmentUnseen),
        "later fragment at TC",
    );
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let mut dp = setup();
    let mut spec = Spec::tcp(SRC6, US6, 443);
    spec.ipv6_ext = vec![
        (0, frames::ipv6_options_body()),
        (60, frames::ipv6_options_body()),
    ];
    let o = tc(&mut dp, &spec.build());
    assert_outcome(&o, deny(HTTPS, US_EAST, Reason::RegionDenied));

    // Non-first fragment whose first was not seen: protocol and ports unknown (its
    // next-header field is not trusted), so the first class whose other selectors match
    // takes it, and the destination decides.
    let mut spec = Spec::udp(SRC6, US6, 53);
    spec.ipv6_ext = vec![(44, frames::ipv6_fragment(100))];
    let o = tc(&mut dp, &spec.build());
    assert_outcome(&o, deny(HTTPS, US_EAST, Reason::FragmentUnseen));

    // More extension headers than the parser walks: malformed, dropped if it could be
    // user data.
    let mut spec = Spec::tcp(SRC6, EU6, 443);
    spec.ipv6_ext = vec![(60, frames::ipv6_options_body()); 9];
    let o = tc(&mut dp, &spec.build());
    assert_outcome(&o, deny(HTTPS, REGION_NONE, Reason::MalformedDenied));
}

#[test]
fn an_ipv6_non_first_fragment_is_not_read_past_its_fragment_header() {
    let mut dp = setup();
    // The fragment header claims ICMPv6, which no class lists and which has no ports.
    // Linux ignores that field on a non-first fragment, and so does the parser: the
    // protocol and ports are unknown, and the https class (tcp, 443) is assumed to match.
    let cases = [
        (US6, deny(HTTPS, US_EAST, Reason::FragmentUnseen)),
        (EU6, allow(HTTPS, EU_WEST, Reason::RegionAllowed)),
    ];
    for (dst, want) in cases {
        let mut spec = Spec::udp(SRC6, dst, 9999);
        spec.protocol = 58;
        spec.payload = vec![0xab; 700];
        spec.ipv6_ext = vec![(44, frames::ipv6_fragment(100))];
        check(&tc(&mut dp, &spec.build()), want, dst);
    }
}

#[test]
fn bytes_past_the_ip_length_are_never_read_as_headers() {
    let mut dp = setup();
    // A UDP header to an unclassified port sits past the declared IP length, where the
    // receiver ignores it. Read as the transport header it would make the packet
    // unclassified; unread, the ports are unknown and the class that could own the
    // packet decides: fail closed.
    let mut v4 = Spec::udp(SRC4, US4, 9999).build();
    v4.declare_ip_length(20);
    // An IPv6 first fragment that ends exactly after its fragment header.
    let mut spec = Spec::udp(SRC6, US6, 9999);
    spec.ipv6_ext = vec![(44, frames::ipv6_fragment(0))];
    let mut v6 = spec.build();
    v6.declare_ip_length(8);
    for (name, frame) in [("ipv4", &v4), ("ipv6", &v6)] {
        check(
            &tc(&mut dp, frame),
            deny(DNS, REGION_NONE, Reason::MalformedDenied),
            name,
        );
    }
    // Ethernet padding after a short packet is not part of it, and changes nothing.
    let mut spec = Spec::udp(SRC4, US4, 53);
    spec.payload.clear();
    let mut padded = spec.build();
    padded.bytes.resize(60, 0);
    let o = tc(&mut dp, &padded);
    assert_outcome(&o, deny(DNS, US_EAST, Reason::RegionDenied));
    assert_eq!(o.events[0].dst_port, 53);
}

#[test]
fn a_nat64_address_is_judged_by_the_ipv4_address_it_embeds() {
    let mut dp = setup();
    // 64:ff9b::/96 (RFC 6052): the translator sends these on to the IPv4 address in the
    // last four bytes, which is where the region lies. As an IPv6 address it is in no
    // region, and https allows unknown destinations.
    let cases = [
        (
            "64:ff9b::cb00:710a",
            deny(HTTPS, US_EAST, Reason::RegionDenied),
            "203.0.113.10 inside",
        ),
        (
            "64:ff9b::c633:640a",
            allow(HTTPS, EU_WEST, Reason::RegionAllowed),
            "198.51.100.10 inside",
        ),
        // A prefix the policy declares, as a site's own translator uses.
        (
            "2001:db8:64::cb00:710a",
            deny(HTTPS, US_EAST, Reason::RegionDenied),
            "203.0.113.10 inside a declared prefix",
        ),
        (
            "2001:db8:64::c633:640a",
            allow(HTTPS, EU_WEST, Reason::RegionAllowed),
            "198.51.100.10 inside a declared prefix",
        ),
        (
            "2001:db8:65::cb00:710a",
            allow(HTTPS, REGION_NONE, Reason::UnknownAllowed),
            "beside the declared prefix",
        ),
        (
            "64:ff9b:1::cb00:710a",
            allow(HTTPS, REGION_NONE, Reason::UnknownAllowed),
            "outside the well-known prefix",
        ),
    ];
    for (dst, want, case) in cases {
        check(&tc(&mut dp, &Spec::tcp(SRC6, dst, 443).build()), want, case);
    }
}

#[test]
fn routing_header_with_segments_left_passes_only_an_allowed_hop_of_a_class_denied_nowhere() {
    let mut dp = setup();
    let final_hop: Ipv6Addr = US6.parse().unwrap();
    let routed_to_port = |dst: &str, port: u16| {
        let mut spec = Spec::tcp(SRC6, dst, port);
        spec.ipv6_ext = vec![(43, frames::ipv6_routing(1, &[final_hop]))];
        spec.build()
    };
    let routed_to = |dst: &str| routed_to_port(dst, 443);
    let cases = [
        // https may reach eu-west and allows unknown destinations, but not us-east: a
        // later segment could be there (the last one is), so an allowed hop is not enough.
        // This passed before, with the hop's region and the unknown rule: a leak.
        (
            routed_to(EU6),
            0,
            deny(HTTPS, EU_WEST, Reason::RoutingHeaderDenied),
            "allowed hop, unknown: allow, a region denied",
        ),
        // A class denied no destination at all: any segment is allowed.
        (
            routed_to_port(EU6, 9999),
            0,
            allow(OPEN, EU_WEST, Reason::RoutingHeaderAllowed),
            "a class denied nowhere",
        ),
        // The marked class denies unknown destinations.
        (
            routed_to(EU6),
            0x10,
            deny(MARKED, EU_WEST, Reason::RoutingHeaderDenied),
            "allowed hop, unknown: deny",
        ),
        // A next hop in a denied region is denied, whatever the unknown rule says.
        (
            routed_to(US6),
            0,
            deny(HTTPS, US_EAST, Reason::RoutingHeaderDenied),
            "denied hop",
        ),
        // An exempt next hop (the policy's exempt list, or link-local) is not an exempt
        // packet: the packet travels on.
        (
            routed_to("fd00:aaaa::1"),
            0x10,
            deny(MARKED, REGION_NONE, Reason::RoutingHeaderDenied),
            "policy-exempt hop",
        ),
        (
            routed_to("fe80::1"),
            0x10,
            deny(MARKED, REGION_NONE, Reason::RoutingHeaderDenied),
            "link-local hop",
        ),
    ];
    for (frame, mark, want, case) in cases {
        check(&run(&mut dp, TC, &frame.bytes, mark), want, case);
    }
    // With no segments left the destination address is final.
    let mut spec = Spec::tcp(SRC6, EU6, 443);
    spec.ipv6_ext = vec![(43, frames::ipv6_routing(0, &[final_hop]))];
    let o = tc(&mut dp, &spec.build());
    assert_outcome(&o, allow(HTTPS, EU_WEST, Reason::RegionAllowed));
}

/// An IPv4 loose (131) or strict (137) source-route option with `pointer` and the
/// addresses still to visit.
fn ipv4_source_route(kind: u8, pointer: u8, addresses: &[&str]) -> Vec<u8> {
    let mut option = vec![kind, (3 + 4 * addresses.len()) as u8, pointer];
    for address in addresses {
        option.extend_from_slice(&address.parse::<std::net::Ipv4Addr>().unwrap().octets());
    }
    option
}

#[test]
fn an_ipv4_source_route_is_judged_like_a_routing_header() {
    let mut dp = setup();
    let routed = |dst: &str, port: u16, options: Vec<u8>| {
        let mut spec = Spec::tcp(SRC4, dst, port);
        spec.ipv4_options = options;
        spec.build()
    };
    let lsrr = || ipv4_source_route(131, 4, &[US4]);
    let cases = [
        // Through an allowed relay to a denied region: delivered, 20 of 20, before.
        (
            routed(EU4, 443, lsrr()),
            0,
            deny(HTTPS, EU_WEST, Reason::RoutingHeaderDenied),
            "loose route, allowed hop",
        ),
        (
            routed(EU4, 443, ipv4_source_route(137, 4, &[US4])),
            0,
            deny(HTTPS, EU_WEST, Reason::RoutingHeaderDenied),
            "strict route, allowed hop",
        ),
        // Padding cannot hide the route.
        (
            routed(EU4, 443, [vec![1, 1, 1], lsrr()].concat()),
            0,
            deny(HTTPS, EU_WEST, Reason::RoutingHeaderDenied),
            "route after NOPs",
        ),
        (
            routed(EU4, 443, [vec![148, 4, 0, 0], lsrr()].concat()),
            0,
            deny(HTTPS, EU_WEST, Reason::RoutingHeaderDenied),
            "route after a router alert",
        ),
        // An exempt first hop is not an exempt packet.
        (
            routed("10.1.2.3", 443, lsrr()),
            0x10,
            deny(MARKED, REGION_NONE, Reason::RoutingHeaderDenied),
            "policy-exempt hop",
        ),
        // A class denied no destination at all may be source-routed anywhere.
        (
            routed(EU4, 9999, lsrr()),
            0,
            allow(OPEN, EU_WEST, Reason::RoutingHeaderAllowed),
            "a class denied nowhere",
        ),
        // The pointer past the last address: the route is done, the destination final.
        (
            routed(EU4, 443, ipv4_source_route(131, 8, &[US4])),
            0,
            allow(HTTPS, EU_WEST, Reason::RegionAllowed),
            "finished route",
        ),
        // Options the kernel refuses: malformed, and user data fails closed.
        (
            routed(EU4, 443, vec![131, 1]),
            0,
            deny(HTTPS, REGION_NONE, Reason::MalformedDenied),
            "option length below 2",
        ),
    ];
    for (frame, mark, want, case) in cases {
        check(&run(&mut dp, TC, &frame.bytes, mark), want, case);
    }
    // The gateway hook walks the options too.
    let o = run(&mut dp, XDP, &routed(EU4, 443, lsrr()).bytes, 0);
    assert_outcome(&o, deny(HTTPS, EU_WEST, Reason::RoutingHeaderDenied));
}

/// A frame from SRC4 to `dst` whose IP payload is a tunnel of `protocol` (4, 41, 47)
/// holding `body`.
fn tunnel(dst: &str, protocol: u8, body: Vec<u8>) -> Vec<u8> {
    let mut spec = Spec::udp(SRC4, dst, 0);
    spec.protocol = protocol;
    spec.payload = body;
    spec.build().bytes
}

/// A UDP frame from SRC4 to `dst:port` whose payload is `body`.
fn udp_tunnel(dst: &str, port: u16, body: Vec<u8>) -> Vec<u8> {
    let mut spec = Spec::udp(SRC4, dst, port);
    spec.payload = body;
    spec.build().bytes
}

/// IP in IPv6 from SRC6 to `dst`, as Linux's ip6tnl and ip6gre send it by default: a
/// destination options header holding the encapsulation limit (4), then padding, first.
fn ip6tnl(dst: &str, body: Vec<u8>) -> Vec<u8> {
    let mut outer = Spec::udp(SRC6, dst, 0);
    outer.protocol = 4;
    outer.payload = body;
    outer.ipv6_ext = vec![(60, vec![4, 1, 4, 1, 1, 0])];
    outer.build().bytes
}

#[test]
fn tunnels_are_classified_by_their_inner_headers_and_judged_by_their_outer_destination() {
    let mut dp = setup();
    // User data (https) inside; no class claims the outer headers alone.
    let inner = || Spec::tcp(SRC4, EU4, 443).build();
    let inner_v6 = || Spec::tcp(SRC6, EU6, 443).build();
    let gre = |flags: u8, protocol: u16, extra: usize, body: Vec<u8>| {
        let mut h = vec![flags, 0];
        h.extend_from_slice(&protocol.to_be_bytes());
        h.extend(std::iter::repeat_n(0u8, extra));
        [h, body].concat()
    };
    let vxlan = |frame: Vec<u8>| [vec![0x08, 0, 0, 0, 0, 0, 42, 0], frame].concat();
    let geneve = |options: u8, protocol: u16, body: Vec<u8>| {
        let mut h = vec![options / 4, 0];
        h.extend_from_slice(&protocol.to_be_bytes());
        h.extend_from_slice(&[0, 0, 42, 0]);
        h.extend(std::iter::repeat_n(0u8, usize::from(options)));
        [h, body].concat()
    };
    let denied = deny(HTTPS, US_EAST, Reason::RegionDenied);
    let cases = [
        (tunnel(US4, 4, inner().ip_packet()), denied, "IP in IP"),
        (
            tunnel(US4, 41, inner_v6().ip_packet()),
            denied,
            "IPv6 in IP",
        ),
        (
            tunnel(US4, 47, gre(0, 0x0800, 0, inner().ip_packet())),
            denied,
            "GRE",
        ),
        (
            // Checksum, key and sequence number present: 12 more bytes of header.
            tunnel(US4, 47, gre(0xb0, 0x86dd, 12, inner_v6().ip_packet())),
            denied,
            "GRE with checksum, key and sequence",
        ),
        (
            tunnel(US4, 47, gre(0x20, 0x6558, 4, inner().bytes)),
            denied,
            "GRE carrying Ethernet",
        ),
        (
            ip6tnl(US6, inner().ip_packet()),
            denied,
            "IP in IPv6 behind the encapsulation limit",
        ),
        // Before, the option made the frame malformed, and so denied whatever it held.
        (
            ip6tnl(US6, Spec::tcp(SRC4, EU4, 80).build().ip_packet()),
            allow(CLASS_NONE, REGION_NONE, Reason::Unclassified),
            "other traffic in IPv6 behind the encapsulation limit",
        ),
        (udp_tunnel(US4, 4789, vxlan(inner().bytes)), denied, "VXLAN"),
        (
            udp_tunnel(US4, 8472, vxlan(inner().bytes)),
            denied,
            "VXLAN on Linux's default port (Flannel, Cilium)",
        ),
        (
            udp_tunnel(US4, 6081, geneve(8, 0x6558, inner().bytes)),
            denied,
            "Geneve with options, carrying Ethernet",
        ),
        (
            udp_tunnel(US4, 6081, geneve(0, 0x0800, inner().ip_packet())),
            denied,
            "Geneve carrying IP",
        ),
        // The outer destination decides: user data tunnelled to an allowed region passes.
        (
            tunnel(EU4, 4, inner().ip_packet()),
            allow(HTTPS, EU_WEST, Reason::RegionAllowed),
            "IP in IP to an allowed region",
        ),
        // What is not user data inside is not user data outside.
        (
            tunnel(US4, 4, Spec::tcp(SRC4, EU4, 80).build().ip_packet()),
            allow(CLASS_NONE, REGION_NONE, Reason::Unclassified),
            "other traffic in IP in IP",
        ),
        // An inner header cut short could be user data: fail closed.
        (
            tunnel(US4, 4, inner().ip_packet()[..10].to_vec()),
            deny(HTTPS, REGION_NONE, Reason::MalformedDenied),
            "IP in IP, inner header cut short",
        ),
    ];
    for (frame, want, case) in cases {
        check(&run(&mut dp, TC, &frame, 0), want, case);
    }
    // The gateway hook reads them too.
    let o = run(
        &mut dp,
        XDP,
        &udp_tunnel(US4, 4789, vxlan(inner().bytes)),
        0,
    );
    assert_outcome(&o, denied);
}

/// An Ethernet frame of `ethertype`, with the test frames' addresses, carrying `body`.
fn link_frame(ethertype: u16, body: Vec<u8>) -> Vec<u8> {
    let mut f = Spec::tcp(SRC4, EU4, 443).build().bytes[..12].to_vec();
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend(body);
    f
}

/// `depth` MPLS label stack entries, the last one marked the bottom of the stack.
fn mpls_labels(depth: usize) -> Vec<u8> {
    (0..depth)
        .flat_map(|i| [0, 0x06, 0x40 | u8::from(i + 1 == depth), 64])
        .collect()
}

/// A PPPoE session frame's body: its header and PPP `protocol`, then `payload`.
fn pppoe(protocol: u16, payload: Vec<u8>) -> Vec<u8> {
    let length = u16::try_from(payload.len() + 2).expect("length");
    let mut p = vec![0x11, 0, 0x12, 0x34];
    p.extend_from_slice(&length.to_be_bytes());
    p.extend_from_slice(&protocol.to_be_bytes());
    [p, payload].concat()
}

/// Linux routes IP into MPLS (`encap mpls`), and a PPPoE client sends it in PPP: both
/// left the host as `not_ip` before, whatever they carried.
#[test]
fn ip_under_mpls_labels_and_in_pppoe_sessions_is_judged_as_ip() {
    const MPLS: u16 = 0x8847;
    const PPPOE: u16 = 0x8864;
    let mut dp = setup();
    let https = |dst: &str| Spec::tcp(if dst.contains(':') { SRC6 } else { SRC4 }, dst, 443);
    let under_labels = |depth: usize, dst: &str| {
        link_frame(
            MPLS,
            [mpls_labels(depth), https(dst).build().ip_packet()].concat(),
        )
    };
    let denied = deny(HTTPS, US_EAST, Reason::RegionDenied);
    let cases = [
        (under_labels(2, US4), denied, "IPv4 under two labels"),
        (under_labels(1, US6), denied, "IPv6 under a label"),
        (
            under_labels(2, EU4),
            allow(HTTPS, EU_WEST, Reason::RegionAllowed),
            "IPv4 under two labels to an allowed region",
        ),
        (
            link_frame(PPPOE, pppoe(0x0021, https(US4).build().ip_packet())),
            denied,
            "IPv4 in a PPPoE session",
        ),
        (
            link_frame(PPPOE, pppoe(0x0057, https(US6).build().ip_packet())),
            denied,
            "IPv6 in a PPPoE session",
        ),
        // What cannot be read could be user data: fail closed.
        (
            under_labels(9, US4),
            deny(HTTPS, REGION_NONE, Reason::MalformedDenied),
            "a label stack deeper than the datapath reads",
        ),
        (
            link_frame(
                PPPOE,
                pppoe(0x002d, https(US4).build().ip_packet()[4..].to_vec()),
            ),
            deny(HTTPS, REGION_NONE, Reason::MalformedDenied),
            "header-compressed TCP/IP in PPP",
        ),
        // PPP's own link control carries no user data.
        (
            link_frame(PPPOE, pppoe(0xc021, vec![1, 1, 0, 4])),
            allow(CLASS_NONE, REGION_NONE, Reason::NotIp),
            "LCP",
        ),
    ];
    for (frame, want, case) in cases {
        check(&run(&mut dp, TC, &frame, 0), want, case);
        check(&run(&mut dp, XDP, &frame, 0), want, case);
    }
}

/// IPsec's AH in transport mode leaves the transport header in clear behind it. IPv4 AH
/// was protocol 51 without ports before, which a class of the HTTPS port never claimed.
#[test]
fn the_transport_behind_an_ipv4_ah_header_is_classified() {
    let mut dp = setup();
    // Next header, length (4-byte words less two), reserved, SPI, sequence, 12-byte ICV.
    let ah = |next: u8| {
        let mut h = vec![next, 4, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 1];
        h.extend_from_slice(&[0xa5; 12]);
        h
    };
    // The AH header goes between the IPv4 header (no options) and the TCP header.
    let https = Spec::tcp(SRC4, US4, 443).build().bytes;
    let (l3, l4) = (14, 14 + 20);
    let mut frame = [&https[..l4], &ah(6), &https[l4..]].concat();
    frame[l3 + 9] = 51;
    let total = u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) + 24;
    frame[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
    for hook in [TC, XDP] {
        let want = deny(HTTPS, US_EAST, Reason::RegionDenied);
        check(&run(&mut dp, hook, &frame, 0), want, "HTTPS behind AH");
    }
}

/// A gateway interface's XDP hook lets packets to the host's own addresses through: the
/// host takes them in. Judged by the host's address, usually in no region, they were
/// dropped whenever a class could claim them. TC egress judges them as before, and XDP
/// judges every other address, and an address once the host no longer has it.
#[test]
fn packets_to_the_hosts_own_addresses_pass_at_xdp_and_only_there() {
    let mut dp = setup();
    let https = |dst: &str| {
        let src = if dst.contains(':') { SRC6 } else { SRC4 };
        Spec::tcp(src, dst, 443).build().bytes
    };
    let ours: std::collections::BTreeSet<IpAddr> = [US4, US6]
        .iter()
        .map(|a| a.parse().expect("address"))
        .collect();
    let changes = dp.set_host_addresses(&ours).expect("host addresses");
    assert_eq!((changes.added, changes.removed), (2, 0));
    let local = allow(CLASS_NONE, REGION_NONE, Reason::LocalDestination);
    let denied = deny(HTTPS, US_EAST, Reason::RegionDenied);
    for dst in [US4, US6] {
        check(&run(&mut dp, XDP, &https(dst), 0), local, dst);
        check(&run(&mut dp, TC, &https(dst), 0), denied, dst);
    }
    // Another address in the same region is forwarded traffic.
    check(
        &run(&mut dp, XDP, &https("203.0.113.11"), 0),
        denied,
        "203.0.113.11",
    );
    // What a host that ends it sends on is judged as before: a tunnel, ESP, MPLS, and a
    // frame that cannot be read.
    let inner = Spec::tcp(SRC4, EU4, 443).build().ip_packet();
    check(
        &run(&mut dp, XDP, &tunnel(US4, 4, inner), 0),
        denied,
        "IP in IP to us",
    );
    let mut esp = Spec::udp(SRC4, US4, 0);
    esp.protocol = 50;
    let o = run(&mut dp, XDP, &esp.build().bytes, 0);
    assert_eq!(o.reason, Reason::Unclassified, "ESP to us");
    let mpls = link_frame(
        0x8847,
        [
            mpls_labels(1),
            Spec::tcp(SRC4, US4, 443).build().ip_packet(),
        ]
        .concat(),
    );
    check(&run(&mut dp, XDP, &mpls, 0), denied, "MPLS to us");
    let cut = &https(US4)[..14 + 20 + 10];
    let o = run(&mut dp, XDP, cut, 0);
    assert_eq!(o.reason, Reason::MalformedDenied, "cut short, to us");
    // A routing header with segments left sends the packet on: judged by its next hop.
    let mut routed = Spec::tcp(SRC6, US6, 443);
    let hop: Ipv6Addr = EU6.parse().expect("address");
    routed.ipv6_ext = vec![(43, frames::ipv6_routing(1, &[hop]))];
    let o = run(&mut dp, XDP, &routed.build().bytes, 0);
    assert_ne!(o.reason, Reason::LocalDestination);
    // An address the host no longer has is judged again.
    let changes = dp
        .set_host_addresses(&std::iter::once(US4.parse().expect("address")).collect())
        .expect("host addresses");
    assert_eq!((changes.added, changes.removed), (0, 1));
    check(
        &run(&mut dp, XDP, &https(US6), 0),
        denied,
        "a removed address",
    );
    check(&run(&mut dp, XDP, &https(US4), 0), local, "a kept address");
}

#[test]
fn truncated_frames_fail_closed_at_every_header_boundary() {
    let mut dp = setup();
    let mut v6 = Spec::tcp(SRC6, EU6, 443);
    v6.ipv6_ext = vec![
        (0, frames::ipv6_options_body()),
        (44, frames::ipv6_fragment(0)),
    ];
    let mut v4 = Spec::tcp(SRC4, EU4, 443);
    v4.vlans = vec![7, 8];
    v4.ipv4_options = vec![1; 8];
    for spec in [v4, v6, Spec::tcp(SRC4, EU4, 443)] {
        let frame = spec.build();
        let transport = *frame.boundaries.last().unwrap();
        let ip_header = if spec.dst.is_ipv4() { 20 } else { 40 };
        // Neither hook is ever given less than an Ethernet header.
        let mut cuts: Vec<usize> = vec![14];
        for b in &frame.boundaries {
            cuts.extend([*b, b + 1, b + 3]);
        }
        // Inside the TCP header: ports present but the fixed header incomplete.
        cuts.extend([transport + 4, transport + 19]);
        cuts.retain(|c| (14..transport + 20).contains(c));
        cuts.sort_unstable();
        cuts.dedup();
        for cut in cuts {
            let bytes = &frame.bytes[..cut];
            for hook in [Hook::Xdp, Hook::TcEgress] {
                // BPF_PROG_TEST_RUN refuses an skb whose ethertype says IP but whose IP
                // header is incomplete (EINVAL); the stack never hands TC such a frame.
                if hook == Hook::TcEgress
                    && spec.vlans.is_empty()
                    && cut < frame.ip_start + ip_header
                {
                    continue;
                }
                let o = run(&mut dp, hook, bytes, 0);
                assert!(
                    !o.passed,
                    "{hook:?}: frame cut at {cut} of {:?} passed",
                    frame.boundaries
                );
                assert_eq!(o.reason, Reason::MalformedDenied, "{hook:?}: cut at {cut}");
                assert_eq!(o.class, HTTPS);
            }
        }
        // The whole TCP header and nothing more is complete, not truncated.
        let o = tc(
            &mut dp,
            &frame.bytes[..transport + 20].to_vec().into_frame(),
        );
        assert_eq!(o.reason, Reason::RegionAllowed);
    }
}

#[test]
fn truncated_frames_that_no_class_could_claim_pass() {
    let policy = r"
version: 1
regions:
  eu-west:
    cidrs: [198.51.100.0/24]
data_classes:
  marked:
    match:
      marks: [{value: 0x10}]
    allow: [eu-west]
";
    let (mut dp, _) = datapath_with(policy, EventLimits::default());
    let frame = Spec::tcp(SRC4, US4, 443).build();
    // IP header complete, TCP header cut after the ports.
    let cut = frame.bytes[..frame.ip_start + 20 + 6].to_vec();
    assert_cases(
        &mut dp,
        &[
            (
                TC,
                cut.clone(),
                0,
                allow(CLASS_NONE, REGION_NONE, Reason::MalformedAllowed),
            ),
            (
                TC,
                cut,
                0x10,
                deny(MARKED, REGION_NONE, Reason::MalformedDenied),
            ),
        ],
    );
}

trait IntoFrame {
    fn into_frame(self) -> Frame;
}

impl IntoFrame for Vec<u8> {
    fn into_frame(self) -> Frame {
        Frame {
            bytes: self,
            boundaries: Vec::new(),
            ip_start: 0,
        }
    }
}

#[test]
fn non_ip_frames_pass() {
    let mut dp = setup();
    let o = run(&mut dp, Hook::TcEgress, &frames::arp(), 0x10);
    assert_outcome(&o, allow(CLASS_NONE, REGION_NONE, Reason::NotIp));
}

#[test]
fn exemptions_come_before_classification() {
    let mut dp = setup();
    let exempt = |dst: &str, reason| {
        let src = if dst.contains(':') { SRC6 } else { SRC4 };
        let frame = Spec::udp(src, dst, 53).build().bytes;
        (TC, frame, 0x10, allow(CLASS_NONE, REGION_NONE, reason))
    };
    assert_cases(
        &mut dp,
        &[
            exempt("10.1.2.3", Reason::ExemptPolicy),
            exempt("fd00:aaaa::5", Reason::ExemptPolicy),
            exempt("127.0.0.1", Reason::ExemptBuiltin),
            exempt("169.254.1.1", Reason::ExemptBuiltin),
            exempt("::1", Reason::ExemptBuiltin),
            exempt("fe80::1", Reason::ExemptBuiltin),
        ],
    );
}

/// The host's own link traffic (DHCP, neighbour discovery, link-scope multicast and
/// broadcast) passes before a class that claims everything (the mark) and denies
/// destinations in no region could deny it; traffic to wider multicast scopes, which
/// routers forward, is judged. Each switch turned off hands its traffic back to the class.
#[test]
fn the_hosts_own_link_traffic_passes_unless_the_policy_switches_it_off() {
    const ICMPV6: u8 = 58;
    let udp = |dst: &str, port| {
        let src = if dst.contains(':') { SRC6 } else { SRC4 };
        Spec::udp(src, dst, port).build().bytes
    };
    let neighbor_solicitation = {
        let mut spec = Spec::udp(SRC6, "ff02::1:ff00:3", 0);
        spec.protocol = ICMPV6;
        spec.payload = vec![135, 0, 0, 0, 0, 0, 0, 0];
        spec.build().bytes
    };
    let dhcp = [udp("255.255.255.255", 67), udp("ff02::1:2", 547)];
    let link = [udp("224.0.0.251", 5353), udp("ff02::fb", 5353)];
    // Routed on by routers, or by a relay on the link (a DHCP relay, an
    // `ip helper-address` forwarding broadcasts to DNS or TFTP); and tunnels to the link,
    // which an endpoint there sends on.
    let vxlan_to_the_link = {
        let inner = Spec::udp(SRC4, US4, 67).build().bytes;
        let mut spec = Spec::udp(SRC4, "224.0.0.251", 4789);
        spec.payload = [vec![0x08, 0, 0, 0, 0, 0, 42, 0], inner].concat();
        spec.build().bytes
    };
    let routed_on = [
        udp("239.1.2.3", 5353),
        udp("224.0.1.1", 123),
        udp("ff05::1:3", 547),
        udp("255.255.255.255", 53),
        udp("255.255.255.255", 69),
        udp("ff02::1:2", 9),
    ];
    let exempt = |frame: &Vec<u8>| {
        (
            TC,
            frame.clone(),
            0x10,
            allow(CLASS_NONE, REGION_NONE, Reason::ExemptHostEssential),
        )
    };
    let denied = |frame: &Vec<u8>| {
        (
            TC,
            frame.clone(),
            0x10,
            deny(MARKED, REGION_NONE, Reason::UnknownDenied),
        )
    };

    let mut dp = setup();
    let mut cases: Vec<_> = dhcp.iter().chain(&link).map(exempt).collect();
    cases.push(exempt(&neighbor_solicitation));
    cases.extend(routed_on.iter().map(denied));
    assert_cases(&mut dp, &cases);
    // The tunnel is judged by its inner packet (UDP to port 67 in us-east), not exempt.
    let o = run(&mut dp, TC, &vxlan_to_the_link, 0x10);
    assert!(
        !o.passed,
        "a VXLAN packet to a link-scope group passed: {:?}",
        o.reason
    );
    assert_ne!(o.reason, Reason::ExemptHostEssential);

    let switched = |switches: &str| {
        let yaml = POLICY.replace(
            "mode: enforce\n",
            &format!("mode: enforce\nhost_essentials: {switches}\n"),
        );
        datapath_with(&yaml, EventLimits::default()).0
    };
    let mut dp = switched("{dhcp: false, neighbor_discovery: false, link_multicast: false}");
    let mut cases: Vec<_> = dhcp.iter().chain(&link).map(denied).collect();
    cases.push(denied(&neighbor_solicitation));
    assert_cases(&mut dp, &cases);

    // Each switch alone: DHCP, but no other multicast; neighbour discovery, but not UDP.
    let mut dp = switched("{neighbor_discovery: false, link_multicast: false}");
    let mut cases: Vec<_> = dhcp.iter().map(exempt).collect();
    cases.extend(link.iter().map(denied));
    cases.push(denied(&neighbor_solicitation));
    assert_cases(&mut dp, &cases);
    let mut dp = switched("{dhcp: false, link_multicast: false}");
    let mut cases: Vec<_> = dhcp.iter().chain(&link).map(denied).collect();
    cases.push(exempt(&neighbor_solicitation));
    assert_cases(&mut dp, &cases);
}

#[test]
fn each_selector_kind_classifies() {
    let mut dp = setup();
    // Mark, with its mask: 0x1310 & 0xff == 0x10.
    let frame = Spec::udp(SRC4, US4, 9).build();
    assert_cases(
        &mut dp,
        &[
            (
                TC,
                frame.bytes.clone(),
                0x1310,
                deny(MARKED, US_EAST, Reason::RegionDenied),
            ),
            (
                TC,
                frame.bytes,
                0x11,
                allow(CLASS_NONE, REGION_NONE, Reason::Unclassified),
            ),
        ],
    );
    // Protocol and port range: tcp/8050 is https, udp/8050 is not.
    let o = tc(&mut dp, &Spec::tcp(SRC4, US4, 8050).build());
    assert_eq!((o.class, o.passed), (HTTPS, false));
    let o = tc(&mut dp, &Spec::udp(SRC4, US4, 8050).build());
    assert_eq!((o.class, o.passed), (CLASS_NONE, true));
    let o = tc(&mut dp, &Spec::tcp(SRC4, US4, 8101).build());
    assert_eq!((o.class, o.passed), (CLASS_NONE, true));
    // DSCP.
    let mut spec = Spec::udp(SRC4, US4, 9);
    spec.dscp = 10;
    assert_eq!(tc(&mut dp, &spec.build()).class, DSCP_AUDIT);
    spec.dscp = 11;
    assert_eq!(tc(&mut dp, &spec.build()).class, CLASS_NONE);
    // Source CIDR: 192.0.2.1 is in 192.0.2.0/25, 192.0.2.200 is not.
    let o = tc(&mut dp, &Spec::udp(SRC4, US4, 53).build());
    assert_outcome(&o, deny(DNS, US_EAST, Reason::RegionDenied));
    let o = tc(&mut dp, &Spec::udp("192.0.2.200", US4, 53).build());
    assert_eq!((o.class, o.passed), (CLASS_NONE, true));
    let o = tc(&mut dp, &Spec::udp(SRC6, US6, 53).build());
    assert_eq!((o.class, o.passed), (DNS, false));
    // ICMP has no ports, so a port selector cannot match it.
    let mut spec = Spec::udp(SRC4, US4, 53);
    spec.protocol = frames::ICMP;
    assert_eq!(tc(&mut dp, &spec.build()).class, CLASS_NONE);
}

#[test]
fn unknown_destinations_follow_the_class_rule() {
    let mut dp = setup();
    assert_cases(
        &mut dp,
        &[
            (
                TC,
                Spec::udp(SRC4, NOWHERE4, 9).build().bytes,
                0x10,
                deny(MARKED, REGION_NONE, Reason::UnknownDenied),
            ),
            (
                TC,
                Spec::tcp(SRC4, NOWHERE4, 443).build().bytes,
                0,
                allow(HTTPS, REGION_NONE, Reason::UnknownAllowed),
            ),
        ],
    );
}

#[test]
fn audit_passes_and_reports_where_enforce_drops() {
    let mut dp = setup();
    let mut spec = Spec::udp(SRC4, US4, 9);
    spec.dscp = 10;
    let o = tc(&mut dp, &spec.build());
    assert_outcome(&o, audit(DSCP_AUDIT, US_EAST));
    assert_eq!(o.events[0].verdict, Verdict::Audit as u8);

    // Policy-wide audit turns every denial into an audit hit.
    let audit_all = POLICY.replace("mode: enforce", "mode: audit");
    let (mut dp, _) = datapath_with(&audit_all, EventLimits::default());
    let o = tc(&mut dp, &Spec::tcp(SRC4, US4, 443).build());
    assert_outcome(&o, audit(HTTPS, US_EAST));
}

#[test]
fn xdp_judges_forwarded_frames_with_the_same_logic() {
    let mut dp = setup();
    let o = assert_cases(
        &mut dp,
        &[
            (
                XDP,
                Spec::tcp(SRC4, US4, 443).build().bytes,
                0,
                deny(HTTPS, US_EAST, Reason::RegionDenied),
            ),
            (
                XDP,
                Spec::tcp(SRC6, EU6, 443).build().bytes,
                0,
                allow(HTTPS, EU_WEST, Reason::RegionAllowed),
            ),
            (
                XDP,
                frames::arp(),
                0,
                allow(CLASS_NONE, REGION_NONE, Reason::NotIp),
            ),
        ],
    );
    assert_eq!(o[0].events[0].hook, Hook::Xdp as u8);
    // XDP runs before an skb exists, so there is no mark to match: the marked class
    // cannot claim the packet there.
    let o = run(
        &mut dp,
        Hook::Xdp,
        &Spec::udp(SRC4, US4, 9).build().bytes,
        0x10,
    );
    assert_eq!(o.class, CLASS_NONE);
}

#[test]
fn nothing_is_dropped_before_a_policy_is_loaded() {
    integration_tests::require_root();
    let mut dp = Datapath::load(&datafence::datapath::LoadOptions::default()).expect("load");
    let o = tc(&mut dp, &Spec::tcp(SRC4, US4, 443).build());
    assert_outcome(&o, allow(CLASS_NONE, REGION_NONE, Reason::NoPolicy));
}

#[test]
fn events_are_rate_limited_and_the_rest_counted() {
    let limits = EventLimits {
        per_second: 1,
        burst: 5,
    };
    let (mut dp, _) = datapath_with(POLICY, limits);
    let frame = Spec::tcp(SRC4, US4, 443).build();
    let (passed, _) = dp
        .test_run_repeat(Hook::TcEgress, &frame.bytes, 0, 100)
        .expect("run");
    assert!(!passed);
    let events = dp.drain_events().expect("events");
    let stats = dp.stats().expect("stats");
    // One refill token may land during the run at 1/s; the burst bounds the rest.
    assert!(
        (5..=6).contains(&events.len()),
        "{} events for 100 denials",
        events.len()
    );
    assert_eq!(
        events.len() as u64 + stats.get(stat::EVENTS_SUPPRESSED),
        100
    );
    assert_eq!(stats.get(stat::EVENTS_LOST), 0);
    let counted: u64 = dp
        .counters()
        .expect("counters")
        .iter()
        .filter(|(k, _)| k.reason == Reason::RegionDenied as u8)
        .map(|(_, v)| v.packets)
        .sum();
    assert_eq!(counted, 100, "every packet is counted, reported or not");
}

/// `POLICY` with us-east among the regions its class may reach: a reload between the two
/// flips whether user data to us-east passes.
fn policy_opened_to_us_east() -> datafence::policy::LoadedPolicy {
    integration_tests::policy_from_yaml(&POLICY.replace(
        "allow: [eu-west, eu-north]",
        "allow: [eu-west, eu-north, us-east]",
    ))
}

#[test]
fn reload_switches_whole_policies_and_a_failed_one_changes_nothing() {
    let (mut dp, _) = datapath_with(POLICY, EventLimits::default());
    let to_us = Spec::tcp(SRC4, US4, 443).build();
    assert!(!tc(&mut dp, &to_us).passed);
    let opened = policy_opened_to_us_east();
    for round in 0..3 {
        let report = dp
            .apply(&opened.compile(), EventLimits::default())
            .expect("apply");
        assert_eq!(report.generation, 2 + 2 * round);
        assert!(tc(&mut dp, &to_us).passed);
        let strict = integration_tests::policy_from_yaml(POLICY);
        dp.apply(&strict.compile(), EventLimits::default())
            .expect("apply");
        assert!(!tc(&mut dp, &to_us).passed);
    }
    // A policy larger than the tables is refused whole; the strict policy stays. 70,000
    // separate host routes draw 140,000 range boundaries, past the 65,536 entries a
    // datapath loaded with the default sizes has per slot.
    let mut huge = opened.compile();
    huge.regions_v4 = (0..70_000u32)
        .map(|i| {
            let addr = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 4));
            (ipnetwork::Ipv4Network::new(addr, 32).unwrap(), 3)
        })
        .collect();
    let needed = datafence::v4table::Boundaries::of(&huge.regions_v4)
        .entries(datafence_common::v4::V4_MIN_INDEX_BITS);
    assert!(needed > 140_000, "{needed}");
    let err = dp
        .apply(&huge, EventLimits::default())
        .expect_err("too large");
    let expected = format!(
        "the IPv4 table needs {needed} range entries; the loaded datapath has room for 65536"
    );
    assert!(err.to_string().contains(&expected), "{err}");
    assert!(!tc(&mut dp, &to_us).passed);
    assert!(tc(&mut dp, &Spec::tcp(SRC4, EU4, 443).build()).passed);
    assert_eq!(dp.region_of(IpAddr::V4(US4.parse().unwrap())).unwrap(), 3);
}

/// A reload returns once its policy is in force; the one after it waits until the slot
/// it rewrites has been out of force for the grace, however soon it comes.
#[test]
fn the_slot_a_reload_switched_from_is_not_rewritten_within_the_grace() {
    let (mut dp, _) = datapath_with(POLICY, EventLimits::default());
    let to_us = Spec::tcp(SRC4, US4, 443).build();
    let opened = policy_opened_to_us_east().compile();
    let strict = integration_tests::policy_from_yaml(POLICY).compile();
    for _ in 0..3 {
        let before_switch = std::time::Instant::now();
        dp.apply(&opened, EventLimits::default()).expect("apply");
        assert!(tc(&mut dp, &to_us).passed);
        // Rewrites the slot the first apply switched away from.
        dp.apply(&strict, EventLimits::default()).expect("apply");
        let elapsed = before_switch.elapsed();
        assert!(
            elapsed >= datafence::datapath::SLOT_GRACE,
            "the old slot was rewritten {elapsed:?} after it left force"
        );
        assert!(!tc(&mut dp, &to_us).passed);
    }
}

/// Between reloads the kernel holds one policy's region tables. A reload makes the arrays
/// of the slot it writes; once the grace is over, the agent frees the slot it left, and
/// the kernel frees that slot's arrays. The policy in force judges throughout.
#[test]
fn between_reloads_the_kernel_holds_one_policys_region_tables() {
    let (mut dp, _) = datapath_with(POLICY, EventLimits::default());
    let tables = |dp: &Datapath| -> u64 {
        use datafence_common::map_names::{V4_INDEX, V4_RANGES, V6_INDEX, V6_RANGES};
        let names = [V4_INDEX, V4_RANGES, V6_INDEX, V6_RANGES];
        dp.map_memory()
            .iter()
            .filter(|(name, _)| names.contains(&name.as_str()))
            .map(|(_, bytes)| bytes)
            .sum()
    };
    let one = tables(&dp);
    assert_eq!(
        dp.region_table_array_ids().len(),
        4,
        "one slot's four arrays"
    );
    let to_us = Spec::tcp(SRC4, US4, 443).build();
    let opened = policy_opened_to_us_east().compile();
    let strict = integration_tests::policy_from_yaml(POLICY).compile();
    for (round, (policy, passes)) in [(&opened, true), (&strict, false)]
        .into_iter()
        .cycle()
        .take(4)
        .enumerate()
    {
        dp.apply(policy, EventLimits::default()).expect("apply");
        let both = tables(&dp);
        assert!(
            both > one + one / 2,
            "round {round}: until the old slot is freed both are held: {both} B, one {one} B"
        );
        let held = dp.region_table_array_ids();
        assert_eq!(held.len(), 8, "round {round}");
        // The kernel's own lookup, not the agent's view of its tables: `unknown: allow`
        // would let the packet pass with no table at all.
        let o = tc(&mut dp, &to_us);
        assert_eq!((o.passed, o.region), (passes, US_EAST), "round {round}");
        std::thread::sleep(datafence::datapath::SLOT_GRACE);
        assert!(dp.release_retired_slot().expect("release"), "round {round}");
        assert!(
            !dp.release_retired_slot().expect("release"),
            "round {round}: once"
        );
        assert_eq!(tables(&dp), one, "round {round}: one policy's tables");
        let kept = dp.region_table_array_ids();
        assert_eq!(kept.len(), 4, "round {round}");
        // The kernel frees an array once no program can be reading it (after an RCU
        // grace period), shortly after its slot lets go of it.
        let freed: Vec<u32> = held.into_iter().filter(|id| !kept.contains(id)).collect();
        assert_eq!(freed.len(), 4, "round {round}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while freed
            .iter()
            .any(|id| aya::maps::MapInfo::from_id(*id).is_ok())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the kernel still holds the freed slot's arrays"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let o = tc(&mut dp, &to_us);
        assert_eq!(
            (o.passed, o.region),
            (passes, US_EAST),
            "round {round}, after"
        );
        assert_eq!(
            dp.region_of(IpAddr::V4(US4.parse().unwrap())).unwrap(),
            u32::from(US_EAST),
            "round {round}"
        );
    }
}

/// The IPv6 table across every prefix length: nested prefixes resolve to the longest, in
/// the kernel's own range table, through reloads that clear the old slot, and a table that would
/// overflow is refused whole.
#[test]
fn ipv6_ranges_hold_through_reloads_and_refuse_overflow() {
    use datafence::datapath::LoadOptions;
    use ipnetwork::Ipv6Network;
    integration_tests::require_root();
    let base = u128::from("2001:db8::".parse::<Ipv6Addr>().unwrap());
    // /32, /33, ... /128 nested in each other, region cycling 1..=3: each address below
    // must resolve to the prefix one bit longer than the one enclosing it.
    let nested: Vec<(Ipv6Network, u32)> = (32..=128u8)
        .map(|len| {
            (
                Ipv6Network::new(Ipv6Addr::from(base), len).unwrap(),
                u32::from(len % 3) + 1,
            )
        })
        .collect();
    let mut policy = integration_tests::policy_from_yaml(POLICY).compile();
    policy.regions_v6 = nested.clone();
    let opts = LoadOptions::default();
    let mut dp = Datapath::load(&opts).expect("load");
    let entries = datafence::v6table::Boundaries::of(&nested).entries(opts.v6_index_bits) as u64;
    let capacity = 2 * u64::from(opts.v6_slot_ranges);
    let v6_usage = |dp: &Datapath| {
        dp.map_usage()
            .into_iter()
            .find(|(m, _, _)| m == datafence_common::map_names::V6_RANGES)
            .map(|(_, used, cap)| (used, cap))
            .unwrap()
    };
    for round in 0..3 {
        dp.apply(&policy, EventLimits::default()).expect("apply");
        // Both slots hold the same table after the second apply, never more.
        let expected = entries * if round == 0 { 1 } else { 2 };
        assert_eq!(v6_usage(&dp), (expected, capacity), "round {round}");
        for len in 32..=127u32 {
            // The address whose bit `len` (counting from 0) is set leaves every prefix
            // longer than `len` bits: its longest match is the /len.
            let addr = Ipv6Addr::from(base | (1u128 << (127 - len)));
            let want = len % 3 + 1;
            assert_eq!(dp.region_of(IpAddr::V6(addr)).unwrap(), want, "/{len}");
            let frame = Spec::tcp(SRC6, &addr.to_string(), 443).build();
            let o = tc(&mut dp, &frame);
            // The https class allows eu-west (1) and eu-north (2) only.
            assert_eq!(o.passed, want != 3, "/{len}");
        }
        assert_eq!(
            dp.region_of(IpAddr::V6(Ipv6Addr::from(base))).unwrap(),
            128 % 3 + 1
        );
        assert_eq!(
            dp.region_of(IpAddr::V6("2001:db9::".parse().unwrap()))
                .unwrap(),
            0
        );
    }
    // 5,000 /64s with gaps between them draw 10,000 boundaries in one chunk, past the
    // default room: refused whole, the nested table stays.
    let mut huge = policy.clone();
    huge.regions_v6 = (0..5_000u128)
        .map(|i| {
            (
                Ipv6Network::new(Ipv6Addr::from(base | (i << 65)), 64).unwrap(),
                1,
            )
        })
        .collect();
    let err = dp
        .apply(&huge, EventLimits::default())
        .expect_err("too large");
    assert!(
        err.to_string().contains("IPv6 table needs")
            && err.to_string().contains("Restart the agent"),
        "{err}"
    );
    assert_eq!(v6_usage(&dp).0, entries * 2);
    let addr = Ipv6Addr::from(base | (1u128 << 60));
    assert_eq!(dp.region_of(IpAddr::V6(addr)).unwrap(), 67 % 3 + 1);
}

/// A key whose place in the per-CPU counter cache is taken is counted in the hash, and
/// the agent adds both up: the totals stay exact whichever path counted.
#[test]
fn counters_stay_exact_when_the_cache_is_full() {
    use aya::maps::{MapData, PerCpuArray, PerCpuValues};
    use datafence::datapath::LoadOptions;
    use datafence_common::{
        COUNTER_CACHE_SLOTS, CachedCounter, CounterKey, CounterValue, map_names,
    };
    integration_tests::require_root();
    let pins = integration_tests::agent::test_pin_dir("counter-cache");
    let mut dp = Datapath::load(&LoadOptions {
        pin_dir: Some(pins.clone()),
        ..Default::default()
    })
    .expect("load");
    dp.apply(
        &integration_tests::policy_from_yaml(POLICY).compile(),
        EventLimits::default(),
    )
    .expect("apply");
    // Every place, on every CPU, belongs to a key no packet has: packets go to the hash.
    let path = datafence::datapath::PinLayout::new(&pins).map(map_names::COUNTER_CACHE);
    let data = MapData::from_pin(&path).expect("open pinned cache");
    let mut cache: PerCpuArray<MapData, CachedCounter> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).expect("cache");
    let cpus = aya::util::nr_cpus().expect("cpus");
    let mut fill = |place: CachedCounter| {
        for slot in 0..COUNTER_CACHE_SLOTS {
            let values = PerCpuValues::try_from(vec![place; cpus]).expect("values");
            cache.set(slot, values, 0).expect("write the cache");
        }
    };
    fill(CachedCounter {
        claimed: 1,
        key: CounterKey {
            ifindex: 999_999,
            ..CounterKey::default()
        },
        value: CounterValue::default(),
    });
    let frame = Spec::tcp(SRC4, EU4, 443).build();
    let total = |dp: &Datapath| {
        let counters = dp.counters().expect("counters");
        let real: Vec<_> = counters
            .iter()
            .filter(|(k, _)| k.ifindex != 999_999)
            .collect();
        assert_eq!(real.len(), 1, "one key: {real:?}");
        (real[0].1.packets, real[0].1.bytes)
    };
    let len = frame.bytes.len() as u64;
    for round in 1..=3u64 {
        assert_eq!(tc(&mut dp, &frame).packets, 1);
        assert_eq!(total(&dp), (round, round * len), "counted in the hash");
    }
    // Free places again: the key claims one, and its total is the hash's plus the cache's.
    fill(CachedCounter::default());
    for round in 4..=5u64 {
        assert_eq!(tc(&mut dp, &frame).packets, 1);
        assert_eq!(total(&dp), (round, round * len), "cache and hash add up");
    }
    drop(dp);
    let _ = datafence::datapath::PinLayout::new(&pins).remove_all();
}

/// The entry program's one exit outside `finish`: with its judge stage gone from the
/// pinned array (only someone with CAP_BPF can do that), a packet passes unjudged, and
/// the `stage_missing` statistic counts it so that the agent can say so.
#[test]
fn a_missing_judge_stage_passes_and_is_counted() {
    integration_tests::require_root();
    let pins = integration_tests::agent::test_pin_dir("stage-missing");
    let mut dp = Datapath::load(&datafence::datapath::LoadOptions {
        pin_dir: Some(pins.clone()),
        ..Default::default()
    })
    .expect("load datapath");
    let policy = integration_tests::policy_from_yaml(POLICY);
    dp.apply(&policy.compile(), EventLimits::default())
        .expect("apply policy");
    let denied = Spec::tcp(SRC4, US4, 443).build();
    assert!(
        !dp.test_run(Hook::TcEgress, &denied.bytes, 0).expect("run"),
        "judged: dropped"
    );
    assert_eq!(dp.stats().expect("stats").get(stat::STAGE_MISSING), 0);

    let layout = datafence::datapath::PinLayout::new(&pins);
    let array = layout
        .stages_dir(datafence::datapath::object_digest())
        .join("TC_STAGES");
    let deleted = std::process::Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(&array)
        .args(["key", "0", "0", "0", "0"])
        .status()
        .expect("bpftool");
    assert!(deleted.success(), "bpftool map delete");
    assert!(
        dp.test_run(Hook::TcEgress, &denied.bytes, 0).expect("run"),
        "unjudged: passes"
    );
    assert_eq!(dp.stats().expect("stats").get(stat::STAGE_MISSING), 1);
    layout.remove_all().expect("unpin");
}

/// A prefix list of either family: (network bits as a u128, prefix length, region).
type Prefixes = Vec<(u128, u8, u32)>;

/// The cloud catalogue in `policies/regions/cloud`, one region per file, each family
/// apart: the real prefix-length mix, nested and adjacent prefixes included.
fn cloud_catalogue() -> (Prefixes, Prefixes) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/regions/cloud");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    for (i, file) in files.iter().enumerate() {
        let text = std::fs::read_to_string(file).unwrap();
        for (_, _, entry) in datafence::policy::region_file_entries(&text) {
            let Ok(c) = datafence_common::cidr::parse(entry) else {
                continue;
            };
            let width = datafence_common::cidr::width(c.addr);
            let bits = datafence_common::cidr::Cidr {
                addr: c.network(),
                ..c
            }
            .bits();
            // A prefix in two files keeps the first, as the policy compiler refuses it.
            if seen.insert((width, bits, c.len)) {
                let out = if width == 32 { &mut v4 } else { &mut v6 };
                out.push((bits, c.len, i as u32 + 1));
            }
        }
    }
    (v4, v6)
}

/// The longest-prefix match by trying every length, longest first.
struct NaiveLpm {
    width: u8,
    by_len: std::collections::HashMap<(u8, u128), u32>,
}

impl NaiveLpm {
    fn new(width: u8, prefixes: &Prefixes) -> Self {
        let by_len = prefixes
            .iter()
            .map(|&(bits, len, region)| ((len, bits & Self::mask(width, len)), region))
            .collect();
        Self { width, by_len }
    }

    fn mask(width: u8, len: u8) -> u128 {
        let all = if width == 32 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        match len {
            0 => 0,
            l if l >= width => all,
            l => all & !(all >> l),
        }
    }

    fn region(&self, addr: u128) -> u32 {
        (0..=self.width)
            .rev()
            .find_map(|len| {
                self.by_len
                    .get(&(len, addr & Self::mask(self.width, len)))
                    .copied()
            })
            .unwrap_or(0)
    }
}

/// Every prefix's first and last address and the ones either side, where a range table's
/// boundaries would go wrong.
fn edge_probes(width: u8, prefixes: &Prefixes) -> Vec<u128> {
    let top = if width == 32 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    let mut out = vec![0, top];
    for &(bits, len, _) in prefixes {
        let last = bits | (top & !NaiveLpm::mask(width, len));
        out.extend([
            bits.wrapping_sub(1) & top,
            bits,
            last,
            last.wrapping_add(1) & top,
        ]);
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn to_ip(width: u8, bits: u128) -> IpAddr {
    if width == 32 {
        IpAddr::V4(std::net::Ipv4Addr::from(bits as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

/// The region tables hold what a naive longest-prefix match says, for every edge of
/// every prefix, on the cloud catalogue's real mix, on dense host routes and on nested
/// prefixes of every length: read back from the kernel's own arrays for all of them, and
/// judged by the program in the kernel for a sample.
#[test]
fn kernel_region_tables_agree_with_a_naive_longest_prefix_match() {
    use datafence::datapath::LoadOptions;
    integration_tests::require_root();
    let (cloud4, cloud6) = cloud_catalogue();
    assert!(
        cloud4.len() > 10_000 && cloud6.len() > 10_000,
        "{} {}",
        cloud4.len(),
        cloud6.len()
    );
    let dense4: Prefixes = (0..70_000u128)
        .map(|i| (0x0b00_0000 + i, 32, 1 + (i % 3) as u32))
        .collect();
    let base6 = u128::from("2a0f:1000::".parse::<Ipv6Addr>().unwrap());
    let dense6: Prefixes = (0..70_000u128)
        .map(|i| (base6 + i, 128, 1 + (i % 3) as u32))
        .collect();
    let nested = |width: u8, addr: u128| -> Prefixes {
        (0..=width)
            .map(|len| {
                (
                    addr & NaiveLpm::mask(width, len),
                    len,
                    1 + u32::from(len) % 3,
                )
            })
            .collect()
    };
    let cases: [(&str, Prefixes, Prefixes); 3] = [
        ("cloud catalogue", cloud4, cloud6),
        ("dense host routes", dense4, dense6),
        (
            "nested /0 to /32 and /128",
            nested(32, 0xcb00_714d),
            nested(
                128,
                u128::from("2001:db8:aaaa::77".parse::<Ipv6Addr>().unwrap()),
            ),
        ),
    ];
    let template = integration_tests::policy_from_yaml(POLICY).compile();
    for (name, v4, v6) in cases {
        let mut policy = template.clone();
        policy.regions_v4 = v4
            .iter()
            .map(|&(b, l, r)| {
                (
                    ipnetwork::Ipv4Network::new((b as u32).into(), l).unwrap(),
                    r,
                )
            })
            .collect();
        policy.regions_v6 = v6
            .iter()
            .map(|&(b, l, r)| (ipnetwork::Ipv6Network::new(b.into(), l).unwrap(), r))
            .collect();
        let tables = datafence::datapath::RegionTables::of(&policy);
        let mut dp = Datapath::load(&LoadOptions::sized_for(&tables)).expect("load");
        // Twice, so the table checked is the one in slot 0, at the stride's offset 0,
        // after slot 1 was written and then cleared.
        for _ in 0..2 {
            dp.apply_built(&policy, &tables, EventLimits::default())
                .expect("apply");
        }
        assert_eq!(dp.active_slot().unwrap(), 0, "{name}");
        for (width, prefixes) in [(32u8, &v4), (128, &v6)] {
            let naive = NaiveLpm::new(width, prefixes);
            let probes = edge_probes(width, prefixes);
            let stride = (probes.len() / 1000).max(1);
            let (mut judged, mut skipped) = (0usize, 0usize);
            for (i, &p) in probes.iter().enumerate() {
                let addr = to_ip(width, p);
                let want = naive.region(p);
                let got = dp.region_of(addr).expect("region_of");
                assert_eq!(got, want, "{name}: {addr} in the kernel's tables");
                // About a thousand probes through the program itself: the https class
                // looks the region up and counts it.
                if i % stride != 0 {
                    continue;
                }
                let src = if width == 32 { SRC4 } else { SRC6 };
                let o = tc(&mut dp, &Spec::tcp(src, &addr.to_string(), 443).build());
                if o.class != HTTPS {
                    // Exempt, NAT64 or the host's own link traffic: judged before any
                    // class, so no region to compare.
                    skipped += 1;
                    continue;
                }
                assert_eq!(
                    u32::from(o.region),
                    want,
                    "{name}: {addr} judged in the kernel"
                );
                judged += 1;
            }
            assert!(
                judged * 2 > probes.len() / stride && skipped * 10 <= judged,
                "{name} /{width}: {judged} judged, {skipped} skipped"
            );
        }
    }
}

/// Pinned region tables sized for a large policy keep their size when a datapath that
/// asks for the defaults adopts them: it learns index bits and room from the pins, reads
/// the tables where the kernel does, and a reload through it writes the other slot at
/// the same stride.
#[test]
fn adopted_region_tables_keep_the_size_they_were_made_with() {
    use datafence::datapath::{LoadOptions, PinLayout, RegionTables};
    use datafence_common::{map_names, v4::V4_MIN_INDEX_BITS, v6::V6_MIN_INDEX_BITS};
    integration_tests::require_root();
    let pins = integration_tests::agent::test_pin_dir("adopted-tables");
    let mut policy = integration_tests::policy_from_yaml(POLICY).compile();
    // 100,000 host routes in 100.64.0.0/10, every other address, eu-west and us-east in
    // turn: past the default room and the smallest index.
    let route = |i: u32| std::net::Ipv4Addr::from(0x6440_0000 + 2 * i);
    let region = |i: u32| {
        if i.is_multiple_of(2) {
            EU_WEST
        } else {
            US_EAST
        }
    };
    policy.regions_v4.extend((0..100_000u32).map(|i| {
        (
            ipnetwork::Ipv4Network::new(route(i), 32).unwrap(),
            u32::from(region(i)),
        )
    }));
    // And as many IPv6 host routes in 2001:db8::/32, the same way.
    let route6 = |i: u32| std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) + 2 * u128::from(i));
    policy.regions_v6.extend((0..100_000u32).map(|i| {
        (
            ipnetwork::Ipv6Network::new(route6(i), 128).unwrap(),
            u32::from(region(i)),
        )
    }));
    let tables = RegionTables::of(&policy);
    let sized = LoadOptions::sized_for(&tables);
    assert!(sized.v4_index_bits > V4_MIN_INDEX_BITS, "{sized:?}");
    assert!(sized.v6_index_bits > V6_MIN_INDEX_BITS, "{sized:?}");
    let pinned = |opts: LoadOptions| {
        Datapath::load(&LoadOptions {
            pin_dir: Some(pins.clone()),
            ..opts
        })
        .expect("load with pins")
    };
    let mut first = pinned(sized.clone());
    first
        .apply_built(&policy, &tables, EventLimits::default())
        .expect("apply");
    drop(first);

    let mut dp = pinned(LoadOptions::default());
    assert_eq!(dp.index_bits(), (sized.v4_index_bits, sized.v6_index_bits));
    let usage = |dp: &Datapath, map: &str| {
        dp.map_usage()
            .into_iter()
            .find(|(m, _, _)| m == map)
            .map(|(_, used, cap)| (used, cap))
            .unwrap()
    };
    let v4_usage = |dp: &Datapath| usage(dp, map_names::V4_RANGES);
    let v6_usage = |dp: &Datapath| usage(dp, map_names::V6_RANGES);
    let entries = tables.v4.entries(sized.v4_index_bits) as u64;
    let room = 2 * u64::from(sized.v4_slot_ranges);
    assert_eq!(v4_usage(&dp), (entries, room));
    let entries6 = tables.v6.entries(sized.v6_index_bits) as u64;
    let room6 = 2 * u64::from(sized.v6_slot_ranges);
    assert_eq!(v6_usage(&dp), (entries6, room6));
    for round in 0..2 {
        for i in (0..100_000u32).step_by(997).chain([0, 1, 99_998, 99_999]) {
            let addr = route(i);
            let want = region(i);
            assert_eq!(
                dp.region_of(IpAddr::V4(addr)).unwrap(),
                u32::from(want),
                "{addr}, round {round}"
            );
            let o = tc(&mut dp, &Spec::tcp(SRC4, &addr.to_string(), 443).build());
            assert_eq!((o.class, o.region), (HTTPS, want), "{addr}, round {round}");
            // The address between two routes is in no region.
            let gap = std::net::Ipv4Addr::from(u32::from(addr) + 1);
            assert_eq!(dp.region_of(IpAddr::V4(gap)).unwrap(), 0, "{gap}");
            let addr6 = route6(i);
            assert_eq!(
                dp.region_of(IpAddr::V6(addr6)).unwrap(),
                u32::from(want),
                "{addr6}, round {round}"
            );
            let o = tc(&mut dp, &Spec::tcp(SRC6, &addr6.to_string(), 443).build());
            assert_eq!((o.class, o.region), (HTTPS, want), "{addr6}, round {round}");
            let gap6 = std::net::Ipv6Addr::from(u128::from(addr6) + 1);
            assert_eq!(dp.region_of(IpAddr::V6(gap6)).unwrap(), 0, "{gap6}");
        }
        // A reload through the adopted datapath: the other slot, the same layout.
        dp.apply_built(&policy, &tables, EventLimits::default())
            .expect("reload");
    }
    assert_eq!(v4_usage(&dp), (2 * entries, room));
    assert_eq!(v6_usage(&dp), (2 * entries6, room6));
    drop(dp);
    let _ = PinLayout::new(&pins).remove_all();
}
