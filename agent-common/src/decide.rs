//! Classification and verdicts: pure functions over a compiled [`Policy`].

use crate::{
    CLASS_NONE, ClassIndex, ClassMask, ClassSpec, MAX_INDEXED_MARKS, MAX_INDEXED_PORT_RANGES,
    MODE_AUDIT, Policy, REGION_NONE, Reason, RegionId, Verdict, bit_is_set, selector,
};

/// What is known of a destination port.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortInfo {
    /// TCP, UDP or SCTP with its header present.
    Known = 0,
    /// A protocol without ports (ICMP, ESP, ...): a port selector cannot match.
    Absent = 1,
    /// The packet should carry ports but they cannot be read: a non-first fragment, or a
    /// truncated transport header. A port selector is assumed to match (fail closed).
    Unknown = 2,
}

/// The facts about one packet that classification needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketFacts {
    pub mark: u32,
    /// Classes whose cgroup selector names an ancestor of the sending socket's cgroup.
    pub cgroup_classes: ClassMask,
    /// Classes whose source-CIDR selector contains the source address.
    pub src_classes: ClassMask,
    pub dscp: u8,
    pub protocol: u8,
    pub dst_port: u16,
    pub ports: PortInfo,
    /// False when the IP header itself could not be read: DSCP and source are then
    /// unknown, and selectors on them are assumed to match (fail closed).
    pub ip_known: bool,
    /// False when the transport protocol is unknown although the IP header was read (an
    /// IPv6 non-first fragment): a protocol selector is then assumed to match.
    pub protocol_known: bool,
}

/// A verdict and the reason it was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
}

impl Decision {
    pub const fn allow(reason: Reason) -> Self {
        Self {
            verdict: Verdict::Allow,
            reason,
        }
    }
}

/// Classes whose mark selector matches `mark`.
#[inline(always)]
fn mark_classes(ix: &ClassIndex, mark: u32) -> ClassMask {
    let mut classes = 0;
    let mut i = 0;
    // Bounded by MAX_INDEXED_MARKS so the verifier sees a constant trip count.
    while i < MAX_INDEXED_MARKS {
        if i >= ix.n_marks as usize {
            break;
        }
        let m = ix.marks[i];
        if mark & m.mask == m.value {
            classes |= m.classes;
        }
        i += 1;
    }
    classes
}

/// Classes whose destination-port selector holds `port`.
#[inline(always)]
fn port_classes(ix: &ClassIndex, port: u16) -> ClassMask {
    let mut classes = 0;
    let mut i = 0;
    // Bounded by MAX_INDEXED_PORT_RANGES, as above.
    while i < MAX_INDEXED_PORT_RANGES {
        if i >= ix.n_port_ranges as usize {
            break;
        }
        let r = ix.port_ranges[i];
        if port >= r.first && port <= r.last {
            classes |= r.classes;
        }
        i += 1;
    }
    classes
}

/// The lowest class in `classes`, or [`CLASS_NONE`]. Branch-free: the number of bits
/// below the lowest set one, counted by halves.
#[inline(always)]
fn lowest_class(classes: ClassMask) -> u8 {
    if classes == 0 {
        return CLASS_NONE;
    }
    // The trailing zeros, as a mask: set bits below the lowest set one.
    let below = classes.wrapping_sub(1) & !classes;
    let mut n = below - ((below >> 1) & 0x5555_5555);
    n = (n & 0x3333_3333) + ((n >> 2) & 0x3333_3333);
    n = (n + (n >> 4)) & 0x0f0f_0f0f;
    (n.wrapping_mul(0x0101_0101) >> 24) as u8
}

/// The first class (in policy order) whose every listed selector matches the packet, or
/// [`CLASS_NONE`].
///
/// Each selector narrows the set of candidate classes with one bitmap from the policy's
/// [`ClassIndex`]: a class survives a selector when it does not list it, or when the
/// packet's value is among the ones it lists. The work, and the verifier's, does not grow
/// with the number of classes. Selectors the packet cannot answer narrow nothing (fail
/// closed): IP fields when the IP header could not be read, ports when they are unknown.
#[inline(always)]
pub fn classify(policy: &Policy, facts: &PacketFacts) -> u8 {
    let ix = &policy.index;
    let mut candidates = ix.live;
    candidates &= !ix.using(selector::CGROUP) | facts.cgroup_classes;
    let uses_mark = ix.using(selector::MARK);
    if uses_mark != 0 {
        candidates &= !uses_mark | mark_classes(ix, facts.mark);
    }
    if facts.ip_known {
        candidates &= !ix.using(selector::DSCP) | ix.dscp[usize::from(facts.dscp & 63)];
        candidates &= !ix.using(selector::SRC_CIDR) | facts.src_classes;
    }
    if facts.ip_known && facts.protocol_known {
        candidates &= !ix.using(selector::PROTOCOL) | ix.protocol[usize::from(facts.protocol)];
    }
    let uses_port = ix.using(selector::DST_PORT);
    match facts.ports {
        PortInfo::Known => {
            if uses_port != 0 {
                candidates &= !uses_port | port_classes(ix, facts.dst_port);
            }
        }
        // A port selector cannot match a protocol without ports.
        PortInfo::Absent => candidates &= !uses_port,
        PortInfo::Unknown => {}
    }
    lowest_class(candidates)
}

