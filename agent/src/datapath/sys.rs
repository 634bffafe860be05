//! The raw system calls aya does not offer: mounting bpffs, detaching a pinned link,
//! querying the tcx hook, interface names, arrays of maps made from a template, and
//! mapping BPF arrays into memory. All of the datapath's `unsafe` is here.

use std::{
    os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
    ptr::NonNull,
};

/// bpf(2) with `attr`, all `size_of::<A>()` bytes of it; the kernel reads the fields it
/// knows and wants the rest zero.
fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a pointer to a live, fully initialised attr of the size given;
    // each caller lays `A` out as the command's part of `union bpf_attr`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// `union bpf_attr` for `BPF_MAP_CREATE`, as far as `map_ifindex`.
#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
}

/// `union bpf_attr` for the element commands.
#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// Creates an array of maps with `slots` entries whose inner maps are like `template`
/// (its type, sizes and flags): the kernel accepts no other map as an entry, and checks
/// programs' reads of the inner maps against the template. aya makes the template from
/// the object's definition, with the size written there; the range tables need one of
/// the policy's size.
pub(super) fn create_array_of_maps(
    name: &str,
    slots: u32,
    template: BorrowedFd<'_>,
) -> std::io::Result<OwnedFd> {
    let mut map_name = [0u8; 16];
    let len = name.len().min(15);
    map_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let mut attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS,
        key_size: 4,
        value_size: 4,
        max_entries: slots,
        map_flags: 0,
        inner_map_fd: template.as_raw_fd() as u32,
        numa_node: 0,
        map_name,
        map_ifindex: 0,
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn elem(map: BorrowedFd<'_>, key: &u32, value: u64) -> MapElem {
    MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value,
        flags: 0,
    }
}

