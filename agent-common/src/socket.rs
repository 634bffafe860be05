//! The socket ring's judgement: a `connect()` or `sendmsg()` judged by the same sequence
//! as a packet ([`judge_frame`]), with the class a call can show ([`classify_socket`]).
//!
//! The kernel's `cgroup/connect*` and `cgroup/sendmsg*` programs and `explain` both call
//! [`judge_socket_call`], so "which rule decided" has one answer for both rings.

use crate::{
    CLASS_NONE, ClassMask, FAMILY_V4, FAMILY_V6, Policy, RegionId,
    decide::{PacketFacts, PortInfo, SocketClass, classify_socket},
    parse::{FrameKind, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, ParsedFrame, fragment},
    verdict::{Judgement, Lookups, judge_frame},
};

/// The prefix of IPv4-mapped IPv6 addresses, `::ffff:0:0/96`: a dual-stack socket sends
/// to one of them over IPv4.
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// What a socket call shows of where it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketCall {
    /// [`FAMILY_V4`] or [`FAMILY_V6`]: the family the packets will have.
    pub family: u8,
    /// IPv4 addresses sit in the first four bytes.
    pub dst: [u8; 16],
    /// The socket's protocol (`IPPROTO_TCP`, `IPPROTO_UDP`, `IPPROTO_ICMP`, ...).
    pub protocol: u8,
    pub dst_port: u16,
}

impl SocketCall {
    pub fn v4(dst: [u8; 4], protocol: u8, dst_port: u16) -> Self {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&dst);
        Self {
            family: FAMILY_V4,
            dst: addr,
            protocol,
            dst_port,
        }
    }

    /// An IPv6 call; to an IPv4-mapped address (`::ffff:a.b.c.d`) it is an IPv4 call, as
    /// its packets are.
    #[inline(always)]
    pub fn v6(dst: [u8; 16], protocol: u8, dst_port: u16) -> Self {
        let mapped = dst[..12] == V4_MAPPED_PREFIX;
        if mapped {
            return Self::v4([dst[12], dst[13], dst[14], dst[15]], protocol, dst_port);
        }
        Self {
            family: FAMILY_V6,
            dst,
            protocol,
            dst_port,
        }
    }

    /// Whether the protocol has ports, and so whether `dst_port` means anything.
    #[inline(always)]
    pub fn ports(&self) -> PortInfo {
        match self.protocol {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => PortInfo::Known,
            _ => PortInfo::Absent,
        }
    }

    /// The call as the packet its data will leave in: whole, well formed, straight to
    /// its destination.
    #[inline(always)]
    pub fn frame(&self) -> ParsedFrame {
        let ports = self.ports();
        ParsedFrame {
            kind: FrameKind::Ip,
            family: self.family,
            ip_known: true,
            protocol_known: true,
            dst_known: true,
            routed: false,
            protocol: self.protocol,
            ip_protocol: self.protocol,
            dscp: 0,
            ports,
            fragment: fragment::WHOLE,
            ipv4_options_len: 0,
            src_port: 0,
            dst_port: if ports == PortInfo::Known {
                self.dst_port
            } else {
                0
            },
            ip_end: 0,
            network_at: 0,
            encapsulated: false,
            carried: false,
            fragment_id: 0,
            src: [0; 16],
            dst: self.dst,
        }
    }

    /// The class the socket ring judges this call by, for a socket whose cgroup ancestry
    /// selects `cgroup_classes`.
    #[inline(always)]
    pub fn class(&self, policy: &Policy, cgroup_classes: ClassMask) -> SocketClass {
        classify_socket(
            policy,
            cgroup_classes,
            self.protocol,
            self.ports(),
            self.dst_port,
        )
    }
}

/// A packet's lookups, classifying as the socket ring does: a call the packet ring must
/// decide is unclassified here.
struct SocketLookups<'a, L>(&'a L);

impl<L: Lookups> Lookups for SocketLookups<'_, L> {
    #[inline(always)]
    fn policy(&self) -> Option<(u32, &Policy)> {
        self.0.policy()
    }

    #[inline(always)]
    fn exempt(&self, slot: u32, policy: &Policy, frame: &ParsedFrame) -> bool {
        self.0.exempt(slot, policy, frame)
    }

    #[inline(always)]
    fn cgroup_classes(&self, slot: u32) -> ClassMask {
        self.0.cgroup_classes(slot)
    }

    /// A call has no source yet; a class by source is the packet ring's alone.
    #[inline(always)]
    fn src_classes(&self, _slot: u32, _frame: &ParsedFrame) -> ClassMask {
        0
    }

    #[inline(always)]
    fn region(&self, slot: u32, frame: &ParsedFrame) -> RegionId {
        self.0.region(slot, frame)
    }

    #[inline(always)]
    fn classify(&self, policy: &Policy, facts: &PacketFacts) -> u8 {
        match classify_socket(
            policy,
            facts.cgroup_classes,
            facts.protocol,
            facts.ports,
            facts.dst_port,
        ) {
            SocketClass::Class(class) => class,
            SocketClass::Unclassified | SocketClass::PacketRingDecides => CLASS_NONE,
        }
    }

    #[inline(always)]
    fn opaque(&self, value: u32) -> u32 {
        self.0.opaque(value)
    }
}