/// What the socket ring may do for a `connect()` or `sendmsg()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketClass {
    /// The call's traffic is this class's, whatever its packets carry.
    Class(u8),
    /// No class: the call is allowed.
    Unclassified,
    /// The first class the call may fall in also selects by something only its packets
    /// show: the packet ring decides, and the call is allowed.
    PacketRingDecides,
}

/// Selectors a socket call cannot answer: it has no DSCP yet, and netfilter or routing
/// may still change its packets' mark and source. Classes that use them are the packet
/// ring's alone.
pub const PACKET_ONLY_SELECTORS: [u32; 3] = [selector::MARK, selector::DSCP, selector::SRC_CIDR];

/// The class of a socket call by what the call shows: the socket's cgroup ancestry
/// (`cgroup_classes`, as for packets), its protocol and its destination port (`ports`
/// says whether the protocol has ports). The same bitmaps as [`classify`]; selectors the
/// call cannot answer narrow nothing, so the first class left is the first its packets
/// could fall in. When that class uses one of them, the call cannot be judged here
/// without risking a denial its packets would not get.
#[inline(always)]
pub fn classify_socket(
    policy: &Policy,
    cgroup_classes: ClassMask,
    protocol: u8,
    ports: PortInfo,
    dst_port: u16,
) -> SocketClass {
    let ix = &policy.index;
    let mut candidates = ix.live;
    candidates &= !ix.using(selector::CGROUP) | cgroup_classes;
    candidates &= !ix.using(selector::PROTOCOL) | ix.protocol[usize::from(protocol)];
    let uses_port = ix.using(selector::DST_PORT);
    match ports {
        PortInfo::Known => {
            if uses_port != 0 {
                candidates &= !uses_port | port_classes(ix, dst_port);
            }
        }
        PortInfo::Absent => candidates &= !uses_port,
        PortInfo::Unknown => {}
    }
    let first = lowest_class(candidates);
    if first == CLASS_NONE {
        return SocketClass::Unclassified;
    }
    if selects_by_packet_only(ix, first) {
        return SocketClass::PacketRingDecides;
    }
    SocketClass::Class(first)
}

/// Whether `class` (below [`MAX_CLASSES`](crate::MAX_CLASSES)) lists a selector a
/// socket call cannot answer ([`PACKET_ONLY_SELECTORS`]).
#[inline(always)]
pub fn selects_by_packet_only(ix: &ClassIndex, class: u8) -> bool {
    let packet_only = PACKET_ONLY_SELECTORS
        .iter()
        .fold(0, |acc, &s| acc | ix.using(s));
    packet_only & (1 << class) != 0
}

/// Turns a would-be denial into an audit hit when the class is in audit mode.
#[inline(always)]
fn apply_mode(class: &ClassSpec, denied: bool, allow: Reason, deny: Reason) -> Decision {
    if !denied {
        return Decision::allow(allow);
    }
    let verdict = if class.mode == MODE_AUDIT {
        Verdict::Audit
    } else {
        Verdict::Deny
    };
    Decision {
        verdict,
        reason: deny,
    }
}

/// The verdict for a classified, well-formed packet whose destination is in `region`
/// ([`REGION_NONE`] when in none). `routed` is set for IPv6 packets whose routing header
/// still has segments left: the destination is only the next hop. The segments after it
/// are not looked up, so the packet passes only if the hop's region allows it and the
/// class is denied no destination at all; any segment could be one it is denied.
#[inline(always)]
pub fn judge(class: &ClassSpec, region: RegionId, routed: bool) -> Decision {
    let unknown_denied = class.unknown_denied != 0;
    let in_no_region = region == RegionId::from(REGION_NONE) || region > 255;
    let hop_denied = if in_no_region {
        unknown_denied
    } else {
        !bit_is_set(&class.allowed_regions, region as u8)
    };
    if routed {
        return apply_mode(
            class,
            hop_denied || class.some_destination_denied != 0,
            Reason::RoutingHeaderAllowed,
            Reason::RoutingHeaderDenied,
        );
    }
    if in_no_region {
        return apply_mode(
            class,
            hop_denied,
            Reason::UnknownAllowed,
            Reason::UnknownDenied,
        );
    }
    apply_mode(
        class,
        hop_denied,
        Reason::RegionAllowed,
        Reason::RegionDenied,
    )
}

