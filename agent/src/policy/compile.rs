//! A validated policy turned into the contents of the datapath's maps, and the userspace
//! lookups that mirror them.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use datafence_common::{ClassMask, ClassSpec, MAX_CLASSES, Policy, REGION_NONE, RegionId, set_bit};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use rayon::iter::{IntoParallelRefMutIterator as _, ParallelIterator as _};
use rayon::slice::ParallelSliceMut as _;

use super::cidr::{Prefix, lpm, sort_key, truncate};
use super::model::{Class, LoadedPolicy, UnknownRule};

/// Everything the loader writes into one policy slot.
///
/// Every prefix list is sorted by network, then by prefix length, without duplicate
/// prefixes; [`region_of`](Self::region_of) and [`src_classes`](Self::src_classes) rely
/// on that order, so sort the same way if you build or modify one by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// `header.loaded` is 1, `n_classes` and `selectors_in_use` are set; the event rate,
    /// burst and generation are left 0 for the loader to fill in.
    pub policy: Policy,
    pub regions_v4: Vec<(Ipv4Network, RegionId)>,
    pub regions_v6: Vec<(Ipv6Network, RegionId)>,
    pub exempt_v4: Vec<Ipv4Network>,
    pub exempt_v6: Vec<Ipv6Network>,
    /// Each prefix any class lists, with the classes whose prefixes contain it (see
    /// [`src_classes`](Self::src_classes)).
    pub src_v4: Vec<(Ipv4Network, ClassMask)>,
    pub src_v6: Vec<(Ipv6Network, ClassMask)>,
    /// Cgroup id and the classes that list it, sorted by id.
    pub cgroups: Vec<(u64, ClassMask)>,
}

impl LoadedPolicy {
    /// Compiles a policy that passed validation. Limits are enforced by validation;
    /// anything past them (classes, marks, port ranges) is dropped here rather than
    /// overflow the fixed-size datapath structures, so only call this on a policy from
    /// [`load_policy`](super::load_policy) or one built to the same rules.
    pub fn compile(&self) -> CompiledPolicy {
        let classes = &self.classes[..self.classes.len().min(MAX_CLASSES)];
        let mut policy = Policy::EMPTY;
        policy.header.loaded = 1;
        policy.header.n_classes = classes.len() as u32;
        policy.header.host_essentials = self.host_essentials.bits();
        for (slot, prefix) in policy.header.nat64.iter_mut().zip(&self.nat64_prefixes) {
            *slot = datafence_common::verdict::nat64_words(&prefix.network().octets());
            policy.header.n_nat64 += 1;
        }
        for (slot, class) in policy.classes.iter_mut().zip(classes) {
            *slot = class_spec(class, self.regions.len());
            policy.header.selectors_in_use |= slot.selectors;
        }
        policy.build_index();

        let mut regions_v4 = Vec::with_capacity(self.regions.iter().map(|r| r.v4.len()).sum());
        let mut regions_v6 = Vec::with_capacity(self.regions.iter().map(|r| r.v6.len()).sum());
        for region in &self.regions {
            let id = RegionId::from(region.id);
            regions_v4.extend(region.v4.iter().map(|&n| (n, id)));
            regions_v6.extend(region.v6.iter().map(|&n| (n, id)));
        }

        let mut exempt_v4 = Vec::new();
        let mut exempt_v6 = Vec::new();
        for net in &self.exempt {
            match *net {
                IpNetwork::V4(n) => exempt_v4.push(n),
                IpNetwork::V6(n) => exempt_v6.push(n),
            }
        }

        let mut src_v4 = Vec::new();
        let mut src_v6 = Vec::new();
        for class in classes {
            let bit = class_bit(class.id);
            for net in &class.selectors.src_cidrs {
                match *net {
                    IpNetwork::V4(n) => src_v4.push((n, bit)),
                    IpNetwork::V6(n) => src_v6.push((n, bit)),
                }
            }
        }

        let (regions_v4, regions_v6) =
            rayon::join(|| sorted_unique(regions_v4), || sorted_unique(regions_v6));
        let exempt_v4 = sorted_unique_prefixes(exempt_v4);
        let exempt_v6 = sorted_unique_prefixes(exempt_v6);
        policy.header.exempt_v4 = exempt_v4.len() as u32;
        policy.header.exempt_v6 = exempt_v6.len() as u32;
        CompiledPolicy {
            policy,
            regions_v4,
            regions_v6,
            exempt_v4,
            exempt_v6,
            src_v4: src_masks(src_v4),
            src_v6: src_masks(src_v6),
            cgroups: self.cgroup_classes(),
        }
    }

