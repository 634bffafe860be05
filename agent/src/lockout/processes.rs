//! Which process holds a socket, and its cgroup, read from `/proc/<pid>/fd`.
//!
//! Reading another process's descriptors needs ptrace access to it. sshd marks its
//! session processes undumpable and holds every capability, so an agent without
//! CAP_SYS_PTRACE (the shipped unit) finds no owners: callers treat every lookup as
//! best effort.
#![forbid(unsafe_code)]

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// `/proc/<pid>/comm`: the name the kernel keeps, at most 15 bytes.
    pub comm: String,
    /// Its cgroup v2 path (the `0::` line of `/proc/<pid>/cgroup`), as policies name
    /// cgroups; `None` where there is no cgroup v2 hierarchy.
    pub cgroup: Option<String>,
}

/// The `/proc` of the host, seen from the agent.
#[derive(Clone, Debug)]
pub struct Procfs {
    root: PathBuf,
}

impl Procfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `<root>/net`: the socket tables of the reader's network namespace.
    pub fn net(&self) -> PathBuf {
        self.root.join("net")
    }

    /// The pids of every process (not thread) visible.
    fn pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    fn comm(&self, pid: u32) -> Option<String> {
        let text = std::fs::read_to_string(self.root.join(pid.to_string()).join("comm")).ok()?;
        Some(text.trim_end_matches('\n').to_owned())
    }

    fn cgroup(&self, pid: u32) -> Option<String> {
        let text = std::fs::read_to_string(self.root.join(pid.to_string()).join("cgroup")).ok()?;
        cgroup_v2_path(&text)
    }

    /// The inodes of the sockets `pid` holds; none when its descriptors cannot be read.
    fn socket_inodes(&self, pid: u32) -> Vec<u64> {
        let dir = self.root.join(pid.to_string()).join("fd");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| socket_inode(&std::fs::read_link(e.ok()?.path()).ok()?))
            .collect()
    }

    fn owner(&self, pid: u32, comm: String) -> Owner {
        Owner {
            pid,
            comm,
            cgroup: self.cgroup(pid),
        }
    }

    /// The sockets held by processes whose name passes `named`, with their holder.
    pub fn sockets_of_named(&self, named: impl Fn(&str) -> bool) -> HashMap<u64, Owner> {
        let mut found = HashMap::new();
        for pid in self.pids() {
            let Some(comm) = self.comm(pid).filter(|c| named(c)) else {
                continue;
            };
            let owner = self.owner(pid, comm);
            for inode in self.socket_inodes(pid) {
                found.entry(inode).or_insert_with(|| owner.clone());
            }
        }
        found
    }

    /// A holder of each of `wanted`, where one can be found. Stops looking once every
    /// socket has one, so a handful of sessions costs a walk of part of `/proc`.
    pub fn owners_of(&self, wanted: &HashSet<u64>) -> HashMap<u64, Owner> {
        let mut found = HashMap::new();
        for pid in self.pids() {
            if found.len() == wanted.len() {
                break;
            }
            let held: Vec<u64> = self
                .socket_inodes(pid)
                .into_iter()
                .filter(|i| wanted.contains(i) && !found.contains_key(i))
                .collect();
            if held.is_empty() {
                continue;
            }
            let owner = self.owner(pid, self.comm(pid).unwrap_or_default());
            for inode in held {
                found.insert(inode, owner.clone());
            }
        }
        found
    }
}

/// `socket:[12345]`, the target of a socket's descriptor link.
fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The path of the `0::PATH` line: the process's cgroup in the v2 hierarchy.
fn cgroup_v2_path(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links_give_their_inode_and_other_links_none() {
        assert_eq!(socket_inode(Path::new("socket:[3403195]")), Some(3_403_195));
        assert_eq!(socket_inode(Path::new("pipe:[3403195]")), None);
        assert_eq!(socket_inode(Path::new("/dev/null")), None);
    }

    #[test]
    fn the_cgroup_is_the_v2_line() {
        let text =
            "12:cpuset:/\n1:name=systemd:/system.slice/ssh.service\n0::/system.slice/ssh.service\n";
        assert_eq!(
            cgroup_v2_path(text).as_deref(),
            Some("/system.slice/ssh.service")
        );
        assert_eq!(cgroup_v2_path("1:name=systemd:/\n"), None);
    }

    #[test]
    fn this_process_is_found_as_the_holder_of_its_socket() {
        use std::os::unix::fs::MetadataExt as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd as _;
            listener.as_raw_fd()
        });
        let inode = std::fs::metadata(&fd).unwrap().ino();
        let owners = Procfs::new("/proc").owners_of(&HashSet::from([inode]));
        let owner = owners.get(&inode).expect("found");
        assert_eq!(owner.pid, std::process::id());
    }
}