/// Puts the map `inner` at `slot` of the array of maps `outer`; programs that read the
/// slot from then on read `inner`.
pub(super) fn set_inner_map(
    outer: BorrowedFd<'_>,
    slot: u32,
    inner: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let fd = inner.as_raw_fd() as u32;
    let mut attr = elem(outer, &slot, std::ptr::from_ref(&fd) as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Empties `slot` of the array of maps `outer`; the kernel frees the map that was there
/// once no program reads it and no descriptor holds it. An empty slot is no error.
pub(super) fn clear_inner_map(outer: BorrowedFd<'_>, slot: u32) -> std::io::Result<()> {
    let mut attr = elem(outer, &slot, 0);
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Mounts a bpf filesystem at `target` (mode 0700).
pub(super) fn mount_bpffs(target: &str) -> std::io::Result<()> {
    let cstr = |s: &str| std::ffi::CString::new(s).map_err(std::io::Error::other);
    let (source, target, fstype, opts) = (
        cstr("bpf")?,
        cstr(target)?,
        cstr("bpf")?,
        cstr("mode=0700")?,
    );
    // SAFETY: plain mount(2) with valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the object pinned at `path` (`BPF_OBJ_GET`). aya keeps a link's fd private,
/// hence the bare syscalls here.
fn open_pinned(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    let cpath =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // bpf_attr.obj_get: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut get = [0u64; 2];
    get[0] = cpath.as_ptr() as u64;
    // SAFETY: bpf(2) with a correctly laid out attr pointing at `cpath`, alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, get.as_mut_ptr(), 16) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens the pinned link and detaches it with `BPF_LINK_DETACH`: the program is off its
/// hook when this returns.
pub(super) fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    let link = open_pinned(path)?;
    let mut detach = [0u32; 4];
    detach[0] = link.as_raw_fd() as u32;
    // SAFETY: bpf(2) with an attr holding only the link fd opened above.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, detach.as_mut_ptr(), 16) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Switches the link pinned at `path` to the program `program` (`BPF_LINK_UPDATE`): the
/// hook runs one or the other at every moment, never neither. For cgroup links, which
/// aya cannot update.
pub(super) fn update_pinned_link(path: &Path, program: &impl AsRawFd) -> std::io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let link = open_pinned(path)?;
    // bpf_attr.link_update: link_fd, new_prog_fd, flags, old_prog_fd.
    let mut update = [0u32; 4];
    update[0] = link.as_raw_fd() as u32;
    update[1] = program.as_raw_fd() as u32;
    // SAFETY: bpf(2) with an attr holding only the two descriptors, open for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, update.as_mut_ptr(), 16) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's `struct bpf_link_info` of the link pinned at `path`, from
/// `BPF_OBJ_GET_INFO_BY_FD`: type, id, prog_id, then a union aligned to 8 (at word 4)
/// that holds what the link is attached to. aya's `LinkInfo` does not expose the union.
fn pinned_link_info(path: &Path) -> std::io::Result<[u32; 64]> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// `bpf_attr.info`: bpf_fd, info_len, info (a pointer).
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let link = open_pinned(path)?;
    // Zeroed past what the kernel fills.
    let mut info = [0u32; 64];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: bpf(2) with a correctly laid out attr whose pointer points at `info`, which
    // outlives the call and is as long as `info_len` says.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            size_of::<InfoAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

/// The interface a pinned tcx or XDP link is attached to: 0 once the interface is gone
/// (the kernel keeps the link, defunct, while a pin holds it). `None` for another kind
/// of link.
pub(super) fn pinned_link_ifindex(path: &Path) -> std::io::Result<Option<u32>> {
    const BPF_LINK_TYPE_XDP: u32 = 6;
    const BPF_LINK_TYPE_TCX: u32 = 11;
    let info = pinned_link_info(path)?;
    // The tcx and xdp members both start with the ifindex.
    Ok(matches!(info[0], BPF_LINK_TYPE_XDP | BPF_LINK_TYPE_TCX).then_some(info[4]))
}

/// What a pinned cgroup link holds: the id of its cgroup (the directory's inode number;
/// 0 once detached) and of its program. `None` for another kind of link.
pub(super) fn pinned_link_cgroup(path: &Path) -> std::io::Result<Option<CgroupLink>> {
    const BPF_LINK_TYPE_CGROUP: u32 = 3;
    let info = pinned_link_info(path)?;
    let link = CgroupLink {
        cgroup: u64::from(info[4]) | (u64::from(info[5]) << 32),
        program: info[2],
    };
    Ok((info[0] == BPF_LINK_TYPE_CGROUP).then_some(link))
}

/// See [`pinned_link_cgroup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CgroupLink {
    pub(super) cgroup: u64,
    pub(super) program: u32,
}

/// The interface's index, or `None` when no such interface exists.
pub fn if_index(interface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The interface's name, for labelling counters and events by ifindex.
pub fn if_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Ids of the programs attached to an interface's tcx egress hook.
///
/// A bare `BPF_PROG_QUERY`: aya's `query_tcx` also opens each program by id, which needs
/// CAP_SYS_ADMIN, and the agent runs without it.
pub(crate) fn tcx_egress_program_ids(ifindex: u32) -> std::io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_EGRESS: u32 = 47;
    /// `bpf_attr.query`, as in include/uapi/linux/bpf.h.
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type: BPF_TCX_EGRESS,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..QueryAttr::default()
    };
    // SAFETY: bpf(2) with a correctly laid out attr whose pointer fields point at `ids`,
    // which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &raw mut attr,
            size_of::<QueryAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids[..n].to_vec())
}

/// A BPF array map mapped into this process, seen as a dense array of `T`.
pub(crate) struct MappedArray<T> {
    ptr: NonNull<T>,
    entries: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; access goes through
// &mut self, so no two threads write it at once from this process.
unsafe impl<T> Send for MappedArray<T> {}

impl<T: Copy> MappedArray<T> {
    /// Maps `entries` values of `T` of an array created with BPF_F_MMAPABLE.
    pub(crate) fn map(fd: &impl AsRawFd, entries: usize) -> std::io::Result<Self> {
        let len = entries * size_of::<T>();
        // SAFETY: mmap of a BPF map fd that supports it, with the map's own size; the
        // result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<T>())
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, entries })
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: the mapping is `entries` values long and lives as long as self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.entries) }
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.entries) }
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.entries * size_of::<T>()) };
    }
}
