//! Everything the datafence datapath and agent must agree on: map layouts, limits,
//! the reason-code contract and the pure decision logic.
//!
//! The decision functions here are compiled twice: into the eBPF programs, where they
//! judge live packets, and into the agent, where `datafence explain` uses them to answer
//! "what would happen to this packet". Keeping one copy is what lets the property tests
//! hold the kernel's answer and the userspace answer to the same result.
#![no_std]

pub mod decide;
pub mod parse;
pub mod v6;

pub use decide::{Decision, PacketFacts, classify, judge};

/// Bumped whenever a map layout or the meaning of a value in this crate changes, so an
/// agent never adopts pinned maps written by an incompatible datapath.
pub const ABI_VERSION: u32 = 2;

/// Data classes per policy. Class ids are indexes into [`Policy::classes`].
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
/// Default region-table capacity per address family and per slot. The agent can raise it
/// (`--table-capacity`); the maps hold two slots, so their max_entries is twice this.
pub const DEFAULT_TABLE_CAPACITY: u32 = 1 << 20;
/// IPv4 regions live in a DIR-24-8 table: `DIR24` has one u32 per /24 and slot. An entry
/// is a region id (0: none), or [`DIR_EXTENDED`] plus the index of a 256-entry group of
/// u8 region ids in `DIR8`, for /24s that contain longer prefixes. A lookup costs one or
/// two array reads whatever the number of prefixes.
pub const DIR24_ENTRIES: u32 = 1 << 24;
pub const DIR_EXTENDED: u32 = 1 << 31;
/// Table entries per array value. The kernel stores array values at an 8-byte stride, so
/// values of eight bytes keep the memory-mapped arrays dense.
pub const DIR24_LANES: usize = 2;
pub const DIR8_LANES: usize = 8;
/// `DIR8` groups per slot by default: /24s that hold prefixes longer than /24. The cloud
/// catalogue needs about 17,000; a million real-world prefixes about 250,000.
pub const DEFAULT_DIR8_GROUPS: u32 = 32_768;
/// Largest group count the agent accepts (256 bytes each, per slot).
pub const MAX_DIR8_GROUPS: u32 = 1 << 22;
/// IPv6 table entries per slot by default: prefixes and the markers the length search
/// needs (see [`v6`]). The table has twice as many places, at 24 bytes each. The agent
/// sizes the table to the policy it starts with.
pub const DEFAULT_V6_ENTRIES: u32 = 1 << 16;
/// Largest IPv6 entry count per slot the agent accepts.
pub const MAX_V6_ENTRIES: u32 = 1 << 24;
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
/// other, then flips [`ACTIVE_SLOT`](map_names::ACTIVE_SLOT). A packet reads the slot
/// once, so it sees one whole policy, never a mixture.
pub const SLOTS: u32 = 2;

/// Names of the maps, shared so the agent looks up exactly what the programs define.
pub mod map_names {
    pub const ACTIVE_SLOT: &str = "ACTIVE_SLOT";
    pub const POLICY: &str = "POLICY";
    pub const REGIONS_V4: &str = "REGIONS_V4";
    pub const REGIONS_V6: &str = "REGIONS_V6";
    pub const EXEMPT_V4: &str = "EXEMPT_V4";
    pub const EXEMPT_V6: &str = "EXEMPT_V6";
    pub const SRC_V4: &str = "SRC_V4";
    pub const SRC_V6: &str = "SRC_V6";
    pub const CGROUP_CLASSES: &str = "CGROUP_CLASSES";
    pub const COUNTERS: &str = "COUNTERS";
    pub const STATS: &str = "STATS";
    pub const EVENTS: &str = "EVENTS";
    pub const RATE_LIMIT: &str = "RATE_LIMIT";
    pub const DIR24: &str = "DIR24";
    pub const DIR8: &str = "DIR8";
    pub const COUNTER_CACHE: &str = "COUNTER_CACHE";
    pub const V6_LENGTHS: &str = "V6_LENGTHS";
    pub const ALL: [&str; 15] = [
        COUNTER_CACHE,
        ACTIVE_SLOT,
        POLICY,
        REGIONS_V4,
        REGIONS_V6,
        V6_LENGTHS,
        EXEMPT_V4,
        EXEMPT_V6,
        SRC_V4,
        SRC_V6,
        CGROUP_CLASSES,
        COUNTERS,
        STATS,
        EVENTS,
        RATE_LIMIT,
    ];
}

