//! The IPv4 region table: a range table with a direct index on the top bits, after DXR
//! (Zec, Rizzo and Mikuc, "DXR: towards a billion routing lookups per second in
//! software", SIGCOMM CCR 2012).
//!
//! A policy's prefixes cut the address space into ranges, each in one region (or in
//! none); neighbouring ranges of the same region merge, so the table grows with the
//! boundaries a policy draws, not with the address space. The top `bits` bits of an
//! address pick a *chunk*; the chunk's ranges are one sorted run in `V4_RANGES`, and
//! `V4_INDEX[chunk]` and `V4_INDEX[chunk + 1]` bound the run. Every chunk has at least
//! one range, starting at its first address, so a lookup is two neighbouring index reads
//! and a short binary search that always ends on a range.
//!
//! A range is one `u32`: its first address within the chunk in the high 24 bits, its
//! region (at most [`MAX_REGIONS`](crate::MAX_REGIONS)) in the low 8. With `bits` at
//! least 8 the offset fits, and comparing whole entries orders them by start.

use crate::{REGION_NONE, RegionId};

/// Fewest and most index bits the agent builds: 12 is a 16 KiB index for small policies;
/// 20 is a 4 MiB index, past which a bigger index stops paying.
pub const V4_MIN_INDEX_BITS: u32 = 12;
pub const V4_MAX_INDEX_BITS: u32 = 20;
/// Most steps a binary search takes: a chunk of `1 << (32 - 12)` ranges is halved 20
/// times.
pub const V4_MAX_SEARCH_STEPS: u32 = 32 - V4_MIN_INDEX_BITS;
/// Bits of a range entry that hold the region.
const REGION_BITS: u32 = 8;
const REGION_MASK: u32 = (1 << REGION_BITS) - 1;

/// Table entries per array value. The kernel stores array values at an 8-byte stride, so
/// values of two entries keep the memory-mapped arrays dense.
pub const V4_LANES: usize = 2;

/// A range entry: first address within its chunk, and region.
#[inline(always)]
pub const fn v4_range(offset: u32, region: RegionId) -> u32 {
    (offset << REGION_BITS) | (region & REGION_MASK)
}

/// The chunk of an address and the address's offset within it, for `bits` index bits.
#[inline(always)]
pub const fn v4_chunk(addr: u32, bits: u32) -> (u32, u32) {
    let low = 32 - bits;
    (addr >> low, addr & ((1u32 << low) - 1))
}

/// The region of `addr` in one slot's table of `bits` index bits. `index(i)` reads index
/// entry `i` of the slot and `range(i)` range entry `i`; the datapath passes map reads,
/// the agent and the tests in-memory slices. A read that fails gives `REGION_NONE`.
#[inline(always)]
pub fn v4_lookup(
    addr: [u8; 4],
    bits: u32,
    index: impl Fn(u32) -> Option<u32>,
    range: impl Fn(u32) -> Option<u32>,
) -> RegionId {
    let none = RegionId::from(REGION_NONE);
    let bits = bits.clamp(V4_MIN_INDEX_BITS, V4_MAX_INDEX_BITS);
    let (chunk, offset) = v4_chunk(u32::from_be_bytes(addr), bits);
    let (Some(mut lo), Some(mut hi)) = (index(chunk), index(chunk + 1)) else {
        return none;
    };
    // The last range whose start is at or below the offset: compare with the offset
    // followed by the largest region, so a range starting at the offset counts.
    let key = (offset << REGION_BITS) | REGION_MASK;
    let mut step = 0;
    while step < V4_MAX_SEARCH_STEPS && hi > lo + 1 {
        let mid = lo + (hi - lo) / 2;
        match range(mid) {
            Some(entry) if entry <= key => lo = mid,
            Some(_) => hi = mid,
            None => return none,
        }
        step += 1;
    }
    range(lo).map_or(none, |entry| entry & REGION_MASK)
}

const _: () = assert!(crate::MAX_REGIONS <= REGION_MASK as usize);
const _: () = assert!(32 - V4_MIN_INDEX_BITS + REGION_BITS <= 32);
