//! The TCP sockets of the agent's network namespace, as `/proc/net/tcp` and
//! `/proc/net/tcp6` list them.
#![forbid(unsafe_code)]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

/// `st` of a connection both ends have set up (`TCP_ESTABLISHED` in the kernel).
pub const ESTABLISHED: u8 = 0x01;
/// `st` of a listening socket (`TCP_LISTEN`).
pub const LISTEN: u8 = 0x0A;

/// One TCP socket, as a line of `/proc/net/tcp` or `/proc/net/tcp6` or a sock_diag answer
/// gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    /// IPv4-mapped IPv6 addresses (a dual-stack socket's IPv4 peers) are given as the
    /// IPv4 addresses they are, which is what their packets carry.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    /// The socket's inode, as `/proc/<pid>/fd/*` links name it (`socket:[inode]`).
    pub inode: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read the TCP socket table {path}: {source}")]
pub struct ReadError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The TCP sockets of the calling process's network namespace, IPv4 and IPv6. A host
/// without IPv6 has no `tcp6`, which is not an error.
pub fn read_tcp_sockets(proc_net: &Path) -> Result<Vec<TcpSocket>, ReadError> {
    let mut sockets = Vec::new();
    for (name, required) in [("tcp", true), ("tcp6", false)] {
        let path = proc_net.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => sockets.extend(parse_table(&text)),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ReadError { path, source }),
        }
    }
    Ok(sockets)
}

/// Every socket line of a table; the header and lines that do not parse are skipped
/// (the format has not changed since Linux 2.6, but a line we cannot read must not
/// stop the others from being checked).
pub fn parse_table(text: &str) -> impl Iterator<Item = TcpSocket> + '_ {
    text.lines().skip(1).filter_map(parse_line)
}

/// `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`, with addresses and
/// ports in hex.
pub fn parse_line(line: &str) -> Option<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().take(10).collect();
    let [_, local, remote, state, _, _, _, _, _, inode] = fields[..] else {
        return None;
    };
    Some(TcpSocket {
        local: parse_endpoint(local)?,
        remote: parse_endpoint(remote)?,
        state: u8::from_str_radix(state, 16).ok()?,
        inode: inode.parse().ok()?,
    })
}

/// `ADDR:PORT`. The port is printed in host order; the address is the kernel's
/// network-order bytes printed as native 32-bit words (`%08X` each), so every word is
/// turned back into its bytes in native order.
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = [0u8; 16];
    let words = addr.len() / 8;
    if !matches!(words, 1 | 4) || addr.len() % 8 != 0 {
        return None;
    }
    for (i, chunk) in bytes.chunks_exact_mut(4).take(words).enumerate() {
        let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let ip = if words == 1 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        unmapped(IpAddr::V6(Ipv6Addr::from(bytes)))
    };
    Some(SocketAddr::new(ip, port))
}

/// An IPv4-mapped IPv6 address (a dual-stack socket's IPv4 peer) as the IPv4 address its
/// packets carry; any other address as it is.
pub fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

// The sample lines are real, taken on x86_64: the address words are in little-endian
// order there, and the expected addresses hold only on such a host.
#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0A0200C0:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3403198 1 0000000012950496 100 0 0 10 0
   2: 0A0200C0:1F90 0A0200C0:977A 01 00000000:00000000 00:00000000 00000000     0        0 3403200 1 00000000ce13eb13 20 0 0 10 -1
   3: 0A0200C0:C822 0A0200C0:0016 01 00000000:00000000 00:00000000 00000000     0        0 3403194 2 00000000743de09a 20 0 0 10 -1
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3403193 1 0000000004e2fbca 100 0 0 10 0
   1: 0000000000000000FFFF00000A0200C0:0016 0000000000000000FFFF00000A0200C0:C822 01 00000000:00000000 00:00000000 00000000     0        0 3403195 1 00000000f3998181 20 0 0 10 -1
   3: B80D0120000000000000000010000000:0016 B80D0120000000000000000010000000:C823 01 00000000:00000000 00:00000000 00000000     0        0 3403197 1 000000005eab69ba 20 0 0 10 -1
";

    fn socket(local: &str, remote: &str, state: u8, inode: u64) -> TcpSocket {
        TcpSocket {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state,
            inode,
        }
    }

    #[test]
    fn ipv4_lines_give_addresses_ports_states_and_inodes() {
        assert_eq!(
            parse_table(TCP).collect::<Vec<_>>(),
            [
                socket("192.0.2.10:8080", "0.0.0.0:0", LISTEN, 3_403_198),
                socket(
                    "192.0.2.10:8080",
                    "192.0.2.10:38778",
                    ESTABLISHED,
                    3_403_200
                ),
                socket("192.0.2.10:51234", "192.0.2.10:22", ESTABLISHED, 3_403_194),
            ]
        );
    }

    #[test]
    fn ipv6_lines_give_ipv6_and_mapped_ipv4_addresses() {
        assert_eq!(
            parse_table(TCP6).collect::<Vec<_>>(),
            [
                socket("[::]:22", "[::]:0", LISTEN, 3_403_193),
                // A dual-stack listener's IPv4 client: its packets are IPv4.
                socket("192.0.2.10:22", "192.0.2.10:51234", ESTABLISHED, 3_403_195),
                socket(
                    "[2001:db8::10]:22",
                    "[2001:db8::10]:51235",
                    ESTABLISHED,
                    3_403_197
                ),
            ]
        );
    }

    #[test]
    fn malformed_lines_are_skipped() {
        for line in [
            "",
            "   0: 0A0200C0:1F90",
            "   0: 0A0200C:1F90 00000000:0000 0A 0:0 0:0 0 0 0 1",
            "   0: 0A0200C0:1F90 00000000:0000 0A 0:0 0:0 0 0 0 inode",
            "   0: 0A0200C0:XYZ0 00000000:0000 0A 0:0 0:0 0 0 0 1",
        ] {
            assert_eq!(parse_line(line), None, "{line:?}");
        }
    }
}