    /// [`CompiledPolicy::cgroups`] alone: what changes when a cgroup a class names is
    /// made anew, without compiling the rest.
    pub fn cgroup_classes(&self) -> Vec<(u64, ClassMask)> {
        let mut cgroups: BTreeMap<u64, ClassMask> = BTreeMap::new();
        for class in &self.classes[..self.classes.len().min(MAX_CLASSES)] {
            for &(_, id) in &class.selectors.cgroups {
                if id != super::CGROUP_NOT_YET {
                    *cgroups.entry(id).or_default() |= class_bit(class.id);
                }
            }
        }
        cgroups.into_iter().collect()
    }
}

fn class_bit(id: u8) -> ClassMask {
    ClassMask::checked_shl(1, u32::from(id)).unwrap_or(0)
}

/// `regions`: how many regions the policy defines (their ids run from 1).
fn class_spec(class: &Class, regions: usize) -> ClassSpec {
    let mut spec = ClassSpec::EMPTY;
    spec.mode = class.mode.as_u8();
    spec.unknown_denied = u8::from(class.unknown == UnknownRule::Deny);
    // `allow` holds each region id once, so fewer ids than regions leaves one out.
    spec.some_destination_denied =
        u8::from(class.unknown == UnknownRule::Deny || class.allow.len() < regions);
    for &id in &class.allow {
        set_bit(&mut spec.allowed_regions, id);
    }
    class.selectors.fill_spec(&mut spec);
    spec
}

/// Sorted as [`lpm`] needs; of two entries for one prefix one is kept. Validation has
/// already refused a prefix listed with two values, so which survives does not matter,
/// and the faster unstable sort will do.
///
/// Host bits are cleared first, so a prefix written with them sits beside its equals for
/// the dedup, and the sort compares addresses as stored, with no mask computed in each
/// comparison.
fn sorted_unique<P: Prefix + Send, T: Send>(mut entries: Vec<(P, T)>) -> Vec<(P, T)> {
    entries
        .par_iter_mut()
        .filter(|(p, _)| truncate(p.written_bits(), p.len(), P::WIDTH) != p.written_bits())
        .for_each(|(p, _)| *p = p.without_host_bits());
    entries.par_sort_unstable_by_key(|(p, _)| (p.written_bits(), p.len()));
    entries.dedup_by_key(|(p, _)| sort_key(p));
    entries
}

fn sorted_unique_prefixes<P: Prefix>(mut prefixes: Vec<P>) -> Vec<P> {
    prefixes.sort_unstable_by_key(sort_key);
    prefixes.dedup_by_key(|p| sort_key(p));
    prefixes
}

/// The datapath finds the longest listed prefix containing a packet's source, and needs
/// from it every class with *any* prefix containing that source. Those are exactly the
/// classes with a prefix containing the longest one (all such prefixes contain the source
/// and are no longer than it), so each prefix gets the union of the classes listing it or
/// any shorter prefix that covers it.
fn src_masks<P: Prefix + Send>(entries: Vec<(P, ClassMask)>) -> Vec<(P, ClassMask)> {
    let mut exact: HashMap<(u128, u8), (P, ClassMask)> = HashMap::new();
    for (p, bit) in entries {
        exact.entry(sort_key(&p)).or_insert((p, 0)).1 |= bit;
    }
    let covering = |(bits, len): (u128, u8)| -> ClassMask {
        (0..=len)
            .filter_map(|l| exact.get(&(truncate(bits, l, P::WIDTH), l)))
            .fold(0, |acc, (_, mask)| acc | mask)
    };
    let out: Vec<(P, ClassMask)> = exact
        .iter()
        .map(|(&key, &(p, _))| (p, covering(key)))
        .collect();
    sorted_unique(out)
}

