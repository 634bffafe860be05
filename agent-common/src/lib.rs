//! Everything the datafence datapath and agent must agree on: map layouts, limits,
//! the reason-code contract and the pure decision logic.
//!
//! The decision functions here are compiled twice: into the eBPF programs, where they
//! judge live packets, and into the agent, where `datafence explain` uses them to answer
//! "what would happen to this packet". Keeping one copy is what lets the property tests
//! hold the kernel's answer and the userspace answer to the same result.
#![no_std]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        unstable_features,
        reason = "an empty asm! keeps the IPv6 search branch-free (see `opaque`)"
    ),
    feature(asm_experimental_arch)
)]
#![allow(
    clippy::pub_underscore_fields,
    reason = "the explicit padding of the #[repr(C)] kernel types is public so both sides can build them whole"
)]

pub mod cidr;
mod consts;
mod contract;
pub mod decide;
mod layout;
mod names;
pub mod opaque;
pub mod parse;
pub mod socket;
pub mod stat;
pub mod v4;
pub mod v6;
pub mod verdict;

pub use consts::*;
pub use contract::{Hook, REASON_COUNT, Reason, Verdict};
pub use decide::{Decision, PacketFacts, classify, judge};
pub use layout::*;
pub use names::{globals, map_names, program_names, protocols};
