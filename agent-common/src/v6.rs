//! The IPv6 region table: the IPv4 range table ([`v4`](crate::v4)) over 128-bit
//! addresses, with each chunk's ranges laid out as a static B-tree of cache-line nodes.
//!
//! The top `bits` bits of an address pick a chunk; `V6_INDEX[chunk]` and
//! `V6_INDEX[chunk + 1]` bound the chunk's run of entries in `V6_RANGES`, a whole number
//! of nodes. A node is [`V6_NODE_ENTRIES`] entries, 64 bytes, one cache line; node `k`'s
//! children are nodes `k * 5 + 1 ..= k * 5 + 5`, and an in-order walk of the tree visits
//! the chunk's ranges in address order. A search reads one node per level, so a cold
//! lookup misses the cache about log5 rather than log2 times: at a million prefixes a
//! binary search over 16-byte entries took about twelve reads of which all but the last
//! two missed. A run is padded to whole nodes by repeating its last range, which a search
//! may end on as well as the original.
//!
//! A range is one 16-byte entry `[high, low]`: the 128-bit value `start << 8 | region`.
//! Shifting drops the top 8 bits of the start, which are chunk bits (there are at least
//! [`V6_MIN_INDEX_BITS`]), so within a chunk the order of entries is the order of starts,
//! and every prefix length up to /128 keeps its boundary. Comparing two `u64` words, with
//! shifts by constants only, keeps 128-bit arithmetic off the datapath.

use crate::{REGION_NONE, RegionId, opaque::opaque};

/// Fewest and most index bits the agent builds. Fewer than IPv4's: a B-tree search costs
/// little more for a long run than for a short one, and a chunk in a region takes a node.
pub const V6_MIN_INDEX_BITS: u32 = 10;
pub const V6_MAX_INDEX_BITS: u32 = 20;
/// Range entries in a node: one 64-byte cache line.
pub const V6_NODE_ENTRIES: u32 = 4;
/// Most levels a search reads: a tree of [`MAX_V6_SLOT_RANGES`](crate::MAX_V6_SLOT_RANGES)
/// entries, 2^22 nodes of fan-out 5, is 11 levels deep.
pub const V6_MAX_LEVELS: u32 = 11;
/// Bits of a range entry's low word that hold the region.
const REGION_BITS: u32 = 8;
const REGION_MASK: u64 = (1 << REGION_BITS) - 1;
const FAN_OUT: u32 = V6_NODE_ENTRIES + 1;

/// One range entry: the high and low words of `start << 8 | region`.
pub type V6Range = [u64; 2];
/// One node of a chunk's B-tree, and one value of the range array.
pub type V6Node = [V6Range; V6_NODE_ENTRIES as usize];

/// The range entry of a range that starts at `start` (an address as a big-endian
/// number) in `region`.
#[inline(always)]
pub const fn v6_range(start: u128, region: RegionId) -> V6Range {
    let value = (start << REGION_BITS) | (region as u128 & REGION_MASK as u128);
    [(value >> 64) as u64, value as u64]
}

/// The chunk of an address (its two big-endian words) for `bits` index bits.
#[inline(always)]
pub const fn v6_chunk(high: u64, bits: u32) -> u32 {
    (high >> (64 - bits)) as u32
}

/// The children of node `k` are `child(k, 0..=V6_NODE_ENTRIES)`.
#[inline(always)]
pub const fn v6_child(node: u32, branch: u32) -> u32 {
    node * FAN_OUT + branch + 1
}

