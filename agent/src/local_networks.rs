//! Guarding against false drops on local networks. With every interface attached, the
//! bridges and veths toward a host's own containers are judged too, and a class whose
//! policy does not approve a connected subnet would drop traffic that never leaves the
//! host. The agent logs each such subnet when it attaches to an interface, and
//! `datafence check --host` prints them, so an operator can exempt the subnet or
//! exclude the interface before that happens.
#![forbid(unsafe_code)]

use ipnetwork::IpNetwork;
use serde::Serialize;

use crate::policy::{LoadedPolicy, UnknownRule};

/// A connected subnet that some class would deny.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeniedSubnet {
    pub interface: String,
    pub subnet: IpNetwork,
    /// The region that holds the subnet, if one does.
    pub region: Option<String>,
    /// The classes that would deny (or, in audit mode, report) traffic to it.
    pub classes: Vec<String>,
}

/// Whether `outer` holds all of `inner`.
fn covers(outer: IpNetwork, inner: IpNetwork) -> bool {
    outer.is_ipv4() == inner.is_ipv4()
        && outer.prefix() <= inner.prefix()
        && outer.contains(inner.network())
}

/// Whether two prefixes share any address.
fn overlaps(a: IpNetwork, b: IpNetwork) -> bool {
    covers(a, b) || covers(b, a)
}

fn region_prefixes(region: &crate::policy::Region) -> impl Iterator<Item = IpNetwork> + '_ {
    region
        .v4
        .iter()
        .map(|n| IpNetwork::V4(*n))
        .chain(region.v6.iter().map(|n| IpNetwork::V6(*n)))
}

/// The classes that would deny some traffic to `subnet`, with the region holding it.
/// A subnet an exemption covers (or loopback and link-local) is never denied. Otherwise
/// a class denies it if the region holding it is not one it may reach (or no region
/// holds it and the class denies unknown destinations), or if a part of it lies in a
/// region the class may not reach.
pub fn denying_classes(policy: &LoadedPolicy, subnet: IpNetwork) -> (Option<String>, Vec<String>) {
    if builtin_exempt_subnet(subnet)
        || crate::lockout::uncovered(&policy.exempt, &[subnet]).is_empty()
    {
        return (None, Vec::new());
    }
    // The region holding the whole subnet: the longest prefix that covers it.
    let holder = policy
        .regions
        .iter()
        .flat_map(|r| region_prefixes(r).map(move |p| (r, p)))
        .filter(|(_, p)| covers(*p, subnet))
        .max_by_key(|(_, p)| p.prefix())
        .map(|(r, _)| r);
    // Regions holding a part of it.
    let inside: Vec<u8> = policy
        .regions
        .iter()
        .filter(|r| region_prefixes(r).any(|p| overlaps(p, subnet) && p.prefix() > subnet.prefix()))
        .map(|r| r.id)
        .collect();
    let classes = policy
        .classes
        .iter()
        .filter(|c| {
            let holder_denied = match holder {
                Some(r) => !c.allow.contains(&r.id),
                None => c.unknown == UnknownRule::Deny,
            };
            holder_denied || inside.iter().any(|id| !c.allow.contains(id))
        })
        .map(|c| c.name.clone())
        .collect();
    (holder.map(|r| r.name.clone()), classes)
}

/// Loopback and link-local subnets, which the datapath always lets through (the ranges
/// of `datafence_common::parse::is_builtin_exempt`).
fn builtin_exempt_subnet(subnet: IpNetwork) -> bool {
    let builtin: [IpNetwork; 4] = [
        "127.0.0.0/8".parse().expect("prefix"),
        "169.254.0.0/16".parse().expect("prefix"),
        "::1/128".parse().expect("prefix"),
        "fe80::/10".parse().expect("prefix"),
    ];
    builtin.iter().any(|b| covers(*b, subnet))
}

/// What the agent last found about the local networks of its interfaces, so that it
/// logs a subnet once, not at every check.
#[derive(Debug, Default)]
pub struct LocalNetworks {
    policy_sha256: String,
    subnets: Vec<(String, IpNetwork)>,
    denied: Vec<DeniedSubnet>,
}

impl LocalNetworks {
    /// Brings the findings up to date with `subnets` under `policy`, and returns the
    /// denied subnets not reported before (all of them after a policy change).
    pub fn update(
        &mut self,
        policy: &LoadedPolicy,
        subnets: Vec<(String, IpNetwork)>,
    ) -> Vec<DeniedSubnet> {
        let same_policy = self.policy_sha256 == policy.sha256;
        if same_policy && self.subnets == subnets {
            return Vec::new();
        }
        let denied = denied_subnets(policy, subnets.iter().cloned());
        let new = denied
            .iter()
            .filter(|d| !same_policy || !self.denied.contains(d))
            .cloned()
            .collect();
        *self = Self {
            policy_sha256: policy.sha256.clone(),
            subnets,
            denied,
        };
        new
    }
}

