//! The `#[repr(C)]` types the datapath and the agent both read: policy slots, map keys
//! and values, and violation events. Any layout change here is an ABI change.

use crate::{
    COUNTER_CACHE_SLOTS, MAX_CLASSES, MAX_MARKS_PER_CLASS, MAX_NAT64_PREFIXES,
    MAX_PORT_RANGES_PER_CLASS, MODE_ENFORCE,
};

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

/// Which selectors a class lists; a class matches when every listed selector matches.
pub mod selector {
    pub const CGROUP: u32 = 1 << 0;
    pub const MARK: u32 = 1 << 1;
    pub const DSCP: u32 = 1 << 2;
    pub const DST_PORT: u32 = 1 << 3;
    pub const PROTOCOL: u32 = 1 << 4;
    pub const SRC_CIDR: u32 = 1 << 5;
}

/// Selector kinds, rounded up to a power of two so that an index is bounded by a mask.
pub const SELECTOR_KINDS: usize = 8;

/// A compiled data class. All bitmaps are little-endian word arrays: bit `n` lives in word
/// `n / 64`, position `n % 64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassSpec {
    /// [`selector`](crate::selector) bits.
    pub selectors: u32,
    pub mode: u8,
    /// Verdict for destinations in no region: `MODE`-independent allow (0) or deny (1).
    pub unknown_denied: u8,
    pub n_marks: u8,
    pub n_port_ranges: u8,
    /// 1 when some destination is denied to this class: a region it may not reach, or
    /// destinations in no region under `unknown: deny`. A packet whose IPv6 routing header
    /// still has segments to visit is then denied, since the datapath does not look the
    /// segments up (see [`judge`](crate::decide::judge)).
    pub some_destination_denied: u8,
    pub _pad: [u8; 7],
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
        some_destination_denied: 0,
        _pad: [0; 7],
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
    /// Union of all classes' [`selector`](crate::selector) bits, so the datapath skips
    /// lookups that no class could use (the cgroup walk above all).
    pub selectors_in_use: u32,
    /// Violation events allowed per second per CPU, and the burst above that.
    pub events_per_sec: u32,
    pub events_burst: u32,
    /// Increments with every policy the agent writes; reported in events.
    pub generation: u32,
    /// Prefixes in the slot's exemption tables, so packets skip an empty table's lookup.
    pub exempt_v4: u32,
    pub exempt_v6: u32,
    /// Unused; keeps the header's size.
    pub _reserved: [u32; 2],
    /// The NAT64 `/96` prefixes the policy declares (beside the well-known one), each as
    /// its first 12 bytes read as three native-endian words, as the datapath compares
    /// them; the first `n_nat64` are in use.
    pub n_nat64: u32,
    pub nat64: [[u32; 3]; MAX_NAT64_PREFIXES],
    /// The [`host_essential`](crate::host_essential) kinds of the host's own link
    /// traffic that pass before any class is consulted.
    pub host_essentials: u32,
}

/// A mark selector entry of the [`ClassIndex`]: the classes whose mark list holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexedMark {
    pub value: u32,
    pub mask: u32,
    pub classes: ClassMask,
}

/// A port range of the [`ClassIndex`]: the classes whose port list holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexedPortRange {
    pub first: u16,
    pub last: u16,
    pub classes: ClassMask,
}

pub const MAX_INDEXED_MARKS: usize = MAX_CLASSES * MAX_MARKS_PER_CLASS;
pub const MAX_INDEXED_PORT_RANGES: usize = MAX_CLASSES * MAX_PORT_RANGES_PER_CLASS;

/// The classes turned inside out: for each selector and value, the set of classes it
/// matches. Classification is then a few lookups and ANDs of class bitmaps, one per
/// selector, whatever the number of classes, instead of a branch per class and selector
/// (see `decide::classify`). Derived from the classes by [`Policy::build_index`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassIndex {
    /// Classes that exist and list at least one selector: an empty `match` never matches.
    pub live: ClassMask,
    /// For each [`selector`](crate::selector) bit position, the classes that list that selector.
    pub uses: [ClassMask; SELECTOR_KINDS],
    pub n_marks: u32,
    pub n_port_ranges: u32,
    /// Keeps [`Policy`] free of trailing padding.
    pub _pad: u32,
    pub dscp: [ClassMask; 64],
    pub protocol: [ClassMask; 256],
    pub marks: [IndexedMark; MAX_INDEXED_MARKS],
    pub port_ranges: [IndexedPortRange; MAX_INDEXED_PORT_RANGES],
}

