//! The socket ring: `cgroup/connect4`, `cgroup/connect6`, `cgroup/sendmsg4` and
//! `cgroup/sendmsg6`, attached at the cgroup v2 root so that they see every process,
//! containers included. Each posts the call and jumps to its judge stage, which judges it
//! by the sequence the packet judges share (`datafence_common::socket`) and counts it
//! under its own hook; a call not simply allowed goes on to the report stage. In enforce
//! mode a denied call fails with `EPERM` before any packet exists.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_netns_cookie,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, ProgramArray},
};
use datafence_common::{
    CgroupKey, ClassMask, FAMILY_V4, Hook, MAX_CGROUP_DEPTH, SOCKET_STAGE_SLOTS, Verdict,
    ViolationEvent,
    parse::ParsedFrame,
    socket::{SocketCall, judge_call_frame},
    socket_stage, stat,
    verdict::{Judgement, Sender},
};

use super::{CGROUP_CLASSES, HookInfo, KernelLookups, bump_stat, count, fill_event, reserve_event};

/// Each CPU's call being judged: its frame, posted by the entry program and judged by
/// the judge stage, and the judgement, posted by the judge for the report stage. Each
/// stage sees an opaque map value, as the packet judges do; judged in the program that
/// wrote it, what the verifier knew of the values (the address family of each path, a
/// port that is one constant or another) split the judgement's paths, and Linux 6.1's
/// verifier walked past its million instructions. Pinned beside the stage arrays, so that
/// every program of one build shares it.
#[repr(C)]
#[derive(Clone, Copy)]
struct SocketJob {
    frame: ParsedFrame,
    judgement: Judgement,
    cgroup_id: u64,
}

#[map]
static SOCKET_CALL: PerCpuArray<SocketJob> = PerCpuArray::with_max_entries(1, 0);

/// Each hook's stages, at [`socket_stage::JUDGE`] and [`socket_stage::REPORT`]. One array
/// per attach type: a tail call goes only to a program of the caller's own expected
/// attach type (Linux 6.17 and later check it). The agent fills them before attaching
/// anything, and pins them so that they outlive it.
#[map]
static SOCK_CONNECT4_STAGES: ProgramArray = ProgramArray::with_max_entries(SOCKET_STAGE_SLOTS, 0);
#[map]
static SOCK_CONNECT6_STAGES: ProgramArray = ProgramArray::with_max_entries(SOCKET_STAGE_SLOTS, 0);
#[map]
static SOCK_SENDMSG4_STAGES: ProgramArray = ProgramArray::with_max_entries(SOCKET_STAGE_SLOTS, 0);
#[map]
static SOCK_SENDMSG6_STAGES: ProgramArray = ProgramArray::with_max_entries(SOCKET_STAGE_SLOTS, 0);

/// What a socket program returns to let the call go on; anything else fails it with
/// `EPERM`.
const CALL_ALLOWED: i32 = 1;
const CALL_REFUSED: i32 = 0;

/// The three programs of one hook: entry, judge and report.
macro_rules! socket_hook {
    ($attach:ident, $family:expr, $hook:expr, $stages:ident, $entry:ident, $judge:ident, $report:ident) => {
        #[cgroup_sock_addr($attach)]
        pub fn $entry(ctx: SockAddrContext) -> i32 {
            post_call(&ctx, $family, &$stages)
        }

        #[cgroup_sock_addr($attach)]
        pub fn $judge(ctx: SockAddrContext) -> i32 {
            judge_call(&ctx, $hook, &$stages)
        }

        #[cgroup_sock_addr($attach)]
        pub fn $report(ctx: SockAddrContext) -> i32 {
            report_call(&ctx, $hook)
        }
    };
}

socket_hook!(
    connect4,
    FAMILY_V4,
    Hook::SockConnect,
    SOCK_CONNECT4_STAGES,
    datafence_sock_connect4,
    datafence_sock_connect4_judge,
    datafence_sock_connect4_report
);
socket_hook!(
    connect6,
    0,
    Hook::SockConnect,
    SOCK_CONNECT6_STAGES,
    datafence_sock_connect6,
    datafence_sock_connect6_judge,
    datafence_sock_connect6_report
);
socket_hook!(
    sendmsg4,
    FAMILY_V4,
    Hook::SockSendmsg,
    SOCK_SENDMSG4_STAGES,
    datafence_sock_sendmsg4,
    datafence_sock_sendmsg4_judge,
    datafence_sock_sendmsg4_report
);
socket_hook!(
    sendmsg6,
    0,
    Hook::SockSendmsg,
    SOCK_SENDMSG6_STAGES,
    datafence_sock_sendmsg6,
    datafence_sock_sendmsg6_judge,
    datafence_sock_sendmsg6_report
);

