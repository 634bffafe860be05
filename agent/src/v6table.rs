//! Builds the IPv6 range table (`datafence_common::v6`) from a policy's prefixes, as
//! `v4table` does for IPv4: the same boundaries and chunks, with 16-byte entries and
//! each chunk's run a B-tree of cache-line nodes.
#![forbid(unsafe_code)]

use datafence_common::{
    RegionId,
    v6::{V6_MAX_INDEX_BITS, V6_MIN_INDEX_BITS, V6_NODE_ENTRIES, V6Range, v6_lookup, v6_range},
};

pub use crate::rangetable::{RangesExhausted, index_entries};

/// The IPv6 table's boundaries.
pub type Boundaries = crate::rangetable::Boundaries<u128>;

/// Index bits for a datapath sized to `boundaries`.
pub fn index_bits(boundaries: &Boundaries) -> u32 {
    boundaries.index_bits(V6_MIN_INDEX_BITS, V6_MAX_INDEX_BITS)
}

/// Writes the table into one slot (see [`crate::rangetable::fill`]).
pub fn fill(
    index: &mut [u32],
    ranges: &mut [V6Range],
    boundaries: &Boundaries,
    bits: u32,
) -> Result<usize, RangesExhausted> {
    crate::rangetable::fill(index, ranges, boundaries, bits, |start, _, region| {
        v6_range(start, region)
    })
}

