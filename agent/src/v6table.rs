//! Builds the IPv6 region table: the hash entries (prefixes and their markers) and the
//! length-search tree that `datafence_common::v6::v6_search` walks.
#![forbid(unsafe_code)]

use datafence_common::{
    REGION_NONE, RegionId,
    v6::{
        V6_EMPTY_NODE, V6_MAX_PROBES, V6_MAX_SCAN, V6_NODE_END, V6_TREE_NODES, V6Entry,
        V6LengthNode, V6PrefixKey, v6_hash, v6_meta,
    },
};
use ipnetwork::Ipv6Network;
use rayon::slice::ParallelSliceMut as _;

/// An IPv6 table, ready to be placed in a slot.
#[derive(Clone, Debug, Default)]
pub struct V6Table {
    /// The search tree, `V6_TREE_NODES` long; the root is node 0.
    pub nodes: Vec<V6LengthNode>,
    /// Hash entries: the prefixes and their markers, each once.
    pub keys: Vec<V6PrefixKey>,
    pub values: Vec<RegionId>,
}

impl V6Table {
    /// Hash entries, markers included: what counts against the map's capacity.
    pub fn entries(&self) -> usize {
        self.keys.len()
    }
}

/// How a table was laid out in its slot: what the slot's policy header records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub seed: u32,
    pub scan: u32,
}

/// No seed placed every entry within `V6_MAX_SCAN` places of its home.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableCrowded {
    pub entries: usize,
    pub places: usize,
}

/// Seeds tried before a table is refused. At the load factor the agent keeps (at most one
/// half) a single seed nearly always does.
const SEEDS: u32 = 16;

/// Writes the table's entries into one slot's places (a power of two of them), by Robin
/// Hood insertion: an entry that has come further from its home takes the place of one
/// that has come a shorter way, which keeps every scan short.
pub fn place(slot: &mut [V6Entry], table: &V6Table) -> Result<Placement, TableCrowded> {
    debug_assert!(slot.len().is_power_of_two());
    let mask = slot.len() - 1;
    let crowded = TableCrowded {
        entries: table.entries(),
        places: slot.len(),
    };
    if table.entries() > slot.len() {
        return Err(crowded);
    }
    'seeds: for seed in 0..SEEDS {
        slot.fill([0; 3]);
        let home = |e: &V6Entry| {
            let key = V6PrefixKey {
                len: (e[2] >> 32) as u32 - 1,
                hi: e[0],
                lo: e[1],
            };
            (v6_hash(&key, seed) as u32 as usize) & mask
        };
        let mut longest = 0;
        for (key, &region) in table.keys.iter().zip(&table.values) {
            let mut moving: V6Entry = [key.hi, key.lo, v6_meta(key.len, region)];
            let mut at = home(&moving);
            let mut distance = 0;
            loop {
                if distance >= V6_MAX_SCAN as usize {
                    continue 'seeds;
                }
                let here = &mut slot[at];
                if here[2] == 0 {
                    *here = moving;
                    longest = longest.max(distance);
                    break;
                }
                let theirs = (at.wrapping_sub(home(here))) & mask;
                if theirs < distance {
                    std::mem::swap(here, &mut moving);
                    longest = longest.max(distance);
                    distance = theirs;
                }
                at = (at + 1) & mask;
                distance += 1;
            }
        }
        return Ok(Placement {
            seed,
            scan: longest as u32 + 1,
        });
    }
    slot.fill([0; 3]);
    Err(crowded)
}

fn truncate(bits: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        128.. => bits,
        l => bits & (u128::MAX << (128 - u32::from(l))),
    }
}

/// Builds a balanced search tree over `lengths[lo..hi]` into `nodes`, numbering nodes in
/// preorder so the root is node 0. Returns the subtree's root, or `V6_NODE_END`.
fn build_tree(lengths: &[u8], lo: usize, hi: usize, nodes: &mut Vec<V6LengthNode>) -> u8 {
    if lo >= hi {
        return V6_NODE_END;
    }
    let mid = lo + (hi - lo) / 2;
    let at = nodes.len();
    nodes.push(V6LengthNode {
        len: lengths[mid],
        ..V6_EMPTY_NODE
    });
    let on_miss = build_tree(lengths, lo, mid, nodes);
    let on_hit = build_tree(lengths, mid + 1, hi, nodes);
    nodes[at].on_hit = on_hit;
    nodes[at].on_miss = on_miss;
    at as u8
}