/// The region of `addr` in one slot's table of `bits` index bits. `index(i)` reads index
/// entry `i` of the slot and `node(i)` node `i`, range entries `4 i .. 4 i + 4`; the
/// datapath passes map reads, the agent and the tests in-memory slices. A read that
/// fails gives `REGION_NONE`, and so does a chunk of no nodes (its bounds equal).
///
/// The search reads one node per level of the chunk's tree, at most [`V6_MAX_LEVELS`],
/// without a branch on a comparison: it stops where the tree ends, a branch on the
/// tree's shape, or on a failed read. The verifier walks the rest of the program once per
/// distinct state a way out of the search leaves, and the region found is the only value
/// that lives on, with the same bounds at every level, so all these exits count as one;
/// a search that stopped on a comparison gave Linux 6.1 over a million instructions.
#[inline(always)]
pub fn v6_lookup(
    addr: &[u8; 16],
    bits: u32,
    index: impl Fn(u32) -> Option<u32>,
    node: impl Fn(u32) -> Option<V6Node>,
) -> RegionId {
    let none = RegionId::from(REGION_NONE);
    let bits = bits.clamp(V6_MIN_INDEX_BITS, V6_MAX_INDEX_BITS);
    let high = u64::from_be_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    let low = u64::from_be_bytes([
        addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
    ]);
    let chunk = v6_chunk(high, bits);
    let (Some(first), Some(end)) = (index(chunk), index(chunk + 1)) else {
        return none;
    };
    // Wrapping: an index whose bounds are out of order gives a huge node count, and the
    // reads past the map's end fail.
    let nodes = end.wrapping_sub(first) / V6_NODE_ENTRIES;
    let root = first / V6_NODE_ENTRIES;
    // The last range whose start is at or below the address: compare with the address
    // followed by the largest region, so a range starting at the address counts.
    let key_high = (high << REGION_BITS) | (low >> (64 - REGION_BITS));
    let key_low = (low << REGION_BITS) | REGION_MASK;
    // All ones when the entry is at or below the key, else zero.
    let at_or_below = |[h, l]: V6Range| -> u64 { mask(1 ^ below_128(key_high, key_low, h, l)) };
    let mut region = u64::from(REGION_NONE);
    // The node read next, counted in the slot, not from the chunk's root: a number the
    // verifier cannot know. From the root it would be one constant per path through
    // the levels, and no two paths' states would match.
    let mut pos = root;
    let mut level = 0;
    while level < V6_MAX_LEVELS {
        let at = pos.wrapping_sub(root);
        // Below the tree: the search is done. A branch on the tree's shape, not on the
        // key, and every such exit leaves the same state but the first level's.
        if at >= nodes {
            break;
        }
        // A failed read ends the search: every such exit leaves the same state, so the
        // verifier walks the rest of the program once for all of them.
        let Some(entries) = node(root.wrapping_add(at)) else {
            return none;
        };
        // Entries of a node are in order, so those at or below the key come first.
        let le = [
            at_or_below(entries[0]),
            at_or_below(entries[1]),
            at_or_below(entries[2]),
            at_or_below(entries[3]),
        ];
        // Masks meet constants only in XOR: Linux 6.12 forks its walk in two at an AND
        // or OR of a constant into a value that may be 0 or all ones.
        let count = 0u64.wrapping_sub(
            le[0]
                .wrapping_add(le[1])
                .wrapping_add(le[2])
                .wrapping_add(le[3]),
        );
        // The last entry at or below the key is the best range yet: deeper ones lie
        // between it and the next.
        let found = (entries[0][1] & le[0] & !le[1])
            | (entries[1][1] & le[1] & !le[2])
            | (entries[2][1] & le[2] & !le[3])
            | (entries[3][1] & le[3]);
        // None at or below the key when the first is above it: keep the best so far.
        let keep = !le[0];
        region = (region & keep) | (found & REGION_MASK & le[0]);
        pos = root.wrapping_add(v6_child(at, count as u32));
        level += 1;
    }
    region as RegionId
}

/// 1 when `a < b`, else 0: the borrow of `a - b`, computed without a branch.
#[inline(always)]
fn below(a: u64, b: u64) -> u64 {
    borrow(a, b, a.wrapping_sub(b))
}

/// 1 when the 128-bit `a_high:a_low` is below `b_high:b_low`, else 0: the borrow out
/// of the high words' subtraction, with the low words' borrow in.
#[inline(always)]
fn below_128(a_high: u64, a_low: u64, b_high: u64, b_low: u64) -> u64 {
    let borrow_in = below(a_low, b_low);
    borrow(
        a_high,
        b_high,
        a_high.wrapping_sub(b_high).wrapping_sub(borrow_in),
    )
}

/// All ones for 1, zero for 0, opaque: LLVM would make a mask of a bit it knows into
/// a branch.
#[inline(always)]
fn mask(bit: u64) -> u64 {
    opaque(0u64.wrapping_sub(bit))
}

/// The borrow out of `difference = a - b - borrow in` (Hacker's Delight 2-13). Opaque
/// before the shift, or LLVM sees the comparison, and after it, or LLVM sees a sign
/// test; either comes back as a branch.
#[inline(always)]
fn borrow(a: u64, b: u64, difference: u64) -> u64 {
    opaque(opaque((!a & b) | (!(a ^ b) & difference)) >> 63)
}

const _: () = assert!(crate::MAX_REGIONS as u64 <= REGION_MASK);
const _: () = assert!(V6_MIN_INDEX_BITS >= REGION_BITS);
/// The levels hold a slot's largest tree: 1 + 5 + ... + 5^10 nodes.
const _: () = {
    let mut nodes = 0u64;
    let mut width = 1u64;
    let mut level = 0;
    while level < V6_MAX_LEVELS {
        nodes += width;
        width *= FAN_OUT as u64;
        level += 1;
    }
    assert!(nodes * V6_NODE_ENTRIES as u64 >= crate::MAX_V6_SLOT_RANGES as u64);
};
