//! The agent process's own `unsafe` calls: allocator tuning, registering the event
//! ring buffer with tokio, and (for tests) the bytes of a kernel record. The datapath's system calls are in `datapath::sys`. These
//! are the only modules of the crate allowed `unsafe` (see `lib.rs`).

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

/// Makes large allocations (policy files, prefix lists, table builds) come straight from
/// mmap, so freeing them returns the memory. glibc otherwise raises its mmap threshold
/// each time such a block is freed, and later large blocks land in the heap, where a
/// million-prefix reload leaves tens of MiB the agent keeps for its lifetime.
pub(crate) fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; a fixed threshold is always valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Hands freed heap pages back to the kernel after a policy switch.
pub(crate) fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The event ring buffer, registered with tokio to wake its reader when it is readable.
pub(crate) fn readable_ring(ring: RingBuf<MapData>) -> std::io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long
    // as the AsyncFd owns the ring buffer.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+): what
/// the socket ring's events carry, to tell the host's processes from containers'.
pub(crate) fn own_netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cookie`, which outlives it.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The bytes of a plain-old-data value such as a kernel record, as the kernel writes it.
#[cfg(test)]
pub(crate) fn pod_bytes<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: aya::Pod types are plain old data; the slice covers exactly the value and
    // borrows it.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast(), size_of::<T>()) }
}

/// The agent's effective user id: files it trusts are owned by root or by it.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// A process started inside a cgroup by `clone3(CLONE_INTO_CGROUP)`. The kernel checks
/// that against the cgroup's own permissions, so it works where the agent sees the
/// hierarchy through a read-only mount (systemd's `ProtectControlGroups=`), which makes
/// writing a `cgroup.procs` file, the usual way in, fail with EROFS.
pub struct CgroupChild {
    pid: libc::pid_t,
    reaped: bool,
    pub stdin: Option<std::io::PipeWriter>,
    pub stdout: Option<std::io::PipeReader>,
    pub stderr: Option<std::io::PipeReader>,
}

/// `struct clone_args` of linux/sched.h, up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// The child starts with default signal handlers: until it execs, a signal must not run
/// one of the parent's (tokio's) in the copy.
const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;

/// Starts `program` with `args` inside the cgroup whose directory is `cgroup_dir`, with
/// its stdin, stdout and stderr piped to the returned handles and this process's
/// environment.
pub fn spawn_into_cgroup(
    cgroup_dir: &std::path::Path,
    program: &std::path::Path,
    args: &[std::ffi::OsString],
) -> std::io::Result<CgroupChild> {
    use std::{
        ffi::CString,
        os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    };
    let c_string = |bytes: &[u8]| CString::new(bytes).map_err(std::io::Error::other);
    let cgroup = std::fs::File::open(cgroup_dir)?;
    let (stdin_read, stdin_write) = std::io::pipe()?;
    let (stdout_read, stdout_write) = std::io::pipe()?;
    let (stderr_read, stderr_write) = std::io::pipe()?;
    // Everything the child needs is built here: between clone and exec, a copy of a
    // process with other threads may only make async-signal-safe calls.
    let path = c_string(program.as_os_str().as_bytes())?;
    let argv_owned = std::iter::once(program.as_os_str())
        .chain(args.iter().map(std::ffi::OsString::as_os_str))
        .map(|a| c_string(a.as_bytes()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let envp_owned = std::env::vars_os()
        .map(|(k, v)| c_string(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let argv: Vec<*const libc::c_char> = argv_owned
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = envp_owned
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let clone_args = CloneArgs {
        flags: CLONE_INTO_CGROUP | CLONE_CLEAR_SIGHAND,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    let (child_in, child_out, child_err) = (
        stdin_read.as_raw_fd(),
        stdout_write.as_raw_fd(),
        stderr_write.as_raw_fd(),
    );
    // SAFETY: clone3 with no CLONE_VM gives the child a copy of this address space, in
    // which `clone_args`, `path`, `argv` and `envp` stay valid. The child makes only
    // async-signal-safe calls (dup2, execve, _exit) before it execs or exits; dup2 clears
    // close-on-exec on the copies it makes, and every other descriptor of this process
    // is close-on-exec.
    let pid = unsafe {
        let pid = libc::syscall(
            libc::SYS_clone3,
            &raw const clone_args,
            std::mem::size_of::<CloneArgs>(),
        );
        if pid == 0 {
            if libc::dup2(child_in, 0) < 0
                || libc::dup2(child_out, 1) < 0
                || libc::dup2(child_err, 2) < 0
            {
                libc::_exit(126);
            }
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
        pid
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(CgroupChild {
        pid: pid as libc::pid_t,
        reaped: false,
        stdin: Some(stdin_write),
        stdout: Some(stdout_read),
        stderr: Some(stderr_read),
    })
}

impl CgroupChild {
    /// The child's exit status if it has exited, reaping it; `None` while it runs.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.wait_with(libc::WNOHANG)
    }

    /// Kills the child and reaps it.
    pub fn kill_and_reap(&mut self) {
        if !self.reaped {
            // SAFETY: `pid` is this handle's own child, not yet reaped, so the id cannot
            // have been reused.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = self.wait_with(0);
        }
    }

    fn wait_with(
        &mut self,
        options: libc::c_int,
    ) -> std::io::Result<Option<std::process::ExitStatus>> {
        use std::os::unix::process::ExitStatusExt as _;
        if self.reaped {
            return Err(std::io::Error::other("the child was already reaped"));
        }
        let mut status = 0;
        // SAFETY: waits only for this handle's own child; `status` is a valid out pointer.
        let ret = unsafe { libc::waitpid(self.pid, &raw mut status, options) };
        match ret {
            0 => Ok(None),
            r if r < 0 => Err(std::io::Error::last_os_error()),
            _ => {
                self.reaped = true;
                Ok(Some(std::process::ExitStatus::from_raw(status)))
            }
        }
    }
}

impl Drop for CgroupChild {
    /// Never leaves a zombie, nor a child that outlives its handle.
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}
