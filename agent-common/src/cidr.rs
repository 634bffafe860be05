//! CIDR text, read one way everywhere: policies and region files (the agent), the bench,
//! and `cargo xtask regions`, which turns cloud-provider lists into region files. Each
//! caller decides what host bits mean to it: the agent refuses them, xtask clears them.

use core::net::IpAddr;

/// `ADDRESS/LENGTH` as written, or a bare address as a host prefix (/32, /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The address as written: host bits may be set.
    pub addr: IpAddr,
    pub len: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidrError {
    /// Not an address, or a length that is not one to three digits.
    Syntax,
    /// A length beyond the family's width.
    PrefixTooLong { len: u32, max: u8 },
}

/// Parses `ADDRESS/LENGTH`, or a bare address.
pub fn parse(text: &str) -> Result<Cidr, CidrError> {
    // A byte search: `split_once('/')` goes through the generic char searcher, which
    // dominated the time to read a million-prefix region file.
    let slash = text.bytes().position(|b| b == b'/');
    let (addr, len) = match slash.map(|i| (&text[..i], &text[i + 1..])) {
        Some((addr, len)) => {
            if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CidrError::Syntax);
            }
            (
                addr,
                Some(len.parse::<u32>().map_err(|_| CidrError::Syntax)?),
            )
        }
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| CidrError::Syntax)?;
    let max = width(addr);
    let len = len.unwrap_or(u32::from(max));
    if len > u32::from(max) {
        return Err(CidrError::PrefixTooLong { len, max });
    }
    Ok(Cidr {
        addr,
        len: len as u8,
    })
}

/// 32 or 128.
pub fn width(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl Cidr {
    /// The address bits, in the low 32 bits for IPv4.
    pub fn bits(&self) -> u128 {
        match self.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        }
    }

    /// The network address: the host bits cleared.
    pub fn network(&self) -> IpAddr {
        let w = u32::from(width(self.addr));
        let host = u32::from(w as u8 - self.len);
        let mask = if host == 0 {
            0
        } else {
            u128::MAX >> (128 - host)
        };
        let bits = self.bits() & !mask;
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4((bits as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(bits.into()),
        }
    }

    /// Whether bits beyond the prefix are set (`10.0.0.1/8`).
    pub fn has_host_bits(&self) -> bool {
        self.network() != self.addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_prefixes_and_bare_addresses() {
        let c = parse("10.1.2.3/8").unwrap();
        assert_eq!((c.len, c.has_host_bits()), (8, true));
        assert_eq!(c.network(), "10.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(parse("2001:db8::").unwrap().len, 128);
        assert_eq!(
            parse("0.0.0.0/0").unwrap().network(),
            parse("0.0.0.0").unwrap().addr
        );
        assert_eq!(
            parse("10.0.0.0/33"),
            Err(CidrError::PrefixTooLong { len: 33, max: 32 })
        );
        for bad in ["10.0.0.0/", "10.0.0.0/0032", "10.0.0/8", "x", "10.0.0.0/-1"] {
            assert_eq!(parse(bad), Err(CidrError::Syntax), "{bad}");
        }
    }
}