/// The shorter lengths a search for a prefix of length `len` hits on its way down: a
/// prefix must leave a marker at each.
fn marker_lengths(nodes: &[V6LengthNode], len: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..V6_MAX_PROBES {
        let Some(n) = nodes.get(at) else { break };
        let next = match n.len.cmp(&len) {
            std::cmp::Ordering::Less => {
                out.push(n.len);
                n.on_hit
            }
            std::cmp::Ordering::Greater => n.on_miss,
            std::cmp::Ordering::Equal => break,
        };
        if next == V6_NODE_END {
            break;
        }
        at = usize::from(next);
    }
    out
}

fn key(len: u8, bits: u128) -> V6PrefixKey {
    V6PrefixKey {
        len: u32::from(len),
        hi: (bits >> 64) as u64,
        lo: bits as u64,
    }
}

/// The table for a set of prefixes, ready to be placed in either slot. `prefixes` may
/// nest; no prefix appears twice (validation refuses a prefix claimed by two regions).
pub fn build(prefixes: &[(Ipv6Network, RegionId)]) -> V6Table {
    let mut sorted: Vec<(u128, u8, RegionId)> = prefixes
        .iter()
        .map(|(net, region)| (u128::from(net.network()), net.prefix(), *region))
        .collect();
    sorted.par_sort_unstable();
    let mut lengths: Vec<u8> = sorted.iter().map(|p| p.1).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut nodes = Vec::with_capacity(V6_TREE_NODES as usize);
    build_tree(&lengths, 0, lengths.len(), &mut nodes);
    let markers: Vec<Vec<u8>> = (0..=128u8).map(|l| marker_lengths(&nodes, l)).collect();
    nodes.resize(V6_TREE_NODES as usize, V6_EMPTY_NODE);

    let mut table = V6Table {
        nodes,
        keys: Vec::with_capacity(sorted.len() * 2),
        values: Vec::with_capacity(sorted.len() * 2),
    };
    // In (address, length) order every prefix follows the prefixes that contain it, and
    // the keys emitted at any one length never decrease, so a repeat is always the key
    // emitted just before at that length.
    let mut last_at_length: Vec<Option<u128>> = vec![None; 129];
    // The prefixes containing the current one, shortest first.
    let mut enclosing: Vec<(u128, u8, RegionId)> = Vec::new();
    for &(bits, len, region) in &sorted {
        while let Some(&(b, l, _)) = enclosing.last() {
            if l <= len && truncate(bits, l) == b {
                break;
            }
            enclosing.pop();
        }
        let mut emit = |len: u8, bits: u128, value: RegionId| {
            let last = &mut last_at_length[usize::from(len)];
            if *last != Some(bits) {
                *last = Some(bits);
                table.keys.push(key(len, bits));
                table.values.push(value);
            }
        };
        emit(len, bits, region);
        for &m in &markers[usize::from(len)] {
            // The marker's best match: the longest enclosing prefix no longer than it.
            let best = enclosing
                .iter()
                .rev()
                .find(|(_, l, _)| *l <= m)
                .map_or(RegionId::from(REGION_NONE), |p| p.2);
            emit(m, truncate(bits, m), best);
        }
        enclosing.push((bits, len, region));
    }
    table
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv6Addr};

    use datafence_common::v6::{v6_search, v6_table_get};
    use proptest::prelude::*;

    use super::*;

    /// Looks up through a plain hash of the entries, and through the placed table, which
    /// must agree.
    fn lookup(table: &V6Table, addr: Ipv6Addr) -> RegionId {
        let hash: HashMap<V6PrefixKey, RegionId> = table
            .keys
            .iter()
            .copied()
            .zip(table.values.iter().copied())
            .collect();
        let by_hash = v6_search(
            &addr.octets(),
            |i| table.nodes.get(i as usize).copied(),
            |k| hash.get(k).copied(),
        );
        let places = (table.entries() * 2).next_power_of_two().max(16);
        let mut slot = vec![[0u64; 3]; places];
        let p = place(&mut slot, table).expect("placed");
        let by_table = v6_search(
            &addr.octets(),
            |i| table.nodes.get(i as usize).copied(),
            |k| {
                v6_table_get(k, p.seed, places as u32 - 1, p.scan, |i| {
                    slot.get(i as usize).copied()
                })
            },
        );
        assert_eq!(by_hash, by_table, "{addr}");
        by_table
    }

    fn naive(prefixes: &[(Ipv6Network, RegionId)], addr: Ipv6Addr) -> RegionId {
        prefixes
            .iter()
            .filter(|(n, _)| n.contains(addr))
            .max_by_key(|(n, _)| n.prefix())
            .map_or(0, |p| p.1)
    }

    fn net(s: &str) -> Ipv6Network {
        s.parse().unwrap()
    }

    #[test]
    fn a_full_table_places_every_entry_close_to_home() {
        let prefixes: Vec<(Ipv6Network, RegionId)> = (0..50_000u128)
            .map(|i| {
                (
                    Ipv6Network::new(Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 64)), 64)
                        .unwrap(),
                    1,
                )
            })
            .collect();
        let t = build(&prefixes);
        let mut slot = vec![[0u64; 3]; (t.entries() * 2).next_power_of_two()];
        let p = place(&mut slot, &t).expect("placed");
        assert!(p.scan <= V6_MAX_SCAN);
        assert_eq!(slot.iter().filter(|e| e[2] != 0).count(), t.entries());
        let mut tiny = vec![[0u64; 3]; 16];
        assert_eq!(
            place(&mut tiny, &t),
            Err(TableCrowded {
                entries: t.entries(),
                places: 16
            })
        );
    }

    #[test]
    fn empty_table_finds_nothing() {
        let t = build(&[]);
        assert_eq!(t.nodes[0], V6_EMPTY_NODE);
        assert_eq!(lookup(&t, "2001:db8::1".parse().unwrap()), 0);
    }

    #[test]
    fn nested_prefixes_resolve_to_the_longest() {
        let p = vec![
            (net("2001:db8::/32"), 1),
            (net("2001:db8:1::/48"), 2),
            (net("2001:db8:1:2::/64"), 3),
            (net("2001:db8:1:2::7/128"), 4),
            (net("::/0"), 5),
        ];
        let t = build(&p);
        for (addr, want) in [
            ("2001:db8:1:2::7", 4),
            ("2001:db8:1:2::8", 3),
            ("2001:db8:1:3::", 2),
            ("2001:db8:2::", 1),
            ("2001:db9::", 5),
        ] {
            assert_eq!(lookup(&t, addr.parse().unwrap()), want, "{addr}");
        }
    }

    #[test]
    fn a_marker_without_an_enclosing_prefix_finds_nothing() {
        // /64 leaves a marker at /48 (the root of lengths 32, 48, 64): an address that
        // shares only those 48 bits must not match anything.
        let p = vec![(net("2001:db8:1:2::/64"), 3), (net("2400::/32"), 1)];
        let t = build(&p);
        assert_eq!(lookup(&t, "2001:db8:1:9::".parse().unwrap()), 0);
        assert_eq!(lookup(&t, "2001:db8:1:2::1".parse().unwrap()), 3);
    }

    #[test]
    fn every_length_fits_the_probe_budget() {
        let p: Vec<(Ipv6Network, RegionId)> = (0..=128u8)
            .map(|l| {
                (
                    Ipv6Network::new(Ipv6Addr::UNSPECIFIED, l).unwrap(),
                    u32::from(l) + 1,
                )
            })
            .collect();
        let t = build(&p);
        for l in 0..=128u32 {
            let addr = if l == 128 {
                Ipv6Addr::UNSPECIFIED
            } else {
                Ipv6Addr::from(1u128 << (127 - l))
            };
            assert_eq!(lookup(&t, addr), l + 1, "/{l}");
        }
    }

    fn arb_prefix() -> impl Strategy<Value = (Ipv6Network, RegionId)> {
        // A few base addresses, so prefixes nest and share markers.
        (
            0..4u128,
            any::<u128>(),
            prop::sample::select(vec![
                0u8, 8, 16, 29, 32, 33, 40, 44, 48, 56, 60, 64, 96, 127, 128,
            ]),
            1..5u32,
        )
            .prop_map(|(base, noise, len, region)| {
                let bits = (base << 120) | (noise >> 8);
                let net = Ipv6Network::new(Ipv6Addr::from(truncate(bits, len)), len).unwrap();
                (net, region)
            })
    }

    proptest! {
        #[test]
        fn search_matches_a_naive_longest_prefix_match(
            raw in prop::collection::vec(arb_prefix(), 0..60),
            probes in prop::collection::vec((0..4u128, any::<u128>()), 40),
        ) {
            let mut seen = std::collections::HashSet::new();
            let prefixes: Vec<_> = raw.into_iter().filter(|(n, _)| seen.insert(*n)).collect();
            let t = build(&prefixes);
            let mut candidates: Vec<Ipv6Addr> = prefixes.iter().map(|(n, _)| n.network()).collect();
            candidates.extend(probes.iter().map(|&(b, n)| Ipv6Addr::from((b << 120) | (n >> 8))));
            for addr in candidates {
                prop_assert_eq!(lookup(&t, addr), naive(&prefixes, addr), "{}", addr);
            }
        }
    }
}
