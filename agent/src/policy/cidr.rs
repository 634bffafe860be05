//! CIDR parsing and the prefix arithmetic shared by validation, compilation and lookups.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use datafence_common::cidr;

use super::error::CidrProblem;

/// Parses `ADDRESS/LENGTH`, or a bare address as a host prefix (/32, /128).
///
/// Stricter than `IpNetwork::from_str` on purpose: a prefix with host bits set is refused,
/// because `10.0.0.1/8` almost always means the writer expected something other than
/// 10.0.0.0/8, and silently widening it would hide the slip.
pub(super) fn parse_cidr(text: &str) -> Result<IpNetwork, CidrProblem> {
    let syntax = || CidrProblem::Syntax(super::trusted::excerpt(text));
    let cidr = datafence_common::cidr::parse(text).map_err(|e| match e {
        cidr::CidrError::Syntax => syntax(),
        cidr::CidrError::PrefixTooLong { len, max } => CidrProblem::PrefixTooLong {
            text: text.to_owned(),
            len,
            max,
        },
    })?;
    let net = IpNetwork::new(cidr.network(), cidr.len).map_err(|_| syntax())?;
    if cidr.has_host_bits() {
        return Err(CidrProblem::HostBits {
            text: text.to_owned(),
            suggestion: format!("{}/{}", net.network(), cidr.len),
        });
    }
    Ok(net)
}

/// The entries of a region file: one CIDR per line; `#` starts a comment, and blank
/// lines are skipped. Each entry comes with its line and column (both from 1), for error
/// messages. The policy's region files and the bench's catalogue are read with this.
pub fn region_file_entries(text: &str) -> impl Iterator<Item = (usize, usize, &str)> {
    text.lines().enumerate().filter_map(|(n, line)| {
        let content = line.split('#').next().unwrap_or_default();
        let entry = content.trim();
        if entry.is_empty() {
            return None;
        }
        let indent = &content[..content.len() - content.trim_start().len()];
        Some((n + 1, indent.chars().count() + 1, entry))
    })
}

/// A prefix of either family as plain integers, so lookups and containment tests need
/// one implementation. The address bits sit in the low `WIDTH` bits.
pub(super) trait Prefix: Copy {
    type Addr: Copy;
    const WIDTH: u8;
    fn len(&self) -> u8;
    fn bits(&self) -> u128;
    /// The address as written, host bits and all: no mask to compute.
    fn written_bits(&self) -> u128;
    fn addr_bits(addr: Self::Addr) -> u128;
    /// The same prefix with its host bits cleared.
    fn without_host_bits(&self) -> Self;
}

impl Prefix for Ipv4Network {
    type Addr = Ipv4Addr;
    const WIDTH: u8 = 32;
    fn len(&self) -> u8 {
        self.prefix()
    }
    fn bits(&self) -> u128 {
        u128::from(u32::from(self.network()))
    }
    fn written_bits(&self) -> u128 {
        u128::from(u32::from(self.ip()))
    }
    fn addr_bits(addr: Ipv4Addr) -> u128 {
        u128::from(u32::from(addr))
    }
    fn without_host_bits(&self) -> Self {
        Ipv4Network::new(self.network(), self.prefix()).expect("the length is valid already")
    }
}

impl Prefix for Ipv6Network {
    type Addr = Ipv6Addr;
    const WIDTH: u8 = 128;
    fn len(&self) -> u8 {
        self.prefix()
    }
    fn bits(&self) -> u128 {
        u128::from(self.network())
    }
    fn written_bits(&self) -> u128 {
        u128::from(self.ip())
    }
    fn addr_bits(addr: Ipv6Addr) -> u128 {
        u128::from(addr)
    }
    fn without_host_bits(&self) -> Self {
        Ipv6Network::new(self.network(), self.prefix()).expect("the length is valid already")
    }
}

/// `bits` with everything past the first `len` of `width` bits cleared.
pub(super) fn truncate(bits: u128, len: u8, width: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let keep = u128::MAX << (128 - u32::from(len));
    bits & (keep >> (128 - u32::from(width)))
}

