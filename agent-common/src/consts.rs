//! Limits, capacities and the small numbered constants both sides of the ABI share:
//! policy slots, tail-call stages, modes and selector bits.

/// Bumped whenever a map layout or the meaning of a value in this crate changes, so an
/// agent never adopts pinned maps written by an incompatible datapath.
pub const ABI_VERSION: u32 = 10;

/// The host's own link traffic that passes whatever the classes say, as bits of
/// [`PolicyHeader::host_essentials`](crate::PolicyHeader::host_essentials); each has a
/// policy switch (`host_essentials:`), on by default.
pub mod host_essential {
    /// DHCPv4 to the limited broadcast (255.255.255.255, UDP port 67) and DHCPv6 to
    /// All_DHCP_Relay_Agents_and_Servers (ff02::1:2, UDP port 547): the only traffic to
    /// those two addresses that passes, since relays there forward it off the link.
    pub const DHCP: u32 = 1 << 0;
    /// ICMPv6 to interface- and link-scope multicast: neighbour and router
    /// solicitations, and MLD reports.
    pub const NEIGHBOR_DISCOVERY: u32 = 1 << 1;
    /// Anything to link-scope multicast: 224.0.0.0/24 (mDNS, VRRP, IGMPv3), ff01::/16
    /// and ff02::/16 but for ff02::1:2. Routers never forward them.
    pub const LINK_MULTICAST: u32 = 1 << 2;
    pub const ALL: u32 = DHCP | NEIGHBOR_DISCOVERY | LINK_MULTICAST;
}

/// NAT64 prefixes (RFC 6052, `/96`) a policy may declare, beside the well-known one.
pub const MAX_NAT64_PREFIXES: usize = 4;
/// Data classes per policy. Class ids are indexes into [`Policy::classes`](crate::Policy::classes).
pub const MAX_CLASSES: usize = 16;
/// Class id used for traffic that matched no class.
pub const CLASS_NONE: u8 = 0xff;
/// Region ids run 1..=MAX_REGIONS; 0 means "in no region". The allow-set of a class is a
/// 256-bit map indexed by region id.
pub const MAX_REGIONS: usize = 255;
pub const REGION_NONE: u16 = 0;
pub const MAX_MARKS_PER_CLASS: usize = 8;
pub const MAX_PORT_RANGES_PER_CLASS: usize = 16;
/// How many levels of cgroup ancestry the classifier walks, root excluded. systemd
/// hierarchies rarely exceed 6 levels; deeper sockets still match on their first
/// `MAX_CGROUP_DEPTH` ancestors.
pub const MAX_CGROUP_DEPTH: usize = 16;
/// Entries in the cgroup -> classes map, shared by both policy slots.
pub const MAX_CGROUP_ENTRIES: u32 = 4096;
/// Entries in each source-CIDR trie (both slots together).
pub const MAX_SRC_CIDR_ENTRIES: u32 = 65_536;
/// Entries in each exemption trie (both slots together).
pub const MAX_EXEMPT_ENTRIES: u32 = 16_384;
/// The region prefixes a policy may list per address family, by default
/// (`--table-capacity`). It sizes no map: the region tables follow the policy.
pub const DEFAULT_TABLE_CAPACITY: u32 = 1 << 20;
/// Range entries per slot the IPv4 table has room for at least (256 KiB): a small
/// policy's table, and room for it to grow to tens of thousands of prefixes before a
/// restart is needed (see [`v4`](crate::v4)).
pub const DEFAULT_V4_SLOT_RANGES: u32 = 1 << 16;
/// Largest range count per slot the agent accepts: above a full routing table's twice.
pub const MAX_V4_SLOT_RANGES: u32 = 1 << 24;
/// Range entries per slot the IPv6 table has room for at least (128 KiB): a small
/// policy's table, and room for thousands of boundaries (see [`v6`](crate::v6)).
pub const DEFAULT_V6_SLOT_RANGES: u32 = 1 << 13;
/// Largest IPv6 range count per slot the agent accepts (256 MiB a slot); it bounds the
/// depth of the lookup's B-trees.
pub const MAX_V6_SLOT_RANGES: u32 = 1 << 24;
/// Lookups each cold benchmark run performs, on addresses drawn at random from a
/// pre-filled array (`BENCH_ADDRS_*`).
pub const COLD_LOOKUPS_PER_RUN: u32 = 16;
/// Entries of each benchmark address array; a power of two so an index is a mask.
pub const BENCH_ADDRS: u32 = 1 << 16;

