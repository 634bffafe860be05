//! The inbound SSH sessions established right now: what a reload must not cut off.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeSet, HashSet},
    fmt,
    net::SocketAddr,
};

use super::{
    proc_net::{ESTABLISHED, LISTEN, ReadError, TcpSocket, read_tcp_sockets},
    processes::{Owner, Procfs},
};

/// The port SSH is on unless sshd says otherwise; counted even when no sshd is found
/// listening, since finding it needs ptrace access the agent may lack.
pub const DEFAULT_SSH_PORT: u16 = 22;

/// The name of the process that holds sshd's listening sockets (OpenSSH 9.8 and later
/// run each session in `sshd-session`, which holds no listener).
fn is_sshd(comm: &str) -> bool {
    comm == "sshd"
}

/// An inbound TCP session to an SSH port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshSession {
    /// This host's end: where the replies come from.
    pub local: SocketAddr,
    /// The client's end: where the replies go.
    pub remote: SocketAddr,
    /// The process holding the session's socket, where it could be found.
    pub owner: Option<Owner>,
    /// The cgroup the kernel charges the replies to. An accepted socket keeps the
    /// cgroup its listener was made in, so this is the listener holder's cgroup, else
    /// the session holder's.
    pub cgroup: Option<String>,
}

impl fmt::Display for SshSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "from {} to {}", self.remote, self.local)
    }
}

/// Established sockets whose local port is one of `ports`: sessions clients opened to
/// this host. A connection this host opened to a remote port 22 has an ephemeral local
/// port and is left out.
pub fn inbound_to<'a>(
    sockets: &'a [TcpSocket],
    ports: &'a BTreeSet<u16>,
) -> impl Iterator<Item = &'a TcpSocket> + 'a {
    sockets
        .iter()
        .filter(|s| s.state == ESTABLISHED && ports.contains(&s.local.port()))
}

/// The ports SSH clients connect to: `configured` (`--ssh-port`) when given, else the
/// ports sshd listens on, plus 22.
fn ssh_ports(configured: &[u16], sockets: &[TcpSocket], procfs: &Procfs) -> BTreeSet<u16> {
    if !configured.is_empty() {
        return configured.iter().copied().collect();
    }
    let held_by_sshd = procfs.sockets_of_named(is_sshd);
    sockets
        .iter()
        .filter(|s| s.state == LISTEN && held_by_sshd.contains_key(&s.inode))
        .map(|s| s.local.port())
        .chain([DEFAULT_SSH_PORT])
        .collect()
}

/// The TCP sockets of the agent's network namespace: over sock_diag, or from
/// `/proc/net/tcp` where sock_diag cannot answer (its `tcp_diag` module missing and not
/// loadable, or netlink filtered by a seccomp or LSM policy).
fn tcp_sockets(procfs: &Procfs) -> Result<Vec<TcpSocket>, ReadError> {
    match super::sock_diag::tcp_sockets() {
        Ok(sockets) => Ok(sockets),
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag cannot list the TCP sockets; reading /proc/net/tcp");
            read_tcp_sockets(&procfs.net())
        }
    }
}

/// The inbound SSH sessions of the agent's network namespace, with their holders and
/// cgroups where those can be found.
pub fn established(
    configured_ports: &[u16],
    procfs: &Procfs,
) -> Result<Vec<SshSession>, ReadError> {
    let sockets = tcp_sockets(procfs)?;
    let ports = ssh_ports(configured_ports, &sockets, procfs);
    let sessions: Vec<&TcpSocket> = inbound_to(&sockets, &ports).collect();
    if sessions.is_empty() {
        return Ok(Vec::new());
    }
    let listeners: Vec<&TcpSocket> = sockets
        .iter()
        .filter(|s| s.state == LISTEN && ports.contains(&s.local.port()))
        .collect();
    let wanted: HashSet<u64> = sessions.iter().chain(&listeners).map(|s| s.inode).collect();
    let owners = procfs.owners_of(&wanted);
    let listener_cgroup = |port: u16| {
        listeners
            .iter()
            .filter(|l| l.local.port() == port)
            .find_map(|l| owners.get(&l.inode)?.cgroup.clone())
    };
    Ok(sessions
        .into_iter()
        .map(|s| {
            let owner = owners.get(&s.inode).cloned();
            let cgroup = listener_cgroup(s.local.port())
                .or_else(|| owner.as_ref().and_then(|o| o.cgroup.clone()));
            SshSession {
                local: s.local,
                remote: s.remote,
                owner,
                cgroup,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lockout::proc_net::LISTEN;

    fn socket(local: &str, remote: &str, state: u8) -> TcpSocket {
        TcpSocket {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state,
            inode: 1,
        }
    }

    #[test]
    fn only_established_sessions_to_an_ssh_port_count() {
        let sockets = [
            socket("192.0.2.10:22", "198.51.100.7:51234", ESTABLISHED),
            socket("[2001:db8::10]:2222", "[2001:db8:1::7]:40000", ESTABLISHED),
            // A session on a port that is not SSH's.
            socket("192.0.2.10:8080", "198.51.100.7:51235", ESTABLISHED),
            // An outbound connection to another host's SSH.
            socket("192.0.2.10:51236", "198.51.100.7:22", ESTABLISHED),
            socket("0.0.0.0:22", "0.0.0.0:0", LISTEN),
            // A session being closed.
            socket("192.0.2.10:22", "198.51.100.7:51237", 0x06),
        ];
        let ports = BTreeSet::from([22, 2222]);
        let found: Vec<_> = inbound_to(&sockets, &ports)
            .map(|s| s.remote.to_string())
            .collect();
        assert_eq!(found, ["198.51.100.7:51234", "[2001:db8:1::7]:40000"]);
    }

    #[test]
    fn configured_ports_replace_the_ones_found() {
        let procfs = Procfs::new("/nonexistent");
        assert_eq!(ssh_ports(&[2222], &[], &procfs), BTreeSet::from([2222]));
        assert_eq!(ssh_ports(&[], &[], &procfs), BTreeSet::from([22]));
    }
}