/// The subnets of `subnets` (interface, subnet) that some class would deny.
pub fn denied_subnets(
    policy: &LoadedPolicy,
    subnets: impl IntoIterator<Item = (String, IpNetwork)>,
) -> Vec<DeniedSubnet> {
    subnets
        .into_iter()
        .filter_map(|(interface, subnet)| {
            let (region, classes) = denying_classes(policy, subnet);
            (!classes.is_empty()).then_some(DeniedSubnet {
                interface,
                subnet,
                region,
                classes,
            })
        })
        .collect()
}

/// The connected subnets that some class of `policy` would deny on the interfaces it
/// would attach TC egress to in this namespace now, for `datafence check --host`.
pub fn on_this_host(policy: &LoadedPolicy) -> std::io::Result<Vec<DeniedSubnet>> {
    let interfaces = match &policy.egress_interfaces {
        Some(list) => list.clone(),
        None => crate::links::every_interface(policy)?.0,
    };
    Ok(denied_subnets(policy, connected_subnets_of(&interfaces)?))
}

/// The connected subnets of the named interfaces, as the kernel reports them now.
pub fn connected_subnets_of(interfaces: &[String]) -> std::io::Result<Vec<(String, IpNetwork)>> {
    let links = crate::links::all()?;
    Ok(crate::links::connected_subnets()?
        .into_iter()
        .filter_map(|(index, subnet)| {
            let link = links.iter().find(|l| l.index == index)?;
            interfaces
                .contains(&link.name)
                .then(|| (link.name.clone(), subnet))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LoadedPolicy {
        let yaml = "version: 1\nexempt: [10.0.0.0/16]\nregions:\n  eu:\n    cidrs: [192.0.2.0/24, 172.16.0.0/12]\n  us:\n    cidrs: [198.51.100.0/24, 172.17.5.0/24]\ndata_classes:\n  user-data:\n    match: {marks: [{value: 1}]}\n    allow: [eu]\n  open:\n    match: {marks: [{value: 2}]}\n    allow: [eu, us]\n    unknown: allow\n";
        crate::policy::parse_policy_str(
            yaml,
            std::path::Path::new("policy.yaml"),
            &crate::policy::LoadOptions::default(),
        )
        .expect("valid policy")
    }

    fn denying(subnet: &str) -> (Option<String>, Vec<String>) {
        denying_classes(&policy(), subnet.parse().expect("subnet"))
    }

    #[test]
    fn a_subnet_is_denied_by_the_classes_that_may_not_reach_its_region() {
        assert_eq!(denying("192.0.2.0/26"), (Some("eu".into()), vec![]));
        assert_eq!(
            denying("198.51.100.0/24"),
            (Some("us".into()), vec!["user-data".into()])
        );
        // No region: denied by the classes that deny unknown destinations.
        assert_eq!(denying("203.0.113.0/24"), (None, vec!["user-data".into()]));
    }

    #[test]
    fn a_part_in_another_region_counts() {
        // 172.16.0.0/12 is eu, but 172.17.5.0/24 inside it is us.
        assert_eq!(
            denying("172.17.0.0/16"),
            (Some("eu".into()), vec!["user-data".into()])
        );
    }

    #[test]
    fn exempt_loopback_and_link_local_subnets_are_never_denied() {
        for subnet in ["10.0.3.0/24", "127.0.0.0/8", "169.254.0.0/16", "fe80::/64"] {
            assert_eq!(denying(subnet), (None, vec![]), "{subnet}");
        }
        // Wider than the exemption: the rest of it is not exempt.
        assert_eq!(denying("10.0.0.0/8"), (None, vec!["user-data".into()]));
    }

    #[test]
    fn the_builtin_ranges_are_the_datapaths() {
        use datafence_common::{FAMILY_V4, FAMILY_V6, parse::is_builtin_exempt};
        for (subnet, inside, outside) in [
            ("127.0.0.0/8", "127.255.255.255", "128.0.0.0"),
            ("169.254.0.0/16", "169.254.255.255", "169.255.0.0"),
            ("fe80::/10", "febf:ffff::1", "fec0::"),
        ] {
            let net: IpNetwork = subnet.parse().expect("subnet");
            assert!(builtin_exempt_subnet(net));
            for (addr, expected) in [(inside, true), (outside, false)] {
                let ip: std::net::IpAddr = addr.parse().expect("address");
                let (family, bytes) = match ip {
                    std::net::IpAddr::V4(a) => {
                        let mut b = [0u8; 16];
                        b[..4].copy_from_slice(&a.octets());
                        (FAMILY_V4, b)
                    }
                    std::net::IpAddr::V6(a) => (FAMILY_V6, a.octets()),
                };
                assert_eq!(is_builtin_exempt(family, &bytes), expected, "{addr}");
                assert_eq!(
                    builtin_exempt_subnet(IpNetwork::from(ip)),
                    expected,
                    "{addr}"
                );
            }
        }
    }
}
