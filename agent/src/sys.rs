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