impl ClassIndex {
    pub const EMPTY: Self = Self {
        live: 0,
        uses: [0; SELECTOR_KINDS],
        n_marks: 0,
        n_port_ranges: 0,
        _pad: 0,
        dscp: [0; 64],
        protocol: [0; 256],
        marks: [IndexedMark {
            value: 0,
            mask: 0,
            classes: 0,
        }; MAX_INDEXED_MARKS],
        port_ranges: [IndexedPortRange {
            first: 0,
            last: 0,
            classes: 0,
        }; MAX_INDEXED_PORT_RANGES],
    };

    /// The classes that list `selector` (one [`selector`](crate::selector) bit).
    #[inline(always)]
    pub const fn using(&self, selector: u32) -> ClassMask {
        self.uses[(selector.trailing_zeros() as usize) & (SELECTOR_KINDS - 1)]
    }
}

/// One policy slot: the value type of the `POLICY` array (index = slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub header: PolicyHeader,
    pub classes: [ClassSpec; MAX_CLASSES],
    /// Derived from `classes`; what the datapath classifies with.
    pub index: ClassIndex,
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
            _reserved: [0; 2],
            n_nat64: 0,
            nat64: [[0; 3]; MAX_NAT64_PREFIXES],
            host_essentials: 0,
        },
        classes: [ClassSpec::EMPTY; MAX_CLASSES],
        index: ClassIndex::EMPTY,
    };

    /// Derives [`Self::index`] from the first `header.n_classes` classes. Call it after
    /// the classes change, before the policy is written or classified with.
    pub fn build_index(&mut self) {
        let mut ix = ClassIndex::EMPTY;
        let n = (self.header.n_classes as usize).min(MAX_CLASSES);
        for (id, class) in self.classes[..n].iter().enumerate() {
            let bit: ClassMask = 1 << id;
            if class.selectors == 0 {
                continue;
            }
            ix.live |= bit;
            for (kind, classes) in ix.uses.iter_mut().enumerate() {
                if class.selectors & (1 << kind) != 0 {
                    *classes |= bit;
                }
            }
            for (value, classes) in ix.dscp.iter_mut().enumerate() {
                if class.dscp & (1u64 << value) != 0 {
                    *classes |= bit;
                }
            }
            for (protocol, classes) in ix.protocol.iter_mut().enumerate() {
                if bit_is_set(&class.protocols, protocol as u8) {
                    *classes |= bit;
                }
            }
            for m in &class.marks[..usize::from(class.n_marks).min(MAX_MARKS_PER_CLASS)] {
                let i = ix.n_marks as usize;
                ix.marks[i] = IndexedMark {
                    value: m.value,
                    mask: m.mask,
                    classes: bit,
                };
                ix.n_marks += 1;
            }
            for r in &class.port_ranges
                [..usize::from(class.n_port_ranges).min(MAX_PORT_RANGES_PER_CLASS)]
            {
                let i = ix.n_port_ranges as usize;
                ix.port_ranges[i] = IndexedPortRange {
                    first: r.first,
                    last: r.last,
                    classes: bit,
                };
                ix.n_port_ranges += 1;
            }
        }
        self.index = ix;
    }
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

/// The datagram a fragment belongs to, as the kernel reassembles it: IPv4 by source,
/// destination, identification and protocol; IPv6 by source, destination and
/// identification (a later fragment's next-header field is not trusted, and Linux does not
/// key by it). Key of `FRAGMENTS`.
///
/// Also by who sent it, through which hook: the sending socket's cgroup, the mark and the
/// DSCP, which the kernel copies from a datagram to each of its fragments. A later
/// fragment carries no ports, but these it does carry, and a class may select by them: a
/// sender outside a class could otherwise send a first fragment that passes, and one
/// inside it later fragments of the same datagram that pass with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The sending socket's cgroup id; 0 with no socket (XDP, forwarded packets).
    pub sender_cgroup: u64,
    pub id: u32,
    pub mark: u32,
    pub family: u8,
    pub protocol: u8,
    /// The [`Hook`](crate::Hook) that judged the fragment.
    pub hook: u8,
    pub dscp: u8,
    pub _pad: [u8; 4],
}

/// One of the host's own unicast addresses, as the agent keeps them in `HOST_ADDRESSES`:
/// IPv4 in the first four bytes of `addr`, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostAddress {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

impl HostAddress {
    /// The key for `addr` of `family` ([`crate::FAMILY_V4`] or [`crate::FAMILY_V6`]).
    #[inline(always)]
    pub const fn new(family: u8, addr: [u8; 16]) -> Self {
        Self {
            family,
            _pad: [0; 3],
            addr,
        }
    }
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
    /// Zero for what the programs count; [`CounterKey::CARRIED`] for what the agent
    /// carried over from a datapath it retired (its tables outgrown). The programs never
    /// count under such a key, so the agent writes it without racing them, and the
    /// metrics add it to the others of the same labels. Two bytes, as the padding it
    /// replaced, so the programs' code did not change.
    pub origin: [u8; 2],
}

