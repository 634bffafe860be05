//! The names the agent and the programs must spell alike: maps, programs, loader
//! globals, and the IP protocols datafence knows by name.

/// Names of the maps, shared so the agent looks up exactly what the programs define.
pub mod map_names {
    pub const ACTIVE_SLOT: &str = "ACTIVE_SLOT";
    pub const POLICY: &str = "POLICY";
    pub const EXEMPT_V4: &str = "EXEMPT_V4";
    pub const EXEMPT_V6: &str = "EXEMPT_V6";
    pub const SRC_V4: &str = "SRC_V4";
    pub const SRC_V6: &str = "SRC_V6";
    pub const CGROUP_CLASSES: &str = "CGROUP_CLASSES";
    pub const COUNTERS: &str = "COUNTERS";
    pub const STATS: &str = "STATS";
    pub const EVENTS: &str = "EVENTS";
    pub const RATE_LIMIT: &str = "RATE_LIMIT";
    /// The IPv4 range table: chunk index and ranges (see `datafence_common::v4`).
    pub const V4_INDEX: &str = "V4_INDEX";
    pub const V4_RANGES: &str = "V4_RANGES";
    /// The IPv6 range table (see `datafence_common::v6`).
    pub const V6_INDEX: &str = "V6_INDEX";
    pub const V6_RANGES: &str = "V6_RANGES";
    pub const COUNTER_CACHE: &str = "COUNTER_CACHE";
    /// The tail-call stage arrays, one per hook, and the jobs the entry programs hand
    /// their stages.
    pub const TC_STAGES: &str = "TC_STAGES";
    pub const XDP_STAGES: &str = "XDP_STAGES";
    pub const TC_JOB: &str = "TC_JOB";
    pub const XDP_JOB: &str = "XDP_JOB";
    pub const SCRATCH: &str = "SCRATCH";
    /// The socket ring's call, posted for its judge stages, and each hook's stage array.
    pub const SOCKET_CALL: &str = "SOCKET_CALL";
    pub const SOCK_CONNECT4_STAGES: &str = "SOCK_CONNECT4_STAGES";
    pub const SOCK_CONNECT6_STAGES: &str = "SOCK_CONNECT6_STAGES";
    pub const SOCK_SENDMSG4_STAGES: &str = "SOCK_SENDMSG4_STAGES";
    pub const SOCK_SENDMSG6_STAGES: &str = "SOCK_SENDMSG6_STAGES";
    /// First fragments' judgements, for the later fragments of their datagrams.
    pub const FRAGMENTS: &str = "FRAGMENTS";
    /// The interfaces whose frames start at the IP header, by ifindex.
    pub const L3_LINKS: &str = "L3_LINKS";
    /// The host's own unicast addresses, which the XDP judge lets through to the host.
    pub const HOST_ADDRESSES: &str = "HOST_ADDRESSES";
    /// Benchmark maps; only `cargo xtask bench` fills them.
    pub const BENCH_LPM_V4: &str = "BENCH_LPM_V4";
    pub const BENCH_LPM_V6: &str = "BENCH_LPM_V6";
    pub const BENCH_ADDRS_V4: &str = "BENCH_ADDRS_V4";
    pub const BENCH_ADDRS_V6: &str = "BENCH_ADDRS_V6";
    pub const BENCH_STAGES: &str = "BENCH_STAGES";
    // Which maps are pinned, how they are sized per slot and which are reported is one
    // table in the agent: `datafence::datapath::maps::MAPS`.
}

/// The IP protocols datafence knows by name: policy `protocols:` lists, `--protocol`,
/// and the protocol of events and reports. Any other is written as its number.
pub mod protocols {
    /// (name, number); the first name of a number is the one printed.
    pub const NAMES: [(&str, u8); 6] = [
        ("icmp", 1),
        ("tcp", 6),
        ("udp", 17),
        ("icmpv6", 58),
        ("ipv6-icmp", 58),
        ("sctp", 132),
    ];

    /// The number of a protocol name, in any case.
    pub fn number(name: &str) -> Option<u8> {
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, number)| number)
    }

    /// The name of a protocol number, if it has one.
    pub fn name(number: u8) -> Option<&'static str> {
        NAMES
            .iter()
            .find(|&&(_, n)| n == number)
            .map(|&(name, _)| name)
    }
}