/// Program names as they appear in the object file.
pub mod program_names {
    pub const TC_EGRESS: &str = "datafence_tc_egress";
    pub const XDP_GATEWAY: &str = "datafence_xdp";
    /// Benchmark baselines and cold-lookup loops; never loaded by the agent.
    pub const BENCH_EMPTY: &str = "bench_empty";
    pub const BENCH_LPM_V4: &str = "bench_lpm_v4";
    pub const BENCH_LPM_V6: &str = "bench_lpm_v6";
    pub const BENCH_COLD_FLOOR: &str = "bench_cold_floor";
    pub const BENCH_COLD_LPM_V4: &str = "bench_cold_lpm_v4";
    pub const BENCH_COLD_LPM_V6: &str = "bench_cold_lpm_v6";
    pub const BENCH_COLD_REGION_V4: &str = "bench_cold_region_v4";
    pub const BENCH_COLD_REGION_V6: &str = "bench_cold_region_v6";
}

/// Read-only globals the loader sets; the verifier prunes the branches they rule out.
pub mod globals {
    /// 1: IPv4 regions in the DIR-24-8 table; 0: in the `REGIONS_V4` LPM trie.
    pub const V4_DIR24: &str = "V4_DIR24";
    /// `DIR8` groups per slot.
    pub const DIR8_GROUPS: &str = "DIR8_GROUPS";
    /// log2 of the `REGIONS_V6` places per slot.
    pub const V6_TABLE_BITS: &str = "V6_TABLE_BITS";
}

/// The hook that judged a packet. Numbered contract: metrics label `hook`, event field
/// `hook`, docs/architecture.md.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    TcEgress = 0,
    Xdp = 1,
}

impl Hook {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::TcEgress),
            1 => Some(Self::Xdp),
            _ => None,
        }
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TcEgress => "tc_egress",
            Self::Xdp => "xdp",
        }
    }
}

/// Outcome for a packet. Numbered contract, like [`Reason`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow = 0,
    /// Dropped: enforce mode.
    Deny = 1,
    /// Would be denied, but the class or policy is in audit mode: passed and reported.
    Audit = 2,
}

impl Verdict {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Allow),
            1 => Some(Self::Deny),
            2 => Some(Self::Audit),
            _ => None,
        }
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
        }
    }
    pub const fn passes(self) -> bool {
        !matches!(self, Self::Deny)
    }
}

/// Why a verdict was reached.
///
/// This is a versioned contract. Values are appended and never renumbered; a retired value
/// stays reserved. Consumers: the metrics label `reason` (agent/src/metrics.rs), the
/// `reason` field of violation events and `explain --json`, and docs/architecture.md.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passes.
    NotIp = 1,
    /// No policy loaded yet: passes, so a host never loses its network before the agent
    /// has written a complete policy.
    NoPolicy = 2,
    /// Destination is loopback or link-local: always allowed.
    ExemptBuiltin = 3,
    /// Destination is in the policy's `exempt` list.
    ExemptPolicy = 4,
    /// The packet matched no data class.
    Unclassified = 5,
    /// The class may reach the destination's region.
    RegionAllowed = 6,
    /// The class may not reach the destination's region.
    RegionDenied = 7,
    /// The destination is in no region and the class's `unknown` rule is `allow`.
    UnknownAllowed = 8,
    /// The destination is in no region and the class's `unknown` rule is `deny`.
    UnknownDenied = 9,
    /// The IP header could not be parsed (truncated, bad version or length) and the packet
    /// could belong to a data class: fail closed.
    MalformedDenied = 10,
    /// The IP header could not be parsed, but no data class could match: passes.
    MalformedAllowed = 11,
    /// An IPv6 routing header with segments left: the packet travels on to destinations
    /// the header names, so it is judged as an unknown destination, and allowed only if
    /// the class's `unknown` rule allows.
    RoutingHeaderAllowed = 12,
    RoutingHeaderDenied = 13,
}

/// One past the highest [`Reason`] value.
pub const REASON_COUNT: u8 = 14;

impl Reason {
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::NotIp,
            2 => Self::NoPolicy,
            3 => Self::ExemptBuiltin,
            4 => Self::ExemptPolicy,
            5 => Self::Unclassified,
            6 => Self::RegionAllowed,
            7 => Self::RegionDenied,
            8 => Self::UnknownAllowed,
            9 => Self::UnknownDenied,
            10 => Self::MalformedDenied,
            11 => Self::MalformedAllowed,
            12 => Self::RoutingHeaderAllowed,
            13 => Self::RoutingHeaderDenied,
            _ => return None,
        })
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotIp => "not_ip",
            Self::NoPolicy => "no_policy",
            Self::ExemptBuiltin => "exempt_builtin",
            Self::ExemptPolicy => "exempt_policy",
            Self::Unclassified => "unclassified",
            Self::RegionAllowed => "region_allowed",
            Self::RegionDenied => "region_denied",
            Self::UnknownAllowed => "unknown_allowed",
            Self::UnknownDenied => "unknown_denied",
            Self::MalformedDenied => "malformed_denied",
            Self::MalformedAllowed => "malformed_allowed",
            Self::RoutingHeaderAllowed => "routing_header_allowed",
            Self::RoutingHeaderDenied => "routing_header_denied",
        }
    }
}

