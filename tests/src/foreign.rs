//! Other tools' programs on datafence's hook, as the tests need them: a tc program that
//! counts the packets it sees and returns a fixed verdict, linked ahead of or after
//! datafence's. Built from raw instructions (a few, with one array map), so the tests need
//! no second eBPF object and no compiler.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use crate::netns::NetNs;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_F_BEFORE: u32 = 1 << 3;
const BPF_F_AFTER: u32 = 1 << 4;

/// `TC_ACT_OK`: ends the chain, the packet leaves unjudged by whatever comes after.
pub const TC_ACT_OK: i32 = 0;
/// `TC_ACT_UNSPEC` / `TCX_NEXT`: the chain goes on.
pub const TC_NEXT: i32 = -1;

/// Where in the chain a foreign program goes.
#[derive(Clone, Copy, Debug)]
pub enum Place {
    /// tcx, first in the chain (`BPF_F_BEFORE` without an anchor).
    TcxFirst,
    /// tcx, last in the chain (`BPF_F_AFTER` without an anchor).
    TcxLast,
    /// A direct-action `cls_bpf` filter on clsact at this priority (via `tc`).
    Clsact { priority: u16 },
}

/// A counting program attached to an interface's TC egress hook. Dropping it detaches
/// a tcx link (the link is this process's); a clsact filter is removed with the
/// namespace.
pub struct Foreign {
    counts: OwnedFd,
    prog: OwnedFd,
    _link: Option<OwnedFd>,
    /// The program's pin for `tc` (clsact), removed on drop.
    pin: Option<std::path::PathBuf>,
}

impl Drop for Foreign {
    fn drop(&mut self) {
        if let Some(pin) = &self.pin {
            let _ = std::fs::remove_file(pin);
            if let Some(dir) = pin.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

impl Foreign {
    /// Loads a program that counts every packet and returns `verdict`, and attaches it to
    /// `interface`'s egress hook in `ns` at `place`. `pin_dir` (on a bpffs) holds the
    /// program's pin for `tc`, for the clsact place.
    pub fn attach(
        ns: &NetNs,
        interface: &'static str,
        verdict: i32,
        place: Place,
        pin_dir: &Path,
    ) -> Self {
        let counts = map_create();
        let prog = prog_load(&counts, verdict);
        let mut pinned = None;
        let link = match place {
            Place::TcxFirst | Place::TcxLast => {
                let flags = if matches!(place, Place::TcxFirst) {
                    BPF_F_BEFORE
                } else {
                    BPF_F_AFTER
                };
                let prog_fd = prog.as_raw_fd();
                // The kernel resolves the interface index in the caller's namespace.
                Some(ns.run(move || {
                    let name = CString::new(interface).expect("name");
                    // SAFETY: a valid NUL-terminated string.
                    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
                    assert_ne!(index, 0, "no interface {interface}");
                    link_create(prog_fd, index, flags)
                }))
            }
            Place::Clsact { priority } => {
                std::fs::create_dir_all(pin_dir).expect("pin dir");
                let pin = pin_dir.join(format!("foreign-{priority}"));
                obj_pin(&prog, &pin);
                pinned = Some(pin.clone());
                let priority = priority.to_string();
                let mut tc = crate::netns::command_in(&ns.name, "tc");
                // Keeps `tc` from adding the qdisc twice when the agent already did.
                let _ = crate::netns::command_in(&ns.name, "tc")
                    .args(["qdisc", "add", "dev", interface, "clsact"])
                    .output();
                tc.args(["filter", "add", "dev", interface, "egress", "pref"])
                    .arg(&priority)
                    .args(["handle", "0x7", "bpf", "object-pinned"])
                    .arg(&pin)
                    .arg("da");
                let out = tc.output().expect("run tc");
                assert!(
                    out.status.success(),
                    "tc filter add: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                None
            }
        };
        Self {
            counts,
            prog,
            _link: link,
            pin: pinned,
        }
    }

    /// The program's kernel id.
    pub fn id(&self) -> u32 {
        const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
        // The first two fields of `bpf_prog_info`: type and id.
        let mut info = [0u32; 2];
        let mut attr = [0u64; 2];
        attr[0] = u64::from(self.prog.as_raw_fd() as u32) | (8u64 << 32);
        attr[1] = info.as_mut_ptr() as u64;
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr, "read the program's id");
        info[1]
    }

    /// Packets the program has seen.
    pub fn packets(&self) -> u64 {
        let key = 0u32;
        let mut value = 0u64;
        let mut attr = [0u64; 4];
        attr[0] = u64::from(self.counts.as_raw_fd() as u32);
        attr[1] = (&raw const key) as u64;
        attr[2] = (&raw mut value) as u64;
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr, "look up the count");
        value
    }
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T, what: &str) -> i64 {
    // SAFETY: bpf(2) with an attribute buffer of its declared size, laid out as
    // include/uapi/linux/bpf.h says for `cmd`; pointers in it live across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
    rc
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: a file descriptor bpf(2) just returned, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("fd")) }
}

/// One u64 counter.
fn map_create() -> OwnedFd {
    let mut attr = [0u32; 32];
    attr[0] = BPF_MAP_TYPE_ARRAY;
    attr[1] = 4; // key size
    attr[2] = 8; // value size
    attr[3] = 1; // entries
    owned(bpf(BPF_MAP_CREATE, &mut attr, "create the count map"))
}

/// One eBPF instruction: opcode, registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst | (src << 4)) << 8
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// `bpf_attr` for `BPF_PROG_LOAD`, up to the name; the rest stays zero.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    rest: [u64; 16],
}

fn prog_load(counts: &OwnedFd, verdict: i32) -> OwnedFd {
    let map_fd = counts.as_raw_fd();
    let program = [
        insn(0x62, 10, 0, -4, 0),    // *(u32 *)(r10 - 4) = 0: the key
        insn(0xbf, 2, 10, 0, 0),     // r2 = r10
        insn(0x07, 2, 0, 0, -4),     // r2 += -4
        insn(0x18, 1, 1, 0, map_fd), // r1 = the map (BPF_PSEUDO_MAP_FD)
        insn(0, 0, 0, 0, 0),
        insn(0x85, 0, 0, 0, 1),       // call bpf_map_lookup_elem
        insn(0x15, 0, 0, 2, 0),       // if r0 == 0 goto +2
        insn(0xb7, 1, 0, 0, 1),       // r1 = 1
        insn(0xdb, 0, 1, 0, 0),       // lock *(u64 *)(r0 + 0) += r1
        insn(0xb7, 0, 0, 0, verdict), // r0 = verdict
        insn(0x95, 0, 0, 0, 0),       // exit
    ];
    let license = c"GPL";
    let name = *b"foreign_tc\0\0\0\0\0\0";
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        rest: [0; 16],
    };
    owned(bpf(BPF_PROG_LOAD, &mut attr, "load the foreign program"))
}

fn link_create(prog_fd: i32, ifindex: u32, flags: u32) -> OwnedFd {
    let mut attr = [0u32; 16];
    attr[0] = prog_fd as u32;
    attr[1] = ifindex;
    attr[2] = BPF_TCX_EGRESS;
    attr[3] = flags;
    owned(bpf(BPF_LINK_CREATE, &mut attr, "link the foreign program"))
}

fn obj_pin(prog: &OwnedFd, path: &Path) {
    let path = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut attr = [0u64; 2];
    attr[0] = path.as_ptr() as u64;
    attr[1] = u64::from(prog.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr, "pin the foreign program");
}
