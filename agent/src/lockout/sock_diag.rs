//! The TCP sockets of the agent's network namespace, asked of the kernel over
//! sock_diag netlink (what `ss` uses). `/proc/net/tcp` lists the same sockets as text,
//! but each read of it walks the kernel's whole established-socket hash, a cost that
//! grows with the host's memory rather than with its sockets (10 ms of a 70 ms reload on
//! a host with no sockets at all); a dump asks for the two states that matter.
#![forbid(unsafe_code)]

use std::{io, net::SocketAddr};

use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use super::proc_net::{TcpSocket, unmapped};

/// The listening and established TCP sockets of the calling thread's network namespace,
/// IPv4 and IPv6.
pub fn tcp_sockets() -> io::Result<Vec<TcpSocket>> {
    let mut sockets = dump_family(AF_INET, SocketId::new_v4())?;
    sockets.extend(dump_family(AF_INET6, SocketId::new_v6())?);
    Ok(sockets)
}

fn dump_family(family: u8, socket_id: SocketId) -> io::Result<Vec<TcpSocket>> {
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::ESTABLISHED | StateFlags::LISTEN,
        socket_id,
    });
    Ok(crate::netlink::dump(NETLINK_SOCK_DIAG, request)?
        .into_iter()
        .filter_map(|message| match message {
            SockDiagMessage::InetResponse(response) => {
                let header = &response.header;
                let id = &header.socket_id;
                Some(TcpSocket {
                    local: SocketAddr::new(unmapped(id.source_address), id.source_port),
                    remote: SocketAddr::new(unmapped(id.destination_address), id.destination_port),
                    state: header.state,
                    inode: u64::from(header.inode),
                })
            }
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::lockout::proc_net::{ESTABLISHED, LISTEN, read_tcp_sockets};

    /// Real sockets, listed both ways: the dump gives what `/proc/net/tcp` gives for
    /// them, a dual-stack listener's IPv4 client as IPv4 included.
    #[test]
    fn the_dump_lists_the_sockets_proc_net_tcp_lists() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let dual = TcpListener::bind("[::]:0").unwrap();
        let mut ports = vec![
            v4.local_addr().unwrap().port(),
            dual.local_addr().unwrap().port(),
        ];
        let mut held = Vec::new();
        for listener in [&v4, &dual] {
            let port = listener.local_addr().unwrap().port();
            let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            ports.push(client.local_addr().unwrap().port());
            let (server, _) = listener.accept().unwrap();
            held.extend([client, server]);
        }
        let ours = |sockets: Vec<TcpSocket>| {
            let mut mine: Vec<TcpSocket> = sockets
                .into_iter()
                .filter(|s| ports.contains(&s.local.port()))
                .filter(|s| matches!(s.state, ESTABLISHED | LISTEN))
                .collect();
            mine.sort_by_key(|s| (s.local, s.remote, s.inode));
            mine
        };
        let dumped = ours(tcp_sockets().unwrap());
        let read = ours(read_tcp_sockets(std::path::Path::new("/proc/net")).unwrap());
        assert_eq!(dumped, read);
        // Two listeners, and both ends of each connection.
        assert_eq!(dumped.len(), 6, "{dumped:#?}");
        assert!(
            dumped
                .iter()
                .all(|s| s.inode != 0 && s.local.is_ipv4() == s.remote.is_ipv4())
        );
        let dual_port = dual.local_addr().unwrap().port();
        let dual_client = dumped
            .iter()
            .find(|s| s.state == ESTABLISHED && s.local.port() == dual_port)
            .expect("the dual-stack listener's session");
        assert_eq!(dual_client.remote.ip().to_string(), "127.0.0.1");
        drop(held);
    }
}