impl CompiledPolicy {
    /// Frees the region prefix lists once they are in the kernel's tables. A running
    /// agent keeps the policy's own lists (for `explain`, status and recompiling); the
    /// compiled copies would double what it holds, tens of MiB at a million prefixes.
    pub fn release_prefixes(&mut self) {
        self.regions_v4 = Vec::new();
        self.regions_v6 = Vec::new();
    }

    /// The region of a destination: its longest matching region prefix, or
    /// [`REGION_NONE`].
    pub fn region_of(&self, addr: IpAddr) -> RegionId {
        let found = match addr {
            IpAddr::V4(a) => lpm(&self.regions_v4, a),
            IpAddr::V6(a) => lpm(&self.regions_v6, a),
        };
        found.unwrap_or(RegionId::from(REGION_NONE))
    }

    /// Whether the policy's `exempt` list covers a destination. The datapath's built-in
    /// exemptions (loopback, link-local) are not included.
    pub fn is_exempt(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.exempt_v4.iter().any(|n| n.contains(a)),
            IpAddr::V6(a) => self.exempt_v6.iter().any(|n| n.contains(a)),
        }
    }

    /// The classes whose `src_cidrs` contain a source address, found the way the
    /// datapath finds them: one longest-prefix match.
    pub fn src_classes(&self, addr: IpAddr) -> ClassMask {
        let found = match addr {
            IpAddr::V4(a) => lpm(&self.src_v4, a),
            IpAddr::V6(a) => lpm(&self.src_v6, a),
        };
        found.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use datafence_common::{MODE_AUDIT, MODE_ENFORCE, MarkMatch, PortRange, bit_is_set, selector};
    use proptest::prelude::*;

    use super::*;
    use crate::policy::model::{Mode, Region, Selectors};

    proptest::proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]
        /// Prefixes written with host bits, several of one network among them, come out
        /// in the order `lpm` needs, each network once.
        #[test]
        fn sorted_unique_orders_by_network_then_length_whatever_the_host_bits(
            raw in proptest::collection::vec((0u32..64, 0u8..=32, any::<u32>()), 0..200),
        ) {
            let entries: Vec<(Ipv4Network, u32)> = raw
                .iter()
                .map(|&(net, len, host)| {
                    // Few networks, so many entries share one: the top 6 bits vary.
                    let addr = (net << 26) | (host >> 6);
                    (Ipv4Network::new(Ipv4Addr::from(addr), len).unwrap(), net)
                })
                .collect();
            let out = sorted_unique(entries.clone());
            let keys: Vec<(u128, u8)> = out.iter().map(|(p, _)| sort_key(p)).collect();
            prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "{:?}", keys);
            let mut want: Vec<(u128, u8)> = entries.iter().map(|(p, _)| sort_key(p)).collect();
            want.sort_unstable();
            want.dedup();
            prop_assert_eq!(keys, want);
        }
    }

    fn class(id: u8) -> Class {
        Class {
            name: format!("c{id}"),
            id,
            mode: Mode::Enforce,
            unknown: UnknownRule::Deny,
            allow: Vec::new(),
            selectors: Selectors::default(),
        }
    }

    fn region(id: u8, prefixes: &[&str]) -> Region {
        let mut r = Region {
            name: format!("r{id}"),
            id,
            v4: Vec::new(),
            v6: Vec::new(),
        };
        for p in prefixes {
            match p.parse().unwrap() {
                IpNetwork::V4(n) => r.v4.push(n),
                IpNetwork::V6(n) => r.v6.push(n),
            }
        }
        r
    }

    fn policy(regions: Vec<Region>, classes: Vec<Class>) -> LoadedPolicy {
        LoadedPolicy {
            path: "p.yaml".into(),
            sha256: String::new(),
            sources: Vec::new(),
            version: 1,
            mode: Mode::Enforce,
            egress_interfaces: None,
            gateway_interfaces: Vec::new(),
            excluded_interfaces: Vec::new(),
            exempt: Vec::new(),
            nat64_prefixes: Vec::new(),
            host_essentials: crate::policy::HostEssentials::default(),
            regions,
            classes,
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNetwork> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_class_is_denied_some_destination_unless_it_may_reach_every_region_and_unknown() {
        let regions = || (1..=3).map(|id| region(id, &[])).collect::<Vec<_>>();
        for (allow, unknown, expected) in [
            (vec![1, 3], UnknownRule::Allow, 1),
            (vec![1, 2, 3], UnknownRule::Deny, 1),
            (vec![3, 1, 2], UnknownRule::Allow, 0),
        ] {
            let mut c = class(0);
            c.allow = allow.clone();
            c.unknown = unknown;
            let spec = policy(regions(), vec![c]).compile().policy.classes[0];
            assert_eq!(
                spec.some_destination_denied, expected,
                "{allow:?} {unknown:?}"
            );
        }
    }

    #[test]
    fn class_specs_carry_every_selector() {
        let mut c = class(0);
        c.mode = Mode::Audit;
        c.unknown = UnknownRule::Allow;
        c.allow = vec![1, 3];
        c.selectors.dscp = vec![0, 10, 63];
        c.selectors.protocols = vec![6, 132];
        c.selectors.marks = vec![MarkMatch {
            value: 0x10,
            mask: 0xff,
        }];
        c.selectors.port_ranges = vec![(443, 443), (9000, 9100)];
        let mut d = class(1);
        d.selectors.cgroups = vec![("/a".into(), 42)];
        let compiled = policy(Vec::new(), vec![c, d]).compile();
        let header = compiled.policy.header;
        assert_eq!((header.loaded, header.n_classes), (1, 2));
        assert_eq!(
            header.selectors_in_use,
            selector::DSCP
                | selector::PROTOCOL
                | selector::MARK
                | selector::DST_PORT
                | selector::CGROUP
        );
        assert_eq!(
            (
                header.generation,
                header.events_per_sec,
                header.events_burst
            ),
            (0, 0, 0)
        );
        let spec = compiled.policy.classes[0];
        assert_eq!(spec.mode, MODE_AUDIT);
        assert_eq!(spec.unknown_denied, 0);
        assert!(bit_is_set(&spec.allowed_regions, 1));
        assert!(bit_is_set(&spec.allowed_regions, 3));
        assert!(!bit_is_set(&spec.allowed_regions, 2));
        assert_eq!(spec.dscp, 1 | 1 << 10 | 1 << 63);
        assert!(bit_is_set(&spec.protocols, 6) && bit_is_set(&spec.protocols, 132));
        assert_eq!(spec.n_marks, 1);
        assert_eq!(
            spec.marks[0],
            MarkMatch {
                value: 0x10,
                mask: 0xff
            }
        );
        assert_eq!(spec.n_port_ranges, 2);
        assert_eq!(
            spec.port_ranges[1],
            PortRange {
                first: 9000,
                last: 9100
            }
        );
        let spec = compiled.policy.classes[1];
        assert_eq!((spec.mode, spec.unknown_denied), (MODE_ENFORCE, 1));
        assert_eq!(spec.selectors, selector::CGROUP);
        assert_eq!(compiled.policy.classes[2], ClassSpec::EMPTY);
        assert_eq!(compiled.cgroups, vec![(42, 0b10)]);
    }

    #[test]
    fn cgroup_masks_combine_classes() {
        let mut a = class(0);
        a.selectors.cgroups = vec![("/x".into(), 7), ("/y".into(), 9)];
        let mut b = class(1);
        b.selectors.cgroups = vec![("/x".into(), 7)];
        let compiled = policy(Vec::new(), vec![a, b]).compile();
        assert_eq!(compiled.cgroups, vec![(7, 0b11), (9, 0b01)]);
    }

    #[test]
    fn region_tables_keep_ids_and_longest_prefix_wins() {
        let p = policy(
            vec![
                region(1, &["10.0.0.0/8", "172.16.0.0/12", "2001:db8::/32"]),
                region(2, &["10.1.0.0/16", "0.0.0.0/0"]),
            ],
            Vec::new(),
        );
        let compiled = p.compile();
        let shown: Vec<String> = compiled
            .regions_v4
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(
            shown,
            ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "172.16.0.0/12"],
            "address order, outer prefixes first"
        );
        let at = |s: &str| compiled.region_of(s.parse().unwrap());
        assert_eq!(at("10.1.2.3"), 2);
        assert_eq!(at("10.2.0.1"), 1);
        assert_eq!(at("172.20.0.1"), 1);
        assert_eq!(at("192.0.2.1"), 2);
        assert_eq!(at("2001:db8::1"), 1);
        assert_eq!(at("2001:db9::1"), RegionId::from(REGION_NONE));
    }

    #[test]
    fn exempt_lookup_covers_both_families() {
        let mut p = policy(Vec::new(), Vec::new());
        p.exempt = nets(&["10.0.0.0/8", "fd00::/8", "10.0.0.0/8"]);
        let compiled = p.compile();
        assert_eq!(compiled.exempt_v4.len(), 1);
        assert!(compiled.is_exempt("10.9.9.9".parse().unwrap()));
        assert!(compiled.is_exempt("fd12::1".parse().unwrap()));
        assert!(!compiled.is_exempt("11.0.0.1".parse().unwrap()));
        assert!(!compiled.is_exempt("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn src_masks_include_every_covering_class() {
        let mut a = class(0);
        a.selectors.src_cidrs = nets(&["10.0.0.0/8"]);
        let mut b = class(1);
        b.selectors.src_cidrs = nets(&["10.1.0.0/16", "2001:db8::/32"]);
        let mut c = class(2);
        c.selectors.src_cidrs = nets(&["10.1.2.0/24", "10.0.0.0/8"]);
        let compiled = policy(Vec::new(), vec![a, b, c]).compile();
        let mask_of = |s: &str| {
            let n: Ipv4Network = s.parse().unwrap();
            compiled.src_v4.iter().find(|(p, _)| *p == n).unwrap().1
        };
        assert_eq!(compiled.src_v4.len(), 3, "10.0.0.0/8 appears once");
        assert_eq!(mask_of("10.0.0.0/8"), 0b101);
        assert_eq!(mask_of("10.1.0.0/16"), 0b111);
        assert_eq!(mask_of("10.1.2.0/24"), 0b111);
        let at = |s: &str| compiled.src_classes(s.parse().unwrap());
        assert_eq!(at("10.1.2.3"), 0b111);
        assert_eq!(at("10.1.3.1"), 0b111);
        assert_eq!(at("10.2.0.1"), 0b101);
        assert_eq!(at("11.0.0.1"), 0);
        assert_eq!(at("2001:db8::5"), 0b010);
    }

    fn brute_force_region(p: &LoadedPolicy, addr: IpAddr) -> RegionId {
        let mut best: Option<(u8, u8)> = None;
        for r in &p.regions {
            let nets = r.v4.iter().map(|&n| IpNetwork::V4(n));
            for n in nets.chain(r.v6.iter().map(|&n| IpNetwork::V6(n))) {
                if n.contains(addr) && best.is_none_or(|(len, _)| n.prefix() > len) {
                    best = Some((n.prefix(), r.id));
                }
            }
        }
        best.map_or(RegionId::from(REGION_NONE), |(_, id)| RegionId::from(id))
    }

    fn brute_force_src(p: &LoadedPolicy, addr: IpAddr) -> ClassMask {
        p.classes
            .iter()
            .filter(|c| c.selectors.src_cidrs.iter().any(|n| n.contains(addr)))
            .fold(0, |acc, c| acc | 1 << c.id)
    }

    /// Prefixes clustered in a few /8s (and a /16 for IPv6), so random prefixes nest
    /// and random addresses often land in them.
    fn any_v4_net() -> impl Strategy<Value = IpNetwork> {
        (0u32..4, any::<u32>(), 0u8..=32).prop_map(|(top, low, len)| {
            let addr = Ipv4Addr::from((10 + top) << 24 | low >> 8);
            let net = Ipv4Network::new(addr, len).unwrap();
            IpNetwork::V4(Ipv4Network::new(net.network(), len).unwrap())
        })
    }

    fn any_v6_net() -> impl Strategy<Value = IpNetwork> {
        (0u128..4, any::<u128>(), 0u8..=128).prop_map(|(top, low, len)| {
            let addr = Ipv6Addr::from(0x2001_0db8_u128 << 96 | top << 80 | low >> 48);
            let net = Ipv6Network::new(addr, len).unwrap();
            IpNetwork::V6(Ipv6Network::new(net.network(), len).unwrap())
        })
    }

    fn any_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..4, any::<u32>())
                .prop_map(|(top, low)| IpAddr::V4(Ipv4Addr::from((10 + top) << 24 | low >> 8))),
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            (0u128..4, any::<u128>()).prop_map(|(top, low)| IpAddr::V6(Ipv6Addr::from(
                0x2001_0db8_u128 << 96 | top << 80 | low >> 48
            ))),
        ]
    }

    /// Prefixes spread over regions the way validation allows: an exact prefix belongs to
    /// the first region that lists it, later repeats are dropped.
    fn build(assignments: Vec<(u8, IpNetwork)>, n_regions: u8) -> LoadedPolicy {
        let mut regions: Vec<Region> = (1..=n_regions).map(|id| region(id, &[])).collect();
        let mut seen = std::collections::HashSet::new();
        for (r, net) in assignments {
            if !seen.insert(net) {
                continue;
            }
            let region = &mut regions[usize::from(r % n_regions)];
            match net {
                IpNetwork::V4(n) => region.v4.push(n),
                IpNetwork::V6(n) => region.v6.push(n),
            }
        }
        policy(regions, Vec::new())
    }

    proptest! {
        #[test]
        fn region_of_matches_brute_force(
            n_regions in 1u8..6,
            assignments in prop::collection::vec(
                (any::<u8>(), prop_oneof![any_v4_net(), any_v6_net()]),
                0..40,
            ),
            addrs in prop::collection::vec(any_addr(), 1..40),
        ) {
            let p = build(assignments, n_regions);
            let compiled = p.compile();
            for addr in addrs {
                prop_assert_eq!(compiled.region_of(addr), brute_force_region(&p, addr), "{}", addr);
            }
        }

        #[test]
        fn src_classes_match_brute_force(
            lists in prop::collection::vec(
                prop::collection::vec(prop_oneof![any_v4_net(), any_v6_net()], 1..6),
                1..=MAX_CLASSES,
            ),
            addrs in prop::collection::vec(any_addr(), 1..40),
        ) {
            let classes = lists
                .into_iter()
                .enumerate()
                .map(|(i, src)| {
                    let mut c = class(i as u8);
                    c.selectors.src_cidrs = src;
                    c
                })
                .collect();
            let p = policy(Vec::new(), classes);
            let compiled = p.compile();
            for addr in addrs {
                prop_assert_eq!(compiled.src_classes(addr), brute_force_src(&p, addr), "{}", addr);
            }
        }
    }
}
