//! Builds the IPv4 range table (`datafence_common::v4`) from a policy's prefixes, and
//! writes it into one slot of the memory-mapped arrays with plain memory writes: a
//! million prefixes cost a sort and a pass, not a million syscalls.
#![forbid(unsafe_code)]

use datafence_common::{
    RegionId,
    v4::{V4_MAX_INDEX_BITS, V4_MIN_INDEX_BITS, v4_lookup, v4_range},
};

pub use crate::rangetable::{RangesExhausted, index_entries};

/// The IPv4 table's boundaries.
pub type Boundaries = crate::rangetable::Boundaries<u32>;

/// Index bits for a datapath sized to `boundaries`.
pub fn index_bits(boundaries: &Boundaries) -> u32 {
    boundaries.index_bits(V4_MIN_INDEX_BITS, V4_MAX_INDEX_BITS)
}

/// Writes the table into one slot (see [`crate::rangetable::fill`]).
pub fn fill(
    index: &mut [u32],
    ranges: &mut [u32],
    boundaries: &Boundaries,
    bits: u32,
) -> Result<usize, RangesExhausted> {
    crate::rangetable::fill(index, ranges, boundaries, bits, |start, first, region| {
        v4_range(start - first, region)
    })
}

/// Looks an address up in one slot's table, as the datapath does.
pub fn lookup(index: &[u32], ranges: &[u32], bits: u32, addr: std::net::Ipv4Addr) -> RegionId {
    v4_lookup(
        addr.octets(),
        bits,
        |i| index.get(i as usize).copied(),
        |i| ranges.get(i as usize).copied(),
    )
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ipnetwork::Ipv4Network;
    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    /// The longest-prefix match by reading every prefix.
    fn naive(prefixes: &[(Ipv4Network, RegionId)], addr: Ipv4Addr) -> RegionId {
        prefixes
            .iter()
            .filter(|(n, _)| n.contains(addr))
            .max_by_key(|(n, _)| n.prefix())
            .map_or(0, |(_, r)| *r)
    }

    struct Table {
        bits: u32,
        index: Vec<u32>,
        ranges: Vec<u32>,
    }

    fn build(prefixes: &[(Ipv4Network, RegionId)], bits: u32) -> Table {
        let b = Boundaries::of(prefixes);
        let mut index = vec![0; index_entries(bits)];
        let mut ranges = vec![0; b.entries(bits)];
        let used = fill(&mut index, &mut ranges, &b, bits).unwrap();
        assert_eq!(used, ranges.len(), "entries() counts what fill writes");
        Table {
            bits,
            index,
            ranges,
        }
    }

    fn at(t: &Table, a: Ipv4Addr) -> RegionId {
        lookup(&t.index, &t.ranges, t.bits, a)
    }

    /// Addresses where a lookup can go wrong: each prefix's first and last address and
    /// their neighbours, and chunk edges.
    fn edges(prefixes: &[(Ipv4Network, RegionId)]) -> Vec<Ipv4Addr> {
        let mut out = vec![Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST];
        for (n, _) in prefixes {
            let (first, last) = (u32::from(n.network()), u32::from(n.broadcast()));
            for a in [
                first.wrapping_sub(1),
                first,
                first.wrapping_add(1),
                last.wrapping_sub(1),
                last,
                last.wrapping_add(1),
                first & 0xffff_0000,
                (first & 0xffff_0000).wrapping_sub(1),
            ] {
                out.push(Ipv4Addr::from(a));
            }
        }
        out
    }

    #[test]
    fn most_specific_prefix_wins_and_neighbours_merge() {
        let prefixes = vec![
            (net("198.51.100.128/25"), 3),
            (net("198.51.0.0/16"), 1),
            (net("198.51.100.0/24"), 2),
            (net("198.51.100.200/32"), 4),
            (net("198.52.0.0/16"), 1),
            (net("0.0.0.0/0"), 7),
        ];
        let t = build(&prefixes, 16);
        for a in edges(&prefixes) {
            assert_eq!(at(&t, a), naive(&prefixes, a), "{a}");
        }
        assert_eq!(at(&t, "198.51.100.200".parse().unwrap()), 4);
        assert_eq!(at(&t, "203.0.113.1".parse().unwrap()), 7);
        // 198.51/16 and 198.52/16 are one region: no boundary between them.
        let b = Boundaries::of(&prefixes);
        assert!(
            !b.iter()
                .any(|(s, _)| s == u32::from(Ipv4Addr::new(198, 52, 0, 0)))
        );
    }

    /// Prefixes out of address order are sorted on every core with an unstable sort; a
    /// prefix listed twice still keeps the region it was listed with last, whatever else
    /// shares its start.
    #[test]
    fn a_prefix_listed_twice_keeps_its_last_region() {
        for copies in [2u32, 3, 50] {
            let mut prefixes = vec![(net("10.0.0.0/8"), 9), (net("10.1.0.0/16"), 8)];
            prefixes.extend((1..=copies).map(|region| (net("10.0.0.0/16"), region)));
            prefixes.push((net("10.0.0.0/24"), 7));
            let t = build(&prefixes, 16);
            assert_eq!(
                at(&t, Ipv4Addr::new(10, 0, 1, 1)),
                copies,
                "{copies} copies"
            );
            assert_eq!(at(&t, Ipv4Addr::new(10, 0, 0, 1)), 7);
            assert_eq!(at(&t, Ipv4Addr::new(10, 1, 0, 1)), 8);
            assert_eq!(at(&t, Ipv4Addr::new(10, 2, 0, 1)), 9);
        }
    }

    #[test]
    fn an_empty_policy_is_one_range_per_chunk_in_no_region() {
        let t = build(&[], 16);
        assert_eq!(t.ranges.len(), 1 << 16);
        assert_eq!(at(&t, Ipv4Addr::new(192, 0, 2, 1)), 0);
    }

    #[test]
    fn a_table_too_large_for_its_room_is_refused_with_the_numbers() {
        let prefixes = vec![(net("10.0.0.1/32"), 1), (net("10.0.1.1/32"), 1)];
        let b = Boundaries::of(&prefixes);
        let mut index = vec![0; index_entries(16)];
        let mut ranges = vec![0; (1 << 16) + 2];
        assert_eq!(
            fill(&mut index, &mut ranges, &b, 16),
            Err(RangesExhausted {
                needed: (1 << 16) + 4,
                capacity: (1 << 16) + 2
            })
        );
    }

    #[test]
    fn nested_prefixes_of_every_length_from_0_to_32() {
        // One address inside /0 ... /32, each length its own region in turn.
        let base = u32::from(Ipv4Addr::new(203, 0, 113, 77));
        let prefixes: Vec<(Ipv4Network, RegionId)> = (0..=32u8)
            .map(|len| {
                let n = Ipv4Network::new(Ipv4Addr::from(base), len).unwrap();
                (
                    Ipv4Network::new(n.network(), len).unwrap(),
                    1 + u32::from(len) % 5,
                )
            })
            .collect();
        for bits in [V4_MIN_INDEX_BITS, 16, V4_MAX_INDEX_BITS] {
            let t = build(&prefixes, bits);
            for a in edges(&prefixes) {
                assert_eq!(at(&t, a), naive(&prefixes, a), "{a} with {bits} bits");
            }
        }
    }

    #[test]
    fn dense_host_routes_fill_a_whole_chunk() {
        // 65,536 host routes of alternating regions, all in one chunk of the smallest
        // index.
        let prefixes: Vec<(Ipv4Network, RegionId)> = (0..1u32 << 16)
            .map(|i| {
                (
                    Ipv4Network::new(Ipv4Addr::from(0x0b00_0000 | i), 32).unwrap(),
                    1 + i % 3,
                )
            })
            .collect();
        let t = build(&prefixes, V4_MIN_INDEX_BITS);
        for i in (0..1u32 << 16).step_by(97).chain([0, 1, 65_534, 65_535]) {
            let a = Ipv4Addr::from(0x0b00_0000 | i);
            assert_eq!(at(&t, a), 1 + i % 3, "{a}");
        }
        assert_eq!(at(&t, Ipv4Addr::new(11, 1, 0, 0)), 0);
        assert_eq!(at(&t, Ipv4Addr::new(10, 255, 255, 255)), 0);
    }

    #[test]
    fn the_deepest_search_reaches_both_ends_of_a_full_chunk() {
        // One chunk of the smallest index with a range at every address: 2^20 ranges,
        // the most a chunk can hold, so the search takes every step it is allowed.
        let per_chunk = 1u32 << (32 - V4_MIN_INDEX_BITS);
        let mut index = vec![per_chunk; index_entries(V4_MIN_INDEX_BITS)];
        index[0] = 0;
        let ranges: Vec<u32> = (0..per_chunk).map(|i| v4_range(i, 1 + i % 7)).collect();
        for offset in [0, 1, 2, per_chunk / 2, per_chunk - 2, per_chunk - 1] {
            let addr = Ipv4Addr::from(offset);
            assert_eq!(
                lookup(&index, &ranges, V4_MIN_INDEX_BITS, addr),
                1 + offset % 7,
                "{addr}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn agrees_with_a_naive_longest_prefix_match(
            raw in proptest::collection::vec((any::<u32>(), 0u8..=32, 1u32..=255), 1..80),
            probes in proptest::collection::vec(any::<u32>(), 200),
            bits in V4_MIN_INDEX_BITS..=V4_MAX_INDEX_BITS,
        ) {
            // Most prefixes inside 10.0.0.0/8 so they nest and collide often.
            let mut prefixes: Vec<(Ipv4Network, RegionId)> = Vec::new();
            for (i, (addr, len, region)) in raw.into_iter().enumerate() {
                let addr = if i % 4 == 0 { addr } else { 0x0a00_0000 | (addr & 0x00ff_ffff) };
                let n = Ipv4Network::new(Ipv4Addr::from(addr), len).unwrap();
                let n = Ipv4Network::new(n.network(), len).unwrap();
                if !prefixes.iter().any(|(p, _)| *p == n) {
                    prefixes.push((n, region));
                }
            }
            let t = build(&prefixes, bits);
            // A compiled policy's lists come in address order, each prefix once, and are
            // drawn without a sort: the same boundaries as from any other order.
            let mut ordered = prefixes.clone();
            ordered.sort_by_key(|(p, _)| (p.network(), p.prefix()));
            prop_assert_eq!(Boundaries::of(&ordered), Boundaries::of(&prefixes));
            for a in edges(&prefixes) {
                prop_assert_eq!(at(&t, a), naive(&prefixes, a), "{}", a);
            }
            for p in probes {
                let a = Ipv4Addr::from(0x0a00_0000 | (p & 0x00ff_ffff));
                prop_assert_eq!(at(&t, a), naive(&prefixes, a), "{}", a);
            }
        }
    }
}