/// Judges a socket call against the policy in force: the packet sequence's steps in their
/// order (built-in and policy exemptions, no policy, classification, the destination's
/// region, NAT64), with the call's class.
#[inline(always)]
pub fn judge_socket_call<L: Lookups>(call: &SocketCall, lookups: &L) -> Judgement {
    judge_call_frame(&call.frame(), lookups)
}

/// [`judge_socket_call`] for the frame a call makes ([`SocketCall::frame`]), wherever
/// it is kept: the kernel keeps it in a map, so that the verifier checks the judgement
/// once for every call rather than once for each thing it knows of this one.
#[inline(always)]
pub fn judge_call_frame<L: Lookups>(frame: &ParsedFrame, lookups: &L) -> Judgement {
    judge_frame(frame, 0, &SocketLookups(lookups))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ClassSpec, REGION_NONE, Reason, Verdict, decide::PACKET_ONLY_SELECTORS, selector, set_bit,
    };

    struct Tables {
        policy: Policy,
        cgroups: ClassMask,
        /// The region of 203.0.113.0/24; everything else is in none.
        region: RegionId,
    }

    impl Lookups for Tables {
        fn policy(&self) -> Option<(u32, &Policy)> {
            Some((0, &self.policy))
        }
        fn exempt(&self, _: u32, _: &Policy, _: &ParsedFrame) -> bool {
            false
        }
        fn cgroup_classes(&self, _: u32) -> ClassMask {
            self.cgroups
        }
        fn src_classes(&self, _: u32, _: &ParsedFrame) -> ClassMask {
            u32::MAX
        }
        fn region(&self, _: u32, frame: &ParsedFrame) -> RegionId {
            if frame.family == FAMILY_V4 && frame.dst[..3] == [203, 0, 113] {
                self.region
            } else {
                RegionId::from(REGION_NONE)
            }
        }
    }

    fn tables(selectors: u32) -> Tables {
        let mut class = ClassSpec::EMPTY;
        class.selectors = selectors;
        set_bit(&mut class.allowed_regions, 1);
        let mut policy = Policy::EMPTY;
        policy.header.loaded = 1;
        policy.header.n_classes = 1;
        policy.header.selectors_in_use = selectors;
        policy.classes[0] = class;
        policy.build_index();
        Tables {
            policy,
            cgroups: 1,
            region: 2,
        }
    }

    fn mapped(v4: [u8; 4]) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12..].copy_from_slice(&v4);
        a
    }

    #[test]
    fn an_ipv4_mapped_destination_is_judged_as_ipv4() {
        let t = tables(selector::CGROUP);
        let call = SocketCall::v6(mapped([203, 0, 113, 9]), IPPROTO_TCP, 443);
        assert_eq!(call, SocketCall::v4([203, 0, 113, 9], IPPROTO_TCP, 443));
        let j = judge_socket_call(&call, &t);
        assert_eq!(j.decision.verdict, Verdict::Deny);
        assert_eq!(j.decision.reason, Reason::RegionDenied);
        assert_eq!(j.region, 2);
        // The region allowed: the same call passes.
        let allowed = Tables { region: 1, ..t };
        let j = judge_socket_call(&call, &allowed);
        assert_eq!(j.decision.reason, Reason::RegionAllowed);
    }

    #[test]
    fn a_call_outside_every_class_passes() {
        let t = Tables {
            cgroups: 0,
            ..tables(selector::CGROUP)
        };
        let j = judge_socket_call(&SocketCall::v4([203, 0, 113, 9], IPPROTO_UDP, 53), &t);
        assert_eq!(j.decision.reason, Reason::Unclassified);
        assert_eq!(j.class, CLASS_NONE);
    }

    #[test]
    fn a_class_by_what_only_packets_show_is_left_to_the_packet_ring() {
        for packet_only in PACKET_ONLY_SELECTORS {
            let t = tables(selector::CGROUP | packet_only);
            let j = judge_socket_call(&SocketCall::v4([203, 0, 113, 9], IPPROTO_TCP, 443), &t);
            assert_eq!(j.decision.verdict, Verdict::Allow, "selector {packet_only}");
            assert_eq!(j.decision.reason, Reason::Unclassified);
        }
    }

    #[test]
    fn loopback_and_link_local_pass_before_any_class() {
        let t = tables(selector::CGROUP);
        let j = judge_socket_call(&SocketCall::v4([127, 0, 0, 1], IPPROTO_TCP, 443), &t);
        assert_eq!(j.decision.reason, Reason::ExemptBuiltin);
        let mut ll = [0u8; 16];
        ll[0] = 0xfe;
        ll[1] = 0x80;
        let j = judge_socket_call(&SocketCall::v6(ll, IPPROTO_UDP, 53), &t);
        assert_eq!(j.decision.reason, Reason::ExemptBuiltin);
    }

    #[test]
    fn a_protocol_without_ports_ignores_the_port_field() {
        let call = SocketCall::v4([203, 0, 113, 9], 1, 7);
        assert_eq!(call.ports(), PortInfo::Absent);
        assert_eq!(call.frame().dst_port, 0);
    }
}
