//! The numbered contracts: hooks, verdicts and reasons, as they appear in metrics
//! labels, violation events and `explain`.

/// A numbered contract: a `repr(u8)` enum whose every variant states its number and its
/// name once, from which `from_u8`, `as_str` and `ALL` are derived.
macro_rules! contract {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl $name {
            /// Every value, in numeric order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            pub const fn from_u8(v: u8) -> Option<Self> {
                match v {
                    $( $value => Some(Self::$variant), )+
                    _ => None,
                }
            }

            /// The name used in metrics labels, event fields and `explain`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $label, )+
                }
            }
        }
    };
}

contract! {
    /// The hook that judged a packet. Numbered contract: metrics label `hook`, event field
    /// `hook`, docs/architecture.md.
    pub enum Hook {
        TcEgress = 0 => "tc_egress",
        Xdp = 1 => "xdp",
        /// The socket ring: `connect()`, judged before the connection is made.
        SockConnect = 2 => "sock_connect",
        /// The socket ring: `sendmsg()` and `sendto()` with an address.
        SockSendmsg = 3 => "sock_sendmsg",
    }
}

contract! {
    /// Outcome for a packet. Numbered contract, like [`Reason`].
    pub enum Verdict {
        Allow = 0 => "allow",
        /// Dropped: enforce mode.
        Deny = 1 => "deny",
        /// Would be denied, but the class or policy is in audit mode: passed and reported.
        Audit = 2 => "audit",
    }
}

impl Verdict {
    pub const fn passes(self) -> bool {
        !matches!(self, Self::Deny)
    }
}

contract! {
    /// Why a verdict was reached.
    ///
    /// This is a versioned contract. Values are appended and never renumbered; a retired
    /// value stays reserved. Consumers: the metrics label `reason` (agent/src/metrics.rs),
    /// the `reason` field of violation events and `explain --json`, and
    /// docs/architecture.md.
    pub enum Reason {
        /// Not IPv4 or IPv6 (ARP, LLDP, ...): passes.
        NotIp = 1 => "not_ip",
        /// No policy loaded yet: passes, so a host never loses its network before the
        /// agent has written a complete policy.
        NoPolicy = 2 => "no_policy",
        /// Destination is loopback or link-local: always allowed.
        ExemptBuiltin = 3 => "exempt_builtin",
        /// Destination is in the policy's `exempt` list.
        ExemptPolicy = 4 => "exempt_policy",
        /// The packet matched no data class.
        Unclassified = 5 => "unclassified",
        /// The class may reach the destination's region.
        RegionAllowed = 6 => "region_allowed",
        /// The class may not reach the destination's region.
        RegionDenied = 7 => "region_denied",
        /// The destination is in no region and the class's `unknown` rule is `allow`.
        UnknownAllowed = 8 => "unknown_allowed",
        /// The destination is in no region and the class's `unknown` rule is `deny`.
        UnknownDenied = 9 => "unknown_denied",
        /// The IP header could not be parsed (truncated, bad version or length) and the
        /// packet could belong to a data class: fail closed.
        MalformedDenied = 10 => "malformed_denied",
        /// The IP header could not be parsed, but no data class could match: passes.
        MalformedAllowed = 11 => "malformed_allowed",
        /// An IPv6 routing header with segments left: the destination is only the next
        /// hop and the packet travels on to destinations the header names, so it is
        /// allowed only if the class may reach the hop's region and its `unknown` rule
        /// allows. Exemptions do not apply to the hop.
        RoutingHeaderAllowed = 12 => "routing_header_allowed",
        RoutingHeaderDenied = 13 => "routing_header_denied",
        /// A later fragment of a datagram whose first fragment was not seen here (sent
        /// before the agent started, through another interface, or pushed out of the
        /// fragment table). Its ports and protocol are unknown, so any class that could
        /// claim it does, and it is denied (or audited) when that class may not reach the
        /// destination. A later fragment whose first was seen takes the first's verdict
        /// and reason instead.
        FragmentUnseen = 14 => "fragment_unseen",
        /// The host's own link traffic that a built-in exemption lets pass (DHCP,
        /// neighbour discovery, link-scope multicast), unless the policy turns that
        /// exemption off (`host_essentials:`).
        ExemptHostEssential = 15 => "exempt_host_essential",
        /// At a gateway interface's XDP hook: a plain IP packet (not a tunnel, ESP or
        /// MPLS) to one of the host's own unicast addresses, which the host takes in
        /// rather than forwards. What it sends in reply, or on, is judged at TC egress.
        LocalDestination = 16 => "local_destination",
    }
}

/// One past the highest [`Reason`] value.
pub const REASON_COUNT: u8 = Reason::ALL[Reason::ALL.len() - 1] as u8 + 1;

#[cfg(test)]
mod contract_tests {
    use super::*;
    use crate::stat;

    #[test]
    fn every_contract_value_round_trips_with_a_unique_name() {
        fn check<T: Copy + PartialEq + core::fmt::Debug>(
            all: &[T],
            number: impl Fn(T) -> u8,
            from: impl Fn(u8) -> Option<T>,
            name: impl Fn(T) -> &'static str,
        ) {
            for (i, a) in all.iter().enumerate() {
                assert_eq!(from(number(*a)), Some(*a));
                for b in &all[i + 1..] {
                    assert_ne!(name(*a), name(*b));
                    assert!(number(*a) < number(*b), "ALL is in numeric order");
                }
            }
        }
        check(Reason::ALL, |r| r as u8, Reason::from_u8, Reason::as_str);
        check(Verdict::ALL, |v| v as u8, Verdict::from_u8, Verdict::as_str);
        check(Hook::ALL, |h| h as u8, Hook::from_u8, Hook::as_str);
        assert_eq!(Reason::from_u8(0), None, "0 is no reason");
        assert_eq!(REASON_COUNT, 17);
        let names = [
            "events_lost",
            "events_suppressed",
            "counter_map_full",
            "stage_missing",
        ];
        assert!(stat::ALL.iter().map(|s| s.name).eq(names));
    }
}