/// Distinct (interface, hook, class, region, verdict, reason) counter keys.
pub const MAX_COUNTER_KEYS: u32 = 65_536;
/// Places in each CPU's counter cache (`COUNTER_CACHE`), a power of two. A host sees a
/// few dozen keys at most; each key claims the place its hash picks, and a key whose
/// place is taken is counted in the `COUNTERS` hash instead.
pub const COUNTER_CACHE_SLOTS: u32 = 256;
/// Ring buffer for violation events; a power of two and a multiple of the page size.
pub const EVENT_RING_BYTES: u32 = 1 << 20;

/// The two policy slots: the datapath reads the active one while the agent writes the
/// other, then flips [`ACTIVE_SLOT`](crate::map_names::ACTIVE_SLOT). A packet reads the slot
/// once, so it sees one whole policy, never a mixture.
pub const SLOTS: u32 = 2;

/// Indexes into each hook's program array of tail-call stages.
pub mod stage {
    /// The judge: classification, region lookup, verdict, count and report.
    pub const JUDGE: u32 = 0;
    /// The parser for interfaces whose frames start at the IP header (see
    /// [`L3_LINKS`](crate::map_names::L3_LINKS)); it posts the job and jumps to the judge.
    pub const L3_PARSE: u32 = 1;
    /// The walk of IPv4 options, for the source routes among them
    /// ([`read_ipv4_options`](crate::parse::read_ipv4_options)); the parse stages jump
    /// here instead of to the judge when a header has options, and it jumps on to the
    /// judge.
    pub const IPV4_OPTIONS: u32 = 2;
    /// The inner headers of a tunnel
    /// ([`read_encapsulated`](crate::parse::read_encapsulated)); the parse and options
    /// stages jump here instead of to the judge when a frame may be a tunnel, and it jumps
    /// on to the judge.
    pub const ENCAPSULATED: u32 = 3;
}

/// Places in each hook's program array.
pub const STAGE_SLOTS: u32 = 4;

/// Places in each socket hook's program array (the socket ring's stages, one array per
/// attach type).
pub mod socket_stage {
    /// The judge: classification, region lookup, verdict and count.
    pub const JUDGE: u32 = 0;
    /// The report of a call the judge did not simply allow, apart from the judge so that
    /// the verifier checks it once rather than once for every way to a violation (Linux
    /// 6.1 walked past its million instructions in a judge that reported).
    pub const REPORT: u32 = 1;
}

/// Places in each socket hook's program array.
pub const SOCKET_STAGE_SLOTS: u32 = 2;

/// First fragments whose judgement is kept for their datagram's later fragments, as in
/// Cilium's fragment map. Linux keeps an incomplete datagram for 30 s at most
/// (`ipfrag_time`); past this many in flight, the oldest entries go first.
pub const MAX_TRACKED_FRAGMENTS: u32 = 8192;

/// Interfaces without a link-layer header that one host can hold in `L3_LINKS`.
pub const MAX_L3_LINKS: u32 = 4096;

/// The host's own unicast addresses that `HOST_ADDRESSES` holds; past this many, the rest
/// are judged at XDP as forwarded traffic is, as before the map (the agent warns).
pub const MAX_HOST_ADDRESSES: u32 = 4096;

/// What the TC programs return for a packet they let pass: `TC_ACT_UNSPEC`, which tcx
/// reads as `TCX_NEXT` and a clsact filter walk as "ask the next filter". Programs after
/// datafence on the same hook (Cilium, Calico, a site's own) still see the packet; a
/// `TC_ACT_OK` would end the chain at datafence.
pub const TC_PASS: i32 = -1;

pub const MODE_ENFORCE: u8 = 0;
pub const MODE_AUDIT: u8 = 1;
