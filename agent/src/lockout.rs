//! Never lock the host out: the addresses it is managed from must stay reachable.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use datafence_common::{FAMILY_V4, FAMILY_V6, parse::is_builtin_exempt};
use ipnetwork::IpNetwork;

/// The SSH client's address from `SSH_CONNECTION` ("client port server port"), if this
/// process runs under SSH.
pub fn ssh_client() -> Option<IpNetwork> {
    let conn = std::env::var("SSH_CONNECTION").ok()?;
    let addr: IpAddr = conn.split_whitespace().next()?.parse().ok()?;
    Some(IpNetwork::from(addr))
}

fn builtin_exempt(addr: IpAddr) -> bool {
    let mut bytes = [0u8; 16];
    let family = match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            FAMILY_V4
        }
        IpAddr::V6(a) => {
            bytes = a.octets();
            FAMILY_V6
        }
    };
    is_builtin_exempt(family, &bytes)
}

/// The management networks that `exempt` does not cover in full.
pub fn uncovered(exempt: &[IpNetwork], management: &[IpNetwork]) -> Vec<IpNetwork> {
    management
        .iter()
        .filter(|m| {
            let covered = exempt
                .iter()
                .any(|e| e.prefix() <= m.prefix() && e.contains(m.network()));
            let host = m.prefix() == if m.is_ipv4() { 32 } else { 128 };
            let always_reachable = host && builtin_exempt(m.ip());
            !covered && !always_reachable
        })
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNetwork> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn management_inside_an_exemption_is_covered() {
        let exempt = nets(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        assert!(
            uncovered(
                &exempt,
                &nets(&["10.1.2.3/32", "10.2.0.0/16", "2001:db8:ffff::5/128"])
            )
            .is_empty()
        );
    }

    #[test]
    fn management_outside_or_wider_than_the_exemptions_is_reported() {
        let exempt = nets(&["10.0.0.0/16"]);
        assert_eq!(
            uncovered(&exempt, &nets(&["192.0.2.7/32", "10.0.0.0/8"])),
            nets(&["192.0.2.7/32", "10.0.0.0/8"])
        );
    }

    #[test]
    fn loopback_and_link_local_management_is_always_covered() {
        assert!(uncovered(&[], &nets(&["127.0.0.1/32", "fe80::1/128"])).is_empty());
    }
}