/// The verdict for a packet whose headers could not all be read, once it has been
/// classified with the unreadable fields assumed to match.
#[inline(always)]
pub fn judge_malformed(class: &ClassSpec) -> Decision {
    apply_mode(
        class,
        true,
        Reason::MalformedAllowed,
        Reason::MalformedDenied,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MAX_CLASSES, MarkMatch, PortRange, set_bit};

    fn facts() -> PacketFacts {
        PacketFacts {
            mark: 0,
            cgroup_classes: 0,
            src_classes: 0,
            dscp: 0,
            protocol: 6,
            dst_port: 443,
            ports: PortInfo::Known,
            ip_known: true,
            protocol_known: true,
        }
    }

    fn port_class(first: u16, last: u16) -> ClassSpec {
        let mut c = ClassSpec::EMPTY;
        c.selectors = selector::DST_PORT;
        c.n_port_ranges = 1;
        c.port_ranges[0] = PortRange { first, last };
        c
    }

    fn policy(classes: &[ClassSpec]) -> Policy {
        let mut p = Policy::EMPTY;
        p.header.loaded = 1;
        p.header.n_classes = classes.len() as u32;
        p.classes[..classes.len()].copy_from_slice(classes);
        p.build_index();
        p
    }

    fn cgroup_class() -> ClassSpec {
        let mut c = ClassSpec::EMPTY;
        c.selectors = selector::CGROUP;
        c
    }

    #[test]
    fn a_socket_call_takes_the_first_class_its_cgroup_and_port_select() {
        let p = policy(&[port_class(80, 80), cgroup_class(), port_class(443, 443)]);
        let known = PortInfo::Known;
        assert_eq!(
            classify_socket(&p, 0b010, 6, known, 443),
            SocketClass::Class(1)
        );
        assert_eq!(classify_socket(&p, 0, 6, known, 443), SocketClass::Class(2));
        assert_eq!(classify_socket(&p, 0, 6, known, 80), SocketClass::Class(0));
        assert_eq!(
            classify_socket(&p, 0, 6, known, 22),
            SocketClass::Unclassified
        );
        // A ping socket has no ports: a port class cannot be its.
        assert_eq!(
            classify_socket(&p, 0, 1, PortInfo::Absent, 0),
            SocketClass::Unclassified
        );
    }

    #[test]
    fn a_socket_call_leaves_classes_by_packet_only_selectors_to_the_packet_ring() {
        for packet_only in PACKET_ONLY_SELECTORS {
            // First a class that also selects by what only packets show, then one the
            // call fully answers: the packets may fall in either, so the call is not judged.
            let mut first = port_class(443, 443);
            first.selectors |= packet_only;
            let p = policy(&[first, port_class(443, 443)]);
            assert_eq!(
                classify_socket(&p, 0, 6, PortInfo::Known, 443),
                SocketClass::PacketRingDecides,
                "{packet_only:#x}"
            );
            // Behind a class the call answers, it does not matter.
            let p = policy(&[port_class(443, 443), first]);
            assert_eq!(
                classify_socket(&p, 0, 6, PortInfo::Known, 443),
                SocketClass::Class(0),
                "{packet_only:#x}"
            );
        }
    }

    #[test]
    fn first_matching_class_wins() {
        let p = policy(&[
            port_class(80, 80),
            port_class(400, 500),
            port_class(443, 443),
        ]);
        assert_eq!(classify(&p, &facts()), 1);
    }

    #[test]
    fn classes_past_n_classes_are_ignored() {
        let mut p = policy(&[port_class(80, 80)]);
        p.classes[1] = port_class(443, 443);
        p.build_index();
        assert_eq!(classify(&p, &facts()), CLASS_NONE);
    }

    #[test]
    fn the_lowest_class_is_counted_exactly() {
        assert_eq!(lowest_class(0), CLASS_NONE);
        for id in 0..32 {
            assert_eq!(lowest_class(1 << id), id as u8);
            assert_eq!(lowest_class(u32::MAX << id), id as u8);
        }
    }

    #[test]
    fn the_sixteenth_class_is_reachable() {
        let mut classes = [port_class(1, 1); MAX_CLASSES];
        classes[MAX_CLASSES - 1] = port_class(443, 443);
        let p = policy(&classes);
        assert_eq!(classify(&p, &facts()), (MAX_CLASSES - 1) as u8);
    }

    #[test]
    fn empty_class_never_matches() {
        let p = policy(&[ClassSpec::EMPTY]);
        assert_eq!(classify(&p, &facts()), CLASS_NONE);
    }

    #[test]
    fn every_listed_selector_must_match() {
        let mut c = port_class(443, 443);
        c.selectors |= selector::MARK;
        c.n_marks = 1;
        c.marks[0] = MarkMatch {
            value: 0x10,
            mask: 0xff,
        };
        let p = policy(&[c]);
        let mut f = facts();
        assert_eq!(classify(&p, &f), CLASS_NONE);
        f.mark = 0x1310;
        assert_eq!(classify(&p, &f), 0);
    }

    #[test]
    fn port_selector_with_portless_protocol_does_not_match() {
        let p = policy(&[port_class(0, 65535)]);
        let mut f = facts();
        f.ports = PortInfo::Absent;
        assert_eq!(classify(&p, &f), CLASS_NONE);
        f.ports = PortInfo::Unknown;
        assert_eq!(classify(&p, &f), 0, "unreadable ports fail closed");
    }

    #[test]
    fn unknown_ip_fields_fail_closed() {
        let mut c = ClassSpec::EMPTY;
        c.selectors = selector::DSCP | selector::PROTOCOL | selector::SRC_CIDR;
        let p = policy(&[c]);
        let mut f = facts();
        assert_eq!(classify(&p, &f), CLASS_NONE);
        f.ip_known = false;
        assert_eq!(classify(&p, &f), 0);
    }

    #[test]
    fn an_unknown_protocol_fails_closed_and_nothing_else() {
        let mut c = ClassSpec::EMPTY;
        c.selectors = selector::PROTOCOL;
        let mut d = ClassSpec::EMPTY;
        d.selectors = selector::DSCP;
        d.dscp = 1 << 46;
        let p = policy(&[d, c]);
        let mut f = facts();
        assert_eq!(classify(&p, &f), CLASS_NONE);
        f.protocol_known = false;
        assert_eq!(
            classify(&p, &f),
            1,
            "the protocol class matches; DSCP is still read"
        );
    }

    #[test]
    fn cgroup_src_dscp_protocol_selectors() {
        let mut c = ClassSpec::EMPTY;
        c.selectors = selector::CGROUP | selector::SRC_CIDR | selector::DSCP | selector::PROTOCOL;
        c.dscp = 1 << 10;
        set_bit(&mut c.protocols, 17);
        let p = policy(&[ClassSpec::EMPTY, c]);
        let mut f = facts();
        f.cgroup_classes = 0b10;
        f.src_classes = 0b10;
        f.dscp = 10;
        f.protocol = 17;
        assert_eq!(classify(&p, &f), 1);
        f.protocol = 6;
        assert_eq!(classify(&p, &f), CLASS_NONE);
        f.protocol = 17;
        f.cgroup_classes = 0b01;
        assert_eq!(classify(&p, &f), CLASS_NONE);
    }

    #[test]
    fn verdicts_by_region_and_mode() {
        let mut c = port_class(443, 443);
        set_bit(&mut c.allowed_regions, 3);
        assert_eq!(judge(&c, 3, false), Decision::allow(Reason::RegionAllowed));
        assert_eq!(
            judge(&c, 4, false),
            Decision {
                verdict: Verdict::Deny,
                reason: Reason::RegionDenied
            }
        );
        assert_eq!(judge(&c, 0, false), Decision::allow(Reason::UnknownAllowed));
        c.unknown_denied = 1;
        assert_eq!(judge(&c, 0, false).reason, Reason::UnknownDenied);
        c.some_destination_denied = 1;
        assert_eq!(judge(&c, 3, true).reason, Reason::RoutingHeaderDenied);
        c.unknown_denied = 0;
        assert_eq!(
            judge(&c, 3, true).reason,
            Reason::RoutingHeaderDenied,
            "unknown: allow, but a region is denied: a later segment could be in it"
        );
        c.some_destination_denied = 0;
        assert_eq!(
            judge(&c, 3, true),
            Decision::allow(Reason::RoutingHeaderAllowed),
            "denied nowhere"
        );
        assert_eq!(
            judge(&c, 4, true).reason,
            Reason::RoutingHeaderDenied,
            "a denied next hop is denied whatever the unknown rule"
        );
        c.unknown_denied = 1;
        c.mode = MODE_AUDIT;
        assert_eq!(judge(&c, 4, false).verdict, Verdict::Audit);
        assert_eq!(judge(&c, 3, false).verdict, Verdict::Allow);
        assert_eq!(judge_malformed(&c).verdict, Verdict::Audit);
    }
}
