//! The socket ring: `cgroup/connect4`, `cgroup/connect6`, `cgroup/sendmsg4` and
//! `cgroup/sendmsg6`, attached at the cgroup v2 root so that they see every process,
//! containers included. Each judges the call by the sequence the packet judges share
//! (`datafence_common::socket`), counts it under its own hook and, in enforce mode, makes
//! a denied call fail with `EPERM` before any packet exists.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_netns_cookie,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_ebpf::{macros::map, maps::PerCpuArray};
use datafence_common::{
    CgroupKey, ClassMask, FAMILY_V4, Hook, MAX_CGROUP_DEPTH, Verdict, ViolationEvent,
    parse::ParsedFrame,
    socket::{SocketCall, judge_call_frame},
    verdict::Judgement,
};

use super::{CGROUP_CLASSES, HookInfo, KernelLookups, count, fill_event, reserve_event};

/// Each CPU's call being judged, as a frame. Written out of line and judged in place, as
/// the packet hooks judge their posted job: what the verifier would know of values the
/// compiler hands straight on (the address family of each path, a port that is one
/// constant or another) splits the judgement's paths. `connect6` took 464k verified
/// instructions on Linux 6.18 that way, and a copy on the stack over a million on 6.1.
#[map]
static SOCKET_CALL: PerCpuArray<ParsedFrame> = PerCpuArray::with_max_entries(1, 0);

/// What a socket program returns to let the call go on; anything else fails it with
/// `EPERM`.
const CALL_ALLOWED: i32 = 1;
const CALL_REFUSED: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn datafence_sock_connect4(ctx: SockAddrContext) -> i32 {
    judge_call(&ctx, Hook::SockConnect, FAMILY_V4)
}

#[cgroup_sock_addr(connect6)]
pub fn datafence_sock_connect6(ctx: SockAddrContext) -> i32 {
    judge_call(&ctx, Hook::SockConnect, 0)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn datafence_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge_call(&ctx, Hook::SockSendmsg, FAMILY_V4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn datafence_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge_call(&ctx, Hook::SockSendmsg, 0)
}

/// The destination the call names. The kernel keeps the address and the port in network
/// byte order; the port in the low half of its field.
#[inline(always)]
fn call_of(sa: *mut bpf_sock_addr, family: u8) -> SocketCall {
    // SAFETY: four-byte reads of `bpf_sock_addr` fields the verifier allows for every
    // connect and sendmsg attach type; volatile so each stays one such read.
    let (protocol, port) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sa).protocol),
            core::ptr::read_volatile(&raw const (*sa).user_port),
        )
    };
    let port = u16::from_be(port as u16);
    if family == FAMILY_V4 {
        // SAFETY: as above.
        let ip = unsafe { core::ptr::read_volatile(&raw const (*sa).user_ip4) };
        return SocketCall::v4(ip.to_ne_bytes(), protocol as u8, port);
    }
    let mut dst = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        // SAFETY: as above; `i` is below the array's length.
        let word = unsafe { core::ptr::read_volatile(&raw const (*sa).user_ip6[i]) };
        dst[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        i += 1;
    }
    SocketCall::v6(dst, protocol as u8, port)
}

/// Classes whose cgroup selector names the calling process's cgroup or an ancestor.
#[inline(never)]
fn caller_cgroup_classes(slot: u32) -> ClassMask {
    let mut mask = 0;
    let mut key = CgroupKey {
        cgroup_id: 0,
        slot,
        _pad: 0,
    };
    let mut level = 0;
    // Bounded by MAX_CGROUP_DEPTH, as for packets.
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: a helper without pointer arguments.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        key.cgroup_id = id;
        // SAFETY: the value is a plain integer copied out at once.
        if let Some(m) = unsafe { CGROUP_CLASSES.get(key) } {
            mask |= *m;
        }
        level += 1;
    }
    mask
}

#[inline(always)]
fn judge_call(ctx: &SockAddrContext, hook: Hook, family: u8) -> i32 {
    let Some(slot) = SOCKET_CALL.get_ptr_mut(0) else {
        return CALL_ALLOWED;
    };
    // SAFETY: a per-CPU map value, used only by this CPU while the program runs; written
    // whole, then judged in place.
    let frame = unsafe {
        slot.write(call_of(ctx.sock_addr, family).frame());
        &*slot
    };
    let lookups = KernelLookups {
        cgroups: caller_cgroup_classes,
    };
    let j = judge_call_frame(frame, &lookups);
    let info = HookInfo {
        hook,
        ifindex: 0,
        len: 0,
        cgroup_id: if j.decision.verdict == Verdict::Allow {
            0
        } else {
            // SAFETY: a helper without arguments.
            unsafe { bpf_get_current_cgroup_id() }
        },
    };
    count(&info, &j);
    if j.decision.verdict != Verdict::Allow {
        report_call(ctx, frame, &info, &j);
    }
    if j.decision.verdict.passes() {
        CALL_ALLOWED
    } else {
        CALL_REFUSED
    }
}

/// The socket ring's `report`: the event, with the calling process and its namespace.
#[inline(never)]
fn report_call(ctx: &SockAddrContext, frame: &ParsedFrame, info: &HookInfo, j: &Judgement) {
    let Some(mut entry) = reserve_event() else {
        return;
    };
    let ev: *mut ViolationEvent = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved record, filled whole by `fill_event`; the helpers
    // write at most the 16 bytes of `comm` and read only the program's own context.
    unsafe {
        fill_event(ev, frame, info, j);
        (*ev).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        bpf_get_current_comm((&raw mut (*ev).comm).cast(), 16);
        (*ev).netns_cookie = bpf_get_netns_cookie(ctx.sock_addr.cast());
        (*ev)._pad = 0;
    }
    entry.submit(0);
}
