//! The IPv6 region table: per policy slot, one hash of prefixes keyed by (length, masked address),
//! searched by binary search over the prefix lengths the policy uses (Waldvogel et al.,
//! "Scalable high speed IP routing lookups", SIGCOMM 1997).
//!
//! A kernel LPM trie walks one node per distinguishing bit, and at a million prefixes
//! each node is a cache miss. Here a lookup probes at most [`V6_MAX_PROBES`] hash
//! buckets, whatever the number of prefixes. A probe that hits means "a prefix at least
//! this long may match: search longer"; a miss means "search shorter". For the hits to be
//! right, every prefix leaves a *marker* at each shorter length its search passes
//! through, and every entry (prefix or marker) stores its best matching prefix, so the
//! search never backtracks: the answer is the value of the last hit.
//!
//! The search order is a binary tree over the lengths, stored per slot in
//! `V6_LENGTHS` and read from the map at each step. That keeps the tree out of the
//! program's constants, and keeps the verifier's view of each step the same, so the
//! bounded loop is verified in a few passes rather than once per path.
//!
//! The hash itself is an open-addressed table in a memory-mappable array (`REGIONS_V6`),
//! which the agent fills with plain memory writes, like the IPv4 range table. A probe
//! reads one 24-byte entry and, rarely, its neighbours: one cache miss, where a kernel
//! hash map costs a bucket and an element. Robin Hood insertion keeps every entry within
//! a few places of its home, and the slot's header records how far a lookup must scan.

use crate::RegionId;

/// What a probe looks for: a prefix length, and the address as two big-endian-read
/// halves masked to that length, so the key is the same however the address was read.
/// Each slot has a table of its own, so the slot is not part of the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct V6PrefixKey {
    pub len: u32,
    pub hi: u64,
    pub lo: u64,
}

/// One step of the length search. `on_hit` and `on_miss` index the next node of the same
/// slot, or are [`V6_NODE_END`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct V6LengthNode {
    /// Prefix length probed at this step; [`V6_NO_LENGTH`] when the table is empty.
    pub len: u8,
    pub on_hit: u8,
    pub on_miss: u8,
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<V6LengthNode>() == 4);

/// Nodes per slot: one per possible prefix length, /0 to /128.
pub const V6_TREE_NODES: u32 = 129;
/// Depth of a balanced tree of 129 nodes: the most probes a lookup makes.
pub const V6_MAX_PROBES: usize = 8;
pub const V6_NODE_END: u8 = 0xff;
pub const V6_NO_LENGTH: u8 = 0xff;
/// An empty table: the root says there is nothing to probe.
pub const V6_EMPTY_NODE: V6LengthNode = V6LengthNode {
    len: V6_NO_LENGTH,
    on_hit: V6_NODE_END,
    on_miss: V6_NODE_END,
    _pad: 0,
};

/// One entry of the `REGIONS_V6` table: `[hi, lo, meta]`, where `meta` is 0 for an empty
/// entry and otherwise `(len + 1) << 32 | region`.
pub type V6Entry = [u64; 3];
/// Most entries a lookup scans from a key's home. The agent re-seeds the hash until every
/// entry sits this close, and refuses the table if none does.
pub const V6_MAX_SCAN: u32 = 12;
/// The table holds at most half as many entries as it has places, which keeps scans short.
pub const V6_LOAD_DIVISOR: u32 = 2;

/// The `meta` word of an entry.
#[inline(always)]
pub const fn v6_meta(len: u32, region: RegionId) -> u64 {
    ((len as u64 + 1) << 32) | region as u64
}

/// Where a key's scan starts, before masking to the table's size. A 64-bit finaliser
/// (MurmurHash3's fmix64) over the key and the slot's seed.
#[inline(always)]
pub fn v6_hash(key: &V6PrefixKey, seed: u32) -> u64 {
    let mut h = key.hi ^ key.lo.rotate_left(29) ^ (u64::from(key.len) << 56) ^ u64::from(seed);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Looks a key up in one slot's table of `mask + 1` entries. `entry(i)` reads entry `i`
/// of the slot; `scan` is the slot's recorded scan length.
#[inline(always)]
pub fn v6_table_get(
    key: &V6PrefixKey,
    seed: u32,
    mask: u32,
    scan: u32,
    entry: impl Fn(u32) -> Option<V6Entry>,
) -> Option<RegionId> {
    let home = v6_hash(key, seed) as u32;
    let tag = u64::from(key.len) + 1;
    let mut i = 0;
    // Bounded by V6_MAX_SCAN; the slot's own scan length is usually far shorter.
    while i < V6_MAX_SCAN {
        if i >= scan {
            return None;
        }
        let e = entry(home.wrapping_add(i) & mask)?;
        if e[2] == 0 {
            return None;
        }
        if e[0] == key.hi && e[1] == key.lo && e[2] >> 32 == tag {
            return Some(e[2] as RegionId);
        }
        i += 1;
    }
    None
}

/// The address as the two halves a key holds.
#[inline(always)]
pub fn v6_halves(addr: &[u8; 16]) -> (u64, u64) {
    let hi = u64::from_be_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    let lo = u64::from_be_bytes([
        addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
    ]);
    (hi, lo)
}

/// The leading `bits` bits of a 64-bit half (`bits` may be 0 or 64 and over).
#[inline(always)]
fn keep_leading(half: u64, bits: u32) -> u64 {
    if bits == 0 {
        return 0;
    }
    if bits >= 64 {
        return half;
    }
    half & (u64::MAX << (64 - bits))
}

/// The key of the `len`-bit prefix of an address, given as its halves.
#[inline(always)]
pub fn v6_key(len: u32, hi: u64, lo: u64) -> V6PrefixKey {
    V6PrefixKey {
        len,
        hi: keep_leading(hi, len),
        lo: keep_leading(lo, len.saturating_sub(64)),
    }
}

/// Longest-prefix match of `addr` in one slot. `node` reads the slot's search tree and
/// `probe` the slot's hash; the datapath passes map lookups, tests pass in-memory tables.
#[inline(always)]
pub fn v6_search(
    addr: &[u8; 16],
    node: impl Fn(u32) -> Option<V6LengthNode>,
    probe: impl Fn(&V6PrefixKey) -> Option<RegionId>,
) -> RegionId {
    let (hi, lo) = v6_halves(addr);
    let mut best = RegionId::from(crate::REGION_NONE);
    let mut at = 0u32;
    let mut step = 0;
    // Bounded by V6_MAX_PROBES, the depth of the deepest tree the agent builds.
    while step < V6_MAX_PROBES {
        let Some(n) = node(at) else { break };
        if n.len == V6_NO_LENGTH {
            break;
        }
        let next = match probe(&v6_key(u32::from(n.len), hi, lo)) {
            Some(region) => {
                best = region;
                n.on_hit
            }
            None => n.on_miss,
        };
        if next == V6_NODE_END {
            break;
        }
        at = u32::from(next);
        step += 1;
    }
    best
}
