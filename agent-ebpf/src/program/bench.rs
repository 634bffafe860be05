//! Benchmark programs: baselines for `cargo xtask bench`, loaded only by it. Built only
//! with the crate's `bench` feature, into the bench's own object; there they share the
//! maps and the lookup code (`region_v4`, `region_v6`) with the programs they are compared
//! to, so the bench measures the code the agent runs.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    macros::{cgroup_sock_addr, classifier, map},
    maps::{Array, LpmTrie, ProgramArray, lpm_trie::Key},
    programs::{SockAddrContext, TcContext},
};
use datafence_common::{
    BENCH_ADDRS, COLD_LOOKUPS_PER_RUN, DEFAULT_TABLE_CAPACITY,
    opaque::opaque,
    parse::{PacketBytes as _, parse_frame_headers},
};

use super::{DirectBytes, TC_JOB, active_slot, post_tc_job, region_v4, region_v6, take_job};

#[map]
static BENCH_LPM_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(DEFAULT_TABLE_CAPACITY, 0);
#[map]
static BENCH_LPM_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(DEFAULT_TABLE_CAPACITY, 0);
#[map]
static BENCH_ADDRS_V4: Array<[u8; 4]> = Array::with_max_entries(BENCH_ADDRS, 0);
#[map]
static BENCH_ADDRS_V6: Array<[u8; 16]> = Array::with_max_entries(BENCH_ADDRS, 0);

/// The socket ring's floor: cgroup programs that allow every call.
#[cgroup_sock_addr(connect4)]
pub fn bench_sock_connect4(_ctx: SockAddrContext) -> i32 {
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn bench_sock_sendmsg4(_ctx: SockAddrContext) -> i32 {
    1
}

/// The floor: a TC program that does nothing.
#[classifier]
pub fn bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Reads the destination at a fixed offset (untagged Ethernet) and looks it up in a
/// plain kernel LPM trie: what a trie-based filter costs at the least.
#[classifier]
pub fn bench_lpm_v4(ctx: TcContext) -> i32 {
    let bytes = DirectBytes {
        data: ctx.data(),
        data_end: ctx.data_end(),
    };
    let Some(dst) = bytes.load::<[u8; 4]>(30) else {
        return TC_ACT_OK;
    };
    match BENCH_LPM_V4.get(Key::new(32, dst)) {
        Some(v) if *v == u32::MAX => TC_ACT_SHOT,
        _ => TC_ACT_OK,
    }
}

#[classifier]
pub fn bench_lpm_v6(ctx: TcContext) -> i32 {
    let bytes = DirectBytes {
        data: ctx.data(),
        data_end: ctx.data_end(),
    };
    let Some(dst) = bytes.load::<[u8; 16]>(38) else {
        return TC_ACT_OK;
    };
    match BENCH_LPM_V6.get(Key::new(128, dst)) {
        Some(v) if *v == u32::MAX => TC_ACT_SHOT,
        _ => TC_ACT_OK,
    }
}

#[inline(always)]
fn bench_index() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_prandom_u32() & (BENCH_ADDRS - 1) }
}

#[inline(always)]
fn bench_verdict(acc: u32) -> i32 {
    // Uses the result so nothing is optimised away; never true for real data. Opaque:
    // LLVM knows a region is below 256, so the XOR of regions is never the constant, and
    // it would drop the lookups' last steps, which the datapath does not.
    if opaque(u64::from(acc)) == 0xdead_beef {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// Cold-lookup floor: draws the random addresses and does nothing with them.
#[classifier]
pub fn bench_cold_floor(_ctx: TcContext) -> i32 {
    let mut acc = 0u32;
    for _ in 0..COLD_LOOKUPS_PER_RUN {
        if let Some(a) = BENCH_ADDRS_V6.get(bench_index()) {
            acc ^= u32::from(a[0]);
        }
    }
    bench_verdict(acc)
}

#[classifier]
pub fn bench_cold_lpm_v4(_ctx: TcContext) -> i32 {
    let mut acc = 0u32;
    for _ in 0..COLD_LOOKUPS_PER_RUN {
        if let Some(a) = BENCH_ADDRS_V4.get(bench_index()) {
            acc ^= BENCH_LPM_V4.get(Key::new(32, *a)).copied().unwrap_or(0);
        }
    }
    bench_verdict(acc)
}

#[classifier]
pub fn bench_cold_lpm_v6(_ctx: TcContext) -> i32 {
    let mut acc = 0u32;
    for _ in 0..COLD_LOOKUPS_PER_RUN {
        if let Some(a) = BENCH_ADDRS_V6.get(bench_index()) {
            acc ^= BENCH_LPM_V6.get(Key::new(128, *a)).copied().unwrap_or(0);
        }
    }
    bench_verdict(acc)
}

/// datafence's own IPv4 region lookup, on random addresses.
#[classifier]
pub fn bench_cold_region_v4(_ctx: TcContext) -> i32 {
    let slot = active_slot();
    let mut acc = 0u32;
    for _ in 0..COLD_LOOKUPS_PER_RUN {
        if let Some(a) = BENCH_ADDRS_V4.get(bench_index()) {
            acc ^= region_v4(slot, *a);
        }
    }
    bench_verdict(acc)
}

#[classifier]
pub fn bench_cold_region_v6(_ctx: TcContext) -> i32 {
    let slot = active_slot();
    let mut acc = 0u32;
    for _ in 0..COLD_LOOKUPS_PER_RUN {
        if let Some(a) = BENCH_ADDRS_V6.get(bench_index()) {
            acc ^= region_v6(slot, a);
        }
    }
    bench_verdict(acc)
}

/// The stage `bench_handoff` jumps to: only `bench_handoff_stage`, at index 0.
#[map]
static BENCH_STAGES: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The TC entry program's own work, parsing the frame and posting the job, without the
/// jump: with `bench_handoff`, what the split into a tail-called judge costs.
#[classifier]
pub fn bench_parse_post(ctx: TcContext) -> i32 {
    if post_tc_job(&ctx, |bytes, vlan_tags| {
        parse_frame_headers(bytes, vlan_tags)
    })
    .is_some()
    {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// The entry's work, then the jump into a stage that only takes the job back.
#[classifier]
pub fn bench_handoff(ctx: TcContext) -> i32 {
    if post_tc_job(&ctx, |bytes, vlan_tags| {
        parse_frame_headers(bytes, vlan_tags)
    })
    .is_some()
    {
        // SAFETY: the context is the program's own; index 0 is below the array's size.
        unsafe { BENCH_STAGES.tail_call(&ctx, 0) };
    }
    TC_ACT_SHOT
}

#[classifier]
pub fn bench_handoff_stage(_ctx: TcContext) -> i32 {
    match take_job(&TC_JOB) {
        // Uses the job so the read stays; never true for a real frame.
        Some(job) if job.len == 0xdead_beef => TC_ACT_SHOT,
        _ => TC_ACT_OK,
    }
}
