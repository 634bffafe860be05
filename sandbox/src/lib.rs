//! Processes in network namespaces and cgroups, once: the agent (`datafence run`,
//! finding the cgroup2 hierarchy), the namespace tests, `cargo xtask demo` and the bench
//! all start processes this way. A crate of its own because xtask cannot depend on the
//! agent or the tests (their build needs the tools `cargo xtask setup` installs), and
//! the agent should not depend on its tests.
//!
//! Errors are `io::Result`: the tests panic with context, the demo and the agent wrap
//! them. All of the `unsafe` is in [`sys`].

use std::{
    ffi::OsStr,
    fs::File,
    io,
    path::{Path, PathBuf},
    process::Command,
};

mod sys;

/// Where `ip netns add` puts a named namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// A command that runs in the named network namespace, and only that: unlike
/// `ip netns exec` it keeps the caller's mounts (`ip netns exec` remounts /sys, which
/// would hide the cgroup2 hierarchy).
pub fn command_in(netns: &str, program: impl AsRef<OsStr>) -> io::Result<Command> {
    let path = netns_path(netns);
    let ns = File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    let mut cmd = Command::new(program);
    sys::setns_before_exec(&mut cmd, ns);
    Ok(cmd)
}

/// Moves the calling thread into the network namespace `netns` (a file in /run/netns);
/// sockets it opens afterwards belong there.
pub fn enter(netns: &File) -> io::Result<()> {
    sys::setns(netns)
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones (`default` when /proc/self/mounts names
/// none).
pub fn cgroup2_root_or(default: &Path) -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .find_map(|line| {
            let mut cols = line.split_whitespace();
            let (_dev, dir, fstype) = (cols.next()?, cols.next()?, cols.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .unwrap_or_else(|| default.to_owned())
}

/// Makes `cmd` start its process inside the cgroup whose `cgroup.procs` file is given,
/// before it execs: the process is in the cgroup from its first instruction.
pub fn spawn_in_cgroup(cmd: &mut Command, cgroup_procs: &Path) -> io::Result<()> {
    let procs = std::ffi::CString::new(cgroup_procs.as_os_str().as_encoded_bytes())
        .map_err(io::Error::other)?;
    sys::join_cgroup_before_exec(cmd, procs);
    Ok(())
}
