//! The IPv4 DIR-24-8 region table, filled from userspace with plain memory writes into
//! the memory-mapped BPF arrays: a million prefixes cost a few memsets, not a million
//! syscalls, and a lookup costs one or two array reads whatever the table holds. The
//! mapping itself is `datapath::sys::MappedArray`.
#![forbid(unsafe_code)]

use datafence_common::{DIR_EXTENDED, DIR24_ENTRIES, RegionId};
use ipnetwork::Ipv4Network;

/// The table needs more /24 groups for longer prefixes than it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupsExhausted {
    pub needed: usize,
    pub capacity: usize,
}

/// Writes `prefixes` into one slot's tables. `top` has one entry per /24 (2^24);
/// `groups` holds 256-entry groups for /24s that contain longer prefixes. Returns the
/// groups used.
///
/// The most specific prefix must win, so prefixes are applied from shortest to longest,
/// each overwriting what shorter ones wrote.
pub fn fill(
    top: &mut [u32],
    groups: &mut [u8],
    prefixes: &[(Ipv4Network, RegionId)],
) -> Result<usize, GroupsExhausted> {
    debug_assert_eq!(top.len(), DIR24_ENTRIES as usize);
    let capacity = groups.len() / 256;
    top.fill(0);
    let mut sorted: Vec<&(Ipv4Network, RegionId)> = prefixes.iter().collect();
    // A compiled policy comes sorted by length already.
    if !sorted.is_sorted_by_key(|(net, _)| net.prefix()) {
        sorted.sort_by_key(|(net, _)| net.prefix());
    }
    let needed = count_groups(prefixes);
    if needed > capacity {
        return Err(GroupsExhausted { needed, capacity });
    }
    let mut used = 0usize;
    for (net, region) in sorted {
        // Region ids are at most MAX_REGIONS (255).
        let region = *region;
        let start = u32::from(net.network());
        let len = u32::from(net.prefix());
        if len <= 24 {
            let first = (start >> 8) as usize;
            let count = 1usize << (24 - len);
            top[first..first + count].fill(region);
        } else {
            let slot = (start >> 8) as usize;
            let entry = top[slot];
            let group = if entry & DIR_EXTENDED != 0 {
                (entry & !DIR_EXTENDED) as usize
            } else {
                let g = used;
                used += 1;
                // The group starts out as what the /24 resolved to.
                groups[g * 256..(g + 1) * 256].fill(entry as u8);
                top[slot] = DIR_EXTENDED | g as u32;
                g
            };
            let first = group * 256 + (start & 0xff) as usize;
            let count = 1usize << (32 - len);
            groups[first..first + count].fill(region as u8);
        }
    }
    Ok(used)
}

/// Groups a prefix list needs: distinct /24s holding a prefix longer than /24.
pub fn count_groups(prefixes: &[(Ipv4Network, RegionId)]) -> usize {
    let mut tops: Vec<u32> = prefixes
        .iter()
        .filter(|(net, _)| net.prefix() > 24)
        .map(|(net, _)| u32::from(net.network()) >> 8)
        .collect();
    tops.sort_unstable();
    tops.dedup();
    tops.len()
}

/// Looks an address up in one slot's tables, as the datapath does.
pub fn lookup(top: &[u32], groups: &[u8], addr: std::net::Ipv4Addr) -> RegionId {
    let a = u32::from(addr);
    let entry = top[(a >> 8) as usize];
    if entry & DIR_EXTENDED == 0 {
        return entry;
    }
    let g = (entry & !DIR_EXTENDED) as usize;
    RegionId::from(groups[g * 256 + (a & 0xff) as usize])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn most_specific_prefix_wins_across_both_levels() {
        let mut top = vec![0u32; DIR24_ENTRIES as usize];
        let mut groups = vec![0u8; 4 * 256];
        let prefixes = vec![
            (net("198.51.100.128/25"), 3),
            (net("198.51.0.0/16"), 1),
            (net("198.51.100.0/24"), 2),
            (net("198.51.100.200/32"), 4),
        ];
        assert_eq!(fill(&mut top, &mut groups, &prefixes), Ok(1));
        let at = |a: &str| lookup(&top, &groups, a.parse().unwrap());
        assert_eq!(at("198.51.7.1"), 1);
        assert_eq!(at("198.51.100.1"), 2);
        assert_eq!(at("198.51.100.129"), 3);
        assert_eq!(at("198.51.100.200"), 4);
        assert_eq!(at("203.0.113.1"), 0);
    }

    #[test]
    fn too_many_groups_is_refused_with_the_numbers() {
        let mut top = vec![0u32; DIR24_ENTRIES as usize];
        let mut groups = vec![0u8; 256];
        let prefixes = vec![(net("10.0.0.1/32"), 1), (net("10.0.1.1/32"), 1)];
        assert_eq!(
            fill(&mut top, &mut groups, &prefixes),
            Err(GroupsExhausted {
                needed: 2,
                capacity: 1
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn agrees_with_a_linear_longest_prefix_match(
            raw in proptest::collection::vec((any::<u32>(), 8u8..=32, 1u32..=255), 1..60),
            probes in proptest::collection::vec(any::<u32>(), 200),
        ) {
            // Keep prefixes inside 10.0.0.0/8 so they nest and collide often.
            let mut prefixes: Vec<(Ipv4Network, RegionId)> = Vec::new();
            for (bits, len, region) in raw {
                let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (bits & 0x00ff_ffff));
                let n = Ipv4Network::new(addr, len).unwrap();
                let n = Ipv4Network::new(n.network(), len).unwrap();
                if !prefixes.iter().any(|(p, _)| *p == n) {
                    prefixes.push((n, region));
                }
            }
            let mut top = vec![0u32; DIR24_ENTRIES as usize];
            let mut groups = vec![0u8; 64 * 256];
            fill(&mut top, &mut groups, &prefixes).unwrap();
            for p in probes {
                let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (p & 0x00ff_ffff));
                let expected = prefixes
                    .iter()
                    .filter(|(n, _)| n.contains(addr))
                    .max_by_key(|(n, _)| n.prefix())
                    .map_or(0, |(_, r)| *r);
                prop_assert_eq!(lookup(&top, &groups, addr), expected, "{}", addr);
            }
        }
    }
}
