//! The IPv6 region table: the IPv4 range table ([`v4`](crate::v4)) over 128-bit
//! addresses.
//!
//! The top `bits` bits of an address pick a chunk; `V6_INDEX[chunk]` and
//! `V6_INDEX[chunk + 1]` bound the chunk's sorted run of ranges in `V6_RANGES`. A lookup
//! is two neighbouring index reads and a binary search that always ends on a range. Real
//! IPv6 policies are sparse and clustered, so most chunks hold only the range that covers
//! them and the busy ones hold the rest.
//!
//! A range is one 16-byte entry `[high, low]`: the 128-bit value `start << 8 | region`.
//! Shifting drops the top 8 bits of the start, which are chunk bits (there are at least
//! [`V6_MIN_INDEX_BITS`]), so within a chunk the order of entries is the order of starts,
//! and every prefix length up to /128 keeps its boundary. Comparing two `u64` words, with
//! shifts by constants only, keeps 128-bit arithmetic off the datapath.

use crate::{REGION_NONE, RegionId};

/// Fewest and most index bits the agent builds, as for IPv4.
pub const V6_MIN_INDEX_BITS: u32 = 12;
pub const V6_MAX_INDEX_BITS: u32 = 20;
/// Most steps a binary search takes: a slot holds at most
/// [`MAX_V6_SLOT_RANGES`](crate::MAX_V6_SLOT_RANGES) ranges, halved 24 times.
pub const V6_MAX_SEARCH_STEPS: u32 = 24;
/// Bits of a range entry's low word that hold the region.
const REGION_BITS: u32 = 8;
const REGION_MASK: u64 = (1 << REGION_BITS) - 1;

/// One range entry: the high and low words of `start << 8 | region`.
pub type V6Range = [u64; 2];

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

/// The region of `addr` in one slot's table of `bits` index bits. `index(i)` reads index
/// entry `i` of the slot and `range(i)` range entry `i`; the datapath passes map reads,
/// the agent and the tests in-memory slices. A read that fails gives `REGION_NONE`.
///
/// The search always takes [`V6_MAX_SEARCH_STEPS`] steps, without a branch on the
/// comparison and with one exit: the verifier walks the rest of the program once per
/// way out of the search, and a search that could stop at any step gave Linux 6.1 over
/// a million instructions to walk (82,560 this way, fewer than with early exits at 4
/// steps). A step after the run is down to one range reads that range again, from the
/// cache.
#[inline(always)]
pub fn v6_lookup(
    addr: &[u8; 16],
    bits: u32,
    index: impl Fn(u32) -> Option<u32>,
    range: impl Fn(u32) -> Option<V6Range>,
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
    let (Some(mut lo), Some(mut hi)) = (index(chunk), index(chunk + 1)) else {
        return none;
    };
    // The last range whose start is at or below the address: compare with the address
    // followed by the largest region, so a range starting at the address counts.
    let key_high = (high << REGION_BITS) | (low >> (64 - REGION_BITS));
    let key_low = (low << REGION_BITS) | REGION_MASK;
    // 0 once a read has failed; a failed read compares as the smallest entry.
    let mut read_ok = 1u64;
    let mut step = 0;
    while step < V6_MAX_SEARCH_STEPS {
        // Wrapping: an index whose bounds are out of order reads out of range, and fails.
        let mid = lo.wrapping_add(hi.wrapping_sub(lo) / 2);
        let [h, l] = if let Some(entry) = range(mid) {
            entry
        } else {
            read_ok = 0;
            [0, 0]
        };
        let at_or_below = below(h, key_high) | (equal(h, key_high) & (1 ^ below(key_low, l)));
        let take = 0u32.wrapping_sub(at_or_below as u32);
        lo = (mid & take) | (lo & !take);
        hi = (hi & take) | (mid & !take);
        step += 1;
    }
    match range(lo) {
        Some([_, l]) if read_ok != 0 => (l & REGION_MASK) as RegionId,
        _ => none,
    }
}

/// 1 when `a < b`, else 0: the borrow of `a - b`, computed without a branch.
#[inline(always)]
const fn below(a: u64, b: u64) -> u64 {
    ((!a & b) | (!(a ^ b) & a.wrapping_sub(b))) >> 63
}

/// 1 when `a == b`, else 0, without a branch.
#[inline(always)]
const fn equal(a: u64, b: u64) -> u64 {
    let x = a ^ b;
    1 ^ ((x | x.wrapping_neg()) >> 63)
}

const _: () = assert!(crate::MAX_REGIONS as u64 <= REGION_MASK);
const _: () = assert!(V6_MIN_INDEX_BITS >= REGION_BITS);
const _: () = assert!(1u64 << V6_MAX_SEARCH_STEPS >= crate::MAX_V6_SLOT_RANGES as u64);