/// Entry: posts the call's frame and jumps to the judge. The code after the jump runs only
/// when the judge is missing from the array, which the agent never leaves so while the
/// ring is attached: the call goes on, counted as `stage_missing`, and the packet ring
/// still judges its packets.
#[inline(always)]
fn post_call(ctx: &SockAddrContext, family: u8, stages: &ProgramArray) -> i32 {
    if let Some(job) = SOCKET_CALL.get_ptr_mut(0) {
        // SAFETY: a per-CPU map value, used only by this CPU while the program and its
        // tail calls run; the frame is written whole.
        unsafe { (&raw mut (*job).frame).write(call_of(ctx.sock_addr, family).frame()) };
        // SAFETY: the context is the program's own; an empty index fails the call, which
        // falls through below.
        unsafe { stages.tail_call(ctx, socket_stage::JUDGE) };
    }
    bump_stat(stat::STAGE_MISSING);
    CALL_ALLOWED
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

/// Judge stage: the decision on the posted call and its count; a call not simply allowed
/// goes on to the report stage with its judgement.
#[inline(always)]
fn judge_call(ctx: &SockAddrContext, hook: Hook, stages: &ProgramArray) -> i32 {
    let Some(job) = SOCKET_CALL.get_ptr_mut(0) else {
        bump_stat(stat::STAGE_MISSING);
        return CALL_ALLOWED;
    };
    // SAFETY: as in `post_call`; the entry program wrote the frame before the jump.
    let job = unsafe { &mut *job };
    let lookups = KernelLookups::<_, _, false> {
        cgroups: caller_cgroup_classes,
        // A call is not a fragment: never asked.
        sender: || Sender {
            cgroup: 0,
            mark: 0,
            dscp: 0,
            hook: Hook::TcEgress,
        },
    };
    let j = judge_call_frame(&job.frame, &lookups);
    count(
        &HookInfo {
            hook,
            ifindex: 0,
            len: 0,
            cgroup_id: 0,
        },
        &j,
    );
    if j.decision.verdict == Verdict::Allow {
        return CALL_ALLOWED;
    }
    job.judgement = j;
    // SAFETY: a helper without arguments.
    job.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: as in `post_call`. Without the report stage the call is decided as judged,
    // unreported.
    unsafe { stages.tail_call(ctx, socket_stage::REPORT) };
    bump_stat(stat::STAGE_MISSING);
    verdict_of(&j)
}

#[inline(always)]
fn verdict_of(j: &Judgement) -> i32 {
    if j.decision.verdict.passes() {
        CALL_ALLOWED
    } else {
        CALL_REFUSED
    }
}

/// Report stage: the posted judgement's event, with the calling process and its
/// namespace; then the call's verdict.
#[inline(always)]
fn report_call(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let Some(job) = SOCKET_CALL.get_ptr(0) else {
        bump_stat(stat::STAGE_MISSING);
        return CALL_ALLOWED;
    };
    // SAFETY: as in `post_call`; the judge wrote the judgement before the jump.
    let job = unsafe { &*job };
    if let Some(mut entry) = reserve_event() {
        let info = HookInfo {
            hook,
            ifindex: 0,
            len: 0,
            cgroup_id: job.cgroup_id,
        };
        let ev: *mut ViolationEvent = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record, filled whole by `fill_event` and the lines
        // after it; the helpers write at most the 16 bytes of `comm` and read only the
        // program's own context.
        unsafe {
            fill_event(ev, &job.frame, &info, &job.judgement);
            (*ev).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
            bpf_get_current_comm((&raw mut (*ev).comm).cast(), 16);
            (*ev).netns_cookie = bpf_get_netns_cookie(ctx.sock_addr.cast());
            (*ev)._pad = 0;
        }
        entry.submit(0);
    }
    verdict_of(&job.judgement)
}