/// Program names as they appear in the object file.
pub mod program_names {
    pub const TC_EGRESS: &str = "datafence_tc_egress";
    pub const XDP_GATEWAY: &str = "datafence_xdp";
    /// The judge stages the entry programs tail-call (see `stage`).
    pub const TC_JUDGE: &str = "datafence_tc_judge";
    pub const XDP_JUDGE: &str = "datafence_xdp_judge";
    /// The parse stages for interfaces without a link-layer header.
    pub const TC_L3: &str = "datafence_tc_l3";
    pub const XDP_L3: &str = "datafence_xdp_l3";
    /// The stages that walk IPv4 options (see `stage::IPV4_OPTIONS`).
    pub const TC_IPV4_OPTIONS: &str = "datafence_tc_options";
    pub const XDP_IPV4_OPTIONS: &str = "datafence_xdp_options";
    /// The stages that read a tunnel's inner headers (see `stage::ENCAPSULATED`).
    pub const TC_ENCAPSULATED: &str = "datafence_tc_encap";
    pub const XDP_ENCAPSULATED: &str = "datafence_xdp_encap";
    /// The socket ring (attached at the cgroup v2 root, not to interfaces).
    pub const SOCK_CONNECT4: &str = "datafence_sock_connect4";
    pub const SOCK_CONNECT6: &str = "datafence_sock_connect6";
    pub const SOCK_SENDMSG4: &str = "datafence_sock_sendmsg4";
    pub const SOCK_SENDMSG6: &str = "datafence_sock_sendmsg6";
    /// The socket ring's judge and report stages, one of each per attach type.
    pub const SOCK_CONNECT4_JUDGE: &str = "datafence_sock_connect4_judge";
    pub const SOCK_CONNECT6_JUDGE: &str = "datafence_sock_connect6_judge";
    pub const SOCK_SENDMSG4_JUDGE: &str = "datafence_sock_sendmsg4_judge";
    pub const SOCK_SENDMSG6_JUDGE: &str = "datafence_sock_sendmsg6_judge";
    pub const SOCK_CONNECT4_REPORT: &str = "datafence_sock_connect4_report";
    pub const SOCK_CONNECT6_REPORT: &str = "datafence_sock_connect6_report";
    pub const SOCK_SENDMSG4_REPORT: &str = "datafence_sock_sendmsg4_report";
    pub const SOCK_SENDMSG6_REPORT: &str = "datafence_sock_sendmsg6_report";
    /// Benchmark baselines and cold-lookup loops; never loaded by the agent.
    pub const BENCH_EMPTY: &str = "bench_empty";
    pub const BENCH_LPM_V4: &str = "bench_lpm_v4";
    pub const BENCH_LPM_V6: &str = "bench_lpm_v6";
    pub const BENCH_COLD_FLOOR: &str = "bench_cold_floor";
    pub const BENCH_COLD_LPM_V4: &str = "bench_cold_lpm_v4";
    pub const BENCH_COLD_LPM_V6: &str = "bench_cold_lpm_v6";
    pub const BENCH_COLD_REGION_V4: &str = "bench_cold_region_v4";
    pub const BENCH_COLD_REGION_V6: &str = "bench_cold_region_v6";
    pub const BENCH_PARSE_POST: &str = "bench_parse_post";
    pub const BENCH_HANDOFF: &str = "bench_handoff";
    pub const BENCH_HANDOFF_STAGE: &str = "bench_handoff_stage";
    /// The socket ring's floor: connect and sendmsg programs that allow every call.
    pub const BENCH_SOCK_CONNECT4: &str = "bench_sock_connect4";
    pub const BENCH_SOCK_SENDMSG4: &str = "bench_sock_sendmsg4";
}

/// Read-only globals the loader sets; the verifier prunes the branches they rule out.
pub mod globals {
    /// Index bits of the IPv4 range table.
    pub const V4_INDEX_BITS: &str = "V4_INDEX_BITS";
    /// The same for the IPv6 range table.
    pub const V6_INDEX_BITS: &str = "V6_INDEX_BITS";
}
