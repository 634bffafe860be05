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
//! A range is one 16-byte entry: the 126-bit value `start << 8 | region`, cut into two
//! 63-bit words `[high, low]`. Shifting and cutting drop the top 10 bits of the start,
//! which are chunk bits (there are at least [`V6_MIN_INDEX_BITS`]), so within a chunk the
//! order of entries is the order of starts, and every prefix length up to /128 keeps its
//! boundary. With 63-bit words, a difference of two words, less a borrow, stays within a
//! signed 64-bit word, so its sign is the comparison: a 126-bit compare is three
//! subtractions and two shifts, by constants only, which keeps 128-bit arithmetic and
//! branches off the datapath.

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
/// Bits of each word of a range entry: one short of the register, so the sign of a
/// difference of two words tells which is larger.
const WORD_BITS: u32 = 63;
const WORD_MASK: u64 = (1 << WORD_BITS) - 1;
/// Start bits an entry drops: the region's room, and the two bits the words give up.
const DROPPED_BITS: u32 = 128 - (2 * WORD_BITS - REGION_BITS);
/// Where an address's bits for the high word start: below them are the low word's.
const HIGH_WORD_SHIFT: u32 = WORD_BITS - REGION_BITS;
const FAN_OUT: u32 = V6_NODE_ENTRIES + 1;

/// One range entry: the high and low 63-bit words of `start << 8 | region`.
pub type V6Range = [u64; 2];
/// One node of a chunk's B-tree, and one value of the range array.
pub type V6Node = [V6Range; V6_NODE_ENTRIES as usize];

/// The range entry of a range that starts at `start` (an address as a big-endian
/// number) in `region`.
#[inline(always)]
pub const fn v6_range(start: u128, region: RegionId) -> V6Range {
    let value = (start << REGION_BITS) | (region as u128 & REGION_MASK as u128);
    [
        (value >> WORD_BITS) as u64 & WORD_MASK,
        value as u64 & WORD_MASK,
    ]
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
/// distinct state a way out of the search leaves, and the region found (an entry's low
/// word, masked on return) is the only value that lives on, with the same bounds (none)
/// at every level, so all these exits count as one;
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
    // followed by the largest region, so a range starting at the address counts, cut
    // into words as an entry is.
    let key_high = ((high << (64 - HIGH_WORD_SHIFT)) | (low >> HIGH_WORD_SHIFT)) & WORD_MASK;
    let key_low = ((low << REGION_BITS) | REGION_MASK) & WORD_MASK;
    // All ones when the entry is above the key, else zero. Both words of each side are
    // below 2^63, so each difference, the high words' less the borrow too, lies within
    // -2^63..2^63 and keeps its sign: the low words' is the borrow into the high words',
    // whose sign is the answer. Opaque after each shift: LLVM reads a
    // shift of a sign as a comparison, and would make the mask a branch.
    let above = |[h, l]: V6Range| -> u64 {
        let borrow = opaque(key_low.wrapping_sub(l) >> 63);
        let difference = key_high.wrapping_sub(h).wrapping_sub(borrow);
        opaque((difference as i64 >> 63) as u64)
    };
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
        // Entries of a node are in order, so those at or below the key come first, and
        // the last of them is the best range yet: deeper ones lie between it and the
        // next. Each one at or below the key takes the region's place and counts
        // towards the branch. Masks meet constants only in XOR: Linux 6.12 forks its walk
        // in two at an AND or OR of a constant into a value that may be 0 or all ones.
        let mut count = u64::from(V6_NODE_ENTRIES);
        let mut i = 0;
        while i < V6_NODE_ENTRIES as usize {
            let is_above = above(entries[i]);
            count = count.wrapping_add(is_above);
            region ^= (region ^ entries[i][1]) & (is_above ^ u64::MAX);
            i += 1;
        }
        pos = root.wrapping_add(v6_child(at, count as u32));
        level += 1;
    }
    (region & REGION_MASK) as RegionId
}

const _: () = assert!(crate::MAX_REGIONS as u64 <= REGION_MASK);
const _: () = assert!(V6_MIN_INDEX_BITS >= DROPPED_BITS);
const _: () = assert!(DROPPED_BITS == 10);
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