/// Indexes into the per-CPU `STATS` array.
pub mod stat {
    /// A violation event could not be reserved on the ring buffer (agent too slow).
    pub const EVENTS_LOST: u32 = 0;
    /// A violation event was not emitted because the per-CPU rate limit was exhausted.
    pub const EVENTS_SUPPRESSED: u32 = 1;
    /// A counter key could not be inserted because the counter map was full; the
    /// packet was still judged normally.
    pub const COUNTER_MAP_FULL: u32 = 2;
    pub const COUNT: u32 = 3;
}

pub const MODE_ENFORCE: u8 = 0;
pub const MODE_AUDIT: u8 = 1;

/// Which selectors a class lists; a class matches when every listed selector matches.
pub mod selector {
    pub const CGROUP: u32 = 1 << 0;
    pub const MARK: u32 = 1 << 1;
    pub const DSCP: u32 = 1 << 2;
    pub const DST_PORT: u32 = 1 << 3;
    pub const PROTOCOL: u32 = 1 << 4;
    pub const SRC_CIDR: u32 = 1 << 5;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MarkMatch {
    pub value: u32,
    pub mask: u32,
}

/// Inclusive destination-port range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// A compiled data class. All bitmaps are little-endian word arrays: bit `n` lives in word
/// `n / 64`, position `n % 64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassSpec {
    /// [`selector`] bits.
    pub selectors: u32,
    pub mode: u8,
    /// Verdict for destinations in no region: `MODE`-independent allow (0) or deny (1).
    pub unknown_denied: u8,
    pub n_marks: u8,
    pub n_port_ranges: u8,
    /// Region ids this class may reach.
    pub allowed_regions: [u64; 4],
    /// DSCP values (0..=63).
    pub dscp: u64,
    /// IP protocol numbers.
    pub protocols: [u64; 4],
    pub marks: [MarkMatch; MAX_MARKS_PER_CLASS],
    pub port_ranges: [PortRange; MAX_PORT_RANGES_PER_CLASS],
}

impl ClassSpec {
    pub const EMPTY: Self = Self {
        selectors: 0,
        mode: MODE_ENFORCE,
        unknown_denied: 0,
        n_marks: 0,
        n_port_ranges: 0,
        allowed_regions: [0; 4],
        dscp: 0,
        protocols: [0; 4],
        marks: [MarkMatch { value: 0, mask: 0 }; MAX_MARKS_PER_CLASS],
        port_ranges: [PortRange { first: 0, last: 0 }; MAX_PORT_RANGES_PER_CLASS],
    };
}

pub const fn bit_is_set(words: &[u64; 4], n: u8) -> bool {
    words[(n / 64) as usize] & (1u64 << (n % 64)) != 0
}

pub fn set_bit(words: &mut [u64; 4], n: u8) {
    words[(n / 64) as usize] |= 1u64 << (n % 64);
}

/// Header of one policy slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyHeader {
    /// Non-zero once the agent has written a complete policy into this slot.
    pub loaded: u32,
    pub n_classes: u32,
    /// Union of all classes' [`selector`] bits, so the datapath skips lookups that no class
    /// could use (the cgroup walk above all).
    pub selectors_in_use: u32,
    /// Violation events allowed per second per CPU, and the burst above that.
    pub events_per_sec: u32,
    pub events_burst: u32,
    /// Increments with every policy the agent writes; reported in events.
    pub generation: u32,
    /// Prefixes in the slot's exemption tables, so packets skip an empty table's lookup.
    pub exempt_v4: u32,
    pub exempt_v6: u32,
    /// Seed of the slot's IPv6 table hash, and how many entries a lookup scans at most.
    pub v6_seed: u32,
    pub v6_scan: u32,
}

/// One policy slot: the value type of the `POLICY` array (index = slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub header: PolicyHeader,
    pub classes: [ClassSpec; MAX_CLASSES],
}

impl Policy {
    pub const EMPTY: Self = Self {
        header: PolicyHeader {
            loaded: 0,
            n_classes: 0,
            selectors_in_use: 0,
            events_per_sec: 0,
            events_burst: 0,
            generation: 0,
            exempt_v4: 0,
            exempt_v6: 0,
            v6_seed: 0,
            v6_scan: 0,
        },
        classes: [ClassSpec::EMPTY; MAX_CLASSES],
    };
}

/// LPM key data for IPv4 tables: the slot, then the address, both in network byte order.
/// The slot is part of the key so both slots share one trie, and its 32 bits are always
/// matched in full (`prefix_len` = 32 + the prefix's own length).
pub type LpmDataV4 = [u8; 8];
pub type LpmDataV6 = [u8; 20];
pub const SLOT_PREFIX_BITS: u32 = 32;