impl CounterKey {
    /// [`CounterKey::origin`] of the counts carried over from a retired datapath.
    pub const CARRIED: [u8; 2] = [1, 0];
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// Sums of counters: over CPUs, over the places a key is counted, over carried counts.
#[cfg(feature = "user")]
impl core::ops::AddAssign for CounterValue {
    fn add_assign(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
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
    /// The socket's network namespace (`SO_NETNS_COOKIE`). This and the fields after it
    /// are written by the socket ring's programs only: for a packet hook they hold
    /// whatever the ring held there, and mean nothing.
    pub netns_cookie: u64,
    /// The calling process (its thread group id) and its name.
    pub pid: u32,
    pub comm: [u8; 16],
    pub _pad: u32,
}

// The layouts are read by both sides; any change here is an ABI change.
const _: () = assert!(core::mem::size_of::<MarkMatch>() == 8);
const _: () = assert!(core::mem::size_of::<PortRange>() == 4);
const _: () = assert!(core::mem::size_of::<ClassSpec>() == 216);
const _: () = assert!(core::mem::size_of::<PolicyHeader>() == 96);
const _: () = assert!(core::mem::size_of::<ClassIndex>() == 4912);
const _: () = assert!(core::mem::size_of::<Policy>() == 96 + 16 * 216 + 4912);
const _: () = assert!(core::mem::size_of::<CgroupKey>() == 16);
const _: () = assert!(core::mem::size_of::<HostAddress>() == 20);
// No implicit padding: the whole key is hashed. (Pinned with one build's stages, so not
// read across builds.)
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 56);
const _: () = assert!(core::mem::size_of::<CounterKey>() == 12);
const _: () = assert!(core::mem::size_of::<CounterValue>() == 16);
const _: () = assert!(core::mem::size_of::<CachedCounter>() == 32);
const _: () = assert!(COUNTER_CACHE_SLOTS.is_power_of_two() && COUNTER_CACHE_SLOTS <= 256);
const _: () = assert!(core::mem::size_of::<RateLimitState>() == 16);
const _: () = assert!(core::mem::size_of::<ViolationEvent>() == VIOLATION_EVENT_BYTES);

/// The size of a [`ViolationEvent`] before it carried the process and namespace: what a
/// previous build's programs still write into a pinned ring during an upgrade.
pub const VIOLATION_EVENT_PACKET_BYTES: usize = 72;
const VIOLATION_EVENT_BYTES: usize = 104;

#[cfg(feature = "user")]
mod pod {
    use super::{
        CachedCounter, CgroupKey, ClassSpec, CounterKey, CounterValue, HostAddress, Policy,
        PolicyHeader, RateLimitState, ViolationEvent,
    };
    // SAFETY: all these are repr(C), contain only integers and arrays of integers, and
    // have no implicit padding (checked by the size assertions above).
    unsafe impl aya::Pod for ClassSpec {}
    // SAFETY: as for ClassSpec.
    unsafe impl aya::Pod for PolicyHeader {}
    // SAFETY: as for ClassSpec.
    unsafe impl aya::Pod for Policy {}
    // SAFETY: as for ClassSpec.
    unsafe impl aya::Pod for CgroupKey {}
    // SAFETY: as for ClassSpec.
    unsafe impl aya::Pod for CounterKey {}
    // SAFETY: as for ClassSpec.
    unsafe impl aya::Pod for HostAddress {}
    // SAFETY: as for ClassSpec.
    unsafe impl aya::Pod for CounterValue {}
    // SAFETY: as for ClassSpec.
    unsafe impl aya::Pod for CachedCounter {}
    // SAFETY: as for ClassSpec.
    unsafe impl aya::Pod for RateLimitState {}
    // SAFETY: as for ClassSpec.
    unsafe impl aya::Pod for ViolationEvent {}
}

impl ViolationEvent {
    /// Decodes an event from ring-buffer bytes. A record of the size before the process
    /// fields ([`VIOLATION_EVENT_PACKET_BYTES`]) reads with them zero. Returns `None`
    /// when the record is shorter, which would mean the datapath and agent disagree on
    /// the ABI.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < VIOLATION_EVENT_PACKET_BYTES {
            return None;
        }
        let mut whole = [0u8; VIOLATION_EVENT_BYTES];
        let n = core::cmp::min(bytes.len(), VIOLATION_EVENT_BYTES);
        whole[..n].copy_from_slice(&bytes[..n]);
        // SAFETY: ViolationEvent is plain old data with no invalid bit patterns, and
        // `whole` is exactly its size; read_unaligned copes with the array's alignment.
        Some(unsafe { core::ptr::read_unaligned(whole.as_ptr().cast::<Self>()) })
    }
}
