//! The system calls: setns(2), and writing `cgroup.procs` between fork and exec.

use std::os::unix::process::CommandExt as _;
use std::{ffi::CString, fs::File, io, os::fd::AsRawFd as _, process::Command};

pub(crate) fn setns(netns: &File) -> io::Result<()> {
    // SAFETY: setns on a namespace fd changes only the calling thread's namespace.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn setns_before_exec(cmd: &mut Command, netns: File) {
    // SAFETY: setns is a plain syscall, safe between fork and exec; the closure owns the
    // fd, which therefore stays open until exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub(crate) fn join_cgroup_before_exec(cmd: &mut Command, procs: CString) {
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
    // functions (open, write, close) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
}