pub const fn lpm_data_v4(slot: u32, addr: [u8; 4]) -> LpmDataV4 {
    let s = slot.to_be_bytes();
    [s[0], s[1], s[2], s[3], addr[0], addr[1], addr[2], addr[3]]
}

pub fn lpm_data_v6(slot: u32, addr: [u8; 16]) -> LpmDataV6 {
    let mut d = [0u8; 20];
    d[..4].copy_from_slice(&slot.to_be_bytes());
    d[4..].copy_from_slice(&addr);
    d
}

/// Value of the region tries.
pub type RegionId = u32;
/// Value of the source-CIDR tries and the cgroup map: a bitmap of class ids.
pub type ClassMask = u32;
const _: () = assert!(MAX_CLASSES <= ClassMask::BITS as usize);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    pub cgroup_id: u64,
    pub slot: u32,
    pub _pad: u32,
}

/// Key of the per-CPU counter hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct CounterKey {
    pub ifindex: u32,
    pub region: u16,
    pub class: u8,
    pub verdict: u8,
    pub reason: u8,
    pub hook: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

impl CounterKey {
    /// The key's place in a CPU's counter cache: a multiplicative hash of its fields.
    #[inline(always)]
    pub fn cache_slot(&self) -> u32 {
        let a = self.ifindex.wrapping_mul(0x9e37_79b1);
        let b =
            (u32::from(self.region) << 16 | u32::from(self.class) << 8 | u32::from(self.reason))
                .wrapping_mul(0x85eb_ca6b);
        let c = u32::from(self.verdict) << 2 | u32::from(self.hook);
        ((a ^ b ^ c.wrapping_mul(0xc2b2_ae35)) >> 24) & (COUNTER_CACHE_SLOTS - 1)
    }
}

/// One place of a CPU's counter cache. `claimed` is written after `key`, and sits first
/// so that a reader copying the value front to back never pairs a claim with a key that
/// is not yet written.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CachedCounter {
    pub claimed: u32,
    pub key: CounterKey,
    pub value: CounterValue,
}

/// Per-CPU token bucket for violation events.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateLimitState {
    pub last_refill_ns: u64,
    pub tokens: u64,
}

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// A deny or audit verdict, as written to the ring buffer. IPv4 addresses sit in the
/// first four bytes of the address fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViolationEvent {
    pub timestamp_ns: u64,
    pub cgroup_id: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub ifindex: u32,
    pub packet_len: u32,
    pub policy_generation: u32,
    pub region: u16,
    pub class: u8,
    pub verdict: u8,
    pub reason: u8,
    pub hook: u8,
    pub family: u8,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

// The layouts are read by both sides; any change here is an ABI change.
const _: () = assert!(core::mem::size_of::<MarkMatch>() == 8);
const _: () = assert!(core::mem::size_of::<PortRange>() == 4);
const _: () = assert!(core::mem::size_of::<ClassSpec>() == 208);
const _: () = assert!(core::mem::size_of::<PolicyHeader>() == 40);
const _: () = assert!(core::mem::size_of::<Policy>() == 40 + 16 * 208);
const _: () = assert!(core::mem::size_of::<CgroupKey>() == 16);
const _: () = assert!(core::mem::size_of::<CounterKey>() == 12);
const _: () = assert!(core::mem::size_of::<CounterValue>() == 16);
const _: () = assert!(core::mem::size_of::<CachedCounter>() == 32);
const _: () = assert!(COUNTER_CACHE_SLOTS.is_power_of_two() && COUNTER_CACHE_SLOTS <= 256);
const _: () = assert!(core::mem::size_of::<RateLimitState>() == 16);
const _: () = assert!(core::mem::size_of::<ViolationEvent>() == 72);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all these are repr(C), contain only integers and arrays of integers, and
    // have no implicit padding (checked by the size assertions above).
    unsafe impl aya::Pod for ClassSpec {}
    unsafe impl aya::Pod for PolicyHeader {}
    unsafe impl aya::Pod for Policy {}
    unsafe impl aya::Pod for CgroupKey {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for CachedCounter {}
    unsafe impl aya::Pod for RateLimitState {}
    unsafe impl aya::Pod for ViolationEvent {}
    unsafe impl aya::Pod for crate::v6::V6LengthNode {}
}

impl ViolationEvent {
    /// Decodes an event from ring-buffer bytes. Returns `None` when the record is too
    /// short, which would mean the datapath and agent disagree on the ABI.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: ViolationEvent is plain old data with no invalid bit patterns, and the
        // length was checked; read_unaligned copes with any alignment of the ring record.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}