/// Looks an address up in one slot's table, as the datapath does.
pub fn lookup(index: &[u32], ranges: &[V6Range], bits: u32, addr: std::net::Ipv6Addr) -> RegionId {
    v6_lookup(
        &addr.octets(),
        bits,
        |i| index.get(i as usize).copied(),
        |i| {
            let at = (i as usize).checked_mul(V6_NODE_ENTRIES as usize)?;
            ranges
                .get(at..at.checked_add(V6_NODE_ENTRIES as usize)?)?
                .try_into()
                .ok()
        },
    )
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use ipnetwork::Ipv6Network;
    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Ipv6Network {
        s.parse().unwrap()
    }

    /// The longest-prefix match by reading every prefix.
    fn naive(prefixes: &[(Ipv6Network, RegionId)], addr: Ipv6Addr) -> RegionId {
        prefixes
            .iter()
            .filter(|(n, _)| n.contains(addr))
            .max_by_key(|(n, _)| n.prefix())
            .map_or(0, |(_, r)| *r)
    }

    struct Table {
        bits: u32,
        index: Vec<u32>,
        ranges: Vec<V6Range>,
    }

    fn build(prefixes: &[(Ipv6Network, RegionId)], bits: u32) -> Table {
        let b = Boundaries::of(prefixes);
        let mut index = vec![0; index_entries(bits)];
        let mut ranges = vec![[0; 2]; b.entries(bits)];
        let used = fill(&mut index, &mut ranges, &b, bits).unwrap();
        assert_eq!(used, ranges.len(), "entries() counts what fill writes");
        Table {
            bits,
            index,
            ranges,
        }
    }

    fn at(t: &Table, a: Ipv6Addr) -> RegionId {
        lookup(&t.index, &t.ranges, t.bits, a)
    }

    /// Addresses where a lookup can go wrong: each prefix's first and last address and
    /// their neighbours, and the edges of the chunks of the widest index.
    fn edges(prefixes: &[(Ipv6Network, RegionId)]) -> Vec<Ipv6Addr> {
        let mut out = vec![Ipv6Addr::UNSPECIFIED, Ipv6Addr::from(u128::MAX)];
        let chunk = u128::MAX << (128 - V6_MAX_INDEX_BITS);
        for (n, _) in prefixes {
            let first = u128::from(n.network());
            let last = first | (u128::MAX.checked_shr(n.prefix().into()).unwrap_or(0));
            for a in [
                first.wrapping_sub(1),
                first,
                first.wrapping_add(1),
                last.wrapping_sub(1),
                last,
                last.wrapping_add(1),
                first & chunk,
                (first & chunk).wrapping_sub(1),
            ] {
                out.push(Ipv6Addr::from(a));
            }
        }
        out
    }

    #[test]
    fn a_cleared_index_finds_no_region_whatever_the_ranges_hold() {
        let prefixes = vec![(net("::/0"), 3), (net("2001:db8::/32"), 1)];
        let mut t = build(&prefixes, V6_MIN_INDEX_BITS);
        assert_eq!(at(&t, "2001:db8::1".parse().unwrap()), 1);
        t.index.fill(0);
        for a in edges(&prefixes) {
            assert_eq!(
                at(&t, a),
                RegionId::from(datafence_common::REGION_NONE),
                "{a}"
            );
        }
    }

    #[test]
    fn most_specific_prefix_wins_and_neighbours_merge() {
        let prefixes = vec![
            (net("2001:db8::/32"), 1),
            (net("2001:db8:1::/48"), 2),
            (net("2001:db8:1:2::/64"), 3),
            (net("2001:db8:1:2::7/128"), 4),
            (net("2001:db9::/32"), 1),
            (net("::/0"), 7),
        ];
        let t = build(&prefixes, 16);
        for a in edges(&prefixes) {
            assert_eq!(at(&t, a), naive(&prefixes, a), "{a}");
        }
        assert_eq!(at(&t, "2001:db8:1:2::7".parse().unwrap()), 4);
        assert_eq!(at(&t, "2001:db8:1:2::8".parse().unwrap()), 3);
        assert_eq!(at(&t, "3fff::1".parse().unwrap()), 7);
        // 2001:db8::/32 and 2001:db9::/32 are one region: no boundary between them.
        let b = Boundaries::of(&prefixes);
        let db9 = u128::from("2001:db9::".parse::<Ipv6Addr>().unwrap());
        assert!(!b.iter().any(|(s, _)| s == db9));
    }

    #[test]
    fn an_empty_policy_takes_no_nodes_and_finds_no_region() {
        let t = build(&[], V6_MIN_INDEX_BITS);
        assert!(t.ranges.is_empty());
        for a in [
            "::",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            assert_eq!(at(&t, a.parse().unwrap()), 0, "{a}");
        }
    }

    #[test]
    fn only_chunks_wholly_in_no_region_take_no_nodes() {
        // At 10 index bits a chunk is a /10. 2001:db8::/32 lies inside one, among
        // ranges in no region: one node. 4000::/2 is 256 whole chunks of one region:
        // a node each. The other 767 chunks are wholly in no region: none.
        let prefixes = vec![(net("2001:db8::/32"), 1), (net("4000::/2"), 2)];
        let t = build(&prefixes, V6_MIN_INDEX_BITS);
        assert_eq!(t.ranges.len(), 4 * (1 + 256));
        let mut probes = edges(&prefixes);
        // The first address of every chunk, and the last of the one before it.
        for chunk in 0..1u128 << V6_MIN_INDEX_BITS {
            let first = chunk << (128 - V6_MIN_INDEX_BITS);
            probes.push(Ipv6Addr::from(first));
            probes.push(Ipv6Addr::from(first.wrapping_sub(1)));
        }
        for a in probes {
            assert_eq!(at(&t, a), naive(&prefixes, a), "{a}");
        }
        assert_eq!(at(&t, "2001:db8::1".parse().unwrap()), 1);
        assert_eq!(at(&t, "7fff::1".parse().unwrap()), 2);
    }

    #[test]
    fn nested_prefixes_of_every_length_from_0_to_128() {
        // One address inside /0 ... /128, each length its own region in turn.
        let base: Ipv6Addr = "2001:db8:5:6:7:8:9:a".parse().unwrap();
        let prefixes: Vec<(Ipv6Network, RegionId)> = (0..=128u8)
            .map(|len| {
                let n = Ipv6Network::new(base, len).unwrap();
                (
                    Ipv6Network::new(n.network(), len).unwrap(),
                    1 + u32::from(len) % 5,
                )
            })
            .collect();
        for bits in [V6_MIN_INDEX_BITS, 16, V6_MAX_INDEX_BITS] {
            let t = build(&prefixes, bits);
            for a in edges(&prefixes) {
                assert_eq!(at(&t, a), naive(&prefixes, a), "{a} with {bits} bits");
            }
        }
    }

    #[test]
    fn dense_host_routes_fill_a_whole_chunk() {
        // 65,536 host routes of alternating regions, all in one chunk: they differ only
        // in the low 8 bits of the address and the bits above, which the entries keep.
        let base = u128::from("2001:db8::".parse::<Ipv6Addr>().unwrap());
        let host = |i: u128| Ipv6Addr::from(base | (i << 4) | (i & 0xf));
        let prefixes: Vec<(Ipv6Network, RegionId)> = (0..1u128 << 16)
            .map(|i| (Ipv6Network::new(host(i), 128).unwrap(), 1 + (i % 3) as u32))
            .collect();
        let t = build(&prefixes, V6_MIN_INDEX_BITS);
        for i in (0..1u128 << 16).step_by(97).chain([0, 1, 65_534, 65_535]) {
            let a = host(i);
            assert_eq!(at(&t, a), 1 + (i % 3) as u32, "{a}");
            let beside = Ipv6Addr::from(u128::from(a) ^ 0x100_0000);
            assert_eq!(at(&t, beside), naive(&prefixes, beside), "{beside}");
        }
    }

    #[test]
    fn a_table_too_large_for_its_room_is_refused_with_the_numbers() {
        let prefixes = vec![(net("2001:db8::1/128"), 1), (net("2001:db8::3/128"), 1)];
        let b = Boundaries::of(&prefixes);
        let mut index = vec![0; index_entries(V6_MIN_INDEX_BITS)];
        let mut ranges = vec![[0; 2]; 4];
        // The chunk holding the routes takes two nodes for its five ranges; the others,
        // wholly in no region, none.
        assert_eq!(
            fill(&mut index, &mut ranges, &b, V6_MIN_INDEX_BITS),
            Err(RangesExhausted {
                needed: 8,
                capacity: 4,
            })
        );
    }

    fn arb_prefix() -> impl Strategy<Value = (Ipv6Network, RegionId)> {
        // A few base addresses, so prefixes nest; every length from /0 to /128.
        (0..4u128, any::<u128>(), 0u8..=128, 1..6u32).prop_map(|(base, noise, len, region)| {
            let bits = (0x2001_0db8u128 << 96) | (base << 88) | (noise >> 40);
            let net = Ipv6Network::new(Ipv6Addr::from(bits), len).unwrap();
            (Ipv6Network::new(net.network(), len).unwrap(), region)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn agrees_with_a_naive_longest_prefix_match(
            raw in prop::collection::vec(arb_prefix(), 0..80),
            probes in prop::collection::vec((0..4u128, any::<u128>()), 100),
            bits in V6_MIN_INDEX_BITS..=V6_MAX_INDEX_BITS,
        ) {
            let mut prefixes: Vec<(Ipv6Network, RegionId)> = Vec::new();
            for (n, r) in raw {
                if !prefixes.iter().any(|(p, _)| *p == n) {
                    prefixes.push((n, r));
                }
            }
            let t = build(&prefixes, bits);
            // A compiled policy's lists come in address order, each prefix once, and are
            // drawn without a sort: the same boundaries as from any other order.
            let mut ordered = prefixes.clone();
            ordered.sort_by_key(|(p, _)| (p.network(), p.prefix()));
            prop_assert_eq!(Boundaries::of(&ordered), Boundaries::of(&prefixes));
            let probes = probes
                .iter()
                .map(|&(b, n)| Ipv6Addr::from((0x2001_0db8u128 << 96) | (b << 88) | (n >> 40)));
            for a in edges(&prefixes).into_iter().chain(probes) {
                prop_assert_eq!(at(&t, a), naive(&prefixes, a), "{}", a);
            }
        }
    }
}