/// The order [`lpm`] needs: by network, then by length. That is address order, outer
/// prefixes before the ones they hold, the order the range tables are drawn in
/// (`rangetable::Boundaries::of`): a compiled policy's lists reach them without
/// another sort.
pub(super) fn sort_key<P: Prefix>(p: &P) -> (u128, u8) {
    (p.bits(), p.len())
}

/// Longest-prefix match over entries sorted by [`sort_key`] with no duplicate prefixes:
/// one binary search per prefix length, longest first.
pub(super) fn lpm<P: Prefix, T: Copy>(entries: &[(P, T)], addr: P::Addr) -> Option<T> {
    debug_assert!(entries.is_sorted_by_key(|(p, _)| sort_key(p)));
    let bits = P::addr_bits(addr);
    (0..=P::WIDTH).rev().find_map(|len| {
        let key = (truncate(bits, len, P::WIDTH), len);
        entries
            .binary_search_by_key(&key, |(p, _)| sort_key(p))
            .ok()
            .map(|i| entries[i].1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> String {
        parse_cidr(s).unwrap().to_string()
    }

    fn err(s: &str) -> String {
        parse_cidr(s).unwrap_err().to_string()
    }

    #[test]
    fn accepts_prefixes_and_bare_addresses() {
        assert_eq!(ok("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(ok("0.0.0.0/0"), "0.0.0.0/0");
        assert_eq!(ok("192.0.2.7"), "192.0.2.7/32");
        assert_eq!(ok("2001:db8:100::/48"), "2001:db8:100::/48");
        assert_eq!(ok("::1"), "::1/128");
    }

    #[test]
    fn refuses_host_bits_with_a_suggestion() {
        assert_eq!(
            err("10.0.0.1/8"),
            "`10.0.0.1/8` has host bits set; did you mean 10.0.0.0/8?"
        );
        assert_eq!(
            err("2001:db8::1/32"),
            "`2001:db8::1/32` has host bits set; did you mean 2001:db8::/32?"
        );
    }

    #[test]
    fn refuses_malformed_text() {
        for s in [
            "10/8",
            "1.2.3",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "010.0.0.0/8",
            " 10.0.0.0/8",
            "fe80::1%eth0/64",
            "",
        ] {
            assert!(
                err(s).starts_with(&format!("invalid CIDR `{s}`: expected ADDRESS/LENGTH")),
                "{s}"
            );
        }
        assert_eq!(
            err("10.0.0.0/33"),
            "invalid CIDR `10.0.0.0/33`: prefix length 33 is longer than 32"
        );
        assert_eq!(
            err("::/129"),
            "invalid CIDR `::/129`: prefix length 129 is longer than 128"
        );
    }

    #[test]
    fn truncate_clears_host_bits() {
        assert_eq!(truncate(0xffff_ffff, 8, 32), 0xff00_0000);
        assert_eq!(truncate(0xffff_ffff, 32, 32), 0xffff_ffff);
        assert_eq!(truncate(0xffff_ffff, 0, 32), 0);
        assert_eq!(truncate(u128::MAX, 128, 128), u128::MAX);
        assert_eq!(truncate(u128::MAX, 1, 128), 1 << 127);
    }

    #[test]
    fn lpm_prefers_the_longest_prefix() {
        let mut entries: Vec<(Ipv4Network, u32)> = vec![
            ("0.0.0.0/0".parse().unwrap(), 1),
            ("10.0.0.0/8".parse().unwrap(), 2),
            ("10.1.0.0/16".parse().unwrap(), 3),
            ("10.1.2.3/32".parse().unwrap(), 4),
        ];
        entries.sort_by_key(|(p, _)| sort_key(p));
        let at = |s: &str| lpm(&entries, s.parse().unwrap());
        assert_eq!(at("192.0.2.1"), Some(1));
        assert_eq!(at("10.2.0.1"), Some(2));
        assert_eq!(at("10.1.9.9"), Some(3));
        assert_eq!(at("10.1.2.3"), Some(4));
        assert_eq!(
            lpm::<Ipv4Network, u32>(&[], "10.0.0.1".parse().unwrap()),
            None
        );
    }
}
